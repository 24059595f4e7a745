"""Drop-in modules for their torch.nn twins, running on fastlm's ops."""

from .attention import MultiheadAttention
from .ffn import FeedForward, Linear
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .norm import LayerNorm, RMSNorm
from .transformer import TransformerEncoderLayer

__all__ = ["CrossEntropyLoss", "FeedForward", "LayerNorm", "Linear", "LinearCrossEntropyLoss", "MultiheadAttention",
           "RMSNorm", "TransformerEncoderLayer"]
