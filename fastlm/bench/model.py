"""The "model" benchmark suite: whole training steps of GPT-2, fastlm against plain PyTorch.

A step is what a training loop does: zero the gradients, forward with labels to the loss,
backward, one AdamW step (torch's fused AdamW on CUDA). Weights are float32; on CUDA the
forward runs under bf16 autocast (mixed precision, as nanoGPT and llm.c train), on CPU in
float32. Implementations (each where it can run):

    fastlm-triton     fastlm.models.GPT on the Triton kernels (CUDA only: the interpreter is not timed)
    fastlm-torch      fastlm.models.GPT on the reference backend (CPU by default; --impls to force on CUDA)
    torch-eager       the same architecture in plain PyTorch (PlainGPT below: nn.Linear,
                      nn.LayerNorm, F.scaled_dot_product_attention, the full logits and F.cross_entropy)
    torch-compile     torch.compile of PlainGPT
    hf-gpt2           transformers' GPT2LMHeadModel (sdpa attention), when transformers is installed
    hf-gpt2-fastlm    the same model after fastlm.integrations.transformers.apply

Every implementation starts from the same weights (the Hugging Face model's, converted by
GPT.from_transformers, when transformers is installed) and trains on the same batch, so
their losses after the warm-up steps agree; a row whose loss differs from the eager one by
more than the dtype allows gets a note.

Figures: tokens/s over wall-clock time (synchronised; the host's Python overhead counts, as it
does in training), model TFLOP/s by nanoGPT's count (6 N + 12 n_layer d_model T per token,
N the parameters without the position embeddings) and its fraction of the measured bf16
matmul rate (the model FLOPs utilisation), and the peak memory of a step above what the
weights, gradients and optimizer state already hold. In the table "rows" is the batch,
"width" the sequence length.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .runner import COMPILE, EAGER, Config, Harness, MiB, dtype_name, standard_implementations

# name -> (n_layer, d_model, n_head); GPT-2's vocabulary padded to a multiple of 64 as nanoGPT does.
GPU_MODELS = {"gpt2-124m": (12, 768, 12), "gpt2-350m": (24, 1024, 16)}
GPU_BATCH = {"gpt2-124m": 16, "gpt2-350m": 8}
GPU_VOCAB, GPU_SEQLEN = 50304, 1024
CPU_MODELS = {"gpt-tiny": (2, 64, 4)}
CPU_VOCAB, CPU_SEQLEN, CPU_BATCH = 256, 64, 2
HF, HF_FASTLM = "hf-gpt2", "hf-gpt2-fastlm"


# ----------------------------------------------------------------------------- plain PyTorch twin

class PlainGPT(torch.nn.Module):
    """fastlm.models.GPT's default architecture (GPT-2) written as a PyTorch user writes it,
    with the same parameter names, so ``load_state_dict(gpt.state_dict())`` gives the same
    model. Dropout is left out (the benchmark trains without it)."""

    def __init__(self, vocab_size: int, max_seq_len: int, n_layer: int, d_model: int, n_head: int,
                 eps: float = 1e-5):
        super().__init__()
        self.n_head = n_head
        self.wte = torch.nn.Embedding(vocab_size, d_model)
        self.wpe = torch.nn.Embedding(max_seq_len, d_model)
        self.blocks = torch.nn.ModuleList()
        for _ in range(n_layer):
            blk = torch.nn.Module()
            blk.norm1 = torch.nn.LayerNorm(d_model, eps=eps)
            blk.attn = torch.nn.Module()
            blk.attn.qkv = torch.nn.Linear(d_model, 3 * d_model)
            blk.attn.proj = torch.nn.Linear(d_model, d_model)
            blk.norm2 = torch.nn.LayerNorm(d_model, eps=eps)
            blk.mlp = torch.nn.Module()
            blk.mlp.fc_in = torch.nn.Linear(d_model, 4 * d_model)
            blk.mlp.fc_out = torch.nn.Linear(4 * d_model, d_model)
            self.blocks.append(blk)
        self.norm_f = torch.nn.LayerNorm(d_model, eps=eps)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        for blk in self.blocks:
            q, k, v = blk.attn.qkv(blk.norm1(x)).view(B, T, 3, self.n_head, -1).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
            x = x + blk.attn.proj(a.transpose(1, 2).reshape(B, T, -1))
            x = x + blk.mlp.fc_out(F.gelu(blk.mlp.fc_in(blk.norm2(x)), approximate="tanh"))
        logits = F.linear(self.norm_f(x), self.wte.weight)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def model_flops_per_token(n_params_no_pos: int, n_layer: int, d_model: int, seqlen: int) -> float:
    """nanoGPT's (and PaLM's) count: 6 flops per parameter per token for the matmuls forward
    and backward, plus the attention scores and their use, 12 n_layer d_model T."""
    return 6.0 * n_params_no_pos + 12.0 * n_layer * d_model * seqlen


# ----------------------------------------------------------------------------- what runs

def implementations(config: Config, harness: Harness) -> list[str]:
    chosen = standard_implementations(config, harness, backends=("triton",), missing={
        "cuda": "the CUDA C++ backend has no matmul (linear, feed_forward) kernels, so a whole model cannot run on "
                "it alone"})
    # The reference backend on a GPU is only asked for by name: a model of it is slow to no purpose.
    if config.on_cuda and "fastlm-torch" in chosen and not (config.impls and "fastlm-torch" in config.impls):
        chosen.remove("fastlm-torch")
    for name in (HF, HF_FASTLM):
        if not config.wants("impl", name):
            continue
        problem = _hf_problem(name)
        if problem:
            harness.note(f"{name} left out: {problem}")
        else:
            chosen.append(name)
    return chosen


def _hf_problem(name: str) -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except Exception as exc:  # not installed, or broken against this torch
        return f"transformers is not importable ({type(exc).__name__}: {exc})"
    return None


def shapes(config: Config) -> list[tuple[str, int, int]]:
    """(model name, batch, seqlen); --rows picks batch sizes, --widths sequence lengths."""
    if config.on_cuda:
        base = [(name, GPU_BATCH[name], GPU_SEQLEN) for name in GPU_MODELS]
    else:
        base = [(name, CPU_BATCH, CPU_SEQLEN) for name in CPU_MODELS]
    if config.rows or config.widths:
        base = [(n, b, t) for n, b0, t0 in base for b in (config.rows or [b0]) for t in (config.widths or [t0])]
    base = [s for s in base if config.wants("op", s[0])]
    return base[:1] if config.quick else base


def _models(name: str, seqlen: int, config: Config, impls: list[str]) -> dict[str, torch.nn.Module]:
    """One model per implementation, all with the same weights (the Hugging Face model's,
    converted by GPT.from_transformers, when transformers is installed)."""
    from fastlm.models import GPT, GPTConfig

    n_layer, d_model, n_head = (GPU_MODELS if config.on_cuda else CPU_MODELS)[name]
    vocab = GPU_VOCAB if config.on_cuda else CPU_VOCAB
    torch.manual_seed(0)
    # With transformers, every model starts from the Hugging Face model's weights.
    if _hf_problem(HF) is None:
        import transformers
        hf_config = transformers.GPT2Config(vocab_size=vocab, n_positions=seqlen, n_embd=d_model, n_layer=n_layer,
                                            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = transformers.GPT2LMHeadModel(hf_config)
        hf.config._attn_implementation = "sdpa"
    else:
        hf = None
    if hf is not None:
        gpt = GPT.from_transformers(hf)
    else:
        gpt = GPT(GPTConfig(vocab_size=vocab, max_seq_len=seqlen, n_layer=n_layer, n_head=n_head, d_model=d_model))
    models: dict[str, torch.nn.Module] = {}
    for impl in impls:
        if impl.startswith("fastlm-"):
            models[impl] = copy.deepcopy(gpt)
        elif impl in (EAGER, COMPILE):
            plain = PlainGPT(vocab, seqlen, n_layer, d_model, n_head)
            plain.load_state_dict(gpt.state_dict(), strict=True)
            models[impl] = plain
        elif impl == HF:
            models[impl] = copy.deepcopy(hf)
        elif impl == HF_FASTLM:
            from fastlm.integrations import transformers as integration
            m = copy.deepcopy(hf)
            integration.apply(m)
            models[impl] = m
    return {k: m.to(config.device).train() for k, m in models.items()}


def _step_fn(impl: str, model: torch.nn.Module, ids: torch.Tensor, config: Config) -> Callable[[], torch.Tensor]:
    """One training step; returns the loss (detached)."""
    import fastlm

    fused = config.on_cuda
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    autocast = config.dtype != torch.float32
    forward: Callable[[], torch.Tensor]
    if impl.startswith("fastlm-"):
        backend = impl.split("-", 1)[1]

        def forward():
            with fastlm.use_backend(backend):
                return model(ids, labels=ids)["loss"]
    elif impl == COMPILE:
        compiled = torch.compile(model)
        forward = lambda: compiled(ids, ids)  # noqa: E731
    elif impl == EAGER:
        forward = lambda: model(ids, ids)  # noqa: E731
    else:  # Hugging Face
        forward = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(config.device.type, dtype=config.dtype, enabled=autocast):
            loss = forward()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _sync(config: Config) -> None:
    if config.on_cuda:
        torch.cuda.synchronize(config.device)


def _time_steps(step: Callable[[], Any], config: Config, rounds: int = 5) -> list[float]:
    """ms per step: ``rounds`` times, the wall-clock time of ``reps // rounds`` steps."""
    per = max(1, config.reps // rounds)
    out = []
    for _ in range(rounds):
        _sync(config)
        start = time.perf_counter()
        for _ in range(per):
            step()
        _sync(config)
        out.append((time.perf_counter() - start) * 1e3 / per)
    return out


def _peak_step_mib(step: Callable[[], Any], config: Config) -> Optional[float]:
    if not config.on_cuda:
        return None
    _sync(config)
    torch.cuda.reset_peak_memory_stats(config.device)
    base = torch.cuda.memory_allocated(config.device)
    step()
    _sync(config)
    return (torch.cuda.max_memory_allocated(config.device) - base) / MiB


def run(config: Config, harness: Harness) -> None:
    impls = implementations(config, harness)
    peak = harness.ceilings.get("matmul_tflops")
    tol = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 3e-2}.get(config.dtype, 1e-3)
    for name, batch, seqlen in shapes(config):
        if COMPILE in impls:
            torch._dynamo.reset()
        models = _models(name, seqlen, config, impls)
        n_layer, d_model, _ = (GPU_MODELS if config.on_cuda else CPU_MODELS)[name]
        vocab = GPU_VOCAB if config.on_cuda else CPU_VOCAB
        ref_model = next(iter(models.values()))
        n_params = sum(p.numel() for p in ref_model.parameters())
        n_pos = seqlen * d_model
        flops_tok = model_flops_per_token(n_params - n_pos, n_layer, d_model, seqlen)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(config.device)
        tokens = batch * seqlen
        label = f"{name} B={batch} T={seqlen}"
        losses: dict[str, float] = {}
        rows = []
        for impl in impls:
            step = _step_fn(impl, models[impl], ids, config)
            try:
                for _ in range(max(2, config.warmup)):
                    loss = step()
                _sync(config)
            except Exception as exc:  # one failing implementation must not sink the run
                harness.note(f"{label}: {impl} failed, left out: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
                models[impl] = None
                continue
            losses[impl] = float(loss)
            mem = _peak_step_mib(step, config)
            times = _time_steps(step, config)
            ms = statistics.median(times)
            tflops = flops_tok * tokens / (ms * 1e-3) / 1e12
            rows.append({"op": name, "mode": "train step", "impl": impl, "rows": batch, "width": seqlen,
                         "hidden": d_model, "dtype": dtype_name(config.dtype), "params": n_params, "ms": ms,
                         "ms_min": min(times), "reps": len(times), "tokens_per_s": tokens / (ms * 1e-3),
                         "tflops": tflops, "frac_matmul": tflops / peak if peak else None, "peak_mib": mem,
                         "loss_after_warmup": losses[impl]})
            models[impl] = None  # free its weights and optimizer state before the next one
            if config.on_cuda:
                torch.cuda.empty_cache()
            print(f"model: {label} {impl}: {ms:.1f} ms/step", file=sys.stderr)
        base = {r["impl"]: r["ms"] for r in rows}
        for r in rows:
            r["speedup_vs_eager"] = base[EAGER] / r["ms"] if EAGER in base else None
            r["speedup_vs_compile"] = base[COMPILE] / r["ms"] if COMPILE in base else None
        # The same weights and batch: after the same warm-up steps the losses agree.
        for impl, value in losses.items():
            if not math.isfinite(value):
                harness.note(f"{label}: {impl} gave a non-finite loss")
            elif impl != EAGER and EAGER in losses and abs(value - losses[EAGER]) > tol * abs(losses[EAGER]):
                harness.note(f"{label}: {impl}'s loss after warm-up {value:.5f} differs from {EAGER}'s "
                             f"{losses[EAGER]:.5f}")
        harness.rows.extend(rows)
        del models
