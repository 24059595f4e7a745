"""Compile every Triton kernel variant for real GPU targets, on a machine without a GPU.

The Triton interpreter, which runs the kernels in CI, never compiles them: a kernel can pass
every interpreted test and still fail to compile for a GPU (a dot smaller than 16, a type
the hardware lacks, a construct the interpreter tolerates). Triton can compile ahead of
time for a named target with the ptxas it ships, so CI does that here for sm_80 and sm_90.

    python -m fastlm.kernels.compile_check [--arch 80 90] [--only REGEX] [--no-spills REGEX]

Each variant's per-thread stack frame is read from the cubin (cuobjdump -res-usage, which
Triton ships beside ptxas); Triton kernels have no local arrays, so a stack frame means
spilled registers. --no-spills fails the variants whose name matches REGEX if they spill.

Must run without TRITON_INTERPRET (under it ``@triton.jit`` returns interpreted functions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
FAMILIES = ["norm", "cross_entropy", "attention", "matmul", "rotary", "distill", "lce_matmul"]  # each fastlm.kernels.<family> module exposes gpu_compile_variants()


def stack_bytes(cubin: bytes) -> int:
    """Per-thread stack frame of a compiled kernel, in bytes (> 0: its registers spill)."""
    from triton import knobs
    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-500:]!r}")
    return int(found[2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--only", default="", help="compile only the variants whose name matches this regex")
    parser.add_argument("--no-spills", default=None, metavar="REGEX",
                        help="fail the variants whose name matches this regex if their registers spill")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    count = 0
    start = time.perf_counter()
    for family in FAMILIES:
        module = importlib.import_module(f"fastlm.kernels.{family}")
        for kernel, signature, constexprs, options in module.gpu_compile_variants():
            options = options if isinstance(options, dict) else {"num_warps": options}
            for arch in args.arch:
                name = f"{family}.{kernel.__name__} sm_{arch} {constexprs} {options}"
                if not re.search(args.only, name):
                    continue
                count += 1
                try:
                    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                              target=GPUTarget("cuda", arch, 32), options=options)
                    if not compiled.asm.get("cubin"):
                        raise RuntimeError("no cubin produced")
                    # Shared memory is only checked at launch: a tile that needs more than
                    # the GPU has would compile here and fail there.
                    shared = compiled.metadata.shared
                    if shared > SHARED_LIMIT[arch]:
                        raise RuntimeError(f"needs {shared} bytes of shared memory, sm_{arch} has "
                                           f"{SHARED_LIMIT[arch]}")
                    if args.no_spills is not None and re.search(args.no_spills, name):
                        stack = stack_bytes(compiled.asm["cubin"])
                        print(f"stack {stack} bytes: {name}")
                        if stack:
                            raise RuntimeError(f"spills registers: {stack} bytes of stack per thread")
                except Exception as exc:  # report every failure, not just the first
                    failures += 1
                    print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    print(f"{count - failures} passed, {failures} failed ({time.perf_counter() - start:.1f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
