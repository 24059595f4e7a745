"""Build fastlm's CUDA C++ extension, fastlm._C, from csrc/ with ninja.

    python -m fastlm.cuda_build [--arch 80 90] [--out DIR] [--build-dir DIR] [--verbose]

Every .cu file in csrc/ is compiled by nvcc for each target (sm_80 and sm_90 by default:
A100 and H100), with warnings as errors (nvcc's, ptxas's, a register spill among them, and
the host compiler's); bindings.cpp by the host compiler with pybind11's headers; and all
are linked by nvcc into one shared module (CUDA's runtime linked statically, and no
libtorch: the kernels take raw device pointers and a stream from Python, so one build serves
every torch version). The module is written beside fastlm's own files unless --out says
otherwise; fastlm.available_backends() then reports "cuda" as built.

CI runs this on a machine without a GPU (tests/test_cuda_build.py): compiling and linking
need only nvcc. Running the kernels needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = ("80", "90")


def module_name() -> str:
    return "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        raise RuntimeError("fastlm.cuda_build: nvcc not found (put CUDA's bin/ on PATH or install the CUDA toolkit)")
    return nvcc


def _ninja() -> str:
    try:
        import ninja  # the pip package ships the binary
        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.exists():
            return str(exe)
    except ImportError:
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
    """nvcc's flags for compiling a csrc/*.cu for the SM targets ``archs``: warnings as errors
    (nvcc's, ptxas's and the host compiler's); ``warn_spills=False`` leaves out ptxas's spill
    warning (fastlm/bench/static_csrc.py, which reports spills as figures instead)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return (["-O3", "-std=c++17", *gencode, "-Werror", "all-warnings", *(WARN_SPILLS if warn_spills else ()),
             "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", f"-I{CSRC}"])


def write_ninja(build_dir: Path, out: Path, archs: tuple[str, ...]) -> Path:
    """Write build.ninja for the sources in csrc/; returns its path."""
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        raise RuntimeError(f"fastlm.cuda_build: no .cu sources in {CSRC}")
    gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
    py_include = sysconfig.get_paths()["include"]
    lines = [
        f"nvcc = {_nvcc()}",
        f"cxx = {os.environ.get('CXX', 'c++')}",
        f"nvcc_flags = {' '.join(nvcc_flags(archs))}",
        f"cxx_flags = -O2 -std=c++17 -fPIC -fvisibility=hidden -Wall -Werror -I{CSRC} "
        f"-isystem {_pybind11_include()} -isystem {py_include}",
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
        f"  command = $nvcc -shared {gencode} -o $out $in",
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


def build(out_dir: Path | None = None, build_dir: Path | None = None, archs: tuple[str, ...] = DEFAULT_ARCHS,
          verbose: bool = False) -> Path:
    """Compile and link fastlm._C; returns the path of the module. Raises RuntimeError with
    the compiler's output if any step fails."""
    out_dir = Path(out_dir) if out_dir is not None else ROOT / "fastlm"
    build_dir = Path(build_dir) if build_dir is not None else ROOT / "build" / "cuda"
    out = out_dir / module_name()
    write_ninja(build_dir, out, tuple(archs))
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
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="SM targets (default: 80 90)")
    parser.add_argument("--out", type=Path, help="folder for the module (default: fastlm's package folder)")
    parser.add_argument("--build-dir", type=Path, help="folder for objects (default: build/cuda in the checkout)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, args.build_dir, tuple(args.arch), args.verbose)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
