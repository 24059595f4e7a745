"""`FASTLM_BUILD_CUDA=1 pip install` builds fastlm._C in a fresh virtual environment, as a user
would, under pip's default build isolation: (a) editable (`pip install -e .`, csrc/README.md's
command) and (b) a wheel (`pip install .`). So pybind11 and ninja must reach the isolated build
environment (csrc/build_backend.py adds them), the extension must land where Python finds it,
and the wheel must carry the CUDA sources for `python -m fastlm.cuda_build`. (c) Without the
variable the install is what CI's is: pure Python, no pybind11 or ninja asked for.

Each test copies the checkout (an editable build writes _C beside the sources; a copy keeps
this checkout's fastlm/ free of a module the other tests would then find), makes a venv and
installs with --no-deps (torch is big); a .pth file then lets the venv import this
interpreter's torch and the rest. FASTLM_CUDA_ARCHS=80 builds one target instead of two. pip
takes setuptools, pybind11 and ninja from the package index, as CI's own install does; a
failing pip fails the test with pip's output. Measured on 2 cores (busy or not): (a) 50-95 s,
(b) 50-100 s, (c) 9-14 s.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from fastlm import cuda_build

from .test_cuda_build import ENTRY_POINTS

pytestmark = pytest.mark.slow

CHECKOUT = Path(cuda_build.__file__).resolve().parent.parent
SHIPPED = ("*.cu", "*.cuh", "*.h", "*.cpp", "*.md")  # pyproject.toml's package-data of fastlm.csrc

# What the test reads from inside the venv, as JSON.
PROBE = r"""
import json, sys
import fastlm
from fastlm import cuda_build
from fastlm.ops import _cuda
try:
    import fastlm._C as C
except ImportError as exc:
    C, error = None, str(exc)
else:
    error = None
print(json.dumps({
    "fastlm": fastlm.__file__, "error": error, "C": C and C.__file__, "abi": C and C.ABI, "want_abi": _cuda.ABI,
    "entry_points": {n: callable(getattr(C, n, None)) for n in sys.argv[1:]},
    "csrc": str(cuda_build.CSRC), "in_checkout": cuda_build.IN_CHECKOUT,
    "build_dir": str(cuda_build.default_build_dir()),
    "sources": sorted(p.name for p in cuda_build.CSRC.iterdir()),
    "cuda_error": fastlm.backend._cuda_extension_error(),  # None where a GPU runs it
}))
"""


def copy_checkout(dest: Path) -> Path:
    """The files an install reads (pyproject.toml's packages, setup.py, the readme), without
    build products (a built _C, __pycache__, egg-info)."""
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("fastlm", "kernels", "csrc"):
        shutil.copytree(CHECKOUT / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(CHECKOUT / name, dest / name)
    return dest


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def fresh_venv(path: Path) -> tuple[Path, Path]:
    """A new venv at ``path`` whose interpreter also sees this one's site-packages (torch,
    numpy, ...) after its own, through a .pth file; returns (its python, its site-packages)."""
    done = run([sys.executable, "-m", "venv", path])
    assert done.returncode == 0, done.stdout + done.stderr
    python = path / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_fastlm_test_parent.pth").write_text("".join(p + "\n" for p in ours))
    return python, site


def pip_install(python: Path, src: Path, *args: str, cuda: bool) -> str:
    """pip install ``args`` ``src`` --no-deps -v with pip's default build isolation; returns
    pip's output (the build's own output included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_NO_BUILD_ISOLATION", "FASTLM_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # (and no PIP_NO_BUILD_ISOLATION: pip's default isolation)
    if cuda:
        env.update(FASTLM_BUILD_CUDA="1", FASTLM_CUDA_ARCHS="80")
    done = run([python, "-m", "pip", "install", "--no-deps", "-v", *args, src], env=env, cwd=src.parent)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"pip failed ({done.returncode}):\n{out[-12000:]}"
    return out


def probe(python: Path, cwd: Path) -> dict:
    cwd.mkdir(exist_ok=True)  # an empty folder: nothing importable from the working directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLM_")}
    env.update(XDG_CACHE_HOME=str(cwd / "cache"), PYTHONPATH="")
    done = run([python, "-c", PROBE, *ENTRY_POINTS], cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_requirements_installed(out: str) -> str:
    """The 'Successfully installed ...' lines of pip's isolated build environment."""
    return "\n".join(line for line in out.splitlines() if "Successfully installed" in line and "fastlm" not in line)


def assert_module(found: dict) -> None:
    assert found["error"] is None, found["error"]
    assert found["abi"] == found["want_abi"]
    assert found["entry_points"] and all(found["entry_points"].values()), found["entry_points"]
    assert found["cuda_error"] is None or "not built" not in found["cuda_error"], found["cuda_error"]


def test_editable_install_builds_the_extension(tmp_path):
    start = time.perf_counter()
    src = copy_checkout(tmp_path / "src")
    python, site = fresh_venv(tmp_path / "venv")
    out = pip_install(python, src, "-e", cuda=True)
    assert "pybind11" in build_requirements_installed(out) and "ninja" in build_requirements_installed(out), out
    assert "fastlm.cuda_build: nvcc" in out and "sm_80 and PTX compute_80" in out
    found = probe(python, tmp_path / "run")
    assert_module(found)
    # the module and the sources are the checkout's: edits to either take effect there
    assert Path(found["fastlm"]) == src / "fastlm" / "__init__.py"
    assert Path(found["C"]).parent == src / "fastlm" and Path(found["C"]).name.startswith("_C.")
    assert found["in_checkout"] and Path(found["csrc"]) == src / "csrc"
    print(f"editable CUDA install: {time.perf_counter() - start:.0f} s")


def test_wheel_install_carries_the_extension_and_the_sources(tmp_path):
    start = time.perf_counter()
    src = copy_checkout(tmp_path / "src")
    python, site = fresh_venv(tmp_path / "venv")
    out = pip_install(python, src, cuda=True)
    assert "pybind11" in build_requirements_installed(out) and "ninja" in build_requirements_installed(out), out
    found = probe(python, tmp_path / "run")
    assert_module(found)
    assert Path(found["fastlm"]) == site / "fastlm" / "__init__.py"
    assert Path(found["C"]).parent == site / "fastlm"
    # the CUDA sources ship with it, so `python -m fastlm.cuda_build` can rebuild from them,
    # with its objects outside site-packages
    assert not found["in_checkout"] and Path(found["csrc"]) == site / "fastlm" / "csrc"
    shipped = sorted({p.name for pattern in SHIPPED for p in (CHECKOUT / "csrc").glob(pattern)})
    assert set(shipped) <= set(found["sources"]) and "bindings.cpp" in shipped
    assert not Path(found["build_dir"]).is_relative_to(site)
    print(f"wheel CUDA install: {time.perf_counter() - start:.0f} s")


def test_a_cpu_install_asks_for_nothing_cuda(tmp_path):
    """Without FASTLM_BUILD_CUDA (CI's install, every CPU machine): no pybind11 or ninja in the
    build environment, no nvcc run, no extension; fastlm imports and says "cuda" is not built."""
    start = time.perf_counter()
    src = copy_checkout(tmp_path / "src")
    python, site = fresh_venv(tmp_path / "venv")
    out = pip_install(python, src, "-e", cuda=False)
    installed = build_requirements_installed(out)
    assert "setuptools" in installed and "pybind11" not in installed and "ninja" not in installed, installed
    assert "fastlm.cuda_build" not in out
    found = probe(python, tmp_path / "run")
    assert found["C"] is None and "not built" in found["cuda_error"], found
    assert not list((src / "fastlm").glob("_C*"))
    print(f"CPU install: {time.perf_counter() - start:.0f} s")
