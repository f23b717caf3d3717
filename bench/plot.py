"""Draw the benchmark results (JSON Lines from the bench scripts) as one PNG of panels.

    python bench/plot.py bench/out/results.jsonl --out bench/out/results.png [--session latest]

Panels: the RDB's TFLOP/s against its input width D (one panel per pass, size and F; a line per
impl and dtype; the dashed line is the measured bf16 matrix peak), compress_skip and
pixel_shuffle achieved GB/s as bars (the dashed line is the measured copy bandwidth), and the
model's median milliseconds as bars (log scale). Needs matplotlib (pip install matplotlib, or
the `bench` extra); without it this script stops with a clear message.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOKE_LABEL, load_rows  # noqa: E402
from report import select  # noqa: E402


NO_MATPLOTLIB = 3  # exit status when matplotlib is missing (bench/gpu_check.py reports it as a skip)


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        print("bench/plot.py needs matplotlib, which is not installed here: pip install matplotlib "
              "(or pip install -e .[bench]); the JSON results and the markdown table do not need it",
              file=sys.stderr, flush=True)
        raise SystemExit(NO_MATPLOTLIB)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rdb_panels(rows):
    panels = {}
    for r in rows:
        if r["op"] != "residual_distill":
            continue
        s = r["shape"]
        key = (r["pass"], f"{s['N']}x{s['H']}x{s['W']}", s["F"], r["layout"])
        panels.setdefault(key, []).append(r)
    return panels


def draw_rdb(ax, key, rows):
    pass_, size, inner, layout = key
    series = {}
    for r in rows:
        series.setdefault(f"{r['impl']} {r['dtype']}", []).append((r["shape"]["D"], r["tflops"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    peak = rows[0]["ceilings"]["matmul_tflops"]
    ax.axhline(peak, color="k", ls="--", lw=0.8)
    ax.axhline(peak / 2, color="gray", ls=":", lw=0.8)
    ax.set_title(f"residual_distill {pass_} {size} F{inner} {layout}", fontsize=9)
    ax.set_xlabel("D (input channels)")
    ax.set_ylabel("TFLOP/s (-- bf16 peak, .. 50%)")
    ax.legend(fontsize=6)


def draw_bars(ax, title, rows, value, ylabel, hline=None, log=False):
    cats, impls = [], []
    for r in rows:
        cat = f"{r['pass']} {r['shape_str']} {r['layout']} {r['dtype']}".replace("model ", "")
        if cat not in cats:
            cats.append(cat)
        if r["impl"] not in impls:
            impls.append(r["impl"])
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, cat in enumerate(cats):
            for r in rows:
                cat_r = f"{r['pass']} {r['shape_str']} {r['layout']} {r['dtype']}".replace("model ", "")
                if r["impl"] == impl and cat_r == cat and value(r) is not None:
                    xs.append(j + i * width)
                    ys.append(value(r))
        ax.bar(xs, ys, width=width, label=impl)
    if hline:
        ax.axhline(hline, color="k", ls="--", lw=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))])
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--out", default=None, help="PNG path (default: next to the results, .png)")
    p.add_argument("--session", default="all", help="all (default), latest, or a session id")
    args = p.parse_args()
    plt = _import_pyplot()
    rows = [r for r in select(load_rows(args.results), args.session) if r.get("status") == "ok"]
    if not rows:
        sys.exit(f"{args.results}: no measured rows to plot")
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    smoke = any(r.get("smoke") for r in rows)

    panels = []
    for key, prs in sorted(rdb_panels(rows).items(), key=lambda kv: str(kv[0])):
        panels.append(lambda ax, key=key, prs=prs: draw_rdb(ax, key, prs))
    for op in ("compress_skip", "pixel_shuffle"):
        ors = [r for r in rows if r["op"] == op]
        if ors:
            bw = ors[0]["ceilings"]["copy_gbs"]
            panels.append(lambda ax, op=op, ors=ors, bw=bw: draw_bars(
                ax, f"{op} (-- copy bandwidth)", ors, lambda r: r.get("gbs"), "GB/s", hline=bw))
    for pass_ in ("train_step", "inference"):
        mrs = [r for r in rows if r.get("layout") == "model" and r["pass"] == pass_]
        if mrs:
            panels.append(lambda ax, pass_=pass_, mrs=mrs: draw_bars(
                ax, f"{mrs[0]['op']} {pass_} (median ms, lower is better)", mrs, lambda r: r.get("median_ms"),
                "ms", log=True))
    ncols = 3 if len(panels) > 4 else 2
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = rows[0].get("env", {})
    title = f"fastdrn benchmarks: {env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | " \
            f"{env.get('date_utc')}"
    if smoke:
        title = f"{SMOKE_LABEL.upper()}\n{title}"
    fig.suptitle(title, fontsize=10, color="red" if smoke else "black")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=90)
    print(f"wrote {out} ({len(panels)} panels)", flush=True)


if __name__ == "__main__":
    main()
