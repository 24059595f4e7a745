"""Throughput, model FLOPs utilisation, the metrics file and the loss curve.

RUN/metrics.jsonl and ``fastlm eval --json`` are standard JSON (RFC 8259 has no NaN or
Infinity): a value that is not finite is written as ``null`` and named, with its value as a
string, in the record's ``"nonfinite"`` mapping, e.g. ``{"loss": null, "nonfinite": {"loss":
"NaN"}, ...}`` ("NaN", "Infinity", "-Infinity"; nested mappings get their own). Any strict
parser reads the files; ``read_metrics`` / ``loads_record`` put the floats back.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from .checkpoint import CheckpointError, write_text_atomic

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIE": 756.0, "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
}


def peak_tflops(device, override: float = 0.0) -> Optional[float]:
    """The device's bf16 dense peak: --peak-tflops if given, else the table; None for CPUs and
    GPUs not in the table (then no MFU is shown)."""
    if override and override > 0:
        return float(override)
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name(device).upper()
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific first
        if all(part in name for part in key.split()):
            return value
    return None


def flops_per_token(model, kind: str, config, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (N: parameters except position tables) plus attention's
    12 * layers * d_model * seq_len (PaLM's appendix B)."""
    n = sum(p.numel() for name, p in model.named_parameters()
            if not any(t in name for t in ("wpe.", "position_embeddings.", "pos.")))
    attn = 0.0
    if kind in ("gpt", "bert"):
        attn = 12.0 * config.n_layer * config.d_model * seq_len
    elif kind == "encdec":
        attn = 12.0 * (config.n_encoder_layer + 2 * config.n_decoder_layer) * config.d_model * seq_len
    return 6.0 * n + attn


NONFINITE = "nonfinite"
_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_name(x: float) -> str:
    return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")


def _strict(value):
    """value with every non-finite float replaced: null + the mapping's "nonfinite" entry in a
    mapping, the name as a string in a list."""
    if isinstance(value, dict):
        out, flagged = {}, {}
        for k, v in value.items():
            if k == NONFINITE:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                out[k], flagged[k] = None, _float_name(v)
            else:
                out[k] = _strict(v)
        if flagged:
            out[NONFINITE] = flagged
        return out
    if isinstance(value, (list, tuple)):
        return [_float_name(v) if isinstance(v, float) and not math.isfinite(v) else _strict(v) for v in value]
    return value


def _restore(value):
    if isinstance(value, dict):
        flagged = value.get(NONFINITE)
        out = {k: _restore(v) for k, v in value.items() if k != NONFINITE or not isinstance(flagged, dict)}
        if isinstance(flagged, dict):
            for k, name in flagged.items():
                if out.get(k) is None and name in _NAMES:
                    out[k] = _NAMES[name]
        return out
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def dumps_strict(record, **kwargs) -> str:
    """json.dumps that any JSON parser accepts: non-finite floats as described above."""
    return json.dumps(_strict(record), allow_nan=False, **kwargs)


def loads_record(text: str):
    """A record written by dumps_strict (or by fastlm before it, bare NaN included), with
    its non-finite floats back."""
    return _restore(json.loads(text))


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (rank 0 only); ``path`` follows
    the run when an --overwrite run takes its name."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled

    def move(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = dumps_strict(record, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)

    def read(self) -> list[dict]:
        return read_metrics(self.path)


class MetricsError(CheckpointError):
    """A line of metrics.jsonl that is not JSON (other than a last line cut short)."""


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, non-finite values restored. A last line without its
    newline that does not parse is a write cut short by a kill: skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            out.append(loads_record(text))
        except ValueError as e:
            if n == len(lines) and not line.endswith("\n"):
                break
            raise MetricsError(f"{path}: line {n} is not JSON ({e})") from None
    return out


def truncate_after(path: str, step: int) -> None:
    """Drop the records of steps after `step` (a resumed run rewrites them) and a last line
    cut short; the file is replaced atomically (a kill meanwhile leaves the old one)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"truncate_after: step must be a non-negative integer, got {step!r}")
    if not os.path.exists(path):
        return
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = "".join(dumps_strict(r, sort_keys=True) + "\n" for r in kept)
    if new != text:
        write_text_atomic(path, new)


def plot_losses(run_dir: str) -> Optional[str]:
    """RUN/loss.png: training loss per logged step and validation loss; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    try:
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    except MetricsError:
        return None  # a damaged history is reported where it matters (resume), not mid-run
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val" and "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, "loss.png")
    tmp = os.path.join(run_dir, ".tmp-loss.png")  # .tmp-*: removed by the next save if a kill leaves it
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def summarize(loss_nats: float, tokens_per_byte: Optional[float]) -> dict:
    """loss, perplexity and (when the tokens per byte are known) bits per byte."""
    try:
        perplexity = math.exp(loss_nats)
    except OverflowError:  # past e^709: infinite as a float, written as such (null + "nonfinite")
        perplexity = math.inf
    out = {"loss": loss_nats, "perplexity": perplexity}
    if tokens_per_byte is not None:
        out["bits_per_byte"] = loss_nats / math.log(2) * tokens_per_byte
    return out


__all__ = ["MetricsError", "MetricsLog", "NONFINITE", "PEAK_BF16_TFLOPS", "dumps_strict", "flops_per_token",
           "loads_record", "peak_tflops", "plot_losses", "read_metrics", "summarize", "truncate_after"]
