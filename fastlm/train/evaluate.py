"""Evaluation (loss, perplexity, bits per byte, token accuracy) and generation, for every
model kind, and opening a checkpoint for either (the `fastlm eval` and `fastlm generate`
commands)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .config import TrainOptions, model_classes
from .data import TokenStream, eval_window_indices, windows
from .metrics import summarize
from .objectives import OBJECTIVES, make_batch
from .tokenizer import Tokenizer, load_tokenizer

EVAL_POSITION_BASE = 1 << 40  # sample numbers for evaluation's masks/spans, apart from training's


def build_model(kind: str, config) -> torch.nn.Module:
    model_cls, _ = model_classes(kind)
    return model_cls(config)


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, kind: str, stream: TokenStream, tokenizer: Tokenizer, options: TrainOptions, device,
             max_tokens: int, batch_size: Optional[int] = None, rank: int = 0, world: int = 1) -> dict:
    """Mean loss over evenly spaced windows of the stream (all when max_tokens <= 0); each rank
    takes every world-th window. Bits per byte for the causal objectives; "accuracy", the
    fraction of labelled tokens whose argmax is the label, for models that return it."""
    L = options.seq_len
    index = eval_window_indices(len(stream), L, max_tokens)
    if world > 1 and len(index) >= world:  # equal shares: FSDP's forwards are collectives
        index = index[:len(index) - len(index) % world]
    mine = index[rank::world]
    B = batch_size or options.batch_size
    was_training = model.training
    model.eval()
    total, correct, count, has_accuracy = 0.0, 0.0, 0, True
    for i in range(0, len(mine), B):
        idx = mine[i:i + B]
        rows = windows(stream.tokens, idx, L)
        batch, n = make_batch(kind, rows, idx + EVAL_POSITION_BASE, tokenizer, options)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, options.amp):
            out = model(**batch)
        accuracy = out.get("accuracy")
        has_accuracy = has_accuracy and accuracy is not None
        if has_accuracy:  # one host read for both
            loss, accuracy = torch.stack([out["loss"].float(), accuracy.float()]).tolist()
            correct += accuracy * n
        else:
            loss = float(out["loss"])
        total += loss * n
        count += n
    model.train(was_training)
    total, correct, count = _all_reduce_sum([total, correct, float(count)], device)
    result = _result(kind, total, count, stream)
    if has_accuracy:
        result["accuracy"] = correct / count
    return result


def evaluate_ngram(lm, stream: TokenStream, options: TrainOptions, max_tokens: int) -> dict:
    """The same tokens as the neural models score: each window's tokens after its first, each
    given what precedes it inside the window (the first token has no context there, and the
    causal models do not predict it either)."""
    total, count = 0.0, 0
    for i in eval_window_indices(len(stream), options.seq_len, max_tokens):
        lp = lm.token_log_probs(windows(stream.tokens, np.array([i]), options.seq_len)[0], bos=False)[1:]
        total += float(-lp.sum())
        count += int(len(lp))
    return _result("ngram", total, count, stream)


def _result(kind: str, total: float, count: float, stream: TokenStream) -> dict:
    if count <= 0:
        raise ValueError("evaluation saw no tokens")
    tpb = stream.tokens_per_byte if OBJECTIVES[kind] == "causal" else None
    out = summarize(total / count, tpb)
    out["tokens"] = int(count)
    return out


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def generate_text(model, kind: str, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: Optional[int] = 50, top_p: Optional[float] = 0.95, seed: int = 0, device="cpu") -> str:
    """The prompt and what the model writes after it (GPT, LSTM, n-gram), the prompt with its
    sentinel spans filled in (encoder-decoder), or its <mask> tokens filled (BERT)."""
    device = torch.device(device)
    top_k = top_k if top_k and top_k > 0 else None
    top_p = top_p if top_p and 0 < top_p < 1 else None
    ids = tokenizer.encode(prompt, specials=True)
    if kind == "ngram":
        g = _generator("cpu", seed)
        context = ids  # generate() puts the document-start marker (BOS) before it, as in training
        out = [int(t) for t in model.generate(context, max_new_tokens, temperature=temperature, top_k=top_k,
                                              top_p=top_p, generator=g, eos_token_id=tokenizer.eos_id)]
        new = out[len(context):] if out[:len(context)] == context else out
        return prompt + tokenizer.decode(_until(new, tokenizer.eos_id), skip_specials=True)
    was_training = model.training
    model.eval()
    g = _generator(device, seed)
    try:
        if kind in ("gpt", "lstm"):
            return prompt + tokenizer.decode(_causal(model, kind, tokenizer, ids, max_new_tokens, temperature, top_k,
                                                     top_p, g, device), skip_specials=True)
        if kind == "encdec":
            return _fill_spans(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, g, device)
        if kind == "bert":
            return _fill_masks(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, g, device)
    finally:
        model.train(was_training)
    raise ValueError(f"no generation for model kind {kind!r}")


def _until(ids, eos: int) -> list:
    ids = list(ids)
    return ids[:ids.index(eos)] if eos in ids else ids


def _causal(model, kind, tokenizer, ids, max_new, temperature, top_k, top_p, g, device) -> list:
    """New tokens after the prompt (a document starts after eos). A GPT's context is its
    max_seq_len: longer samples slide, keeping the last half of the window as the prompt."""
    context = [tokenizer.eos_id] + ids
    limit = model.config.max_seq_len if kind == "gpt" else None
    new: list[int] = []
    while len(new) < max_new:
        if limit is not None and len(context) >= limit:
            context = context[-(limit // 2):]
        n = max_new - len(new) if limit is None else min(max_new - len(new), limit - len(context))
        x = torch.tensor([context], device=device)
        out = model.generate(x, n, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_token_id=tokenizer.eos_id, generator=g)[0, len(context):].tolist()
        stop = tokenizer.eos_id in out
        out = _until(out, tokenizer.eos_id)
        new += out
        context += out
        if stop or not out:
            break
    return new


def _fill_spans(model, tokenizer, ids, max_new, temperature, top_k, top_p, g, device) -> str:
    sentinels = tokenizer.sentinel_ids
    if not any(t in sentinels for t in ids):
        ids = ids + [sentinels[0]]  # no gap given: ask for what follows the prompt
    max_new = min(max_new, model.config.max_seq_len - 1)
    src = torch.tensor([ids[:model.config.max_seq_len]], device=device)
    out = model.generate(src, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_token_id=tokenizer.eos_id, generator=g)[0, 1:].tolist()
    spans: dict[int, list] = {}
    current = None
    for t in _until(out, tokenizer.eos_id):
        if t in sentinels:
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    filled: list = []
    for t in ids:
        filled.extend(spans.get(t, []) if t in sentinels else [t])
    return tokenizer.decode(filled, skip_specials=True)


def _fill_masks(model, tokenizer, ids, max_new, temperature, top_k, top_p, g, device) -> str:
    from .. import models
    if tokenizer.mask_id not in ids:
        ids = ids + [tokenizer.mask_id] * max(0, min(max_new, model.config.max_seq_len - len(ids)))
    x = torch.tensor([ids[:model.config.max_seq_len]], device=device)
    for j in (x[0] == tokenizer.mask_id).nonzero()[:, 0].tolist():  # left to right, one at a time
        logits = model(x, return_logits=True)["logits"][:, j].float()
        x[0, j] = models.sample(logits, temperature, top_k, top_p, g)[0]
    return tokenizer.decode(x[0].tolist(), skip_specials=True)


@dataclass
class Loaded:
    kind: str
    model: Any
    tokenizer: Tokenizer
    options: TrainOptions
    checkpoint: ckpt_io.Checkpoint
    config: Any = None


def load(path: str, device="cpu") -> Loaded:
    """A checkpoint opened for evaluation or generation: nothing in it is executed."""
    ck = ckpt_io.open_checkpoint(path)
    meta = ck.meta
    try:
        kind = meta["model"]
        options = TrainOptions(**meta["options"])
        tokenizer = load_tokenizer(meta["tokenizer"], ck.directory)
    except (KeyError, TypeError) as e:
        raise ckpt_io.CheckpointError(f"{ck.path(ckpt_io.MANIFEST)}: incomplete manifest ({e})") from e
    if kind == "ngram":
        model_cls, _ = model_classes("ngram")
        try:
            return Loaded(kind, model_cls.load(ck.path("ngram")), tokenizer, options, ck)
        except Exception as e:
            raise ckpt_io.CheckpointError(f"{ck.path('ngram')}: cannot be read ({e})") from e
    _, config_cls = model_classes(kind)
    config = config_cls(**meta["model_config"])
    model = build_model(kind, config)
    ck.load_weights(model)
    return Loaded(kind, model.to(device).eval(), tokenizer, options, ck, config)


def describe(result: dict) -> str:
    text = f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}"
    if "bits_per_byte" in result:
        text += f"  bits/byte {result['bits_per_byte']:.4f}"
    if "accuracy" in result:
        text += f"  accuracy {result['accuracy']:.2%}"
    return text + f"  ({result['tokens']:,} tokens)"


__all__ = ["Loaded", "build_model", "describe", "evaluate", "evaluate_ngram", "generate_text", "load"]
