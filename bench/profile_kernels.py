"""Where the GPU time of a DRN step goes: per-kernel device time from torch.profiler, and a single
residual distilling block's forward + backward replayed from a CUDA graph.

Kernel durations do not depend on how the kernels were launched, so the profiled steps run with
ordinary (eager) launches; host gaps between kernels are not counted. Cases (bf16 autocast,
channels_last, FASTDRN_AUTOTUNE as set by the caller):
  train     DRN x4 training step, 16 x 48x48 (forward, L1, backward, fused Adam)
  infer     DRN x4 inference, 1 x 270x480
  block     one block's forward + backward at 16x48x48, D = 64 and 136, F = 64: the mean of CUDA-
            graph replays (the kernel issue's target is 60 us)
  group     a group of 9 blocks (D = 64 to 136, F = 64) forward + backward at 16x48x48, graph
            replays: without the backward fold, with it (the default), and with it at 512 and 1024
            weight-gradient programs a launch instead of gemm.WEIGHT_GRAD_TILES_PROGRAMS (256: 0.4 of
            a wave on an H200 under Nsight Compute at 0211768)
  rdb       one block's forward (no gradient) at 1x540x960, D = 64, F = 64: its TFLOP/s against a
            bf16 matrix product measured in the same run (the kernel issue's target is 50%)
  upsampler the x4 upsampler conv, 64 -> 1024 channels at 1x270x480, then the pixel shuffle:
            conv with bias then ops.pixel_shuffle, against conv without bias then
            ops._pixel_shuffle_bias (the bias added by the shuffle's gather)
  tail      the same conv and the rest of DRN's output stage: with bias, ops.pixel_shuffle, the tail
            conv (64 -> 3 at 1080x1920) and + mean, against conv without bias then shuffle_tail
            (kernels/shuffle_tail.py, the launch option fuse_tail)
  3x3       every launch config of the 3x3 kernel at F = 64, listed or candidate, timed by Triton's
            autotuner on the launches a group of 2 blocks makes: forward and input gradient at 16x48x48, and the
            in-place inference forward at 1x270x480 (the default config is the first listed)
  wgrad     every weight-gradient config, listed or candidate (gemm.WEIGHT_GRAD_CANDIDATES), timed
            the same way on one block's and a group's weight-gradient launches at 16x48x48, at 256,
            512 and 1024 programs a launch

Writes <out>/profile.json (every kernel: name, calls, total and mean us per step) and prints the
top kernels of each case.

    python bench/profile_kernels.py OUTDIR [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: sets TRITON_INTERPRET for --smoke)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastdrn  # noqa: E402
from fastdrn import ops, reference  # noqa: E402


def kernel_table(prof, steps: int) -> list[dict]:
    """Device-side kernels of the profile, summed by name, per step, largest first. User annotations
    on the device timeline (the optimizer's "Optimizer.step#Adam.step" spans its own kernels) are
    not kernels: counted, they added 0.47 ms to a training step at cc8f6fb."""
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    rows = [dict(kernel=name, calls_per_step=calls / steps, us_per_step=us / steps, mean_us=us / calls)
            for name, (calls, us) in totals.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def profile(fn, steps: int, device) -> list[dict]:
    for _ in range(3):  # compile, autotune, allocator warm-up
        fn()
    common.sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        common.sync(device)
    table = kernel_table(prof, steps)
    if device.type == "cuda" and not table:  # no device events: show what the profiler did see
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))
    return table


def save(result: dict, out: str) -> None:
    """profile.json with the cases measured so far (a time limit that stops the script keeps them),
    written to a temporary name and renamed."""
    path = os.path.join(out, "profile.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def graph_replay_us(fn) -> float:
    """fn's mean time in microseconds, captured once in a CUDA graph (after warm-up on a side stream)
    and replayed 200 times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 200
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def captured_launches(module, kernels, run, key) -> list[tuple]:
    """The launches of `kernels` that run() makes through module.launch, as (autotuner, grid,
    arguments): the first of each key(autotuner, arguments). Launch plans are forgotten first: a
    plan's replay would not pass through module.launch."""
    from fastdrn.kernels._common import launch_settings

    seen, launches, real_launch = set(), [], module.launch

    def capture(kernel, tuned, grid, interpreter, **args):
        if kernel in kernels and key(tuned, args) not in seen:
            seen.add(key(tuned, args))
            launches.append((tuned, grid, dict(args)))
        real_launch(kernel, tuned, grid, interpreter, **args)

    module.launch = capture
    try:
        with launch_settings():
            run()
    finally:
        module.launch = real_launch
    return launches


def conv3x3_launches(run) -> list[tuple]:
    """The 3x3 kernel's launches that run() makes: the first of each pass (forward or input
    gradient: EPI1), autotuner (in place or not) and size M."""
    from fastdrn.kernels import residual_distill as rd

    return captured_launches(rd, (rd.conv3x3_fused_kernel,), run, lambda tuned, args: (id(tuned), args["EPI1"], args["M"]))


def config_timings(launches, key_names, configs_for, autotuner_for) -> list[dict]:
    """Each launch autotuned over configs_for(listed autotuner, arguments) (its list and the
    candidates beside it) by autotuner_for(configs, arguments): Triton's do_bench median per config,
    the default first. Rows keyed by the launch's arguments named in key_names and its autotuner's keys."""
    from fastdrn.kernels._common import KERNELS_INTERPRETED
    from fastdrn.kernels.registry import config_label

    rows = []
    for listed, grid, args in launches:
        key = {name: args[name] for name in (*key_names, *listed.keys) if name in args}
        if KERNELS_INTERPRETED:  # nothing autotunes under the interpreter
            rows.append({"key": key, "timings_us": {}})
            continue
        tuned = autotuner_for(configs_for(listed, args), args)
        try:
            tuned[grid](**args)
        except Exception as error:  # noqa: BLE001 - a config that fails is a result: recorded, and on
            rows.append({"key": key, "timings_us": {}, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        timings = {}
        for config, ms in getattr(tuned, "configs_timings", {}).items():
            timings[config_label(config)] = 1000 * (ms[0] if isinstance(ms, (list, tuple)) else ms)
        rows.append({"key": key, "timings_us": timings, "default": next(iter(timings), None)})
    return rows


def conv3x3_config_timings(launches) -> list[dict]:
    """The 3x3 launches over their list and CONV3X3_CANDIDATES (16-bit)."""
    from fastdrn.kernels import residual_distill as rd

    def configs_for(listed, args):
        sixteen_bit = args["x_ptr"].dtype in (torch.bfloat16, torch.float16)
        return [*listed.configs, *(rd.CONV3X3_CANDIDATES.get(args["BLOCK_F"], []) if sixteen_bit else [])]

    def autotuner_for(configs, args):
        return rd.conv3x3_autotuner(configs, args["out_ptr"] is args["res_ptr"])

    rows = config_timings(launches, ("M", "HAS_NEXT", "SAVE_MID"), configs_for, autotuner_for)
    for row, (_listed, _grid, args) in zip(rows, launches):
        row["key"]["in_place"] = args["out_ptr"] is args["res_ptr"]
    return rows


def weight_grad_config_timings(launches, programs: int) -> list[dict]:
    """The weight-gradient launches over their list and, where 16-bit with aligned rows,
    gemm.WEIGHT_GRAD_CANDIDATES; each row says how many programs a launch aimed at."""
    from fastdrn.kernels import gemm

    def configs_for(listed, args):
        aligned = args["g0_ptr"].dtype in (torch.bfloat16, torch.float16) and args["ROW_ALIGN"] > 1
        return [*listed.configs, *(gemm.WEIGHT_GRAD_CANDIDATES if aligned else [])]

    def autotuner_for(configs, args):
        return gemm.weight_grad_autotuner(configs, args["PROBLEMS"] > 3)

    rows = config_timings(launches, ("M", "PROBLEMS", "rows_per_split"), configs_for, autotuner_for)
    for row in rows:
        row["key"]["programs_aimed_at"] = programs
    return rows


def print_config_rows(rows) -> None:
    for row in rows:
        key = ",".join(f"{k}={v}" for k, v in row["key"].items())
        timings = row["timings_us"]
        best = min(timings, key=timings.get) if timings else None
        print(f"  {key}: default {timings.get(row.get('default'), float('nan')):.1f} us, best "
              f"{timings.get(best, float('nan')):.1f} us ({best}){' ' + row['error'] if 'error' in row else ''}")


CASES = ("train", "infer", "block", "group", "rdb", "upsampler", "tail", "3x3", "wgrad")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (interpreter): checks the script only")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {', '.join(CASES)} (default: all, in that order)")
    args = p.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)} (known: {', '.join(CASES)})")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cuda = device.type == "cuda"
    small = dict(n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4) if args.smoke else {}
    n, h, w = (2, 6, 6) if args.smoke else (16, 48, 48)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)
    torch.manual_seed(0)
    result = {"env": common.environment(device), "cases": {}}

    model = fastdrn.DRN(scale=4, **small).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    lr_img = torch.rand(n, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    hr_img = torch.rand(n, 3, 4 * h, 4 * w, device=device).contiguous(memory_format=torch.channels_last)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            loss = F.l1_loss(model(lr_img), hr_img)
        loss.backward()
        opt.step()

    ih, iw = (6, 6) if args.smoke else (270, 480)
    big = torch.rand(1, 3, ih, iw, device=device).contiguous(memory_format=torch.channels_last)

    def infer():
        with torch.no_grad(), torch.autocast(**amp):
            model(big)

    for name, fn in (("train", train_step), ("infer", infer)):
        if name not in cases:
            continue
        t0 = time.perf_counter()
        table = profile(fn, 1 if args.smoke else 3, device)
        total = sum(r["us_per_step"] for r in table)
        result["cases"][name] = {"kernel_us_per_step": total, "kernels": table}
        save(result, args.out)
        print(f"\n== {name}: {total / 1000:.3f} ms of kernel time a step, {len(table)} kernels "
              f"({time.perf_counter() - t0:.0f} s)")
        for r in table[:14]:
            print(f"  {r['us_per_step']:9.1f} us  {r['calls_per_step']:6.1f} calls  {r['mean_us']:8.2f} us/call  "
                  f"{r['kernel'][:90]}")

    # One block, forward + backward, replayed from a CUDA graph.
    dtype = torch.bfloat16 if cuda else torch.float32
    for d_in in () if "block" not in cases else (8,) if args.smoke else (64, 136):
        inner, distill = (8, 4) if args.smoke else (64, 8)
        z = torch.randn(n, d_in, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        z.requires_grad_(True)
        weights = [torch.randn(s, device=device, dtype=dtype) * 0.1 for s in
                   ((inner, d_in, 1, 1), (inner,), (inner, inner, 3, 3), (inner,), (d_in + distill, inner, 1, 1),
                    (d_in + distill,))]
        for t in weights:
            t.requires_grad_(True)
        dy = torch.randn(n, d_in + distill, h, w, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)

        # autograd.grad, not backward: accumulating into .grad would add 7 elementwise kernels (11.5 us
        # on an H200 at cc8f6fb) that a training step, which zeroes its gradients, does not run.
        def block():
            out = ops.residual_distill(z, *weights, alpha=0.2)
            torch.autograd.grad(out, [z, *weights], dy)

        label = f"block D{d_in} F{inner}"
        table = profile(block, 1 if args.smoke else 5, device)
        entry = {"kernel_us_per_step": sum(r["us_per_step"] for r in table), "kernels": table}
        if cuda:
            entry["graph_replay_us"] = graph_replay_us(block)
        result["cases"][label] = entry
        save(result, args.out)
        print(f"\n== {label}: kernels {entry['kernel_us_per_step']:.1f} us; graph replay "
              f"{entry.get('graph_replay_us', float('nan')):.1f} us (target 60)")
        for r in table[:10]:
            print(f"  {r['us_per_step']:9.1f} us  {r['calls_per_step']:6.1f} calls  {r['kernel'][:90]}")

    # A group of blocks (D = 64 growing to 136, F = 64) forward + backward, without and with the
    # backward fold, and with the fold at more weight-gradient programs a launch: a bench-only
    # experiment on the module constant (launch_settings forgets the plans and kernels that hold it).
    from fastdrn.kernels import gemm
    from fastdrn.kernels._common import launch_settings

    n_blocks, inner, distill, c = (3, 8, 4, 8) if args.smoke else (9, 64, 8, 64)
    y = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)
    blocks = []
    for k in range(n_blocks):
        d_in = c + k * distill
        blocks.append([torch.randn(s, device=device, dtype=dtype).mul_(0.1).requires_grad_(True) for s in
                       ((inner, d_in, 1, 1), (inner,), (inner, inner, 3, 3), (inner,), (d_in + distill, inner, 1, 1),
                        (d_in + distill,))])
    leaves = [y, *(t for block in blocks for t in block)]
    dy = torch.randn(n, c + n_blocks * distill, h, w, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)

    def group():
        torch.autograd.grad(ops.distill_group(y, blocks), leaves, dy)

    listed_programs = gemm.WEIGHT_GRAD_TILES_PROGRAMS
    settings = ((False, listed_programs), (True, listed_programs), (True, 512), (True, 1024))
    for fold, programs in settings if "group" in cases else ():
        label = (f"group of {n_blocks} blocks F{inner}, {'fold_backward' if fold else 'unfolded'}, "
                 f"{programs} weight-gradient programs")
        gemm.WEIGHT_GRAD_TILES_PROGRAMS = programs
        try:
            with launch_settings(fold_backward=fold):
                table = profile(group, 1 if args.smoke else 5, device)
                entry = {"kernel_us_per_step": sum(r["us_per_step"] for r in table), "kernels": table,
                         "launches": sum(r["calls_per_step"] for r in table)}
                if cuda:
                    entry["graph_replay_us"] = graph_replay_us(group)
        finally:
            gemm.WEIGHT_GRAD_TILES_PROGRAMS = listed_programs
        result["cases"][label] = entry
        save(result, args.out)
        print(f"\n== {label}: kernels {entry['kernel_us_per_step']:.1f} us ({entry['launches']:.0f} launches); "
              f"graph replay {entry.get('graph_replay_us', float('nan')):.1f} us, "
              f"{entry.get('graph_replay_us', float('nan')) / n_blocks:.1f} us a block")
        for r in table[:8]:
            print(f"  {r['us_per_step']:9.1f} us  {r['calls_per_step']:6.1f} calls  {r['kernel'][:90]}")

    if "rdb" in cases:
        # One block's forward at the inference size, against the bf16 matrix peak of this run.
        t0 = time.perf_counter()
        rn, rh, rw = (1, 6, 6) if args.smoke else (1, 540, 960)
        d_in = c
        rz = torch.randn(rn, d_in, rh, rw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        rdb_weights = [t.detach() for t in blocks[0]]
        with torch.no_grad():
            forward_ms = common.time_fn(lambda: ops.residual_distill(rz, *rdb_weights, alpha=0.2), device)
        ceilings = common.measure_ceilings(device)
        tflops = rn * rh * rw * common.rdb_flop_per_pixel(d_in, inner, distill) / forward_ms / 1e9
        entry = {"size": [rn, rh, rw], "D": d_in, "F": inner, "d": distill, "forward_ms": forward_ms,
                 "tflops": tflops, "matmul_tflops": ceilings["matmul_tflops"],
                 "fraction_of_matmul": tflops / ceilings["matmul_tflops"]}
        result["cases"][f"rdb forward {rn}x{rh}x{rw} D{d_in} F{inner}"] = entry
        save(result, args.out)
        print(f"\n== rdb forward {rn}x{rh}x{rw} D{d_in} F{inner}: {forward_ms * 1000:.1f} us, {tflops:.1f} TFLOP/s, "
              f"{100 * entry['fraction_of_matmul']:.0f}% of the {ceilings['matmul_tflops']:.0f} TFLOP/s bf16 matrix "
              f"product (target 50%) ({time.perf_counter() - t0:.0f} s)")

    # The upsampler conv's input and weights, at the inference size (the upsampler and tail cases).
    un, uh, uw = (1, 6, 6) if args.smoke else (1, 270, 480)
    up_y = torch.randn(un, c, uh, uw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    up_w = (torch.randn(16 * c, c, 3, 3, device=device, dtype=dtype) * 0.05).contiguous(
        memory_format=torch.channels_last)
    up_b = torch.randn(16 * c, device=device, dtype=dtype)
    if "upsampler" in cases:
        # The upsampler conv's bias (C -> 16C channels, x4): added by PyTorch after cuDNN as a separate
        # broadcast, then the shuffle; or added by the shuffle's gather (ops._pixel_shuffle_bias, which
        # fastdrn.DRN does not use until this case has timed both on a GPU).
        t0 = time.perf_counter()

        def conv_bias_then_shuffle():
            return ops.pixel_shuffle(F.conv2d(up_y, up_w, up_b, padding=1), 4)

        def shuffle_adds_bias():
            return ops._pixel_shuffle_bias(F.conv2d(up_y, up_w, None, padding=1), up_b, 4)

        with torch.no_grad():
            separate_ms = common.time_fn(conv_bias_then_shuffle, device)
            fused_ms = common.time_fn(shuffle_adds_bias, device)
            max_difference = (conv_bias_then_shuffle().float() - shuffle_adds_bias().float()).abs().max().item()
        label = f"upsampler bias {un}x{c}x{uh}x{uw} -> {16 * c} channels"
        result["cases"][label] = {"size": [un, c, uh, uw], "out_channels": 16 * c,
                                  "conv_bias_then_shuffle_us": separate_ms * 1000, "shuffle_adds_bias_us": fused_ms * 1000,
                                  "max_abs_difference": max_difference}
        save(result, args.out)
        print(f"\n== {label}: conv with bias then pixel_shuffle {separate_ms * 1000:.1f} us, conv then "
              f"_pixel_shuffle_bias {fused_ms * 1000:.1f} us (max |difference| {max_difference:.3g}) "
              f"({time.perf_counter() - t0:.0f} s)")

    if "tail" in cases:
        # The whole output stage after the upsampler's conv, x4 as fastdrn.DRN runs it under bf16 autocast
        # (mean float32, so the output is float32): today's conv with bias, ops.pixel_shuffle, the tail
        # conv with bias and + mean, against the conv without bias then shuffle_tail, one kernel for the
        # rest (the launch option fuse_tail, off until this case has timed both on a GPU).
        from fastdrn.kernels.shuffle_tail import shuffle_tail

        t0 = time.perf_counter()
        tail_w = (torch.randn(3, c, 3, 3, device=device, dtype=dtype) * 0.05).contiguous(memory_format=torch.channels_last)
        tail_b = torch.randn(3, device=device, dtype=dtype)
        mean = torch.tensor(reference.DIV2K_RGB_MEAN, device=device).view(1, 3, 1, 1)

        def tail_today():
            v = ops.pixel_shuffle(F.conv2d(up_y, up_w, up_b, padding=1), 4)
            return F.conv2d(v, tail_w, tail_b, padding=1) + mean

        def tail_fused():
            return shuffle_tail(F.conv2d(up_y, up_w, None, padding=1), up_b, tail_w, tail_b, mean, 4,
                                out_dtype=torch.float32, channels_last=True)

        with torch.no_grad():
            today_ms = common.time_fn(tail_today, device)
            fused_ms = common.time_fn(tail_fused, device)
            max_difference = (tail_today() - tail_fused()).abs().max().item()
        label = f"tail {un}x{c}x{uh}x{uw} x4 -> 3 colors"
        result["cases"][label] = {"size": [un, c, uh, uw], "scale": 4, "conv_shuffle_tail_us": today_ms * 1000,
                                  "conv_then_shuffle_tail_us": fused_ms * 1000, "max_abs_difference": max_difference}
        save(result, args.out)
        print(f"\n== {label}: conv with bias, pixel_shuffle, tail conv + mean {today_ms * 1000:.1f} us; conv then "
              f"shuffle_tail {fused_ms * 1000:.1f} us (max |difference| {max_difference:.3g}) "
              f"({time.perf_counter() - t0:.0f} s)")

    y2 = y[:, :c].detach().requires_grad_(True)  # a group's first block's input (the 3x3 and wgrad cases)
    if "3x3" in cases:
        # Every 3x3 config at DRN's width, on the launches the training and inference sizes make (the
        # larger pixel tiles are candidates: the first config stays the default until one wins here).
        t0 = time.perf_counter()
        pair = [[t.detach().requires_grad_(True) for t in block] for block in blocks[:2]]
        dy2 = dy[:, :c + 2 * distill].contiguous(memory_format=torch.channels_last)
        big_y = torch.randn(1, c, ih, iw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

        def two_blocks():
            torch.autograd.grad(ops.distill_group(y2, pair), [y2, *(t for b in pair for t in b)], dy2)
            with torch.no_grad():
                ops.distill_group(big_y, [[t.detach() for t in b] for b in pair])

        launches = conv3x3_launches(two_blocks)
        rows = conv3x3_config_timings(launches)
        result["cases"][f"3x3 configs F{inner}"] = {"launches": rows}
        save(result, args.out)
        print(f"\n== 3x3 configs, F = {inner}: {len(rows)} launches timed ({time.perf_counter() - t0:.0f} s)")
        print_config_rows(rows)

    if "wgrad" in cases:
        # Every weight-gradient config, listed or candidate, on the launches one block's backward (3
        # problems) and a group's (three blocks' 9 a launch) make, at each number of programs a launch
        # aims at: which tile, pipeline depth and grid fill the SMs best (gemm.WEIGHT_GRAD_CANDIDATES).
        t0 = time.perf_counter()

        def one_block_and_group():
            block = [t.detach().requires_grad_(True) for t in blocks[0]]
            torch.autograd.grad(ops.residual_distill(y2, *block, alpha=0.2), [y2, *block],
                                dy[:, :c + distill].contiguous(memory_format=torch.channels_last))
            group()

        rows = []
        for programs in (listed_programs,) if args.smoke else (listed_programs, 512, 1024):  # smoke: the path, once
            gemm.WEIGHT_GRAD_TILES_PROGRAMS = programs
            try:
                launches = captured_launches(gemm, (gemm.weight_grad_tiles_kernel, gemm.weight_grad_blocks_kernel),
                                             one_block_and_group, lambda tuned, a: (id(tuned), a["PROBLEMS"], a["M"]))
                rows += weight_grad_config_timings(launches, programs)
            finally:
                gemm.WEIGHT_GRAD_TILES_PROGRAMS = listed_programs
            result["cases"]["weight-gradient configs"] = {"launches": rows}
            save(result, args.out)
        print(f"\n== weight-gradient configs: {len(rows)} launches timed ({time.perf_counter() - t0:.0f} s)")
        print_config_rows(rows)


if __name__ == "__main__":
    main()
