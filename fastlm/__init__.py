"""fastlm: fused Triton and CUDA C++ kernels for Transformer language models.

Every op has a plain-PyTorch reference that is its test oracle and its CPU path; on CUDA
tensors the kernels run. See ``fastlm.available_backends()`` for what runs here.
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _alias_source_kernels() -> None:
    """In a source checkout used without ``pip install`` (PYTHONPATH=.), the top-level
    kernels/ directory is what an install maps to fastlm.kernels: register it so."""
    if "fastlm.kernels" in _sys.modules or _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")):
        return
    try:
        if _ilu.find_spec("fastlm.kernels") is not None:  # installed (editable or not)
            return
    except (ImportError, ValueError):
        pass
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(src, "__init__.py")
    if _os.path.isfile(init):
        spec = _ilu.spec_from_file_location("fastlm.kernels", init, submodule_search_locations=[src])
        module = _ilu.module_from_spec(spec)
        _sys.modules["fastlm.kernels"] = module
        spec.loader.exec_module(module)


_alias_source_kernels()

from .backend import (  # noqa: E402
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .errors import ArgumentError, ArgumentIndexError, ArgumentTypeError  # noqa: E402
from .ops.attention import (  # noqa: E402
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from .ops.cross_entropy import cross_entropy  # noqa: E402
from .ops.cross_entropy_stats import CrossEntropyStats, cross_entropy_with_stats  # noqa: E402
from .ops.distill import jsd, kl_div, linear_jsd  # noqa: E402
from .ops.ffn import feed_forward, linear  # noqa: E402
from .ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_with_stats  # noqa: E402
from .ops.norm import add_layer_norm, add_rms_norm, layer_norm, layer_norm_fn, rms_norm  # noqa: E402
from .ops.rotary import apply_rotary_emb, apply_rotary_pos_emb, qk_norm_rotary, rotary, rotary_cos_sin  # noqa: E402
from . import nn, ops  # noqa: E402
from .patching import patch, unpatch  # noqa: E402

__all__ = [
    "ArgumentError",
    "ArgumentIndexError",
    "ArgumentTypeError",
    "BackendUnavailableError",
    "add_layer_norm",
    "apply_rotary_emb",
    "apply_rotary_pos_emb",
    "add_rms_norm",
    "available_backends",
    "cross_entropy",
    "cross_entropy_with_stats",
    "feed_forward",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_backend",
    "jsd",
    "kl_div",
    "layer_norm",
    "layer_norm_fn",
    "linear",
    "linear_cross_entropy",
    "linear_cross_entropy_with_stats",
    "linear_jsd",
    "nn",
    "patch",
    "qk_norm_rotary",
    "rms_norm",
    "rotary",
    "rotary_cos_sin",
    "scaled_dot_product_attention",
    "set_backend",
    "unpatch",
    "use_backend",
]
