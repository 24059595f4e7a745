"""Transformer language models assembled from fastlm's modules and ops (issue 7)."""

from .gpt import GPT, GPTConfig, sample

__all__ = ["GPT", "GPTConfig", "sample"]
