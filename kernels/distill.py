"""Distillation losses in Triton: KL divergence and the generalised JSD, forward and backward
(formulas and conventions: fastlm/reference/distill.py).

All kernels are row-wise: one program per row of (R, C), walking the classes in chunks of
BLOCK_C, so any vocabulary streams through registers; arithmetic is float32 whatever the
inputs' dtypes (each is loaded in its own dtype, so a float32 teacher beside a bfloat16
student costs no copy).

- KL divergence is pointwise: the forward writes the elementwise loss (reduction "none") or
  each row's sum (a reduction: the op layer sums the rows), the backward reads the upstream
  gradient with its own strides (a (R,) row gradient is a stride-0 column, a scalar one two
  stride-0 dims), so no (R, C) gradient is ever expanded in memory.
- JSD of log-probabilities takes one pass: each class's term and its gradient are local.
- JSD of logits (the fused linear JSD's chunks) first forms both rows' logsumexp (of
  logits / temperature) in one online pass, then the terms and the sum of their log-prob
  gradients, then, when asked, the logits' gradient (1/T) * (g - softmax * sum g) over the
  student's logits in place: three reads of a row that a GPU's L2 mostly serves.

Row offsets are int64. Class offsets c * stride are int32 unless a class stride makes them
pass 2^31 (a transposed view of more than 2^31 elements): the launchers then set WIDE_C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty, next_power_of_2

# Widest chunk of classes held in registers at once (read at each launch: tests lower it to
# cross chunk edges with small vocabularies).
MAX_BLOCK_C = 2048


def _block(c: int) -> int:
    return max(16, min(next_power_of_2(c), MAX_BLOCK_C))


def _warps(block: int) -> int:
    # 4 classes a thread each chunk (16 warps at 2048). ptxas is erratic here: at 8 a thread
    # (2048 / 8 warps, 4096 / 16) the fused-logits JSD variant gets a small stack frame on
    # sm_90 or sm_80 (compile_check --no-spills); at 4 every variant is free of it.
    return int(min(16, max(1, block // 128)))


def _wide(classes: int, *strides: int) -> bool:
    """Whether a class offset (C - 1) * stride can leave int32 (a transposed view past 2^31
    elements): then the kernels form class offsets in int64 (WIDE_C)."""
    return any((classes - 1) * abs(s) >= 2 ** 31 for s in strides)


# ----------------------------------------------------------------------------- KL divergence

@triton.jit
def _xlogx(t):
    """torch.xlogy(t, t): 0 at t == 0, NaN for NaN (and for t < 0, log's NaN)."""
    return tl.where(t == 0.0, 0.0, t * tl.log(t))


@triton.jit
def _row_xt(X, T, row, c_off, mask, stride_xr, stride_xc, stride_tr, stride_tc):
    """A block of a row of the input and the target in float32 (masked target lanes 1: log(1)
    = 0 and 1 log 1 = 0, so they add nothing and raise no warning)."""
    x = tl.load(X + row * stride_xr + c_off * stride_xc, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + row * stride_tr + c_off * stride_tc, mask=mask, other=1.0).to(tl.float32)
    return x, t


@triton.jit
def _kl_div_fwd_kernel(X, T, Out, RowSum, stride_xr, stride_xc, stride_tr, stride_tc, stride_or, C,
                       LOG_TARGET: tl.constexpr, ELEMENTWISE: tl.constexpr, WIDE_C: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        c_off = c.to(tl.int64) if WIDE_C else c
        x, t = _row_xt(X, T, row, c_off, mask, stride_xr, stride_xc, stride_tr, stride_tc)
        if LOG_TARGET:
            loss = tl.exp(t) * (t - x)
        else:
            loss = _xlogx(t) - t * x
        if ELEMENTWISE:
            tl.store(Out + row * stride_or + c, loss.to(Out.dtype.element_ty), mask=mask)
        else:
            acc += tl.where(mask, loss, 0.0)
    if not ELEMENTWISE:
        tl.store(RowSum + row, tl.sum(acc, axis=0))


@triton.jit
def _kl_div_bwd_kernel(X, T, G, DX, DT, stride_xr, stride_xc, stride_tr, stride_tc, stride_gr, stride_gc,
                       stride_dxr, stride_dtr, C,
                       LOG_TARGET: tl.constexpr, HAS_DT: tl.constexpr, WIDE_C: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        c_off = c.to(tl.int64) if WIDE_C else c
        x, t = _row_xt(X, T, row, c_off, mask, stride_xr, stride_xc, stride_tr, stride_tc)
        g = tl.load(G + row * stride_gr + c_off * stride_gc, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            p = tl.exp(t)
            tl.store(DX + row * stride_dxr + c, (-(g * p)).to(DX.dtype.element_ty), mask=mask)
            if HAS_DT:
                tl.store(DT + row * stride_dtr + c, (g * (p * (t - x) + p)).to(DT.dtype.element_ty), mask=mask)
        else:
            tl.store(DX + row * stride_dxr + c, (-(g * t)).to(DX.dtype.element_ty), mask=mask)
            if HAS_DT:
                # torch's autograd of xlogy(t, t) - t * x: xlogy(t != 0, t) + t / t - x (NaN at t == 0).
                dt = tl.where(t == 0.0, 0.0, tl.log(t)) + t / t - x
                tl.store(DT + row * stride_dtr + c, (g * dt).to(DT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- JSD

@triton.jit
def _weighted(prob, value):
    """prob * value, 0 where prob is 0 (NaN stays NaN)."""
    return tl.where(prob == 0.0, 0.0, prob * value)


@triton.jit
def _jsd_terms(s, t, beta, log_beta, log1m_beta, MODE: tl.constexpr):
    """(term, grad) per class for log-probabilities s (student), t (teacher): MODE 0 is
    beta = 0 (KL(teacher || student)), 1 is beta = 1 (KL(student || teacher)), 2 between."""
    q = tl.exp(s)
    p = tl.exp(t)
    if MODE == 0:
        term = _weighted(p, t - s)
        grad = -p
    elif MODE == 1:
        term = _weighted(q, s - t)
        grad = _weighted(q, s - t + 1.0)
    else:
        a = t + log_beta
        b = s + log1m_beta
        mx = tl.maximum(a, b)
        mx = tl.where(mx == -float("inf"), 0.0, mx)  # both masked: log M = log(0) = -inf, no NaN
        log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
        student = _weighted(q, s - log_m)
        term = beta * _weighted(p, t - log_m) + (1.0 - beta) * student
        grad = (1.0 - beta) * student
    return term, grad


@triton.jit
def _online_lse(m, acc, x):
    """One chunk of an online logsumexp (x holds -inf where masked)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
    return m_new, acc


@triton.jit
def _jsd_kernel(S, T, Label, Loss, G, DS,
                stride_sr, stride_sc, stride_tr, stride_tc, stride_l, stride_g, stride_dsr,
                C, ignore_index, beta, log_beta, log1m_beta, inv_temp,
                MODE: tl.constexpr, HAS_LABEL: tl.constexpr, FROM_LOGITS: tl.constexpr, GRAD: tl.constexpr,
                WIDE_C: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    s_row = S + row * stride_sr
    t_row = T + row * stride_tr
    ds_row = DS + row * stride_dsr
    counted = True
    if HAS_LABEL:
        counted = tl.load(Label + row * stride_l) != ignore_index
    g = 0.0
    if GRAD:
        g = tl.where(counted, tl.load(G + row * stride_g).to(tl.float32), 0.0)
    lse_s = 0.0
    lse_t = 0.0
    if FROM_LOGITS:
        m_s = -float("inf")
        a_s = 0.0
        m_t = -float("inf")
        a_t = 0.0
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            c_off = c.to(tl.int64) if WIDE_C else c
            s = tl.load(s_row + c_off * stride_sc, mask=mask, other=0.0).to(tl.float32) * inv_temp
            t = tl.load(t_row + c_off * stride_tc, mask=mask, other=0.0).to(tl.float32) * inv_temp
            m_s, a_s = _online_lse(m_s, a_s, tl.where(mask, s, -float("inf")))
            m_t, a_t = _online_lse(m_t, a_t, tl.where(mask, t, -float("inf")))
        lse_s = m_s + tl.log(a_s)
        lse_t = m_t + tl.log(a_t)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        c_off = c.to(tl.int64) if WIDE_C else c
        s = tl.load(s_row + c_off * stride_sc, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + c_off * stride_tc, mask=mask, other=0.0).to(tl.float32)
        if FROM_LOGITS:
            s = s * inv_temp - lse_s
            t = t * inv_temp - lse_t
        term, grad = _jsd_terms(s, t, beta, log_beta, log1m_beta, MODE)
        acc += tl.where(mask, term, 0.0)
        if GRAD:
            if FROM_LOGITS:
                acc_g += tl.where(mask, grad, 0.0)
            else:
                tl.store(ds_row + c, tl.where(counted, g * grad, 0.0).to(DS.dtype.element_ty), mask=mask)
    tl.store(Loss + row, tl.where(counted, tl.sum(acc, axis=0), 0.0))
    if GRAD and FROM_LOGITS:
        # With DS over S, each element is read here before this program writes it.
        tl.debug_barrier()
        sum_g = tl.sum(acc_g, axis=0)
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            c_off = c.to(tl.int64) if WIDE_C else c
            s = tl.load(s_row + c_off * stride_sc, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_s
            t = tl.load(t_row + c_off * stride_tc, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_t
            _, grad = _jsd_terms(s, t, beta, log_beta, log1m_beta, MODE)
            d = (grad - tl.exp(s) * sum_g) * (g * inv_temp)
            tl.store(ds_row + c, tl.where(counted, d, 0.0).to(DS.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def kl_div_fwd(x, t, log_target: bool, elementwise: bool, out_dtype: torch.dtype):
    """x, t (R, C) with any strides (0 included: broadcast operands stay views). Returns the
    elementwise loss (R, C) in ``out_dtype``, or the float32 row sums (R,)."""
    rows, classes = x.shape
    if elementwise:
        out = empty((rows, classes), out_dtype, x.device)
        row_sum = out
    else:
        row_sum = empty((rows,), torch.float32, x.device)
        out = row_sum
    if rows == 0 or classes == 0:
        return out if elementwise else row_sum.zero_()
    block = _block(classes)
    _kl_div_fwd_kernel[(rows,)](x, t, out, row_sum, x.stride(0), x.stride(1), t.stride(0), t.stride(1),
                                out.stride(0) if elementwise else 0, classes,
                                LOG_TARGET=log_target, ELEMENTWISE=elementwise,
                                WIDE_C=_wide(classes, x.stride(1), t.stride(1)), BLOCK_C=block,
                                num_warps=_warps(block))
    return out if elementwise else row_sum


def kl_div_bwd(grad, x, t, log_target: bool, need_target: bool, dx_dtype, dt_dtype):
    """(dx, dt or None): ``grad`` (R, C) with any strides (a broadcast row or scalar gradient
    has stride 0 where it is broadcast)."""
    rows, classes = x.shape
    dx = empty((rows, classes), dx_dtype, x.device)
    dt = empty((rows, classes), dt_dtype, x.device) if need_target else None
    if rows == 0 or classes == 0:
        return dx, dt
    block = _block(classes)
    _kl_div_bwd_kernel[(rows,)](x, t, grad, dx, dt if dt is not None else dx,
                                x.stride(0), x.stride(1), t.stride(0), t.stride(1), grad.stride(0), grad.stride(1),
                                dx.stride(0), dt.stride(0) if dt is not None else 0, classes,
                                LOG_TARGET=log_target, HAS_DT=need_target,
                                WIDE_C=_wide(classes, x.stride(1), t.stride(1), grad.stride(1)), BLOCK_C=block,
                                num_warps=_warps(block))
    return dx, dt


def _mode(beta: float) -> int:
    return 0 if beta == 0.0 else (1 if beta == 1.0 else 2)


def jsd(student, teacher, label, beta: float, ignore_index: int, temperature: float, from_logits: bool,
        dloss=None, out=None):
    """Per-row float32 JSD_beta of (R, V) rows (log-probabilities, or logits when
    ``from_logits``: log_softmax(x / temperature) first) and, given the rows' upstream
    gradient ``dloss`` (R,) (any stride, 0 included), the gradient with respect to
    ``student`` in its dtype, written to ``out`` (which may be ``student``). Returns
    (loss, grad or None)."""
    import math

    rows, classes = student.shape
    loss = empty((rows,), torch.float32, student.device)
    grad = None
    if dloss is not None:
        grad = out if out is not None else empty((rows, classes), student.dtype, student.device)
    if rows == 0:
        return loss, grad
    mode = _mode(beta)
    log_beta = math.log(beta) if mode == 2 else 0.0
    log1m_beta = math.log1p(-beta) if mode == 2 else 0.0
    block = _block(classes)
    _jsd_kernel[(rows,)](
        student, teacher, label if label is not None else loss, loss,
        dloss if dloss is not None else loss, grad if grad is not None else loss,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        label.stride(0) if label is not None else 0, dloss.stride(0) if dloss is not None else 0,
        grad.stride(0) if grad is not None else 0,
        classes, ignore_index, float(beta), log_beta, log1m_beta, 1.0 / temperature,
        MODE=mode, HAS_LABEL=label is not None, FROM_LOGITS=from_logits, GRAD=dloss is not None,
        WIDE_C=_wide(classes, student.stride(1), teacher.stride(1)), BLOCK_C=block, num_warps=_warps(block),
    )
    return loss, grad


def gpu_compile_variants():
    """Kernel variants for kernels/compile_check.py (compiled for real GPU targets in CI): each
    kernel in every mode with int32 class offsets, and the int64 (WIDE_C) ones of the widest."""
    variants = []
    warps = _warps(MAX_BLOCK_C)
    for dt in ("fp32", "bf16"):
        fwd = {"X": f"*{dt}", "T": f"*{dt}", "Out": f"*{dt}", "RowSum": "*fp32", "stride_xr": "i64",
               "stride_xc": "i32", "stride_tr": "i64", "stride_tc": "i32", "stride_or": "i64", "C": "i32"}
        bwd = {"X": f"*{dt}", "T": f"*{dt}", "G": f"*{dt}", "DX": f"*{dt}", "DT": f"*{dt}", "stride_xr": "i64",
               "stride_xc": "i32", "stride_tr": "i64", "stride_tc": "i32", "stride_gr": "i64",
               "stride_gc": "i32", "stride_dxr": "i64", "stride_dtr": "i64", "C": "i32"}
        for log_target in (False, True):
            for elementwise in (False, True):
                flags = dict(LOG_TARGET=log_target, ELEMENTWISE=elementwise, BLOCK_C=MAX_BLOCK_C)
                variants.append((_kl_div_fwd_kernel, fwd, dict(flags, WIDE_C=False), warps))
            flags = dict(LOG_TARGET=log_target, HAS_DT=True, BLOCK_C=MAX_BLOCK_C)
            variants.append((_kl_div_bwd_kernel, bwd, dict(flags, WIDE_C=False), warps))
        variants.append((_kl_div_bwd_kernel, bwd, dict(LOG_TARGET=False, HAS_DT=True, BLOCK_C=MAX_BLOCK_C,
                                                       WIDE_C=True), warps))
        sig = {"S": f"*{dt}", "T": f"*{dt}", "Label": "*i64", "Loss": "*fp32", "G": "*fp32", "DS": f"*{dt}",
               "stride_sr": "i64", "stride_sc": "i32", "stride_tr": "i64", "stride_tc": "i32", "stride_l": "i64",
               "stride_g": "i64", "stride_dsr": "i64", "C": "i32", "ignore_index": "i64", "beta": "fp32",
               "log_beta": "fp32", "log1m_beta": "fp32", "inv_temp": "fp32"}
        for mode in (0, 1, 2):
            for from_logits in (False, True):
                flags = dict(MODE=mode, HAS_LABEL=True, FROM_LOGITS=from_logits, GRAD=True, BLOCK_C=MAX_BLOCK_C)
                variants.append((_jsd_kernel, sig, dict(flags, WIDE_C=False), warps))
        flags = dict(MODE=2, HAS_LABEL=True, FROM_LOGITS=True, GRAD=True, BLOCK_C=MAX_BLOCK_C)
        variants.append((_jsd_kernel, sig, dict(flags, WIDE_C=True), warps))
    return variants
