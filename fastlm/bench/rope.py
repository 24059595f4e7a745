"""The "rope" benchmark suite: fastlm.rotary against rotary embedding as models write it.

Implementations (each where it can run):

    fastlm-triton    fastlm.rotary (CUDA only; the interpreter is not timed)
    fastlm-torch     fastlm's reference backend
    torch-eager      Llama's form: x * cos + rotate_half(x) * sin, tables gathered per token
    torch-compile    torch.compile of the eager function

x is (B, S, H, D), rotated over the whole head (GPT-NeoX / Llama pairing), positions 0..S-1,
float32 tables. It is a memory-bound op: GB/s counts x read once and the output written
once (the tables are small and cached), the same in the backward for dy and dx. In the table
"rows" is the batch, "width" the sequence length and "hidden" the head dim (the JSON rows
carry "heads" too).

Op "rotary_attention" (issue 23): a causal GQA attention with rotary positions, the rotary as
its own launches (fastlm.rotary on q and on k, then flash_attn_func: "unfused") against the
rotary inside the attention kernels (flash_attn_func(..., rotary_cos=, rotary_sin=): "fused").
The bytes column is the attention's least traffic (q, k, v read, out written); "rotary_bytes"
in the JSON rows is what the separate launches add (q and k read and written, and in the
backward dq and dk), which is all the fused path can save (docs/rotary_in_attention.md).
Fixed shapes; with --rows / --widths they run only when --ops names rotary_attention.

Op "qk_norm_rotary" (issue 23): RMSNorm of q and k over each head, then rotary (Qwen3, Gemma 3).
"fastlm-<backend>" is fastlm.qk_norm_rotary (one launch forward, one backward); EAGER is HF's
chain (Qwen3RMSNorm's formula on q and on k, then Llama's rotate_half), "torch-compile" that
chain compiled, "fastlm-<backend>-unfused" fastlm's own chain (two rms_norm, then rotary on q
and k). The bytes column is the fused op's traffic (q and k read and written once; the
backward reads q, k and their gradients and writes dq, dk); "unfused_bytes" in the JSON rows
is fastlm's chain's (the normalised q and k written and read again: twice the forward's bytes,
and 5/3 of the backward's).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

from .attention import _call
from .runner import COMPILE, EAGER, Config, Harness, dtype_name, relative_check, standard_implementations

MODES = ("fwd", "bwd", "fwd+bwd")
# (batch, seqlen, heads, head dim): Llama-7B's q at 4k and 16k tokens, GPT-2-sized heads.
GPU_SHAPES = [(1, 4096, 32, 128), (4, 4096, 32, 128), (16, 1024, 12, 64), (8, 2048, 16, 64)]
CPU_SHAPES = [(1, 64, 2, 32)]
# (batch, seqlen, q heads, kv heads, head dim) of the rotary_attention rows: Llama-3-8B's and a GPT-2-sized model's.
ATTN_GPU_SHAPES = [(1, 4096, 32, 8, 128), (8, 1024, 12, 12, 64)]
ATTN_CPU_SHAPES = [(1, 32, 2, 1, 16)]


def eager_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's apply_rotary_pos_emb: cos/sin (S, D/2) repeated to (S, D), broadcast over heads."""
    S = x.shape[1]
    c = torch.cat((cos[:S], cos[:S]), dim=-1)[None, :, None, :].to(x.dtype)
    s = torch.cat((sin[:S], sin[:S]), dim=-1)[None, :, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s


def eager_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's Qwen3 chain: Qwen3RMSNorm's formula (float32 norm, cast back, times the weight) on q
    and on k (B, S, H, D), then Llama's rotary."""
    def norm(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return eager_rope(norm(q, q_weight), cos, sin), eager_rope(norm(k, k_weight), cos, sin)


def implementations(config: Config, harness: Harness) -> list[str]:
    return standard_implementations(config, harness, backends=("triton",),
                                    missing={"cuda": "there is no CUDA C++ rotary kernel"})


def _forward(name: str, compiled: dict) -> Callable:
    import fastlm

    if name.startswith("fastlm-"):
        backend = name.split("-", 1)[1]

        def ours(x, cos, sin):
            with fastlm.use_backend(backend):
                return fastlm.rotary(x, cos, sin)
        return ours
    if name == EAGER:
        return eager_rope
    compiled.setdefault("fn", torch.compile(eager_rope, dynamic=False))
    return compiled["fn"]


def _check(dtype: torch.dtype) -> Callable[[str, Any, Any], Optional[str]]:
    return relative_check(dtype, {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2})


def shapes(config: Config) -> list[tuple[int, int, int, int]]:
    """(batch, seqlen, heads, head dim); --rows picks batch sizes, --widths sequence lengths."""
    base = GPU_SHAPES if config.on_cuda else CPU_SHAPES
    if config.rows or config.widths:
        _, _, h, d = base[0]
        base = [(b, s, h, d) for b in (config.rows or [base[0][0]]) for s in (config.widths or [base[0][1]])]
    return base[:1] if config.quick else base


def _rotary_attention(fused: bool, backend: str) -> Callable:
    import fastlm

    def fn(q, k, v, cos, sin):
        with fastlm.use_backend(backend):
            if fused:
                return fastlm.flash_attn_func(q, k, v, causal=True, rotary_cos=cos, rotary_sin=sin)
            return fastlm.flash_attn_func(fastlm.rotary(q, cos, sin), fastlm.rotary(k, cos, sin), v, causal=True)
    return fn


def run_rotary_attention(config: Config, harness: Harness) -> None:
    """Rotary as its own launches against rotary inside the attention (EAGER names the unfused
    chain, so the harness checks the fused output against it)."""
    import fastlm

    if not config.wants("op", "rotary_attention"):
        return
    if (config.rows or config.widths) and not config.ops:
        # --rows / --widths size fastlm.rotary's rows (the GPU runbook's short rope stage): these
        # compile three more attention kernels, so they run when asked for by --ops or unsized.
        return
    backend = "triton" if config.on_cuda else "torch"
    elem = torch.empty(0, dtype=config.dtype).element_size()
    shapes_ = ATTN_GPU_SHAPES if config.on_cuda else ATTN_CPU_SHAPES
    for B, S, H, Hk, D in shapes_[:1] if config.quick else shapes_:
        torch.manual_seed(0)
        q = torch.randn(B, S, H, D, device=config.device).to(config.dtype).requires_grad_()
        k = torch.randn(B, S, Hk, D, device=config.device).to(config.dtype).requires_grad_()
        v = torch.randn(B, S, Hk, D, device=config.device).to(config.dtype).requires_grad_()
        cos, sin = fastlm.rotary_cos_sin(S, D, device=config.device)
        dout = torch.randn(B, S, H, D, device=config.device).to(config.dtype)
        for mode in [m for m in MODES if config.wants("mode", m)]:
            fns = {name: _call(mode, (lambda f: lambda: f(q, k, v, cos, sin))(_rotary_attention(fused, backend)),
                               [q, k, v], dout)
                   for name, fused in ((EAGER, False), (f"fastlm-{backend}-fused", True))}
            qk = (q.numel() + k.numel()) * elem
            passes = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]
            meta = {"op": "rotary_attention", "mode": mode, "rows": B, "width": S, "hidden": D, "heads": H,
                    "kv_heads": Hk, "dtype": dtype_name(config.dtype), "rotary_bytes": 2 * qk * passes}
            nbytes = (q.numel() + 2 * k.numel() + q.numel()) * elem * passes
            harness.run_case(meta, fns, nbytes, relative_check(config.dtype, {torch.float32: 1e-4,
                                                                              torch.float16: 2e-2,
                                                                              torch.bfloat16: 5e-2}))
            print(f"rope: rotary_attention {mode} B={B} S={S} H={H} Hk={Hk} D={D}", file=sys.stderr)


def _qk_norm_rotary(name: str, compiled: dict) -> Callable:
    import fastlm

    if name.startswith("fastlm-"):
        backend = name.split("-")[1]
        if name.endswith("-unfused"):
            def chain(q, k, qw, kw, cos, sin):
                with fastlm.use_backend(backend):
                    D = q.shape[-1]
                    return (fastlm.rotary(fastlm.rms_norm(q, (D,), qw, 1e-6), cos, sin),
                            fastlm.rotary(fastlm.rms_norm(k, (D,), kw, 1e-6), cos, sin))
            return chain

        def fused(q, k, qw, kw, cos, sin):
            with fastlm.use_backend(backend):
                return fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, 1e-6)
        return fused
    if name == EAGER:
        return eager_qk_norm_rope
    compiled.setdefault("qkn", torch.compile(eager_qk_norm_rope, dynamic=False))
    return compiled["qkn"]


def qk_norm_rotary_bytes(q_numel: int, k_numel: int, elem: int, mode: str) -> tuple[int, int]:
    """(fused, fastlm's unfused chain) bytes at the least: forward q and k read and written
    (the chain: also the normalised q and k written and read back); backward dy and x read, dx
    written (the chain: the rotary's gradient written and read back by the norm's backward)."""
    qk = (q_numel + k_numel) * elem
    fwd, bwd = (2 * qk, 4 * qk), (3 * qk, 5 * qk)
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def run_qk_norm_rotary(config: Config, harness: Harness) -> None:
    import fastlm

    if not config.wants("op", "qk_norm_rotary"):
        return
    backend = "triton" if config.on_cuda else "torch"
    impls = [n for n in implementations(config, harness) if n != "fastlm-torch" or backend == "torch"]
    impls.append(f"fastlm-{backend}-unfused")
    elem = torch.empty(0, dtype=config.dtype).element_size()
    shapes_ = ATTN_GPU_SHAPES if config.on_cuda else ATTN_CPU_SHAPES
    for B, S, H, Hk, D in shapes_[:1] if config.quick else shapes_:
        if COMPILE in impls:
            torch._dynamo.reset()
        compiled: dict = {}
        torch.manual_seed(0)
        q = torch.randn(B, S, H, D, device=config.device).to(config.dtype).requires_grad_()
        k = torch.randn(B, S, Hk, D, device=config.device).to(config.dtype).requires_grad_()
        qw = (1 + 0.1 * torch.randn(D, device=config.device)).to(config.dtype).requires_grad_()
        kw = (1 + 0.1 * torch.randn(D, device=config.device)).to(config.dtype).requires_grad_()
        cos, sin = fastlm.rotary_cos_sin(S, D, device=config.device)
        dout = (torch.randn(B, S, H, D, device=config.device).to(config.dtype),
                torch.randn(B, S, Hk, D, device=config.device).to(config.dtype))
        for mode in [m for m in MODES if config.wants("mode", m)]:
            calls = {name: (lambda f: lambda: f(q, k, qw, kw, cos, sin))(_qk_norm_rotary(name, compiled))
                     for name in impls}
            # the forward returns (q_out, k_out): the check compares both
            fns = {name: call if mode == "fwd" else _call(mode, call, [q, k, qw, kw], dout)
                   for name, call in calls.items()}
            fused, unfused = qk_norm_rotary_bytes(q.numel(), k.numel(), elem, mode)
            meta = {"op": "qk_norm_rotary", "mode": mode, "rows": B, "width": S, "hidden": D, "heads": H,
                    "kv_heads": Hk, "dtype": dtype_name(config.dtype), "unfused_bytes": unfused}
            harness.run_case(meta, fns, fused, relative_check(config.dtype, {torch.float32: 1e-4,
                                                                             torch.float16: 2e-2,
                                                                             torch.bfloat16: 5e-2}))
            print(f"rope: qk_norm_rotary {mode} B={B} S={S} H={H} Hk={Hk} D={D}", file=sys.stderr)
        del q, k, dout, compiled


def run(config: Config, harness: Harness) -> None:
    import fastlm

    run_rotary_attention(config, harness)
    run_qk_norm_rotary(config, harness)
    if not config.wants("op", "rotary"):
        return
    impls = implementations(config, harness)
    modes = [m for m in MODES if config.wants("mode", m)]
    check = _check(config.dtype)
    elem = torch.empty(0, dtype=config.dtype).element_size()
    for B, S, H, D in shapes(config):
        if COMPILE in impls:
            torch._dynamo.reset()
        compiled: dict = {}
        torch.manual_seed(0)
        x = torch.randn(B, S, H, D, device=config.device).to(config.dtype).requires_grad_()
        cos, sin = fastlm.rotary_cos_sin(S, D, device=config.device)
        dout = torch.randn(B, S, H, D, device=config.device).to(config.dtype)
        for mode in modes:
            fns = {name: _call(mode, (lambda f: lambda: f(x, cos, sin))(_forward(name, compiled)), [x], dout)
                   for name in impls}
            meta = {"op": "rotary", "mode": mode, "rows": B, "width": S, "hidden": D, "heads": H,
                    "dtype": dtype_name(config.dtype)}
            nbytes = 2 * x.numel() * elem * (2 if mode == "fwd+bwd" else 1)
            harness.run_case(meta, fns, nbytes, check)
            print(f"rope: {mode} B={B} S={S} H={H} D={D}", file=sys.stderr)
        del x, dout, compiled
