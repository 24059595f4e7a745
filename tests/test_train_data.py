"""Corpus, split, sampling order, tokenizers and objectives of fastlm.train."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from fastlm.train import data, objectives
from fastlm.train.config import TrainOptions
from fastlm.train.tokenizer import BPETokenizer, ByteTokenizer

from .train_common import write_corpus


def test_split_is_by_path_hash_not_order_or_content(tmp_path):
    docs, _ = data.read_documents([write_corpus(tmp_path, n_files=60)])
    train, val, note = data.split_documents(docs, 0.2)
    assert train and val and "path hash" in note
    assert {n for n, _ in val} == {n for n, _ in docs if data.hash_fraction(n) < 0.2}
    shuffled = list(docs)
    random.Random(1).shuffle(shuffled)
    changed = [(n, t + "more text") for n, t in shuffled]  # content does not matter, order does not matter
    train2, val2, _ = data.split_documents(changed, 0.2)
    assert [n for n, _ in val2] == [n for n, _ in val] or sorted(n for n, _ in val2) == sorted(n for n, _ in val)
    assert sorted(n for n, _ in train2) == sorted(n for n, _ in train)
    # the fraction is roughly honoured
    assert 0.05 < len(val) / len(docs) < 0.4


def test_builtin_corpus_is_the_standard_library_and_splits_the_same_every_time():
    first = data.load_corpus(None)
    second = data.load_corpus(None)
    names = [n for n, _ in first.train]
    assert "os.py" in names or "os.py" in [n for n, _ in first.val]
    assert not any("site-packages" in n for n in names)
    assert [n for n, _ in first.val] == [n for n, _ in second.val] and len(first.val) > 10
    assert names == sorted(names)
    assert 0.02 < len(first.val) / first.n_documents < 0.1


def test_one_file_is_split_by_lines(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    c = data.load_corpus([str(path)], 0.1)
    assert c.train[0][1].count("\n") == 90 and c.val[0][1].startswith("line 90")


def test_missing_path_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.read_documents([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    (tmp_path / "empty" / "b.bin").write_bytes(b"\0\1\2")
    with pytest.raises(data.DataError, match="no text found"):
        data.read_documents([str(tmp_path / "empty")])


def test_window_sampler_permutes_every_window_once_per_epoch_and_ranks_partition_batches():
    s = data.WindowSampler(n_tokens=1000, window=10, seed=3)
    first = s.window_indices(0, 100)
    assert sorted(first) == list(range(100)) and list(first) != list(range(100))
    assert sorted(s.window_indices(100, 100)) == list(range(100))
    assert list(s.window_indices(37, 5)) == list(first[37:42])
    # two ranks x 2 micro-batches of 3 cover the global batch of one rank's 12 rows
    world, B, A = 2, 3, 2
    one = data.batch_positions(5, 0, 0, 1, B * A * world, 1)
    rows = sorted(data.batch_positions(5, m, r, world, B, A) + j for m in range(A) for r in range(world)
                  for j in range(B))
    assert rows == list(range(one, one + B * A * world))


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "héllo <mask> wörld\n\t" + "".join(chr(random.randint(32, 0x2FFF)) for _ in range(200))
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a<mask>b<extra_id_3>", specials=True)
    assert ids == [97, tok.mask_id, 98, tok.sentinel_ids[3]]
    assert tok.encode("<mask>") == list(b"<mask>")  # training text stays bytes
    assert tok.vocab_size == 320 and len(set(tok.specials.values())) == len(tok.specials)


def test_bpe_tokenizer_trains_round_trips_and_reloads(tmp_path):
    docs, _ = data.read_documents([write_corpus(tmp_path, n_files=10)])
    tok = BPETokenizer.train((t for _, t in docs), vocab_size=500)
    assert tok.vocab_size <= 500 and tok.mask_id != tok.pad_id
    text = docs[3][1] + " unseen ẞ symbols <mask> \n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 1.5  # it learned merges
    assert tok.decode(ids) == text
    assert tok.mask_id not in ids  # "<mask>" inside training text is text
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    again = BPETokenizer.load(str(tmp_path))
    assert again.encode(text) == ids and again.specials == tok.specials
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_mlm_objective_masks_15_percent_of_non_special_tokens():
    tok = ByteTokenizer()
    rows = np.random.default_rng(0).integers(0, 256, size=(64, 128))
    rows[:, 0] = tok.eos_id
    o = TrainOptions()
    batch, n = objectives.mlm(rows, np.arange(64), tok, o)
    labels, inputs = batch["labels"], batch["input_ids"]
    picked = labels != objectives.IGNORE
    assert n == int(picked.sum()) and abs(picked.float().mean().item() - 0.15) < 0.02
    assert not picked[:, 0].any()  # specials are never picked
    assert torch.equal(labels[picked], torch.from_numpy(rows)[picked])
    masked = (inputs == tok.mask_id) & picked
    assert abs(masked.sum().item() / picked.sum().item() - 0.8) < 0.05
    again, _ = objectives.mlm(rows[10:20], np.arange(10, 20), tok, o)  # per-sample: any slicing gives the same
    assert torch.equal(again["input_ids"], inputs[10:20]) and torch.equal(again["labels"], labels[10:20])


def test_span_denoising_writes_back_exactly_what_it_cut():
    tok = ByteTokenizer()
    rows = np.random.default_rng(1).integers(0, 256, size=(8, 100))
    o = TrainOptions()
    batch, n = objectives.denoise(rows, np.arange(8), tok, o)
    sentinels = tok.sentinel_ids
    noise, spans = objectives.span_counts(100, o.noise_density, o.mean_span, len(sentinels))
    assert batch["labels"].shape == (8, noise + spans + 1) and n == batch["labels"].numel()
    assert torch.equal(batch["tgt_ids"][:, 1:], batch["labels"][:, :-1])
    assert (batch["tgt_ids"][:, 0] == tok.bos_id).all()
    for i in range(8):
        src, tgt = batch["src_ids"][i].tolist(), batch["labels"][i].tolist()
        assert tgt[-1] == tok.eos_id and src.count(sentinels[0]) == 1
        fill, current = {}, None
        for t in tgt[:-1]:
            if t in sentinels:
                current = t
                fill[t] = []
            else:
                fill[current].append(t)
        rebuilt = [x for t in src for x in (fill[t] if t in sentinels else [t])]
        assert rebuilt == rows[i].tolist()
        assert len(fill) == spans and all(len(v) >= 1 for v in fill.values())
