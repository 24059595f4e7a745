"""Training objectives: token windows (B, L) -> the model's keyword arguments and a label count.

- ``causal`` (GPT, LSTM): the window is both input and labels (the models shift inside).
- ``mlm`` (BERT): 15% of the non-special tokens are picked; of those 80% become ``<mask>``,
  10% a random token, 10% stay (``fastlm.models.bert.mask_tokens``).
- ``denoise`` (encoder-decoder, T5's span corruption): spans covering ``noise_density`` of
  the window (mean length ``mean_span``) are cut out of the encoder's input, each replaced
  by one sentinel; the decoder writes ``<extra_id_0> span0 <extra_id_1> span1 ... <eos>``.
  The number of noise tokens and spans depends on the window length only, so every row has
  the same source and target lengths and no padding is needed.

Randomness is drawn per sample from a generator seeded by (seed, the sample's number in the
run), never from the global RNG: a batch is the same whichever process, micro-batch or
resumed run draws it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.bert import mask_tokens

IGNORE = -100
OBJECTIVES = {"gpt": "causal", "lstm": "causal", "ngram": "causal", "bert": "mlm", "encdec": "denoise"}


def sample_seed(seed: int, position: int, salt: int = 0) -> int:
    return int(np.random.SeedSequence([seed, position, salt]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def causal(rows: np.ndarray, positions, tokenizer, options) -> tuple[dict, int]:
    x = torch.from_numpy(rows)
    return {"input_ids": x, "labels": x}, rows.shape[0] * (rows.shape[1] - 1)


def mlm(rows: np.ndarray, positions, tokenizer, options) -> tuple[dict, int]:
    specials = torch.from_numpy(tokenizer.special_ids())
    inputs, labels = [], []
    for row, pos in zip(rows, positions):
        x = torch.from_numpy(row)[None]
        g = torch.Generator().manual_seed(sample_seed(options.seed, int(pos), 1))
        special = torch.isin(x, specials)
        inp, lab = mask_tokens(x, tokenizer.mask_id, tokenizer.vocab_size, special_tokens_mask=special,
                               probability=options.mlm_probability, ignore_index=IGNORE, generator=g)
        if not (lab != IGNORE).any() and not special.all():  # never a row without a label
            candidates = (~special[0]).nonzero()[:, 0]
            j = candidates[torch.randint(len(candidates), (1,), generator=g)].item()
            lab[0, j] = x[0, j]
            inp[0, j] = tokenizer.mask_id
        inputs.append(inp)
        labels.append(lab)
    labels = torch.cat(labels)
    return {"input_ids": torch.cat(inputs), "labels": labels}, int((labels != IGNORE).sum())


def span_counts(length: int, density: float, mean_span: float, n_sentinels: int) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length` (T5's rounding)."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    spans = max(1, int(round(noise / mean_span)))
    return noise, min(spans, noise, length - noise, n_sentinels)


def target_length(length: int, density: float, mean_span: float, n_sentinels: int) -> int:
    noise, spans = span_counts(length, density, mean_span, n_sentinels)
    return noise + spans + 1


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniformly among such splits."""
    if parts == 1:
        return np.array([total])
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def denoise(rows: np.ndarray, positions, tokenizer, options) -> tuple[dict, int]:
    B, L = rows.shape
    sentinels = tokenizer.sentinel_ids
    noise, spans = span_counts(L, options.noise_density, options.mean_span, len(sentinels))
    srcs, tgts = [], []
    for row, pos in zip(rows, positions):
        rng = np.random.default_rng(sample_seed(options.seed, int(pos), 2))
        noise_len = _segments(noise, spans, rng)
        keep_len = _segments(L - noise, spans, rng)
        src, tgt, at = [], [], 0
        for i in range(spans):  # keep, noise, keep, noise, ...: T5 starts with kept text
            src.extend(row[at:at + keep_len[i]])
            at += keep_len[i]
            src.append(sentinels[i])
            tgt.append(sentinels[i])
            tgt.extend(row[at:at + noise_len[i]])
            at += noise_len[i]
        tgt.append(tokenizer.eos_id)
        srcs.append(src)
        tgts.append(tgt)
    src = torch.tensor(np.array(srcs, dtype=np.int64))
    labels = torch.tensor(np.array(tgts, dtype=np.int64))
    tgt_in = torch.cat([torch.full((B, 1), tokenizer.bos_id, dtype=torch.long), labels[:, :-1]], dim=1)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    return {"src_ids": src, "tgt_ids": tgt_in, "src_mask": src_mask, "labels": labels}, labels.numel()


FUNCTIONS = {"causal": causal, "mlm": mlm, "denoise": denoise}


def make_batch(model_kind: str, rows: np.ndarray, positions, tokenizer, options) -> tuple[dict, int]:
    return FUNCTIONS[OBJECTIVES[model_kind]](rows, positions, tokenizer, options)


__all__ = ["IGNORE", "OBJECTIVES", "causal", "denoise", "make_batch", "mlm", "span_counts", "target_length"]
