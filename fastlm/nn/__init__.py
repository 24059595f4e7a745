"""Drop-in modules for their torch.nn twins, running on fastlm's ops."""

from .attention import MultiheadAttention
from .ffn import FeedForward, Linear
from .loss import CrossEntropyLoss, JSDLoss, KLDivLoss, LinearCrossEntropyLoss, LinearJSDLoss
from .norm import DropoutAddLayerNorm, DropoutAddRMSNorm, LayerNorm, RMSNorm
from .transformer import TransformerEncoderLayer

__all__ = ["CrossEntropyLoss", "DropoutAddLayerNorm", "DropoutAddRMSNorm", "FeedForward", "JSDLoss", "KLDivLoss",
           "LayerNorm", "Linear", "LinearCrossEntropyLoss", "LinearJSDLoss", "MultiheadAttention", "RMSNorm",
           "TransformerEncoderLayer"]
