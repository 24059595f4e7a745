"""The "attention" benchmark suite: fastlm's flash attention against torch's SDPA backends,
torch eager attention and flash-attn.

Implementations (each where it can run):

    fastlm-triton, fastlm-cuda   fastlm.flash_attn_func (CUDA only; the interpreter is not timed)
    fastlm-torch                 fastlm's reference backend (materialises the scores)
    torch-eager                  softmax(q k^T * scale) v as a user writes it
    torch-compile                torch.compile of the eager function
    sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                                 torch's scaled_dot_product_attention pinned to one backend
    flash-attn                   flash_attn.flash_attn_func, when flash_attn is installed
    xformers                     xformers.ops.memory_efficient_attention, when xformers is installed

Shapes (GPU): bf16, batch x seqlen = 16384 tokens, seqlen 512 to 16384, d_model 2048 so
heads = 2048 / head_dim, head dim 64 and 128, causal and not: FlashAttention's benchmark.
TFLOP/s counted as FlashAttention counts them: forward 4 B H L S D, halved when causal;
backward 2.5x the forward; both 3.5x. Implementations that materialise the (L, S) scores are
left out where those would take more than half the free memory; an SDPA backend that has no
kernel for a case ("No available kernel") is left out of it with torch's reason. In the table
"rows" is the batch, "width" the sequence length and "hidden" the head dim (the JSON rows
also carry "heads").
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .runner import COMPILE, EAGER, Config, Harness, dtype_name, relative_check, standard_implementations

MODES = ("fwd", "bwd", "fwd+bwd")
TOKENS, D_MODEL = 16384, 2048
GPU_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
GPU_HEAD_DIMS = [64, 128]
CPU_SHAPES = [(1, 64, 2, 32)]  # (batch, seqlen, heads, head dim)
SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
        "sdpa-math": "MATH"}
MATERIALISING = ("fastlm-torch", EAGER, COMPILE, "sdpa-math")


def attention_flops(mode: str, batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool) -> float:
    """FlashAttention's count: two matmuls of 2 L S D per head forward, halved when causal;
    the backward's five matmuls are 2.5x the forward."""
    fwd = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _xformers() -> Optional[Callable]:
    try:
        from xformers.ops import LowerTriangularMask, memory_efficient_attention
    except Exception:  # not installed, or built for another torch
        return None

    def attend(q, k, v, causal: bool):
        return memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask() if causal else None)
    return attend


def _flash_attn() -> Optional[Callable]:
    try:
        from flash_attn import flash_attn_func
        return flash_attn_func
    except Exception:  # not installed, or built for another torch
        return None


def implementations(config: Config, harness: Harness) -> list[str]:
    chosen = standard_implementations(config, harness)
    from torch.nn.attention import SDPBackend

    for name, backend in SDPA.items():
        if not config.wants("impl", name):
            continue
        if hasattr(SDPBackend, backend):  # whether it has a kernel for a case is asked per case
            chosen.append(name)
        else:
            harness.note(f"{name} left out: this torch has no SDPBackend.{backend}")
    if config.wants("impl", "flash-attn"):
        if _flash_attn() is not None and config.on_cuda:
            chosen.append("flash-attn")
        else:
            harness.note("flash-attn left out: flash_attn is not installed (or not on CUDA)")
    if config.wants("impl", "xformers"):
        if _xformers() is not None and config.on_cuda:
            chosen.append("xformers")
        else:
            harness.note("xformers left out: xformers is not installed (or not on CUDA)")
    return chosen


def _eager(q, k, v, causal: bool):
    """(B, L, H, D) in and out; what a user writes without a fused kernel."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(S - L + 1), float("-inf"))
    return (torch.softmax(s.float(), dim=-1).to(q.dtype) @ v).transpose(1, 2)


def _forward(name: str, causal: bool, compiled: dict) -> Callable:
    import fastlm

    if name.startswith("fastlm-"):
        backend = name.split("-", 1)[1]

        def ours(q, k, v):
            with fastlm.use_backend(backend):
                return fastlm.flash_attn_func(q, k, v, causal=causal)
        return ours
    if name == EAGER:
        return lambda q, k, v: _eager(q, k, v, causal)
    if name == COMPILE:
        compiled.setdefault("fn", torch.compile(lambda q, k, v: _eager(q, k, v, causal), dynamic=False))
        return compiled["fn"]
    if name in SDPA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA[name])

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=causal)
            return out.transpose(1, 2)
        return sdpa
    if name == "xformers":
        xf = _xformers()
        return lambda q, k, v: xf(q, k, v, causal)  # (B, L, H, D), causal top-left: L == S here
    flash = _flash_attn()
    return lambda q, k, v: flash(q, k, v, causal=causal)


def _sdpa_unavailable(name: str, causal: bool, q, k, v) -> Optional[str]:
    """Why torch's SDPA pinned to backend ``name`` has no kernel for this case, or None if it has.

    torch raises "No available kernel" (CPU: "No viable backend") and gives its reasons only
    as warnings, one group per backend, so try one forward and backward and keep the groups
    that say more than "runtime disabled". Any other error is left to the harness to report.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = _forward(name, causal, {})(q, k, v)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            return None
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "no available kernel" not in error.lower() and "no viable backend" not in error.lower():
                return None
    return sdpa_reasons([str(w.message) for w in caught]) or error.split(". ")[0].rstrip(".")


def sdpa_reasons(messages: list[str]) -> str:
    """torch's warnings for "No available kernel", less the backends that were only switched off.

    They come in groups: a heading ("Flash attention kernel not used because:"), then the
    checks that failed; a backend that sdpa_kernel switched off says "runtime disabled".
    """
    said = [m.split(" (Triggered internally")[0].strip() for m in messages]
    said = [m for m in said if m and "runtime disabled" not in m]
    # Drop a heading with nothing left under it.
    said = [m for i, m in enumerate(said)
            if not (m.endswith("because:") and (i + 1 == len(said) or said[i + 1].endswith("because:")))]
    return " ".join(said)


def _call(mode: str, forward: Callable[[], torch.Tensor], params: list[torch.Tensor],
          dout: torch.Tensor) -> Callable[[], Any]:
    """One timed call: the forward, the backward alone (of a graph built once), or both."""
    if mode == "fwd":
        return lambda: (forward(),)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), params, dout)
    graph: list[torch.Tensor] = []

    def backward():
        if not graph:
            graph.append(forward())
        return torch.autograd.grad(graph[0], params, dout, retain_graph=True)
    return backward


def _check(dtype: torch.dtype) -> Callable[[str, Any, Any], Optional[str]]:
    return relative_check(dtype, {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2})


def shapes(config: Config) -> list[tuple[int, int, int, int]]:
    """(batch, seqlen, heads, head dim) of the run; --rows picks sequence lengths, --widths head dims."""
    if not config.on_cuda:
        out = list(CPU_SHAPES)
        if config.rows or config.widths:
            b, s, h, d = out[0]
            out = [(max(1, b * s // L), L, h, D) for L in (config.rows or [s]) for D in (config.widths or [d])]
        return out[:1] if config.quick else out
    seqlens = config.rows or GPU_SEQLENS
    dims = config.widths or GPU_HEAD_DIMS
    out = [(max(1, TOKENS // L), L, D_MODEL // D, D) for D in dims for L in seqlens]
    return out[:1] if config.quick else out


def _free_bytes(device: torch.device) -> Optional[int]:
    """Memory a new tensor can have: free on the device plus what torch's allocator holds unused."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def materialised_bytes(batch: int, heads: int, seqlen: int) -> int:
    """About what an implementation that materialises the scores holds at its peak: three
    float32 (L, S) tensors per head (the scores, their softmax, and its gradient or a copy)."""
    return 3 * batch * heads * seqlen * seqlen * 4


def run(config: Config, harness: Harness) -> None:
    impls = implementations(config, harness)
    modes = [m for m in MODES if config.wants("mode", m)]
    check = _check(config.dtype)
    peak = harness.ceilings.get("matmul_tflops")
    elem = torch.empty(0, dtype=config.dtype).element_size()
    for batch, seqlen, heads, head_dim in shapes(config):
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=config.device).to(config.dtype)
                   .requires_grad_() for _ in range(3))
        dout = torch.randn_like(q)
        free = _free_bytes(config.device)
        scores = materialised_bytes(batch, heads, seqlen)
        shape = f"B={batch} L={seqlen} H={heads} D={head_dim}"
        for causal in (False, True):
            if COMPILE in impls:
                torch._dynamo.reset()
            compiled: dict = {}
            usable = []
            for name in impls:
                if name in MATERIALISING and free is not None and scores > free // 2:
                    harness.note(f"{name} left out at {shape}: materialising the (L, S) scores would take "
                                 f"about {scores / 2 ** 30:.1f} GiB of {free / 2 ** 30:.1f} GiB free")
                    continue
                if name in SDPA:
                    why_not = _sdpa_unavailable(name, causal, q, k, v)
                    if why_not:
                        harness.note(f"{name} left out at {shape}{' causal' if causal else ''}: "
                                     f"no kernel for it ({why_not})")
                        continue
                usable.append(name)
            for mode in modes:
                fns = {name: _call(mode, (lambda f: lambda: f(q, k, v))(_forward(name, causal, compiled)), [q, k, v],
                             dout)
                       for name in usable}
                meta = {"op": "attention causal" if causal else "attention", "mode": mode, "rows": batch,
                        "width": seqlen, "hidden": head_dim, "heads": heads, "dtype": dtype_name(config.dtype)}
                # GB/s on the least traffic: q, k, v and out once forward; and their gradients backward.
                nbytes = 4 * q.numel() * elem * {"fwd": 1, "bwd": 2, "fwd+bwd": 2}[mode]
                done = harness.run_case(meta, fns, nbytes, check)
                flops = attention_flops(mode, batch, heads, seqlen, seqlen, head_dim, causal)
                for row in done:
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    row["frac_matmul"] = row["tflops"] / peak if peak else None
                print(f"attention: {mode} {'causal ' if causal else ''}{shape}: "
                      f"{len(done)} implementations timed", file=sys.stderr)
            del compiled
        del q, k, v, dout
