"""fastlm.linear_cross_entropy_with_stats (the loss, gradients and statistics of the fused
lm-head + loss) and the skipping of ignored rows (``skip_ignored``): against float64 torch
on both backends, the rows-limited matmuls of kernels/lce_matmul.py at their tile edges, and
the Triton path's freedom from host syncs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm
from fastlm.errors import ArgumentError
from fastlm.kernels import lce_matmul
from fastlm.ops import cross_entropy as ce_ops
from fastlm.ops import linear_cross_entropy as lce_ops

from .conftest import DEVICE, ON_GPU
from .test_ce_stats import stats_oracle

BACKENDS = ["torch", "triton"]
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2, "softcap": 4.0},
    {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-3, "ignore_index": 7},
]


def _ids(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "plain"


def _inputs(n, h, v, ignored, ignore_index=-100, bias=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * h ** -0.5 * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    logits = F.linear(x, w, b)
    t = torch.randint(0, v, (n,), generator=g)
    t[::3] = logits.argmax(-1)[::3]  # some rows right: an accuracy neither 0 nor 1
    t[torch.rand(n, generator=g) < ignored] = ignore_index
    cast = (lambda a: a.to(DEVICE, dtype) if a is not None else None)
    return cast(x), cast(w), cast(b), t.to(DEVICE)


def _oracle(x, w, b, t, weight, reduction, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """float64 torch: the logits, F.cross_entropy (+ z-loss, soft-cap) and the statistics."""
    leaves = [a.double().detach().requires_grad_(True) for a in (x, w, b) if a is not None]
    logits = F.linear(leaves[0], leaves[1], leaves[2] if b is not None else None)
    capped = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
    wd = weight.double() if weight is not None else None
    rows = F.cross_entropy(capped, t, wd, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    counted = t != ignore_index
    rows = rows + z_loss * torch.logsumexp(capped, -1).square() * counted
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        div = (wd[torch.where(counted, t, 0)] * counted).sum() if wd is not None else counted.sum()
        loss = rows.sum() / div.clamp_min(1e-300)
    lse, z, acc = stats_oracle(logits.detach(), t, weight, ignore_index, reduction, z_loss, softcap)
    return loss, leaves, (lse, z, acc)


def _options(options, v):
    opts = dict(options)
    weight = None
    if opts.pop("weight", False):
        weight = (torch.rand(v, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5).to(DEVICE)
    return opts, weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
@pytest.mark.parametrize("skip_ignored", [True, False])
def test_stats_loss_and_gradients_match_torch(backend, reduction, options, skip_ignored):
    opts, weight = _options(options, 50)
    ii = opts.get("ignore_index", -100)
    x, w, b, t = _inputs(37, 24, 50, ignored=0.4, ignore_index=ii, bias=True)
    ref, leaves, (lse, z, acc) = _oracle(x, w, b, t, weight, reduction, **opts)
    dloss = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE)
    ref_grads = torch.autograd.grad(ref, leaves, dloss)
    ins = [a.detach().requires_grad_(True) for a in (x, w, b)]
    cw = weight.float() if weight is not None else None
    with fastlm.use_backend(backend):
        loss, stats = fastlm.linear_cross_entropy_with_stats(ins[0], ins[1], t, linear_bias=ins[2], weight=cw,
                                                             reduction=reduction, chunk_size=16,
                                                             skip_ignored=skip_ignored, **opts)
        grads = torch.autograd.grad(loss, ins, dloss.float())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.double(), ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **tol)
    counted = t != ii
    torch.testing.assert_close(stats.lse.double()[counted], lse[counted], **tol)
    if skip_ignored:  # an ignored row's logits are never formed: its lse is 0
        assert (stats.lse[~counted] == 0).all()
    torch.testing.assert_close(stats.z_loss.double(), z, **tol)
    torch.testing.assert_close(stats.accuracy.double(), acc, **tol)
    assert 0 < float(acc) < 1
    assert not stats.lse.requires_grad and not stats.accuracy.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignored", [0.0, 0.5, 0.85, 1.0])
@pytest.mark.parametrize("chunk_size", [15, 16, 17, 64])
def test_skipping_gives_the_full_computation(backend, ignored, chunk_size):
    """skip_ignored=True (counted rows sorted to the front, kernels stopping at the count) and
    False (every row computed) agree, at chunk sizes around the interpreter's 16-row tiles."""
    x, w, b, t = _inputs(45, 20, 33, ignored=ignored, bias=True, seed=1)
    out = {}
    for skip in (True, False):
        ins = [a.detach().requires_grad_(True) for a in (x, w, b)]
        with fastlm.use_backend(backend):
            loss = fastlm.linear_cross_entropy(ins[0], ins[1], t, linear_bias=ins[2], reduction="sum",
                                               chunk_size=chunk_size, skip_ignored=skip, z_loss=1e-3)
            out[skip] = (loss,) + torch.autograd.grad(loss, ins)
    for a, r in zip(out[True], out[False]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    if ignored == 1.0:
        assert all((g == 0).all() for g in out[True][1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_backward_skips_too(backend, monkeypatch):
    """reduction="none": the backward recomputes the chunks; with skipping, rows past the
    count are neither multiplied nor given a gradient (dx 0 there, from the kernel)."""
    x, w, _, t = _inputs(40, 16, 30, ignored=0.6, seed=2)
    xs = x.detach().requires_grad_(True)
    with fastlm.use_backend(backend):
        loss = fastlm.linear_cross_entropy(xs, w, t, reduction="none", chunk_size=8)
    dloss = torch.randn(40, device=DEVICE)
    (dx,) = torch.autograd.grad(loss, [xs], dloss)
    ref = F.cross_entropy(F.linear(x.double().requires_grad_(True), w.double()), t, reduction="none")
    xd = x.double().requires_grad_(True)
    ref = F.cross_entropy(F.linear(xd, w.double()), t, reduction="none")
    (rdx,) = torch.autograd.grad(ref, [xd], dloss.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-5, atol=1e-5)
    assert (dx[t == -100] == 0).all()


class _BoolIndexMode(TorchDispatchMode):
    """Sees boolean-mask indexing at the aten level (aten.index with a bool index), in the
    backward too: the mode rides the thread-local state the autograd engine carries."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.calls.append("__getitem__[bool]")
        return func(*args, **(kwargs or {}))


class _SyncSpy:
    """Records the calls that read a tensor's value on the host, in the forward and in the
    autograd engine's backward alike (the methods are patched on torch.Tensor and torch:
    a TorchFunctionMode does not see the backward; boolean indexing is seen by a dispatch
    mode — patching torch.Tensor.__getitem__ is not undoable: setting and deleting it leaves
    CPython's sequence slot on the class, and torch.tensor([0-d tensor, ...]) then fails
    for the rest of the process). Use as a context manager."""

    METHODS = ("item", "nonzero", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
               "argwhere", "masked_select", "unique", "any", "all")

    def __init__(self, monkeypatch):
        self.calls = []
        self._monkeypatch = monkeypatch
        self._mode = _BoolIndexMode(self.calls)

    def __enter__(self):
        self._mode.__enter__()  # first: entering it imports code that reads torch's attributes
        for name in self.METHODS:
            for owner in (torch.Tensor, torch):
                real = getattr(owner, name, None)
                if callable(real) and not isinstance(real, types.ModuleType):  # torch.cpu is a module
                    self._monkeypatch.setattr(owner, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._monkeypatch.undo()

    def _wrap(self, name, real):
        def spy(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)
        return spy


@pytest.mark.parametrize("stats", [False, True])
def test_triton_path_reads_nothing_back(stats, monkeypatch):
    """On the Triton backend the ignored rows are skipped without a host sync: no .item(),
    nonzero(), boolean indexing or bool() of a tensor in the forward or the backward (the CPU
    tensors' target range check, a CPU-only convenience, is switched off here; retain_graph
    keeps the CPU-only shortcut of the eager backward, an .item() of a CPU scalar, off)."""
    monkeypatch.setattr(lce_ops, "check_targets_in_range", lambda *a: None)
    monkeypatch.setattr(ce_ops, "check_targets_in_range", lambda *a: None)
    x, w, b, t = _inputs(40, 16, 30, ignored=0.7, bias=True, seed=3)
    ins = [a.detach().requires_grad_(True) for a in (x, w, b)]
    with fastlm.use_backend("triton"):
        with _SyncSpy(monkeypatch) as spy:
            for reduction in ("mean", "none"):
                if stats:
                    loss, st = fastlm.linear_cross_entropy_with_stats(ins[0], ins[1], t, linear_bias=ins[2],
                                                                      reduction=reduction, chunk_size=8)
                else:
                    loss = fastlm.linear_cross_entropy(ins[0], ins[1], t, linear_bias=ins[2], reduction=reduction,
                                                       chunk_size=8)
                torch.autograd.grad(loss, ins, torch.ones_like(loss), retain_graph=True)
        calls = list(spy.calls)
    assert calls == [], calls


def test_sync_spy_sees_a_sync(monkeypatch):
    """The spy above is not blind: it sees the calls it looks for, in a backward too."""
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            g.sum().item()
            return g * 2

    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            return g.clone().index_put_((g > 0,), g[g > 0] * 3)

    a = torch.arange(5.0, requires_grad=True)
    with _SyncSpy(monkeypatch) as spy:
        a.detach().sum().item()
        a.detach().nonzero()
        a.detach()[a.detach() > 2]
        torch.autograd.grad(Twice.apply(a).sum(), [a])
        torch.autograd.grad(Masked.apply(a).sum(), [a])
    assert spy.calls == ["item", "nonzero", "__getitem__[bool]", "item", "__getitem__[bool]"], spy.calls
    # the spy leaves torch.Tensor as it found it: a 0-d tensor is still no sequence
    assert torch.tensor([torch.tensor(2.0), 1.0]).tolist() == [2.0, 1.0]


# ----------------------------------------------------------------------------- the kernels themselves

@pytest.mark.parametrize("count,row0", [(100, 0), (15, 0), (16, 0), (17, 0), (0, 0), (33, 16), (10, 16), (16, 16)])
def test_rows_matmul_kernels_stop_at_the_count(count, row0):
    """logits_rows: live rows right, rows of wholly dead tiles untouched (poisoned NaN stays);
    dx_rows: live rows right, the rest 0; dweight_rows: += over the live rows only, dbias too.
    R = 37 rows, tiles of 16 under the interpreter: counts at the tile edges."""
    g = torch.Generator().manual_seed(count * 7 + row0)
    r, h, v = 37, 33, 50
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in ((r, h), (v, h), (v,)))
    c = torch.tensor([count], device=DEVICE)
    live = max(0, min(count - row0, r))
    out = lce_matmul.logits_rows(x, w, b, c, row0)
    torch.testing.assert_close(out[:live], x[:live] @ w.t() + b, rtol=1e-5, atol=1e-5)
    tile = 16 if not ON_GPU else 128
    first_dead_tile = -(-live // tile) * tile
    if not ON_GPU:
        assert out[first_dead_tile:].isnan().all()  # (FASTLM_POISON: never written)
    d = torch.randn(r, v, generator=g).to(DEVICE)
    dx = torch.full((r, h), float("nan"), device=DEVICE)
    lce_matmul.dx_rows(d, w, c, row0, dx)
    torch.testing.assert_close(dx[:live], d[:live] @ w, rtol=1e-5, atol=1e-5)
    assert (dx[live:] == 0).all()
    dw0, db0 = torch.randn(v, h, generator=g).to(DEVICE), torch.randn(v, generator=g).to(DEVICE)
    dw, db = dw0.clone(), db0.clone()
    lce_matmul.dweight_rows(d, x, c, row0, dw, db)
    torch.testing.assert_close(dw, dw0 + d[:live].t() @ x[:live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db0 + d[:live].sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count,row0", [(127, 0), (128, 0), (129, 0), (300, 0), (200, 128), (0, 0)])
def test_rows_matmul_kernels_at_the_gpu_tiles(count, row0, monkeypatch):
    """The three modes with the tiles a GPU launches (FASTLM_GPU_TILES: float32 128 x 64 x 32,
    GROUP_M 8, a partial group) at the 128-row tile edge: a live count inside, at and past a
    row-tile, and a chunk starting at sorted row 128. (float32: the interpreter's bfloat16
    dot is not a reference.)"""
    from fastlm.kernels import launch
    monkeypatch.setenv(launch.GPU_TILES_ENV, "1")
    g = torch.Generator().manual_seed(count + 3 * row0)
    r, h, v = 300, 72, 200
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in ((r, h), (v, h), (v,)))
    c = torch.tensor([count], device=DEVICE)
    live = max(0, min(count - row0, r))
    tol = dict(rtol=1e-4, atol=1e-4)
    out = lce_matmul.logits_rows(x, w, b, c, row0)
    torch.testing.assert_close(out[:live], x[:live] @ w.t() + b, **tol)
    d = torch.randn(r, v, generator=g).to(DEVICE)
    dx = torch.full((r, h), float("nan"), device=DEVICE)
    lce_matmul.dx_rows(d, w, c, row0, dx)
    torch.testing.assert_close(dx[:live], d[:live] @ w, **tol)
    assert (dx[live:] == 0).all()
    dw0, db0 = torch.randn(v, h, generator=g).to(DEVICE), torch.randn(v, generator=g).to(DEVICE)
    dw, db = dw0.clone(), db0.clone()
    lce_matmul.dweight_rows(d, x, c, row0, dw, db)
    torch.testing.assert_close(dw, dw0 + d[:live].t() @ x[:live], **tol)
    torch.testing.assert_close(db, db0 + d[:live].sum(0), **tol)


@pytest.mark.parametrize("count,row0", [(9, 0), (3, 8), (0, 0), (20, 0)])
def test_loss_kernels_limit(count, row0):
    """The cross-entropy kernels' LIMIT: rows past the count get zeros (loss, lse, coef,
    argmax) and their gradient rows are left unwritten; live rows as without the limit."""
    from fastlm.kernels import cross_entropy as K
    g = torch.Generator().manual_seed(count + row0)
    x = torch.randn(12, 40, generator=g).to(DEVICE)
    t = torch.randint(0, 40, (12,), generator=g).to(DEVICE)
    limit = (torch.tensor([count], device=DEVICE), row0)
    live = max(0, min(count - row0, 12))
    full = K.cross_entropy_fwd_bwd(x, t, None, -100, 0.0, 0.0, 0.0, torch.ones(12, device=DEVICE), stats=True)
    grad = torch.full_like(x, float("nan"))
    part = K.cross_entropy_fwd_bwd(x.clone(), t, None, -100, 0.0, 0.0, 0.0, torch.ones(12, device=DEVICE),
                                   out=grad, stats=True, limit=limit)
    for a, r in zip(part[:3] + part[4:], full[:3] + full[4:]):
        torch.testing.assert_close(a[:live], r[:live])
        assert (a[live:] == 0).all()
    torch.testing.assert_close(grad[:live], full[3][:live])
    assert grad[live:].isnan().all()
    fwd = K.cross_entropy_fwd(x, t, None, -100, 0.0, 0.0, 0.0, stats=True, limit=limit)
    for a, r in zip(fwd, full[:3] + full[4:]):
        torch.testing.assert_close(a[:live], r[:live])
        assert (a[live:] == 0).all()
    grad2 = torch.full_like(x, float("nan"))
    K.cross_entropy_bwd(torch.ones(12, device=DEVICE), x, t, None, full[1], full[2], -100, 0.0, 0.0, out=grad2,
                        limit=limit)
    torch.testing.assert_close(grad2[:live], full[3][:live])
    assert grad2[live:].isnan().all()


_VARIANTS = """
import json
from fastlm.kernels import cross_entropy, lce_matmul
rows = []
for family in (cross_entropy, lce_matmul):
    for kernel, sig, const, _ in family.gpu_compile_variants():
        rows.append([kernel.__name__, [[p.name, bool(p.is_constexpr)] for p in kernel.params], sorted(sig),
                     {k: v for k, v in const.items() if isinstance(v, (bool, int))}, sig.get("A")])
print(json.dumps(rows))
"""

# The unit strides of each row-limited matmul's operands, as its launchers pass them.
_UNIT_STRIDES = {lce_matmul.LOGITS: {"stride_ak", "stride_bk", "stride_cn"},
                 lce_matmul.DX: {"stride_ak", "stride_bn", "stride_cn"},
                 lce_matmul.DWEIGHT: {"stride_am", "stride_bn", "stride_cn"}}


def test_compile_variants_name_every_parameter():
    """kernels/compile_check.py compiles gpu_compile_variants() through
    triton.compile(ASTSource(...)), which does not apply a kernel's default constexprs: one left
    out (the loss kernels' LIMIT, the fused kernel's STATS) fails that variant with "'NoneType'
    object has no attribute '_unflatten_ir'" for every target, though a launch, which applies
    the defaults, runs. So every parameter must be named: the runtime ones in the signature,
    the constexprs among the constants. The bf16 row-limited matmuls take their operands'
    unit strides as constants, as a launch on contiguous tensors specialises them. (A
    subprocess: the interpreter's kernels have no parameter list.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _VARIANTS], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.splitlines()[-1])
    assert {r[0] for r in rows} == {"_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel",
                                    "_cross_entropy_fwd_bwd_kernel", "_rows_matmul_kernel"}
    for name, params, sig, const, a in rows:
        for param, is_constexpr in params:
            assert param in (const if is_constexpr else set(sig) | set(const)), (name, param, const)
        if name == "_rows_matmul_kernel" and a == "*bf16":
            assert all(const.get(s) == 1 for s in _UNIT_STRIDES[const["MODE"]]), const


# ----------------------------------------------------------------------------- arguments

def test_stats_refuses_probability_targets_and_bad_skip():
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ArgumentError, match="probabilit"):
        fastlm.linear_cross_entropy_with_stats(x, w, torch.softmax(torch.randn(4, 6, device=DEVICE), -1))
    with pytest.raises(TypeError, match="skip_ignored"):
        fastlm.linear_cross_entropy(x, w, torch.randint(0, 6, (4,), device=DEVICE), skip_ignored="yes")


def test_stats_loss_equals_the_plain_op():
    """The with-stats loss and gradients are exactly linear_cross_entropy's (same kernels)."""
    x, w, _, t = _inputs(30, 12, 40, ignored=0.3, seed=4)
    for backend in BACKENDS:
        with fastlm.use_backend(backend):
            a = fastlm.linear_cross_entropy(x, w, t, chunk_size=8, z_loss=1e-3)
            b, _ = fastlm.linear_cross_entropy_with_stats(x, w, t, chunk_size=8, z_loss=1e-3)
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_captured_in_a_cuda_graph_with_skipped_rows(dtype):
    """No host sync on a GPU: the fused lm-head + loss with 85% ignored targets, forward and
    gradients (computed in the forward for "mean"), captures in a CUDA graph; a replay on new
    hidden states and new ignored positions gives the float64 loss, gradients and accuracy."""
    x, w, _, t = _inputs(512, 64, 1000, ignored=0.85, seed=9, dtype=dtype)
    xs = x.detach().requires_grad_(True)

    def step():
        loss, stats = fastlm.linear_cross_entropy_with_stats(xs, w, t, chunk_size=128)
        (dx,) = torch.autograd.grad(loss, [xs])
        return loss, stats, dx

    with fastlm.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile outside the capture
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, stats, dx = step()
        x2, _, _, t2 = _inputs(512, 64, 1000, ignored=0.85, seed=10, dtype=dtype)
        xs.data.copy_(x2)
        t.copy_(t2)
        graph.replay()
        torch.cuda.synchronize()
    ref, leaves, (_, _, acc) = _oracle(x2, w, None, t2, None, "mean")
    (rdx,) = torch.autograd.grad(ref, leaves[:1])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(dx.double(), rdx, **tol)
    assert float(stats.accuracy) == pytest.approx(float(acc), abs=5e-2 if dtype == torch.bfloat16 else 1e-6)  # (bf16 logits: near-ties may flip)


def test_logits_rows_are_padded_to_aligned_rows():
    """An odd vocabulary (GPT-2's 50257 is odd): the logits chunk, later the gradient d that dx
    and dW read, has rows 64 elements apart at least (16-byte aligned), values unchanged."""
    x, w = torch.randn(20, 16, device=DEVICE), torch.randn(33, 16, device=DEVICE)
    out = lce_matmul.logits_rows(x, w, None, torch.tensor([20], device=DEVICE), 0)
    assert out.shape == (20, 33) and out.stride() == (64, 1)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-5)
