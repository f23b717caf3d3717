"""Smoke test of the benchmarks (bench/): every script runs end to end at tiny sizes on CPU tensors
through the Triton interpreter, writes labelled JSON rows, and the table and a plot come out.

One run of bench/gpu_check.py --smoke drives it all, each bench script in its own subprocess (its
test stage runs a one-line dummy test at FASTDRN_NUM_WARPS 4 and 8); the checks below read what
it left. Nothing here is a timing. Skipped where CUDA is present: there, bench/gpu_check.py runs
the real benchmarks, and this rehearsal would only spend the GPU check's time.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from helpers import run_bounded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
SCRIPTS = ["model", "residual_distill", "compress_skip", "pixel_shuffle"]
LABEL = "smoke (interpreter, CPU) - not a timing"
ROW_KEYS = {"op", "pass", "shape", "shape_str", "layout", "dtype", "impl", "role", "status", "median_ms", "speedup",
            "flop", "min_bytes", "tflops", "gbs", "frac_matrix_peak", "frac_copy_bw", "peak_mem_mib", "rel_err",
            "timing", "label", "smoke", "env", "ceilings", "session", "script"}
ENV_KEYS = {"device", "torch", "triton", "cuda", "git_commit", "tree_hash", "date_utc", "python"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: bench/gpu_check.py runs the real benchmarks here")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("FASTDRN_BACKEND", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_smoke")
    out = base / "out"
    dummy = base / "dummy_tests"
    dummy.mkdir()
    (dummy / "test_dummy.py").write_text(
        "import os\n\ndef test_warps():\n    assert os.environ['FASTDRN_NUM_WARPS'] in ('4', '8')\n")
    proc = run_bounded([sys.executable, os.path.join(BENCH, "gpu_check.py"), str(out), "--smoke",
                        "--pytest-target", str(dummy)], 600, cwd=REPO, env=_env())
    rows = []
    if (out / "results.jsonl").exists():
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return dict(out=out, proc=proc, rows=rows)


def test_gpu_check_smoke_runs_every_stage(smoke):
    proc, out = smoke["proc"], smoke["out"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "done in" in proc.stdout
    for warps in (4, 8):
        assert "1 passed" in (out / f"tests_w{warps}.log").read_text()
    for name in SCRIPTS:
        assert f"bench {name}: ok" in proc.stdout, proc.stdout[-4000:]
    # the device machine's transfer limits: at most 8 files, no subfolders, each under 16 MB
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries), entries
    assert len(entries) <= 8, entries
    assert all(p.stat().st_size < 16 * 1024 * 1024 for p in entries)
    assert "## Goals" in proc.stdout  # the table, checks and goals are printed at the end


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_writes_labelled_rows(smoke, script):
    rows = [r for r in smoke["rows"] if r["script"] == script]
    assert rows, f"no rows from {script}"
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert ENV_KEYS <= set(r["env"]), ENV_KEYS - set(r["env"])
        assert {"copy_gbs", "matmul_tflops"} <= set(r["ceilings"])
        assert r["smoke"] is True and r["label"] == LABEL and r["timing"] == LABEL
        assert r["status"] in ("ok", "skipped"), f"{r['impl']}: {r['status']}: {r.get('note')}"
        if r["status"] == "skipped":
            assert r["note"], "a skipped row says why"
            continue
        assert r["median_ms"] > 0
        if r["flop"]:
            assert r["tflops"] == pytest.approx(r["flop"] / r["median_ms"] / 1e9)
        if r["role"] == "candidate" and r["rel_err"] is not None:
            assert r["rel_err"] < 1e-4, f"{r['impl']} {r['shape_str']}: rel err {r['rel_err']}"
    impls = {r["impl"] for r in rows if r["status"] == "ok"}
    assert {"eager", "compile"} <= impls, impls
    assert any(r["impl"].startswith("fastdrn") for r in rows)
    # speedups against the group's baselines are filled in
    eager_groups = {(r["pass"], r["shape_str"], r["layout"], r["dtype"]) for r in rows
                    if r["impl"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["impl"] != "eager" and (r["pass"], r["shape_str"], r["layout"], r["dtype"]) in eager_groups:
            assert "eager" in r["speedup"], r
    log = (smoke["out"] / "bench.log").read_text()
    assert sum(1 for line in log.splitlines() if line.startswith("[") and f"] {rows[0]['op']} " in line) >= len(rows)


def test_markdown_table(smoke):
    md = (smoke["out"] / "results.md").read_text()
    assert LABEL in md
    assert "| op | pass | shape |" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    assert len(table_rows) == len(smoke["rows"])
    assert "## Goals" in md and "not evaluated" in md


def test_plot(smoke):
    pytest.importorskip("matplotlib")
    png = smoke["out"] / "results.png"
    assert png.exists(), smoke["proc"].stdout[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench_modules(monkeypatch):
    """bench/ on sys.path for in-process imports, and its generic module names forgotten afterwards."""
    monkeypatch.syspath_prepend(BENCH)
    yield
    for name in ("plot", "report", "common"):
        module = sys.modules.get(name)
        if module is not None and os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or "")) == BENCH:
            del sys.modules[name]


def test_plot_without_matplotlib_says_so(monkeypatch, capsys, bench_modules):
    import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        plot._import_pyplot()
    assert exit_info.value.code == plot.NO_MATPLOTLIB
    assert "needs matplotlib" in capsys.readouterr().err


def test_one_script_alone(tmp_path):
    out, md = tmp_path / "r.jsonl", tmp_path / "r.md"
    proc = run_bounded([sys.executable, os.path.join(BENCH, "bench_pixel_shuffle.py"), "--smoke", "--no-compile",
                        "--out", str(out), "--md", str(md)], 300, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert LABEL in proc.stdout and LABEL in md.read_text()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["impl"] for r in rows} == {"copy", "eager", "fastdrn"}


def _row(op, pass_, shape, dtype, impl, ms, frac=None, role=None):
    return dict(op=op, **{"pass": pass_}, shape=shape, shape_str=str(sorted(shape.items())), layout="x", dtype=dtype,
                impl=impl, role=role or ("candidate" if impl == "fastdrn" else "baseline"), status="ok",
                median_ms=ms, frac_matrix_peak=frac, tflops=None if frac is None else 800 * frac,
                ceilings={"matmul_tflops": 800.0}, session="s", smoke=False)


def test_goals_are_reported_not_asserted(bench_modules):
    import report

    train = dict(scale=4, N=16, H=48, W=48)
    infer = dict(scale=4, N=1, H=270, W=480)
    rows = [_row("drn", "train_step", train, "bf16", "eager", 30.0), _row("drn", "train_step", train, "bf16", "compile", 20.0),
            _row("drn", "train_step", train, "bf16", "fastdrn", 8.0),
            _row("drn", "inference", infer, "bf16", "compile", 15.0), _row("drn", "inference", infer, "bf16", "fastdrn", 10.0),
            _row("residual_distill", "fwd", dict(N=1, H=540, W=960, D=64, F=64, d=8), "bf16", "fastdrn", 1.0, frac=0.6),
            _row("residual_distill", "fwd", dict(N=1, H=270, W=480, D=136, F=256, d=8), "bf16", "fastdrn", 1.0, frac=0.4)]
    text = "\n".join(report.goals(report.recompute_speedups(rows)))
    assert "Goal 1" in text and "x3.75 vs eager" in text and "x2.50 vs torch.compile" in text
    assert text.count("**MET**") == 1 and text.count("**NOT MET**") == 2
    assert "1 of 2 shapes" in text
    assert "NO DATA" in "\n".join(report.goals([]))


def test_host_launches_counts_a_training_step():
    """bench/host_launches.py (host cost without a GPU, through Triton's own launch path) runs, times
    launches and both models, and counts launches; once warm, no launch goes through Triton's run."""
    env = {k: v for k, v in _env().items() if k not in ("TRITON_INTERPRET", "FASTDRN_NUM_WARPS", "FASTDRN_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])  # this checkout's fastdrn
    out = run_bounded([sys.executable, os.path.join(BENCH, "host_launches.py"), "--scale", "2", "--small",
                       "--reps", "2"], 300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    for what in ("Triton's JITFunction.run", "fastdrn launch (lean path", "block's forward", "aten add"):
        line = next(ln for ln in lines if what in ln)
        assert float(line.split()[-2]) > 0, line
    for what in ("training step", "inference"):
        line = next(ln for ln in lines if ln.startswith(what))
        assert float(line.split("ratio ")[1].split("x")[0]) > 0, line  # "ratio 0.53x (median of paired rounds)"
    # A warm step replays every launch from launch plans: none through the launchers, none through
    # Triton's run.
    line = next(ln for ln in lines if "launches per training step" in ln)
    triton_launches = int(line.split("(")[1].split(" Triton")[0])
    launcher_calls = int(line.split("through the launchers ")[1].split(",")[0])
    replayed = int(line.split("replayed from launch plans ")[1].split(";")[0])
    assert triton_launches == replayed > 6 * 3 and launcher_calls == 0, line  # >= 3 a block, 6 blocks
    assert line.endswith("through Triton's own run once warm: 0"), line


def test_graph_rows_are_compared_with_the_strongest_baselines(bench_modules):
    import report

    train = dict(scale=4, N=16, H=48, W=48)
    rows = [_row("drn", "train_step", train, "bf16", impl, ms) for impl, ms in
            (("eager", 40.0), ("compile", 30.0), ("compile-reduce-overhead", 20.0), ("eager-graph", 25.0))]
    rows += [_row("drn", "train_step", train, "bf16", impl, ms, role="candidate")
             for impl, ms in (("fastdrn", 50.0), ("fastdrn-graph", 10.0))]
    text = "\n".join(report.goals(report.recompute_speedups(rows)))
    assert "in one CUDA graph: 10.00 ms, x4.00 vs eager, x3.00 vs torch.compile" in text
    assert "fastdrn-graph x2.00 vs the fastest (compile-reduce-overhead)" in text


def test_gpu_session_smoke_rehearses_the_device_script(tmp_path):
    """bench/gpu_session.sh, the script a lent GPU runs, rehearsed on the CPU: its test runner,
    the model and block benchmarks, the autotune sweep and the kernel profile."""
    out = tmp_path / "session"
    proc = run_bounded(["bash", os.path.join(BENCH, "gpu_session.sh"), "smoke"], 900, cwd=REPO,
                       env={**_env(), "OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "passed" in (out / "tests-backend.log").read_text()
    env = json.loads((out / "env-smoke.json").read_text())  # what ran and why, kept beside the results
    assert env["fused_ops"]["cpu"]["float32"].startswith("triton (Triton interpreter")
    rows = [json.loads(line) for line in (out / "results-smoke.jsonl").read_text().splitlines() if line.strip()]
    impls = {row["impl"] for row in rows if row["status"] == "ok"}
    assert {"eager", "fastdrn"} <= impls, impls
    assert (out / "results-smoke.md").exists()
    profile = json.loads((out / "profile.json").read_text())
    assert {"train", "infer"} <= set(profile["cases"])
    # The output stage timed both ways (today's path and shuffle_tail), and they agree.
    tail = [case for label, case in profile["cases"].items() if label.startswith("tail ")]
    assert len(tail) == 1 and tail[0]["max_abs_difference"] < 1e-4, tail
    # The 3x3 configs case found the forward and input-gradient launches at the training size and
    # the in-place forward at the inference size (under the interpreter it times none of them).
    launches = profile["cases"]["3x3 configs F8"]["launches"]
    assert [(row["key"]["EPI1"], row["key"]["in_place"]) for row in launches] == [(0, False), (1, False), (0, True)]
    # The weight-gradient configs case found one block's launch (3 problems) and the group's (9).
    launches = profile["cases"]["weight-gradient configs"]["launches"]
    assert [row["key"]["PROBLEMS"] for row in launches] == [3, 9]
    # The autotune sweep ran its case; under the interpreter nothing autotunes, so it wrote no rows.
    assert "nothing autotunes under the interpreter" in (out / "autotune.log").read_text()


def test_rows_record_every_launch_setting():
    """Each row's env records the launch settings that change what is timed, every one of the
    settings table of docs/launch-path.md: FASTDRN_LAUNCH_PLANS (0 turns launch plans off, and with
    them the host time they save) was left out."""
    import re

    sys.path.insert(0, BENCH)
    try:
        import common
    finally:
        sys.path.remove(BENCH)
    table = open(os.path.join(REPO, "docs", "launch-path.md")).read()
    settings = set(re.findall(r"^\| `(FASTDRN_\w+)` \|", table, flags=re.MULTILINE))
    assert "FASTDRN_LAUNCH_PLANS" in settings
    missing = settings - set(common.environment(torch.device("cpu")))
    assert not missing, f"not recorded: {sorted(missing)}"
