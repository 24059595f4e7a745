"""The static suite's CUDA C++ part: what nvcc and ptxas say about every csrc/ kernel (issue 19).

    python -m fastlm.bench.static csrc [--arch 90 80]   (worker; JSON rows)

Every csrc/*.cu is compiled for each sm_<arch> by nvcc with the flags of the real build
(fastlm.cuda_build.nvcc_flags, less ptxas's spill warning, which under warnings-as-errors
would fail the compile instead of reporting the spill) plus ``-Xptxas -v``. One row per
``__global__`` template instantiation (names demangled with cu++filt, or c++filt where the
toolkit has none: the mangling is the Itanium ABI's either way), labelled by the template's
element type and head dim, e.g. ``attn_bwd_dkdv_kernel<bf16, d128>``. Figures:

* regs, stack, spill_stores, static smem: ptxas -v ("Used N registers", "N bytes stack
  frame, N bytes spill stores", "N bytes smem").
* smem also counts the dynamic shared memory the host launcher requests (see
  ``_launch_config``), since that is what limits occupancy and must fit the arch.
* threads per block: the block size of the file's launches (see ``_launch_config``);
  ctas_per_sm from registers, shared memory and warps (static.ctas_per_sm).
* hmma (and hgmma, which wmma never produces): tensor-core instructions in cuobjdump -sass.
* stg_128 / stg_narrow: global stores of 16 bytes and of fewer (STG.E.128 vs STG.E, .64, .U16...)
  in the SASS: the attention kernels write their output rows 16 bytes at a time.
* wmma_ld_shared / wmma_ld_generic: the kernel's ``wmma.load`` instructions in the PTX (kept
  with -keep) with and without the ``.shared`` state space; a generic one from a shared tile
  costs a 64-bit address and registers (the bf16 fragments did, before load_shared).

Results are cached per source file and arch in static._cache_dir(), keyed by the csrc/
sources (the .cu and every header), the flags, nvcc's version and FIGURES_VERSION, so a
rerun only reads JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastlm import cuda_build

from . import static

FIGURES_VERSION = 2  # part of the cache key: bump it when the figures or their parsing change

DTYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def _tool(name: str) -> str | None:
    """A CUDA tool: beside nvcc (the real one, not a wrapper script), in /usr/local/cuda/bin,
    on PATH, or for cuobjdump the copy Triton ships."""
    nvcc = Path(cuda_build._nvcc())
    for folder in (nvcc.parent, Path(_nvcc_realpath()).parent, Path("/usr/local/cuda/bin")):
        if (folder / name).exists():
            return str(folder / name)
    if shutil.which(name):
        return shutil.which(name)
    if name == "cuobjdump":
        try:
            from triton import knobs
            return knobs.nvidia.cuobjdump.path
        except Exception:  # no Triton, or one without the knob
            return None
    return None


def _nvcc_realpath() -> str:
    """nvcc itself: /usr/local/bin/nvcc may be a shell script that execs the toolkit's."""
    nvcc = cuda_build._nvcc()
    text = Path(nvcc).read_bytes()[:4096]
    m = re.search(rb"exec\s+(\S+/nvcc)\b", text) if text.startswith(b"#!") else None
    return m[1].decode() if m else nvcc


def _demangle(names: list[str]) -> dict[str, str]:
    tool = _tool("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _flags(arch: int) -> list[str]:
    return cuda_build.nvcc_flags((str(arch),), warn_spills=False) + ["-Xptxas", "-v"]


@functools.lru_cache(maxsize=None)
def _nvcc_version() -> str:
    return subprocess.run([cuda_build._nvcc(), "--version"], capture_output=True, text=True, check=True).stdout


def _cache_key(src: Path, arch: int) -> str:
    doc = [FIGURES_VERSION, arch, _flags(arch), _nvcc_version(), src.name]
    for path in sorted(cuda_build.CSRC.glob("*.cuh")) + sorted(cuda_build.CSRC.glob("*.h")) + [src]:
        doc.append([path.name, hashlib.sha256(path.read_bytes()).hexdigest()])
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- the launchers

def _int_constants(text: str) -> dict[str, int]:
    """The file-level ``constexpr int NAME = EXPR;`` of a source, evaluated in order."""
    env: dict[str, int] = {}
    for name, expr in re.findall(r"^constexpr int (\w+) = ([^;]+);", text, re.M):
        env[name] = _eval(expr, env)
    return env


def _eval(expr: str, env: dict[str, int]) -> int:
    """An integer C++ constant expression of names, literals, + - * / and parentheses."""
    expr = expr.strip()
    if not re.fullmatch(r"[\w\s+*/()-]+", expr):
        raise ValueError(f"static_csrc: cannot evaluate {expr!r}")
    return int(eval(expr.replace("/", "//"), {"__builtins__": {}}, dict(env)))


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated parts of ``text`` (brackets and template angles nest)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _geometry(text: str, consts: dict[str, int], d: int | None, nc: int | None = None) -> dict[str, int]:
    """attention.cu's ``Geometry<D, NC>`` members (``static constexpr int NAME = EXPR;``) for
    D = d and NC = nc (the walked tiles' rows)."""
    body = re.search(r"struct Geometry \{(.*?)\n\};", text, re.S)
    env = dict(consts, D=d, NC=nc)
    if body:
        for name, expr in re.findall(r"static constexpr int (\w+) = ([^;]+);", body[1]):
            env[name] = _eval(expr, env)
    return env


def _launch_config(text: str, kernel: str, targs: list[str]) -> tuple[int, int]:
    """(threads per block, dynamic shared bytes) that the host code launches ``kernel`` with.

    Threads: every ``<<<grid, block, ...>>>`` of the file must use one block size (a file
    constant, e.g. kThreads); it is evaluated from the file's ``constexpr int``s. Dynamic
    shared memory: from the launch that names the kernel, either ``kernel<...><<<grid,
    block, SMEM, stream>>>`` or attention.cu's helper ``launch(kernel<...>, blocks, SMEM,
    ...)`` (whose own launch passes SMEM on as the third ``<<<>>>`` argument); SMEM is a file
    constant, 0, or ``Geometry<D>::NAME``, evaluated with the kernel's head dim. A kernel
    that declares ``extern __shared__`` but whose launch is not found raises: the figures
    would otherwise understate its shared memory."""
    consts = _int_constants(text)
    blocks = {_split_args(m)[1] for m in re.findall(r"<<<(.*?)>>>", text, re.S)}
    if len(blocks) != 1:
        raise RuntimeError(f"static_csrc: {kernel}: expected one block size in the file's launches, got {blocks}")
    threads = _eval(blocks.pop(), consts)
    smem_expr = None
    direct = re.search(rf"\b{kernel}<[^<>]*><<<(.*?)>>>", text, re.S)
    if direct:
        smem_expr = (_split_args(direct[1]) + ["0"])[2]
    else:
        helper = re.search(rf"\blaunch\(\s*{kernel}<[^<>]*>,(.*?)\);", text, re.S)
        if helper:
            smem_expr = _split_args(helper[1])[1]
    if smem_expr is None:
        body = re.search(rf"__global__ void[^\n]*\b{kernel}\(.*?\n}}\n", text, re.S)
        if body and "extern __shared__" in body[0]:
            raise RuntimeError(f"static_csrc: no launch of {kernel} found to read its dynamic shared memory from")
        return threads, 0
    ints = [int(t) for t in targs if t.isdigit()]
    m = re.fullmatch(r"Geometry<D(?:, NC)?>::(\w+)", smem_expr)
    if m:
        return threads, _geometry(text, consts, *(ints + [None, None])[:2])[m[1]]
    return threads, _eval(smem_expr, consts)


# ----------------------------------------------------------------------------- compiling

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'\n"
                    r"(?:.*\n)*?\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                    r".*?Used (\d+) registers([^\n]*)")


def _ptxas_figures(log: str) -> dict[str, dict]:
    figures = {}
    for m in _ENTRY.finditer(log):
        smem = re.search(r"(\d+) bytes smem", m[7])
        figures[m[1]] = {"regs": int(m[6]), "stack": int(m[3]), "spill_stores": int(m[4]), "spill_loads": int(m[5]),
                         "static_smem": int(smem[1]) if smem else 0}
    return figures


def _per_function(text: str, header: str) -> dict[str, str]:
    """Split cuobjdump's SASS or a PTX file into {mangled name: its text}."""
    pieces = re.split(header, text)
    return {pieces[i]: pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}


def _compile(src: Path, arch: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / (src.stem + ".o")
        cmd = [cuda_build._nvcc(), *_flags(arch), "-keep", "-keep-dir", tmp, "-c", str(src), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"static_csrc: nvcc failed on {src.name} for sm_{arch}:\n{done.stderr[-3000:]}")
        figures = _ptxas_figures(done.stderr)
        cuobjdump = _tool("cuobjdump")
        if cuobjdump is None:
            raise RuntimeError("static_csrc: cuobjdump not found (CUDA's bin/ or Triton's copy)")
        sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        sass_by = _per_function(sass, r"Function : (\S+)")
        ptx_files = list(Path(tmp).glob("*.ptx"))
        ptx_by = _per_function(ptx_files[0].read_text(), r"\.entry (\w+)\(") if ptx_files else {}
    text = src.read_text()
    names = _demangle(sorted(figures))
    rows = []
    for mangled, fig in figures.items():
        pretty = names[mangled]
        m = re.search(r"(\w+)<(.*?)>\(", pretty)
        if m:  # a template instantiation: kernel<type[, head dim]>
            kernel, targs = m[1], [t.strip() for t in m[2].split(",")]
        else:
            kernel, targs = pretty.split("(")[0].split("::")[-1], []
        dtype = next((DTYPES[t] for t in targs if t in DTYPES), "-")
        ints = [t for t in targs if t.isdigit()]
        d, nc = (ints + [None, None])[:2]  # attention: head dim, walked-tile rows
        threads, dyn_smem = _launch_config(text, kernel, targs)
        warps = threads // 32
        smem = fig["static_smem"] + dyn_smem
        lines = [ln for ln in sass_by.get(mangled, "").splitlines() if "/*" in ln and ";" in ln]
        ptx = ptx_by.get(mangled, "")
        rows.append({"op": src.stem, "mode": "bwd" if "bwd" in kernel else "fwd", "impl": f"cuda sm_{arch}",
                     "shape": f"head dim {d}" if d else "any", "dtype": dtype,
                     "kernel": f"{kernel}<{dtype}" + (f", d{d}" if d else "") + (f", nc{nc}" if nc else "") + ">",
                     "arch": f"sm_{arch}",
                     "warps": warps, "threads": threads, "regs": fig["regs"], "stack": fig["stack"],
                     "spill_stores": fig["spill_stores"], "spill_loads": fig["spill_loads"],
                     "smem": smem, "static_smem": fig["static_smem"], "dynamic_smem": dyn_smem,
                     "ctas_per_sm": static.ctas_per_sm(arch, fig["regs"], warps, smem),
                     "smem_ok": smem <= static.SHARED_LIMIT[arch],
                     "hgmma": sum("HGMMA" in ln for ln in lines),
                     "hmma": sum(re.search(r"\bHMMA\b", ln) is not None for ln in lines),
                     "stg_128": sum(re.search(r"\bSTG\.E\.128\b", ln) is not None for ln in lines),
                     "stg_narrow": sum(re.search(r"\bSTG\.E(\.(U8|S8|U16|S16|64))?\s", ln) is not None for ln in lines),
                     "wmma_ld_shared": len(re.findall(r"wmma\.load\.[\w.]*\.shared\.", ptx)),
                     "wmma_ld_generic": len(re.findall(r"wmma\.load\.(?![\w.]*\.shared\.)[\w.]+", ptx)),
                     "mangled": mangled, "source": src.name})
    return sorted(rows, key=lambda r: r["kernel"])


def compile_source(src: Path, arch: int) -> list[dict]:
    """The rows of one csrc/*.cu for sm_<arch>, from the cache when it has them."""
    path = static._cache_dir() / f"csrc-{src.stem}-sm{arch}-{_cache_key(src, arch)}.json"
    if path.exists():
        try:
            return [dict(r, cached=True) for r in json.loads(path.read_text())]
        except ValueError:
            pass
    start = time.perf_counter()
    rows = _compile(src, arch)
    for r in rows:
        r["compile_s"] = round(time.perf_counter() - start, 3)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)
    return [dict(r, cached=False) for r in rows]


def run_csrc(archs=(90, 80)) -> list[dict]:
    """One row per csrc/ kernel instantiation per arch (compiled in parallel, one nvcc per
    source and arch). A source that fails to compile gives a row with an error."""
    jobs = [(src, arch) for arch in archs for src in sorted(cuda_build.CSRC.glob("*.cu"))]

    def one(job):
        src, arch = job
        try:
            return compile_source(src, arch)
        except Exception as exc:  # report every failure, not just the first (a row per mode: the
            # suite keeps the rows of the modes it was asked for, and a failure belongs to both)
            return [{"op": src.stem, "mode": mode, "impl": f"cuda sm_{arch}", "shape": "-", "dtype": "-",
                     "kernel": "-", "arch": f"sm_{arch}", "error": f"{type(exc).__name__}: {str(exc)[:1000]}"}
                    for mode in ("fwd", "bwd")]

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return [row for rows in pool.map(one, jobs) for row in rows]
