"""Read a results file (JSON Lines from the bench scripts), print the markdown table and the goals.

    python bench/report.py bench/out/results.jsonl [--md results.md] [--session latest]

Goals (reported, never asserted; issue 7):
  1. training step at the paper's batch (16 x 48x48 LR patches, x4), bf16: fastdrn.DRN >= 3x the
     eager bf16 reference and >= 2x torch.compile(reference);
  2. inference of one 480x270 image at x4 (1080p out): fastdrn.DRN >= 2x torch.compile(reference);
  3. RDB forward at inference sizes (one 270x480 or 540x960 image), bf16: >= 50% of the measured
     bf16 matrix peak.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOKE_LABEL, finalize, load_rows, markdown_table, recompute_speedups  # noqa: E402

SCRIPT_ORDER = {"model": 0, "residual_distill": 1, "compress_skip": 2, "pixel_shuffle": 3}


def select(rows: list[dict], session: str) -> list[dict]:
    if session == "all" or not rows:
        return rows
    if session == "latest":
        session = rows[-1].get("session")
    return [r for r in rows if r.get("session") == session]


def _fmt_sp(x):
    return "n/a" if x is None else f"x{x:.2f}"


def _verdict(values_and_targets) -> str:
    """MET / NOT MET / NO DATA over (value, target) pairs."""
    if any(v is None for v, _ in values_and_targets):
        return "NO DATA"
    return "MET" if all(v >= t for v, t in values_and_targets) else "NOT MET"


def _find(rows, **want):
    out = []
    for r in rows:
        shape = r.get("shape") or {}
        if all((shape.get(k[6:]) if k.startswith("shape_") else r.get(k)) == v for k, v in want.items()):
            out.append(r)
    return out


def _why_missing(rows, **want) -> str:
    found = _find(rows, **want)
    if not found:
        return "not measured"
    r = found[-1]
    return f"{r.get('status')}: {r.get('note', '')}"[:200]


STRONGEST_BASELINES = ("eager-graph", "compile", "compile-reduce-overhead", "compile-max-autotune")


def _graph_line(ok: list[dict], dtype: str, where: dict) -> list[str]:
    """The same case replayed from one CUDA graph (impl fastdrn-graph): host launch costs removed;
    and against the fastest of the strongest baselines measured (the eager reference in one CUDA
    graph, torch.compile in each mode)."""
    graphed = _find(ok, impl="fastdrn-graph", dtype=dtype, **where)
    if not graphed:
        return []
    sp = graphed[-1].get("speedup") or {}
    lines = [f"  - in one CUDA graph: {graphed[-1]['median_ms']:.2f} ms, {_fmt_sp(sp.get('eager'))} vs eager, "
             f"{_fmt_sp(sp.get('compile'))} vs torch.compile"]
    strong = {impl: rows[-1]["median_ms"] for impl in STRONGEST_BASELINES
              if (rows := _find(ok, impl=impl, dtype=dtype, **where))}
    if strong:
        fastest = min(strong, key=strong.get)
        lines.append("  - strongest baselines: " + ", ".join(f"{k} {v:.2f} ms" for k, v in strong.items())
                     + f"; fastdrn-graph {_fmt_sp(strong[fastest] / graphed[-1]['median_ms'])} vs the fastest ({fastest})")
    return lines


def goals(rows: list[dict]) -> list[str]:
    lines = ["## Goals (reported, not asserted)", ""]
    if rows and all(r.get("smoke") for r in rows):
        lines.append(f"- all rows are {SMOKE_LABEL}: goals not evaluated")
        return lines + [""]
    ok = [r for r in rows if r.get("status") == "ok"]

    # 1. training step, paper batch, bf16
    train = dict(op="drn", **{"pass": "train_step"}, shape_scale=4, shape_N=16, shape_H=48, shape_W=48)
    fast = _find(ok, impl="fastdrn", dtype="bf16", **train)
    if not fast:
        lines.append("- Goal 1, training step x4 16x48x48 bf16 (>= 3x eager bf16, >= 2x torch.compile): NO DATA "
                     f"(fastdrn bf16 row {_why_missing(rows, impl='fastdrn', dtype='bf16', **train)})")
    else:
        sp = fast[-1].get("speedup") or {}
        e, c = sp.get("eager"), sp.get("compile")
        lines.append(f"- Goal 1, training step x4 16x48x48 bf16: fastdrn {fast[-1]['median_ms']:.2f} ms, "
                     f"{_fmt_sp(e)} vs eager bf16 (target x3), {_fmt_sp(c)} vs torch.compile bf16 (target x2): "
                     f"**{_verdict([(e, 3.0), (c, 2.0)])}**"
                     + ("" if c is not None else f" (compile row {_why_missing(rows, impl='compile', dtype='bf16', **train)})"))
    lines += _graph_line(ok, "bf16", train)
    # 2. inference x4 1080p
    infer = dict(op="drn", **{"pass": "inference"}, shape_scale=4, shape_N=1, shape_H=270, shape_W=480)
    any_inf = False
    for dt in ("bf16", "fp32"):
        fast = _find(ok, impl="fastdrn", dtype=dt, **infer)
        if not fast or (dt != "bf16" and not _find(rows, impl="compile", dtype=dt, **infer)):
            continue
        any_inf = True
        sp = fast[-1].get("speedup") or {}
        c = sp.get("compile")
        lines.append(f"- Goal 2, inference x4 480x270 -> 1080p {dt}: fastdrn {fast[-1]['median_ms']:.2f} ms, "
                     f"{_fmt_sp(c)} vs torch.compile {dt} (target x2), {_fmt_sp(sp.get('eager'))} vs eager {dt}: "
                     f"**{_verdict([(c, 2.0)])}**"
                     + ("" if c is not None else f" (compile row {_why_missing(rows, impl='compile', dtype=dt, **infer)})"))
        lines += _graph_line(ok, dt, infer)
    if not any_inf:
        lines.append("- Goal 2, inference x4 480x270 (>= 2x torch.compile): NO DATA "
                     f"(fastdrn row {_why_missing(rows, impl='fastdrn', **infer)})")
    # 3. RDB forward at inference sizes, bf16, fraction of the measured bf16 matrix peak
    rdb = [r for r in _find(ok, op="residual_distill", impl="fastdrn", dtype="bf16", **{"pass": "fwd"})
           if r["shape"].get("N") == 1 and r["shape"]["H"] * r["shape"]["W"] >= 270 * 480]
    if not rdb:
        lines.append("- Goal 3, RDB forward bf16 at inference sizes >= 50% of bf16 matrix peak: NO DATA")
    else:
        fracs = [(r["frac_matrix_peak"], 0.5) for r in rdb]
        lines.append(f"- Goal 3, RDB forward bf16 at inference sizes >= 50% of the measured bf16 matrix peak "
                     f"({rdb[0]['ceilings']['matmul_tflops']:.0f} TFLOP/s): {sum(f >= 0.5 for f, _ in fracs)} of "
                     f"{len(fracs)} shapes, {min(f for f, _ in fracs):.0%} to {max(f for f, _ in fracs):.0%}: "
                     f"**{_verdict(fracs)}**")
        for r in rdb:
            lines.append(f"  - {r['shape_str']}: {r['median_ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s = "
                         f"{r['frac_matrix_peak']:.0%} of peak; {_fmt_sp((r.get('speedup') or {}).get('eager'))} "
                         f"vs eager, {_fmt_sp((r.get('speedup') or {}).get('compile'))} vs compile")
    return lines + [""]


def correctness(rows: list[dict]) -> list[str]:
    """Every fastdrn row's relative error against float64, flagged against SPEC.md section 4's GPU limits."""
    limits = {"fp32": 2e-3, "bf16": 2e-2, "fp16": 2e-2, "fp64": 1e-12}
    bad = [r for r in rows if r.get("status") == "ok" and r.get("rel_err") is not None and not r.get("smoke")
           and not (float(r["rel_err"]) <= limits.get(r.get("dtype"), 2e-2))]
    errors = [r for r in rows if r.get("status") == "error"]
    lines = ["## Checks", ""]
    checked = sum(1 for r in rows if r.get("rel_err") is not None)
    lines.append(f"- forward outputs checked against float64: {checked} rows; over SPEC.md's forward tolerance: "
                 f"{len(bad)}")
    for r in bad:
        lines.append(f"  - OVER: {r['op']} {r['pass']} {r['shape_str']} {r['dtype']} {r['impl']}: rel err "
                     f"{float(r['rel_err']):.2e} > {limits.get(r['dtype'])}")
    lines.append(f"- rows that raised: {len(errors)}")
    for r in errors[:20]:
        lines.append(f"  - ERROR: {r['op']} {r['pass']} {r['shape_str']} {r['dtype']} {r['impl']}: {r.get('note')}")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="JSON Lines file written by the bench scripts")
    p.add_argument("--md", default=None, help="write the table, checks and goals here too")
    p.add_argument("--session", default="all", help="all (default), latest, or a session id")
    p.add_argument("--no-table", action="store_true", help="print only the checks and goals")
    p.add_argument("--compact", action="store_true", help="print the table without its note column")
    p.add_argument("--finalize", action="store_true",
                   help="first rewrite the results file with every row's speedups (for runs that were cut short)")
    args = p.parse_args()
    if args.finalize:
        finalize(args.results)
    rows = select(recompute_speedups(load_rows(args.results)), args.session)
    rows.sort(key=lambda r: SCRIPT_ORDER.get(r.get("script"), 9))  # stable: measurement order within a script
    text = "\n".join([markdown_table(rows), *correctness(rows), *goals(rows)])
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.no_table:
        text = "\n".join([*correctness(rows), *goals(rows)])
    elif args.compact:
        text = "\n".join([markdown_table(rows, compact=True), *correctness(rows), *goals(rows)])
    print(text, flush=True)


if __name__ == "__main__":
    main()
