"""Attention: argument checks, custom ops, autograd, dispatch, and the public interfaces.

    fastlm::attention(q, k, v, mask?, cu_seqlens_q?, cu_seqlens_k?, seqused_k?, seed?, scale,
                      bottom_right, window_left, window_right, softcap, dropout_p,
                      max_seqlen_q, max_seqlen_k) -> (out, lse)
    fastlm::attention_bwd(dout, q, k, v, out, lse, mask?, cu_seqlens_q?, cu_seqlens_k?, seed?, ...,
                          backend, mask_grad) -> (dq, dk, dv, dmask)

One op pair serves every interface: q (B, L, H, D), k and v (B, S, Hk, D) with any strides
(SDPA's (B, H, L, E) is a transposed view of it, so nothing is copied), or packed
(total, H, D) with cu_seqlens; causal is window_right = 0, aligned top-left (SDPA) or
bottom-right (FlashAttention). The forward saves only its output and the logsumexp.

A float mask may need a gradient (T5's relative position bias): it is an additive bias on the
scores, so its gradient is the backward's dS summed over the dims the mask is broadcast
along, in float32: the Triton kernel sums in place into a buffer of the mask's shape (never a
dense (B, H, L, S) one), the reference returns dS unreduced; the backward op sums what is left
to the mask's own (broadcastable) shape and casts it to the mask's dtype. Without mask_grad
the backward op returns an empty dmask and the kernels store nothing more than before.

Eager calls go through ``_attention_eager`` (fastlm/ops/_eager.py: the same body and backward
without the custom-op dispatch); torch.compile and opcheck see the custom ops. On the "torch"
backend with CPU tensors, scaled_dot_product_attention, flash_attn_func and
nn.MultiheadAttention call torch's SDPA where it computes what fastlm does (issue 17); the
reference serves fastlm's extras (soft-cap, windows, dropout's seeded mask, the lse, packed
sequences, the KV cache).

Dropout: each call draws one int64 seed with torch.randint on q's device, so from that
device's own generator (on a GPU the CUDA generator's Philox offset, as SDPA and flash-attn
draw theirs): torch.manual_seed / torch.cuda.manual_seed reproduce it, nothing is copied from
the host per call, and under CUDA-graph capture the draw is part of the graph, so every
replay draws a new mask. The seed stays a device tensor: the Triton kernels load it and
draw their mask with tl.rand (no host sync); the reference (the CPU path) reads it to seed a
torch.Generator. The seed is saved for the backward, which regenerates the forward's mask.
``dropout_mask`` returns the mask a backend draws for a seed, so tests can run the reference
with it.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import native_backend_of, get_backend, native_backend, resolve
from ..errors import ArgumentError, ArgumentTypeError
from ..reference import attention as ref
from ..reference import rotary as ref_rotary
from .rotary import rotary
from ._autocast import autocast_inputs, autocast_to, no_autocast
from ._eager import EagerTwin, compiling

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256

# Whether any autocast region is on: one C call, so the usual call skips autocast_inputs.
_autocast_any = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))


# ----------------------------------------------------------------------------- dropout

def draw_dropout_seed(device=None) -> Tensor:
    """A seed for the dropout mask: a one-element int64 tensor drawn on ``device`` (the CPU if
    None) by that device's generator, a device-side op (graph-safe on CUDA)."""
    return torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=device)


def _reference_keep(seed: Tensor, B: int, H: int, L: int, S: int, dropout_p: float, device) -> Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.item()))
    return torch.rand((B, H, L, S), generator=g, device=device) >= dropout_p


def dropout_mask(seed: Tensor, B: int, H: int, L: int, S: int, dropout_p: float, backend: str,
                 device) -> Tensor:
    """The (B, H, L, S) boolean mask of kept positions that ``backend`` draws for ``seed``
    (for packed sequences L and S are the longest lengths). A debugging and testing aid."""
    if backend == "triton":
        from fastlm.kernels import attention as kernels
        return kernels.dropout_mask(seed.to(device), B, H, L, S, dropout_p, torch.device(device))
    return _reference_keep(seed, B, H, L, S, dropout_p, device)


def _check_seed(fn: str, seed: Optional[Tensor], dropout_p: float, q: Tensor, name: str = "q") -> None:
    """With dropout, the seed is a one-element int64 tensor on the device of q (the tensor
    the caller calls ``name``): it is never copied there (draw it with draw_dropout_seed).
    The attention and norm ops share this check."""
    if dropout_p == 0.0:
        return
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ArgumentError(f"{fn}: dropout_p > 0 needs seed, a one-element int64 tensor "
                            f"(draw_dropout_seed({name}.device)), got {seed!r}")
    if seed.device != q.device:
        raise ArgumentError(f"{fn}: seed is on {seed.device} but {name} is on {q.device}; draw it there with "
                            f"draw_dropout_seed({name}.device)")


# ----------------------------------------------------------------------------- dispatch

def _triton_unsupported(q: Tensor, v: Tensor, mask: Optional[Tensor]) -> Optional[str]:
    if q.dtype not in _KERNEL_DTYPES:
        return f"inputs have dtype {q.dtype}; the kernels take float32, float16 and bfloat16"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    return None


_CUDA_HEAD_DIMS = (32, 64, 96, 128)  # those csrc/attention.cu is built for

# csrc/attention.cu's tile plan, mirrored here so the op can refuse a device up front (and
# tests/test_cuda_build.py checks it against the built module's attention_smem_bytes and
# attention_tile_cols). Each kernel owns 64 rows and walks the other operand in tiles of NC
# rows: 64, or 32 where the device's opt-in shared memory per block is too small for 64.
CUDA_ATTENTION_KERNELS = ("forward", "dq", "dkdv")  # the module's kernel numbers 0, 1, 2
_CUDA_NC32_HEAD_DIMS = (96, 128)  # head dims whose kernels are also built with NC = 32
# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability.
CUDA_SMEM_OPTIN = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
                   (10, 0): 232448, (12, 0): 101376}


def cuda_attention_smem_bytes(kernel: str, head_dim: int, nc: int) -> Optional[int]:
    """The dynamic shared memory csrc/attention.cu's ``kernel`` ("forward", "dq", "dkdv") takes
    at ``head_dim`` with walked tiles of ``nc`` rows; None where that variant is not built."""
    if head_dim not in _CUDA_HEAD_DIMS or nc not in (64, 32) or (nc == 32 and head_dim not in _CUDA_NC32_HEAD_DIMS):
        return None
    ldt = ldo = head_dim + 8  # 16-bit tile rows and float accumulator rows, padded
    lds = ldp = nc + 8  # float score rows and 16-bit probability rows, padded
    tile, tile_nc = 64 * ldt * 2, nc * ldt * 2
    scores, probs, acc = 64 * lds * 4, 64 * ldp * 2, 64 * ldo * 4
    if kernel == "forward":
        return tile + 2 * tile_nc + scores + probs + acc
    if kernel == "dq":
        return 2 * tile + 2 * tile_nc + 2 * scores + probs + 2 * 64 * 4
    if kernel == "dkdv":
        return 2 * tile + 2 * tile_nc + 2 * scores + 2 * probs + 2 * nc * 4
    raise ValueError(f"kernel: expected one of {CUDA_ATTENTION_KERNELS}, got {kernel!r}")


def cuda_attention_tile_cols(kernel: str, head_dim: int, smem_limit: int) -> int:
    """The walked-tile rows csrc/attention.cu launches ``kernel`` with under an opt-in limit of
    ``smem_limit`` bytes per block: 64 where it fits, else 32 where built and it fits, else 0
    (the kernel cannot run there)."""
    for nc in (64, 32):
        need = cuda_attention_smem_bytes(kernel, head_dim, nc)
        if need is not None and need <= smem_limit:
            return nc
    return 0


@functools.lru_cache(maxsize=None)
def _cuda_device_figures(device_index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(device_index)
    return (props.major, props.minor), props.shared_memory_per_block_optin


def _cuda_device_unsupported(device_index: int, head_dim: int) -> Optional[str]:
    """Why this device cannot run csrc/attention.cu at ``head_dim`` (None if it can): the
    kernels are sm_80 code (PTX for newer), and each must fit the opt-in shared memory."""
    capability, optin = _cuda_device_figures(device_index)
    return cuda_device_reason(capability, cuda_smem_limit(optin), head_dim)


def cuda_smem_limit(device_optin: int) -> int:
    """The shared memory per block csrc/attention.cu plans with: the device's opt-in limit, or
    FASTLM_CUDA_SMEM_LIMIT bytes where that is set and lower (as the C++ launcher reads it), so
    a large GPU can run the 32-row tiles of the 99 KiB parts."""
    cap = os.environ.get("FASTLM_CUDA_SMEM_LIMIT")
    if cap is None:
        return device_optin
    if not re.fullmatch(r"[0-9]+", cap):  # the C++ launcher's rule too
        raise ArgumentError(f"FASTLM_CUDA_SMEM_LIMIT must be a number of bytes (ASCII digits), got {cap!r}")
    return min(device_optin, int(cap)) if int(cap) > 0 else device_optin


def cuda_device_reason(capability: tuple[int, int], smem_optin: int, head_dim: int) -> Optional[str]:
    """The device test of _cuda_device_unsupported from the device's figures (tested on CPU
    with the figures of sm_80, sm_86, sm_89, sm_90 and sm_100)."""
    if capability < (8, 0):
        return (f"compute capability {capability[0]}.{capability[1]}: the CUDA C++ attention kernels need sm_80 "
                f"or newer (bfloat16 tensor-core fragments)")
    for kernel in CUDA_ATTENTION_KERNELS:
        if cuda_attention_tile_cols(kernel, head_dim, smem_optin) == 0:
            need = min(b for nc in (64, 32) if (b := cuda_attention_smem_bytes(kernel, head_dim, nc)) is not None)
            return (f"the CUDA C++ attention {kernel} kernel at head dim {head_dim} needs {need} bytes of shared "
                    f"memory per block; this device allows {smem_optin}")
    return None


def _cuda_unsupported(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                      seqused_k: Optional[Tensor], softcap: float, dropout_p: float, alibi: Optional[Tensor] = None,
                      sinks: Optional[Tensor] = None, rotary: bool = False) -> Optional[str]:
    """Why csrc/attention.cu cannot run this call (None if it can): it covers the dense case
    with causal / sliding windows; the other options are the Triton backend's."""
    triton = "; the Triton backend (fastlm.use_backend(\"triton\")) runs it"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"inputs have dtype {q.dtype}; the CUDA C++ attention kernels take float16 and bfloat16" + triton
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from q's {q.shape[-1]}" + triton
    if q.shape[-1] not in _CUDA_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one the CUDA C++ kernels are built for {_CUDA_HEAD_DIMS}" + triton
    if q.is_cuda:
        why = _cuda_device_unsupported(q.device.index if q.device.index is not None else torch.cuda.current_device(),
                                       q.shape[-1])
        if why:
            return why + triton
    for what, used in (("an attention mask (attn_mask)", mask is not None),
                       ("packed variable-length sequences (cu_seqlens)", cu_seqlens_q is not None),
                       ("KV-cache lengths (cache_seqlens)", seqused_k is not None),
                       ("softcap", softcap > 0), ("dropout", dropout_p > 0), ("ALiBi (alibi_slopes)", alibi is not None),
                       ("attention sinks", sinks is not None), ("rotary inside attention (rotary_cos)", rotary)):
        if used:
            return f"the CUDA C++ attention kernels do not support {what}" + triton
    return None


def _pick(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
          seqused_k: Optional[Tensor], softcap: float, dropout_p: float, requested: Optional[str] = None,
          alibi: Optional[Tensor] = None, sinks: Optional[Tensor] = None, rotary: bool = False) -> str:
    """The backend for one call. The reasons a kernel cannot run it are worked out only for
    the kernel that may run it (the "torch" backend needs none; the CUDA C++ kernels' only
    when "cuda" is requested: "auto" tries Triton alone), so a call pays for no messages."""
    if requested is None:
        requested = get_backend()
    device_type = q.device.type
    if requested == "torch" or (requested == "auto" and device_type != "cuda"):
        return "torch"
    reasons = {"triton": _triton_unsupported(q, v, mask)}
    if requested == "cuda":
        reasons["cuda"] = _cuda_unsupported(q, k, v, mask, cu_seqlens_q, seqused_k, softcap, dropout_p, alibi, sinks,
                                            rotary)
    return resolve("attention", device_type, reasons, requested)


def _cuda_ready(t: Tensor) -> Tensor:
    """t as the CUDA kernels take it: unit stride on the head dim, the address and the other
    strides multiples of 16 bytes (they load 8 elements at a time). A view where it already
    is (views of a packed qkv tensor are), else a contiguous copy."""
    es = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        (st * es) % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _cuda_attention_fwd(q, k, v, scale, bottom_right, window_left, window_right):
    from fastlm.kernels.launch import empty

    from . import _cuda
    q, k, v = _cuda_ready(q), _cuda_ready(k), _cuda_ready(v)
    B, L, H, D = q.shape
    S, HK = k.shape[1], k.shape[2]
    out = empty((B, L, H, D), q.dtype, q.device)
    lse = empty((B, H, L), torch.float32, q.device)
    with _cuda.device_of(q):  # launch on the tensor's device, not the current one
        _cuda.load().attention_fwd(_cuda.dtype_code(q.dtype), _cuda.addr(q), _cuda.addr(k), _cuda.addr(v), _cuda.addr(out),
                                   _cuda.addr(lse), B, L, S, H, HK, D, *q.stride()[:3], *k.stride()[:3],
                                   *v.stride()[:3], float(scale), bool(bottom_right), int(window_left),
                                   int(window_right), _cuda.stream(q))
    return out, lse


def _cuda_attention_bwd(dout, q, k, v, out, lse, scale, bottom_right, window_left, window_right):
    from fastlm.kernels.launch import empty

    from . import _cuda
    q, k, v, out, dout = (_cuda_ready(t) for t in (q, k, v, out, dout))
    B, L, H, D = q.shape
    S, HK = k.shape[1], k.shape[2]
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.float().contiguous()
    delta = empty((B, H, L), torch.float32, q.device)
    with _cuda.device_of(q):  # launch on the tensor's device, not the current one
        _cuda.load().attention_bwd(_cuda.dtype_code(q.dtype), _cuda.addr(q), _cuda.addr(k), _cuda.addr(v), _cuda.addr(out),
                                   _cuda.addr(dout), _cuda.addr(lse), _cuda.addr(delta), _cuda.addr(dq), _cuda.addr(dk),
                                   _cuda.addr(dv), B, L, S, H, HK, D, *q.stride()[:3], *k.stride()[:3],
                                   *v.stride()[:3], *out.stride()[:3], *dout.stride()[:3], float(scale),
                                   bool(bottom_right), int(window_left), int(window_right), _cuda.stream(q))
    return dq, dk, dv


def _problem_dims(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is not None:
        return cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k
    return q.shape[0], q.shape[2], q.shape[1], k.shape[1]


def _keep(backend, seed, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, dropout_p):
    if dropout_p == 0.0 or backend == "triton":
        return None
    B, H, L, S = _problem_dims(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    return _reference_keep(seed, B, H, L, S, dropout_p, q.device)


# ----------------------------------------------------------------------------- custom ops

@no_autocast
def _attention_body(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                    cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor], seed: Optional[Tensor], scale: float,
                    bottom_right: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
                    max_seqlen_q: int, max_seqlen_k: int, alibi: Optional[Tensor] = None,
                    sinks: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                    rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = False) -> tuple[Tensor, Tensor]:
    _check_seed("fastlm::attention", seed, dropout_p, q)
    backend = _pick(q, k, v, mask, cu_seqlens_q, seqused_k, softcap, dropout_p, None, alibi, sinks,
                    rotary_cos is not None)
    if backend == "cuda":
        return _cuda_attention_fwd(q, k, v, scale, bottom_right, window_left, window_right)
    if backend == "triton":
        from fastlm.kernels import attention as kernels
        return kernels.attention_fwd(q, k, v, scale, bottom_right, window_left, window_right, softcap, mask,
                                     dropout_p, seed, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                     max_seqlen_k, alibi, sinks,
                                     rotary=_rotary_tuple(rotary_cos, rotary_sin, rotary_interleaved))
    if rotary_cos is not None:
        q, k = _rotate_qk(q, k, rotary_cos, rotary_sin, rotary_interleaved, bottom_right)
    keep = _keep(backend, seed, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, dropout_p)
    out, lse = ref.attention(q, k, v, scale, bottom_right, window_left, window_right, softcap, mask, keep, dropout_p,
                             cu_seqlens_q, cu_seqlens_k, seqused_k, alibi, sinks)
    # float32, float64 for float64 inputs: a float32 lse would round the float64 oracle's backward
    return out.contiguous(), lse.to(_lse_dtype(q))


def _rotary_tuple(cos: Optional[Tensor], sin: Optional[Tensor], interleaved: bool):
    return None if cos is None else (cos, sin, interleaved)


def _rotary_positions(L: int, S: int, bottom_right: bool, device) -> Optional[Tensor]:
    """The queries' rotary positions: i + S - L aligned bottom-right (the key each query is
    aligned with), else i; None for 0..L-1 (the reference then slices the tables)."""
    shift = S - L if bottom_right else 0
    return None if shift == 0 else torch.arange(L, device=device) + shift


def _rotate_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, bottom_right: bool,
               conjugate: bool = False) -> tuple[Tensor, Tensor]:
    """The reference's rotary inside attention: q and k turned (or, conjugate, turned back)
    by fastlm.reference.rotary, q at _rotary_positions, k at its row index."""
    pos = _rotary_positions(q.shape[1], k.shape[1], bottom_right, q.device)
    return (ref_rotary.rotary(q, cos, sin, pos, interleaved, conjugate),
            ref_rotary.rotary(k, cos, sin, None, interleaved, conjugate))


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


_attention = torch.library.custom_op("fastlm::attention", mutates_args=())(_attention_body)


@_attention.register_fake
def _(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, seqused_k, seed, scale, bottom_right, window_left, window_right,
      softcap, dropout_p, max_seqlen_q, max_seqlen_k, alibi=None, sinks=None, rotary_cos=None, rotary_sin=None,
      rotary_interleaved=False):
    _check_seed("fastlm::attention", seed, dropout_p, q)  # under torch.compile too
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q))
    return out, lse


@no_autocast
def _attention_bwd_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                        seed: Optional[Tensor], scale: float, bottom_right: bool, window_left: int, window_right: int,
                        softcap: float, dropout_p: float, max_seqlen_q: int, max_seqlen_k: int, backend: str,
                        mask_grad: bool, alibi: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                        rotary_sin: Optional[Tensor] = None,
                        rotary_interleaved: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if mask_grad and (mask is None or not mask.is_floating_point() or cu_seqlens_q is not None):
        raise ValueError("fastlm::attention_bwd: mask_grad needs a float mask on a dense batch")
    _check_seed("fastlm::attention_bwd", seed, dropout_p, q)
    chosen = _pick(q, k, v, mask, cu_seqlens_q, None, softcap, dropout_p, backend, alibi, None,
                   rotary_cos is not None)
    if chosen == "cuda":
        return _cuda_attention_bwd(dout, q, k, v, out, lse, scale, bottom_right, window_left, window_right) + \
            (q.new_empty(0),)
    if chosen == "triton":
        from fastlm.kernels import attention as kernels
        grads = kernels.attention_bwd(dout, q, k, v, out, lse, scale, bottom_right, window_left, window_right,
                                      softcap, mask, dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, mask_grad, alibi,
                                      rotary=_rotary_tuple(rotary_cos, rotary_sin, rotary_interleaved))
    else:
        keep = _keep(chosen, seed, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, dropout_p)
        if rotary_cos is not None:  # the forward's turned q and k again
            q, k = _rotate_qk(q, k, rotary_cos, rotary_sin, rotary_interleaved, bottom_right)
        grads = ref.attention_bwd(dout, q, k, v, out, lse, scale, bottom_right, window_left, window_right, softcap,
                                  mask, keep, dropout_p, cu_seqlens_q, cu_seqlens_k, mask_grad, alibi)
        if rotary_cos is not None:  # the gradients of the turned q and k, turned back
            grads = _rotate_qk(grads[0], grads[1], rotary_cos, rotary_sin, rotary_interleaved, bottom_right,
                               conjugate=True) + tuple(grads[2:])
        grads = tuple(g.contiguous() for g in grads[:3]) + tuple(grads[3:])
    if not mask_grad:
        return grads + (q.new_empty(0),)
    # dS summed over the dimensions the mask is broadcast along, in float32, then cast.
    return grads[:3] + (grads[3].sum_to_size(mask.shape).to(mask.dtype),)


_attention_bwd = torch.library.custom_op("fastlm::attention_bwd", mutates_args=())(_attention_bwd_body)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, seed, scale, bottom_right, window_left,
      window_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k, backend, mask_grad, alibi=None, rotary_cos=None,
      rotary_sin=None, rotary_interleaved=False):
    _check_seed("fastlm::attention_bwd", seed, dropout_p, q)
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty(0)
    # Every backend returns contiguous gradients, whatever the strides of q, k and v.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, cu_q, cu_k, seqused_k, seed, scale, bottom_right, window_left, window_right, softcap, dropout_p,
     max_q, max_k) = inputs[:16]
    # The eager twin passes only what is given: (alibi, sinks, rotary_cos, rotary_sin, rotary_interleaved).
    alibi, sinks, rot_cos, rot_sin, rot_inter = tuple(inputs[16:]) + (None, None, None, None, False)[len(inputs) - 16:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed, alibi, sinks, rot_cos, rot_sin)
    ctx.rotary_interleaved = bool(rot_inter)
    ctx.options = (scale, bottom_right, window_left, window_right, softcap, dropout_p, max_q, max_k)
    ctx.backend = get_backend()
    ctx.inputs = len(inputs)


_NO_GRADS = (None,) * 12  # for the options after q, k, v and the mask


def _backward_with(attention_bwd):
    """The backward formula, calling ``attention_bwd``: the backward custom op for the
    registered autograd formula (AOTAutograd traces it), its body for the eager twin. ALiBi's
    slopes are constants (flash-attn gives them no gradient); the sinks' gradient is formed
    here from the output, its gradient and the lse (``ref.sink_grad``: two small reductions)."""
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, cu_q, cu_k, seed, alibi, sinks, rot_cos, rot_sin = ctx.saved_tensors
        mask_grad = bool(ctx.needs_input_grad[3])  # only a float mask can require grad
        rot = () if rot_cos is None else (rot_cos, rot_sin, ctx.rotary_interleaved)
        dq, dk, dv, dmask = attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, seed, *ctx.options, ctx.backend,
                                          mask_grad, alibi, *rot)
        grads = (dq, dk, dv, dmask if mask_grad else None) + _NO_GRADS
        if ctx.inputs > 16:
            dsinks = None
            if sinks is not None and ctx.needs_input_grad[17]:
                dsinks = ref.sink_grad(dout, out, lse, sinks, cu_q is not None).to(sinks.dtype)
            grads = grads + (None, dsinks, None, None, None)[:ctx.inputs - 16]  # no gradient for the tables
        return grads
    return backward


_attention.register_autograd(_backward_with(_attention_bwd), setup_context=_setup_context)
# Eager calls skip the custom-op dispatch (fastlm/ops/_eager.py); torch.compile sees _attention.
_attention_eager = EagerTwin(_attention, _attention_body, _setup_context, _backward_with(_attention_bwd_body),
                             name="attention")


@no_autocast
def _attention_infer_body(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor],
                          cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor], block_table: Optional[Tensor],
                          leftpad: Optional[Tensor], alibi: Optional[Tensor], sinks: Optional[Tensor], scale: float,
                          window_left: int, window_right: int, softcap: float, max_seqlen_q: int, max_seqlen_k: int,
                          num_splits: int) -> tuple[Tensor, Tensor]:
    backend = _pick(q, k, v, None, cu_seqlens_q, seqused_k, softcap, 0.0, None, alibi, sinks)
    if backend in ("cuda", "triton"):  # "cuda" cannot be picked: its kernels take no cache lengths
        from fastlm.kernels import attention as kernels
        if num_splits == 0:
            rows = q.shape[1] if cu_seqlens_q is None else max_seqlen_q
            keys = block_table.shape[1] * k.shape[1] if block_table is not None and cu_seqlens_q is None else (
                max_seqlen_k if cu_seqlens_q is not None else k.shape[1])
            num_splits = kernels.split_heuristic(q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1,
                                                 q.shape[-2], rows, keys, q.device)
        return kernels.attention_fwd(q, k, v, scale, True, window_left, window_right, softcap, None, 0.0, None,
                                     cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi, sinks,
                                     block_table, leftpad, num_splits)
    out, lse = ref.attention_cache(q, k, v, scale, window_left, window_right, softcap, cu_seqlens_q, cu_seqlens_k,
                                   seqused_k, block_table, leftpad, alibi, sinks)
    return out.contiguous(), lse.to(_lse_dtype(q))


# Inference only (flash_attn_with_kvcache, paged flash_attn_varlen_func): no autograd formula,
# as flash-attn's (a call that needs a gradient is refused before it gets here).
_attention_infer = torch.library.custom_op("fastlm::attention_infer", mutates_args=())(_attention_infer_body)


@_attention_infer.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, leftpad, alibi, sinks, scale, window_left,
      window_right, softcap, max_seqlen_q, max_seqlen_k, num_splits):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    if cu_seqlens_q is not None:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q))


_attention_infer_eager = EagerTwin(_attention_infer, _attention_infer_body, name="attention_infer")


# ----------------------------------------------------------------------------- argument checks

def _check_qkv(fn: str, q, k, v, packed: bool = False):
    """q, k, v as the kernels take them. The usual call passes the first test, a handful of
    attribute reads (issue 17: validation runs on every call); anything else goes through the
    checks one by one, which raise the error naming the argument."""
    dims = 3 if packed else 4
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and q.is_floating_point() \
            and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == dims and k.dim() == dims \
            and v.dim() == dims:
        dev = q.device
        if k.device == dev and v.device == dev:
            qs, ks, vs = q.shape, k.shape, v.shape
            hk = ks[-2]
            if ks[:-1] == vs[:-1] and (packed or ks[0] == qs[0]) and ks[-1] == qs[-1] and qs[-1] != 0 \
                    and hk != 0 and qs[-2] % hk == 0:
                return
    _check_qkv_one_by_one(fn, q, k, v, packed)


def _check_qkv_one_by_one(fn: str, q, k, v, packed: bool):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastlm.{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"fastlm.{fn}: {name} must be floating point, got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"fastlm.{fn}: {name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"fastlm.{fn}: {name} is on {t.device} but q is on {q.device}")
    dims = 3 if packed else 4
    layout = "(total, H, D)" if packed else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise ValueError(f"fastlm.{fn}: {name} must be {dims}-D {layout}, got shape {list(t.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"fastlm.{fn}: k and v must agree but for the head dim, got {list(k.shape)} and "
                         f"{list(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"fastlm.{fn}: k has batch {k.shape[0]} but q has {q.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"fastlm.{fn}: k has head dim {k.shape[-1]} but q has {q.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"fastlm.{fn}: q and k must have a head dim > 0, got shape {list(q.shape)}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"fastlm.{fn}: q's {hq} heads must be a multiple of k's and v's {hk} heads")


def _check_scale(fn: str, name: str, scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"fastlm.{fn}: {name} must be a finite number or None, got {scale!r}")
    return float(scale)


def _check_dropout(fn: str, name: str, p) -> float:
    if p.__class__ is float and 0.0 <= p < 1.0:  # the usual call
        return p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ArgumentError(f"fastlm.{fn}: {name} must be a number in [0, 1), got {p!r}")
    return float(p)


def _check_window(fn: str, window_size) -> tuple[int, int]:
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    if not ok:
        raise ValueError(f"fastlm.{fn}: window_size must be a pair of ints >= -1 (-1: unbounded), "
                         f"got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _check_softcap(fn: str, softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap < 0:
        raise ValueError(f"fastlm.{fn}: softcap must be a finite number >= 0 (0: off), got {softcap!r}")
    return float(softcap)


def _seed_for(dropout_p: float, device) -> Optional[Tensor]:
    """The call's dropout seed, drawn on the inputs' device (None without dropout)."""
    return draw_dropout_seed(device) if dropout_p > 0 else None


_NO_WINDOW = (-1, -1)  # the default window_size: checked by identity, not element by element


def _window_of(fn: str, causal, window_size) -> tuple[int, int]:
    """(window_left, window_right) of a call's causal and window_size arguments."""
    if window_size is _NO_WINDOW:
        return (-1, 0) if causal else _NO_WINDOW
    return _window(bool(causal), _check_window(fn, window_size))


def _window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    left, right = window_size
    return (left, 0) if causal else (left, right)


# ----------------------------------------------------------------------------- FlashAttention's interfaces

def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size: tuple[int, int] = _NO_WINDOW, softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, return_lse: bool = False, sinks: Optional[Tensor] = None,
                    rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                    rotary_interleaved: bool = False):
    """FlashAttention 2.8's flash_attn_func, argument for argument: q (B, L, H, D), k and v
    (B, S, Hk, D), Hk dividing H.

    fastlm's keywords ``rotary_cos``, ``rotary_sin`` (seqlen_ro, rotary_dim / 2), float32 or
    q's dtype, as flash-attn's rotary takes them (``fastlm.rotary_cos_sin``): rotary inside
    the attention. q and k are turned as the kernels load their tiles, and in the backward
    the gradients of the turned q and k are turned back before they are stored, so rotary
    costs no pass over q, k, dq, dk of its own (docs/rotary_in_attention.md weighs it). Key j
    sits at position j; query i at i + S - L, the key it is aligned with bottom-right (as the
    causal mask and ALiBi align it, and as flash_attn_with_kvcache positions a causal call's
    queries), for causal and non-causal calls alike: so L <= S, and seqlen_ro >= S. The first
    rotary_dim features of each head turn, the rest pass through; rotary_interleaved pairs
    (2i, 2i + 1) (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX, Llama), fastlm.rotary's
    default. The result equals fastlm.rotary on q and k, then this function (q and k turned
    in float32 and rounded to their dtype, as the separate launch stores them).

    causal and window_size are aligned bottom-right (query i sees keys up to i + S - L), so a
    single query attends to the whole cache. alibi_slopes: float32 (H,) or (B, H), adding
    -slope * |i + S - L - j| to the (soft-capped) scores, as flash-attn does (in the kernels:
    nothing of size L x S is formed; no gradient reaches the slopes, as in flash-attn).
    fastlm's keyword ``sinks`` (H,): attention sinks, GPT-OSS's s_aux, one logit per head in
    every row's softmax denominator (differentiable; see fastlm/reference/attention.py). deterministic is
    accepted and changes nothing: fastlm's backward is always deterministic (no atomics,
    except an additive mask's gradient where the mask is broadcast, which this function never
    has). Returns out (B, L, H, Dv); with return_attn_probs (out, softmax_lse, S_dmask) as
    flash-attn: the logsumexp (B, H, L) in float32 (+inf on rows that see no key), and S_dmask
    None without dropout, else the softmax probabilities (B, H, L, S) with the dropped
    positions negated (flash-attn pads L and S up to multiples of 128; fastlm does not). A
    testing aid: it is formed densely. fastlm's own keyword ``return_lse`` gives (out, lse).

    On the "torch" backend with CPU tensors (the CPU path) a call without soft-cap, window
    (but causal), dropout, ALiBi or lse is torch's SDPA on (B, H, S, D) views (see _native_flash)."""
    fn = "flash_attn_func"
    if _autocast_any():
        q, k, v = autocast_inputs(q, k, v)
    _check_qkv(fn, q, k, v)
    dropout_p = _check_dropout(fn, "dropout_p", dropout_p)
    scale = _check_scale(fn, "softmax_scale", softmax_scale, q.shape[-1])
    left, right = _window_of(fn, causal, window_size)
    softcap = _check_softcap(fn, softcap)
    want_lse = return_lse or return_attn_probs
    rotary = _check_rotary(fn, rotary_cos, rotary_sin, rotary_interleaved, q, k)
    if alibi_slopes is None and sinks is None and not want_lse and dropout_p == 0.0 and softcap == 0.0 \
            and left == -1 and right <= 0 and not compiling() and q.is_cpu and native_backend("cpu"):
        # The CPU path; with rotary, the reference's (differentiated by autograd) first.
        qn, kn = _rotate_qk(q, k, *rotary, True) if rotary else (q, k)
        out = _native_flash(qn, kn, v, scale, right == 0)
        if out is not None:
            return out
    slopes = _check_slopes(fn, alibi_slopes, q.shape[0], q.shape[2], q)
    seed = _seed_for(dropout_p, q.device)
    extras = _extras(fn, slopes, sinks, q)
    if rotary:
        extras = (tuple(extras) + (None, None))[:2] + rotary
    out, lse = _attention_eager(q, k, v, None, None, None, None, seed, scale, True, left, right, softcap,
                                dropout_p, 0, 0, *extras)
    if return_attn_probs:
        probs = None
        if dropout_p > 0.0:
            bias = None if slopes is None else _alibi_bias(fn, slopes, q, k.shape[1])
            qp, kp = q, k
            if rotary:
                with torch.no_grad():
                    qp, kp = _rotate_qk(q, k, rotary[0], rotary[1], rotary[2], True)
            probs = _dropped_probs(qp, kp, v, bias, lse, seed, scale, left, right, softcap, dropout_p)
        return out, lse, probs
    return (out, lse) if return_lse else out


def _check_rotary(fn: str, cos, sin, interleaved, q: Tensor, k: Tensor) -> tuple:
    """flash_attn_func's rotary keywords: () when not used, else (cos, sin, interleaved) with
    the tables detached (no gradient reaches them, as fastlm.rotary)."""
    if cos is None and sin is None:
        return ()
    if cos is None or sin is None:
        raise ValueError(f"fastlm.{fn}: rotary_cos and rotary_sin must be given together")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastlm.{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"fastlm.{fn}: {name} has dtype {t.dtype}; with q of dtype {q.dtype} it must be "
                            f"torch.float32 or {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"fastlm.{fn}: {name} is on {t.device} but q is on {q.device}")
        if t.dim() != 2:
            raise ValueError(f"fastlm.{fn}: {name} must be 2-D (seqlen_ro, rotary_dim / 2), got shape "
                             f"{list(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"fastlm.{fn}: rotary_sin has shape {list(sin.shape)} but rotary_cos has "
                         f"{list(cos.shape)}; they must match")
    if not isinstance(interleaved, bool):
        raise TypeError(f"fastlm.{fn}: rotary_interleaved must be a bool, got {interleaved!r}")
    rows, half = cos.shape
    D, L, S = q.shape[-1], q.shape[1], k.shape[1]
    if half == 0 or 2 * half > D:
        raise ValueError(f"fastlm.{fn}: rotary_cos has {half} columns, so the rotary dim is {2 * half}; it must "
                         f"be between 2 and the head dim {D} (the tables are (seqlen_ro, rotary_dim / 2))")
    if L > S:
        raise ValueError(f"fastlm.{fn}: with rotary_cos, query i sits at position i + S - L (bottom-right, the "
                         f"key it is aligned with), so q's length {L} must be at most k's {S}")
    if rows < S:
        raise ValueError(f"fastlm.{fn}: rotary_cos has {rows} rows (positions) but k has {S}: seqlen_ro must be "
                         f"at least S")
    return cos.detach(), sin.detach(), interleaved


def _check_slopes(fn: str, slopes, B: int, H: int, q: Tensor) -> Optional[Tensor]:
    """flash-attn's alibi_slopes: float32 (H,) or (B, H) on q's device, any strides; detached
    (no gradient, as flash-attn)."""
    if slopes is None:
        return None
    if not isinstance(slopes, Tensor) or slopes.dtype != torch.float32 or tuple(slopes.shape) not in ((H,), (B, H)):
        got = f"{slopes.dtype} {list(slopes.shape)}" if isinstance(slopes, Tensor) else repr(slopes)
        raise ValueError(f"fastlm.{fn}: alibi_slopes must be a float32 tensor of shape ({H},) or ({B}, {H}), "
                         f"got {got}")
    if slopes.device != q.device:
        raise ValueError(f"fastlm.{fn}: alibi_slopes is on {slopes.device} but q is on {q.device}")
    return slopes.detach()


def _check_sinks(fn: str, sinks, H: int, q: Tensor) -> Optional[Tensor]:
    """Attention sinks: a floating (H,) tensor on q's device (any float dtype: the kernels read
    it in float32; the gradient flows back in its own dtype)."""
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (H,):
        got = f"{sinks.dtype} {list(sinks.shape)}" if isinstance(sinks, Tensor) else repr(sinks)
        raise ValueError(f"fastlm.{fn}: sinks must be a floating tensor of shape ({H},) (one logit per query "
                         f"head), got {got}")
    if sinks.device != q.device:
        raise ValueError(f"fastlm.{fn}: sinks is on {sinks.device} but q is on {q.device}")
    return sinks


def _extras(fn: str, slopes: Optional[Tensor], sinks, q: Tensor, heads: Optional[int] = None) -> tuple:
    """The op's trailing (alibi, sinks) arguments: none when neither is used (the call is the
    op's 16-argument one), the sinks in float32 (float64 for float64 inputs, the oracle's)
    with unit stride (the kernels index them by head; the cast is differentiable)."""
    sinks = _check_sinks(fn, sinks, q.shape[-2] if heads is None else heads, q)
    if sinks is None:
        return () if slopes is None else (slopes,)
    return slopes, sinks.to(_lse_dtype(q)).contiguous()


def _alibi_bias(fn: str, slopes: Tensor, q: Tensor, S: int) -> Tensor:
    """flash-attn's ALiBi as an additive mask: -slope * |i + S - L - j| for query i and key j
    (bottom-right aligned), float32 (B or 1, H, L, S): only for S_dmask, a testing aid."""
    B, L, H = q.shape[0], q.shape[1], q.shape[2]
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    distance = (i + (S - L) - j).abs().to(torch.float32)
    return -slopes.detach().reshape(-1, H, 1, 1) * distance


def _dropped_probs(q, k, v, bias, lse, seed, scale, left, right, softcap, dropout_p) -> Tensor:
    """flash-attn's S_dmask: softmax probabilities (B, H, L, S) in float32, the positions that
    dropout dropped negated, from the same seed and backend as the call (dense: a testing aid)."""
    B, L, H = q.shape[0], q.shape[1], q.shape[2]
    S, Hk = k.shape[1], k.shape[2]
    with torch.no_grad():
        kk = k.repeat_interleave(H // max(Hk, 1), dim=2) if Hk != H else k
        s = torch.einsum("blhd,bshd->bhls", q.float(), kk.float())
        s = softcap * torch.tanh(s * (scale / softcap)) if softcap > 0 else s * scale
        if bias is not None:
            s = s + bias
        s = s.masked_fill(~ref.visible(L, S, True, left, right, q.device), -math.inf)
        probs = torch.exp(s - lse.float()[..., None])
        backend = _pick(q, k, v, bias, None, None, softcap, dropout_p)
        keep = dropout_mask(seed, B, H, L, S, dropout_p, backend, q.device)
        return torch.where(keep, probs, -probs)


def _special_in(q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> bool:
    """Whether q or k may hold a NaN or an infinity, or a float mask a NaN or +inf (one sum
    each, on CPU tensors: no device sync). torch's CPU flash-attention kernel gives 0 (or NaN
    on a row that sees no key) where fastlm's reference gives NaN (or 0) for such scores
    (tests/test_properties.py pins the reference's answers): those calls run on the
    reference. A sum that overflows also says True, which is harmless (the reference is
    right for any input); a mask's -inf (a hidden key) is the usual case and says False."""
    total = (q.sum() + k.sum()).item()
    if total - total != 0.0:  # inf or NaN
        return True
    if mask is not None:
        m = mask.sum().item()
        return m != m or m == math.inf
    return False


def _native_flash(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Optional[Tensor]:
    """flash_attn_func on the "torch" backend (the CPU path), for the calls torch's SDPA
    computes: no window but causal, no soft-cap, no dropout (the reference draws fastlm's
    mask for the seed, which torch's dropout cannot), no lse wanted. The (B, S, H, D)
    tensors go in as (B, H, S, D) views; causal aligned bottom-right is torch's is_causal when
    L == S, nothing when L == 1 (the one query sees every key), else an (L, S) boolean mask
    (rows that see no key, L > S, get 0 as from the reference). Empty tensors go to the
    reference, and so do calls where torch gives a query 0 (see _has_zero_row). Returns out
    (B, L, H, Dv), contiguous as the reference's. CPU tensors only: on CUDA the "torch" backend stays the
    reference, whose meaning (0 where a row sees no key, NaN kept) torch's fused CUDA kernels
    do not promise."""
    L, S = q.shape[1], k.shape[1]
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return None
    mask = None
    is_causal = False
    if causal and L != 1:
        if L == S:
            is_causal = True
        else:
            mask = ref.visible(L, S, True, -1, 0, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=is_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    if _has_zero_row(out):
        return None
    return out.transpose(1, 2).contiguous()


def _has_zero_row(out: Tensor) -> bool:
    """Whether some query's output is exactly 0, the one place torch's CPU kernel and fastlm's
    reference part on non-finite input: torch treats a query whose scores are all NaN (a
    NaN or an infinity in the query; a non-finite key that is the only one it sees) as seeing
    no key and gives it 0, where the reference keeps the NaN. Checking the output, (B, H, L,
    Dv), costs far less than reading q and the keys (a decode step's one query against the
    whole cache). A 0 row from finite input (a row that sees no key, all-zero values) goes to
    the reference too, which gives the same answer: only slower. CPU tensors only (one .item())."""
    return bool(out.eq(0).all(-1).any().item()) if out.shape[-1] > 0 else False


_INT32_MIN, _INT32_MAX = -2 ** 31, 2 ** 31 - 1


def _check_cu(fn: str, name: str, cu, q: Tensor):
    if not isinstance(cu, Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"fastlm.{fn}: {name} must be a 1-D int32 tensor of B + 1 offsets, got {cu!r}")
    if cu.device != q.device:
        raise ValueError(f"fastlm.{fn}: {name} is on {cu.device} but q is on {q.device}")
    if cu.dtype == torch.int64:
        if cu.device.type == "cpu":
            if bool(((cu < _INT32_MIN) | (cu > _INT32_MAX)).any()):
                raise ValueError(f"fastlm.{fn}: {name} has offsets outside int32 (the kernels' index type), "
                                 f"e.g. {int(cu[(cu < _INT32_MIN) | (cu > _INT32_MAX)][0])}")
        else:  # saturate rather than wrap (no host sync); the kernels clamp to the rows
            cu = cu.clamp(_INT32_MIN, _INT32_MAX)
    return cu.to(torch.int32).contiguous()


def _check_cu_values(fn: str, name: str, cu: Tensor, rows: int, of: str, max_name: str, max_seqlen: int):
    """The offsets' contract, checked where it costs no device sync (CPU tensors): from 0 to
    the rows of ``of``, non-decreasing, no sequence longer than ``max_seqlen``. On CUDA the
    kernels clamp instead, so a bad offset can never address memory outside q, k or v."""
    if cu.device.type != "cpu":
        return
    if int(cu[0]) != 0:
        raise ValueError(f"fastlm.{fn}: {name} must start at 0, got {name}[0] = {int(cu[0])}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(f"fastlm.{fn}: {name} must be non-decreasing, got {name}[{i}] = {int(cu[i])} > "
                         f"{name}[{i + 1}] = {int(cu[i + 1])}")
    if int(cu[-1]) != rows:
        raise ValueError(f"fastlm.{fn}: {name} must end at the number of rows of {of} ({rows}), got "
                         f"{name}[-1] = {int(cu[-1])}")
    if lengths.numel() and int(lengths.max()) > max_seqlen:
        i = int(lengths.argmax())
        raise ValueError(f"fastlm.{fn}: sequence {i} has {int(lengths[i])} rows by {name}, more than "
                         f"{max_name} = {max_seqlen}")


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple[int, int] = _NO_WINDOW, softcap: float = 0.0,
                           alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Optional[Tensor] = None, *,
                           return_lse: bool = False, sinks: Optional[Tensor] = None,
                           rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                           rotary_interleaved: bool = False):
    """FlashAttention 2.8's flash_attn_varlen_func, argument for argument. Packed sequences
    without padding: q (total_q, H, D), k and v (total_k, Hk, D); sequence b
    is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (likewise for k). max_seqlen_q/k bound the
    lengths. The offsets must start at 0, never decrease, end at the rows of q (of k), and
    give no sequence longer than max_seqlen: on CPU tensors a violation raises a ValueError;
    on CUDA tensors checking would cost a host sync, so (as FlashAttention, which trusts
    them) nothing is checked, but the kernels clamp every offset to the rows and every
    length to max_seqlen, so a bad value gives wrong rows (or leaves rows unwritten),
    never a read or write outside q, k, v or the output. The lse is (H, total_q).
    return_attn_probs gives (out, lse, None) without dropout; deterministic changes nothing
    (see flash_attn_func). alibi_slopes (H,) or (B, H) and fastlm's ``sinks`` (H,) as in
    flash_attn_func. block_table (B, max_pages) int32: k and v are a paged cache (num_pages,
    page_size, Hk, D), page_size a multiple of 16, sequence b's key j in page
    block_table[b, j // page_size], slot j % page_size; cu_seqlens_k then only gives the key
    lengths. As in flash-attn that call is forward-only (no gradient; dropout refused). Not yet
    supported, raising NotImplementedError that names it: return_attn_probs with dropout, and
    fastlm's rotary_cos / rotary_sin / rotary_interleaved (flash_attn_func's rotary inside the
    attention; here rotate with fastlm.apply_rotary_emb(..., cu_seqlens=...) first)."""
    fn = "flash_attn_varlen_func"
    if rotary_cos is not None or rotary_sin is not None or rotary_interleaved:
        raise NotImplementedError(f"fastlm.{fn}: rotary_cos / rotary_sin (rotary inside the attention) are not "
                                  f"supported for packed sequences yet; flash_attn_func has them (or rotate first "
                                  f"with fastlm.apply_rotary_emb(x, cos, sin, cu_seqlens=...))")
    if _autocast_any():
        q, k, v = autocast_inputs(q, k, v)
    if block_table is not None:
        return _varlen_paged(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                             block_table, return_lse, sinks)
    _check_qkv(fn, q, k, v, packed=True)
    cu_q = _check_cu(fn, "cu_seqlens_q", cu_seqlens_q, q)
    cu_k = _check_cu(fn, "cu_seqlens_k", cu_seqlens_k, q)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"fastlm.{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
                         f"{cu_q.numel()} and {cu_k.numel()}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"fastlm.{fn}: {name} must be an int >= 0, got {m!r}")
    _check_cu_values(fn, "cu_seqlens_q", cu_q, q.shape[0], "q", "max_seqlen_q", max_seqlen_q)
    _check_cu_values(fn, "cu_seqlens_k", cu_k, k.shape[0], "k", "max_seqlen_k", max_seqlen_k)
    dropout_p = _check_dropout(fn, "dropout_p", dropout_p)
    scale = _check_scale(fn, "softmax_scale", softmax_scale, q.shape[-1])
    left, right = _window_of(fn, causal, window_size)
    softcap = _check_softcap(fn, softcap)
    slopes = _check_slopes(fn, alibi_slopes, cu_q.numel() - 1, q.shape[1], q)
    if return_attn_probs and dropout_p > 0:
        raise NotImplementedError(f"fastlm.{fn}: return_attn_probs with dropout_p > 0 (S_dmask of packed "
                                  "sequences) is not supported yet; flash_attn_func has it")
    out, lse = _attention_eager(q, k, v, None, cu_q, cu_k, None, _seed_for(dropout_p, q.device), scale, True, left,
                                right, softcap, dropout_p, max_seqlen_q, max_seqlen_k,
                                *_extras(fn, slopes, sinks, q))
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def _varlen_paged(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                  causal, window_size, softcap, alibi_slopes, return_attn_probs, block_table, return_lse, sinks):
    """flash_attn_varlen_func over a paged cache: packed queries, keys through block_table."""
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, sinks)):
        raise NotImplementedError(f"fastlm.{fn}: block_table (a paged cache) is forward-only, as in flash-attn: "
                                  f"call it under torch.no_grad() or with tensors that do not require grad")
    if not isinstance(k, Tensor) or k.dim() != 4:
        raise ValueError(f"fastlm.{fn}: with a block_table k and v are (num_pages, page_size, Hk, D), got "
                         f"{list(k.shape) if isinstance(k, Tensor) else k!r}")
    _check_index_tensor(fn, "block_table", block_table, q, dims=2)
    if k.shape[1] == 0 or k.shape[1] % 16 or k.shape[0] == 0:
        raise ValueError(f"fastlm.{fn}: a paged cache has at least one page of a multiple of 16 rows, got "
                         f"{list(k.shape)}")
    pages = block_table.shape[1] * k.shape[1]
    _check_qkv(fn, q, k[0], v[0], packed=True)
    cu_q = _check_cu(fn, "cu_seqlens_q", cu_seqlens_q, q)
    cu_k = _check_cu(fn, "cu_seqlens_k", cu_seqlens_k, q)
    if cu_q.numel() != cu_k.numel() or block_table.shape[0] != cu_q.numel() - 1:
        raise ValueError(f"fastlm.{fn}: cu_seqlens_q, cu_seqlens_k (B + 1) and block_table (B rows) must agree, "
                         f"got {cu_q.numel()}, {cu_k.numel()} and {list(block_table.shape)}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"fastlm.{fn}: {name} must be an int >= 0, got {m!r}")
    if max_seqlen_k > pages:
        raise ValueError(f"fastlm.{fn}: max_seqlen_k = {max_seqlen_k} is more than block_table holds "
                         f"({block_table.shape[1]} pages of {k.shape[1]})")
    _check_cu_values(fn, "cu_seqlens_q", cu_q, q.shape[0], "q", "max_seqlen_q", max_seqlen_q)
    if cu_k.device.type == "cpu" and cu_k.numel():
        _check_cu_values(fn, "cu_seqlens_k", cu_k, int(cu_k[-1]), "k", "max_seqlen_k", max_seqlen_k)
    if block_table.device.type == "cpu" and block_table.numel() and \
            not 0 <= int(block_table.min()) <= int(block_table.max()) < k.shape[0]:
        raise ValueError(f"fastlm.{fn}: block_table must index the cache's {k.shape[0]} pages")
    if _check_dropout(fn, "dropout_p", dropout_p) > 0:
        raise ValueError(f"fastlm.{fn}: block_table (a paged cache, inference) takes no dropout")
    scale = _check_scale(fn, "softmax_scale", softmax_scale, q.shape[-1])
    left, right = _window_of(fn, causal, window_size)
    softcap = _check_softcap(fn, softcap)
    slopes = _check_slopes(fn, alibi_slopes, cu_q.numel() - 1, q.shape[1], q)
    sinks = _check_sinks(fn, sinks, q.shape[1], q)
    sinks = None if sinks is None else sinks.to(_lse_dtype(q)).contiguous()
    with torch.no_grad():
        out, lse = _attention_infer_eager(q, k, v, cu_q, cu_k, None, block_table, None, slopes, sinks, scale, left,
                                          right, softcap, max_seqlen_q, max_seqlen_k, 1)
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def _check_cache_seqlens(fn: str, cache_seqlens, n: int, S_max: int):
    """0 <= cache_seqlens and cache_seqlens + n <= S_max, for an int and a CPU tensor (no device
    sync there). On CUDA tensors nothing is checked: the kernel clamps the used length to
    [0, S_max] and the write of new keys to the cache's rows."""
    if cache_seqlens is None:
        return
    if isinstance(cache_seqlens, Tensor):
        if cache_seqlens.device.type != "cpu" or cache_seqlens.numel() == 0:
            return
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    else:
        lo = hi = cache_seqlens
    if lo < 0:
        raise ValueError(f"fastlm.{fn}: cache_seqlens must be >= 0, got {lo}")
    if hi + n > S_max:
        raise ValueError(f"fastlm.{fn}: cache_seqlens ({hi}) + {n} new keys exceed the cache length {S_max}")


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens=None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size: tuple[int, int] = _NO_WINDOW, softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *,
                            sinks: Optional[Tensor] = None):
    """FlashAttention 2.8's flash_attn_with_kvcache, argument for argument (causal defaults to
    False, as there): q (B, L, H, D), caches (B_cache, S_max, Hk, D), or with block_table
    (num_pages, page_size, Hk, D).

    If k and v (B, L_new, Hk, D) are given they are written into the caches in place at each
    batch's cache_seqlens (an int or a (B,) int tensor; None means the caches are full), then
    q attends to the cache's keys up to cache_seqlens + L_new (causal and window_size aligned
    bottom-right). cache_leftpad (B,) int32: batch b's keys start at that row (flash-attn's
    left padding): it sees rows [cache_leftpad, cache_seqlens + L_new), its key 0 the first of
    them. block_table (B, max_pages) int32: a paged cache, batch b's row r in page
    block_table[b, r // page_size], slot r % page_size (page_size any multiple of 16;
    flash-attn's CUDA kernels need 256); S_max is then max_pages * page_size.
    rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2), with k and v: k is rotated at positions
    cache_seqlens - cache_leftpad, + 1, ..., and q too when causal or windowed, else every query
    at position cache_seqlens - cache_leftpad (flash-attn's rule; its positions count from the
    first key); rotary_interleaved pairs (2i, 2i + 1) (its default) or (i, i + rotary_dim / 2).
    cache_batch_idx (B,): batch b reads and writes cache row cache_batch_idx[b] (the rows are
    gathered into a copy for the attention; an index outside the caches raises on CPU tensors
    and is clamped to a valid row on CUDA ones, where checking would sync; not with a
    block_table, as flash-attn). num_splits: split-KV decoding, each row's keys shared by that
    many programs and merged (0: fastlm's heuristic, which splits only when batch x heads x
    query blocks would leave most SMs idle; 1: no split). return_softmax_lse returns (out,
    lse (B, H, L) float32). alibi_slopes (H,) or (B, H) as in flash_attn_func, the distance
    measured from each batch's own last key; fastlm's ``sinks`` (H,) likewise.

    No gradient flows through this function (it is for inference). 0 <= cache_seqlens and
    cache_seqlens + L_new <= S_max (and cache_leftpad <= cache_seqlens): an int or a CPU
    tensor that breaks this raises a ValueError; a CUDA tensor is not checked (that would
    sync), the write and the kernel clamp to each batch's own cache instead (its own pages,
    clamped to the cache, with a block_table), so a bad length never touches memory outside
    the caches."""
    fn = "flash_attn_with_kvcache"
    simple = rotary_cos is None and rotary_sin is None and cache_batch_idx is None and not return_softmax_lse
    # The CPU decode path; anything it does not serve (a bad num_splits too) goes on to the checks
    if simple and type(cache_seqlens) is int and window_size is _NO_WINDOW and softcap == 0.0 and not compiling() \
            and cache_leftpad is None and block_table is None and alibi_slopes is None and sinks is None \
            and type(num_splits) is int and num_splits >= 0 and native_backend_of(q) and not _autocast_any():
        out = _kvcache_cpu(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal)
        if out is not None:
            return out
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"fastlm.{fn}: num_splits must be an int >= 0 (0: choose), got {num_splits!r}")
    q, k, v = autocast_to(k_cache, q, k, v)  # under autocast the caches' dtype is the compute dtype
    B = q.shape[0] if isinstance(q, Tensor) and q.dim() == 4 else None
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError(f"fastlm.{fn}: block_table and cache_batch_idx cannot be used together (a paged "
                             f"cache's table already says where each batch's keys are; as flash-attn)")
        _check_index_tensor(fn, "block_table", block_table, q, dims=2)
        if B is not None and block_table.shape[0] != B:
            raise ValueError(f"fastlm.{fn}: block_table must have one row per batch ({B}), got "
                             f"{list(block_table.shape)}")
        if isinstance(k_cache, Tensor) and k_cache.dim() == 4 and (k_cache.shape[1] == 0 or k_cache.shape[1] % 16):
            raise ValueError(f"fastlm.{fn}: with a block_table the caches are (num_pages, page_size, Hk, D) with "
                             f"page_size a multiple of 16, got {list(k_cache.shape)}")
        if block_table.device.type == "cpu" and block_table.numel() and isinstance(k_cache, Tensor) and not \
                0 <= int(block_table.min()) <= int(block_table.max()) < k_cache.shape[0]:
            raise ValueError(f"fastlm.{fn}: block_table must index the caches' {k_cache.shape[0]} pages")
    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, Tensor) or cache_batch_idx.dtype not in (torch.int32, torch.int64) \
                or cache_batch_idx.shape != (q.shape[0],) or cache_batch_idx.device != q.device:
            raise ValueError(f"fastlm.{fn}: cache_batch_idx must be a ({q.shape[0]},) int tensor on q's device, "
                             f"got {cache_batch_idx!r}")
        if cache_batch_idx.device.type == "cpu" and cache_batch_idx.numel() and \
                not 0 <= int(cache_batch_idx.min()) <= int(cache_batch_idx.max()) < k_cache.shape[0]:
            raise ValueError(f"fastlm.{fn}: cache_batch_idx must index the caches' {k_cache.shape[0]} rows")
        rows_idx = cache_batch_idx.long().clamp(0, k_cache.shape[0] - 1)
        caches = (k_cache, v_cache)
        k_cache, v_cache = k_cache.index_select(0, rows_idx), v_cache.index_select(0, rows_idx)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"fastlm.{fn}: rotary_cos and rotary_sin must be given together")
    if block_table is None:
        _check_qkv(fn, q, k_cache, v_cache)
        S_max = k_cache.shape[1]
    else:  # the checks on one page standing for each batch's cache
        _check_qkv(fn, q, k_cache[:1].expand((B,) + tuple(k_cache.shape[1:])),
                   v_cache[:1].expand((B,) + tuple(v_cache.shape[1:])))
        if k_cache.shape[0] == 0:
            raise ValueError(f"fastlm.{fn}: a paged cache needs at least one page, got {list(k_cache.shape)}")
        S_max = block_table.shape[1] * k_cache.shape[1]
    B = q.shape[0]
    if (k is None) != (v is None):
        raise ValueError(f"fastlm.{fn}: k and v must be given together")
    if rotary_cos is not None and k is None:
        raise ValueError(f"fastlm.{fn}: rotary_cos and rotary_sin apply to the new k (and q): pass k and v")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"fastlm.{fn}: cache_seqlens is needed to know where k and v go")
        seqlens = None  # every batch's cache is full: formed below unless the CPU path serves the call
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= S_max:  # before the int32 tensor it would overflow
            raise ValueError(f"fastlm.{fn}: cache_seqlens must be >= 0 and at most the cache length {S_max}, got "
                             f"{cache_seqlens}")
        seqlens = None  # formed below, unless the CPU path serves the call
    elif isinstance(cache_seqlens, Tensor) and cache_seqlens.dtype in (torch.int32, torch.int64) \
            and cache_seqlens.shape == (B,):
        if cache_seqlens.device != q.device:
            raise ValueError(f"fastlm.{fn}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
        # Saturated, not wrapped, into int32 (2**32 + 3 must not become 3): the CPU check below
        # raises on it; on CUDA the kernel and the cache write clamp it to the cache.
        seqlens = cache_seqlens.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32) \
            if cache_seqlens.dtype == torch.int64 else cache_seqlens.contiguous()
    else:
        raise ValueError(f"fastlm.{fn}: cache_seqlens must be None, an int or a ({B},) int tensor, "
                         f"got {cache_seqlens!r}")
    leftpad = None
    if cache_leftpad is not None:
        _check_index_tensor(fn, "cache_leftpad", cache_leftpad, q, dims=1)
        if cache_leftpad.shape != (B,):
            raise ValueError(f"fastlm.{fn}: cache_leftpad must be ({B},), got {list(cache_leftpad.shape)}")
        leftpad = cache_leftpad.to(torch.int32).contiguous()
        if leftpad.device.type == "cpu" and B:
            ends = seqlens.long() if seqlens is not None else torch.full(
                (B,), S_max if cache_seqlens is None else cache_seqlens, dtype=torch.long)
            if not (0 <= leftpad.long()).all() or (leftpad.long() > ends).any():
                raise ValueError(f"fastlm.{fn}: cache_leftpad must be >= 0 and at most cache_seqlens, got "
                                 f"{leftpad.tolist()} (cache_seqlens {ends.tolist()})")
    scale = _check_scale(fn, "softmax_scale", softmax_scale, q.shape[-1])
    left, right = _window_of(fn, causal, window_size)
    softcap = _check_softcap(fn, softcap)
    extras = _extras(fn, _check_slopes(fn, alibi_slopes, q.shape[0], q.shape[2], q), sinks, q)
    slopes, sinks = (tuple(extras) + (None, None))[:2]
    with torch.no_grad():
        n = 0
        if k is not None:
            if block_table is None:
                _check_qkv(fn, q, k, v)
            if k.shape[0] != B or k.shape[2:] != k_cache.shape[2:] or v.shape[2:] != v_cache.shape[2:] \
                    or k.dim() != 4 or v.shape[:2] != k.shape[:2] or k.dtype != q.dtype or v.dtype != q.dtype:
                raise ValueError(f"fastlm.{fn}: k and v must be (B, L_new, Hk, D) like the caches, got "
                                 f"{list(k.shape)} and {list(v.shape)}")
            n = k.shape[1]
            if n > S_max:
                raise ValueError(f"fastlm.{fn}: {n} new keys do not fit the cache length {S_max}")
        _check_cache_seqlens(fn, cache_seqlens, n, S_max)
        if rotary_cos is not None:
            start = seqlens.long() if seqlens is not None else torch.full((B,), cache_seqlens, device=q.device)
            if leftpad is not None:  # flash-attn counts positions from each batch's first key
                start = start - leftpad.long()
            k = rotary(k, rotary_cos, rotary_sin, start[:, None] + torch.arange(n, device=q.device),
                       rotary_interleaved)
            windowed = causal or tuple(window_size) != (-1, -1)
            q_pos = start[:, None] + (torch.arange(q.shape[1], device=q.device) if windowed else
                                      torch.zeros(q.shape[1], dtype=torch.long, device=q.device))
            q = rotary(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        if simple and not extras and block_table is None and leftpad is None \
                and (cache_seqlens is None or type(cache_seqlens) is int) and softcap == 0.0 and left == -1 \
                and right <= 0 and not compiling() and q.is_cpu and native_backend("cpu"):
            # The CPU path (a model's decode loop passes an int): the write is a slice, then
            # torch's SDPA over the filled part of the caches, as flash_attn_func's CPU path.
            start = S_max if cache_seqlens is None else cache_seqlens
            total = start + n
            if k is not None:
                k_cache[:, start:total] = k
                v_cache[:, start:total] = v
                k = v = None  # written: the reference below (non-finite inputs) must not write again
            out = _native_flash(q, k_cache[:, :total], v_cache[:, :total], scale, right == 0)
            if out is not None:
                return out
            seqlens = torch.full((B,), total, dtype=torch.int32, device=q.device)
        elif seqlens is None:
            seqlens = torch.full((B,), S_max if cache_seqlens is None else cache_seqlens, dtype=torch.int32,
                                 device=q.device)
        if k is not None:
            # Clamped into each batch's own cache rows: on CUDA the lengths are not checked
            # (a host sync), and a bad one must not write into another batch's cache.
            rows = (seqlens.long()[:, None] + torch.arange(n, device=q.device)).clamp_(0, S_max - 1)
            if block_table is not None:  # row r of batch b: page block_table[b, r // P], slot r % P
                P = k_cache.shape[1]
                pages = block_table.long().gather(1, rows // P).clamp_(0, k_cache.shape[0] - 1)
                k_cache[pages, rows % P] = k
                v_cache[pages, rows % P] = v
            else:
                batch = torch.arange(B, device=q.device)[:, None].expand_as(rows)
                k_cache[batch, rows] = k
                v_cache[batch, rows] = v
            if cache_batch_idx is not None:  # the gathered copies were written: the caches' rows too
                caches[0][rows_idx[:, None].expand_as(rows), rows] = k
                caches[1][rows_idx[:, None].expand_as(rows), rows] = v
            seqlens = seqlens + n
        out, lse = _attention_infer_eager(q, k_cache, v_cache, None, None, seqlens, block_table, leftpad, slopes,
                                          sinks, scale, left, right, softcap, 0, 0, num_splits)
    return (out, lse) if return_softmax_lse else out


def _check_index_tensor(fn: str, name: str, t, q: Tensor, dims: int) -> None:
    """An int32 index tensor (block_table, cache_leftpad) with ``dims`` dims on q's device."""
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != dims:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else repr(t)
        raise ValueError(f"fastlm.{fn}: {name} must be a {dims}-D int32 tensor, got {got}")
    if t.device != q.device:
        raise ValueError(f"fastlm.{fn}: {name} is on {t.device} but q is on {q.device}")


def _kvcache_cpu(q, k_cache, v_cache, k, v, start: int, softmax_scale, causal) -> Optional[Tensor]:
    """flash_attn_with_kvcache's CPU path for a decode loop (an int cache_seqlens, no window,
    no soft-cap): the new keys and values written by slice, then _native_flash over the filled
    part of the caches. Its checks are only what slicing and torch's SDPA would take silently
    (a broadcast batch, a length past the cache, a negative start that would wrap); anything
    unusual returns None, and the checked path that raises fastlm's errors takes the call.
    None may come after the write (torch's answer needs the reference: _has_zero_row): the
    checked path then writes the same rows again, which changes nothing."""
    if not (type(q) is Tensor and type(k_cache) is Tensor and type(v_cache) is Tensor and type(k) is Tensor
            and type(v) is Tensor and q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4
            and k.dim() == 4 and v.dim() == 4):
        return None
    B, S_max, Hk, D = k_cache.shape
    n = k.shape[1]
    total = start + n
    dtype = q.dtype
    if not (0 <= start and total <= S_max and D > 0 and q.shape[0] == B and q.shape[3] == D and q.shape[2] % max(Hk, 1) == 0
            and v_cache.shape[:3] == (B, S_max, Hk) and k.shape[0] == B and k.shape[2:] == k_cache.shape[2:]
            and v.shape[:2] == k.shape[:2] and v.shape[2:] == v_cache.shape[2:] and q.shape[1] >= 1
            and k_cache.dtype == dtype and v_cache.dtype == dtype and k.dtype == dtype and v.dtype == dtype
            and dtype.is_floating_point and q.is_cpu and k_cache.is_cpu and v_cache.is_cpu and k.is_cpu and v.is_cpu
            and (softmax_scale is None or type(softmax_scale) is float and math.isfinite(softmax_scale))):
        return None
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if torch.is_grad_enabled():  # inference only: no graph, the caches are written in place
        with torch.no_grad():
            return _kvcache_cpu(q, k_cache, v_cache, k, v, start, scale, causal)
    k_cache[:, start:total] = k
    v_cache[:, start:total] = v
    return _native_flash(q, k_cache[:, :total], v_cache[:, :total], scale, bool(causal))


# ----------------------------------------------------------------------------- torch's SDPA

def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention on fastlm's kernels: query (..., H, L, E),
    key (..., Hk, S, E), value (..., Hk, S, Ev). is_causal is aligned top-left, as torch's;
    attn_mask is boolean (True takes part) or additive, broadcastable to (..., H, L, S).
    A query that sees no key gives 0 (torch may give NaN). A float attn_mask that requires grad
    gets one, as in torch (an additive bias: T5's relative positions, ALiBi-like learned slopes);
    a query that sees no key gives it 0.

    On the "torch" backend with CPU tensors (the CPU path) the call is torch's own SDPA
    wherever that computes the same thing (see _native_sdpa); dropout keeps fastlm's seeded
    mask on the reference."""
    fn = "scaled_dot_product_attention"
    if _autocast_any():
        query, key, value = autocast_inputs(query, key, value)
    # The usual call passes this first test, a handful of attribute reads (issue 17); anything
    # else goes through the checks one by one, which raise the error naming the argument.
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
            and query.is_floating_point() and key.dtype == query.dtype and value.dtype == query.dtype
            and query.dim() >= 2 and key.dim() == query.dim() and value.dim() == query.dim()
            and key.device == query.device and value.device == query.device):
        _check_sdpa_tensors(fn, query, key, value)
    qs, ks = query.shape, key.shape
    if ks[:-1] != value.shape[:-1]:  # L and the batch and head dims
        raise ArgumentError(f"fastlm.{fn}: key {list(key.shape)} and value {list(value.shape)} must agree but for E")
    E = qs[-1]
    if ks[-1] != E:
        raise ArgumentError(f"fastlm.{fn}: key has E = {ks[-1]} but query has {E}")
    if E == 0:
        raise ArgumentError(f"fastlm.{fn}: query and key must have E > 0 (the head dim), got shape "
                            f"{list(query.shape)}")
    if qs[:-3] != ks[:-3]:
        raise ArgumentError(f"fastlm.{fn}: query and key batch dims differ: {list(qs[:-3])} and "
                            f"{list(ks[:-3])}")
    dropout_p = _check_dropout(fn, "dropout_p", dropout_p)
    scale = _check_scale(fn, "scale", scale, E)
    if is_causal and attn_mask is not None:
        raise ArgumentError(f"fastlm.{fn}: attn_mask and is_causal=True cannot be given together (as in torch)")
    L, S = qs[-2], ks[-2]
    H, Hk = (qs[-3], ks[-3]) if len(qs) >= 3 else (1, 1)
    if H != Hk:
        if not enable_gqa:
            raise ArgumentError(f"fastlm.{fn}: query has {H} heads but key has {Hk}; pass enable_gqa=True for "
                                f"grouped query attention")
        if H % Hk != 0:
            raise ArgumentError(f"fastlm.{fn}: query's {H} heads must be a multiple of key's {Hk} (enable_gqa)")
    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ArgumentTypeError(f"fastlm.{fn}: attn_mask must be a Tensor or None")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ArgumentTypeError(f"fastlm.{fn}: attn_mask must be boolean or floating point, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ArgumentError(f"fastlm.{fn}: attn_mask is on {attn_mask.device} but query is on {query.device}")
        full = query.shape[:-1] + (S,)
        if attn_mask.dim() > len(full) or any(m != 1 and m != n for m, n in zip(reversed(attn_mask.shape),
                                                                               reversed(full))):
            raise ArgumentError(f"fastlm.{fn}: attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                                f"{list(full)}")
    if dropout_p == 0.0 and query.is_cpu and not compiling() and native_backend("cpu"):
        out = _native_sdpa(query, key, value, attn_mask, is_causal, scale, H != Hk)
        if out is not None:
            return out
    if attn_mask is not None:
        # Kept in its broadcastable shape (leading 1s added), not expanded: the kernels
        # broadcast it by stride 0, and its gradient is summed to this shape in float32.
        mask = attn_mask
        while mask.dim() < max(query.dim(), 4):
            mask = mask[None]
        if mask.dim() > 4:  # (N..., H, L, S) -> (B, H, L, S), B the product of the batch dims
            lead = mask.shape[:-3]
            if any(n != 1 for n in lead):
                mask = mask.expand(query.shape[:-3] + mask.shape[-3:])
            mask = mask.reshape((-1,) + mask.shape[-3:])
    # Lay out as (B, L, H, E) views: (..., H, L, E) -> (prod(...), H, L, E) -> transpose.
    if query.dim() == 2:
        q4, k4, v4 = (t[None, None] for t in (query, key, value))
    elif query.dim() == 3:
        q4, k4, v4 = (t[None] for t in (query, key, value))
    else:
        # the batch dims' product, not -1: an empty key (S = 0) makes -1 ambiguous
        q4, k4, v4 = (t.reshape((math.prod(t.shape[:-3]),) + t.shape[-3:]) for t in (query, key, value))
    out, _ = _attention_eager(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), mask, None, None, None,
                              _seed_for(dropout_p, query.device), scale, False, -1, 0 if is_causal else -1, 0.0,
                              dropout_p, 0, 0)
    out = out.transpose(1, 2)  # (B, H, L, Ev)
    return out.reshape(query.shape[:-1] + (value.shape[-1],))


def _check_sdpa_tensors(fn: str, query, key, value) -> None:
    """query, key and value checked one by one: raises the error naming the first bad one."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"fastlm.{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ArgumentTypeError(f"fastlm.{fn}: {name} must be floating point, got dtype {t.dtype}")
        if t.dim() < 2:
            raise ArgumentError(f"fastlm.{fn}: {name} must be at least 2-D (..., L, E), got shape {list(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ArgumentTypeError(f"fastlm.{fn}: {name} has dtype {t.dtype} but query has {query.dtype}")
        if t.device != query.device:
            raise ArgumentError(f"fastlm.{fn}: {name} is on {t.device} but query is on {query.device}")
        if t.dim() != query.dim():
            raise ArgumentError(f"fastlm.{fn}: {name} has {t.dim()} dims but query has {query.dim()}")


def _native_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                 scale: float, gqa: bool) -> Optional[Tensor]:
    """scaled_dot_product_attention on the "torch" backend (the CPU path): torch's own SDPA,
    which computes the same thing (rows that see no key give 0 and zero gradients there
    since torch 2.5, as the reference's; a float mask that requires grad gets torch's
    gradient, summed to its shape) with torch's autograd. None, for the reference, where
    fastlm's meaning differs: a float mask of another dtype than the inputs (the reference
    adds it in float32 or float64 unrounded), or empty tensors. Dropout never comes here: the
    reference draws the mask fastlm promises for the call's seed. Non-finite queries and keys, and
    NaN or +inf in a float mask, go to the reference too (see _special_in). CPU tensors only, as _native_flash."""
    if attn_mask is not None and attn_mask.dtype != query.dtype and attn_mask.dtype != torch.bool:
        return None
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return None
    if _special_in(query, key, attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None):
        return None
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)
