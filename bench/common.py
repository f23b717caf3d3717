"""What every fastdrn benchmark shares: environment record, timing, ceilings, counts, rows, tables.

Import this module before anything that imports fastdrn's kernels: when the command line holds
`--smoke` it sets TRITON_INTERPRET=1 first, so that Triton decorates the kernels for its CPU
interpreter (smoke mode runs every script at tiny sizes on CPU tensors, and its numbers are not
timings).

Timing on a GPU is the median of `triton.testing.do_bench` (CUDA events, L2 flushed before each
repeat) after a warm-up call that absorbs compilation and autotuning; in smoke mode it is the
median of a few `time.perf_counter` runs. Rows are JSON Lines (one JSON object a line) appended
to one results file, so rows written before a run is cut short survive; `finalize` fills in the
speedups of every row against every baseline of its group once a script ends, and the report
recomputes them anyway.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
import uuid

SMOKE = "--smoke" in sys.argv[1:]
if SMOKE:
    # Before torch / triton / fastdrn.kernels are imported: Triton reads this when it decorates.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

SMOKE_LABEL = "smoke (interpreter, CPU) - not a timing"
GPU_LABEL = "do_bench median (CUDA events, L2 flushed)"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # measure this checkout's fastdrn (the one the rows' commit and tree hash name)
    sys.path.insert(1, REPO)  # after bench/ itself, before an installed fastdrn
DEFAULT_OUT = os.path.join(REPO, "bench", "out", "results.jsonl")
MiB = 1024 * 1024

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
BASELINE_ORDER = ("eager", "eager-graph", "compile", "compile-reduce-overhead", "compile-max-autotune", "copy")


class Skip(Exception):
    """An implementation that cannot run here (not landed yet, unsupported): a 'skipped' row."""


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on CPU tensors through the Triton interpreter; numbers are not timings")
    p.add_argument("--quick", action="store_true", help="the reduced set of the one-shot GPU check")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON Lines file the rows are appended to (default %(default)s)")
    p.add_argument("--md", default=None, help="also write the markdown table of this run's rows here")
    p.add_argument("--ceilings", default=None,
                   help="JSON file of ceilings measured earlier in the same session (written by --save-ceilings); "
                        "measured now when absent")
    p.add_argument("--deadline", type=float, default=None,
                   help="wall-clock time (time.time()) after which no new measurement starts")
    p.add_argument("--time-budget", type=float, default=None, help="seconds from start; same effect as --deadline")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    p.add_argument("--max-autotune", action="store_true",
                   help="add torch.compile(mode='max-autotune') baselines (slow to compile)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--min-reps", type=int, default=5, help="at least this many timed repeats for slow functions")
    p.add_argument("--seed", type=int, default=0)
    return p


def dtype_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in DTYPES:
            raise SystemExit(f"unknown dtype {n!r}; choose from {', '.join(DTYPES)}")
    return names


def int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------
# environment record
# ---------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def tree_hash() -> str:
    """sha1 over the package, kernel, extension and bench sources: names the code even without git."""
    h = hashlib.sha1()
    for top in ("fastdrn", "kernels", "csrc", "bench"):
        base = os.path.join(REPO, top)
        for root, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "out"))
            for name in sorted(files):
                if name.endswith((".py", ".cu", ".cpp", ".h", ".cuh", ".sh")):
                    path = os.path.join(root, name)
                    h.update(os.path.relpath(path, REPO).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    for name in ("setup.py", "pyproject.toml", "fastdrn_build.py"):
        path = os.path.join(REPO, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:12]


def git_record() -> dict:
    commit = os.environ.get("BENCH_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    # --no-optional-locks: read the state, never refresh the index.
    status = _run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    return {"git_commit": commit or "unknown (no git here; set BENCH_GIT_COMMIT)",
            "git_dirty": None if status is None else bool(status), "tree_hash": tree_hash()}


def environment(device: torch.device) -> dict:
    import triton

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": "cpu (Triton interpreter)" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "smoke": device.type == "cpu",
        **git_record(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["matmul_fp32_precision"] = torch.get_float32_matmul_precision()
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    from fastdrn.tools.env import SETTINGS_VARIABLES

    for var in (*SETTINGS_VARIABLES, "TRITON_DEFAULT_FP_FUSION"):
        env[var] = os.environ.get(var)
    try:
        from fastdrn import backend

        env["fastdrn_backend"] = backend.describe(device)
    except Exception as exc:  # recorded, not fatal: the rows say which impl failed and why
        env["fastdrn_backend"] = f"unavailable: {exc}"
    return env


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup_ms=25.0, rep_ms=100.0, min_reps=5, grad_to_none=None) -> float:
    """Median milliseconds of fn(). The first call (compilation, autotuning) is never timed."""
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None
    t0 = time.perf_counter()
    fn()
    sync(device)
    if device.type != "cuda":  # smoke: a few host-clock runs, not a timing (one when a call is slow)
        samples = []
        for _ in range(3 if time.perf_counter() - t0 < 0.05 else 1):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return sorted(samples)[len(samples) // 2]
    import triton.testing

    t0 = time.perf_counter()
    fn()
    sync(device)
    estimate = (time.perf_counter() - t0) * 1e3
    # do_bench sizes its repeats from rep/estimate: make slow functions still get min_reps samples.
    rep = max(rep_ms, min_reps * estimate)
    warmup = max(warmup_ms, estimate)
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def peak_memory(fn, device: torch.device, grad_to_none=None) -> tuple[float | None, float | None]:
    """(peak MiB allocated during one fn() call, the part of it above what was allocated before)."""
    if device.type != "cuda":
        return None, None
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / MiB, (peak - before) / MiB


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (docs/numerics.md), on ref's device (the benches keep their
    float64 references on the host, out of the peak-memory readings); inf when out has NaN/Inf and ref has none."""
    out, ref = out.detach().to(ref.device).double(), ref.detach().double()
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# ceilings: device copy bandwidth (read + write bytes) and bf16 matrix product rate
# ---------------------------------------------------------------------------------------------
def measure_ceilings(device: torch.device, matmul_n: int = 8192, copy_mib: int = 1024) -> dict:
    if device.type != "cuda":  # smoke: tiny, host clock, labelled
        n, size = 256, 4 * MiB
        src = torch.randn(size // 4)
        dst = torch.empty_like(src)
        copy_ms = time_fn(lambda: dst.copy_(src), device)
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm_ms = time_fn(lambda: a @ b, device)
        return {"copy_gbs": 2 * size / copy_ms / 1e6, "copy_bytes": size, "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
                "matmul_n": n, "matmul_dtype": "fp32 (cpu)", "timing": SMOKE_LABEL}
    numel = copy_mib * MiB // 4

    def copy_ms() -> float:
        src = torch.randn(numel, device=device)  # random data, never zeros
        dst = torch.empty_like(src)
        return time_fn(lambda: dst.copy_(src), device)

    def matmul_ms() -> float:
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
        b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
        c = torch.empty_like(a)
        return time_fn(lambda: torch.mm(a, b, out=c), device)

    copy_gbs = 2 * numel * 4 / copy_ms() / 1e6
    mm_ms = matmul_ms()
    torch.cuda.empty_cache()
    return {"copy_gbs": copy_gbs, "copy_bytes": numel * 4, "matmul_tflops": 2 * matmul_n**3 / mm_ms / 1e9,
            "matmul_n": matmul_n, "matmul_dtype": "bf16", "timing": GPU_LABEL}


# ---------------------------------------------------------------------------------------------
# work counts (docs/kernels.md)
# ---------------------------------------------------------------------------------------------
def rdb_flop_per_pixel(d_in: int, inner: int, distill: int) -> int:
    return 2 * (d_in * inner + 9 * inner * inner + inner * (d_in + distill))


def drn_flop_per_lr_pixel(scale: int, n_colors=3, n_feats=64, n_groups=6, n_blocks=9, inner=64, distill=8) -> int:
    c = n_feats
    group = sum(rdb_flop_per_pixel(c + k * distill, inner, distill) for k in range(n_blocks))
    group += 2 * (c + n_blocks * distill) * c
    head = 2 * 9 * n_colors * c
    upsample = 2 * 9 * c * c * scale * scale
    tail = 2 * 9 * c * n_colors * scale * scale  # at HR: s*s HR pixels per LR pixel
    return head + n_groups * group + upsample + tail


# ---------------------------------------------------------------------------------------------
# the run context: device, environment, ceilings, rows
# ---------------------------------------------------------------------------------------------
class Context:
    def __init__(self, args, script: str):
        self.args = args
        self.script = script
        self.smoke = bool(args.smoke)
        if self.smoke:
            assert os.environ.get("TRITON_INTERPRET") == "1", "common must be imported before fastdrn's kernels"
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        else:
            if not torch.cuda.is_available():
                raise SystemExit(f"{script}: no CUDA device here; run with --smoke for the CPU interpreter rehearsal")
            self.device = torch.device("cuda")
            torch.set_float32_matmul_precision("high")  # fp32 matrix products on TF32 units (cuDNN convs: default)
        self.label = SMOKE_LABEL if self.smoke else GPU_LABEL
        self.session = os.environ.get("BENCH_SESSION") or uuid.uuid4().hex[:8]
        self.run_id = uuid.uuid4().hex[:8]
        self.deadline = args.deadline
        if args.time_budget is not None:
            budget_end = time.time() + args.time_budget
            self.deadline = budget_end if self.deadline is None else min(self.deadline, budget_end)
        self.t0 = time.time()
        self.env = environment(self.device)
        self.env["autotune"] = os.environ.get("FASTDRN_AUTOTUNE", "1") != "0"
        self.ceilings = self._ceilings()
        self.rows: list[dict] = []
        self.skipped_for_deadline = 0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        say(f"== {script}: {self.env['device']} | torch {self.env['torch']} | triton {self.env['triton']} | "
            f"CUDA {self.env['cuda']} | commit {str(self.env['git_commit'])[:12]} tree {self.env['tree_hash']} | "
            f"fastdrn backend: {self.env['fastdrn_backend']}")
        say(f"== ceilings: copy {self.ceilings['copy_gbs']:.0f} GB/s (read+write), "
            f"{self.ceilings['matmul_dtype']} {self.ceilings['matmul_n']}^3 matmul "
            f"{self.ceilings['matmul_tflops']:.1f} TFLOP/s" + (f"  [{SMOKE_LABEL}]" if self.smoke else ""))

    def _ceilings(self) -> dict:
        path = self.args.ceilings
        if path and os.path.exists(path):
            with open(path) as f:
                ceil = json.load(f)
            if ceil.get("device") == self.env["device"]:
                ceil["source"] = f"measured earlier in this session ({os.path.basename(path)})"
                return ceil
        t = time.time()
        ceil = measure_ceilings(self.device)
        ceil["device"] = self.env["device"]
        ceil["source"] = f"measured by {self.script}"
        ceil["measure_s"] = round(time.time() - t, 2)
        if path:
            with open(path, "w") as f:
                json.dump(ceil, f)
        return ceil

    # -- time limit ------------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    # -- measuring one row -----------------------------------------------------------------------
    def measure(self, *, op: str, pass_: str, shape: dict, shape_str: str, layout: str, dtype: str, impl: str,
                role: str, build, flop: float | None, min_bytes: float | None, variant: str = "",
                extra: dict | None = None) -> dict | None:
        """Build the benchmark (build() -> dict with fn, and optionally grad_to_none, check), time it, write a row.

        build() may raise Skip (a 'skipped' row); any other exception gives an 'error' row: the
        run goes on either way. `check`, when given, returns the relative error against float64.
        """
        if self.out_of_time():
            self.skipped_for_deadline += 1
            say(f"   deadline passed: not measuring {op} {pass_} {shape_str} {layout} {dtype} {impl}")
            return None
        row = dict(op=op, pass_=pass_, shape=shape, shape_str=shape_str, layout=layout, dtype=dtype, impl=impl,
                   role=role, variant=variant, flop=flop, min_bytes=min_bytes, status=None, median_ms=None,
                   peak_mem_mib=None, peak_mem_above_inputs_mib=None, rel_err=None, note="", **(extra or {}))
        t_start = time.time()
        bench = None
        try:
            bench = build()
            fn, g2n = bench["fn"], bench.get("grad_to_none")
            ms = time_fn(fn, self.device, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms,
                         min_reps=self.args.min_reps, grad_to_none=g2n)
            peak, above = peak_memory(fn, self.device, g2n)
            err = bench["check"]() if bench.get("check") else None
            row.update(status="ok", median_ms=ms, peak_mem_mib=peak, peak_mem_above_inputs_mib=above, rel_err=err,
                       note=bench.get("note", ""))
        except Skip as exc:
            row.update(status="skipped", note=str(exc))
        except Exception as exc:  # an error row, and the run goes on
            tb = traceback.format_exc(limit=6)
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:500], traceback=tb[-3000:])
        finally:
            bench = None
            if impl.startswith("compile"):
                reset_compiler()  # free the compiled graphs with the rest of the case
            cleanup(self.device)
        row["bench_s"] = round(time.time() - t_start, 2)
        return self.emit(row)

    def emit(self, row: dict) -> dict:
        row = self.complete(row)
        self.rows.append(row)
        with open(self.args.out, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
        say(progress_line(row, len(self.rows)))
        if row["status"] == "error" and row.get("traceback"):
            say("   " + row["traceback"].strip().replace("\n", "\n   "))
        return row

    def complete(self, row: dict) -> dict:
        """Add the derived numbers, the labels, the environment and the speedups known so far."""
        row["pass"] = row.pop("pass_")
        ms = row.get("median_ms")
        ok = row.get("status") == "ok" and ms
        row["tflops"] = row["flop"] / ms / 1e9 if ok and row.get("flop") else None
        row["gbs"] = row["min_bytes"] / ms / 1e6 if ok and row.get("min_bytes") else None
        row["frac_matrix_peak"] = row["tflops"] / self.ceilings["matmul_tflops"] if row["tflops"] else None
        row["frac_copy_bw"] = row["gbs"] / self.ceilings["copy_gbs"] if row["gbs"] else None
        row.update(script=self.script, session=self.session, run_id=self.run_id, smoke=self.smoke,
                   timing=self.label, label=self.label if self.smoke else "", ceilings=self.ceilings, env=self.env)
        row["speedup"] = speedups_for(row, self.rows)
        return row

    def finish(self) -> None:
        if self.skipped_for_deadline:
            say(f"== {self.script}: {self.skipped_for_deadline} measurement(s) left out: the deadline passed")
        finalize(self.args.out)
        rows = [r for r in load_rows(self.args.out) if r.get("run_id") == self.run_id]
        table = markdown_table(rows)
        if self.args.md:
            with open(self.args.md, "w") as f:
                f.write(table)
        say(table)
        say(f"== {self.script}: {len(rows)} rows in {time.time() - self.t0:.1f} s -> {self.args.out}")


def cleanup(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    """Forget compiled graphs: each case compiles afresh, static shapes, no silent eager fallback."""
    import torch._dynamo

    torch._dynamo.reset()


def compile_fn(fn, ctx: Context, mode: str | None = None):
    """torch.compile of a reference function or module, static shapes; aot_eager in smoke mode."""
    reset_compiler()
    if ctx.smoke:
        return torch.compile(fn, backend="aot_eager", dynamic=False)
    if mode:
        return torch.compile(fn, mode=mode, dynamic=False)
    return torch.compile(fn, dynamic=False)


def compile_impls(ctx: Context) -> list[tuple[str, str | None]]:
    """(impl name, torch.compile mode) of the compile baselines this run measures."""
    out = []
    if not ctx.args.no_compile:
        out.append(("compile", None))
    if ctx.args.max_autotune:
        out.append(("compile-max-autotune", "max-autotune"))
    return out


def sweep_op_cases(ctx: Context, case_list: list, seed: int, run, first) -> None:
    """An op benchmark's measurement order, then ctx.finish(): sweep 1 runs first(case), a list of
    (impl, role), for every case; then each torch.compile baseline over every case, so that a time
    limit cuts the slow compiles first. run(case, impl, role, seed, compile_mode=None) measures."""
    seeds = [seed + 1000 * i for i in range(len(case_list))]
    impls = " + ".join(dict.fromkeys(impl for c in case_list for impl, _role in first(c)))
    say(f"== {len(case_list)} cases; sweep 1: {impls}, then torch.compile")
    for c, case_seed in zip(case_list, seeds):
        for impl, role in first(c):
            run(c, impl, role, case_seed)
    for name, mode in compile_impls(ctx):
        for c, case_seed in zip(case_list, seeds):
            run(c, name, "baseline", case_seed, mode)
    ctx.finish()


def compile_note(ctx: Context, mode: str | None) -> str:
    if ctx.smoke:
        return "torch.compile(backend='aot_eager') in smoke mode"
    return f"torch.compile(mode={mode!r}, dynamic=False)" if mode else "torch.compile(dynamic=False)"


def pick_op(impl: str, reference_op, fused_op, ctx: Context, compile_mode: str | None, device) -> tuple:
    """(callable, note) for one impl of an op benchmark: "eager" runs the reference op, "compile*"
    torch.compile of it, anything else (fastdrn, fastdrn-recompute) the fused op."""
    if impl == "eager":
        return reference_op, ""
    if impl.startswith("compile"):
        return compile_fn(reference_op, ctx, compile_mode), compile_note(ctx, compile_mode)
    from fastdrn import backend

    return fused_op, f"backend: {backend.describe(device)}"


def pass_fn(op, leaves, dy=None):
    """What is timed: op(*leaves), and its backward from dy when dy is given."""
    if dy is None:
        return lambda: op(*leaves)
    return lambda: op(*leaves).backward(dy)


def fp32_variant(dtype: str, impl: str, ctx: Context) -> str:
    """How float32 matrix products run: fastdrn's kernels in 3xTF32, cuDNN's convs in TF32."""
    if dtype != "fp32" or ctx.smoke:
        return ""
    return "3xTF32" if impl.startswith("fastdrn") else "TF32"


# ---------------------------------------------------------------------------------------------
# rows: loading, speedups, finalize
# ---------------------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    return str(o)


def group_key(row: dict) -> tuple:
    return (row.get("session"), row.get("op"), row.get("pass"), row.get("shape_str"), row.get("layout"),
            row.get("dtype"))


def speedups_for(row: dict, rows: list[dict]) -> dict:
    """{baseline impl: baseline ms / this row's ms} over the ok baselines of the row's group."""
    if row.get("status") != "ok" or not row.get("median_ms"):
        return {}
    key = group_key(row)
    out = {}
    for other in rows:
        if (other is not row and other.get("role") == "baseline" and other.get("status") == "ok"
                and other.get("median_ms") and group_key(other) == key and other.get("impl") != row.get("impl")):
            out[other["impl"]] = other["median_ms"] / row["median_ms"]
    return out


def load_rows(path: str) -> list[dict]:
    """Rows of a JSON Lines results file (a JSON list is read too); unreadable lines are skipped."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a killed run
    return rows


def recompute_speedups(rows: list[dict]) -> list[dict]:
    for row in rows:
        row["speedup"] = speedups_for(row, rows)
    return rows


def finalize(path: str) -> None:
    """Rewrite the results file with every row's speedups against every baseline of its group."""
    if not os.path.exists(path):
        return
    rows = recompute_speedups(load_rows(path))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=_json_default) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------
def say(text: str) -> None:
    print(text, flush=True)


def _fmt(x, spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def speedup_text(sp: dict) -> str:
    keys = sorted(sp, key=lambda k: (BASELINE_ORDER.index(k) if k in BASELINE_ORDER else 99, k))
    return ", ".join(f"x{sp[k]:.2f} {k}" for k in keys)


def progress_line(row: dict, i: int) -> str:
    head = f"[{i:3d}] {row['op']} {row['pass']} {row['shape_str']} {row['layout']} {row['dtype']} {row['impl']}"
    if row["status"] != "ok":
        return f"{head}: {row['status'].upper()} - {row.get('note', '')}"
    parts = [f"{row['median_ms']:.4f} ms"]
    if row.get("tflops"):
        parts.append(f"{row['tflops']:.1f} TFLOP/s ({row['frac_matrix_peak']:.0%} of bf16 peak)")
    if row.get("gbs"):
        parts.append(f"{row['gbs']:.0f} GB/s ({row['frac_copy_bw']:.0%} of copy)")
    if row.get("peak_mem_mib") is not None:
        parts.append(f"peak {row['peak_mem_mib']:.0f} MiB")
    if row.get("rel_err") is not None:
        parts.append(f"rel err {row['rel_err']:.1e}")
    if row.get("speedup"):
        parts.append(speedup_text(row["speedup"]))
    line = f"{head}: " + " | ".join(parts) + f"  ({row.get('bench_s', 0):.1f} s)"
    return line + (f"  [{SMOKE_LABEL}]" if row.get("smoke") else "")


COLUMNS = ["op", "pass", "shape", "layout", "dtype", "impl", "median ms", "TFLOP/s", "GB/s", "% bf16 peak",
           "% copy BW", "peak MiB", "speedup", "rel err", "note"]


def markdown_table(rows: list[dict], title: str | None = None, compact: bool = False) -> str:
    """A markdown table of rows, headed by the environment and ceilings of the sessions in them.

    compact drops the note column (and shortens the header) for printing to a terminal."""
    lines = []
    smoke = any(r.get("smoke") for r in rows)
    lines.append(f"## {title or 'fastdrn benchmarks'}" + (f" - {SMOKE_LABEL}" if smoke else ""))
    lines.append("")
    if smoke:
        lines.append(f"**{SMOKE_LABEL}**: tiny sizes on CPU tensors through the Triton interpreter; the "
                     "numbers only show that every script runs end to end.")
        lines.append("")
    seen = {}
    for r in rows:
        seen.setdefault((r.get("session"), r.get("script")), r)
    for (session, script), r in seen.items():
        env, ceil = r.get("env", {}), r.get("ceilings", {})
        lines.append(
            f"- {script} (session {session}): {env.get('device')} | torch {env.get('torch')} | triton "
            f"{env.get('triton')} | CUDA {env.get('cuda')} | commit {str(env.get('git_commit'))[:12]} "
            f"(tree {env.get('tree_hash')}) | {env.get('date_utc')} | autotune {'on' if env.get('autotune') else 'off'}"
            f" | ceilings: copy {_fmt(ceil.get('copy_gbs'), '.0f')} GB/s, {ceil.get('matmul_dtype')} matmul "
            f"{_fmt(ceil.get('matmul_tflops'), '.1f')} TFLOP/s")
    lines.append("")
    columns = COLUMNS[:-1] + ["status"] if compact else COLUMNS
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        ok = r.get("status") == "ok"
        note = r.get("note", "") or ""
        if r.get("variant"):
            note = f"{r['variant']}; {note}" if note else r["variant"]
        if r.get("status") != "ok":
            note = f"{r.get('status', '').upper()}: {note}"
        if r.get("smoke"):
            note = f"{SMOKE_LABEL}; {note}" if note else SMOKE_LABEL
        cells = [
            r.get("op"), r.get("pass"), r.get("shape_str"), r.get("layout"), r.get("dtype"), r.get("impl"),
            _fmt(r.get("median_ms"), ".4f") if ok else "-",
            _fmt(r.get("tflops"), ".1f"), _fmt(r.get("gbs"), ".0f"),
            _fmt(100 * r["frac_matrix_peak"] if r.get("frac_matrix_peak") else None, ".1f"),
            _fmt(100 * r["frac_copy_bw"] if r.get("frac_copy_bw") else None, ".1f"),
            _fmt(r.get("peak_mem_mib"), ".0f"),
            speedup_text(r.get("speedup") or {}) or "-",
            _fmt(r.get("rel_err"), ".1e"),
            note.replace("|", "/").replace("\n", " ")[:160],
        ]
        if compact:
            cells[-1] = r.get("status", "") + (" (smoke)" if r.get("smoke") else "")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)
