"""Ahead-of-time compile check of every Triton kernel fastdrn ships (docs/kernels.md).

    python -m fastdrn.kernels.aot_check [--arch 90 80] [--kernel NAME ...] [--jobs 2] [--json FILE] [--list]

Compiles every variant of kernels/registry.py (every kernel, constexpr combination, launch config,
dtype and integer specialization) for each target with Triton's real compiler, no GPU needed, and
checks for each:
  - it compiles;
  - its shared memory (dynamic + static) fits one block of the target: sm_90 232448 bytes,
    sm_80 166912 bytes (the opt-in maximum per block);
  - ptxas reports no spill stores or loads (and no stack frame / local memory, by cuobjdump);
  - when the variant needs tensor cores, its PTX has them for its dtype: wgmma on sm_90,
    mma.sync on sm_80; bf16 -> .bf16, fp16 -> .f16, fp32 -> .tf32.
It also fails when a `*_kernel` of the package has no variant (registry.coverage_problems).
Prints one table row per compile and exits non-zero on any failure.

Registers and spills come from the ptxas log (`ptxas -v`, printed by Triton under
TRITON_DUMP_PTXAS_LOG=1) and from `cuobjdump -res-usage` on the cubin (the copy in Triton's wheel):
the two register counts must agree. Each run compiles into a fresh Triton cache, so ptxas always
runs and its log is always there.

Triton's interpreter cannot compile: when TRITON_INTERPRET is set the check re-runs itself in a
subprocess without it (the kernels must be decorated by the real JIT).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# Max shared memory per block (opt-in, static + dynamic) by compute capability.
SHARED_LIMIT = {90: 232448, 80: 166912}
DEFAULT_ARCHS = (90, 80)
MMA_TYPE = {"bf16": "bf16", "fp16": "f16", "fp32": "tf32"}
INTERPRET_ENV = "TRITON_INTERPRET"


# ---- parsing compiler output (pure functions, unit-tested) ------------------------------------------

def parse_ptxas_log(text: str) -> dict | None:
    """registers, spill_stores, spill_loads, stack from `ptxas -v` output; None if absent.

    Handles `ptxas info`, `ptxas-blackwell info` and similar prefixes; a log with several functions
    is summed for spills and maxed for registers.
    """
    regs = [int(x) for x in re.findall(r"Used\s+(\d+)\s+registers", text)]
    props = re.findall(r"(\d+)\s+bytes\s+stack\s+frame,\s*(\d+)\s+bytes\s+spill\s+stores,\s*(\d+)\s+bytes\s+spill\s+loads",
                       text)
    if not regs and not props:
        return None
    return {
        "registers": max(regs) if regs else None,
        "stack": sum(int(p[0]) for p in props) if props else None,
        "spill_stores": sum(int(p[1]) for p in props) if props else None,
        "spill_loads": sum(int(p[2]) for p in props) if props else None,
    }


def parse_res_usage(text: str) -> dict | None:
    """REG, STACK, SHARED, LOCAL from `cuobjdump -res-usage` output (first kernel function); None if absent."""
    match = re.search(r"Function\s+[^\n:]+:\s*\n\s*(.*REG:\d+.*)", text)
    line = match.group(1) if match else next((ln for ln in text.splitlines() if "REG:" in ln), None)
    if line is None:
        return None
    fields = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
    return {"registers": fields.get("REG"), "stack": fields.get("STACK"), "shared_static": fields.get("SHARED"),
            "local": fields.get("LOCAL")}


def mma_kinds(ptx: str) -> set[str]:
    """Tensor-core instructions in PTX as {"wgmma.bf16", "mma.tf32", ...} (by operand type)."""
    kinds = set()
    for instr in re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx):
        parts = instr.split(".")
        family = "wgmma" if parts[0] == "wgmma" else "mma"
        types = [p for p in parts if p in ("bf16", "f16", "tf32", "e4m3", "e5m2", "s8", "u8", "f64")]
        kinds.add(f"{family}.{types[0] if types else '?'}")
    return kinds


def judge(row: dict, needs_mma: bool, dtype: str, arch: int) -> list[str]:
    """Why a compiled row fails (empty when it passes)."""
    problems = []
    if row.get("spill_stores") is None and row.get("stack") is None:
        problems.append("no spill information (neither ptxas log nor cuobjdump)")
    if (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0) > 0:
        problems.append(f"spills: {row['spill_stores']} bytes stored, {row['spill_loads']} bytes loaded "
                        f"({row['registers']} registers)")
    if (row.get("stack") or 0) > 0 or (row.get("local") or 0) > 0:
        problems.append(f"local memory: stack {row.get('stack')} bytes, local {row.get('local')} bytes")
    ptxas_regs, cuobj_regs = row.get("registers"), row.get("registers_cuobjdump")
    if ptxas_regs is not None and cuobj_regs is not None and ptxas_regs != cuobj_regs:
        problems.append(f"register counts disagree: ptxas {ptxas_regs}, cuobjdump {cuobj_regs}")
    limit = SHARED_LIMIT[arch]
    if row["shared"] > limit:
        problems.append(f"shared memory {row['shared']} bytes (dynamic {row['shared_dynamic']} + static "
                        f"{row['shared_static']}) > {limit} for sm_{arch}")
    if needs_mma:
        want = f"{'wgmma' if arch >= 90 else 'mma'}.{MMA_TYPE[dtype]}"
        if want not in row["mma_kinds"]:
            found = ", ".join(sorted(row["mma_kinds"])) or "none"
            problems.append(f"no {want} tensor-core instruction in the PTX (found: {found})")
    return problems


# ---- compiling one variant (in a worker process) ----------------------------------------------------

_VARIANTS: list | None = None
_MODULES: tuple[str, ...] | None = None


def _init_worker(modules: tuple[str, ...] | None) -> None:
    global _MODULES, _VARIANTS
    _MODULES, _VARIANTS = modules, None


def _load_variants() -> list:
    global _VARIANTS
    if _VARIANTS is None:
        from fastdrn.kernels import registry

        _VARIANTS, _ = registry.collect_variants(_MODULES or registry.KERNEL_MODULES)
    return _VARIANTS


def _tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_variant(variant, arch: int) -> dict:
    """Compile one variant for sm_<arch> and measure it; a row of the table (a plain dict)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": variant.kernel_name, "config": variant.config, "case": variant.case, "dtype": variant.dtype,
           "target": f"sm_{arch}", "num_warps": variant.num_warps, "num_stages": variant.num_stages,
           "needs_mma": variant.needs_mma, "registers": None, "registers_cuobjdump": None, "spill_stores": None,
           "spill_loads": None, "stack": None, "local": None, "shared": None, "shared_dynamic": None,
           "shared_static": None, "mma_kinds": [], "compile_s": None, "ok": False, "problems": []}
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(variant.kernel, dict(variant.signature), dict(variant.constexprs), variant.attrs())
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
            ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    except Exception as exc:  # noqa: BLE001 - a failed compile is a row of the table
        row["compile_s"] = round(time.perf_counter() - start, 3)
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()
        row["problems"] = ["compile failed: " + " | ".join(message[:6])]
        return row
    row["compile_s"] = round(time.perf_counter() - start, 3)

    ptxas = parse_ptxas_log(log.getvalue())
    if ptxas:
        row.update({k: v for k, v in ptxas.items() if v is not None})
    with tempfile.TemporaryDirectory(prefix="fastdrn-aot-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([os.path.join(_tools_dir(), "cuobjdump"), "-res-usage", path], capture_output=True,
                                 text=True, timeout=60, check=False)
            usage = parse_res_usage(out.stdout)
        except (OSError, subprocess.SubprocessError):
            usage = None
    if usage:
        row["registers_cuobjdump"] = usage["registers"]
        row["local"] = usage["local"]
        row["shared_static"] = usage["shared_static"]
        if row["stack"] is None:
            row["stack"] = usage["stack"]
        if row["registers"] is None:
            row["registers"] = usage["registers"]
    row["shared_dynamic"] = int(compiled.metadata.shared)
    row["shared"] = row["shared_dynamic"] + (row["shared_static"] or 0)
    row["mma_kinds"] = sorted(mma_kinds(ptx))
    row["problems"] = judge(row, variant.needs_mma, variant.dtype, arch)
    row["ok"] = not row["problems"]
    return row


def _work(task: tuple[int, str, int]) -> tuple[int, dict]:
    index, key, arch = task
    variants = _load_variants()
    variant = variants[index] if index < len(variants) else None
    if variant is None or variant.key != key:  # pragma: no cover - registry changed under us
        return index, {"kernel": key, "config": "", "case": "", "dtype": "", "target": f"sm_{arch}", "ok": False,
                       "problems": ["the worker's registry differs from the parent's"], "mma_kinds": []}
    return index, compile_variant(variant, arch)


# ---- the table ------------------------------------------------------------------------------------

COLUMNS = [("kernel", 18), ("config", 34), ("case", 24), ("dtype", 5), ("target", 6), ("regs", 4),
           ("spills", 9), ("shared", 7), ("mma", 11), ("ok", 4)]


def format_row(row: dict) -> str:
    spills = "-" if row.get("spill_stores") is None else f"{row['spill_stores']}/{row['spill_loads']}"
    mma = ",".join(row.get("mma_kinds") or []) or "no"
    cells = {"kernel": row["kernel"], "config": row["config"], "case": row["case"], "dtype": row["dtype"],
             "target": row["target"], "regs": "-" if row.get("registers") is None else str(row["registers"]),
             "spills": spills, "shared": "-" if row.get("shared") is None else str(row["shared"]), "mma": mma,
             "ok": "ok" if row["ok"] else "FAIL"}
    return "  ".join(f"{cells[name]:<{width}}" for name, width in COLUMNS).rstrip()


def header() -> str:
    names = {"spills": "spills st/ld", "shared": "shared"}
    return "  ".join(f"{names.get(n, n):<{w}}" for n, w in COLUMNS).rstrip()


# ---- main -------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdrn.kernels.aot_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(SHARED_LIMIT),
                   help="compute capabilities to compile for (default: 90 80)")
    p.add_argument("--kernel", nargs="+", default=None, metavar="NAME",
                   help="only kernels with these names (shell patterns allowed)")
    p.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "bf16", "fp16"], help="only these dtypes")
    p.add_argument("--spec", nargs="+", default=None, choices=["div16", "plain"],
                   help="only these integer specializations (registry.SPECIALIZATIONS)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--json", metavar="FILE", default=None, help="write every row and the summary to FILE")
    p.add_argument("--list", action="store_true", help="list the variants and check the registry; compile nothing")
    p.add_argument("--quiet", action="store_true", help="print only failing rows and the summary")
    # For the tests: check another package against another module list.
    p.add_argument("--package", default=None, help=argparse.SUPPRESS)
    p.add_argument("--modules", nargs="+", default=None, help=argparse.SUPPRESS)
    return p


def _without_interpreter_env() -> dict:
    env = dict(os.environ)
    env.pop(INTERPRET_ENV, None)
    return env


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if INTERPRET_ENV in os.environ:
        # The kernels would be (or already are) decorated for the interpreter: run in a clean process.
        return subprocess.call([sys.executable, "-m", "fastdrn.kernels.aot_check", *argv],
                               env=_without_interpreter_env())
    if args.jobs < 1:
        print("--jobs must be at least 1", file=sys.stderr)
        return 2

    from fastdrn.kernels import registry

    started = time.perf_counter()
    modules = tuple(args.modules) if args.modules else registry.KERNEL_MODULES
    variants, problems = registry.check_registry(args.package or registry.PACKAGE, modules)
    chosen = [(i, v) for i, v in enumerate(variants)
              if (args.kernel is None or any(fnmatch.fnmatchcase(v.kernel_name, pat)
                                             or fnmatch.fnmatchcase(v.kernel_name, pat + "_kernel") for pat in args.kernel))
              and (args.dtype is None or v.dtype in args.dtype)
              and (args.spec is None or v.specialization in args.spec)]
    if not chosen:
        for problem in problems:
            print(f"REGISTRY FAIL: {problem}")
        known = sorted({v.kernel_name for v in variants})
        print(f"no registered variant matches the filters; registered kernels: {', '.join(known) or 'none'}",
              file=sys.stderr)
        return 2 if variants else 1
    kernels = sorted({v.kernel_name for _, v in chosen})
    print(f"AOT check: {len(chosen)} variants of {len(kernels)} kernels ({', '.join(kernels)}) "
          f"x {len(args.arch)} targets ({', '.join(f'sm_{a}' for a in args.arch)}) = {len(chosen) * len(args.arch)} "
          f"compiles, {args.jobs} jobs", flush=True)

    rows: list[dict] = []
    if args.list:
        for _, v in chosen:
            print(f"{v.key} | w{v.num_warps} s{v.num_stages} | mma {'required' if v.needs_mma else 'optional'}")
    else:
        rows = _compile_all(chosen, args.arch, args.jobs, args.quiet, modules)

    failed = [r for r in rows if not r["ok"]]
    elapsed = time.perf_counter() - started
    compile_times = [r["compile_s"] for r in rows if r.get("compile_s") is not None]
    print()
    for problem in problems:
        print(f"REGISTRY FAIL: {problem}")
    for r in failed:
        print(f"FAIL {r['kernel']} | {r['config']} | {r['case']} | {r['dtype']} | {r['target']}: "
              f"{'; '.join(r['problems'])}")
    if rows:
        tf32 = [r for r in rows if r["dtype"] == "fp32"]
        tf32_ok = sum(1 for r in tf32 if any(k.endswith(".tf32") for k in r["mma_kinds"]))
        print(f"{len(rows)} compiles, {len(rows) - len(failed)} ok, {len(failed)} failed; fp32 variants with TF32 "
              f"tensor cores: {tf32_ok}/{len(tf32)}; max registers {max((r['registers'] or 0) for r in rows)}, "
              f"max shared {max((r['shared'] or 0) for r in rows)} bytes")
        print(f"wall {elapsed:.1f} s; compile time per variant {sum(compile_times) / max(len(compile_times), 1):.2f} s "
              f"(sum {sum(compile_times):.1f} s over {args.jobs} jobs)")
    print("AOT check " + ("PASSED" if not failed and not problems else "FAILED"))
    if args.json:
        summary = {"compiles": len(rows), "failed": len(failed), "registry_problems": problems,
                   "archs": args.arch, "jobs": args.jobs, "wall_s": round(elapsed, 1),
                   "variants": len(chosen), "kernels": kernels}
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return 1 if failed or problems else 0


def _compile_all(chosen, archs, jobs: int, quiet: bool, modules: tuple[str, ...]) -> list[dict]:
    """Compile every (variant, arch); print the table sorted like the registry; return the rows."""
    tasks = [(i, v.key, arch) for i, v in chosen for arch in archs]
    order = {(i, arch): n for n, (i, _key, arch) in enumerate(tasks)}
    # A fresh cache: every compile runs ptxas (its log is the spill report), and nothing stale is read.
    cache = tempfile.mkdtemp(prefix="fastdrn-aot-cache-")
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    results: list[tuple[int, dict]] = []
    started = time.perf_counter()
    pool = None
    try:
        if jobs == 1:
            _init_worker(modules)
            stream = map(_work, tasks)
        else:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks)) or 1, initializer=_init_worker,
                                                            initargs=(modules,))
            stream = pool.imap_unordered(_work, tasks, chunksize=2)
        step = max(1, len(tasks) // 10)
        for index, row in stream:
            results.append((order[(index, int(row["target"][3:]))], row))
            if len(results) % step == 0 or len(results) == len(tasks):
                print(f"  compiled {len(results)}/{len(tasks)} ({time.perf_counter() - started:.0f} s, "
                      f"{sum(1 for _, r in results if not r['ok'])} failed)", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        shutil.rmtree(cache, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = [row for _, row in sorted(results, key=lambda item: item[0])]
    if not quiet:
        print(header())
    for row in rows:
        if not quiet or not row["ok"]:
            print(format_row(row))
    return rows


if __name__ == "__main__":
    sys.exit(main())
