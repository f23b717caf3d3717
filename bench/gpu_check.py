"""The one-shot GPU check: install, tests at 4 and 8 warps, quick benchmarks, table and goals.

Inside a fixed time budget (default 390 s, under 7 minutes), everything under OUTDIR.

    python3 bench/gpu_check.py OUTDIR [--budget 390] [--skip-install] [--skip-tests] [--skip-bench]
                                      [--skip-plot] [--autotune] [--max-autotune] [--full] [--smoke]

Stages, each printing its elapsed time:
  1. install   pip install --no-build-isolation --no-deps -e .  (output in gpu_check.log); if it
               fails, again with FASTDRN_BUILD_EXT=0 (the CUDA extension is then built on first
               use); if that fails too, a PYTHONPATH shim that maps kernels/ to fastdrn.kernels.
  2. tests     python -m pytest -x -q tests, with FASTDRN_NUM_WARPS=4 and then 8, each under a
               timeout (tests_w4.log, tests_w8.log).
  3. bench     ceilings once, then bench_model, bench_residual_distill, bench_compress_skip and
               bench_pixel_shuffle with --quick (bench.log, results.jsonl), each with a slice of
               the remaining time: a script stops starting measurements at its soft deadline and is
               killed a little after it; rows already written stay. torch.compile baselines run
               last within each script, so a tight budget cuts those first. FASTDRN_AUTOTUNE=0
               (the default config of every kernel) unless --autotune.
  4. report    results.md (full table, checks against docs/numerics.md tolerances, goals), results.png;
               the compact table, the checks and the goals are printed last.

OUTDIR receives at most 7 files (gpu_check.log, tests_w4.log, tests_w8.log, bench.log,
results.jsonl, results.md, results.png), none in subfolders. --smoke rehearses stages 3-4 on a
machine without a GPU (the interpreter; nothing is a timing); it skips install and tests unless
--pytest-target names a test path.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
SCRIPTS = {  # name: (file, share of the benchmark time)
    "model": ("bench_model.py", 0.50),
    "residual_distill": ("bench_residual_distill.py", 0.30),
    "compress_skip": ("bench_compress_skip.py", 0.08),
    "pixel_shuffle": ("bench_pixel_shuffle.py", 0.12),
}
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024


class Check:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.outdir)
        os.makedirs(self.out, exist_ok=True)
        self.t0 = time.time()
        self.end = self.t0 + args.budget
        self.log_path = os.path.join(self.out, "gpu_check.log")
        self.summary: list[str] = []
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        if not args.smoke:
            self.env.pop("TRITON_INTERPRET", None)

    # -- output ------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[gpu_check {time.time() - self.t0:6.1f} s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def left(self) -> float:
        return self.end - time.time()

    def run(self, cmd: list[str], log_path: str, timeout: float, env=None, echo=False, cwd=REPO) -> tuple[int, float, bool]:
        """Run cmd in its own process group, output appended to log_path (and echoed); kill it at timeout."""
        timeout = max(1.0, timeout)
        t = time.time()
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}   (timeout {timeout:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

            def pump():
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, by its id
                rc = proc.wait()
            reader.join(timeout=10)
            if timed_out:
                log.write(f"\n!!! killed after {timeout:.0f} s (timeout)\n")
        return rc, time.time() - t, timed_out

    # -- stage 1 -------------------------------------------------------------------------------------
    def import_check(self, env) -> tuple[bool, str]:
        code = ("import fastdrn, fastdrn.kernels, fastdrn.ops; print('fastdrn from', fastdrn.__file__, "
                "'| kernels from', fastdrn.kernels.__file__, '| DRN:', hasattr(fastdrn, 'DRN'))")
        res = subprocess.run([sys.executable, "-c", code], cwd="/tmp", env=env, capture_output=True, text=True,
                             timeout=120)
        return res.returncode == 0, (res.stdout + res.stderr).strip()[-800:]

    def make_shim(self) -> str:
        """A folder for PYTHONPATH where fastdrn/ holds links to the package files plus kernels/ as its kernels."""
        shim = os.path.join("/tmp", f"fastdrn_shim_{os.getpid()}")
        shutil.rmtree(shim, ignore_errors=True)
        pkg = os.path.join(shim, "fastdrn")
        os.makedirs(pkg)
        for name in os.listdir(os.path.join(REPO, "fastdrn")):
            os.symlink(os.path.join(REPO, "fastdrn", name), os.path.join(pkg, name))
        if not os.path.exists(os.path.join(pkg, "kernels")):
            os.symlink(os.path.join(REPO, "kernels"), os.path.join(pkg, "kernels"))
        for extra in ("csrc", "fastdrn_build.py"):
            if os.path.exists(os.path.join(REPO, extra)):
                os.symlink(os.path.join(REPO, extra), os.path.join(shim, extra))
        return shim

    def install(self) -> None:
        t = time.time()
        pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        budget = min(self.args.install_timeout, self.left() - 200)
        self.say(f"install: {' '.join(pip[1:])} (timeout {budget:.0f} s; output in gpu_check.log)")
        rc, dt, to = self.run(pip, self.log_path, budget)
        how = "editable install"
        if rc != 0:
            self.say(f"install: pip failed (rc {rc}{', timeout' if to else ''}, {dt:.0f} s); again with "
                     "FASTDRN_BUILD_EXT=0 (the extension is then built on first use)")
            env = dict(self.env, FASTDRN_BUILD_EXT="0")
            rc, dt, to = self.run(pip, self.log_path, min(90, self.left() - 180), env=env)
            how = "editable install without the CUDA extension (FASTDRN_BUILD_EXT=0)"
        if rc != 0:
            how = "pip install failed"
        self.ensure_importable(how)
        self.summary.append(f"install: {time.time() - t:.0f} s, {self.import_how}")

    def ensure_importable(self, how: str) -> None:
        """fastdrn and fastdrn.kernels importable by the scripts, or else a PYTHONPATH shim that maps them."""
        if self.args.smoke:
            self.import_how = f"{how}; smoke: import not checked"
            return
        ok, text = self.import_check(self.env)
        if not ok:
            shim = self.make_shim()
            self.env["PYTHONPATH"] = shim + os.pathsep + self.env.get("PYTHONPATH", "")
            ok, text = self.import_check(self.env)
            how = f"{how}; using the PYTHONPATH shim {shim}"
        self.import_how = f"{how}, import {'ok' if ok else 'FAILED'}"
        self.say(f"install: {self.import_how}: {text}")

    # -- stage 2 -------------------------------------------------------------------------------------
    def tests(self) -> None:
        for warps in (4, 8):
            log = os.path.join(self.out, f"tests_w{warps}.log")
            room = self.left() - self.args.bench_reserve
            budget = min(self.args.test_timeout, room)
            if room < 10:
                self.say(f"tests FASTDRN_NUM_WARPS={warps}: skipped, the time budget is spent")
                self.summary.append(f"tests w{warps}: skipped (budget)")
                continue
            env = dict(self.env, FASTDRN_NUM_WARPS=str(warps))
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", *shlex.split(self.args.pytest_target)]
            self.say(f"tests FASTDRN_NUM_WARPS={warps}: {' '.join(cmd[1:])} (timeout {budget:.0f} s)")
            rc, dt, to = self.run(cmd, log, budget, env=env)
            last = _last_line(log)
            verdict = "TIMEOUT" if to else ("passed" if rc == 0 else f"FAILED rc {rc}")
            self.say(f"tests FASTDRN_NUM_WARPS={warps}: {verdict} in {dt:.0f} s: {last}")
            if rc != 0 and not to:
                self.say("   " + _tail(log, 25).replace("\n", "\n   "))
            self.summary.append(f"tests w{warps}: {verdict}, {dt:.0f} s: {last}")

    # -- stage 3 -------------------------------------------------------------------------------------
    def bench(self) -> None:
        log = os.path.join(self.out, "bench.log")
        results = os.path.join(self.out, "results.jsonl")
        ceilings = os.path.join("/tmp", f"fastdrn_ceilings_{uuid.uuid4().hex[:8]}.json")
        env = dict(self.env, BENCH_SESSION=uuid.uuid4().hex[:8])
        if not self.args.autotune:
            env["FASTDRN_AUTOTUNE"] = "0"
        names = [n for n in self.args.benches.split(",") if n]
        for n in names:
            if n not in SCRIPTS:
                raise SystemExit(f"unknown bench {n!r}; choose from {', '.join(SCRIPTS)}")
        bench_end = self.end - self.args.report_reserve
        for i, name in enumerate(names):
            share = SCRIPTS[name][1] / sum(SCRIPTS[n][1] for n in names[i:])
            avail = bench_end - time.time()
            if avail < 15:
                self.say(f"bench {name}: skipped, the time budget is spent")
                self.summary.append(f"bench {name}: skipped (budget)")
                continue
            slice_s = avail * share
            soft = time.time() + slice_s
            hard = min(slice_s + self.args.grace, avail)
            mode = "--smoke" if self.args.smoke else ("" if self.args.full else "--quick")
            cmd = [sys.executable, os.path.join(BENCH, SCRIPTS[name][0]), *([mode] if mode else []),
                   "--out", results, "--ceilings", ceilings, "--deadline", f"{soft:.1f}"]
            if self.args.max_autotune and name == "model":
                cmd.append("--max-autotune")
            self.say(f"bench {name}: soft deadline in {slice_s:.0f} s, killed after {hard:.0f} s")
            rc, dt, to = self.run(cmd, log, hard, env=env, echo=not self.args.quiet)
            verdict = "TIMEOUT (killed; rows so far kept)" if to else ("ok" if rc == 0 else f"FAILED rc {rc}")
            rows = _count_rows(results, name)
            self.say(f"bench {name}: {verdict} in {dt:.0f} s, {rows} rows")
            if rc != 0 and not to:
                self.say("   " + _tail(log, 25).replace("\n", "\n   "))
            self.summary.append(f"bench {name}: {verdict}, {dt:.0f} s, {rows} rows")
        if os.path.exists(ceilings):
            os.remove(ceilings)

    # -- stage 4 -------------------------------------------------------------------------------------
    def report(self) -> str | None:
        results = os.path.join(self.out, "results.jsonl")
        if not os.path.exists(results):
            self.say("report: no results.jsonl")
            return None
        md = os.path.join(self.out, "results.md")
        cmd = [sys.executable, os.path.join(BENCH, "report.py"), results, "--md", md, "--compact", "--finalize"]
        rc, dt, _ = self.run(cmd, self.log_path, 60, echo=True)
        self.say(f"report: rc {rc}, {dt:.0f} s -> {md}")
        if not self.args.skip_plot:
            png = os.path.join(self.out, "results.png")
            cmd = [sys.executable, os.path.join(BENCH, "plot.py"), results, "--out", png]
            rc, dt, _ = self.run(cmd, self.log_path, 90)
            verdict = {0: "ok", 3: "skipped: matplotlib is not installed"}.get(rc, f"FAILED rc {rc} (see gpu_check.log)")
            self.say(f"plot: {verdict}, {dt:.0f} s")
        return md

    def check_outdir(self) -> None:
        for name in os.listdir(self.out):
            if name.endswith(".tmp"):
                os.remove(os.path.join(self.out, name))
        files = []
        for root, dirs, names in os.walk(self.out):
            files += [os.path.join(root, n) for n in names]
        big = [f for f in files if os.path.getsize(f) >= MAX_FILE_BYTES]
        self.say(f"OUTDIR {self.out}: {len(files)} files "
                 + ", ".join(f"{os.path.relpath(f, self.out)} ({os.path.getsize(f) // 1024} KiB)" for f in sorted(files)))
        if len(files) > MAX_FILES or big:
            self.say(f"WARNING: OUTDIR holds {len(files)} files (limit {MAX_FILES}); over 16 MB: {big}")


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("$ ")]
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


def _tail(path: str, n: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return ""


def _count_rows(path: str, script: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if f'"script": "{script}"' in line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir")
    p.add_argument("--budget", type=float, default=390.0, help="seconds for everything (default %(default)s)")
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-plot", action="store_true")
    p.add_argument("--install-timeout", type=float, default=150.0)
    p.add_argument("--test-timeout", type=float, default=80.0, help="seconds for each of the two pytest runs")
    p.add_argument("--bench-reserve", type=float, default=150.0,
                   help="seconds the test stage leaves for the benchmarks (default %(default)s)")
    p.add_argument("--report-reserve", type=float, default=25.0)
    p.add_argument("--grace", type=float, default=25.0, help="seconds past its soft deadline before a script is killed")
    p.add_argument("--benches", default=",".join(SCRIPTS), help="comma list of %s" % ", ".join(SCRIPTS))
    p.add_argument("--pytest-target", default=None,
                   help="what pytest runs after -x -q, shell-quoted (default: tests; e.g. \"tests -m 'not slow'\")")
    p.add_argument("--autotune", action="store_true", help="let the kernels autotune (slower first calls)")
    p.add_argument("--max-autotune", action="store_true", help="add torch.compile max-autotune to the model bench")
    p.add_argument("--full", action="store_true", help="the full benchmark sets instead of --quick (needs a far "
                                                       "larger --budget)")
    p.add_argument("--smoke", action="store_true", help="rehearse on a machine without a GPU (not a timing)")
    p.add_argument("--quiet", action="store_true", help="do not echo the benchmark rows while they run")
    args = p.parse_args()
    if args.smoke:
        args.skip_install = True
        if args.pytest_target is None:
            args.skip_tests = True
    args.pytest_target = args.pytest_target or "tests"

    chk = Check(args)
    chk.say(f"start: python {sys.version.split()[0]} at {sys.executable}; repo {REPO}; OUTDIR {chk.out}; "
            f"budget {args.budget:.0f} s" + (" [smoke: not a timing]" if args.smoke else ""))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:  # read-only queries: what the card is and how it is clocked right now
            res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            chk.say(f"nvidia-smi: {res.stdout.strip() or res.stderr.strip()}")
            cap = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            chk.say(f"nvidia-smi: {exc}")
            cap = []
        if (cap and re.fullmatch(r"\d+\.\d+", cap[0].strip()) and not chk.env.get("FASTDRN_CUDA_ARCH_LIST")
                and not args.smoke):
            # build the CUDA extension for this GPU alone: half the nvcc time of the default 8.0;9.0
            chk.env["FASTDRN_CUDA_ARCH_LIST"] = cap[0].strip()
            chk.say(f"FASTDRN_CUDA_ARCH_LIST={cap[0].strip()} (this GPU)")
    stages = [("install", args.skip_install, chk.install), ("tests", args.skip_tests, chk.tests),
              ("bench", args.skip_bench, chk.bench)]
    for name, skip, fn in stages:
        if skip:
            chk.say(f"== {name}: skipped (flag)")
            if name == "install":
                chk.ensure_importable("install skipped")
            continue
        t = time.time()
        chk.say(f"== {name}")
        try:
            fn()
        except Exception as exc:  # a broken stage must not stop the others
            chk.say(f"{name}: stage raised {type(exc).__name__}: {exc}")
            chk.summary.append(f"{name}: raised {type(exc).__name__}: {exc}")
        chk.say(f"== {name}: {time.time() - t:.0f} s")
    md = chk.report()
    chk.check_outdir()
    chk.say("summary:\n  " + "\n  ".join(chk.summary))
    chk.say(f"done in {time.time() - chk.t0:.0f} s (budget {args.budget:.0f} s)"
            + (f"; full table in {md}" if md else ""))


if __name__ == "__main__":
    main()
