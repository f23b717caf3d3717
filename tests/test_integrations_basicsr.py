"""fastdrn.integrations.basicsr: DRN in BasicSR's ARCH_REGISTRY. The real registry where BasicSR is
installed (skipped cleanly where it is not); the registration logic against BasicSR's registry
interface (register(obj) under obj.__name__, `in`, get) everywhere."""
import importlib
import sys
import types

import pytest
import torch

import fastdrn


class _Registry:
    """BasicSR's basicsr.utils.registry.Registry interface: a duplicate name is an AssertionError."""

    def __init__(self):
        self._obj_map = {}

    def register(self, obj):
        assert obj.__name__ not in self._obj_map, f"An object named '{obj.__name__}' was already registered"
        self._obj_map[obj.__name__] = obj

    def get(self, name):
        return self._obj_map[name]

    def __contains__(self, name):
        return name in self._obj_map


def _import_with(monkeypatch, registry):
    utils = types.ModuleType("basicsr.utils")
    reg_mod = types.ModuleType("basicsr.utils.registry")
    reg_mod.ARCH_REGISTRY = registry
    monkeypatch.setitem(sys.modules, "basicsr", types.ModuleType("basicsr"))
    monkeypatch.setitem(sys.modules, "basicsr.utils", utils)
    monkeypatch.setitem(sys.modules, "basicsr.utils.registry", reg_mod)
    monkeypatch.delitem(sys.modules, "fastdrn.integrations.basicsr", raising=False)
    return importlib.import_module("fastdrn.integrations.basicsr")


def test_registration_against_basicsrs_registry_interface(monkeypatch):
    registry = _Registry()
    integration = _import_with(monkeypatch, registry)
    assert registry.get("DRN") is fastdrn.DRN
    integration.register(registry)                                   # again: harmless
    # BasicSR's build_network: ARCH_REGISTRY.get(opt.pop("type"))(**opt)
    opt = {"type": "DRN", "scale": 2, "n_feats": 8, "n_groups": 1, "n_blocks": 1, "inner": 8, "distill": 4}
    net = registry.get(opt.pop("type"))(**opt)
    assert isinstance(net, fastdrn.DRN) and net(torch.rand(1, 3, 5, 6)).shape == (1, 3, 10, 12)
    other = _Registry()
    other.register(type("DRN", (), {}))                              # someone else's DRN is not replaced
    with pytest.raises(RuntimeError, match="already holds another 'DRN'"):
        integration.register(other)


def test_without_basicsr_the_import_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "basicsr", None)
    monkeypatch.setitem(sys.modules, "basicsr.utils.registry", None)
    monkeypatch.delitem(sys.modules, "fastdrn.integrations.basicsr", raising=False)
    with pytest.raises(ImportError, match="pip install basicsr"):
        importlib.import_module("fastdrn.integrations.basicsr")


def test_real_basicsr_registry():
    pytest.importorskip("basicsr.utils.registry", reason="BasicSR is not installed (optional)")
    sys.modules.pop("fastdrn.integrations.basicsr", None)
    importlib.import_module("fastdrn.integrations.basicsr")
    from basicsr.utils.registry import ARCH_REGISTRY
    assert ARCH_REGISTRY.get("DRN") is fastdrn.DRN
