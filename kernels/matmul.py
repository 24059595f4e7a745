"""Matmul with fused epilogues, for the feed-forward block (formulas: fastlm/reference/ffn.py).

One kernel computes tiles of A @ B^T, A (M, K) and B (N, K) of any strides, so a transposed
operand is a view (dx = dz @ w is matmul(dz, w.T), dw = dz^T @ x is matmul(dz.T, x.T)), with
float32 accumulation. What happens to the finished tile before its single store is chosen
by the constexpr EPILOGUE, so the elementwise work of the block never costs a pass over
memory of its own:

    LINEAR  y = act(acc + b); optionally also z = acc + b (gelu/silu backward needs it)
    GATED   two accumulators over one K loop, rows n.. and H+n.. of B, sharing each loaded
            tile of A; stores h = act(g) * u, optionally gu (in B's row order)
    DACT    dz = acc * act'(z), z read from the forward
    DGATED  acc is dh; dg = dh * u * act'(g), du = dh * act(g), stored side by side
            (in the forward's order)

Which half of the gated projection is the gate is the constexpr UP_FIRST: False (the
default, ``gate_order="gate_up"``) takes the first H rows of w (and columns of gu) as the
gate, as a Llama checkpoint's [gate_proj; up_proj] stacks them; True (``"up_gate"``) the
second H, as torch's F.glu and flash-attn's GatedMlp split theirs (value first). It only
swaps which accumulator and which half of gu / dgu is called the gate: the weights are
never copied or reordered.

DACT and DGATED also reduce the bias gradient on the fly: each program writes the column
sums of its tile into a float32 buffer (row-tiles, N), and one torch.sum finishes it, so
the result does not depend on the order programs run in (no atomics) and dz is not read back.

Programs are ordered in groups of GROUP_M row-tiles (the usual swizzle): consecutive programs
share the same few tiles of A and walk the columns of B, so both stay in L2.

Under the interpreter tiles are 16 x 16 x 16, so small tests hit every block edge; a GPU
(or the interpreter with FASTLM_GPU_TILES=1, kernels/launch.py) gets tensor-core sized tiles
picked per dtype (``_config``). No autotuning: the interpreter
would pay for it on every test, and CI compiles exactly the fixed variants.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import empty, gpu_tiles, tf32_allowed

ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
GATED_ACTS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
GATE_ORDERS = ("gate_up", "up_gate")  # which half of the gated projection comes first

LINEAR, GATED, DACT, DGATED = 0, 1, 2, 3


@triton.jit
def _sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)) from one e = exp(-|x|) <= 1: nothing overflows, and neither
    is formed as 1 - the other, so both keep their relative precision where one saturates
    (gelu_tanh far below 0, the 1 - s of silu's derivative far above)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    pos = x >= 0.0
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """The activation of a float32 tile (codes: ACT_CODES). gelu_tanh's (1 + tanh(y)) / 2
    is sigmoid(2y), so it needs no tanh (libdevice's is not in the interpreter)."""
    if ACT == 1:
        return tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu (tl.maximum gives 0)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        s, _ = _sigmoid_pair(1.5957691216057308 * (z + 0.044715 * z * z * z))
        return z * s
    elif ACT == 4:
        s, _ = _sigmoid_pair(z)
        return z * s
    else:
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """The activation's derivative at a float32 tile (relu' is 0 at 0). For gelu_tanh, with
    s = sigmoid(2y): (1 + t) / 2 = s and 1 - t^2 = 4 s (1 - s); z^2 is capped at 1e30 in
    its polynomial, whose factor s (1 - s) is exactly 0 long before (|z| > 30 or so), so
    past |z| = 1.8e19, where z^2 overflows, the derivative is still 1 or 0, not 0 * inf."""
    if ACT == 1:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 3:
        s, sc = _sigmoid_pair(1.5957691216057308 * (z + 0.044715 * z * z * z))
        return s + z * s * sc * 1.5957691216057308 * (1.0 + 0.134145 * tl.minimum(z * z, 1e30))
    elif ACT == 4:
        s, sc = _sigmoid_pair(z)
        return s * (1.0 + z * sc)
    else:
        return z * 0.0 + 1.0


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row-tile, column-tile) of program ``pid``, in groups of GROUP_M row-tiles (the module
    docstring's swizzle; the last group may be partial)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_here, (pid % per_group) // rows_here


@triton.jit
def _matmul_kernel(
    A, B, C, AUX, BIAS, DBIAS, A2, B2, BIAS2,
    M, N, K, K2,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_xm, stride_xn,
    stride_bias, stride_dbm, stride_a2m, stride_a2k, stride_b2n, stride_b2k, stride_bias2,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, IEEE: tl.constexpr,
    UP_FIRST: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """A tile (BLOCK_M, BLOCK_N) of A @ B^T and its epilogue. For GATED and DGATED, N is H:
    GATED's second projection is B2 (H rows; BIAS2 its bias), which is B's second half (a
    view) or a tensor of its own (a checkpoint's separate up_proj); the second half of AUX's
    and C's columns (both) starts N further on; the gate is the first half, or the second
    when UP_FIRST.
    SPLIT_K (LINEAR): the product runs on over a second K2-long stretch, A2 @ B2^T, as if A
    and A2, B and B2 were joined along K (dx = dg @ Wg + du @ Wu for separate gate and up
    weights, one pass, no joined copy).
    AUX: z / gu, written when SAVE (LINEAR, GATED), read (DACT, DGATED).
    DBIAS: the per-row-tile column sums (DACT, DGATED)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Offsets in int64 (M * stride can pass 2^31), computed once; in the loop the pointers
    # step by BLOCK_K strides. rn2: the second half's columns (GATED, DGATED).
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    rn2 = rn + N
    rk = offs_k.to(tl.int64)
    step_a = tl.full([], BLOCK_K, tl.int64) * stride_ak
    step_b = tl.full([], BLOCK_K, tl.int64) * stride_bk
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    step_b2 = tl.full([], BLOCK_K, tl.int64) * stride_b2k
    b2_ptrs = B2 + rk[:, None] * stride_b2k + rn[None, :] * stride_b2n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
        if EPILOGUE == 1:
            b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc2 = _dot(a, b2, acc2, IEEE)
            b2_ptrs += step_b2
        a_ptrs += step_a
        b_ptrs += step_b
    if SPLIT_K:
        step_a2 = tl.full([], BLOCK_K, tl.int64) * stride_a2k
        a2_ptrs = A2 + rm[:, None] * stride_a2m + rk[None, :] * stride_a2k
        for k0 in range(0, K2, BLOCK_K):
            k_ok = offs_k < K2 - k0
            a = tl.load(a2_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
            a2_ptrs += step_a2
            b2_ptrs += step_b2

    mask = m_ok[:, None] & n_ok[None, :]
    c_ptrs = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    x_ptrs = AUX + rm[:, None] * stride_xm + rn[None, :] * stride_xn
    x2_ptrs = AUX + rm[:, None] * stride_xm + rn2[None, :] * stride_xn
    if EPILOGUE == 0:
        z = acc
        if HAS_BIAS:
            z += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SAVE:
            tl.store(x_ptrs, z.to(AUX.dtype.element_ty), mask=mask)
        tl.store(c_ptrs, _act(z, ACT).to(C.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        first = acc
        second = acc2
        if HAS_BIAS:
            first += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            second += tl.load(BIAS2 + rn * stride_bias2, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SAVE:
            tl.store(x_ptrs, first.to(AUX.dtype.element_ty), mask=mask)
            tl.store(x2_ptrs, second.to(AUX.dtype.element_ty), mask=mask)
        if UP_FIRST:
            h = _act(second, ACT) * first
        else:
            h = _act(first, ACT) * second
        tl.store(c_ptrs, h.to(C.dtype.element_ty), mask=mask)
    elif EPILOGUE == 2:
        z = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, acc * _act_grad(z, ACT), 0.0)
        tl.store(c_ptrs, dz.to(C.dtype.element_ty), mask=mask)
        tl.store(DBIAS + pid_m.to(tl.int64) * stride_dbm + rn, tl.sum(dz, axis=0), mask=n_ok)
    else:
        # g and u, and where dg and du go: the halves swap when UP_FIRST (pointers, not data).
        if UP_FIRST:
            g_ptrs, u_ptrs, cg, cu = x2_ptrs, x_ptrs, rn2, rn
        else:
            g_ptrs, u_ptrs, cg, cu = x_ptrs, x2_ptrs, rn, rn2
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
        dg = tl.where(mask, acc * u * _act_grad(g, ACT), 0.0)
        du = tl.where(mask, acc * _act(g, ACT), 0.0)
        tl.store(C + rm[:, None] * stride_cm + cg[None, :] * stride_cn, dg.to(C.dtype.element_ty), mask=mask)
        tl.store(C + rm[:, None] * stride_cm + cu[None, :] * stride_cn, du.to(C.dtype.element_ty), mask=mask)
        tl.store(DBIAS + pid_m.to(tl.int64) * stride_dbm + cg, tl.sum(dg, axis=0), mask=n_ok)
        tl.store(DBIAS + pid_m.to(tl.int64) * stride_dbm + cu, tl.sum(du, axis=0), mask=n_ok)


@triton.jit
def _dact_kernel(DY, Z, DZ, DBIAS, M, N, stride_ym, stride_yn, stride_zm, stride_zn, stride_dzm, stride_dbm,
                 ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = dy * act'(z) for one (BLOCK_M, BLOCK_N) tile, and its column sums (the bias
    gradient's partial sums, one row of DBIAS per row-tile). For relu, z may be the output."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    dy = tl.load(DY + rm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + rm[:, None] * stride_zm + rn[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
    dz = tl.where(mask, dy * _act_grad(z, ACT), 0.0)
    tl.store(DZ + rm[:, None] * stride_dzm + rn[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
    tl.store(DBIAS + pid_m.to(tl.int64) * stride_dbm + rn, tl.sum(dz, axis=0), mask=rn < N)


# ----------------------------------------------------------------------------- launch settings

@functools.lru_cache(maxsize=None)
def _deep_pipeline(index: int) -> bool:
    """Whether a block may use the 128 KiB that 4 stages of 16-bit 128 x 64 tiles of A and B
    take: A100, H100, B200 (160 KiB or more), not the consumer parts (about 100 KiB)."""
    try:
        from triton.runtime import driver

        return driver.active.utils.get_device_properties(index)["max_shared_mem"] >= 160 * 1024
    except Exception:  # an older Triton: judge by the architecture
        return torch.cuda.get_device_capability(index) in ((8, 0), (9, 0), (10, 0))


def _gpu_config(dtype: torch.dtype, two: bool, deep: bool = True):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) on a GPU. GATED and DGATED
    programs handle two (BLOCK_M, BLOCK_N) tiles (two accumulators; or g and u read, dg and
    du written), so their tiles are half as wide: the registers and, for GATED, the shared
    memory per stage (one tile of A, two of B) of a plain program."""
    if dtype == torch.float32:
        return 128, 32 if two else 64, 32, 8, 8, 3
    return 128, 64 if two else 128, 64, 8, 8, 4 if deep else 2


def _config(device: torch.device, dtype: torch.dtype, two: bool):
    if not gpu_tiles(device):
        # GROUP_M 3: row-tile counts rarely divide by it, so the last, partial group is tested.
        return 16, 16, 16, 3, 1, 1
    if device.type != "cuda":  # the GPU's tiles under the interpreter (FASTLM_GPU_TILES=1)
        return _gpu_config(dtype, two)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gpu_config(dtype, two, _deep_pipeline(index))


def _ieee(dtype: torch.dtype) -> bool:
    """float32 dots in IEEE float32 unless torch's float32 matmul setting allows TF32."""
    return dtype == torch.float32 and not tf32_allowed()


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {list(t.shape)}")


def _check_operands(fn: str, a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    _check_2d(f"{fn}: {a_name}", a)
    _check_2d(f"{fn}: {b_name}", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: {a_name} {list(a.shape)} and {b_name} {list(b.shape)} must agree in their "
                         f"last dimension (computing {a_name} @ {b_name}^T)")
    if a.dtype != b.dtype:
        raise ValueError(f"{fn}: {a_name} and {b_name} must have one dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: {a_name} and {b_name} must be on one device, got {a.device} and {b.device}")


def _check_bias(fn: str, bias, n: int) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"{fn}: bias must have shape [{n}], got {list(bias.shape)}")


def _act_code(fn: str, activation) -> int:
    if activation not in ACT_CODES:
        raise ValueError(f"{fn}: activation must be None or one of {tuple(k for k in ACT_CODES if k)}, "
                         f"got {activation!r}")
    return ACT_CODES[activation]


def _gated_code(fn: str, gated) -> int:
    if gated not in GATED_ACTS:
        raise ValueError(f"{fn}: gated must be one of {tuple(GATED_ACTS)}, got {gated!r}")
    return ACT_CODES[GATED_ACTS[gated]]


def _up_first(fn: str, gate_order) -> bool:
    if gate_order not in GATE_ORDERS:
        raise ValueError(f"{fn}: gate_order must be one of {GATE_ORDERS}, got {gate_order!r}")
    return gate_order == "up_gate"


def _launch(epilogue: int, a, b, c, aux, bias, M: int, N: int, K: int, act: int, save: bool,
            up_first: bool = False, b2=None, bias2=None, a2=None):
    """Run the kernel; for DACT and DGATED return the bias gradient (float32, one entry per
    column of c), finished from the per-row-tile partial sums. GATED: b2 / bias2, the second
    projection and its bias, default to views of b's and bias's second halves. LINEAR with
    a2 and b2: a @ b^T + a2 @ b2^T (SPLIT_K)."""
    two = epilogue in (GATED, DGATED)
    if epilogue == GATED and b2 is None:
        b2, bias2 = b[N:], (bias[N:] if bias is not None else None)
    split = epilogue == LINEAR and a2 is not None
    bm, bn, bk, group_m, warps, stages = _config(a.device, a.dtype, two)
    dbias = None
    if epilogue in (DACT, DGATED):
        dbias = empty((triton.cdiv(M, bm), c.shape[1]), torch.float32, a.device)
    dummy = c  # never read or written where its flag is off
    aux_t = aux if aux is not None else dummy
    a2_t = a2 if split else a  # never read unless SPLIT_K
    b2_t = b2 if b2 is not None else b  # never read unless GATED or SPLIT_K
    bias2_t = bias2 if bias2 is not None else dummy
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _matmul_kernel[grid](
        a, b, c, aux_t, bias if bias is not None else dummy, dbias if dbias is not None else dummy,
        a2_t, b2_t, bias2_t,
        M, N, K, a2.shape[1] if split else 0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        aux_t.stride(0), aux_t.stride(1),
        bias.stride(0) if bias is not None else 0, dbias.stride(0) if dbias is not None else 0,
        a2_t.stride(0), a2_t.stride(1), b2_t.stride(0), b2_t.stride(1),
        bias2.stride(0) if bias2 is not None else 0,
        EPILOGUE=epilogue, ACT=act, HAS_BIAS=bias is not None, SAVE=save, IEEE=_ieee(a.dtype),
        UP_FIRST=up_first, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps,
        num_stages=stages,
    )
    return None if dbias is None else dbias.sum(dim=0)


# ----------------------------------------------------------------------------- launchers

def matmul(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor | None = None,
           b2: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T for a (M, K), b (N, K), any strides; (M, N) in a's dtype. With a2 (M, K2) and
    b2 (N, K2): a @ b^T + a2 @ b2^T in one accumulator, the two products joined along K
    without a joined copy."""
    _check_operands("matmul", a, b, "a", "b")
    if (a2 is None) != (b2 is None):
        raise ValueError("matmul: a2 and b2 go together (the second stretch of K), got one of them")
    M, K = a.shape
    N = b.shape[0]
    if a2 is not None:
        _check_operands("matmul", a2, b2, "a2", "b2")
        if a2.shape[0] != M or b2.shape[0] != N or a2.dtype != a.dtype or a2.device != a.device:
            raise ValueError(f"matmul: a2 {list(a2.shape)} and b2 {list(b2.shape)} must have a's {M} rows and b's "
                             f"{N} rows, a's dtype and device")
    c = empty((M, N), a.dtype, a.device)
    if M and N:
        _launch(LINEAR, a, b, c, None, None, M, N, K, 0, False, b2=b2, a2=a2)
    return c


def linear_fwd(x: torch.Tensor, w: torch.Tensor, bias=None, activation=None, save_preact: bool = False):
    """(y, z): y = act(x w^T + bias) in x's dtype; z = x w^T + bias (x's dtype) when
    save_preact, else None. x (M, K), w (N, K), bias (N,) or None."""
    _check_operands("linear_fwd", x, w, "x", "w")
    code = _act_code("linear_fwd", activation)
    M, K = x.shape
    N = w.shape[0]
    _check_bias("linear_fwd", bias, N)
    y = empty((M, N), x.dtype, x.device)
    z = empty((M, N), x.dtype, x.device) if save_preact else None
    if M and N:
        _launch(LINEAR, x, w, y, z, bias, M, N, K, code, save_preact)
    return y, z


def gated_fwd(x: torch.Tensor, w: torch.Tensor, bias, gated: str, save_gu: bool = False,
              gate_order: str = "gate_up", w_up: torch.Tensor | None = None, bias_up=None):
    """(h, gu): h = act(g) * u (M, H) in x's dtype, with gu = x w^T + b (M, 2H) split into
    g, u = gu[:, :H], gu[:, H:] (gate_order "gate_up": w's gate rows first) or
    u, g = ... ("up_gate": F.glu's value-first order); gu, in w's row order, is returned
    when save_gu, else None. w (2H, K).

    With w_up (H, K): w (H, K) is the gate projection alone and w_up the up projection, two
    tensors (a checkpoint's gate_proj and up_proj), read where they are; bias (H,) and
    bias_up (H,) theirs, both or neither; gu is [g, u] (gate_order must be "gate_up")."""
    _check_operands("gated_fwd", x, w, "x", "w")
    code = _gated_code("gated_fwd", gated)
    up_first = _up_first("gated_fwd", gate_order)
    M, K = x.shape
    if w_up is not None:
        _check_operands("gated_fwd", x, w_up, "x", "w_up")
        if w_up.shape != w.shape:
            raise ValueError(f"gated_fwd: w_up must have the gate's shape {list(w.shape)}, got {list(w_up.shape)}")
        if up_first:
            raise ValueError("gated_fwd: with w_up, w is the gate: gate_order must be 'gate_up'")
        if (bias is None) != (bias_up is None):
            raise ValueError("gated_fwd: with w_up, give bias and bias_up both or neither")
        H = w.shape[0]
        _check_bias("gated_fwd", bias, H)
        _check_bias("gated_fwd", bias_up, H)
    else:
        if bias_up is not None:
            raise ValueError("gated_fwd: bias_up goes with w_up")
        if w.shape[0] % 2:
            raise ValueError(f"gated_fwd: w must have an even number of rows (gate, then up), got {w.shape[0]}")
        H = w.shape[0] // 2
        _check_bias("gated_fwd", bias, 2 * H)
    h = empty((M, H), x.dtype, x.device)
    gu = empty((M, 2 * H), x.dtype, x.device) if save_gu else None
    if M and H:
        _launch(GATED, x, w, h, gu, bias, M, H, K, code, save_gu, up_first, b2=w_up,
                bias2=bias_up if w_up is not None else None)
    return h, gu


def matmul_dact(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, activation):
    """(dz, dbias): dz = (a @ b^T) * act'(z) in a's dtype, dbias = dz summed over rows in
    float32 (N,). a (M, K), b (N, K), z (M, N) the forward's preactivation."""
    _check_operands("matmul_dact", a, b, "a", "b")
    code = _act_code("matmul_dact", activation)
    M, K = a.shape
    N = b.shape[0]
    if tuple(z.shape) != (M, N):
        raise ValueError(f"matmul_dact: z must have shape {[M, N]} (rows of a, rows of b), got {list(z.shape)}")
    dz = empty((M, N), a.dtype, a.device)
    if not (M and N):
        return dz, torch.zeros(N, dtype=torch.float32, device=a.device)
    return dz, _launch(DACT, a, b, dz, z, None, M, N, K, code, False)


def matmul_dgated(a: torch.Tensor, b: torch.Tensor, gu: torch.Tensor, gated: str, gate_order: str = "gate_up"):
    """(dgu, dbias): with dh = a @ b^T (M, H) and g, u = gu[:, :H], gu[:, H:] (gate_order
    "gate_up"; "up_gate": u, g = ...), dgu = the gradients dg = dh * u * act'(g) and
    du = dh * act(g) in gu's order (M, 2H) in a's dtype, dbias its column sums in float32
    (2H,). a (M, K), b (H, K), gu (M, 2H) the forward's preactivations."""
    _check_operands("matmul_dgated", a, b, "a", "b")
    code = _gated_code("matmul_dgated", gated)
    up_first = _up_first("matmul_dgated", gate_order)
    M, K = a.shape
    H = b.shape[0]
    if tuple(gu.shape) != (M, 2 * H):
        raise ValueError(f"matmul_dgated: gu must have shape {[M, 2 * H]} (rows of a, twice the rows of b), "
                         f"got {list(gu.shape)}")
    dgu = empty((M, 2 * H), a.dtype, a.device)
    if not (M and H):
        return dgu, torch.zeros(2 * H, dtype=torch.float32, device=a.device)
    return dgu, _launch(DGATED, a, b, dgu, gu, None, M, H, K, code, False, up_first)


def dact(dy: torch.Tensor, z: torch.Tensor, activation):
    """(dz, dbias): dz = dy * act'(z) in dy's dtype (an elementwise pass, for a linear whose
    output gradient comes from outside; inside the FFN it is matmul_dact's epilogue), dbias
    its column sums in float32 (N,). For relu, z may be the forward's output."""
    code = _act_code("dact", activation)
    _check_2d("dact: dy", dy)
    if tuple(z.shape) != tuple(dy.shape):
        raise ValueError(f"dact: z must have dy's shape {list(dy.shape)}, got {list(z.shape)}")
    M, N = dy.shape
    dz = empty((M, N), dy.dtype, dy.device)
    if not (M and N):
        return dz, torch.zeros(N, dtype=torch.float32, device=dy.device)
    gpu = gpu_tiles(dy.device)
    bm, bn = (32, 128) if gpu else (16, 16)
    dbias = empty((triton.cdiv(M, bm), N), torch.float32, dy.device)
    _dact_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        dy, z, dz, dbias, M, N, dy.stride(0), dy.stride(1), z.stride(0), z.stride(1), dz.stride(0), dbias.stride(0),
        ACT=code, BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if gpu else 1)
    return dz, dbias.sum(dim=0)


# ----------------------------------------------------------------------------- compile check

def gpu_compile_variants():
    """(kernel, signature, constexprs, options) for kernels/compile_check.py: every epilogue
    with the tiles, warps and stages ``_gpu_config`` picks for each dtype on an sm_80/sm_90.

    bf16 variants take the unit strides of contiguous operands as constants, as a launch on
    contiguous tensors specialises them; fp16 and fp32 ones keep every stride a variable
    (the transposed-operand case). The check cannot state 16-byte alignment (Triton's
    divisibility hints), so it compiles these without the cp.async pipelining that a launch
    on aligned tensors gets; with the hints, the shared memory is 128 KiB (sm_90) and 96 KiB
    (sm_80) for the 16-bit tiles, under both limits."""
    pointers = {"A", "B", "C", "AUX", "BIAS", "DBIAS", "A2", "B2", "BIAS2"}
    unit = ("stride_ak", "stride_bk", "stride_cn", "stride_xn", "stride_a2k", "stride_b2k")

    def signature(dt, contiguous):
        sig = {}
        for param in _matmul_kernel.params:
            if param.is_constexpr:
                continue
            if param.name in pointers:
                sig[param.name] = "*fp32" if param.name == "DBIAS" else f"*{dt}"
            elif contiguous and param.name in unit:
                sig[param.name] = "constexpr"
            else:
                sig[param.name] = "i32"
        return sig

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # (epilogue, activation code, has_bias, save, up_first[, split_k]): bf16 every activation
    # and both gate orders somewhere (geglu_tanh value-first: gelu_tanh's code in GATED,
    # DGATED) and the split-K product (dx of separate gate and up weights), the others one per
    # epilogue.
    every = [(LINEAR, 0, False, False, False), (LINEAR, 2, True, True, False), (LINEAR, 3, True, False, False),
             (LINEAR, 0, False, False, False, True),
             (GATED, 4, True, True, False), (GATED, 2, False, False, False), (GATED, 3, True, True, True),
             (DACT, 2, False, False, False), (DACT, 3, False, False, False), (DGATED, 4, False, False, False),
             (DGATED, 1, False, False, False), (DGATED, 3, False, False, True)]
    one_each = [(LINEAR, 2, True, True, False), (GATED, 4, True, True, False), (DACT, 2, False, False, False),
                (DGATED, 4, False, False, False)]
    cases = [("bf16", False, every), ("fp16", False, one_each), ("fp32", True, one_each), ("fp32", False, one_each)]
    variants = []
    for dt, ieee, epilogues in cases:
        contiguous = dt == "bf16"
        for epilogue, act, has_bias, save, up_first, *split in epilogues:
            bm, bn, bk, group_m, warps, stages = _gpu_config(torch_dtype[dt], epilogue in (GATED, DGATED))
            const = dict(EPILOGUE=epilogue, ACT=act, HAS_BIAS=has_bias, SAVE=save, IEEE=ieee, UP_FIRST=up_first,
                         SPLIT_K=bool(split and split[0]), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m)
            if contiguous:
                const.update({name: 1 for name in unit})
            variants.append((_matmul_kernel, signature(dt, contiguous), const,
                             {"num_warps": warps, "num_stages": stages}))
    for dt in ("bf16", "fp32"):
        sig = {p.name: (f"*{dt}" if p.name in ("DY", "Z", "DZ") else "*fp32" if p.name == "DBIAS" else "i32")
               for p in _dact_kernel.params if not p.is_constexpr}
        for act in (1, 2, 3, 4):
            variants.append((_dact_kernel, sig, dict(ACT=act, BLOCK_M=32, BLOCK_N=128), {"num_warps": 4}))
    return variants
