"""Rotary position embedding (RoPE): checks, the custom op, autograd, dispatch.

    fastlm::rotary(x, cos, sin, position_ids?, interleaved, conjugate, backend?) -> out
    fastlm::rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, conjugate, backend?) -> (q_embed, k_embed)

    fastlm::qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, ...) -> (q_out, k_out)

(the second is Hugging Face's apply_rotary_pos_emb, q and k in one launch; the third RMSNorm
of q and k then rotary, one launch, with its own backward op; see below.)

Each op serves both directions: the gradient of a rotation is the rotation back, so the
backward calls the same op with ``conjugate`` flipped (sin negated), on the backend that
was requested at the forward (autograd may run the backward on another thread, where
``use_backend`` would not be seen). The forward passes backend=None: resolved when the op
runs, not when it is traced. Being linear in x, each op is its own double backward.

Gradients flow to x (q, k) only: cos and sin are tables of fixed angles, and no gradient is
propagated to them even when they require one.

Eager calls go through an EagerTwin (fastlm/ops/_eager.py), torch.compile through the custom
op. On the "torch" backend (the CPU path) torch has no rotary function: the call is the
reference formula itself (fastlm.reference.rotary, a handful of slices, products and one
concatenation), differentiated by torch's autograd.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backend import get_backend, native_backend, resolve
from ..reference import rotary as ref
from ._autocast import no_autocast
from ._eager import EagerTwin, compiling

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 1024  # wider heads run on the reference (a tile per head must fit in registers)


# ----------------------------------------------------------------------------- argument checks

def _check_args(x, cos, sin, position_ids, interleaved) -> None:
    fn = "fastlm.rotary"
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be 4-D (batch, seqlen, heads, head_dim), got shape {list(x.shape)}")
    B, S, _, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; with x of dtype {x.dtype} it must be "
                            f"torch.float32 or {x.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D (max_seqlen, rotary_dim / 2), got shape {list(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{fn}: sin has shape {list(sin.shape)} but cos has {list(cos.shape)}; they must match")
    _check_tables_and_positions(fn, "x", x, cos, position_ids, B, S, D)
    if not isinstance(interleaved, bool):
        raise TypeError(f"{fn}: interleaved must be a bool, got {type(interleaved).__name__}")


def _check_tables_and_positions(fn: str, name: str, x: Tensor, cos: Tensor, position_ids, B: int, S: int,
                                D: int) -> None:
    """The tables' rotary dim (cos: (..., max_seqlen, rotary_dim / 2)) fits head_dim D; without
    position_ids the tables cover x's S positions, with them position_ids is an integer tensor
    on x's device of shape (S,), (B, S) or (1, S). ``name``: x's name in the caller's signature."""
    s_max, r_half = cos.shape[-2], cos.shape[-1]
    if r_half == 0 or 2 * r_half > D:
        raise ValueError(f"{fn}: cos has {r_half} columns, so the rotary dim is {2 * r_half}; it must be between 2 "
                         f"and head_dim = {D} (cos and sin hold rotary_dim / 2 columns)")
    if position_ids is None:
        if S > s_max:
            raise ValueError(f"{fn}: {name} has seqlen {S} but cos and sin have only {s_max} rows (positions); make "
                             f"longer tables or pass position_ids")
        return
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"{fn}: position_ids must be a Tensor or None, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.device != x.device:
        raise ValueError(f"{fn}: position_ids is on {position_ids.device} but {name} is on {x.device}")
    if tuple(position_ids.shape) not in ((S,), (B, S), (1, S)):
        raise ValueError(f"{fn}: position_ids must have shape (batch, seqlen) = {[B, S]} or (seqlen,) = {[S]}, "
                         f"got {list(position_ids.shape)}")


def _check_positions(position_ids: Optional[Tensor], s_max: int, fn: str = "fastlm.rotary") -> None:
    """Positions must index the tables. Checked where it costs no device sync (CPU tensors);
    on a GPU the kernel gives NaN for the rotated features of an out-of-range token."""
    if position_ids is None or position_ids.device.type != "cpu" or position_ids.numel() == 0:
        return
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if lo < 0 or hi >= s_max:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{fn}: position_ids holds {bad}, outside the tables: cos and sin have "
                         f"{s_max} rows, so positions must be in [0, {s_max})")


def _triton_unsupported(x: Tensor, cos: Tensor, sin: Tensor) -> Optional[str]:
    if x.dtype not in _KERNEL_DTYPES:
        return f"x has dtype {x.dtype}; the kernel takes float32, float16 and bfloat16"
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {x.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def _pick(x: Tensor, cos: Tensor, sin: Tensor, requested: Optional[str] = None) -> str:
    return resolve("rotary", x.device.type, {
        "triton": _triton_unsupported(x, cos, sin),
        "cuda": "there is no CUDA C++ rotary kernel (the Triton kernel is memory-bound already)",
    }, requested)


# ----------------------------------------------------------------------------- the custom op

@no_autocast
def _rotary_body(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor], interleaved: bool,
                 conjugate: bool, backend: Optional[str]) -> Tensor:
    _check_positions(position_ids, cos.shape[0])
    chosen = _pick(x, cos, sin, backend)
    if chosen == "triton":
        from fastlm.kernels import rotary as kernels
        return kernels.rotary_fwd(x, cos, sin, position_ids, interleaved, conjugate)
    return ref.rotary(x, cos, sin, position_ids, interleaved, conjugate).contiguous()


_rotary = torch.library.custom_op("fastlm::rotary", mutates_args=())(_rotary_body)


@_rotary.register_fake
def _(x, cos, sin, position_ids, interleaved, conjugate, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, cos, sin, position_ids, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved, ctx.conjugate = interleaved, conjugate
    ctx.backend = backend if backend is not None else get_backend()


def _backward_with(rotary_op):
    def backward(ctx, dy):
        cos, sin, position_ids = ctx.saved_tensors
        dx = rotary_op(dy, cos, sin, position_ids, ctx.interleaved, not ctx.conjugate, ctx.backend)
        return dx, None, None, None, None, None, None
    return backward


_rotary.register_autograd(_backward_with(_rotary), setup_context=_setup_context)
# The eager twin's backward calls the twin, so a double backward (the op is linear in x) works too.
_rotary_eager = EagerTwin(_rotary, _rotary_body, _setup_context, _backward_with(lambda *a: _rotary_eager(*a)),
                          name="rotary", differentiable_backward=True)


# ----------------------------------------------------------------------------- public functions

def rotary(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
           interleaved: bool = False) -> Tensor:
    """Rotary position embedding of x (batch, seqlen, heads, head_dim), any strides (a view
    of a packed qkv tensor is read in place). Returns a new contiguous tensor shaped like x.

    cos, sin: (max_seqlen, rotary_dim / 2), float32 or x's dtype (see :func:`rotary_cos_sin`).
    The first rotary_dim features of each head rotate, the rest pass through unchanged.
    position_ids: None (positions 0..seqlen-1) or an integer tensor (batch, seqlen) or
    (seqlen,) of rows of cos/sin, e.g. offsets when decoding with a KV cache. A position
    outside [0, max_seqlen) raises a ValueError on CPU tensors; on CUDA tensors it is not
    checked (that would cost a host sync per call): the Triton kernel gives NaN for the
    rotated features of that token (the reference, e.g. for float64, fails in torch's
    indexing with a device-side assert).
    interleaved=False pairs features (i, i + rotary_dim / 2) (GPT-NeoX, Llama: "rotate_half");
    True pairs (2i, 2i + 1) (GPT-J).

    The gradient flows to x only; cos and sin get none, even when they require grad.
    """
    _check_args(x, cos, sin, position_ids, interleaved)
    if not compiling() and native_backend(x.device.type):
        _check_positions(position_ids, cos.shape[0])
        if cos.requires_grad:
            cos = cos.detach()
        if sin.requires_grad:
            sin = sin.detach()
        return ref.rotary(x, cos, sin, position_ids, interleaved)
    return _rotary_eager(x, cos, sin, position_ids, interleaved, False, None)


def rotary_cos_sin(seqlen: int, rotary_dim: int, base: float = 10000.0, device=None,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The cos and sin tables for :func:`rotary`, each (seqlen, rotary_dim / 2):
    angle(p, j) = p * base ** (-2j / rotary_dim). Computed in float64 on the CPU (the same
    bits on every device), then cast to ``dtype`` and moved to ``device``."""
    fn = "fastlm.rotary_cos_sin"
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 0:
        raise ValueError(f"{fn}: seqlen must be an int >= 0, got {seqlen!r}")
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"{fn}: rotary_dim must be a positive even int, got {rotary_dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0 or base == float("inf"):
        raise ValueError(f"{fn}: base must be a finite number > 0, got {base!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype!r}")
    cos, sin = ref.cos_sin(seqlen, rotary_dim, float(base))
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets=0, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
    """flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``, argument for argument, on
    :func:`rotary`: x (batch, seqlen, nheads, headdim), or (total, nheads, headdim) packed by
    cu_seqlens (batch + 1,); cos, sin (seqlen_ro, rotary_dim / 2); the first rotary_dim
    features of each head rotate. seqlen_offsets: an int or a (batch,) tensor shifting each
    sequence's positions (decoding with a KV cache). max_seqlen is accepted (the positions come
    from cu_seqlens). inplace writes the result into x (an autograd-recorded copy_) and returns
    x. Gradients flow to x, not to cos and sin, as flash-attn's."""
    fn = "fastlm.apply_rotary_emb"
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.dtype.is_floating_point or seqlen_offsets.dim() != 1:
            raise ValueError(f"{fn}: seqlen_offsets must be an int or a (batch,) integer tensor, got "
                             f"{seqlen_offsets.dtype} {list(seqlen_offsets.shape)}")
        offsets = seqlen_offsets.to(device=x.device, dtype=torch.long)
    elif isinstance(seqlen_offsets, int) and not isinstance(seqlen_offsets, bool):
        offsets = seqlen_offsets
    else:
        raise ValueError(f"{fn}: seqlen_offsets must be an int or a (batch,) integer tensor, got {seqlen_offsets!r}")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"{fn}: x must be (batch, seqlen, nheads, headdim) without cu_seqlens, got "
                             f"{list(x.shape)}")
        B, S = x.shape[0], x.shape[1]
        if isinstance(offsets, Tensor) and offsets.shape != (B,):
            raise ValueError(f"{fn}: seqlen_offsets must have shape ({B},), got {list(offsets.shape)}")
        steps = torch.arange(S, device=x.device)
        positions = (offsets[:, None] + steps) if isinstance(offsets, Tensor) else (steps + offsets if offsets else None)
        out = rotary(x, cos, sin, positions, interleaved)
    else:
        if x.dim() != 3:
            raise ValueError(f"{fn}: x must be (total, nheads, headdim) with cu_seqlens, got {list(x.shape)}")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
                or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"{fn}: cu_seqlens must be a (batch + 1,) integer tensor, got {cu_seqlens!r}")
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        batch = cu.numel() - 1
        if isinstance(offsets, Tensor) and offsets.shape != (batch,):
            raise ValueError(f"{fn}: seqlen_offsets must have shape ({batch},), got {list(offsets.shape)}")
        token = torch.arange(x.shape[0], device=x.device)
        seq = (torch.searchsorted(cu[1:], token, right=True)).clamp_(max=max(batch - 1, 0))
        positions = token - cu[seq] + (offsets[seq] if isinstance(offsets, Tensor) else offsets)
        out = rotary(x[None], cos, sin, positions[None], interleaved)[0]
    if inplace:
        return x.copy_(out)
    return out


# ----------------------------------------------------------------------------- HF's apply_rotary_pos_emb
#
#     fastlm::rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, conjugate, backend?) -> (q_embed, k_embed)
#
# q and k in Hugging Face's layout, cos/sin as HF's rotary embedding makes them (the first half
# read). One Triton launch rotates both (the kernel's HAS_K), reading q and k through their
# strides and writing the outputs contiguous in q's and k's shapes, as HF's formula gives them
# for contiguous inputs. The backward is the same op with ``conjugate`` flipped: one launch
# for dq and dk.

def _bshd(x: Tensor, unsqueeze_dim: int) -> Tensor:
    """A view (B, S, H, D) of a tensor in HF's layout: the kernel's order."""
    return x.transpose(1, 2) if unsqueeze_dim == 1 else x


def _pick_pos_emb(q: Tensor, k: Tensor, requested: Optional[str] = None) -> str:
    why = None
    if q.dtype not in _KERNEL_DTYPES:
        why = f"q has dtype {q.dtype}; the kernel takes float32, float16 and bfloat16"
    elif max(q.shape[-1], k.shape[-1]) > MAX_HEAD_DIM:
        why = f"head dim {max(q.shape[-1], k.shape[-1])} > {MAX_HEAD_DIM}"
    return resolve("apply_rotary_pos_emb", q.device.type, {
        "triton": why,
        "cuda": "there is no CUDA C++ rotary kernel (the Triton kernel is memory-bound already)",
    }, requested)


@no_autocast
def _rotary_pos_emb_body(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, conjugate: bool,
                         backend: Optional[str]) -> tuple[Tensor, Tensor]:
    if _pick_pos_emb(q, k, backend) == "triton":
        from fastlm.kernels import rotary as kernels
        from fastlm.kernels.launch import empty
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]  # (B or 1, S, R/2) or (S, R/2): views, no copy
        q_out, k_out = empty(q.shape, q.dtype, q.device), empty(k.shape, k.dtype, k.device)
        kernels.rotary_fwd(_bshd(q, unsqueeze_dim), c, s, None, False, conjugate, k=_bshd(k, unsqueeze_dim),
                           out=_bshd(q_out, unsqueeze_dim), out_k=_bshd(k_out, unsqueeze_dim))
        return q_out, k_out
    q_out, k_out = ref.rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, conjugate)
    return q_out.contiguous(), k_out.contiguous()


_rotary_pos_emb = torch.library.custom_op("fastlm::rotary_pos_emb", mutates_args=())(_rotary_pos_emb_body)


@_rotary_pos_emb.register_fake
def _(q, k, cos, sin, unsqueeze_dim, conjugate, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _pos_emb_setup_context(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.conjugate = unsqueeze_dim, conjugate
    ctx.backend = backend if backend is not None else get_backend()


def _pos_emb_backward_with(op):
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = op(dq, dk, cos, sin, ctx.unsqueeze_dim, not ctx.conjugate, ctx.backend)
        return dq, dk, None, None, None, None, None
    return backward


_rotary_pos_emb.register_autograd(_pos_emb_backward_with(_rotary_pos_emb), setup_context=_pos_emb_setup_context)
# Linear in q and k like rotary: the twin's backward calls the twin, so a double backward works.
_rotary_pos_emb_eager = EagerTwin(_rotary_pos_emb, _rotary_pos_emb_body, _pos_emb_setup_context,
                                  _pos_emb_backward_with(lambda *a: _rotary_pos_emb_eager(*a)),
                                  name="apply_rotary_pos_emb", differentiable_backward=True)


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor] = None,
                         unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Hugging Face transformers' apply_rotary_pos_emb (Llama's and its kin's), argument for
    argument: q (B, H, S, D) and k (B, Hk, S, Dk) with unsqueeze_dim=1, or (B, S, H, D) with
    unsqueeze_dim=2, any strides (views of a packed projection are read in place); cos, sin
    (B or 1, S, R) or (S, R) as HF's rotary embedding makes them (the two halves of the last
    dim equal: HF's cat((freqs, freqs))), float32 or q's dtype. Returns (q_embed, k_embed),
    contiguous in q's and k's shapes and dtypes: the first R features rotated ("rotate_half"
    pairing), the rest (R < D, which HF's formula itself does not broadcast) passed through.
    position_ids is accepted and unused, as in transformers. Gradients flow to q and k, not to
    cos and sin. On the Triton backend one launch rotates q and k together, and one launch
    their gradients. On CPU tensors cos/sin halves that differ raise (on CUDA the first half
    is used unchecked: a check would cost a host sync)."""
    fn = "fastlm.apply_rotary_pos_emb"
    if isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in (1, 2):
        raise ValueError(f"{fn}: unsqueeze_dim must be 1 (q (B, H, S, D)) or 2 (q (B, S, H, D)), got {unsqueeze_dim!r}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{fn}: q and k must be 4-D, got {list(q.shape)} and {list(k.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"{fn}: q must be a floating-point tensor, got dtype {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{fn}: k has dtype {k.dtype} but q has {q.dtype}; they must match")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-1] % 2 or cos.shape[-1] == 0:
        raise ValueError(f"{fn}: cos and sin must be (batch, seqlen, rotary_dim) or (seqlen, rotary_dim) alike, "
                         f"rotary_dim even, got {list(cos.shape)} and {list(sin.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; with q of dtype {q.dtype} it must be "
                            f"torch.float32 or {q.dtype}")
    R = cos.shape[-1]
    Bc, S = (1, cos.shape[0]) if cos.dim() == 2 else (cos.shape[0], cos.shape[1])
    qs, ks = _bshd(q, unsqueeze_dim), _bshd(k, unsqueeze_dim)
    for name, t, x in (("q", q, qs), ("k", k, ks)):
        if x.shape[1] != S or Bc not in (1, x.shape[0]):
            raise ValueError(f"{fn}: {name} {list(t.shape)} does not match cos {list(cos.shape)} (batch and seqlen)")
        if x.shape[-1] < R:
            raise ValueError(f"{fn}: cos has {R} columns (the rotary dim) but {name} has head dim {x.shape[-1]}; "
                             f"the rotary dim must be at most the head dim")
    if ks.shape[0] != qs.shape[0]:
        raise ValueError(f"{fn}: k has batch {ks.shape[0]} but q has {qs.shape[0]}; they must match")
    half = R // 2
    # A data-dependent check: skipped while torch.compile traces (it would break the graph).
    if cos.is_cpu and not compiling() and not (torch.equal(cos[..., :half], cos[..., half:])
                                               and torch.equal(sin[..., :half], sin[..., half:])):
        raise ValueError(f"{fn}: the two halves of cos and sin's last dim must be equal (HF's cat((freqs, freqs)))")
    if cos.requires_grad:
        cos = cos.detach()
    if sin.requires_grad:
        sin = sin.detach()
    if not compiling() and native_backend(q.device.type):
        return ref.rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    return _rotary_pos_emb_eager(q, k, cos, sin, unsqueeze_dim, False, None)


# ----------------------------------------------------------------------------- q/k RMSNorm + rotary
#
#     fastlm::qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, position_ids?, eps, interleaved,
#                            weight_offset, cast_before_weight, all_heads, heads_first, backend?)
#         -> (q_out, k_out)
#     fastlm::qk_norm_rotary_bwd(dq_out, dk_out, q, k, ..., backend) -> (dq, dk, dq_weight, dk_weight)
#
# Qwen3's, OLMo-2's and Gemma 3's attention: RMSNorm of q and k, then rotary, one Triton launch
# forward (q and k in one grid, as rotary_pos_emb) and one backward. q and k are (B, S, H, D)
# views, or (B, H, S, D) with heads_first (Hugging Face's layout; the outputs are then
# contiguous (B, H, S, D), as HF's). The backward is not linear in the inputs: it has its own op
# (no double backward). On the "torch" backend the backward op is the reference's closed form.

_NORM_OVER = ("heads", "all")


def _lay(x: Tensor, heads_first: bool) -> Tensor:
    return x.transpose(1, 2) if heads_first else x


def _pick_qkn(q: Tensor, q_weight: Tensor, k_weight: Tensor, requested: Optional[str] = None) -> str:
    why = None
    for name, t in (("q", q), ("q_weight", q_weight), ("k_weight", k_weight)):
        if t.dtype not in _KERNEL_DTYPES:
            why = f"{name} has dtype {t.dtype}; the kernel takes float32, float16 and bfloat16"
            break
    if why is None and q.shape[-1] > MAX_HEAD_DIM:
        why = f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return resolve("qk_norm_rotary", q.device.type, {
        "triton": why,
        "cuda": "there is no CUDA C++ qk_norm_rotary kernel (the Triton kernel is memory-bound already)",
    }, requested)


def _kernel_weights(q_weight: Tensor, k_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The weights as the kernel reads them: contiguous, one dtype (float32 where they differ)."""
    if q_weight.dtype != k_weight.dtype:
        q_weight, k_weight = q_weight.float(), k_weight.float()
    return q_weight.contiguous(), k_weight.contiguous()


@no_autocast
def _qkn_body(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
              position_ids: Optional[Tensor], eps: float, interleaved: bool, weight_offset: float,
              cast_before_weight: bool, all_heads: bool, heads_first: bool,
              backend: Optional[str]) -> tuple[Tensor, Tensor]:
    _check_positions(position_ids, cos.shape[-2], "fastlm.qk_norm_rotary")
    if _pick_qkn(q, q_weight, k_weight, backend) == "triton":
        from fastlm.kernels import rotary as kernels
        from fastlm.kernels.launch import empty
        q_out, k_out = empty(q.shape, q.dtype, q.device), empty(k.shape, k.dtype, k.device)
        qw, kw = _kernel_weights(q_weight, k_weight)
        kernels.qk_norm_rotary_fwd(_lay(q, heads_first), _lay(k, heads_first), qw, kw, cos, sin, position_ids, eps,
                                   interleaved, weight_offset, cast_before_weight, all_heads,
                                   _lay(q_out, heads_first), _lay(k_out, heads_first))
        return q_out, k_out
    q_out, k_out = ref.qk_norm_rotary(_lay(q, heads_first), _lay(k, heads_first), q_weight, k_weight, cos, sin, eps,
                                      position_ids, interleaved, weight_offset, cast_before_weight,
                                      "all" if all_heads else "heads")
    return _lay(q_out, heads_first).contiguous(), _lay(k_out, heads_first).contiguous()


_qkn = torch.library.custom_op("fastlm::qk_norm_rotary", mutates_args=())(_qkn_body)


@_qkn.register_fake
def _(q, k, q_weight, k_weight, cos, sin, position_ids, eps, interleaved, weight_offset, cast_before_weight,
      all_heads, heads_first, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@no_autocast
def _qkn_bwd_body(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
                  cos: Tensor, sin: Tensor, position_ids: Optional[Tensor], eps: float, interleaved: bool,
                  weight_offset: float, cast_before_weight: bool, all_heads: bool, heads_first: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _pick_qkn(q, q_weight, k_weight, backend) == "triton":
        from fastlm.kernels import rotary as kernels
        from fastlm.kernels.launch import empty
        dq, dk = empty(q.shape, q.dtype, q.device), empty(k.shape, k.dtype, k.device)
        qw, kw = _kernel_weights(q_weight, k_weight)
        dqw, dkw = kernels.qk_norm_rotary_bwd(
            _lay(dq_out, heads_first), _lay(dk_out, heads_first), _lay(q, heads_first), _lay(k, heads_first), qw, kw,
            cos, sin, position_ids, eps, interleaved, weight_offset, cast_before_weight, all_heads,
            _lay(dq, heads_first), _lay(dk, heads_first))
        return dq, dk, dqw.to(q_weight.dtype), dkw.to(k_weight.dtype)
    dq, dk, dqw, dkw = ref.qk_norm_rotary_bwd(_lay(dq_out, heads_first), _lay(dk_out, heads_first),
                                              _lay(q, heads_first), _lay(k, heads_first), q_weight, k_weight, cos,
                                              sin, eps, position_ids, interleaved, weight_offset, cast_before_weight,
                                              "all" if all_heads else "heads")
    return _lay(dq, heads_first).contiguous(), _lay(dk, heads_first).contiguous(), dqw, dkw


_qkn_bwd = torch.library.custom_op("fastlm::qk_norm_rotary_bwd", mutates_args=())(_qkn_bwd_body)


@_qkn_bwd.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, position_ids, eps, interleaved, weight_offset,
      cast_before_weight, all_heads, heads_first, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), q_weight.new_empty(q_weight.shape), \
        k_weight.new_empty(k_weight.shape)


def _qkn_setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, position_ids, eps, interleaved, weight_offset, cast, all_heads, \
        heads_first, backend = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, position_ids)
    ctx.options = (eps, interleaved, weight_offset, cast, all_heads, heads_first)
    ctx.backend = backend if backend is not None else get_backend()


def _qkn_backward_with(bwd_op):
    def backward(ctx, dq_out, dk_out):
        q, k, q_weight, k_weight, cos, sin, position_ids = ctx.saved_tensors
        dq, dk, dqw, dkw = bwd_op(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, position_ids, *ctx.options,
                                  ctx.backend)
        return dq, dk, dqw, dkw, None, None, None, None, None, None, None, None, None, None
    return backward


_qkn.register_autograd(_qkn_backward_with(_qkn_bwd), setup_context=_qkn_setup_context)
_qkn_eager = EagerTwin(_qkn, _qkn_body, _qkn_setup_context, _qkn_backward_with(_qkn_bwd_body), name="qk_norm_rotary")


def _check_qkn(fn: str, q, k, q_weight, k_weight, cos, sin, eps, position_ids, interleaved, weight_offset,
               cast_before_weight, norm_over) -> float:
    """Checks fastlm.qk_norm_rotary's arguments (q, k in (B, S, H, D)); returns eps as a float."""
    for name, t in (("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"{fn}: q must be a floating-point tensor, got dtype {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{fn}: k has dtype {k.dtype} but q has {q.dtype}; they must match")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, seqlen, heads, head_dim), got shape {list(t.shape)}")
    B, S, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"{fn}: k has shape {list(k.shape)} but q has {list(q.shape)}; batch, seqlen and head_dim "
                         f"must match (the head counts may differ)")
    if not isinstance(norm_over, str) or norm_over not in _NORM_OVER:
        raise ValueError(f"{fn}: norm_over must be 'heads' (RMSNorm over each head's head_dim features: Qwen3, "
                         f"Gemma 3) or 'all' (over all of a token's heads: OLMo-2), got {norm_over!r}")
    for name, t, heads in (("q_weight", q_weight, H), ("k_weight", k_weight, k.shape[2])):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
        if t.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; with q of dtype {q.dtype} it must be {q.dtype} or "
                            f"torch.float32")
        want = (D,) if norm_over == "heads" else (heads * D,)
        if tuple(t.shape) != want:
            raise ValueError(f"{fn}: {name} has shape {list(t.shape)}; with norm_over={norm_over!r} it must be "
                             f"{list(want)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; with q of dtype {q.dtype} it must be torch.float32 "
                            f"or {q.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{fn}: {name} must be (max_seqlen, rotary_dim / 2) or (batch or 1, max_seqlen, "
                             f"rotary_dim / 2), got shape {list(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{fn}: sin has shape {list(sin.shape)} but cos has {list(cos.shape)}; they must match")
    if cos.dim() == 3 and cos.shape[0] not in (1, B):
        raise ValueError(f"{fn}: cos has batch {cos.shape[0]} but q has {B}; per-sequence tables need batch 1 or "
                         f"{B}")
    _check_tables_and_positions(fn, "q", q, cos, position_ids, B, S, D)
    for name, v in (("interleaved", interleaved), ("cast_before_weight", cast_before_weight)):
        if not isinstance(v, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(v).__name__}")
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)) \
            or not math.isfinite(weight_offset):
        raise ValueError(f"{fn}: weight_offset must be a finite number (0 for w, 1 for Gemma's 1 + w), got "
                         f"{weight_offset!r}")
    if eps is None:
        from .norm import default_rms_eps
        return default_rms_eps(q.dtype)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{fn}: eps must be None or a finite number >= 0, got {eps!r}")
    return float(eps)


def qk_norm_rotary(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                   eps: Optional[float] = None, position_ids: Optional[Tensor] = None, interleaved: bool = False, *,
                   weight_offset: float = 0.0, cast_before_weight: bool = False,
                   norm_over: str = "heads") -> tuple[Tensor, Tensor]:
    """RMSNorm of q and k, then rotary position embedding: ``rotary(rms_norm(q) * w)`` for q and
    k, in one Triton launch forward and one backward (the unfused chain, two rms_norm and a
    rotary, reads and writes q and k three times). Qwen3's, OLMo-2's and Gemma 3's attention.

    q (batch, seqlen, heads, head_dim) and k (batch, seqlen, kv_heads, head_dim), any strides
    (views of a packed qkv projection are read in place), the head counts may differ (GQA).
    Returns (q_out, k_out), new contiguous tensors in q's and k's shapes and dtype.

    norm_over="heads": the norm runs over each head's head_dim features, q_weight and k_weight
    (head_dim,) (Qwen3, Gemma 3). norm_over="all": over all of a token's features, heads *
    head_dim (OLMo-2's q_norm / k_norm, applied before the projection is split into heads),
    q_weight (heads * head_dim,) and k_weight (kv_heads * head_dim,); still one launch: a
    program takes all the heads of its tokens. Weights: q's dtype or float32.
    eps: None gives default_rms_eps(q.dtype), as fastlm.rms_norm and torch.
    cos, sin, position_ids, interleaved: as :func:`rotary` (the first rotary_dim features of each
    head rotate, the rest pass through, normalised); cos and sin may also be per sequence,
    (batch or 1, max_seqlen, rotary_dim / 2).
    weight_offset: the features are multiplied by weight + weight_offset: 0 for Llama-style
    norms, 1 for Gemma's ``(1 + weight)``.
    cast_before_weight: round the normalised x to q's dtype before the weight multiplies it
    (Llama's and Qwen3's RMSNorm, ``weight * x_hat.to(input_dtype)``); False multiplies in
    float32 and rounds once at the end (Gemma's and OLMo-2's). The math is float32 either way
    (float64 for float64), and the rotation follows without a rounding in between.

    Gradients flow to q, k, q_weight and k_weight (not to cos and sin)."""
    fn = "fastlm.qk_norm_rotary"
    eps = _check_qkn(fn, q, k, q_weight, k_weight, cos, sin, eps, position_ids, interleaved, weight_offset,
                     cast_before_weight, norm_over)
    if cos.requires_grad:
        cos = cos.detach()
    if sin.requires_grad:
        sin = sin.detach()
    if not compiling() and native_backend(q.device.type):
        _check_positions(position_ids, cos.shape[-2], fn)
        return ref.qk_norm_rotary(q, k, q_weight, k_weight, cos, sin, eps, position_ids, interleaved,
                                  float(weight_offset), cast_before_weight, norm_over)
    return _qkn_eager(q, k, q_weight, k_weight, cos, sin, position_ids, eps, interleaved, float(weight_offset),
                      cast_before_weight, norm_over == "all", False, None)


def qk_norm_rotary_heads_first(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                               eps: float, weight_offset: float, cast_before_weight: bool,
                               all_heads: bool) -> tuple[Tensor, Tensor]:
    """The Hugging Face integration's entry (fastlm.integrations.hf_rotary): q (B, H, S, D) and
    k (B, H_k, S, D), cos and sin (B or 1, S, R/2) (the first half of HF's tables), arguments
    already checked by the caller. Outputs contiguous (B, H, S, D), as HF's."""
    if not compiling() and native_backend(q.device.type):
        q_out, k_out = ref.qk_norm_rotary(q.transpose(1, 2), k.transpose(1, 2), q_weight, k_weight, cos, sin, eps,
                                          None, False, weight_offset, cast_before_weight,
                                          "all" if all_heads else "heads")
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return _qkn_eager(q, k, q_weight, k_weight, cos, sin, None, eps, False, weight_offset, cast_before_weight,
                      all_heads, True, None)
