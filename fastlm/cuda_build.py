"""Build fastlm's CUDA C++ extension, fastlm._C, from csrc/ with ninja.

    python -m fastlm.cuda_build [--arch 80 90] [--out DIR] [--build-dir DIR] [--verbose]

Every .cu file in csrc/ is compiled by nvcc for each target, with warnings as errors (nvcc's,
ptxas's, a register spill among them, and the host compiler's); bindings.cpp by the host
compiler with pybind11's headers; and all are linked by nvcc into one shared module (CUDA's
runtime linked statically, and no libtorch: the kernels take raw device pointers and a stream
from Python, so one build serves every torch version). fastlm.available_backends() then
reports "cuda" as built.

Targets: machine code (SASS) for each sm_XX asked for — 80 and 90 by default (A100, H100);
``--arch`` or FASTLM_CUDA_ARCHS="80" (spaces or commas) narrows them — plus the PTX of the
highest one. The driver compiles that PTX at load time for a newer GPU (Blackwell's sm_100,
sm_120), which would otherwise find "no kernel image is available" for it.

nvcc: see find_nvcc (FASTLM_NVCC wins; else the toolkit whose version matches
torch.version.cuda). Sources: the checkout's csrc/ when this file runs from a checkout (or an
editable install of one), else the copy installed with the package (fastlm/csrc/). The module
is written beside fastlm's own files unless --out says otherwise; objects go to build/cuda in
a checkout, else to a per-user cache folder (never into site-packages).

`FASTLM_BUILD_CUDA=1 pip install [-e] .` runs the same build through setup.py's build_ext.
CI runs it on a machine without a GPU (tests/test_cuda_build.py, tests/test_cuda_install.py):
compiling and linking need only nvcc. Running the kernels needs a GPU.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

PACKAGE = Path(__file__).resolve().parent  # fastlm/ (a checkout's, or site-packages')
ROOT = PACKAGE.parent
# A checkout (or an editable install, which runs from one) builds from its csrc/; an installed
# fastlm from the copy shipped as the package data of fastlm.csrc (pyproject.toml).
IN_CHECKOUT = (ROOT / "pyproject.toml").is_file() and (ROOT / "csrc" / "bindings.cpp").is_file()
CSRC = ROOT / "csrc" if IN_CHECKOUT else PACKAGE / "csrc"
DEFAULT_ARCHS = ("80", "90")
SYSTEM_CUDA = "/usr/local"  # where toolkits install as cuda-X.Y/, and the cuda/ link to the default one
_ARCH = re.compile(r"(\d+)[af]?")


def module_name() -> str:
    return "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def default_archs() -> tuple[str, ...]:
    """The SM targets: FASTLM_CUDA_ARCHS (e.g. "80" or "80,90"; CI narrows the install tests
    to one to halve their compile time) if set, else DEFAULT_ARCHS."""
    value = os.environ.get("FASTLM_CUDA_ARCHS", "").replace(",", " ").split()
    if not value:
        return DEFAULT_ARCHS
    bad = [a for a in value if not _ARCH.fullmatch(a)]
    if bad:
        raise ValueError(f"FASTLM_CUDA_ARCHS: {bad} are not SM numbers (write e.g. FASTLM_CUDA_ARCHS=\"80 90\")")
    return tuple(value)


def gencode(archs: tuple[str, ...]) -> list[str]:
    """nvcc's -gencode flags: SASS for each of ``archs`` and PTX for the highest, which newer
    GPUs than any listed JIT-compile at load (forward compatibility). An arch-specific target
    ("90a") is not forward compatible, so the PTX is of its plain number (compute_90)."""
    top = ptx_arch(archs)
    return ([f"-gencode=arch=compute_{a},code=sm_{a}" for a in dict.fromkeys(archs)]
            + [f"-gencode=arch=compute_{top},code=compute_{top}"])


def ptx_arch(archs: tuple[str, ...]) -> int:
    """The virtual architecture whose PTX the module carries: the highest of ``archs``."""
    bad = [a for a in archs if not _ARCH.fullmatch(str(a))]
    if not archs or bad:
        raise ValueError(f"archs: expected SM numbers like '80' or '90a', got {list(archs)}")
    return max(int(_ARCH.fullmatch(str(a))[1]) for a in archs)


class Nvcc(NamedTuple):
    path: str
    version: Optional[tuple[int, int]]  # (major, minor) from `nvcc --version`; None if unreadable
    reason: str  # why this one, printed by the build


def nvcc_version(nvcc: str) -> Optional[tuple[int, int]]:
    """(major, minor) from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else None


def _torch_cuda() -> tuple[Optional[str], str]:
    """torch.version.cuda ("12.8"), or None and why not. Inside pip's isolated build
    environment torch is usually not importable."""
    try:
        import torch
    except Exception as exc:  # not installed, or broken: the build does not need it
        return None, f"torch is not importable here ({type(exc).__name__})"
    cuda = getattr(torch.version, "cuda", None)
    return (cuda, "") if cuda else (None, f"torch {torch.__version__} is a CPU build")


def nvcc_candidates(torch_cuda: Optional[str]) -> list[tuple[str, str]]:
    """The nvcc binaries to choose from, in order of preference, each with where it came from:
    $CUDA_HOME's, $CUDA_PATH's, /usr/local/cuda-<torch's CUDA>'s, the one on PATH, and
    /usr/local/cuda's; only those that exist, each path once."""
    found: list[tuple[str, str]] = []
    places = [(os.path.join(os.environ[v], "bin", "nvcc"), f"${v}") for v in ("CUDA_HOME", "CUDA_PATH")
              if os.environ.get(v)]
    if torch_cuda:
        places.append((os.path.join(SYSTEM_CUDA, f"cuda-{torch_cuda}", "bin", "nvcc"),
                       f"the toolkit of torch's CUDA {torch_cuda}"))
    if shutil.which("nvcc"):
        places.append((shutil.which("nvcc"), "PATH"))
    places.append((os.path.join(SYSTEM_CUDA, "cuda", "bin", "nvcc"), os.path.join(SYSTEM_CUDA, "cuda")))
    for path, where in places:
        if os.path.isfile(path) and os.access(path, os.X_OK) and path not in [p for p, _ in found]:
            found.append((path, where))
    return found


@functools.lru_cache(maxsize=None)
def _choose(explicit: str, torch_cuda: Optional[str], why_no_torch: str, _env: tuple) -> Nvcc:
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise RuntimeError(f"fastlm.cuda_build: FASTLM_NVCC={explicit!r} is not an executable file")
        return Nvcc(explicit, nvcc_version(explicit), "set by FASTLM_NVCC")
    candidates = [(p, where, nvcc_version(p)) for p, where in nvcc_candidates(torch_cuda)]
    if not candidates:
        raise RuntimeError("fastlm.cuda_build: nvcc not found (looked at $FASTLM_NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, "
                           f"PATH and {SYSTEM_CUDA}/cuda/bin; install the CUDA toolkit or set FASTLM_NVCC)")
    m = re.match(r"(\d+)\.(\d+)", torch_cuda or "")
    if m:
        want = (int(m[1]), int(m[2]))
        for p, where, v in candidates:
            if v == want:
                return Nvcc(p, v, f"from {where}: CUDA {torch_cuda}, as torch was built with")
        for p, where, v in candidates:
            if v is not None and v[0] == want[0]:
                return Nvcc(p, v, f"from {where}: the major version of torch's CUDA {torch_cuda} "
                                  f"(no {torch_cuda} toolkit found)")
        why_no_torch = f"no toolkit of torch's CUDA {torch_cuda} or its major version found"
    p, where, v = candidates[0]
    return Nvcc(p, v, f"from {where}, the first found ({why_no_torch})")


def find_nvcc() -> Nvcc:
    """The nvcc to build with. FASTLM_NVCC, if set, wins. Otherwise, of the candidates
    (nvcc_candidates), the one whose version equals torch.version.cuda (major.minor), then
    one of the same major version, then the first: the module links CUDA's runtime
    statically, and a runtime newer than the machine's driver (which torch's CUDA fits) fails
    at the first launch. A CPU build of torch, or none (mid-install), leaves the first found."""
    explicit = os.environ.get("FASTLM_NVCC", "")
    torch_cuda, why = (None, "") if explicit else _torch_cuda()
    env = tuple(os.environ.get(v, "") for v in ("CUDA_HOME", "CUDA_PATH", "PATH")) + (SYSTEM_CUDA,)
    chosen = _choose(explicit, torch_cuda, why, env)  # cached: static_csrc asks once per compile
    if not os.path.isfile(chosen.path):  # gone since: choose again
        _choose.cache_clear()
        chosen = _choose(explicit, torch_cuda, why, env)
    return chosen


def _nvcc() -> str:
    return find_nvcc().path


def _ninja() -> str:
    try:
        import ninja  # the pip package ships the binary
        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.exists():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    exe = shutil.which("ninja")
    if exe is None:
        raise RuntimeError("fastlm.cuda_build: ninja not found (pip install ninja)")
    return exe


def _pybind11_include() -> str:
    """pybind11's headers: FASTLM_PYBIND11_INCLUDE if set (pybind11 is header-only, so a copy
    of its include/ folder is enough where the package cannot be installed), else the package's."""
    if os.environ.get("FASTLM_PYBIND11_INCLUDE"):
        return os.environ["FASTLM_PYBIND11_INCLUDE"]
    try:
        import pybind11
    except ImportError as exc:
        raise RuntimeError("fastlm.cuda_build: pybind11 is not installed (pip install pybind11, or set "
                           "FASTLM_PYBIND11_INCLUDE to a copy of its include/ folder)") from exc
    return pybind11.get_include()


# ptxas reports a kernel whose registers spill to local memory; under -Werror all-warnings
# (which covers ptxas's warnings too) that fails the build.
WARN_SPILLS = ("-Xptxas", "-warn-spills")


def nvcc_flags(archs: tuple[str, ...], warn_spills: bool = True) -> list[str]:
    """nvcc's flags for compiling a csrc/*.cu for the SM targets ``archs`` (SASS for each, PTX
    for the highest): warnings as errors (nvcc's, ptxas's and the host compiler's);
    ``warn_spills=False`` leaves out ptxas's spill warning (fastlm/bench/static_csrc.py, which
    reports spills as figures instead)."""
    return (["-O3", "-std=c++17", *gencode(archs), "-Werror", "all-warnings", *(WARN_SPILLS if warn_spills else ()),
             "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", f"-I{CSRC}"])


def default_build_dir() -> Path:
    """build/cuda in a checkout; else a per-user cache folder (one per installed copy and
    Python), so that an installed fastlm never writes objects into site-packages."""
    if IN_CHECKOUT:
        return ROOT / "build" / "cuda"
    tag = f"{sys.implementation.cache_tag}-{hashlib.sha256(str(PACKAGE).encode()).hexdigest()[:12]}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlm" / f"cuda-build-{tag}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return cache
    except OSError:  # no writable home: the system's temporary folder
        return Path(tempfile.gettempdir()) / f"fastlm-cuda-build-{tag}"


def target_defines(archs: tuple[str, ...]) -> list[str]:
    """bindings.cpp's record of the targets (fastlm._C.SASS_ARCHS, PTX_ARCH): fastlm/ops/_cuda.py
    reads them to tell a device the module has machine code for from one that needs the PTX
    JIT-compiled (which a driver older than the runtime cannot do)."""
    sass = sorted({int(_ARCH.fullmatch(str(a))[1]) for a in archs})
    return [f"-DFASTLM_SASS_ARCHS={','.join(map(str, sass))}", f"-DFASTLM_PTX_ARCH={ptx_arch(archs)}"]


def write_ninja(build_dir: Path, out: Path, archs: tuple[str, ...]) -> Path:
    """Write build.ninja for the sources in csrc/; returns its path."""
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        raise RuntimeError(f"fastlm.cuda_build: no .cu sources in {CSRC}")
    py_include = sysconfig.get_paths()["include"]
    lines = [
        f"nvcc = {_nvcc()}",
        f"cxx = {os.environ.get('CXX', 'c++')}",
        f"nvcc_flags = {' '.join(nvcc_flags(archs))}",
        f"cxx_flags = -O2 -std=c++17 -fPIC -fvisibility=hidden -Wall -Werror -I{CSRC} "
        f"-isystem {_pybind11_include()} -isystem {py_include} {' '.join(target_defines(archs))}",
        "rule nvcc",
        "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule cxx",
        "  command = $cxx $cxx_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule link",
        f"  command = $nvcc -shared {' '.join(gencode(archs))} -o $out $in",
        "  description = link $out",
    ]
    objects = []
    for src in sources:
        obj = build_dir / (src.stem + ".cu.o")
        lines.append(f"build {obj}: nvcc {src}")
        objects.append(str(obj))
    bind_obj = build_dir / "bindings.o"
    lines.append(f"build {bind_obj}: cxx {CSRC / 'bindings.cpp'}")
    objects.append(str(bind_obj))
    lines.append(f"build {out}: link {' '.join(objects)}")
    lines.append(f"default {out}")
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(out_dir: Path | None = None, build_dir: Path | None = None, archs: tuple[str, ...] | None = None,
          verbose: bool = False, filename: str | None = None) -> Path:
    """Compile and link fastlm._C into ``out_dir`` (default: fastlm's package folder) as
    ``filename`` (default: module_name()); returns its path. ``archs`` defaults to
    default_archs(). Raises RuntimeError with the compiler's output if any step fails."""
    archs = tuple(archs) if archs is not None else default_archs()
    # Absolute paths: ninja runs in build_dir, and setuptools passes paths relative to the source tree.
    out_dir = Path(out_dir).resolve() if out_dir is not None else PACKAGE
    build_dir = Path(build_dir).resolve() if build_dir is not None else default_build_dir()
    out = out_dir / (filename or module_name())
    nvcc = find_nvcc()
    version = ".".join(map(str, nvcc.version)) if nvcc.version else "unknown version"
    print(f"fastlm.cuda_build: nvcc {nvcc.path} (CUDA {version}) {nvcc.reason}; "
          f"targets {', '.join('sm_' + a for a in archs)} and PTX compute_{ptx_arch(archs)}; sources {CSRC}; objects {build_dir}", flush=True)
    write_ninja(build_dir, out, archs)
    cmd = [_ninja(), "-C", str(build_dir)] + (["-v"] if verbose else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if verbose or done.returncode != 0:
        print(done.stdout, end="")
        print(done.stderr, end="", file=sys.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"fastlm.cuda_build: the build failed:\n{done.stdout}\n{done.stderr}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlm.cuda_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", help="SM targets (default: $FASTLM_CUDA_ARCHS, else 80 90)")
    parser.add_argument("--out", type=Path, help="folder for the module (default: fastlm's package folder)")
    parser.add_argument("--build-dir", type=Path,
                        help="folder for objects (default: build/cuda in a checkout, else a cache folder)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, args.build_dir, tuple(args.arch) if args.arch else None, args.verbose)
    except (RuntimeError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
