"""Host cost of a fastdrn.DRN training step, measurable without a GPU.

    python bench/host_launches.py [--scale 4] [--autocast] [--small] [--reps 5]

Runs forward, L1 loss and backward on CPU tensors with every Triton launch replaced by a counter
(TRITON_INTERPRET=1 so the ops take the Triton path; no kernel body runs), and reports:
  - host time per step (min and median of --reps rounds of 5 steps): what a GPU would wait on
    when the step is launch-bound;
  - kernel launches per step: the Triton launches counted, plus the aten primitives that launch a
    kernel on a GPU (copies, sums, fills, convolutions...), counted with torch.profiler.
Not a GPU timing: the image is tiny so that the host cost is all there is. The counts are exact;
the times depend on this machine's CPU and load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before fastdrn's kernels are imported

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fastdrn  # noqa: E402
from fastdrn.kernels import gemm, residual_distill  # noqa: E402

# aten primitives that launch a kernel on a GPU (composites such as clone or _to_copy end in copy_).
LAUNCHING = {"aten::copy_", "aten::sum", "aten::cat", "aten::add", "aten::add_", "aten::mul", "aten::mul_",
             "aten::fill_", "aten::zero_", "aten::sub", "aten::div", "aten::abs", "aten::sgn", "aten::sign",
             "aten::neg", "aten::mean", "aten::convolution", "aten::convolution_backward", "aten::flip",
             "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::elu", "aten::elu_backward", "aten::where"}
SMALL = dict(n_feats=16, n_groups=2, n_blocks=3, inner=16, distill=4)


class LaunchCounter:
    """Stands in for the launchers' Triton calls: counts them, runs nothing."""

    def __init__(self):
        self.count = 0

    def launch(self, kernel, tuned, grid, interpreter, **args):
        self.count += 1

    def wrap_triton(self, kernel):
        counter = self

        class Launchable:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    counter.count += 1
                return run
        return Launchable()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast, as training scripts use it")
    p.add_argument("--small", action="store_true", help="the small DRN of the tests instead of the paper's")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    counter = LaunchCounter()
    gemm.launch = residual_distill.launch = counter.launch
    gemm.wrap_triton = counter.wrap_triton
    torch.manual_seed(0)
    model = fastdrn.DRN(scale=args.scale, **(SMALL if args.small else {}))
    x = torch.rand(1, 3, 4, 4)
    y = torch.rand(1, 3, 4 * args.scale, 4 * args.scale)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            out = model(x)
        torch.nn.functional.l1_loss(out.float(), y).backward()
        for param in model.parameters():
            param.grad = None

    for _ in range(3):
        step()
    rounds = []
    for _ in range(args.reps):
        start = time.perf_counter()
        for _ in range(5):
            step()
        rounds.append((time.perf_counter() - start) / 5)
    counter.count = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    aten = sum(1 for e in prof.events() if e.name in LAUNCHING)
    label = f"DRN x{args.scale}{' (small)' if args.small else ''}, {'bf16 autocast' if args.autocast else 'fp32'}"
    print(f"{label}: host {min(rounds) * 1e3:.1f} ms min, {statistics.median(rounds) * 1e3:.1f} ms median per "
          f"step; launches per step {counter.count + aten} ({counter.count} Triton + {aten} aten)")


if __name__ == "__main__":
    main()
