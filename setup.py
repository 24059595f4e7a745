"""setup.py: everything is declared in pyproject.toml; this file is the hook for the
optional CUDA C++ extension built from csrc/.

The extension is built only when FASTLM_BUILD_CUDA=1 and csrc/ holds sources and nvcc
is found; otherwise (every CPU-only machine, and CI) the install is pure Python and can
never fail because of CUDA. fastlm.available_backends() reports whether it was built.
"""

import glob
import os
import shutil

from setuptools import setup


def cuda_extensions():
    if os.environ.get("FASTLM_BUILD_CUDA", "0") != "1":
        return []
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not sources or shutil.which("nvcc") is None:
        print("fastlm: FASTLM_BUILD_CUDA=1 but csrc/ has no .cu sources or nvcc is missing; "
              "skipping the CUDA C++ extension")
        return []
    # Issue 6 fills this in (pybind11 module fastlm._C, built with ninja).
    return []


setup(ext_modules=cuda_extensions())
