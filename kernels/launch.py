"""Launch settings shared by every Triton kernel: block sizes, warps, program counts, outputs.

One place decides how a row-wise kernel is shaped, so every op is tuned the same way.
Device properties are queried on the first call that needs them and cached per device;
nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# A row of up to this many elements is held in registers in one block; wider rows are
# processed in chunks of this size (two or three passes over the row).
MAX_FUSED_BLOCK = 16384


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_block(n: int, max_block: int | None = None) -> tuple[int, bool]:
    """(BLOCK_N, single) for a row of ``n`` elements: single=True when one block covers it.

    Blocks are at least 16 wide: smaller ones run in the interpreter but do not compile
    for every GPU op.
    """
    cap = MAX_FUSED_BLOCK if max_block is None else max_block
    block = max(16, next_power_of_2(n))
    if block <= cap:
        return block, True
    return cap, False


def row_warps(block_n: int) -> int:
    """Warps for a row-wise kernel over a block of ``block_n`` elements (8 to 32 per thread)."""
    return int(min(16, max(1, block_n // 256)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# FASTLM_GPU_TILES=1: kernels on a CPU tensor (the interpreter) launch with the tiles, warps
# and program counts a GPU gets, instead of the small 16-wide tiles that make small tests
# cross every block edge. CI runs a subset of the kernel tests so (tests/test_gpu_tiles.py),
# so the shapes only a GPU would launch (BLOCK_M != BLOCK_N, half-height dK/dV tiles, wide
# row blocks) execute somewhere without one.
GPU_TILES_ENV = "FASTLM_GPU_TILES"
# The SM count assumed where the GPU's choices are made without a GPU (an H100 SXM's).
NOMINAL_SM_COUNT = 132


def gpu_tiles(device) -> bool:
    """Whether a kernel launched for a tensor on ``device`` takes the GPU's launch settings:
    always on a CUDA device, and anywhere while FASTLM_GPU_TILES=1 (read at every call).
    Every tile picker asks this, so "GPU or not" is decided here only."""
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get(GPU_TILES_ENV, "0") == "1"


@contextlib.contextmanager
def use_gpu_tiles(enabled: bool = True):
    """Sets FASTLM_GPU_TILES for the block (tests); the previous value comes back after.
    It is process-wide, like the environment it sets: not for concurrent threads."""
    before = os.environ.get(GPU_TILES_ENV)
    os.environ[GPU_TILES_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GPU_TILES_ENV, None)
        else:
            os.environ[GPU_TILES_ENV] = before


def persistent_programs(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """Programs for a kernel where each program loops over a share of the rows."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = _sm_count(index) * per_sm
    elif gpu_tiles(device):
        target = NOMINAL_SM_COUNT * per_sm
    else:
        target = 4  # the interpreter runs programs one after another; a few exercise the split
    return max(1, min(rows, target))


def poison_enabled() -> bool:
    """FASTLM_POISON=1 fills every kernel output with NaN before the kernel writes it."""
    return os.environ.get("FASTLM_POISON", "0") == "1"


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; under FASTLM_POISON=1 fill it with NaN so unwritten
    elements cannot pass a test."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def tf32_allowed() -> bool:
    """Whether float32 dots may round their inputs to TF32: torch's float32 matmul setting,
    which cuBLAS and SDPA follow (torch.backends.cuda.matmul.allow_tf32 = True, or
    torch.set_float32_matmul_precision("high" / "medium"), or the newer
    torch.backends.cuda.matmul.fp32_precision = "tf32"). Read at every call, as torch does."""
    matmul = torch.backends.cuda.matmul
    try:
        return torch.get_float32_matmul_precision() != "highest" or bool(matmul.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses the legacy getters once fp32_precision was set
        precision = getattr(matmul, "fp32_precision", "none")
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"
