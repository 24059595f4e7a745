"""The eager paths of fastlm.linear and fastlm.feed_forward (issue 17).

On the "torch" backend (the CPU path) the public functions call torch's own F.linear and
activations with torch's autograd: each fastlm activation name must be exactly the formula
of fastlm.reference.ffn (checked here in float64, forward and backward, against the
reference differentiated by autograd and against its explicit derivative). Elsewhere the
call goes through an EagerTwin (an autograd.Function around the custom op's body), whose
backward runs on the backend the forward was called under.
"""

from __future__ import annotations

import threading

import pytest
import torch

import fastlm
from fastlm.ops import ffn as ops
from fastlm.reference import ffn as ref

from .conftest import DEVICE, ON_GPU

F64 = torch.float64


def rnd(*shape, dtype=F64, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def _grads(fn, inputs, dout):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], dout)


@pytest.mark.parametrize("activation", [None] + list(ref.ACTIVATIONS))
def test_native_linear_is_the_reference_formula_float64(activation):
    """F.linear + torch's activation for each name == ref.linear, forward and backward, in
    float64 on random inputs (3-D, odd sizes, values spread across the activations' bends)."""
    x, w, b = rnd(2, 5, 7, scale=2.0), rnd(9, 7, scale=7 ** -0.5), rnd(9)
    dout = rnd(2, 5, 9)
    with fastlm.use_backend("torch"):
        got, got_g = _grads(lambda *t: fastlm.linear(*t, activation), (x, w, b), dout)
    exp, exp_g = _grads(lambda *t: ref.linear(*t, activation), (x, w, b), dout)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_g, exp_g):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    # and the explicit derivative the kernels' epilogues are checked against
    z = (x @ w.t() + b).detach()
    (dz,) = torch.autograd.grad(ops._native_linear(z.requires_grad_(True), torch.eye(9, dtype=F64, device=DEVICE),
                                                   None, activation), [z], dout)
    torch.testing.assert_close(dz, dout * ref.act_grad(z.detach(), activation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", list(ref.ACTIVATIONS) + list(ref.GATED))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gate_order", ["gate_up", "up_gate"])
def test_native_feed_forward_is_the_reference_formula_float64(activation, bias, gate_order):
    """The native block (gated: act(gate rows) * up rows, the gate first, or second for
    "up_gate") == ref.feed_forward, forward and every gradient, float64."""
    M, D, H = 11, 6, 13
    rows = 2 * H if activation in ref.GATED else H
    inputs = [rnd(M, D, scale=2.0), rnd(rows, D, scale=D ** -0.5), rnd(rows) if bias else None,
              rnd(D, H, scale=H ** -0.5), rnd(D) if bias else None]
    dout = rnd(M, D)
    with fastlm.use_backend("torch"):
        got, got_g = _grads(lambda *t: fastlm.feed_forward(*t, activation=activation, gate_order=gate_order),
                            inputs, dout)
    exp, exp_g = _grads(lambda *t: ref.feed_forward(*t, activation, gate_order), inputs, dout)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_g, exp_g):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_gate_order_is_gate_rows_first():
    """swiglu with w_in = [W_g; W_u]: silu(x W_g^T) * (x W_u^T), not the other way round."""
    x, wg, wu, wo = rnd(3, 4), rnd(5, 4), rnd(5, 4), rnd(4, 5)
    with fastlm.use_backend("torch"):
        y = fastlm.feed_forward(x, torch.cat((wg, wu)), None, wo, None, "swiglu")
    g, u = x @ wg.t(), x @ wu.t()
    torch.testing.assert_close(y, (g * torch.sigmoid(g) * u) @ wo.t(), rtol=1e-12, atol=1e-12)


def test_up_gate_order_is_up_rows_first():
    """gate_order="up_gate" with w_in = [W_u; W_g]: (x W_u^T) * act(x W_g^T), F.glu's order (the
    value first), for swiglu and geglu_tanh (gelu's tanh form on the gate); in the reference
    too, and its explicit backward (the reference op's) gives the gradients torch's autograd
    gives through the formula."""
    x, wg, wu, wo = rnd(3, 4), rnd(5, 4), rnd(5, 4), rnd(4, 5)
    g, u = x @ wg.t(), x @ wu.t()
    t = torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g ** 3))
    expected = {"swiglu": (u * g * torch.sigmoid(g)) @ wo.t(), "geglu_tanh": (u * 0.5 * g * (1 + t)) @ wo.t()}
    for activation, want in expected.items():
        w_in = torch.cat((wu, wg))
        with fastlm.use_backend("torch"):
            y = fastlm.feed_forward(x, w_in, None, wo, None, activation, gate_order="up_gate")
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref.feed_forward(x, w_in, None, wo, None, activation, "up_gate"), want,
                                   rtol=1e-12, atol=1e-12)
        # the reference op (recompute=True on the torch backend) and its explicit backward
        leaves = [t.clone().requires_grad_(True) for t in (x, w_in, wo)]
        with fastlm.use_backend("torch"):
            y_op = fastlm.feed_forward(leaves[0], leaves[1], None, leaves[2], None, activation, recompute=True,
                                       gate_order="up_gate")
        dout = rnd(*y_op.shape)
        got = torch.autograd.grad(y_op, leaves, dout)
        _, exp = _grads(lambda *t: ref.feed_forward(t[0], t[1], None, t[2], None, activation, "up_gate"),
                        (x, w_in, wo), dout)
        torch.testing.assert_close(y_op, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cpu_path_is_torch_autograd():
    """On the CPU path (auto off CUDA) the graph holds torch's own nodes, no fastlm Function."""
    if ON_GPU:
        pytest.skip("the CPU path")
    x, w = rnd(3, 8, dtype=torch.float32).requires_grad_(True), rnd(4, 8, dtype=torch.float32)
    names = {
        "linear": fastlm.linear(x, w, None, "gelu_tanh").grad_fn.name(),
        "ffn": fastlm.feed_forward(x, rnd(8, 8, dtype=torch.float32), None, w.t().contiguous(), None,
                                   "swiglu").grad_fn.name(),
    }
    for what, name in names.items():
        assert "eager" not in name and "fastlm" not in name.lower(), (what, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_recompute_saves_no_hidden_activation(backend):
    """recompute=True keeps only the inputs for the backward, on every backend: the CPU path
    runs fastlm's reference op then (torch's autograd would keep the hidden activations)."""
    M, D, H = 40, 16, 64
    x = rnd(M, D, dtype=torch.float32).requires_grad_(True)
    w_in = rnd(2 * H, D, dtype=torch.float32).requires_grad_(True)
    w_out = rnd(D, H, dtype=torch.float32).requires_grad_(True)
    grads = {}
    for recompute, expect_hidden in ((False, True), (True, False)):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fastlm.use_backend(backend):
            y = fastlm.feed_forward(x, w_in, None, w_out, None, "swiglu", recompute=recompute)
        hidden = [s for s in shapes if s in ((M, H), (M, 2 * H))]
        assert bool(hidden) == expect_hidden, (recompute, shapes)
        grads[recompute] = torch.autograd.grad(y.square().sum(), [x, w_in, w_out])
    for a, b in zip(grads[False], grads[True]):  # the same formula, matmuls summed in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_backward_uses_the_backend_of_the_forward(monkeypatch):
    """The eager twin records the forward's backend: a backward run on another thread (where
    use_backend is not seen) still runs the Triton kernels."""
    from fastlm.kernels import matmul as kernels

    calls = []
    real = kernels.matmul
    monkeypatch.setattr(kernels, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b = (rnd(5, 16, dtype=torch.float32).requires_grad_(True), rnd(8, 16, dtype=torch.float32),
               rnd(8, dtype=torch.float32))
    with fastlm.use_backend("triton"):
        y = fastlm.linear(x, w, b, "gelu")
    assert not calls
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("g", torch.autograd.grad(y.sum(), [x])))
    t.start()
    t.join()
    assert "g" in result and calls, "the backward did not run the Triton kernels of the forward's backend"
    with fastlm.use_backend("torch"):
        expected = torch.autograd.grad(fastlm.linear(x, w, b, "gelu").sum(), [x])
    torch.testing.assert_close(result["g"][0], expected[0], rtol=1e-5, atol=1e-5)


def test_eager_twin_and_custom_op_agree():
    """The twin (plain call / autograd.Function) and the registered custom op run the same
    body: the same numbers, forward and backward, on the reference backend."""
    x = rnd(7, 12, dtype=torch.float32)
    f32 = torch.float32
    w_in, w_out, b_out = rnd(20, 12, dtype=f32), rnd(12, 10, dtype=f32), rnd(12, dtype=f32)
    with fastlm.use_backend("torch"):
        for args in ((x, w_in, None, w_out, b_out, "geglu", True),
                     (x, w_in, None, w_out, b_out, "geglu_tanh", True, "up_gate")):
            outs = []
            for op in (ops._feed_forward_eager, ops._feed_forward):
                leaves = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
                y = op(*leaves)[0]
                outs.append((y,) + torch.autograd.grad(y.sum(), [t for t in leaves if isinstance(t, torch.Tensor)]))
            for a, b in zip(*outs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        no_grad = ops._linear_eager(x, w_in, None, "silu", False)
        torch.testing.assert_close(no_grad[0], ops._linear(x, w_in, None, "silu", False)[0], rtol=0, atol=0)


def test_autocast_still_casts_on_the_cpu_path():
    """Under CPU autocast (bfloat16) the native path computes in bfloat16 from float32 weights,
    as torch's F.linear does, and float32 weights get float32 gradients."""
    x, w = rnd(4, 16, dtype=torch.float32), rnd(8, 16, dtype=torch.float32).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlm.linear(x.to(DEVICE), w, None, "relu") if DEVICE.type == "cpu" else None
    if y is None:
        pytest.skip("CPU autocast")
    assert y.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(y.float().sum(), [w])
    assert g.dtype == torch.float32
