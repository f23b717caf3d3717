"""Benchmark a group's compression and long skip: fastdrn.ops.compress_skip against eager PyTorch
(fastdrn.reference.compress_skip: ELU(conv1x1(z)) + skip) and torch.compile of it.

DRN's shape: z has C + K*d = 136 channels, the output and the skip C = 64. Sizes: training
16x48x48, inference 1x270x480 and 1x540x960; fp32 (TF32), bf16, fp16; forward and forward+backward.

Work per pixel: 2*Cin*Cout FLOP forward (three times that with backward). Fewest bytes: forward
reads z and skip and writes out, (Cin + 2*Cout) values a pixel; backward reads dy and z and writes
dz, (Cout + 2*Cin) more (the skip's gradient is dy itself).

    python bench/bench_compress_skip.py [--quick | --smoke]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: sets TRITON_INTERPRET for --smoke)
import torch  # noqa: E402
from bench_residual_distill import ELT, LAYOUTS, parse_size  # noqa: E402


def build_cases(args) -> list[dict]:
    def cases(passes, sizes, dtypes, layouts, cin, cout):
        return [dict(pass_=p, size=s, cin=cin, cout=cout, dtype=dt, layout=lay)
                for p in passes for dt in dtypes for s in sizes for lay in layouts]

    if args.smoke:
        return cases(["fwd", "fwd+bwd"], [(1, 6, 6)], ["fp32"], ["cl"], 24, 8)
    if args.quick and not args.custom:
        return (cases(["fwd"], [(1, 540, 960)], ["bf16", "fp32"], ["cl"], args.cin, args.cout)
                + cases(["fwd+bwd"], [(16, 48, 48)], ["bf16", "fp32"], ["cl"], args.cin, args.cout))
    return cases(args.passes, args.sizes, args.dtypes, args.layouts, args.cin, args.cout)


def shape_str(c) -> str:
    n, h, w = c["size"]
    return f"{n}x{h}x{w} Cin{c['cin']} Cout{c['cout']}"


def work(c) -> tuple[float, float]:
    n, h, w = c["size"]
    m, e = n * h * w, ELT[c["dtype"]]
    flop = m * 2 * c["cin"] * c["cout"]
    fwd_bytes = m * (c["cin"] + 2 * c["cout"]) * e
    if c["pass_"] == "fwd":
        return flop, fwd_bytes
    return 3 * flop, fwd_bytes + m * (c["cout"] + 2 * c["cin"]) * e


def make_inputs(c, device, requires_grad: bool, seed: int):
    n, h, w = c["size"]
    dt, fmt = common.DTYPES[c["dtype"]], LAYOUTS[c["layout"]]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dt)

    z = rnd(n, c["cin"], h, w).contiguous(memory_format=fmt)
    wt = rnd(c["cout"], c["cin"], 1, 1, scale=c["cin"] ** -0.5)
    b = rnd(c["cout"], scale=0.1)
    skip = rnd(n, c["cout"], h, w).contiguous(memory_format=fmt)
    leaves = [z, wt, b, skip]
    for t in leaves:
        t.requires_grad_(requires_grad)
    dy = rnd(n, c["cout"], h, w).contiguous(memory_format=fmt) if requires_grad else None
    return leaves, dy


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--cin", type=int, default=136)
    p.add_argument("--cout", type=int, default=64)
    p.add_argument("--sizes", type=lambda s: [parse_size(t) for t in s.split(",")],
                   default=[(16, 48, 48), (1, 270, 480), (1, 540, 960)])
    p.add_argument("--dtypes", type=common.dtype_list, default=["fp32", "bf16", "fp16"])
    p.add_argument("--passes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    p.add_argument("--layouts", type=lambda s: s.split(","), default=["cl"], help="cl (channels_last), nchw")
    args = p.parse_args()
    args.custom = any(a.split("=")[0] in ("--sizes", "--dtypes", "--passes", "--layouts") for a in sys.argv[1:])

    ctx = common.Context(args, "compress_skip")
    import fastdrn.ops
    from fastdrn import reference

    device, alpha = ctx.device, 0.2
    case_list = build_cases(args)

    def builder(c, impl, seed, compile_mode=None):
        def build():
            grad = c["pass_"] == "fwd+bwd"
            leaves, dy = make_inputs(c, device, grad, seed)
            op, note = common.pick_op(impl, lambda *t: reference.compress_skip(*t, alpha),
                                      lambda *t: fastdrn.ops.compress_skip(*t, alpha=alpha), ctx, compile_mode, device)
            fn = common.pass_fn(op, leaves, dy if grad else None)

            def check():  # every impl: the baselines' own error is the yardstick
                with torch.no_grad():
                    out = op(*[t.detach() for t in leaves])
                    ref = reference.compress_skip(*[t.detach().double() for t in leaves], alpha)
                return common.rel_err(out, ref)
            return dict(fn=fn, grad_to_none=leaves if grad else None, check=check, note=note)
        return build

    def run(c, impl, role, seed, compile_mode=None):
        flop, nbytes = work(c)
        n, h, w = c["size"]
        ctx.measure(op="compress_skip", pass_=c["pass_"], shape=dict(N=n, H=h, W=w, Cin=c["cin"], Cout=c["cout"]),
                    shape_str=shape_str(c), layout=c["layout"], dtype=c["dtype"], impl=impl, role=role,
                    build=builder(c, impl, seed, compile_mode), flop=flop, min_bytes=nbytes,
                    variant=common.fp32_variant(c["dtype"], impl, ctx))

    common.sweep_op_cases(ctx, case_list, args.seed, run, lambda c: [("eager", "baseline"), ("fastdrn", "candidate")])


if __name__ == "__main__":
    main()
