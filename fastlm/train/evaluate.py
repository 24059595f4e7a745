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


def _type_fits(value, annotation) -> bool:
    ann = str(annotation).replace("typing.", "")
    if value is None:
        return "Optional" in ann or "None" in ann
    if "bool" in ann:
        return isinstance(value, bool)
    if "list" in ann:
        return isinstance(value, list)
    if "int" in ann:
        return isinstance(value, int) and not isinstance(value, bool)
    if "float" in ann:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if "str" in ann:
        return isinstance(value, str)
    return True


def check_run_meta(ck: ckpt_io.Checkpoint) -> None:
    """The training fields of a checkpoint's manifest (beyond what checkpoint.check_manifest
    checks), or a CheckpointError naming the manifest and the field: eval, generate and
    resume build a model and options from them, and a tampered value must not surface as a
    traceback from deep inside."""
    import dataclasses

    from .config import MODELS
    manifest, meta = ck.path(ckpt_io.MANIFEST), ck.meta

    def bad(what: str):
        raise ckpt_io.CheckpointError(f"{manifest}: {what}")

    kind = meta.get("model")
    if kind not in MODELS:
        bad(f"field 'model' must be one of {sorted(MODELS)}, got {kind!r}")
    options = meta.get("options")
    if not isinstance(options, dict):
        bad(f"field 'options' must be a mapping of training options, got {type(options).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    for name, value in options.items():
        if name not in fields:
            bad(f"field 'options' has an unknown option {name!r}")
        if not _type_fits(value, fields[name].type):
            bad(f"field 'options' option {name!r}: {value!r} is not a {str(fields[name].type).replace('typing.', '')}")
    for name in ("model", "seq_len", "batch_size", "grad_accum", "steps"):
        if name not in options:
            bad(f"field 'options' lacks {name!r}")
    if options["model"] != kind:
        bad(f"field 'model' is {kind!r} but field 'options' says the run trained {options['model']!r}")
    for name in ("seq_len", "batch_size", "grad_accum", "steps"):
        if options[name] < 1:
            bad(f"field 'options' option {name!r} must be >= 1, got {options[name]!r}")
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") not in ("byte", "bpe"):
        bad(f"field 'tokenizer' must be a mapping with 'kind' byte or bpe, got {tokenizer!r}")
    sentinels = tokenizer.get("n_sentinels", 0)
    if not (isinstance(sentinels, int) and not isinstance(sentinels, bool) and 0 <= sentinels <= 1000):
        bad(f"field 'tokenizer' entry 'n_sentinels' must be an integer in [0, 1000], got {sentinels!r}")
    if not isinstance(meta.get("model_values", {}), dict):
        bad(f"field 'model_values' must be a mapping, got {type(meta['model_values']).__name__}")
    world = meta.get("world_size", 1)
    if not (isinstance(world, int) and not isinstance(world, bool) and world >= 1):
        bad(f"field 'world_size' must be a positive integer, got {world!r}")
    if kind == "ngram":
        return
    config = meta.get("model_config")
    if not isinstance(config, dict):
        bad(f"field 'model_config' must be a mapping for model {kind!r}, got {type(config).__name__}")
    _, config_cls = model_classes(kind)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        bad(f"field 'model_config' has {unknown[:5]}, which are not fields of {config_cls.__name__} (model "
            f"{kind!r})")


def model_from_meta(ck: ckpt_io.Checkpoint):
    """(config, model) built from a checked manifest; a config its class refuses is an error
    naming the field."""
    kind = ck.meta["model"]
    _, config_cls = model_classes(kind)
    try:
        config = config_cls(**ck.meta["model_config"])
        return config, build_model(kind, config)
    except (TypeError, ValueError) as e:
        raise ckpt_io.CheckpointError(f"{ck.path(ckpt_io.MANIFEST)}: field 'model_config' does not make a "
                                      f"{config_cls.__name__} ({e})") from None


def load(path: str, device="cpu") -> Loaded:
    """A checkpoint opened for evaluation or generation: nothing in it is executed."""
    ck = ckpt_io.open_checkpoint(path)
    check_run_meta(ck)
    meta = ck.meta
    try:
        kind = meta["model"]
        options = TrainOptions(**meta["options"])
        tokenizer = load_tokenizer(meta["tokenizer"], ck.directory)
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt_io.CheckpointError(f"{ck.path(ckpt_io.MANIFEST)}: incomplete manifest ({e})") from e
    if kind == "ngram":
        model_cls, _ = model_classes("ngram")
        try:
            return Loaded(kind, model_cls.load(ck.path("ngram")), tokenizer, options, ck)
        except Exception as e:
            raise ckpt_io.CheckpointError(f"{ck.path('ngram')}: cannot be read ({e})") from e
    config, model = model_from_meta(ck)
    ck.load_weights(model)
    return Loaded(kind, model.to(device).eval(), tokenizer, options, ck, config)


def describe(result: dict) -> str:
    text = f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}"
    if "bits_per_byte" in result:
        text += f"  bits/byte {result['bits_per_byte']:.4f}"
    if "accuracy" in result:
        text += f"  accuracy {result['accuracy']:.2%}"
    return text + f"  ({result['tokens']:,} tokens)"


__all__ = ["Loaded", "build_model", "check_run_meta", "describe", "evaluate", "evaluate_ngram", "generate_text", "load",
           "model_from_meta"]
