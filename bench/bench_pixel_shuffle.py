"""Benchmark pixel shuffle: fastdrn.ops.pixel_shuffle against a device copy of the same bytes,
torch's pixel_shuffle (eager, fastdrn.reference.pixel_shuffle) and torch.compile of it, with
contiguous (NCHW) and channels_last inputs.

Shapes are DRN's upsampling output (N, 64*s*s, h, w): training 16x48x48 at s = 2, 3, 4 and the
inference images, 270x480 at x4 and 540x960 at x2. No arithmetic; fewest bytes: read x and write
the output once, 2 * numel * element size. The copy row is the ceiling for those bytes.

    python bench/bench_pixel_shuffle.py [--quick | --smoke]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: sets TRITON_INTERPRET for --smoke)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_residual_distill import ELT, LAYOUTS  # noqa: E402

# (N, h, w, scale) with C = 64 features: DRN's upsample conv output is (N, 64*s*s, h, w).
FULL = [(16, 48, 48, 2), (16, 48, 48, 3), (16, 48, 48, 4), (1, 270, 480, 4), (1, 540, 960, 2)]
QUICK = [(1, 270, 480, 4), (16, 48, 48, 4)]


def build_cases(args) -> list[dict]:
    def cases(shapes, dtypes, layouts, feats):
        return [dict(n=n, h=h, w=w, s=s, c=feats * s * s, dtype=dt, layout=lay)
                for dt in dtypes for (n, h, w, s) in shapes for lay in layouts]

    if args.smoke:
        return cases([(1, 4, 4, 2)], ["fp32"], ["nchw", "cl"], 8)
    if args.quick and not args.custom:
        return cases(QUICK, ["bf16", "fp32"], ["nchw", "cl"], args.feats)
    return cases(args.shapes, args.dtypes, args.layouts, args.feats)


def shape_str(c) -> str:
    return f"{c['n']}x{c['c']}x{c['h']}x{c['w']} s{c['s']}"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--feats", type=int, default=64, help="C: the input has C*s*s channels")
    p.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                   default=FULL, help="list of NxhxwxS, e.g. 16x48x48x4,1x270x480x4")
    p.add_argument("--dtypes", type=common.dtype_list, default=["fp32", "bf16", "fp16"])
    p.add_argument("--layouts", type=lambda s: s.split(","), default=["nchw", "cl"])
    args = p.parse_args()
    args.custom = any(a.split("=")[0] in ("--shapes", "--dtypes", "--layouts") for a in sys.argv[1:])

    ctx = common.Context(args, "pixel_shuffle")
    import fastdrn.ops
    from fastdrn import reference

    device = ctx.device
    case_list = build_cases(args)

    def out_layout(t: torch.Tensor) -> str:
        if t.is_contiguous():
            return "contiguous"
        return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"

    def builder(c, impl, seed, compile_mode=None):
        def build():
            gen = torch.Generator(device=device).manual_seed(seed)
            x = torch.randn(c["n"], c["c"], c["h"], c["w"], device=device, generator=gen)
            x = x.to(common.DTYPES[c["dtype"]]).contiguous(memory_format=LAYOUTS[c["layout"]])
            s = c["s"]
            if impl == "copy":
                dst = torch.empty_like(x)
                return dict(fn=lambda: dst.copy_(x), note="dst.copy_(x): the same bytes, no shuffle")
            op, note = common.pick_op(impl, lambda t: reference.pixel_shuffle(t, s),
                                      lambda t: fastdrn.ops.pixel_shuffle(t, s), ctx, compile_mode, device)
            note = "; ".join(filter(None, (note, f"out {out_layout(op(x))}")))

            def check():
                return common.rel_err(op(x), F.pixel_shuffle(x.double(), s))
            return dict(fn=lambda: op(x), note=note, check=check)
        return build

    def run(c, impl, role, seed, compile_mode=None):
        nbytes = 2 * c["n"] * c["c"] * c["h"] * c["w"] * ELT[c["dtype"]]
        ctx.measure(op="pixel_shuffle", pass_="fwd",
                    shape=dict(N=c["n"], C=c["c"], H=c["h"], W=c["w"], scale=c["s"]), shape_str=shape_str(c),
                    layout=c["layout"], dtype=c["dtype"], impl=impl, role=role,
                    build=builder(c, impl, seed, compile_mode), flop=None, min_bytes=nbytes)

    common.sweep_op_cases(ctx, case_list, args.seed, run,
                          lambda c: [("copy", "baseline"), ("eager", "baseline"), ("fastdrn", "candidate")])


if __name__ == "__main__":
    main()
