"""Layer norm and RMSNorm, with the residual add fused, forward and backward, in Triton.

One kernel pair serves both norms (constexpr RMS) and every option (residual, weight,
bias): the variants differ by a few lines, and constexpr branches cost nothing at run time.

Forward: one program per row. A row that fits one block (<= MAX_FUSED_BLOCK elements)
is read once and kept in registers; a wider row is walked in chunks, three passes (sum,
centred sum of squares, normalise), because holding it would spill.

Backward: with xhat = (x - mean) * rstd and g = dy * w,
    dx = rstd * (g - mean(g * xhat) * xhat - mean(g))      (RMSNorm: without the last term)
    dw = sum over rows of dy * xhat,  db = sum over rows of dy.
Each program (one an SM) takes a contiguous range of rows, BLOCK_M at a time (several
when rows are narrow), and keeps its share of dw/db in float32;
the (programs, N) partials are summed afterwards in a fixed order, so weight gradients
are deterministic (same inputs, same bits), with no atomics. A row wider than
MAX_BWD_FUSED_BLOCK (below the forward's cap: the backward holds more per element) is walked
in chunks, two passes, with the partials read-modified-written in this program's own row.

Dropout (issue 23): with DROPOUT the input is dropped before the residual add,
    s = dropout(x) + residual,   y = norm(s),
the mask drawn in the kernel by tl.rand(seed, row * N + col) from a one-element int64 seed
tensor (ops/attention.py's draw_dropout_seed: no host sync), never stored: the backward draws
it again from the same seed, so dx = keep * scale * ds where ds is the gradient of s, and
``dropout_mask`` launches the same draw alone for tests. SUM_F32 keeps the residual stream s in
float32 (flash-attn's residual_in_fp32) while x and y are 16-bit: s is then not rounded to x's
dtype, and the backward writes the gradient of the stream (DR, float32) apart from dx.

Row offsets are int64 (row index * stride can pass 2^31); the math is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .launch import empty, persistent_programs, row_block, row_warps

# The backward holds more per element than the forward (x, dy, w and the dw/db accumulators:
# 5 x 32 float32 registers a thread at 16384 with 16 warps), so its fused block is smaller: at
# 16384 it spilled 160-750 B a thread on sm_80/sm_90 (issue 19). A wider row takes the chunked
# path, in chunks of BWD_CHUNK (16 warps: 8 elements a thread, 40-60 registers, 2-3 CTAs an SM,
# where 8192-wide chunks take ~90 registers and one CTA).
MAX_BWD_FUSED_BLOCK = 8192
BWD_CHUNK = 4096
# Elements of x (and of dy) a backward program takes a step on the fused path: a narrow row
# is taken BWD_TILE // width rows at a time, so a step moves 16-32 KiB whatever the width.
BWD_TILE = 8192
# Backward programs per SM. Each writes a float32 row of dw (and db) partials that the final
# sum reads back: 16 bytes x programs x N for a layer norm, against 6 bytes x rows x N for x, dy
# and dx in 16 bits, so at 4096 rows one program an SM costs 9% more traffic and four cost 34%
# (fastlm bench static's byte count, issue 19). One program an SM holding 2-8 rows a step is
# what Liger's norms launch.
BWD_PROGRAMS_PER_SM = 1


# With dropout (or a float32 stream) a step draws the mask and writes two gradients: half the
# tile keeps it from spilling (at 768 wide, 8192-element steps spilled 80-210 B a thread).
BWD_TILE_DROPOUT = BWD_TILE // 2


def bwd_rows_block(block_n: int, rows_per_program: int, tile: int = BWD_TILE) -> int:
    """Rows a step of the fused backward: ``tile`` elements, at most a program's rows."""
    return max(1, min(tile // block_n, launch.next_power_of_2(rows_per_program)))


@triton.jit
def _keep(seed, offsets, dropout_p):
    """The dropout mask at flat element offsets row * N + col: a counter-based draw, so the
    forward, the backward and dropout_mask draw the same bits from the same seed. Seven Philox
    rounds (flash-attn's choice for its norm's dropout) instead of ten: fewer registers."""
    return tl.rand(seed, offsets, n_rounds=7) >= dropout_p


@triton.jit
def _load_input(x_row, r_row, s_row, c, mask, stride_xn, stride_rn, seed, keep_base, dropout_p, scale,
                HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr, DROPOUT: tl.constexpr, SUM_F32: tl.constexpr):
    """One chunk of the input to normalise, dropout(x) + residual (each part optional), as float32.

    The sum is rounded to the stream's dtype first (x's, or float32 with SUM_F32) and stored
    when asked: the output is then exactly the norm of the residual stream that is stored and
    that the backward reads."""
    x = tl.load(x_row + c * stride_xn, mask=mask, other=0.0)
    if HAS_RES or DROPOUT or SUM_F32:
        xf = x.to(tl.float32)
        if DROPOUT:
            xf = tl.where(_keep(seed, keep_base + c, dropout_p), xf * scale, 0.0)
        if HAS_RES:
            xf += tl.load(r_row + c * stride_rn, mask=mask, other=0.0).to(tl.float32)
        if not SUM_F32:
            xf = xf.to(x.dtype).to(tl.float32)
        if STORE_SUM:
            tl.store(s_row + c, xf.to(s_row.dtype.element_ty), mask=mask)
        return xf
    return x.to(tl.float32)


@triton.jit
def _affine(y, W, B, c, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    if HAS_W:
        y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _norm_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd, SEED,
    stride_xm, stride_xn, stride_rm, stride_rn,
    N, eps, dropout_p, scale,
    HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RMS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
    DROPOUT: tl.constexpr = False, SUM_F32: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(SEED) if DROPOUT else 0
    keep_base = row * N
    x_row = X + row * stride_xm
    r_row = R + row * stride_rm
    s_row = S + row * N  # S and Y are written contiguous
    y_row = Y + row * N
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = cols < N
        x = _load_input(x_row, r_row, s_row, cols, mask, stride_xn, stride_rn, seed, keep_base, dropout_p, scale,
                        HAS_RES, STORE_SUM, DROPOUT, SUM_F32)
        if RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            tl.store(Mean + row, mean)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        tl.store(Rstd + row, rstd)
        y = _affine(xc * rstd, W, B, cols, mask, HAS_W, HAS_B)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: the mean (and the stored residual stream).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            acc += _load_input(x_row, r_row, s_row, c, c < N, stride_xn, stride_rn, seed, keep_base, dropout_p, scale,
                               HAS_RES, STORE_SUM, DROPOUT, SUM_F32)
        mean = 0.0
        if not RMS:
            mean = tl.sum(acc, axis=0) / N
            tl.store(Mean + row, mean)
        # Pass 2: the variance about the mean (two passes are exact where E[x^2] - mean^2 is not).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = _load_input(x_row, r_row, s_row, c, c < N, stride_xn, stride_rn, seed, keep_base, dropout_p, scale,
                            HAS_RES, False, DROPOUT, SUM_F32)
            xc = tl.where(c < N, x - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        tl.store(Rstd + row, rstd)
        # Pass 3: normalise and write.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = _load_input(x_row, r_row, s_row, c, c < N, stride_xn, stride_rn, seed, keep_base, dropout_p, scale,
                            HAS_RES, False, DROPOUT, SUM_F32)
            y = _affine((x - mean) * rstd, W, B, c, c < N, HAS_W, HAS_B)
            tl.store(y_row + c, y.to(Y.dtype.element_ty), mask=c < N)


@triton.jit
def _load_xhat_dy(X, DY, row, c, mask, stride_xm, stride_xn, stride_dym, stride_dyn, mean, rstd):
    """One chunk of the normalised input (zero outside the row) and of the output gradient."""
    x = tl.load(X + row * stride_xm + c * stride_xn, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dym + c * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (x - mean) * rstd, 0.0), dy


@triton.jit
def _store_dx(DX, DR, offs, ds, mask, seed, dropout_p, scale, DROPOUT: tl.constexpr, STORE_DR: tl.constexpr):
    """Write the gradients of a chunk whose stream gradient is ``ds`` (offs: row * N + col, the
    outputs being contiguous, which are also the mask's offsets)."""
    if STORE_DR:
        tl.store(DR + offs, ds.to(DR.dtype.element_ty), mask=mask)
    if DROPOUT:
        ds = tl.where(_keep(seed, offs, dropout_p), ds * scale, 0.0)
    tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(KEEP, SEED, numel, dropout_p, BLOCK: tl.constexpr):
    """The mask alone (1 = kept), for tests and for layer_norm_fn's return_dropout_mask."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(SEED), offs, dropout_p)
    tl.store(KEEP + offs, keep.to(tl.int8), mask=offs < numel)


@triton.jit
def _norm_bwd_kernel(
    X, W, Mean, Rstd, DY, DS, DX, DW, DB, DR, SEED,
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dsm, stride_dsn,
    M, N, rows_per_program, dropout_p, scale,
    HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
    DROPOUT: tl.constexpr = False, STORE_DR: tl.constexpr = False,
):
    # DX receives the gradient of the stream s (dx + ds) with no dropout; with DROPOUT the
    # input's gradient keep * scale * (dx + ds), the mask drawn again from the forward's seed.
    # STORE_DR: DR receives the stream's gradient too (the residual's, in its own dtype).
    pid = tl.program_id(0)
    seed = tl.load(SEED) if DROPOUT else 0
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    dw_row = DW + pid.to(tl.int64) * N  # this program's partial sums
    db_row = DB + pid.to(tl.int64) * N
    if SINGLE:
        # BLOCK_M rows a step (several when rows are narrow, so that a step has bytes enough
        # in flight); the step's dw/db are summed over its rows at once (per-row-slot accumulators
        # would hold BLOCK_M times the registers: at 16 warps they spilled).
        mask_n = cols < N
        w = 1.0
        if HAS_W:
            w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for first in range(row_start, row_end, BLOCK_M):
            rows = first + tl.arange(0, BLOCK_M)
            mask_m = rows < row_end
            mask = mask_m[:, None] & mask_n[None, :]
            rstd = tl.load(Rstd + rows, mask=mask_m, other=0.0)[:, None]
            mean = 0.0
            if not RMS:
                mean = tl.load(Mean + rows, mask=mask_m, other=0.0)[:, None]
            xhat, dy = _load_xhat_dy(X, DY, rows[:, None], cols[None, :], mask, stride_xm, stride_xn,
                                     stride_dym, stride_dyn, mean, rstd)
            g = dy * w
            dx = g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None]
            if not RMS:
                dx -= (tl.sum(g, axis=1) / N)[:, None]
            dx *= rstd
            if HAS_DS:
                dx += tl.load(DS + rows[:, None] * stride_dsm + cols[None, :] * stride_dsn, mask=mask,
                              other=0.0).to(tl.float32)
            offs = rows[:, None] * N + cols[None, :]
            _store_dx(DX, DR, offs, dx, mask, seed, dropout_p, scale, DROPOUT, STORE_DR)
            if HAS_W:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(dw_row + cols, dw, mask=mask_n)
        if HAS_B:
            tl.store(db_row + cols, db, mask=mask_n)
    else:
        # Wide rows: the partials live in this program's own row of DW/DB (read-modify-write
        # by one program only, so still deterministic); they start at zero.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            if HAS_W:
                tl.store(dw_row + c, tl.zeros([BLOCK_N], dtype=tl.float32), mask=c < N)
            if HAS_B:
                tl.store(db_row + c, tl.zeros([BLOCK_N], dtype=tl.float32), mask=c < N)
        # The partial rows are re-read below; make every thread's stores visible first.
        tl.debug_barrier()
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            mean = 0.0
            if not RMS:
                mean = tl.load(Mean + row)
            # Pass 1: the two row sums of the gradient formula.
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                xhat, dy = _load_xhat_dy(X, DY, row, c, c < N, stride_xm, stride_xn, stride_dym, stride_dyn,
                                         mean, rstd)
                g = _affine(dy, W, W, c, c < N, HAS_W, False)  # g = dy * w
                acc1 += g * xhat
                acc2 += g
            c1 = tl.sum(acc1, axis=0) / N
            c2 = 0.0
            if not RMS:
                c2 = tl.sum(acc2, axis=0) / N
            # Pass 2: dx, and this row's share of dw and db.
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = c < N
                xhat, dy = _load_xhat_dy(X, DY, row, c, mask, stride_xm, stride_xn, stride_dym, stride_dyn,
                                         mean, rstd)
                g = _affine(dy, W, W, c, mask, HAS_W, False)
                dx = (g - xhat * c1 - c2) * rstd
                if HAS_DS:
                    dx += tl.load(DS + row * stride_dsm + c * stride_dsn, mask=mask, other=0.0).to(tl.float32)
                _store_dx(DX, DR, row * N + c, dx, mask, seed, dropout_p, scale, DROPOUT, STORE_DR)
                if HAS_W:
                    tl.store(dw_row + c, tl.load(dw_row + c, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_B:
                    tl.store(db_row + c, tl.load(db_row + c, mask=mask, other=0.0) + dy, mask=mask)
            tl.debug_barrier()


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View ``t`` as (rows, n) without copying where its strides allow; copy otherwise, and
    also where a column offset (n - 1) * stride would pass int32 (the kernels form column
    offsets in int32: a transposed input of 2^31 elements or more)."""
    t2 = t.reshape(-1, n)
    if (n - 1) * abs(t2.stride(1)) >= 2 ** 31:
        t2 = t2.contiguous()
    return t2


def norm_fwd(x, residual, weight, bias, normalized_ndim: int, eps: float, rms: bool,
             keep_sum: bool, max_block: int | None = None, *, seed=None, dropout_p: float = 0.0,
             sum_fp32: bool = False):
    """Launch the forward. Returns (y, sum, mean, rstd); sum and mean may be empty.

    ``sum`` is the residual stream dropout(x) + residual (with dropout_p > 0, drawn from the
    one-element int64 ``seed`` tensor), in float32 when ``sum_fp32``, else in x's dtype; it is
    formed (and stored, with keep_sum) whenever there is a residual, dropout or sum_fp32."""
    n = 1
    for d in x.shape[x.dim() - normalized_ndim:]:
        n *= d
    x2 = _rows(x, n)
    m = x2.shape[0]
    r2 = _rows(residual, n) if residual is not None else x2
    has_res = residual is not None
    dropout = dropout_p > 0.0
    sum_f32 = sum_fp32 and x.dtype != torch.float32
    store_sum = (has_res or dropout or sum_fp32) and keep_sum
    y = empty(x.shape, x.dtype, x.device)
    s = empty(x.shape, torch.float32 if sum_fp32 else x.dtype, x.device) if store_sum else x.new_empty(0)
    mean = empty((m,), torch.float32, x.device) if not rms else x.new_empty(0, dtype=torch.float32)
    rstd = empty((m,), torch.float32, x.device)
    w = weight.reshape(-1).contiguous() if weight is not None else x2
    b = bias.reshape(-1).contiguous() if bias is not None else x2
    if m == 0 or n == 0:
        return y, s, mean, rstd
    block, single = row_block(n, max_block)
    _norm_fwd_kernel[(m,)](
        x2, r2, s if store_sum else y, y, w, b, mean if not rms else rstd, rstd, seed if dropout else rstd,
        x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1),
        n, eps, dropout_p, 1.0 / (1.0 - dropout_p),
        HAS_RES=has_res, STORE_SUM=store_sum, HAS_W=weight is not None, HAS_B=bias is not None,
        RMS=rms, BLOCK_N=block, SINGLE=single, DROPOUT=dropout, SUM_F32=sum_f32, num_warps=row_warps(block),
    )
    return y, s, mean, rstd


def norm_bwd(dy, ds, x, weight, bias, mean, rstd, normalized_ndim: int, rms: bool,
             max_block: int | None = None, *, seed=None, dropout_p: float = 0.0, dx_dtype=None, dres_dtype=None):
    """Launch the backward. ``x`` is the normalised input (the residual stream when a
    residual was added); ``ds``, if given, is the gradient flowing into that stream
    from elsewhere. Returns (dx, dweight, dbias), the last two None when absent.

    With dropout (``seed``, ``dropout_p`` > 0: the forward's) dx is the gradient of the
    dropped input, in ``dx_dtype`` (default x's dtype), the mask drawn again from the seed; with
    ``dres_dtype`` the gradient of the stream itself (the residual's) comes fourth, in that dtype."""
    n = 1
    for d in x.shape[x.dim() - normalized_ndim:]:
        n *= d
    x2 = _rows(x, n)
    dy2 = _rows(dy, n)
    ds2 = _rows(ds, n) if ds is not None else dy2
    m = x2.shape[0]
    dropout = dropout_p > 0.0
    dx = empty(x.shape, dx_dtype or x.dtype, x.device)
    dres = empty(x.shape, dres_dtype, x.device) if dres_dtype is not None else None
    programs = persistent_programs(x.device, m, per_sm=BWD_PROGRAMS_PER_SM)
    has_w, has_b = weight is not None, bias is not None
    dw_part = empty((programs, n), torch.float32, x.device) if has_w else None
    db_part = empty((programs, n), torch.float32, x.device) if has_b else None
    if m > 0 and n > 0:
        if max_block is None:
            max_block = min(launch.MAX_FUSED_BLOCK, MAX_BWD_FUSED_BLOCK)
        block, single = row_block(n, max_block)
        if not single:
            block = min(block, BWD_CHUNK)
        rows_per_program = triton.cdiv(m, programs)
        programs = triton.cdiv(m, rows_per_program)  # every program gets at least one row
        tile = BWD_TILE_DROPOUT if (dropout or dres is not None) else BWD_TILE
        block_m = bwd_rows_block(block, rows_per_program, tile) if single else 1
        w = weight.reshape(-1).contiguous() if has_w else x2
        _norm_bwd_kernel[(programs,)](
            x2, w, mean if not rms else rstd, rstd, dy2, ds2, dx,
            dw_part if has_w else dx, db_part if has_b else dx,
            dres if dres is not None else rstd, seed if dropout else rstd,  # unused pointers: never touched
            x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1), ds2.stride(0), ds2.stride(1),
            m, n, rows_per_program, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DS=ds is not None, HAS_W=has_w, HAS_B=has_b, RMS=rms,
            BLOCK_M=block_m, BLOCK_N=block, SINGLE=single, DROPOUT=dropout, STORE_DR=dres is not None,
            num_warps=row_warps(block_m * block),
        )
        dw_part = dw_part[:programs] if has_w else None
        db_part = db_part[:programs] if has_b else None
    else:  # no rows (or empty rows): the weight gradients are zero
        for part in (dw_part, db_part):
            if part is not None:
                part.zero_()
    dw = dw_part.sum(0).to(weight.dtype).reshape(weight.shape) if has_w else None
    db = db_part.sum(0).to(bias.dtype).reshape(bias.shape) if has_b else None
    return (dx, dw, db) if dres is None else (dx, dw, db, dres)


DROPOUT_MASK_BLOCK = 1024


def dropout_mask(seed, shape, dropout_p: float, device) -> torch.Tensor:
    """The boolean mask of kept elements that the kernels draw for ``seed`` over a tensor of
    ``shape`` (element i of the flattened tensor, i = row * N + col)."""
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    _dropout_mask_kernel[(triton.cdiv(keep.numel(), DROPOUT_MASK_BLOCK),)](
        keep, seed, keep.numel(), dropout_p, BLOCK=DROPOUT_MASK_BLOCK)
    return keep.bool()


def gpu_compile_variants():
    """(kernel, signature, constexprs, num_warps) for the GPU compile check
    (kernels/compile_check.py): the interpreter never compiles, so CI compiles every
    variant for real GPU targets instead. Each shape comes plain and with dropout, the
    latter with the float32 residual stream for 16-bit inputs (residual_in_fp32)."""
    variants = []
    for dt in ("fp32", "fp16", "bf16"):
        for single in (True, False):
            for rms in (False, True):
                for drop in (False, True):
                    st = "fp32" if drop else dt  # the stream's dtype
                    block = 1024 if single else 4096
                    fwd_sig = {"X": f"*{dt}", "R": f"*{st}", "S": f"*{st}", "Y": f"*{dt}", "W": "*fp32",
                               "B": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "SEED": "*i64",
                               "stride_xm": "i64", "stride_xn": "i32", "stride_rm": "i64", "stride_rn": "i32",
                               "N": "i32", "eps": "fp32", "dropout_p": "fp32", "scale": "fp32"}
                    fwd_const = {"HAS_RES": True, "STORE_SUM": True, "HAS_W": True, "HAS_B": not rms, "RMS": rms,
                                 "BLOCK_N": block, "SINGLE": single, "DROPOUT": drop,
                                 "SUM_F32": drop and dt != "fp32"}
                    variants.append((_norm_fwd_kernel, fwd_sig, fwd_const, row_warps(block)))
                    bwd_sig = {"X": f"*{st}", "W": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "DY": f"*{dt}",
                               "DS": f"*{st}", "DX": f"*{dt}", "DW": "*fp32", "DB": "*fp32", "DR": f"*{st}",
                               "SEED": "*i64", "stride_xm": "i64", "stride_xn": "i32", "stride_dym": "i64",
                               "stride_dyn": "i32", "stride_dsm": "i64", "stride_dsn": "i32", "M": "i32", "N": "i32",
                               "rows_per_program": "i32", "dropout_p": "fp32", "scale": "fp32"}
                    block_m = bwd_rows_block(block, 32, BWD_TILE_DROPOUT if drop else BWD_TILE) if single else 1
                    bwd_const = {"HAS_DS": True, "HAS_W": True, "HAS_B": not rms, "RMS": rms,
                                 "BLOCK_M": block_m, "BLOCK_N": block, "SINGLE": single, "DROPOUT": drop,
                                 "STORE_DR": drop}
                    variants.append((_norm_bwd_kernel, bwd_sig, bwd_const, row_warps(block_m * block)))
    variants.append((_dropout_mask_kernel, {"KEEP": "*i8", "SEED": "*i64", "numel": "i64", "dropout_p": "fp32"},
                     {"BLOCK": DROPOUT_MASK_BLOCK}, 4))
    return variants
