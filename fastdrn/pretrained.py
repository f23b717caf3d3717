"""Shipped weights by name (``drn-x2``, ``drn-x3``, ``drn-x4``, ``drn-plus-x*``) and :func:`load`.

A name resolves to a file in the package's ``weights/`` folder, ``NAME.safetensors`` or ``NAME.pt``
(a torch zip file that loads with ``weights_only=True``, so no optional package is needed): adding
such a file is all it takes to ship a model. The architecture is whatever the file holds, read from
its tensor shapes as for any checkpoint; only the scale is promised by the name. A name whose file
is absent is refused with a message that says so.

Shipped today: ``drn-x2``, ``drn-x3`` and ``drn-x4``, smaller DRNs (n_feats 32, 2 groups of 4
blocks, inner 32, distill 8) trained on a CPU on scikit-image's photographs, stored in float16.
They are to be replaced by the paper-size DRN trained on a GPU under the same names: a name always
means the best weights shipped for its scale. docs/weights.md is their model card (data, recipe,
commands, PSNR/SSIM); docs/architecture.md describes the formats.
"""
from __future__ import annotations

import os
import re

__all__ = ["NAMES", "WEIGHTS_DIR", "WEIGHT_SUFFIXES", "expected_config", "resolve", "load"]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHT_SUFFIXES = (".safetensors", ".pt")   # looked for in this order

# Every name fastdrn may ship, with what the name promises of its file's model (checked on load).
NAMES = {f"drn{kind}-x{s}": {"scale": s} for kind in ("", "-plus") for s in (2, 3, 4)}


def _is_name(text: str) -> bool:
    return re.fullmatch(r"drn(-plus)?-x\d+", text) is not None


def expected_config(name_or_path: str) -> dict:
    """What a shipped name promises of its model, its scale ({} for a path, an existing file included)."""
    text = os.fspath(name_or_path)
    return {} if os.path.exists(text) else dict(NAMES.get(text, {}))


def resolve(name_or_path: str) -> str:
    """The file behind a shipped weight name; any other string is returned as it is (a path).

    An existing file always wins over a name. A name with no file shipped raises a
    :class:`~fastdrn.tools.checkpoint.CheckpointError` saying so."""
    text = os.fspath(name_or_path)
    if os.path.exists(text) or not _is_name(text):
        return text
    from .tools.checkpoint import CheckpointError
    if text not in NAMES:
        raise CheckpointError(f"{text!r} is not a weight name fastdrn knows (names: {', '.join(NAMES)}) "
                              "and no such file exists")
    for suffix in WEIGHT_SUFFIXES:
        path = os.path.join(WEIGHTS_DIR, text + suffix)
        if os.path.isfile(path):
            return path
    from . import __version__
    raise CheckpointError(
        f"{text!r} names weights fastdrn will ship, but version {__version__} ships none yet "
        f"(no {text}{WEIGHT_SUFFIXES[0]} or {text}{WEIGHT_SUFFIXES[1]} in {WEIGHTS_DIR}). "
        "Train a model with `fastdrn train` and give the path of its checkpoint instead.")


def load(name_or_path: str | os.PathLike, *, device=None, key: str | None = None):
    """A ready ``fastdrn.DRN`` in eval mode, from a shipped weight name or a checkpoint file.

    The architecture (scale, n_feats, n_groups, n_blocks, inner, distill, n_colors) is read from the
    tensor shapes; alpha, rgb_range and rgb_mean from the checkpoint where it carries them, else the
    DRN defaults. Files read: a plain state_dict, BasicSR's ``{"params", "params_ema"}`` (the EMA
    weights when present, as BasicSR uses them for inference; ``key="params"`` takes the other and
    the choice is printed to standard error), wrappers (``state_dict``, ``model``, prefixes
    ``module.`` and ``_orig_mod.``), fastdrn training checkpoints, and safetensors files (with the
    optional ``safetensors`` package). Never unpickles code (``torch.load(weights_only=True)``); a
    corrupt or foreign file raises :class:`fastdrn.tools.CheckpointError` naming the problem.

    ``device``: where the model goes (default: the CPU; "auto": cuda when available); one that is
    not a device, or cannot be used here, raises ValueError naming it before the file is read.
    """
    from .tools.checkpoint import load_model
    from .tools.infer import resolve_device
    dev = None if device is None else resolve_device(device, "device")
    model, _ = load_model(os.fspath(name_or_path), key=key)
    return model if dev is None else model.to(dev)
