"""What the tests share: the tolerance table of docs/numerics.md and the error measure."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
from statistics import median

import pytest
import torch

from fastdrn.backend import interpreting

# (forward, gradient) relative Frobenius error against the float64 reference, docs/numerics.md.
TOLERANCES = {
    ("interpreter", torch.float64): (1e-12, 1e-10),
    ("interpreter", torch.float32): (1e-5, 1e-5),
    ("gpu", torch.float32): (2e-3, 5e-3),   # TF32 matrix units
    ("gpu", torch.bfloat16): (2e-2, 3e-2),
    ("gpu", torch.float16): (2e-2, 3e-2),
}


def where(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" and not interpreting() else "interpreter"


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    return [dt for (place, dt) in TOLERANCES if place == where(device)]


def tolerance(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[(where(device), dtype)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN or Inf that ref does not."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


@contextlib.contextmanager
def pytorch_fp32_convs():
    """PyTorch's own float32 convolutions in float32, not TF32, for the block of a model check.

    fastdrn.DRN runs its head, upsample and tail through cuDNN, which uses TF32 by default; TF32
    moves their outputs by ~1e-3, enough to flip ELU derivatives downstream (measured on an H100:
    one squeeze weight's gradient 5.9e-3 from float64 against the 5e-3 tolerance). fastdrn's fused
    kernels run 3xTF32 whatever this flag says, so with it off the check measures fastdrn's error.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def launch_settings(**changes):
    """fastdrn.kernels._common.launch_settings, imported at the call: importing helpers imports no kernel."""
    from fastdrn.kernels._common import launch_settings as settings

    return settings(**changes)


def randn(*shape, dtype, device, scale: float = 1.0, channels_last: bool = False, requires_grad: bool = False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def float64_leaves(*tensors):
    """Detached float64 copies that require grad: the inputs of the reference computation."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Draws of fresh random inputs behind one 16-bit gradient check (see assert_op_grads_close).
DRAWS_16BIT = 8


def draws(dtype, draw) -> list:
    """draw() called once, or DRAWS_16BIT times in 16-bit (fresh random inputs each)."""
    return [draw() for _ in range(DRAWS_16BIT if dtype in SIXTEEN_BIT else 1)]


def assert_op_grads_close(dtype, tol, draw, names, what):
    """One op's gradients against float64, every input and weight. draw() makes fresh random
    inputs, runs its own checks and returns (grads, eager_grads, ref_grads): fastdrn's, eager
    PyTorch's in the same dtype, and float64's. names: one per gradient, or None for "leaf i".

    Float32 and float64: one draw, each gradient within `tol` (docs/numerics.md's table).

    16-bit: DRAWS_16BIT draws; for each tensor the median error over the draws within
    max(tol, 2x eager PyTorch's median over the same draws). Why: a weight behind an ELU sums over
    pixels whose ELU derivative (1 or alpha) flips when a rounded 16-bit pre-activation crosses 0, and
    on these small shapes one flip moves the sum by percent. Which pixels flip differs between any
    two implementations, so one draw's error is noise: measured on an H200 at f06ae9a (12 draws of
    each shape of tests/test_residual_distill.py), a single draw of fastdrn's dW_squeeze,
    db_squeeze, dW_conv or db_conv was up to 19x eager's on the same draw in bf16 (72x in fp16) and
    up to 5.3e-2 from float64, eager's own up to 1.7e-1; the bf16 means over the draws were 4.4e-3
    to 1.4e-2 for fastdrn and 2.7e-3 to 2.8e-2 for eager, z and the expand weights under 3e-3 for
    both (fp16: all lower). A mean over 8 draws still carries the flips: at cc8f6fb three group tests
    (30 pixels) missed it by 0.3% to 1.2%, their worst draws 8.2e-2 to 1.9e-1. The median leaves the
    rare flip out, and a wrong gradient, wrong on every draw, still moves it.
    """
    results = draws(dtype, draw)
    if names is None:
        names = [f"leaf {i} {tuple(g.shape)}" for i, g in enumerate(results[0][0])]
    if dtype not in SIXTEEN_BIT:
        for name, g, rg in zip(names, results[0][0], results[0][2]):
            assert_close(g, rg, tol, f"{what} d{name}")
        return
    _assert_median_errors(results, tol, [f"d{name}" for name in names], what)


def _assert_median_errors(results, tol, names, what):
    """For each tensor: finite wherever the reference is, on every draw (a NaN fails at any
    tolerance, and a median would hide one draw's); its median error over the draws within
    max(tol, 2x eager's median)."""
    for i, name in enumerate(names):
        errs = [rel_err(grads[i], ref_grads[i]) for grads, _, ref_grads in results]
        bad = [k for k, e in enumerate(errs) if not math.isfinite(e)]
        assert not bad, f"{what} {name}: NaN or Inf where the reference is finite, on draw(s) {bad}"
        eager_errs = [rel_err(eager_grads[i], ref_grads[i]) for _, eager_grads, ref_grads in results]
        bound = max(tol, 2 * median(eager_errs))
        assert median(errs) <= bound, (
            f"{what} {name}: median relative error over {len(errs)} draws {median(errs):.3e} > {bound:.2e} "
            f"(draws: {', '.join(f'{e:.1e}' for e in errs)}; eager: {', '.join(f'{e:.1e}' for e in eager_errs)})")


def assert_model_grads_close(dtype, tol, draw, names, what):
    """A whole model's parameter gradients against float64. draw() makes fresh random inputs, runs
    its own checks and returns (grads, eager_grads, ref_grads) as assert_op_grads_close's does.

    Float32 and float64: one draw, every parameter's gradient within `tol` (docs/numerics.md).

    16-bit: DRAWS_16BIT draws. ELU's derivative jumps from 1 to alpha at 0, so a pre-activation that
    rounds across 0 flips it, and one flip among thousands of values moves a parameter's gradient by
    up to ~0.2 on these tiny images. Measured (fp16 autocast, interpreter, the small DRN of
    tests/test_model.py, 40 seeds): the worst parameter is 1.3e-3 to 0.12 off for fastdrn and 1.9e-3
    to 0.13 for eager PyTorch, by seed; all gradients as one vector at most 4.9e-3 for fastdrn, 4.8e-3
    for eager; on an H200 (fp16, x3 at a 4x1 image) one squeeze bias of fastdrn 0.21 off on a draw
    where eager's worst parameter was 1.3e-3. So in 16-bit: on every draw all gradients as one
    vector within `tol` (the precision claim); each parameter's median error over the draws within
    max(0.1, 2x eager's median over the same draws), a guard against a wrong gradient (off by O(1) on
    every draw), not a precision claim.
    """
    flat = lambda gs: torch.cat([g.detach().double().flatten().cpu() for g in gs])  # noqa: E731
    results = draws(dtype, draw)
    for k, (grads, _, ref_grads) in enumerate(results):
        if dtype not in SIXTEEN_BIT:
            for name, g, rg in zip(names, grads, ref_grads):
                assert_close(g, rg, tol, f"{what} grad of {name}")
            return
        assert_close(flat(grads), flat(ref_grads), tol, f"{what} draw {k}: gradients of all parameters as one vector")
    _assert_median_errors(results, max(tol, 0.1), [f"grad of {name}" for name in names], what)


def run_bounded(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs), in a session of its own: past
    `timeout` seconds every process of it is killed and the test fails with what it printed.
    (subprocess.run kills only cmd itself: its children, a process pool or torchrun's workers, would
    live on, holding the CPU and their ports while the rest of the run goes on.)"""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))[:300]} did not finish within {timeout} s:\n{stdout[-3000:]}\n"
                    f"{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
