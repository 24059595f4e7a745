"""Error types match torch's (issue 20): a bad call that makes torch raise RuntimeError makes
fastlm raise an exception that is a RuntimeError too (fastlm.ArgumentError, also a
ValueError, or fastlm.ArgumentTypeError, also a TypeError), so ``except RuntimeError`` code
written for torch keeps working; where torch raises ValueError, TypeError or IndexError,
fastlm's error is one as well. Each row of the table makes the same bad call on torch's
function (or module) and on fastlm's: the test checks that torch raises the recorded type
(so a torch that changes shows up here), that fastlm's exception is an instance of it, and
that fastlm's message names the argument at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import fastlm
import fastlm.nn

BACKENDS = ("torch", "triton")


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(shape, generator=g, dtype=dtype)


def _targets(*shape, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(0, classes, shape, generator=g)


def _probs(*shape, seed=0):
    return _randn(*shape, seed=seed + 3).softmax(-1)


@dataclass
class Case:
    id: str
    torch_fn: Callable
    fastlm_fn: Callable
    make: Callable  # () -> (args, kwargs): fresh, identical arguments for each side
    expected: type  # the type torch raises for this call
    names: Optional[str]  # a regex: fastlm's message must name the argument at fault (None: torch's own error)


def _call(id, torch_fn, fastlm_fn, expected, names, *args, **kwargs):
    """A row whose arguments are plain values, made once per side."""
    def make():
        return [a() if callable(a) else a for a in args], {k: v() if callable(v) else v for k, v in kwargs.items()}
    return Case(id, torch_fn, fastlm_fn, make, expected, names)


R, V, T, I = RuntimeError, ValueError, TypeError, IndexError  # noqa: E741

# ----------------------------------------------------------------------------- functions

CE = (F.cross_entropy, fastlm.cross_entropy)
CE_CASES = [
    _call("ce-input-0d", *CE, R, r"\binput\b", lambda: _randn(), lambda: torch.tensor(0)),
    _call("ce-input-int", *CE, R, r"\binput\b", lambda: _targets(4, 5), lambda: _targets(4)),
    _call("ce-target-batch", *CE, V, r"\btarget\b", lambda: _randn(4, 5), lambda: _targets(3)),
    _call("ce-target-rank", *CE, R, r"\btarget\b", lambda: _randn(4, 5), lambda: _targets(4, 2)),
    _call("ce-target-spatial", *CE, R, r"\btarget\b", lambda: _randn(2, 5, 3), lambda: _targets(2, 4)),
    _call("ce-prob-target-shape", *CE, R, r"\btarget", lambda: _randn(4, 5), lambda: _probs(4, 6)),
    _call("ce-target-bool", *CE, R, r"\btarget\b", lambda: _randn(4, 5),
          lambda: torch.zeros(4, dtype=torch.bool)),
    _call("ce-target-out-of-range", *CE, I, r"\btarget\b", lambda: _randn(4, 5), lambda: torch.tensor([0, 1, 5, 2])),
    _call("ce-target-negative", *CE, I, r"\btarget\b", lambda: _randn(4, 5), lambda: torch.tensor([0, -3, 1, 2])),
    _call("ce-weight-shape", *CE, R, r"\bweight\b", lambda: _randn(4, 5), lambda: _targets(4), lambda: _randn(4)),
    _call("ce-weight-int", *CE, R, r"\bweight\b", lambda: _randn(4, 5), lambda: _targets(4),
          lambda: torch.ones(5, dtype=torch.int64)),
    _call("ce-reduction", *CE, V, r"\breduction\b", lambda: _randn(4, 5), lambda: _targets(4), reduction="bogus"),
    _call("ce-label-smoothing-high", *CE, R, r"\blabel_smoothing\b", lambda: _randn(4, 5), lambda: _targets(4),
          label_smoothing=1.5),
    _call("ce-prob-ignore-index", *CE, R, r"\bignore_index\b", lambda: _randn(4, 5), lambda: _probs(4, 5),
          ignore_index=1),
    _call("ce-ignore-index-float", *CE, T, r"\bignore_index\b", lambda: _randn(4, 5), lambda: _targets(4),
          ignore_index=1.5),
    _call("ce-input-list", *CE, T, r"\binput\b", [[0.0, 1.0]], lambda: _targets(1)),
]

LN = (F.layer_norm, fastlm.layer_norm)
LN_CASES = [
    _call("ln-shape", *LN, R, r"\bnormalized_shape\b", lambda: _randn(2, 3, 4), (5,)),
    _call("ln-rank", *LN, R, r"\bnormalized_shape\b", lambda: _randn(4), (2, 4)),
    _call("ln-empty-shape", *LN, R, r"\bnormalized_shape\b", lambda: _randn(2, 4), ()),
    _call("ln-weight-shape", *LN, R, r"\bweight\b", lambda: _randn(2, 4), (4,), lambda: _randn(3)),
    _call("ln-bias-shape", *LN, R, r"\bbias\b", lambda: _randn(2, 4), (4,), lambda: _randn(4), lambda: _randn(5)),
    _call("ln-weight-dtype", *LN, R, r"\bweight\b", lambda: _randn(2, 4), (4,), lambda: _randn(4, dtype=torch.float64)),
    _call("ln-input-int", *LN, R, r"\binput\b", lambda: _targets(2, 4), (4,)),
    _call("ln-shape-float", *LN, T, r"\bnormalized_shape\b", lambda: _randn(2, 4), 4.0),
]

RMS = (F.rms_norm, fastlm.rms_norm)
RMS_CASES = [
    _call("rms-shape", *RMS, R, r"\bnormalized_shape\b", lambda: _randn(2, 3, 4), (5,)),
    _call("rms-rank", *RMS, V, r"\bnormalized_shape\b", lambda: _randn(4), (2, 4)),
    _call("rms-empty-shape", *RMS, R, r"\bnormalized_shape\b", lambda: _randn(2, 4), ()),
    _call("rms-weight-shape", *RMS, R, r"\bweight\b", lambda: _randn(2, 4), (4,), lambda: _randn(3)),
    _call("rms-input-int", *RMS, R, r"\binput\b", lambda: _targets(2, 4), (4,)),
    _call("rms-shape-float", *RMS, T, r"\bnormalized_shape\b", lambda: _randn(2, 4), 4.0),
]

LIN = (F.linear, fastlm.linear)
LIN_CASES = [
    _call("linear-weight-shape", *LIN, R, r"\bweight\b", lambda: _randn(2, 3), lambda: _randn(4, 5)),
    _call("linear-weight-rank", *LIN, R, r"\bweight\b", lambda: _randn(2, 3), lambda: _randn(2, 4, 3)),
    _call("linear-bias-shape", *LIN, R, r"\bbias\b", lambda: _randn(2, 3), lambda: _randn(4, 3), lambda: _randn(5)),
    _call("linear-input-0d", *LIN, R, r"\binput\b", lambda: _randn(), lambda: _randn(4, 3)),
    _call("linear-weight-dtype", *LIN, R, r"\bweight\b", lambda: _randn(2, 3),
          lambda: _randn(4, 3, dtype=torch.float64)),
    _call("linear-bias-dtype", *LIN, R, r"\bbias\b", lambda: _randn(2, 3), lambda: _randn(4, 3),
          lambda: _randn(4, dtype=torch.float64)),
    _call("linear-input-int", *LIN, R, r"\binput\b", lambda: _targets(2, 3), lambda: _randn(4, 3)),
    _call("linear-weight-list", *LIN, T, r"\bweight\b", lambda: _randn(2, 3), [[1.0, 2.0, 3.0]]),
]

LCE = (F.linear_cross_entropy, fastlm.linear_cross_entropy)
LCE_CASES = [
    _call("lce-weight-shape", *LCE, R, r"\blinear_weight\b", lambda: _randn(4, 3), lambda: _randn(5, 6),
          lambda: _targets(4)),
    _call("lce-weight-rank", *LCE, R, r"\blinear_weight\b", lambda: _randn(4, 3), lambda: _randn(3),
          lambda: _targets(4)),
    _call("lce-input-0d", *LCE, R, r"\binput\b", lambda: _randn(), lambda: _randn(5, 3), lambda: _targets(4)),
    _call("lce-target-batch", *LCE, V, r"\btarget\b", lambda: _randn(4, 3), lambda: _randn(5, 3),
          lambda: _targets(3)),
    _call("lce-prob-target-shape", *LCE, R, r"\btarget", lambda: _randn(4, 3), lambda: _randn(5, 3),
          lambda: _probs(4, 6)),
    _call("lce-weight-dtype", *LCE, R, r"\blinear_weight\b", lambda: _randn(4, 3),
          lambda: _randn(5, 3, dtype=torch.float64), lambda: _targets(4)),
    _call("lce-input-int", *LCE, R, r"\binput\b", lambda: _targets(4, 3), lambda: _randn(5, 3), lambda: _targets(4)),
    _call("lce-bias-shape", *LCE, R, r"\blinear_bias\b", lambda: _randn(4, 3), lambda: _randn(5, 3),
          lambda: _targets(4), linear_bias=lambda: _randn(6)),
    _call("lce-class-weight-shape", *LCE, R, r"\bweight\b", lambda: _randn(4, 3), lambda: _randn(5, 3),
          lambda: _targets(4), weight=lambda: _randn(4)),
    _call("lce-target-out-of-range", *LCE, I, r"\btarget\b", lambda: _randn(4, 3), lambda: _randn(5, 3),
          lambda: torch.tensor([0, 7, 1, 2])),
    _call("lce-reduction", *LCE, V, r"\breduction\b", lambda: _randn(4, 3), lambda: _randn(5, 3), lambda: _targets(4),
          reduction="bogus"),
    _call("lce-label-smoothing", *LCE, R, r"\blabel_smoothing\b", lambda: _randn(4, 3), lambda: _randn(5, 3),
          lambda: _targets(4), label_smoothing=2.0),
    _call("lce-prob-ignore-index", *LCE, R, r"\bignore_index\b", lambda: _randn(4, 3), lambda: _randn(5, 3),
          lambda: _probs(4, 5), ignore_index=-100),
]

SDPA = (F.scaled_dot_product_attention, fastlm.scaled_dot_product_attention)


def _qkv(q=(1, 2, 4, 8), k=(1, 2, 6, 8), v=None, dtype=torch.float32):
    v = k if v is None else v
    return lambda: _randn(*q, dtype=dtype), lambda: _randn(*k, dtype=dtype, seed=1), lambda: _randn(*v, seed=2)


SDPA_CASES = [
    _call("sdpa-head-dim", *SDPA, R, r"\bkey\b", *_qkv(k=(1, 2, 6, 4))),
    _call("sdpa-batch", *SDPA, R, r"\bquery\b.*\bkey\b|\bkey\b.*\bquery\b",
          *_qkv(q=(2, 2, 4, 8), k=(3, 2, 6, 8), v=(3, 2, 6, 8))),
    _call("sdpa-heads", *SDPA, R, r"\bheads\b", *_qkv(k=(1, 3, 6, 8), v=(1, 3, 6, 8))),
    _call("sdpa-rank", *SDPA, R, r"\bquery\b", lambda: _randn(8), lambda: _randn(6, 8), lambda: _randn(6, 8)),
    _call("sdpa-dtype", *SDPA, R, r"\bkey\b", lambda: _randn(1, 2, 4, 8),
          lambda: _randn(1, 2, 6, 8, dtype=torch.float64),
          lambda: _randn(1, 2, 6, 8)),
    _call("sdpa-input-int", *SDPA, R, r"\bquery\b", lambda: _targets(1, 2, 4, 8), lambda: _targets(1, 2, 6, 8),
          lambda: _targets(1, 2, 6, 8)),
    _call("sdpa-mask-shape", *SDPA, R, r"\battn_mask\b", *_qkv(), attn_mask=lambda: torch.ones(5, 6, dtype=torch.bool)),
    _call("sdpa-dropout", *SDPA, R, r"\bdropout_p\b", *_qkv(), dropout_p=1.5),
    _call("sdpa-mask-list", *SDPA, T, r"\battn_mask\b", *_qkv(), attn_mask=[1]),
    _call("sdpa-mask-dtype", *SDPA, R, r"\battn_mask\b", *_qkv(),
          attn_mask=lambda: torch.ones(4, 6, dtype=torch.int64)),
]

# ----------------------------------------------------------------------------- modules


def _module_case(id, torch_cls, fastlm_cls, init, expected, names, *args, **kwargs):
    """A row calling forward on a torch module and on fastlm's twin holding the same state."""
    def build(cls):
        torch.manual_seed(0)
        return cls(*init[0], **init[1])

    def make():
        return [a() if callable(a) else a for a in args], {k: v() if callable(v) else v for k, v in kwargs.items()}

    def on(cls):
        module = build(cls)
        return lambda *a, **k: module(*a, **k)

    return Case(id, lambda *a, **k: on(torch_cls)(*a, **k), lambda *a, **k: on(fastlm_cls)(*a, **k), make,
                expected, names)


nn = torch.nn
# A row with names=None: the error is raised by torch itself inside fastlm's forward (the
# attention modules' projections are torch's F.linear), so it is torch's, message and all.
MODULE_CASES = [
    _module_case("LayerNorm-shape", nn.LayerNorm, fastlm.nn.LayerNorm, ((4,), {}), R, r"\bnormalized_shape\b",
                 lambda: _randn(2, 5)),
    _module_case("LayerNorm-int", nn.LayerNorm, fastlm.nn.LayerNorm, ((4,), {}), R, r"\binput\b",
                 lambda: _targets(2, 4)),
    _module_case("RMSNorm-shape", nn.RMSNorm, fastlm.nn.RMSNorm, ((4,), {}), R, r"\bnormalized_shape\b",
                 lambda: _randn(2, 5)),
    _module_case("Linear-shape", nn.Linear, fastlm.nn.Linear, ((3, 4), {}), R, r"\bweight\b", lambda: _randn(2, 5)),
    _module_case("Linear-dtype", nn.Linear, fastlm.nn.Linear, ((3, 4), {}), R, r"\bweight\b",
                 lambda: _randn(2, 3, dtype=torch.float64)),
    _module_case("CrossEntropyLoss-batch", nn.CrossEntropyLoss, fastlm.nn.CrossEntropyLoss, ((), {}), V,
                 r"\btarget\b", lambda: _randn(4, 5), lambda: _targets(3)),
    _module_case("CrossEntropyLoss-weight", nn.CrossEntropyLoss, fastlm.nn.CrossEntropyLoss,
                 ((), {"weight": torch.ones(3)}), R, r"\bweight\b", lambda: _randn(4, 5), lambda: _targets(4)),
    _module_case("CrossEntropyLoss-label-smoothing", nn.CrossEntropyLoss, fastlm.nn.CrossEntropyLoss,
                 ((), {"label_smoothing": 1.5}), R, r"\blabel_smoothing\b", lambda: _randn(4, 5), lambda: _targets(4)),
    _module_case("CrossEntropyLoss-out-of-range", nn.CrossEntropyLoss, fastlm.nn.CrossEntropyLoss, ((), {}), I,
                 r"\btarget\b", lambda: _randn(4, 5), lambda: torch.tensor([0, 9, 1, 2])),
    _module_case("LinearCrossEntropyLoss-shape", nn.LinearCrossEntropyLoss, fastlm.nn.LinearCrossEntropyLoss,
                 ((3, 5), {}), R, r"\blinear_weight\b", lambda: _randn(4, 6), lambda: _targets(4)),
    _module_case("LinearCrossEntropyLoss-batch", nn.LinearCrossEntropyLoss, fastlm.nn.LinearCrossEntropyLoss,
                 ((3, 5), {}), V, r"\btarget\b", lambda: _randn(4, 3), lambda: _targets(2)),
    _module_case("RMSNorm-int", nn.RMSNorm, fastlm.nn.RMSNorm, ((4,), {}), R, r"\binput\b",
                 lambda: _targets(2, 4)),
    _module_case("CrossEntropyLoss-prob-shape", nn.CrossEntropyLoss, fastlm.nn.CrossEntropyLoss, ((), {}), R,
                 r"\btarget", lambda: _randn(4, 5), lambda: _probs(4, 6)),
    _module_case("CrossEntropyLoss-reduction", nn.CrossEntropyLoss, fastlm.nn.CrossEntropyLoss,
                 ((), {"reduction": "bogus"}), V, r"\breduction\b", lambda: _randn(4, 5), lambda: _targets(4)),
    _module_case("LinearCrossEntropyLoss-dtype", nn.LinearCrossEntropyLoss, fastlm.nn.LinearCrossEntropyLoss,
                 ((3, 5), {}), R, r"\blinear_weight\b", lambda: _randn(4, 3, dtype=torch.float64), lambda: _targets(4)),
    _module_case("LinearCrossEntropyLoss-target-bool", nn.LinearCrossEntropyLoss, fastlm.nn.LinearCrossEntropyLoss,
                 ((3, 5), {}), R, r"\btarget\b", lambda: _randn(4, 3), lambda: torch.zeros(4, dtype=torch.bool)),
    _module_case("LinearCrossEntropyLoss-reduction", nn.LinearCrossEntropyLoss, fastlm.nn.LinearCrossEntropyLoss,
                 ((3, 5), {"reduction": "bogus"}), V, r"\breduction\b", lambda: _randn(4, 3), lambda: _targets(4)),
    _module_case("LinearCrossEntropyLoss-out-of-range", nn.LinearCrossEntropyLoss, fastlm.nn.LinearCrossEntropyLoss,
                 ((3, 5), {}), I, r"\btarget\b", lambda: _randn(4, 3), lambda: torch.tensor([0, 1, 9, 2])),
    _module_case("MultiheadAttention-causal", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), R, r"\battn_mask\b", lambda: _randn(2, 4, 8),
                 lambda: _randn(2, 4, 8), lambda: _randn(2, 4, 8), need_weights=False, is_causal=True),
    _module_case("MultiheadAttention-mask-shape", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), R, r"\battn_mask\b", lambda: _randn(2, 4, 8),
                 lambda: _randn(2, 4, 8), lambda: _randn(2, 4, 8), need_weights=False,
                 attn_mask=lambda: torch.ones(5, 5, dtype=torch.bool)),
    _module_case("MultiheadAttention-mask-3d-shape", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), R, r"\battn_mask\b", lambda: _randn(2, 4, 8),
                 lambda: _randn(2, 4, 8), lambda: _randn(2, 4, 8), need_weights=False,
                 attn_mask=lambda: torch.ones(5, 4, 4, dtype=torch.bool)),
    _module_case("MultiheadAttention-weights-mask-shape", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), R, r"\battn_mask\b", lambda: _randn(2, 4, 8),
                 lambda: _randn(2, 4, 8), lambda: _randn(2, 4, 8), need_weights=True,
                 attn_mask=lambda: torch.ones(5, 5, dtype=torch.bool)),
    _module_case("MultiheadAttention-dtype", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), R, None, lambda: _randn(2, 4, 8, dtype=torch.float64),
                 lambda: _randn(2, 4, 8, dtype=torch.float64), lambda: _randn(2, 4, 8, dtype=torch.float64),
                 need_weights=False),
    _module_case("TransformerEncoderLayer-mask-shape", nn.TransformerEncoderLayer, fastlm.nn.TransformerEncoderLayer,
                 ((8, 2, 16), {"batch_first": True, "dropout": 0.0}), R, r"\battn_mask\b", lambda: _randn(2, 4, 8),
                 src_mask=lambda: torch.ones(5, 5, dtype=torch.bool)),
    _module_case("TransformerEncoderLayer-causal", nn.TransformerEncoderLayer, fastlm.nn.TransformerEncoderLayer,
                 ((8, 2, 16), {"batch_first": True, "dropout": 0.0}), R, r"\battn_mask\b", lambda: _randn(2, 4, 8),
                 is_causal=True),
    _module_case("TransformerEncoderLayer-dtype", nn.TransformerEncoderLayer, fastlm.nn.TransformerEncoderLayer,
                 ((8, 2, 16), {"batch_first": True, "dropout": 0.0}), R, None,
                 lambda: _randn(2, 4, 8, dtype=torch.float64)),
]

CASES = CE_CASES + LN_CASES + RMS_CASES + LIN_CASES + LCE_CASES + SDPA_CASES + MODULE_CASES


def _raised(fn, args, kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the point is which type
        return e
    pytest.fail("no exception raised")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_type_matches_torch(case: Case, backend: str):
    args, kwargs = case.make()
    theirs = _raised(case.torch_fn, args, kwargs)
    assert isinstance(theirs, case.expected), f"torch raised {type(theirs).__name__}: {theirs}"
    args, kwargs = case.make()
    with fastlm.use_backend(backend):
        ours = _raised(case.fastlm_fn, args, kwargs)
    assert isinstance(ours, case.expected), \
        f"torch raises {type(theirs).__name__}, fastlm {type(ours).__name__}: {ours}"
    if case.names is not None:
        assert re.search(case.names, str(ours)), f"the message does not name the argument ({case.names}): {ours}"


# torch's MultiheadAttention checks these with ``assert`` (AssertionError, and no check at all
# under ``python -O``); fastlm raises its ArgumentError (a ValueError and a RuntimeError)
# naming the argument, on purpose: no code can rely on catching an assert.
ASSERTING_CASES = [
    _module_case("MultiheadAttention-embed", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), AssertionError, r"\bquery\b", lambda: _randn(2, 4, 6),
                 lambda: _randn(2, 4, 6), lambda: _randn(2, 4, 6), need_weights=False),
    _module_case("MultiheadAttention-query-rank", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), AssertionError, r"\bquery\b", lambda: _randn(2, 2, 4, 8),
                 lambda: _randn(2, 4, 8), lambda: _randn(2, 4, 8), need_weights=False),
    _module_case("MultiheadAttention-key-value", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), AssertionError, r"\bkey\b.*\bvalue\b", lambda: _randn(2, 4, 8),
                 lambda: _randn(2, 5, 8), lambda: _randn(2, 4, 8), need_weights=False),
    _module_case("MultiheadAttention-padding-shape", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), AssertionError, r"\bkey_padding_mask\b", lambda: _randn(2, 4, 8),
                 lambda: _randn(2, 4, 8), lambda: _randn(2, 4, 8), need_weights=False,
                 key_padding_mask=lambda: torch.ones(2, 5, dtype=torch.bool)),
    _module_case("MultiheadAttention-mask-dtype", nn.MultiheadAttention, fastlm.nn.MultiheadAttention,
                 ((8, 2), {"batch_first": True}), AssertionError, r"\battn_mask\b", lambda: _randn(2, 4, 8),
                 lambda: _randn(2, 4, 8), lambda: _randn(2, 4, 8), need_weights=False,
                 attn_mask=lambda: torch.ones(4, 4, dtype=torch.int64)),
    _module_case("TransformerEncoderLayer-shape", nn.TransformerEncoderLayer, fastlm.nn.TransformerEncoderLayer,
                 ((8, 2, 16), {"batch_first": True, "dropout": 0.0}), AssertionError, r"\bquery\b",
                 lambda: _randn(2, 4, 6)),
]


@pytest.mark.parametrize("case", ASSERTING_CASES, ids=[c.id for c in ASSERTING_CASES])
def test_where_torch_asserts_fastlm_raises_argument_error(case: Case):
    args, kwargs = case.make()
    theirs = _raised(case.torch_fn, args, kwargs)
    assert isinstance(theirs, AssertionError), f"torch raised {type(theirs).__name__}: {theirs}"
    args, kwargs = case.make()
    ours = _raised(case.fastlm_fn, args, kwargs)
    assert isinstance(ours, (fastlm.ArgumentError, fastlm.ArgumentTypeError)), f"{type(ours).__name__}: {ours}"
    assert isinstance(ours, RuntimeError)
    assert re.search(case.names, str(ours)), f"the message does not name the argument ({case.names}): {ours}"


def test_error_classes():
    """Each class is a RuntimeError and the type that describes it; all exported from fastlm."""
    assert issubclass(fastlm.ArgumentError, ValueError) and issubclass(fastlm.ArgumentError, RuntimeError)
    assert issubclass(fastlm.ArgumentTypeError, TypeError) and issubclass(fastlm.ArgumentTypeError, RuntimeError)
    assert issubclass(fastlm.ArgumentIndexError, fastlm.ArgumentError)
    assert issubclass(fastlm.ArgumentIndexError, IndexError)
    from fastlm import errors
    assert {"ArgumentError", "ArgumentTypeError", "ArgumentIndexError"} <= set(fastlm.__all__)
    assert fastlm.ArgumentError is errors.ArgumentError


# fastlm's own options (no torch twin to compare with) follow the same rule: a bad value is an
# ArgumentError, a bad type an ArgumentTypeError, so ``except RuntimeError`` covers them too.
OWN_OPTION_CASES = [
    ("ce-z_loss", lambda: fastlm.cross_entropy(_randn(4, 5), _targets(4), z_loss=-1.0), ValueError, "z_loss"),
    ("ce-softcap", lambda: fastlm.cross_entropy(_randn(4, 5), _targets(4), softcap=0.0), ValueError, "softcap"),
    ("lce-chunk_size", lambda: fastlm.linear_cross_entropy(_randn(4, 3), _randn(5, 3), _targets(4), chunk_size=0),
     ValueError, "chunk_size"),
    ("lce-acc_dtype", lambda: fastlm.linear_cross_entropy(_randn(4, 3), _randn(5, 3), _targets(4),
                                                          acc_dtype=torch.int32), TypeError, "acc_dtype"),
    ("linear-activation", lambda: fastlm.linear(_randn(2, 3), _randn(4, 3), activation="bogus"), ValueError,
     "activation"),
    ("ffn-gate_order", lambda: fastlm.feed_forward(_randn(2, 3), _randn(8, 3), None, _randn(3, 4), None, "swiglu",
                                                   gate_order="bogus"), ValueError, "gate_order"),
    ("ffn-w_out", lambda: fastlm.feed_forward(_randn(2, 3), _randn(4, 3), None, _randn(3, 5), None), ValueError,
     "w_out"),
    ("add_rms_norm-residual", lambda: fastlm.add_rms_norm(_randn(2, 4), _randn(2, 5), 4), ValueError, "residual"),
    ("add_layer_norm-residual-dtype", lambda: fastlm.add_layer_norm(_randn(2, 4), _randn(2, 4, dtype=torch.float64), 4),
     TypeError, "residual"),
    ("LayerNorm-return_residual", lambda: fastlm.nn.LayerNorm(4)(_randn(2, 4), return_residual=True), ValueError,
     "return_residual"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,kind,name", [c[1:] for c in OWN_OPTION_CASES], ids=[c[0] for c in OWN_OPTION_CASES])
def test_fastlm_only_arguments_raise_runtime_errors(call, kind, name, backend):
    with fastlm.use_backend(backend):
        ours = _raised(call, (), {})
    assert isinstance(ours, kind) and isinstance(ours, RuntimeError), f"{type(ours).__name__}: {ours}"
    assert re.search(rf"\b{name}\b", str(ours)), ours
