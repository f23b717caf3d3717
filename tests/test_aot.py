"""The ahead-of-time compile check (kernels/aot_check.py, kernels/registry.py).

`test_aot_check_passes` compiles every registered variant for sm_90 and sm_80 with Triton's real
compiler (no GPU needed) in a subprocess without TRITON_INTERPRET and asserts the check passes:
about ten minutes on 2 cores (FASTDRN_AOT_JOBS sets the processes, default 2). The other tests
are fast: the registry is complete and consistent, the unregistered-kernel detection works on a
fake kernel package, and the log parsers read real ptxas / cuobjdump output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import triton
from fastdrn.kernels import aot_check, registry
from helpers import run_bounded


def _toolchain_missing() -> str | None:
    """Why the AOT check cannot run here (no NVIDIA backend or ptxas/cuobjdump in Triton's wheel)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"Triton's compiler API is not importable: {exc}"
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(bindir, tool)):
            return f"{tool} is not in Triton's wheel ({bindir})"
    return None


needs_toolchain = pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _run_check(*args, env=None, timeout=3600) -> subprocess.CompletedProcess:
    return run_bounded([sys.executable, "-m", "fastdrn.kernels.aot_check", *args], timeout, env=env or _env())


# ---- the full check ------------------------------------------------------------------------------

@needs_toolchain
@pytest.mark.skipif(os.environ.get("FASTDRN_AOT_FULL") != "1",
                    reason="the full compile of every variant takes 6-20 minutes on 2 cores: FASTDRN_AOT_FULL=1 runs it")
def test_aot_check_passes(tmp_path):
    out = tmp_path / "aot.json"
    jobs = os.environ.get("FASTDRN_AOT_JOBS", "2")
    proc = _run_check("--jobs", jobs, "--quiet", "--json", str(out))
    assert out.exists(), f"the check wrote no JSON (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    summary, rows = data["summary"], data["rows"]
    failures = [f"{r['kernel']} | {r['config']} | {r['case']} | {r['dtype']} | {r['target']}: {'; '.join(r['problems'])}"
                for r in rows if not r["ok"]]
    assert not summary["registry_problems"] and not failures, (
        "registry: " + ("\n".join(summary["registry_problems"]) or "ok")
        + f"\n{len(failures)} of {len(rows)} compiles fail:\n" + "\n".join(failures))
    assert proc.returncode == 0, proc.stdout[-4000:]
    variants, _ = registry.collect_variants()
    assert len(rows) == 2 * len(variants)
    # Every registered kernel, at every dtype, for both targets.
    covered = {(r["kernel"], r["dtype"], r["target"]) for r in rows}
    for v in variants:
        for target in ("sm_90", "sm_80"):
            assert (v.kernel_name, v.dtype, target) in covered


# ---- the registry, without compiling ----------------------------------------------------------------

def test_registry_is_complete_and_consistent():
    variants, problems = registry.check_registry()
    assert not problems, "\n".join(problems)
    assert variants
    for name in {v.kernel_name for v in variants}:
        mine = [v for v in variants if v.kernel_name == name]
        assert {v.dtype for v in mine} == {"fp32", "bf16", "fp16"}, name  # every storage dtype
        if not all(v.config.endswith("[fixed]") for v in mine):  # fixed-config kernels ignore the pins
            assert {v.num_warps for v in mine} >= {4, 8}, f"{name}: FASTDRN_NUM_WARPS=4/8 configs missing"
        assert all(not v.constexprs.get("IS_FP64", False) for v in mine), f"{name}: no float64 on a GPU"


def test_pinned_warps_pick_a_listed_config():
    """FASTDRN_NUM_WARPS=n runs the first listed config with n warps, else the default: never a
    config the AOT check has not compiled."""
    from fastdrn.kernels._common import pinned_config

    four = triton.Config({"BLOCK_M": 64}, num_warps=4)
    eight = triton.Config({"BLOCK_M": 128}, num_warps=8)
    assert pinned_config([four, eight], 8) is eight
    assert pinned_config([four, eight], 4) is four
    assert pinned_config([eight], 4) is eight


def test_registry_covers_gemm_launch_configs():
    from fastdrn.kernels import gemm

    variants = gemm.aot_variants()
    cases = [(gemm.conv1x1_kernel, "fp32", gemm.CONV1X1_FP32_CONFIGS)]
    cases += [(gemm.conv1x1_kernel, dtype, gemm.CONV1X1_CONFIGS) for dtype in ("bf16", "fp16")]
    cases += [(kernel, dtype, configs) for (fp32, _aligned), configs in gemm.WEIGHT_GRAD_TILES_CONFIGS.items()
              for dtype in (("fp32",) if fp32 else ("bf16", "fp16"))
              for kernel in (gemm.weight_grad_tiles_kernel, gemm.weight_grad_blocks_kernel)]
    for kernel, dtype, configs in cases:
        mine = [v for v in variants if v.kernel is kernel and v.dtype == dtype]
        for config in configs:
            assert any(v.num_warps == config.num_warps and v.num_stages == config.num_stages
                       and all(v.constexprs[k] == val for k, val in config.kwargs.items()) for v in mine), config
    epilogues = {v.constexprs["EPILOGUE"] for v in variants if v.kernel is gemm.conv1x1_kernel}
    assert epilogues == {value for name, value in vars(gemm).items() if name.startswith("EPILOGUE_")}


def test_registry_covers_shuffle_tail_launch_configs():
    """Every config the shuffle_tail launcher can run, at every storage dtype, at DRN's scales and
    both output formats, with parameters in u's dtype and (16-bit, autocast) in float32."""
    from fastdrn.kernels import shuffle_tail

    variants = shuffle_tail.aot_variants()
    for dtype, configs in (("fp32", shuffle_tail.FP32_CONFIGS), ("bf16", shuffle_tail.CONFIGS),
                           ("fp16", shuffle_tail.CONFIGS)):
        for config in configs:
            mine = [v for v in variants if v.dtype == dtype and v.num_warps == config.num_warps
                    and v.num_stages == config.num_stages
                    and all(v.constexprs[k] == val for k, val in config.kwargs.items())]
            assert {(v.constexprs["SCALE"], v.constexprs["OUT_CL"]) for v in mine} == {
                (s, cl) for s in (2, 3, 4) for cl in (False, True)}, (dtype, config)
            if dtype != "fp32":
                assert any(v.signature["w_ptr"] == "*fp32" for v in mine), (dtype, config)


def test_signature_helper():
    sig = registry.signature({"x_ptr": "ptr", "acc_ptr": "*fp32", "n": "i32", "a": "fp32", "B": "constexpr"}, "bf16")
    assert sig == {"x_ptr": "*bf16", "acc_ptr": "*fp32", "n": "i32", "a": "fp32", "B": "constexpr"}
    with pytest.raises(ValueError):
        registry.signature({"x": "pointer"}, "bf16")


# ---- unregistered kernels are caught -----------------------------------------------------------------

FAKE_GOOD = '''
import triton
import triton.language as tl


@triton.jit
def tiny_dot_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + r[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BLOCK + r[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def helper(x):  # a JIT helper, not a kernel: never needs a variant
    return x


CONFIGS = [triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
tiny_dot_tuned = triton.autotune(configs=CONFIGS, key=["K"])(tiny_dot_kernel)
# 256 x 256 tiles, 3 stages of 128-deep bf16 slabs: about 192 KiB of shared memory, over sm_80's limit.
TOO_BIG = triton.Config({"BLOCK": 256, "BLOCK_K": 128}, num_warps=8, num_stages=3)


def aot_variants():
    from fastdrn.kernels.registry import expand, launch_configs

    kinds = {"a_ptr": "ptr", "b_ptr": "ptr", "c_ptr": "*fp32", "K": "i32", "BLOCK": "constexpr", "BLOCK_K": "constexpr"}
    return expand(tiny_dot_kernel, kinds, cases=[("", {})],
                  configs=launch_configs(CONFIGS, pinned_warps=()) + [("too big", TOO_BIG)],
                  dtypes=("bf16",), div16=("K",), specializations=("div16",))
'''

FAKE_STRAY = '''
import triton
import triton.language as tl


@triton.jit
def foo_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


@triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=[])
@triton.jit
def baz_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)
'''


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fakekernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A fake kernel package."""\n')
    (pkg / "good.py").write_text(textwrap.dedent(FAKE_GOOD))
    (pkg / "stray.py").write_text(textwrap.dedent(FAKE_STRAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "fakekernels" or m.startswith("fakekernels.")]:
        del sys.modules[name]


def test_unregistered_kernel_is_reported(fake_package):
    variants, problems = registry.check_registry("fakekernels", ["fakekernels.good"])
    assert {v.kernel_name for v in variants} == {"tiny_dot_kernel"}
    text = "\n".join(problems)
    assert "unregistered kernel foo_kernel" in text
    assert "unregistered kernel baz_kernel" in text  # found through its autotune wrapper
    assert "tiny_dot_kernel" not in text and "helper" not in text
    assert len(problems) == 2


def test_uncovered_autotune_config_is_reported(fake_package):
    import importlib

    good = importlib.import_module("fakekernels.good")
    variants = good.aot_variants()
    assert registry.coverage_problems(variants, [good]) == []
    good.tiny_dot_tuned.configs.append(triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2))
    problems = registry.coverage_problems(variants, [good])
    assert len(problems) == 1 and "autotune config BLOCK=128 K32 w8 s2 has no AOT variant" in problems[0]


def test_unlisted_module_and_bad_record_are_reported(fake_package):
    _, problems = registry.collect_variants(["fakekernels.stray"])
    assert any("has no aot_variants()" in p for p in problems)
    import importlib

    good = importlib.import_module("fakekernels.good")
    v = good.aot_variants()[0]
    broken = registry.Variant(**{**v.__dict__, "signature": {k: s for k, s in v.signature.items() if k != "K"}})
    assert any("missing ['K']" in p for p in broken.problems())


@needs_toolchain
def test_cli_fails_on_stray_kernel_and_shared_overflow(fake_package, tmp_path):
    out = tmp_path / "fake.json"
    env = _env(PYTHONPATH=os.pathsep.join([str(fake_package), os.environ.get("PYTHONPATH", "")]))
    proc = _run_check("--package", "fakekernels", "--modules", "fakekernels.good", "--jobs", "1", "--json", str(out),
                      env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unregistered kernel foo_kernel" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4  # 2 configs x sm_90, sm_80
    small = [r for r in rows if r["config"] != "too big"]
    assert all(r["ok"] for r in small), small
    assert {tuple(r["mma_kinds"]) for r in small} == {("wgmma.bf16",), ("mma.bf16",)}
    assert all(r["spill_stores"] == 0 and r["registers"] == r["registers_cuobjdump"] for r in small)
    big80 = next(r for r in rows if r["config"] == "too big" and r["target"] == "sm_80")
    assert not big80["ok"] and big80["shared"] > aot_check.SHARED_LIMIT[80]
    assert any("shared memory" in p for p in big80["problems"])


# ---- parsing compiler output ----------------------------------------------------------------------------

PTXAS_LOG = """ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function 'weight_grad_tiles_kernel' for 'sm_80'
ptxas-blackwell info    : Function properties for weight_grad_tiles_kernel
    384 bytes stack frame, 384 bytes spill stores, 380 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 384 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 412.133 ms
"""

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function conv1x1_kernel:
  REG:184 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parsers():
    assert aot_check.parse_ptxas_log(PTXAS_LOG) == {"registers": 255, "stack": 384, "spill_stores": 384,
                                                     "spill_loads": 380}
    assert aot_check.parse_ptxas_log("nothing here") is None
    assert aot_check.parse_res_usage(RES_USAGE) == {"registers": 184, "stack": 0, "shared_static": 1024, "local": 0}
    ptx = ("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...};\n")
    assert aot_check.mma_kinds(ptx) == {"wgmma.bf16", "mma.tf32"}


def test_judge():
    row = {"registers": 120, "registers_cuobjdump": 120, "spill_stores": 0, "spill_loads": 0, "stack": 0, "local": 0,
           "shared": 50000, "shared_dynamic": 49152, "shared_static": 848, "mma_kinds": ["wgmma.bf16"]}
    assert aot_check.judge(row, True, "bf16", 90) == []
    assert any("mma.bf16" in p for p in aot_check.judge(row, True, "bf16", 80))  # sm_80 wants mma.sync
    assert any("wgmma.tf32" in p for p in aot_check.judge(row, True, "fp32", 90))
    assert aot_check.judge({**row, "mma_kinds": []}, False, "bf16", 90) == []
    assert any("spills" in p for p in aot_check.judge({**row, "spill_stores": 4, "spill_loads": 4}, True, "bf16", 90))
    too_big = {**row, "shared": 166913, "shared_dynamic": 166913, "shared_static": 0}
    assert aot_check.judge(too_big, True, "bf16", 90) == []
    assert any("shared memory" in p for p in aot_check.judge({**too_big, "mma_kinds": ["mma.bf16"]}, True, "bf16", 80))
