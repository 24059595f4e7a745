"""The CPU path's memory: fastlm.cross_entropy holds no more than torch's F.cross_entropy, and
fastlm.linear_cross_entropy never holds the (N, C) logits.

cross_entropy: each call runs in a fresh process (a resident high-water mark cannot be taken
back within one), and what counts is the peak resident memory of one forward + backward above
what the process held just before it (the logits and targets already there). fastlm's call
must stay within torch's same call, and within its own budget, which is tighter: the reference
holds one (N, C) tensor beside the logits (the log-probabilities, then their gradient), two
with softcap, so an (N, C) one-hot or target-mass helper coming back would show even where
torch's three (N, C) tensors would still hide it.

linear_cross_entropy: every tensor an aten op returns during forward + backward is seen by a
dispatch mode (none may have N * C elements or more), and the torch allocator's peak, read from
the profiler, must be one chunk's logits and their log-probabilities beside dweight and its
scaled copy: no zero-filled (V, H) gradient for the op's internal outputs, no previous chunk's
logits still held while the next are formed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm
from fastlm.bench.runner import cpu_peak_memory_mib
from fastlm.ops import linear_cross_entropy as lce_ops

MiB = 2 ** 20
ROOT = Path(__file__).resolve().parents[1]

# One forward + backward in this process, its peak resident memory above the resident memory
# just before it (VmHWM reset through /proc/self/clear_refs; ru_maxrss where that fails).
_STEP = r"""
import json, resource, sys
import torch, torch.nn.functional as F
import fastlm

spec = json.loads(sys.argv[1])
n, c, opts = spec["n"], spec["c"], dict(spec["options"])
soft, weighted = opts.pop("soft", False), opts.pop("weighted", False)

def kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def call(x, t, w):
    if spec["impl"] == "torch":
        return F.cross_entropy(x, t, w, label_smoothing=opts.get("label_smoothing", 0.0))
    return fastlm.cross_entropy(x, t, w, **opts)

def inputs(rows, classes):
    x = torch.randn(rows, classes).requires_grad_(True)
    t = torch.softmax(torch.randn(rows, classes), -1) if soft else torch.randint(0, classes, (rows,))
    return x, t, (torch.rand(classes) + 0.5) if weighted else None

call(*inputs(8, 16)).backward()  # first-call work (imports, thread pools) before the measurement
torch.manual_seed(0)  # the same inputs in every process
x, t, w = inputs(n, c)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak = lambda: kib("VmHWM")
except OSError:
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = kib("VmRSS")
loss = call(x, t, w)
loss.backward()
print("STEP", json.dumps({"step_kib": peak() - before, "loss": loss.item()}))
"""

N, C = 2048, 32000
NC_MIB = N * C * 4 / MiB  # one (N, C) float32 tensor: 250 MiB
SLACK_MIB = 48  # row slices of a few MiB, per-row vectors, the C allocator's retained pages (one
# (N, C) helper more is 250 MiB: far past it)


def _step(impl: str, options: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # glibc: blocks of 1 MiB and more mapped and unmapped, never kept on the heap
               # after a free (its moving threshold would make the peak depend on history)
               MALLOC_MMAP_THRESHOLD_="1048576")
    spec = json.dumps({"impl": impl, "n": N, "c": C, "options": options})
    proc = subprocess.run([sys.executable, "-c", _STEP, spec], capture_output=True, text=True, env=env, timeout=120)
    for line in proc.stdout.splitlines():
        if line.startswith("STEP "):
            out = json.loads(line[5:])
            return {"step_mib": out["step_kib"] / 1024, "loss": out["loss"]}
    raise AssertionError(f"the {impl} step failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


# (fastlm's options, torch's call for the bound: the same without fastlm's extras, fastlm's own
# budget in (N, C) float32 tensors beside the logits)
CASES = {
    "plain": ({}, 3),  # torch's own path: its log-probabilities, their gradient, the logits' gradient
    "z_loss": ({"z_loss": 1e-4}, 1),
    "softcap_smoothing_weights": ({"softcap": 30.0, "label_smoothing": 0.1, "weighted": True}, 2),
    "soft_targets_z_loss": ({"soft": True, "label_smoothing": 0.1, "z_loss": 1e-4}, 1),
}


def _torch_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in ("soft", "weighted", "label_smoothing")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cross_entropy_cpu_peak_within_torchs():
    jobs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:  # processes, two at a time; each its own peak
        for name, (options, _) in CASES.items():
            jobs[name] = (pool.submit(_step, "fastlm", options), pool.submit(_step, "torch", _torch_options(options)))
        results = {name: (a.result(), b.result()) for name, (a, b) in jobs.items()}
    for name, (ours, theirs) in results.items():
        print(f"{name}: fastlm {ours['step_mib']:.0f} MiB, torch {theirs['step_mib']:.0f} MiB")
        budget = CASES[name][1]
        if "z_loss" not in CASES[name][0] and "softcap" not in CASES[name][0]:
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6), name
        assert ours["step_mib"] <= theirs["step_mib"] + SLACK_MIB, \
            f"{name}: fastlm's step peaks {ours['step_mib']:.0f} MiB above its start, torch's {theirs['step_mib']:.0f}"
        assert ours["step_mib"] <= budget * NC_MIB + SLACK_MIB, \
            f"{name}: fastlm's step peaks {ours['step_mib']:.0f} MiB above its start, over its budget of " \
            f"{budget} (N, C) tensors ({budget * NC_MIB:.0f} MiB): an (N, C) helper is back"


# ----------------------------------------------------------------------------- linear_cross_entropy

class _LargestTensor(TorchDispatchMode):
    """Records the most elements any aten op's tensor output had, and which op made it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


LCE_OPTIONS = [{}, {"z_loss": 1e-4, "label_smoothing": 0.1}, {"softcap": 20.0}, {"reduction": "none"},
               {"reduction": "sum", "weight": "class"}, {"chunk_size": 100}]


@pytest.mark.parametrize("options", LCE_OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_linear_cross_entropy_cpu_never_forms_the_logits(options):
    n, h, v = 2048, 64, 4096  # N * C = 8M elements, past the small-logits shortcut
    x = torch.randn(n, h, requires_grad=True)
    w = (torch.randn(v, h) / h ** 0.5).requires_grad_(True)
    t = torch.randint(0, v, (n,))
    t[::7] = -100
    options = dict(options)
    if options.get("weight") == "class":
        options["weight"] = torch.rand(v) + 0.5
    mode = _LargestTensor()
    with mode:
        loss = fastlm.linear_cross_entropy(x, w, t, **options)
        (loss if loss.dim() == 0 else loss.sum()).backward()
    assert mode.numel < n * v, f"{mode.op} made a tensor of {mode.numel} elements, N * C = {n * v}"
    # the default chunk on CPU: at least _CPU_MIN_CHUNK rows of logits, and no more than that
    rows = options.get("chunk_size") or max(lce_ops.default_chunk_size(n, h, v), lce_ops._CPU_MIN_CHUNK)
    assert mode.numel <= max(rows * v, v * h), (mode.op, mode.numel, rows * v)
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


# (tokens, hidden, vocab): chunks of logits that outweigh dweight (8 chunks of 8 MiB, dweight
# 2 MiB), and a dweight that outweighs one chunk (16 MiB, one chunk of 4 MiB)
@pytest.mark.parametrize("shape", [(2048, 64, 8192), (256, 1024, 4096)], ids=["chunks", "dweight"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_cpu_peak_is_one_chunk_beside_dweight(shape, reduction):
    n, h, v = shape
    x = torch.randn(n, h, requires_grad=True)
    w = (torch.randn(v, h) / h ** 0.5).requires_grad_(True)
    t = torch.randint(0, v, (n,))
    chunk = max(lce_ops.default_chunk_size(n, h, v), lce_ops._CPU_MIN_CHUNK)

    def step():
        loss = fastlm.linear_cross_entropy(x, w, t, reduction=reduction)
        (loss if loss.dim() == 0 else loss.sum()).backward()
        x.grad = w.grad = None

    step()
    peak = cpu_peak_memory_mib(step)
    dweight, logits, inputs = v * h * 4 / MiB, chunk * v * 4 / MiB, n * h * 4 / MiB
    # dweight beside one chunk of logits (their log-probabilities and gradient formed in place);
    # dx and a copy; 1 MiB for per-row vectors. A second (R, C) tensor per chunk (the previous
    # chunk's logits still held, or log-probabilities beside the logits), a scaled copy of
    # dweight for an upstream gradient of 1, or a zero-filled (V, H) gradient for the op's
    # unused outputs, is over.
    budget = dweight + logits + 3 * inputs + 1
    assert peak <= budget, f"peak {peak:.1f} MiB > {budget:.1f} MiB (dweight {dweight:.0f}, a chunk {logits:.0f})"
    if n * v >= 4 * v * h:  # (where the logits outweigh the weight) below the (N, C) logits alone
        assert peak < n * v * 4 / MiB


# ----------------------------------------------------------------------------- the in-place reference

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3},
                                     {"label_smoothing": 0.2, "z_loss": 1e-3, "weighted": True}, {"weighted": True}],
                         ids=lambda o: ",".join(o) or "plain")
def test_in_place_fwd_bwd_matches_the_two_pass_reference(dtype, options):
    """ref.cross_entropy_rows_fwd_bwd (the CPU chunks' path: the logits overwritten) against
    cross_entropy_rows then cross_entropy_rows_bwd on a copy, special rows included: a -inf
    logit, a -inf target logit, a row with +inf, a row of -inf only, a NaN, an ignored row, a
    target out of range; odd sizes; finite results equal to rounding, NaN and inf where theirs are."""
    from fastlm.reference import cross_entropy as ref

    rows, classes = 37, 113
    opts = dict(options)
    weight = torch.rand(classes, dtype=dtype) + 0.5 if opts.pop("weighted", False) else None
    if weight is not None:
        weight[3] = 0.0  # a zero class weight meets a -inf logit below
    eps, z = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0)
    logits = torch.randn(rows, classes, dtype=dtype) * 4
    target = torch.randint(0, classes, (rows,))
    logits[0, 3] = float("-inf")
    logits[1, target[1]] = float("-inf")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    logits[4, 7] = float("nan")
    target[5] = -100
    target[6] = classes + 2
    dloss = torch.randn(rows, dtype=dtype)
    loss, lse, coef = ref.cross_entropy_rows(logits, target, weight, -100, eps, z, 0.0)
    grad = ref.cross_entropy_rows_bwd(dloss, logits, target, weight, lse, coef, -100, eps, 0.0)
    work = logits.clone()
    assert ref.fwd_bwd_in_place(work, target, 0.0)
    got = ref.cross_entropy_rows_fwd_bwd(dloss, work, target, weight, -100, eps, z)
    assert got[3].data_ptr() == work.data_ptr()  # formed over the logits
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    # The row holding +inf: NaN across its gradient, as torch's (log_softmax's backward); the
    # two-pass reference's is NaN at the +inf only. Every other element agrees.
    assert got[3][2].isnan().all()
    grad[2] = float("nan")
    for name, a, b in zip(("loss", "lse", "coef", "grad"), got, (loss, lse, coef, grad)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    # the loss alone: the same loss, no gradient
    work = logits.clone()
    alone = ref.cross_entropy_rows_fwd_bwd(None, work, target, weight, -100, eps, z)
    assert alone[3] is None
    torch.testing.assert_close(alone[0], loss, rtol=tol, atol=tol, equal_nan=True)
    # what it takes: float32/float64 logits, class indices, no softcap
    assert not ref.fwd_bwd_in_place(logits.half(), target, 0.0)
    assert not ref.fwd_bwd_in_place(logits, target, 30.0)
    assert not ref.fwd_bwd_in_place(logits, torch.softmax(logits.nan_to_num(0, 0, 0), -1), 0.0)


def test_linear_cross_entropy_cpu_retain_graph_after_handing_dweight_on():
    """An upstream gradient of 1 hands the precomputed dweight on without a copy: a second
    backward (retain_graph) must still see the unscaled gradients, and a weight.grad zeroed
    in place between the two must not change what the second one adds."""
    n, h, v = 512, 32, 2048
    x = torch.randn(n, h, requires_grad=True)
    w = (torch.randn(v, h) / h ** 0.5).requires_grad_(True)
    t = torch.randint(0, v, (n,))
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    torch.nn.functional.cross_entropy(xr @ wr.t(), t).backward()
    fastlm.linear_cross_entropy(x, w, t).backward()  # handed on as formed
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    x.grad = w.grad = None
    loss = fastlm.linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    first_w, first_x = w.grad.clone(), x.grad.clone()
    w.grad.zero_()
    x.grad.zero_()
    loss.backward()
    torch.testing.assert_close(w.grad, first_w, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, first_x, rtol=0, atol=0)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    # and a scaled loss: the gradients scaled, the saved ones untouched
    (fastlm.linear_cross_entropy(x, w, t) * 3.0).backward()
    torch.testing.assert_close(w.grad.double(), 4 * wr.grad, rtol=1e-4, atol=1e-6)
