"""Hugging Face transformers and fastlm: GPT/BertForMaskedLM.from_transformers against the HF
models they are built from, and fastlm.integrations.transformers.apply/revert on small randomly
initialised HF models (GPT-2, BERT, Llama with GQA, T5), compared with the unpatched model:
logits, loss and parameter gradients by the project's tolerance rule (a float64 copy of the HF
model is the reference, the float32 HF model the yardstick), on the reference backend and, at
tiny sizes, on the Triton kernels under the interpreter. No downloads: models come from configs."""

from __future__ import annotations

import copy

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import fastlm  # noqa: E402
from fastlm.integrations import transformers as ft  # noqa: E402
from fastlm.models import GPT, BertForMaskedLM  # noqa: E402
from fastlm.testing import assert_close, cancellation_floor, summation_floor  # noqa: E402

from .conftest import DEVICE  # noqa: E402

V = 101


# ----------------------------------------------------------------------------- small random HF models

def liven(model: torch.nn.Module) -> torch.nn.Module:
    """HF's init (std 0.02, zero biases, unit norms) leaves a tiny model nearly linear: give
    every parameter a real effect (fresh draws, so each test sees new weights)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            elif "embed" in name or name.endswith("wte.weight") or name.endswith("wpe.weight") \
                    or "shared" in name or "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
            else:
                fan_in = p.shape[0] if type(model).__name__.startswith("GPT2") and p.shape[0] != V else p.shape[1]
                p.normal_(0.0, fan_in ** -0.5)
    return model.to(DEVICE).eval()


def gpt2(small: bool = False, **overrides):
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.GPT2Config(n_layer=2, n_head=h, n_embd=d, vocab_size=V, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, **overrides)
    return liven(transformers.GPT2LMHeadModel(cfg))


def bert(small: bool = False, **overrides):
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=h, hidden_size=d, intermediate_size=2 * d,
                                  vocab_size=V, max_position_embeddings=64, **overrides)
    return liven(transformers.BertForMaskedLM(cfg))


def llama(small: bool = False, **overrides):
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2,
                                   hidden_size=d, intermediate_size=2 * d, vocab_size=V, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides)
    return liven(transformers.LlamaForCausalLM(cfg))


def t5(small: bool = False):
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.T5Config(num_layers=2, num_decoder_layers=2, num_heads=h, d_model=d, d_kv=d // h, d_ff=2 * d,
                                vocab_size=V, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return liven(transformers.T5ForConditionalGeneration(cfg))


def mistral(small: bool = False):
    """Llama's layout with a sliding window shorter than the test sequences."""
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.MistralConfig(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2,
                                     hidden_size=d, intermediate_size=2 * d, vocab_size=V,
                                     max_position_embeddings=64, sliding_window=4, bos_token_id=0, eos_token_id=0,
                                     pad_token_id=0)
    return liven(transformers.MistralForCausalLM(cfg))


def gemma2(small: bool = False):
    """Soft-capped attention scores, alternating sliding-window and full layers, (1 + w) norms."""
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.Gemma2Config(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2,
                                    head_dim=d // h, hidden_size=d, intermediate_size=2 * d, vocab_size=V,
                                    max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=None, query_pre_attn_scalar=d // h, bos_token_id=0,
                                    eos_token_id=0, pad_token_id=0)
    return liven(transformers.Gemma2ForCausalLM(cfg))


def gpt_oss(small: bool = False):
    """Attention sinks (s_aux), alternating sliding-window and full layers, a mixture of experts."""
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.GptOssConfig(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2,
                                    head_dim=d // h, hidden_size=d, intermediate_size=2 * d, vocab_size=V,
                                    max_position_embeddings=64, sliding_window=4, num_local_experts=2,
                                    num_experts_per_tok=1, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                    layer_types=["sliding_attention", "full_attention"],
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._experts_implementation = "eager"  # the float64 oracle: torch's grouped GEMM takes no float64
    model = liven(transformers.GptOssForCausalLM(cfg))
    with torch.no_grad():
        for layer in model.model.layers:  # HF initialises the sinks to 0: make them matter
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def _decoder(config_cls, model_cls, small: bool, **fields):
    """A tiny 2-layer decoder-only model of a Llama-like family (GQA where it has it)."""
    d, h = (32, 2) if small else (64, 4)
    common = dict(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2, hidden_size=d,
                  intermediate_size=2 * d, vocab_size=V, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    common.update(fields)
    return liven(model_cls(config_cls(**common)))


def qwen2(small: bool = False):
    return _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, small)


def qwen3(small: bool = False):
    d, h = (32, 2) if small else (64, 4)
    return _decoder(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, small, head_dim=d // h)


def gemma(small: bool = False):
    d, h = (32, 2) if small else (64, 4)
    return _decoder(transformers.GemmaConfig, transformers.GemmaForCausalLM, small, head_dim=d // h)


def gemma3(small: bool = False):
    """Gemma 3's text model: sliding and global layers, q/k norms, soft-capping off."""
    d, h = (32, 2) if small else (64, 4)
    return _decoder(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, small, head_dim=d // h,
                    sliding_window=4, query_pre_attn_scalar=d // h,
                    layer_types=["sliding_attention", "full_attention"])


def phi3(small: bool = False):
    """Phi-3: fused qkv and gate_up projections, partial rotary."""
    return _decoder(transformers.Phi3Config, transformers.Phi3ForCausalLM, small, partial_rotary_factor=0.5)


def olmo2(small: bool = False):
    return _decoder(transformers.Olmo2Config, transformers.Olmo2ForCausalLM, small)


def gpt_neox(small: bool = False):
    """GPT-NeoX: LayerNorms, parallel residual, partial rotary."""
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=h, hidden_size=d,
                                     intermediate_size=2 * d, vocab_size=V, max_position_embeddings=64,
                                     rotary_pct=0.5, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return liven(transformers.GPTNeoXForCausalLM(cfg))


def roberta(small: bool = False):
    d, h = (32, 2) if small else (64, 4)
    cfg = transformers.RobertaConfig(num_hidden_layers=2, num_attention_heads=h, hidden_size=d,
                                     intermediate_size=2 * d, vocab_size=V, max_position_embeddings=64,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return liven(transformers.RobertaForMaskedLM(cfg))


def mixtral(small: bool = False):
    """Mixtral: a mixture of gated experts (top-2 of 4), sliding window off."""
    cfg_extra = dict(num_local_experts=4, num_experts_per_tok=2)
    model = _decoder(transformers.MixtralConfig, transformers.MixtralForCausalLM, small, **cfg_extra)
    model.config._experts_implementation = "eager"  # the float64 oracle: torch's grouped GEMM takes no float64
    return model


MAKERS = {"gpt2": gpt2, "bert": bert, "llama": llama, "t5": t5, "mistral": mistral, "gemma2": gemma2,
          "gpt_oss": gpt_oss, "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma, "gemma3": gemma3, "phi3": phi3,
          "olmo2": olmo2, "gpt_neox": gpt_neox, "roberta": roberta, "mixtral": mixtral}
NORMS = {"gpt2": "LayerNorm", "bert": "LayerNorm", "llama": "LlamaRMSNorm", "t5": "T5LayerNorm",
         "mistral": "MistralRMSNorm", "gemma2": "Gemma2RMSNorm", "gpt_oss": "GptOssRMSNorm",
         "qwen2": "Qwen2RMSNorm", "qwen3": "Qwen3RMSNorm", "gemma": "GemmaRMSNorm", "gemma3": "Gemma3RMSNorm",
         "phi3": "Phi3RMSNorm", "olmo2": "Olmo2RMSNorm", "gpt_neox": "LayerNorm", "roberta": "LayerNorm",
         "mixtral": "MixtralRMSNorm"}


def batch(B: int = 3, L: int = 11, lengths=(11, 6, 1)):
    """Token ids, a right-padded attention mask (0 = padding) and labels (-100 at padding)."""
    ids = torch.randint(2, V, (B, L), device=DEVICE)
    mask = (torch.arange(L, device=DEVICE)[None, :] < torch.tensor(lengths[:B], device=DEVICE)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def run(model, kind: str, ids, mask, labels, decoder=None):
    """(logits, loss) of an HF model, the logits zeroed where the position is padding."""
    if kind == "t5":
        out = model(input_ids=ids, attention_mask=mask, labels=decoder)
        return out.logits, out.loss
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return torch.where(mask[..., None] == 1, out.logits, 0.0), out.loss


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def close(out, ref64, eager, name, terms, atol=0.0):
    assert torch.isfinite(ref64).all(), f"{name}: the float64 reference is not finite"  # (the rule skips such elements)
    assert_close(out, ref64, eager, name, atol=summation_floor(ref64, torch.float32, terms) + atol)


def record_bias_terms(model):
    """Records, through the next forward and backward of ``model``, the terms whose sum is each
    bias's gradient: the gradient reaching the output of the module that adds the bias, one
    row per token. Some of these sums cancel to 0 in exact arithmetic (a key projection's
    bias: softmax ignores a constant added to a query's scores), where only the terms bound
    the error (fastlm.testing.cancellation_floor). Returns (terms by parameter name, hooks)."""
    terms, hooks = {}, []
    for prefix, module in model.named_modules():
        bias = module._parameters.get("bias")
        if bias is None or bias.dim() != 1:
            continue

        def hook(mod, args, out, _name=f"{prefix}.bias" if prefix else "bias", _n=bias.shape[0]):
            if isinstance(out, torch.Tensor) and out.requires_grad and out.shape[-1] == _n:
                out.register_hook(lambda g: terms.__setitem__(_name, g.detach().reshape(-1, _n)))

        hooks.append(module.register_forward_hook(hook))
    return terms, hooks


# ----------------------------------------------------------------------------- GPT.from_transformers

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", ["tied", "untied", "body", "gelu"])
def test_gpt_from_transformers_matches_hf(backend, variant):
    small = backend == "triton"
    overrides = {"tie_word_embeddings": False} if variant == "untied" else {}
    if variant == "gelu":
        overrides["activation_function"] = "gelu"
    hf = gpt2(small, **overrides)
    source = hf.transformer if variant == "body" else hf
    model = GPT.from_transformers(source)
    assert model.config.tie_embeddings == (variant != "untied")
    assert model.config.activation == ("gelu" if variant == "gelu" else "gelu_tanh")
    ids = torch.randint(0, V, (2, 13), device=DEVICE)
    labels = ids.clone()
    labels[0, 4] = -100
    with fastlm.use_backend(backend):
        out = model(ids, labels=labels, return_logits=True)
    ref = copy.deepcopy(hf).double()(ids, labels=labels)
    eager = hf(ids, labels=labels)
    terms = hf.config.n_embd * 4 * hf.config.n_layer
    close(out["logits"], ref.logits, eager.logits, "logits", terms)
    close(out["loss"], ref.loss, eager.loss, "loss", terms)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt_greedy_generation_equals_hf_generate(backend):
    hf = gpt2(small=backend == "triton")
    model = GPT.from_transformers(hf)
    prompt = torch.randint(0, V, (2, 5), device=DEVICE)
    expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with fastlm.use_backend(backend):
        got = model.generate(prompt, 8, temperature=0)
    assert torch.equal(got, expected)


def test_from_transformers_keeps_dtype_and_device():
    hf = gpt2().double()
    model = GPT.from_transformers(hf)
    assert {p.dtype for p in model.parameters()} == {torch.float64} and next(model.parameters()).device == DEVICE
    ids = torch.randint(0, V, (2, 7), device=DEVICE)
    torch.testing.assert_close(model(ids)["logits"], hf(ids).logits, rtol=1e-9, atol=1e-9)
    hb = bert().double()
    mb = BertForMaskedLM.from_transformers(hb)
    assert {p.dtype for p in mb.parameters()} == {torch.float64}
    torch.testing.assert_close(mb(ids)["logits"], hb(ids).logits, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- BertForMaskedLM.from_transformers

@pytest.mark.parametrize("backend, act", [("torch", "gelu"), ("torch", "gelu_new"), ("triton", "gelu")])
def test_bert_from_transformers_matches_hf_on_padded_batches(backend, act):
    hf = bert(small=backend == "triton", hidden_act=act)
    model = BertForMaskedLM.from_transformers(hf)
    assert model.config.activation == model.config.head_activation == ft._ACTIVATIONS[act]
    ids, mask, _ = batch()
    types = (torch.arange(ids.shape[1], device=DEVICE) >= 4).long().expand_as(ids) * mask
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, device=DEVICE) < 0.4) & (mask == 1)
    pick[0, 0] = True
    labels[pick] = ids[pick]
    with fastlm.use_backend(backend):
        out = model(ids, mask, types, labels=labels, return_logits=True)
    ref = copy.deepcopy(hf).double()(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    eager = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    real = mask[..., None]  # padding: fastlm gives zeros, HF whatever its padded rows compute
    terms = hf.config.hidden_size * 4 * hf.config.num_hidden_layers
    close(out["logits"] * real, ref.logits * real, eager.logits * real, "logits", terms)
    close(out["loss"], ref.loss, eager.loss, "loss", terms)


def test_unsupported_configs_name_the_field():
    for overrides, field in [({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
                             ({"scale_attn_weights": False}, "scale_attn_weights"),
                             ({"activation_function": "silu"}, "activation_function"),
                             ({"attn_pdrop": 0.0}, "attn_pdrop")]:
        with pytest.raises(ValueError, match=field):
            GPT.from_transformers(gpt2(**overrides))
    for overrides, field in [({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                             ({"is_decoder": True}, "is_decoder"), ({"hidden_act": "tanh"}, "hidden_act"),
                             ({"tie_word_embeddings": False}, "tie_word_embeddings")]:
        with pytest.raises(ValueError, match=field):
            BertForMaskedLM.from_transformers(bert(**overrides))
    with pytest.raises(TypeError, match="BertForMaskedLM"):
        BertForMaskedLM.from_transformers(bert().bert)  # no MLM head
    with pytest.raises(TypeError, match="GPT-2"):
        GPT.from_transformers(llama())
    with pytest.raises(TypeError, match="GPT-2"):
        GPT.from_transformers(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- apply / revert

def inputs(kind: str):
    ids, mask, labels = batch()
    if kind == "gemma2":  # HF's eager Gemma 2 in float64 gives NaN on padded rows (masks add up to -inf)
        mask.fill_(1)  # the reference must be finite; the sliding layers still pass a mask with softcap
        labels = ids.clone()
    elif kind not in ("bert", "t5"):  # causal: right padding hides itself; pad one row on the left
        mask[1], labels[1] = mask[1].flip(0), labels[1].flip(0)
    decoder = torch.randint(2, V, (3, 5), device=DEVICE) if kind == "t5" else None
    if decoder is not None:
        decoder[1, 3:] = -100  # padded targets
    return ids, mask, labels, decoder


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach fastlm's attention from the registered function."""
    calls = {"n": 0, "loss": 0}
    for name in ("flash_attn_func", "scaled_dot_product_attention", "_op_attention", "cross_entropy"):
        real = getattr(ft, name)
        key = "loss" if name == "cross_entropy" else "n"

        def counted(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ft, name, counted)
    return calls


# The families whose Llama-like layers the interpreter would only repeat (their MLP and rotary
# swaps run on Triton in tests/test_hf_mlp.py and tests/test_hf_rotary.py) run on the reference
# backend here; every family with a layer of its own runs on both.
_TORCH_ONLY = {"qwen2", "qwen3", "gemma", "gemma3", "olmo2"}
APPLY_CASES = [(kind, backend) for kind in MAKERS for backend in ("torch", "triton")
               if backend == "torch" or kind not in _TORCH_ONLY]


@pytest.mark.parametrize("kind, backend", APPLY_CASES)
def test_apply_matches_the_unpatched_model_and_revert_restores_it(kind, backend, spy):
    original = MAKERS[kind](small=backend == "triton")
    ids, mask, labels, decoder = inputs(kind)
    ref64 = copy.deepcopy(original).double()
    terms64, _ = record_bias_terms(ref64)
    logits64, loss64 = run(ref64, kind, ids, mask, labels, decoder)
    g64 = grads(ref64, loss64)
    terms32, hooks = record_bias_terms(original)
    logits32, loss32 = run(original, kind, ids, mask, labels, decoder)
    g32 = grads(original, loss32)
    for h in hooks:
        h.remove()
    classes = {name: type(m) for name, m in original.named_modules()}
    impl = original.config._attn_implementation

    patched = original  # in place: apply changes this very model
    handle = ft.apply(patched)
    assert ("", f"attention: {impl}") in handle.replaced
    swapped = [n for n, what in handle if what == NORMS[kind]]
    assert swapped and all(type(patched.get_submodule(n)) is not classes[n] for n in swapped)
    assert any("loss" in what or "forward" in what for _, what in handle)
    assert patched.config._attn_implementation == "fastlm"
    with fastlm.use_backend(backend):
        logits, loss = run(patched, kind, ids, mask, labels, decoder)
        g = grads(patched, loss)
    assert spy["n"] > 0 and spy["loss"] > 0  # fastlm's attention and loss ran
    if kind == "t5":  # with gradients on, every layer too: encoder self, decoder self and cross per layer
        assert spy["n"] == 3 * patched.config.num_layers
    H = patched.config.hidden_size if kind != "t5" else patched.config.d_model
    terms = H * 4 * 2
    close(logits, logits64, logits32, "logits", terms)
    close(loss, loss64, loss32, "loss", terms)
    names = [n for n, p in patched.named_parameters() if p.requires_grad]
    if kind == "bert":  # the key biases, whose gradients are 0 in exact arithmetic, are judged by their terms
        assert sum(".key.bias" in n for n in terms64) == 2
    for name, a, r, e in zip(names, g, g64, g32):
        if r is None:
            assert a is None or not a.any(), name
            continue
        cancel = cancellation_floor(terms64[name], terms32.get(name), torch.float32) if name in terms64 else 0.0
        close(a, r, e, f"grad of {name}", terms * ids.numel(), atol=cancel)
    if kind == "t5":  # the relative attention bias's gradient reaches it through fastlm's attention mask
        biases = [a for n, a in zip(names, g) if "relative_attention_bias" in n]
        assert len(biases) == 2 and all(a is not None and a.abs().sum() > 0 for a in biases)

    restored = ft.revert(patched)
    assert sorted(restored) == sorted(handle.replaced)
    assert {name: type(m) for name, m in patched.named_modules()} == classes
    assert patched.config._attn_implementation == impl
    assert "_loss_function" not in patched.__dict__ and "forward" not in patched.__dict__
    calls = spy["n"]
    back_logits, back_loss = run(patched, kind, ids, mask, labels, decoder)
    assert spy["n"] == calls  # fastlm's attention is no longer called
    assert torch.equal(back_logits, logits32) and torch.equal(back_loss, loss32)


def test_apply_is_scoped_to_the_given_model():
    a = gpt2()
    b = transformers.GPT2LMHeadModel(a.config).to(DEVICE).eval()  # built from the same config object
    b.load_state_dict(a.state_dict())
    ids, mask, labels = batch()
    before = b(ids, attention_mask=mask).logits
    handle = ft.apply(a)
    assert a.config._attn_implementation == "fastlm" and b.config._attn_implementation == "sdpa"
    assert type(b.transformer.ln_f) is torch.nn.LayerNorm and "_loss_function" not in b.__dict__
    assert torch.equal(b(ids, attention_mask=mask).logits, before)
    a.config.use_cache = False  # a change made while patched survives revert
    handle.revert()
    assert a.config is b.config and a.config.use_cache is False
    a.config.use_cache = True


def test_apply_twice_non_hf_and_revert_errors_are_clear():
    with pytest.raises(TypeError, match="fastlm.patch"):
        ft.apply(torch.nn.Sequential(torch.nn.LayerNorm(4)))
    with pytest.raises(TypeError, match="Module"):
        ft.apply("a model")
    model = llama()
    with pytest.raises(ValueError, match="not patched"):
        ft.revert(model)
    handle = ft.apply(model)
    with pytest.raises(RuntimeError, match="already patched"):
        ft.apply(model)
    handle.revert()
    with pytest.raises(RuntimeError, match="already reverted"):
        handle.revert()
    # after revert, apply works again; parts can be chosen
    again = ft.apply(model, norms=False, loss=False, rotary=False, mlp=False)
    assert [what for _, what in again] == ["attention: sdpa"]
    ft.revert(model)
    assert "fastlm" in transformers.AttentionInterface._global_mapping  # registering is additive and stays


@pytest.mark.parametrize("kind, cache", [("llama", "dynamic"), ("mistral", "dynamic"), ("llama", "static"),
                                         ("t5", "static")])
def test_patched_generation_with_left_padding_equals_unpatched(kind, cache, spy):
    """Cached decoding: one query against the cache, the padding mask, (Mistral) a sliding
    window that the generated positions move past, and prefill into a static cache."""
    model = MAKERS[kind]()
    ids, mask, _ = batch(B=2, L=7, lengths=(7, 4))
    if kind != "t5":
        ids, mask = ids.flip(1), mask.flip(1)  # left padding, as for generation
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache)
    expected = model.generate(ids, **kw)
    ft.apply(model)
    got = model.generate(ids, **kw)
    ft.revert(model)
    assert spy["n"] >= 6 * model.config.num_hidden_layers
    assert torch.equal(got, expected) and got.shape[1] >= 6


@pytest.mark.parametrize("grad", [False, True])
def test_t5_runs_every_attention_on_fastlm(spy, grad, recwarn):
    """With or without gradients (the relative bias's included), no layer leaves fastlm's
    attention, and nothing warns."""
    model = t5()
    ids, mask, _, decoder = inputs("t5")
    ft.apply(model)
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder.clamp(min=0))
    assert spy["n"] == 3 * model.config.num_layers  # encoder self, decoder self and cross per layer
    if grad:
        out.logits.square().mean().backward()
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert not [w for w in recwarn if "fastlm" in str(w.message)]
    ft.revert(model)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_training_mode_with_dropout_runs(kind):
    model = MAKERS[kind](**({"resid_pdrop": 0.0, "embd_pdrop": 0.0} if kind == "gpt2" else {"attention_dropout": 0.3}))
    model.train()
    ids, mask, labels, _ = inputs(kind)
    ft.apply(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    g = grads(model, out.loss)
    assert torch.isfinite(out.loss) and all(x is None or torch.isfinite(x).all() for x in g)
    model.eval()
    a = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, model(input_ids=ids, attention_mask=mask).logits)  # eval: no dropout, deterministic
    ft.revert(model)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bf16_on_gpu_patched_error_within_twice_hf_error(kind):
    """On a GPU (auto backend: the Triton kernels) in bfloat16: the patched model's error
    against the float64 model is at most about the unpatched bfloat16 model's."""
    hf = MAKERS[kind]()
    ids, mask, labels, _ = inputs(kind)
    ref, _ = run(copy.deepcopy(hf).double(), kind, ids, mask, labels)
    model = hf.to(torch.bfloat16)
    eager, _ = run(model, kind, ids, mask, labels)
    ft.apply(model)
    got, loss = run(model, kind, ids, mask, labels)
    assert torch.isfinite(loss)
    assert_close(got, ref, eager, "bf16 logits")


@pytest.mark.gpu
def test_bf16_on_gpu_from_transformers():
    hf = gpt2()
    ids = torch.randint(0, V, (2, 13), device=DEVICE)
    ref = copy.deepcopy(hf).double()(ids).logits
    hf = hf.to(torch.bfloat16)
    model = GPT.from_transformers(hf)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert_close(model(ids)["logits"], ref, hf(ids).logits, "bf16 logits")


def test_importing_fastlm_does_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, fastlm, fastlm.models, fastlm.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patched_model_traces_without_graph_breaks():
    """fastlm's attention function, norms and loss are custom ops and plain code: torch.compile
    sees the whole patched forward (with the loss) as one graph."""
    model = llama()
    ids, mask, labels, _ = inputs("llama")
    ft.apply(model)
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    ft.revert(model)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
