"""fastlm.cross_entropy(..., process_group=): the classes sharded over 2 and 3 gloo processes
on CPU give one process's loss and, block by block, its gradient (float64, every option that
makes sense sharded). The blocks are contiguous in rank order and may differ in size (a
vocabulary not divisible by the world size; a block of one class, or of none).

One spawn per world size runs every case in each worker, which checks its own block of the
gradient against the single-process one (together: the whole gradient) and raises on a
mismatch; torch.multiprocessing.spawn re-raises it here with the worker's traceback."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlm
from fastlm.errors import ArgumentError
from fastlm.ops import vocab_parallel

CASES = [
    dict(),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.1, ignore_index=4),  # no smoothing share on an ignored row
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(ignore_index=4),
    dict(weight=True),
    dict(weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=2.5, ignore_index=4),
    dict(all_ignored=True),
    dict(all_ignored=True, weight=True, z_loss=1e-2),
]
REDUCTIONS = ("none", "sum", "mean")


def _inputs(classes: int, options: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = 13
    x = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, classes, (rows,), generator=g)
    ignore_index = options.get("ignore_index", -100)
    if "ignore_index" in options:
        t[::3] = ignore_index  # some rows ignored (4 is also an ordinary class elsewhere: not here)
    if options.get("all_ignored"):
        t[:] = ignore_index
    t[0] = classes - 1 if not options.get("all_ignored") else t[0]  # the last block's edge
    w = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5 if options.get("weight") else None
    dy = torch.randn(rows, generator=g, dtype=torch.float64)
    return x, t, w, dy


def _worker(rank: int, world: int, init: str, sizes: list[int]):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))  # a group passed explicitly, not only the default one
        classes = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        seed = 0
        for options in CASES:
            for reduction in REDUCTIONS:
                seed += 1
                x, t, w, dy = _inputs(classes, options, seed)
                kw = {k: options[k] for k in ("label_smoothing", "z_loss", "softcap", "ignore_index") if k in options}
                # one process, the whole vocabulary
                xf = x.clone().requires_grad_()
                want = fastlm.cross_entropy(xf, t, w, reduction=reduction, **kw)
                (want * dy).sum().backward() if reduction == "none" else (want * dy[0]).backward()
                # this rank's block
                xs = x[:, lo:hi].clone().requires_grad_()
                ws = w[lo:hi] if w is not None else None
                got = fastlm.cross_entropy(xs, t, ws, reduction=reduction, process_group=group, **kw)
                (got * dy).sum().backward() if reduction == "none" else (got * dy[0]).backward()
                what = f"rank {rank}/{world} sizes {sizes} {options} {reduction}"
                assert got.dtype == torch.float64, what
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"loss, {what}: {m}")
                torch.testing.assert_close(xs.grad, xf.grad[:, lo:hi], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"grad, {what}: {m}")
                if options.get("all_ignored"):
                    assert float(got.detach().abs().sum()) == 0.0 and float(xs.grad.abs().sum()) == 0.0, what

        # float32 logits: float32 loss and gradient, close to the float64 result
        x, t, w, dy = _inputs(classes, dict(label_smoothing=0.1), 100)
        xs = x[:, lo:hi].float().requires_grad_()
        got = fastlm.cross_entropy(xs, t, label_smoothing=0.1, process_group=group)
        got.backward()
        xf = x.clone().requires_grad_()
        fastlm.cross_entropy(xf, t, label_smoothing=0.1).backward()
        assert got.dtype == torch.float32 and xs.grad.dtype == torch.float32
        torch.testing.assert_close(xs.grad.double(), xf.grad[:, lo:hi], rtol=1e-4, atol=1e-6)

        # (N, C, d) input: the class dim second, as in one process
        g = torch.Generator().manual_seed(7)
        x3 = torch.randn(3, classes, 4, generator=g, dtype=torch.float64)
        t3 = torch.randint(0, classes, (3, 4), generator=g)
        xs3 = x3[:, lo:hi].clone().requires_grad_()
        got = fastlm.cross_entropy(xs3, t3, reduction="none", z_loss=1e-2, process_group=group)
        got.sum().backward()
        xf3 = x3.clone().requires_grad_()
        want = fastlm.cross_entropy(xf3, t3, reduction="none", z_loss=1e-2)
        want.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xs3.grad, xf3.grad[:, lo:hi], rtol=1e-10, atol=1e-12)

        # a class index outside [0, C): that row NaN (loss and gradient), the others exact
        x, t, _, _ = _inputs(classes, {}, 200)
        t[2] = classes
        xs = x[:, lo:hi].clone().requires_grad_()
        got = fastlm.cross_entropy(xs, t, reduction="none", process_group=group)
        got.sum().backward()
        assert torch.isnan(got[2]) and torch.isnan(xs.grad[2]).all()
        keep = torch.arange(len(t)) != 2
        xf = x[keep].clone().requires_grad_()
        want = fastlm.cross_entropy(xf, t[keep], reduction="none")
        want.sum().backward()
        torch.testing.assert_close(got[keep], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xs.grad[keep], xf.grad[:, lo:hi], rtol=1e-10, atol=1e-12)

        # masked logits: a -inf class costs nothing (not the target), a row with +inf or NaN is NaN
        for smoothing in (0.0, 0.1):
            x, t, _, _ = _inputs(classes, {}, 400)
            t[1:4] = 3
            x[1, 5] = x[1, classes - 2] = -torch.inf
            x[2, classes - 1] = torch.inf
            x[3, 0] = torch.nan
            xs = x[:, lo:hi].clone().requires_grad_()
            got = fastlm.cross_entropy(xs, t, reduction="none", label_smoothing=smoothing, process_group=group)
            got.sum().backward()
            xf = x.clone().requires_grad_()
            want = fastlm.cross_entropy(xf, t, reduction="none", label_smoothing=smoothing)
            want.sum().backward()
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)
            torch.testing.assert_close(xs.grad, xf.grad[:, lo:hi], rtol=1e-10, atol=1e-12, equal_nan=True)

        # the module: fastlm.nn.CrossEntropyLoss(process_group=), its weight buffer this rank's block
        x, t, w, _ = _inputs(classes, dict(weight=True), 300)
        module = fastlm.nn.CrossEntropyLoss(weight=w[lo:hi], label_smoothing=0.1, z_loss=1e-2, process_group=group)
        assert "vocab_parallel=True" in repr(module)
        xs = x[:, lo:hi].clone().requires_grad_()
        got = module(xs, t)
        got.backward()
        xf = x.clone().requires_grad_()
        want = fastlm.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, z_loss=1e-2)(xf, t)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xs.grad, xf.grad[:, lo:hi], rtol=1e-10, atol=1e-12)

        # cross_entropy_with_stats: one process's loss, gradient and statistics (lse, z-loss term,
        # accuracy against the GLOBAL argmax), every case; half the counted rows aimed at their argmax
        for options in CASES:
            for reduction in REDUCTIONS:
                seed += 1
                x, t, w, dy = _inputs(classes, options, seed)
                ignore_index = options.get("ignore_index", -100)
                aim = (torch.arange(len(t)) % 2 == 1) & (t != ignore_index)
                t = torch.where(aim, x.argmax(-1), t)
                kw = {k: options[k] for k in ("label_smoothing", "z_loss", "softcap", "ignore_index") if k in options}
                xf = x.clone().requires_grad_()
                want, want_stats = fastlm.cross_entropy_with_stats(xf, t, w, reduction=reduction, **kw)
                (want * dy).sum().backward() if reduction == "none" else (want * dy[0]).backward()
                xs = x[:, lo:hi].clone().requires_grad_()
                got, stats = fastlm.cross_entropy_with_stats(  # the public call, process_group given
                    xs, t, w[lo:hi] if w is not None else None, reduction=reduction, process_group=group, **kw)
                (got * dy).sum().backward() if reduction == "none" else (got * dy[0]).backward()
                what = f"stats, rank {rank}/{world} sizes {sizes} {options} {reduction}"
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"loss, {what}: {m}")
                torch.testing.assert_close(xs.grad, xf.grad[:, lo:hi], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"grad, {what}: {m}")
                for name in ("lse", "z_loss", "accuracy"):
                    torch.testing.assert_close(getattr(stats, name), getattr(want_stats, name), rtol=1e-10,
                                               atol=1e-12, msg=lambda m: f"{name}, {what}: {m}")
                assert not any(s.requires_grad for s in stats), what
                if not options.get("all_ignored"):
                    assert 0 < float(want_stats.accuracy) < 1, what

        # ties and block edges, row by row: the first index of the max wins wherever the blocks split
        b = sizes[0]  # the first class after rank 0's block (the next non-empty block's first)
        x, t, _, _ = _inputs(classes, {}, 600)
        crafted = [([b], b), ([b - 1, b], b), ([b - 1, b], b - 1), ([b, b + 1], b + 1), ([0, classes - 1], classes - 1),
                   ([0, classes - 1], 0), ([classes - 1], classes - 1), ([b, classes - 1], classes - 1)]
        for row, (peaks, target) in enumerate(crafted):
            x[row, peaks] = 50.0
            t[row] = target
        for row in range(len(crafted)):
            for softcap in (None, 4.0):  # (capping keeps the ties and makes none)
                _, want_stats = fastlm.cross_entropy_with_stats(x[row:row + 1], t[row:row + 1], softcap=softcap)
                _, stats = vocab_parallel.cross_entropy_with_stats(x[row:row + 1, lo:hi], t[row:row + 1], None, -100,
                                                                   "mean", 0.0, 0.0, softcap, group)
                assert float(stats.accuracy) == float(want_stats.accuracy), (row, crafted[row], softcap, sizes)
                torch.testing.assert_close(stats.lse, want_stats.lse, rtol=1e-10, atol=1e-12)
        _, want_stats = fastlm.cross_entropy_with_stats(x, t, reduction="none")
        _, stats = vocab_parallel.cross_entropy_with_stats(x[:, lo:hi], t, None, -100, "none", 0.0, 0.0, None, group)
        assert float(stats.accuracy) == float(want_stats.accuracy) and stats.lse.shape == want_stats.lse.shape

        # masked logits: the statistics as one process's (+inf lse for a row with +inf, NaN with NaN)
        x, t, _, _ = _inputs(classes, {}, 400)
        t[1:4] = 3
        x[1, 5] = x[1, classes - 2] = -torch.inf
        x[2, classes - 1] = torch.inf
        x[3, 0] = torch.nan
        _, want_stats = fastlm.cross_entropy_with_stats(x, t, reduction="sum", z_loss=1e-2)
        _, stats = vocab_parallel.cross_entropy_with_stats(x[:, lo:hi], t, None, -100, "sum", 0.0, 1e-2, None, group)
        torch.testing.assert_close(stats.lse, want_stats.lse, rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(stats.z_loss, want_stats.z_loss, rtol=1e-10, atol=1e-12, equal_nan=True)

        # probability targets are refused, naming the argument
        try:
            fastlm.cross_entropy(xs, torch.softmax(xs.detach(), -1), process_group=group)
        except ArgumentError as e:
            assert "process_group" in str(e)
        else:
            raise AssertionError("probability targets with process_group did not raise")
        dist.barrier(group)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sizes", [[9, 8], [6, 1, 10], [20, 0, 30]],
                         ids=["world2-C17", "world3-C17-uneven", "world3-C50-empty-block"])
def test_vocab_parallel_matches_one_process(sizes):
    init = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_worker, args=(len(sizes), init, sizes), nprocs=len(sizes), join=True)


def test_process_group_without_distributed_raises():
    assert not dist.is_initialized()
    with pytest.raises(ArgumentError, match="process_group"):
        fastlm.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), process_group=object())


def test_patched_module_has_no_process_group_and_unpatch_removes_it():
    """fastlm.patch gives a swapped torch CrossEntropyLoss process_group=None (one process),
    and unpatch takes it off again: the module's state stays torch's."""
    net = torch.nn.Sequential(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    before = set(net[0].__dict__)
    fastlm.patch(net)
    assert net[0].process_group is None
    x, t = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 5, 2, 1])
    torch.testing.assert_close(net[0](x, t), torch.nn.functional.cross_entropy(
        x, t, label_smoothing=0.1))
    fastlm.unpatch(net)
    assert set(net[0].__dict__) == before
