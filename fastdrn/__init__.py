"""fastdrn: fused Triton / CUDA kernels for DRN, "Distilling with Residual Network" super-resolution
(Sun, Lu, Wang, Bai, ICME 2019). Importing it never touches a device."""
from . import backend, ops, reference

__version__ = "0.1.0"

__all__ = ["backend", "ops", "reference"]
