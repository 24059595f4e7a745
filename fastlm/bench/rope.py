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


def eager_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's apply_rotary_pos_emb: cos/sin (S, D/2) repeated to (S, D), broadcast over heads."""
    S = x.shape[1]
    c = torch.cat((cos[:S], cos[:S]), dim=-1)[None, :, None, :].to(x.dtype)
    s = torch.cat((sin[:S], sin[:S]), dim=-1)[None, :, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s


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


def run(config: Config, harness: Harness) -> None:
    import fastlm

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
