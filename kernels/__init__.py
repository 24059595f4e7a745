"""Triton kernels, one file per op family; installed as the subpackage ``fastlm.kernels``.

Importing this package imports nothing else: each family (``fastlm.kernels.norm``, ...)
imports triton when it is first used, so TRITON_INTERPRET can still be set before that.
"""
