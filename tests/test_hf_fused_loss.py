"""apply(model, fused_linear_loss=True) (issue 21, item 1): a causal LM trained with labels
computes its loss by fastlm.linear_cross_entropy from the hidden states and the lm-head weight,
never forming the (tokens x vocab) logits: the loss and every parameter gradient equal the
unpatched model's (float64 oracle, float32 yardstick), the output's logits are None, the
lm-head module is never called, and eval mode / no labels still give the logits.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastlm

transformers = pytest.importorskip("transformers")

from fastlm.integrations import transformers as ft  # noqa: E402

from .test_integrations_transformers import MAKERS, V, batch, close, grads  # noqa: E402

FUSABLE = ["llama", "mistral", "gemma2", "gpt2", "gpt_oss", "bert", "roberta", "qwen3", "phi3", "mixtral"]


def _labels_run(model, ids, mask, labels, **kwargs):
    return model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)


# On Triton the families whose head or loss differ (soft-capped, tied GPT-2, masked LM, experts).
CASES = [(kind, "torch") for kind in FUSABLE] + [(kind, "triton") for kind in ("llama", "gemma2", "gpt2", "bert",
                                                                             "mixtral")]


@pytest.mark.parametrize("kind, backend", CASES)
def test_fused_loss_and_gradients_equal_the_unpatched_model(kind, backend):
    original = MAKERS[kind](small=backend == "triton")
    if kind == "gemma2":  # the final soft-cap moves into the loss: make it bite
        original.config.final_logit_softcapping = 0.5
    original.train()
    for m in original.modules():  # dropout off: the two runs must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, mask, labels = batch()
    if kind == "gemma2":  # HF's eager Gemma 2 in float64 gives NaN on padded rows (see inputs())
        mask.fill_(1)
        labels = ids.clone()
    labels[0, :3] = -100  # some ignored targets inside a sequence too
    ref64 = copy.deepcopy(original).double()
    loss64 = _labels_run(ref64, ids, mask, labels).loss
    g64 = grads(ref64, loss64)
    loss32 = _labels_run(original, ids, mask, labels).loss
    g32 = grads(original, loss32)

    handle = ft.apply(original, fused_linear_loss=True)
    assert any("fused" in what for _, what in handle)
    head = original.get_output_embeddings()
    called = []
    hook = head.register_forward_hook(lambda *a: called.append(1))
    formed = []
    real = ft.linear_cross_entropy

    def spy(*args, **kwargs):
        formed.append(args[0].shape)
        return real(*args, **kwargs)
    ft.linear_cross_entropy = spy
    try:
        with fastlm.use_backend(backend):
            out = _labels_run(original, ids, mask, labels)
            g = grads(original, out.loss)
    finally:
        ft.linear_cross_entropy = real
        hook.remove()
    assert out.logits is None and not called and formed  # the head never ran: no (tokens, vocab) logits
    assert out.loss.dtype == torch.float32
    H = original.config.hidden_size
    close(out.loss, loss64, loss32, "loss", H * 8)
    names = [n for n, p in original.named_parameters() if p.requires_grad]
    for name, a, r, e in zip(names, g, g64, g32):
        if r is None:
            assert a is None or not a.any(), name
            continue
        close(a, r, e, f"grad of {name}", H * 8 * ids.numel())

    # eval mode, or no labels: the logits as before
    original.eval()
    with torch.no_grad(), fastlm.use_backend(backend):
        logits = original(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert logits is not None and logits.shape == (*ids.shape, V)
    original.train()
    with fastlm.use_backend(backend):
        assert original(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, V)
    ft.revert(original)
    assert "forward" not in original.__dict__
    assert original(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_num_items_in_batch_and_shift_labels():
    """transformers' Trainer passes num_items_in_batch (sum / count across accumulation steps);
    shift_labels given replace the shift."""
    model = MAKERS["llama"]()
    model.train()
    ids, mask, labels = batch()
    ref = copy.deepcopy(model).double()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    for kwargs in ({"num_items_in_batch": torch.tensor(7)}, {"shift_labels": shifted.flip(1)}):
        want = ref(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        ft.apply(model, fused_linear_loss=True)
        got = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        ft.revert(model)
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)  # HF: a float32 loss


def test_a_forward_that_uses_its_logits_is_not_fused():
    """A model whose forward does more with its logits than the loss keeps its head, with a
    warning naming it, and its numbers are unchanged."""
    class Scaled(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits * 2.0
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    base = MAKERS["llama"]()
    model = Scaled(base.config)
    model.load_state_dict(base.state_dict())
    model.train()
    ids, mask, labels = batch()
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ft._warned.discard("fused:Scaled")
        handle = ft.apply(model, fused_linear_loss=True)
    assert any("Scaled" in str(w.message) and "fused" in str(w.message) for w in caught)
    assert not any("fused" in what for _, what in handle)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_fusable_forward_reads_the_source_strictly():
    """The source check accepts the HF forms and refuses a forward that transforms its logits
    in the returned output (here: `logits=logits * 2`)."""
    model = MAKERS["llama"]()
    assert ft._fusable_forward(model) == ("lm_head", False)
    assert ft._fusable_forward(MAKERS["gpt2"]()) == ("lm_head", False)
    assert ft._fusable_forward(MAKERS["gemma2"]()) == ("lm_head", True)

    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden_states)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return transformers.modeling_outputs.CausalLMOutputWithPast(
                loss=loss,
                logits=logits * 2,
            )
    assert ft._fusable_forward(Doubled(model.config)) is None
