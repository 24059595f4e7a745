"""Hugging Face MLPs on fastlm.feed_forward: the MLP part of ``fastlm.integrations.transformers.apply``.

``swap_mlps(model, handle)`` finds a model's MLP modules by the source of their class's
forward, compared with the Hugging Face classes it knows (as ``apply`` recognises RMS norms),
and swaps each instance's class for a generated subclass whose forward runs the whole block
through ``fastlm.feed_forward``. What fastlm computes is the same function; on the "torch"
backend it is the same torch calls in the same order, so the numbers are HF's own.

Kinds of MLP (every class whose forward reads exactly like one of these references):

* separate gate and up projections, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``:
  LlamaMLP, and its copies in Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, OLMo-2. The
  two weights go to the kernels as two pointers (``feed_forward(..., w_up=up_proj.weight)``):
  nothing is concatenated per step, and each Parameter gets its own gradient;
* a fused ``gate_up_proj`` (Phi-3): gate rows first, ``feed_forward``'s "gate_up" order;
* plain ``dense_4h_to_h(act(dense_h_to_4h(x)))`` (GPT-NeoX);
* GPT-2's Conv1D pair, whose weights are stored (in, out): the kernels take the transposed
  views (strides, no copy); the MLP's residual dropout is HF's own module, called where HF
  calls it, so training draws the same masks from the same generator;
* Mixtral's experts (weights as 3-D tensors, ``gate_up_proj`` (E, 2F, H) gate first, and
  ``down_proj`` (E, H, F)), when transformers runs them through its eager per-expert loop:
  each expert's block is one ``feed_forward`` call on the expert's slice of the 3-D
  weights (a view). With another experts implementation (transformers' default is
  ``grouped_mm``, one grouped GEMM for all experts) the swap would trade that for a Python
  loop of per-expert calls, slower where it matters, so such experts are left as they are,
  with the warning.

Activations, read off the module's activation instance (not the config string): SiLU
(``silu``, ``swish``), erf GELU (``gelu``, ``gelu_python``), the tanh GELU
(``gelu_pytorch_tanh``, ``gelu_new``, ``gelu_python_tanh``: one formula, sqrt(2/pi) exact)
and ReLU. Others (``gelu_fast`` and ``gelu_accurate`` with their rounded constants,
``quick_gelu``, ``relu2``, ...) are not fastlm's formulas: such an MLP is left unswapped with
a one-time warning naming the module, never patched approximately; so are an MLP whose
projections are not plain ``nn.Linear`` / ``Conv1D`` (quantized, LoRA-wrapped, hooked) and an
unrecognised module whose class name says it is an MLP (BERT's, split over BertIntermediate
and BertOutput with the residual and LayerNorm between, among them).

At each call the swapped forward checks again (a few attribute reads) that the activation is
one of fastlm's and the projections are plain, unhooked modules, and otherwise runs HF's own
forward: a hook or adapter added after ``apply`` is never bypassed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops.ffn import feed_forward

_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}

# References: (transformers module, class). A class whose forward has the same source as one
# of a kind's references is that kind.
_KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "gated": (("llama", "LlamaMLP"), ("mistral", "MistralMLP"), ("qwen2", "Qwen2MLP"), ("qwen3", "Qwen3MLP"),
              ("gemma", "GemmaMLP"), ("gemma2", "Gemma2MLP"), ("gemma3", "Gemma3MLP"), ("olmo2", "Olmo2MLP")),
    "gate_up": (("phi3", "Phi3MLP"),),
    "plain": (("gpt_neox", "GPTNeoXMLP"),),
    "conv1d": (("gpt2", "GPT2MLP"),),
    "experts": (("mixtral", "MixtralExperts"),),
}
# Modules named like an MLP that no kind covers: left, with the warning (and why, where known).
_LOOKS_LIKE_MLP = re.compile(r"(MLP|Mlp|FeedForward|FFN|Experts|Intermediate)$")
_LEFT_REASONS = {
    "BertIntermediate": "BERT's MLP is split over BertIntermediate (dense, activation) and BertOutput (dense, "
                        "dropout, residual, LayerNorm); fastlm.feed_forward does not span the two",
}

_warned: set = set()
_kind_cache: dict[type, Optional[str]] = {}
_swap_classes: dict[type, type] = {}


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


# ----------------------------------------------------------------------------- recognition

def _source(fn) -> Optional[str]:
    fn = getattr(fn, "__wrapped__", fn)  # the experts' forward is wrapped by use_experts_implementation
    try:
        return inspect.getsource(fn).strip()
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _reference_sources(kind: str) -> frozenset:
    sources = set()
    for module, name in _KINDS[kind]:
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        except (ImportError, AttributeError):  # another transformers version
            continue
        src = _source(cls.forward)
        if src is not None:
            sources.add(src)
    return frozenset(sources)


def mlp_kind(cls: type) -> Optional[str]:
    """The kind of MLP ``cls`` is ("gated", "gate_up", "plain", "conv1d", "experts"), or None."""
    if cls in _kind_cache:
        return _kind_cache[cls]
    kind = None
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.forward is not torch.nn.Module.forward:
        src = _source(cls.forward)
        if src is not None:
            kind = next((k for k in _KINDS if src in _reference_sources(k)), None)
    _kind_cache[cls] = kind
    return kind


def fastlm_activation(act) -> Optional[str]:
    """fastlm's name for a Hugging Face / torch activation module computing exactly that
    function ("silu", "gelu" (erf), "gelu_tanh", "relu"), or None."""
    from transformers import activations as A
    t = type(act)
    if t in (A.SiLUActivation, torch.nn.SiLU):
        return "silu"
    if t is torch.nn.ReLU:
        return "relu"
    if t is A.GELUActivation:
        f = act.act
        return "gelu" if f is torch.nn.functional.gelu or getattr(f, "__func__", None) is \
            A.GELUActivation._gelu_python else None
    tanh_cls = getattr(A, "GELUTanh", None) or getattr(A, "PytorchGELUTanh", None)
    if t is A.NewGELUActivation or (tanh_cls is not None and t is tanh_cls):
        return "gelu_tanh"
    if t is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return None


def _unhooked(m: torch.nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__ or hasattr(m, "_hf_hook"))


def _no_global_hooks() -> bool:
    g = torch.nn.modules.module
    return not (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _linear(m) -> bool:
    return type(m) is torch.nn.Linear and _unhooked(m)


def _conv1d(m) -> bool:
    from transformers.pytorch_utils import Conv1D
    return type(m) is Conv1D and _unhooked(m)


def _plan(module: torch.nn.Module, kind: str) -> tuple[Optional[str], str]:
    """(fastlm activation, "") when the module can run on fastlm now, else (None, why not)."""
    if not _no_global_hooks():
        return None, "global module hooks are registered (fastlm would not call the projections' forward)"
    if kind == "experts":
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
        if impl not in (None, "eager"):
            return None, (f"its experts run through transformers' {impl!r} implementation (one grouped GEMM for "
                          f"all experts), which a per-expert fastlm call would not beat; with "
                          f"experts_implementation 'eager' they are swapped")
        if getattr(module, "has_bias", False) or getattr(module, "is_transposed", False) \
                or not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
            return None, "its experts' weight layout is not [gate; up] (2F, H) without biases"
        act = getattr(module, "act_fn", None)
    else:
        names = {"gated": ("gate_proj", "up_proj", "down_proj"), "gate_up": ("gate_up_proj", "down_proj"),
                 "plain": ("dense_h_to_4h", "dense_4h_to_h"), "conv1d": ("c_fc", "c_proj")}[kind]
        plain = _conv1d if kind == "conv1d" else _linear
        for n in names:
            if not plain(getattr(module, n, None)):
                return None, (f"its {n} is a {type(getattr(module, n, None)).__name__}, not a plain, unhooked "
                              f"{'Conv1D' if kind == 'conv1d' else 'nn.Linear'}")
        if kind == "gated" and (module.gate_proj.bias is None) != (module.up_proj.bias is None):
            return None, "one of gate_proj and up_proj has a bias and the other not"
        act = getattr(module, {"gated": "act_fn", "gate_up": "activation_fn"}.get(kind, "act"), None)
    name = fastlm_activation(act) if act is not None else None
    if name is None:
        return None, (f"its activation {type(act).__name__} is not one fastlm computes exactly (SiLU, erf GELU, "
                      f"tanh GELU, ReLU)")
    return (_GATED[name] if kind in ("gated", "gate_up", "experts") else name), ""


# ----------------------------------------------------------------------------- the forwards

def _gated_forward(hf_forward: Callable) -> Callable:
    def forward(self, x):
        act, _ = _plan(self, "gated")
        if act is None:
            return hf_forward(self, x)
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return feed_forward(x, g.weight, g.bias, d.weight, d.bias, act, w_up=u.weight, b_up=u.bias)
    return forward


def _gate_up_forward(hf_forward: Callable) -> Callable:
    def forward(self, hidden_states):
        act, _ = _plan(self, "gate_up")
        if act is None:
            return hf_forward(self, hidden_states)
        gu, d = self.gate_up_proj, self.down_proj
        return feed_forward(hidden_states, gu.weight, gu.bias, d.weight, d.bias, act, gate_order="gate_up")
    return forward


def _plain_forward(hf_forward: Callable) -> Callable:
    def forward(self, hidden_states):
        act, _ = _plan(self, "plain")
        if act is None:
            return hf_forward(self, hidden_states)
        a, b = self.dense_h_to_4h, self.dense_4h_to_h
        return feed_forward(hidden_states, a.weight, a.bias, b.weight, b.bias, act)
    return forward


def _conv1d_forward(hf_forward: Callable) -> Callable:
    def forward(self, hidden_states):
        act, _ = _plan(self, "conv1d")
        if act is None:
            return hf_forward(self, hidden_states)
        a, b = self.c_fc, self.c_proj
        # Conv1D stores (in, out); .t() is the (out, in) view the kernels read by its strides
        out = feed_forward(hidden_states, a.weight.t(), a.bias, b.weight.t(), b.bias, act)
        return self.dropout(out)  # HF's residual dropout, where HF applies it
    return forward


def _experts_forward(hf_forward: Callable) -> Callable:
    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        act, _ = _plan(self, "experts")
        if act is None:
            return hf_forward(self, hidden_states, top_k_index, top_k_weights)
        # transformers' eager loop, each expert's block on fastlm.feed_forward
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            out = feed_forward(hidden_states[token_idx], self.gate_up_proj[expert_idx], None,
                               self.down_proj[expert_idx], None, act, gate_order="gate_up")
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final
    return forward


_FORWARDS = {"gated": _gated_forward, "gate_up": _gate_up_forward, "plain": _plain_forward,
             "conv1d": _conv1d_forward, "experts": _experts_forward}


def _fastlm_class(cls: type, kind: str) -> type:
    target = _swap_classes.get(cls)
    if target is None:
        target = type("Fastlm" + cls.__name__, (cls,), {
            "forward": _FORWARDS[kind](cls.forward), "__module__": __name__,
            "__doc__": f"{cls.__name__} with its MLP on fastlm.feed_forward (HF's forward where it cannot run)."})
        _swap_classes[cls] = target
    return target


# ----------------------------------------------------------------------------- the swap

def swap_mlps(model: torch.nn.Module, handle) -> None:
    """Swap the class of every MLP of ``model`` that fastlm reproduces exactly (see the module
    docstring) for one running fastlm.feed_forward; records (qualified name, original class
    name) in ``handle.replaced`` and an undo step in ``handle._undo``. Parameters are neither
    moved nor copied. MLPs left as they are get a one-time warning naming the module."""
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _swap_classes.values():  # already swapped (a module reachable twice)
            continue
        kind = mlp_kind(cls)
        if kind is None:
            # (a block holding MLPs or experts, such as GPT-OSS's router-and-experts GptOssMLP, is
            # not one: its parts are judged on their own)
            if _LOOKS_LIKE_MLP.search(cls.__name__) and not any(
                    _LOOKS_LIKE_MLP.search(type(c).__name__) or mlp_kind(type(c)) for c in module.children()):
                why = _LEFT_REASONS.get(cls.__name__, "its forward is none of the Hugging Face MLP forms fastlm "
                                                      "reproduces exactly (fastlm.integrations.hf_mlp)")
                _warn_once(("class", cls), f"fastlm: the MLP {name} ({cls.__name__}) is not swapped: {why}")
            continue
        act, why = _plan(module, kind)
        if act is None:
            _warn_once(("plan", cls, why), f"fastlm: the MLP {name} ({cls.__name__}) is not swapped: {why}")
            continue
        module.__class__ = _fastlm_class(cls, kind)
        handle._undo.append(functools.partial(_restore, module, cls))
        handle.replaced.append((name, cls.__name__))


def _restore(module: torch.nn.Module, cls: type) -> None:
    module.__class__ = cls


__all__ = ["fastlm_activation", "mlp_kind", "swap_mlps"]
