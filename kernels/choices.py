"""Kernel variants kept side by side until a GPU run has timed them; then the loser is deleted.

Each entry names the variants of one piece of work, the default first. The choice is read from
FASTDRN_KERNELS (e.g. ``FASTDRN_KERNELS=weight_grad=split64``) the first time it is asked for, or set
with `choose` (benchmarks time every variant in one process). Every variant's kernels are in the
AOT registry, so each one compiles for sm_90 and sm_80 whichever is chosen.
"""
from __future__ import annotations

import contextlib
import os

from . import _common

VARIANTS: dict[str, tuple[str, ...]] = {
    # tiles: 64 x 64 tiles over whole channel blocks, about 256 programs, partials stored tile-major
    #        (coalesced) and scattered into the weight's layout by the sum.
    # split64: the first design: 64 x 16 tiles, about 512 programs, partials in the weight's layout.
    "weight_grad": ("tiles", "split64"),
}

_chosen: dict[str, str] = {}


def parse(text: str) -> dict[str, str]:
    """'weight_grad=split64' -> {kind: variant}, every name checked."""
    picked = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, name = item.partition("=")
        kind, name = kind.strip(), name.strip()
        if kind not in VARIANTS or name not in VARIANTS[kind]:
            known = "; ".join(f"{k}={'|'.join(v)}" for k, v in VARIANTS.items())
            raise ValueError(f"kernel variants {text!r}: {item!r} is not a known variant ({known})")
        picked[kind] = name
    return picked


def _from_environment() -> dict[str, str]:
    return parse(os.environ.get("FASTDRN_KERNELS", "").strip())


def chosen(kind: str) -> str:
    """The variant of `kind` that launches."""
    if not _chosen:
        _chosen.update({k: v[0] for k, v in VARIANTS.items()})
        _chosen.update(_from_environment())
    return _chosen[kind]


def choose(kind: str, name: str) -> str:
    """Select a variant for this process; returns the one it replaces."""
    if name not in VARIANTS.get(kind, ()):
        raise ValueError(f"{kind!r} has no variant {name!r}; known: {VARIANTS.get(kind, ())}")
    previous = chosen(kind)
    _chosen[kind] = name
    _common.launch_plans.clear()  # recorded with the previous variant
    return previous


@contextlib.contextmanager
def using(spec: str):
    """Run a block with the variants of `spec` ('kind=name,...'), then restore the previous ones."""
    previous = {kind: choose(kind, name) for kind, name in parse(spec).items()}
    try:
        yield
    finally:
        for kind, name in previous.items():
            choose(kind, name)
