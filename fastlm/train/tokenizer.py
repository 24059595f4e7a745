"""Tokenizers: byte-level (the default, needs no files) and BPE (trained with the `tokenizers` library).

Both carry the special tokens every objective needs, with the same names:
``<pad>``, ``<bos>``, ``<eos>``, ``<mask>`` and the sentinels ``<extra_id_0>`` ... used by the
encoder-decoder's span denoising (T5's names). ``encode(text, specials=True)`` turns those
strings into their ids (prompts can hold ``<mask>`` or ``<extra_id_0>``); training text is
encoded with ``specials=False``, so a file that happens to contain "<mask>" stays bytes.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>")
N_SENTINELS = 60  # byte-level: 256 + 4 + 60 = 320 ids, a multiple of 64


def special_names(n_sentinels: int = N_SENTINELS) -> list[str]:
    return list(SPECIALS) + [f"<extra_id_{i}>" for i in range(n_sentinels)]


class Tokenizer:
    """The interface both tokenizers share."""

    kind = "?"
    vocab_size: int
    specials: dict  # name -> id

    @property
    def pad_id(self) -> int:
        return self.specials["<pad>"]

    @property
    def bos_id(self) -> int:
        return self.specials["<bos>"]

    @property
    def eos_id(self) -> int:
        return self.specials["<eos>"]

    @property
    def mask_id(self) -> int:
        return self.specials["<mask>"]

    @property
    def sentinel_ids(self) -> list[int]:
        return [self.specials[n] for n in sorted((n for n in self.specials if n.startswith("<extra_id_")),
                                                 key=lambda n: int(n[10:-1]))]

    def special_ids(self) -> np.ndarray:
        return np.array(sorted(self.specials.values()), dtype=np.int64)

    def encode(self, text: str, specials: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def decode(self, ids: Iterable[int], skip_specials: bool = False) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> dict:
        """Write what loading needs into directory; return the JSON description."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are the UTF-8 bytes; the special tokens follow."""

    kind = "byte"

    def __init__(self, n_sentinels: int = N_SENTINELS):
        names = special_names(n_sentinels)
        self.specials = {name: 256 + i for i, name in enumerate(names)}
        self.names = {i: n for n, i in self.specials.items()}
        self.vocab_size = 256 + len(names)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    def encode(self, text: str, specials: bool = False) -> list[int]:
        if not specials:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int], skip_specials: bool = False) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_specials:
                out.append(self.names.get(i, f"<unk_{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str) -> dict:
        return {"kind": "byte", "n_sentinels": len(self.specials) - len(SPECIALS)}


class BPETokenizer(Tokenizer):
    """Byte-level BPE from the `tokenizers` library (GPT-2's pre-tokenisation), saved as tokenizer.json."""

    kind = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.specials = {}
        for name in special_names(N_SENTINELS):
            i = tok.token_to_id(name)
            if i is not None:
                self.specials[name] = i
        missing = [n for n in SPECIALS if n not in self.specials]
        if missing:
            raise ValueError(f"BPE tokenizer lacks the special tokens {missing}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as e:  # pragma: no cover - an extra
            raise SystemExit("--tokenizer bpe needs the `tokenizers` package: pip install 'fastlm[train]'") from e
        names = special_names(N_SENTINELS)
        if vocab_size < 256 + len(names) + 1:
            raise ValueError(f"--bpe-vocab-size {vocab_size} is too small: it needs more than "
                             f"{256 + len(names)} (the bytes and {len(names)} special tokens)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=names, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, directory: str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        path = os.path.join(directory, cls.FILE)
        try:
            return cls(HFTokenizer.from_file(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot read the BPE tokenizer ({e})") from e

    def encode(self, text: str, specials: bool = False) -> list[int]:
        if specials:
            return self.tok.encode(text).ids
        # Special-token strings inside training text stay text: encode the pieces around them.
        names = [n for n in self.specials if n in text]
        if not names:
            return self.tok.encode(text).ids
        pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        ids: list[int] = []
        for piece in pattern.split(text):
            if piece in self.specials:
                ids.extend(self.tok.encode(piece[0]).ids + self.tok.encode(piece[1:]).ids)
            elif piece:
                ids.extend(self.tok.encode(piece).ids)
        return ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        if any(n in t for t in texts for n in ("<pad>", "<bos>", "<eos>", "<mask>", "<extra_id_")):
            return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int], skip_specials: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_specials)

    def save(self, directory: str) -> dict:
        self.tok.save(os.path.join(directory, self.FILE))
        return {"kind": "bpe", "file": self.FILE}


def load_tokenizer(info: dict, directory: Optional[str] = None) -> Tokenizer:
    """The tokenizer a checkpoint describes (info from its JSON, files from directory)."""
    kind = info.get("kind")
    if kind == "byte":
        return ByteTokenizer(int(info.get("n_sentinels", N_SENTINELS)))
    if kind == "bpe":
        if directory is None:
            raise ValueError("a BPE tokenizer needs its directory")
        return BPETokenizer.load(directory)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'byte' or 'bpe')")


def describe(tok: Tokenizer) -> str:
    return f"{tok.kind} ({tok.vocab_size} ids)"


__all__ = ["BPETokenizer", "ByteTokenizer", "Tokenizer", "load_tokenizer", "special_names"]
