"""fastlm.integrations.hf_mlp: Hugging Face MLPs on fastlm.feed_forward, through
``apply(model, mlp=True)``, on small randomly initialised HF models of each family it covers
(Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3, OLMo-2, GPT-NeoX, GPT-2,
Mixtral's experts under the eager experts implementation), compared with the unpatched model:
logits, loss and every parameter gradient, by the project's tolerance rule (a float64 copy of
the HF model the oracle, the float32 model the yardstick), on the reference backend and, at
the smallest sizes, on the Triton kernels under the interpreter. The rest of the model stays
HF's (apply's other parts off), so what is compared is the MLP swap alone; one test runs the
whole of apply. No downloads: models come from configs."""

from __future__ import annotations

import copy
import warnings

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import fastlm  # noqa: E402
from fastlm.integrations import hf_mlp  # noqa: E402
from fastlm.integrations import transformers as ft  # noqa: E402
from fastlm.testing import cancellation_floor  # noqa: E402

from .test_integrations_transformers import (MAKERS, V, batch, close, grads, liven,  # noqa: E402
                                             record_bias_terms, run)


# ----------------------------------------------------------------------------- the families

def _sizes(small: bool):
    return (32, 2) if small else (64, 4)


def _decoder(config_cls, model_cls, small, **kw):
    d, h = _sizes(small)
    base = dict(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2, hidden_size=d,
                intermediate_size=2 * d, vocab_size=V, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                pad_token_id=0)
    base.update(kw)
    return liven(model_cls(config_cls(**base)))


def qwen2(small=False):
    return _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, small)


def qwen3(small=False):
    d, h = _sizes(small)
    return _decoder(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, small, head_dim=d // h)


def gemma(small=False):
    """gelu_pytorch_tanh: the tanh GELU gate (geglu_tanh)."""
    d, h = _sizes(small)
    return _decoder(transformers.GemmaConfig, transformers.GemmaForCausalLM, small, head_dim=d // h)


def gemma3(small=False):
    d, h = _sizes(small)
    return _decoder(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, small, head_dim=d // h,
                    sliding_window=4, query_pre_attn_scalar=d // h)


def phi3(small=False):
    """The fused gate_up_proj, gate rows first."""
    return _decoder(transformers.Phi3Config, transformers.Phi3ForCausalLM, small)


def olmo2(small=False):
    return _decoder(transformers.Olmo2Config, transformers.Olmo2ForCausalLM, small)


def gpt_neox(small=False, **kw):
    """A plain MLP with biases, erf GELU by default."""
    d, h = _sizes(small)
    cfg = transformers.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=h, hidden_size=d,
                                     intermediate_size=2 * d, vocab_size=V, max_position_embeddings=64,
                                     bos_token_id=0, eos_token_id=0, **kw)
    return liven(transformers.GPTNeoXForCausalLM(cfg))


def mixtral(small=False, implementation="eager"):
    """Four experts, two per token, their weights 3-D tensors."""
    d, h = _sizes(small)
    cfg = transformers.MixtralConfig(num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=h // 2,
                                     hidden_size=d, intermediate_size=2 * d, vocab_size=V,
                                     max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._experts_implementation = implementation
    return liven(transformers.MixtralForCausalLM(cfg))


def llama_relu(small=False):
    return MAKERS["llama"](small, hidden_act="relu", mlp_bias=True)  # reglu, with biases on all three


def llama_gelu(small=False):
    return MAKERS["llama"](small, hidden_act="gelu")  # geglu (erf)


def gpt_neox_relu(small=False):
    return gpt_neox(small, hidden_act="relu")


FAMILIES = {
    "llama": MAKERS["llama"], "llama_relu": llama_relu, "llama_gelu": llama_gelu, "mistral": MAKERS["mistral"],
    "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma, "gemma2": MAKERS["gemma2"], "gemma3": gemma3, "phi3": phi3,
    "olmo2": olmo2, "gpt_neox": gpt_neox, "gpt_neox_relu": gpt_neox_relu, "gpt2": MAKERS["gpt2"],
    "mixtral": mixtral,
}
# The class each family's MLP swap replaces, and the fastlm activation it runs.
SWAPPED = {
    "llama": ("LlamaMLP", "swiglu"), "llama_relu": ("LlamaMLP", "reglu"), "llama_gelu": ("LlamaMLP", "geglu"),
    "mistral": ("MistralMLP", "swiglu"), "qwen2": ("Qwen2MLP", "swiglu"), "qwen3": ("Qwen3MLP", "swiglu"),
    "gemma": ("GemmaMLP", "geglu_tanh"), "gemma2": ("Gemma2MLP", "geglu_tanh"), "gemma3": ("Gemma3MLP", "geglu_tanh"),
    "phi3": ("Phi3MLP", "swiglu"), "olmo2": ("Olmo2MLP", "swiglu"), "gpt_neox": ("GPTNeoXMLP", "gelu"),
    "gpt_neox_relu": ("GPTNeoXMLP", "relu"), "gpt2": ("GPT2MLP", "gelu_tanh"), "mixtral": ("MixtralExperts", "swiglu"),
}
MLP_ONLY = dict(attention=False, norms=False, loss=False, fused_linear_loss=False, rotary=False, mlp=True)


def inputs(kind: str):
    ids, mask, labels = batch()
    if kind.startswith("gemma"):  # HF's eager Gemma in float64 gives NaN on padded rows: no padding
        mask.fill_(1)
        labels = ids.clone()
    else:  # causal: right padding hides itself; pad one row on the left
        mask[1], labels[1] = mask[1].flip(0), labels[1].flip(0)
    return ids, mask, labels


@pytest.fixture
def ffn_spy(monkeypatch):
    """The activations fastlm.feed_forward is called with from the swapped MLPs."""
    calls = []
    real = hf_mlp.feed_forward

    def counted(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("activation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_mlp, "feed_forward", counted)
    return calls


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(hf_mlp, "_warned", set())


# ----------------------------------------------------------------------------- the comparison

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_swapped_mlps_match_the_unpatched_model_and_revert_restores_them(kind, backend, ffn_spy, fresh_warnings):
    original = FAMILIES[kind](small=backend == "triton")
    ids, mask, labels = inputs(kind)
    ref64 = copy.deepcopy(original).double()
    terms64, _ = record_bias_terms(ref64)
    logits64, loss64 = run(ref64, kind, ids, mask, labels)
    g64 = grads(ref64, loss64)
    terms32, hooks = record_bias_terms(original)
    logits32, loss32 = run(original, kind, ids, mask, labels)
    g32 = grads(original, loss32)
    for h in hooks:
        h.remove()
    classes = {name: type(m) for name, m in original.named_modules()}
    params = [(n, id(p)) for n, p in original.named_parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a family covered here swaps without a word
        handle = ft.apply(original, **MLP_ONLY)
    cls_name, activation = SWAPPED[kind]
    swapped = [n for n, what in handle if what == cls_name]
    layers = original.config.num_hidden_layers if kind != "gpt2" else original.config.n_layer
    assert len(swapped) == layers and len(handle.replaced) == layers, handle.replaced
    assert all(type(original.get_submodule(n)).__name__ == "Fastlm" + cls_name for n in swapped)
    assert [(n, id(p)) for n, p in original.named_parameters()] == params  # Parameters untouched

    with fastlm.use_backend(backend):
        logits, loss = run(original, kind, ids, mask, labels)
        g = grads(original, loss)
    assert ffn_spy and set(ffn_spy) == {activation}
    if kind != "mixtral":
        assert len(ffn_spy) == layers  # one call per layer's MLP
    H = original.config.hidden_size
    terms = H * 4 * 2
    close(logits, logits64, logits32, "logits", terms)
    close(loss, loss64, loss32, "loss", terms)
    names = [n for n, p in original.named_parameters() if p.requires_grad]
    for name, a, r, e in zip(names, g, g64, g32):
        if r is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None, f"no gradient reached {name}"
        cancel = cancellation_floor(terms64[name], terms32.get(name), torch.float32) if name in terms64 else 0.0
        close(a, r, e, f"grad of {name}", terms * ids.numel(), atol=cancel)

    restored = ft.revert(original)
    assert sorted(restored) == sorted(handle.replaced)
    assert {name: type(m) for name, m in original.named_modules()} == classes
    assert [(n, id(p)) for n, p in original.named_parameters()] == params
    calls = len(ffn_spy)
    back_logits, back_loss = run(original, kind, ids, mask, labels)
    assert len(ffn_spy) == calls  # fastlm's feed_forward is no longer called
    assert torch.equal(back_logits, logits32) and torch.equal(back_loss, loss32)


def test_separate_gate_and_up_weights_reach_the_kernels_as_they_are(monkeypatch):
    """Llama's gate_proj and up_proj go to feed_forward as the Parameters themselves (w_in and
    w_up), no concatenated copy; Phi-3's gate_up_proj as its weight; GPT-2's Conv1D weights as
    transposed views of the same storage."""
    seen = []
    real = hf_mlp.feed_forward

    def record(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_mlp, "feed_forward", record)
    for make, check in [
        (MAKERS["llama"], lambda mlp, a, k: a[1] is mlp.gate_proj.weight and k["w_up"] is mlp.up_proj.weight
         and a[3] is mlp.down_proj.weight),
        (phi3, lambda mlp, a, k: a[1] is mlp.gate_up_proj.weight and k.get("gate_order") == "gate_up"),
        (MAKERS["gpt2"], lambda mlp, a, k: a[1].data_ptr() == mlp.c_fc.weight.data_ptr()
         and a[1].shape == mlp.c_fc.weight.t().shape and a[3].data_ptr() == mlp.c_proj.weight.data_ptr()),
    ]:
        model = make(small=True)
        ft.apply(model, **MLP_ONLY)
        seen.clear()
        ids, mask, labels = inputs("llama")
        run(model, "llama", ids, mask, labels)
        body = getattr(model, "model", None) or model.transformer
        blocks = body.layers if hasattr(body, "layers") else body.h
        assert len(seen) == len(blocks)
        for blk, (args, kwargs) in zip(blocks, seen):
            assert check(blk.mlp, args, kwargs), type(model).__name__


def test_gpt2_training_dropout_is_hf_own():
    """GPT-2's MLP in training mode with resid_pdrop: the swapped MLP calls HF's dropout module
    where HF does, so from one seed the patched and unpatched models draw the same masks and
    give the same logits and gradients (they would differ by O(1) with other masks)."""
    model = MAKERS["gpt2"](resid_pdrop=0.3, embd_pdrop=0.0, attn_pdrop=0.0).train()
    ids, mask, labels = inputs("gpt2")
    torch.manual_seed(7)
    want, want_loss = run(model, "gpt2", ids, mask, labels)
    want_g = grads(model, want_loss)
    ft.apply(model, **MLP_ONLY)
    for backend in ("torch", "triton"):
        torch.manual_seed(7)
        with fastlm.use_backend(backend):
            got, got_loss = run(model, "gpt2", ids, mask, labels)
            got_g = grads(model, got_loss)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_the_whole_apply_swaps_mlps_with_the_rest(ffn_spy):
    """apply() with its defaults swaps the MLPs too (mlp=True), beside the norms, attention and
    loss, and reverts all of them; mlp=False leaves them."""
    model = MAKERS["llama"](small=True)
    ids, mask, labels = inputs("llama")
    want64, _ = run(copy.deepcopy(model).double(), "llama", ids, mask, labels)
    want, _ = run(model, "llama", ids, mask, labels)
    handle = ft.apply(model)
    assert [n for n, what in handle if what == "LlamaMLP"] == [f"model.layers.{i}.mlp" for i in range(2)]
    got, _ = run(model, "llama", ids, mask, labels)
    assert len(ffn_spy) == 2
    close(got, want64, want, "logits", 32 * 8)
    ft.revert(model)
    assert type(model.model.layers[0].mlp) is transformers.models.llama.modeling_llama.LlamaMLP
    handle = ft.apply(model, mlp=False)
    assert not [n for n, what in handle if what == "LlamaMLP"]
    run(model, "llama", ids, mask, labels)
    assert len(ffn_spy) == 2
    ft.revert(model)


# ----------------------------------------------------------------------------- what is left alone

@pytest.mark.parametrize("case", ["gelu_fast", "quick_gelu", "grouped_mm", "bert", "hooked"])
def test_unsupported_mlps_are_left_with_one_warning_naming_the_module(case, fresh_warnings, ffn_spy):
    """An MLP fastlm cannot reproduce exactly is left as it is, with one warning (per class and
    reason) naming the module: an activation that is not fastlm's formula (gelu_fast's rounded
    sqrt(2/pi), quick_gelu), Mixtral's experts under the grouped GEMM, BERT's MLP split over two
    modules, a projection hooked at apply time. Its output is the unpatched model's, bit for bit."""
    kind = "llama"
    if case in ("gelu_fast", "quick_gelu"):
        model, where = MAKERS["llama"](small=True, hidden_act=case), "model.layers.0.mlp (LlamaMLP)"
    elif case == "grouped_mm":
        model, where, kind = mixtral(small=True, implementation="grouped_mm"), "model.layers.0.mlp.experts", "mixtral"
    elif case == "bert":
        model, where, kind = MAKERS["bert"](small=True), "bert.encoder.layer.0.intermediate (BertIntermediate)", "bert"
    else:
        model, where = MAKERS["llama"](small=True), "model.layers.0.mlp (LlamaMLP)"
        for layer in model.model.layers:
            layer.mlp.up_proj.register_forward_hook(lambda m, a, out: None)
    ids, mask, labels = inputs(kind)
    want, want_loss = run(model, kind, ids, mask, labels)
    classes = {name: type(m) for name, m in model.named_modules()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = ft.apply(model, **MLP_ONLY)
        ft.revert(model)
        ft.apply(model, **MLP_ONLY)  # once: a second apply does not warn again
    mine = [str(w.message) for w in caught if "is not swapped" in str(w.message)]
    assert len(mine) == 1 and where in mine[0], mine
    assert not handle.replaced
    assert {name: type(m) for name, m in model.named_modules()} == classes
    got, got_loss = run(model, kind, ids, mask, labels)
    assert not ffn_spy
    assert torch.equal(got, want) and torch.equal(got_loss, want_loss)


def test_a_hook_added_after_apply_is_not_bypassed(ffn_spy):
    """A forward hook put on a projection after apply (a LoRA adapter, a probe) makes the
    swapped MLP run HF's own forward, so the hook runs and may change the output; once it is
    removed, fastlm runs again."""
    model = MAKERS["llama"](small=True)
    ids, mask, labels = inputs("llama")
    ft.apply(model, **MLP_ONLY)
    seen = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(1) or out * 2)
    hooked, _ = run(model, "llama", ids, mask, labels)
    assert seen == [1] and len(ffn_spy) == 1  # layer 0 on fastlm, layer 1 on HF's forward with its hook
    handle.remove()
    plain, _ = run(model, "llama", ids, mask, labels)
    assert len(ffn_spy) == 3
    assert not torch.allclose(hooked, plain)


def test_activation_names_map_exactly():
    """HF's activation instances that compute fastlm's formulas map to it; the others to None."""
    from transformers.activations import ACT2FN
    expect = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
              "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "relu": "relu", "gelu_fast": None,
              "gelu_accurate": None, "quick_gelu": None, "relu2": None, "gelu_10": None, "tanh": None}
    for name, want in expect.items():
        assert hf_mlp.fastlm_activation(ACT2FN[name]) == want, name
    assert hf_mlp.fastlm_activation(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert hf_mlp.fastlm_activation(torch.nn.GELU()) == "gelu"
    # and each mapped one is that formula
    x = torch.randn(1000, dtype=torch.float64) * 4
    formulas = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu,
                "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}
    for name, want in expect.items():
        if want is not None:
            torch.testing.assert_close(ACT2FN[name](x), formulas[want](x), rtol=1e-14, atol=1e-14, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_swapped_mlps_trace_without_graph_breaks(kind):
    """The swapped forwards are plain code around the feed_forward custom op: torch.compile
    breaks the patched model's graph nowhere the unpatched one's does not (none, but for
    GPT-2's own break in HF's forward), with fastlm::feed_forward in the graphs, once a layer."""
    model = FAMILIES[kind](small=True)
    ids, mask, labels = inputs(kind)
    before = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    ft.apply(model, **MLP_ONLY)
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    ft.revert(model)
    assert explained.graph_break_count == before.graph_break_count == (1 if kind == "gpt2" else 0), \
        [r.reason for r in explained.break_reasons]
    code = "\n".join(g.code for g in explained.graphs)
    assert code.count("fastlm.feed_forward") == 2, code[:2000]  # two layers


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "phi3", "gemma", "gpt_neox", "gpt2"])
def test_bf16_on_gpu_swapped_mlps_error_within_twice_hf_error(kind):
    """On a GPU (auto backend: the Triton kernels, the separate gate/up weights through the
    second weight pointer) in bfloat16: the MLP-swapped model's logits are as close to the
    float64 model's as the unpatched bfloat16 model's are (the project's rule)."""
    from fastlm.testing import assert_close
    hf = FAMILIES[kind]()
    ids, mask, labels = inputs(kind)
    ref, _ = run(copy.deepcopy(hf).double(), kind, ids, mask, labels)
    model = hf.to(torch.bfloat16)
    eager, _ = run(model, kind, ids, mask, labels)
    handle = ft.apply(model, **MLP_ONLY)
    assert len(handle.replaced) == 2
    got, loss = run(model, kind, ids, mask, labels)
    assert torch.isfinite(loss)
    assert_close(got, ref, eager, "bf16 logits")
