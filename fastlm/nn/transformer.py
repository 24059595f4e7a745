"""TransformerEncoderLayer: torch.nn.TransformerEncoderLayer that always runs its submodules.

Why it exists (issue 20). torch's TransformerEncoderLayer.forward has a fast path: in eval
mode, with no gradient needed, batch_first=True, an even head count, relu/gelu and a few more
conditions, it calls torch._transformer_encoder_layer_fwd on the attention's weights and never
calls ``self.self_attn`` (nor norm1/norm2, linear1/linear2). A model patched by fastlm.patch
would then silently run torch's attention at inference. This subclass's forward is the
layer's plain composition (torch's own "slow path": the same residual wiring, masks made
canonical the same way), so fastlm's attention and norms run in every mode. It adds no state:
fastlm.patch swaps the class of an existing layer and fastlm.unpatch swaps it back.

NestedTensor input. torch.nn.TransformerEncoder, in eval mode with a src_key_padding_mask
(enable_nested_tensor=True, conditions of the same fast path), packs the batch into a nested
tensor, runs its layers on that, and pads the result back with zeros. That decision stays
torch's (TransformerEncoder is not swapped); this layer takes the nested batch, pads it, runs
with the padding as src_key_padding_mask, and packs the result again. So the encoder's output
equals the unpatched one's everywhere, padded positions included: 0 (before the encoder's
final norm) where torch packs, the slow path's values where it does not. The cost is one pad
and one repack of the activations a layer, small beside the layer's matmuls.

Where torch's fast path differs from its slow path, fastlm follows the slow path:
- a sequence whose every key is padding: the fast path gives NaN, the slow path (and fastlm)
  finite values (its queries attend to nothing and get 0 attention);
- a float src_mask with entries other than 0 and -inf: torch 2.13's fused kernel (seen on CPU)
  reads it as boolean, every nonzero entry masking its key out (a random additive mask gives
  NaN everywhere); the slow path, and fastlm, add it to the scores as documented;
- is_causal=True with a src_mask that is not causal: the fast path uses src_mask, the slow
  path the causal rule (a wrong hint, which torch documents as undefined).

Constructed directly, the layer's self_attn, norm1 and norm2 are fastlm's (those of their
exact torch types, as fastlm.patch would swap them); linear1/linear2 stay torch.nn.Linear.
TransformerDecoderLayer has no fast path (torch 2.13 always calls its attention modules), so
it needs no twin.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError
from .attention import MultiheadAttention
from .norm import LayerNorm

_CHILDREN = {torch.nn.MultiheadAttention: MultiheadAttention, torch.nn.LayerNorm: LayerNorm}


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer without torch's fused inference path (see the module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("self_attn", "norm1", "norm2"):
            child = getattr(self, name)
            twin = _CHILDREN.get(type(child))
            if twin is not None:
                child.__class__ = twin

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:
            return self._nested_forward(src, src_mask, src_key_padding_mask, is_causal)
        # torch's canonical masks: its dtype checks and warnings, boolean masks made additive
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:  # pre-norm
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))

    def _nested_forward(self, src: Tensor, src_mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor],
                        is_causal: bool) -> Tensor:
        """A nested batch (sequences of their own lengths) as a padded one and back."""
        if src_mask is not None or src_key_padding_mask is not None:
            raise ArgumentError("TransformerEncoderLayer: a NestedTensor src takes neither src_mask nor "
                                "src_key_padding_mask (its sequences' lengths are the padding), as in torch")
        if not self.self_attn.batch_first:
            raise ArgumentError("TransformerEncoderLayer: a NestedTensor src needs batch_first=True (a nested batch is "
                                "batch-first), as in torch")
        lengths = [t.shape[0] for t in src.unbind()]
        padded = src.to_padded_tensor(0.0)  # (B, longest, E)
        padding = torch.arange(padded.shape[1], device=padded.device)[None] \
            >= torch.tensor(lengths, device=padded.device)[:, None]
        # is_causal: no mask can come with a nested src, and a causal hint without its mask means nothing
        # (torch's slow path raises for it); torch's fast path ignores it here, and so do we
        out = self.forward(padded, src_key_padding_mask=padding)
        return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out.unbind(), lengths)], layout=src.layout)
