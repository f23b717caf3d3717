"""Localize a GPU-only fault or wrong result of residual_distill: one subprocess per (case, dtype,
lean launch path on/off), each under CUDA_LAUNCH_BLOCKING=1 with every launch logged, so that a
fault names the kernel that raised it.

    python3 bench/gpu_debug.py OUT_DIR [--jobs 14]
Writes OUT_DIR/debug.jsonl, one row per run, and prints a table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

CASES = {  # as tests/test_residual_distill.py CASES
    "case0": (1, 64, 64, 8, 5, 13, True),
    "case1": (3, 72, 64, 8, 1, 5, False),
    "case2": (1, 136, 64, 3, 13, 1, True),
    "case3": (2, 328, 64, 8, 3, 5, False),
    "case5": (2, 24, 16, 5, 6, 7, False),
    "big": (4, 64, 64, 8, 48, 48, True),
    "splits0": (2, 72, 64, 8, 9, 11, True),  # test_weight_gradient_splits_and_row_alignment
}


def child(case_name: str, dtype_name: str, lean: bool) -> dict:
    import torch

    import fastdrn.kernels._common as common
    import fastdrn.kernels.gemm as gemm
    import fastdrn.kernels.residual_distill as rd
    from fastdrn import ops, reference

    if not lean:
        common.LeanLauncher.keep = lambda *args, **kwargs: None
    trace: list[str] = []
    original = common.launch

    def logged(kernel, tuned, grid, interpreter, **args):
        trace.append(getattr(kernel, "__name__", str(kernel)))
        original(kernel, tuned, grid, interpreter, **args)
        torch.cuda.synchronize()

    gemm.launch = rd.launch = logged
    dtype = getattr(torch, dtype_name)
    n, d_in, inner, distill, h, w, channels_last = CASES[case_name]
    torch.manual_seed(1)
    z = torch.randn(n, d_in, h, w, device="cuda", dtype=dtype)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    block = reference.ResidualDistillBlock(d_in, inner, distill, 0.2)
    with torch.no_grad():
        for conv in (block.squeeze, block.conv, block.expand):
            conv.bias.normal_(0.0, 0.3)
    params = [p.detach().to("cuda", dtype) for p in (block.squeeze.weight, block.squeeze.bias, block.conv.weight,
                                                     block.conv.bias, block.expand.weight, block.expand.bias)]
    inputs = [t.clone().requires_grad_() for t in [z, *params]]
    row = {"trace": trace}
    try:
        out = ops.residual_distill(*inputs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
        ref_in = [t.detach().double().requires_grad_() for t in inputs]
        ref = reference.residual_distill(*ref_in)
        ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
        eager_in = [t.detach().requires_grad_() for t in inputs]
        eager = reference.residual_distill(*eager_in)
        eager_grads = torch.autograd.grad(eager, eager_in, grad_out)

        def err(a, b):
            a, b = a.detach().double(), b.detach().double()
            return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()

        names = ("z", "w_squeeze", "b_squeeze", "w_conv", "b_conv", "w_expand", "b_expand")
        row["out"] = err(out, ref)
        row["grads"] = {nm: err(g, r) for nm, g, r in zip(names, grads, ref_grads)}
        row["eager_grads"] = {nm: err(g, r) for nm, g, r in zip(names, eager_grads, ref_grads)}
        # In-place group path over two blocks, against chaining the op.
        blocks = [tuple(params), tuple(p.detach().to("cuda", dtype) for p in (
            lambda b2: (b2.squeeze.weight, b2.squeeze.bias, b2.conv.weight, b2.conv.bias, b2.expand.weight,
                        b2.expand.bias))(reference.ResidualDistillBlock(d_in + distill, inner, distill, 0.2)))]
        with torch.no_grad():
            in_place = ops.distill_group(z, blocks)
            chained = z
            for blk in blocks:
                chained = reference.residual_distill(chained.double(), *[t.double() for t in blk])
        row["group"] = err(in_place, chained)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported
        row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, dtype, lean = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
        print("ROW " + json.dumps(child(case, dtype, lean)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--jobs", type=int, default=14)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--lean-both", action="store_true", help="also without the lean launch path")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = [(c, dt, lean) for c in args.cases.split(",") for dt in args.dtypes.split(",")
            for lean in ((True, False) if args.lean_both else (True,))]

    def run(spec):
        case, dtype, lean = spec
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", FASTDRN_AUTOTUNE="0")
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", case, dtype, "1" if lean else "0"],
                                  env=env, capture_output=True, text=True, timeout=240)
            text = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            text = "TIMEOUT"
        found = [line[4:] for line in text.splitlines() if line.startswith("ROW ")]
        row = json.loads(found[0]) if found else {"status": "no row: " + text[-400:]}
        row.update(case=case, dtype=dtype, lean=lean,
                   warps=os.environ.get("FASTDRN_NUM_WARPS", ""))
        return row

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, \
            open(os.path.join(args.out, "debug.jsonl"), "a") as sink:
        for row in pool.map(run, runs):
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            worst = max(row.get("grads", {}).items(), key=lambda kv: kv[1], default=("-", 0))
            last = row["trace"][-1] if row.get("trace") else "-"
            print(f"{row['case']:7} {row['dtype']:8} lean={int(row['lean'])} "
                  f"{row['status'][:60]:60} out={row.get('out', 0):.1e} worst d{worst[0]}={worst[1]:.1e} "
                  f"group={row.get('group', 0):.1e} last={last}", flush=True)


if __name__ == "__main__":
    main()
