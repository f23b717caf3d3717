"""Build script: the pure-Python package everywhere, the CUDA extension only where it can be built.

`kernels/` is installed inside the package as `fastdrn.kernels`. The extension `fastdrn._C`
(csrc/) is compiled here only when torch is importable in the build environment, is a CUDA build,
and a CUDA toolkit is found; FASTDRN_BUILD_EXT=0 skips it. Otherwise it is built on first use
(torch.utils.cpp_extension.load with ninja). No GPU is queried at build time.
"""
import importlib.util
import os
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["fastdrn", "fastdrn.integrations", "fastdrn.kernels", "fastdrn.tools"]
PACKAGE_DIR = {"fastdrn": "fastdrn", "fastdrn.kernels": "kernels"}
# Shipped weights (fastdrn/pretrained.py looks for NAME.safetensors, then NAME.pt).
PACKAGE_DATA = {"fastdrn": ["weights/README.md", "weights/*.safetensors", "weights/*.pt"]}


def extension_config():
    """fastdrn/extension.py, loaded by path: the loader and this script share its source list and
    nvcc flags, and importing the fastdrn package itself would need all of its dependencies."""
    path = os.path.join(HERE, "fastdrn", "extension.py")
    spec = importlib.util.spec_from_file_location("_fastdrn_extension_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_build():
    """(ext_modules, cmdclass) for the CUDA extension, or empty ones with a warning saying why not."""
    build = os.environ.get("FASTDRN_BUILD_EXT", "1").strip()
    if build not in ("0", "1"):  # as fastdrn's other on/off settings: "no" or "false" would build
        raise SystemExit(f"fastdrn: FASTDRN_BUILD_EXT={build!r}: 1 (the default: build the CUDA extension now) "
                         "or 0 (build it on first use)")
    if build == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except Exception as exc:
        warnings.warn(f"fastdrn: not building the CUDA extension now (torch not importable in the build: {exc}); "
                      "it will be built on first use")
        return [], {}
    config = extension_config()
    skip = config.cuda_build_skip_reason()
    if skip is not None:
        warnings.warn(f"fastdrn: not building the CUDA extension now ({skip}); it will be built on first use")
        return [], {}
    sources, nvcc_flags = config.build_config(cuda=True)
    ext = CUDAExtension(
        "fastdrn._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules,
      cmdclass=cmdclass)
