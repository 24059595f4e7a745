"""Patching models people already have: plain PyTorch (fastlm.patch) and Hugging Face transformers."""
