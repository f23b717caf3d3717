"""Use ``fastdrn.DRN`` inside BasicSR (optional: needs ``pip install basicsr``).

Importing this module registers ``fastdrn.DRN`` in BasicSR's ``ARCH_REGISTRY`` under the name
``DRN``, so that an options file can say::

    network_g:
      type: DRN
      scale: 4          # and any other constructor argument: n_feats, n_groups, inner, ...

and BasicSR's SRModel trains, validates and saves it (``{"params", "params_ema"}`` checkpoints,
which ``fastdrn.load`` and the ``fastdrn`` command read back). Import it in the script that starts
BasicSR, before the options are parsed::

    import fastdrn.integrations.basicsr  # noqa: F401  (registers DRN)
    from basicsr.train import train_pipeline
    train_pipeline(root_path=".")

Registering again is harmless; a different ``DRN`` already in the registry is an error, not a
silent replacement.
"""
from __future__ import annotations

import fastdrn

try:
    from basicsr.utils.registry import ARCH_REGISTRY
except ImportError as exc:
    raise ImportError("fastdrn.integrations.basicsr needs BasicSR: pip install basicsr "
                      f"(importing it failed: {exc})") from exc

__all__ = ["register", "ARCH_NAME"]

ARCH_NAME = "DRN"


def register(registry=ARCH_REGISTRY) -> None:
    """Put ``fastdrn.DRN`` in ``registry`` under ``DRN`` (idempotent)."""
    if ARCH_NAME in registry:
        if registry.get(ARCH_NAME) is fastdrn.DRN:
            return
        raise RuntimeError(f"BasicSR's ARCH_REGISTRY already holds another {ARCH_NAME!r} "
                           f"({registry.get(ARCH_NAME)!r}); fastdrn.DRN was not registered")
    registry.register(fastdrn.DRN)   # under its class name, DRN


register()
