"""Throughput, model FLOPs utilisation, the metrics file and the loss curve."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

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


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def truncate_after(path: str, step: int) -> None:
    """Drop the records of steps after `step` (a resumed run rewrites them)."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        with open(path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r, sort_keys=True) + "\n")


def plot_losses(run_dir: str) -> Optional[str]:
    """RUN/loss.png: training loss per logged step and validation loss; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
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
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def summarize(loss_nats: float, tokens_per_byte: Optional[float]) -> dict:
    """loss, perplexity and (when the tokens per byte are known) bits per byte."""
    out = {"loss": loss_nats, "perplexity": math.exp(min(loss_nats, 700.0))}
    if tokens_per_byte is not None:
        out["bits_per_byte"] = loss_nats / math.log(2) * tokens_per_byte
    return out


__all__ = ["MetricsLog", "PEAK_BF16_TFLOPS", "flops_per_token", "peak_tflops", "plot_losses", "read_metrics",
           "summarize", "truncate_after"]
