"""Checkpoints: model construction, architecture inference from tensor shapes, safe loading, atomic saving.

A plain ``torch.save(model.state_dict(), path)`` loads with no flags: the architecture is read from the
shapes of docs/architecture.md's state_dict (n_feats = head.weight.shape[0], inner = squeeze.weight.shape[0],
distill = expand rows - squeeze columns, n_blocks / n_groups from the key indices,
scale = sqrt(upsample rows / n_feats)). What shapes cannot tell (alpha, rgb_range) comes from the
``config`` entry of our own checkpoints, else the DRN defaults, and explicit overrides win.

Everything is loaded with ``torch.load(weights_only=True)``: our training checkpoints hold only
tensors, dicts, lists, tuples, numbers, strings and None. A zip checkpoint (what ``torch.save``
writes) is first checked member by member against the CRC-32 its zip directory records, so flipped
bytes are refused instead of loading as wrong weights; tensors other than dense ones are refused.
A ``.safetensors`` file (recognised by its content) is read with the optional ``safetensors``
package. A shipped weight name (``drn-x4``, see :mod:`fastdrn.pretrained`) is accepted wherever a
path is. The layout of every format is in docs/architecture.md.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import tempfile
import threading
import zipfile
from typing import Any, Callable, Mapping

try:
    import fcntl
except ImportError:      # no advisory locks (Windows): a temporary file is then never taken for abandoned
    fcntl = None

import torch

import fastdrn
import fastdrn.reference

__all__ = ["CheckpointError", "build_model", "infer_config", "extract_state_dict", "select_weights",
           "load_checkpoint", "load_model", "export", "EXPORT_FORMATS", "EXPORT_DTYPES", "atomic_write",
           "atomic_write_text", "atomic_save", "check_dense", "check_finite", "verify_zip", "current_umask",
           "temp_name_pattern", "remove_if_abandoned", "open_regular", "NotRegularFileError", "CONFIG_KEYS", "FORMAT"]

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
    """Refuse tensors a model cannot take as weights: meta tensors, sparse or other non-strided
    layouts, and dtypes other than floating-point ones (bool, integer, quantized, complex). Raises CheckpointError naming every offending key."""
    meta = [k for k, v in sd.items() if v.is_meta]
    if meta:                     # shapes only (a model saved from deferred initialization)
        raise CheckpointError("tensors on the meta device hold no values: " + ", ".join(meta[:6])
                              + (f" and {len(meta) - 6} more" if len(meta) > 6 else ""))
    bad = [f"{k}: {v.layout}" for k, v in sd.items() if v.layout != torch.strided]
    # Integer tensors are refused too: codes of a quantized model without their scales loaded as
    # weights (cast, silently), and quantized ones failed inside load_state_dict's copy.
    bad += [f"{k}: dtype {v.dtype}" for k, v in sd.items()
            if v.layout == torch.strided and not v.is_floating_point()]
    if bad:
        shown = bad[:10] + ([f"... and {len(bad) - 10} more"] if len(bad) > 10 else [])
        raise CheckpointError("only dense floating-point tensors can be weights; the checkpoint holds "
                              + ", ".join(shown))


def check_finite(sd: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse weights holding NaN or infinite values (e.g. the last.pt of a run that diverged: every
    output pixel would be NaN), naming the tensors."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise CheckpointError(f"{name}: its weights hold NaN or infinite values ({shown}): a training run that "
                              "diverged? Use an earlier checkpoint")


def select_weights(obj: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict, str | None, list[str]]:
    """Find the weights in a loaded checkpoint: a plain state_dict or one of the common wrappers, with
    ``module.`` / ``_orig_mod.`` prefixes removed.

    Without ``key`` the first present of ``params_ema``, ``params``, ``state_dict``, ``model``, ... is
    taken (BasicSR's EMA weights before its raw ones: the EMA ones are those used for inference; our
    training checkpoints keep raw weights under ``model`` and, with EMA on, ``params_ema``). ``key``
    names the top-level entry to take instead. Returns (state_dict, stored config or {}, the entry
    used or None for a plain state_dict, the other weight entries at that level).
    """
    config: dict = {}
    used: list[str] = []
    others: list[str] = []
    if key is not None:
        if not isinstance(obj, Mapping) or _is_state_dict(obj):
            raise CheckpointError(f"key={key!r} given, but the checkpoint is a plain state_dict with no entries to choose")
        if not isinstance(obj.get(key), Mapping):
            present = [k for k in obj if isinstance(obj[k], Mapping) and k != "config"]
            raise CheckpointError(f"checkpoint has no weights under {key!r}; its entries: "
                                  + (", ".join(map(repr, present)) or "none"))
    for depth in range(4):
        if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
            config = dict(obj["config"])
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
        present = [k for k in WRAPPERS if isinstance(obj.get(k), Mapping)]
        choice = key if depth == 0 and key is not None else (present[0] if present else None)
        if choice is None:
            keys = ", ".join(map(str, list(obj)[:12]))
            raise CheckpointError(f"no state_dict found in checkpoint (top-level keys: {keys})")
        if depth == 0:
            others = [k for k in present if k != choice]
        used.append(choice)
        obj = obj[choice]
    else:
        raise CheckpointError("no state_dict found in checkpoint (nested too deeply)")
    sd, original = {}, {}
    for raw, v in obj.items():
        if not isinstance(raw, str):
            raise CheckpointError(f"its state_dict's key {raw!r} ({type(raw).__name__}) is not a parameter name")
        k = raw
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k in sd:              # two tensors for one parameter: neither may win silently
            raise CheckpointError(f"its state_dict holds {k!r} twice (as {original[k]!r} and {raw!r})")
        sd[k], original[k] = v, raw
    check_dense(sd)
    return sd, config, ".".join(used) or None, others


def extract_state_dict(obj: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, stored config or {}) of a loaded checkpoint: :func:`select_weights` without the report."""
    sd, config, _, _ = select_weights(obj, key)
    return sd, config


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """The constructor arguments that the shapes of a DRN state_dict imply (docs/architecture.md, the state_dict)."""
    problems = [k for k in ("head.weight", "upsample.weight", "tail.weight") if k not in sd]
    if problems:
        raise CheckpointError("not a DRN state_dict: missing " + ", ".join(problems)
                              + f" (it has {len(sd)} keys, e.g. {', '.join(list(sd)[:6])})")
    # The shapes read below must be conv weights', else a 0-d or 1-d tensor raised IndexError and an
    # empty head ZeroDivisionError; a wrong kernel size is left to the mismatch report.
    for k, kind in (("head.weight", "3x3"), ("upsample.weight", "3x3"), ("tail.weight", "3x3"),
                    ("groups.0.blocks.0.squeeze.weight", "1x1"), ("groups.0.blocks.0.expand.weight", "1x1")):
        if k in sd and (sd[k].dim() != 4 or 0 in sd[k].shape):
            raise CheckpointError(f"{k} has shape {tuple(sd[k].shape)}, not that of a {kind} conv weight "
                                  "(out, in, k, k), none of them 0")
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


class NotRegularFileError(OSError):
    """A path to read that is not a regular file; the message names it and says what it is."""


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: str | os.PathLike):
    """``open(path, "rb")`` for a regular file (symbolic links followed). Anything else raises
    NotRegularFileError naming it: a FIFO, /dev/stdin or /dev/zero is read without end or waits
    forever for a writer. The open itself does not wait (O_NONBLOCK), and the kind of file is that
    of the file opened, not of a name that could be swapped between a check and the open."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
            raise NotRegularFileError(f"{path}: {what}, not a regular file: refused (reading it could "
                                      "block or never end)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_safetensors(f) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then '{'."""
    f.seek(0)
    head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= os.fstat(f.fileno()).st_size - 8


def _load_safetensors(path: str, f) -> dict:
    try:
        from safetensors.torch import load
    except ImportError:
        raise CheckpointError(f"{path} is a safetensors file: reading it needs the optional package "
                              "safetensors (pip install safetensors)") from None
    f.seek(0)
    data = f.read()
    try:
        tensors = load(data)
        metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as e:  # SafetensorError for a damaged header or data, ...
        raise CheckpointError(f"{path}: cannot be read as safetensors: {type(e).__name__}: {e}") from e
    obj: dict = {"state_dict": tensors}
    if "fastdrn.config" in metadata:
        try:
            obj["config"] = json.loads(metadata["fastdrn.config"])
        except ValueError as e:
            raise CheckpointError(f"{path}: its fastdrn.config metadata is not JSON: {e}") from e
    return obj


def verify_zip(source, name: str | None = None) -> None:
    """Check every member of a zip checkpoint against the CRC-32 its directory records (torch's own
    reader does not): a file with flipped bytes raises CheckpointError. Other files pass unchecked.
    source: a path, or a binary file open for reading (then `name` names it in errors)."""
    name = name or os.fspath(source)
    if not zipfile.is_zipfile(source):
        return
    try:
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{name}: the checkpoint is corrupt (its zip structure does not read: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{name}: the checkpoint is corrupt: {bad} does not match its CRC-32 checksum "
                              "(a damaged copy or an interrupted transfer)")


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with readable errors, after
    :func:`verify_zip`; a safetensors file comes back as ``{"state_dict": tensors, "config": ...}``.
    A shipped weight name is resolved to its file first. A path that is not a regular file (a FIFO,
    a device) is refused as :func:`open_regular` refuses it, before anything reads it. The path is
    opened once: every check reads the file that is loaded, not one that could replace it."""
    from fastdrn.pretrained import resolve
    path = resolve(os.fspath(path))
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        f = open_regular(path)
    except NotRegularFileError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        if _is_safetensors(f):
            return _load_safetensors(path, f)
        verify_zip(f, path)
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError, RuntimeError for corrupt zip files, ...
            raise CheckpointError(f"{path}: {_why_not_loaded(f, e)}") from e


# First bytes of files that get passed as checkpoints by mistake.
_OTHER_FORMATS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                  b"RIFF": "a RIFF (WebP?) file", b"\x1f\x8b": "a gzip file", b"{": "a JSON text",
                  b"\x93NUMPY": "a NumPy .npy file", b"\x89HDF": "an HDF5 (Keras?) file"}


def _why_not_loaded(f, e: Exception) -> str:
    """Why torch.load(weights_only=True) failed on the open file f, in words: torch's own message
    leads with advice to load with weights_only=False, which would run any code the file holds."""
    f.seek(0)
    head = f.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(f):
        return ("the checkpoint is truncated or damaged: a zip file without the directory at its end "
                "(an interrupted save or copy)")
    if not head.startswith((b"PK\x03\x04", b"\x80")):   # torch.save writes a zip, or a pickle of protocol >= 2
        kind = next((v for k, v in _OTHER_FORMATS.items() if head.startswith(k)), None)
        return ("not a checkpoint: " + (f"{kind}, " if kind else "")
                + "neither a PyTorch file (torch.save's zip or pickle) nor a safetensors file")
    text = str(e)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return (f"refused: it holds a Python object ({blocked.group(1)}) that loading would have to run, and only "
                "tensors, numbers, strings and containers are loaded (torch.load weights_only=True); "
                "save the weights as a plain state_dict instead: torch.save(model.state_dict(), path)")
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        return (f"refused: a pickle that torch.load(weights_only=True) cannot read (opcode {opcode.group(1)}): "
                "not written by torch.save, and loading it any other way could run code")
    detail = re.search(r"WeightsUnpickler error: ?\s*([^\n]+)", text)
    first = detail.group(1).strip() if detail else (text.splitlines()[0] if text else "")
    return f"cannot be loaded safely (torch.load weights_only=True): {type(e).__name__}: {first}"


def load_model(source: str | os.PathLike | Mapping, overrides: Mapping | None = None,
               expect: Mapping | None = None, key: str | None = None,
               log: Callable[[str], None] | None = None, name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Build a DRN from a checkpoint (a path, a shipped weight name or a loaded object) and load its
    weights, strictly.

    ``overrides``: constructor arguments that win over the checkpoint (alpha, rgb_range, ...; None values
    are ignored). ``expect``: architecture values the caller requires (e.g. the scale of a data set);
    any difference is an error. ``key``: the checkpoint entry to take the weights from (see
    :func:`select_weights`). ``log`` is told which entry was used when there was a choice (default:
    standard error). ``name``: what the messages call the checkpoint (default: its path, or
    "checkpoint" for a loaded object). Returns (model in eval mode, config).
    """
    obj = load_checkpoint(source) if not isinstance(source, Mapping) else source
    name = name or (os.fspath(source) if not isinstance(source, Mapping) else "checkpoint")
    from fastdrn.pretrained import expected_config
    if not isinstance(source, Mapping):     # a caller's None (no --scale) leaves the name's promise standing
        expect = {**expected_config(os.fspath(source)), **{k: v for k, v in (expect or {}).items() if v is not None}}
    try:
        sd, stored, used, others = select_weights(obj, key)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if used is not None and (others or key is not None):
        also = f" (it also holds {', '.join(repr(o) for o in others)}; choose with key)" if others else ""
        (log or _stderr)(f"{name}: using the weights under {used!r}{also}")
    check_finite(sd, name)
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
    if (overrides or {}).get("rgb_mean") is not None:    # a buffer too: loading would put the checkpoint's back
        sd = {**sd, "rgb_mean": model.rgb_mean}
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


def _fmt(cfg: Mapping) -> str:
    return ", ".join(f"{k}={cfg[k]}" for k in ARCH_KEYS if k in cfg)


def _stderr(msg: str) -> None:
    print(f"fastdrn: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- export

EXPORT_FORMATS = ("basicsr", "plain", "safetensors")
DEFAULTS = {"alpha": 0.2, "rgb_range": 1.0}


def _cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype, name: str) -> dict[str, torch.Tensor]:
    """The model's state_dict with its parameters in ``dtype`` (buffers such as rgb_mean stay float32:
    they are a few numbers); a weight too large for the dtype is refused, not written as inf."""
    params = {k for k, _ in model.named_parameters()}
    out = {}
    for k, v in _cpu(model.state_dict()).items():
        if k in params and v.is_floating_point():
            cast = v.to(dtype)
            if not torch.isfinite(cast).all():
                raise CheckpointError(f"{name}: {k} holds values (up to {v.abs().max().item():.4g}) that "
                                      f"{dtype} cannot represent; export it in float32")
            v = cast
        out[k] = v
    return out


def export(source: str | os.PathLike, path: str | os.PathLike, fmt: str | None = None, key: str | None = None,
           log: Callable[[str], None] = print, dtype: str = "fp32") -> dict:
    """Write the weights of a checkpoint (any format :func:`load_model` reads) in another format.

    ``basicsr``: ``{"params": raw weights, "params_ema": EMA weights if the checkpoint has them,
    "config": constructor arguments}``, what BasicSR's ``load_network`` reads (``param_key`` params or
    params_ema). ``plain``: the bare state_dict (``model.load_state_dict(torch.load(f))``) of the
    weights used for inference (the EMA ones when present). ``safetensors``: those tensors, with the
    constructor arguments as JSON in the metadata. ``fmt`` defaults to safetensors for a
    ``.safetensors`` path, else basicsr. ``key`` exports that one entry only. ``dtype`` (fp32, fp16,
    bf16) is the type the parameters are stored in: fp16 halves the file, and loading casts them
    back to the model's float32. Returns the config.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    fmt = fmt or ("safetensors" if ext == ".safetensors" else "basicsr")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if (ext == ".safetensors") != (fmt == "safetensors") and ext in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"--format {fmt} does not match the output file {path}: a {ext} file would hold "
                         f"{'a torch.save pickle' if fmt != 'safetensors' else 'safetensors data'}; change one of them")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    name = os.fspath(source)
    from fastdrn.pretrained import resolve
    src = resolve(name)
    if os.path.exists(path) and os.path.exists(src) and os.path.samefile(src, path):
        raise CheckpointError(f"{path}: the output is the checkpoint being exported ({name}); writing it would "
                              "replace the file it is read from: give another output")
    obj = load_checkpoint(source)
    entries = [k for k in WRAPPERS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)]
    if key is not None or "params_ema" not in entries:
        chosen = {"params": key}
    else:
        raw = [k for k in entries if k != "params_ema"]
        chosen = {"params": raw[0] if raw else "params_ema", "params_ema": "params_ema"}
    weights, cfg = {}, None
    for entry, k in chosen.items():
        # named here, so that each message names the file once (not "q.pt: checkpoint: ...")
        model, cfg_k = load_model(obj, key=k, log=lambda m: None, name=name)
        if cfg is not None and cfg_k != cfg:
            raise CheckpointError(f"{name}: its entries {chosen} hold different architectures")
        cfg = cfg_k
        weights[entry] = _cast_parameters(model, EXPORT_DTYPES[dtype], name)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    inference = weights.get("params_ema", weights["params"])
    if fmt == "basicsr":
        atomic_save({**weights, "config": cfg}, path)
        what = " + ".join(weights)
    elif fmt == "plain":
        lost = {k: cfg[k] for k, v in DEFAULTS.items() if cfg.get(k, v) != v}
        if lost:
            log(f"warning: a plain state_dict cannot hold {lost}: pass them when loading it")
        atomic_save(inference, path)
        what = "the EMA weights" if "params_ema" in weights else "the weights"
    else:
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("writing safetensors needs the optional package safetensors "
                                  "(pip install safetensors)") from None
        atomic_write(path, lambda tmp: save_file(inference, tmp, metadata={
            "format": "fastdrn", "fastdrn.config": json.dumps(cfg)}))
        what = "the EMA weights" if "params_ema" in weights else "the weights"
    log(f"wrote {path} ({fmt}: {what}{'' if dtype == 'fp32' else ' in ' + dtype}; DRN {_fmt(cfg)})")
    return cfg


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
    """What :func:`atomic_write`'s temporary files for ``path`` are called (the writer's process id,
    group 1, and mkstemp's 8 random characters between the stem and ``.tmp`` plus the extension): to
    clean up after a killed writer with :func:`remove_if_abandoned`."""
    stem, ext = os.path.splitext(os.path.basename(os.fspath(path)))
    return re.compile(re.escape(f".{stem[:TEMP_STEM_CHARS]}.") + r"(\d+)\.[A-Za-z0-9_]{8}" + re.escape(f".tmp{ext}"))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:      # alive, another user's
        pass
    return True


def remove_if_abandoned(path: str | os.PathLike, pid: int) -> bool:
    """Delete ``path``, a temporary file of :func:`atomic_write` made by process ``pid``, if its
    writer is gone; returns whether it was deleted. A writer is gone when ``pid`` is no live process
    here (nor this one) and no process holds the file's lock: a writer holds it from the file's
    creation to its rename, which also covers one on another machine sharing the folder."""
    if fcntl is None or pid == os.getpid() or _process_alive(pid):
        return False
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NONBLOCK", 0))   # read-write: NFS locks need it
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:              # held by a live writer, or no locks on this file system: leave it
        return False
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:    # another cleaner was first
            return False
        return True
    finally:
        os.close(fd)


# The temporary name holds this much of the file's stem: with the whole of a long one it could pass
# the file system's limit on a name (255 bytes) that the final name itself keeps to.
TEMP_STEM_CHARS = 32


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary name in the destination folder, then ``os.replace`` it.

    A crash or an exception leaves the old file (if any) untouched and no partial file behind.
    The temporary name keeps the extension, so writers that look at it still work, and holds the
    process id; the process holds a lock on the file until the rename, so that a run cleaning up
    after killed writers in the same folder (:func:`remove_if_abandoned`) leaves it alone. The file
    gets the mode a plain ``open(path, "w")`` would give it (0o666 less the umask), not mkstemp's 0o600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):        # found before writing, not by os.replace after a long write
        raise IsADirectoryError(f"{path}: cannot write: it is a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e, _file_in_the_way(folder)) from None
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem[:TEMP_STEM_CHARS]}.{os.getpid()}.", suffix=f".tmp{ext}",
                                   dir=folder)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:      # no locks on this file system: the process id still tells
                pass
        os.fchmod(fd, 0o666 & ~current_umask())
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):   # named by the destination, not by the temporary name
            raise _write_error(path, e) from None
        raise
    finally:
        os.close(fd)                 # releases the lock, after the rename


def _file_in_the_way(folder: str) -> str | None:
    """The nearest existing ancestor of ``folder`` when it is a file (so no folder can be made there)."""
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return folder if os.path.exists(folder) and not os.path.isdir(folder) else None


def _write_error(path: str, e: OSError, blocker: str | None = None) -> OSError:
    """An OSError of the same kind whose message names the file being written and why it failed."""
    why = f"{blocker} is a file, not a folder" if blocker else (e.strerror or str(e))
    err = type(e)(f"{path}: cannot write: {why}") if type(e).__module__ == "builtins" else OSError(
        f"{path}: cannot write: {why}")
    err.errno = e.errno
    return err


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
