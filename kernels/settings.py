"""Launch settings (docs/launch-path.md): FASTDRN_NUM_WARPS, FASTDRN_AUTOTUNE,
FASTDRN_WEIGHT_GRAD_BLOCKS, FASTDRN_FOLD_BACKWARD and FASTDRN_FUSE_TAIL (read once, at the first
launch) and FASTDRN_LAUNCH_PLANS (at the first planned region), and their setters.

Apart from the kernels, and importing neither Triton nor them: `fastdrn.kernels.set_launch_options`
and `set_launch_plans` work where Triton is missing (the model runs PyTorch's math there), and
calling them does not decorate the kernels, which would fix TRITON_INTERPRET's reading before a
script sets it.
"""
from __future__ import annotations

import contextlib
import os
import sys

WEIGHT_GRAD_BLOCKS = (1, 2, 3)  # blocks whose weight gradients one launch may compute (gemm: 9 problems)


def _check_weight_grad_blocks(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in WEIGHT_GRAD_BLOCKS:
        raise ValueError(f"{name}={value!r}: the weight gradients of 1, 2 or 3 blocks go in one launch")
    return value


class LaunchOptions:
    """How GPU launches pick their config: `num_warps` pins pinned_config(configs, num_warps) (None:
    no pin), `autotune` False runs the default (the first listed config) instead of autotuning.
    How a group's training backward is scheduled (docs/kernels.md): `weight_grad_blocks`, how many
    consecutive blocks share one weight-gradient launch and one sum (1: each block its own two, the
    schedule before; 3: a DRN group of 9 blocks launches 24 kernels backward instead of 36, and
    keeps three blocks' backward intermediates alive at once instead of one's); `fold_backward`,
    whether the forward saves each block's squeeze output a (F values a pixel more) so that each
    block's input-gradient kernel also computes the previous block's g_b and the pair kernel goes
    (16 launches a group of 9). Both defaults won on an H200 (bench/results/2026-11-28c-h200): the
    fold took 6.6% off a graphed DRN training step, at 25% more peak memory without graphs.
    `fuse_tail`, whether fastdrn.DRN's inference runs its pixel shuffle and tail conv as one Triton
    kernel (kernels/shuffle_tail.py) where no gradient is needed; off by default until a GPU has
    timed it."""

    def __init__(self, num_warps: int | None, autotune: bool, weight_grad_blocks: int = 3,
                 fold_backward: bool = True, fuse_tail: bool = False):
        self.num_warps = num_warps
        self.autotune = autotune
        self.weight_grad_blocks = weight_grad_blocks
        self.fold_backward = fold_backward
        self.fuse_tail = fuse_tail
        # Every setting, in order (never changed: set_launch_options makes a new LaunchOptions): what
        # a captured graph's key holds (fastdrn/graphs.py) and what launch_settings restores.
        self.key = (num_warps, autotune, weight_grad_blocks, fold_backward, fuse_tail)

    def as_dict(self) -> dict:
        """The settings by name, as set_launch_options takes them."""
        return dict(zip(("num_warps", "autotune", "weight_grad_blocks", "fold_backward", "fuse_tail"), self.key))

    @classmethod
    def from_environment(cls) -> "LaunchOptions":
        warps = os.environ.get("FASTDRN_NUM_WARPS", "").strip()
        if warps and (not warps.isdecimal() or int(warps) not in (1, 2, 4, 8, 16, 32)):  # isdigit takes "²"
            raise ValueError(f"FASTDRN_NUM_WARPS={warps!r} is not a power of two from 1 to 32")
        blocks = os.environ.get("FASTDRN_WEIGHT_GRAD_BLOCKS", "3").strip()
        blocks = _check_weight_grad_blocks(int(blocks) if blocks.isdecimal() else blocks, "FASTDRN_WEIGHT_GRAD_BLOCKS")
        fold = os.environ.get("FASTDRN_FOLD_BACKWARD", "1").strip()
        if fold not in ("0", "1"):
            raise ValueError(f"FASTDRN_FOLD_BACKWARD={fold!r}: 1 (the default) or 0")
        tail = os.environ.get("FASTDRN_FUSE_TAIL", "0").strip()
        if tail not in ("0", "1"):
            raise ValueError(f"FASTDRN_FUSE_TAIL={tail!r}: 0 (the default) or 1")
        autotune = os.environ.get("FASTDRN_AUTOTUNE", "1").strip()
        if autotune not in ("0", "1"):
            raise ValueError(f"FASTDRN_AUTOTUNE={autotune!r}: 1 (the default) or 0")
        return cls(int(warps) if warps else None, autotune == "1", blocks, fold == "1", tail == "1")


_options: LaunchOptions | None = None  # read from the environment at the first launch


def launch_options() -> LaunchOptions:
    """The launch settings in force: FASTDRN_NUM_WARPS, FASTDRN_AUTOTUNE, FASTDRN_WEIGHT_GRAD_BLOCKS,
    FASTDRN_FOLD_BACKWARD and FASTDRN_FUSE_TAIL as they were at the first launch of the process, unless
    set_launch_options changed them since."""
    global _options
    if _options is None:
        _options = LaunchOptions.from_environment()
    return _options


class _Unchanged:
    """set_launch_options' default: the setting keeps its current value."""

    def __repr__(self) -> str:
        return "unchanged"


UNCHANGED = _Unchanged()


def set_launch_options(num_warps=UNCHANGED, autotune=UNCHANGED, weight_grad_blocks=UNCHANGED,
                       fold_backward=UNCHANGED, fuse_tail=UNCHANGED) -> None:
    """Set what FASTDRN_NUM_WARPS, FASTDRN_AUTOTUNE, FASTDRN_WEIGHT_GRAD_BLOCKS, FASTDRN_FOLD_BACKWARD
    and FASTDRN_FUSE_TAIL set (those are read once, at the first launch); a setting not named keeps
    its current value (the environment's, if none was set before). num_warps pins that many warps
    where a kernel lists a config with them (None: no pin), autotune=False runs each kernel's
    default config, weight_grad_blocks (1 to 3) is how many blocks of a group's backward share one
    weight-gradient launch, fold_backward=False recomputes each block's a in the backward (the pair
    kernel) instead of saving it, fuse_tail=True runs fastdrn.DRN's pixel shuffle and tail conv as
    one kernel (kernels/shuffle_tail.py) at inference, where no gradient is needed (the upsampler
    conv then runs without its bias, which the kernel adds). Takes effect at the next launch (a
    group's forward and its backward: a forward run before keeps its schedule); forgets every
    launch remembered so far."""
    global _options
    if num_warps is not UNCHANGED and num_warps is not None and (
            isinstance(num_warps, bool) or num_warps not in (1, 2, 4, 8, 16, 32)):
        raise ValueError(f"num_warps={num_warps!r} is not a power of two from 1 to 32")
    for name, value in (("autotune", autotune), ("fold_backward", fold_backward), ("fuse_tail", fuse_tail)):
        if value is not UNCHANGED and not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: True or False")
    if weight_grad_blocks is not UNCHANGED:
        _check_weight_grad_blocks(weight_grad_blocks, "weight_grad_blocks")
    given = dict(num_warps=num_warps, autotune=autotune, weight_grad_blocks=weight_grad_blocks,
                 fold_backward=fold_backward, fuse_tail=fuse_tail)
    if any(value is UNCHANGED for value in given.values()):
        now = launch_options().as_dict()  # the environment's, where nothing was set yet
        given = {name: now[name] if value is UNCHANGED else value for name, value in given.items()}
    _options = LaunchOptions(**given)
    common = sys.modules.get(f"{__package__}._common")
    if common is not None:  # the kernels are imported: what they keep was launched under the old settings
        common.forget_launches()


@contextlib.contextmanager
def launch_settings(**changes):
    """set_launch_options(**changes) for the body of a with statement; the settings before restored
    after."""
    before = launch_options()
    set_launch_options(**changes)
    try:
        yield
    finally:
        set_launch_options(**before.as_dict())


_plans_enabled: bool | None = None  # FASTDRN_LAUNCH_PLANS, read at the first planned call


def plans_enabled() -> bool:
    """FASTDRN_LAUNCH_PLANS=0 turns launch plans off (read once), or set_launch_plans."""
    global _plans_enabled
    if _plans_enabled is None:
        value = os.environ.get("FASTDRN_LAUNCH_PLANS", "1").strip()
        if value not in ("0", "1"):
            raise ValueError(f"FASTDRN_LAUNCH_PLANS={value!r}: 1 (the default) or 0")
        _plans_enabled = value == "1"
    return _plans_enabled


def set_launch_plans(enabled: bool) -> None:
    """Turn launch plans on or off for this process (what FASTDRN_LAUNCH_PLANS sets); forgets every plan."""
    global _plans_enabled
    if not isinstance(enabled, bool):  # bool("0") is True
        raise ValueError(f"set_launch_plans: enabled={enabled!r}: True or False")
    _plans_enabled = enabled
    common = sys.modules.get(f"{__package__}._common")
    if common is not None:
        common.generation += 1  # a recording in flight in another thread keeps no plan
        common.launch_plans.clear()


def reread_plans_setting() -> None:
    """Read FASTDRN_LAUNCH_PLANS again at the next planned region (plans.reset, for tests)."""
    global _plans_enabled
    _plans_enabled = None
