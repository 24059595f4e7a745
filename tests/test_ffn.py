"""fastlm.linear, fastlm.feed_forward and their modules against a float64 oracle.

The oracle is fastlm.reference.ffn in float64 differentiated by autograd; the yardstick is
torch's eager path in the test dtype (F.linear and torch's own activations). Matmuls add up
K (forward), N (dx) or M (dW) terms in another order than torch's: float32's summation floor
over the longest of them is allowed (fp32 accumulators whatever the input dtype).
Under the interpreter the matmul tiles are 16 x 16 x 16, so 15, 16, 17, 33 cross block edges.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import fastlm
from fastlm.reference import ffn as ref
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU

BACKENDS = ["torch", "triton"]
TORCH_ACT = {
    None: lambda z: z,
    "relu": torch.relu,
    "gelu": TF.gelu,
    "gelu_tanh": lambda z: TF.gelu(z, approximate="tanh"),
    "silu": TF.silu,
}
# The gated activations' gates as torch spells them, written out here rather than read off
# fastlm's GATED (a wrong entry there would otherwise be its own oracle).
TORCH_GATE = {
    "swiglu": TF.silu,
    "geglu": TF.gelu,
    "geglu_tanh": lambda z: TF.gelu(z, approximate="tanh"),
    "reglu": torch.relu,
}
ALL = list(fastlm.ops.ffn.ACTIVATIONS) + list(fastlm.ops.ffn.GATED)


def glu(z, gate, gate_order="gate_up"):
    """The gated unit by torch's F.glu definition, generalised to any gate activation: F.glu
    splits z into (a, b) and returns a * sigmoid(b), the first half the value ("up_gate");
    fastlm's default, "gate_up", is the other way round, act(first half) * second half."""
    a, b = z.chunk(2, dim=-1)
    return a * gate(b) if gate_order == "up_gate" else gate(a) * b


def eager_ffn(x, w_in, b_in, w_out, b_out, activation, gate_order="gate_up"):
    z = TF.linear(x, w_in, b_in)
    if activation in ref.GATED:
        h = glu(z, TORCH_GATE[activation], gate_order)
    else:
        h = TORCH_ACT[activation](z)
    return TF.linear(h, w_out, b_out)


def test_gated_names_are_torchs():
    """Every gated activation fastlm lists has its torch oracle here, and the value-first
    oracle is torch's own F.glu where F.glu applies (a sigmoid gate)."""
    assert set(TORCH_GATE) == set(fastlm.ops.ffn.GATED) == set(ref.GATED)
    z = torch.randn(5, 3, 2 * 7, dtype=torch.float64)
    torch.testing.assert_close(glu(z, torch.sigmoid, "up_gate"), TF.glu(z, dim=-1), rtol=0, atol=0)


def check(backend, fastlm_fn, torch_fn, inputs, terms):
    """fastlm_fn(*inputs) against torch_fn in float64 (oracle) and in the inputs' dtype (yardstick),
    forward and the gradient of every tensor input."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    with fastlm.use_backend(backend):
        out = fastlm_fn(*leaves)
    dout = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    present = [t for t in leaves if t is not None]
    got = torch.autograd.grad(out, present, dout)

    def run(cast):
        xs = [cast(t).detach().requires_grad_(True) if t is not None else None for t in inputs]
        o = torch_fn(*xs)
        return o, torch.autograd.grad(o, [t for t in xs if t is not None], cast(dout))

    ref64, ref_grads = run(lambda t: t.double())
    eager, eager_grads = run(lambda t: t)
    assert out.dtype == inputs[0].dtype and out.shape == ref64.shape
    assert_close(out, ref64, eager, "out", atol=summation_floor(ref64, torch.float32, terms))
    for i, (g, r, e) in enumerate(zip(got, ref_grads, eager_grads)):
        assert g.shape == r.shape and g.dtype == inputs[0].dtype
        assert_close(g, r, e, f"grad of input {i}", atol=summation_floor(r, torch.float32, terms))


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ----------------------------------------------------------------------------- linear

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("M,K,N", [(1, 7, 113), (33, 16, 17), (17, 15, 16), (113, 33, 7)])
def test_linear(backend, activation, M, K, N):
    x, w, b = rnd(M, K), rnd(N, K, scale=K ** -0.5), rnd(N)
    check(backend, lambda x, w, b: fastlm.linear(x, w, b, activation),
          lambda x, w, b: TORCH_ACT[activation](TF.linear(x, w, b)), [x, w, b], max(M, K, N))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_half(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bfloat16 casts truncate under the Triton interpreter: checked on a GPU")
    x, w, b = rnd(2, 19, 40, dtype=dtype), rnd(24, 40, dtype=dtype, scale=40 ** -0.5), rnd(24, dtype=dtype)
    check(backend, lambda x, w, b: fastlm.linear(x, w, b, "gelu"), lambda x, w, b: TF.gelu(TF.linear(x, w, b)),
          [x, w, b], 40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_no_bias_3d_and_views(backend):
    """A 3-D input that is a strided slice, a weight that is a transposed view, no bias."""
    wide = rnd(3, 11, 50)
    x = wide[:, :, 5:37]  # (3, 11, 32), not contiguous
    w = rnd(32, 20, scale=32 ** -0.5).t()  # (20, 32) view of a (32, 20) tensor
    assert not x.is_contiguous() and not w.is_contiguous()
    check(backend, lambda x, w: fastlm.linear(x, w, None, "silu"), lambda x, w: TF.silu(TF.linear(x, w)), [x, w],
          33)


# ----------------------------------------------------------------------------- feed_forward

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ALL)
@pytest.mark.parametrize("recompute", [False, True])
def test_feed_forward(backend, activation, recompute):
    M, D, H = 37, 24, 33
    rows = 2 * H if activation in ref.GATED else H
    inputs = [rnd(M, D), rnd(rows, D, scale=D ** -0.5), rnd(rows), rnd(D, H, scale=H ** -0.5), rnd(D)]
    check(backend, lambda *t: fastlm.feed_forward(*t, activation=activation, recompute=recompute),
          lambda *t: eager_ffn(*t, activation), inputs, max(M, D, H))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("M,D,H", [(1, 16, 16), (17, 15, 7), (16, 33, 17)])
def test_feed_forward_sizes_without_bias(backend, activation, M, D, H):
    rows = 2 * H if activation in ref.GATED else H
    x = rnd(2, M, D)  # 3-D
    w_in, w_out = rnd(rows, D, scale=D ** -0.5), rnd(D, H, scale=H ** -0.5)
    check(backend, lambda x, a, b: fastlm.feed_forward(x, a, None, b, None, activation),
          lambda x, a, b: eager_ffn(x, a, None, b, None, activation), [x, w_in, w_out], max(2 * M, D, H))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["geglu", "relu"])
def test_feed_forward_fp16_and_views(backend, activation):
    M, D, H = 21, 32, 24
    rows = 2 * H if activation in ref.GATED else H
    x = rnd(M, 2 * D, dtype=torch.float16)[:, ::2]  # every other column: a strided view
    w_in = rnd(D, rows, dtype=torch.float16, scale=D ** -0.5).t()
    w_out = rnd(D, H, dtype=torch.float16, scale=H ** -0.5)
    b_in, b_out = rnd(rows, dtype=torch.float16), rnd(D, dtype=torch.float16)
    check(backend, lambda *t: fastlm.feed_forward(*t, activation=activation),
          lambda *t: eager_ffn(*t, activation), [x, w_in, b_in, w_out, b_out], max(M, D, H))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(TORCH_GATE))
@pytest.mark.parametrize("gate_order", ["gate_up", "up_gate"])
@pytest.mark.parametrize("M,D,H,recompute", [(37, 24, 33, False), (17, 15, 16, True), (1, 7, 17, False),
                                             (16, 33, 15, False)])
def test_feed_forward_gate_order(backend, activation, gate_order, M, D, H, recompute):
    """Both halvings of a gated w_in against the float64 F.glu-style oracle, forward and every
    gradient: "up_gate" is value * act(gate) with the value rows first (F.glu, flash-attn's
    GatedMlp), "gate_up" act(gate) * value with the gate rows first. H of 15, 16, 17 and 33
    put the boundary between the halves (row H of w_in) inside, at and past a 16-row tile."""
    inputs = [rnd(M, D, scale=2.0), rnd(2 * H, D, scale=D ** -0.5), rnd(2 * H), rnd(D, H, scale=H ** -0.5), rnd(D)]
    check(backend, lambda *t: fastlm.feed_forward(*t, activation=activation, recompute=recompute,
                                                  gate_order=gate_order),
          lambda *t: eager_ffn(*t, activation, gate_order), inputs, max(M, D, H))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh"])
def test_up_gate_is_gate_up_with_the_halves_swapped(backend, activation):
    """gate_order="up_gate" on [W_u; W_g] is the default order on [W_g; W_u]: the same output,
    and w_in's (and b_in's) gradient with its halves swapped. The kernels swap which
    accumulator is the gate, so on the Triton backend the numbers are the same bits (but dx,
    dpre @ w_in, which adds up w_in's rows in their new order)."""
    M, D, H = 19, 17, 18
    x, wg, wu, bg, bu = rnd(M, D), rnd(H, D, scale=D ** -0.5), rnd(H, D, scale=D ** -0.5), rnd(H), rnd(H)
    w_out = rnd(D, H, scale=H ** -0.5)
    dy = rnd(M, D)
    results = {}
    for order, w_in, b_in in (("gate_up", torch.cat([wg, wu]), torch.cat([bg, bu])),
                              ("up_gate", torch.cat([wu, wg]), torch.cat([bu, bg]))):
        leaves = [t.clone().requires_grad_(True) for t in (x, w_in, b_in, w_out)]
        with fastlm.use_backend(backend):
            y = fastlm.feed_forward(leaves[0], leaves[1], leaves[2], leaves[3], None, activation, gate_order=order)
        dx, dw_in, db_in, dw_out = torch.autograd.grad(y, leaves, dy)
        if order == "up_gate":  # back to [gate; up]
            dw_in, db_in = torch.cat(dw_in.chunk(2)[::-1]), torch.cat(db_in.chunk(2)[::-1])
        results[order] = (y, dx, dw_in, db_in, dw_out)
    for name, a, b in zip(("y", "dx", "dw_in", "db_in", "dw_out"), results["gate_up"], results["up_gate"]):
        exact = backend == "triton" and name != "dx"
        torch.testing.assert_close(b, a, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5, msg=name)


SATURATING = [-math.inf, -1e4, -100.0, -30.0, -10.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 10.0, 30.0, 100.0, 1e4,
              math.inf]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_order", ["gate_up", "up_gate"])
def test_geglu_tanh_saturates_as_torch(backend, gate_order):
    """geglu_tanh where the tanh saturates (|gate| from 5 to 1e4) and at +-inf, against
    torch's F.gelu(approximate="tanh") in float64, forward and backward, element by element:
    x = [[1]] and d_model 1 make every pre-activation one weight (gate and up = w_in's
    rows), and w_in's and w_out's gradients elementwise products, so nothing is summed away.
    Finite where float64 is finite (1 and 0 for the derivative far out), and NaN exactly where
    it is NaN: gelu(-inf) = -inf * 0 and the derivative at +-inf, as torch gives."""
    gate = torch.tensor(SATURATING, device=DEVICE)
    H = gate.numel()
    up = rnd(H)
    halves = (gate, up) if gate_order == "gate_up" else (up, gate)
    x, w_in, w_out, dy = torch.ones(1, 1, device=DEVICE), torch.cat(halves)[:, None], rnd(1, H), rnd(1, 1)

    def grads(fn, cast):
        leaves = [cast(t).requires_grad_(True) for t in (x, w_in, w_out)]
        return torch.autograd.grad(fn(leaves[0], leaves[1], None, leaves[2], None), leaves[1:], cast(dy))

    with fastlm.use_backend(backend):
        got = grads(lambda *t: fastlm.feed_forward(*t, "geglu_tanh", gate_order=gate_order), lambda t: t.clone())
    want = grads(lambda *t: eager_ffn(*t, "geglu_tanh", gate_order), lambda t: t.double())
    # the yardstick: torch's float32 (its tanh-form derivative loses digits near gate -5)
    eager = grads(lambda *t: eager_ffn(*t, "geglu_tanh", gate_order), lambda t: t.clone())
    for name, g, r, e in zip(("w_in", "w_out"), got, want, eager):
        assert torch.equal(g.isnan(), r.isnan()), (name, g.flatten(), r.flatten())
        assert torch.equal(torch.isinf(g), torch.isinf(r)), (name, g.flatten(), r.flatten())
        ok = torch.isfinite(r)
        assert_close(g[ok], r[ok], e[ok], name)
    # dw_out = dy * h: the forward, elementwise; its NaN (at gate -inf) is h's
    assert got[1].isnan().sum() == 1


def test_gelu_tanh_derivative_past_float32_square_range():
    """Past |z| = 1.8e19, z^2 overflows float32: the tanh form's derivative z (1 - t^2) (...)
    must stay 1 (z > 0) or 0 (z < 0), as float64 and the erf form give, not 0 * inf = NaN;
    in the kernels (linear's dact, the gated epilogues) and the reference."""
    from fastlm.kernels import matmul as mm

    z = torch.tensor([[-3e38, -1e20, -2e19, -1e13, 1e13, 2e19, 1e20, 3e38]], device=DEVICE)
    z64 = z.double().requires_grad_(True)
    (want,) = torch.autograd.grad(TF.gelu(z64, approximate="tanh").sum(), [z64])
    assert torch.equal(want, (z > 0).double())
    dz, _ = mm.dact(torch.ones_like(z), z, "gelu_tanh")
    torch.testing.assert_close(dz.double(), want, rtol=0, atol=0)
    torch.testing.assert_close(ref.act_grad(z, "gelu_tanh").double(), want, rtol=0, atol=0)
    # the gated backward: gu = [g, u] with u = 1 and dh = 1, so dg is act'(g)
    n = z.shape[1]
    for order in ("gate_up", "up_gate"):
        gu = torch.cat([z, torch.ones_like(z)] if order == "gate_up" else [torch.ones_like(z), z], dim=1)
        dgu, _ = mm.matmul_dgated(torch.ones(1, 1, device=DEVICE), torch.ones(n, 1, device=DEVICE), gu,
                                  "geglu_tanh", order)
        dg = dgu[:, :n] if order == "gate_up" else dgu[:, n:]
        torch.testing.assert_close(dg.double(), want, rtol=0, atol=0)


def test_recompute_saves_no_hidden_activation():
    """recompute=True keeps only the inputs for the backward: no saved tensor of the hidden width."""
    M, D, H = 40, 16, 64
    x = rnd(M, D).requires_grad_(True)
    w_in, w_out = rnd(2 * H, D).requires_grad_(True), rnd(D, H).requires_grad_(True)
    for recompute, expect_hidden in ((False, True), (True, False)):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fastlm.use_backend("triton"):
            y = fastlm.feed_forward(x, w_in, None, w_out, None, "swiglu", recompute=recompute)
        hidden = [s for s in shapes if s in ((M, H), (M, 2 * H))]
        assert bool(hidden) == expect_hidden, (recompute, shapes)
        y.sum().backward()


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("backend", BACKENDS)
def test_nn_linear_is_a_drop_in(backend):
    ours = fastlm.nn.Linear(24, 40, device=DEVICE)
    theirs = torch.nn.Linear(24, 40, device=DEVICE)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = rnd(5, 24)
    with fastlm.use_backend(backend):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    act = fastlm.nn.Linear(24, 40, bias=False, activation="gelu_tanh", device=DEVICE)
    with fastlm.use_backend(backend):
        torch.testing.assert_close(act(x), TF.gelu(x @ act.weight.t(), approximate="tanh"), rtol=1e-5, atol=1e-5)
    assert "gelu_tanh" in repr(act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_nn_feed_forward(backend, activation):
    m = fastlm.nn.FeedForward(32, 48, activation=activation, device=DEVICE)
    assert m.fc_in.weight.shape == ((96 if activation == "swiglu" else 48), 32)
    x = rnd(2, 7, 32, scale=1.0).requires_grad_(True)
    with fastlm.use_backend(backend):
        y = m(x)
    expected = eager_ffn(x, m.fc_in.weight, m.fc_in.bias, m.fc_out.weight, m.fc_out.bias, activation)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,N", [(0, 7), (5, 0), (0, 0)], ids=["in0", "out0", "both0"])
def test_zero_features_match_torch(backend, K, N):
    """torch accepts nn.Linear(0, n) (the output is the bias alone) and nn.Linear(k, 0): so
    does fastlm, forward and backward, plain, with an activation and as nn.Linear."""
    x, w, b = rnd(2, 3, K), rnd(N, K), rnd(N)
    for activation in (None, "gelu"):
        check(backend, lambda x, w, b: fastlm.linear(x, w, b, activation),
              lambda x, w, b: TORCH_ACT[activation](TF.linear(x, w, b)), [x, w, b], 1)
    ours = fastlm.nn.Linear(K, N, device=DEVICE)
    theirs = torch.nn.Linear(K, N, device=DEVICE)
    theirs.load_state_dict(ours.state_dict())
    with fastlm.use_backend(backend):
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("D,H", [(0, 5), (4, 0)], ids=["d_model0", "hidden0"])
def test_feed_forward_zero_width(backend, activation, D, H):
    """A feed-forward block of d_model 0 (empty output) or hidden 0 (the output is b_out)
    gives what the two torch linears give, forward and backward."""
    rows = 2 * H if activation in ref.GATED else H
    inputs = [rnd(3, D), rnd(rows, D), rnd(rows), rnd(D, H), rnd(D)]
    check(backend, lambda *t: fastlm.feed_forward(*t, activation=activation), lambda *t: eager_ffn(*t, activation),
          inputs, 1)
    m = fastlm.nn.FeedForward(D, H, activation=activation, device=DEVICE)
    with fastlm.use_backend(backend):
        assert m(inputs[0]).shape == (3, D)


class _ValueFirstGatedMlp(torch.nn.Module):
    """A gated MLP laid out as flash-attn's GatedMlp: fc1's rows are the value then the gate,
    ``y, gate = fc1(x).chunk(2, dim=-1); fc2(y * act(gate))``; parameter names as fastlm's
    FeedForward's, so one state_dict serves both."""

    def __init__(self, d, hidden, act):
        super().__init__()
        self.fc_in = torch.nn.Linear(d, 2 * hidden, device=DEVICE)
        self.fc_out = torch.nn.Linear(hidden, d, device=DEVICE)
        self.act = act

    def forward(self, x):
        y, gate = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(y * self.act(gate))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh"])
def test_nn_feed_forward_loads_a_value_first_checkpoint(backend, activation):
    """FeedForward(gate_order="up_gate") takes a value-first (F.glu / GatedMlp) checkpoint as
    it is and computes what that model computes, forward and parameter gradients; its
    default order on the same weights computes something else."""
    theirs = _ValueFirstGatedMlp(24, 17, TORCH_GATE[activation])
    ours = fastlm.nn.FeedForward(24, 17, activation=activation, device=DEVICE, gate_order="up_gate")
    assert ours.gate_order == "up_gate" and "gate_order='up_gate'" in repr(ours)
    ours.load_state_dict(theirs.state_dict())
    x = rnd(3, 5, 24)
    with fastlm.use_backend(backend):
        y = ours(x)
    expected = theirs(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    default = fastlm.nn.FeedForward(24, 17, activation=activation, device=DEVICE)
    assert "gate_order" not in repr(default)
    default.load_state_dict(theirs.state_dict())
    with fastlm.use_backend(backend):
        assert not torch.allclose(default(x), expected, rtol=1e-3, atol=1e-3)


def test_nn_feed_forward_dropout():
    m = fastlm.nn.FeedForward(16, 32, dropout=0.5, device=DEVICE)
    x = rnd(64, 16)
    y_train = m(x)
    m.eval()
    y_eval = m(x)
    zeros = (y_train == 0).float().mean().item()
    assert 0.3 < zeros < 0.7
    kept = y_train != 0
    torch.testing.assert_close(y_train[kept], 2 * y_eval[kept], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- custom op contract

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b = rnd(9, 16), rnd(20, 16), rnd(20)
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.linear.default, (x.requires_grad_(True), w, b, "gelu", True))
        w_in, w_out = rnd(40, 16).requires_grad_(True), rnd(16, 20).requires_grad_(True)
        torch.library.opcheck(torch.ops.fastlm.feed_forward.default,
                              (x, w_in, None, w_out, rnd(16), "swiglu", True))
        torch.library.opcheck(torch.ops.fastlm.feed_forward.default,
                              (x, w_in, rnd(40), w_out, None, "geglu_tanh", True, "up_gate"))
        torch.library.opcheck(torch.ops.fastlm.feed_forward.default,
                              (x, w_in, None, w_out, None, "swiglu", False, "up_gate"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, w_in, w_out = rnd(2, 9, 16), rnd(64, 16, scale=0.25), rnd(16, 32, scale=32 ** -0.5)
    leaves = [t.requires_grad_(True) for t in (x, w_in, w_out)]

    def block(x, w_in, w_out):
        y = fastlm.feed_forward(x, w_in, None, w_out, None, "swiglu")
        y = fastlm.feed_forward(y, w_in, None, w_out, None, "geglu_tanh", gate_order="up_gate")
        return fastlm.linear(y, w_out[:, :16], None, "relu")

    with fastlm.use_backend(backend):
        eager = block(*leaves)
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(*leaves)
        torch.testing.assert_close(got, eager)
        g1 = torch.autograd.grad(got.sum(), leaves)
        g2 = torch.autograd.grad(eager.sum(), leaves)
    for a, b in zip(g1, g2):  # the traced graph may lay tensors out otherwise: a few roundings apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    w_in, w_gated, w_out = torch.randn(6, 8), torch.randn(12, 8), torch.randn(8, 6)
    return [
        ("linear activation", lambda: fastlm.linear(x, w, b, "tanh"), ValueError, "activation"),
        ("linear gated activation", lambda: fastlm.linear(x, w, b, "swiglu"), ValueError, "feed_forward"),
        ("linear weight shape", lambda: fastlm.linear(x, torch.randn(6, 7)), ValueError, "weight"),
        ("linear bias shape", lambda: fastlm.linear(x, w, torch.randn(5)), ValueError, "bias"),
        ("linear weight dtype", lambda: fastlm.linear(x, w.half()), TypeError, "weight"),
        ("linear int input", lambda: fastlm.linear(x.long(), w), TypeError, "input"),
        ("ffn activation", lambda: fastlm.feed_forward(x, w_in, None, w_out, None, "tanh"), ValueError, "activation"),
        ("ffn w_in shape", lambda: fastlm.feed_forward(x, torch.randn(6, 7), None, w_out, None), ValueError, "w_in"),
        ("ffn gated odd rows", lambda: fastlm.feed_forward(x, torch.randn(11, 8), None, w_out, None, "swiglu"),
         ValueError, "odd"),
        ("ffn w_out shape", lambda: fastlm.feed_forward(x, w_in, None, torch.randn(8, 5), None), ValueError,
         "w_out"),
        ("ffn gated w_out", lambda: fastlm.feed_forward(x, w_gated, None, torch.randn(8, 12), None, "swiglu"), ValueError,
         "w_out"),
        ("ffn b_in shape", lambda: fastlm.feed_forward(x, w_in, torch.randn(5), w_out, None), ValueError, "b_in"),
        ("ffn b_out dtype", lambda: fastlm.feed_forward(x, w_in, None, w_out, torch.randn(8).double()), TypeError,
         "b_out"),
        ("ffn recompute", lambda: fastlm.feed_forward(x, w_in, None, w_out, None, "gelu", recompute=1), TypeError,
         "recompute"),
        ("module activation", lambda: fastlm.nn.FeedForward(8, 6, activation="tanh"), ValueError, "activation"),
        ("ffn gate_order", lambda: fastlm.feed_forward(x, w_gated, None, w_out, None, "swiglu", gate_order="value_gate"),
         ValueError, "gate_order"),
        ("ffn gate_order not a str", lambda: fastlm.feed_forward(x, w_gated, None, w_out, None, "geglu_tanh",
                                                                 gate_order=True), ValueError, "gate_order"),
        ("ffn gate_order plain activation", lambda: fastlm.feed_forward(x, w_in, None, w_out, None, "gelu",
                                                                        gate_order="gate_first"), ValueError,
         "gate_order"),
        ("module gate_order", lambda: fastlm.nn.FeedForward(8, 6, activation="swiglu", gate_order="up"), ValueError,
         "gate_order"),
        ("kernel gate_order", lambda: _kernels().gated_fwd(x, w_gated, None, "swiglu", gate_order="up"), ValueError,
         "gate_order"),
        ("kernel dgated gate_order", lambda: _kernels().matmul_dgated(x, w_out.t()[:, :8], torch.randn(4, 12),
                                                                      "geglu_tanh", "gate"), ValueError,
         "gate_order"),
        ("reference gate_order", lambda: ref.gated(x, w_gated, None, "swiglu", "value_first"), ValueError,
         "gate_order"),
    ]


def _kernels():
    from fastlm.kernels import matmul

    return matmul


def test_gate_order_is_keyword_only():
    x, w_in, w_out = torch.randn(4, 8), torch.randn(12, 8), torch.randn(8, 6)
    with pytest.raises(TypeError):
        fastlm.feed_forward(x, w_in, None, w_out, None, "swiglu", False, "up_gate")
    with pytest.raises(TypeError):
        fastlm.nn.FeedForward(8, 6, "swiglu", True, 0.0, False, None, None, "up_gate")


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, fn, error, match = case
    with pytest.raises(error, match=match):
        fn()


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_gpu_model_sizes(activation):
    M, D, H = 4096, 2048, 5504
    rows = 2 * H if activation in ref.GATED else H
    inputs = [rnd(M, D, dtype=torch.bfloat16), rnd(rows, D, dtype=torch.bfloat16, scale=D ** -0.5),
              rnd(rows, dtype=torch.bfloat16), rnd(D, H, dtype=torch.bfloat16, scale=H ** -0.5),
              rnd(D, dtype=torch.bfloat16)]
    check("triton", lambda *t: fastlm.feed_forward(*t, activation=activation), lambda *t: eager_ffn(*t, activation),
          inputs, max(M, D, H))


# ----------------------------------------------------------------------------- separate up projection (w_up)

def eager_split_ffn(x, w_g, w_u, b_g, b_u, w_out, b_out, activation):
    """A Hugging Face gated MLP as HF writes it: down(act(gate(x)) * up(x))."""
    return TF.linear(TORCH_GATE[activation](TF.linear(x, w_g, b_g)) * TF.linear(x, w_u, b_u), w_out, b_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(TORCH_GATE))
@pytest.mark.parametrize("M,D,H,recompute,bias", [(37, 24, 33, False, True), (17, 15, 16, True, True),
                                                  (1, 7, 17, False, False), (16, 33, 15, True, False)])
def test_feed_forward_separate_up_weight(backend, activation, M, D, H, recompute, bias):
    """w_up: the gate and up projections as two tensors (HF's gate_proj / up_proj), against
    HF's formula in float64, forward and the gradient of each of them. H of 15, 16, 17 and 33
    end the gate inside, at and past a 16-row tile, where dx's matmul passes from one weight
    to the other."""
    x = rnd(M, D, scale=2.0)
    w_g, w_u = rnd(H, D, scale=D ** -0.5), rnd(H, D, scale=D ** -0.5)
    b_g, b_u = (rnd(H), rnd(H)) if bias else (None, None)
    w_out, b_out = rnd(D, H, scale=H ** -0.5), rnd(D) if bias else None
    check(backend, lambda x, wg, wu, bg, bu, wo, bo: fastlm.feed_forward(x, wg, bg, wo, bo, activation, recompute,
                                                                         w_up=wu, b_up=bu),
          lambda *t: eager_split_ffn(*t, activation), [x, w_g, w_u, b_g, b_u, w_out, b_out], max(M, D, H))


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_up_weight_is_never_concatenated(backend, monkeypatch):
    """No per-call (2H, D) copy of the two weights: torch.cat is not called forward or
    backward, and on the Triton kernels the output, both weights' gradients and the biases'
    are the same bits as the stacked [W_g; W_u] call (the kernels read the same numbers in
    the same order; dx is the one sum that runs over the two weights in other blocks)."""
    M, D, H = 21, 19, 18
    x, w_g, w_u, b_g, b_u = rnd(M, D), rnd(H, D, scale=D ** -0.5), rnd(H, D, scale=D ** -0.5), rnd(H), rnd(H)
    w_out, dy = rnd(D, H, scale=H ** -0.5), rnd(M, D)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_g, w_u, b_g, b_u, w_out)]
    stacked = [t.clone().requires_grad_(True) for t in (x, torch.cat([w_g, w_u]), torch.cat([b_g, b_u]), w_out)]

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called")

    with fastlm.use_backend(backend):
        with monkeypatch.context() as m:
            m.setattr(torch, "cat", no_cat)
            y = fastlm.feed_forward(leaves[0], leaves[1], leaves[3], leaves[5], None, "swiglu", w_up=leaves[2],
                                    b_up=leaves[4])
            grads = torch.autograd.grad(y, leaves, dy)
        y2 = fastlm.feed_forward(stacked[0], stacked[1], stacked[2], stacked[3], None, "swiglu")
        dx2, dw2, db2, dwo2 = torch.autograd.grad(y2, stacked, dy)
    expect = {"y": y2, "dx": dx2, "dw_g": dw2[:H], "dw_u": dw2[H:], "db_g": db2[:H], "db_u": db2[H:], "dw_out": dwo2}
    got = dict(zip(expect, (y,) + grads))
    for name in expect:
        exact = backend == "triton" and name != "dx"
        torch.testing.assert_close(got[name], expect[name], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5,
                                   msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_separate_up_weight(backend):
    x = rnd(9, 16)
    w_g, w_u, w_out = (rnd(20, 16).requires_grad_(True), rnd(20, 16).requires_grad_(True),
                       rnd(16, 20).requires_grad_(True))
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.feed_forward.default,
                              (x, w_g, rnd(20).requires_grad_(True), w_out, rnd(16), "swiglu", True, "gate_up", w_u,
                               rnd(20).requires_grad_(True)))
        torch.library.opcheck(torch.ops.fastlm.feed_forward.default,
                              (x, w_g, None, w_out, None, "geglu_tanh", False, "gate_up", w_u, None))


@pytest.mark.parametrize("case", [
    ("w_up plain activation", dict(activation="gelu"), "gated"),
    ("w_up up_gate", dict(gate_order="up_gate"), "gate_order"),
    ("w_up shape", dict(w_up=torch.randn(5, 8)), "w_up"),
    ("b_up alone", dict(w_up=None), "b_up"),
    ("b_in without b_up", dict(b_up=None), "both or neither"),
    ("b_up shape", dict(b_in=torch.randn(6), b_up=torch.randn(5)), "b_up"),
    ("w_up dtype", dict(w_up=torch.randn(6, 8).double()), "w_up"),
], ids=lambda c: c[0])
def test_separate_up_weight_bad_input_names_the_argument(case):
    _, change, match = case
    args = dict(w_in=torch.randn(6, 8), b_in=torch.randn(6), w_out=torch.randn(8, 6), activation="swiglu",
                w_up=torch.randn(6, 8), b_up=torch.randn(6))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        fastlm.feed_forward(torch.randn(4, 8), args.pop("w_in"), args.pop("b_in"), args.pop("w_out"), None, **args)


def test_split_k_matmul_kernel():
    """kernels.matmul(a, b, a2, b2) = a @ b^T + a2 @ b2^T, K and K2 inside, at and past a tile,
    transposed views for operands; a2 without b2 is refused."""
    mm = _kernels()
    for M, N, K, K2 in [(17, 15, 16, 17), (33, 16, 1, 31), (1, 17, 15, 16)]:
        a, b = rnd(M, K), rnd(K, N).t()
        a2, b2 = rnd(K2, M).t(), rnd(N, K2)
        ref64 = a.double() @ b.double().t() + a2.double() @ b2.double().t()
        eager = a @ b.t() + a2 @ b2.t()
        assert_close(mm.matmul(a, b, a2, b2), ref64, eager, "split-K matmul",
                     atol=summation_floor(ref64, torch.float32, K + K2))
    with pytest.raises(ValueError, match="a2 and b2"):
        mm.matmul(rnd(3, 4), rnd(5, 4), rnd(3, 2))
