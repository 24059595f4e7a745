"""Hugging Face rotary on fastlm.apply_rotary_pos_emb (fastlm.integrations.hf_rotary), per model
instance: small random HF models of every recognised family (full rotary, partial rotary as in
GPT-NeoX and Phi-3, OLMo-2's dtype-keeping form, Gemma 3's two rotary tables, rope scaling
types whose cos/sin HF computes) against the unpatched model (logits, loss, every parameter's
gradient, by the project's tolerance rule with a float64 copy as the oracle) on the reference
backend and the Triton kernels; that fastlm's function ran and HF's did not; that another
model of the same class keeps HF's function; that revert restores everything; cached
generation; the formula recognition and its warnings. No downloads: models come from configs."""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import fastlm  # noqa: E402
from fastlm.integrations import hf_rotary as hr  # noqa: E402
from fastlm.integrations import transformers as ft  # noqa: E402
from fastlm.testing import assert_close  # noqa: E402

from .conftest import DEVICE  # noqa: E402
from .test_integrations_transformers import MAKERS, V, bert, close, gpt2, grads, liven, run, t5  # noqa: E402


# ----------------------------------------------------------------------------- small random HF models

def _sizes(small: bool) -> dict:
    d, h = (32, 2) if small else (64, 4)
    return dict(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2, hidden_size=d,
                intermediate_size=2 * d, vocab_size=V, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                pad_token_id=0)


def qwen2(small: bool = False):
    return liven(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_sizes(small))))  # q, k, v biases


def qwen3(small: bool = False):
    s = _sizes(small)
    return liven(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=s["hidden_size"] // s[
        "num_attention_heads"], **s)))  # q and k normed per head before the rotary


def gemma(small: bool = False):
    s = _sizes(small)
    return liven(transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=s["hidden_size"] // s[
        "num_attention_heads"], **s)))


def gemma3(small: bool = False):
    """Two rotary tables: base 10^4 on the sliding layers, 10^6 on the full ones."""
    s = _sizes(small)
    hd = s["hidden_size"] // s["num_attention_heads"]
    cfg = transformers.Gemma3TextConfig(head_dim=hd, query_pre_attn_scalar=hd, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"], **s)
    return liven(transformers.Gemma3ForCausalLM(cfg))


def phi3(small: bool = False, longrope: bool = False):
    """Partial rotary (half of each head), fused qkv projection; optionally longrope scaling
    with the test sequences longer than original_max_position_embeddings (the long factors)."""
    s = _sizes(small)
    rotary_half = s["hidden_size"] // s["num_attention_heads"] // 4
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if longrope:
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
                "long_factor": [2.0 + 0.3 * i for i in range(rotary_half)], "original_max_position_embeddings": 8}
    cfg = transformers.Phi3Config(rope_parameters=rope, original_max_position_embeddings=8, **s)
    return liven(transformers.Phi3ForCausalLM(cfg))


def olmo2(small: bool = False):
    return liven(transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_sizes(small))))


def gpt_neox(small: bool = False):
    """Partial rotary (rotary_pct 0.5), q, k and v as chunks of one projection (strided views)."""
    s = _sizes(small)
    del s["num_key_value_heads"], s["pad_token_id"]
    cfg = transformers.GPTNeoXConfig(rotary_pct=0.5, **s)
    return liven(transformers.GPTNeoXForCausalLM(cfg))


def llama_rope(rope_type: str):
    def make(small: bool = False):
        rope = {"yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8},
                "dynamic": {"rope_type": "dynamic", "factor": 2.0},
                "linear": {"rope_type": "linear", "factor": 3.0}}[rope_type]
        s = _sizes(small)
        if rope_type == "dynamic":  # sequences longer than this make HF recompute its frequencies
            s["max_position_embeddings"] = 8
        cfg = transformers.LlamaConfig(rope_parameters={"rope_theta": 10000.0, **rope}, **s)
        return liven(transformers.LlamaForCausalLM(cfg))
    return make


FAMILIES = {"llama": MAKERS["llama"], "mistral": MAKERS["mistral"], "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma,
            "gemma2": MAKERS["gemma2"], "gemma3": gemma3, "phi3": phi3, "olmo2": olmo2, "gpt_neox": gpt_neox,
            "llama_yarn": llama_rope("yarn"), "llama_llama3": llama_rope("llama3"),
            "llama_dynamic": llama_rope("dynamic"), "llama_linear": llama_rope("linear"),
            "phi3_longrope": lambda small=False: phi3(small, longrope=True)}
# The classes swapped and the modeling module whose apply_rotary_pos_emb they call.
ATTENTION = {"llama": "LlamaAttention", "mistral": "MistralAttention", "qwen2": "Qwen2Attention",
             "qwen3": "Qwen3Attention", "gemma": "GemmaAttention", "gemma2": "Gemma2Attention",
             "gemma3": "Gemma3Attention", "phi3": "Phi3Attention", "olmo2": "Olmo2Attention",
             "gpt_neox": "GPTNeoXAttention", "llama_yarn": "LlamaAttention", "llama_llama3": "LlamaAttention",
             "llama_dynamic": "LlamaAttention", "llama_linear": "LlamaAttention", "phi3_longrope": "Phi3Attention"}
TRITON = list(FAMILIES)


def modeling(model):
    return importlib.import_module(type(model).__module__)


def inputs(kind: str, B: int = 3, L: int = 11):
    """Token ids, labels and a mask with one left-padded row (the Gemma 2/3 float64 eager
    references give NaN on padded rows, so theirs is full)."""
    ids = torch.randint(2, V, (B, L), device=DEVICE)
    mask = torch.ones_like(ids)
    if not kind.startswith("gemma"):
        mask[1, :4] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


# Families whose q_norm / k_norm and rotary become one fastlm.qk_norm_rotary call (issue 23).
QK_NORM = {"qwen3", "gemma3", "olmo2"}


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of fastlm.apply_rotary_pos_emb made by the swapped forwards, and of the
    fused q/k norm + rotary (calls["qk"] counts those alone)."""
    calls = {"n": 0, "qk": 0}

    def counter(real, key):
        def counted(*args, **kwargs):
            calls["n"] += 1
            calls[key] = calls.get(key, 0) + 1
            return real(*args, **kwargs)
        return counted

    monkeypatch.setattr(hr, "apply_rotary_pos_emb", counter(hr.apply_rotary_pos_emb, "rotary"))
    monkeypatch.setattr(hr, "qk_norm_rotary_heads_first", counter(hr.qk_norm_rotary_heads_first, "qk"))
    return calls


def hf_spy(monkeypatch, module):
    """Counts the calls of a modeling module's own apply_rotary_pos_emb (installed after the
    swap: the swapped forwards read their own copy of the globals and must not see it)."""
    calls = {"n": 0}
    real = module.apply_rotary_pos_emb

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "apply_rotary_pos_emb", counted)
    return calls


def swap(model):
    """The rotary swap alone (the other parts of ft.apply are tested in their own files)."""
    handle = ft.Applied(model)
    hr.swap_rotary(model, handle)
    return handle


def n_layers(model) -> int:
    return model.config.num_hidden_layers


# ----------------------------------------------------------------------------- against the unpatched model

@pytest.mark.parametrize("kind, backend", [(k, "torch") for k in FAMILIES] + [(k, "triton") for k in TRITON])
def test_rotary_matches_the_unpatched_model_and_revert_restores_it(kind, backend, spy, monkeypatch):
    original = FAMILIES[kind](small=backend == "triton")
    ids, mask, labels = inputs(kind)
    ref64 = copy.deepcopy(original).double()
    logits64, loss64 = run(ref64, kind, ids, mask, labels)
    g64 = grads(ref64, loss64)
    logits32, loss32 = run(original, kind, ids, mask, labels)
    g32 = grads(original, loss32)
    classes = {name: type(m) for name, m in original.named_modules()}
    module = modeling(original)
    hf_function = module.apply_rotary_pos_emb

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised family swaps without a word
        handle = swap(original)
    attn = [n for n, m in original.named_modules() if classes[n].__name__ == ATTENTION[kind]]
    assert len(attn) == n_layers(original)
    what = "qk_norm_rotary" if kind in QK_NORM else "rotary"
    assert sorted(handle.replaced) == sorted((n, f"{what}: {ATTENTION[kind]}") for n in attn)
    for n in attn:
        m = original.get_submodule(n)
        assert type(m) is not classes[n] and isinstance(m, classes[n])
    assert module.apply_rotary_pos_emb is hf_function  # the module global is untouched
    hf_calls = hf_spy(monkeypatch, module)
    with fastlm.use_backend(backend):
        logits, loss = run(original, kind, ids, mask, labels)
        g = grads(original, loss)
    assert spy["n"] == n_layers(original) and hf_calls["n"] == 0  # fastlm's function ran, once per layer; HF's not
    assert spy["qk"] == (n_layers(original) if kind in QK_NORM else 0)  # the fused call where q and k are normed
    terms = original.config.hidden_size * 4 * 2
    close(logits, logits64, logits32, "logits", terms)
    close(loss, loss64, loss32, "loss", terms)
    names = [n for n, p in original.named_parameters() if p.requires_grad]
    assert len(names) == len(g) and sum(a is not None for a in g) == sum(r is not None for r in g64)
    for name, a, r, e in zip(names, g, g64, g32):
        if r is None:
            assert a is None or not a.any(), name
            continue
        close(a, r, e, f"grad of {name}", terms * ids.numel())

    assert handle.revert() == handle.replaced
    assert {name: type(m) for name, m in original.named_modules()} == classes
    monkeypatch.setattr(module, "apply_rotary_pos_emb", hf_function)
    hf_calls = hf_spy(monkeypatch, module)
    calls = spy["n"]
    back_logits, back_loss = run(original, kind, ids, mask, labels)
    assert spy["n"] == calls and hf_calls["n"] == n_layers(original)  # HF's function again, fastlm's no more
    assert torch.equal(back_logits, logits32) and torch.equal(back_loss, loss32)


def test_a_second_model_of_the_same_class_keeps_hf_rotary(spy, monkeypatch):
    a = FAMILIES["llama"]()
    b = transformers.LlamaForCausalLM(a.config).to(DEVICE).eval()  # same class, same config object, same weights
    b.load_state_dict(a.state_dict())
    ids, mask, labels = inputs("llama")
    before = b(input_ids=ids, attention_mask=mask).logits
    module = modeling(a)
    hf_function = module.apply_rotary_pos_emb
    swap(a)
    assert module.apply_rotary_pos_emb is hf_function
    assert all(type(layer.self_attn) is module.LlamaAttention for layer in b.model.layers)
    assert all(type(layer.self_attn) is not module.LlamaAttention for layer in a.model.layers)
    hf_calls = hf_spy(monkeypatch, module)
    after = b(input_ids=ids, attention_mask=mask).logits
    assert hf_calls["n"] == n_layers(b) and spy["n"] == 0  # b: HF's function, not fastlm's
    assert torch.equal(after, before)
    out = a(input_ids=ids, attention_mask=mask).logits
    assert hf_calls["n"] == n_layers(b) and spy["n"] == n_layers(a)  # a: fastlm's, not HF's
    torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-5)
    # A third model built after the swap is HF's too.
    c = transformers.LlamaForCausalLM(a.config)
    assert all(type(layer.self_attn) is module.LlamaAttention for layer in c.model.layers)


def test_apply_flag_and_revert_through_apply(spy):
    model = FAMILIES["gpt_neox"]()
    ids, mask, labels = inputs("gpt_neox")
    expected = model(input_ids=ids, attention_mask=mask).logits
    others = {k: False for k in ("attention", "norms", "loss", "mlp") if k in inspect.signature(ft.apply).parameters}
    handle = ft.apply(model, **others)  # rotary alone, on by default
    assert [what for _, what in handle] == ["rotary: GPTNeoXAttention"] * n_layers(model)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert spy["n"] == n_layers(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ft.revert(model)
    assert all(type(layer.attention).__name__ == "GPTNeoXAttention" for layer in model.gpt_neox.layers)
    off = ft.apply(model, rotary=False)
    assert not [w for _, w in off if w.startswith("rotary")]
    ft.revert(model)


# ----------------------------------------------------------------------------- generation with a KV cache

@pytest.mark.parametrize("kind, backend", [("llama", "torch"), ("gpt_neox", "torch"), ("gemma3", "torch"),
                                           ("phi3", "torch"), ("olmo2", "triton")])
def test_cached_generation_equals_unpatched(kind, backend, spy):
    """Prefill, then one token at a time against the KV cache with explicit position_ids past 0
    (left padding: row 1's positions start later), then generate(): the same logits and tokens."""
    model = FAMILIES[kind](small=backend == "triton")
    ids, mask, _ = inputs(kind, B=2, L=7)
    mask[1, :3], mask[1, 3:] = 0, 1
    if kind.startswith("gemma"):
        mask.fill_(1)

    def decode(steps=4):
        m = mask.clone()
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            m = torch.cat([m, torch.ones_like(nxt)], dim=1)
            p = pos[:, -1:] + 1
            pos = torch.cat([pos, p], dim=1)
            out = model(input_ids=nxt, attention_mask=m, position_ids=p, cache=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return torch.stack(logits, 1)

    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected_logits, expected = decode(), model.generate(ids, **kw)
    handle = swap(model)
    with fastlm.use_backend(backend):
        got_logits, got = decode(), model.generate(ids, **kw)
    handle.revert()
    assert spy["n"] >= 2 * 5 * n_layers(model)
    torch.testing.assert_close(got_logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, expected) and got.shape[1] == ids.shape[1] + 5


# ----------------------------------------------------------------------------- the functions themselves

FORMS = {"llama": ("llama", False), "gpt_neox": ("gpt_neox", True), "phi3": ("phi3", True),
         "olmo2": ("olmo2", False)}  # modeling module, partial rotary


DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16),
          (torch.float32, torch.float16), (torch.float64, torch.float64)]  # (q and k, cos and sin)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtypes, backend", [(d, "torch") for d in DTYPES]  # the kernel takes no float64
                         + [(d, "triton") for d in DTYPES if d[0] != torch.float64])
def test_fastlm_version_equals_hf_function(form, dtypes, backend):
    """fastlm's replacement against the HF function it replaces: the same dtypes (HF's
    promotion, or OLMo-2's cast back), values within the rounding of HF's own arithmetic
    (float64 oracle), gradients likewise; strided q and k (views of one projection), both
    unsqueeze_dim layouts, cos/sin per batch row (as HF's rotary embeddings make them)."""
    name, partial = FORMS[form]
    hf = getattr(importlib.import_module(f"transformers.models.{name}.modeling_{name}"), "apply_rotary_pos_emb")
    ours = hr.fastlm_version(hf)
    assert ours is not None and ours.__wrapped_hf__ is hf
    qd, td = dtypes
    B, H, Hk, S, D = 2, 3, 1, 5, 16
    R = D // 2 if partial else D
    for unsqueeze_dim in (1, 2):
        packed = torch.randn(B, S, (H + 2 * Hk) * D, device=DEVICE, dtype=qd)
        q = packed[..., :H * D].view(B, S, H, D)
        k = packed[..., H * D:(H + Hk) * D].view(B, S, Hk, D)
        if unsqueeze_dim == 1:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        pos = torch.arange(S, device=DEVICE)[None] + torch.tensor([[0], [3]], device=DEVICE)
        freqs = pos[..., None].double() * (10000.0 ** (-torch.arange(0, R, 2, device=DEVICE).double() / R))
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = (emb.cos() * 1.1).to(td), (emb.sin() * 1.1).to(td)  # a yarn-like attention scaling
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        with fastlm.use_backend(backend):
            out = ours(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        expect = hf(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        ref = hf(q.double(), k.double(), cos.double(), sin.double(), unsqueeze_dim=unsqueeze_dim)
        dq, dk = torch.randn_like(expect[0]), torch.randn_like(expect[1])
        with fastlm.use_backend(backend):
            got_g = torch.autograd.grad(out, (q, k), (dq, dk))
        expect_g = torch.autograd.grad(expect, (q, k), (dq, dk))
        ref_g = torch.autograd.grad(ref, (q, k), (dq.double(), dk.double()))
        for what, a, e, r in zip(("q", "k", "dq", "dk"), (*out, *got_g), (*expect, *expect_g), (*ref, *ref_g)):
            assert a.dtype == e.dtype and a.shape == e.shape, (what, a.dtype, e.dtype)
            assert_close(a, r.to(torch.float64), e, f"{form} {what} (unsqueeze_dim={unsqueeze_dim})")
        assert out[0].is_contiguous() and out[1].is_contiguous()


def test_position_ids_signature_is_kept():
    """Some modeling files keep an unused position_ids parameter before unsqueeze_dim: the
    replacement takes it at the same place."""
    module = importlib.import_module("transformers.models.glmasr.modeling_glmasr")
    hf = module.apply_rotary_pos_emb
    ours = hr.fastlm_version(hf)
    assert ours is not None
    q, k = torch.randn(2, 4, 6, 8, device=DEVICE), torch.randn(2, 2, 6, 8, device=DEVICE)
    pos = torch.arange(6, device=DEVICE)[None].expand(2, 6)
    freqs = pos[..., None].float() * (10000.0 ** (-torch.arange(0, 4, 2, device=DEVICE).float() / 4))
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    for a, b in zip(ours(q, k, cos, sin, pos, 1), hf(q, k, cos, sin, pos, 1)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_recognition():
    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    assert hr._recognise(llama.apply_rotary_pos_emb) == (False, False)
    assert hr._recognise(importlib.import_module("transformers.models.olmo2.modeling_olmo2").apply_rotary_pos_emb) \
        == (True, False)
    gptj = importlib.import_module("transformers.models.gptj.modeling_gptj")
    assert hr._recognise(gptj.apply_rotary_pos_emb) is None  # interleaved pairs, another signature
    assert hr._recognise(llama.rotate_half) is None

    def almost(q, k, cos, sin, unsqueeze_dim=1):  # Llama's, but sin with the wrong sign
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        q_embed = (q * cos) - (rotate_half(q) * sin)  # noqa: F821
        k_embed = (k * cos) - (rotate_half(k) * sin)  # noqa: F821
        return q_embed, k_embed

    assert hr._recognise(almost) is None
    assert hr._recognise(lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)) is None


# ----------------------------------------------------------------------------- what is left alone

def test_unrecognised_rotary_is_left_alone_with_one_warning(monkeypatch):
    monkeypatch.setattr(hr, "_warned", set())
    cfg = transformers.GPTJConfig(n_layer=2, n_head=4, n_embd=64, rotary_dim=8, vocab_size=V, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = liven(transformers.GPTJForCausalLM(cfg))
    with pytest.warns(UserWarning, match=r"transformers\.models\.gptj\.modeling_gptj.*unchanged") as record:
        handle = swap(model)
    assert len([w for w in record if "fastlm" in str(w.message)]) == 1  # once per class, not per layer
    assert handle.replaced == [] and handle._undo == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap(liven(transformers.GPTJForCausalLM(cfg)))  # a second model: no second warning

    # A modeling file whose function someone else has replaced: its formula cannot be checked.
    module = importlib.import_module("transformers.models.llama.modeling_llama")
    monkeypatch.setattr(module, "apply_rotary_pos_emb", lambda *a, **k: module.rotate_half(a[0]))
    with pytest.warns(UserWarning, match=r"modeling_llama\.apply_rotary_pos_emb.*not recognise"):
        handle = swap(FAMILIES["llama"]())
    assert handle.replaced == []


def test_instance_forward_overrides_are_left_alone(monkeypatch, spy):
    """An attention module whose forward is set on the instance (accelerate's hooks do so)
    would never run the class's forward: it is not swapped, and that is said once."""
    monkeypatch.setattr(hr, "_warned", set())
    model = FAMILIES["llama"]()
    hooked = model.model.layers[0].self_attn
    hooked.forward = hooked.forward  # an instance attribute, as a hook leaves it
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn .*forward replaced on the instance"):
        handle = swap(model)
    assert [n for n, _ in handle] == ["model.layers.1.self_attn"]
    assert type(hooked).__name__ == "LlamaAttention"
    ids, mask, _ = inputs("llama")
    model(input_ids=ids, attention_mask=mask)
    assert spy["n"] == 1  # the other layer only
    handle.revert()


def test_globals_rebound_after_a_swap_reach_later_swaps_only(monkeypatch):
    """The swapped forward reads a copy of its module's globals taken when its class was built;
    a global rebound since (here the eager attention function) gives later swaps a new class
    that sees it, and leaves earlier swaps as they were."""
    module = importlib.import_module("transformers.models.llama.modeling_llama")
    first = FAMILIES["llama"]()
    first.set_attn_implementation("eager")
    swap(first)
    calls = {"n": 0}
    real = module.eager_attention_forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", counted)
    second = FAMILIES["llama"]()
    second.set_attn_implementation("eager")
    swap(second)
    assert type(first.model.layers[0].self_attn) is not type(second.model.layers[0].self_attn)
    ids, mask, _ = inputs("llama")
    first(input_ids=ids, attention_mask=mask)
    assert calls["n"] == 0
    second(input_ids=ids, attention_mask=mask)
    assert calls["n"] == n_layers(second)


@pytest.mark.parametrize("make", [gpt2, bert, t5])
def test_models_without_rotary_are_untouched(make, recwarn):
    model = make()
    handle = swap(model)
    assert handle.replaced == [] and not [w for w in recwarn if "fastlm" in str(w.message)]


def test_swapped_model_traces_without_graph_breaks():
    """HF's forward rebound to fastlm's function is still plain code around a custom op."""
    model = FAMILIES["llama"]()
    ids, mask, labels = inputs("llama")
    handle = swap(model)
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    handle.revert()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    ops = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes]
    assert sum("fastlm.rotary_pos_emb" in op for op in ops) == n_layers(model), ops  # fastlm's op was traced
