"""fastlm's PEP 517 build backend: setuptools' own (setuptools.build_meta), plus pybind11 and
ninja among the build requirements when FASTLM_BUILD_CUDA=1.

Why: pip builds in an isolated environment holding only [build-system] requires, so
`FASTLM_BUILD_CUDA=1 pip install .` would not find pybind11's headers or ninja; listing them
in requires would make every CPU install download them too. pip asks the backend's
get_requires_for_build_* hooks for the extra requirements before building, so they are added
there, only when the CUDA extension is asked for. pyproject.toml names this module
(build-backend = "build_backend", backend-path = ["csrc"]: csrc/ holds no other Python, so
nothing else lands on the build's sys.path).
"""

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 (every other hook is setuptools')

CUDA_REQUIRES = ["pybind11>=2.12", "ninja"]


def _cuda_requires():
    return list(CUDA_REQUIRES) if os.environ.get("FASTLM_BUILD_CUDA", "0") == "1" else []


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cuda_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _cuda_requires()
