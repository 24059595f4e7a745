"""Run fastlm's CUDA C++ kernels on the CPU, for testing on machines without a GPU.

The kernel source is compiled unchanged by the host C++ compiler against include/emu_shim.h,
which stands in for the slice of CUDA these kernels use (its header comment has the details):
every CUDA thread is an OS thread; ``__syncthreads`` / ``__syncwarp`` are barriers and the only
points that order shared-memory accesses; warp shuffles go through a per-warp buffer behind an
internal barrier that orders nothing; an ``nvcuda::wmma`` fragment holds its whole 16 x 16
tile in every lane, but each element belongs to one lane (a fixed scrambled map), and loads
and stores touch memory only at the calling lane's elements, as the hardware divides them (the
documented pointer alignment and leading dimension are checked).

The emulator is meant to be stricter than the hardware. With ``hazards=True`` (the default)
the library is compiled with gcc's ``-fsanitize=kernel-address`` in call mode, so every memory
access calls a hook that the shim defines (no sanitizer runtime is loaded): accesses to the
running block's shared memory are checked for hazards between barriers. Each thread counts
the barriers it has passed; two accesses of different threads to the same 2-byte unit, at
least one a write, with no ``__syncthreads`` between them (nor a ``__syncwarp``, within one
warp), make the launch fail with the kind (read-after-write, write-after-read,
write-after-write), the byte offset, both threads and their barrier counts, and the code
address of the second access, named here by ``addr2line`` when it is installed. A dynamic
shared-memory access past the launch's size fails too. Limits: the checker keeps the last
write and two reads per unit (and a race between threads may drop an update), so it can miss
a hazard but never invents one; bytes within one 2-byte unit count as one location; global
memory and shared atomics are not modelled. ``sanitize=True`` builds with AddressSanitizer
instead (bounds of every access; it cannot be combined with the hazard hooks).

Two textual rewrites make the .cu file host C++: the dynamic shared-memory declaration becomes
a pointer to the block's buffer (filled with 0xff bytes, NaN in every float type, before each
block), and each ``kernel<<<grid, block, smem, stream>>>(args)`` becomes a call that runs the
blocks one after another. A static ``__shared__ T name[n];`` becomes
``T* name = emu::static_shared<T>(n, alignment);``, a slice of a per-block buffer (also
0xff-filled). The
host entry points of csrc/kernels.h (``void`` or ``std::int64_t`` functions) are exported with
C linkage and wrapped for ctypes, so ``load()`` returns an object that stands in for
``fastlm._C``. The emulated device is an sm_80 whose shared-memory opt-in
(``cudaDevAttrMaxSharedMemoryPerBlockOptin``, 163 KiB by default) ``Emulated.set_smem_optin``
changes.

What this checks: indexing, masking, loop bounds, the order of barriers and the shared-memory
accesses between them, shared-memory layout and bounds, the numerics of the algorithm. What
it cannot: the hardware (real wmma rounding, register pressure, timing, global-memory races).
Limits: one-dimensional grids and blocks; static ``__shared__`` arrays declared at the top of
a kernel (as cross_entropy.cu and norm.cu do), not inside loops; one launch at a time.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"

_CTYPES = {"int": ctypes.c_int, "std::uintptr_t": ctypes.c_uint64, "std::int64_t": ctypes.c_int64,
           "double": ctypes.c_double, "bool": ctypes.c_bool}
_RETURNS = ("void", "std::int64_t")

# gcc's kernel AddressSanitizer in call mode: a call of __asan_{load,store}*_noabort before
# every access (the shim defines them), nothing for stack or globals, no runtime library.
HAZARD_FLAGS = ["-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
                "--param", "asan-stack=0", "--param", "asan-globals=0", "-DEMU_HAZARDS=1"]
ALLOW_ENV = "FASTLM_ALLOW_NO_EMULATOR"


def _cxx() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


@functools.cache
def compiler_error() -> str | None:
    """Why the emulator (with its hazard checker) cannot be built here, or None."""
    cxx = _cxx()
    if cxx is None:
        return "no host C++ compiler (g++)"
    probe = ("#include <barrier>\nint f(int* p) { std::barrier<> b(1); _Float16 h = 1; b.arrive_and_wait();"
             " return p[1] + (int)h; }\n")
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "probe.o"
        done = subprocess.run([cxx, "-std=c++20", "-O1", "-c", "-x", "c++", "-", "-o", str(obj)], input=probe,
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"{cxx} lacks C++20 <barrier> or _Float16: {done.stderr[-300:]}"
        done = subprocess.run([cxx, "-std=c++20", "-O1", "-c", *HAZARD_FLAGS, "-x", "c++", "-", "-o", str(obj)],
                              input=probe, capture_output=True, text=True)
        if done.returncode != 0:
            return (f"{cxx} cannot build the hazard checker (-fsanitize=kernel-address with "
                    f"asan-instrumentation-with-call-threshold=0): {done.stderr[-300:]}")
        if b"__asan_load4_noabort" not in obj.read_bytes():
            return f"{cxx} -fsanitize=kernel-address did not emit __asan_load4_noabort calls (the checker's hooks)"
    return None


def require_compiler() -> None:
    """In a test: fail, naming the reason, when the emulator cannot be built here; skip
    instead (pytest -ra prints the reason) only when FASTLM_ALLOW_NO_EMULATOR=1."""
    import pytest
    why = compiler_error()
    if why is None:
        return
    message = f"the CUDA emulator cannot be built: {why}"
    if os.environ.get(ALLOW_ENV, "0") == "1":
        pytest.skip(f"{message} ({ALLOW_ENV}=1)")
    pytest.fail(f"{message}. Install g++ >= 11, or set {ALLOW_ENV}=1 to skip the emulator's tests", pytrace=False)


def host_source(cu_text: str) -> str:
    """The .cu text rewritten as host C++ for the shim (see the module docstring)."""
    src = re.sub(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];",
                 r"unsigned char* \1 = emu::shared_memory();", cu_text)
    src = re.sub(r"(?<!extern )__shared__ (?:__align__\((\d+)\) )?([\w:]+) (\w+)\[([^\]]+)\];",
                 lambda m: f"{m[2]}* {m[3]} = emu::static_shared<{m[2]}>({m[4]}, {m[1] or 16});", src)
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


def _declarations(names: list[str], header: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """(return type, [(type, name) of each parameter]) of the named entry points, from their
    declarations (or definitions) in ``header``."""
    decls = {}
    for name in names:
        m = re.search(rf"\b({'|'.join(map(re.escape, _RETURNS))}) {name}\((.*?)\)\s*[;{{]", header, re.S)
        if m is None:
            raise ValueError(f"{name} is not declared as a function returning {' or '.join(_RETURNS)}")
        params = [" ".join(p.split()) for p in m.group(2).split(",") if p.strip()]
        decls[name] = (m.group(1), [tuple(p.rsplit(" ", 1)) for p in params])
    return decls


def _wrappers(decls) -> str:
    """C entry points: each returns nullptr or the error's text; a value goes through an out-pointer."""
    lines = ["#include <exception>", "#include <string>", "static thread_local std::string emu_error;"]
    for name, (ret, params) in decls.items():
        call = ", ".join(n for _, n in params)
        sig = [f"{t} {n}" for t, n in params]
        if ret == "void":
            body = f"fastlm::{name}({call});"
        else:
            sig.append(f"{ret}* emu_result")
            body = f"*emu_result = fastlm::{name}({call});"
        lines += [f'extern "C" const char* emu_{name}({", ".join(sig)}) {{',
                  f"  try {{ {body} return nullptr; }}",
                  "  catch (const std::exception& e) { emu_error = e.what(); return emu_error.c_str(); }",
                  "}"]
    return "\n".join(lines) + "\n"


def build(out_dir: Path, source: str | Path = "attention.cu", entry_points=("attention_fwd", "attention_bwd"),
          sanitize: bool = False, hazards: bool | None = None, *, text: str | None = None,
          header: str | None = None, name: str | None = None) -> Path:
    """Compile a .cu source for the emulator into out_dir; returns the shared library.

    ``source``: a file name in csrc/ or a path; or ``text``, the source itself (then ``name``
    names the library). The entry points (in namespace fastlm) are found in ``header`` (text;
    default csrc/kernels.h, or ``text`` itself when given). ``hazards`` (default: on unless
    ``sanitize``) compiles in the shared-memory hazard checker; ``sanitize`` builds with
    AddressSanitizer instead (python must then preload libasan: tests/test_cuda_emulated.py)."""
    if hazards is None:
        hazards = not sanitize
    if hazards and sanitize:
        raise ValueError("hazards and sanitize cannot be combined (two AddressSanitizer modes)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if text is None:
        path = Path(source) if Path(source).is_absolute() else CSRC / source
        text = path.read_text()
        stem = name or path.stem
        if header is None:
            header = (CSRC / "kernels.h").read_text()
    else:
        stem = name or "kernel"
        if header is None:
            header = text
    decls = _declarations(list(entry_points), header)
    cpp = out_dir / (stem + ".emu.cpp")
    cpp.write_text(host_source(text) + _wrappers(decls))
    lib = out_dir / (stem + ".emu.so")
    cmd = [_cxx() or "c++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread",
           "-Wno-unknown-pragmas", f"-I{HERE / 'include'}", f"-I{CSRC}", "-include", "emu_shim.h",
           "-x", "c++", str(cpp), "-o", str(lib)]
    if sanitize:
        cmd[3:3] = ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    if hazards:
        cmd[3:3] = HAZARD_FLAGS
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the emulated {stem} failed:\n{done.stderr[-4000:]}")
    (out_dir / (lib.name + ".decls")).write_text(repr(decls))
    return lib


def _symbolize(message: str, lib: Path) -> str:
    """Replace each "[code+0x...]" of an emulator error by the function holding that address
    (addr2line, when installed)."""
    refs = sorted(set(re.findall(r"\[code\+(0x[0-9a-f]+)\]", message)))
    tool = shutil.which("addr2line")
    if not refs or tool is None:
        return message
    done = subprocess.run([tool, "-f", "-C", "-e", str(lib), *refs], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2 * len(refs):
        return message
    for i, ref in enumerate(refs):
        message = message.replace(f"[code+{ref}]", f"{lines[2 * i]} [code+{ref}]")
    return message


class Emulated:
    """Stands in for fastlm._C: the entry points of csrc/kernels.h, run on the CPU (pointers
    are host addresses: pass CPU tensors' data_ptr())."""

    def __init__(self, lib: Path):
        self.path = Path(lib)
        self._lib = ctypes.CDLL(str(lib))
        decls = ast.literal_eval(Path(str(lib) + ".decls").read_text())  # written by build()
        self.hazards = bool(self._lib.emu_hazards_enabled())
        self._lib.emu_set_smem_optin.argtypes = [ctypes.c_int]
        self._lib.emu_set_smem_optin.restype = None
        for name, (ret, params) in decls.items():
            fn = getattr(self._lib, f"emu_{name}")
            fn.argtypes = [_CTYPES[t] for t, _ in params] + ([ctypes.POINTER(_CTYPES[ret])] if ret != "void" else [])
            fn.restype = ctypes.c_char_p
            setattr(self, name, self._wrap(name, fn, None if ret == "void" else _CTYPES[ret]))

    def set_smem_optin(self, nbytes: int) -> None:
        """The emulated device's shared-memory opt-in per block (what
        cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) reports and
        cudaFuncSetAttribute allows); 166912 (sm_80's 163 KiB) until set."""
        self._lib.emu_set_smem_optin(int(nbytes))

    def _wrap(self, name, fn, result_type):
        def call(*args):
            out = result_type() if result_type is not None else None
            err = fn(*args, ctypes.byref(out)) if out is not None else fn(*args)
            if err is not None:
                raise RuntimeError(f"{name}: {_symbolize(err.decode(), self.path)}")
            return out.value if out is not None else None
        return call


def load(lib: Path) -> Emulated:
    return Emulated(lib)
