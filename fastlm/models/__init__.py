"""Transformer language models assembled from fastlm's modules and ops (issue 7)."""

from .bert import BertConfig, BertForMaskedLM, mask_tokens
from .encdec import EncoderDecoder, EncoderDecoderConfig
from .gpt import GPT, GPTConfig, sample
from .lstm import LSTMLM, LSTMConfig

__all__ = ["BertConfig", "BertForMaskedLM", "EncoderDecoder", "EncoderDecoderConfig", "GPT", "GPTConfig",
           "mask_tokens", "sample", "LSTMConfig", "LSTMLM"]
