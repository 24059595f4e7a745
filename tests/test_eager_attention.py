"""Attention's CPU path (issue 17): where torch's scaled_dot_product_attention computes what
fastlm's does, the "torch" backend calls it (fastlm.scaled_dot_product_attention directly,
flash_attn_func through (B, H, S, D) views, causal aligned bottom-right by a mask when
L != S); fastlm's extras (soft-cap, windows, dropout with fastlm's seeded mask, the lse, a
float mask of another dtype, empty tensors) run the reference through the eager twin of
fastlm::attention. Each mapped case is checked against the float64 oracle (forward and
backward) and shown to take the native call; each extra is shown to skip it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops import attention as attn_ops

from .conftest import DEVICE, ON_GPU
from .test_attention import _sdpa_inputs, _torch_sdpa, check, naive, qkv

NATIVE = 0 if ON_GPU else 1  # torch SDPA calls per mapped call: the native path is the CPU tensors'


@pytest.fixture
def torch_sdpa_calls(monkeypatch):
    """Counts the calls of torch's SDPA made by fastlm's attention module."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(attn_ops.F, "scaled_dot_product_attention", spy)
    return calls


def _counted(fn, calls):
    """fn, and the number of torch SDPA calls it made (the oracles' calls not counted)."""
    seen = []

    def wrapped(*args):
        before = len(calls)
        out = fn(*args)
        seen.append(len(calls) - before)
        return out
    return wrapped, seen


def _cast_mask(mask, like):
    return mask if mask.dtype == torch.bool else mask.to(like.dtype)


# ----------------------------------------------------------------------------- scaled_dot_product_attention

SDPA_CASES = {
    # name: (B, H, Hk, L, S, E, kwargs)
    "plain-odd": (2, 3, 3, 7, 13, 5, {}),
    "causal-square": (2, 2, 2, 17, 17, 16, {"is_causal": True}),
    "causal-L<S": (1, 2, 2, 9, 23, 16, {"is_causal": True}),
    "causal-L>S": (1, 2, 2, 23, 9, 16, {"is_causal": True}),
    "gqa-causal-scale": (2, 6, 2, 11, 11, 24, {"is_causal": True, "enable_gqa": True, "scale": 0.3}),
    "gqa-plain": (1, 4, 1, 5, 19, 8, {"enable_gqa": True}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_calls_torch(torch_sdpa_calls, case, dtype):
    B, H, Hk, L, S, E, kwargs = SDPA_CASES[case]
    ours, seen = _counted(lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, **kwargs), torch_sdpa_calls)
    check("torch", ours, _torch_sdpa(**kwargs), _sdpa_inputs(B, H, Hk, L, S, E, dtype=dtype))
    assert seen == [NATIVE]


@pytest.mark.parametrize("kind", ["bool-row-hidden", "bool-padding", "float-neginf-row", "float-2d"])
def test_sdpa_masks_call_torch(torch_sdpa_calls, kind):
    """Masks as torch takes them (boolean, or float of the inputs' dtype): torch's SDPA off
    CUDA, where a query that sees no key gives 0 and zero gradients, as the reference."""
    B, H, L, S = 2, 3, 13, 21
    if kind == "bool-row-hidden":
        mask = torch.rand(B, H, L, S, device=DEVICE) > 0.4
        mask[1, 2, 4] = False
    elif kind == "bool-padding":
        mask = (torch.arange(S, device=DEVICE) < torch.tensor([21, 6], device=DEVICE)[:, None])[:, None, None, :]
    elif kind == "float-neginf-row":
        mask = torch.randn(B, 1, L, S, device=DEVICE)
        mask[0, 0, 5] = float("-inf")
        mask[1, 0, :, 3:9] = float("-inf")
    else:
        mask = torch.randn(L, S, device=DEVICE)
    ours, seen = _counted(lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                          torch_sdpa_calls)
    out = check("torch", ours, lambda q, k, v: _torch_sdpa(attn_mask=_cast_mask(mask, q))(q, k, v),
                _sdpa_inputs(B, H, H, L, S, 16))
    assert torch.isfinite(out).all()
    assert seen == [NATIVE]


def test_sdpa_float_mask_gradient_on_the_native_path(torch_sdpa_calls):
    """A float bias that requires grad gets torch's gradient, summed to its own shape, equal
    to the reference's (the fastlm::attention twin) and zero on a row that sees no key."""
    B, H, L, S, E = 2, 2, 11, 14, 16
    q, k, v = _sdpa_inputs(B, H, H, L, S, E)
    bias = torch.randn(1, H, L, S, device=DEVICE)
    bias[0, 1, 2] = float("-inf")
    dout = torch.randn(B, H, L, E, device=DEVICE)

    def grads(fn):
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
        out = fn(*leaves)
        return (out,) + torch.autograd.grad(out, leaves, dout.double())

    with fastlm.use_backend("torch"):
        native = grads(lambda q, k, v, m: fastlm.scaled_dot_product_attention(q, k, v, attn_mask=m))
        assert len(torch_sdpa_calls) == NATIVE
        # the reference: the op itself, on (B, L, H, E) views
        reference = grads(lambda q, k, v, m: attn_ops._attention_eager(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, None, None, None, None, E ** -0.5, False,
            -1, -1, 0.0, 0.0, 0, 0)[0].transpose(1, 2))
    assert len(torch_sdpa_calls) == NATIVE
    for a, b in zip(native, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert native[4].shape == bias.shape and torch.all(native[4][0, 1, 2] == 0)


def test_sdpa_3d_and_5d_call_torch(torch_sdpa_calls):
    three_d = [torch.randn(3, 14, 16, device=DEVICE) for _ in range(3)]
    ours, seen = _counted(lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v), torch_sdpa_calls)
    check("torch", ours, _torch_sdpa(), three_d)
    five_d = [torch.randn(2, 2, 2, 11, 16, device=DEVICE) for _ in range(3)]
    ours5, seen5 = _counted(lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, is_causal=True),
                            torch_sdpa_calls)
    check("torch", ours5, _torch_sdpa(is_causal=True), five_d)
    assert seen == [NATIVE] and seen5 == [NATIVE]


def test_sdpa_extras_run_the_reference(torch_sdpa_calls):
    """What torch's SDPA would compute differently stays on the reference: dropout (fastlm's
    mask for the call's seed), a float mask of another dtype than the inputs (added
    unrounded), empty tensors (S = 0 gives 0)."""
    B, H, L, S, E = 2, 2, 9, 12, 16
    q, k, v = _sdpa_inputs(B, H, H, L, S, E, dtype=torch.float64)
    with fastlm.use_backend("torch"):
        torch.manual_seed(3)
        dropped = fastlm.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
        torch.manual_seed(3)
        seed = attn_ops.draw_dropout_seed(DEVICE)
        keep = attn_ops.dropout_mask(seed, B, H, L, S, 0.25, "torch", DEVICE)
        expected = naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep=keep, dropout_p=0.25)
        torch.testing.assert_close(dropped, expected.transpose(1, 2))
        bias = torch.randn(L, S, device=DEVICE)  # float32 beside float64 inputs
        biased = fastlm.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        torch.testing.assert_close(biased, naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 mask=bias.double()).transpose(1, 2))
        empty = fastlm.scaled_dot_product_attention(q, k[:, :, :0], v[:, :, :0])
        assert empty.shape == q.shape and torch.all(empty == 0)
    assert torch_sdpa_calls == []


# ----------------------------------------------------------------------------- flash_attn_func

FLASH_CASES = {
    # name: (B, L, S, H, Hk, D, Dv, causal)
    "plain-odd": (2, 7, 13, 3, 3, 5, None, False),
    "causal-square": (2, 17, 17, 2, 2, 16, None, True),
    "causal-L<S": (1, 9, 23, 2, 2, 16, None, True),
    "causal-L>S": (2, 23, 9, 2, 1, 16, None, True),  # the first 14 queries see no key: 0
    "decode": (3, 1, 29, 4, 2, 16, None, True),
    "gqa-causal": (2, 19, 19, 6, 2, 24, None, True),
    "value-dim": (1, 10, 15, 2, 2, 16, 8, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attn_func_calls_torch(torch_sdpa_calls, case, dtype):
    B, L, S, H, Hk, D, Dv, causal = FLASH_CASES[case]
    ours, seen = _counted(lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=causal), torch_sdpa_calls)
    out = check("torch", ours, lambda q, k, v: naive(q, k, v, causal=causal), qkv(B, L, S, H, Hk, D, Dv, dtype))
    assert out.is_contiguous() and out.shape == (B, L, H, Dv or D)
    assert seen == [NATIVE]
    if causal and L > S:
        assert torch.all(out[:, :L - S] == 0)


def test_flash_attn_func_rows_that_see_nothing_get_zero_gradients(torch_sdpa_calls):
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 12, 5, 2, 2, 16))
    with fastlm.use_backend("torch"):
        out = fastlm.flash_attn_func(q, k, v, causal=True, softmax_scale=0.4)
    dq, = torch.autograd.grad(out, [q], torch.randn_like(out))
    assert torch.all(dq[:, :7] == 0) and torch.isfinite(dq).all()
    assert len(torch_sdpa_calls) == NATIVE


EXTRAS = {
    "softcap": {"softcap": 2.5},
    "window": {"window_size": (4, 0)},
    "window-right": {"window_size": (-1, 3)},
    "dropout": {"dropout_p": 0.2},
    "return_lse": {"return_lse": True, "causal": True},
}


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_flash_attn_func_extras_run_the_reference(torch_sdpa_calls, extra):
    kwargs = EXTRAS[extra]
    q, k, v = (t.requires_grad_(True) for t in qkv(2, 9, 14, 2, 1, 16))
    with fastlm.use_backend("torch"):
        got = fastlm.flash_attn_func(q, k, v, **kwargs)
    assert torch_sdpa_calls == []
    out = got[0] if kwargs.get("return_lse") else got
    # through the eager twin: an autograd.Function, not the custom op's autograd node
    assert "attention_eager" in type(out.grad_fn).__name__
    if kwargs.get("return_lse"):
        lse = got[1]
        assert lse.shape == (2, 2, 9) and lse.dtype == torch.float32
        s = torch.einsum("blhd,bshd->bhls", q, k.repeat_interleave(2, dim=2)) * 16 ** -0.5
        ok = torch.arange(14, device=DEVICE)[None, :] <= torch.arange(9, device=DEVICE)[:, None] + 5
        torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~ok, float("-inf")), -1))


def test_empty_inputs_run_the_reference(torch_sdpa_calls):
    q, k, v = qkv(2, 0, 7, 2, 2, 16)
    with fastlm.use_backend("torch"):
        assert fastlm.flash_attn_func(q, k, v, causal=True).shape == (2, 0, 2, 16)
        q, k, v = qkv(2, 5, 0, 2, 2, 16)
        assert torch.all(fastlm.flash_attn_func(q, k, v) == 0)
    assert torch_sdpa_calls == []


def test_native_path_only_on_the_torch_backend(torch_sdpa_calls):
    """The native call is the "torch" backend's: with the Triton backend requested the
    kernels run, and while compiling the custom op is traced (tests/test_attention.py)."""
    q, k, v = qkv(1, 17, 17, 2, 2, 16)
    with fastlm.use_backend("triton"):
        fastlm.flash_attn_func(q, k, v, causal=True)
        fastlm.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch_sdpa_calls == []


def test_eager_twin_matches_the_custom_op():
    """The eager twin (body + autograd.Function) and the registered custom op compute the
    same forward and backward on the reference, with a float bias and its gradient."""
    q, k, v = qkv(2, 11, 13, 4, 2, 16)
    bias = torch.randn(2, 1, 11, 13, device=DEVICE)
    args = (None, None, None, None, 0.3, True, 5, 1, 3.0, 0.0, 0, 0)

    def run(op):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
        with fastlm.use_backend("torch"):
            out, lse = op(leaves[0], leaves[1], leaves[2], leaves[3], *args)
            return (out, lse) + torch.autograd.grad(out, leaves, torch.ones_like(out))

    for a, b in zip(run(attn_ops._attention_eager), run(attn_ops._attention)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("special", ["q-nan", "q-inf", "k-nan", "mask-nan", "mask-posinf"])
def test_non_finite_inputs_run_the_reference(torch_sdpa_calls, special):
    """torch's CPU flash kernel gives 0 for a query whose scores hold a NaN (the reference,
    and tests/test_properties.py, keep the NaN): non-finite queries and keys, and NaN or +inf
    in a float mask, run on the reference. A mask's -inf is the usual case and stays native
    (test_sdpa_masks_call_torch)."""
    B, H, L, S, E = 1, 2, 6, 6, 8
    q, k, v = _sdpa_inputs(B, H, H, L, S, E)
    mask = torch.randn(L, S, device=DEVICE)
    where, value = special.split("-")
    value = {"nan": float("nan"), "inf": float("inf"), "posinf": float("inf")}[value]
    {"q": q, "k": k, "mask": mask}[where][..., 2, 3] = value
    with fastlm.use_backend("torch"):
        out = fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        flash = fastlm.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    # sdpa checks its inputs first; flash_attn_func (no mask) runs torch's SDPA and checks its
    # output for the rows torch zeroes (fastlm.ops.attention._has_zero_row), then the reference
    flash_calls = 0 if where == "mask" else 1
    assert len(torch_sdpa_calls) == (NATIVE if where == "mask" else 0) + flash_calls
    if where != "mask":
        want_flash = attn_ops._attention_eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None,
                                               None, None, None, E ** -0.5, True, -1, 0, 0.0, 0.0, 0, 0)[0]
        torch.testing.assert_close(flash, want_flash, equal_nan=True)
        assert flash.isnan().any()
    expected = attn_ops._attention_eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, None, None,
                                         None, None, E ** -0.5, False, -1, -1, 0.0, 0.0, 0, 0)[0].transpose(1, 2)
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert out.isnan().any()


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "causal-padding", "float-mask"])
def test_multihead_attention_fast_path_calls_torch(torch_sdpa_calls, case):
    """nn.MultiheadAttention(need_weights=False) on the CPU path: torch's SDPA takes every call
    (with a padding mask, is_causal's attn_mask is used itself, as torch does, so SDPA takes
    that too), the same output as torch's module."""
    E, H, B, L = 32, 4, 2, 9
    mha = fastlm.nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    x = torch.randn(B, L, E, device=DEVICE)
    padding = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    padding[1, 6:] = True  # torch's convention: True = ignored
    kwargs = {"need_weights": False}
    if "causal" in case:
        causal = torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1)  # True = ignored, as padding
        kwargs.update(is_causal=True, attn_mask=causal)
    if "padding" in case:
        kwargs["key_padding_mask"] = padding
    if case == "float-mask":
        kwargs["attn_mask"] = torch.randn(L, L, device=DEVICE)
    with fastlm.use_backend("torch"):
        got = mha(x, x, x, **kwargs)[0]
    assert len(torch_sdpa_calls) == NATIVE
    # against torch's own module with the same weights
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    ref.load_state_dict(mha.state_dict())
    want = ref(x, x, x, **kwargs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
