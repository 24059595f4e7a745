"""setup.py: everything is declared in pyproject.toml; this file is the hook for the
optional CUDA C++ extension built from csrc/.

The extension is built only when FASTLM_BUILD_CUDA=1 and csrc/ holds sources and nvcc
is found (or, at any time, with `python -m fastlm.cuda_build`); otherwise (every CPU-only machine, and CI) the install is pure Python and can
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
    # The same build as `python -m fastlm.cuda_build` (ninja + nvcc), writing fastlm/_C*.so
    # beside the sources; loaded by path, since fastlm itself is not importable mid-install.
    import runpy
    builder = runpy.run_path(os.path.join("fastlm", "cuda_build.py"))
    print(f"fastlm: built {builder['build']()}")
    return []


setup(ext_modules=cuda_extensions())
