"""The thin eager path: an op's custom op for torch.compile, a plain call everywhere else.

Every fastlm op is registered as a ``torch.library.custom_op`` with a fake and an autograd
formula: that is what ``torch.compile`` (and ``torch.library.opcheck``) need. In eager mode the
registration is pure cost: a custom op's dispatch, schema binding and autograd wrapping take
about 30 µs a call on a CPU host, more than a small kernel runs on a GPU (issue 17). So each op
keeps its body, setup_context and backward as plain functions and gets an :class:`EagerTwin`:

    twin = EagerTwin(custom_op, body, setup_context, backward_eager)
    twin(*args)   # compiling: the custom op; grad needed: an autograd.Function; else: body(*args)

The custom op and the autograd.Function run the same body and the same backward formula, so
the two paths compute the same numbers; the only difference is who dispatches. A backward
that calls a backward op takes the op as an argument: the registered autograd formula calls
the backward custom op (AOTAutograd traces it), the eager one calls its body directly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

_is_compiling = torch.compiler.is_compiling
# Whether any autocast region is on: one C call (torch >= 2.4), else the two public queries.
autocast_any = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))


def compiling() -> bool:
    """True while torch.compile (or torch.export) traces the caller."""
    return _is_compiling()


class EagerTwin:
    """Call ``op``'s body directly in eager mode (through an autograd.Function when a tensor
    argument requires grad), and ``op`` itself while compiling."""

    __slots__ = ("op", "body", "function")

    def __init__(self, op: Callable, body: Callable, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None, name: str = "op", differentiable_backward: bool = False):
        self.op = op
        self.body = body
        self.function = None
        if backward is not None:
            # The classic forward(ctx, *args) form: an autograd.Function with a separate
            # setup_context costs about 13 us more per apply (torch's functorch checks).
            def forward(ctx, *args):
                out = body(*args)
                setup_context(ctx, args, out)
                return out

            # A backward op has no autograd formula: through the custom op a double backward
            # (create_graph=True) raises, and so it must here, or a kernel's gradient would
            # come back without a graph and a second-order term would be silently missing.
            # A twin whose backward is itself differentiable (rotary's calls the twin) says so.
            def first_order(ctx, *grads):
                if torch.is_grad_enabled() and any(
                        isinstance(t, Tensor) and t.requires_grad for t in grads + tuple(ctx.saved_tensors)):
                    raise RuntimeError(f"fastlm.{name}: this op's backward is not differentiable: a double "
                                       f"backward (create_graph=True) through it is not supported")
                return backward(ctx, *grads)

            self.function = type(f"{name}_eager", (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(backward if differentiable_backward else first_order),
            })

    def __call__(self, *args: Any):
        if _is_compiling():
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled():
            for a in args:
                if isinstance(a, Tensor) and a.requires_grad:
                    return self.function.apply(*args)
        return self.body(*args)
