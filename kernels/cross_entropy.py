"""Softmax cross-entropy, forward and backward, in Triton (formulas: fastlm/reference/cross_entropy.py).

Forward: one program per row walks the vocabulary in chunks once, with an online softmax
(running max and rescaled sum of exponentials), so any vocabulary (256k and beyond) streams
through registers; the sums that label smoothing and soft targets need ride along in the
same pass. It writes, per row, the loss, the logsumexp and ``coef``, the multiplier of the
softmax in the gradient, so that the backward is a single pass too: read a chunk of logits,
write a chunk of gradient. The backward may write the gradient over the logits in place
(the fused linear cross-entropy does), since each element is read before it is written by
the same program. A caller that knows the upstream gradient at the forward (the fused linear
cross-entropy) takes both in one launch (_cross_entropy_fwd_bwd_kernel): the second pass
over a row follows the first at once, from L2, not from memory.

A class index outside [0, C) that is not ignore_index is never used as an address: its row's
loss and gradient are NaN (the op layer raises on CPU before any kernel runs).

Infinite logits (a vocabulary masked with -inf) follow torch, as the reference documents: the
running max stays -inf while every logit seen so far is -inf, so the online softmax subtracts
0 instead (never exp(-inf - -inf)); the inf/NaN that remain (label smoothing or probability
targets over -inf logits: inf, or 0 * -inf = NaN) are exactly torch's.

Row offsets are int64. Class offsets c * stride_xc (and c * stride_tc) pass 2^31 when a
class stride is large (a transposed (N, C) view with N * C past 2^31): the launcher then sets
WIDE_C and they are formed in int64. Otherwise they are int32, exactly, which keeps the
widest variant free of register spills (int64 offsets for the 16 classes each thread holds
spill 16 bytes on sm_80).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty, next_power_of_2

# Widest chunk of the vocabulary held in registers at once.
MAX_BLOCK_C = 8192


@triton.jit
def _softcapped(x, softcap, SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap), with tanh from exp (libdevice is not in the interpreter):
    tanh(u) = 1 - 2 / (exp(2u) + 1) saturates cleanly to +-1 at large |u|."""
    if SOFTCAP:
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
    return x


@triton.jit
def _row_loss(x_row, T, W, SumW, row, stride_xc, stride_tr, stride_tc,
              C, ignore_index, smoothing, z_loss, softcap,
              SOFT: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
              WIDE_C: tl.constexpr, BLOCK_C: tl.constexpr, STATS: tl.constexpr = False):
    """One row's (loss, lse, coef, argmax): one online-softmax pass over its logits. The
    argmax (of the soft-capped logits, first index of the max as torch.argmax; 0 for a row of
    -inf) is tracked only with STATS (cross_entropy_with_stats), else it is 0."""
    cols = tl.arange(0, BLOCK_C)
    m = -float("inf")
    arg = tl.full([], 0, tl.int32)
    s = 0.0
    sum_qx = tl.zeros([BLOCK_C], dtype=tl.float32)  # sum of q * x over the classes q covers
    sum_q = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        c_off = c.to(tl.int64) if WIDE_C else c
        x = tl.load(x_row + c_off * stride_xc, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, _softcapped(x, softcap, SOFTCAP), -float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        if STATS:
            # Strictly greater: an earlier chunk keeps a tie (first index wins, as torch).
            arg = tl.where(m_new > m, start + tl.argmax(x, axis=0, tie_break_left=True), arg)
        # While every logit seen is -inf the max is -inf: subtract 0 then, so each exp(-inf)
        # is a clean 0 (exp(-inf - -inf) would be NaN).
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
        if SOFT:
            t = tl.load(T + row * stride_tr + c_off * stride_tc, mask=mask, other=0.0).to(tl.float32)
            q = t * (1.0 - smoothing) + smoothing / C
            if HAS_W:
                q *= tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            q = tl.where(mask, q, 0.0)
            sum_qx += q * tl.where(mask, x, 0.0)
            sum_q += q
        elif SMOOTH:
            w = 1.0
            if HAS_W:
                w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            sum_qx += w * tl.where(mask, x, 0.0)
    lse = m + tl.log(s)
    if SOFT:
        q_total = tl.sum(sum_q, axis=0)
        loss = lse * q_total - tl.sum(sum_qx, axis=0) + z_loss * lse * lse
        coef = q_total + 2.0 * z_loss * lse
    else:
        t = tl.load(T + row * stride_tr).to(tl.int64)
        counted = t != ignore_index
        valid = counted & (t >= 0) & (t < C)
        # Only a valid index is ever an address.
        x_t = tl.load(x_row + t * stride_xc, mask=valid, other=0.0).to(tl.float32)
        x_t = _softcapped(x_t, softcap, SOFTCAP)
        w_t = 1.0
        if HAS_W:
            w_t = tl.load(W + t, mask=valid, other=0.0).to(tl.float32)
        loss = (1.0 - smoothing) * w_t * (lse - x_t)
        coef = (1.0 - smoothing) * w_t
        if SMOOTH:
            if HAS_W:
                sum_w = tl.load(SumW).to(tl.float32)
            else:
                sum_w = C * 1.0
            loss += smoothing / C * (lse * sum_w - tl.sum(sum_qx, axis=0))
            coef += smoothing / C * sum_w
        loss += z_loss * lse * lse
        coef += 2.0 * z_loss * lse
        loss = tl.where(counted, loss, 0.0)
        loss = tl.where(counted & (valid == 0), float("nan"), loss)
        coef = tl.where(valid, coef, 0.0)
    return loss, lse, coef, arg


@triton.jit
def _row_grad(x_row, dx_row, T, W, row, lse, coef, g, stride_xc, stride_tr, stride_tc,
              C, ignore_index, smoothing, softcap,
              SOFT: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
              WIDE_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """One row's gradient g * dloss/dlogits, written to dx_row (which may be x_row: each
    element is read before it is written, by this program)."""
    cols = tl.arange(0, BLOCK_C)
    t = 0
    q_t = 0.0
    if not SOFT:
        t = tl.load(T + row * stride_tr).to(tl.int64)
        counted = t != ignore_index
        valid = counted & (t >= 0) & (t < C)
        g = tl.where(valid, g, 0.0)
        g = tl.where(counted & (valid == 0), float("nan"), g)
        q_t = 1.0 - smoothing
        if HAS_W:
            q_t *= tl.load(W + t, mask=valid, other=0.0).to(tl.float32)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        c_off = c.to(tl.int64) if WIDE_C else c
        x = tl.load(x_row + c_off * stride_xc, mask=mask, other=0.0).to(tl.float32)
        xc = _softcapped(x, softcap, SOFTCAP)
        grad = tl.exp(xc - lse) * coef
        if SOFT:
            q = tl.load(T + row * stride_tr + c_off * stride_tc, mask=mask, other=0.0).to(tl.float32)
            q = q * (1.0 - smoothing) + smoothing / C
            if HAS_W:
                q *= tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            grad -= q
        else:
            if SMOOTH:
                w = 1.0
                if HAS_W:
                    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                grad -= smoothing / C * w
            grad -= tl.where(c == t, q_t, 0.0)
        grad *= g
        if SOFTCAP:
            th = xc / softcap
            grad *= 1.0 - th * th
        tl.store(dx_row + c, grad.to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def _live(Count, row0, row, LIMIT: tl.constexpr):
    """Whether this row is computed: with LIMIT, only rows row0 + row < *Count (the rows a
    caller sorted to the front: the fused linear cross-entropy's counted targets; the count
    stays on the device, no host sync); without, every row."""
    if LIMIT:
        return row0 + row < tl.load(Count)
    return row >= 0


@triton.jit
def _cross_entropy_fwd_kernel(
    X, T, W, SumW, Loss, Lse, Coef, Arg, Count,
    stride_xr, stride_xc, stride_tr, stride_tc,
    C, ignore_index, smoothing, z_loss, softcap, row0,
    SOFT: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    WIDE_C: tl.constexpr, BLOCK_C: tl.constexpr, STATS: tl.constexpr, LIMIT: tl.constexpr = False,
):
    """With STATS, also each row's argmax into Arg (int32); without, Arg is never touched.
    With LIMIT, a row past the live count reads nothing and gets 0 everywhere (_live)."""
    row = tl.program_id(0).to(tl.int64)
    if _live(Count, row0, row, LIMIT):
        loss, lse, coef, arg = _row_loss(X + row * stride_xr, T, W, SumW, row, stride_xc, stride_tr, stride_tc,
                                         C, ignore_index, smoothing, z_loss, softcap,
                                         SOFT, HAS_W, SMOOTH, SOFTCAP, WIDE_C, BLOCK_C, STATS)
    else:
        loss, lse, coef, arg = 0.0, 0.0, 0.0, tl.full([], 0, tl.int32)
    tl.store(Loss + row, loss)
    tl.store(Lse + row, lse)
    tl.store(Coef + row, coef)
    if STATS:
        tl.store(Arg + row, arg.to(tl.int32))


@triton.jit
def _cross_entropy_bwd_kernel(
    X, T, W, Lse, Coef, DLoss, DX, Count,
    stride_xr, stride_xc, stride_tr, stride_tc, stride_dl, stride_dxr,
    C, ignore_index, smoothing, softcap, row0,
    SOFT: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    WIDE_C: tl.constexpr, BLOCK_C: tl.constexpr, LIMIT: tl.constexpr = False,
):
    """With LIMIT, a row past the live count is neither read nor written (its gradient row is
    left as it was: the caller never reads it)."""
    row = tl.program_id(0).to(tl.int64)
    if _live(Count, row0, row, LIMIT):
        g = tl.load(DLoss + row * stride_dl).to(tl.float32)
        _row_grad(X + row * stride_xr, DX + row * stride_dxr, T, W, row, tl.load(Lse + row), tl.load(Coef + row),
                  g, stride_xc, stride_tr, stride_tc, C, ignore_index, smoothing, softcap,
                  SOFT, HAS_W, SMOOTH, SOFTCAP, WIDE_C, BLOCK_C)


@triton.jit
def _cross_entropy_fwd_bwd_kernel(
    X, T, W, SumW, Loss, Lse, Coef, DLoss, DX, Arg, Count,
    stride_xr, stride_xc, stride_tr, stride_tc, stride_dl, stride_dxr,
    C, ignore_index, smoothing, z_loss, softcap, row0,
    SOFT: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    WIDE_C: tl.constexpr, BLOCK_C: tl.constexpr, STATS: tl.constexpr = False, LIMIT: tl.constexpr = False,
):
    """Both in one program: the loss pass, then at once the gradient pass over the same row,
    whose re-read a GPU's L2 serves (one row of logits each program, just read), where two
    launches read every row from memory twice. STATS and LIMIT as in the forward kernel (a
    row past the live count: zeros stored, its gradient row left unwritten)."""
    row = tl.program_id(0).to(tl.int64)
    if _live(Count, row0, row, LIMIT):
        x_row = X + row * stride_xr
        loss, lse, coef, arg = _row_loss(x_row, T, W, SumW, row, stride_xc, stride_tr, stride_tc,
                                         C, ignore_index, smoothing, z_loss, softcap,
                                         SOFT, HAS_W, SMOOTH, SOFTCAP, WIDE_C, BLOCK_C, STATS)
        tl.store(Loss + row, loss)
        tl.store(Lse + row, lse)
        tl.store(Coef + row, coef)
        if STATS:
            tl.store(Arg + row, arg.to(tl.int32))
        # With DX over X, the gradient pass's stores must wait for every read of the loss pass.
        # The loop's reads are done once lse exists (its reductions cross warps), but the target
        # logit x_t is read after them, by thread 0 (whose value the loss store takes), while the
        # warp that holds column t could already write its gradient there: the loss would then
        # be lse - grad_t. This barrier orders that read before any gradient store.
        tl.debug_barrier()
        g = tl.load(DLoss + row * stride_dl).to(tl.float32)
        _row_grad(x_row, DX + row * stride_dxr, T, W, row, lse, coef, g,
                  stride_xc, stride_tr, stride_tc, C, ignore_index, smoothing, softcap,
                  SOFT, HAS_W, SMOOTH, SOFTCAP, WIDE_C, BLOCK_C)
    else:
        tl.store(Loss + row, 0.0)
        tl.store(Lse + row, 0.0)
        tl.store(Coef + row, 0.0)
        if STATS:
            tl.store(Arg + row, 0)


def _block(c: int, max_block: int | None = None) -> int:
    return max(16, min(next_power_of_2(c), max_block or MAX_BLOCK_C))


def _warps(block: int) -> int:
    return int(min(16, max(1, block // 512)))


def _wide(classes: int, *strides: int) -> bool:
    """Whether a class offset (C - 1) * stride can leave int32."""
    return any((classes - 1) * abs(s) >= 2 ** 31 for s in strides)


def _flags(logits, target, weight, label_smoothing, softcap):
    soft = target.is_floating_point()
    classes = logits.shape[1]
    wide = _wide(classes, logits.stride(1), target.stride(1) if soft else 0)
    return dict(SOFT=soft, HAS_W=weight is not None, SMOOTH=label_smoothing > 0, SOFTCAP=softcap > 0,
                WIDE_C=wide)


def cross_entropy_fwd(logits, target, weight, ignore_index: int, label_smoothing: float, z_loss: float,
                      softcap: float, stats: bool = False, limit=None):
    """logits (R, C) with any strides; target (R,) indices or (R, C) probabilities.
    Returns per-row float32 (loss, lse, coef), and with ``stats`` also each row's int32 argmax
    of the (soft-capped) logits, from the same pass (the STATS variant; the plain call
    compiles the kernel without it). ``limit`` (count, row0): only rows with
    row0 + row < count (a one-element int tensor on the device) are computed; the others
    read nothing and get zeros (the LIMIT variant)."""
    rows, classes = logits.shape
    loss = empty((rows,), torch.float32, logits.device)
    lse = empty((rows,), torch.float32, logits.device)
    coef = empty((rows,), torch.float32, logits.device)
    arg = empty((rows,), torch.int32, logits.device) if stats else None
    if rows == 0:
        return (loss, lse, coef, arg) if stats else (loss, lse, coef)
    block = _block(classes)
    # Class weights are read at unit stride: a strided (C,) view costs one tiny copy.
    weight = weight.contiguous() if weight is not None else None
    sum_w = weight.float().sum().reshape(1) if (weight is not None and label_smoothing > 0) else loss
    w = weight if weight is not None else loss
    t_strides = (target.stride(0), target.stride(1) if target.dim() == 2 else 0)
    count, row0 = limit if limit is not None else (coef, 0)
    _cross_entropy_fwd_kernel[(rows,)](
        logits, target, w, sum_w, loss, lse, coef, arg if stats else coef, count,
        logits.stride(0), logits.stride(1), *t_strides,
        classes, ignore_index, label_smoothing, z_loss, softcap, row0,
        BLOCK_C=block, num_warps=_warps(block), STATS=stats, LIMIT=limit is not None,
        **_flags(logits, target, weight, label_smoothing, softcap),
    )
    return (loss, lse, coef, arg) if stats else (loss, lse, coef)


def cross_entropy_bwd(dloss, logits, target, weight, lse, coef, ignore_index: int, label_smoothing: float,
                      softcap: float, out=None, limit=None):
    """Gradient of the per-row losses with respect to logits, given their gradient ``dloss``
    (R,) (any stride, 0 included). ``out`` may be ``logits`` itself (overwritten in place).
    ``limit`` as in cross_entropy_fwd: rows past it are left unwritten."""
    rows, classes = logits.shape
    if out is None:
        out = empty((rows, classes), logits.dtype, logits.device)
    if rows == 0:
        return out
    block = _block(classes)
    w = weight.contiguous() if weight is not None else lse
    t_strides = (target.stride(0), target.stride(1) if target.dim() == 2 else 0)
    count, row0 = limit if limit is not None else (lse, 0)
    _cross_entropy_bwd_kernel[(rows,)](
        logits, target, w, lse, coef, dloss, out, count,
        logits.stride(0), logits.stride(1), *t_strides, dloss.stride(0), out.stride(0),
        classes, ignore_index, label_smoothing, softcap, row0,
        BLOCK_C=block, num_warps=_warps(block), LIMIT=limit is not None, **_flags(logits, target, weight, label_smoothing, softcap),
    )
    return out


def cross_entropy_fwd_bwd(logits, target, weight, ignore_index: int, label_smoothing: float, z_loss: float,
                          softcap: float, dloss, out=None, stats: bool = False, limit=None):
    """cross_entropy_fwd and cross_entropy_bwd in one launch, for a caller that knows each row's
    upstream gradient ``dloss`` (R,) at the forward (the fused linear cross-entropy's chunks):
    each program reads its row of logits for the loss and again, at once, for the gradient,
    where the two launches read every row from memory twice. ``out`` may be ``logits``.
    Returns (loss, lse, coef, grad), and with ``stats`` also the int32 argmax per row (as
    cross_entropy_fwd). ``limit`` as in cross_entropy_fwd: rows past it get zero loss, lse
    and coef (argmax 0) and their gradient rows are left unwritten."""
    rows, classes = logits.shape
    loss = empty((rows,), torch.float32, logits.device)
    lse = empty((rows,), torch.float32, logits.device)
    coef = empty((rows,), torch.float32, logits.device)
    arg = empty((rows,), torch.int32, logits.device) if stats else None
    if out is None:
        out = empty((rows, classes), logits.dtype, logits.device)
    if rows == 0:
        return (loss, lse, coef, out, arg) if stats else (loss, lse, coef, out)
    # Rows that are not 16-byte aligned (GPT-2's 50257 classes) load element by element, and
    # the two passes' 64-bit addresses then take 72 registers at 8192 classes a chunk on sm_90:
    # one CTA (16 warps) an SM. Chunks of 2048 take 56: 9 CTAs of 4 warps (fastlm bench static).
    aligned = (logits.stride(0) * logits.element_size()) % 16 == 0 and logits.stride(1) == 1
    block = _block(classes, None if aligned else MAX_BLOCK_C // 4)
    weight = weight.contiguous() if weight is not None else None
    sum_w = weight.float().sum().reshape(1) if (weight is not None and label_smoothing > 0) else loss
    w = weight if weight is not None else loss
    t_strides = (target.stride(0), target.stride(1) if target.dim() == 2 else 0)
    count, row0 = limit if limit is not None else (coef, 0)
    _cross_entropy_fwd_bwd_kernel[(rows,)](
        logits, target, w, sum_w, loss, lse, coef, dloss, out, arg if stats else coef, count,
        logits.stride(0), logits.stride(1), *t_strides, dloss.stride(0), out.stride(0),
        classes, ignore_index, label_smoothing, z_loss, softcap, row0,
        BLOCK_C=block, num_warps=_warps(block), STATS=stats, LIMIT=limit is not None,
        **_flags(logits, target, weight, label_smoothing, softcap),
    )
    return (loss, lse, coef, out, arg) if stats else (loss, lse, coef, out)


def gpu_compile_variants():
    """Kernel variants for kernels/compile_check.py (compiled for real GPU targets in CI)."""
    def ordered(kernel, sig):
        return {k: sig[k] for k in kernel.arg_names if k in sig}

    variants = []
    for dt in ("fp32", "bf16"):
        for soft in (False, True):
            # (WIDE_C, the rare int64 class offsets, with the light flags: it spills nowhere there.)
            for extras, wide in ((False, False), (True, False), (False, True)):
                # Every constexpr named, defaulted ones included: ASTSource does not apply a
                # kernel's defaults (a missing LIMIT or STATS fails with a NoneType error).
                flags = dict(SOFT=soft, HAS_W=extras, SMOOTH=extras, SOFTCAP=extras, WIDE_C=wide, LIMIT=False)
                tgt = f"*{dt}" if soft else "*i64"
                fwd_sig = {"X": f"*{dt}", "T": tgt, "W": "*fp32", "SumW": "*fp32", "Loss": "*fp32",
                           "Lse": "*fp32", "Coef": "*fp32", "Arg": "*i32", "Count": "*i64", "stride_xr": "i64",
                           "stride_xc": "i32", "stride_tr": "i64", "stride_tc": "i32", "C": "i32",
                           "ignore_index": "i64", "smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32",
                           "row0": "i64"}
                fwd = ordered(_cross_entropy_fwd_kernel, fwd_sig)
                variants.append((_cross_entropy_fwd_kernel, fwd, dict(flags, BLOCK_C=8192, STATS=False), 16))
                if not soft:  # (the statistics and the live-row limit take class indices)
                    variants.append((_cross_entropy_fwd_kernel, fwd, dict(flags, BLOCK_C=8192, STATS=True), 16))
                    variants.append((_cross_entropy_fwd_kernel, fwd,
                                     dict(flags, BLOCK_C=8192, STATS=True, LIMIT=True), 16))
                bwd_sig = {"X": f"*{dt}", "T": tgt, "W": "*fp32", "Lse": "*fp32", "Coef": "*fp32",
                           "DLoss": "*fp32", "DX": f"*{dt}", "Count": "*i64", "stride_xr": "i64", "stride_xc": "i32",
                           "stride_tr": "i64", "stride_tc": "i32", "stride_dl": "i64", "stride_dxr": "i64",
                           "C": "i32", "ignore_index": "i64", "smoothing": "fp32", "softcap": "fp32", "row0": "i64"}
                bwd = ordered(_cross_entropy_bwd_kernel, bwd_sig)
                variants.append((_cross_entropy_bwd_kernel, bwd, dict(flags, BLOCK_C=8192), 16))
                both = ordered(_cross_entropy_fwd_bwd_kernel,
                               {**fwd_sig, "DLoss": "*fp32", "DX": f"*{dt}", "stride_dl": "i64", "stride_dxr": "i64"})
                variants.append((_cross_entropy_fwd_bwd_kernel, both, dict(flags, BLOCK_C=8192, STATS=False), 16))
                if not soft:
                    variants.append((_cross_entropy_bwd_kernel, bwd, dict(flags, BLOCK_C=8192, LIMIT=True), 16))
                    for block in (8192, 2048):  # (2048: the unaligned rows' chunk, GPT-2's 50257 classes)
                        variants.append((_cross_entropy_fwd_bwd_kernel, both,
                                         dict(flags, BLOCK_C=block, STATS=True, LIMIT=True), 16))
    return variants
