"""fastlm.cross_entropy_with_stats: the loss as fastlm.cross_entropy's, and its statistics
(per-row logsumexp, the z-loss term, the accuracy) against torch in float64, from the one
kernel pass (the STATS variant), with no host sync."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.kernels import cross_entropy as ce_kernels
from fastlm.ops import cross_entropy_stats as stats_ops

from .conftest import DEVICE
from .test_cross_entropy import oracle

# (backend, logits dtype): the reference in float64, the Triton kernel in fp32 and fp16.
CASES = [("torch", torch.float64), ("triton", torch.float32), ("triton", torch.float16)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 5.0},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 3.0, "ignore_index": 7},
]


def _ids(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "plain"


def _inputs(n, c, dtype, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 2.0).to(DEVICE, dtype)
    t = torch.randint(0, c, (n,), generator=g).to(DEVICE)
    t[::3] = x.double().argmax(-1)[::3]  # some rows right, so the accuracy is neither 0 nor 1
    t[1::5] = ignore_index
    return x, t


def stats_oracle(x, t, weight, ignore_index, reduction, z_loss, softcap):
    """torch in float64: logsumexp and argmax of the capped logits, z-loss rows reduced as the loss."""
    x = x.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(x, dim=-1)
    counted = t != ignore_index
    z_rows = torch.where(counted, z_loss * lse * lse, 0.0)
    if reduction == "none":
        z = z_rows
    elif reduction == "sum":
        z = z_rows.sum()
    else:
        w = weight.double()[torch.where(counted, t, 0)] if weight is not None else torch.ones_like(lse)
        z = z_rows.sum() / (w * counted).sum()
    accuracy = ((x.argmax(-1) == t) & counted).sum().double() / counted.sum().clamp_min(1)
    return lse, z, accuracy


@pytest.mark.parametrize("backend,dtype", CASES, ids=[f"{b}-{d}".replace("torch.", "") for b, d in CASES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_loss_and_stats_against_torch(backend, dtype, reduction, options):
    options = dict(options)
    ignore_index = options.pop("ignore_index", -100)
    n, c = 23, 41
    x, t = _inputs(n, c, dtype, ignore_index)
    weight = torch.rand(c, device=DEVICE, dtype=dtype) + 0.5 if options.pop("weight", False) else None
    xl = x.clone().requires_grad_(True)
    with fastlm.use_backend(backend):
        loss, stats = fastlm.cross_entropy_with_stats(xl, t, weight, ignore_index=ignore_index,
                                                      reduction=reduction, **options)
        plain = fastlm.cross_entropy(x.clone().requires_grad_(True), t, weight, ignore_index=ignore_index,
                                     reduction=reduction, **options)
    ref = oracle(x.double(), t, weight.double() if weight is not None else None, ignore_index=ignore_index,
                 reduction=reduction, **options)
    tol = TOL[dtype]
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(loss, plain, **tol)  # (on "torch" the plain call may be F.cross_entropy)
    lse, z, accuracy = stats_oracle(x, t, weight, ignore_index, reduction, options.get("z_loss", 0.0),
                                    options.get("softcap"))
    assert stats.lse.shape == (n,) and stats.lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(stats.lse.double(), lse, **tol)
    assert stats.z_loss.shape == z.shape
    torch.testing.assert_close(stats.z_loss.double(), z, **tol)
    assert stats.accuracy.dtype == torch.float32 and stats.accuracy.shape == ()
    assert 0 < float(accuracy) < 1
    assert float(stats.accuracy) == pytest.approx(float(accuracy), abs=1e-7)
    assert not (stats.lse.requires_grad or stats.z_loss.requires_grad or stats.accuracy.requires_grad)
    # Gradients flow through the loss alone, as fastlm.cross_entropy's.
    dloss = torch.randn(loss.shape, device=DEVICE, dtype=dtype)
    (grad,) = torch.autograd.grad(loss, [xl], dloss)
    xp = x.clone().requires_grad_(True)
    with fastlm.use_backend(backend):
        plain = fastlm.cross_entropy(xp, t, weight, ignore_index=ignore_index, reduction=reduction, **options)
    (grad_plain,) = torch.autograd.grad(plain, [xp], dloss)
    torch.testing.assert_close(grad, grad_plain, **tol)


@pytest.mark.parametrize("backend,dtype", CASES[:2], ids=["torch", "triton"])
def test_z_loss_term_is_the_loss_difference(backend, dtype):
    """stats.z_loss is exactly the z-loss's share of the loss (the mean's weighted divisor too)."""
    x, t = _inputs(19, 33, dtype)
    weight = torch.rand(33, device=DEVICE, dtype=dtype) + 0.5
    with fastlm.use_backend(backend):
        loss, stats = fastlm.cross_entropy_with_stats(x, t, weight, z_loss=0.05)
        base = fastlm.cross_entropy(x, t, weight)
    torch.testing.assert_close(loss - base, stats.z_loss, **TOL[dtype])
    assert float(stats.z_loss) > 0


def _argmax(x, backend, softcap=0.0):
    """The op's per-row argmax (its fourth output)."""
    t = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    with fastlm.use_backend(backend):
        out = stats_ops._stats_body(x, t, None, -100, 0.0, 0.0, softcap)
    assert out[3].dtype == torch.int32
    return out[3].long(), out[1]


@pytest.mark.parametrize("c", [15, 16, 17, 32, 33, 53])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_argmax_and_lse_at_vocabulary_block_edges(monkeypatch, backend, c):
    """With MAX_BLOCK_C 16 the kernel walks the row in several chunks: the max placed at each
    chunk's first and last class, and the row's last class, is found, with the row's lse."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_C", 16)
    positions = sorted({p for b in range(0, c, 16) for p in (b, min(b + 15, c - 1))} | {c - 1})
    x = torch.randn(len(positions), c, device=DEVICE)
    for r, p in enumerate(positions):
        x[r, p] = 10.0
    arg, lse = _argmax(x, backend)
    assert arg.tolist() == positions
    torch.testing.assert_close(lse, torch.logsumexp(x.double(), -1).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_argmax_ties_take_the_first_index(monkeypatch, backend):
    """Ties: the first index of the max wins, as torch.argmax, within a chunk and across chunks
    (a later chunk's equal max does not replace it); a row of -inf gives 0, as torch."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_C", 16)
    c = 40
    x = torch.randn(6, c, device=DEVICE)
    x[0] = 1.0                        # all equal: 0
    x[1, [5, 9]] = 7.0                # the same chunk
    x[2, [3, 20, 35]] = 7.0           # three chunks
    x[3, [15, 16]] = 7.0              # either side of a chunk edge
    x[4] = float("-inf")              # nothing but -inf: 0
    x[5, :16] = float("-inf")         # a first chunk of -inf, then a tie in the next ones
    x[5, [18, 33]] = 7.0
    arg, _ = _argmax(x, backend)
    assert arg.tolist() == torch.argmax(x, -1).tolist() == [0, 5, 3, 15, 0, 18]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_ties_of_saturated_logits(backend):
    """The argmax is of the capped logits (tanh is monotonic, but saturation can tie what the
    raw logits order): the kernel and the reference agree with torch.argmax of the capped."""
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.5, -1.0, 0.25, 0.4]], device=DEVICE)
    arg, _ = _argmax(x, backend, softcap=2.0)
    assert arg.tolist() == torch.argmax(2.0 * torch.tanh(x / 2.0), -1).tolist() == [3, 0]


@pytest.mark.parametrize("backend,dtype", CASES[:2], ids=["torch", "triton"])
def test_all_rows_ignored(backend, dtype):
    """No counted row: accuracy 0, loss and z-loss term 0 for "mean" (fastlm's rule), no NaN."""
    x, _ = _inputs(5, 20, dtype)
    t = torch.full((5,), -100, device=DEVICE)
    with fastlm.use_backend(backend):
        loss, stats = fastlm.cross_entropy_with_stats(x, t, z_loss=1e-2)
    assert float(loss) == 0.0 and float(stats.z_loss) == 0.0 and float(stats.accuracy) == 0.0
    assert torch.isfinite(stats.lse).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shapes_of_1d_and_nd_inputs(backend):
    """(C,) gives a scalar lse; (N, C, d) gives lse shaped (N, d), as the loss with "none"."""
    x = torch.randn(3, 11, 4, device=DEVICE)
    t = torch.randint(0, 11, (3, 4), device=DEVICE)
    with fastlm.use_backend(backend):
        _, stats = fastlm.cross_entropy_with_stats(x, t)
        _, one = fastlm.cross_entropy_with_stats(x[0, :, 0], t[0, 0])
    torch.testing.assert_close(stats.lse, torch.logsumexp(x, 1), rtol=1e-5, atol=1e-5)
    expected = ((x.argmax(1) == t).float().mean())
    torch.testing.assert_close(stats.accuracy, expected, rtol=0, atol=1e-7)
    assert one.lse.shape == ()
    torch.testing.assert_close(one.lse, torch.logsumexp(x[0, :, 0], 0), rtol=1e-5, atol=1e-5)


def test_probability_targets_are_refused():
    x = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(fastlm.ArgumentError, match="probability targets"):
        fastlm.cross_entropy_with_stats(x, torch.softmax(x, -1))


def test_options_are_checked_as_cross_entropy():
    x, t = torch.randn(4, 6, device=DEVICE), torch.randint(0, 6, (4,), device=DEVICE)
    with pytest.raises(fastlm.ArgumentError, match="cross_entropy_with_stats: z_loss"):
        fastlm.cross_entropy_with_stats(x, t, z_loss=-1.0)
    with pytest.raises(fastlm.ArgumentError, match="reduction"):
        fastlm.cross_entropy_with_stats(x, t, reduction="avg")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_sync(monkeypatch, backend):
    """Every statistic is a device tensor formed without a Python scalar: with Tensor.item,
    tolist, bool, float and int made to raise (and the CPU-only target range check, the one
    documented host read, off), the call still completes."""
    x, t = _inputs(9, 37, torch.float32)
    x.requires_grad_(True)
    with fastlm.use_backend(backend):
        fastlm.cross_entropy_with_stats(x, t, z_loss=1e-3, softcap=4.0)  # compile outside the check
        monkeypatch.setattr(stats_ops, "check_targets_in_range", lambda *a: None)

        def sync(*a, **k):
            raise AssertionError("host sync")
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, sync)
        loss, stats = fastlm.cross_entropy_with_stats(x, t, weight=torch.ones(37, device=DEVICE), z_loss=1e-3,
                                                      softcap=4.0, label_smoothing=0.1)
        monkeypatch.undo()
    assert all(isinstance(v, torch.Tensor) and v.device == x.device for v in (loss, *stats))


def test_plain_cross_entropy_compiles_the_variant_without_stats(monkeypatch):
    """The plain call launches the forward kernel with STATS off (the variant it compiled
    before the stats existed); only cross_entropy_with_stats turns it on."""
    real = ce_kernels._cross_entropy_fwd_kernel
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["STATS"])
                return real[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(ce_kernels, "_cross_entropy_fwd_kernel", Spy())
    x, t = _inputs(4, 12, torch.float32)
    with fastlm.use_backend("triton"):
        fastlm.cross_entropy(x, t, z_loss=1e-3)
        assert seen == [False]
        fastlm.cross_entropy_with_stats(x, t)
        assert seen == [False, True]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    x, t = _inputs(5, 13, torch.float32)
    with fastlm.use_backend(backend):
        torch.library.opcheck(stats_ops._stats_op, (x.requires_grad_(True), t, None, -100, 0.1, 1e-3, 3.0))


@pytest.mark.gpu
def test_gpu_captured_in_a_cuda_graph():
    """No host sync: the call captures in a CUDA graph, and a replay on new logits gives their stats."""
    x, t = _inputs(64, 1000, torch.bfloat16)
    with fastlm.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile outside the capture
            fastlm.cross_entropy_with_stats(x, t, z_loss=1e-4)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, stats = fastlm.cross_entropy_with_stats(x, t, z_loss=1e-4)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    lse, z, accuracy = stats_oracle(x, t, None, -100, "mean", 1e-4, None)
    torch.testing.assert_close(stats.lse.double(), lse, rtol=1e-4, atol=1e-4)
    assert float(stats.accuracy) == pytest.approx(float(accuracy), abs=1e-6)
