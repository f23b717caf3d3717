"""The lean launch path (kernels/_common.py `launch`): after the first launch of a specialization,
later launches skip Triton's JITFunction.run and call the kept kernel's launcher directly. It must
launch exactly what Triton's own path would: the same compiled kernel (so the same specialization
and config) and the same arguments, and go back to Triton whenever a key is new.

Checked without a GPU in a subprocess where Triton's launch path runs for real on CPU tensors over a
stand-in driver and compiles stub kernels that log their launches (bench/host_launches.py), since
under the interpreter (this test process) the lean path never runs.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

from fastdrn.kernels import _common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="the fake-GPU subprocess is for machines without CUDA"),
    pytest.mark.skipif(not _common.lean_launches_possible(),
                       reason=f"Triton {triton.__version__} has no native_specialize_impl: every launch is Triton's"),
]

PRELUDE = """
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
import host_launches as hl
import torch
import triton
from triton.runtime.jit import JITFunction
hl.install_fake_gpu()
from fastdrn.kernels import _common, gemm
assert not _common.KERNELS_INTERPRETED
log = hl.StubKernel.log = []
triton_runs = []
_run = JITFunction.run
def counting_run(self, *args, **kwargs):
    triton_runs.append(self)
    return _run(self, *args, **kwargs)
JITFunction.run = counting_run

def runtime_args(stub, args):
    # the launcher arguments Triton would read: every non-constexpr one, in signature order
    return [a for (name, kind), a in zip(stub.signature.items(), args[9:]) if kind != "constexpr"]

def same(a, b):
    return a is b if isinstance(a, torch.Tensor) else (type(a), a) == (type(b), b)
"""


def run_script(body: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDRN_NUM_WARPS",
                                                          "FASTDRN_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), REPO], capture_output=True,
                         text=True, timeout=600, env=env, cwd=REPO, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_lean_launch_picks_what_triton_picks():
    """Every argument Triton specializes on, changed one at a time and in mixed order: pointer dtype,
    pointer alignment, an integer equal to 1, divisible by 16 or not, beyond 32 bits, a constexpr.
    The lean launch runs the kernel Triton's own run picks for the same arguments, with the same
    runtime arguments and grid, and a new key goes through Triton."""
    stdout = run_script("""
        import itertools, random
        _common.set_launch_options(autotune=False)
        kernel, config = gemm.conv1x1_kernel, gemm.CONV1X1_CONFIGS[0]
        buffers = {dtype: torch.zeros(4096, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}

        def arguments(dtype, offset, m, n, epilogue):
            base = buffers[dtype]
            x = base[offset:]          # offset 1: a pointer off 16-byte alignment
            return dict(x_ptr=x, w_ptr=base, bias_ptr=base, res_ptr=base, out_ptr=base[8:], M=m, N=n, K=32, NRES=n,
                        stride_xm=32, stride_wn=1, stride_wk=32, stride_rm=n, stride_om=n, alpha_hi=0.2,
                        alpha_lo=0.0, HAS_BIAS=True, HAS_RES=False, EPILOGUE=epilogue, IS_FP64=False,
                        PRECISION="tf32")

        def grid(meta):
            return (64 // meta["BLOCK_M"], 3)

        variants = list(itertools.product((torch.float32, torch.bfloat16), (0, 1), (1, 16, 17, 2**31 + 16),
                                          (48, 40), (0, 1)))
        random.Random(0).shuffle(variants)
        hits = 0
        for variant in variants + variants[::-1]:
            args = arguments(*variant)
            before = len(triton_runs)
            with _common.direct_launches():  # eager code, as the ops run it
                _common.launch(kernel, None, grid, config, **args)
            lean = len(triton_runs) == before
            hits += lean
            stub, launched = log[-1]
            picked = kernel.run(grid=grid, warmup=False, **args, **config.kwargs, num_warps=config.num_warps,
                                num_stages=config.num_stages)
            assert stub is picked, (variant, stub.signature, picked.signature)
            _, expected = log[-1]
            assert launched[:3] == expected[:3], (variant, launched[:3], expected[:3])  # grid
            assert all(same(a, b) for a, b in zip(runtime_args(stub, launched), runtime_args(stub, expected))), variant
        compiled = {id(stub) for stub, _ in log}
        print("variants", len(variants), "kernels", len(compiled), "lean", hits)
        assert hits == len(variants), hits          # the second pass, and only it, is lean
        assert len(compiled) > 8                     # the variants did specialize differently
    """)
    assert "variants" in stdout


def test_lean_launch_keeps_the_autotuned_config():
    """With autotuning on, each tuning key is tuned once, through Triton, and later launches run the
    config the tuner chose for that key: here the stand-in benchmarker makes 8 warps fastest at
    N = 32 and 4 warps at N = 48 (the same specialization otherwise)."""
    run_script("""
        n_index = 9 + gemm.conv1x1_kernel.arg_names.index("N")
        hl.FakeGPUDriver.timing = lambda stub, args: 0.5 if (stub.options.num_warps == 8) == (args[n_index] == 32) else 1.0
        tuned = gemm.conv1x1_tuned[False]
        x = torch.zeros(64, 48, dtype=torch.bfloat16)
        w = torch.zeros(48, 48, dtype=torch.bfloat16)
        out = torch.zeros(64, 48, dtype=torch.bfloat16)

        def arguments(n):
            return dict(x_ptr=x, w_ptr=w, bias_ptr=w, res_ptr=x, out_ptr=out, M=64, N=n, K=48, NRES=n, stride_xm=48,
                        stride_wn=48, stride_wk=1, stride_rm=0, stride_om=n, alpha_hi=0.2, alpha_lo=0.0,
                        HAS_BIAS=False, HAS_RES=False, EPILOGUE=0, IS_FP64=False, PRECISION="tf32")

        grid = lambda meta: (1, 1)
        eager = _common.direct_launches()  # eager code, as the ops run it
        eager.__enter__()
        for n in (32, 48):
            _common.launch(gemm.conv1x1_kernel, tuned, grid, gemm.CONV1X1_INTERPRETER, **arguments(n))
        runs = len(triton_runs)
        for n, warps in ((32, 8), (48, 4), (48, 4), (32, 8)):
            _common.launch(gemm.conv1x1_kernel, tuned, grid, gemm.CONV1X1_INTERPRETER, **arguments(n))
            assert log[-1][0].options.num_warps == warps, (n, log[-1][0].options.num_warps)
        assert len(triton_runs) == runs          # lean

        # A pin set at run time replaces what was kept: the next launch goes through Triton again.
        _common.set_launch_options(num_warps=4)
        _common.launch(gemm.conv1x1_kernel, tuned, grid, gemm.CONV1X1_INTERPRETER, **arguments(32))
        assert len(triton_runs) == runs + 1 and log[-1][0].options.num_warps == 4
    """)


def test_model_steps_launch_the_same_kernels_lean():
    """A DRN training step and an inference forward, twice on the same inputs: the second time every
    Triton launch is lean and launches the same compiled kernels with the same grids, in order."""
    run_script("""
        import fastdrn
        _common.set_launch_options(autotune=False)  # no benchmark launches in the first step
        torch.manual_seed(0)
        model = fastdrn.DRN(scale=2, n_feats=16, n_groups=2, n_blocks=3, inner=16, distill=4)
        x = torch.rand(2, 3, 5, 7)

        def step():
            model(x).sum().backward()
            with torch.no_grad():
                model(x)

        runs = []
        for _ in range(2):
            log.clear()
            before = len(triton_runs)
            step()
            runs.append(([(id(stub), args[:3]) for stub, args in log], len(triton_runs) - before))
        (first, first_triton), (second, second_triton) = runs
        print("launches", len(first), "through Triton", first_triton, second_triton)
        assert first == second
        assert 0 < first_triton < len(first) and second_triton == 0  # repeated keys are lean from their second launch
    """)


def test_interpreter_never_keeps_kernels(device):
    """Under the interpreter every launch stays on Triton's plain path."""
    from fastdrn import ops
    from fastdrn.kernels import _common

    if not _common.KERNELS_INTERPRETED:
        pytest.skip("the kernels are compiled here")
    z = torch.randn(1, 8, 3, 3)
    ws = [torch.randn(16, 8, 1, 1), torch.randn(16), torch.randn(16, 16, 3, 3), torch.randn(16),
          torch.randn(12, 16, 1, 1), torch.randn(12)]
    ops.residual_distill(z, *ws)
    assert not _common._lean_launchers


def test_launch_settings_are_checked(monkeypatch):
    from fastdrn.kernels import _common

    for value in ("six", "\u00b2"):  # a superscript two is a digit to str.isdigit, and not to int()
        monkeypatch.setenv("FASTDRN_NUM_WARPS", value)
        with pytest.raises(ValueError, match=f"FASTDRN_NUM_WARPS='{value}' is not a power of two"):
            _common.LaunchOptions.from_environment()
    with pytest.raises(ValueError, match="num_warps=3"):
        _common.set_launch_options(num_warps=3)
    monkeypatch.delenv("FASTDRN_NUM_WARPS")
    for value in ("4", "0", "three", "\u00b2"):
        monkeypatch.setenv("FASTDRN_WEIGHT_GRAD_BLOCKS", value)
        with pytest.raises(ValueError, match="FASTDRN_WEIGHT_GRAD_BLOCKS=.*1, 2 or 3 blocks"):
            _common.LaunchOptions.from_environment()
    monkeypatch.setenv("FASTDRN_WEIGHT_GRAD_BLOCKS", "2")
    monkeypatch.setenv("FASTDRN_FOLD_BACKWARD", "yes")
    with pytest.raises(ValueError, match="FASTDRN_FOLD_BACKWARD='yes'"):
        _common.LaunchOptions.from_environment()
    monkeypatch.delenv("FASTDRN_FOLD_BACKWARD")
    assert _common.LaunchOptions.from_environment().fold_backward, "the fold is the default"
    monkeypatch.setenv("FASTDRN_FOLD_BACKWARD", "0")
    options = _common.LaunchOptions.from_environment()
    assert (options.weight_grad_blocks, options.fold_backward) == (2, False)
    with pytest.raises(ValueError, match="weight_grad_blocks=4"):
        _common.set_launch_options(weight_grad_blocks=4)
    with pytest.raises(ValueError, match="fold_backward='1'"):
        _common.set_launch_options(fold_backward="1")
    assert not _common.LaunchOptions.from_environment().fuse_tail, "the fused tail is opt-in"
    monkeypatch.setenv("FASTDRN_FUSE_TAIL", "on")
    with pytest.raises(ValueError, match="FASTDRN_FUSE_TAIL='on'"):
        _common.LaunchOptions.from_environment()
    monkeypatch.setenv("FASTDRN_FUSE_TAIL", "1")
    assert _common.LaunchOptions.from_environment().fuse_tail
    with pytest.raises(ValueError, match="fuse_tail=1"):
        _common.set_launch_options(fuse_tail=1)


def test_on_off_arguments_refuse_what_is_not_a_bool():
    """set_launch_options(autotune=...) and set_launch_plans(...) took bool() of anything, so
    autotune="false" or set_launch_plans("0") turned them on without a word; fold_backward and
    fuse_tail already refused. A num_warps of True pinned 1 warp."""
    from fastdrn.kernels import _common, plans

    for value in ("false", "0", 0, None):
        with pytest.raises(ValueError, match=f"autotune={value!r}"):
            _common.set_launch_options(autotune=value)
        with pytest.raises(ValueError, match=f"enabled={value!r}"):
            plans.set_launch_plans(value)
    with pytest.raises(ValueError, match="num_warps=True"):
        _common.set_launch_options(num_warps=True)
    plans.reset()


@pytest.mark.parametrize("value", ["no", "false", "off", "yes", "2", "-1", ""])
def test_on_off_settings_refuse_what_is_not_0_or_1(value, monkeypatch):
    """FASTDRN_AUTOTUNE and FASTDRN_LAUNCH_PLANS read anything but "0" as on, so "false", "off" or
    "no" left autotuning and launch plans on without a word; now refused by name, as
    FASTDRN_FOLD_BACKWARD and FASTDRN_FUSE_TAIL are."""
    from fastdrn.kernels import _common, plans

    monkeypatch.setenv("FASTDRN_AUTOTUNE", value)
    with pytest.raises(ValueError, match=f"FASTDRN_AUTOTUNE={value!r}"):
        _common.LaunchOptions.from_environment()
    monkeypatch.setenv("FASTDRN_AUTOTUNE", " 0 ")
    assert not _common.LaunchOptions.from_environment().autotune
    monkeypatch.setenv("FASTDRN_LAUNCH_PLANS", value)
    plans.reset()
    try:
        with pytest.raises(ValueError, match=f"FASTDRN_LAUNCH_PLANS={value!r}"):
            plans.plans_enabled()
        monkeypatch.setenv("FASTDRN_LAUNCH_PLANS", "0")
        plans.reset()
        assert not plans.plans_enabled()
    finally:
        monkeypatch.delenv("FASTDRN_LAUNCH_PLANS")
        plans.reset()
