"""End-to-end DRN benchmark: a training step and single-image inference, fastdrn.DRN against the
plain PyTorch model (fastdrn.reference.DRN) run eagerly and through torch.compile.

Cases (full set): a training step (forward, L1 loss, backward, Adam step) at x2, x3, x4 with the
paper's batch (16 LR patches of 48x48) and a larger one (64 patches); inference of one 480x270
image at x4 (1080p out) and one 960x540 image at x2 (1080p out). Each reports its peak memory.

Implementations (the dtype column says fp32 or bf16):
  eager    fp32   reference model, eager, NCHW (fp32 convs on TF32 units: cuDNN's default)
  eager    bf16   reference model, eager, bf16 autocast + channels_last
  eager-graph     the eager reference run through fastdrn.make_train_step / make_upscaler: the whole
                  step (forward, L1, backward, fused Adam) or the forward replayed from one CUDA graph
  compile  fp32 / bf16   torch.compile(reference) default mode, same precision set-ups
  compile-reduce-overhead  mode="reduce-overhead" (torch.compile's own CUDA graphs)
  compile-max-autotune   mode="max-autotune": opt-in with --max-autotune (slow to compile)
  fastdrn  fp32 / bf16   fastdrn.DRN with the same state_dict (bf16: autocast + channels_last)
  fastdrn-graph   fastdrn.DRN through fastdrn.make_train_step / make_upscaler, as eager-graph
  fastdrn-fused-tail[-graph]  inference only, opt-in with --fused-tail: fastdrn.DRN with the launch
                  option fuse_tail (FASTDRN_FUSE_TAIL=1: the pixel shuffle and the tail conv in one kernel)
If fastdrn.DRN does not exist yet its rows are 'skipped', with the reason. The graph rows are the
library's API as a user calls it: its warm-up calls and the capture happen before the timing, and
an upscaler's output is a copy the caller owns. In --smoke (CPU) the same API runs eagerly.

Work: the model's forward FLOP per LR pixel (convolutions only, docs/kernels.md: about 6.7
MFLOP at x4), three times that for a training step.

    python bench/bench_model.py [--quick | --smoke] [--max-autotune]
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: sets TRITON_INTERPRET for --smoke)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SMOKE_CONFIG = dict(n_feats=8, n_groups=1, n_blocks=1, inner=8, distill=4)


def parse_cases(text: str, kind: str) -> list[dict]:
    """'4:16x48x48,2:64x48x48' -> cases (scale:NxHxW, H and W of the LR input)."""
    out = []
    for item in text.split(","):
        scale, size = item.split(":")
        n, h, w = (int(v) for v in size.lower().split("x"))
        out.append(dict(kind=kind, scale=int(scale), n=n, h=h, w=w))
    return out


def build_cases(args) -> list[dict]:
    if args.smoke:
        return [dict(kind="train", scale=2, n=1, h=6, w=6), dict(kind="inference", scale=4, n=1, h=6, w=6)]
    if args.quick and not args.custom:
        return [dict(kind="train", scale=4, n=16, h=48, w=48), dict(kind="inference", scale=4, n=1, h=270, w=480)]
    return parse_cases(args.train, "train") + parse_cases(args.infer, "inference")


def impl_plan(args) -> list[list[tuple[str, str, str]]]:
    """Sweeps of (impl, dtype, role) over every case, in the order a time limit should cut last.

    bf16 first (the goals are stated in bf16): eager and fastdrn, each also replayed from CUDA
    graphs, then torch.compile's reduce-overhead mode (its fastest training step so far: a time
    limit should cut the default mode first), the default mode, and max-autotune when asked; then the
    same for fp32.
    """
    cdt = args.compile_dtypes or args.dtypes
    sweeps = []
    for dt in sorted(args.dtypes, key=lambda d: d != "bf16"):
        sweep = [("eager", dt, "baseline"), ("fastdrn", dt, "candidate")]
        if args.recompute:
            sweep.append(("fastdrn-recompute", dt, "candidate"))
        if args.unfolded:
            sweep.append(("fastdrn-unfolded", dt, "candidate"))
        if args.fused_tail:
            sweep.append(("fastdrn-fused-tail", dt, "candidate"))
        if not args.no_graphs:
            sweep += [("eager-graph", dt, "baseline"), ("fastdrn-graph", dt, "candidate")]
            if args.unfolded:
                sweep.append(("fastdrn-unfolded-graph", dt, "candidate"))
            if args.fused_tail:
                sweep.append(("fastdrn-fused-tail-graph", dt, "candidate"))
        sweeps.append(sweep)
        if not args.no_compile and dt in cdt:
            sweeps.append([("compile-reduce-overhead", dt, "baseline")])
            sweeps.append([("compile", dt, "baseline")])
        if args.max_autotune and dt in cdt:
            sweeps.append([("compile-max-autotune", dt, "baseline")])
    if args.impls:
        sweeps = [kept for kept in ([row for row in sweep if row[0] in args.impls] for sweep in sweeps) if kept]
    return sweeps


IMPLS = ("eager", "fastdrn", "fastdrn-recompute", "fastdrn-unfolded", "fastdrn-fused-tail", "eager-graph",
         "fastdrn-graph", "fastdrn-unfolded-graph", "fastdrn-fused-tail-graph", "compile-reduce-overhead", "compile",
         "compile-max-autotune")
COMPILE_MODES = {"compile": None, "compile-reduce-overhead": "reduce-overhead", "compile-max-autotune": "max-autotune"}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["drn", "drn_plus"], default="drn", help="drn (F=64) or drn_plus (F=256)")
    p.add_argument("--train", default="2:16x48x48,3:16x48x48,4:16x48x48,2:64x48x48,3:64x48x48,4:64x48x48",
                   help="training cases scale:NxHxW (LR patch size)")
    p.add_argument("--infer", default="4:1x270x480,2:1x540x960", help="inference cases scale:NxHxW (LR image)")
    p.add_argument("--dtypes", type=lambda s: [d for d in common.dtype_list(s) if d in ("fp32", "bf16")],
                   default=["fp32", "bf16"], help="fp32 and/or bf16 (bf16 = autocast + channels_last)")
    p.add_argument("--compile-dtypes", type=common.dtype_list, default=None,
                   help="dtypes of the compile baselines (default: --dtypes; --quick: bf16)")
    p.add_argument("--recompute", action="store_true", help="also fastdrn.DRN(recompute=True)")
    p.add_argument("--unfolded", action="store_true",
                   help="also fastdrn with FASTDRN_FOLD_BACKWARD=0 (rows fastdrn-unfolded, fastdrn-unfolded-graph)")
    p.add_argument("--fused-tail", action="store_true",
                   help="also fastdrn inference with FASTDRN_FUSE_TAIL=1 (rows fastdrn-fused-tail, "
                        "fastdrn-fused-tail-graph)")
    p.add_argument("--impls", type=lambda s: s.split(","), default=None,
                   help="only these rows (comma list of impl names, e.g. fastdrn-graph,compile-max-autotune)")
    p.add_argument("--no-graphs", action="store_true",
                   help="skip eager-graph and fastdrn-graph (fastdrn.make_train_step / make_upscaler: the "
                        "whole step captured in a CUDA graph and replayed)")
    args = p.parse_args()
    if args.impls and set(args.impls) - set(IMPLS):
        p.error(f"--impls: unknown {sorted(set(args.impls) - set(IMPLS))}; known: {', '.join(IMPLS)}")
    args.custom = any(a.split("=")[0] in ("--train", "--infer") for a in sys.argv[1:])
    if args.quick and args.compile_dtypes is None:
        args.compile_dtypes = ["bf16"]
    if args.smoke:
        args.dtypes, args.compile_dtypes = ["fp32", "bf16"], ["fp32"]

    ctx = common.Context(args, "model")
    import fastdrn
    from fastdrn import reference

    device = ctx.device
    config = dict(SMOKE_CONFIG) if ctx.smoke else (dict(inner=256) if args.arch == "drn_plus" else {})
    op_name = args.arch if not ctx.smoke else "drn_smoke"
    fast_cls = getattr(fastdrn, "DRN", None)
    if fast_cls is None:
        common.say("== fastdrn.DRN is not available yet: its rows are recorded as skipped")
    cases = build_cases(args)
    f64_cache: dict = {}

    def reference_model(c, seed):
        torch.manual_seed(seed)
        return reference.DRN(scale=c["scale"], **config)

    def make_inputs(c, seed):
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        x = torch.rand(c["n"], 3, c["h"], c["w"], device=device, generator=gen)
        y = torch.rand(c["n"], 3, c["h"] * c["scale"], c["w"] * c["scale"], device=device, generator=gen)
        return x, y

    def reference_f64(c, seed):
        key = (seed, c["kind"], c["scale"], c["n"], c["h"], c["w"])
        if key not in f64_cache:
            f64_cache.clear()
            model = reference_model(c, seed).to(device).double().eval()
            x, _ = make_inputs(c, seed)
            with torch.no_grad():
                f64_cache[key] = model(x.double()).cpu()
            del model, x
            common.cleanup(device)
        return f64_cache[key]

    def builder(c, impl, dt, seed):
        def build():
            ref = reference_model(c, seed)
            note = ""
            graph = impl.endswith("-graph")
            if impl.startswith("fastdrn"):
                if fast_cls is None:
                    raise common.Skip("fastdrn.DRN is not available yet")
                if ctx.smoke and dt != "fp32":
                    raise common.Skip("bf16 is not checked in smoke mode: Triton 3.9's interpreter computes bf16 "
                                      "tl.dot wrongly (a 16x16 product is off by ~1e10), so only the GPU can say")
                kwargs = {"recompute": True} if impl == "fastdrn-recompute" else {}
                try:
                    model = fast_cls(scale=c["scale"], **config, **kwargs)
                except TypeError as exc:
                    raise common.Skip(f"fastdrn.DRN does not take {kwargs}: {exc}")
                model.load_state_dict(ref.state_dict(), strict=True)
            else:
                model = ref
            if impl == "compile-reduce-overhead" and ctx.smoke:
                raise common.Skip("reduce-overhead is torch.compile's CUDA graphs: GPU only")
            bf16 = dt == "bf16"
            model = model.to(device)
            if impl.startswith("fastdrn"):  # asked after the move: the backend depends on the device
                note = f"backend: {getattr(model, 'backend', 'unknown (no .backend attribute)')}"
            if bf16:
                model = model.to(memory_format=torch.channels_last)
            x, y = make_inputs(c, seed)
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            run_model = model
            mode = COMPILE_MODES.get(impl)
            if impl.startswith("compile"):
                run_model = common.compile_fn(model, ctx, mode)
                note = common.compile_note(ctx, mode)
            if mode == "reduce-overhead":
                def invoke(t):  # a new step for torch.compile's CUDA-graph trees: earlier outputs are done with
                    torch.compiler.cudagraph_mark_step_begin()
                    return run_model(t)
            else:
                invoke = run_model
            amp = torch.bfloat16 if bf16 else None
            autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
            held_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            if c["kind"] == "train":
                model.train()
                opt_kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
                if device.type == "cuda":
                    opt_kw.update(fused=True, capturable=graph)
                    if graph:  # a tensor lr, as a schedule would need
                        opt_kw["lr"] = torch.tensor(1e-4, device=device)
                opt = torch.optim.Adam(model.parameters(), **opt_kw)
                if graph:
                    fn = functools.partial(fastdrn.make_train_step(model, opt, F.l1_loss, amp_dtype=amp), x, y)
                    graphed = "fastdrn.make_train_step: the whole step (forward, L1, backward, fused Adam)"
                else:
                    def fn():
                        opt.zero_grad(set_to_none=True)
                        with torch.autocast(**autocast):
                            out = invoke(x)
                        F.l1_loss(out.float(), y).backward()
                        opt.step()
                check = None
            else:
                model.eval()
                if graph:
                    fn = functools.partial(fastdrn.make_upscaler(model, amp_dtype=amp), x)
                    graphed = "fastdrn.make_upscaler: the forward, its output copied out,"
                else:
                    def fn():
                        with torch.no_grad(), torch.autocast(**autocast):
                            return invoke(x)

                def check():  # every impl: the baselines' own error is the yardstick
                    return common.rel_err(fn().float(), reference_f64(c, seed))
            if graph:
                for _ in range(fastdrn.graphs.WARMUP_CALLS + 1):  # the eager warm-up calls, then the capture
                    fn()
                if ctx.smoke:
                    graphed = graphed.split(":")[0] + " run eagerly on the CPU (smoke)"
                else:
                    held = (torch.cuda.memory_allocated(device) - held_before) / common.MiB
                    graphed += (f" replayed from one CUDA graph; {held:.0f} MiB held after capture (graph pool, "
                                "static buffers, optimizer state)")
                note = "; ".join(filter(None, [note, graphed]))
            return dict(fn=fn, note=note, check=check)
        return build

    def run(c, impl, dt, role, seed):
        if ctx.smoke and c["kind"] == "train" and (dt == "bf16" or impl.startswith("compile")):
            return  # smoke: slow on the CPU, and the inference rows already run these set-ups
        if "-unfolded" in impl and c["kind"] != "train":
            return  # the fold changes the training backward only
        if "-fused-tail" in impl and c["kind"] != "inference":
            return  # the fused tail runs only where no gradient is needed
        pixels = c["n"] * c["h"] * c["w"]
        flop = pixels * common.drn_flop_per_lr_pixel(c["scale"], **config)
        if c["kind"] == "train":
            flop *= 3
        shape_str = f"x{c['scale']} {c['n']}x{c['h']}x{c['w']}"
        if dt == "bf16":
            variant = "autocast bf16, channels_last"
        else:
            variant = "fp32" if ctx.smoke else "fp32 (TF32 convs)"
        if c["kind"] == "train":
            variant += "; L1 + Adam step"
        # The unfolded rows run with the fold off, the fused-tail rows with fuse_tail on (set_launch_options:
        # kernels.md), the others as the process was.
        from fastdrn.kernels._common import launch_settings

        settings = {}
        if "-unfolded" in impl:
            variant += "; FASTDRN_FOLD_BACKWARD=0"
            settings["fold_backward"] = False
        if "-fused-tail" in impl:
            variant += "; FASTDRN_FUSE_TAIL=1"
            settings["fuse_tail"] = True
        with launch_settings(**settings):
            ctx.measure(op=op_name, pass_="train_step" if c["kind"] == "train" else "inference",
                        shape=dict(scale=c["scale"], N=c["n"], H=c["h"], W=c["w"], **config), shape_str=shape_str,
                        layout="model", dtype=dt, impl=impl, role=role, build=builder(c, impl, dt, seed),
                        flop=flop, min_bytes=None, variant=variant)

    seeds = [args.seed + 1000 * i for i in range(len(cases))]
    sweeps = impl_plan(args)
    common.say(f"== {len(cases)} cases; sweeps: " + " | ".join(", ".join(f"{i} {d}" for i, d, _ in s) for s in sweeps))
    for sweep in sweeps:
        for c, seed in zip(cases, seeds):
            for impl, dt, role in sweep:
                run(c, impl, dt, role, seed)
    ctx.finish()


if __name__ == "__main__":
    main()
