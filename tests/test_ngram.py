"""fastlm.train.ngram.KneserNeyLM against a brute-force Kneser-Ney written here with dicts of
tuples straight from the textbook recursion (Chen & Goodman's interpolated modified KN,
continuation counts below the highest order, KenLM's raw counts for n-grams that start
with BOS), on small random corpora; normalisation at every order, nll, save/load, file
damage and generation."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch

from fastlm.train.ngram import KneserNeyLM


class BruteKN:
    """Interpolated Kneser-Ney, written for clarity: every probability recomputed from dicts."""

    def __init__(self, docs, order, V, discount=None):
        self.N, self.V, self.BOS = order, V, V
        raw = {n: Counter() for n in range(1, order + 1)}
        for d in docs:
            s = (V,) + tuple(int(t) for t in d)
            for i in range(len(s)):
                for n in range(1, order + 1):
                    g = s[i:i + n]
                    if len(g) == n and g != (V,):
                        raw[n][g] += 1
        self.adj = {}
        for n in range(1, order + 1):
            if n == order:
                self.adj[n] = dict(raw[n])
                continue
            left = Counter(g[1:] for g in raw[n + 1])  # distinct left extensions of each n-gram
            self.adj[n] = {g: (c if g[0] == V else left[g]) for g, c in raw[n].items()}
        self.D = {}
        for n in range(1, order + 1):
            if discount is not None:
                self.D[n] = (discount,) * 3
                continue
            nk = Counter(self.adj[n].values())
            y = nk[1] / (nk[1] + 2 * nk[2]) if nk[1] else None
            ds = []
            for k in (1, 2, 3):
                d = k - (k + 1) * y * nk[k + 1] / nk[k] if (y is not None and nk[k]) else None
                ds.append(d if d is not None and 0 < d <= k else (y if y is not None else 0.5))
            self.D[n] = tuple(ds)

    def p(self, n, h, w):
        if n == 0:
            return 1.0 / self.V
        entries = {g[-1]: a for g, a in self.adj[n].items() if g[:-1] == h}
        total = sum(entries.values())
        if total == 0:
            return self.p(n - 1, h[1:], w)
        d = lambda a: self.D[n][min(a, 3) - 1]  # noqa: E731
        gamma = sum(d(a) for a in entries.values()) / total
        a = entries.get(w, 0)
        return max(a - d(a), 0) / total * (a > 0) + gamma * self.p(n - 1, h[1:], w)

    def prob(self, context, w):
        ctx = tuple(context)
        if self.BOS in ctx:
            ctx = ctx[len(ctx) - 1 - ctx[::-1].index(self.BOS):]
        ctx = ctx[max(0, len(ctx) - (self.N - 1)):]
        return self.p(len(ctx) + 1, ctx, w)


def zipf_docs(rng, V, lengths, alpha=1.1):
    """Documents of ids drawn from a Zipf-like distribution (so counts of 1, 2, 3, 4 all occur)."""
    p = 1.0 / np.arange(1, V + 1) ** alpha
    p /= p.sum()
    perm = rng.permutation(V)
    return [perm[rng.choice(V, size=n, p=p)].tolist() for n in lengths]


@pytest.fixture
def rng():
    return np.random.default_rng(torch.initial_seed())


def random_contexts(rng, model, docs, k=12):
    """Contexts of every length: from the corpus (seen), random (mostly unseen), with BOS."""
    out = [[], [model.bos_id]]
    for _ in range(k):
        d = docs[rng.integers(len(docs))]
        n = int(rng.integers(0, model.order + 1))
        i = int(rng.integers(0, max(1, len(d) - n)))
        out.append(list(d[i:i + n]))
        out.append([model.bos_id] + list(d[:n]))
        out.append(rng.integers(0, model.vocab_size, size=n).tolist())
    return out


@pytest.mark.parametrize("order,V,discount", [(1, 7, None), (2, 9, None), (3, 6, None), (4, 11, None),
                                              (3, 8, 0.75), (5, 5, 0.4)])
def test_matches_brute_force(rng, order, V, discount):
    docs = zipf_docs(rng, V, rng.integers(0, 60, size=6).tolist() + [200])
    model = KneserNeyLM(order, V, discount).fit_documents(docs)
    brute = BruteKN(docs, order, V, discount)
    for n in range(1, order + 1):
        assert np.allclose(model.discounts[n - 1], brute.D[n], rtol=1e-12), (n, model.discounts, brute.D)
    for ctx in random_contexts(rng, model, docs):
        got = model.log_probs(ctx).exp().numpy()
        want = np.array([brute.prob(ctx, w) for w in range(V)])
        assert np.allclose(got, want, rtol=1e-10, atol=0), (ctx, np.abs(got - want).max())
        assert abs(want.sum() - 1) < 1e-12  # the brute force itself is a distribution


def test_modified_discounts_are_the_closed_form(rng):
    """On a corpus rich enough that every count of counts is positive, no fallback is taken:
    the discounts are exactly Chen & Goodman's formula (checked here from the stored counts)."""
    docs = zipf_docs(rng, 12, [3000])
    model = KneserNeyLM(3, 12).fit_documents(docs)
    brute = BruteKN(docs, 3, 12)
    for n in (2, 3):
        nk = Counter(brute.adj[n].values())
        assert all(nk[k] > 0 for k in (1, 2, 3, 4)), nk
        y = nk[1] / (nk[1] + 2 * nk[2])
        formula = [k - (k + 1) * y * nk[k + 1] / nk[k] for k in (1, 2, 3)]
        assert np.allclose(model.discounts[n - 1], formula, rtol=1e-12)
        assert all(0 < d <= k for d, k in zip(formula, (1, 2, 3)))


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_sum_to_one_everywhere(rng, order):
    V = 37
    docs = zipf_docs(rng, V, [500, 80, 3])
    model = KneserNeyLM(order, V).fit_documents(docs)
    for ctx in random_contexts(rng, model, docs, k=20) + [[V - 1] * 9, [0, V, 1, 2]]:
        p = model.log_probs(ctx).exp()
        assert p.dtype == torch.float64 and p.shape == (V,)
        assert abs(p.sum().item() - 1) < 1e-12, (ctx, p.sum().item())
        assert (p > 0).all()  # unseen tokens included
    # A token never seen in training still gets probability > 0, everywhere.
    unseen = sorted(set(range(V)) - {t for d in docs for t in d})
    if unseen:
        assert model.prob([docs[0][0]], unseen[0]) > 0


def test_order_one_is_unigram_interpolated_with_uniform(rng):
    V = 20
    docs = zipf_docs(rng, V, [300, 50])
    model = KneserNeyLM(1, V).fit_documents(docs)
    c = Counter(t for d in docs for t in d)
    total = sum(c.values())
    D = model.discounts[0]
    d = lambda a: D[min(a, 3) - 1]  # noqa: E731
    mass = sum(d(a) for a in c.values())  # what discounting took from the seen tokens
    want = np.array([(max(c[w] - d(c[w]), 0) if c[w] else 0) / total + mass / total / V for w in range(V)])
    for ctx in ([], [3, 4], [V, 1]):  # order 1 ignores the context
        assert np.allclose(model.log_probs(ctx).exp().numpy(), want, rtol=1e-12)
    # Plain KN's single discount: (c - D)+ / total + D * types / total / V.
    plain = KneserNeyLM(1, V, discount=0.5).fit_documents(docs)
    want = np.array([max(c[w] - 0.5, 0) / total + 0.5 * len(c) / total / V for w in range(V)])
    assert np.allclose(plain.log_probs([]).exp().numpy(), want, rtol=1e-12)


def test_unfitted_and_empty_models_are_uniform():
    for model in (KneserNeyLM(3, 10), KneserNeyLM(3, 10).fit_documents([[], []])):
        assert torch.allclose(model.log_probs([1, 2]).exp(), torch.full((10,), 0.1, dtype=torch.float64))


def test_documents_do_not_share_ngrams(rng):
    a, b = [1, 2, 3, 4], [5, 6, 7]
    joined = KneserNeyLM(3, 8).fit_documents([a, b])
    assert joined.num_ngrams() == [7, 7, 5]  # bigrams (BOS 1) (1 2) (2 3) (3 4) (BOS 5) (5 6) (6 7): no (4 5)
    brute = BruteKN([a, b], 3, 8)
    assert (4, 5) not in brute.adj[2] and joined.prob([4], 5) == pytest.approx(brute.prob([4], 5), rel=1e-12)
    # fit(seq) is fit_documents([seq]).
    one = KneserNeyLM(3, 8).fit(torch.tensor(a + b))
    two = KneserNeyLM(3, 8).fit_documents([np.array(a + b)])
    assert torch.equal(one.log_probs([4, 5]), two.log_probs([4, 5]))


@pytest.mark.parametrize("bos", [True, False])
def test_nll_is_the_sum_of_log_probs(rng, bos):
    V = 15
    docs = zipf_docs(rng, V, [400, 100])
    model = KneserNeyLM(4, V).fit_documents(docs)
    seq = zipf_docs(rng, V, [60])[0] + rng.integers(0, V, size=10).tolist()
    total, count = model.nll(seq, bos=bos)
    assert count == len(seq)
    start = [model.bos_id] if bos else []
    want = sum(-math.log(model.prob(start + seq[:i], t)) for i, t in enumerate(seq))
    assert total == pytest.approx(want, rel=1e-12)
    assert total == pytest.approx(-model.token_log_probs(seq, bos=bos).sum(), rel=1e-12)
    t2, c2 = model.nll_documents([seq[:30], seq[30:]], bos=bos)
    assert c2 == len(seq) and t2 == pytest.approx(model.nll(seq[:30], bos=bos)[0] + model.nll(seq[30:], bos=bos)[0])
    # The training data is likelier than random ids.
    assert model.nll(docs[0])[0] / len(docs[0]) < model.nll(rng.integers(0, V, size=400))[0] / 400


def test_save_load_round_trip(rng, tmp_path):
    V = 23
    docs = zipf_docs(rng, V, [300, 40, 7])
    for discount in (None, 0.6):
        model = KneserNeyLM(4, V, discount).fit_documents(docs)
        model.save(tmp_path / str(discount))
        back = KneserNeyLM.load(tmp_path / str(discount))
        assert (back.order, back.vocab_size, back.discount, back.discounts) == \
            (model.order, model.vocab_size, model.discount, model.discounts)
        assert back.num_ngrams() == model.num_ngrams() and back.num_tokens == model.num_tokens
        for ctx in random_contexts(rng, model, docs):
            assert torch.equal(back.log_probs(ctx), model.log_probs(ctx))
        assert back.nll(docs[1]) == model.nll(docs[1])
    assert not any(name.endswith(".pkl") for name in os.listdir(tmp_path / "None"))


def test_damaged_files_give_errors_naming_them(rng, tmp_path):
    model = KneserNeyLM(3, 11).fit_documents(zipf_docs(rng, 11, [200]))
    model.save(tmp_path / "m")
    path = tmp_path / "m" / "keys_3.npy"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="keys_3.npy.*(corrupted|truncated)"):
        KneserNeyLM.load(tmp_path / "m")
    flipped = bytearray(good)
    flipped[-3] ^= 0x40  # same size, one bit changed in the data
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="keys_3.npy is corrupted: its sha256"):
        KneserNeyLM.load(tmp_path / "m")
    path.write_bytes(good)
    KneserNeyLM.load(tmp_path / "m")  # whole again
    meta = tmp_path / "m" / "kneser_ney.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="kneser_ney.json is corrupted or truncated"):
        KneserNeyLM.load(tmp_path / "m")
    meta.write_text(json.dumps({**json.loads(text), "format": "something else"}))
    with pytest.raises(ValueError, match="kneser_ney.json is not a fastlm.kneser_ney"):
        KneserNeyLM.load(tmp_path / "m")
    os.remove(meta)
    with pytest.raises(ValueError, match="kneser_ney.json not found"):
        KneserNeyLM.load(tmp_path / "m")


def test_generation(rng):
    V = 13
    docs = zipf_docs(rng, V, [500])
    model = KneserNeyLM(3, V).fit_documents(docs)
    prompt = docs[0][:4]
    a = model.generate(prompt, 40, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 40, generator=torch.Generator().manual_seed(3))
    assert a == b and a[:4] == prompt and len(a) == 44 and all(0 <= t < V for t in a)
    assert len(set(a[4:])) > 1
    c = model.generate(prompt, 40, generator=torch.Generator().manual_seed(4))
    assert c != a
    # Greedy: each new token is the argmax given the (BOS +) tokens before it.
    g = model.generate(prompt, 10, temperature=0.0)
    for i in range(4, 14):
        assert g[i] == int(model.log_probs([model.bos_id] + g[:i]).argmax())
    # top_k: each sampled token is among the k likeliest given its context.
    s = model.generate(prompt, 30, temperature=2.0, top_k=2, generator=torch.Generator().manual_seed(5))
    for i in range(4, 34):
        top = model.log_probs([model.bos_id] + s[:i]).topk(2).indices.tolist()
        assert s[i] in top
    # eos stops generation right after it.
    eos = g[6]
    e = model.generate(prompt, 10, temperature=0.0, eos_token_id=eos)
    first = 4 + g[4:].index(eos)
    assert e == g[:first + 1]
    assert model.generate([], 5, temperature=0.0)[:1] == [int(model.log_probs([model.bos_id]).argmax())]


def test_argument_errors():
    with pytest.raises(ValueError, match="order"):
        KneserNeyLM(0, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        KneserNeyLM(3, 0)
    with pytest.raises(ValueError, match="discount"):
        KneserNeyLM(3, 10, discount=1.5)
    model = KneserNeyLM(3, 10)
    with pytest.raises(ValueError, match="document 1 holds token id 10"):
        model.fit_documents([[1, 2], [3, 10]])
    with pytest.raises(TypeError, match="integer"):
        model.fit([1.5, 2.0])
    with pytest.raises(ValueError, match="token_ids holds token id -1"):
        model.nll([1, -1])
    with pytest.raises(ValueError, match="token must be"):
        model.prob([1], 10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1], -2)


@pytest.mark.parametrize("pack", [True, False])  # packed key+position sort, and the argsort path
def test_unique_inverse_matches_numpy(rng, pack, monkeypatch):
    import fastlm.train.ngram as ngram
    from fastlm.train.ngram import _unique_inverse
    base = 7
    if not pack:
        monkeypatch.setattr(ngram, "_PACK_BITS", 0)
    n = 500
    prev = rng.integers(0, 30, size=n)
    last = rng.integers(0, 7, size=n)
    valid = rng.random(n) > 0.2
    uniq, idx, counts = _unique_inverse(prev, last, base, valid)
    want, inverse, want_counts = np.unique((prev * base + last)[valid], return_inverse=True, return_counts=True)
    assert np.array_equal(uniq, want) and np.array_equal(counts, want_counts)
    assert np.array_equal(idx[valid], inverse) and (idx[~valid] == -1).all() and idx.dtype == np.int32


def test_argsort_path_gives_the_same_model(rng, monkeypatch):
    """Keys that do not pack with their positions into 63 bits (large vocabularies, long
    corpora) take the argsort path; force it and compare the whole model."""
    import fastlm.train.ngram as ngram
    docs = zipf_docs(rng, 40, [700, 90, 5])
    packed = KneserNeyLM(4, 40).fit_documents(docs)
    monkeypatch.setattr(ngram, "_PACK_BITS", 0)
    sorted_ = KneserNeyLM(4, 40).fit_documents(docs)
    assert sorted_.num_ngrams() == packed.num_ngrams() and sorted_.discounts == packed.discounts
    for n in range(2, 5):
        assert np.array_equal(sorted_._keys[n], packed._keys[n]) and np.array_equal(sorted_._counts[n],
                                                                                  packed._counts[n])
    assert np.array_equal(sorted_.token_log_probs(docs[1]), packed.token_log_probs(docs[1]))
