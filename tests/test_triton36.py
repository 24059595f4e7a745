"""Every Triton kernel variant compiles with Triton 3.6, the version on the GPU machine, as well
as with the version this environment has (tests/test_gpu_compile.py), so that an API newer than
3.6 fails here and not in the GPU's few minutes.

A second virtual environment, .venv-triton36 in the checkout (git-ignored, reused while it
holds triton 3.6.0), gets triton==3.6.0 alone; torch, numpy and fastlm come from this
environment through a .pth file that adds this environment's site-packages as a site folder
*after* its own, so ``import triton`` finds 3.6.0 first (the CPU torch wheel does not pin
triton, and torch imports triton only when asked). pip takes the wheel from the package index,
pip's cache, or the folder FASTLM_TRITON36_WHEELS names (pip --find-links); the test is skipped
only when none of them can provide it (no network), and says so.

The kernels compile for sm_90 (the H200's) here; sm_80 is compiled with the current Triton by
tests/test_gpu_compile.py. An API newer than 3.6 fails either way, at half the compile time.

Under Triton 3.6 the interpreter is not tried: with the current numpy it fails inside the
interpreter on some kernels ("only 0-dimensional arrays can be converted to Python scalars"),
and compiling is what the GPU does.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-triton36"
VERSION = "3.6.0"
PTH = "zz_fastlm_main_environment.pth"
# What pip says when it cannot reach the index (then, and only then, the test is skipped).
OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable",
           "ProxyError", "connection broken", "Max retries exceeded", "Could not fetch URL")


def _python() -> Path:
    return VENV / "bin" / "python"


def _env() -> dict:
    # Compiling needs the real compiler: the interpreter (conftest.py sets it) compiles nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _triton_version() -> str:
    if not _python().exists():
        return ""
    out = subprocess.run([str(_python()), "-c", "import triton, torch; print(triton.__version__, triton.__file__)"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    return out.stdout.strip() if out.returncode == 0 else ""


def _link_this_environment() -> None:
    """The .pth that makes torch, numpy and fastlm (editable install included) importable."""
    site = subprocess.run([str(_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=_env()).stdout.strip()
    main = sysconfig.get_paths()["purelib"]
    (Path(site) / PTH).write_text(f"import site; site.addsitedir({main!r})\n")


@pytest.fixture(scope="module")
def triton36():
    if _triton_version().startswith(VERSION + " " + str(VENV)):
        return _python()
    if not _python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=600)
    cmd = [str(_python()), "-m", "pip", "install", "-q", "--no-deps", "--retries", "1", "--timeout", "30",
           "--disable-pip-version-check", f"triton=={VERSION}"]
    wheels = os.environ.get("FASTLM_TRITON36_WHEELS")
    if wheels:
        cmd += ["--find-links", wheels]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1200)
    if out.returncode != 0:
        if any(word in out.stderr for word in OFFLINE):
            pytest.skip(f"triton=={VERSION} is not reachable (no package index, no cached wheel, "
                        f"FASTLM_TRITON36_WHEELS unset or without it): {out.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip could not install triton=={VERSION}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    _link_this_environment()
    found = _triton_version()
    assert found.startswith(VERSION + " " + str(VENV)), f"the second environment imports triton {found!r}"
    return _python()


def test_the_second_environment_imports_triton_36_first_and_this_torch(triton36):
    code = ("import sys, triton, torch, fastlm.kernels.norm, importlib.metadata as md; "
            "print(triton.__version__, md.version('triton'), torch.__version__, 'triton' in sys.modules)")
    out = subprocess.run([str(triton36), "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    triton_version, metadata_version, torch_version, _ = out.stdout.split()
    assert triton_version == metadata_version == VERSION
    import torch
    assert torch_version == torch.__version__


def test_triton_kernels_compile_with_triton_36_for_sm90(triton36):
    out = subprocess.run([str(triton36), "-m", "fastlm.kernels.compile_check", "--arch", "90"],
                         capture_output=True, text=True, env=_env(), timeout=1800, cwd=REPO)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    assert " 0 failed" in out.stdout


def test_hot_variants_do_not_spill_with_triton_36_on_sm90(triton36, tmp_path):
    """The hot variants (fastlm bench static's, as launched: real specialisation) compiled by
    Triton 3.6 for the H200's sm_90: registers allocate differently from the current Triton,
    and it is 3.6 that the GPU machine runs."""
    import json
    env = dict(_env(), FASTLM_STATIC_CACHE=str(tmp_path), FASTLM_GPU_TILES="1", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([str(triton36), "-m", "fastlm.bench.static", "compile", "--hot", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows and not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    spills = [(r["kernel"], r["op"], r["mode"], r["shape"], r["dtype"], r["stack"]) for r in rows if r["stack"]]
    assert not spills, spills
    assert all(r["smem_ok"] for r in rows)
