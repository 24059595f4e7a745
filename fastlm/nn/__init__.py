"""Drop-in modules for their torch.nn twins, running on fastlm's ops."""

from .norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
