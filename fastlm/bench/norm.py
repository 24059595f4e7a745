"""Benchmark suite for the norm ops: layer_norm, rms_norm and their fused-residual variants.

Each case is (op, mode, rows, width) and runs every implementation that can run here:

    fastlm-triton, fastlm-cuda   fastlm's kernels (CUDA only: under the Triton interpreter
                                 a CPU run would time the interpreter, not the kernel)
    fastlm-torch                 fastlm's reference backend
    torch-eager                  torch.nn.functional.layer_norm / rms_norm (x + r first)
    torch-compile                torch.compile of the same eager function

Modes, all with inputs that require grad (the training step is what these kernels are for):
"fwd" is the forward that records the graph; "bwd" is autograd.grad over a graph recorded
once (retain_graph, so every call runs the same backward); "fwd+bwd" is both.

The fused variants return the residual stream x + r as well as the norm, as a pre-norm
block needs it for the next add, and the backward gets a gradient for both outputs.

dropout_add_layer_norm / dropout_add_rms_norm (issue 23) are the same with dropout on the
sublayer output first, p = 0.1: fastlm's one kernel (add_layer_norm(..., dropout_p=0.1), the
mask drawn from a seed and drawn again in the backward) against the unfused chain
F.dropout, add, norm that eager and torch.compile run. The masks differ by construction (each
draws its own), so their outputs are checked for shape and finiteness only (tests compare
masks). Each row's ``bytes`` is the fused op's least traffic; ``chain_bytes`` counts what the
eager chain moves (bytes_moved_chain), so the saving reads off one row.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .runner import COMPILE, EAGER, Config, Harness, dtype_name, standard_implementations

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dropout_add_layer_norm", "dropout_add_rms_norm")
DROPOUT_P = 0.1
MODES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("fastlm-triton", "fastlm-cuda", "fastlm-torch", EAGER, COMPILE)
EPS = 1e-5

# Hidden sizes of real models (GPT-2 small up to 70B-class) and token counts of real batches.
GPU_WIDTHS, GPU_ROWS = [768, 1024, 2048, 4096, 8192], [4096, 16384, 32768]
# On a CPU only the reference and eager paths run; these sizes keep the run to seconds.
CPU_WIDTHS, CPU_ROWS = [768, 1024], [256, 1024]

# Largest |output - eager| / max |eager| accepted before a case gets a note: about ten
# roundings of the dtype, since outputs are stored in it and weight gradients sum many rows.
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

Inputs = tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]
Forward = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]], Any]


def default_shapes(config: Config) -> tuple[list[int], list[int]]:
    """(rows, widths) for this run: the command line's, else the device's defaults."""
    rows, widths = (GPU_ROWS, GPU_WIDTHS) if config.on_cuda else (CPU_ROWS, CPU_WIDTHS)
    if config.quick:  # the smallest shape: enough to prove the harness, not to judge a kernel
        rows, widths = rows[:1], widths[:1]
    return list(config.rows or rows), list(config.widths or widths)


def _fused(op: str) -> bool:
    return op.startswith("add_") or op.startswith("dropout_add_")


def _dropout(op: str) -> bool:
    return op.startswith("dropout_add_")


def _has_bias(op: str) -> bool:
    return op.endswith("layer_norm")


# ----------------------------------------------------------------------------- implementations

def eager_forward(op: str, width: int) -> Forward:
    """The plain PyTorch a user would write; also what torch.compile is given."""
    shape = (width,)
    if op == "layer_norm":
        return lambda x, r, w, b: F.layer_norm(x, shape, w, b, EPS)
    if op == "rms_norm":
        return lambda x, r, w, b: F.rms_norm(x, shape, w, EPS)
    if op == "add_layer_norm":
        def add_layer_norm(x, r, w, b):
            s = x + r
            return F.layer_norm(s, shape, w, b, EPS), s
        return add_layer_norm
    if op == "add_rms_norm":
        def add_rms_norm(x, r, w, b):
            s = x + r
            return F.rms_norm(s, shape, w, EPS), s
        return add_rms_norm
    if op == "dropout_add_layer_norm":
        def dropout_add_layer_norm(x, r, w, b):
            s = F.dropout(x, DROPOUT_P) + r
            return F.layer_norm(s, shape, w, b, EPS), s
        return dropout_add_layer_norm
    if op == "dropout_add_rms_norm":
        def dropout_add_rms_norm(x, r, w, b):
            s = F.dropout(x, DROPOUT_P) + r
            return F.rms_norm(s, shape, w, EPS), s
        return dropout_add_rms_norm
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def fastlm_forward(op: str, width: int, backend: str) -> Forward:
    import fastlm

    shape = (width,)
    calls = {
        "layer_norm": lambda x, r, w, b: fastlm.layer_norm(x, shape, w, b, EPS),
        "rms_norm": lambda x, r, w, b: fastlm.rms_norm(x, shape, w, EPS),
        "add_layer_norm": lambda x, r, w, b: fastlm.add_layer_norm(x, r, shape, w, b, EPS, return_residual=True),
        "add_rms_norm": lambda x, r, w, b: fastlm.add_rms_norm(x, r, shape, w, EPS, return_residual=True),
        "dropout_add_layer_norm": lambda x, r, w, b: fastlm.add_layer_norm(x, r, shape, w, b, EPS, return_residual=True,
                                                                           dropout_p=DROPOUT_P),
        "dropout_add_rms_norm": lambda x, r, w, b: fastlm.add_rms_norm(x, r, shape, w, EPS, return_residual=True,
                                                                       dropout_p=DROPOUT_P),
    }
    call = calls[op]

    def forward(x, r, w, b):
        # The backward runs on the backend recorded at the forward, so scoping the
        # forward is enough for all three modes.
        with fastlm.use_backend(backend):
            return call(x, r, w, b)
    return forward


def implementations(config: Config, harness: Harness) -> list[str]:
    """The implementations this run compares, in table order; notes why others are left out."""
    return standard_implementations(config, harness)


def _forward_for(name: str, op: str, width: int, compiled: dict[str, Forward]) -> Forward:
    if name.startswith("fastlm-"):
        return fastlm_forward(op, width, name.split("-", 1)[1])
    if name == EAGER:
        return eager_forward(op, width)
    if name == COMPILE:
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(eager_forward(op, width), dynamic=False)
        return compiled["fn"]
    raise ValueError(f"impl: expected one of {IMPLS}, got {name!r}")


# ----------------------------------------------------------------------------- cases

def make_inputs(op: str, rows: int, width: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).requires_grad_()

    x = leaf(torch.randn(rows, width, device=device))
    r = leaf(torch.randn(rows, width, device=device)) if _fused(op) else None
    w = leaf(1 + 0.1 * torch.randn(width, device=device))
    b = leaf(0.1 * torch.randn(width, device=device)) if _has_bias(op) else None
    return x, r, w, b


def output_grads(op: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients for the forward's outputs: dy, and ds for the residual stream."""
    return tuple(torch.randn_like(x, requires_grad=False) for _ in range(2 if _fused(op) else 1))


def bytes_moved(op: str, mode: str, rows: int, width: int, dtype: torch.dtype) -> int:
    """The least a kernel must read and write, each tensor once.

    fwd reads x (and r) and writes y (and s = x + r); bwd reads x (s), dy (and ds) and writes
    dx (the same values are dr); the weights are read once and their gradients written once.
    The per-row statistics (mean, rstd: 4 bytes a row) are left out. With dropout the forward
    moves the same (the mask is drawn, not read), and the backward writes dx and dr apart
    (dx is dr masked and scaled): one activation more.
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    act = rows * width * elem
    vec = width * elem
    n_params = 2 if _has_bias(op) else 1
    fwd = act * (4 if _fused(op) else 2) + vec * n_params
    bwd = act * ((5 if _dropout(op) else 4) if _fused(op) else 3) + vec * (1 + n_params)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bytes_moved_chain(op: str, mode: str, rows: int, width: int, dtype: torch.dtype) -> int:
    """What the unfused eager chain of a dropout op moves, each op reading its inputs and
    writing its outputs once (torch's dropout keeps a one-byte mask for its backward).

    fwd: dropout reads x, writes x' and the mask (2 activations + mask); the add reads x', r,
    writes s (3); the norm reads s, writes y (2): 7 activations + mask. bwd: the norm's
    backward reads s, dy, writes g (3); autograd adds ds to it (reads 2, writes 1: 3); the add's
    gradient passes to r as is, and dropout's backward reads g and the mask, writes dx (2 +
    mask): 8 activations + mask. Parameters as in bytes_moved.
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    act = rows * width * elem
    mask = rows * width
    vec = width * elem
    n_params = 2 if _has_bias(op) else 1
    fwd = 7 * act + mask + vec * n_params
    bwd = 8 * act + mask + vec * (1 + n_params)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def mode_call(mode: str, forward: Forward, inputs: Inputs, grads: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    """One timed call of ``mode``; returns what the call produced (for the output check)."""
    params = [t for t in inputs if t is not None]

    def outputs():
        out = forward(*inputs)
        return out if isinstance(out, tuple) else (out,)

    if mode == "fwd":
        return outputs
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(outputs(), params, grads)
    if mode == "bwd":
        graph: list[tuple] = []

        def backward():
            if not graph:  # recorded on the first (warm-up) call, so a failure is caught there
                graph.append(outputs())
            return torch.autograd.grad(graph[0], params, grads, retain_graph=True)
        return backward
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def compare(dtype: torch.dtype, values: bool = True) -> Callable[[str, Any, Any], Optional[str]]:
    """An output check for Harness.run_case: a note when an output strays from eager's
    (values=False: shapes and finiteness only, for outputs under different dropout masks)."""
    def check(name: str, out: Any, ref: Any) -> Optional[str]:
        worst = 0.0
        for a, b in zip(out, ref):
            if a.shape != b.shape:
                return f"returned shape {list(a.shape)} where torch-eager returned {list(b.shape)}"
            a, b = a.detach().float(), b.detach().float()
            if not torch.isfinite(a).all():
                return "returned NaN or inf"
            if not values:
                continue
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())
        if worst > _TOLERANCE.get(dtype, 1e-4):
            return f"differs from torch-eager: max |diff| / max |eager| = {worst:.2e}"
        return None
    return check


def run(config: Config, harness: Harness) -> None:
    """Every case of the suite for this run; rows and notes go to ``harness``."""
    rows_list, widths = default_shapes(config)
    impls = implementations(config, harness)
    ops = [op for op in OPS if config.wants("op", op)]
    modes = [mode for mode in MODES if config.wants("mode", mode)]
    check, check_shapes = compare(config.dtype), compare(config.dtype, values=False)
    succeeded: set[str] = set()
    for op in ops:
        for width in widths:
            for rows in rows_list:
                if COMPILE in impls:
                    # Dynamo caps recompilations per function; each shape starts afresh instead.
                    torch._dynamo.reset()
                compiled: dict[str, Forward] = {}
                torch.manual_seed(0)
                inputs = make_inputs(op, rows, width, config.dtype, config.device)
                grads = output_grads(op, inputs[0])
                for mode in modes:
                    fns = {name: mode_call(mode, _forward_for(name, op, width, compiled), inputs, grads)
                           for name in impls}
                    meta = {"op": op, "mode": mode, "rows": rows, "width": width,
                            "dtype": dtype_name(config.dtype)}
                    if _dropout(op):
                        meta["chain_bytes"] = bytes_moved_chain(op, mode, rows, width, config.dtype)
                    done = harness.run_case(meta, fns, bytes_moved(op, mode, rows, width, config.dtype),
                                            check_shapes if _dropout(op) else check)
                    succeeded |= {row["impl"] for row in done}
                    best = min(done, key=lambda row: row["ms"]) if done else None
                    print(f"norm: {op} {mode} {rows}x{width}: " +
                          (f"fastest {best['impl']} {best['ms']:.4g} ms" if best else "nothing ran"),
                          file=sys.stderr)
                    del fns
                del inputs, grads, compiled
                for name in [n for n in impls if n not in succeeded]:
                    # Failing every mode of the first shape points at the setup (no compiler,
                    # no kernel), not the shape: more shapes would only repeat the note.
                    impls.remove(name)
                    harness.note(f"{name} left out of the remaining cases: it failed every mode of its first")
