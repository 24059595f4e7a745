"""Text corpora, the deterministic train/validation split, and the order samples are drawn in.

The built-in corpus is the Python standard library's own source (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, site-packages excluded): every machine with Python has
it, no download. ``--data PATH...`` takes text files and folders instead.

The split depends only on each file's relative path: a file is validation when the first 8
bytes of sha256(relative path) read as a fraction fall under ``val_fraction``. Neither the
file system's order nor any RNG enters. Where that leaves one side empty (one file, a few
files), each document's last ``val_fraction`` of lines becomes validation instead.

Training samples are non-overlapping windows of the tokenised training split, visited in a
fresh permutation per epoch (``numpy.random.default_rng([seed, epoch])``). The state of the
data is one integer, the number of samples drawn so far: sample ``i`` of the run is window
``perm_{i // n}[i % n]``. Rank ``r`` of ``W`` takes, of each global batch, the rows that are
its own (like ``DistributedSampler``), so a run on W processes sees exactly the batches one
process would.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules"}


class DataError(ValueError):
    """Bad data input: a missing path, an empty corpus."""


@dataclass
class Corpus:
    train: list  # [(relative path, text)], sorted by path
    val: list
    description: str
    split_note: str = ""

    @property
    def n_documents(self) -> int:
        return len(self.train) + len(self.val)


def builtin_root() -> str:
    root = sysconfig.get_paths().get("stdlib")
    if not root or not os.path.isdir(root):
        raise DataError(f"the built-in corpus (Python's standard library) was not found at {root!r}; "
                        f"give text with --data PATH")
    return root


def _read_text(path: str, strict: bool) -> Optional[str]:
    """The file's text, or None for a file in a folder that is not UTF-8 text (binary, images)."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:8192]:
        if strict:
            raise DataError(f"--data {path}: not a text file (it holds NUL bytes)")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            return raw.decode("utf-8", errors="replace")
        return None


def _walk(root: str, suffixes: Optional[tuple]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            found.append(os.path.join(dirpath, name))
    return found


def read_documents(paths: Optional[Sequence[str]] = None) -> tuple[list, str]:
    """[(relative path, text)] sorted by relative path, and a description. paths None or
    empty: the built-in corpus. Raises DataError for a missing path or no text at all."""
    docs: dict[str, str] = {}
    if not paths:
        root = builtin_root()
        for path in _walk(root, (".py",)):
            text = _read_text(path, strict=False)
            if text:
                docs[os.path.relpath(path, root).replace(os.sep, "/")] = text
        description = f"built-in: the Python standard library's source ({root})"
    else:
        for p in paths:
            if not os.path.exists(p):
                raise DataError(f"--data {p}: no such file or directory")
        for p in paths:
            if os.path.isdir(p):
                base = os.path.basename(os.path.normpath(p))
                for path in _walk(p, None):
                    text = _read_text(path, strict=False)
                    if text:
                        docs[base + "/" + os.path.relpath(path, p).replace(os.sep, "/")] = text
            else:
                text = _read_text(p, strict=True)
                if text:
                    docs[os.path.basename(p)] = text
        description = "files: " + " ".join(paths)
    docs = {k: v for k, v in docs.items() if v.strip()}
    if not docs:
        where = " ".join(paths) if paths else "the built-in corpus"
        raise DataError(f"no text found in {where} (empty files, or no UTF-8 text files)")
    return sorted(docs.items()), description


def hash_fraction(relpath: str) -> float:
    """A number in [0, 1) fixed by the path alone."""
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_documents(docs: list, val_fraction: float) -> tuple[list, list, str]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    train = [d for d in docs if hash_fraction(d[0]) >= val_fraction]
    val = [d for d in docs if hash_fraction(d[0]) < val_fraction]
    if train and val:
        return train, val, f"by path hash: {len(train)} train / {len(val)} validation files"
    train, val = [], []
    for name, text in docs:  # too few files for a split by file: split each one by lines
        lines = text.splitlines(keepends=True)
        cut = len(lines) - max(1, int(round(len(lines) * val_fraction))) if len(lines) > 1 else len(lines)
        head, tail = "".join(lines[:cut]), "".join(lines[cut:])
        if head.strip():
            train.append((name, head))
        if tail.strip():
            val.append((name, tail))
    if not train:
        raise DataError("the corpus is too small to split into training and validation text")
    if not val:  # one line: validate on the training text (noted)
        val = list(train)
        return train, val, "too small to split: validation uses the training text"
    return train, val, f"each file's last {val_fraction:.0%} of lines is validation ({len(docs)} files)"


def load_corpus(paths: Optional[Sequence[str]] = None, val_fraction: float = 0.05) -> Corpus:
    docs, description = read_documents(paths)
    train, val, note = split_documents(docs, val_fraction)
    return Corpus(train, val, description, note)


@dataclass
class TokenStream:
    """A split as one array of token ids, each document followed by eos."""

    tokens: np.ndarray
    n_bytes: int  # UTF-8 bytes of the text it came from (for bits per byte)
    n_documents: int = 0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_byte(self) -> float:
        return len(self.tokens) / max(1, self.n_bytes)


def tokenize(docs: list, tokenizer) -> TokenStream:
    texts = [text for _, text in docs]
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
    pieces = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for ids in tokenizer.encode_many(texts):
        pieces.append(ids.astype(dtype))
        pieces.append(eos)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return TokenStream(tokens, n_bytes, len(texts))


class WindowSampler:
    """Non-overlapping windows of a token stream in a per-epoch permutation; position = samples drawn."""

    def __init__(self, n_tokens: int, window: int, seed: int):
        self.window = window
        self.n = n_tokens // window
        self.seed = seed
        self._perm_epoch, self._perm = -1, None
        if self.n < 1:
            raise DataError(f"the training text has {n_tokens} tokens, fewer than one window of {window}; "
                            f"use a shorter --seq-len or more text")

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def window_indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            i = start + j
            out[j] = self._permutation(i // self.n)[i % self.n]
        return out

    def epoch_of(self, position: int) -> float:
        return position / self.n


def windows(tokens: np.ndarray, indices: np.ndarray, window: int) -> np.ndarray:
    """(len(indices), window) int64 rows: window i is tokens[i * window : (i + 1) * window]."""
    starts = np.asarray(indices, dtype=np.int64)[:, None] * window
    return tokens[starts + np.arange(window)].astype(np.int64)


def batch_positions(step: int, micro: int, rank: int, world: int, batch: int, accum: int) -> int:
    """The run's sample number of the first row rank `rank` takes in micro-batch `micro` of `step`."""
    return step * batch * accum * world + (micro * world + rank) * batch


def eval_window_indices(n_tokens: int, window: int, max_tokens: int) -> np.ndarray:
    """Evenly spaced non-overlapping windows covering the split (all of them when max_tokens <= 0)."""
    n = n_tokens // window
    if n < 1:
        raise DataError(f"the validation text has {n_tokens} tokens, fewer than one window of {window}")
    k = n if max_tokens <= 0 else max(1, min(n, max_tokens // window))
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


__all__ = ["Corpus", "DataError", "TokenStream", "WindowSampler", "batch_positions", "builtin_root",
           "eval_window_indices", "hash_fraction", "load_corpus", "read_documents", "split_documents", "tokenize",
           "windows"]
