"""fastlm.nn.MultiheadAttention against torch.nn.MultiheadAttention.

The oracle is torch's own module in float64 with the same state_dict; torch's module in the
test dtype is the yardstick of fastlm.testing's rule. Both of fastlm's paths are checked:
need_weights=False (the fused kernel) and need_weights=True (weights materialised).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastlm
import fastlm.nn.attention as mha_module
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE

BACKENDS = ["torch", "triton"]


def make_pair(E, H, dtype, **kwargs):
    """(fastlm module, torch module in dtype, torch module in float64), same parameters."""
    ours = fastlm.nn.MultiheadAttention(E, H, device=DEVICE, **kwargs)
    with torch.no_grad():  # torch zeroes the biases and bias_k/v start tiny: make every parameter matter
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = ours.to(dtype)
    theirs = torch.nn.MultiheadAttention(E, H, device=DEVICE, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    oracle = torch.nn.MultiheadAttention(E, H, device=DEVICE, dtype=torch.float64, **kwargs)
    oracle.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, theirs, oracle


def causal_mask(L, S):
    """torch's convention: True = not allowed; query i sees keys 0..i (top-left)."""
    return torch.ones(L, S, dtype=torch.bool, device=DEVICE).triu(1)


def run(module, inputs, grads_of, dout, **kwargs):
    out, weights = module(*inputs, **kwargs)
    unique = list({id(t): t for t in inputs if t.requires_grad}.values())  # self-attention passes q three times
    leaves = unique + [dict(module.named_parameters())[n] for n in grads_of]
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out, weights, grads


def check(E, H, L, S, dtype, backend, *, batch_first=True, batched=True, self_attention=False, module_kwargs=None,
          forward_kwargs=None, ours_kwargs=None, need_weights=False):
    """Run fastlm's module and torch's in dtype and float64; compare output, weights and gradients."""
    module_kwargs = dict(module_kwargs or {})
    forward_kwargs = dict(forward_kwargs or {})
    ours, theirs, oracle = make_pair(E, H, dtype, batch_first=batch_first, **module_kwargs)
    B = 3
    kdim = module_kwargs.get("kdim") or E
    vdim = module_kwargs.get("vdim") or E

    def shape(n, e):
        if not batched:
            return (n, e)
        return (B, n, e) if batch_first else (n, B, e)

    q = torch.randn(shape(L, E), device=DEVICE)
    k = q if self_attention else torch.randn(shape(S, kdim), device=DEVICE)
    v = q if self_attention else torch.randn(shape(S, vdim), device=DEVICE)
    dout = torch.randn(shape(L, E), device=DEVICE)
    params = ["out_proj.weight", "in_proj_weight" if ours._qkv_same_embed_dim else "k_proj_weight"]
    if module_kwargs.get("add_bias_kv"):
        params.append("bias_v")

    def inputs(dt):
        qq = q.to(dt).requires_grad_(True)
        if self_attention:
            return (qq, qq, qq)
        return qq, k.to(dt).requires_grad_(True), v.to(dt).requires_grad_(True)

    def cast_masks(kw, dt):
        return {n: (m.to(dt) if isinstance(m, torch.Tensor) and m.is_floating_point() else m) for n, m in kw.items()}

    with fastlm.use_backend(backend):
        out, w, grads = run(ours, inputs(dtype), params, dout, need_weights=need_weights,
                            **cast_masks({**forward_kwargs, **(ours_kwargs or {})}, dtype))
    ref, ref_w, ref_grads = run(oracle, inputs(torch.float64), params, dout, need_weights=True,
                                **cast_masks(forward_kwargs, torch.float64))
    eager, eager_w, eager_grads = run(theirs, inputs(dtype), params, dout, need_weights=need_weights,
                                      **cast_masks(forward_kwargs, dtype))
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, eager)
    if need_weights:
        avg = forward_kwargs.get("average_attn_weights", True)
        assert w.shape == ref_w.shape, (w.shape, ref_w.shape)
        assert_close(w, ref_w, eager_w if eager_w is not None else ref_w.to(dtype), "weights")
        assert avg or w.dim() == (4 if batched else 3)
    else:
        assert w is None
    names = (["query", "key", "value"] if not self_attention else ["query"]) + params
    for name, g, r, e in zip(names, grads, ref_grads, eager_grads):
        # The attention backward adds its terms up in another order than torch's autograd (dq
        # and dk: ds = p * (dp - delta) with delta = rowsum(dO * O) from the stored output,
        # FlashAttention's form, then sums over S keys of D-long dot products; p itself comes
        # from exp(s - lse) rather than a softmax), in float32 accumulators whatever the input
        # dtype: float32's summation floor over S * D terms is allowed on each gradient, as
        # tests/test_attention.py allows at the op level.
        slack = summation_floor(r, torch.float32, S * (E // H))
        assert_close(g, r, e, f"grad of {name}", atol=slack)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention(backend, dtype, batch_first):
    check(64, 4, 17, 17, dtype, backend, batch_first=batch_first, self_attention=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(1, 33), (17, 5), (16, 16)])
def test_cross_attention_lengths(backend, L, S):
    check(64, 4, L, S, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kdim_vdim_no_bias(backend):
    check(48, 2, 9, 13, torch.float32, backend, module_kwargs=dict(kdim=40, vdim=24, bias=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn", "both"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_extra_keys(backend, extra, need_weights):
    kwargs = {"add_bias_kv": extra != "add_zero_attn", "add_zero_attn": extra != "add_bias_kv"}
    kpm = torch.rand(3, 11, device=DEVICE) < 0.3
    check(64, 4, 7, 11, torch.float32, backend, module_kwargs=kwargs, need_weights=need_weights,
          forward_kwargs=dict(key_padding_mask=kpm, attn_mask=causal_mask(7, 11)))


def _padding(B, S, dtype_kind):
    lengths = torch.randint(1, S + 1, (B,), device=DEVICE)
    lengths[0] = S
    pad = torch.arange(S, device=DEVICE)[None, :] >= lengths[:, None]  # True = padding
    if dtype_kind == "float":
        return torch.zeros(B, S, device=DEVICE).masked_fill(pad, float("-inf"))
    return pad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kpm_kind", ["bool", "float"])
@pytest.mark.parametrize("mask_kind", [None, "bool2d", "float2d", "bool3d"])
def test_masks(backend, kpm_kind, mask_kind):
    B, H, L, S = 3, 4, 9, 17
    kwargs = {"key_padding_mask": _padding(B, S, kpm_kind)}
    if mask_kind is not None:
        if mask_kind == "bool3d":
            m = torch.rand(B * H, L, S, device=DEVICE) < 0.3
            m[..., 0] = False  # every query keeps a key that no padding hides
        elif mask_kind == "bool2d":
            m = causal_mask(L, S)
        else:
            m = torch.randn(L, S, device=DEVICE)
        kwargs["attn_mask"] = m
    check(64, H, L, S, torch.float32, backend, forward_kwargs=kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_padding", [True, False])
def test_is_causal(backend, with_padding):
    """is_causal with its attn_mask, with and without a padding mask, as torch."""
    L = S = 18
    forward = {"attn_mask": causal_mask(L, S), "is_causal": True}
    if with_padding:
        pad = _padding(3, S, "bool")
        pad[:, 0] = False
        forward["key_padding_mask"] = pad
    check(64, 4, L, S, torch.float32, backend, self_attention=True, forward_kwargs=forward)


def test_is_causal_without_attn_mask_raises_as_torch():
    mha = fastlm.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    twin = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    with pytest.raises(RuntimeError):
        twin(x, x, x, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, is_causal=True, need_weights=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["padding", "need_weights"])
def test_is_causal_keeps_attn_mask_where_torch_does(backend, where):
    """With a key_padding_mask or need_weights=True torch uses attn_mask itself and drops the
    is_causal hint: a mask that is not causal then decides, in fastlm as in torch."""
    L = S = 12
    mask = torch.rand(L, S, device=DEVICE) < 0.3
    mask[:, 0] = False  # every query sees key 0
    forward = {"attn_mask": mask, "is_causal": True}
    if where == "padding":
        pad = _padding(3, S, "bool")
        pad[:, 0] = False
        forward["key_padding_mask"] = pad
    check(64, 4, L, S, torch.float32, backend, self_attention=True, forward_kwargs=forward,
          need_weights=where == "need_weights")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_need_weights(backend, average, batch_first):
    check(64, 4, 10, 12, torch.float32, backend, batch_first=batch_first, need_weights=True,
          forward_kwargs=dict(average_attn_weights=average, key_padding_mask=_padding(3, 12, "bool")))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched(backend, need_weights):
    check(64, 4, 8, 6, torch.float32, backend, batched=False, need_weights=need_weights,
          forward_kwargs=dict(key_padding_mask=torch.tensor([False, True, False, False, True, False], device=DEVICE),
                              attn_mask=torch.rand(4, 8, 6, device=DEVICE) < 0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_not_power_of_two(backend):
    check(3 * 40, 3, 19, 21, torch.float32, backend, self_attention=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_query_gives_zero(backend, need_weights):
    """A batch whose keys are all padding: torch gives NaN, fastlm attention gives 0, so the
    module's output there is out_proj's bias, and every gradient is finite."""
    m = fastlm.nn.MultiheadAttention(32, 2, batch_first=True, device=DEVICE)
    with torch.no_grad():
        m.out_proj.bias.normal_()
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    kpm = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    with fastlm.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, w = m(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(out[1], m.out_proj.bias.expand(5, 32), rtol=0, atol=0)
    assert torch.isfinite(out).all()
    if need_weights:
        assert (w[1] == 0).all() and torch.isfinite(w).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters()) and torch.isfinite(x.grad).all()
    assert x.grad[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout(backend):
    """Training mode drops attention weights: the same seed gives the same output, another seed
    another one, eval mode none (then it equals torch's module)."""
    m = fastlm.nn.MultiheadAttention(32, 2, dropout=0.5, batch_first=True, device=DEVICE)
    x = torch.randn(2, 16, 32, device=DEVICE)
    with fastlm.use_backend(backend):
        torch.manual_seed(1)
        a, _ = m(x, x, x, need_weights=False)
        torch.manual_seed(1)
        b, _ = m(x, x, x, need_weights=False)
        torch.manual_seed(2)
        c, _ = m(x, x, x, need_weights=False)
        m.eval()
        d, _ = m(x, x, x, need_weights=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    t = torch.nn.MultiheadAttention(32, 2, dropout=0.5, batch_first=True, device=DEVICE).eval()
    t.load_state_dict(m.state_dict())
    torch.testing.assert_close(d, t(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    assert (a - d).abs().max() > 1e-3


def test_dropout_backward_is_deterministic():
    """Training-mode gradients through the kernel's dropout are finite and repeat exactly for
    the same seed (that the backward uses the forward's mask is checked against the reference
    at the op level in test_attention.py)."""
    m = fastlm.nn.MultiheadAttention(32, 2, dropout=0.3, batch_first=True, device=DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    grads = []
    for _ in range(2):
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        with fastlm.use_backend("triton"):
            out, _ = m(xx, xx, xx, need_weights=False)
            out.sum().backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert torch.isfinite(grads[0]).all()


def test_state_dict_and_isinstance():
    for kwargs in ({}, {"kdim": 24, "vdim": 40}, {"add_bias_kv": True, "bias": False}):
        ours = fastlm.nn.MultiheadAttention(32, 4, **kwargs)
        theirs = torch.nn.MultiheadAttention(32, 4, **kwargs)
        assert isinstance(ours, torch.nn.MultiheadAttention)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert n1 == n2 and p1.shape == p2.shape


def test_need_weights_warns_once():
    mha_module._warned_need_weights = False
    m = fastlm.nn.MultiheadAttention(32, 2)
    x = torch.randn(4, 2, 32)
    with pytest.warns(UserWarning, match="need_weights=False"):
        m(x, x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x, x, x)
        m(x, x, x, need_weights=False)


@pytest.mark.parametrize("bad,error,match", [
    (dict(attn_mask=torch.zeros(5, 5, dtype=torch.bool)), ValueError, "attn_mask"),
    (dict(attn_mask=torch.zeros(4, 6, dtype=torch.int64)), TypeError, "attn_mask"),
    (dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.int32)), TypeError, "key_padding_mask"),
])
def test_bad_masks(bad, error, match):
    m = fastlm.nn.MultiheadAttention(32, 2, batch_first=True)
    q, kv = torch.randn(2, 4, 32), torch.randn(2, 6, 32)
    with pytest.raises(error, match=match):
        m(q, kv, kv, need_weights=False, **bad)


def test_bad_inputs():
    m = fastlm.nn.MultiheadAttention(32, 2, batch_first=True)
    x = torch.randn(2, 4, 32)
    with pytest.raises(ValueError, match="embedding dim"):
        m(torch.randn(2, 4, 16), x, x)
    with pytest.raises(ValueError, match="key .* and value"):
        m(x, x, torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="4-D|3-D"):
        m(torch.randn(1, 2, 4, 32), x, x)
    with pytest.raises(TypeError, match="query"):
        m(None, x, x)


def test_compile_fullgraph():
    m = fastlm.nn.MultiheadAttention(32, 2, batch_first=True, device=DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    kpm[1, 6:] = True
    with fastlm.use_backend("torch"):
        eager, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
        compiled = torch.compile(lambda t: m(t, t, t, key_padding_mask=kpm, need_weights=False)[0],
                                 fullgraph=True, backend="aot_eager")
        got = compiled(x)
    torch.testing.assert_close(got, eager)
    g1, = torch.autograd.grad(got.sum(), x)
    g2, = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_never_takes_torchs_inference_fast_path(dtype, masked, monkeypatch):
    """torch.nn.MultiheadAttention.forward hands eval-mode, no-grad, batch-first self-attention
    to torch._native_multi_head_attention; fastlm's forward is its own and never does, so a
    patched model runs fastlm's attention at inference too, with torch's numbers."""
    calls = []
    fused = torch._native_multi_head_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counted)
    ours, theirs, oracle = make_pair(32, 4, dtype, batch_first=True)
    for m in (ours, theirs, oracle):
        m.eval()
    x = torch.randn(3, 9, 32, device=DEVICE, dtype=torch.float64)
    kpm = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
    if masked:
        kpm[1, 6:] = True
        kpm[2, 1:] = True
    kwargs = {"key_padding_mask": kpm if masked else None, "need_weights": False}
    xx = x.to(dtype)  # self-attention: query, key and value the same tensor
    with torch.no_grad():
        eager = theirs(xx, xx, xx, **kwargs)[0]
        ref = oracle(x, x, x, **kwargs)[0]
        assert len(calls) == 2  # the case this test is about: torch takes its fast path here
        calls.clear()
        for backend in BACKENDS if dtype != torch.float64 else ["torch"]:  # the kernels take no float64
            with fastlm.use_backend(backend):
                out = ours(xx, xx, xx, **kwargs)[0]
            assert calls == [], backend
            if dtype == torch.float64:
                torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            else:
                assert_close(out, ref, eager)
