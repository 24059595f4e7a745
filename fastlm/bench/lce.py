"""The "lce" suite (fused linear cross-entropy); it lives in fastlm/bench/ce.py beside "ce"."""

from .ce import run_lce as run  # noqa: F401
