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

Qwen3, OLMo-2 and Gemma 3 (and copies of their attention): the q_norm / k_norm calls and the
rotary become one fastlm.qk_norm_rotary call (one launch forward and one backward), by a
rewrite of HF's forward described at ``_QK_REFERENCES`` below; recorded as
``"qk_norm_rotary: <class>"``.
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

from ..ops.rotary import apply_rotary_pos_emb, qk_norm_rotary_heads_first

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


def _clone(fn: types.FunctionType, namespace: dict, closure, wrapped=None, code=None) -> types.FunctionType:
    new = types.FunctionType(code or fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    new.__annotations__ = dict(fn.__annotations__)
    if wrapped is not None:
        new.__wrapped__ = wrapped
    return new


def _rebound(chain: list[types.FunctionType], namespace: dict, code=None) -> Optional[types.FunctionType]:
    """The chain rebuilt: the innermost function on ``namespace`` (with ``code`` in place of its
    own when given), each wrapper with the cell that held the function it wraps holding the
    rebuilt one. None when a wrapper does not keep what it wraps in its closure (it could not
    be rebuilt faithfully)."""
    inner = chain[-1]
    new = _clone(inner, namespace, inner.__closure__, code=code)
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


# ============================================================================ q/k norm + rotary in one call
#
# Qwen3's, OLMo-2's and Gemma 3's attention normalise q and k (their q_norm / k_norm modules)
# and then call apply_rotary_pos_emb: fastlm.qk_norm_rotary does both in one launch. Their
# forward is rewritten, not replaced: the attention's own forward, its syntax tree equal to one
# of the reference forwards below (transformers' own classes, or a copy of one), with the two
# norm calls ``self.q_norm(x)`` / ``self.k_norm(x)`` dropped and the rotary call
# ``apply_rotary_pos_emb(q, k, cos, sin)`` becoming ``_fastlm_qk_norm_rotary(self, q, k, cos, sin)``;
# every other statement is HF's, compiled from HF's source into the same copy of the module
# globals as the rotary swap uses. That is exact because, in these forwards, what happens between
# the norm and the rotary is a view and a transpose of the head axes, which commute with a norm
# over the head dim (Qwen3, Gemma 3) and, for OLMo-2's norm over the whole projection, leave
# each token's features together. The norm modules must be the family's own (checked on their
# source, per instance; fastlm's norm swap of them counts as theirs); a call the fused op does
# not take as HF computes it (mixed dtypes whose promotion HF's code would change, hooks on a
# norm module) runs HF's norms and then the rotary swap's function, so the result is the same.
#
# family's attention class -> (module, its norm class, eps attribute, norm over all heads,
# weight offset, xhat rounded before the weight, HF's rotary keeps q's dtype)
_QK_REFERENCES = {
    "Qwen3Attention": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "variance_epsilon", False, 0.0,
                       True),
    "Olmo2Attention": ("transformers.models.olmo2.modeling_olmo2", "Olmo2RMSNorm", "variance_epsilon", True, 0.0,
                       False),
    "Gemma3Attention": ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm", "eps", False, 1.0, False),
}
_QK_CALL = "_fastlm_qk_norm_rotary"
_qk_reference_trees: Optional[dict[str, tuple]] = None  # forward syntax tree -> (kind, norm class)
_qk_kinds: dict[type, Optional[tuple]] = {}
_qk_classes: dict[tuple, Optional[type]] = {}


def _qk_references() -> dict[str, tuple]:
    global _qk_reference_trees
    if _qk_reference_trees is None:
        trees = {}
        for attention, (module_name, norm, eps_attr, all_heads, offset, cast) in _QK_REFERENCES.items():
            try:
                module = importlib.import_module(module_name)
                forward = _chain(getattr(module, attention).forward)[-1]
                norm_cls = getattr(module, norm)
            except (ImportError, AttributeError, TypeError):  # another transformers version
                continue
            tree = _tree(forward)
            if tree is not None:
                trees[tree[0]] = ((eps_attr, all_heads, offset, cast), norm_cls)
        _qk_reference_trees = trees
    return _qk_reference_trees


def _qk_kind(cls: type) -> Optional[tuple]:
    """(options, the family's norm class) when ``cls``'s forward is a recognised q/k-norm attention
    forward calling a recognised rotary; else None."""
    if cls in _qk_kinds:
        return _qk_kinds[cls]
    found = None
    forward = getattr(cls, "forward", None)
    chain = _chain(forward) if isinstance(forward, types.FunctionType) else None
    if chain is not None and not chain[-1].__code__.co_freevars and NAME in _global_names(chain[-1].__code__):
        tree = _tree(chain[-1])
        refs = _qk_references()
        if tree is not None and tree[0] in refs:
            original = chain[-1].__globals__.get(NAME, _MISSING)
            if original is not _MISSING and fastlm_version(original) is not None:
                found = refs[tree[0]]
    _qk_kinds[cls] = found
    return found


def _norm_is(module, norm_cls: type) -> bool:
    """``module`` is ``norm_cls`` or a copy of it (same source), possibly class-swapped by
    fastlm's norm swap (fastlm.integrations.transformers), with a 1-D weight."""
    from . import transformers as ft
    cls = type(module)
    if cls.__module__ == ft.__name__ and cls.__name__.startswith("Fastlm") and len(cls.__bases__) == 1:
        cls = cls.__bases__[0]
    if cls is not norm_cls and ft._signature(cls) != ft._signature(norm_cls):
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 1


class _Rewrite(ast.NodeTransformer):
    """Drops ``self.q_norm(x)`` / ``self.k_norm(x)`` (to ``x``) and turns the rotary call into
    the fused one, counting what it changed."""

    def __init__(self):
        self.norms = 0
        self.rotary = 0

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("q_norm", "k_norm") and isinstance(f.value, ast.Name) \
                and f.value.id == "self" and len(node.args) == 1 and not node.keywords:
            self.norms += 1
            return node.args[0]
        if isinstance(f, ast.Name) and f.id == NAME and len(node.args) == 4 and not node.keywords:
            self.rotary += 1
            return ast.copy_location(ast.Call(func=ast.Name(id=_QK_CALL, ctx=ast.Load()),
                                              args=[ast.Name(id="self", ctx=ast.Load()), *node.args], keywords=[]),
                                     node)
        return node


def _rewritten_code(inner: types.FunctionType) -> Optional[types.CodeType]:
    """The code of ``inner`` with the norms and the rotary fused (see above), compiled from its
    source at its own file and line numbers; None where the source does not rewrite as expected."""
    try:
        source = textwrap.dedent(inspect.getsource(inner))
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef):
        return None
    node.decorator_list = []
    rewrite = _Rewrite()
    node = rewrite.visit(node)
    if rewrite.norms != 2 or rewrite.rotary != 1:
        return None
    module = ast.Module(body=[node], type_ignores=[])
    ast.fix_missing_locations(module)  # before the shift: new nodes take their parent's place
    ast.increment_lineno(module, inner.__code__.co_firstlineno - 1)
    try:
        compiled = compile(module, inner.__code__.co_filename, "exec", dont_inherit=True)
    except SyntaxError:
        return None
    codes = [c for c in compiled.co_consts if isinstance(c, types.CodeType) and c.co_name == inner.__name__]
    if len(codes) != 1 or codes[0].co_freevars:
        return None
    return codes[0]


def _hf_norm(norm, x: Tensor, all_heads: bool) -> Tensor:
    """HF's norm module on q or k (B, H, S, D) as its forward applies it: per head, or (OLMo-2)
    over the token's whole projection, (B, S, H * D) as it was before the split into heads."""
    if not all_heads:
        return norm(x)
    B, H, S, D = x.shape
    return norm(x.transpose(1, 2).reshape(B, S, H * D)).view(B, S, H, D).transpose(1, 2)


def _fused_call(options: tuple, rotary: Callable, keeps_dtype: bool) -> Callable:
    """The function the rewritten forward calls in place of apply_rotary_pos_emb, with the
    attention module and the un-normalised q and k."""
    eps_attr, all_heads, offset, cast = options

    def qk_norm_rotary_call(module, q, k, cos, sin):
        qn, kn = module.q_norm, module.k_norm
        if _takes(qn, kn, q, k, cos, sin, cast, all_heads, keeps_dtype):
            eps = getattr(qn, eps_attr)
            if getattr(kn, eps_attr) == eps and isinstance(eps, (int, float)) and not isinstance(eps, bool):
                half = cos.shape[-1] // 2
                c, s = cos[..., :half], sin[..., :half]
                if not (cos.is_cpu and not torch.compiler.is_compiling()) or (
                        torch.equal(c, cos[..., half:]) and torch.equal(s, sin[..., half:])):
                    if c.dim() == 2:
                        c, s = c[None], s[None]
                    return qk_norm_rotary_heads_first(q, k, qn.weight, kn.weight, c, s, float(eps), offset, cast,
                                                      all_heads)
        return rotary(_hf_norm(qn, q, all_heads), _hf_norm(kn, k, all_heads), cos, sin)
    qk_norm_rotary_call.__name__ = qk_norm_rotary_call.__qualname__ = _QK_CALL
    return qk_norm_rotary_call


def _takes(qn, kn, q, k, cos, sin, cast: bool, all_heads: bool, keeps_dtype: bool) -> bool:
    """Whether fastlm.qk_norm_rotary computes this call as HF's norms then rotary do: shapes it
    takes, no hooks on the norm modules, and HF's result dtype equal to q's (the fused op
    returns q's dtype: a float32 weight or float32 tables over a half q, which HF's promotion
    would turn into a float32 result, run HF's own path)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(cos, Tensor) and isinstance(sin, Tensor)):
        return False
    if q.dim() != 4 or k.dim() != 4 or q.dtype != k.dtype or not q.is_floating_point() or cos.shape != sin.shape \
            or cos.dim() not in (2, 3) or cos.shape[-1] % 2 or cos.shape[-1] > q.shape[-1] \
            or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] \
            or cos.shape[-2] != q.shape[2] or (cos.dim() == 3 and cos.shape[0] not in (1, q.shape[0])):
        return False
    for norm in (qn, kn):
        if "forward" in norm.__dict__ or norm._forward_hooks or norm._forward_pre_hooks:
            return False
    qw, kw = qn.weight, kn.weight
    if qw.dtype != kw.dtype or qw.dtype not in (q.dtype, torch.float32) \
            or cos.dtype not in (q.dtype, torch.float32) or sin.dtype != cos.dtype:
        return False
    if any(t.device != q.device for t in (k, qw, kw, cos, sin)):
        return False
    D = q.shape[-1]
    if (qw.shape[0], kw.shape[0]) != ((q.shape[1] * D, k.shape[1] * D) if all_heads else (D, D)):
        return False
    # HF's dtypes: the norm's output (Llama's weight * xhat.to(x dtype) promotes with the
    # weight; Gemma's and OLMo-2's return x's dtype), then the rotary's promotion with the tables.
    normed = torch.promote_types(qw.dtype, q.dtype) if cast else q.dtype
    out = normed if keeps_dtype else torch.promote_types(normed, cos.dtype)
    return normed == q.dtype and out == q.dtype


def _qk_swap_class_for(module) -> Optional[type]:
    """The subclass an attention module becomes for the fused q/k norm + rotary, or None (the
    plain rotary swap then applies)."""
    cls = type(module)
    kind = _qk_kind(cls)
    if kind is None:
        return None
    options, norm_cls = kind
    if not (_norm_is(getattr(module, "q_norm", None), norm_cls) and _norm_is(getattr(module, "k_norm", None),
                                                                           norm_cls)):
        _warn_once(f"qk-norm:{cls.__module__}.{cls.__qualname__}",
                   f"fastlm: {cls.__module__}.{cls.__qualname__} has q_norm / k_norm modules that are not "
                   f"{norm_cls.__name__}; its norms and rotary are not fused (the rotary alone is swapped)")
        return None
    chain = _chain(cls.forward)
    inner = chain[-1]
    namespace = inner.__globals__
    original = namespace[NAME]
    names = sorted(_global_names(inner.__code__))
    key = (cls, tuple((n, id(namespace.get(n, _MISSING))) for n in names))
    if key not in _qk_classes:
        target = None
        code = _rewritten_code(inner)
        if code is not None:
            copied = dict(namespace)
            replacement = fastlm_version(original)
            copied[NAME] = replacement
            copied[_QK_CALL] = _fused_call(options, replacement, _recognise(original)[0])
            copied.pop("__name__", None)  # as in _swap_class_for: torch.compile guards the copy
            new_forward = _rebound(chain, copied, code)
            if new_forward is not None:
                target = type("Fastlm" + cls.__name__, (cls,), {
                    "forward": new_forward, "__module__": __name__, "__qualname__": "Fastlm" + cls.__qualname__,
                    "__doc__": f"{cls.__name__} with q_norm, k_norm and {NAME} as one fastlm.qk_norm_rotary call."})
        _qk_classes[key] = target
    return _qk_classes[key]


def swap_rotary(model: torch.nn.Module, handle) -> None:
    """Give every attention module of ``model`` that applies a recognised HF rotary formula a
    subclass whose forward runs it on fastlm.apply_rotary_pos_emb (see the module docstring);
    records ``(module name, "rotary: <class>")`` (``"qk_norm_rotary: <class>"`` where the
    attention's q/k norms are fused with the rotary) in ``handle.replaced`` and how to undo it in
    ``handle._undo``. Attention classes calling a rotary function that is not recognised, and
    instances whose forward is overridden on the instance (the class's forward would not run),
    are left alone, with one warning per class naming its module."""
    for name, module in model.named_modules():
        cls = type(module)
        target = _qk_swap_class_for(module)
        label = "qk_norm_rotary"
        if target is None:
            target, why = _swap_class_for(cls)
            label = "rotary"
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
        handle.replaced.append((name, f"{label}: {cls.__name__}"))


__all__ = ["fastlm_version", "swap_rotary"]
