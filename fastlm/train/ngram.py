"""KneserNeyLM: an interpolated modified Kneser-Ney n-gram model over token ids, the
count-based baseline fastlm's Transformers are measured against (docs/BASELINES.md).

The model (Chen & Goodman 1998, "An empirical study of smoothing techniques", section 3.4;
the same recursion KenLM's lmplz builds):

    p_n(w | h) = (max(a(h w) - D_n(a(h w)), 0) + gamma_n(h) * p_{n-1}(w | h'))  / a(h .)
    gamma_n(h) = D_n,1 N1(h .) + D_n,2 N2(h .) + D_n,3+ N3+(h .)
    p_0(w)     = 1 / vocab_size

h' is h without its first token, a(h .) the sum of a(h w) over w, Nk(h .) how many w have
a(h w) = k (k or more for 3+). A context never seen at level n (a(h .) = 0) passes
p_{n-1} through unchanged. a is the raw count at the highest order and the continuation
count N1+(. h w) (how many distinct tokens precede h w) below it: a lower order is only
consulted for what the higher ones did not see, so it should measure in how many contexts
a word appears, not how often. The unigram level is interpolated with the uniform
distribution, so every token has probability > 0.

Modified KN, with three discounts per order estimated from the counts of counts n_k of
that order's a (Chen & Goodman's closed form):

    Y = n1 / (n1 + 2 n2),  D1 = 1 - 2Y n2/n1,  D2 = 2 - 3Y n3/n2,  D3+ = 3 - 4Y n4/n3

chosen over plain KN (one discount) because it is what the literature and KenLM report as
the strongest n-gram baseline, at no extra cost here. Where an estimate is undefined (a
count of counts is 0, as on tiny corpora) or falls outside (0, k], D_k falls back to Y
(plain KN's estimate), or 0.5 when there are no singletons. ``discount=d`` instead gives
plain interpolated KN with the single discount d for every count and order.

Sequence starts: each document is preceded by one BOS id (= vocab_size), never predicted,
as KenLM's <s>. The first tokens of a document are predicted from the shorter contexts that
start with BOS (BOS w1 ... w_i), and nothing precedes BOS. n-grams that start with BOS
have no left extension, so at every order they keep their raw count (KenLM's rule); all
the n-grams of one context either start with BOS or do not, so each context's distribution
is still one kind. n-grams never cross a document boundary.

Storage (numpy, no dicts of tuples): the index of an n-gram at order n is its position in
that order's sorted key array; order 1's index is the token id itself (BOS included), and
an n-gram's key is (index of its first n-1 tokens at order n-1) * (vocab_size + 1) + last
token. Keys are int64 for any order and any vocab below 2^31, sorted by context then token,
so one context's entries are a contiguous run (np.searchsorted finds it) and per-context
sums are np.bincount over the key's prefix. Fitting counts each order with one sort
(np.unique) over the token positions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

FORMAT = "fastlm.kneser_ney"
FORMAT_VERSION = 1
CONFIG_FILE = "kneser_ney.json"


def _as_ids(tokens, vocab_size: int, what: str) -> np.ndarray:
    """A 1-D int64 array from a list, tuple, numpy array, 1-D tensor, or bytes."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(tokens), dtype=np.uint8).astype(np.int64)
    elif isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"KneserNeyLM: {what} must hold integer token ids, got dtype {tokens.dtype}")
        arr = tokens.detach().cpu().reshape(-1).numpy().astype(np.int64) if tokens.dim() <= 1 else None
        if arr is None:
            raise ValueError(f"KneserNeyLM: {what} must be 1-D, got shape {list(tokens.shape)}")
    else:
        arr = np.asarray(tokens)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"KneserNeyLM: {what} must hold integer token ids, got {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"KneserNeyLM: {what} must be 1-D, got shape {list(arr.shape)}")
        arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"KneserNeyLM: {what} holds token id {int(bad)} outside [0, vocab_size={vocab_size})")
    return arr


def modified_kn_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the counts (each > 0) of one order, with the fallback described above."""
    n = [int(np.count_nonzero(counts == k)) for k in range(5)]  # n[k]: how many have count k
    y = n[1] / (n[1] + 2 * n[2]) if n[1] > 0 else None
    fallback = y if y is not None else 0.5
    out = []
    for k in (1, 2, 3):
        d = None
        if y is not None and n[k] > 0:
            d = k - (k + 1) * y * n[k + 1] / n[k]
        out.append(d if d is not None and 0.0 < d <= k else fallback)
    return out[0], out[1], out[2]


_PACK_BITS = 63  # key and position share one int64 when they fit in this many bits


def _unique_inverse(prev: np.ndarray, last: np.ndarray, base: int, valid: np.ndarray):
    """The distinct keys prev * base + last over the valid positions (sorted), each position's
    index among them (int32, -1 where not valid), and how often each occurs: np.unique's
    work, written out to hold int32 indices and free temporaries early (memory bounds the
    corpus size). When key and position fit in 63 bits together, they are packed into one
    int64 and sorted in place, several times faster than argsort and a gather."""
    n = len(prev)
    keys = prev.astype(np.int64)
    keys *= base
    keys += last
    sentinel = int(keys.max(initial=0)) + 1  # invalid positions: one group, sorted last, dropped below
    keys[~valid] = sentinel
    pos_bits = max(n - 1, 1).bit_length()
    if sentinel.bit_length() + pos_bits <= _PACK_BITS:
        keys <<= pos_bits
        step = 1 << 22  # in slices: no full-length temporaries
        for s in range(0, n, step):
            keys[s:s + step] |= np.arange(s, min(s + step, n), dtype=np.int64)
        keys.sort()
        perm = np.empty(n, dtype=np.int32)
        for s in range(0, n, step):
            perm[s:s + step] = keys[s:s + step] & ((1 << pos_bits) - 1)
        keys >>= pos_bits
    else:
        perm = np.argsort(keys)
        keys = keys[perm]
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    uniq = keys[first]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, n))
    del keys, starts
    group = np.cumsum(first, dtype=np.int32)
    group -= 1
    del first
    idx = np.empty(n, dtype=np.int32)
    idx[perm] = group
    del perm, group
    if len(uniq) and uniq[-1] == sentinel:
        uniq, counts = uniq[:-1], counts[:-1]
        idx[~valid] = -1
    return uniq, idx, counts


class KneserNeyLM:
    """An order-``order`` interpolated Kneser-Ney model over token ids in [0, vocab_size).

    ``discount=None``: modified KN (D1, D2, D3+ per order from counts of counts);
    ``discount=d`` (0 < d <= 1): plain interpolated KN with that one discount.
    """

    def __init__(self, order: int = 5, vocab_size: int = 256, discount: Optional[float] = None):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 32:
            raise ValueError(f"KneserNeyLM: order must be an int in [1, 32], got {order!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size < 2**31 - 1:
            raise ValueError(f"KneserNeyLM: vocab_size must be an int in [1, 2^31 - 1), got {vocab_size!r}")
        if discount is not None:
            if isinstance(discount, bool) or not isinstance(discount, (int, float)) or not 0.0 < discount <= 1.0:
                raise ValueError(f"KneserNeyLM: discount must be None (modified KN) or a float in (0, 1], "
                                 f"got {discount!r}")
            discount = float(discount)
        self.order = order
        self.vocab_size = vocab_size
        self.discount = discount
        self.bos_id = vocab_size  # never predicted; precedes every document
        self._base = vocab_size + 1
        self.num_tokens = 0
        self.num_documents = 0
        # Per order n (index n; index 0 unused): keys (n >= 2) and adjusted counts a; order 1's
        # counts are dense over token ids. Per-context sums, discounts: see _finish.
        empty = np.zeros(0, dtype=np.int64)
        self._keys: list[Optional[np.ndarray]] = [None, None] + [empty] * (order - 1)
        self._counts: list[Optional[np.ndarray]] = [None, np.zeros(vocab_size, dtype=np.int64)] + [empty] * (order - 1)
        self.discounts: list[tuple[float, float, float]] = []
        self._finish()

    # ------------------------------------------------------------------ fitting

    def fit(self, token_ids) -> "KneserNeyLM":
        """Fit on one document (replacing what was fitted before). Returns self."""
        return self.fit_documents([token_ids])

    def fit_documents(self, documents: Iterable) -> "KneserNeyLM":
        """Fit on a list of documents (each a 1-D sequence of ids); n-grams do not cross
        document boundaries, and each document starts after a BOS. Returns self."""
        docs = [_as_ids(d, self.vocab_size, f"document {i}").astype(np.int32) for i, d in enumerate(documents)]
        N, V, B, bos = self.order, self.vocab_size, self._base, self.bos_id
        flat = np.empty(sum(len(d) + 1 for d in docs), dtype=np.int32)
        at = 0
        for d in docs:
            flat[at] = bos
            flat[at + 1:at + 1 + len(d)] = d
            at += len(d) + 1
        num_documents = len(docs)
        del docs
        M = len(flat)
        if M > 2**31 - 2:
            raise ValueError(f"KneserNeyLM: {M} tokens is more than this implementation indexes (2^31 - 2)")
        self.num_tokens, self.num_documents = M - num_documents, num_documents
        is_bos = flat == bos

        # Order 1: the index of a 1-gram is its token id (BOS = V included, for the contexts).
        # prev[i]: index at order n - 1 of the window flat[i : i + n - 1], -1 where that window
        # is not a valid n-gram (it runs past the end or holds a BOS after its first token).
        prev = flat
        raw = [None, np.bincount(flat, minlength=B)]
        starts_bos = [None, np.arange(B) == bos]  # per order-n entry: does it start with BOS?
        keys: list[Optional[np.ndarray]] = [None, None]
        cont: list[Optional[np.ndarray]] = [None] * (N + 1)
        for n in range(2, N + 1):
            L = max(M - n + 1, 0)  # windows of n tokens
            valid = prev[:L] >= 0
            valid &= ~is_bos[n - 1:n - 1 + L]  # BOS may only be a window's first token
            k, idx, counts = _unique_inverse(prev[:L], flat[n - 1:n - 1 + L], B, valid)
            keys.append(k)
            raw.append(counts)
            starts_bos.append(starts_bos[n - 1][k // B])
            # Continuation counts of order n - 1: each distinct n-gram adds one to its suffix
            # (the window one position later, one token shorter).
            suffix = np.empty(len(k), dtype=np.int64)
            suffix[idx[valid]] = prev[1:L + 1][valid]
            cont[n - 1] = np.bincount(suffix, minlength=len(raw[n - 1]))
            del suffix, valid
            prev = idx
        del prev

        counts_out: list[Optional[np.ndarray]] = [None] * (N + 1)
        for n in range(1, N + 1):
            a = raw[n] if n == N else np.where(starts_bos[n], raw[n], cont[n])
            counts_out[n] = a[:V].astype(np.int64) if n == 1 else a.astype(np.int64)
        self._keys = [None, None] + keys[2:]
        self._counts = counts_out
        self._finish(estimate=True)
        return self

    def _finish(self, estimate: bool = True) -> None:
        """Discounts (unless given) and the per-context sums each query needs."""
        N, B = self.order, self._base
        if estimate:
            self.discounts = []
            for n in range(1, N + 1):
                a = self._counts[n]
                if self.discount is not None:
                    self.discounts.append((self.discount,) * 3)
                else:
                    self.discounts.append(tuple(float(x) for x in modified_kn_discounts(a[a > 0])))
        # _disc[n]: D by count (0, 1, 2, 3+); _total[n] / _gamma[n]: a(h .) and gamma's
        # numerator per context index at order n - 1 (order 1: the one empty context).
        self._disc = [None] + [np.array((0.0,) + tuple(d)) for d in self.discounts]
        self._total: list[Optional[np.ndarray]] = [None] * (N + 1)
        self._gamma: list[Optional[np.ndarray]] = [None] * (N + 1)
        for n in range(1, N + 1):
            a = self._counts[n]
            d = self._disc[n][np.minimum(a, 3)] * (a > 0)
            if n == 1:
                self._total[1] = np.array([a.sum()], dtype=np.float64)
                self._gamma[1] = np.array([d.sum()], dtype=np.float64)
            else:
                ctx = self._keys[n] // B
                size = B if n == 2 else len(self._keys[n - 1])
                self._total[n] = np.bincount(ctx, weights=a.astype(np.float64), minlength=size)
                self._gamma[n] = np.bincount(ctx, weights=d, minlength=size)

    # ------------------------------------------------------------------ queries

    def _lookup(self, n: int, key: np.ndarray) -> np.ndarray:
        """Index of each key at order n (n >= 2), -1 where absent."""
        keys = self._keys[n]
        if keys is None or len(keys) == 0:
            return np.full(key.shape, -1, dtype=np.int64)
        j = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        return np.where(keys[j] == key, j, -1)

    def _count_of(self, n: int, ctx: np.ndarray, w: np.ndarray) -> np.ndarray:
        if n == 1:
            return self._counts[1][w]
        j = self._lookup(n, ctx * self._base + w)
        return np.where(j >= 0, self._counts[n][np.maximum(j, 0)], 0)

    def _context(self, context) -> np.ndarray:
        """The context as ids: cut after its last BOS (a BOS starts a document), at most order - 1 long."""
        ctx = _as_ids(context, self.vocab_size + 1, "context")
        b = np.flatnonzero(ctx == self.bos_id)
        if len(b):
            ctx = ctx[b[-1]:]
        return ctx[len(ctx) - min(len(ctx), self.order - 1):]

    def _probs(self, context) -> np.ndarray:
        ctx = self._context(context)
        V, B = self.vocab_size, self._base
        p = np.full(V, 1.0 / V)
        a = self._counts[1]
        if self._total[1][0] > 0:
            p = (np.maximum(a - self._disc[1][np.minimum(a, 3)], 0) + self._gamma[1][0] * p) / self._total[1][0]
        for n in range(2, len(ctx) + 2):
            h = ctx[len(ctx) - (n - 1):]
            c = int(h[0])  # its index, order by order
            for j in range(1, len(h)):
                c = int(self._lookup(j + 1, np.array([c * B + h[j]]))[0])
                if c < 0:
                    break
            if c < 0 or self._total[n][c] == 0:
                continue  # an unseen context passes the lower order through
            keys = self._keys[n]
            lo, hi = np.searchsorted(keys, [c * B, (c + 1) * B])
            w = keys[lo:hi] - c * B
            cnt = self._counts[n][lo:hi]
            total = self._total[n][c]
            p = p * (self._gamma[n][c] / total)
            p[w] += np.maximum(cnt - self._disc[n][np.minimum(cnt, 3)], 0) / total
        return p

    def log_probs(self, context: Sequence[int] = ()) -> torch.Tensor:
        """log p(w | context) for every w, a float64 tensor (vocab_size,). The context's last
        order - 1 ids count; a leading bos_id marks a document start (ids before a BOS are
        dropped)."""
        return torch.from_numpy(np.log(self._probs(context)))

    def prob(self, context: Sequence[int], token: int) -> float:
        """p(token | context), context as in log_probs."""
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < self.vocab_size:
            raise ValueError(f"KneserNeyLM.prob: token must be an int in [0, {self.vocab_size}), got {token!r}")
        return float(self._probs(context)[int(token)])

    def token_log_probs(self, token_ids, bos: bool = True) -> np.ndarray:
        """log p of each token given the order - 1 tokens before it (float64 array). bos=True:
        the sequence is a document start (the first tokens see BOS + what precedes them);
        bos=False: the first tokens see only the shorter context available."""
        toks = _as_ids(token_ids, self.vocab_size, "token_ids")
        seq = np.concatenate([[self.bos_id], toks]) if bos else toks
        first = 1 if bos else 0
        N, V, B = self.order, self.vocab_size, self._base
        L = len(seq)
        pos = np.arange(first, L)
        w = seq[first:]
        a = self._counts[1][w]
        p = np.full(len(pos), 1.0 / V)
        if self._total[1][0] > 0:
            p = (np.maximum(a - self._disc[1][np.minimum(a, 3)], 0) + self._gamma[1][0] * p) / self._total[1][0]
        idx = seq  # index at order n - 1 of the window seq[i : i + n - 1]
        for n in range(2, N + 1):
            if n > 2:
                prev = idx[:L - n + 2]
                nxt = self._lookup(n - 1, np.maximum(prev, 0) * B + seq[n - 2:])
                idx = np.where(prev >= 0, nxt, -1)
            start = pos - (n - 1)  # the context of seq[p] at order n: seq[p - n + 1 : p]
            m = np.flatnonzero(start >= 0)
            if len(m) == 0:
                break
            c = idx[start[m]]
            seen = c >= 0
            m, c = m[seen], c[seen]
            total = self._total[n][c]
            seen = total > 0
            m, c, total = m[seen], c[seen], total[seen]
            cnt = self._count_of(n, c, w[m])
            p[m] = (np.maximum(cnt - self._disc[n][np.minimum(cnt, 3)], 0) + self._gamma[n][c] * p[m]) / total
        return np.log(p)

    def nll(self, token_ids, bos: bool = True) -> tuple[float, int]:
        """(total negative log-likelihood in nats, number of tokens scored): every token, each
        given its preceding order - 1 tokens (bos as in token_log_probs)."""
        lp = self.token_log_probs(token_ids, bos=bos)
        return float(-lp.sum()) + 0.0, int(len(lp))  # + 0.0: no -0.0 for an empty sequence

    def nll_documents(self, documents: Iterable, bos: bool = True) -> tuple[float, int]:
        """nll summed over documents, each scored from its own start."""
        total, count = 0.0, 0
        for d in documents:
            t, c = self.nll(d, bos=bos)
            total += t
            count += c
        return total, count

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 eos_token_id: Optional[int] = None, bos: bool = True) -> list[int]:
        """The prompt followed by up to max_new_tokens sampled tokens (a list of ids), through
        fastlm.models.gpt.sample (temperature 0: greedy). bos=True: the prompt starts a
        document. Stops after eos_token_id when given."""
        from ..models.gpt import sample
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"KneserNeyLM.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        out = [int(t) for t in _as_ids(prompt_ids, self.vocab_size, "prompt_ids")]
        ctx = ([self.bos_id] if bos else []) + out
        for _ in range(max_new_tokens):
            logits = self.log_probs(ctx[len(ctx) - min(len(ctx), self.order - 1):])
            nxt = int(sample(logits[None], temperature, top_k, top_p, generator)[0])
            out.append(nxt)
            ctx.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
        return out

    def num_ngrams(self) -> list[int]:
        """How many distinct n-grams each order stores (order 1: tokens seen)."""
        return [int(np.count_nonzero(self._counts[1]))] + [len(self._keys[n]) for n in range(2, self.order + 1)]

    # ------------------------------------------------------------------ files

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"counts_1": self._counts[1]}
        for n in range(2, self.order + 1):
            out[f"keys_{n}"] = self._keys[n]
            out[f"counts_{n}"] = self._counts[n]
        return out

    def save(self, directory) -> None:
        """Write kneser_ney.json (settings, discounts, and each array's file, dtype, shape and
        sha256) and one .npy file per array into directory. No pickle."""
        os.makedirs(directory, exist_ok=True)
        files = {}
        for name, arr in self._arrays().items():
            arr = np.ascontiguousarray(arr, dtype=np.int64)
            fname = f"{name}.npy"
            with open(os.path.join(directory, fname), "wb") as f:
                np.save(f, arr, allow_pickle=False)
            files[name] = {"file": fname, "dtype": "int64", "shape": list(arr.shape),
                           "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "order": self.order, "vocab_size": self.vocab_size,
                "discount": self.discount, "discounts": [list(d) for d in self.discounts],
                "num_tokens": self.num_tokens, "num_documents": self.num_documents, "arrays": files}
        tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(directory, CONFIG_FILE))

    @classmethod
    def load(cls, directory) -> "KneserNeyLM":
        """Read a model written by save; a missing, truncated or corrupted file raises
        ValueError naming it."""
        path = os.path.join(directory, CONFIG_FILE)
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"KneserNeyLM.load: {path} not found (not a saved KneserNeyLM directory)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"KneserNeyLM.load: {path} is corrupted or truncated: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"KneserNeyLM.load: {path} is not a {FORMAT} version {FORMAT_VERSION} file")
        try:
            model = cls(meta["order"], meta["vocab_size"], meta["discount"])
            discounts = [tuple(float(x) for x in d) for d in meta["discounts"]]
            entries = meta["arrays"]
            num_tokens, num_documents = int(meta["num_tokens"]), int(meta["num_documents"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"KneserNeyLM.load: {path} is corrupted: {type(e).__name__}: {e}") from None
        if len(discounts) != model.order or any(len(d) != 3 for d in discounts):
            raise ValueError(f"KneserNeyLM.load: {path} is corrupted: {len(discounts)} discount triples for "
                             f"order {model.order}")
        arrays = {}
        for name in model._arrays():
            if name not in entries:
                raise ValueError(f"KneserNeyLM.load: {path} is corrupted: it lists no array {name!r}")
            e = entries[name]
            fpath = os.path.join(directory, str(e.get("file", "")))
            try:
                arr = np.load(fpath, allow_pickle=False)
            except FileNotFoundError:
                raise ValueError(f"KneserNeyLM.load: {fpath} is missing") from None
            except Exception as err:  # numpy raises ValueError/EOFError/OSError for damaged files
                raise ValueError(f"KneserNeyLM.load: {fpath} is corrupted or truncated: {err}") from None
            if str(arr.dtype) != e.get("dtype") or list(arr.shape) != e.get("shape"):
                raise ValueError(f"KneserNeyLM.load: {fpath} is corrupted or truncated: dtype {arr.dtype} shape "
                                 f"{list(arr.shape)}, expected {e.get('dtype')} {e.get('shape')}")
            if hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() != e.get("sha256"):
                raise ValueError(f"KneserNeyLM.load: {fpath} is corrupted: its sha256 does not match {path}")
            arrays[name] = arr
        model._counts[1] = arrays["counts_1"]
        if model._counts[1].shape != (model.vocab_size,):
            raise ValueError(f"KneserNeyLM.load: {directory} is corrupted: counts_1 has shape "
                             f"{list(model._counts[1].shape)}, expected [{model.vocab_size}]")
        for n in range(2, model.order + 1):
            model._keys[n], model._counts[n] = arrays[f"keys_{n}"], arrays[f"counts_{n}"]
            if model._keys[n].shape != model._counts[n].shape:
                raise ValueError(f"KneserNeyLM.load: {directory} is corrupted: keys_{n} and counts_{n} differ in "
                                 f"length")
        model.discounts = discounts
        model.num_tokens, model.num_documents = num_tokens, num_documents
        model._finish(estimate=False)
        return model

    def __repr__(self) -> str:
        kind = "modified" if self.discount is None else f"plain, D={self.discount}"
        return (f"KneserNeyLM(order={self.order}, vocab_size={self.vocab_size}, {kind}; "
                f"{self.num_tokens} tokens in {self.num_documents} documents, n-grams {self.num_ngrams()})")
