"""fastlm.patch(model) / fastlm.unpatch(model): swap fastlm's modules into a model in place.

fastlm's modules subclass their torch.nn twins and add no state of their own (but for the
loss's two keyword-only extensions, set to their "off" defaults here), so patching changes
only each instance's class: parameters, buffers, devices, dtypes, hooks and state_dict stay
exactly as they were, and unpatching restores the original class. Only modules whose type is
exactly the torch class are swapped (a user's subclass has its own forward, which we keep).
"""

from __future__ import annotations

import torch

from . import nn as fnn

SWAPS = {
    torch.nn.LayerNorm: fnn.LayerNorm,
    torch.nn.RMSNorm: fnn.RMSNorm,
    torch.nn.MultiheadAttention: fnn.MultiheadAttention,
    torch.nn.CrossEntropyLoss: fnn.CrossEntropyLoss,
    torch.nn.KLDivLoss: fnn.KLDivLoss,
    # torch 2.13's; an older torch has no LinearCrossEntropyLoss to swap
    **({torch.nn.LinearCrossEntropyLoss: fnn.LinearCrossEntropyLoss} if hasattr(torch.nn, "LinearCrossEntropyLoss")
       else {}),
    # torch's layer would skip its self_attn at inference (a fused fast path): see fastlm/nn/transformer.py
    torch.nn.TransformerEncoderLayer: fnn.TransformerEncoderLayer,
    torch.nn.Linear: None,  # not swapped by default: see patch(linear=True)
}
_EXTRA_DEFAULTS = {fnn.CrossEntropyLoss: {"z_loss": 0.0, "softcap": None, "process_group": None},
                   fnn.Linear: {"activation": None}}
_EXTRA_DEFAULTS[fnn.LinearCrossEntropyLoss] = dict(fnn.loss._LCE_EXTRAS)  # z_loss, softcap, chunk_size, acc_dtype
_ORIGINAL = "_fastlm_original_class"


def patch(model: torch.nn.Module, linear: bool = False) -> list[tuple[str, str]]:
    """Replace, in place, every torch.nn.LayerNorm, RMSNorm, MultiheadAttention,
    TransformerEncoderLayer (whose inference fast path would bypass its attention),
    CrossEntropyLoss, LinearCrossEntropyLoss (torch 2.13) and KLDivLoss in ``model`` (itself included) by fastlm's, and with linear=True every
    torch.nn.Linear by fastlm.nn.Linear. Returns [(qualified name, torch class name)] of what
    was replaced ("" names the model itself)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastlm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    swaps = {k: v for k, v in SWAPS.items() if v is not None}
    if linear:
        swaps[torch.nn.Linear] = fnn.Linear
    replaced = []
    for name, module in model.named_modules():
        target = swaps.get(type(module))
        if target is None:
            continue
        setattr(module, _ORIGINAL, type(module))
        module.__class__ = target
        for attr, value in _EXTRA_DEFAULTS.get(target, {}).items():
            if not hasattr(module, attr):
                setattr(module, attr, value)
        replaced.append((name, getattr(module, _ORIGINAL).__name__))
    return replaced


def unpatch(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Undo patch(): every module it swapped gets its original class back (and the attributes
    patch added are removed). Returns [(qualified name, restored class name)]."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastlm.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    restored = []
    for name, module in model.named_modules():
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is None:
            continue
        for attr in _EXTRA_DEFAULTS.get(type(module), {}):
            module.__dict__.pop(attr, None)
        module.__class__ = original
        restored.append((name, original.__name__))
    return restored
