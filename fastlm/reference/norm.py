"""Layer norm and RMSNorm in plain PyTorch: the oracle for the kernels and the CPU path.

Each function works on the last ``normalized_ndim`` dims, computes in float32 when
``upcast`` is set (float64 stays float64), and returns the output in the input's dtype
together with the per-row statistics the kernels save for the backward:

    layer norm:  y = (x - mean) * rstd * w + b,   rstd = 1 / sqrt(var(x) + eps)
    RMSNorm:     y = x * rstd * w,                 rstd = 1 / sqrt(mean(x^2) + eps)

With dropout the input to normalise is the residual stream s = dropout(x) + residual
(:func:`dropout_add`), the mask drawn from a seed by :func:`dropout_keep`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(x: Tensor, upcast: bool) -> torch.dtype:
    if x.dtype == torch.float64 or not upcast:
        return x.dtype
    return torch.float32


def norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, normalized_ndim: int, eps: float,
         rms: bool, upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean, rstd); mean and rstd have one entry per row (mean is empty for RMS)."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    xf = x.to(_compute_dtype(x, upcast))
    if rms:
        mean = None
        var = xf.square().mean(dim=dims, keepdim=True)
        xhat = xf * torch.rsqrt(var + eps)
    else:
        mean = xf.mean(dim=dims, keepdim=True)
        var = (xf - mean).square().mean(dim=dims, keepdim=True)
        xhat = (xf - mean) * torch.rsqrt(var + eps)
    y = xhat
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    rstd = torch.rsqrt(var + eps).reshape(-1).float()
    mean = x.new_empty(0, dtype=torch.float32) if mean is None else mean.reshape(-1).float()
    return y.to(x.dtype), mean, rstd


def layer_norm(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5,
               residual: Tensor | None = None, upcast: bool = True) -> Tensor:
    """layer_norm(x + residual): the formula, for reading and for tests."""
    if residual is not None:
        x = x + residual
    ndim = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return norm(x, weight, bias, ndim, eps, rms=False, upcast=upcast)[0]


def rms_norm(x: Tensor, normalized_shape, weight=None, eps: float | None = None,
             residual: Tensor | None = None, upcast: bool = True) -> Tensor:
    """rms_norm(x + residual); eps None means the epsilon of the compute type, as torch does."""
    if residual is not None:
        x = x + residual
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    ndim = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return norm(x, weight, None, ndim, eps, rms=True, upcast=upcast)[0]


def norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, normalized_ndim: int,
             eps: float, rms: bool, upcast: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients (dx, dweight, dbias) of :func:`norm`. With xhat the normalised x and
    g = dy * w:  dx = rstd * (g - mean(g * xhat) * xhat - mean(g)), the last term for layer
    norm only; dw = sum over rows of dy * xhat; db = sum over rows of dy."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    rows = tuple(range(x.dim() - normalized_ndim))
    cd = _compute_dtype(x, upcast)
    xf, dyf = x.to(cd), dy.to(cd)
    if rms:
        rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)
        xhat = xf * rstd
    else:
        mean = xf.mean(dim=dims, keepdim=True)
        rstd = torch.rsqrt((xf - mean).square().mean(dim=dims, keepdim=True) + eps)
        xhat = (xf - mean) * rstd
    g = dyf * weight.to(cd) if weight is not None else dyf
    dx = g - xhat * (g * xhat).mean(dim=dims, keepdim=True)
    if not rms:
        dx = dx - g.mean(dim=dims, keepdim=True)
    dx = (dx * rstd).to(x.dtype)
    dw = (dyf * xhat).sum(dim=rows).to(weight.dtype) if weight is not None else None
    db = dyf.sum(dim=rows).to(bias.dtype) if bias is not None else None
    return dx, dw, db


def dropout_keep(seed: int, shape, dropout_p: float, device) -> Tensor:
    """The reference's dropout mask (True = kept) for an integer seed: a torch.Generator on
    ``device`` seeded with it, one uniform draw per element, kept where the draw >= dropout_p."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(tuple(shape), generator=g, device=device) >= dropout_p


def dropout_add(x: Tensor, residual: Tensor | None, keep: Tensor | None, dropout_p: float,
                stream_dtype: torch.dtype) -> Tensor:
    """The residual stream dropout(x) + residual: x zeroed where ``keep`` is False and scaled by
    1 / (1 - dropout_p) elsewhere (no dropout when keep is None), plus the residual, computed in
    float32 (float64 stays float64) and rounded once, to ``stream_dtype``."""
    cd = torch.float64 if torch.float64 in (x.dtype, stream_dtype) else torch.float32
    s = x.to(cd)
    if keep is not None:
        s = torch.where(keep, s * (1.0 / (1.0 - dropout_p)), 0.0)
    if residual is not None:
        s = s + residual.to(cd)
    return s.to(stream_dtype)


def dropout_add_norm(x: Tensor, residual: Tensor | None, normalized_shape, weight=None, bias=None,
                     eps: float = 1e-5, keep: Tensor | None = None, dropout_p: float = 0.0, rms: bool = False,
                     stream_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(norm(dropout(x) + residual), the stream): the formula, for reading and for tests. The
    output is in x's dtype, the stream in ``stream_dtype`` (default x's)."""
    s = dropout_add(x, residual, keep, dropout_p, stream_dtype or x.dtype)
    ndim = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return norm(s, weight, bias, ndim, eps, rms)[0].to(x.dtype), s
