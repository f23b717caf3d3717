"""Which launch config each autotuned kernel picks on this GPU, per shape, with every candidate's time.

The benchmarks and the GPU tests run FASTDRN_AUTOTUNE=0 (each kernel at its first listed config) so
that their compiles stay bounded. This sweep runs one residual distilling block's forward and
backward, and the in-place inference group, with autotuning on over the training and inference
sizes, then reads every autotuner fastdrn holds: for each key it tuned, the config it chose and the
time Triton's autotuner measured for each candidate. A default that loses where it matters shows
up as a row whose `best` is not `configs[0]`.

    python bench/autotune_sweep.py --out autotune.jsonl [--smoke]

Under the interpreter (--smoke, or no GPU) nothing autotunes: the script runs its cases at tiny
sizes and writes no rows, which checks the script alone.
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
import triton  # noqa: E402

from fastdrn import ops  # noqa: E402
from fastdrn.kernels import compress_skip as compress_skip_kernels  # noqa: E402
from fastdrn.kernels import gemm, residual_distill, set_launch_options  # noqa: E402
from fastdrn.kernels.registry import config_label  # noqa: E402

# (N, H, W, D, F, d): DRN's training patches and its inference sizes, at the paper's widths.
CASES = [(16, 48, 48, d_in, inner, 8) for d_in in (64, 136) for inner in (64, 256)]
CASES += [(1, 270, 480, d_in, inner, 8) for d_in in (64, 136) for inner in (64, 256)]
SMOKE_CASES = [(2, 5, 6, 8, 16, 4)]


def autotuners() -> list[tuple[str, object]]:
    """Every autotuner of fastdrn's kernels, named by module and attribute (and dict key)."""
    found = []
    for module in (gemm, residual_distill, compress_skip_kernels):
        for name, value in sorted(vars(module).items()):
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            for key, tuner in entries:
                if isinstance(tuner, triton.runtime.autotuner.Autotuner):
                    label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}" + ("" if key is None else f"[{key}]")
                    found.append((label, tuner))
    return found


def run_case(case, dtype, device) -> None:
    n, h, w, d_in, inner, distill = case
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)
    z = rand(n, d_in, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    block = [rand(inner, d_in, 1, 1, scale=d_in ** -0.5), rand(inner, scale=0.1),
             rand(inner, inner, 3, 3, scale=(9 * inner) ** -0.5), rand(inner, scale=0.1),
             rand(d_in + distill, inner, 1, 1, scale=inner ** -0.5), rand(d_in + distill, scale=0.1)]
    block = [t.requires_grad_() for t in block]
    out = ops.residual_distill(z, *block)
    torch.autograd.backward(out, torch.randn_like(out), inputs=[z, *block])
    next_block = [rand(inner, d_in + distill, 1, 1, scale=(d_in + distill) ** -0.5), rand(inner, scale=0.1),
                  rand(inner, inner, 3, 3, scale=(9 * inner) ** -0.5), rand(inner, scale=0.1),
                  rand(d_in + 2 * distill, inner, 1, 1, scale=inner ** -0.5), rand(d_in + 2 * distill, scale=0.1)]
    with torch.no_grad():
        ops.distill_group(z.detach(), [[t.detach() for t in block], next_block])
    common.sync(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON Lines file the rows are appended to")
    p.add_argument("--smoke", action="store_true", help="tiny sizes through the interpreter: checks the script only")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting cases after this many seconds")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    set_launch_options(num_warps=None, autotune=True)
    env = common.environment(device)
    start = time.perf_counter()
    for case in SMOKE_CASES if args.smoke else CASES:
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            print(f"time budget spent: stopped before {case}")
            break
        t0 = time.perf_counter()
        run_case(case, dtype, device)
        print(f"case N,H,W,D,F,d = {case}: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for label, tuner in autotuners():
        timings = getattr(tuner, "configs_timings", None) or {}
        last_key = next(reversed(tuner.cache), None)
        for key, best in tuner.cache.items():
            rows.append({"kernel": label, "key": [str(k) for k in key], "key_names": list(tuner.keys),
                         "best": config_label(best), "default": config_label(tuner.configs[0]),
                         "best_is_default": best is tuner.configs[0],
                         # Triton keeps the timings of the last key it tuned only
                         "timings_ms_of_last_key": {config_label(c): t for c, t in timings.items()}
                         if key == last_key else None,
                         "dtype": str(dtype).removeprefix("torch."), "env": env})
    with open(args.out, "a") as sink:
        for row in rows:
            sink.write(json.dumps(row, default=str) + "\n")
    print(f"{len(rows)} tuned keys -> {args.out}" + ("" if rows else " (nothing autotunes under the interpreter)"))
    for row in rows:
        mark = "" if row["best_is_default"] else "   <- not the default"
        print(f"  {row['kernel']:40} {','.join(row['key'])[:60]:60} best {row['best']}{mark}")


if __name__ == "__main__":
    main()
