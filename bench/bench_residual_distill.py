"""Benchmark the residual distilling block: fastdrn.ops.residual_distill against eager PyTorch
(fastdrn.reference.residual_distill) and torch.compile of it, forward and forward+backward.

Full set: D = 64..136 by 8, F = 64 and 256, d = 8; training size 16x48x48 and inference sizes
1x270x480 and 1x540x960; fp32 (TF32), bf16, fp16; channels_last inputs. --quick is the reduced
set of the one-shot GPU check; --smoke runs tiny sizes through the Triton interpreter on the CPU.

Work per pixel (docs/kernels.md): 2*(D*F + 9*F*F + F*(D+d)) FLOP forward, three times that
forward+backward. Fewest bytes: forward reads z and writes out, (D + D + d) values a pixel;
backward reads z and dy and writes dz, (D + (D+d) + D) more.

    python bench/bench_residual_distill.py              # full set, GPU
    python bench/bench_residual_distill.py --quick      # GPU check subset
    python bench/bench_residual_distill.py --smoke      # CPU rehearsal, not a timing
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: sets TRITON_INTERPRET for --smoke)
import torch  # noqa: E402

ELT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
LAYOUTS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}


def parse_size(text: str) -> tuple[int, int, int]:
    n, h, w = (int(v) for v in text.lower().split("x"))
    return n, h, w


def build_cases(args) -> list[dict]:
    """Cases in the order they are measured: what the goals need first."""
    def cases(passes, sizes, inners, dins, dtypes, layouts):
        return [dict(pass_=p, size=s, F=f, D=dd, d=args.distill, dtype=dt, layout=lay)
                for p in passes for dt in dtypes for s in sizes for f in inners for dd in dins for lay in layouts]

    if args.smoke:
        return (cases(["fwd"], [(1, 6, 6)], [16], [16], ["fp32"], ["cl", "nchw"])
                + cases(["fwd+bwd"], [(1, 6, 6)], [16], [16], ["fp32"], ["cl"]))
    if args.quick and not args.custom:
        dins, inners = [64, 136], [64, 256]
        return (cases(["fwd"], [(1, 270, 480), (1, 540, 960)], inners, dins, ["bf16"], ["cl"])
                + cases(["fwd+bwd"], [(16, 48, 48)], inners, dins, ["bf16"], ["cl"])
                + cases(["fwd"], [(16, 48, 48)], inners, dins, ["bf16"], ["cl"])
                + cases(["fwd"], [(1, 540, 960)], inners, dins, ["fp32"], ["cl"])
                + cases(["fwd+bwd"], [(16, 48, 48)], inners, dins, ["fp32"], ["cl"]))
    return cases(args.passes, args.sizes, args.F, args.D, args.dtypes, args.layouts)


def shape_str(c) -> str:
    n, h, w = c["size"]
    return f"{n}x{h}x{w} D{c['D']} F{c['F']} d{c['d']}"


def work(c) -> tuple[float, float]:
    n, h, w = c["size"]
    m = n * h * w
    flop = m * common.rdb_flop_per_pixel(c["D"], c["F"], c["d"])
    fwd_bytes = m * (c["D"] + c["D"] + c["d"]) * ELT[c["dtype"]]
    if c["pass_"] == "fwd":
        return flop, fwd_bytes
    return 3 * flop, fwd_bytes + m * (c["D"] + (c["D"] + c["d"]) + c["D"]) * ELT[c["dtype"]]


def make_inputs(c, device, requires_grad: bool, seed: int):
    """Fresh random inputs (never zeros), the same for every impl of a case."""
    n, h, w = c["size"]
    dt = common.DTYPES[c["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dt)

    d_in, inner, out_ch = c["D"], c["F"], c["D"] + c["d"]
    z = rnd(n, d_in, h, w).contiguous(memory_format=LAYOUTS[c["layout"]])
    ws = [rnd(inner, d_in, 1, 1, scale=d_in ** -0.5), rnd(inner, scale=0.1),
          rnd(inner, inner, 3, 3, scale=(9 * inner) ** -0.5), rnd(inner, scale=0.1),
          rnd(out_ch, inner, 1, 1, scale=inner ** -0.5), rnd(out_ch, scale=0.1)]
    leaves = [z, *ws]
    for t in leaves:
        t.requires_grad_(requires_grad)
    dy = rnd(n, out_ch, h, w).contiguous(memory_format=LAYOUTS[c["layout"]]) if requires_grad else None
    return leaves, dy


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--D", type=common.int_list, default=list(range(64, 137, 8)), help="input widths, e.g. 64,136")
    p.add_argument("--F", type=common.int_list, default=[64, 256], help="inner widths")
    p.add_argument("--distill", type=int, default=8)
    p.add_argument("--sizes", type=lambda s: [parse_size(t) for t in s.split(",")],
                   default=[(16, 48, 48), (1, 270, 480), (1, 540, 960)], help="NxHxW list")
    p.add_argument("--dtypes", type=common.dtype_list, default=["fp32", "bf16", "fp16"])
    p.add_argument("--passes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    p.add_argument("--layouts", type=lambda s: s.split(","), default=["cl"], help="cl (channels_last), nchw")
    p.add_argument("--recompute", action="store_true", help="also fastdrn with recompute=True (fwd+bwd)")
    args = p.parse_args()
    args.custom = any(a.split("=")[0] in ("--D", "--F", "--sizes", "--dtypes", "--passes", "--layouts")
                      for a in sys.argv[1:])

    ctx = common.Context(args, "residual_distill")
    import fastdrn.ops
    from fastdrn import reference

    device, alpha = ctx.device, 0.2
    case_list = build_cases(args)
    want_recompute = args.recompute or not (args.quick or args.smoke)
    f64_cache: dict = {}

    def reference_f64(c, seed):
        key = (seed, shape_str(c), c["layout"], c["dtype"])
        if key not in f64_cache:
            f64_cache.clear()
            leaves, _ = make_inputs(c, device, False, seed)
            with torch.no_grad():
                f64_cache[key] = reference.residual_distill(*[t.double() for t in leaves], alpha).cpu()
            del leaves
        return f64_cache[key]

    def builder(c, impl, seed, compile_mode=None):
        def build():
            grad = c["pass_"] == "fwd+bwd"
            leaves, dy = make_inputs(c, device, grad, seed)
            recompute = impl == "fastdrn-recompute"
            op, note = common.pick_op(
                impl, lambda *t: reference.residual_distill(*t, alpha),
                lambda *t: fastdrn.ops.residual_distill(*t, alpha=alpha, recompute=recompute), ctx, compile_mode, device)
            fn = common.pass_fn(op, leaves, dy if grad else None)

            def check():  # every impl: the baselines' own error is the yardstick
                with torch.no_grad():
                    out = op(*[t.detach() for t in leaves])
                return common.rel_err(out, reference_f64(c, seed))
            return dict(fn=fn, grad_to_none=leaves if grad else None, check=check, note=note)
        return build

    def run(c, impl, role, seed, compile_mode=None):
        flop, nbytes = work(c)
        n, h, w = c["size"]
        ctx.measure(op="residual_distill", pass_=c["pass_"], shape=dict(N=n, H=h, W=w, D=c["D"], F=c["F"], d=c["d"]),
                    shape_str=shape_str(c), layout=c["layout"], dtype=c["dtype"], impl=impl, role=role,
                    build=builder(c, impl, seed, compile_mode), flop=flop, min_bytes=nbytes,
                    variant=common.fp32_variant(c["dtype"], impl, ctx))

    def first(c):
        recompute = [("fastdrn-recompute", "candidate")] if want_recompute and c["pass_"] == "fwd+bwd" else []
        return [("eager", "baseline"), ("fastdrn", "candidate"), *recompute]
    common.sweep_op_cases(ctx, case_list, args.seed, run, first)


if __name__ == "__main__":
    main()
