"""Which implementation runs an op: "torch" (the reference), "triton" or "cuda".

The choice is made per call, at run time, from (highest priority first):

1. ``fastlm.use_backend(name)``: a context manager backed by a ``ContextVar``, so it is
   scoped to the ``with`` block and to the current thread / asyncio task;
2. ``fastlm.set_backend(name)``: the process-wide default;
3. the environment variable ``FASTLM_BACKEND``, read once, lazily;
4. ``"auto"``.

``"auto"`` takes the fastest implementation that supports the call: Triton on CUDA
tensors, the reference on CPU tensors. Where the kernel does not support a call on
CUDA (float64, say), auto runs the reference and warns once, naming the reason.
A backend named explicitly never falls back: a call it cannot run raises.

Nothing here touches a device or imports triton at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from typing import Iterator, NamedTuple

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastlm_backend", default=None)
_process_default: str | None = None


class BackendUnavailableError(RuntimeError):
    """An explicitly chosen backend cannot run this call."""


class BackendInfo(NamedTuple):
    available: bool
    reason: str  # what it runs on, or why it cannot run here


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"backend: expected one of {_CHOICES}, got {name!r}")
    return name.lower()


@functools.lru_cache(maxsize=None)
def _env_default() -> str:
    value = os.environ.get("FASTLM_BACKEND", "").strip()
    if not value:
        return "auto"
    try:
        return _check_name(value)
    except ValueError:
        raise ValueError(f"FASTLM_BACKEND: expected one of {_CHOICES}, got {value!r}") from None


def get_backend() -> str:
    """The backend requested for calls made here and now ("auto" unless chosen)."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process_default is not None:
        return _process_default
    return _env_default()


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto", "torch", "triton" or "cuda")."""
    global _process_default
    _process_default = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the calls inside the ``with`` block on backend ``name``; nests and restores."""
    token = _scoped.set(_check_name(name))
    try:
        yield _scoped.get()
    finally:
        _scoped.reset(token)


# ----------------------------------------------------------------------------- availability

def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_extension_error() -> str | None:
    if importlib.util.find_spec("fastlm._C") is None:
        return "the CUDA C++ extension fastlm._C is not built (build it with: python -m fastlm.cuda_build)"
    try:
        from .ops import _cuda
        _cuda.load()
    except ImportError as exc:
        return f"the CUDA C++ extension fastlm._C does not load: {exc}"
    return None


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on a tensor of ``device_type``, or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device_type == "cuda":
            if triton_interpreted():
                return "TRITON_INTERPRET=1 is set, so Triton kernels run on CPU tensors only"
            return None
        if device_type == "cpu":
            if triton_interpreted():
                return None
            return ("Triton kernels run on CPU tensors only under the interpreter: set "
                    "TRITON_INTERPRET=1 before fastlm's kernels are first used")
        return f"Triton kernels do not run on {device_type} tensors"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA C++ kernels do not run on {device_type} tensors"
        return _cuda_extension_error()
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def available_backends() -> dict[str, BackendInfo]:
    """What can run here, and why not the others.

    Returns ``{name: BackendInfo(available, reason)}`` for "torch", "triton" and "cuda",
    judged for this machine's default device (CUDA if present, else CPU).
    """
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name in BACKENDS:
        why_not = unavailable_reason(name, device_type)
        if why_not is None:
            where = "CPU (Triton interpreter)" if (name == "triton" and device_type == "cpu") else device_type.upper()
            out[name] = BackendInfo(True, f"runs on {where} tensors")
        else:
            out[name] = BackendInfo(False, why_not)
    return out


# ----------------------------------------------------------------------------- per-call choice

def native_backend(device_type: str) -> bool:
    """True when a call on ``device_type`` runs on the "torch" backend whatever the kernels
    support (requested "torch", or "auto" off CUDA): the cheap first question of every op,
    which then calls torch's own function where it computes the same thing (issue 17)."""
    requested = get_backend()
    return requested == "torch" or (requested == "auto" and device_type != "cuda")


def native_backend_of(tensor) -> bool:
    """native_backend for ``tensor``'s device, read from ``is_cuda`` (a tensor's ``device``
    builds a new object every call); False for anything that is not a tensor, so the caller
    goes on to its argument checks."""
    requested = get_backend()
    if requested == "torch":
        return isinstance(tensor, torch.Tensor)
    return requested == "auto" and isinstance(tensor, torch.Tensor) and not tensor.is_cuda


_warned: set[tuple[str, str]] = set()


def resolve(op: str, device_type: str, kernel_unsupported: dict[str, str | None],
            requested: str | None = None) -> str:
    """Pick the backend that runs one call of ``op``.

    ``kernel_unsupported`` maps "triton" / "cuda" to the reason that kernel cannot run
    this particular call (a dtype, a size, an option), or None if it can. ``requested``
    defaults to :func:`get_backend`.
    """
    requested = _check_name(requested) if requested is not None else get_backend()
    if requested != "auto":
        if requested == "torch":
            return "torch"
        why_not = unavailable_reason(requested, device_type) or kernel_unsupported.get(requested)
        if why_not:
            raise BackendUnavailableError(f"fastlm.{op}: backend {requested!r} cannot run this call: {why_not}")
        return requested
    if device_type != "cuda":
        return "torch"  # the reference is the CPU path; the interpreter is for verification
    for candidate in ("triton",):  # "cuda" joins when its kernels beat Triton's (issue 6)
        why_not = unavailable_reason(candidate, device_type) or kernel_unsupported.get(candidate)
        if why_not is None:
            return candidate
        key = (op, why_not)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"fastlm.{op}: running the PyTorch reference because the {candidate} kernel "
                          f"cannot: {why_not}", RuntimeWarning, stacklevel=3)
    return "torch"
