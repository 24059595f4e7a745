"""Dropout + residual + norm in one kernel (issue 23): add_layer_norm / add_rms_norm with
dropout_p and residual_in_fp32, flash-attn's layer_norm_fn, the DropoutAdd* modules and the
models' use of them.

The oracle is the unfused composition with the same mask: the mask a backend draws for the
call's seed (fastlm.ops.norm.dropout_mask; the seed is draw_dropout_seed after the same
torch.manual_seed), applied by hand, then norm(x_dropped + residual) in float64. The yardstick
for the tolerance is the same composition in the test dtype through fastlm's own (plain)
add_layer_norm / add_rms_norm. Under the interpreter bfloat16 casts truncate, so Triton runs
float32 and float16 here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.kernels import launch
from fastlm.ops import norm as norm_ops
from fastlm.ops.attention import draw_dropout_seed
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE

BACKENDS = ["torch", "triton"]


def make(shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=torch.float32, device=DEVICE) * scale + shift).to(dtype)


def mask_for(seed_state: int, shape, p: float, backend: str) -> torch.Tensor:
    """The mask a call made right after torch.manual_seed(seed_state) draws on ``backend``."""
    torch.manual_seed(seed_state)
    seed = draw_dropout_seed(DEVICE)
    return norm_ops.dropout_mask(seed, shape, p, backend, DEVICE)


def fused(kind, x, r, n, w, b, p, fp32=False, return_residual=True, eps=1e-5):
    if kind == "layer":
        return fastlm.add_layer_norm(x, r, n, w, b, eps, return_residual=return_residual, dropout_p=p,
                                     residual_in_fp32=fp32)
    return fastlm.add_rms_norm(x, r, n, w, eps, return_residual=return_residual, dropout_p=p,
                               residual_in_fp32=fp32)


def unfused(kind, x, r, n, w, b, keep, p, stream_dtype, eps=1e-5):
    """The chain of separate ops with the given mask: drop, add (in the stream's dtype), norm."""
    xd = torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype)) if keep is not None else x
    s = xd.to(stream_dtype) + r.to(stream_dtype)
    ws = w.to(s.dtype) if w is not None else None
    bs = b.to(s.dtype) if b is not None else None
    y = F.layer_norm(s, (n,), ws, bs, eps) if kind == "layer" else F.rms_norm(s, (n,), ws, eps)
    return y.to(x.dtype), s


def run_case(kind, backend, shape, dtype, p, fp32=False, residual_dtype=None, transpose=False, state=1234):
    """Forward and backward of the fused op against the float64 oracle with the backend's mask;
    returns the mask used."""
    rows, n = shape
    x = make(shape, dtype, scale=2.0, shift=0.5)
    r = make(shape, residual_dtype or dtype)
    if transpose:  # non-contiguous: row stride 1
        x = make((n, rows), dtype, scale=2.0, shift=0.5).t()
        r = make((n, rows), residual_dtype or dtype).t()
    w = make(n, torch.float32)
    b = make(n, torch.float32) if kind == "layer" else None
    stream = torch.float32 if fp32 and dtype != torch.float32 else dtype
    dy = make(shape, dtype)
    ds = make(shape, stream)
    leaves = [t for t in (x, r, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)

    with fastlm.use_backend(backend):
        torch.manual_seed(state)
        y, s = fused(kind, x, r, n, w, b, p, fp32)
        grads = torch.autograd.grad((y.float() * dy.float()).sum() + (s.float() * ds.float()).sum(), leaves)
    assert y.dtype == dtype and s.dtype == stream and y.shape == x.shape and s.shape == x.shape
    keep = mask_for(state, shape, p, backend) if p > 0 else None

    def oracle(cast, sdt, through_fastlm):
        ins = [cast(t).detach().requires_grad_(True) for t in leaves]
        xi, ri, wi = ins[0], ins[1], ins[2]
        bi = ins[3] if b is not None else None
        if through_fastlm:  # fastlm's own ops, unfused: dropout by hand, then the plain fused add + norm
            xd = torch.where(keep, xi * (1.0 / (1.0 - p)), torch.zeros((), dtype=xi.dtype)) if keep is not None else xi
            with fastlm.use_backend(backend):
                if sdt != xi.dtype:
                    yo, so = unfused(kind, xd, ri, n, wi, bi, None, p, sdt)
                elif kind == "layer":
                    yo, so = fastlm.add_layer_norm(xd, ri, n, wi.to(sdt), bi.to(sdt), return_residual=True)
                else:
                    yo, so = fastlm.add_rms_norm(xd, ri, n, wi.to(sdt), 1e-5, return_residual=True)
        else:
            yo, so = unfused(kind, xi, ri, n, wi, bi, keep, p, sdt)
        go = torch.autograd.grad((yo * cast(dy)).sum() + (so * cast(ds).to(so.dtype)).sum(), ins)
        return yo, so, go

    y64, s64, g64 = oracle(lambda t: t.double(), torch.float64, False)
    ye, se, ge = oracle(lambda t: t, stream, True)
    assert_close(y, y64, ye, "y")
    assert_close(s, s64, se, "residual stream")
    for name, got, ref, eag in zip(["dinput", "dresidual", "dweight", "dbias"], grads, g64, ge):
        assert got.dtype == eag.dtype, (name, got.dtype, eag.dtype)
        assert_close(got, ref, eag, name, atol=summation_floor(ref, got.dtype, rows))
    if keep is not None:  # dinput: zero where dropped, the stream's (= the residual's) gradient / (1 - p) elsewhere
        assert torch.all(grads[0][~keep] == 0)
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(grads[0][keep].float(), grads[1][keep].float() / (1.0 - p), rtol=tol, atol=tol)
    return keep


# ----------------------------------------------------------------------------- against the unfused chain

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 17, 1023, 1024, 1025])
def test_matches_the_unfused_chain(backend, kind, dtype, n):
    run_case(kind, backend, (7, n), dtype, 0.3)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", [31, 32, 33, 97])
def test_chunked_rows_block_edges(monkeypatch, kind, n):
    """Rows wider than one block take the chunked path (three forward passes, two backward,
    each drawing the mask again): forced at small widths."""
    monkeypatch.setattr(launch, "MAX_FUSED_BLOCK", 32)
    run_case(kind, "triton", (9, n), torch.float32, 0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_residual_in_fp32(backend, kind, p):
    """A float16 activation with a float16 or a float32 residual: the stream, its gradient and
    the residual's gradient in float32 (the residual's own dtype), the output and dinput in float16."""
    run_case(kind, backend, (6, 113), torch.float16, p, fp32=True)
    run_case(kind, backend, (6, 113), torch.float16, p, fp32=True, residual_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", [768, 4096, 8192, 16384])
def test_bfloat16_with_float32_stream_on_gpu(kind, n):
    """bfloat16 activations with a float32 residual stream at real widths, every block path
    (the fused backward tile halved for dropout, the chunked backward past 8192)."""
    run_case(kind, "triton", (300, n), torch.bfloat16, 0.1, fp32=True, residual_dtype=torch.float32)
    run_case(kind, "triton", (300, n), torch.bfloat16, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    run_case("layer", backend, (13, 40), torch.float32, 0.5, transpose=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_and_leading_dims(backend):
    x, r = make((3, 5, 7, 11), torch.float32), make((3, 5, 7, 11), torch.float32)
    w = make((7, 11), torch.float32)
    with fastlm.use_backend(backend):
        torch.manual_seed(5)
        y, s = fastlm.add_rms_norm(x, r, (7, 11), w, 1e-6, return_residual=True, dropout_p=0.2)
    keep = mask_for(5, x.shape, 0.2, backend)
    s64 = torch.where(keep, x.double() / 0.8, 0.0) + r.double()
    y64 = F.rms_norm(s64, (7, 11), w.double(), 1e-6)
    sr = torch.where(keep, x / 0.8, 0.0) + r
    assert_close(s, s64, sr, "stream")
    assert_close(y, y64, F.rms_norm(sr, (7, 11), w, 1e-6), "y")


# ----------------------------------------------------------------------------- dropout_p = 0 is the old path

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_dropout_zero_is_the_plain_op(backend, kind):
    x, r, w = make((10, 48), torch.float16), make((10, 48), torch.float16), make(48, torch.float16)
    b = make(48, torch.float16) if kind == "layer" else None
    outs = []
    for extra in ({}, {"dropout_p": 0.0}, {"dropout_p": 0.0, "residual_in_fp32": False}):
        leaves = [t.clone().requires_grad_(True) for t in (x, r, w) + ((b,) if b is not None else ())]
        with fastlm.use_backend(backend):
            if kind == "layer":
                y, s = fastlm.add_layer_norm(*leaves[:2], 48, *leaves[2:], return_residual=True, **extra)
            else:
                y, s = fastlm.add_rms_norm(*leaves[:2], 48, leaves[2], return_residual=True, **extra)
            g = torch.autograd.grad((y * 1.7).sum() + s.sum(), leaves)
        outs.append((y, s) + g)
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)


# ----------------------------------------------------------------------------- the mask

@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_statistics_and_scaling(backend):
    """The fraction dropped is about p, and kept elements are scaled by exactly 1 / (1 - p)
    (no residual contribution: residual zero here, one check where zeros are harmless)."""
    p = 0.3
    x = make((64, 64), torch.float32, shift=3.0)
    with fastlm.use_backend(backend):
        torch.manual_seed(11)
        _, s = fastlm.add_layer_norm(x, torch.zeros_like(x), 64, return_residual=True, dropout_p=p)
    keep = mask_for(11, x.shape, p, backend)
    assert abs((~keep).float().mean().item() - p) < 0.03
    assert torch.all(s[~keep] == 0)
    torch.testing.assert_close(s[keep], x[keep] * (1.0 / (1.0 - p)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_under_manual_seed_and_new_mask_each_call(backend):
    x, r = make((8, 100), torch.float32), make((8, 100), torch.float32)
    with fastlm.use_backend(backend):
        torch.manual_seed(3)
        a = fastlm.add_layer_norm(x, r, 100, dropout_p=0.5)
        b = fastlm.add_layer_norm(x, r, 100, dropout_p=0.5)
        torch.manual_seed(3)
        c = fastlm.add_layer_norm(x, r, 100, dropout_p=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_dropout_mask_helper_errors():
    with pytest.raises(fastlm.ArgumentError, match="backend"):
        norm_ops.dropout_mask(draw_dropout_seed(), (2, 3), 0.5, "cuda-ish")


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_bad_dropout_p(p):
    x = make((2, 8), torch.float32)
    with pytest.raises(fastlm.ArgumentError, match="dropout_p"):
        fastlm.add_layer_norm(x, x.clone(), 8, dropout_p=p)
    with pytest.raises(fastlm.ArgumentError, match="dropout_p"):
        fastlm.add_rms_norm(x, x.clone(), 8, dropout_p=p)
    with pytest.raises(fastlm.ArgumentError, match="dropout_p"):
        fastlm.layer_norm_fn(x, None, None, dropout_p=p)


def test_bad_residual_in_fp32_and_residual_dtype():
    x = make((2, 8), torch.float16)
    with pytest.raises(fastlm.ArgumentTypeError, match="residual_in_fp32"):
        fastlm.add_layer_norm(x, x.clone(), 8, residual_in_fp32=1)
    with pytest.raises(fastlm.ArgumentTypeError, match="residual has dtype"):  # float32 residual needs the flag
        fastlm.add_layer_norm(x, x.float(), 8, dropout_p=0.1)
    with pytest.raises(fastlm.ArgumentTypeError, match="residual has dtype"):
        fastlm.add_rms_norm(x, x.double(), 8, residual_in_fp32=True)


def test_seed_checks_in_the_op():
    x = make((2, 8), torch.float32)
    with pytest.raises(fastlm.ArgumentError, match="seed"):
        norm_ops._norm_body(x, x, None, None, 1, 1e-5, False, False, None, 0.5, False)
    with pytest.raises(fastlm.ArgumentError, match="seed"):
        norm_ops._norm_body(x, x, None, None, 1, 1e-5, False, False, torch.zeros(2, dtype=torch.int64), 0.5, False)


# ----------------------------------------------------------------------------- custom op, compile

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_dropout(backend):
    x = make((6, 40), torch.float16).requires_grad_(True)
    r = make((6, 40), torch.float32).requires_grad_(True)
    w = make(40, torch.float32).requires_grad_(True)
    seed = draw_dropout_seed(DEVICE)
    with fastlm.use_backend(backend):
        torch.library.opcheck(norm_ops._norm, (x, r, w, None, 1, 1e-5, True, True, seed, 0.25, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_sees_the_custom_op(backend):
    import torch._dynamo

    torch._dynamo.reset()
    x, r = make((4, 48), torch.float32), make((4, 48), torch.float32)
    w = make(48, torch.float32)

    def block(x, r, w):
        return fastlm.add_layer_norm(x, r, 48, w, None, return_residual=True, dropout_p=0.2)

    with fastlm.use_backend(backend):
        torch.manual_seed(9)
        eager = block(x, r, w)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.manual_seed(9)
        got = compiled(x, r, w)
    for a, c in zip(eager, got):
        torch.testing.assert_close(a, c)


# ----------------------------------------------------------------------------- flash-attn's layer_norm_fn

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_layer_norm_fn_matches_add_norm(backend, is_rms_norm):
    x, r = make((5, 64), torch.float16), make((5, 64), torch.float32)  # flash-attn: float32 residual stream
    w, b = make(64, torch.float32), make(64, torch.float32)
    with fastlm.use_backend(backend):
        torch.manual_seed(21)
        y, s, mask, mask1 = fastlm.layer_norm_fn(x, w, b, r, dropout_p=0.4, prenorm=True, is_rms_norm=is_rms_norm,
                                                 return_dropout_mask=True)
    assert mask1 is None and mask.dtype == torch.bool and s.dtype == torch.float32 and y.dtype == torch.float16
    assert torch.equal(mask, mask_for(21, x.shape, 0.4, backend))
    s64 = torch.where(mask, x.double() / 0.6, 0.0) + r.double()
    if is_rms_norm:
        y64 = F.rms_norm(s64, (64,), w.double(), 1e-6) + b.double()
    else:
        y64 = F.layer_norm(s64, (64,), w.double(), b.double(), 1e-6)
    sr = torch.where(mask, x.float() / 0.6, 0.0) + r
    yr = (F.rms_norm(sr, (64,), w, 1e-6) + b) if is_rms_norm else F.layer_norm(sr, (64,), w, b, 1e-6)
    assert_close(s, s64, sr, "residual_out")
    assert_close(y, y64, yr.half(), "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_fn_without_residual(backend):
    """flash-attn: no residual, no dropout, residual_in_fp32=False: the stream returned is x
    itself; residual_in_fp32=True: x in float32; no dropout: the mask is None."""
    x, w = make((3, 32), torch.float16), make(32, torch.float16)
    with fastlm.use_backend(backend):
        y, s = fastlm.layer_norm_fn(x, w, None, prenorm=True)
        y2, s2, m, m1 = fastlm.layer_norm_fn(x, w, None, prenorm=True, residual_in_fp32=True,
                                             return_dropout_mask=True)
        y3 = fastlm.layer_norm_fn(x, w, None)
    assert s is x and s2.dtype == torch.float32 and torch.equal(s2, x.float()) and m is None and m1 is None
    assert torch.equal(y, y3)
    assert_close(y2, F.layer_norm(x.double(), (32,), w.double(), None, 1e-6),
                 F.layer_norm(x, (32,), w, None, 1e-6), "y")


@pytest.mark.parametrize("name,value", [("x1", "t"), ("weight1", "t"), ("bias1", "t"), ("rowscale", "t"),
                                        ("zero_centered_weight", True), ("out", "t"), ("residual_out", "t"),
                                        ("out_dtype", torch.float64)])
def test_layer_norm_fn_unsupported_options(name, value):
    x, w = make((3, 32), torch.float32), make(32, torch.float32)
    value = x.clone() if value == "t" else value
    with pytest.raises(NotImplementedError, match=name):
        fastlm.layer_norm_fn(x, w, None, **{name: value})


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("cls", ["DropoutAddLayerNorm", "DropoutAddRMSNorm"])
def test_dropout_add_modules(cls):
    mod = getattr(fastlm.nn, cls)(24, prenorm=True, p=0.3).to(DEVICE)
    twin = (torch.nn.LayerNorm(24) if cls == "DropoutAddLayerNorm" else torch.nn.RMSNorm(24, eps=1e-5)).to(DEVICE)
    mod.load_state_dict(twin.state_dict())  # torch's parameters
    x, r = make((4, 24), torch.float32), make((4, 24), torch.float32)
    torch.manual_seed(2)
    y, s = mod(x, r)
    keep = mask_for(2, x.shape, 0.3, "torch")
    torch.testing.assert_close(s, torch.where(keep, x / 0.7, 0.0) + r)
    torch.testing.assert_close(y, twin(s))
    mod.eval()
    y, s = mod(x, r)
    torch.testing.assert_close(s, x + r)  # eval: no dropout
    with pytest.raises(fastlm.ArgumentError, match="p must be"):
        getattr(fastlm.nn, cls)(24, p=1.0)


def test_norm_module_dropout_follows_training():
    norm = fastlm.nn.LayerNorm(16).to(DEVICE)
    x, r = make((3, 16), torch.float32), make((3, 16), torch.float32)
    torch.manual_seed(4)
    _, s = norm(x, r, return_residual=True, dropout_p=0.5)
    assert not torch.equal(s, x + r)
    norm.eval()
    _, s = norm(x, r, return_residual=True, dropout_p=0.5)
    assert torch.equal(s, x + r)
    with pytest.raises(fastlm.ArgumentError, match="needs a residual"):
        norm(x, dropout_p=0.5)


# ----------------------------------------------------------------------------- models

def _model_and_batch(name, dropout, **kw):
    from fastlm.models import bert, encdec, gpt

    torch.manual_seed(0)
    ids = torch.randint(3, 61, (2, 12), device=DEVICE)
    if name.startswith("gpt"):
        model = gpt.GPT(gpt.GPTConfig(vocab_size=61, n_layer=2, n_head=2, d_model=32, max_seq_len=16,
                                      dropout=dropout, **kw))
        batch = dict(input_ids=ids, labels=ids)
    elif name == "bert":
        model = bert.BertForMaskedLM(bert.BertConfig(vocab_size=61, n_layer=2, n_head=2, d_model=32, d_hidden=64,
                                                     max_seq_len=16, dropout=dropout))
        batch = dict(input_ids=ids, labels=ids)
    else:
        model = encdec.EncoderDecoder(encdec.EncoderDecoderConfig(
            vocab_size=61, n_encoder_layer=2, n_decoder_layer=2, n_head=2, d_model=32, d_hidden=64,
            max_seq_len=16, dropout=dropout, **kw))
        batch = dict(src_ids=ids, tgt_ids=ids.roll(1, 1), labels=ids)
    return model.to(DEVICE).train(), batch


def _loss_and_grads(model, batch, state=77):
    torch.manual_seed(state)
    loss = model(**batch)["loss"]
    return [loss.detach()] + list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                                      allow_unused=True))


def _unfused_norms(monkeypatch, backend=None):
    """The norm modules' residual forward as the chain it replaces: the fused op's seed drawn the
    same way (so every later draw from the generator matches), its mask applied by hand, then
    the plain (p = 0) norm. With backend None: the old call, no dropout argument at all."""
    for cls in (fastlm.nn.LayerNorm, fastlm.nn.RMSNorm):
        plain = cls.forward

        def forward(self, input, residual=None, return_residual=False, *, dropout_p=0.0, plain=plain):
            if backend is not None and residual is not None and dropout_p > 0 and self.training:
                seed = draw_dropout_seed(input.device)
                keep = norm_ops.dropout_mask(seed, input.shape, dropout_p, backend, input.device)
                input = torch.where(keep, input * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=input.dtype))
            elif backend is None:
                assert dropout_p == 0.0
            return plain(self, input, residual, return_residual)

        monkeypatch.setattr(cls, "forward", forward)


MODELS = ["gpt", "gpt-postnorm-rms", "bert", "encdec", "encdec-prenorm-rms"]


def _kw(name):
    if name == "encdec-prenorm-rms":  # pre-norm: the next norm (or the stack's final one) drops and adds
        return dict(prenorm=True, norm="rmsnorm")
    return dict(prenorm=False, norm="rmsnorm") if name == "gpt-postnorm-rms" else {}


@pytest.mark.parametrize("name", MODELS)
def test_models_without_dropout_are_unchanged(monkeypatch, name):
    """dropout = 0: loss and every gradient bit for bit those of the plain norm calls."""
    model, batch = _model_and_batch(name, 0.0, **_kw(name))
    fused_out = _loss_and_grads(model, batch)
    _unfused_norms(monkeypatch, None)
    plain_out = _loss_and_grads(model, batch)
    for a, c in zip(fused_out, plain_out):
        assert (a is None and c is None) or torch.equal(a, c)


# Every model on the reference; the Triton kernels (covered above) through GPT (interpreter time).
@pytest.mark.parametrize("backend,name", [("torch", m) for m in MODELS] + [("triton", "gpt")])
def test_models_with_dropout_match_the_unfused_chain(monkeypatch, backend, name):
    model, batch = _model_and_batch(name, 0.2, **_kw(name))
    with fastlm.use_backend(backend):
        fused_out = _loss_and_grads(model, batch)
        _unfused_norms(monkeypatch, backend)
        chain_out = _loss_and_grads(model, batch)
        monkeypatch.undo()
        other = _loss_and_grads(model, batch, state=78)
    assert not torch.equal(fused_out[0], other[0])  # dropout is on: another seed, another loss
    for a, c in zip(fused_out, chain_out):
        assert (a is None and c is None) or torch.allclose(a, c, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- benchmark rows

def test_bench_rows_fused_against_the_chain():
    """fastlm bench norm's dropout rows on CPU: fastlm's reference beside the eager chain
    F.dropout, add, norm, each row with the fused op's bytes and the chain's counted apart."""
    from fastlm.bench import norm as bench_norm
    from fastlm.bench import runner

    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32, quick=True, warmup=1, reps=2,
                           rows=[8], widths=[64], ops=["dropout_add_layer_norm", "dropout_add_rms_norm"])
    harness = runner.Harness(config, {"copy_gbps": 10.0, "matmul_tflops": 0.05, "matmul_dtype": "fp32"})
    bench_norm.run(config, harness)
    assert not [n for n in harness.notes if "failed" in n or "NaN" in n], harness.notes
    got = {(r["op"], r["mode"], r["impl"]) for r in harness.rows}
    for op in config.ops:
        for mode in bench_norm.MODES:
            assert {(op, mode, "fastlm-torch"), (op, mode, runner.EAGER)} <= got
    act = 8 * 64 * 4
    row = next(r for r in harness.rows if r["op"] == "dropout_add_layer_norm" and r["mode"] == "fwd")
    assert row["bytes"] == 4 * act + 2 * 64 * 4 and row["chain_bytes"] == 7 * act + 8 * 64 + 2 * 64 * 4
    row = next(r for r in harness.rows if r["op"] == "dropout_add_rms_norm" and r["mode"] == "bwd")
    assert row["bytes"] == 5 * act + 2 * 64 * 4 and row["chain_bytes"] == 8 * act + 8 * 64 + 2 * 64 * 4


def test_autocast_float32_stream_with_dropout():
    """Under autocast a 16-bit sublayer output meets a float32 residual stream: without
    residual_in_fp32 the input is promoted (as the plain op does), with it the stream stays
    float32 and the output takes the input's dtype."""
    x, r = make((4, 32), torch.bfloat16), make((4, 32), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(6)
        y, s = fastlm.add_layer_norm(x, r, 32, return_residual=True, dropout_p=0.25)
        torch.manual_seed(6)
        y2, s2 = fastlm.add_layer_norm(x, r, 32, return_residual=True, dropout_p=0.25, residual_in_fp32=True)
    keep = mask_for(6, x.shape, 0.25, "torch")
    want = torch.where(keep, x.float() / 0.75, 0.0) + r
    assert y.dtype == s.dtype == s2.dtype == torch.float32 and y2.dtype == torch.bfloat16
    torch.testing.assert_close(s, want)
    torch.testing.assert_close(s2, want)
    torch.testing.assert_close(y2, F.layer_norm(want, (32,)).bfloat16())


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_fn_rms_with_bias_backward(backend):
    """flash-attn's RMSNorm takes a bias (y = x * rstd * w + b): forward and every gradient."""
    x, r, w, b = (make(s, torch.float32).requires_grad_(True) for s in ((6, 40), (6, 40), 40, 40))
    dy, ds = make((6, 40), torch.float32), make((6, 40), torch.float32)
    with fastlm.use_backend(backend):
        torch.manual_seed(8)
        y, s = fastlm.layer_norm_fn(x, w, b, r, dropout_p=0.3, prenorm=True, is_rms_norm=True)
        grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), [x, r, w, b])
    keep = mask_for(8, x.shape, 0.3, backend)
    ins = [t.detach().double().requires_grad_(True) for t in (x, r, w, b)]
    s64 = torch.where(keep, ins[0] / 0.7, 0.0) + ins[1]
    y64 = F.rms_norm(s64, (40,), ins[2], 1e-6) + ins[3]
    g64 = torch.autograd.grad((y64 * dy.double()).sum() + (s64 * ds.double()).sum(), ins)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for g, g2 in zip(grads, g64):
        torch.testing.assert_close(g.double(), g2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rms", [False, True])
def test_reference_matches_torch_norms_with_inf_and_nan(rms):
    """The reference's dropout-add-norm (the CPU path) against torch's own F.dropout-free
    composition: with no dropout, F.layer_norm / F.rms_norm of x + residual, rows holding
    +inf, -inf and NaN included; with a mask, x * keep / (1 - p) + residual, then the norm."""
    from fastlm.reference import norm as ref_norm
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 33, generator=g, dtype=torch.float64)
    res = torch.randn(6, 33, generator=g, dtype=torch.float64)
    x[1, 4], x[2, 0], res[3, 7] = float("inf"), float("-inf"), float("nan")
    w, b = torch.randn(33, generator=g, dtype=torch.float64), torch.randn(33, generator=g, dtype=torch.float64)

    def torch_norm(s):
        return F.rms_norm(s, (33,), w, 1e-5) if rms else F.layer_norm(s, (33,), w, b, 1e-5)

    y, s = ref_norm.dropout_add_norm(x, res, 33, w, None if rms else b, 1e-5, rms=rms)
    torch.testing.assert_close(s, x + res, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y, torch_norm(x + res), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert y[1:4].isnan().any()  # (the special values reached the output)
    keep = ref_norm.dropout_keep(11, x.shape, 0.3, "cpu")
    assert 0 < int(keep.sum()) < keep.numel()
    y, s = ref_norm.dropout_add_norm(x, res, 33, w, None if rms else b, 1e-5, keep=keep, dropout_p=0.3, rms=rms)
    want_s = torch.where(keep, x / 0.7, 0.0) + res
    torch.testing.assert_close(s, want_s, rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(y, torch_norm(want_s), rtol=1e-12, atol=1e-12, equal_nan=True)
