"""The "distill" benchmark suite: fastlm's distillation losses against what a user writes in torch.

Ops (--ops picks among them) and their torch counterparts (torch-eager; torch-compile compiles it):

    kl_div       fastlm.kl_div(x, p, reduction="batchmean") vs F.kl_div(x, p, reduction="batchmean"):
                 x the student's log_softmax, p the teacher's softmax, both (rows, vocab)
    jsd          fastlm.jsd(s, t, labels) vs eager_jsd below: the generalised JSD (beta = 0.5) of
                 fastlm/reference/distill.py's docstring written as TRL's GKD loss writes it (log M by
                 logaddexp, then F.kl_div twice), in float32, mean over the rows whose label is not
                 ignore_index (about 5% are)
    linear_jsd   fastlm.linear_jsd(x, W, x_t, W_t, labels) vs the unfused chain: F.linear for each model,
                 log_softmax in float32, eager_jsd

Other implementations: fastlm-triton (CUDA only; the interpreter is not timed), fastlm-torch
(fastlm's reference backend; for kl_div that is torch.kl_div itself) and liger (Liger-Kernel's
LigerKLDIVLoss, LigerJSD and LigerFusedLinearJSD, when liger_kernel is installed and on CUDA).

Modes: "fwd" is the loss alone under torch.no_grad() (as an evaluation computes it: nothing is
saved, and fastlm.linear_jsd does not form the gradients it otherwise forms in its forward);
"fwd+bwd" the loss and the gradients with respect to the student's inputs.

Figures. kl_div and jsd are bandwidth-bound: GB/s counts what any implementation must move at the
least, each (rows, vocab) tensor once: fwd reads both inputs (2 R V elements), fwd+bwd also writes
the student's gradient (3 R V; the forward and backward of one call could share their reads).
linear_jsd is matmul-bound: TFLOP/s counts the logits of both models, 2 N V (H + H_t), forward,
plus the student's dx and dW, 4 N H V, backward, over every row (the ~5% ignored included); its
GB/s counts the inputs and weights read once and, fwd+bwd, dx and dW written once. Beside them,
the fraction of the device's measured copy bandwidth or matmul rate, and peak memory (CUDA).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .ce import _shapes, _targets
from .runner import COMPILE, EAGER, Config, Harness, dtype_name, relative_check, standard_implementations

OPS = ("kl_div", "jsd", "linear_jsd")
MODES = ("fwd", "fwd+bwd")
BETA = 0.5
IGNORE_INDEX = -100
# (rows, vocab): Llama 2's and Llama 3's vocabularies at 4k and 16k tokens.
GPU_ROWS = [(4096, 32000), (4096, 128256), (16384, 128256)]
CPU_ROWS = [(256, 4096)]
# (tokens, student hidden, teacher hidden, vocab): a 1B-class student of an 8B-class teacher
# (Llama 3.2 1B / 3.1 8B: 2048 / 4096, vocabulary 128256), equal widths, a 32k vocabulary.
GPU_LINEAR = [(8192, 2048, 4096, 128256), (4096, 4096, 4096, 128256), (16384, 2048, 4096, 32000)]
CPU_LINEAR = [(256, 64, 96, 1000)]


# ----------------------------------------------------------------------------- the torch side

def _up(t: torch.Tensor) -> torch.Tensor:
    """float32, as a careful user upcasts (float64 stays: the tests hold these forms to fastlm's)."""
    return t if t.dtype == torch.float64 else t.float()


def eager_jsd(s: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None, beta: float = BETA,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, of student and
    teacher log-probabilities s, t (Q = exp s, P = exp t), as a user writes it in torch: log M by
    logaddexp, each KL by F.kl_div with log_target; float32; mean over the rows counted by ``label``.
    For 0 < beta < 1 (the two ends are limits: fastlm/reference/distill.py)."""
    s32, t32 = _up(s), _up(t)
    log_m = torch.logaddexp(t32 + math.log(beta), s32 + math.log1p(-beta))
    rows = (beta * F.kl_div(log_m, t32, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(log_m, s32, reduction="none", log_target=True).sum(-1))
    if label is None:
        return rows.mean().to(s.dtype)
    counted = label != ignore_index
    loss = torch.where(counted, rows, 0.0).sum() / counted.sum().clamp_min(1)
    return loss.to(s.dtype)


def eager_linear_jsd(x: torch.Tensor, w: torch.Tensor, xt: torch.Tensor, wt: torch.Tensor,
                     label: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The unfused chain fastlm.linear_jsd replaces: both models' logits, log_softmax, eager_jsd."""
    s = torch.log_softmax(_up(F.linear(x, w)), dim=-1)
    t = torch.log_softmax(_up(F.linear(xt, wt)), dim=-1)
    return eager_jsd(s, t, label).to(x.dtype)


def eager_kl_div(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return F.kl_div(x, p, reduction="batchmean")


EAGER_FORMS = {"kl_div": eager_kl_div, "jsd": eager_jsd, "linear_jsd": eager_linear_jsd}


# ----------------------------------------------------------------------------- implementations

def _liger(op: str) -> Optional[Callable]:
    try:
        if op == "kl_div":
            from liger_kernel.transformers import LigerKLDIVLoss
            kl = LigerKLDIVLoss(reduction="batchmean")
            return lambda x, p: kl(x, p)
        if op == "jsd":
            from liger_kernel.transformers import LigerJSD
            jsd = LigerJSD(beta=BETA, ignore_index=IGNORE_INDEX)
            return lambda s, t, label: jsd(s, t, label)
        from liger_kernel.transformers import LigerFusedLinearJSD
        ljsd = LigerFusedLinearJSD(jsd_beta=BETA, ignore_index=IGNORE_INDEX, temperature=1.0)
        return lambda x, w, xt, wt, label: ljsd(x, w, xt, wt, label)
    except Exception:  # not installed, or an incompatible version
        return None


def implementations(config: Config, harness: Harness, op: str) -> list[str]:
    chosen = standard_implementations(config, harness, backends=("triton",),
                                      missing={"cuda": "there is no CUDA C++ kernel for the distillation losses"})
    if config.wants("impl", "liger"):
        if _liger(op) is not None and config.on_cuda:
            chosen.append("liger")
        else:
            harness.note("liger left out: liger_kernel is not installed (or not on CUDA)")
    return chosen


def _forward(op: str, name: str, compiled: dict) -> Callable:
    import fastlm

    if name.startswith("fastlm-"):
        backend = name.split("-", 1)[1]
        ours = {"kl_div": lambda x, p: fastlm.kl_div(x, p, reduction="batchmean"),
                "jsd": lambda s, t, label: fastlm.jsd(s, t, label, beta=BETA, ignore_index=IGNORE_INDEX),
                "linear_jsd": lambda x, w, xt, wt, label: fastlm.linear_jsd(x, w, xt, wt, label, beta=BETA,
                                                                            ignore_index=IGNORE_INDEX)}[op]

        def run(*args):
            with fastlm.use_backend(backend):
                return ours(*args)
        return run
    if name == EAGER:
        return EAGER_FORMS[op]
    if name == COMPILE:
        compiled.setdefault(op, torch.compile(EAGER_FORMS[op], dynamic=False))
        return compiled[op]
    return _liger(op)


def _call(mode: str, forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], Any]:
    if mode == "fwd":
        def loss_only():
            with torch.no_grad():
                return (forward(),)
        return loss_only
    return lambda: torch.autograd.grad(forward(), params)


def _check(dtype: torch.dtype) -> Callable[[str, Any, Any], Optional[str]]:
    return relative_check(dtype, {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2})


# ----------------------------------------------------------------------------- counts

def rows_bytes(mode: str, rows: int, vocab: int, dtype: torch.dtype) -> int:
    """kl_div and jsd: the two (rows, vocab) inputs read once; fwd+bwd also the student's
    gradient written once (the per-row labels, a few bytes a row, are left out)."""
    one = rows * vocab * torch.empty(0, dtype=dtype).element_size()
    return {"fwd": 2 * one, "fwd+bwd": 3 * one}[mode]


def linear_jsd_flops(mode: str, tokens: int, hidden: int, teacher_hidden: int, vocab: int) -> float:
    """Both models' logits, 2 N V (H + H_t); backward the student's dx and dW, 4 N H V."""
    forward = 2.0 * tokens * vocab * (hidden + teacher_hidden)
    return {"fwd": forward, "fwd+bwd": forward + 4.0 * tokens * hidden * vocab}[mode]


def linear_jsd_bytes(mode: str, tokens: int, hidden: int, teacher_hidden: int, vocab: int,
                     dtype: torch.dtype) -> int:
    """Inputs and weights of both models read once; fwd+bwd also dx and dW written once."""
    elem = torch.empty(0, dtype=dtype).element_size()
    read = (tokens + vocab) * (hidden + teacher_hidden) * elem
    return read if mode == "fwd" else read + (tokens + vocab) * hidden * elem


# ----------------------------------------------------------------------------- the suite

def _logprobs(rows: int, vocab: int, config: Config) -> torch.Tensor:
    """log_softmax of logits with a spread like a trained LM's (scale 2), computed in float32."""
    return torch.log_softmax(2 * torch.randn(rows, vocab, device=config.device), dim=-1)


def _run_rows(config: Config, harness: Harness, ops: list[str], modes: list[str]) -> None:
    check = _check(config.dtype)
    for rows, vocab in _shapes(config, GPU_ROWS, CPU_ROWS):
        for op in ops:
            impls = implementations(config, harness, op)
            if COMPILE in impls:
                torch._dynamo.reset()
            compiled: dict = {}
            torch.manual_seed(0)
            student = _logprobs(rows, vocab, config).to(config.dtype).requires_grad_()
            if op == "kl_div":
                args = (student, _logprobs(rows, vocab, config).exp().to(config.dtype))
            else:
                args = (student, _logprobs(rows, vocab, config).to(config.dtype), _targets(rows, vocab, config.device))
            for mode in modes:
                fns = {name: _call(mode, (lambda f: lambda: f(*args))(_forward(op, name, compiled)), [student])
                       for name in impls}
                meta = {"op": op, "mode": mode, "rows": rows, "width": vocab, "dtype": dtype_name(config.dtype)}
                done = harness.run_case(meta, fns, rows_bytes(mode, rows, vocab, config.dtype), check)
                print(f"distill: {op} {mode} {rows}x{vocab}: {len(done)} implementations timed", file=sys.stderr)
            del student, args, compiled


def _run_linear(config: Config, harness: Harness, modes: list[str]) -> None:
    check = _check(config.dtype)
    peak = harness.ceilings.get("matmul_tflops")
    impls = implementations(config, harness, "linear_jsd")
    for tokens, hidden, teacher_hidden, vocab in _shapes(config, GPU_LINEAR, CPU_LINEAR):
        if COMPILE in impls:
            torch._dynamo.reset()
        compiled: dict = {}
        torch.manual_seed(0)
        dev, dt = config.device, config.dtype
        x = torch.randn(tokens, hidden, device=dev).to(dt).requires_grad_()
        w = (torch.randn(vocab, hidden, device=dev) / hidden ** 0.5).to(dt).requires_grad_()
        xt = torch.randn(tokens, teacher_hidden, device=dev).to(dt)
        wt = (torch.randn(vocab, teacher_hidden, device=dev) / teacher_hidden ** 0.5).to(dt)
        label = _targets(tokens, vocab, dev)
        for mode in modes:
            fns = {name: _call(mode, (lambda f: lambda: f(x, w, xt, wt, label))(_forward("linear_jsd", name, compiled)),
                               [x, w])
                   for name in impls}
            meta = {"op": "linear_jsd", "mode": mode, "rows": tokens, "width": vocab, "hidden": hidden,
                    "teacher_hidden": teacher_hidden, "dtype": dtype_name(dt)}
            done = harness.run_case(meta, fns, linear_jsd_bytes(mode, tokens, hidden, teacher_hidden, vocab, dt),
                                    check)
            flops = linear_jsd_flops(mode, tokens, hidden, teacher_hidden, vocab)
            for row in done:
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                row["frac_matmul"] = row["tflops"] / peak if peak else None
            print(f"distill: linear_jsd {mode} {tokens}x{hidden}/{teacher_hidden}x{vocab}: "
                  f"{len(done)} implementations timed", file=sys.stderr)
        del x, w, xt, wt, label, compiled


def run(config: Config, harness: Harness) -> None:
    """The "distill" suite: kl_div and jsd (GB/s), then linear_jsd (TFLOP/s, peak memory)."""
    modes = [m for m in MODES if config.wants("mode", m)]
    if config.modes and "bwd" in config.modes:
        harness.note('distill has no "bwd" mode: it times "fwd" (no grad) and "fwd+bwd"')
    row_ops = [op for op in ("kl_div", "jsd") if config.wants("op", op)]
    if row_ops and modes:
        _run_rows(config, harness, row_ops, modes)
    if config.wants("op", "linear_jsd") and modes:
        _run_linear(config, harness, modes)
