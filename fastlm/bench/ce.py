"""Benchmark suites for the loss: "ce" (cross_entropy on logits) and "lce" (the fused
linear_cross_entropy against the plain lm-head matmul + loss).

Implementations (each where it can run):

    fastlm-triton, fastlm-cuda   fastlm's kernels (CUDA only; the interpreter is not timed)
    fastlm-torch                 fastlm's reference backend
    torch-eager                  what a user writes: F.cross_entropy(logits.float(), target)
                                 ("lce": F.cross_entropy(F.linear(x, w).float(), target))
    torch-compile                torch.compile of the eager function
    liger                        Liger-Kernel's cross-entropy / fused linear cross-entropy,
                                 when liger_kernel is installed (imported only then)

Targets are class indices, reduction "mean". "ce" sets about 5% of them to ignore_index and
reports GB/s counting one read of the logits (fwd) and one read plus one write of their
gradient (bwd), as the issue counts it. "lce" times each case once per fraction in its ignored
setting (--ignored; default 0 and 0.85, the share of prompt tokens in a fine-tuning batch
whose loss is masked): exactly that fraction of the targets, at random positions drawn from a
fixed seed (the larger fraction's positions include the smaller's), is ignore_index. It
reports each row's time over the time of the fraction-0 row of the same implementation,
shape and mode (below 1: the implementation skips work on ignored rows), TFLOP/s counting the
matmul flops of the counted rows only (2 N_counted H V for the logits, 3x that fwd+bwd: the
work an implementation that skips ignored rows cannot avoid; one that computes every row
shows it as a lower rate), and the peak memory above the inputs, forward plus backward.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .runner import COMPILE, EAGER, Config, Harness, dtype_name, relative_check, standard_implementations

IGNORE_FRACTION = 0.05
LCE_IGNORED = (0.0, 0.85)  # the lce suite's default fractions of ignored targets
MODES = ("fwd", "bwd", "fwd+bwd")
# (rows, vocab): real vocabularies (Llama 2, GPT-2, Llama 3, Gemma) at real token counts.
GPU_CE = [(4096, 32000), (4096, 50257), (4096, 128256), (16384, 128256), (4096, 256000)]
CPU_CE = [(128, 1000), (256, 4096)]
# (tokens, hidden, vocab): the memory case, its speed case, and a smaller vocabulary.
GPU_LCE = [(8192, 4096, 128256), (32768, 4096, 128256), (8192, 4096, 32000)]
CPU_LCE = [(256, 64, 1000), (2048, 128, 8000)]  # (the second large enough to take the chunked path)


def _liger(kind: str) -> Optional[Callable]:
    try:
        if kind == "ce":
            from liger_kernel.transformers import LigerCrossEntropyLoss
            loss = LigerCrossEntropyLoss()
            return lambda logits, t: loss(logits, t)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, t: loss(w, x, t)
    except Exception:  # not installed, or an incompatible version
        return None


def implementations(config: Config, harness: Harness, kind: str) -> list[str]:
    chosen = standard_implementations(config, harness)
    if config.wants("impl", "liger"):
        if _liger(kind) is not None and config.on_cuda:
            chosen.append("liger")
        else:
            harness.note("liger left out: liger_kernel is not installed (or not on CUDA)")
    return chosen


def _targets(rows: int, vocab: int, device) -> torch.Tensor:
    t = torch.randint(0, vocab, (rows,), device=device)
    t[torch.rand(rows, device=device) < IGNORE_FRACTION] = -100
    return t


def ignored_targets(rows: int, vocab: int, fraction: float, device, seed: int = 0) -> torch.Tensor:
    """Class targets with exactly round(fraction * rows) of them ignore_index, at random positions.
    The same seed gives the same classes and the same order of positions for every fraction, so
    rows differ only in which targets are ignored, and a larger fraction ignores a superset."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[torch.randperm(rows, generator=g)[:round(fraction * rows)]] = -100
    return t.to(device)


def _call(mode: str, forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], Any]:
    if mode == "fwd":
        return lambda: (forward(),)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), params)
    graph: list[torch.Tensor] = []

    def backward():
        if not graph:
            graph.append(forward())
        return torch.autograd.grad(graph[0], params, retain_graph=True)
    return backward


def _check(dtype: torch.dtype) -> Callable[[str, Any, Any], Optional[str]]:
    return relative_check(dtype, {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2})


def ce_bytes(mode: str, rows: int, vocab: int, dtype: torch.dtype) -> int:
    """One read of the logits forward; one read and one write of them backward (targets and
    per-row values, a few bytes a row, are left out)."""
    logits = rows * vocab * torch.empty(0, dtype=dtype).element_size()
    return {"fwd": logits, "bwd": 2 * logits, "fwd+bwd": 3 * logits}[mode]


def lce_flops(mode: str, tokens: int, hidden: int, vocab: int) -> float:
    """The matmuls: logits 2 N H V; the backward's dx and dW another 4 N H V."""
    logits = 2.0 * tokens * hidden * vocab
    return {"fwd": logits, "bwd": 2 * logits, "fwd+bwd": 3 * logits}[mode]


def _ce_forward(name: str, compiled: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import fastlm

    def eager(logits, t):
        return F.cross_entropy(logits.float(), t)

    if name.startswith("fastlm-"):
        backend = name.split("-", 1)[1]

        def ours(logits, t):
            with fastlm.use_backend(backend):
                return fastlm.cross_entropy(logits, t)
        return ours
    if name == EAGER:
        return eager
    if name == COMPILE:
        compiled.setdefault("fn", torch.compile(eager, dynamic=False))
        return compiled["fn"]
    return _liger("ce")


def _lce_forward(name: str, compiled: dict) -> Callable:
    import fastlm

    def eager(x, w, t):
        return F.cross_entropy(F.linear(x, w).float(), t)

    if name.startswith("fastlm-"):
        backend = name.split("-", 1)[1]

        def ours(x, w, t):
            with fastlm.use_backend(backend):
                return fastlm.linear_cross_entropy(x, w, t)
        return ours
    if name == EAGER:
        return eager
    if name == COMPILE:
        compiled.setdefault("fn", torch.compile(eager, dynamic=False))
        return compiled["fn"]
    return _liger("lce")


def _shapes(config: Config, gpu: list, cpu: list) -> list:
    shapes = gpu if config.on_cuda else cpu
    if config.quick:
        shapes = shapes[:1]
    if config.rows or config.widths:  # --rows and --widths pick tokens and vocabularies
        base = shapes[0]
        rows = config.rows or [base[0]]
        widths = config.widths or [base[-1]]
        shapes = [(r, *base[1:-1], w) for r in rows for w in widths]
    return shapes


def run(config: Config, harness: Harness) -> None:
    """The "ce" suite."""
    impls = implementations(config, harness, "ce")
    modes = [m for m in MODES if config.wants("mode", m)]
    check = _check(config.dtype)
    for rows, vocab in _shapes(config, GPU_CE, CPU_CE):
        if COMPILE in impls:
            torch._dynamo.reset()
        compiled: dict = {}
        torch.manual_seed(0)
        logits = torch.randn(rows, vocab, device=config.device).to(config.dtype).requires_grad_()
        t = _targets(rows, vocab, config.device)
        for mode in modes:
            fns = {name: _call(mode, (lambda f: lambda: f(logits, t))(_ce_forward(name, compiled)), [logits])
                   for name in impls}
            meta = {"op": "cross_entropy", "mode": mode, "rows": rows, "width": vocab,
                    "dtype": dtype_name(config.dtype)}
            done = harness.run_case(meta, fns, ce_bytes(mode, rows, vocab, config.dtype), check)
            print(f"ce: {mode} {rows}x{vocab}: {len(done)} implementations timed", file=sys.stderr)
        del logits, t, compiled


def run_lce(config: Config, harness: Harness) -> None:
    """The "lce" suite: time, TFLOP/s and peak memory of the whole lm-head + loss, per fraction
    of ignored targets, with each row's time over the fraction-0 row's."""
    impls = implementations(config, harness, "lce")
    modes = [m for m in ("fwd", "fwd+bwd") if config.wants("mode", m)]
    fractions = list(dict.fromkeys(config.ignored if config.ignored is not None else LCE_IGNORED))
    if 0.0 not in fractions:
        harness.note("lce: 0 is not among the ignored fractions, so no row has a time ratio to the fraction-0 row")
    if any(f > 0 for f in fractions):
        harness.note("lce: TFLOP/s counts the flops of the counted rows only (2 N_counted H V forward, 3x that "
                     "forward+backward); ms / ms at 0% ignored compares each row with the same implementation, "
                     "shape and mode with no target ignored")
    check = _check(config.dtype)
    peak = harness.ceilings.get("matmul_tflops")
    for tokens, hidden, vocab in _shapes(config, GPU_LCE, CPU_LCE):
        if COMPILE in impls:
            torch._dynamo.reset()
        compiled: dict = {}
        torch.manual_seed(0)
        x = torch.randn(tokens, hidden, device=config.device).to(config.dtype).requires_grad_()
        w = (torch.randn(vocab, hidden, device=config.device) / hidden ** 0.5).to(config.dtype).requires_grad_()
        shape_rows = []
        for mode in modes:
            for fraction in fractions:
                t = ignored_targets(tokens, vocab, fraction, config.device)
                counted = int((t != -100).sum())
                fns = {name: _call(mode, (lambda f, t: lambda: f(x, w, t))(_lce_forward(name, compiled), t), [x, w])
                       for name in impls}
                meta = {"op": "linear_cross_entropy", "mode": mode, "rows": tokens, "width": vocab, "hidden": hidden,
                        "dtype": dtype_name(config.dtype), "ignored": fraction, "counted_rows": counted}
                elem = torch.empty(0, dtype=config.dtype).element_size()
                nbytes = (tokens * hidden + vocab * hidden) * elem * (1 if mode == "fwd" else 2)
                done = harness.run_case(meta, fns, nbytes, check)
                flops = lce_flops(mode, counted, hidden, vocab)
                for row in done:
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    row["frac_matmul"] = row["tflops"] / peak if peak else None
                shape_rows += done
                print(f"lce: {mode} {tokens}x{hidden}x{vocab}, {fraction:.0%} ignored: {len(done)} implementations "
                      f"timed", file=sys.stderr)
        base = {(r["impl"], r["mode"]): r["ms"] for r in shape_rows if r["ignored"] == 0.0}
        for row in shape_rows:
            ms0 = base.get((row["impl"], row["mode"]))
            row["ms_vs_ignored0"] = row["ms"] / ms0 if ms0 else None
        del x, w, compiled
