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

Memory stays bounded by the text itself: all the files read together may hold at most
``max_bytes`` (``--max-data-bytes``, default 1 GiB). A named file larger than that is refused
from its size before anything is read (``check_paths``); every file is read in blocks and
decoded incrementally, so a character device or a pipe (``/dev/zero``, ``/dev/stdin``), which
has no size, is read only up to the limit and then refused. Tokenising goes a chunk of about
``TOKENIZE_CHUNK`` characters at a time (``text_chunks`` cuts only where the tokenizers split
anyway), so the tokens are those of the whole text, without its whole int64 id array.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import stat
import sysconfig
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules"}
DEFAULT_MAX_DATA_BYTES = 1 << 30  # --max-data-bytes: the text read, all files together
READ_BLOCK = 1 << 20  # bytes per read
SNIFF_BYTES = 8192  # a file whose first bytes hold a NUL is binary
TOKENIZE_CHUNK = 1 << 20  # characters per tokenizer call


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


def format_size(n: int) -> str:
    """``1.5 GiB (1610612736 bytes)``: readable, and exact."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _over_limit(where: str, what: str, budget: int, limit: int) -> "DataError":
    others = limit - budget
    if others:
        what += f" after {format_size(others)} of other files"
    return DataError(f"{where}: {what}, over the limit of {format_size(limit)} (--max-data-bytes; raise it to "
                     f"read more)")


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISBLK(mode):
        return "block device"
    return "file"


def _read_head(f, n: int) -> bytes:
    """The first n bytes (fewer at the end): a pipe may return less per read."""
    parts, got = [], 0
    while got < n:
        block = f.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _read_text(path: str, strict: bool, budget: int = DEFAULT_MAX_DATA_BYTES, where: str = "",
               limit: Optional[int] = None) -> tuple[Optional[str], int]:
    """(the file's text, bytes read); text None for a file in a folder that is not UTF-8 text
    (binary, images). strict (a named file): NUL bytes are an error, bad UTF-8 is replaced.

    At most ``budget`` bytes are kept and ``budget + 1`` read (besides the first 8 KiB, read to
    tell text from binary): a regular file larger than the budget is refused from its size
    (in a folder, once its first bytes show it is text), anything else (a device, a pipe) when
    the budget is passed. ``where`` and ``limit`` (the whole corpus's) word the refusal."""
    where = where or f"--data {path}"
    limit = budget if limit is None else limit
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        regular = stat.S_ISREG(st.st_mode)
        if strict and regular and st.st_size > budget:
            raise _over_limit(where, format_size(st.st_size), budget, limit)
        head = _read_head(f, SNIFF_BYTES)
        if b"\0" in head:
            if strict:
                raise DataError(f"{where}: not a text file (it holds NUL bytes)")
            return None, 0
        decoder = codecs.getincrementaldecoder("utf-8")("replace" if strict else "strict")
        parts, n, block = [], 0, head
        try:
            while block:
                parts.append(decoder.decode(block))  # not strict: raises for a file that is not UTF-8
                n += len(block)
                if regular and st.st_size > budget:  # text, and larger than the budget
                    raise _over_limit(where, format_size(st.st_size), budget, limit)
                if n > budget:  # a device or a pipe (or a file that grew while it was read)
                    what = (f"more than {format_size(budget)} read (it grew while it was read)" if regular else
                            f"a {_kind(st.st_mode)} with no size: more than {format_size(budget)} read")
                    raise _over_limit(where, what, budget, limit)
                block = f.read(min(READ_BLOCK, budget - n + 1))
            parts.append(decoder.decode(b"", final=True))
        except UnicodeDecodeError:
            return None, n
    return "".join(parts), n


def check_paths(paths: Optional[Sequence[str]], max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> None:
    """What can be known about --data without reading it: every path exists, and the named
    regular files together fit under max_bytes (folders and devices are held to it as they are
    read)."""
    if not paths:
        return
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"--data {p}: no such file or directory")
    total = 0
    for p in paths:
        st = os.stat(p)
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
            if total > max_bytes:
                what = format_size(st.st_size) if total == st.st_size else \
                    f"{format_size(st.st_size)} brings the named files to {format_size(total)}"
                raise _over_limit(f"--data {p}", what, max_bytes, max_bytes)


def _walk(root: str, suffixes: Optional[tuple]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):  # a deterministic order: which file passes the limit
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            found.append(os.path.join(dirpath, name))
    return found


def read_documents(paths: Optional[Sequence[str]] = None,
                   max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> tuple[list, str]:
    """[(relative path, text)] sorted by relative path, and a description. paths None or
    empty: the built-in corpus. Raises DataError for a missing path, no text at all, or more
    than max_bytes of text read (all files together; reading stops there)."""
    if max_bytes < 1:
        raise DataError(f"--max-data-bytes must be >= 1, got {max_bytes}")
    docs: dict[str, str] = {}
    total = 0

    def add(key: str, path: str, strict: bool, where: str) -> None:
        nonlocal total
        if not strict:  # found in a folder: a pipe or a device there is skipped (opening a pipe waits for a writer)
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    return
            except OSError:  # a dangling link
                return
        text, n = _read_text(path, strict, max_bytes - total, where, max_bytes)
        if text:
            docs[key] = text
            total += n

    if not paths:
        root = builtin_root()
        for path in _walk(root, (".py",)):
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            add(rel, path, False, f"the built-in corpus: {path}")
        description = f"built-in: the Python standard library's source ({root})"
    else:
        check_paths(paths, max_bytes)
        for p in paths:
            if os.path.isdir(p):
                base = os.path.basename(os.path.normpath(p))
                for path in _walk(p, None):
                    add(base + "/" + os.path.relpath(path, p).replace(os.sep, "/"), path, False, f"--data {path}")
            else:
                add(os.path.basename(p), p, True, f"--data {p}")
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


def load_corpus(paths: Optional[Sequence[str]] = None, val_fraction: float = 0.05,
                max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> Corpus:
    docs, description = read_documents(paths, max_bytes)
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


# A cut is safe before a whitespace character that follows a non-whitespace one: a byte-level
# tokenizer splits anywhere, and GPT-2's pre-tokenizer (the BPE's) never puts such a pair in
# one piece (its pieces are whitespace runs, or an optional space then non-whitespace), and no
# piece before the cut looks past it (its lookahead only ends whitespace runs). Python's
# isspace() covers every character the tokenizers' \s matches, so it errs on the safe side.
_CUT_AFTER = re.compile(r"(?<=\S)[ \n]")


def _cut_before(text: str, low: int, high: int) -> int:
    """The largest safe cut p in [low, high] (text[p] is a space or newline, text[p - 1] is
    not whitespace), or -1."""
    best = -1
    for ch in ("\n", " "):
        end = high + 1
        while True:
            p = text.rfind(ch, low, end)
            if p <= best:
                break
            if not text[p - 1].isspace():
                best = p
                break
            end = p
    return best


def text_chunks(text: str, size: int = TOKENIZE_CHUNK):
    """Consecutive pieces of ``text`` that join back into it, each at most about ``size``
    characters, cut only where every tokenizer here splits anyway (before a space or newline
    that follows a non-whitespace character), so encoding the pieces one by one gives exactly
    the tokens of the whole. A stretch with no such place stays whole."""
    start, n = 0, len(text)
    while n - start > size:
        cut = _cut_before(text, start + 1, start + size)
        if cut < 0:
            m = _CUT_AFTER.search(text, start + size + 1)
            if m is None:
                break
            cut = m.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize(docs: list, tokenizer, chunk_chars: int = TOKENIZE_CHUNK) -> TokenStream:
    """The documents' tokens, each document followed by eos, as one array (uint16 when the
    vocabulary allows). The text goes to the tokenizer ``chunk_chars`` characters at a time
    (``text_chunks``): the same tokens as encoding each document whole, with only a chunk's
    int64 ids alive at once."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list = []
    batch: list = []  # chunks of text, and None where a document ends
    batch_chars, n_bytes = 0, 0

    def flush():
        texts = [t for t in batch if t is not None]
        encoded = iter(tokenizer.encode_many(texts) if texts else [])
        for t in batch:
            pieces.append(eos if t is None else next(encoded).astype(dtype))
        batch.clear()

    for _, text in docs:
        for chunk in text_chunks(text, chunk_chars):
            n_bytes += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
            if batch_chars + len(chunk) > chunk_chars:  # short documents share a call, up to chunk_chars
                flush()
                batch_chars = 0
            batch.append(chunk)
            batch_chars += len(chunk)
        batch.append(None)
    flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return TokenStream(tokens, n_bytes, len(docs))


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


__all__ = ["Corpus", "DEFAULT_MAX_DATA_BYTES", "DataError", "TokenStream", "WindowSampler", "batch_positions",
           "builtin_root", "check_paths", "eval_window_indices", "format_size", "hash_fraction", "load_corpus",
           "read_documents", "split_documents", "text_chunks", "tokenize", "windows"]
