"""The one list of fastdrn's Triton kernels and every configuration they can launch with on a GPU.

The ahead-of-time compile check (`python -m fastdrn.kernels.aot_check`, docs/kernels.md)
compiles everything listed here for sm_90 and sm_80. Two rules keep the list complete:

- Every module in KERNEL_MODULES exposes `aot_variants()`, a list of `Variant` records: one per
  (kernel, constexpr combination a launcher uses, launch config, dtype, integer specialization).
  `expand()` builds that cross product from a few lists; `signature()` builds a Triton signature
  from a dict of argument kinds; `launch_configs()` labels a kernel's config list with the
  FASTDRN_NUM_WARPS / FASTDRN_AUTOTUNE=0 pins that select them (kernels/_common.py `fixed_config`).
- `coverage_problems()` imports every module of the `fastdrn.kernels` package and reports every
  Triton kernel (a JIT function whose name ends in `_kernel`, bare or under autotune/heuristics)
  that has no variant, and every autotune config that no variant compiles. The check fails on any.

Adding a kernel module (e.g. kernels/residual_distill.py): add its name to KERNEL_MODULES and give
it an `aot_variants()`, for example

    def aot_variants():
        from .registry import expand, launch_configs
        return expand(my_kernel, kinds={"x_ptr": "ptr", "acc_ptr": "*fp32", "M": "i32", "alpha": "fp32",
                                        "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr"},
                      cases=[("bias", {"HAS_BIAS": True}), ("no bias", {"HAS_BIAS": False})],
                      configs=launch_configs(MY_CONFIGS),
                      div16=("M",))

Nothing here imports a kernel module at import time, so importing the registry is cheap and does
not fix the Triton mode (interpreter or JIT) of the kernels.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PACKAGE = "fastdrn.kernels"

# Modules that define Triton kernels. A module of the package that defines a `*_kernel` and is not
# listed here (or lists no variant for it) fails the check.
KERNEL_MODULES: tuple[str, ...] = (
    "fastdrn.kernels.gemm",
    "fastdrn.kernels.residual_distill",
    "fastdrn.kernels.shuffle_tail",
)

# Storage dtypes a GPU launch can see (float64 runs only under the interpreter: not compiled here).
AOT_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")

# FASTDRN_NUM_WARPS values the test suite pins (kernels/_common.py `fixed_config`).
PINNED_WARPS: tuple[int, ...] = (4, 8)

# Launch-time integer specializations compiled for every variant. Triton specializes an integer
# argument (or pointer) divisible by 16 at launch, and that changes vectorization, cp.async
# pipelining, shared memory and registers; so each variant is compiled twice:
#   "div16": every pointer and every integer named in the variant's `div16` divisible by 16 (the
#            common case: torch allocations, channel counts that are multiples of 16);
#   "plain": no divisibility (e.g. a row stride of 72 = D + d channels) except the pointers a
#            variant names `aligned`: buffers its launcher allocates itself, which are always 16-byte
#            aligned (the CUDA caching allocator aligns every block to 512 bytes). The worst case.
# Integers that equal 1 at every launch (a unit stride) are pinned as constexpr 1 in the case,
# as Triton does at launch.
SPECIALIZATIONS: tuple[str, ...] = ("div16", "plain")

SIGNATURE_KINDS = ("ptr", "i32", "i64", "fp32", "constexpr")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile of one kernel: what `triton.compile(ASTSource(...))` needs, plus labels."""

    kernel: Any                      # the triton.jit function (not an autotuner)
    config: str                      # launch config in words, e.g. "M128 N64 K32 w4 s3 [autotune 1]"
    case: str                        # constexpr combination and specialization in words
    dtype: str                       # storage dtype of the variant: "fp32", "bf16" or "fp16"
    signature: Mapping[str, str]     # every argument: "*bf16", "*fp32", "i32", "fp32" or "constexpr"
    constexprs: Mapping[str, Any]    # a value for every "constexpr" argument
    num_warps: int
    num_stages: int
    needs_mma: bool = True           # the kernel's dots must compile to tensor-core instructions
    divisible_by_16: tuple[str, ...] = ()  # arguments Triton would mark tt.divisibility=16
    specialization: str = ""         # "div16" or "plain" (SPECIALIZATIONS), also the last word of `case`

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.kernel)

    @property
    def key(self) -> str:
        return f"{self.kernel_name} | {self.config} | {self.case} | {self.dtype}"

    def attrs(self) -> dict:
        """ASTSource attrs: {(arg index,): [["tt.divisibility", 16]]} for the divisible arguments."""
        names = list(self.kernel.arg_names)
        return {(names.index(n),): [["tt.divisibility", 16]] for n in self.divisible_by_16}

    def problems(self) -> list[str]:
        """What is inconsistent with the kernel's arguments (empty when the record is usable)."""
        out = []
        names = list(self.kernel.arg_names)
        if list(self.signature) != names:
            missing = [n for n in names if n not in self.signature]
            extra = [n for n in self.signature if n not in names]
            out.append(f"signature does not match the kernel's arguments (missing {missing}, unknown {extra}"
                       f"{', order differs' if not missing and not extra else ''})")
        for name, kind in self.signature.items():
            if kind == "constexpr" and name not in self.constexprs:
                out.append(f"constexpr {name} has no value")
            if kind != "constexpr" and name in self.constexprs:
                out.append(f"{name} has a constexpr value but signature kind {kind!r}")
        for name in self.constexprs:
            if name not in self.signature:
                out.append(f"constexpr value for unknown argument {name}")
        for name in self.divisible_by_16:
            if self.signature.get(name, "constexpr") == "constexpr":
                out.append(f"divisible_by_16 names {name}, which is not a runtime argument")
        if self.dtype not in AOT_DTYPES:
            out.append(f"dtype {self.dtype!r} is not one of {AOT_DTYPES}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            out.append(f"num_warps {self.num_warps} is not a power of two up to 32")
        return out


# ---- building records ---------------------------------------------------------------------------

def signature(kinds: Mapping[str, str], dtype: str) -> dict[str, str]:
    """A Triton signature from argument kinds: "ptr" becomes a pointer to `dtype`; "*fp32" (any
    explicit pointer type), "i32", "i64", "fp32" and "constexpr" are kept as they are."""
    out = {}
    for name, kind in kinds.items():
        if kind == "ptr":
            out[name] = f"*{dtype}"
        elif kind.startswith("*") or kind in SIGNATURE_KINDS:
            out[name] = kind
        else:
            raise ValueError(f"argument {name}: unknown kind {kind!r} (use one of {SIGNATURE_KINDS} or '*<dtype>')")
    return out


def config_label(config) -> str:
    """'M128 N64 K32 w4 s3' for a triton.Config with BLOCK_M/BLOCK_N/BLOCK_K; other kwargs spelled
    out where not 0 or False (the 3x3's TILE_W and X_IN_L1 off: its configs as they were labelled)."""
    parts = []
    for name, value in config.kwargs.items():
        if not name.startswith("BLOCK_") and value in (0, False):
            continue
        short = name[len("BLOCK_"):] if name.startswith("BLOCK_") else f"{name}="
        parts.append(f"{short}{value}")
    parts += [f"w{config.num_warps}", f"s{config.num_stages}"]
    return " ".join(parts)


def launch_configs(configs: Sequence, pinned_warps: Iterable[int] = PINNED_WARPS) -> list[tuple[str, Any]]:
    """Every config a launcher can run on a GPU, as (label, triton.Config): its list (autotuned;
    the first is also what FASTDRN_AUTOTUNE=0 runs), each labelled with the FASTDRN_NUM_WARPS pins
    that select it (kernels/_common.py `pinned_config`, which only ever picks a listed config)."""
    from ._common import pinned_config

    sources: dict[int, list[str]] = {i: [f"autotune {i}"] for i in range(len(configs))}
    for warps in pinned_warps:
        pinned = pinned_config(list(configs), warps)
        sources[next(i for i, c in enumerate(configs) if c is pinned)].append(f"pinned w{warps}")
    return [(f"{config_label(config)} [{', '.join(sources[i])}]", config) for i, config in enumerate(configs)]


def expand(kernel, kinds: Mapping[str, str], cases: Sequence[tuple[str, Mapping[str, Any]]],
           configs: Sequence[tuple[str, Any]], dtypes: Sequence[str] = AOT_DTYPES, div16: Iterable[str] = (),
           needs_mma: bool = True, specializations: Sequence[str] = SPECIALIZATIONS,
           aligned: Iterable[str] = ()) -> list[Variant]:
    """The cross product cases x configs x dtypes x specializations as Variant records.

    kinds: every kernel argument in order -> "ptr" (storage dtype), "*fp32" (fixed pointer type),
    "i32", "fp32" or "constexpr". cases: (label, values) with a value for each constexpr that is
    not a config kwarg; a value for a runtime argument pins it as constexpr (e.g. a unit stride,
    {"stride_k": 1}, which Triton specializes at launch). div16: the integer arguments that are
    multiples of 16 in the "div16" specialization (pointers always are there). aligned: the pointers
    the launcher allocates itself, 16-byte aligned in every specialization.
    """
    div16, aligned = tuple(div16), tuple(aligned)
    unknown = [n for n in aligned if not kinds.get(n, "").startswith(("ptr", "*"))]
    if unknown:
        raise ValueError(f"aligned names {unknown}, which are not pointer arguments")
    out = []
    for (case_label, values), (config_text, config), dtype, spec in itertools.product(cases, configs, dtypes,
                                                                                        specializations):
        sig = signature(kinds, dtype)
        constexprs = {}
        if "PRECISION" in kinds:  # what dot_precision (kernels/_common.py) passes for this dtype
            values = {"PRECISION": "tf32x3" if dtype == "fp32" else "tf32", **values}
        for name, value in {**values, **config.kwargs}.items():
            sig[name] = "constexpr"
            constexprs[name] = value
        if spec == "div16":
            divisible = tuple(n for n, k in sig.items() if k.startswith("*") or (n in div16 and k != "constexpr"))
        elif spec == "plain":
            divisible = aligned
        else:
            raise ValueError(f"unknown specialization {spec!r} (one of {SPECIALIZATIONS})")
        out.append(Variant(kernel=kernel, config=config_text, case=f"{case_label} {spec}".strip(), dtype=dtype,
                           signature=sig, constexprs=constexprs, num_warps=config.num_warps,
                           num_stages=config.num_stages, needs_mma=needs_mma, divisible_by_16=divisible,
                           specialization=spec))
    return out


# ---- finding kernels ------------------------------------------------------------------------------

def base_function(obj):
    """The Python function under a triton.jit function, autotuner or heuristics wrapper (else None)."""
    seen = 0
    while obj is not None and not inspect.isfunction(obj) and seen < 16:
        obj = getattr(obj, "fn", None)
        seen += 1
    return obj if inspect.isfunction(obj) else None


def is_triton_kernel_object(obj) -> bool:
    """A triton.jit function (JIT or interpreter), or an autotune/heuristics wrapper of one."""
    try:
        from triton.runtime import KernelInterface
    except Exception:  # noqa: BLE001  # pragma: no cover - Triton missing: nothing to find
        return False
    return isinstance(obj, KernelInterface) and base_function(obj) is not None


def kernel_id(obj) -> str:
    fn = base_function(obj)
    return f"{fn.__module__}.{fn.__qualname__}" if fn is not None else repr(obj)


def kernel_name(obj) -> str:
    fn = base_function(obj)
    return fn.__name__ if fn is not None else repr(obj)


def package_modules(package: str = PACKAGE) -> tuple[list, list[str]]:
    """(modules, problems): every module of `package` imported, and the ones that failed to import."""
    pkg = importlib.import_module(package)
    modules, problems = [pkg], []
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        try:
            modules.append(importlib.import_module(info.name))
        except Exception as exc:  # noqa: BLE001 - any failure is a problem to report
            problems.append(f"{info.name}: import failed ({type(exc).__name__}: {exc}); its kernels cannot be checked")
    return modules, problems


def find_kernels(modules: Iterable) -> dict[str, dict]:
    """Every Triton kernel (`*_kernel`) reachable from the modules' globals, by kernel_id:
    {"name", "module", "objects": [kernel objects and wrappers found for it]}."""
    found: dict[str, dict] = {}
    for module in modules:
        for value in list(vars(module).values()):
            if not is_triton_kernel_object(value):
                continue
            name = kernel_name(value)
            if not name.endswith("_kernel"):
                continue
            entry = found.setdefault(kernel_id(value), {"name": name, "module": base_function(value).__module__,
                                                         "objects": []})
            if all(value is not o for o in entry["objects"]):
                entry["objects"].append(value)
    return found


# ---- the registry ---------------------------------------------------------------------------------

def collect_variants(module_names: Iterable[str] = KERNEL_MODULES) -> tuple[list[Variant], list[str]]:
    """(variants, problems) from every listed module's aot_variants()."""
    variants, problems = [], []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure is a problem to report
            problems.append(f"{name}: import failed ({type(exc).__name__}: {exc})")
            continue
        make = getattr(module, "aot_variants", None)
        if not callable(make):
            problems.append(f"{name} is listed in KERNEL_MODULES but has no aot_variants()")
            continue
        try:
            listed = list(make())
        except Exception as exc:  # noqa: BLE001 - any failure is a problem to report
            problems.append(f"{name}.aot_variants() raised {type(exc).__name__}: {exc}")
            continue
        for v in listed:
            if not isinstance(v, Variant):
                problems.append(f"{name}.aot_variants() returned a {type(v).__name__}, not a registry.Variant")
                continue
            problems += [f"{v.key}: {p}" for p in v.problems()]
            variants.append(v)
    seen: dict[str, int] = {}
    for v in variants:
        seen[v.key] = seen.get(v.key, 0) + 1
    problems += [f"{key}: listed {n} times" for key, n in seen.items() if n > 1]
    return variants, problems


def coverage_problems(variants: Sequence[Variant], modules: Iterable) -> list[str]:
    """Kernels with no variant, and autotune configs that no variant of their kernel compiles."""
    problems = []
    by_kernel: dict[str, list[Variant]] = {}
    for v in variants:
        by_kernel.setdefault(kernel_id(v.kernel), []).append(v)
    for kid, entry in sorted(find_kernels(modules).items()):
        registered = by_kernel.get(kid, [])
        if not registered:
            problems.append(f"unregistered kernel {entry['name']} ({kid}): no AOT variant; list its module in "
                            f"kernels/registry.py KERNEL_MODULES and give it aot_variants()")
            continue
        for obj in entry["objects"]:
            for config in getattr(obj, "configs", None) or []:
                kwargs = dict(getattr(config, "kwargs", {}))
                if not any(v.num_warps == config.num_warps and v.num_stages == config.num_stages
                           and all(v.constexprs.get(k) == val for k, val in kwargs.items()) for v in registered):
                    problems.append(f"{entry['name']}: autotune config {config_label(config)} has no AOT variant")
    return problems


def check_registry(package: str = PACKAGE, module_names: Iterable[str] = KERNEL_MODULES) -> tuple[list[Variant], list[str]]:
    """(variants, problems): the registered variants, and everything that makes the registry incomplete."""
    variants, problems = collect_variants(module_names)
    modules, import_problems = package_modules(package)
    return variants, problems + import_problems + coverage_problems(variants, modules)
