"""The `fastlm train`, `fastlm eval` and `fastlm generate` commands (argument parsing only)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import (ConfigError, TrainOptions, all_model_fields, build, check, check_backend, check_device,
                     check_values, parse_size)

HELP = {
    "model": "gpt | bert | encdec | lstm | ngram (default gpt)",
    "preset": "model size and its training defaults: tiny (minutes on a CPU), mini, 124M/350M/774M/1.5B (gpt), "
              "base/large (bert), base/big (encdec)",
    "data": "text files or folders (default: the Python standard library's source, built in)",
    "max_data_bytes": "the most text read, all files together (default 1G; K, M, G, T suffixes): a larger file "
                      "is refused from its size, a device or pipe once it has given that much",
    "val_fraction": "share of files (by path hash) held out for validation",
    "tokenizer": "byte (default) or bpe (trained on the training split, saved beside the checkpoint)",
    "seq_len": "tokens per training window",
    "batch_size": "windows per process per micro-step",
    "grad_accum": "micro-steps per optimizer step (global batch = batch_size x grad_accum x processes)",
    "steps": "optimizer steps in the whole run",
    "lr": "peak learning rate (AdamW), reached after --warmup steps, then cosine decay",
    "min_lr_ratio": "the cosine ends at lr x this",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "amp": "bf16 autocast on GPU (default true; no effect on CPU)",
    "activation_checkpointing": "recompute each block's activations in the backward",
    "backend": "fastlm kernels: auto | torch | triton | cuda (fastlm.use_backend)",
    "compile": "torch.compile the model",
    "fsdp": "shard with FSDP2 (torch.distributed.fsdp.fully_shard) under torchrun",
    "out": "run directory (default ./runs/<model>-<timestamp>)",
    "overwrite": "replace the run already in --out (without it, and without --resume, a used --out is refused); "
                 "the old run is deleted only once the new one has its first checkpoint",
    "stop_after": "stop after this many steps of this invocation, with a checkpoint (resume later)",
    "peak_tflops": "the device's peak for MFU (default: a table of A100/H100/H200 bf16 dense peaks)",
    "eval_tokens": "tokens per validation (evenly spaced windows; 0: the whole split)",
    "threads": "torch CPU threads (0: all cores but one, at least one: OpenMP threads stall when a core is taken)",
}


def _add_field(parser, name: str, annotation, help_text: str = "") -> None:
    flag = "--" + name.replace("_", "-")
    ann = str(annotation)
    if name == "data":
        parser.add_argument(flag, nargs="+", metavar="PATH", default=argparse.SUPPRESS, help=help_text)
    elif "bool" in ann:
        parser.add_argument(flag, nargs="?", const="true", metavar="BOOL", default=argparse.SUPPRESS,
                            help=help_text)
    else:
        metavar = "N" if "int" in ann else "X" if "float" in ann else name.split("_")[-1].upper()
        parser.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def _kinds_with(name: str) -> list[str]:
    from .config import MODELS, ConfigError, config_fields
    kinds = []
    for kind in MODELS:
        try:
            if name in config_fields(kind):
                kinds.append(kind)
        except ConfigError:
            pass
    return kinds


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlm train",
        description="Train a language model. With no arguments: a tiny byte-level GPT on the Python standard "
                    "library's source, a few minutes on a laptop CPU. Under torchrun: data parallel (DDP), or "
                    "sharded with --fsdp.",
        epilog="Every option can also come from --config FILE.json (keys as below, with underscores). Model "
               "options are the fields of the model's config class in fastlm.models.")
    p.add_argument("--config", metavar="FILE", help="JSON file of options (command-line options override it)")
    p.add_argument("--resume", metavar="PATH", help="continue a run exactly from its run directory or a checkpoint")
    train = p.add_argument_group("training")
    for f in dataclasses.fields(TrainOptions):
        _add_field(train, f.name, f.type, HELP.get(f.name, ""))
    train.add_argument("--no-progress", dest="progress", action="store_const", const="false",
                       default=argparse.SUPPRESS, help="no progress bar")
    train.add_argument("--no-amp", dest="amp", action="store_const", const="false", default=argparse.SUPPRESS,
                       help="no bf16 autocast")
    model = p.add_argument_group("model (fields of GPTConfig, BertConfig, EncoderDecoderConfig, LSTMConfig)")
    own = {f.name for f in dataclasses.fields(TrainOptions)}
    for name, f in sorted(all_model_fields().items()):
        if name not in own:
            fixed = name in ("vocab_size", "pad_token_id", "mask_token_id", "bos_token_id", "eos_token_id")
            _add_field(model, name, f.type,  # the tokenizer's: accepted only to say so clearly
                       argparse.SUPPRESS if fixed else "model option of: " + ", ".join(_kinds_with(name)))
    return p


def _fail(command: str, error: Exception) -> int:
    print(f"fastlm {command}: error: {error}", file=sys.stderr)
    return 2


def train_main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    args = vars(train_parser().parse_args(argv))
    config_file, resume_path = args.pop("config", None), args.pop("resume", None)
    try:
        from .loop import resume_options, train
        if resume_path:
            if config_file:
                raise ConfigError("--resume takes the saved run's options; --config cannot be combined with it")
            from .config import parse_value
            fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
            model_fields = all_model_fields()
            given = {k: parse_value(k, (fields.get(k) or model_fields[k]).type, v) for k, v in args.items()}
            options, model_values, checkpoint = resume_options(resume_path, given)
            check(options, model_values, explicit=given)  # the values it may change, the device, the data paths
        else:
            options, model_values = build(args, config_file)
            checkpoint = None
        train(options, model_values, checkpoint)
    except (ConfigError, DataError, CheckpointError) as e:
        return _fail("train", e)
    return 0


def _backend(name: str):
    import contextlib
    if name == "auto":
        return contextlib.nullcontext()
    from ..backend import use_backend
    return use_backend(name)


def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastlm eval", description="Loss, perplexity and bits per byte of a checkpoint "
                                "on held-out text.")
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders (default: the validation split "
                   "of the text the model was trained on)")
    p.add_argument("--split", choices=("val", "train", "all"), help="which part of the text (default: val, or all "
                   "with --data)")
    p.add_argument("--max-tokens", type=int, default=1 << 20, help="tokens to score, evenly spaced windows "
                   "(0: all; default 1M)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: the run's)")
    p.add_argument("--max-data-bytes", metavar="N", help="the most text read (default: the run's, 1G unless set; "
                   "K, M, G, T suffixes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError, check_paths, load_corpus, read_documents, tokenize
    from .evaluate import describe, evaluate, evaluate_ngram, load
    try:  # every setting first: nothing is opened before they pass
        max_data_bytes = None if args.max_data_bytes is None else parse_size("max_data_bytes", args.max_data_bytes)
        check_values({"max_tokens": args.max_tokens, "batch_size": args.batch_size, "max_data_bytes": max_data_bytes})
        device = check_device(args.device)
        check_backend(args.backend, device)
        loaded = load(args.checkpoint, device)
        o = loaded.options
        limit = max_data_bytes or o.max_data_bytes
        check_paths(args.data or o.data, limit)
        split = args.split or ("all" if args.data else "val")
        if split == "all":
            docs, description = read_documents(args.data or o.data, limit)
        else:
            corpus = load_corpus(args.data or o.data, o.val_fraction, limit)
            docs, description = (corpus.val if split == "val" else corpus.train), corpus.description
        stream = tokenize(docs, loaded.tokenizer)
        with _backend(args.backend):
            if loaded.kind == "ngram":
                result = evaluate_ngram(loaded.model, stream, o, args.max_tokens)
            else:
                result = evaluate(loaded.model, loaded.kind, stream, loaded.tokenizer, o, device, args.max_tokens,
                                  args.batch_size)
    except (ConfigError, DataError, CheckpointError) as e:
        return _fail("eval", e)
    result.update(checkpoint=loaded.checkpoint.directory, step=loaded.checkpoint.meta.get("step"), split=split,
                  model=loaded.kind)
    if args.json:
        from .metrics import dumps_strict  # standard JSON: a non-finite value is null, named in "nonfinite"
        print(dumps_strict(result, sort_keys=True))
    else:
        print(f"{loaded.kind} at step {result['step']} on {description} ({split}): {describe(result)}")
    return 0


def generate_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastlm generate", description="Sample text from a checkpoint (temperature, "
                                "top-k, top-p; KV cache for GPT and the encoder-decoder). For the encoder-decoder a "
                                "prompt may hold <extra_id_0>... gaps to fill; for BERT, <mask> tokens.")
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="0: off")
    p.add_argument("--top-p", type=float, default=0.95, help="in (0, 1]; 1: off")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError
    from .evaluate import generate_text, load
    try:  # every setting first: nothing is opened before they pass
        check_values({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                      "top_p": args.top_p, "num_samples": args.num_samples, "seed": args.seed})
        if args.seed + args.num_samples > 2 ** 64:  # sample i draws with seed + i
            raise ConfigError(f"--seed {args.seed} with --num-samples {args.num_samples}: the last sample's seed "
                              f"would pass 2^64 - 1")
        device = check_device(args.device)
        check_backend(args.backend, device)
        loaded = load(args.checkpoint, device)
        with _backend(args.backend):
            for i in range(args.num_samples):
                text = generate_text(loaded.model, loaded.kind, loaded.tokenizer, args.prompt, args.max_new_tokens,
                                     args.temperature, args.top_k, args.top_p, seed=args.seed + i, device=device)
                if args.num_samples > 1:
                    print(f"--- sample {i + 1}")
                print(text)
    except (ConfigError, CheckpointError, ValueError) as e:
        return _fail("generate", e)
    return 0


__all__ = ["eval_main", "generate_main", "train_main", "train_parser"]
