"""Hugging Face transformers on fastlm: weights into fastlm's models, and fastlm's ops into HF models.

Two directions:

* ``GPT.from_transformers(hf_model)`` / ``BertForMaskedLM.from_transformers(hf_model)`` build
  fastlm's own models from a GPT-2 or BERT masked-LM model (the functions here do the work:
  ``gpt_from_transformers``, ``bert_from_transformers``). Configurations fastlm cannot
  reproduce exactly raise ``ValueError`` naming the Hugging Face config field.

* ``apply(model)`` runs an existing HF model on fastlm's ops, in place and undoably:
  attention through fastlm (registered as ``"fastlm"`` in transformers' attention registry,
  and the model's attention implementation set to it), norms swapped by class
  (torch.nn.LayerNorm / RMSNorm, and the HF RMS norms written as LlamaRMSNorm, T5LayerNorm or
  Gemma's RMSNorm), and the loss through fastlm.cross_entropy (the model instance's
  ``loss_function``, or, for models that build ``CrossEntropyLoss`` inside ``forward`` such
  as BERT's and T5's, a per-instance wrapper of ``forward``). It returns a handle listing
  what it replaced; ``handle.revert()`` or ``revert(model)`` restores everything.

transformers is an optional dependency: nothing here imports it at module import time
(``import fastlm`` never does), only ``apply`` and the attention function when they run.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import nn as fnn
from ..ops.attention import flash_attn_func, scaled_dot_product_attention
from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy
from ..ops.norm import rms_norm

ATTENTION_NAME = "fastlm"
_STATE = "_fastlm_transformers"  # the handle, stored on the patched model

# Hugging Face activation names -> fastlm's.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


# ============================================================================ HF -> fastlm models

def _field(cfg, name: str, default=None):
    return getattr(cfg, name, default)


def _unsupported(model: str, field: str, value, why: str) -> ValueError:
    return ValueError(f"{model}.from_transformers: config.{field}={value!r} is not supported ({why})")


def _activation(model: str, field: str, value) -> str:
    if not isinstance(value, str) or value not in _ACTIVATIONS:
        raise _unsupported(model, field, value, f"supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[value]


def _one_dropout(model: str, cfg, fields: tuple[str, ...]) -> float:
    """fastlm's models have one dropout rate; HF configs several. They must agree."""
    values = {f: float(_field(cfg, f, 0.0) or 0.0) for f in fields}
    if len(set(values.values())) > 1:
        raise ValueError(f"{model}.from_transformers: fastlm uses one dropout rate, but the config has "
                         + ", ".join(f"{k}={v}" for k, v in values.items()))
    return next(iter(values.values()))


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _finish(model: torch.nn.Module, state: dict, like: torch.nn.Module) -> torch.nn.Module:
    ref = next(like.parameters())
    model = model.to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug in the mapping, not a user error
        raise RuntimeError(f"from_transformers: weights not mapped: missing {missing}, unexpected {unexpected}")
    return model.train(like.training)


def gpt_from_transformers(cls, hf_model: torch.nn.Module):
    """fastlm GPT from a Hugging Face GPT2LMHeadModel (or GPT2Model: the head is then the tied
    word embeddings), on the same device and dtype. GPT-2's Conv1D layers store their weights
    as (in, out); fastlm's Linear as (out, in): they are transposed on the way."""
    from ..models.gpt import GPTConfig

    name = "GPT"
    cfg = _field(hf_model, "config")
    if cfg is None or _field(cfg, "model_type") != "gpt2":
        raise TypeError(f"{name}.from_transformers: expected a Hugging Face GPT-2 model (GPT2LMHeadModel or "
                        f"GPT2Model), got {type(hf_model).__name__}")
    body = getattr(hf_model, "transformer", hf_model)
    if not hasattr(body, "h") or not hasattr(body, "wte"):
        raise TypeError(f"{name}.from_transformers: {type(hf_model).__name__} has no GPT-2 body (.transformer.h)")
    if _field(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise _unsupported(name, "scale_attn_by_inverse_layer_idx", True, "fastlm scales every layer by 1/sqrt(d)")
    if not _field(cfg, "scale_attn_weights", True):
        raise _unsupported(name, "scale_attn_weights", False, "fastlm scales attention scores by 1/sqrt(d)")
    if _field(cfg, "add_cross_attention", False):
        raise _unsupported(name, "add_cross_attention", True, "fastlm's GPT is decoder-only")
    # reorder_and_upcast_attn only changes where float32 is used; fastlm's attention always
    # accumulates in float32, so it is accepted.
    activation = _activation(name, "activation_function", _field(cfg, "activation_function"))
    dropout = _one_dropout(name, cfg, ("embd_pdrop", "resid_pdrop", "attn_pdrop"))
    head = getattr(hf_model, "lm_head", None)
    if head is not None and head.bias is not None:
        raise _unsupported(name, "lm_head.bias", "present", "fastlm's lm-head has no bias")
    tied = head is None or _same_tensor(head.weight, body.wte.weight)
    d = cfg.n_embd
    config = GPTConfig(vocab_size=cfg.vocab_size, max_seq_len=cfg.n_positions, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, d_model=d, d_hidden=_field(cfg, "n_inner") or 4 * d, activation=activation,
                       norm="layernorm", norm_eps=cfg.layer_norm_epsilon, prenorm=True, positions="learned",
                       dropout=dropout, bias=True, tie_embeddings=tied,
                       init_std=_field(cfg, "initializer_range", 0.02))
    state = {"wte.weight": body.wte.weight, "wpe.weight": body.wpe.weight,
             "norm_f.weight": body.ln_f.weight, "norm_f.bias": body.ln_f.bias}
    for i, blk in enumerate(body.h):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": blk.ln_1.weight, p + "norm1.bias": blk.ln_1.bias,
            p + "attn.qkv.weight": blk.attn.c_attn.weight.t(), p + "attn.qkv.bias": blk.attn.c_attn.bias,
            p + "attn.proj.weight": blk.attn.c_proj.weight.t(), p + "attn.proj.bias": blk.attn.c_proj.bias,
            p + "norm2.weight": blk.ln_2.weight, p + "norm2.bias": blk.ln_2.bias,
            p + "mlp.fc_in.weight": blk.mlp.c_fc.weight.t(), p + "mlp.fc_in.bias": blk.mlp.c_fc.bias,
            p + "mlp.fc_out.weight": blk.mlp.c_proj.weight.t(), p + "mlp.fc_out.bias": blk.mlp.c_proj.bias,
        })
    if not tied:
        state["lm_head.weight"] = head.weight
    with torch.no_grad():
        return _finish(cls(config), state, hf_model)


def bert_from_transformers(cls, hf_model: torch.nn.Module):
    """fastlm BertForMaskedLM from a Hugging Face BertForMaskedLM (absolute positions,
    post-norm encoder, token types, the MLM head's dense + act + LayerNorm and the decoder
    tied to the word embeddings, with its bias), on the same device and dtype."""
    from ..models.bert import BertConfig

    name = "BertForMaskedLM"
    cfg = _field(hf_model, "config")
    if cfg is None or _field(cfg, "model_type") != "bert":
        raise TypeError(f"{name}.from_transformers: expected a Hugging Face BertForMaskedLM, got "
                        f"{type(hf_model).__name__}")
    if not hasattr(hf_model, "cls") or not hasattr(hf_model, "bert"):
        raise TypeError(f"{name}.from_transformers: {type(hf_model).__name__} has no masked-LM head (.cls); "
                        f"pass a transformers BertForMaskedLM")
    position_type = _field(cfg, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise _unsupported(name, "position_embedding_type", position_type, "fastlm's BERT has absolute positions")
    if _field(cfg, "is_decoder", False):
        raise _unsupported(name, "is_decoder", True, "fastlm's BERT is a bidirectional encoder")
    if _field(cfg, "add_cross_attention", False):
        raise _unsupported(name, "add_cross_attention", True, "fastlm's BERT has no cross-attention")
    activation = _activation(name, "hidden_act", _field(cfg, "hidden_act"))
    dropout = _one_dropout(name, cfg, ("hidden_dropout_prob", "attention_probs_dropout_prob"))
    emb, pred = hf_model.bert.embeddings, hf_model.cls.predictions
    if not _same_tensor(pred.decoder.weight, emb.word_embeddings.weight):
        raise _unsupported(name, "tie_word_embeddings", _field(cfg, "tie_word_embeddings"),
                           "fastlm's MLM decoder is the word embeddings")
    config = BertConfig(vocab_size=cfg.vocab_size, max_seq_len=cfg.max_position_embeddings,
                        type_vocab_size=cfg.type_vocab_size, n_layer=cfg.num_hidden_layers,
                        n_head=cfg.num_attention_heads, d_model=cfg.hidden_size, d_hidden=cfg.intermediate_size,
                        activation=activation, head_activation=activation, norm_eps=cfg.layer_norm_eps,
                        dropout=dropout, pad_token_id=_field(cfg, "pad_token_id"),
                        init_std=_field(cfg, "initializer_range", 0.02))
    bias = pred.decoder.bias if pred.decoder.bias is not None else pred.bias
    t = pred.transform
    state = {"word_embeddings.weight": emb.word_embeddings.weight,
             "position_embeddings.weight": emb.position_embeddings.weight,
             "token_type_embeddings.weight": emb.token_type_embeddings.weight,
             "embed_norm.weight": emb.LayerNorm.weight, "embed_norm.bias": emb.LayerNorm.bias,
             "head_dense.weight": t.dense.weight, "head_dense.bias": t.dense.bias,
             "head_norm.weight": t.LayerNorm.weight, "head_norm.bias": t.LayerNorm.bias, "head_bias": bias}
    for i, layer in enumerate(hf_model.bert.encoder.layer):
        p, a = f"layers.{i}.", layer.attention
        state.update({
            p + "qkv.weight": torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight]),
            p + "qkv.bias": torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias]),
            p + "proj.weight": a.output.dense.weight, p + "proj.bias": a.output.dense.bias,
            p + "norm1.weight": a.output.LayerNorm.weight, p + "norm1.bias": a.output.LayerNorm.bias,
            p + "mlp.fc_in.weight": layer.intermediate.dense.weight,
            p + "mlp.fc_in.bias": layer.intermediate.dense.bias,
            p + "mlp.fc_out.weight": layer.output.dense.weight, p + "mlp.fc_out.bias": layer.output.dense.bias,
            p + "norm2.weight": layer.output.LayerNorm.weight, p + "norm2.bias": layer.output.LayerNorm.bias,
        })
    with torch.no_grad():
        return _finish(cls(config), state, hf_model)


# ============================================================================ attention

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _additive_bias(position_bias: Tensor, mask: Optional[Tensor], causal: bool, L: int, S: int) -> Tensor:
    """T5's relative position bias with the mask folded in, as one additive mask."""
    low = torch.finfo(position_bias.dtype).min / 4  # HF's finfo.min would overflow once scaled by log2(e)
    if mask is None:
        if not causal:
            return position_bias
        visible = torch.ones(L, S, dtype=torch.bool, device=position_bias.device).tril()
        return position_bias.masked_fill(~visible, low)
    if mask.dtype == torch.bool:
        return position_bias.masked_fill(~mask, low)
    return position_bias + mask


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature on fastlm's kernels.

    query (B, H, L, D), key and value (B, Hk, S, D) (Hk dividing H: GQA without repeating
    heads). attention_mask is what the "fastlm" mask function (transformers' sdpa_mask) makes:
    None where a causal or full pattern suffices, else a boolean (B, 1, L, S) mask (True
    attends) with padding and sliding windows folded in; additive float masks are accepted
    too. ``softcap`` (Gemma 2) is applied to the scores. T5's ``position_bias`` is added to the
    scores as an additive mask, and gets its gradient through it when it needs one (training
    T5's relative attention bias). GPT-OSS's attention sinks (``s_aux``, one logit per head in
    every row's softmax denominator) go to the kernels, with their gradient. Returns (out (B, L,
    H, D), None): attention weights are never formed.
    """
    sinks = kwargs.get("s_aux")
    if kwargs.get("output_attentions"):
        _warn_once("weights", "fastlm attention does not form attention weights; output_attentions gives None")
    softcap = float(kwargs.get("softcap") or 0.0)
    position_bias = kwargs.get("position_bias")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    L, S = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 2:  # a (B, S) padding mask: 1 attends
            mask = mask.bool()[:, None, None, :]
        if mask.shape[-1] > S:
            mask = mask[..., :S]
    if bool(is_causal) and L > 1 and mask is None and S > L:
        # keys past L are seen by no query top-left (prefill into an empty static cache): crop, as HF does
        key, value, S = key[:, :, :L], value[:, :, :L], L
        position_bias = position_bias[..., :L] if position_bias is not None else None
    if position_bias is not None:
        mask = _additive_bias(position_bias, mask, bool(is_causal) and L > 1, L, S)
        is_causal = False
    causal = bool(is_causal) and L > 1 and mask is None
    H, Hk = query.shape[1], key.shape[1]
    if sinks is not None:
        return _op_attention(query, key, value, mask, dropout, scaling, softcap, causal, sinks), None
    if mask is None:
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L, H, D) views
        out = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scaling, causal=causal, softcap=softcap)
        return out, None
    if softcap:
        return _op_attention(query, key, value, mask, dropout, scaling, softcap, False, None), None
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                       enable_gqa=H != Hk)
    return out.transpose(1, 2), None


def _op_attention(query, key, value, mask, dropout, scaling, softcap, causal, sinks) -> Tensor:
    """The attention op itself, for what no public wrapper takes together: a mask with soft-
    capping, or attention sinks with a mask (or without). causal (only without a mask) is
    aligned bottom-right, as the mask-free path's flash_attn_func."""
    from ..ops import attention as ops
    B, H, L, D = query.shape
    S = key.shape[2]
    if mask is not None:
        mask = mask.expand(B, H, L, S)
    seed = ops.draw_dropout_seed(query.device) if dropout > 0 else None
    scale = float(scaling) if scaling is not None else D ** -0.5
    extras = () if sinks is None else (None, ops._check_sinks("attention (s_aux)", sinks, H, query)
                                       .to(ops._lse_dtype(query)).contiguous())
    out, _ = ops._attention_eager(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask, None,
                                  None, None, seed, scale, causal, -1, 0 if causal else -1, softcap,
                                  float(dropout), 0, 0, *extras)
    return out


def register() -> None:
    """Register ``"fastlm"`` in transformers' attention and attention-mask registries (additive:
    other models keep whatever implementation they use). ``apply`` calls it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# ============================================================================ norms

def _rms_out_dtype_llama(x: Tensor, w: Tensor) -> torch.dtype:
    return torch.promote_types(w.dtype, x.dtype)  # weight * normed.to(input dtype)


def _rms_out_dtype_t5(x: Tensor, w: Tensor) -> torch.dtype:
    if w.dtype in (torch.float16, torch.bfloat16):
        return w.dtype  # normed is cast to the weight's half dtype first
    return torch.promote_types(torch.promote_types(x.dtype, torch.float32), w.dtype)


def _rms_forward(eps_attr: str, offset: bool, out_dtype: Callable[[Tensor, Tensor], torch.dtype]):
    def forward(self, hidden_states: Tensor) -> Tensor:
        w = self.weight
        if offset:  # Gemma: normed * (1 + weight), in float32
            weight = 1.0 + w.float()
        else:
            weight = w if w.dtype in (hidden_states.dtype, torch.float32) else w.to(hidden_states.dtype)
        y = rms_norm(hidden_states, (w.shape[-1],), weight, getattr(self, eps_attr))
        dtype = out_dtype(hidden_states, w)
        return y if y.dtype == dtype else y.to(dtype)
    return forward


# Hugging Face RMS norms recognised by the source of their forward (and _norm, where they
# have one): a class written exactly as one of these (many models copy them) computes the
# same formula. name: (module, eps attribute, weight is 1 + w, output dtype rule).
_RMS_KINDS = {
    "LlamaRMSNorm": ("transformers.models.llama.modeling_llama", "variance_epsilon", False, _rms_out_dtype_llama),
    "T5LayerNorm": ("transformers.models.t5.modeling_t5", "variance_epsilon", False, _rms_out_dtype_t5),
    "GemmaRMSNorm": ("transformers.models.gemma.modeling_gemma", "eps", True, lambda x, w: x.dtype),
    "Gemma2RMSNorm": ("transformers.models.gemma2.modeling_gemma2", "eps", True, lambda x, w: x.dtype),
    # (weight * normed in float32).to(input dtype)
    "GptOssRMSNorm": ("transformers.models.gpt_oss.modeling_gpt_oss", "variance_epsilon", False, lambda x, w: x.dtype),
}
_swap_classes: dict[type, Optional[type]] = {}


def _normalised_source(fn) -> Optional[str]:
    """fn's source with its comments and blank lines removed (a copied class whose comment
    differs computes the same thing), or None where there is no source."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    import io
    import tokenize
    try:
        comments = [tok for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return src.strip()
    lines = src.splitlines()
    for tok in reversed(comments):
        row, col = tok.start
        lines[row - 1] = lines[row - 1][:col]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def _signature(cls: type) -> tuple:
    return tuple(_normalised_source(getattr(cls, m)) if hasattr(cls, m) else None for m in ("forward", "_norm"))


def _fastlm_class_for(cls: type) -> Optional[type]:
    """The class an instance of ``cls`` becomes, or None to leave it."""
    if cls in _swap_classes:
        return _swap_classes[cls]
    target = None
    if cls is torch.nn.LayerNorm:
        target = fnn.LayerNorm
    elif cls is torch.nn.RMSNorm:
        target = fnn.RMSNorm
    elif "forward" in cls.__dict__ and cls.__module__.startswith("transformers."):
        import importlib
        signature = _signature(cls)
        for name, (module_name, eps_attr, offset, out_dtype) in _RMS_KINDS.items():
            try:
                reference = getattr(importlib.import_module(module_name), name)
            except (ImportError, AttributeError):  # another transformers version
                continue
            if signature[0] is not None and signature == _signature(reference):
                target = type("Fastlm" + cls.__name__, (cls,),
                              {"forward": _rms_forward(eps_attr, offset, out_dtype), "__module__": __name__,
                               "__doc__": f"{cls.__name__} with its forward on fastlm.rms_norm."})
                break
    _swap_classes[cls] = target
    return target


# ============================================================================ loss

def _reduce(loss_sum_or_mean: Callable[[str], Tensor], num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return loss_sum_or_mean("mean").float()
    total = loss_sum_or_mean("sum").float()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss on fastlm.cross_entropy: labels shifted left by one (or
    ``shift_labels`` as given), mean over counted tokens or sum / num_items_in_batch. The
    logits are not copied to float32 (the kernel computes in float32); the loss is float32."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    rows, target = logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device)
    return _reduce(lambda r: cross_entropy(rows, target, ignore_index=ignore_index, reduction=r), num_items_in_batch)


def masked_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, **kwargs) -> Tensor:
    """transformers' ForMaskedLMLoss on fastlm.cross_entropy: labels aligned with the logits."""
    rows, target = logits.reshape(-1, vocab_size), labels.reshape(-1).to(logits.device)
    return _reduce(lambda r: cross_entropy(rows, target, ignore_index=ignore_index, reduction=r), num_items_in_batch)


_LOSSES = {"ForCausalLM": causal_lm_loss, "ForConditionalGeneration": causal_lm_loss, "ForMaskedLM": masked_lm_loss}


def _forward_uses_loss_function(model) -> bool:
    src = _normalised_source(type(model).forward)
    return src is not None and "self.loss_function" in src


# Models whose forward builds torch's CrossEntropyLoss itself, checked to take exactly the
# plain loss below (others may add terms, e.g. router losses, and keep their own loss).
_INLINE_LOSS = {"BertForMaskedLM": "transformers.models.bert.modeling_bert",
                "RobertaForMaskedLM": "transformers.models.roberta.modeling_roberta",
                "T5ForConditionalGeneration": "transformers.models.t5.modeling_t5"}


def _inline_loss_forward(model, original: Callable) -> Optional[Callable]:
    """For BertForMaskedLM and T5ForConditionalGeneration, which build torch's CrossEntropyLoss
    inside forward: a wrapper that runs forward without labels and takes the same loss (mean
    over labels != -100, no shift; T5's decoder inputs shifted right from the labels first, as
    its forward does) with fastlm.cross_entropy. None for other models."""
    cls = type(model)
    if _INLINE_LOSS.get(cls.__name__) != cls.__module__:
        return None
    seq2seq = hasattr(model, "_shift_right")

    @functools.wraps(original)
    def forward(*args, **kwargs):
        labels = kwargs.pop("labels", None)
        if labels is None:
            return original(*args, **kwargs)
        if seq2seq and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            kwargs["decoder_input_ids"] = model._shift_right(labels)
        out = original(*args, **kwargs)
        logits = out["logits"] if isinstance(out, dict) else out[0]
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device))
        if isinstance(out, dict):
            out["loss"] = loss
            return out
        return (loss,) + tuple(out)

    return forward


# ============================================================================ fused lm-head + loss

import re  # noqa: E402  (used only below)

_SOFTCAP_LINES = ("if self.config.final_logit_softcapping is not None:",
                  "{v} = {v} / self.config.final_logit_softcapping", "{v} = torch.tanh({v})",
                  "{v} = {v} * self.config.final_logit_softcapping")


def _head_attribute(model) -> Optional[str]:
    """The attribute name of the model's output embedding (lm_head, embed_out, ...), if it is
    a plain nn.Linear child of the model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return None
    for name, child in model.named_children():
        if child is head:
            return name
    return None


def _fusable_forward(model) -> Optional[tuple[str, bool]]:
    """(head attribute, soft-capped) when the model's forward is, from its lm-head on, exactly
    ``logits = self.<head>(hidden)``, optionally Gemma 2's final soft-cap of the logits,
    ``loss = self.loss_function(logits, labels, ...)``, and nothing else that reads the logits
    but the returned output's ``logits=`` field (a later term such as Mixtral's router loss is
    added to that loss, which stays right). None otherwise: such a model keeps its logits."""
    head = _head_attribute(model)
    src = _normalised_source(type(model).forward)
    if head is None or src is None:
        return None
    lines = [line.strip() for line in src.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    call = re.compile(rf"^(\w+) = self\.{head}\(")
    starts = [i for i, line in enumerate(lines) if call.match(line)]
    losses = [i for i, line in enumerate(lines) if "self.loss_function(" in line]
    if len(starts) != 1 or len(losses) != 1 or losses[0] < starts[0]:
        return None
    var = call.match(lines[starts[0]]).group(1)
    allowed = {"loss = None", "if labels is not None:"} | {t.format(v=var) for t in _SOFTCAP_LINES}
    between = lines[starts[0] + 1:losses[0]]
    if any(line not in allowed for line in between):
        return None
    uses = re.compile(rf"(?<![\w.]){var}\b")
    call_line = lines[losses[0]]
    if not (f"logits={var}" in call_line or f"loss_function({var}" in call_line or call_line.endswith("(")):
        return None
    as_field = re.compile(rf"\blogits={var}\s*[,)]|\blogits={var}$")  # the output's field, nothing applied
    for line in lines[losses[0] + 1:]:
        if uses.search(line) and not re.fullmatch(rf"{var},", line) and not as_field.search(line):
            return None
    return head, any("final_logit_softcapping" in line for line in between)


class _Passthrough(torch.nn.Module):
    """Stands in for the lm-head during a fused call: the hidden states go on to the loss."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def fused_causal_lm_loss(head: torch.nn.Linear, softcap: Optional[float]):
    """The loss function of a fused call: transformers' ForCausalLMLoss (labels shifted left by
    one, or ``shift_labels``; mean over counted tokens, or sum / num_items_in_batch) computed
    by fastlm.linear_cross_entropy from the hidden states and the head's weight (and bias),
    with the model's final soft-cap; the (tokens, vocab) logits are never formed. float32."""
    def loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
             shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
        hidden = logits  # the passthrough head handed over the hidden states
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        x = hidden.reshape(-1, hidden.shape[-1])
        target = shift_labels.reshape(-1).to(x.device)
        return _reduce(lambda r: linear_cross_entropy(x, head.weight, target, linear_bias=head.bias,
                                                      ignore_index=ignore_index, reduction=r, softcap=softcap,
                                                      out_dtype=torch.float32),
                       num_items_in_batch)
    return loss


def _fused_loss_forward(model, original: Callable, head_name: str, softcapped: bool) -> Callable:
    """model.forward with the lm-head and loss fused when labels are given in training mode
    with gradients on: the head is bypassed (its hidden states go to fused_causal_lm_loss), the
    final soft-cap moves into the loss, and the output's logits are None (as Liger's). Other
    calls (no labels, eval mode, no_grad) run the model's forward as it is."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        labels = bound.get("labels")
        if labels is None or not model.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        head = getattr(model, head_name)
        cap = model.config.final_logit_softcapping if softcapped else None
        previous_loss = model.__dict__.get("_loss_function", _ABSENT)
        model._modules[head_name] = _Passthrough()
        model.loss_function = fused_causal_lm_loss(head, cap)
        if softcapped:
            model.config.final_logit_softcapping = None
        try:
            out = original(*args, **kwargs)
        finally:
            model._modules[head_name] = head
            if previous_loss is _ABSENT:
                model.__dict__.pop("_loss_function", None)
            else:
                model._loss_function = previous_loss
            if softcapped:
                model.config.final_logit_softcapping = cap
        if isinstance(out, dict) and "logits" in out:
            out["logits"] = None
        return out

    return forward


# ============================================================================ apply / revert

class Applied:
    """What ``apply`` replaced in one model, and how to put it back.

    ``replaced``: [(qualified module name, what was replaced)] ("" names the model itself),
    e.g. ("model.layers.0.input_layernorm", "LlamaRMSNorm"), ("", "attention: sdpa"),
    ("", "loss_function: ForCausalLMLoss"). Iterating the handle iterates ``replaced``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.replaced: list[tuple[str, str]] = []
        self._classes: list[tuple[torch.nn.Module, type]] = []
        self._configs: list[tuple[torch.nn.Module, Any]] = []  # (module, its original config)
        self._config_pairs: list[tuple[Any, Any]] = []  # (original config, the model's private copy)
        self._loss: Optional[tuple[str, Any]] = None  # ("loss_function" | "forward", previous instance value)
        self._undo: list[Callable[[], None]] = []  # further swaps' undo steps (MLPs, rotary), run last to first
        self.reverted = False

    def __iter__(self):
        return iter(self.replaced)

    def __len__(self) -> int:
        return len(self.replaced)

    def __repr__(self) -> str:
        state = "reverted" if self.reverted else "applied"
        return f"<fastlm.integrations.transformers {state} on {type(self.model).__name__}: {self.replaced}>"

    def revert(self) -> list[tuple[str, str]]:
        """Undo ``apply``: classes, attention implementation (the original config objects come
        back, with any other change made to the config since copied into them), and the loss.
        Returns what was restored. Reverting twice raises."""
        if self.reverted:
            raise RuntimeError("fastlm.integrations.transformers.revert: this model was already reverted")
        model = self.model
        for undo in reversed(self._undo):
            undo()
        for module, cls in self._classes:
            module.__class__ = cls
        back = {id(new): old for old, new in self._config_pairs}
        for old, new in self._config_pairs:
            for k, v in new.__dict__.items():
                if k != "_attn_implementation_internal":
                    old.__dict__[k] = back.get(id(v), v)
        for module, config in self._configs:
            module.config = config
        if self._loss is not None:
            what, previous = self._loss
            if what == "loss_function":
                if previous is _ABSENT:
                    model.__dict__.pop("_loss_function", None)
                else:
                    model._loss_function = previous
            else:
                model.__dict__.pop("forward", None)
                if previous is not _ABSENT:
                    model.forward = previous
        model.__dict__.pop(_STATE, None)
        self.reverted = True
        return list(self.replaced)


_ABSENT = object()


def _is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # transformers is optional
        raise ImportError("fastlm.integrations.transformers.apply needs the transformers package "
                          "(pip install 'fastlm[transformers]')") from e
    return isinstance(model, PreTrainedModel)


def _private_configs(model, handle: Applied) -> None:
    """Give the model its own copies of its config objects, so that switching its attention
    implementation cannot switch another model built from the same config object."""
    from transformers import PreTrainedConfig
    memo: dict = {}
    originals: dict[int, Any] = {}

    def collect(config):
        if id(config) in originals:
            return
        originals[id(config)] = config
        for value in config.__dict__.values():
            if isinstance(value, PreTrainedConfig):
                collect(value)

    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, PreTrainedConfig):
            collect(config)
            handle._configs.append((module, config))
            module.config = copy.deepcopy(config, memo)  # one memo: shared configs stay shared
    handle._config_pairs = [(c, memo[key]) for key, c in originals.items() if key in memo]


def apply(model: torch.nn.Module, attention: bool = True, norms: bool = True, loss: bool = True,
          fused_linear_loss: bool = False, rotary: bool = True, mlp: bool = True) -> Applied:
    """Run a Hugging Face model on fastlm's ops, in place; returns an ``Applied`` handle whose
    ``replaced`` lists what changed and whose ``revert()`` undoes it (or call ``revert(model)``).

    attention: "fastlm" is registered in transformers' AttentionInterface and
        AttentionMaskInterface (a new name: additive, other models are untouched) and the
        model's attention implementation is set to it. The model gets private copies of its
        config objects first, so models sharing a config with it keep theirs.
    norms: torch.nn.LayerNorm / RMSNorm become fastlm.nn's (class swap, as fastlm.patch), and
        HF RMS norms written as LlamaRMSNorm, T5LayerNorm (weight only, no mean subtraction) or
        Gemma's (1 + weight) a subclass whose forward runs fastlm.rms_norm. Parameters are
        untouched.
    loss: the instance's ``loss_function`` becomes fastlm's (causal or masked LM), or, for
        models computing torch's CrossEntropyLoss inside forward (BERT, T5), forward is wrapped
        on the instance. Nothing of torch or transformers is rebound.
    fused_linear_loss: a causal LM called with labels in training mode (gradients on) computes
        its loss with fastlm.linear_cross_entropy from the last hidden states and the lm-head
        weight (bias, Gemma 2's final soft-cap; the label shift, ignore_index and
        num_items_in_batch as transformers' ForCausalLMLoss): the (tokens x vocab) logits and
        their gradient are never formed, and the output's ``logits`` is None then (as
        Liger-Kernel's). Without labels, in eval mode or under no_grad the logits are computed
        as before. A model whose forward does anything else with its logits before the loss
        (checked on its source) keeps its head, with a one-time warning.
    rotary: attention modules calling their modeling file's ``apply_rotary_pos_emb``, when it
        is HF's rotate_half formula (Llama's, GPT-NeoX's and Phi-3's partial one, OLMo-2's),
        get a subclass whose forward is HF's own with that name bound to
        fastlm.apply_rotary_pos_emb (per instance: the module global is untouched; see
        fastlm.integrations.hf_rotary). cos/sin stay HF's (every rope scaling type). Other
        rotary functions are left alone with a one-time warning naming the module. Qwen3's,
        OLMo-2's and Gemma 3's attention (q_norm / k_norm, then the rotary) run the norms and
        the rotary as one fastlm.qk_norm_rotary call instead.
    mlp: MLPs written as HF's (Llama's and its copies: separate gate_proj / up_proj, read by
        the kernels where they lie; Phi-3's fused gate_up_proj; GPT-NeoX's; GPT-2's Conv1D
        pair; Mixtral's experts under the eager experts implementation), with a SiLU, erf
        GELU, tanh GELU or ReLU activation, get a subclass whose forward runs
        fastlm.feed_forward (see fastlm.integrations.hf_mlp). Others are left alone with a
        one-time warning naming the module.

    Raises TypeError for a module that is not a transformers PreTrainedModel and RuntimeError
    when ``model`` is already patched (revert first)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastlm.integrations.transformers.apply: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if not _is_hf_model(model):
        raise TypeError(f"fastlm.integrations.transformers.apply: {type(model).__name__} is not a Hugging Face "
                        f"transformers PreTrainedModel; for plain PyTorch models use fastlm.patch")
    if _STATE in model.__dict__:
        raise RuntimeError("fastlm.integrations.transformers.apply: this model is already patched; call revert() "
                           "first")
    handle = Applied(model)
    if attention:
        register()
        before = model.config._attn_implementation
        _private_configs(model, handle)
        model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation == ATTENTION_NAME:
            handle.replaced.append(("", f"attention: {before}"))
        else:
            _warn_once(f"attn:{type(model).__name__}", f"fastlm: {type(model).__name__} does not take its attention "
                                                       f"from transformers' registry; its attention is unchanged")
    if norms:
        for name, module in model.named_modules():
            target = _fastlm_class_for(type(module))
            if target is None:
                continue
            original = type(module)
            handle._classes.append((module, original))
            module.__class__ = target
            handle.replaced.append((name, original.__name__))
    if loss:
        # transformers' loss_function falls back to ForCausalLM for an unknown loss_type (GPT-2's)
        from transformers.loss.loss_utils import LOSS_MAPPING
        kind = model.loss_type if model.loss_type in LOSS_MAPPING else "ForCausalLM"
        if _forward_uses_loss_function(model) and kind in _LOSSES:
            previous = model.__dict__.get("_loss_function", _ABSENT)
            old_name = getattr(model.loss_function, "__name__", "loss_function")
            model.loss_function = _LOSSES[kind]
            handle._loss = ("loss_function", previous)
            handle.replaced.append(("", f"loss_function: {old_name}"))
        else:
            previous = model.__dict__.get("forward", _ABSENT)
            wrapped = _inline_loss_forward(model, model.forward)
            if wrapped is not None:
                model.forward = wrapped
                handle._loss = ("forward", previous)
                handle.replaced.append(("", "forward: torch CrossEntropyLoss"))
    if fused_linear_loss:
        _fuse_head_and_loss(model, handle)
    if rotary:
        from .hf_rotary import swap_rotary
        swap_rotary(model, handle)
    if mlp:
        from .hf_mlp import swap_mlps
        swap_mlps(model, handle)
    model.__dict__[_STATE] = handle
    return handle


def _masked_lm_fused_forward(model, current: Callable, parent: torch.nn.Module, attr: str) -> Callable:
    """BERT's and RoBERTa's masked-LM forward with the decoder and loss fused (training, labels,
    gradients on): the model runs without labels and with its decoder bypassed, and the loss,
    torch's CrossEntropyLoss mean over labels != -100 as their forward computes it, comes from
    fastlm.linear_cross_entropy over the masked positions' transformed hidden states only (the
    others do not count: their rows are never multiplied by the vocabulary; selecting them costs
    one host sync a step, for the count that sizes the matmul, against ~85% of the lm-head's
    work saved at BERT's masking rate). logits is None."""
    signature = inspect.signature(current)

    @functools.wraps(current)
    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None or not model.training or not torch.is_grad_enabled():
            return current(*args, **kwargs)
        bound.arguments["labels"] = None
        head = parent._modules[attr]
        parent._modules[attr] = _Passthrough()
        try:
            out = current(*bound.args, **bound.kwargs)
        finally:
            parent._modules[attr] = head
        hidden = out["logits"]
        flat = labels.reshape(-1).to(hidden.device)
        counted = flat != -100
        x = hidden.reshape(-1, hidden.shape[-1])[counted]
        out["loss"] = linear_cross_entropy(x, head.weight, flat[counted], linear_bias=head.bias,
                                           out_dtype=torch.float32)
        out["logits"] = None
        return out

    return forward


def _fuse_head_and_loss(model, handle: Applied) -> None:
    from transformers.loss.loss_utils import LOSS_MAPPING
    cls = type(model)
    if cls.__name__ in ("BertForMaskedLM", "RobertaForMaskedLM") and _INLINE_LOSS.get(cls.__name__) == cls.__module__:
        head = model.get_output_embeddings()
        where = next(((m, n) for m in model.modules() for n, c in m.named_children() if c is head), None)
        if type(head) is torch.nn.Linear and where is not None:
            _wrap_forward(model, handle, _masked_lm_fused_forward(model, model.forward, *where))
            handle.replaced.append(("", "forward: decoder + masked-LM loss fused (fastlm.linear_cross_entropy)"))
            return
    kind = model.loss_type if model.loss_type in LOSS_MAPPING else "ForCausalLM"
    found = _fusable_forward(model) if kind == "ForCausalLM" and _forward_uses_loss_function(model) else None
    if found is None:
        _warn_once(f"fused:{type(model).__name__}", f"fastlm: {type(model).__name__} is not fused "
                                                    f"(fused_linear_loss): its forward is not the lm-head-then-loss "
                                                    f"form fastlm reproduces exactly; its logits are formed as before")
        return
    if not handle._config_pairs:  # the soft-cap is moved off the config during a call: a private copy
        _private_configs(model, handle)
    _wrap_forward(model, handle, _fused_loss_forward(model, model.forward, *found))
    handle.replaced.append((found[0], "forward: lm-head + loss fused (fastlm.linear_cross_entropy)"))


def _wrap_forward(model, handle: Applied, forward: Callable) -> None:
    """Sets ``forward`` on the instance, with an undo step that puts back what was there."""
    previous = model.__dict__.get("forward", _ABSENT)
    model.forward = forward

    def undo():
        model.__dict__.pop("forward", None)
        if previous is not _ABSENT:
            model.forward = previous
    handle._undo.append(undo)


def revert(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Undo ``apply(model)``; returns what was restored. Raises ValueError if the model is not
    patched."""
    handle = getattr(model, "__dict__", {}).get(_STATE)
    if handle is None:
        raise ValueError("fastlm.integrations.transformers.revert: this model was not patched by apply()")
    return handle.revert()


__all__ = ["ATTENTION_NAME", "Applied", "apply", "attention_forward", "bert_from_transformers", "causal_lm_loss",
           "gpt_from_transformers", "masked_lm_loss", "register", "revert"]
