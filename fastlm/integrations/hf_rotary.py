"""Hugging Face rotary position embeddings on fastlm.apply_rotary_pos_emb, one model at a time.

Where HF's rotary is looked up. In transformers 5.x each modeling file defines its own
module-level ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (and ``rotate_half``),
and the attention's ``forward`` calls it by its bare name: a global lookup in the modeling
module's namespace, made at call time. The ``@use_kernelized_func(apply_rotary_pos_emb)``
decorator on many attention classes does not change that call: without the ``kernels``
package (not installed in fastlm's tests) it returns the class unchanged; with it, the
decorated global itself becomes a kernels layer (an nn.Module instance, per the kernels
documentation), which is not recognised here and is left alone. So the only hook is
a module global shared by every model of the family, and an attribute set on an instance is
never read.

What fastlm does instead, per instance. Each attention module of the given model whose
forward calls a recognised ``apply_rotary_pos_emb`` gets a subclass of its own class (a class
swap, as for the norms) whose ``forward`` is HF's forward function itself (the same code
object, defaults and closure, with its decorators such as ``deprecate_kwarg`` rebuilt around
it) bound to a copy of the modeling module's globals in which ``apply_rotary_pos_emb`` names
fastlm's. Every other line the forward runs is HF's; other models, and other instances of the
same class, keep the class and the module global untouched; ``revert`` swaps the class back.
The copy of the globals is taken when the subclass is built (it is rebuilt when a global the
forward reads has since been rebound), without ``__name__``, so that torch.compile guards the
copy rather than the real module's globals; the patched model traces without graph breaks.

What is recognised, so that the swap is exact. HF computes cos and sin (every rope scaling
type: llama3, yarn, dynamic, longrope, ... is in how its rotary embedding builds them), and
fastlm applies the cos/sin it is given; what must match is the application. The module's
``apply_rotary_pos_emb`` must be, statement for statement (its syntax tree, without docstring,
comments and decorators), one of the formulas below, and its ``rotate_half`` Llama's:

* Llama's: ``q * cos + rotate_half(q) * sin`` over the whole head (Mistral, Qwen2/3, Gemma 1-3
  and most others are copies);
* GPT-NeoX's and Phi-3's: the same on the first ``cos.shape[-1]`` features, the rest passed
  through (partial rotary);
* OLMo-2's: Llama's with the results cast back to q's and k's dtypes;

with or without an unused ``position_ids=None`` parameter before ``unsqueeze_dim``. Dtypes
follow HF's: Llama's and the partial formula return torch's promotion of q's, cos's and sin's
dtypes (float32 for a half-precision q and float32 tables), OLMo-2's q's and k's own. A
family whose attention calls a rotary function not recognised (GPT-J's interleaved pairs,
multimodal rotary, a function someone else already patched) is left alone with a one-time
warning naming its module; so is an attention module whose forward is overridden on the
instance (accelerate's hooks). Only the attention's own ``forward`` (and functions nested in
it) is searched for the call: a rotary applied from another method is not seen.
"""

from __future__ import annotations

import ast
import dis
import functools
import importlib
import inspect
import textwrap
import types
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops.rotary import apply_rotary_pos_emb

NAME = "apply_rotary_pos_emb"

# The reference formulas, read from transformers' own modeling files when first needed:
# module -> whether the results are cast back to the inputs' dtypes.
_REFERENCES = {
    "transformers.models.llama.modeling_llama": False,
    "transformers.models.gpt_neox.modeling_gpt_neox": False,
    "transformers.models.phi3.modeling_phi3": False,
    "transformers.models.olmo2.modeling_olmo2": True,
}
_ROTATE_HALF_REFERENCE = "transformers.models.llama.modeling_llama"

_MISSING = object()
_warned: set[str] = set()
_reference_shapes: Optional[dict[str, bool]] = None  # normalised syntax tree -> keeps dtype
_rotate_half_shape: Optional[str] = None
_recognised: dict[Callable, Optional[tuple[bool, bool]]] = {}  # HF function -> (keeps dtype, has position_ids)
_fastlm_versions: dict[Callable, Callable] = {}  # HF function -> its fastlm replacement
_swap_classes: dict[tuple, type] = {}


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)  # _warn_once, swap_rotary, apply: the caller of apply


# ============================================================================ recognising the formula

def _tree(fn: Callable, drop_position_ids: bool = False) -> Optional[tuple[str, bool]]:
    """The function's syntax tree as a string, without docstring, decorators, comments and
    annotations, and whether it had a ``position_ids`` parameter (dropped from the tree when
    ``drop_position_ids``: an unused parameter). None when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    try:
        node = ast.parse(source).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    args = node.args
    names = [a.arg for a in args.args]
    has_position_ids = False
    if drop_position_ids and "position_ids" in names:
        i = names.index("position_ids")
        first_default = len(args.args) - len(args.defaults)
        default = args.defaults[i - first_default] if i >= first_default else None
        if not (isinstance(default, ast.Constant) and default.value is None):
            return None
        has_position_ids = True
        kept = [a for a in args.args if a.arg != "position_ids"]
        defaults = [d for j, d in enumerate(args.defaults) if j + first_default != i]
        args = ast.arguments(posonlyargs=args.posonlyargs, args=kept, vararg=args.vararg,
                             kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults, kwarg=args.kwarg,
                             defaults=defaults)
    for a in args.posonlyargs + args.args + args.kwonlyargs:
        a.annotation = None
    clean = ast.FunctionDef(name=node.name, args=args, body=body, decorator_list=[], returns=None, type_params=[])
    return ast.dump(clean), has_position_ids


def _references() -> tuple[dict[str, bool], Optional[str]]:
    global _reference_shapes, _rotate_half_shape
    if _reference_shapes is None:
        shapes: dict[str, bool] = {}
        for module_name, keeps_dtype in _REFERENCES.items():
            try:
                fn = getattr(importlib.import_module(module_name), NAME)
            except (ImportError, AttributeError):  # another transformers version
                continue
            tree = _tree(fn)
            if tree is not None:
                shapes[tree[0]] = keeps_dtype
        try:
            tree = _tree(importlib.import_module(_ROTATE_HALF_REFERENCE).rotate_half)
        except (ImportError, AttributeError):
            tree = None
        _reference_shapes, _rotate_half_shape = shapes, tree[0] if tree else None
    return _reference_shapes, _rotate_half_shape


def _recognise(fn) -> Optional[tuple[bool, bool]]:
    """(keeps dtype, has position_ids) when ``fn`` is one of the reference formulas, calling a
    ``rotate_half`` written as Llama's and the real ``torch``; else None."""
    if fn in _recognised:
        return _recognised[fn]
    found = None
    if isinstance(fn, types.FunctionType):
        shapes, rotate_half_shape = _references()
        tree = _tree(fn, drop_position_ids=True)
        helper = fn.__globals__.get("rotate_half")
        if tree is not None and tree[0] in shapes and fn.__globals__.get("torch") is torch \
                and isinstance(helper, types.FunctionType) and rotate_half_shape is not None \
                and (_tree(helper) or (None,))[0] == rotate_half_shape:
            found = (shapes[tree[0]], tree[1])
    _recognised[fn] = found
    return found


# ============================================================================ fastlm's version

def _fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    """What fastlm.apply_rotary_pos_emb takes; anything else (never met in HF's attention
    classes) runs HF's own function."""
    return (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(cos, Tensor) and isinstance(sin, Tensor)
            and q.dim() == 4 and k.dim() == 4 and cos.dim() in (2, 3) and cos.shape == sin.shape
            and q.dtype == k.dtype and q.is_floating_point() and cos.is_floating_point() and sin.is_floating_point()
            and unsqueeze_dim in (1, 2) and not isinstance(unsqueeze_dim, bool))


def _rotate(original: Callable, keeps_dtype: bool, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
            unsqueeze_dim: int) -> tuple[Tensor, Tensor]:
    if not _fits(q, k, cos, sin, unsqueeze_dim):
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    computed = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)  # HF's arithmetic dtype
    # The kernel and fastlm's reference compute in float32 (float64 for float64) whatever q's
    # dtype: a half-precision q with float32 tables needs no upcast where the result goes back
    # to q's dtype (OLMo-2); where HF returns the promoted dtype, q and k are cast up first.
    work = q.dtype if keeps_dtype and computed != torch.float64 else computed
    dtype = q.dtype
    if q.dtype != work:
        q, k = q.to(work), k.to(work)
    table = work if work == torch.float64 else torch.float32
    if cos.dtype not in (torch.float32, work):  # a narrower table: widening it is exact
        cos = cos.to(table)
    if sin.dtype not in (torch.float32, work):
        sin = sin.to(table)
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    if keeps_dtype and q_embed.dtype != dtype:
        q_embed, k_embed = q_embed.to(dtype), k_embed.to(dtype)
    return q_embed, k_embed


def fastlm_version(original: Callable) -> Optional[Callable]:
    """fastlm's replacement for a recognised HF ``apply_rotary_pos_emb`` (same signature, same
    result dtypes), or None when ``original`` is not recognised."""
    if original in _fastlm_versions:
        return _fastlm_versions[original]
    form = _recognise(original)
    if form is None:
        return None
    keeps_dtype, has_position_ids = form
    if has_position_ids:
        def replacement(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            return _rotate(original, keeps_dtype, q, k, cos, sin, unsqueeze_dim)
    else:
        def replacement(q, k, cos, sin, unsqueeze_dim=1):
            return _rotate(original, keeps_dtype, q, k, cos, sin, unsqueeze_dim)
    replacement.__name__ = replacement.__qualname__ = NAME
    replacement.__doc__ = (f"{original.__module__}.{NAME} on fastlm.apply_rotary_pos_emb (q and k in one launch "
                           f"on the Triton backend).")
    replacement.__wrapped_hf__ = original
    _fastlm_versions[original] = replacement
    return replacement


# ============================================================================ rebinding a forward

@functools.lru_cache(maxsize=None)
def _global_names(code: types.CodeType) -> frozenset[str]:
    """Names the code (and code nested in it) loads as globals."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return frozenset(names)


def _chain(fn) -> Optional[list[types.FunctionType]]:
    """[fn, the function it wraps, ...] down to the innermost, through ``__wrapped__``."""
    chain = [fn]
    while hasattr(chain[-1], "__wrapped__") and len(chain) < 16:
        chain.append(chain[-1].__wrapped__)
    if not all(isinstance(f, types.FunctionType) for f in chain) or hasattr(chain[-1], "__wrapped__"):
        return None
    return chain


def _holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _clone(fn: types.FunctionType, namespace: dict, closure, wrapped=None) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    new.__annotations__ = dict(fn.__annotations__)
    if wrapped is not None:
        new.__wrapped__ = wrapped
    return new


def _rebound(chain: list[types.FunctionType], namespace: dict) -> Optional[types.FunctionType]:
    """The chain rebuilt: the innermost function on ``namespace``, each wrapper with the cell
    that held the function it wraps holding the rebuilt one. None when a wrapper does not
    keep what it wraps in its closure (it could not be rebuilt faithfully)."""
    inner = chain[-1]
    new = _clone(inner, namespace, inner.__closure__)
    for wrapper, old in zip(reversed(chain[:-1]), reversed(chain[1:])):
        cells = wrapper.__closure__ or ()
        if not any(_holds(c, old) for c in cells):
            return None
        closure = tuple(types.CellType(new) if _holds(c, old) else c for c in cells)
        new = _clone(wrapper, wrapper.__globals__, closure, wrapped=new)
    return new


def _rotary_names(code: types.CodeType) -> list[str]:
    """Globals the code calls that look like rotary functions (for the warning)."""
    return sorted(n for n in _global_names(code)
                  if n.startswith("apply_") and ("rotary" in n.lower() or "rope" in n.lower()))


def _swap_class_for(cls: type) -> tuple[Optional[type], Optional[str]]:
    """(the subclass an instance of ``cls`` becomes, None) or (None, why not: a warning) or
    (None, None) when ``cls`` applies no rotary."""
    forward = getattr(cls, "forward", None)
    chain = _chain(forward) if isinstance(forward, types.FunctionType) else None
    if chain is None:
        return None, None
    inner = chain[-1]
    calls = _rotary_names(inner.__code__)
    if not calls:
        return None, None
    where = f"{cls.__module__}.{cls.__qualname__}"
    if calls != [NAME]:
        return None, (f"fastlm: {where} applies rotary through {', '.join(calls)} (module {inner.__module__}), "
                      f"which fastlm does not swap; its rotary is unchanged")
    namespace = inner.__globals__
    original = namespace.get(NAME, _MISSING)
    replacement = fastlm_version(original) if original is not _MISSING else None
    if replacement is None:
        return None, (f"fastlm: {where} calls {inner.__module__}.{NAME}, which fastlm does not recognise as Hugging "
                      f"Face's rotate_half formula; its rotary is unchanged")
    names = sorted(_global_names(inner.__code__))
    key = (cls, tuple((n, id(namespace.get(n, _MISSING))) for n in names))
    if key not in _swap_classes:
        copied = dict(namespace)
        copied[NAME] = replacement
        # Without __name__ the copy is not taken for the module of that name: torch.compile
        # (dynamo) would otherwise look the globals up on the real module (HF's function) when
        # it guards them. __package__ stays, for relative imports made inside the forward.
        copied.pop("__name__", None)
        new_forward = _rebound(chain, copied)
        if new_forward is None:
            return None, (f"fastlm: {where}.forward is wrapped by a decorator that fastlm cannot rebuild; its rotary "
                          f"is unchanged")
        _swap_classes[key] = type("Fastlm" + cls.__name__, (cls,), {
            "forward": new_forward, "__module__": __name__, "__qualname__": "Fastlm" + cls.__qualname__,
            "__doc__": f"{cls.__name__} with {inner.__module__}.{NAME} on fastlm.apply_rotary_pos_emb."})
    return _swap_classes[key], None


def swap_rotary(model: torch.nn.Module, handle) -> None:
    """Give every attention module of ``model`` that applies a recognised HF rotary formula a
    subclass whose forward runs it on fastlm.apply_rotary_pos_emb (see the module docstring);
    records ``(module name, "rotary: <class>")`` in ``handle.replaced`` and how to undo it in
    ``handle._undo``. Attention classes calling a rotary function that is not recognised, and
    instances whose forward is overridden on the instance (the class's forward would not run),
    are left alone, with one warning per class naming its module."""
    for name, module in model.named_modules():
        cls = type(module)
        target, why = _swap_class_for(cls)
        if why is not None:
            _warn_once(f"rotary:{cls.__module__}.{cls.__qualname__}", why)
        if target is None:
            continue
        if "forward" in module.__dict__:  # e.g. accelerate's hooks: the class's forward is not what runs
            _warn_once(f"rotary-instance:{cls.__module__}.{cls.__qualname__}",
                       f"fastlm: {name} ({cls.__module__}.{cls.__qualname__}) has its forward replaced on the "
                       f"instance (hooks such as accelerate's); its rotary is unchanged")
            continue
        module.__class__ = target
        handle._undo.append(lambda module=module, cls=cls: setattr(module, "__class__", cls))
        handle.replaced.append((name, f"rotary: {cls.__name__}"))


__all__ = ["fastlm_version", "swap_rotary"]
