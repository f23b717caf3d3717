"""``fastdrn env``: what this installation runs on, and why, for a bug report or a first check.

Versions, the GPUs and their compute capabilities, which backend the fused ops take on each device
and dtype (and, where it is PyTorch's math, the reason), whether the pixel-shuffle extension runs
there, the launch settings in force and every fastdrn setting read from the environment. Nothing is
queried at import; `report` loads (and on first use builds) the extension unless told not to.
"""
from __future__ import annotations

import json
import os
import platform
import sys

import torch

# Every environment variable fastdrn reads (docs/numerics.md), and Triton's switch for its interpreter.
SETTINGS_VARIABLES = ("FASTDRN_BACKEND", "FASTDRN_NUM_WARPS", "FASTDRN_AUTOTUNE", "FASTDRN_WEIGHT_GRAD_BLOCKS",
                      "FASTDRN_FOLD_BACKWARD", "FASTDRN_FUSE_TAIL", "FASTDRN_LAUNCH_PLANS", "FASTDRN_CUDA_ARCH_LIST",
                      "FASTDRN_BUILD_EXT", "FASTDRN_BUILD_LOCK_TIMEOUT", "TORCH_CUDA_ARCH_LIST", "TRITON_INTERPRET")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_version() -> str:
    from fastdrn import backend

    if backend.TRITON_IMPORT_ERROR is not None:
        return f"not usable ({backend.TRITON_IMPORT_ERROR})"
    import triton

    return triton.__version__ + (" (interpreter: TRITON_INTERPRET=1)" if backend.interpreting() else "")


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"device": f"cuda:{index}", "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count})
    return gpus


def report(load_extension: bool = True) -> dict:
    """Everything `fastdrn env` prints, as a JSON-ready dict."""
    import fastdrn
    from fastdrn import backend, extension
    from fastdrn.kernels import settings

    gpus = _gpus()
    devices = ["cpu"] + [gpu["device"] for gpu in gpus]
    fused_ops = {device: {str(dtype).removeprefix("torch."): backend.describe(device, dtype) for dtype in DTYPES}
                 for device in devices}
    pixel_shuffle = None  # not loaded: loading builds it on first use
    if load_extension:
        pixel_shuffle = {device: extension.unavailable_reason(torch.device(device)) or "runs"
                         for device in devices}
    return {
        "fastdrn": f"{fastdrn.__version__} ({os.path.dirname(fastdrn.__file__)})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda else f"{torch.__version__} (CPU)",
        "triton": _triton_version(),
        "gpus": gpus,
        "backend_requested": backend.requested(),
        "fused_ops": fused_ops,
        "pixel_shuffle": pixel_shuffle,
        "launch_options": settings.launch_options().as_dict(),
        "launch_plans": settings.plans_enabled(),
        "environment": {name: os.environ[name] for name in SETTINGS_VARIABLES if name in os.environ},
    }


def format_report(info: dict) -> str:
    lines = [f"{key}: {info[key]}" for key in ("fastdrn", "python", "platform", "torch", "triton")]
    lines.append("GPUs: " + ("none visible to torch" if not info["gpus"] else ""))
    lines += [f"  {g['device']}: {g['name']}, compute capability {g['capability']}, {g['memory_gib']} GiB, "
              f"{g['sm_count']} SMs" for g in info["gpus"]]
    lines.append(f"fused ops (FASTDRN_BACKEND={info['backend_requested']}):")
    for device, by_dtype in info["fused_ops"].items():
        lines += [f"  {device} {dtype}: {described}" for dtype, described in by_dtype.items()]
    if info["pixel_shuffle"] is None:
        lines.append("pixel-shuffle extension: not loaded (--no-extension)")
    else:
        lines.append("pixel-shuffle extension (auto uses it for CUDA tensors; FASTDRN_BACKEND=triton for CPU ones too):")
        lines += [f"  {device}: {what}" for device, what in info["pixel_shuffle"].items()]
    options = ", ".join(f"{k}={v}" for k, v in info["launch_options"].items())
    lines.append(f"launch options: {options}; launch plans {'on' if info['launch_plans'] else 'off'}")
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in info["environment"].items()) or "no settings set"))
    return "\n".join(lines)


def main(as_json: bool = False, load_extension: bool = True) -> int:
    info = report(load_extension=load_extension)
    print(json.dumps(info, indent=2) if as_json else format_report(info))
    return 0
