"""The training loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, DDP/FSDP2,
periodic validation and checkpoints, exact resume.

One step: every micro-batch of every rank is built first (so the number of labelled tokens
in the global batch is known), then each micro-batch's loss is weighted by its share of
those tokens. The gradient is therefore the gradient of the mean loss over all labelled
tokens of the global batch, whatever the split into processes and micro-batches: a run on 2
processes matches a run on 1 with the same global batch, and MLM's varying number of masked
tokens per row is weighted right. The token accuracy the models return beside the loss (from
the loss kernel's pass) is weighted the same way, so it is the fraction of all labelled
tokens of the global batch predicted right; both stay on the device until the logging step
reads them in the one sync it already made for the loss.

A loss that is not finite stops the run (``DivergedError``, naming the first such step and
its loss) before anything is saved over the last good checkpoint. Which step it was is kept
on the device (no host sync per step) and read where the loop reads the host anyway: at a
logging step, and before every evaluation and every save.

The run directory is taken through ``checkpoint.claim_run_dir`` before anything is written
(one run per directory, held by a lock; see that module).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .config import ConfigError, RESUME_MUTABLE, TrainOptions, default_run_dir, model_classes, model_config
from .data import TokenStream, WindowSampler, batch_positions, eval_window_indices, load_corpus, tokenize, windows
from .distributed import (Env, all_reduce_sum, barrier, broadcast_object, checkpoint_activations, full_model_state,
                          full_optimizer_state, load_optimizer_state, setup, teardown, wrap)
from .evaluate import autocast, build_model, check_run_meta, describe, evaluate, evaluate_ngram, generate_text
from .metrics import MetricsLog, flops_per_token, peak_tflops, plot_losses, truncate_after
from .objectives import make_batch
from .tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer


class DivergedError(ConfigError):
    """The training loss became NaN or infinite: in practice options that do not suit the model
    (learning rate, warmup, clipping). Nothing was saved after the last good checkpoint."""


def lr_factor(step: int, warmup: int, steps: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def resume_options(path: str, given: dict) -> tuple[TrainOptions, dict, ckpt_io.Checkpoint]:
    """The saved run's options, with the few a resumed run may change taken from `given`."""
    if given.get("overwrite"):
        raise ConfigError("--resume continues the run in its directory; --overwrite (replace it) cannot be "
                          "combined with it")
    given = {k: v for k, v in given.items() if k != "overwrite"}
    ck = ckpt_io.open_checkpoint(path)
    check_run_meta(ck)
    meta = ck.meta
    try:
        saved = dict(meta["options"])
        model_values = dict(meta["model_values"])
    except KeyError as e:
        raise ckpt_io.CheckpointError(f"{ck.path(ckpt_io.MANIFEST)}: incomplete manifest ({e})") from e
    saved["overwrite"] = False  # an invocation's choice, not the run's
    for name, value in given.items():
        if name in RESUME_MUTABLE:
            saved[name] = value
        elif name in ("batch_size", "grad_accum"):
            pass  # checked below: the global batch must stay
        elif name in saved and saved[name] != value:
            raise ConfigError(f"--resume continues the saved run: --{name.replace('_', '-')} cannot change "
                              f"(saved {saved[name]!r}, given {value!r})")
        elif name not in saved and model_values.get(name) != value:
            raise ConfigError(f"--resume continues the saved run: model option --{name.replace('_', '-')} cannot "
                              f"change")
    saved["stop_after"] = given.get("stop_after", 0)  # a stop belongs to one invocation
    # Another number of processes is fine if the global batch stays (the data position is
    # step x global batch): --batch-size and --grad-accum may change to keep it.
    for name in ("batch_size", "grad_accum"):
        if name in given:
            saved[name] = given[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    before = meta["options"]["batch_size"] * meta["options"]["grad_accum"] * meta.get("world_size", 1)
    now = saved["batch_size"] * saved["grad_accum"] * world
    if now != before:
        raise ConfigError(f"--resume needs the same global batch: the run had {before} windows per step "
                          f"(batch {meta['options']['batch_size']} x accumulation {meta['options']['grad_accum']} x "
                          f"{meta.get('world_size', 1)} processes), this would be {now}; set --batch-size / "
                          f"--grad-accum to keep {before}")
    parent = os.path.dirname(os.path.abspath(ck.directory))
    saved["out"] = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    try:
        options = TrainOptions(**saved)
    except TypeError as e:
        raise ckpt_io.CheckpointError(f"{ck.path(ckpt_io.MANIFEST)}: field 'options' ({e})") from None
    if options.steps < meta["step"]:
        raise ConfigError(f"--steps {options.steps} is before the checkpoint's step {meta['step']}")
    return options, model_values, ck


def train(options: TrainOptions, model_values: dict, resume: Optional[ckpt_io.Checkpoint] = None,
          log=print) -> dict:
    env = setup(options.device)
    finished = False
    try:
        if options.backend != "auto":
            from ..backend import use_backend
            with use_backend(options.backend):
                result = _train(env, options, model_values, resume, log)
        else:
            result = _train(env, options, model_values, resume, log)
        finished = True
        return result
    finally:
        teardown(wait_for_peers=finished)


def _train(env: Env, o: TrainOptions, model_values: dict, resume, log) -> dict:
    say = log if env.main else (lambda *a, **k: None)
    if o.threads:
        torch.set_num_threads(o.threads)
    elif env.device.type == "cpu":
        # Leave a core free: torch's OpenMP threads spin-wait, and when another process takes a
        # core they stall each other (measured on 2 cores: 2 threads went from 15k tokens/s to
        # a standstill while another job ran; 1 thread kept 8.5k).
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)))
    seed_everything(o.seed)
    run_dir = o.out or default_run_dir(o.model)
    claim, refusal = None, None
    if env.main:  # rank 0 takes the directory; every rank learns the outcome
        mode = "resume" if resume is not None else "overwrite" if o.overwrite else "new"
        try:
            claim = ckpt_io.claim_run_dir(run_dir, mode)
        except ConfigError as e:
            refusal = str(e)
    run_dir, work, refusal = broadcast_object((run_dir, claim.work if claim else None, refusal), env)
    if refusal is not None:
        raise ckpt_io.RunDirError(refusal)
    o.out = run_dir
    try:
        return _train_in(env, o, model_values, resume, say, run_dir, work, claim)
    except BaseException:
        if claim is not None and claim.staging:
            say(f"the new run stopped before its first checkpoint: {run_dir} is unchanged, the new run's files "
                f"({claim.work}) are removed")
        raise
    finally:
        if claim is not None:
            claim.release()


def _train_in(env: Env, o: TrainOptions, model_values: dict, resume, say, run_dir: str, work: str,
              claim: Optional[ckpt_io.RunClaim]) -> dict:
    for note in (claim.notes if claim is not None else []):
        say(note)
    say(f"run directory: {run_dir}")

    corpus = load_corpus(o.data, o.val_fraction, o.max_data_bytes)
    say(f"data: {corpus.description}; split {corpus.split_note}")
    if resume is not None:
        tok = load_tokenizer(resume.meta["tokenizer"], resume.directory)
    elif o.tokenizer == "bpe":
        path = os.path.join(work, BPETokenizer.FILE)
        if env.main:
            say(f"training a BPE tokenizer ({o.bpe_vocab_size} ids) on the training split...")
            BPETokenizer.train((text for _, text in corpus.train), o.bpe_vocab_size).tok.save(path)
        barrier(env)
        tok = BPETokenizer.load(work)
    else:
        tok = ByteTokenizer()
    train_stream, val_stream = tokenize(corpus.train, tok), tokenize(corpus.val, tok)
    say(f"tokens: {len(train_stream):,} train / {len(val_stream):,} validation ({tok.kind} tokenizer, "
        f"{tok.vocab_size} ids)")
    sampler = WindowSampler(len(train_stream), o.seq_len, o.seed)
    eval_window_indices(len(val_stream), o.seq_len, o.eval_tokens)  # fails now, not at the first evaluation

    if o.model == "ngram":
        return _fit_ngram(env, o, tok, train_stream, val_stream, run_dir, say, claim)

    config = model_config(o, model_values, tok)
    model = build_model(o.model, config)
    if resume is not None:
        if json.loads(json.dumps(config.to_dict())) != resume.meta.get("model_config"):
            raise ckpt_io.CheckpointError(f"{resume.path(ckpt_io.MANIFEST)}: field 'model_config' is not the model "
                                          f"the run's options make (edited?)")
        resume.load_weights(model)
    raw = model.to(env.device)
    n_params = sum(p.numel() for p in raw.parameters())
    say(f"model: {o.model} ({o.preset}), {n_params / 1e6:.2f}M parameters, on {env.device} x {env.world}"
        + (" (FSDP2)" if o.fsdp else " (DDP)" if env.distributed else ""))
    fpt = flops_per_token(raw, o.model, config, o.seq_len)
    if o.activation_checkpointing:
        say(f"activation checkpointing: {checkpoint_activations(raw)} blocks recomputed in the backward")
    wrapped = wrap(raw, env, o.fsdp, o.amp)
    decay = [p for p in wrapped.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in wrapped.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2),
                                  fused=env.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=o.warmup, steps=o.steps, min_ratio=o.min_lr_ratio))
    step, last_saved = 0, None
    if resume is not None:
        step = _restore(resume, wrapped, optimizer, scheduler, o)
        last_saved = (step, resume.directory)
        if env.main:  # the history after the checkpoint is rewritten by this run
            truncate_after(os.path.join(run_dir, "metrics.jsonl"), step)
        say(f"resumed from {resume.directory} at step {step}")
    forward = torch.compile(wrapped) if o.compile else wrapped

    B, A, W, L = o.batch_size, o.grad_accum, env.world, o.seq_len
    tokens_per_step = B * A * W * L
    peak = peak_tflops(env.device, o.peak_tflops)
    metrics = MetricsLog(work, env.main)
    if claim is not None:
        claim.start()
    stop_at = min(o.steps, step + o.stop_after) if o.stop_after else o.steps
    from tqdm import tqdm
    bar = tqdm(total=o.steps, initial=step, desc=f"train {o.model}", dynamic_ncols=True,
               disable=not (env.main and o.progress), file=sys.stderr)
    out = lambda msg: bar.write(msg) if (env.main and o.progress) else say(msg)  # noqa: E731
    started, last_time, last_step, val = time.perf_counter(), time.perf_counter(), step, None
    ddp = env.distributed and not o.fsdp
    # The first step whose loss was not finite (0: none) and that loss, kept on the device.
    bad_step = torch.zeros((), dtype=torch.long, device=env.device)
    bad_loss = torch.zeros((), device=env.device)

    while step < stop_at:
        raw.train()
        batches, counts = [], []
        for m in range(A):
            pos = batch_positions(step, m, env.rank, W, B, A)
            rows = windows(train_stream.tokens, sampler.window_indices(pos, B), L)
            batch, n = make_batch(o.model, rows, np.arange(pos, pos + B), tok, o)
            batches.append(batch)
            counts.append(n)
        total = all_reduce_sum(torch.tensor(float(sum(counts)), device=env.device), env)
        loss_sum = torch.zeros((), device=env.device)
        acc_sum = torch.zeros((), device=env.device)  # each micro-batch's accuracy x its share of labels
        has_accuracy = True
        for m, batch in enumerate(batches):
            last = m == A - 1
            batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
            sync = contextlib.nullcontext()
            if ddp and not last:
                sync = wrapped.no_sync()
            elif o.fsdp:
                wrapped.set_requires_gradient_sync(last)
            with sync:
                with autocast(env.device, o.amp):
                    result = forward(**batch)
                    loss = result["loss"].float() * (counts[m] / total)
                (loss * W).backward()  # DDP and FSDP average over processes; the weights already do
            loss_sum += loss.detach()
            accuracy = result.get("accuracy")
            if accuracy is None:
                has_accuracy = False
            else:
                acc_sum += accuracy.float() * (counts[m] / total)
        grad_norm = None
        if o.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), o.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        first = (bad_step == 0) & ~torch.isfinite(loss_sum)
        bad_step = torch.where(first, step, bad_step)
        bad_loss = torch.where(first, loss_sum, bad_loss)

        logging = step % o.log_every == 0 or step == stop_at
        evaluating = step % o.eval_every == 0 or step == o.steps
        saving = step % o.save_every == 0 or step == stop_at
        if logging:
            # One all-reduce and one host read for the loss and the accuracy together.
            loss_value, acc_value = all_reduce_sum(torch.stack([loss_sum, acc_sum]), env).tolist()
            now = time.perf_counter()
            rate = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
            record = {"kind": "train", "step": step, "loss": loss_value, "lr": lr, "tokens": step * tokens_per_step,
                      "tokens_per_s": rate, "time_s": now - started}
            if has_accuracy:
                record["accuracy"] = acc_value
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                            else grad_norm)
            postfix = {"loss": f"{loss_value:.4f}", "tok/s": f"{rate:,.0f}"}
            if has_accuracy:
                postfix["acc"] = f"{acc_value:.1%}"
            if peak:
                record["mfu"] = rate * fpt / W / (peak * 1e12)
                postfix["mfu"] = f"{record['mfu']:.1%}"
            metrics.write(record)
            bar.set_postfix(postfix, refresh=False)
            bar.update(step - bar.n)
            last_time, last_step = now, step
        if logging or evaluating or saving:
            diverged = _first_nonfinite(bad_step, bad_loss, env)
            if diverged is not None:
                bar.close()
                at, value = diverged
                kept = (f"the last checkpoint (step {last_saved[0]}, {last_saved[1]}) is unchanged" if last_saved
                        else "no checkpoint was written")
                raise DivergedError(f"step {at}: the training loss is {value} (not finite); stopped at step {step} "
                                    f"without saving: {kept}. Lower --lr, raise --warmup or set --grad-clip")
        if evaluating:
            val = evaluate(raw if ddp else wrapped, o.model, val_stream, tok, o, env.device, o.eval_tokens,
                           rank=env.rank, world=W)
            metrics.write({"kind": "val", "step": step, **{"val_" + k: v for k, v in val.items()}})
            out(f"step {step}: validation {describe(val)}")
            if env.main:
                plot_losses(claim.work if claim is not None else work)
            last_time = time.perf_counter()
        if saving:
            path = save_checkpoint(env, claim.work if claim is not None else work, step, step * B * A * W, wrapped,
                                   raw, optimizer, scheduler, o, model_values, config, tok)
            if claim is not None and claim.staging:  # the replacement's first checkpoint: it takes the name
                claim.promote()
                metrics.move(run_dir)
                path = os.path.join(run_dir, os.path.relpath(path, os.path.dirname(os.path.dirname(path))))
                out(f"--overwrite: the new run replaced the old one in {run_dir}")
            if path:
                out(f"step {step}: checkpoint {path}")
            last_saved = (step, path)
            last_time = time.perf_counter()
    bar.close()

    summary = {"run_dir": run_dir, "step": step, "time_s": time.perf_counter() - started, "val": val}
    if step < o.steps:
        say(f"stopped at step {step} of {o.steps}; continue with: fastlm train --resume {run_dir}")
        return summary
    sample_model = raw
    if o.fsdp:  # sample from an unsharded copy
        state = full_model_state(wrapped, raw, True)
        if env.main:
            sample_model = build_model(o.model, config)
            sample_model.load_state_dict(state)
            sample_model.to(env.device)
    if env.main:
        if val is not None:
            say(f"validation: {describe(val)}")
        sample = generate_text(sample_model, o.model, tok, o.prompt, o.sample_tokens, o.temperature, o.top_k,
                               o.top_p, seed=o.seed, device=env.device)
        summary["sample"] = sample
        metrics.write({"kind": "sample", "step": step, "prompt": o.prompt, "text": sample})
        say(f"sample (prompt {o.prompt!r}, temperature {o.temperature}, top-k {o.top_k}, top-p {o.top_p}):\n"
            f"{sample}\n")
        say(f"done in {summary['time_s']:.0f} s; run directory: {run_dir}")
    return summary


def _restore(resume: ckpt_io.Checkpoint, wrapped, optimizer, scheduler, o: TrainOptions) -> int:
    """Optimizer, scheduler and RNG states from the checkpoint; its step. What does not fit is
    an error naming the file (the manifest's hashes only say the files are what was written)."""
    state_path = resume.path("state.pt")
    state = resume.load_torch("state.pt")
    if not isinstance(state, dict) or not all(k in state for k in ("step", "scheduler", "rng")):
        raise ckpt_io.CheckpointError(f"{state_path}: not a training state (step, scheduler, rng expected)")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] != resume.meta["step"]:
        raise ckpt_io.CheckpointError(f"{state_path}: field 'step' is {state['step']!r}, the manifest's is "
                                      f"{resume.meta['step']}")
    try:
        load_optimizer_state(wrapped, optimizer, resume.load_torch("optimizer.pt"), o.fsdp)
    except ckpt_io.CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ckpt_io.CheckpointError(f"{resume.path('optimizer.pt')}: does not fit the model's optimizer "
                                      f"({type(e).__name__}: {e})") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise ckpt_io.CheckpointError(f"{state_path}: the scheduler or RNG state cannot be restored "
                                      f"({type(e).__name__}: {e})") from None
    return state["step"]


def _first_nonfinite(bad_step: torch.Tensor, bad_loss: torch.Tensor, env: Env) -> Optional[tuple[int, float]]:
    """(step, loss) of the first step whose loss was not finite, on any process; None if none.
    One host read (and, with many processes, two small all-reduces)."""
    if not env.distributed:
        at, value = int(bad_step), float(bad_loss)
        return (at, value) if at > 0 else None
    import torch.distributed as dist
    first = torch.where(bad_step > 0, bad_step.double(), math.inf)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    value = torch.where(bad_step.double() == first, bad_loss.double(), 0.0)
    dist.all_reduce(value)
    at = float(first)
    return (int(at), float(value)) if math.isfinite(at) else None


def save_checkpoint(env, run_dir, step, position, wrapped, raw, optimizer, scheduler, o, model_values, config,
                    tok) -> Optional[str]:
    model_state = full_model_state(wrapped, raw, o.fsdp)  # collectives first, on every rank
    optim_state = full_optimizer_state(wrapped, optimizer, o.fsdp)
    path = None
    if env.main:
        from safetensors.torch import save_file, save_model
        state = {"step": step, "position": position, "scheduler": scheduler.state_dict(), "rng": rng_state()}

        def write_model(p):
            if o.fsdp:
                save_file({k: v.contiguous() for k, v in model_state.items()}, p)
            else:
                save_model(raw, p)

        writers = {"model.safetensors": write_model,
                   "optimizer.pt": lambda p: torch.save(optim_state, p),
                   "state.pt": lambda p: torch.save(state, p)}
        meta = _meta(o, model_values, tok, config, env)
        if tok.kind == "bpe":
            writers[BPETokenizer.FILE] = lambda p: tok.tok.save(p)
        path = ckpt_io.save(run_dir, step, writers, meta, keep=o.keep)
    barrier(env)
    return path


def _meta(o, model_values, tok, config, env) -> dict:
    from .. import __version__
    info = {"kind": "byte", "n_sentinels": len(tok.sentinel_ids)} if tok.kind == "byte" else \
        {"kind": "bpe", "file": BPETokenizer.FILE}
    return {"model": o.model, "model_config": config.to_dict() if config is not None else None,
            "model_values": model_values, "options": o.to_dict(), "tokenizer": info, "world_size": env.world,
            "optimizer_format": "fsdp-full" if o.fsdp else "torch", "fastlm_version": __version__,
            "torch_version": torch.__version__}


def _fit_ngram(env, o, tok, train_stream: TokenStream, val_stream: TokenStream, run_dir, say, claim) -> dict:
    model_cls, _ = model_classes("ngram")
    started = time.perf_counter()
    lm = model_cls(o.ngram_order, tok.vocab_size)
    if env.main:
        say(f"fitting a {o.ngram_order}-gram Kneser-Ney model on {len(train_stream):,} tokens...")
    tokens = train_stream.tokens.astype(np.int64)
    ends = np.flatnonzero(tokens == tok.eos_id) + 1  # documents (each ending with its eos): no n-gram crosses one
    lm.fit_documents([d for d in np.split(tokens, ends) if len(d)])
    val = evaluate_ngram(lm, val_stream, o, o.eval_tokens)
    summary = {"run_dir": run_dir, "step": 0, "val": val, "time_s": time.perf_counter() - started}
    if env.main:
        claim.start()
        metrics = MetricsLog(claim.work)
        metrics.write({"kind": "val", "step": 0, **{"val_" + k: v for k, v in val.items()}})
        writers = {"ngram": lambda p: (os.makedirs(p, exist_ok=True), lm.save(p))}
        path = ckpt_io.save(claim.work, 0, writers, _meta(o, {}, tok, None, env), keep=o.keep)
        if claim.staging:
            claim.promote()
            path = os.path.join(run_dir, "checkpoints", os.path.basename(path))
            say(f"--overwrite: the new run replaced the old one in {run_dir}")
        say(f"checkpoint {path}")
        say(f"validation: {describe(val)}")
        sample = generate_text(lm, "ngram", tok, o.prompt, o.sample_tokens, o.temperature, o.top_k, o.top_p,
                               seed=o.seed)
        summary["sample"] = sample
        say(f"sample (prompt {o.prompt!r}):\n{sample}\n")
        say(f"done in {summary['time_s']:.0f} s; run directory: {run_dir}")
    return summary


__all__ = ["DivergedError", "lr_factor", "resume_options", "save_checkpoint", "train"]
