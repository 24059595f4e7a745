"""fastlm.patch / unpatch on plain PyTorch models."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

import fastlm
from fastlm.testing import assert_close

from .conftest import DEVICE


class MyNorm(torch.nn.LayerNorm):  # a user's subclass: its forward is kept
    pass


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                                          torch.nn.RMSNorm(32))
        self.custom = MyNorm(32)
        self.head = torch.nn.Linear(32, 11)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, target):
        h = self.norm(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.custom(self.blocks(h))
        logits = self.head(h)
        return self.loss(logits.flatten(0, 1), target.flatten())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_swaps_in_place_and_unpatch_restores(backend):
    torch.manual_seed(0)
    net = Net().to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    t = torch.randint(0, 11, (2, 9), device=DEVICE)
    before = net(x, t)
    g_before = torch.autograd.grad(before, list(net.parameters()))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = {k: v.data_ptr() for k, v in net.named_parameters()}

    replaced = fastlm.patch(net)
    assert sorted(replaced) == sorted([("norm", "LayerNorm"), ("attn", "MultiheadAttention"),
                                       ("blocks.3", "RMSNorm"), ("loss", "CrossEntropyLoss")])
    assert type(net.norm) is fastlm.nn.LayerNorm and type(net.attn) is fastlm.nn.MultiheadAttention
    assert type(net.blocks[3]) is fastlm.nn.RMSNorm and type(net.loss) is fastlm.nn.CrossEntropyLoss
    assert type(net.custom) is MyNorm and type(net.head) is torch.nn.Linear
    assert {k: v.data_ptr() for k, v in net.named_parameters()} == params  # the same tensors
    assert net.state_dict().keys() == state.keys()
    with fastlm.use_backend(backend):
        after = net(x, t)
        g_after = torch.autograd.grad(after, list(net.parameters()))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_after, g_before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    restored = fastlm.unpatch(net)
    assert sorted(restored) == sorted(replaced)
    assert type(net.norm) is torch.nn.LayerNorm and type(net.loss) is torch.nn.CrossEntropyLoss
    assert not hasattr(net.loss, "z_loss") and not hasattr(net.norm, "_fastlm_original_class")
    torch.testing.assert_close(net(x, t), before)


def test_patch_linear_and_the_model_itself():
    lin = torch.nn.Linear(8, 4)
    assert fastlm.patch(lin) == []
    assert fastlm.patch(lin, linear=True) == [("", "Linear")]
    assert type(lin) is fastlm.nn.Linear and lin.activation is None
    x = torch.randn(3, 8)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)
    assert fastlm.unpatch(lin) == [("", "Linear")] and type(lin) is torch.nn.Linear


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch 2.13's module")
def test_patch_swaps_linear_cross_entropy_loss():
    """torch 2.13's LinearCrossEntropyLoss becomes fastlm's (its extras set off), with the same
    state_dict and the same loss and gradients; unpatch restores it and removes the extras."""
    torch.manual_seed(4)
    lce = torch.nn.LinearCrossEntropyLoss(16, 40, bias=True, weight=torch.rand(40) + 0.5, label_smoothing=0.1)
    twin = copy.deepcopy(lce)
    sd = {k: v.clone() for k, v in lce.state_dict().items()}
    x, t = torch.randn(70, 16), torch.randint(0, 40, (70,))
    t[::7] = -100
    assert fastlm.patch(lce) == [("", "LinearCrossEntropyLoss")]
    assert type(lce) is fastlm.nn.LinearCrossEntropyLoss
    assert (lce.z_loss, lce.softcap, lce.chunk_size, lce.acc_dtype) == (0.0, None, None, None)
    assert all(torch.equal(v, sd[k]) for k, v in lce.state_dict().items()) and lce.state_dict().keys() == sd.keys()
    lce.chunk_size = 16  # the fused chunked op, not the unfused one-chunk path
    got = lce(x, t)
    g_got = torch.autograd.grad(got, list(lce.parameters()))
    ref = twin(x, t)
    g_ref = torch.autograd.grad(ref, list(twin.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(g_got, g_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert fastlm.unpatch(lce) == [("", "LinearCrossEntropyLoss")]
    assert type(lce) is torch.nn.LinearCrossEntropyLoss
    assert not {"z_loss", "softcap", "chunk_size", "acc_dtype"} & set(lce.__dict__)


def test_patching_twice_is_harmless_and_bad_input_is_named():
    net = torch.nn.Sequential(torch.nn.LayerNorm(4))
    assert len(fastlm.patch(net)) == 1 and fastlm.patch(net) == []
    with pytest.raises(TypeError, match="model"):
        fastlm.patch("not a module")


def test_patched_attention_warns_about_need_weights_once():
    import fastlm.nn.attention as mha
    mha._warned_need_weights = False
    net = torch.nn.Sequential()
    net.attn = torch.nn.MultiheadAttention(16, 2)
    fastlm.patch(net)
    x = torch.randn(5, 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.attn(x, x, x)
    assert any("need_weights" in str(w.message) for w in caught)


# ---- nn.TransformerEncoderLayer: torch's inference fast path would skip the patched attention (issue 20)

E_MODEL, HEADS, B, L = 16, 4, 3, 7


@pytest.fixture
def attention_calls(monkeypatch):
    """Every call of fastlm.nn.MultiheadAttention.forward, counted (a forward hook would not do:
    torch's layer takes its fast path only where no module in it has hooks)."""
    calls = []
    forward = fastlm.nn.MultiheadAttention.forward

    def counted(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(fastlm.nn.MultiheadAttention, "forward", counted)
    return calls


@pytest.fixture
def torch_fast_path_calls(monkeypatch):
    """Every call of torch's fused encoder layer (the fast path), counted."""
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counted(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counted)
    return calls


def randomized(module):
    """torch starts biases at 0 and norm weights at 1: make every parameter matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module


def triple(make, dtype):
    """(patched module in dtype, unpatched in dtype, unpatched in float64), same parameters."""
    oracle = randomized(make().to(DEVICE)).double()
    theirs = copy.deepcopy(oracle).to(dtype)
    ours = copy.deepcopy(theirs)
    fastlm.patch(ours)
    return ours, theirs, oracle


def layer_masks(kind, dtype):
    """Forward kwargs for one masking case (torch's convention: True / -inf = masked out)."""
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[1, 5:] = True
    kpm[2, 2:] = True
    if kind == "none":
        return {}
    if kind == "padding":
        return {"src_key_padding_mask": kpm}
    if kind == "additive":
        return {"src_mask": torch.randn(L, L, dtype=dtype, device=DEVICE)}
    if kind == "causal":
        return {"src_mask": torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE, dtype=dtype),
                "is_causal": True}
    if kind == "padding+bool mask":
        return {"src_mask": torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1), "src_key_padding_mask": kpm}
    raise AssertionError(kind)


@contextlib.contextmanager
def torch_slow_path():
    """torch's layers with their fast path off (torch's own switch), restored after."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def cast(kwargs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def assert_equal_to_unpatched(out, ref64, eager):
    """float64: equal to torch's float64 result to float64 rounding; float32: fastlm's rule
    (the float64 unpatched model as oracle, torch's float32 result as yardstick)."""
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-12, atol=1e-12)
    else:
        assert_close(out, ref64, eager)


MASKS = ["none", "padding", "additive", "causal", "padding+bool mask"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_patched_encoder_layer_runs_fastlm_attention_at_inference(dtype, batch_first, norm_first, attention_calls,
                                                                   torch_fast_path_calls):
    """eval + no_grad is where torch's layer calls its fused kernel and never its self_attn:
    the patched layer runs fastlm's attention there too, and gives the unpatched numbers. The
    one exception is torch's: its fused kernel reads an additive float src_mask as boolean
    (NaN everywhere for a random one), so there the oracle is torch's slow path."""
    ours, theirs, oracle = triple(lambda: torch.nn.TransformerEncoderLayer(
        E_MODEL, HEADS, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first), dtype)
    assert type(ours) is fastlm.nn.TransformerEncoderLayer and type(ours.self_attn) is fastlm.nn.MultiheadAttention
    for m in (ours, theirs, oracle):
        m.eval()
    x = torch.randn((B, L, E_MODEL) if batch_first else (L, B, E_MODEL), device=DEVICE, dtype=torch.float64)
    for kind in MASKS:
        kwargs = layer_masks(kind, torch.float64)
        with torch.no_grad(), fastlm.use_backend("torch"):
            torch_fast_path_calls.clear()
            eager = theirs(x.to(dtype), **cast(kwargs, dtype))
            ref = oracle(x, **kwargs)
            # the case this test is about: torch does take its fast path here
            assert len(torch_fast_path_calls) == (2 if batch_first else 0), kind
            if kind == "additive":
                with torch_slow_path():
                    eager, ref = theirs(x.to(dtype), **cast(kwargs, dtype)), oracle(x, **kwargs)
            torch_fast_path_calls.clear()
            attention_calls.clear()
            out = ours(x.to(dtype), **cast(kwargs, dtype))
        assert torch_fast_path_calls == [] and attention_calls == [ours.self_attn], kind
        assert out.dtype == dtype and out.shape == x.shape
        assert_equal_to_unpatched(out, ref, eager)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_encoder_layer_with_grad(dtype, batch_first, norm_first, mode, attention_calls):
    """With gradients (training, or eval with grad enabled) torch runs the composed path as
    well: outputs and gradients equal the unpatched layer's."""
    ours, theirs, oracle = triple(lambda: torch.nn.TransformerEncoderLayer(
        E_MODEL, HEADS, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first, activation="gelu"), dtype)
    for m in (ours, theirs, oracle):
        m.train(mode == "train")
    x = torch.randn((B, L, E_MODEL) if batch_first else (L, B, E_MODEL), device=DEVICE, dtype=torch.float64)
    dout = torch.randn_like(x)
    names = ["self_attn.in_proj_weight", "self_attn.out_proj.bias", "norm1.weight", "linear1.weight"]

    def run(module, dt, kwargs):
        xx = x.to(dt).requires_grad_(True)
        out = module(xx, **cast(kwargs, dt))
        params = dict(module.named_parameters())
        return out, torch.autograd.grad(out, [xx] + [params[n] for n in names], dout.to(dt))

    for kind in MASKS:
        kwargs = layer_masks(kind, torch.float64)
        with fastlm.use_backend("torch"):
            attention_calls.clear()
            out, grads = run(ours, dtype, kwargs)
        assert attention_calls == [ours.self_attn], kind
        ref, ref_grads = run(oracle, torch.float64, kwargs)
        eager, eager_grads = run(theirs, dtype, kwargs)
        assert_equal_to_unpatched(out, ref, eager)
        for g, r, e in zip(grads, ref_grads, eager_grads):
            assert_equal_to_unpatched(g, r, e)


def test_patched_encoder_layer_on_the_triton_kernel(attention_calls, torch_fast_path_calls):
    """The same inference case on fastlm's own attention kernel (float32)."""
    ours, theirs, oracle = triple(lambda: torch.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32, batch_first=True),
                                  torch.float32)
    for m in (ours, theirs, oracle):
        m.eval()
    x = torch.randn(B, L, E_MODEL, device=DEVICE, dtype=torch.float64)
    for kind in ["padding", "causal"]:
        kwargs = layer_masks(kind, torch.float64)
        with torch.no_grad():
            ref, eager = oracle(x, **kwargs), theirs(x.float(), **cast(kwargs, torch.float32))
            torch_fast_path_calls.clear()
            attention_calls.clear()
            with fastlm.use_backend("triton"):
                out = ours(x.float(), **cast(kwargs, torch.float32))
        assert torch_fast_path_calls == [] and attention_calls == [ours.self_attn]
        assert_close(out, ref, eager)


def test_a_sequence_that_is_all_padding_follows_torchs_slow_path():
    """Where torch's two paths disagree, fastlm follows the composed (slow) one: a sequence
    whose every key is padding gets finite values there (its queries attend to nothing); the
    fused kernel gives NaN there (as torch 2.13 does), which the assertion does not depend on."""
    ours, theirs, _ = triple(lambda: torch.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32, batch_first=True),
                             torch.float64)
    ours.eval()
    theirs.eval()
    x = torch.randn(B, L, E_MODEL, device=DEVICE, dtype=torch.float64)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    with torch.no_grad(), fastlm.use_backend("torch"):
        out = ours(x, src_key_padding_mask=kpm)
        with torch_slow_path():
            slow = theirs(x, src_key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("final_norm", [False, True])
def test_patched_encoder_with_nested_tensors(dtype, mode, final_norm, attention_calls, monkeypatch):
    """nn.TransformerEncoder (enable_nested_tensor=True) packs a padded batch into a nested
    tensor in eval mode (the fast path's conditions) and pads the result with zeros: the patched
    encoder runs fastlm's attention in every layer and gives the same numbers, padded positions
    included; in training it keeps the padded batch, and so does the patched one."""
    packed = []
    pack = torch._nested_tensor_from_mask

    def counted(*args, **kwargs):
        packed.append(1)
        return pack(*args, **kwargs)

    monkeypatch.setattr(torch, "_nested_tensor_from_mask", counted)

    def make():
        layer = torch.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
        norm = torch.nn.LayerNorm(E_MODEL) if final_norm else None
        return torch.nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype warning on nested tensors
        ours, theirs, oracle = triple(make, dtype)
        assert [type(m) for m in ours.layers] == [fastlm.nn.TransformerEncoderLayer] * 2
        assert theirs.use_nested_tensor and ours.use_nested_tensor
        for m in (ours, theirs, oracle):
            m.train(mode == "train")
        x = torch.randn(B, L, E_MODEL, device=DEVICE, dtype=torch.float64)
        kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
        kpm[1, 5:] = True
        kpm[2, 2:] = True
        with torch.no_grad(), fastlm.use_backend("torch"):
            ref, eager = oracle(x, src_key_padding_mask=kpm), theirs(x.to(dtype), src_key_padding_mask=kpm)
            packed.clear()
            attention_calls.clear()
            out = ours(x.to(dtype), src_key_padding_mask=kpm)
    assert len(packed) == (1 if mode == "eval" else 0)  # torch's own decision, kept
    assert attention_calls == list(ours.layers[i].self_attn for i in range(2))
    if mode == "eval":  # torch's nested path writes 0 at padded positions (the final norm's bias after it)
        expected = ours.norm.bias.detach() if final_norm else torch.zeros(E_MODEL, dtype=dtype, device=DEVICE)
        torch.testing.assert_close(out[kpm], expected.expand(int(kpm.sum()), E_MODEL), rtol=0, atol=0)
    assert_equal_to_unpatched(out, ref, eager)


def test_patched_layer_takes_a_nested_tensor():
    """A nested batch given to the layer itself (torch's fast path takes it in eval mode)."""
    ours, theirs, _ = triple(lambda: torch.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32, dropout=0.0,
                                                                      batch_first=True), torch.float64)
    ours.eval()
    theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seqs = [torch.randn(n, E_MODEL, device=DEVICE, dtype=torch.float64) for n in (5, 2, 7)]
        src = torch.nested.nested_tensor(seqs)
        with torch.no_grad(), fastlm.use_backend("torch"):
            out, ref = ours(src), theirs(src)
        assert out.is_nested
        for o, r, s in zip(out.unbind(), ref.unbind(), seqs):
            assert o.shape == s.shape
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="src_key_padding_mask"):
            ours(src, src_key_padding_mask=torch.zeros(3, 7, dtype=torch.bool, device=DEVICE))
        # beyond torch (whose attention refuses a nested batch outside its fast path): training,
        # gradients, the jagged layout; each sequence as if run alone
        ours.train()
        for layout in (torch.strided, torch.jagged):
            leaves = [t.clone().requires_grad_(True) for t in seqs]
            with fastlm.use_backend("torch"):
                out = ours(torch.nested.as_nested_tensor(leaves, layout=layout))
                alone = [ours(t[None])[0] for t in seqs]
            assert out.is_nested and out.layout == layout
            for o, a in zip(out.unbind(), alone):
                torch.testing.assert_close(o, a, rtol=1e-12, atol=1e-12)
            sum(o.square().sum() for o in out.unbind()).backward()
            assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_patched_transformer_runs_fastlm_attention_everywhere(attention_calls):
    """nn.Transformer: the encoder layers (fast path in torch) and the decoder layers (no fast
    path in torch 2.13: its attention modules always run) all run fastlm's attention."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs, oracle = triple(lambda: torch.nn.Transformer(
            E_MODEL, HEADS, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
            batch_first=True), torch.float32)
    for m in (ours, theirs, oracle):
        m.eval()
    src = torch.randn(B, L, E_MODEL, device=DEVICE, dtype=torch.float64)
    tgt = torch.randn(B, 5, E_MODEL, device=DEVICE, dtype=torch.float64)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[2, 4:] = True
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, device=DEVICE)
    kwargs = {"src_key_padding_mask": kpm, "memory_key_padding_mask": kpm, "tgt_is_causal": True}
    with torch.no_grad(), fastlm.use_backend("torch"):
        ref = oracle(src, tgt, tgt_mask=tgt_mask.double(), **kwargs)
        eager = theirs(src.float(), tgt.float(), tgt_mask=tgt_mask, **kwargs)
        attention_calls.clear()
        out = ours(src.float(), tgt.float(), tgt_mask=tgt_mask, **kwargs)
    assert len(attention_calls) == 2 + 2 * 2
    assert_close(out, ref, eager)


def test_encoder_layer_patch_unpatch_and_state_dict():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32, batch_first=True), 2)
    randomized(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.data_ptr() for k, v in model.named_parameters()}
    replaced = fastlm.patch(model)
    for i in range(2):
        assert (f"layers.{i}", "TransformerEncoderLayer") in replaced
        assert (f"layers.{i}.self_attn", "MultiheadAttention") in replaced
    assert type(model) is torch.nn.TransformerEncoder  # not swapped: its nested-tensor decision stays torch's
    assert {k: v.data_ptr() for k, v in model.named_parameters()} == params
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not set(model.layers[0].__dict__) - {"_fastlm_original_class"} - set(
        torch.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32).__dict__)  # no state added
    assert sorted(fastlm.unpatch(model)) == sorted(replaced)
    assert all(type(m) is torch.nn.TransformerEncoderLayer for m in model.layers)
    assert all(type(m.self_attn) is torch.nn.MultiheadAttention for m in model.layers)
    assert not any(hasattr(m, "_fastlm_original_class") for m in model.modules())


def test_encoder_layer_subclass_is_not_swapped():
    class MyLayer(torch.nn.TransformerEncoderLayer):  # a user's subclass: its forward is kept
        pass

    layer = MyLayer(E_MODEL, HEADS, 32)
    replaced = fastlm.patch(layer)
    assert type(layer) is MyLayer and all(name != "" for name, _ in replaced)
    assert type(layer.self_attn) is fastlm.nn.MultiheadAttention


def test_fastlm_encoder_layer_built_directly(attention_calls):
    """fastlm.nn.TransformerEncoderLayer built by hand: torch's constructor and state_dict, and
    fastlm's attention and norms inside."""
    theirs = randomized(torch.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32, batch_first=True, device=DEVICE))
    ours = fastlm.nn.TransformerEncoderLayer(E_MODEL, HEADS, 32, batch_first=True, device=DEVICE)
    assert isinstance(ours, torch.nn.TransformerEncoderLayer)
    assert type(ours.self_attn) is fastlm.nn.MultiheadAttention and type(ours.norm1) is fastlm.nn.LayerNorm
    assert type(ours.norm2) is fastlm.nn.LayerNorm and type(ours.linear1) is torch.nn.Linear
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    x = torch.randn(B, L, E_MODEL, device=DEVICE)
    with torch.no_grad(), fastlm.use_backend("torch"):
        attention_calls.clear()
        out = ours(x)
        assert attention_calls == [ours.self_attn]
        torch.testing.assert_close(out, theirs(x), rtol=1e-5, atol=1e-5)


def test_patch_swaps_kl_div_loss():
    """torch.nn.KLDivLoss becomes fastlm's (fastlm.kl_div), same numbers and gradients; unpatch restores it."""
    model = torch.nn.Module()
    model.loss = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64).log_softmax(-1)
    want = model.loss(x.log_softmax(-1), t)
    (gw,) = torch.autograd.grad(want, x)
    replaced = fastlm.patch(model)
    assert ("loss", "KLDivLoss") in replaced and type(model.loss) is fastlm.nn.KLDivLoss
    got = model.loss(x.log_softmax(-1), t)
    (gg,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gg, gw)
    fastlm.unpatch(model)
    assert type(model.loss) is torch.nn.KLDivLoss
