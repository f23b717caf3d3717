"""``fastdrn train``: the DRN paper's training recipe (docs/cli.md), resumable and distributed.

Defaults are the paper's: 48x48 LR patches with the matching HR patch, batch 16, RGB, L1 loss, Adam
(0.9, 0.999, 1e-8), learning rate 1e-4 halved every 200 epochs, 800 epochs, DRN with C=64, G=6, K=9,
F=64, d=8. **(decided)** An epoch is 1000 iterations (``--iters-per-epoch``), the EDSR code base's
``--test_every`` that DRN-era papers count epochs in (so 800 epochs = 800k iterations, lr halved every
200k); ``--iters-per-epoch 0`` makes an epoch one pass over the training images instead. The learning
rate is stepped per iteration, so it is a pure function of the step.

``--batch-size`` is the global batch: under ``torchrun`` with W processes each takes B / W of it, and
DistributedDataParallel averages the gradients, so one process and W processes train the same model.
Data order and augmentation depend only on (seed, step) (see :mod:`fastdrn.tools.data`), which makes
resuming exact: the checkpoint stores model, optimizer, scheduler, AMP scaler, step and the RNG states
(torch CPU and CUDA, numpy, python ``random``) as tensors, so it loads with ``weights_only=True``.

``--ema DECAY`` keeps an exponential moving average of the weights (BasicSR's ``ema_decay``: after
every step ``ema = decay * ema + (1 - decay) * weights``, starting from the initial weights). It is
saved as ``params_ema`` beside ``model``, validated instead of the raw weights, and what
``fastdrn.load``, ``fastdrn upscale``/``eval`` and ``fastdrn export`` use by default.

On one CUDA device each step (forward, L1, backward, fused Adam, AMP scaler) is replayed from a CUDA
graph captured per batch shape (:func:`fastdrn.make_train_step`; the learning rate lives in a tensor
on the device so that the scheduler reaches the graph); ``--no-cuda-graph``, DDP and ``--compile``
run it eagerly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fastdrn.reference

from ..graphs import capture_unavailable, make_train_step
from .checkpoint import (ARCH_KEYS, FORMAT, CheckpointError, _mismatches, atomic_save, build_model, check_dense,
                         check_finite, infer_config, load_checkpoint, remove_if_abandoned, select_weights,
                         temp_name_pattern)
from .image_io import ImageReadError
from .data import StreamBatchSampler, TrainPatches, estimate_bytes, find_pairs, load_pair
from .evaluate import evaluate_pairs
from .infer import resolve_device
from .metrics import SSIM_WINDOW
from .progress import Progress

__all__ = ["TrainConfig", "Trainer", "train", "rng_state", "set_rng_state", "init_distributed", "init_weights"]

MODEL_ARGS = ("scale", "n_feats", "n_groups", "n_blocks", "inner", "distill", "alpha", "rgb_range")
# What a resumed run takes from its checkpoint's optimizer and scheduler states, not from the options.
SCHEDULE_ARGS = ("lr", "lr_step", "lr_gamma", "beta1", "beta2", "eps", "iters_per_epoch")
DEFAULT_EPOCHS = 800


@dataclass
class TrainConfig:
    hr_dir: str
    out: str
    scale: int = 4
    lr_dir: str | None = None
    # schedule
    epochs: int | None = None              # None: DEFAULT_EPOCHS, or a resumed run's own length
    steps: int | None = None               # total optimizer steps; overrides epochs
    iters_per_epoch: int = 1000
    patch_size: int = 48                   # LR patch side
    batch_size: int = 16                   # global batch
    lr: float = 1e-4
    lr_step: int = 200                     # epochs between halvings
    lr_gamma: float = 0.5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    augment: bool = True
    # model (the paper's DRN)
    n_feats: int = 64
    n_groups: int = 6
    n_blocks: int = 9
    inner: int = 64
    distill: int = 8
    alpha: float = 0.2
    rgb_range: float = 1.0
    # machinery
    amp: str = "none"                      # none | bf16 | fp16
    compile: bool = False
    cuda_graph: bool = True                # replay the step from a CUDA graph (one CUDA process, no compile)
    ema: float = 0.0                       # decay of the weights' moving average; 0: off
    workers: int | None = None             # None: 0 on the CPU, else 4 at most the CPU cores
    cache: str = "auto"                    # auto | memory | disk | none
    cache_dir: str | None = None
    resume: str | None = None              # a checkpoint path, or "auto" for OUT/last.pt if present
    init: str | None = None                # weights to start from (another scale's body); see init_weights
    save_every: int | None = None          # steps; default one epoch
    val_hr_dir: str | None = None
    val_lr_dir: str | None = None
    val_every: int | None = None           # steps; default one epoch
    val_max: int | None = None
    seed: int = 0
    device: str | None = None
    log_every: int | None = None           # steps between progress lines off a terminal; None: by time
    log_interval: float = 30.0             # seconds between progress lines off a terminal
    progress: bool = True
    fail_fast: bool = False


# ------------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """Every RNG the training touches, as tensors and numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


# ----------------------------------------------------------------------------------- distributed

def init_distributed(device_pref: str | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group). With WORLD_SIZE > 1 (torchrun)
    the group is initialised from the environment: NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_pref), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_pref is None or device_pref in ("auto", "cuda")
                                              or str(device_pref).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        created = True
    return dist.get_rank(), dist.get_world_size(), device, created


def default_workers(device: torch.device) -> int:
    """DataLoader workers: 4 on a GPU, never more than the CPU cores this process may use; none when
    the model itself trains on the CPU, whose cores its arithmetic needs (cutting patches from the
    cached images in the main process costs little beside it)."""
    if device.type == "cpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(4, cores))


def check_training_checkpoint(ckpt, path: str) -> None:
    """Refuse, with CheckpointError, a training checkpoint whose parts are missing or of the wrong
    kind, before any of it is used (what each part holds is checked as it is loaded)."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastdrn training checkpoint (use it as --weights elsewhere)")
    problems = []
    step = ckpt.get("step")
    if "step" not in ckpt:
        problems.append("step: missing")
    elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problems.append(f"step: expected a non-negative int, got {step!r}")
    for key in ("config", "model", "optimizer", "scheduler", "rng"):
        if not isinstance(ckpt.get(key), dict):
            problems.append(f"{key}: expected a dict, got {type(ckpt.get(key)).__name__}"
                            + (" (missing)" if key not in ckpt else ""))
    if isinstance(ckpt.get("config"), dict):
        missing = [k for k in (*MODEL_ARGS, "rgb_mean") if k not in ckpt["config"]]
        if missing:
            problems.append(f"config: missing {', '.join(missing)}")
    if isinstance(ckpt.get("model"), dict):
        not_tensors = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)]
        if not_tensors or not ckpt["model"]:
            problems.append("model: expected a state_dict of tensors" +
                            (f" (not tensors: {', '.join(map(str, not_tensors[:5]))})" if not_tensors else " (empty)"))
    if isinstance(ckpt.get("optimizer"), dict):
        missing = [k for k in ("state", "param_groups") if k not in ckpt["optimizer"]]
        if missing:
            problems.append(f"optimizer: missing {', '.join(missing)}")
    if isinstance(ckpt.get("rng"), dict):
        missing = [k for k in ("torch", "numpy", "python") if k not in ckpt["rng"]]
        if missing:
            problems.append(f"rng: missing {', '.join(missing)}")
    for key in ("scaler", "data"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            problems.append(f"{key}: expected a dict, got {type(ckpt[key]).__name__}")
    if problems:
        raise CheckpointError(f"{path}: not a usable fastdrn training checkpoint:\n  " + "\n  ".join(problems))
    try:
        check_dense(ckpt["model"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_finite(ckpt["model"], path)
    if isinstance(ckpt.get("params_ema"), dict):
        check_finite(ckpt["params_ema"], f"{path} (params_ema)")


# Options that count something and must be at least 1 (None: their default); 0 would train nothing,
# divide by zero, or be silently read as the default.
COUNTS = ("steps", "epochs", "batch_size", "patch_size", "lr_step", "save_every", "val_every", "val_max",
          "log_every")


def check_counts(cfg: TrainConfig) -> None:
    """Refuse, with ValueError naming the option, a count below 1 (a batch of 0, a patch of -4, ...),
    a learning rate or decay that is not a finite number above 0, a negative seed, and a log interval
    that is negative or not finite."""
    bad = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in COUNTS
           if getattr(cfg, k) is not None and (isinstance(getattr(cfg, k), bool) or not isinstance(getattr(cfg, k), int)
                                               or getattr(cfg, k) < 1)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be a whole number of at least 1")
    # A rate of 0, negative or not finite trains nothing, climbs the loss, or makes the weights NaN,
    # silently (Adam checks --lr only when built, and never the decay the scheduler multiplies it by).
    bad = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("lr", "lr_gamma")
           if not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be a finite number above 0")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"--seed {cfg.seed}: must be a whole number of at least 0")
    # NaN seconds never come round: progress went silent off a terminal
    if not (math.isfinite(cfg.log_interval) and cfg.log_interval >= 0):
        raise ValueError(f"--log-interval {cfg.log_interval}: must be a finite number of seconds, 0 or more")


def check_batch_fits(cfg: TrainConfig) -> None:
    """Refuse, with ValueError, a batch whose float32 LR and HR patches alone exceed this machine's
    memory: it could never be built, and the sampler would grow toward it for minutes first (deaf to
    SIGTERM, whose handler waits for a step to end)."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # no sysconf (Windows): nothing to compare with
        return
    p, s = cfg.patch_size, abs(cfg.scale)
    need = cfg.batch_size * 3 * p * p * (1 + s * s) * 4
    if need > have:
        raise ValueError(f"--batch-size {cfg.batch_size} with --patch-size {p}: one batch of {cfg.batch_size} "
                         f"patches of {p}x{p} (LR) and {p * s}x{p * s} (HR) takes {need / 2**30:.1f} GiB as float32, more than this machine's "
                         f"{have / 2**30:.1f} GiB of memory")


CHECKPOINT_NAMES = ("last.pt", "best.pt")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def remove_stale_temp_files(folder: str, log: Callable[[str], None]) -> list[str]:
    """Delete the temporary files a killed run left beside its checkpoints (atomic_write's names for
    last.pt and best.pt, nothing else); returns their paths. Those of a run still writing into the
    same folder are left alone (see remove_if_abandoned)."""
    if not os.path.isdir(folder):
        return []
    patterns = [temp_name_pattern(name) for name in CHECKPOINT_NAMES]
    removed = []
    for entry in sorted(os.listdir(folder)):
        match = next((m for m in (p.fullmatch(entry) for p in patterns) if m), None)
        path = os.path.join(folder, entry)
        if match and remove_if_abandoned(path, int(match.group(1))):
            removed.append(path)
            log(f"removed {path}, a temporary checkpoint file left by an interrupted run")
    return removed


class StopRequest:
    """While active, SIGTERM and SIGINT ask the training loop to stop after the step in flight (it
    then saves): a killed job loses no steps. A second SIGINT interrupts at once. Handlers can only
    be installed from the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def init_weights(model: torch.nn.Module, source: str, log: Callable[[str], None]) -> list[str]:
    """Copy into ``model`` the weights of ``source`` (a checkpoint or a shipped weight name; its EMA
    weights when it has them) that a DRN of another scale shares with it: every tensor but the
    upsampling convolution, whose output channels are n_feats * scale^2. The source must have the
    model's architecture apart from the scale (a CheckpointError names the differences). Returns the
    names of the tensors left as initialised (none when the scales agree)."""
    try:
        sd, stored, _, _ = select_weights(load_checkpoint(source))
        check_finite(sd, source)
        theirs = infer_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"--init {source}: {e}") from None
    mine = model.state_dict()
    ours = infer_config(mine)
    differ = [f"{k}: {theirs.get(k)} there, {ours[k]} here" for k in ARCH_KEYS
              if k != "scale" and k in ours and theirs.get(k) != ours[k]]
    if "rgb_mean" in sd and not torch.allclose(sd["rgb_mean"].float(), mine["rgb_mean"].float(), atol=1e-3):
        differ.append(f"rgb_mean: {tuple(sd['rgb_mean'].flatten().tolist())} there, "
                      f"{tuple(mine['rgb_mean'].flatten().tolist())} here")
    if differ:
        raise CheckpointError(f"--init {source}: not this architecture apart from the scale ({'; '.join(differ)})")
    fresh = [k for k in mine if k not in sd or sd[k].shape != mine[k].shape]
    if set(fresh) - {"upsample.weight", "upsample.bias"}:   # the shapes above agree, so this is a foreign file
        raise CheckpointError(f"--init {source}: no DRN tensors for {', '.join(sorted(set(fresh))[:6])}")
    model.load_state_dict({k: sd[k] if k not in fresh else v for k, v in mine.items()}, strict=True)
    alpha = stored.get("alpha")
    if alpha is not None and alpha != getattr(model, "alpha", alpha):
        log(f"warning: --init {source} was trained with alpha {alpha}, this model has {model.alpha}")
    log(f"initialised from {source} (x{theirs['scale']}): {len(mine) - len(fresh)} of {len(mine)} tensors"
        + (f"; {', '.join(fresh)} start fresh" if fresh else ""))
    return fresh


def _plain(v):
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


@contextlib.contextmanager
def _loading(path: str | None, part: str):
    """Turn the errors of loading one part of a training checkpoint into CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # KeyError, ValueError, TypeError, RuntimeError, IndexError, ...
        if path is None:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: its {part} does not load: {type(e).__name__}: {first}") from e


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Adam's per-parameter state must match its parameter's shape (load_state_dict checks only
    the counts): a mismatch would fail at the first step, or broadcast silently."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if name in ("exp_avg", "exp_avg_sq") and (not isinstance(value, torch.Tensor) or value.shape != p.shape):
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"state {name} has shape {shape} for a parameter of shape {tuple(p.shape)}")


def _run_length(cfg: TrainConfig, ckpt: dict | None) -> dict:
    """{} when --steps or --epochs sets the run's length; else the steps or epochs the resumed run was
    started with (its checkpoint's record of its options), or DEFAULT_EPOCHS for a new run."""
    if cfg.steps is not None or cfg.epochs is not None:
        return {}
    was = ckpt.get("args") if ckpt is not None and isinstance(ckpt.get("args"), dict) else {}
    length = {k: was.get(k) for k in ("steps", "epochs")}
    if any(v is not None for v in length.values()) and all(
            v is None or (type(v) is int and v >= 1) for v in length.values()):
        return length
    return {"epochs": DEFAULT_EPOCHS}


class Trainer:
    """Sets up data, model, optimizer and (under torchrun) DDP; :meth:`fit` runs the loop."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.rank, self.world, self.device, self._own_group = init_distributed(cfg.device)
        self.main = self.rank == 0
        self._log = log or print
        if cfg.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none, bf16 or fp16, got {cfg.amp!r}")
        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {self.world} processes")
        if not 0 <= cfg.ema < 1:
            raise ValueError(f"--ema must be a decay in [0, 1) (0: off), got {cfg.ema}")
        check_counts(cfg)
        check_batch_fits(cfg)
        if cfg.val_lr_dir and not cfg.val_hr_dir:
            raise ValueError(f"--val-lr-dir {cfg.val_lr_dir} needs --val-hr-dir (the HR images it pairs with)")
        # A new run would write its first last.pt over these, and its first validation would replace best.pt
        # whatever it scored (its best begins at -inf): an earlier run's results are continued or kept.
        # --resume auto without a last.pt starts afresh too (a best.pt outlives last.pt when validations
        # come more often than saves and the run was killed).
        held = [n for n in CHECKPOINT_NAMES if os.path.isfile(os.path.join(cfg.out, n))]
        if held and (cfg.resume is None or (cfg.resume == "auto" and "last.pt" not in held)):
            resume = ("--resume auto continues that run" if "last.pt" in held
                      else "there is no last.pt to resume")
            raise ValueError(f"--out {cfg.out}: holds {', '.join(held)} of an earlier run, which a new run would "
                             f"overwrite: {resume}; start a new one in another --out (or move those files away)")
        self.errors: list[str] = []
        if self.main:
            remove_stale_temp_files(cfg.out, self.log)
        # Every process must agree to stop on a signal, or a peer would wait in a collective
        # forever: the stop flag is all-reduced each step over a CPU (gloo) group, which never
        # waits for the GPU.
        self._stop_group = dist.new_group(backend="gloo") if self.world > 1 else None

        # --- checkpoint to resume from
        ckpt = None
        path = cfg.resume
        if path == "auto":
            path = os.path.join(cfg.out, "last.pt")
            path = path if os.path.exists(path) else None
        if path:
            ckpt = load_checkpoint(path)
            check_training_checkpoint(ckpt, path)
            self.log(f"resuming from {path} at step {ckpt['step']}")
        cfg = self.cfg = dataclasses.replace(cfg, **_run_length(cfg, ckpt))  # the checkpoints record it

        # --- model
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        if ckpt is not None:
            self.model_cfg = dict(ckpt["config"])
            # The checkpoint decides the model; an option set to something else (not left at its
            # default) asks for another model, which resuming cannot give.
            # So do the optimizer and schedule, whose states it holds (a new --lr would not be used, and
            # the checkpoint's record of the run's options would say it was).
            was = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
            theirs = {**{k: was.get(k) for k in SCHEDULE_ARGS if k in was}, **self.model_cfg}
            asked = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (it has {theirs[k]})" for k in (*MODEL_ARGS, *SCHEDULE_ARGS)
                     if k != "scale" and k in theirs and getattr(cfg, k) != TrainConfig.__dataclass_fields__[k].default
                     and getattr(cfg, k) != theirs[k]]
            if asked:
                raise CheckpointError(f"{path}: resuming continues the checkpoint's model, optimizer and schedule, not "
                                      f"the ones asked for: {', '.join(asked)}; drop these options, or start a new run "
                                      f"(--init {path} starts one from its weights)")
        else:
            self.model_cfg = {k: getattr(cfg, k) for k in MODEL_ARGS}
            self.model_cfg["rgb_mean"] = list(fastdrn.reference.DIV2K_RGB_MEAN)
        if self.model_cfg["scale"] != cfg.scale:
            raise CheckpointError(f"{path}: the checkpoint is of scale {self.model_cfg['scale']}, --scale is "
                                  f"{cfg.scale}: resume at its scale, or start a new run with --init {path}")
        mk = dict(self.model_cfg)
        with _loading(path, "config"):
            mk["rgb_mean"] = tuple(mk["rgb_mean"])
            self.model = build_model(**mk)
        if cfg.init is not None:
            if ckpt is None:
                init_weights(self.model, cfg.init, self.log)
            else:                                      # the checkpoint already holds what --init began with
                self.log(f"--init {cfg.init} not used: resuming")
        self.model = self.model.to(self.device)
        # The EMA copy never trains: it follows the weights in update_ema() after each step.
        self.ema_model = None
        if cfg.ema:
            self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.graphed, why_eager = self._graph_plan()
        # On CUDA the fused Adam; captured, it also keeps its step count and (as a tensor) the learning
        # rate on the device, so the scheduler's changes reach the graph.
        adam = dict(fused=True, capturable=self.graphed) if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self._lr_value(cfg.lr),
                                          betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **adam)
        self.ipe = cfg.iters_per_epoch
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.step = 0
        self.best_psnr = -math.inf
        self._saved: dict[str, int] = {}          # checkpoint name -> the step it holds, as written by this run
        self._in_step: int | None = None          # the step being taken, while its updates are half made

        # --- data
        pairs, missing = find_pairs(cfg.hr_dir, cfg.lr_dir, cfg.scale, warn=self._warn)
        for m in missing:
            self._error(m)
        cache = cfg.cache
        if cache == "auto":
            cache = "memory" if estimate_bytes(pairs, cfg.scale) < 4 << 30 else "disk"
        self.dataset = TrainPatches(pairs, cfg.scale, cfg.patch_size, cfg.augment, cache,
                                    cfg.cache_dir or os.path.join(cfg.out, "cache"), cfg.rgb_range,
                                    on_error=self._error, on_warning=self._warn)
        if len(self.dataset) == 0:
            raise ValueError(f"{cfg.hr_dir}: no usable training images")
        self.log(f"{len(self.dataset)} training images ({'LR files' if cfg.lr_dir else 'LR by MATLAB bicubic'}, "
                 f"cache {cache}); {self.world} process(es), global batch {cfg.batch_size}")
        if not self.ipe:
            self.ipe = max(1, math.ceil(len(self.dataset) / cfg.batch_size))
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * self.ipe
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step * self.ipe,
                                                         gamma=cfg.lr_gamma)
        if ckpt is not None:
            mismatches = _mismatches(self.model, ckpt["model"])
            if mismatches:
                raise CheckpointError(f"{path}: its model does not fit its own config:\n  " + "\n  ".join(mismatches))
            with _loading(path, "model"):
                self.model.load_state_dict(ckpt["model"])
            if self.ema_model is not None:
                with _loading(path, "params_ema"):
                    self.ema_model.load_state_dict(ckpt.get("params_ema", ckpt["model"]))
                if "params_ema" not in ckpt:
                    self._warn(f"{path} has no EMA weights: the EMA starts from its weights at step {ckpt['step']}")
            elif "params_ema" in ckpt:
                self._warn(f"{path} has EMA weights but --ema is off: they are dropped")
            with _loading(path, "optimizer"):
                self._load_optimizer(ckpt["optimizer"])
                _check_optimizer_state(self.optimizer)
            with _loading(path, "scheduler"):
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                with _loading(path, "scaler"):
                    self.scaler.load_state_dict(ckpt["scaler"])
            self.step = int(ckpt["step"])
            with _loading(path, "best_psnr"):
                self.best_psnr = float(ckpt.get("best_psnr", -math.inf))
            data = ckpt.get("data", {})
            for k, v in (("seed", cfg.seed), ("global_batch", cfg.batch_size), ("patch", cfg.patch_size),
                         ("n_images", len(self.dataset))):   # the data order permutes the images
                if k in data and data[k] != v:
                    self._warn(f"resuming with {k} {v}, the checkpoint used {data[k]}: "
                             f"the run will not repeat the uninterrupted one")
            with _loading(path, "rng"):
                set_rng_state(ckpt["rng"])

        self.sampler = StreamBatchSampler(len(self.dataset), cfg.batch_size, self.total, cfg.seed,
                                          start_step=self.step, rank=self.rank, world_size=self.world)
        self.workers = default_workers(self.device) if cfg.workers is None else cfg.workers
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.workers,
                                 pin_memory=self.device.type == "cuda",
                                 # its own generator: creating an iterator must not consume the global RNG
                                 generator=torch.Generator().manual_seed(cfg.seed))

        self.log(self.describe())

        # --- validation set (decoded once, on the main process)
        self.val_pairs, self.val_data, self.val_bicubic = [], {}, {}
        if cfg.val_hr_dir and self.main:
            vp, vmissing = find_pairs(cfg.val_hr_dir, cfg.val_lr_dir, cfg.scale, warn=self._warn)
            for m in vmissing:
                self._error(m)
            if not vp and not vmissing:
                self._warn(f"--val-hr-dir {cfg.val_hr_dir} holds no images: no validation, no best.pt")
            for p in vp[: cfg.val_max or None]:
                try:
                    lr, hr = load_pair(p, cfg.scale, on_warning=self._warn)
                except OSError as e:
                    self._error(str(e))
                    continue
                # validation measures with the scale cropped as border, as eval does by default
                if min(hr.shape[:2]) - 2 * cfg.scale < SSIM_WINDOW:
                    self._warn(f"{p.hr}: {hr.shape[1]}x{hr.shape[0]} is too small to validate on (SSIM's "
                             f"{SSIM_WINDOW}x{SSIM_WINDOW} window needs {SSIM_WINDOW + 2 * cfg.scale} pixels a side "
                             f"with the {cfg.scale}-pixel border cropped): not used")
                    continue
                self.val_data[p.name] = (lr, hr)
                self.val_pairs.append(p)
            if vp and not self.val_pairs:
                self._warn(f"--val-hr-dir {cfg.val_hr_dir}: no usable images: no validation, no best.pt")

        # --- DDP, compile
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.train_step = make_train_step(self.net, self.optimizer, F.l1_loss, amp_dtype=self.amp_dtype,
                                          grad_scaler=self.scaler, cuda_graph=self.graphed)
        self.log("training step: " + ("replayed from a CUDA graph per batch shape" if self.graphed
                                      else f"eager ({why_eager})"))

    # ------------------------------------------------------------------------------ helpers
    def describe(self) -> str:
        """Where and what trains, in one line: device, backend, model size, data loading."""
        dev = self.device
        name = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
        backend = getattr(self.model, "backend", "reference model")
        m = self.model_cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"device {dev}{name}; backend: {backend}; DRN x{m['scale']} (n_feats {m['n_feats']}, "
                f"{m['n_groups']} groups of {m['n_blocks']} blocks, inner {m['inner']}, distill {m['distill']}): "
                f"{n_params:,} parameters; amp {self.cfg.amp}; {self.workers} data worker(s)"
                + (f"; EMA decay {self.cfg.ema}" if self.ema_model is not None else ""))

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema = decay * ema + (1 - decay) * weights (buffers copied)."""
        ema = list(self.ema_model.parameters())
        raw = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema, raw, 1.0 - self.cfg.ema)
        for b_ema, b in zip(self.ema_model.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    def log(self, msg: str) -> None:
        if self.main:
            if getattr(self, "_progress", None) is not None:
                self._progress.clear()
            self._log(msg)

    def _warn(self, msg: str) -> None:
        self.log(f"warning: {msg}")

    def _error(self, msg: str) -> None:
        self.errors.append(msg)
        self.log(f"error: {msg}")
        if self.cfg.fail_fast:
            raise ImageReadError(f"stopping (--fail-fast): {msg}")

    def _graph_plan(self) -> tuple[bool, str]:
        """(whether the step is captured in a CUDA graph, why not)."""
        cfg = self.cfg
        why = capture_unavailable(self.device)
        if not cfg.cuda_graph:
            why = "--no-cuda-graph"
        elif self.world > 1:
            why = "CUDA graphs are not used under DistributedDataParallel"
        elif cfg.compile:
            why = "CUDA graphs are not used with --compile"
        return why is None, why or ""

    def _lr_value(self, lr: float):
        """A learning rate as the optimizer holds it: a tensor on the device where the step is captured."""
        return torch.tensor(lr, dtype=torch.float32, device=self.device) if self.graphed else lr

    def _load_optimizer(self, saved: dict) -> None:
        """The checkpoint's hyperparameters and moments, run the way this run runs Adam: the
        implementation flags stay this run's, the lr becomes a device tensor where the step is
        captured, and fused or captured Adam gets its step counts on the device (a checkpoint from
        the CPU, or from eager foreach Adam, holds them on the host)."""
        impl = ("foreach", "fused", "capturable")
        mine = [{k: g[k] for k in impl if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, flags in zip(self.optimizer.param_groups, mine):
            group.update(flags)
            group["lr"] = self._lr_value(float(group["lr"]))
            if not (flags.get("fused") or flags.get("capturable")):
                continue
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    @property
    def amp_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)

    def forward_backward(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """L1 loss of one (local) batch and its gradients (averaged over processes by DDP)."""
        lr = lr.to(self.device, non_blocking=True)
        hr = hr.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            sr = self.net(lr)
        loss = F.l1_loss(sr.float(), hr)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def advance(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch (forward, L1, backward, Adam and AMP scaler), the learning-rate
        schedule and the EMA; returns the loss as a tensor (no host sync)."""
        self._in_step = self.step + 1
        loss = self.train_step(lr, hr)
        self.scheduler.step()
        self.step += 1
        if self.ema_model is not None:
            self.update_ema()
        self._in_step = None
        return loss

    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "config": dict(self.model_cfg),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            **({"params_ema": {k: v.detach().cpu() for k, v in self.ema_model.state_dict().items()}}
               if self.ema_model is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "epoch": self.step / self.ipe,
            "best_psnr": self.best_psnr,
            "rng": rng_state(),
            "data": {"seed": self.cfg.seed, "global_batch": self.cfg.batch_size, "patch": self.cfg.patch_size,
                     "position": self.step * self.cfg.batch_size, "n_images": len(self.dataset)},
            "args": {k: _plain(v) for k, v in dataclasses.asdict(self.cfg).items()},
        }

    def save(self, name: str = "last.pt") -> str:
        """Write a checkpoint; weights that went NaN or infinite (a diverged run) stop training
        instead, with ValueError, and the checkpoint already there is kept."""
        path = os.path.join(self.cfg.out, name)
        models = [self.model] + ([self.ema_model] if self.ema_model is not None else [])
        bad = [k for m in models for k, v in m.state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            kept = f"{path} was not overwritten" + (f" (it holds step {self._saved[name]})" if name in self._saved else "")
            raise ValueError(f"step {self.step}: the weights became NaN or infinite ({bad[0]}"
                             + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                             + f"): the training diverged; {kept}. Try a lower --lr")
        if self.main:
            atomic_save(self.state_dict(), path)
        self._saved[name] = self.step
        return path

    @torch.no_grad()
    def validate(self) -> float | None:
        if not self.val_pairs:
            return None
        model = self.ema_model if self.ema_model is not None else self.model
        was = model.training
        model.eval()
        res = evaluate_pairs(model, {**self.model_cfg, "scale": self.cfg.scale}, self.val_pairs,
                             device=self.device, bicubic=True, bicubic_cache=self.val_bicubic,
                             loaded=self.val_data, log=self.log)
        model.train(was)
        psnr = res["mean"]["psnr"]
        best = psnr > self.best_psnr
        if best:
            self.best_psnr = psnr
            self.save("best.pt")
        self.log(f"step {self.step}: validation PSNR {psnr:.3f} dB{' (EMA)' if model is self.ema_model else ''}, "
                 f"bicubic {res['mean']['bicubic_psnr']:.3f} dB (Y, {len(self.val_pairs)} images)"
                 + (" (best)" if best else ""))
        return psnr

    # ------------------------------------------------------------------------------ loop
    def fit(self) -> int:
        cfg = self.cfg
        save_every = cfg.save_every or self.ipe
        val_every = cfg.val_every or self.ipe
        self.model.train()
        self._progress = Progress(self.total, self.step, enabled=self.main and cfg.progress,
                                  every=cfg.log_every, interval=cfg.log_interval)
        loss_sum, loss_n = torch.zeros((), device=self.device), 0
        stopped_by = None
        first_step = self.step
        try:
            with StopRequest() as stop:
                for lr, hr in self.loader:
                    loss = self.advance(lr, hr)
                    loss_sum += loss
                    loss_n += 1
                    shown = self._progress.due(self.step)
                    fields = {}
                    if shown:
                        fields = {"loss": loss_sum.item() / loss_n, "lr": float(self.scheduler.get_last_lr()[0]),
                                  "epoch": f"{self.step / self.ipe:.2f}"}
                        loss_sum.zero_()
                        loss_n = 0
                    self._progress.update(self.step, cfg.batch_size, **fields)
                    saved = self.step % save_every == 0 or self.step == self.total
                    if saved:
                        self.save()
                    if self.val_pairs and self.step % val_every == 0:
                        self.validate()
                    if self.world > 1 and cfg.val_hr_dir and self.step % val_every == 0:
                        dist.barrier()
                    stopped_by = self._agreed_stop(stop.signum)
                    if stopped_by is not None:
                        if not saved:
                            self.save()
                        break
        except KeyboardInterrupt:
            # A second Ctrl-C lands anywhere: inside a step, some weights, moments or the count are
            # updated and others not, and such a checkpoint would not resume the run.
            if self._in_step is not None:
                held = self._saved.get("last.pt")
                self.log(f"interrupted in step {self._in_step}: last.pt not written"
                         + (f" (it holds step {held})" if held is not None else ""))
                raise
            self.save()
            self.log(f"interrupted: saved step {self.step} to {os.path.join(cfg.out, 'last.pt')}")
            raise
        finally:
            self._progress.close()
            self._progress = None
        if stopped_by is not None:
            self.log(f"stopped by {signal.Signals(stopped_by).name}: saved step {self.step} to "
                     f"{os.path.join(cfg.out, 'last.pt')} (resume with --resume auto)")
        elif self.step == first_step:             # resumed at or past the end: nothing trained, nothing saved
            self.log(f"nothing to train: the run is at step {self.step}, and it has {self.total} steps")
        else:
            self.log(f"done: {self.step} steps; checkpoint {os.path.join(cfg.out, 'last.pt')}")
        if self.world > 1:
            # Every rank past its last collective and rank 0's checkpoint before any tears its
            # process group down: a rank that destroyed gloo while its peer was still at work
            # aborted ("terminate called without an active exception") in 1 of 8 loaded runs.
            dist.barrier()
        if stopped_by is not None:
            return 128 + stopped_by   # the shell's code for a process ended by that signal
        return 1 if self.errors else 0

    def _agreed_stop(self, signum: int | None) -> int | None:
        """The signal that stops training after this step, if any process got one."""
        if self._stop_group is None:
            return signum
        flag = torch.tensor([signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        return int(flag.item()) or None

    def close(self) -> None:
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig | None = None, log: Callable[[str], None] | None = None, **kwargs) -> int:
    """Run training (``fastdrn train``); returns the exit code (1 if any image was skipped)."""
    if cfg is None:
        cfg = TrainConfig(**kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out}: exists and is not a folder")
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise type(e)(f"--out {cfg.out}: cannot create the folder: {e.strerror or e}") from None
    for name in CHECKPOINT_NAMES:          # found now, not at the first save after an epoch of training
        if os.path.isdir(os.path.join(cfg.out, name)):
            raise ValueError(f"--out {cfg.out}: {name} there is a folder, where the checkpoint is to be written")
    trainer = Trainer(cfg, log=log)
    try:
        t0 = time.perf_counter()
        code = trainer.fit()
        trainer.log(f"training time {time.perf_counter() - t0:.1f} s")
        return code
    finally:
        trainer.close()
