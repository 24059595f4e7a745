"""The "ffn" benchmark suite: fastlm.feed_forward against what it replaces.

Implementations (each where it can run):

    fastlm-triton, fastlm-cuda   fastlm.feed_forward (CUDA only; the interpreter is not timed)
    fastlm-torch                 fastlm's reference backend
    torch-eager                  Linear, activation, Linear as a user writes them
                                 (gated: Linear to 2H, chunk, act(gate) * up, Linear)
    torch-compile                torch.compile of the eager block
    matmuls                      the bare matmuls the block contains (no bias, no activation):
                                 the floor any fusion of the block is measured against

Shapes (GPU): bf16, (tokens, d_model) from GPT-2 small to 8192 wide, hidden 4 d_model for
gelu_tanh (GPT-2) and 8/3 d_model rounded up to a multiple of 256 for swiglu (Llama).
TFLOP/s counts the matmuls: 2 tokens d_model (rows of w_in + hidden) forward, twice that
backward, beside the measured matmul peak. In the table "rows" is tokens, "width" d_model
and "hidden" the hidden width.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .attention import _call
from .runner import COMPILE, EAGER, Config, Harness, dtype_name, relative_check, standard_implementations

MODES = ("fwd", "bwd", "fwd+bwd")
ACTIVATIONS = ("gelu_tanh", "swiglu")
GPU_SHAPES = [(8192, 768), (8192, 1024), (8192, 2048), (16384, 4096), (32768, 4096), (8192, 8192)]
CPU_SHAPES = [(64, 32)]
_TORCH_ACT = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
              "silu": F.silu}
_GATE = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}


def hidden_width(d_model: int, activation: str) -> int:
    if activation in _GATE:
        return -(-(8 * d_model // 3) // 256) * 256
    return 4 * d_model


def ffn_flops(mode: str, tokens: int, d_model: int, hidden: int, gated: bool) -> float:
    fwd = 2.0 * tokens * d_model * ((2 if gated else 1) * hidden + hidden)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def eager_block(x, w_in, b_in, w_out, b_out, activation: str):
    z = F.linear(x, w_in, b_in)
    if activation in _GATE:
        g, u = z.chunk(2, dim=-1)
        h = _TORCH_ACT[_GATE[activation]](g) * u
    else:
        h = _TORCH_ACT[activation](z)
    return F.linear(h, w_out, b_out)


def implementations(config: Config, harness: Harness) -> list[str]:
    chosen = standard_implementations(config, harness)
    if config.wants("impl", "matmuls"):
        chosen.append("matmuls")
    return chosen


def _forward(name: str, activation: str, compiled: dict) -> Callable:
    import fastlm

    if name.startswith("fastlm-"):
        backend = name.split("-", 1)[1]

        def ours(x, w_in, b_in, w_out, b_out):
            with fastlm.use_backend(backend):
                return fastlm.feed_forward(x, w_in, b_in, w_out, b_out, activation)
        return ours
    if name == EAGER:
        return lambda *t: eager_block(*t, activation)
    if name == COMPILE:
        compiled.setdefault("fn", torch.compile(lambda *t: eager_block(*t, activation), dynamic=False))
        return compiled["fn"]
    # "matmuls": the block's matmuls alone (gated: the second reads the first half of the
    # first's output, a view); its backward is the block's four matmuls.
    return lambda x, w_in, b_in, w_out, b_out: F.linear(F.linear(x, w_in)[:, :w_out.shape[1]], w_out)


def _check(dtype: torch.dtype) -> Callable[[str, Any, Any], Optional[str]]:
    return relative_check(dtype, {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}, skip=("matmuls",))


def shapes(config: Config) -> list[tuple[int, int]]:
    """(tokens, d_model); --rows picks token counts, --widths d_model."""
    base = GPU_SHAPES if config.on_cuda else CPU_SHAPES
    if config.rows or config.widths:
        base = [(t, d) for t in (config.rows or [base[0][0]]) for d in (config.widths or [base[0][1]])]
    return base[:1] if config.quick else base


def run(config: Config, harness: Harness) -> None:
    impls = implementations(config, harness)
    modes = [m for m in MODES if config.wants("mode", m)]
    check = _check(config.dtype)
    peak = harness.ceilings.get("matmul_tflops")
    elem = torch.empty(0, dtype=config.dtype).element_size()
    for tokens, d_model in shapes(config):
        for activation in ACTIVATIONS:
            if not config.wants("op", f"feed_forward {activation}") and not config.wants("op", "feed_forward"):
                continue
            gated = activation in _GATE
            hidden = hidden_width(d_model, activation)
            rows = (2 if gated else 1) * hidden
            if COMPILE in impls:
                torch._dynamo.reset()
            compiled: dict = {}
            torch.manual_seed(0)

            def param(*shape, scale=1.0):
                return (torch.randn(*shape, device=config.device) * scale).to(config.dtype).requires_grad_()

            x = param(tokens, d_model)
            w_in, b_in = param(rows, d_model, scale=d_model ** -0.5), param(rows, scale=0.1)
            w_out, b_out = param(d_model, hidden, scale=hidden ** -0.5), param(d_model, scale=0.1)
            inputs = [x, w_in, b_in, w_out, b_out]
            dout = torch.randn(tokens, d_model, device=config.device).to(config.dtype)
            for mode in modes:
                fns = {name: _call(mode, (lambda f: lambda: f(*inputs))(_forward(name, activation, compiled)),
                                   [x, w_in, w_out] if name == "matmuls" else inputs, dout) for name in impls}
                meta = {"op": f"feed_forward {activation}", "mode": mode, "rows": tokens, "width": d_model,
                        "hidden": hidden, "dtype": dtype_name(config.dtype)}
                # The least traffic: x, the weights and y once forward; and their gradients backward.
                nbytes = (2 * tokens * d_model + (rows + hidden) * d_model) * elem * (1 if mode == "fwd" else 2)
                done = harness.run_case(meta, fns, nbytes, check)
                flops = ffn_flops(mode, tokens, d_model, hidden, gated)
                bare = next((r["ms"] for r in done if r["impl"] == "matmuls"), None)
                for row in done:
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    row["frac_matmul"] = row["tflops"] / peak if peak else None
                    row["vs_matmuls"] = bare / row["ms"] if bare else None  # < 1: slower than the matmuls alone
                print(f"ffn: {mode} {activation} {tokens}x{d_model} hidden {hidden}: {len(done)} implementations timed",
                      file=sys.stderr)
            del inputs, x, w_in, b_in, w_out, b_out, dout, compiled
