"""setup.py: everything is declared in pyproject.toml; this file is the hook for the
optional CUDA C++ extension fastlm._C, built from csrc/.

Only with FASTLM_BUILD_CUDA=1 does the install declare the extension; build_ext then runs
fastlm/cuda_build.py (ninja + nvcc, the same build as `python -m fastlm.cuda_build`) into the
folder setuptools collects extensions from, so that a wheel (`pip install .`) carries _C and
an editable install (`pip install -e .`) finds it beside the sources. Asked for and failing
(no nvcc, a compile error), the install fails with the build's output rather than quietly
leaving "cuda" unavailable. Without the variable (every CPU-only machine, and CI's install)
the install is pure Python and nothing CUDA runs. pybind11 and ninja reach pip's isolated
build environment through csrc/build_backend.py.
"""

import importlib.util
import os
import sys
from glob import glob
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def load_cuda_build():
    """fastlm/cuda_build.py as a standalone module: fastlm itself (which imports torch) is
    not importable mid-install, and cuda_build needs only the standard library."""
    spec = importlib.util.spec_from_file_location("_fastlm_cuda_build", HERE / "fastlm" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class BuildCudaExt(build_ext):
    """Builds fastlm._C with cuda_build (ninja + nvcc) instead of setuptools' compiler."""

    def build_extension(self, ext):
        if ext.name != "fastlm._C":
            return super().build_extension(ext)
        cuda_build = load_cuda_build()
        target = Path(self.get_ext_fullpath(ext.name))  # build/lib.../fastlm/_C.<EXT_SUFFIX>.so
        cuda_build.build(out_dir=target.parent, build_dir=Path(self.build_temp) / "cuda", filename=target.name,
                         verbose=bool(self.verbose > 1))
        return None


def ext_modules():
    if os.environ.get("FASTLM_BUILD_CUDA", "0") != "1":
        return []
    # The sources are listed for setuptools' bookkeeping (an sdist carries them); cuda_build
    # compiles every csrc/*.cu itself.
    sources = sorted(glob("csrc/*.cu")) + ["csrc/bindings.cpp"]
    return [Extension("fastlm._C", sources=sources)]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildCudaExt})
