"""fastlm's exceptions for a bad argument to a public function or module (issue 20).

fastlm checks its arguments up front and says which one is wrong; torch finds most of the
same mistakes deeper down and raises RuntimeError (a shape that does not fit, mismatched
dtypes, a bad option value), sometimes ValueError, TypeError or IndexError. Code written
for torch catches those types, so every fastlm argument error is a RuntimeError *and* the
type that describes it best; ``except RuntimeError``, ``except ValueError`` (or TypeError,
IndexError where torch raises those) and ``except fastlm.ArgumentError`` all work:

- ArgumentError (ValueError, RuntimeError): a bad value, shape, device or option.
- ArgumentTypeError (TypeError, RuntimeError): a wrong type or dtype (an int tensor where
  floating point is needed, a weight of another dtype than the input, not a Tensor).
- ArgumentIndexError (ArgumentError, IndexError): a class index outside [0, C) in a loss's
  target (checked on CPU tensors), where torch raises IndexError.

The message starts with the function's name and names the argument at fault.
"""

from __future__ import annotations

__all__ = ["ArgumentError", "ArgumentIndexError", "ArgumentTypeError"]


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value (shape, device, option): a ValueError and, as torch raises for the
    same call, a RuntimeError."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad argument type or dtype: a TypeError and, as torch raises for the same call, a
    RuntimeError."""


class ArgumentIndexError(ArgumentError, IndexError):
    """A class index out of range in a loss's target: an ArgumentError and, as torch raises
    for the same call, an IndexError."""
