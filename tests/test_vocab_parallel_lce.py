"""The vocabulary-parallel lm-head + loss (fastlm.ops.vocab_parallel.linear_cross_entropy): the
head's rows sharded over 2 and 3 gloo processes on CPU give one process's
fastlm.linear_cross_entropy (loss; dx in full, dW and dbias block by block) and
fastlm.cross_entropy_with_stats on the full logits (lse, z-loss term, accuracy against the
global argmax), float64, every option that makes sense sharded, chunks that split N unevenly
and one chunk for all.

One spawn per world size runs every case in each worker (as tests/test_vocab_parallel_ce.py);
a worker raises on a mismatch and torch.multiprocessing.spawn re-raises it here."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlm
from fastlm.errors import ArgumentError, ArgumentTypeError
from fastlm.ops import vocab_parallel as vp

from .test_vocab_parallel_ce import _free_port

ROWS, HIDDEN = 13, 8
CASES = [
    dict(),
    dict(bias=True),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(ignore_index=4),
    dict(weight=True),
    dict(bias=True, weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=2.5, ignore_index=4),
    dict(all_ignored=True, z_loss=1e-2),
    dict(all_ignored=True, weight=True, bias=True),
]
REDUCTIONS = ("none", "sum", "mean")
CHUNKS = (5, None, 64)  # 13 rows: 5 + 5 + 3; the default (one chunk on CPU); one chunk larger than N


def _inputs(classes: int, boundary: int, options: dict, seed: int):
    """x (N, H), the full head (C, H) with a strong class at ``boundary`` (the first of rank 1's
    block: the global argmax of many rows lies there, off rank 0), targets (some rows their
    argmax, one the last class), bias, class weights, the upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64)
    w_head = torch.randn(classes, HIDDEN, generator=g, dtype=torch.float64)
    w_head[boundary] *= 4
    x[1] = w_head[boundary] * (3 / w_head[boundary].norm())  # (row 1 surely: never an ignored row)
    b = torch.randn(classes, generator=g, dtype=torch.float64) if options.get("bias") else None
    t = torch.randint(0, classes, (ROWS,), generator=g)
    logits = x @ w_head.t() + (b if b is not None else 0)
    cap = options.get("softcap")
    t[1::2] = (cap * torch.tanh(logits / cap) if cap else logits).argmax(-1)[1::2]  # right on half the rows
    t[0] = classes - 1  # the last block's edge
    ignore_index = options.get("ignore_index", -100)
    if "ignore_index" in options:
        t[::3] = ignore_index
    if options.get("all_ignored"):
        t[:] = ignore_index
    cw = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5 if options.get("weight") else None
    dy = torch.randn(ROWS, generator=g, dtype=torch.float64)
    return x, w_head, b, t, cw, dy


def _backward(loss, dy, reduction, **kw):
    (loss * dy).sum().backward(**kw) if reduction == "none" else (loss * dy[0]).backward(**kw)


def _close(got, want, what, name, **kw):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}, {what}: {m}", **kw)


def _check_layout(rank: int, group, sizes: list[int], cases, seed: int) -> int:
    classes = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for options in cases:
        for reduction in REDUCTIONS:
            for chunk in CHUNKS:
                seed += 1
                x, w_head, b, t, cw, dy = _inputs(classes, sizes[0], options, seed)
                ignore_index = options.get("ignore_index", -100)
                kw = {k: options[k] for k in ("label_smoothing", "z_loss", "softcap") if k in options}
                # one process, the whole head
                xf, wf = x.clone().requires_grad_(), w_head.clone().requires_grad_()
                bf = b.clone().requires_grad_() if b is not None else None
                want = fastlm.linear_cross_entropy(xf, wf, t, linear_bias=bf, weight=cw, reduction=reduction,
                                                   ignore_index=ignore_index, **kw)
                _backward(want, dy, reduction)
                with torch.no_grad():
                    logits = x @ w_head.t() + (b if b is not None else 0)
                _, want_stats = fastlm.cross_entropy_with_stats(logits, t, cw, ignore_index=ignore_index,
                                                                reduction=reduction, **kw)
                if not options.get("all_ignored"):  # some counted row's global argmax is off rank 0, at its edge
                    assert ((logits.argmax(-1) == t) & (t == sizes[0])).any()
                # this rank's block of the head's rows
                xs, ws = x.clone().requires_grad_(), w_head[lo:hi].clone().requires_grad_()
                bs = b[lo:hi].clone().requires_grad_() if b is not None else None
                cws = cw[lo:hi] if cw is not None else None
                got, stats = fastlm.linear_cross_entropy_with_stats(  # the public call, process_group given
                    xs, ws, t, linear_bias=bs, weight=cws, ignore_index=ignore_index, reduction=reduction,
                    chunk_size=chunk, process_group=group, **kw)
                plain = fastlm.linear_cross_entropy(xs.detach(), ws.detach(), t, linear_bias=bs, weight=cws,
                                                    ignore_index=ignore_index, reduction=reduction, chunk_size=chunk,
                                                    process_group=group, **kw)
                assert torch.equal(plain, got.detach())
                _backward(got, dy, reduction, retain_graph=True)
                what = f"rank {rank} sizes {sizes} {options} {reduction} chunk {chunk}"
                assert got.dtype == torch.float64 and got.shape == want.shape, what
                _close(got, want, what, "loss")
                _close(stats.lse, want_stats.lse, what, "lse")
                _close(stats.z_loss, want_stats.z_loss, what, "z_loss term")
                torch.testing.assert_close(stats.accuracy, want_stats.accuracy, rtol=0, atol=0,
                                           msg=lambda m: f"accuracy, {what}: {m}")
                if not options.get("all_ignored"):
                    assert 0 < float(want_stats.accuracy) < 1, what  # the targets make it say something
                _close(xs.grad, xf.grad, what, "dx (full, all-reduced)")
                _close(ws.grad, wf.grad[lo:hi], what, "dW block")
                if b is not None:
                    _close(bs.grad, bf.grad[lo:hi], what, "dbias block")
                if options.get("all_ignored"):
                    assert float(got.detach().abs().sum()) == 0.0 and float(xs.grad.abs().sum()) == 0.0, what
                    assert float(stats.accuracy) == 0.0, what
                # a second backward through the kept graph adds the same gradients again
                _backward(got, dy, reduction)
                _close(xs.grad, 2 * xf.grad, what, "dx, second backward")
                _close(ws.grad, 2 * wf.grad[lo:hi], what, "dW, second backward")
                if b is not None:
                    _close(bs.grad, 2 * bf.grad[lo:hi], what, "dbias, second backward")
    return seed


def _worker(rank: int, world: int, init: str, layouts: list[list[int]]):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))  # a group passed explicitly, not only the default one
        seed = _check_layout(rank, group, layouts[0], CASES, 0)
        for sizes in layouts[1:]:  # further layouts over the same processes: the main options only
            seed = _check_layout(rank, group, sizes, [CASES[0], CASES[7]], seed)
        sizes = layouts[0]
        classes, lo, hi = sum(sizes), sum(sizes[:rank]), sum(sizes[:rank + 1])

        # (..., H) input, a loss of target's shape; only dW wanted (the input's gradient, and
        # its all-reduce, skipped on every rank); float32 close to float64
        x, w_head, _, t, _, _ = _inputs(classes, sizes[0], {}, 500)
        ws = w_head[lo:hi].clone().requires_grad_()
        got = vp.linear_cross_entropy(x.reshape(1, ROWS, HIDDEN), ws, t.reshape(1, ROWS), None, None, None, "none",
                                      0.0, 1e-2, None, 4, group)
        got.sum().backward()
        wf = w_head.clone().requires_grad_()
        want = fastlm.linear_cross_entropy(x, wf, t, reduction="none", z_loss=1e-2)
        want.sum().backward()
        assert got.shape == (1, ROWS)
        _close(got[0], want, "(1, N, H)", "loss")
        _close(ws.grad, wf.grad[lo:hi], "(1, N, H)", "dW block")
        xs32, ws32 = x.float().requires_grad_(), w_head[lo:hi].float().requires_grad_()
        got = vp.linear_cross_entropy(xs32, ws32, t, None, None, None, "mean", 0.1, 0.0, None, 5, group)
        got.backward()
        xf, wf = x.clone().requires_grad_(), w_head.clone().requires_grad_()
        fastlm.linear_cross_entropy(xf, wf, t, label_smoothing=0.1).backward()
        assert got.dtype == xs32.grad.dtype == ws32.grad.dtype == torch.float32
        torch.testing.assert_close(xs32.grad.double(), xf.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ws32.grad.double(), wf.grad[lo:hi], rtol=1e-4, atol=1e-6)

        # no gradient wanted: the loss alone, the same
        with torch.no_grad():
            got = vp.linear_cross_entropy(x, w_head[lo:hi], t, None, None, -100, "sum", 0.0, 0.0, 2.0, 5, group)
        _close(got, fastlm.linear_cross_entropy(x, w_head, t, reduction="sum", softcap=2.0), "no_grad", "loss")

        # the backward's recomputing path under a scalar loss (the Function called without the
        # forward's gradients): the same gradients as the forward would have formed
        for reduction in ("sum", "mean"):
            xs, ws = x.clone().requires_grad_(), w_head[lo:hi].clone().requires_grad_()
            cw = torch.rand(classes, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
            got = vp._VocabParallelLCE.apply(xs, ws, None, t, cw[lo:hi], -100, 0.1, 1e-2, 3.0, 5, reduction, False,
                                             False, group)[0]
            (got * 0.7).backward()
            xf, wf = x.clone().requires_grad_(), w_head.clone().requires_grad_()
            want = fastlm.linear_cross_entropy(xf, wf, t, weight=cw, reduction=reduction, label_smoothing=0.1,
                                               z_loss=1e-2, softcap=3.0)
            (want * 0.7).backward()
            _close(got, want, f"recompute {reduction}", "loss")
            _close(xs.grad, xf.grad, f"recompute {reduction}", "dx")
            _close(ws.grad, wf.grad[lo:hi], f"recompute {reduction}", "dW block")

        # a class index outside [0, C): that row NaN (loss and dx), the others exact
        t_bad = t.clone()
        t_bad[2] = classes
        xs, ws = x.clone().requires_grad_(), w_head[lo:hi].clone().requires_grad_()
        got = vp.linear_cross_entropy(xs, ws, t_bad, None, None, -100, "none", 0.0, 0.0, None, 5, group)
        got.sum().backward()
        assert torch.isnan(got[2]) and torch.isnan(xs.grad[2]).all()
        keep = torch.arange(ROWS) != 2
        xf = x[keep].clone().requires_grad_()
        want = fastlm.linear_cross_entropy(xf, w_head, t[keep], reduction="none")
        want.sum().backward()
        _close(got[keep], want, "bad target", "loss")
        _close(xs.grad[keep], xf.grad, "bad target", "dx")

        # arguments are checked, naming the one at fault (distributed initialised here)
        with pytest.raises(ArgumentError, match="linear_weight"):
            vp.linear_cross_entropy(x, w_head[lo:hi, :-1], t, None, None, None, "mean", 0.0, 0.0, None, None, group)
        dist.barrier(group)
    finally:
        dist.destroy_process_group()




@pytest.mark.parametrize("layouts", [[[9, 8]], [[6, 1, 10], [7, 0, 10]]],
                         ids=["world2-C17", "world3-C17-uneven-and-empty-block"])
def test_vocab_parallel_linear_cross_entropy_matches_one_process(layouts):
    init = f"tcp://127.0.0.1:{_free_port()}"
    world = len(layouts[0])
    mp.spawn(_worker, args=(world, init, layouts), nprocs=world, join=True)


def _lce_args(**over):
    args = dict(input=torch.randn(4, 8), linear_weight=torch.randn(3, 8), target=torch.tensor([0, 1, 2, 5]),
                linear_bias=None, weight=None, ignore_index=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                softcap=None, chunk_size=None, process_group=object())
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    (dict(), "torch.distributed is not initialized"),
    (dict(linear_weight=torch.randn(3, 7)), "linear_weight"),
    (dict(linear_weight=torch.randn(3, 8, dtype=torch.float64)), "linear_weight"),
    (dict(linear_weight=torch.randn(3, 2, 8)), "linear_weight"),
    (dict(linear_bias=torch.randn(4)), "linear_bias"),
    (dict(weight=torch.rand(5)), "weight"),
    (dict(target=torch.tensor([0, 1, 2])), "target"),
    (dict(target=torch.rand(4, 3)), "probability targets"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(reduction="avg"), "reduction"),
])
def test_linear_cross_entropy_arguments_checked(over, match):
    assert not dist.is_initialized()
    with pytest.raises((ArgumentError, ArgumentTypeError), match=match):
        vp.linear_cross_entropy(**_lce_args(**over))


def test_cross_entropy_with_stats_without_distributed_raises():
    assert not dist.is_initialized()
    with pytest.raises(ArgumentError, match="process_group"):
        vp.cross_entropy_with_stats(torch.randn(2, 3), torch.tensor([0, 1]), None, -100, "mean", 0.0, 0.0, None,
                                    object())
