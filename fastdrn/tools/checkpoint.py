"""Checkpoints: model construction, architecture inference from tensor shapes, safe loading, atomic saving.

A plain ``torch.save(model.state_dict(), path)`` loads with no flags: the architecture is read from the
shapes of SPEC.md section 2 (n_feats = head.weight.shape[0], inner = squeeze.weight.shape[0],
distill = expand rows - squeeze columns, n_blocks / n_groups from the key indices,
scale = sqrt(upsample rows / n_feats)). What shapes cannot tell (alpha, rgb_range) comes from the
``config`` entry of our own checkpoints, else the DRN defaults, and explicit overrides win.

Everything is loaded with ``torch.load(weights_only=True)``: our training checkpoints hold only
tensors, dicts, lists, tuples, numbers, strings and None. A zip checkpoint (what ``torch.save``
writes) is first checked member by member against the CRC-32 its zip directory records, so flipped
bytes are refused instead of loading as wrong weights; tensors other than dense ones are refused.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import zipfile
from typing import Any, Callable, Mapping

import torch

import fastdrn
import fastdrn.reference

__all__ = ["CheckpointError", "build_model", "infer_config", "extract_state_dict", "load_checkpoint",
           "load_model", "atomic_write", "atomic_write_text", "atomic_save", "check_dense", "verify_zip",
           "current_umask", "temp_name_pattern", "CONFIG_KEYS", "FORMAT"]

FORMAT = "fastdrn-train-v1"
CONFIG_KEYS = ("scale", "n_colors", "n_feats", "n_groups", "n_blocks", "inner", "distill", "alpha",
               "rgb_mean", "rgb_range")
ARCH_KEYS = ("scale", "n_colors", "n_feats", "n_groups", "n_blocks", "inner", "distill")
WRAPPERS = ("params_ema", "params", "state_dict", "model", "model_state_dict", "net", "generator")


class CheckpointError(ValueError):
    """A checkpoint that does not fit: the message lists every mismatch."""


def build_model(**cfg) -> torch.nn.Module:
    """The single place models are made: ``fastdrn.DRN`` where it exists, else the reference DRN."""
    cls = fastdrn.DRN if hasattr(fastdrn, "DRN") else fastdrn.reference.DRN
    return cls(**cfg)


# ----------------------------------------------------------------------------------------- loading

def _is_state_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def check_dense(sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors a model cannot take as weights: sparse or other non-strided layouts, and
    non-numeric or complex dtypes. Raises CheckpointError naming every offending key."""
    bad = [f"{k}: {v.layout}" for k, v in sd.items() if v.layout != torch.strided]
    bad += [f"{k}: dtype {v.dtype}" for k, v in sd.items()
            if v.layout == torch.strided and (v.is_complex() or v.dtype == torch.bool)]
    if bad:
        shown = bad[:10] + ([f"... and {len(bad) - 10} more"] if len(bad) > 10 else [])
        raise CheckpointError("only dense real-valued tensors can be weights; the checkpoint holds "
                              + ", ".join(shown))


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Find the weights in a loaded checkpoint: a plain state_dict or one of the common wrappers
    (``params_ema``, ``params``, ``state_dict``, ``model``, ...), with ``module.`` / ``_orig_mod.``
    prefixes removed. Returns (state_dict, stored config or {})."""
    config: dict = {}
    for _ in range(4):
        if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
            config = dict(obj["config"])
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
        for key in WRAPPERS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            keys = ", ".join(map(str, list(obj)[:12]))
            raise CheckpointError(f"no state_dict found in checkpoint (top-level keys: {keys})")
    else:
        raise CheckpointError("no state_dict found in checkpoint (nested too deeply)")
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    check_dense(sd)
    return sd, config


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """The constructor arguments that the shapes of a DRN state_dict imply (SPEC.md section 2)."""
    problems = [k for k in ("head.weight", "upsample.weight", "tail.weight") if k not in sd]
    if problems:
        raise CheckpointError("not a DRN state_dict: missing " + ", ".join(problems)
                              + f" (it has {len(sd)} keys, e.g. {', '.join(list(sd)[:6])})")
    head = sd["head.weight"]
    n_feats, n_colors = int(head.shape[0]), int(head.shape[1])
    ratio, rem = divmod(int(sd["upsample.weight"].shape[0]), n_feats)
    scale = math.isqrt(ratio) if rem == 0 else 0
    if rem or scale * scale != ratio:
        raise CheckpointError(f"upsample.weight has {sd['upsample.weight'].shape[0]} output channels, "
                              f"not n_feats * scale^2 for n_feats={n_feats}")
    groups, blocks = set(), set()
    for k in sd:
        m = re.match(r"groups\.(\d+)\.", k)
        if m:
            groups.add(int(m.group(1)))
        m = re.match(r"groups\.0\.blocks\.(\d+)\.", k)
        if m:
            blocks.add(int(m.group(1)))
    n_groups = max(groups) + 1 if groups else 0
    n_blocks = max(blocks) + 1 if blocks else 0
    cfg = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_groups=n_groups, n_blocks=n_blocks)
    sq, ex = sd.get("groups.0.blocks.0.squeeze.weight"), sd.get("groups.0.blocks.0.expand.weight")
    if sq is not None and ex is not None:
        cfg["inner"] = int(sq.shape[0])
        cfg["distill"] = int(ex.shape[0]) - int(sq.shape[1])
    elif "groups.0.compress.weight" in sd and n_blocks == 0:
        cfg["inner"], cfg["distill"] = 64, 8       # no blocks: any value builds the same model
    if "rgb_mean" in sd:
        cfg["rgb_mean"] = tuple(float(v) for v in sd["rgb_mean"].flatten().tolist())
    return cfg


def _mismatches(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", shaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"{title} ({len(items)}):\n    " + "\n    ".join(shown))
    return lines


def verify_zip(path: str) -> None:
    """Check every member of a zip checkpoint against the CRC-32 its directory records (torch's own
    reader does not): a file with flipped bytes raises CheckpointError. Other files pass unchecked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: the checkpoint is corrupt (its zip structure does not read: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: the checkpoint is corrupt: {bad} does not match its CRC-32 checksum "
                              "(a damaged copy or an interrupted transfer)")


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with readable errors, after
    :func:`verify_zip`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    verify_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError for corrupt zip files, ...
        raise CheckpointError(f"{path}: cannot be loaded safely (torch.load weights_only=True): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def load_model(source: str | os.PathLike | Mapping, overrides: Mapping | None = None,
               expect: Mapping | None = None) -> tuple[torch.nn.Module, dict]:
    """Build a DRN from a checkpoint (a path or a loaded object) and load its weights, strictly.

    ``overrides``: constructor arguments that win over the checkpoint (alpha, rgb_range, ...; None values
    are ignored). ``expect``: architecture values the caller requires (e.g. the scale of a data set);
    any difference is an error. Returns (model in eval mode, config).
    """
    obj = load_checkpoint(source) if not isinstance(source, Mapping) else source
    name = os.fspath(source) if not isinstance(source, Mapping) else "checkpoint"
    try:
        sd, stored = extract_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    cfg = {k: v for k, v in stored.items() if k in CONFIG_KEYS}
    try:
        inferred = infer_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    cfg.update(inferred)
    problems = []
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k in ARCH_KEYS and k in inferred and inferred[k] != v:
            problems.append(f"{k}: checkpoint has {inferred[k]}, asked for {v}")
        cfg[k] = v
    for k, v in (expect or {}).items():
        if v is not None and cfg.get(k) != v:
            problems.append(f"{k}: checkpoint has {cfg.get(k)}, expected {v}")
    if "rgb_mean" in cfg:
        cfg["rgb_mean"] = tuple(cfg["rgb_mean"])
    try:
        model = build_model(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot build a DRN from it: {e}") from None
    problems += _mismatches(model, sd)
    if problems:
        raise CheckpointError(f"{name} does not fit a DRN with {_fmt(cfg)}:\n  " + "\n  ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


def _fmt(cfg: Mapping) -> str:
    return ", ".join(f"{k}={cfg[k]}" for k in ARCH_KEYS if k in cfg)


# ----------------------------------------------------------------------------------------- saving

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else by setting
    and restoring it under a lock (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temp_name_pattern(path: str | os.PathLike) -> re.Pattern:
    """What :func:`atomic_write`'s temporary files for ``path`` are called (mkstemp's 8 random
    characters between the stem and ``.tmp`` plus the extension): to clean up after a killed writer."""
    stem, ext = os.path.splitext(os.path.basename(os.fspath(path)))
    return re.compile(re.escape(f".{stem}.") + r"[A-Za-z0-9_]{8}" + re.escape(f".tmp{ext}"))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary name in the destination folder, then ``os.replace`` it.

    A crash or an exception leaves the old file (if any) untouched and no partial file behind.
    The temporary name keeps the extension, so writers that look at it still work. The file gets
    the mode a plain ``open(path, "w")`` would give it (0o666 less the umask), not mkstemp's 0o600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
