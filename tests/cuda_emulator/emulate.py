"""Run fastlm's CUDA C++ kernels on the CPU, for testing on machines without a GPU.

The kernel source is compiled unchanged by the host C++ compiler against include/emu_shim.h,
which stands in for the slice of CUDA these kernels use: every CUDA thread is an OS thread,
``__syncthreads`` / ``__syncwarp`` are barriers, warp shuffles go through a per-warp buffer,
and an ``nvcuda::wmma`` fragment holds its whole 16 x 16 tile in every lane (so its
register layout, which CUDA leaves unspecified, cannot matter; the loads and stores check
the documented pointer alignment and leading dimension). Two textual rewrites make the .cu
file host C++: the dynamic shared-memory declaration becomes a pointer to the block's buffer
(filled with 0xff bytes, NaN in every float type, before each block), and each
``kernel<<<grid, block, smem, stream>>>(args)`` becomes a call that runs the blocks one after
another. A static ``__shared__ T name[n];`` becomes ``T* name = emu::static_shared<T>(n);``, a
slice of a per-block buffer (also 0xff-filled). The host entry points of csrc/kernels.h are
exported with C linkage and wrapped for ctypes, so ``load()`` returns an object that stands in
for ``fastlm._C``.

What this checks: indexing, masking, loop bounds, the order of barriers, shared-memory
layout and bounds (with ``sanitize=True`` AddressSanitizer watches every access), the
numerics of the algorithm. What it cannot: the hardware (real wmma rounding, register
pressure, timing, races that the barrier schedule happens to hide). Limits: one-dimensional
grids and blocks; static ``__shared__`` arrays declared at the top of a kernel (as
cross_entropy.cu and norm.cu do), not inside loops.
"""

from __future__ import annotations

import ast
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"

_CTYPES = {"int": ctypes.c_int, "std::uintptr_t": ctypes.c_uint64, "std::int64_t": ctypes.c_int64,
           "double": ctypes.c_double, "bool": ctypes.c_bool}


def compiler_error() -> str | None:
    """Why the emulator cannot be built here, or None."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return "no host C++ compiler (g++)"
    probe = "#include <barrier>\nint main() { std::barrier<> b(1); _Float16 h = 1; b.arrive_and_wait(); return (int)h - 1; }\n"
    done = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-", "-o", "/dev/null"], input=probe, capture_output=True,
                          text=True)
    return None if done.returncode == 0 else f"{cxx} lacks C++20 <barrier> or _Float16: {done.stderr[-300:]}"


def host_source(cu_text: str) -> str:
    """The .cu text rewritten as host C++ for the shim (see the module docstring)."""
    src = re.sub(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];",
                 r"unsigned char* \1 = emu::shared_memory();", cu_text)
    src = re.sub(r"(?<!extern )__shared__ (?:__align__\(\d+\) )?([\w:]+) (\w+)\[([^\]]+)\];",
                 r"\1* \2 = emu::static_shared<\1>(\3);", src)
    out, pos = [], 0
    while (i := src.find("<<<", pos)) >= 0:
        j = src.find(">>>", i)
        start = src.rfind("\n", 0, i) + 1
        indent = len(src[start:]) - len(src[start:].lstrip())
        kernel, config = src[start + indent:i], src[i + 3:j]
        if src[j + 3] != "(":
            raise ValueError(f"unexpected launch syntax near: {src[start:j + 20]!r}")
        end = src.find(");", j)
        out.append(src[pos:start + indent])
        out.append(f"emu::launch_kernel({kernel}, {config}, {src[j + 4:end]});")
        pos = end + 2
    out.append(src[pos:])
    return "".join(out)


def _declarations(names: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(type, name) of each parameter of the named entry points in csrc/kernels.h."""
    header = (CSRC / "kernels.h").read_text()
    decls = {}
    for name in names:
        m = re.search(rf"void {name}\((.*?)\);", header, re.S)
        if m is None:
            raise ValueError(f"{name} is not declared in csrc/kernels.h")
        params = [" ".join(p.split()) for p in m.group(1).split(",")]
        decls[name] = [tuple(p.rsplit(" ", 1)) for p in params]
    return decls


def _wrappers(decls) -> str:
    lines = ["#include <exception>", "#include <string>", "static thread_local std::string emu_error;"]
    for name, params in decls.items():
        sig = ", ".join(f"{t} {n}" for t, n in params)
        call = ", ".join(n for _, n in params)
        lines += [f'extern "C" const char* emu_{name}({sig}) {{',
                  f"  try {{ fastlm::{name}({call}); return nullptr; }}",
                  "  catch (const std::exception& e) { emu_error = e.what(); return emu_error.c_str(); }",
                  "}"]
    return "\n".join(lines) + "\n"


def build(out_dir: Path, source: str = "attention.cu", entry_points=("attention_fwd", "attention_bwd"),
          sanitize: bool = False) -> Path:
    """Compile csrc/<source> for the emulator into out_dir; returns the shared library."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decls = _declarations(list(entry_points))
    cpp = out_dir / (Path(source).stem + ".emu.cpp")
    cpp.write_text(host_source((CSRC / source).read_text()) + _wrappers(decls))
    lib = out_dir / (Path(source).stem + ".emu.so")
    cmd = [shutil.which("g++") or "c++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread",
           "-Wno-unknown-pragmas", f"-I{HERE / 'include'}", f"-I{CSRC}", "-include", "emu_shim.h",
           "-x", "c++", str(cpp), "-o", str(lib)]
    if sanitize:
        cmd[3:3] = ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the emulated {source} failed:\n{done.stderr[-4000:]}")
    (out_dir / (lib.name + ".decls")).write_text(repr(decls))
    return lib


class Emulated:
    """Stands in for fastlm._C: the entry points of csrc/kernels.h, run on the CPU (pointers
    are host addresses: pass CPU tensors' data_ptr())."""

    def __init__(self, lib: Path):
        self._lib = ctypes.CDLL(str(lib))
        decls = ast.literal_eval(Path(str(lib) + ".decls").read_text())  # written by build()
        for name, params in decls.items():
            fn = getattr(self._lib, f"emu_{name}")
            fn.argtypes = [_CTYPES[t] for t, _ in params]
            fn.restype = ctypes.c_char_p
            setattr(self, name, self._wrap(name, fn))

    @staticmethod
    def _wrap(name, fn):
        def call(*args):
            err = fn(*args)
            if err is not None:
                raise RuntimeError(f"{name}: {err.decode()}")
        return call


def load(lib: Path) -> Emulated:
    return Emulated(lib)
