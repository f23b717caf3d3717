"""What the tests share: the tolerance table of SPEC.md section 4 and the error measure."""
from __future__ import annotations

import torch

from fastdrn.backend import interpreting

# (forward, gradient) relative Frobenius error against the float64 reference, SPEC.md section 4.
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


def randn(*shape, dtype, device, scale: float = 1.0, channels_last: bool = False, requires_grad: bool = False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def float64_leaves(*tensors):
    """Detached float64 copies that require grad: the inputs of the reference computation."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def model_grad_tolerance(dtype: torch.dtype, tol: float, eager_err: float) -> float:
    """A whole model's parameter-gradient bound in 16-bit storage: SPEC.md section 4's, or 1.25x
    the error of the eager reference in the same dtype where that is already beyond it. 16-bit
    gradients through many layers pile up every layer's rounding (eager float16 is 4.5e-2 off float64
    for DRN's squeeze weights on the CPU); the per-op contract covers each op, not the pile-up, so
    at model level fastdrn is held to eager PyTorch's own error. Float32 and float64 keep `tol`."""
    if dtype in (torch.float16, torch.bfloat16):
        return max(tol, 1.25 * eager_err)
    return tol
