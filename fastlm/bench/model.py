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

On CPU two more cases measure issue 17's end-to-end goal with the model ``fastlm train``
builds by default (the "tiny" GPT preset: 4 layers, d_model 128, 4 heads, the byte
tokenizer's vocabulary, sequences of 128):

    tiny-gpt-train    a training step as ``fastlm train`` takes it (batch 16 x 128 tokens,
                      AdamW, gradient clipping at 1.0, float32 on CPU): training tokens/s
    tiny-gpt-decode   greedy decoding of 64 new tokens after a 16-token prompt, batch 1
                      ("width" is the new tokens; --widths / --rows change them), the prompt's
                      forward included: decoding tokens/s (new tokens per second)

For decoding, fastlm's GPT.generate (temperature 0) keeps a KV cache and attends through
fastlm.flash_attn_with_kvcache; the plain twin decodes like for like with a KV cache written
in place and F.scaled_dot_product_attention (PlainGPT.generate: the prompt in one causal
forward, then one token a step attending to the cache), the same greedy loop; the Hugging
Face rows call model.generate(do_sample=False, use_cache=True), patched and unpatched. The
goals (fastlm at >= 0.95x the twin's tokens/s, the patched HF model at >= 0.95x the unpatched
one) get a note when missed. ``--ops tiny-gpt-train tiny-gpt-decode --threads 1`` runs just
these; the default CPU run (gpt-tiny and both) takes well under a minute.
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
# The end-to-end cases: the model `fastlm train` builds by default (its tiny GPT preset).
TRAIN, DECODE = "tiny-gpt-train", "tiny-gpt-decode"
DECODE_PROMPT, DECODE_NEW, DECODE_BATCH = 16, 64, 1
GOAL = 0.95  # issue 17: fastlm at >= 0.95x the twin's tokens/s, patched HF >= 0.95x unpatched


def train_default_model() -> tuple[int, int, int, int, int, int]:
    """(n_layer, d_model, n_head, vocab, seq_len, batch) of ``fastlm train`` with no options."""
    from fastlm.train.config import PRESETS, TrainOptions
    from fastlm.train.tokenizer import ByteTokenizer

    tiny = PRESETS["gpt"][TrainOptions.preset]
    m, t = tiny["model"], tiny["train"]
    return m["n_layer"], m["d_model"], m["n_head"], ByteTokenizer().vocab_size, t["seq_len"], t["batch_size"]


def model_dims(name: str, config: Config) -> tuple[int, int, int, int]:
    """(n_layer, d_model, n_head, vocab) of a case."""
    if name in (TRAIN, DECODE):
        n_layer, d_model, n_head, vocab, _, _ = train_default_model()
        return n_layer, d_model, n_head, vocab
    n_layer, d_model, n_head = (GPU_MODELS if config.on_cuda else CPU_MODELS)[name]
    return n_layer, d_model, n_head, GPU_VOCAB if config.on_cuda else CPU_VOCAB


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

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache, as a plain PyTorch model does it: per layer a key
        and a value cache (B, heads, L + new, head dim) written in place; the prompt runs in
        one causal forward, then each step feeds the last token, which attends to the whole
        filled cache (one query: no mask). Returns (B, L + new), like GPT.generate."""
        B, L = input_ids.shape
        total = L + max_new_tokens
        head_dim = self.wte.weight.shape[1] // self.n_head
        w = self.wte.weight
        caches = [(w.new_empty(B, self.n_head, total, head_dim), w.new_empty(B, self.n_head, total, head_dim))
                  for _ in self.blocks]
        tokens, step_input, pos = input_ids, input_ids, 0
        for _ in range(max_new_tokens):
            T = step_input.shape[1]
            x = self.wte(step_input) + self.wpe(torch.arange(pos, pos + T, device=step_input.device))
            for blk, (k_cache, v_cache) in zip(self.blocks, caches):
                q, k, v = blk.attn.qkv(blk.norm1(x)).view(B, T, 3, self.n_head, -1).unbind(2)
                k_cache[:, :, pos:pos + T] = k.transpose(1, 2)
                v_cache[:, :, pos:pos + T] = v.transpose(1, 2)
                # The prompt starts at position 0 (causal); a single new token sees every key.
                a = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :pos + T],
                                                   v_cache[:, :, :pos + T], is_causal=T > 1)
                x = x + blk.attn.proj(a.transpose(1, 2).reshape(B, T, -1))
                x = x + blk.mlp.fc_out(F.gelu(blk.mlp.fc_in(blk.norm2(x)), approximate="tanh"))
            logits = F.linear(self.norm_f(x)[:, -1], self.wte.weight)
            pos += T
            nxt = logits.float().argmax(dim=-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
        return tokens


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
    # fastlm train's tiny GPT: on CPU by default, on CUDA when named with --ops.
    if not config.on_cuda or (config.ops and {TRAIN, DECODE} & set(config.ops)):
        *_, seq_len, batch = train_default_model()
        base += [(TRAIN, batch, seq_len), (DECODE, DECODE_BATCH, DECODE_NEW)]
    if config.rows or config.widths:
        base = [(n, b, t) for n, b0, t0 in base for b in (config.rows or [b0]) for t in (config.widths or [t0])]
    base = [s for s in base if config.wants("op", s[0])]
    return base[:1] if config.quick else base


def _models(name: str, seqlen: int, config: Config, impls: list[str]) -> dict[str, torch.nn.Module]:
    """One model per implementation, all with the same weights (the Hugging Face model's,
    converted by GPT.from_transformers, when transformers is installed). ``seqlen``: the
    positions the model must hold (its max_seq_len)."""
    from fastlm.models import GPT, GPTConfig

    n_layer, d_model, n_head, vocab = model_dims(name, config)
    torch.manual_seed(0)
    # With transformers, every model starts from the Hugging Face model's weights.
    if _hf_problem(HF) is None:
        import transformers
        hf_config = transformers.GPT2Config(vocab_size=vocab, n_positions=seqlen, n_embd=d_model, n_layer=n_layer,
                                            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
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


def _step_fn(impl: str, model: torch.nn.Module, ids: torch.Tensor, config: Config,
             clip: float = 0.0) -> Callable[[], torch.Tensor]:
    """One training step; returns the loss (detached). ``clip``: clip the gradient norm to
    this before the optimizer step, as ``fastlm train`` does (0: off)."""
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
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return loss.detach()
    return step


def _decode_fn(impl: str, model: torch.nn.Module, prompt: torch.Tensor, new: int,
               config: Config) -> Callable[[], torch.Tensor]:
    """Greedy decoding of ``new`` tokens after ``prompt``; returns (B, L + new) token ids."""
    import fastlm

    autocast = config.dtype != torch.float32
    if impl.startswith("fastlm-"):
        backend = impl.split("-", 1)[1]

        def generate():
            with fastlm.use_backend(backend):
                return model.generate(prompt, new, temperature=0.0)
    elif impl == EAGER:
        generate = lambda: model.generate(prompt, new)  # noqa: E731
    elif impl == COMPILE:
        raise ValueError("torch.compile of the decoding loop is not measured: each new length would recompile")
    else:  # Hugging Face
        generate = lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new,  # noqa: E731
                                          do_sample=False, use_cache=True, pad_token_id=0)

    def run():
        with torch.no_grad(), torch.autocast(config.device.type, dtype=config.dtype, enabled=autocast):
            return generate()
    return run


def _warm_up(fn: Callable[[], Any], calls: int, config: Config, harness: Harness, label: str,
             impl: str) -> Any:
    """``calls`` untimed calls of ``fn``; its last result, or None (with a note) if it raised:
    one failing implementation must not sink the run."""
    try:
        for _ in range(calls):
            out = fn()
        _sync(config)
        return out
    except Exception as exc:
        harness.note(f"{label}: {impl} failed, left out: {type(exc).__name__}: "
                     f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
        return None


def _sync(config: Config) -> None:
    if config.on_cuda:
        torch.cuda.synchronize(config.device)


def _time_steps(step: Callable[[], Any], config: Config, rounds: int = 5, per: Optional[int] = None) -> list[float]:
    """ms per step: ``rounds`` times, the wall-clock time of ``per`` (default ``reps // rounds``) steps."""
    per = per or max(1, config.reps // rounds)
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


def _goal_notes(harness: Harness, label: str, rows: list[dict[str, Any]]) -> None:
    """Issue 17's end-to-end goals: fastlm's tokens/s at >= GOAL x the plain twin's, and the
    patched Hugging Face model's at >= GOAL x the unpatched one's."""
    rate = {r["impl"]: r["tokens_per_s"] for r in rows}
    pairs = [(impl, EAGER) for impl in rate if impl.startswith("fastlm-")] + [(HF_FASTLM, HF)]
    for ours, theirs in pairs:
        if ours in rate and theirs in rate:
            ratio = rate[ours] / rate[theirs]
            verdict = "meets" if ratio >= GOAL else "misses"
            harness.note(f"{label}: {ours} at {ratio:.2f}x {theirs}'s tokens/s ({verdict} the {GOAL}x goal)")


def run_decode(config: Config, harness: Harness, impls: list[str], batch: int, new: int) -> None:
    """tiny-gpt-decode: greedy decoding tokens/s of every implementation, same weights and prompt."""
    prompt_len = DECODE_PROMPT
    _, d_model, _, vocab = model_dims(DECODE, config)
    impls = [i for i in impls if i != COMPILE]
    models = {k: m.eval() for k, m in _models(DECODE, prompt_len + new, config, impls).items()}
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(config.device)
    label = f"{DECODE} B={batch} prompt={prompt_len} new={new}"
    outputs: dict[str, torch.Tensor] = {}
    rows = []
    for impl in impls:
        decode = _decode_fn(impl, models[impl], prompt, new, config)
        tokens = _warm_up(decode, max(1, config.warmup), config, harness, label, impl)
        if tokens is None:
            continue
        outputs[impl] = tokens.cpu()
        # Each call is one whole generation: one call a round, five rounds (--reps 1 to 4: fewer).
        times = _time_steps(decode, config, rounds=min(5, config.reps), per=1)
        ms = statistics.median(times)
        rows.append({"op": DECODE, "mode": "greedy decode", "impl": impl, "rows": batch, "width": new,
                     "prompt": prompt_len, "hidden": d_model, "dtype": dtype_name(config.dtype), "ms": ms,
                     "ms_min": min(times), "reps": len(times), "ms_per_token": ms / new,
                     "tokens_per_s": batch * new / (ms * 1e-3)})
        print(f"model: {label} {impl}: {ms:.1f} ms per generation", file=sys.stderr)
    base = {r["impl"]: r["ms"] for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = base[EAGER] / r["ms"] if EAGER in base else None
    for impl, tokens in outputs.items():
        if tokens.shape != (batch, prompt_len + new):
            harness.note(f"{label}: {impl} returned {list(tokens.shape)} token ids, not {[batch, prompt_len + new]}")
        elif impl != EAGER and EAGER in outputs and not torch.equal(tokens, outputs[EAGER]):
            # Same weights, greedy: a difference is a near-tie flipped by rounding, or a bug.
            first = int((tokens != outputs[EAGER]).any(0).nonzero()[0]) - prompt_len
            harness.note(f"{label}: {impl}'s greedy tokens differ from {EAGER}'s from new token {first} on")
    _goal_notes(harness, label, rows)
    harness.rows.extend(rows)


def run(config: Config, harness: Harness) -> None:
    impls = implementations(config, harness)
    peak = harness.ceilings.get("matmul_tflops")
    tol = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 3e-2}.get(config.dtype, 1e-3)
    for name, batch, seqlen in shapes(config):
        if name == DECODE:
            run_decode(config, harness, impls, batch, seqlen)
            continue
        if COMPILE in impls:
            torch._dynamo.reset()
        models = _models(name, seqlen, config, impls)
        n_layer, d_model, _, vocab = model_dims(name, config)
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
            step = _step_fn(impl, models[impl], ids, config, clip=1.0 if name == TRAIN else 0.0)
            loss = _warm_up(step, max(2, config.warmup), config, harness, label, impl)
            if loss is None:
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
        if name == TRAIN or not config.on_cuda:  # issue 17's goals are for the CPU path
            _goal_notes(harness, label, rows)
        harness.rows.extend(rows)
        del models
