"""Shared by tests/test_train_*.py: a small random corpus and tiny training arguments."""

from __future__ import annotations

import hashlib
import json
import os
import random


def write_corpus(root, n_files: int = 24, seed: int = 0, lines: int = 40) -> str:
    """A folder of text files of random 'words' (so there is something to learn and nothing to
    memorise by accident); returns its path."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(60)]
    folder = os.path.join(str(root), "corpus")
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    for i in range(n_files):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(lines))
        name = os.path.join(folder, "sub" if i % 3 == 0 else "", f"doc{i:03d}.txt")
        with open(name, "w") as f:
            f.write(text + "\n")
    return folder


TINY = {
    "gpt": ["--n-layer", "2", "--d-model", "32", "--n-head", "2"],
    "bert": ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--d-hidden", "64"],
    "encdec": ["--n-encoder-layer", "1", "--n-decoder-layer", "1", "--d-model", "32", "--n-head", "2",
               "--d-hidden", "64"],
    "lstm": ["--n-layer", "1", "--d-model", "32"],
    "ngram": ["--ngram-order", "3"],
}


def train_args(model: str, data: str, out: str, steps: int = 4, *extra, tiny: bool = True) -> list:
    return ["--model", model, "--data", data, "--out", out, "--steps", str(steps), "--seq-len", "32",
            "--batch-size", "4", "--eval-every", "2", "--save-every", "2", "--eval-tokens", "512", "--log-every", "1",
            "--sample-tokens", "8", "--backend", "torch", "--no-progress", "--warmup", "1",
            *(TINY[model] if tiny else []), *extra]


def losses(run_dir: str, key: str = "loss") -> list:
    """(step, value of ``key``) of every train record of the run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r[key]) for r in records if r["kind"] == "train"]


def tree(path) -> dict:
    """Every file under path (relative name -> sha256): what "untouched" is checked against."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out
