"""Build script: the pure-Python package everywhere, the CUDA extension only where it can be built.

`kernels/` is installed inside the package as `fastdrn.kernels`. The extension `fastdrn._C`
(csrc/) is compiled here only when torch is importable in the build environment, is a CUDA build,
and a CUDA toolkit is found; FASTDRN_BUILD_EXT=0 skips it. Otherwise it is built on first use
(torch.utils.cpp_extension.load with ninja). No GPU is queried at build time.
"""
import os
import warnings

from setuptools import setup

PACKAGES = ["fastdrn", "fastdrn.kernels"]
PACKAGE_DIR = {"fastdrn": "fastdrn", "fastdrn.kernels": "kernels"}


def extension_build():
    """(ext_modules, cmdclass) for the CUDA extension, or empty ones with a warning saying why not."""
    if os.environ.get("FASTDRN_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:
        warnings.warn(f"fastdrn: not building the CUDA extension now (torch not importable in the build: {exc}); "
                      "it will be built on first use")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        warnings.warn("fastdrn: not building the CUDA extension now (needs a CUDA build of torch and a CUDA "
                      "toolkit); it will be built on first use")
        return [], {}
    from fastdrn_build import extension_sources, nvcc_arch_flags

    ext = CUDAExtension(
        "fastdrn._C",
        sources=extension_sources(cuda=True),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *nvcc_arch_flags()]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
