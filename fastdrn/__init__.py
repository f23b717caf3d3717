"""fastdrn: fused Triton / CUDA kernels for DRN, "Distilling with Residual Network" super-resolution
(Sun, Lu, Wang, Bai, ICME 2019). Importing it never touches a device."""
from . import backend, ops, reference
from .model import DRN
from .graphs import make_train_step, make_upscaler

__version__ = "0.1.0"


def drn(scale: int, **overrides) -> DRN:
    """The paper's DRN (C = 64, G = 6, K = 9, F = 64, d = 8), fast."""
    return DRN(scale=scale, **overrides)


def drn_plus(scale: int, **overrides) -> DRN:
    """DRN+ (F = 256 inside each block), fast."""
    return DRN(scale=scale, **{"inner": 256, **overrides})


__all__ = ["DRN", "backend", "drn", "drn_plus", "make_train_step", "make_upscaler", "ops", "reference"]
