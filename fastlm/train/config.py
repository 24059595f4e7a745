"""What a run is: the model kind, its config, the training options, and their presets.

Options come from, lowest priority first: the defaults below, the preset (``--preset``, per
model), a JSON file (``--config FILE``: training options and model options as keys, flat or
under ``"model_config"``), then the command line. Every field of the model's config class
(fastlm.models) is a command-line option (``--n-layer 6``, ``--positions rotary``); the
tokenizer fixes ``vocab_size`` and the special-token ids, and ``max_seq_len`` defaults to what
the sequence length needs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional


class ConfigError(ValueError):
    """Options that do not fit together; raised before any training."""


MODELS = {  # kind -> (module, model class, config class); ngram is not a torch model
    "gpt": ("fastlm.models.gpt", "GPT", "GPTConfig"),
    "bert": ("fastlm.models.bert", "BertForMaskedLM", "BertConfig"),
    "encdec": ("fastlm.models.encdec", "EncoderDecoder", "EncoderDecoderConfig"),
    "lstm": ("fastlm.models.lstm", "LSTMLM", "LSTMConfig"),
    "ngram": ("fastlm.train.ngram", "KneserNeyLM", None),
}

# Model sizes per kind, and the training options that suit them. "tiny" trains in minutes on
# a laptop CPU; the GPT sizes are GPT-2's.
PRESETS: dict[str, dict[str, dict]] = {
    "gpt": {
        "tiny": {"model": dict(n_layer=4, n_head=4, d_model=128),
                 "train": dict(seq_len=128, batch_size=16, steps=800, lr=2e-3, warmup=50, eval_every=200,
                               eval_tokens=1 << 16, save_every=400)},
        "mini": {"model": dict(n_layer=6, n_head=6, d_model=384),
                 "train": dict(seq_len=256, batch_size=32, steps=5000, lr=1e-3, warmup=200)},
        "124M": {"model": dict(n_layer=12, n_head=12, d_model=768),
                 "train": dict(seq_len=1024, batch_size=16, grad_accum=4, steps=20000, lr=6e-4, warmup=700)},
        "350M": {"model": dict(n_layer=24, n_head=16, d_model=1024),
                 "train": dict(seq_len=1024, batch_size=8, grad_accum=8, steps=40000, lr=3e-4, warmup=1000)},
        "774M": {"model": dict(n_layer=36, n_head=20, d_model=1280),
                 "train": dict(seq_len=1024, batch_size=8, grad_accum=8, steps=60000, lr=2.5e-4, warmup=1500)},
        "1.5B": {"model": dict(n_layer=48, n_head=25, d_model=1600),
                 "train": dict(seq_len=1024, batch_size=4, grad_accum=16, steps=80000, lr=2e-4, warmup=2000,
                               activation_checkpointing=True)},
    },
    "bert": {
        "tiny": {"model": dict(n_layer=4, n_head=4, d_model=128, d_hidden=512, dropout=0.0),
                 "train": dict(seq_len=128, batch_size=16, steps=800, lr=2e-3, warmup=50, eval_every=200,
                               eval_tokens=1 << 16, save_every=400)},
        "mini": {"model": dict(n_layer=6, n_head=6, d_model=384, d_hidden=1536),
                 "train": dict(seq_len=256, batch_size=32, steps=5000, lr=1e-3, warmup=200)},
        "base": {"model": dict(n_layer=12, n_head=12, d_model=768, d_hidden=3072),
                 "train": dict(seq_len=512, batch_size=32, grad_accum=2, steps=40000, lr=4e-4, warmup=2000)},
        "large": {"model": dict(n_layer=24, n_head=16, d_model=1024, d_hidden=4096),
                  "train": dict(seq_len=512, batch_size=16, grad_accum=4, steps=60000, lr=2e-4, warmup=3000)},
    },
    "encdec": {
        "tiny": {"model": dict(n_encoder_layer=2, n_decoder_layer=2, n_head=4, d_model=128, d_hidden=512,
                               dropout=0.0),
                 "train": dict(seq_len=128, batch_size=16, steps=800, lr=2e-3, warmup=50, eval_every=200,
                               eval_tokens=1 << 16, save_every=400)},
        "mini": {"model": dict(n_encoder_layer=4, n_decoder_layer=4, n_head=6, d_model=384, d_hidden=1536),
                 "train": dict(seq_len=256, batch_size=32, steps=5000, lr=1e-3, warmup=200)},
        "base": {"model": dict(n_encoder_layer=6, n_decoder_layer=6, n_head=8, d_model=512, d_hidden=2048),
                 "train": dict(seq_len=512, batch_size=32, grad_accum=2, steps=40000, lr=5e-4, warmup=2000)},
        "big": {"model": dict(n_encoder_layer=6, n_decoder_layer=6, n_head=16, d_model=1024, d_hidden=4096),
                "train": dict(seq_len=512, batch_size=16, grad_accum=4, steps=60000, lr=3e-4, warmup=3000)},
    },
    "lstm": {  # fields are filtered by what LSTMConfig has
        "tiny": {"model": dict(n_layer=2, d_model=256, d_hidden=256),
                 "train": dict(seq_len=128, batch_size=16, steps=800, lr=2e-3, warmup=50, eval_every=200,
                               eval_tokens=1 << 16, save_every=400)},
        "mini": {"model": dict(n_layer=2, d_model=512, d_hidden=512),
                 "train": dict(seq_len=256, batch_size=32, steps=5000, lr=1e-3, warmup=200)},
    },
    "ngram": {
        "tiny": {"model": {}, "train": dict(ngram_order=4, seq_len=128, eval_tokens=1 << 16)},
        "mini": {"model": {}, "train": dict(ngram_order=6, seq_len=256)},
    },
}


@dataclass
class TrainOptions:
    model: str = "gpt"
    preset: str = "tiny"
    # data and tokenizer
    data: Optional[list] = None  # None: the built-in corpus
    val_fraction: float = 0.05
    tokenizer: str = "byte"
    bpe_vocab_size: int = 8192
    # batches
    seq_len: int = 128
    batch_size: int = 16  # per process, per micro-step
    grad_accum: int = 1
    # optimisation
    steps: int = 600
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = 40
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    seed: int = 1337
    # objectives
    mlm_probability: float = 0.15
    noise_density: float = 0.15
    mean_span: float = 3.0
    ngram_order: int = 5
    # execution
    device: str = "auto"
    amp: bool = True  # bf16 autocast on GPU (no effect on CPU)
    activation_checkpointing: bool = False
    backend: str = "auto"
    compile: bool = False
    fsdp: bool = False
    threads: int = 0  # torch CPU threads (0: all cores but one, at least one)
    # bookkeeping
    out: Optional[str] = None  # run directory; default ./runs/<model>-<timestamp>
    eval_every: int = 500
    eval_tokens: int = 1 << 18
    save_every: int = 1000
    keep: int = 2
    log_every: int = 10
    progress: bool = True
    stop_after: int = 0  # stop (with a checkpoint) after this many steps of this invocation; 0: never
    peak_tflops: float = 0.0  # 0: from the device table
    # the sample printed at the end
    prompt: str = "def "
    sample_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Options a resumed run may change (the rest must match the checkpoint, or it would not
# continue the same run).
RESUME_MUTABLE = {"steps", "stop_after", "eval_every", "eval_tokens", "save_every", "keep", "log_every", "progress",
                  "prompt", "sample_tokens", "temperature", "top_k", "top_p", "device", "backend", "compile",
                  "peak_tflops", "threads", "out", "activation_checkpointing"}


def model_classes(kind: str):
    """(model class, config class) for a torch model kind; a clear error if its module is absent."""
    if kind not in MODELS:
        raise ConfigError(f"--model {kind!r}: expected one of {sorted(MODELS)}")
    module_name, model_name, config_name = MODELS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--model {kind}: {module_name} is not available ({e})") from e
    return getattr(module, model_name), (getattr(module, config_name) if config_name else None)


def config_fields(kind: str) -> dict[str, dataclasses.Field]:
    if kind == "ngram":
        return {}
    _, config_cls = model_classes(kind)
    return {f.name: f for f in dataclasses.fields(config_cls)}


def all_model_fields() -> dict[str, dataclasses.Field]:
    """The union of every importable model config's fields (for the argument parser)."""
    out: dict[str, dataclasses.Field] = {}
    for kind in MODELS:
        try:
            out.update({k: v for k, v in config_fields(kind).items() if k not in out})
        except ConfigError:
            pass
    return out


def parse_value(name: str, annotation: str, value: Any) -> Any:
    """A string (command line) or JSON value converted to the field's type."""
    ann = str(annotation).replace("typing.", "")
    optional = "Optional" in ann or "None" in ann
    if value is None or (isinstance(value, str) and optional and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"--{name.replace('_', '-')}: a value is required")
    try:
        if "bool" in ann:
            if isinstance(value, bool):
                return value
            v = str(value).lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "list" in ann:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if "int" in ann:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in ann:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not a valid {ann}") from None


def read_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of options")
    flat = {k.replace("-", "_"): v for k, v in data.items() if k not in ("model_config", "model-config")}
    for k, v in (data.get("model_config") or data.get("model-config") or {}).items():
        flat[k.replace("-", "_")] = v
    return flat


def build(cli: dict, file_path: Optional[str] = None) -> tuple[TrainOptions, dict]:
    """(training options, model options as given) from the command line's explicit values
    (cli: name -> value, only those given) and an optional JSON file. Checks every name."""
    given = read_config_file(file_path) if file_path else {}
    given.update(cli)
    kind = given.get("model", TrainOptions.model)
    if kind not in MODELS:
        raise ConfigError(f"--model {kind!r}: expected one of {sorted(MODELS)}")
    presets = PRESETS[kind]
    preset = given.get("preset", "tiny")
    if preset not in presets:
        raise ConfigError(f"--preset {preset!r} for --model {kind}: expected one of {list(presets)}")
    train_fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    model_fields = config_fields(kind)
    values = dict(presets[preset]["train"])
    model_values = {k: v for k, v in presets[preset]["model"].items() if k in model_fields}
    for name, value in given.items():
        if name in train_fields:
            values[name] = parse_value(name, train_fields[name].type, value)
        elif name in model_fields:
            model_values[name] = parse_value(name, model_fields[name].type, value)
        else:
            others = [k for k in all_model_fields() if k == name]
            if others:
                raise ConfigError(f"--{name.replace('_', '-')} is not an option of --model {kind} (its model "
                                  f"options: {', '.join(sorted(model_fields)) or 'none'})")
            raise ConfigError(f"unknown option {name!r}" + (f" in {file_path}" if file_path else ""))
    values["model"], values["preset"] = kind, preset
    if values.get("data"):  # eval and resume find the text from anywhere (the split uses paths inside it)
        values["data"] = [os.path.abspath(p) for p in values["data"]]
    options = TrainOptions(**values)
    check(options, model_values)
    return options, model_values


def check(o: TrainOptions, model_values: dict) -> None:
    """Everything that can be checked before data is read or a model built."""
    def bad(msg):
        raise ConfigError(msg)
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every", "log_every"):
        if getattr(o, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(o, name)}")
    if o.warmup < 0:
        bad(f"--warmup must be >= 0, got {o.warmup}")
    if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1:
        bad(f"--lr must be > 0 and --min-lr-ratio in [0, 1], got {o.lr}, {o.min_lr_ratio}")
    if o.tokenizer not in ("byte", "bpe"):
        bad(f"--tokenizer must be 'byte' or 'bpe', got {o.tokenizer!r}")
    if o.backend not in ("auto", "torch", "triton", "cuda"):
        bad(f"--backend must be one of auto, torch, triton, cuda, got {o.backend!r}")
    if not 0 < o.mlm_probability < 1 or not 0 < o.noise_density < 1 or o.mean_span < 1:
        bad("--mlm-probability and --noise-density must be in (0, 1), --mean-span >= 1")
    if o.model == "encdec" and o.seq_len < 4:
        bad(f"--seq-len {o.seq_len} is too short for span denoising (at least 4)")
    if o.model == "ngram":
        if o.ngram_order < 1:
            bad(f"--ngram-order must be >= 1, got {o.ngram_order}")
        if o.fsdp or o.compile or o.activation_checkpointing:
            bad("--model ngram is counted, not trained: --fsdp, --compile and --activation-checkpointing do not apply")
    elif "ngram_order" in model_values:
        bad("--ngram-order applies to --model ngram only")
    if o.fsdp and o.model == "lstm":
        bad("--fsdp shards Transformer blocks; use data parallel (no --fsdp) for --model lstm")
    if "max_seq_len" in model_values and model_values["max_seq_len"] is not None:
        need = o.seq_len
        if o.model == "encdec":
            from .objectives import target_length
            need = max(o.seq_len, target_length(o.seq_len, o.noise_density, o.mean_span, 60))
        if model_values["max_seq_len"] < need:
            bad(f"--max-seq-len {model_values['max_seq_len']} is shorter than the {need} positions --seq-len "
                f"{o.seq_len} needs")
    for name in ("vocab_size", "pad_token_id", "mask_token_id", "bos_token_id", "eos_token_id"):
        if name in model_values:
            bad(f"--{name.replace('_', '-')} is set by the tokenizer and cannot be given")


def model_config(o: TrainOptions, model_values: dict, tokenizer):
    """The model's config object: the given options plus what the tokenizer and sequence length fix."""
    if o.model == "ngram":
        return None
    _, config_cls = model_classes(o.model)
    names = config_fields(o.model)
    values = dict(model_values)
    values["vocab_size"] = tokenizer.vocab_size
    ids = {"pad_token_id": tokenizer.pad_id, "mask_token_id": tokenizer.mask_id, "bos_token_id": tokenizer.bos_id,
           "eos_token_id": tokenizer.eos_id}
    values.update({k: v for k, v in ids.items() if k in names})
    if "max_seq_len" in names and values.get("max_seq_len") is None:
        need = o.seq_len
        if o.model == "encdec":
            from .objectives import target_length
            need = max(o.seq_len, target_length(o.seq_len, o.noise_density, o.mean_span, len(tokenizer.sentinel_ids)))
        values["max_seq_len"] = need
    values = {k: v for k, v in values.items() if k in names}
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the model options do not fit together: {e}") from None


def default_run_dir(kind: str) -> str:
    import time
    return os.path.join("runs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


__all__ = ["ConfigError", "MODELS", "PRESETS", "TrainOptions", "build", "model_classes", "model_config"]
