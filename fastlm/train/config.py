"""What a run is: the model kind, its config, the training options, and their presets.

Options come from, lowest priority first: the defaults below, the preset (``--preset``, per
model), a JSON file (``--config FILE``: training options and model options as keys, flat or
under ``"model_config"``), then the command line. Every field of the model's config class
(fastlm.models) is a command-line option (``--n-layer 6``, ``--positions rotary``); the
tokenizer fixes ``vocab_size`` and the special-token ids, and ``max_seq_len`` defaults to what
the sequence length needs.

Every value is checked before any data is read or anything written (``check``): each option
against its rule in ``RULES`` (one table for train, eval and generate: a run that would end
in NaN losses or in a traceback at its final sample is refused at the start instead), then
the options that only make sense together, the device and the backend on it, and the model
options by building the model's config. A refusal is one ``ConfigError`` line naming the
option, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .data import DEFAULT_MAX_DATA_BYTES, check_paths


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
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES  # the most text read, all files together
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
    overwrite: bool = False  # replace a run already in `out` (atomically, at the new run's first checkpoint)
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
                  "peak_tflops", "threads", "out", "activation_checkpointing", "max_data_bytes"}


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
    if name == "max_data_bytes":
        return parse_size(name, value)
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
    check(options, model_values, explicit=cli)
    return options, model_values


def check(o: TrainOptions, model_values: dict, explicit=()) -> None:
    """Everything that can be checked before data is read, a directory written or a model built:
    every value against RULES, the options that only make sense together, the device and the
    backend on it, the model options (by building the model's config), and then the --data
    paths (that they exist; a named file's size against --max-data-bytes: stat, no read).
    ``explicit``: the names given on the command line (an option that does nothing with the
    others is refused only when given there, not when a shared --config file holds it)."""
    def bad(msg):
        raise ConfigError(msg)
    check_values(dataclasses.asdict(o))
    check_values({k: v for k, v in model_values.items() if k not in TOKENIZER_FIELDS})
    for name in explicit:
        if name in ONLY_WITH:
            applies, needs = ONLY_WITH[name]
            if not applies(o):
                bad(f"--{name.replace('_', '-')} applies to {needs} only (this run: --model {o.model}, "
                    f"--tokenizer {o.tokenizer})")
    if o.model == "encdec" and o.seq_len < 4:
        bad(f"--seq-len {o.seq_len} is too short for span denoising (at least 4)")
    if o.model == "ngram" and (o.fsdp or o.compile or o.activation_checkpointing):
        bad("--model ngram is counted, not trained: --fsdp, --compile and --activation-checkpointing do not apply")
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
    for name in TOKENIZER_FIELDS:
        if name in model_values:
            bad(f"--{name.replace('_', '-')} is set by the tokenizer and cannot be given")
    if o.out and os.path.exists(o.out) and not os.path.isdir(o.out):
        bad(f"--out {o.out}: exists and is not a directory")
    device = check_device(o.device)
    check_backend(o.backend, device)
    if o.model != "ngram":  # the config class's own checks (divisibility, names), now rather than after the data
        from .tokenizer import ByteTokenizer
        model_config(o, model_values, ByteTokenizer())  # the vocabulary size does not enter its checks
    check_paths(o.data, o.max_data_bytes)


# ----------------------------------------------------------------------------- the rules

@dataclass(frozen=True)
class Rule:
    """What one option's value must be: ``test(value)``, and the words the error uses for it."""

    test: Callable[[Any], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(low: int, note: str = "") -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}{note}")


def _number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
            note: str = "") -> Rule:
    """A finite number in the interval; NaN and the infinities never pass."""
    def test(v):
        return _is_finite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if high == math.inf:
        text = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(test, text + note)


def _one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(choices))


def _min_bpe_vocab() -> int:
    from .tokenizer import special_names
    return 256 + len(special_names()) + 1  # the bytes, the special tokens and at least one merge


_PROBABILITY = _number(0, 1, low_open=True, high_open=True)
_SIZE = _integer(1)

# option name -> its rule, for every numeric or named-choice option of train (TrainOptions and
# the model configs' fields), eval and generate (the same names mean the same there).
RULES: dict[str, Rule] = {
    # data and tokenizer
    "max_data_bytes": _integer(1, " (bytes; K, M, G, T suffixes are powers of 1024)"),
    "val_fraction": _number(0, 1, low_open=True, high_open=True),
    "tokenizer": _one_of("byte", "bpe"),
    "bpe_vocab_size": _integer(_min_bpe_vocab(), " (the 256 bytes, the special tokens and at least one merge)"),
    # batches and optimisation
    "seq_len": _SIZE, "batch_size": _SIZE, "grad_accum": _SIZE, "steps": _SIZE,
    "lr": _number(0, low_open=True),
    "min_lr_ratio": _number(0, 1),
    "warmup": _integer(0),
    "weight_decay": _number(0),
    "beta1": _number(0, 1, high_open=True),
    "beta2": _number(0, 1, high_open=True),
    "grad_clip": _number(0, note=" (0: off)"),
    "seed": Rule(lambda v: _is_int(v) and 0 <= v < 2 ** 64, "an integer in [0, 2^64)"),
    # objectives
    "mlm_probability": _PROBABILITY,
    "noise_density": _PROBABILITY,
    "mean_span": _number(1),
    "ngram_order": _integer(1),
    # execution
    "backend": _one_of("auto", "torch", "triton", "cuda"),
    "threads": _integer(0, " (0: all cores but one)"),
    # bookkeeping
    "eval_every": _SIZE, "save_every": _SIZE, "log_every": _SIZE,
    "eval_tokens": _integer(0, " (0: the whole split)"),
    "keep": _integer(1, " (checkpoints kept)"),
    "stop_after": _integer(0, " (0: never)"),
    "peak_tflops": _number(0, note=" (0: from the device table)"),
    # sampling (train's final sample, and generate)
    "sample_tokens": _integer(0),
    "max_new_tokens": _integer(0),
    "num_samples": _integer(1),
    "temperature": _number(0, note=" (0: greedy)"),
    "top_k": _integer(0, " (0: off)"),
    "top_p": _number(0, 1, low_open=True, note=" (1: off)"),
    # eval
    "max_tokens": _integer(0, " (0: all)"),
    # model config fields (None, where a field allows it, means its default and is not checked)
    "max_seq_len": _SIZE, "n_layer": _SIZE, "n_head": _SIZE, "n_kv_head": _SIZE, "d_model": _SIZE,
    "d_hidden": _SIZE, "d_embed": _SIZE, "n_encoder_layer": _SIZE, "n_decoder_layer": _SIZE,
    "type_vocab_size": _SIZE,
    "norm_eps": _number(0, low_open=True),
    "rotary_base": _number(1, low_open=True),
    "dropout": _number(0, 1, high_open=True),
    "init_std": _number(0, low_open=True),
    "forget_bias": Rule(_is_finite, "a finite number"),
}

# Fields with no rule above, and what checks them instead (booleans need none: parse_value
# accepts only true/false spellings). tests/test_train_validation.py holds every field of
# TrainOptions and of the model configs to RULES, this table or a bool annotation.
CHECKED_ELSEWHERE = {
    "model": "build(): one of MODELS", "preset": "build(): one of the model's PRESETS",
    "data": "data.check_paths(): the paths exist; the size limit", "device": "check_device()",
    "out": "check(): not an existing file", "prompt": "any text",
    "activation": "the model's config class", "head_activation": "the model's config class",
    "norm": "the model's config class", "positions": "the model's config class",
    "vocab_size": "the tokenizer's", "pad_token_id": "the tokenizer's", "mask_token_id": "the tokenizer's",
    "bos_token_id": "the tokenizer's", "eos_token_id": "the tokenizer's",
}

TOKENIZER_FIELDS = ("vocab_size", "pad_token_id", "mask_token_id", "bos_token_id", "eos_token_id")

# options that do nothing unless another is set: (does it apply to these options?, what it needs)
ONLY_WITH: dict[str, tuple[Callable[[TrainOptions], bool], str]] = {
    "bpe_vocab_size": (lambda o: o.tokenizer == "bpe", "--tokenizer bpe"),
    "mlm_probability": (lambda o: o.model == "bert", "--model bert"),
    "noise_density": (lambda o: o.model == "encdec", "--model encdec"),
    "mean_span": (lambda o: o.model == "encdec", "--model encdec"),
    "ngram_order": (lambda o: o.model == "ngram", "--model ngram"),
}


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_values(values: dict) -> None:
    """Each value against its rule (names without one, and None, pass): the first that fails
    is a ConfigError naming the option, the value and what is allowed."""
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is None or value is None:
            continue
        if not rule.test(value):
            raise ConfigError(f"--{name.replace('_', '-')} {_show(value)}: must be {rule.allowed}")


def check_device(name: str, flag: str = "--device"):
    """The torch.device ``name`` means here ("auto": CUDA if present, else the CPU), or a
    ConfigError when it is not a device name or the device is not on this machine."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag} {name!r}: not a device (expected auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name}: no CUDA device is available here (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu or auto")
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= count:
            raise ConfigError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
                              + ("" if device.index is not None else f" (LOCAL_RANK is {index})"))
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{flag} {name}: no MPS device is available here")
        return device
    raise ConfigError(f"{flag} {name!r}: not a device here (expected auto, cpu, cuda, cuda:N or mps)")


def check_backend(name: str, device, flag: str = "--backend") -> None:
    """A ConfigError when backend ``name`` cannot run on ``device`` here (fastlm.backend's reason)."""
    check_values({"backend": name})
    if name in ("auto", "torch"):
        return
    from ..backend import unavailable_reason
    why_not = unavailable_reason(name, device.type)
    if why_not:
        raise ConfigError(f"{flag} {name}: cannot run on {device.type} here: {why_not}")


_SIZE_TEXT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(name: str, value: Any) -> int:
    """A number of bytes: an integer, or a number with a K, M, G or T suffix (powers of 1024:
    ``512M``, ``1.5G``, ``2GiB``)."""
    if _is_int(value):
        return value
    match = _SIZE_TEXT.fullmatch(str(value))
    if not match:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r}: expected a number of bytes (e.g. 500M, 2G)")
    scale = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * scale) if "." in match.group(1) else int(match.group(1)) * scale


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


__all__ = ["ConfigError", "MODELS", "PRESETS", "RULES", "TrainOptions", "build", "check", "check_backend",
           "check_device", "check_values", "model_classes", "model_config", "parse_size"]
