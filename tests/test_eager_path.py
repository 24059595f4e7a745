"""The thin eager path (issue 17): what an eager call runs, and that it is what the custom op runs.

- On the "torch" backend (the CPU path) an op whose meaning torch has natively calls torch's
  own function: the result is torch's, bit for bit, gradients included, and no fastlm custom
  op is dispatched.
- On a kernel backend an eager call skips the custom-op dispatch (fastlm/ops/_eager.py) but
  runs the same body and backward as the custom op: the numbers are identical.
- torch.compile still sees the custom op.

Which ops were dispatched is read with a TorchDispatchMode, so these tests say nothing about
time: the time is in ``fastlm bench overhead``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm

CPU = torch.device("cpu")


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched(fn, *args) -> tuple[object, list[str]]:
    with _Seen() as seen:
        out = fn(*args)
    return out, seen.names


def fastlm_ops(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("fastlm.")]


def _grads(out, inputs):
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.randn(o.shape, generator=torch.Generator().manual_seed(7))).sum() for o in outs)
    return torch.autograd.grad(loss, [t for t in inputs if t is not None], allow_unused=True)


# ----------------------------------------------------------------------------- norms

_NORMS = {
    "layer_norm": (lambda x, r, w, b: fastlm.layer_norm(x, x.shape[-1:], w, b, 1e-5),
                   lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5)),
    "rms_norm": (lambda x, r, w, b: fastlm.rms_norm(x, x.shape[-1:], w, 1e-6),
                 lambda x, r, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-6)),
    "add_layer_norm": (lambda x, r, w, b: fastlm.add_layer_norm(x, r, x.shape[-1:], w, b, 1e-5, return_residual=True),
                       lambda x, r, w, b: (F.layer_norm(x + r, x.shape[-1:], w, b, 1e-5), x + r)),
    "add_rms_norm": (lambda x, r, w, b: fastlm.add_rms_norm(x, r, x.shape[-1:], w, None),
                     lambda x, r, w, b: F.rms_norm(x + r, x.shape[-1:], w, None)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("op", sorted(_NORMS))
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_norm_cpu_path_is_torch_bit_for_bit(op, dtype, backend):
    ours, theirs = _NORMS[op]
    x = torch.randn(5, 3, 37, dtype=dtype, device=CPU).requires_grad_(True)
    r = torch.randn(5, 3, 37, dtype=dtype, device=CPU).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(37, dtype=dtype)).requires_grad_(True)
    b = (0.1 * torch.randn(37, dtype=dtype)).requires_grad_(True)
    with fastlm.use_backend(backend):
        got, names = dispatched(ours, x, r, w, b)
    assert fastlm_ops(names) == [], f"the CPU path dispatched fastlm's custom ops: {fastlm_ops(names)}"
    want = theirs(x, r, w, b)
    for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e)
    for g, e in zip(_grads(got, (x, r, w, b)), _grads(want, (x, r, w, b))):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_norm_cpu_path_transposed_input():
    x = torch.randn(24, 9, dtype=torch.float32).t()  # (9, 24), non-contiguous rows
    w = torch.randn(24)
    assert torch.equal(fastlm.layer_norm(x, 24, w), F.layer_norm(x, (24,), w))
    assert torch.equal(fastlm.rms_norm(x, 24, w), F.rms_norm(x, (24,), w))


def test_mixed_rms_norm_takes_the_reference_without_torch_warning():
    """torch's rms_norm has no fused kernel for a float32 weight over a bfloat16 input (it
    warns and composes); fastlm computes that in float32 with the reference, silently."""
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fastlm.rms_norm(x, 64, w)
    want = F.rms_norm(x.double(), (64,), w.double())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)


def test_float64_input_float32_weight_native():
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float32, requires_grad=True)
    y = fastlm.layer_norm(x, 16, w)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.layer_norm(x, (16,), w.double()))
    (gw,) = torch.autograd.grad(y.sum(), [w])
    assert gw.dtype == torch.float32


@pytest.mark.parametrize("op", sorted(_NORMS))
def test_norm_kernel_path_skips_custom_op_dispatch_and_matches_it(op):
    """Eager on the triton backend: no fastlm custom op in the dispatch trace, and the same
    numbers (bit for bit) as the custom op, forward and backward."""
    from fastlm.ops import norm as norm_ops

    ours, _ = _NORMS[op]
    x = torch.randn(7, 33, device=CPU).requires_grad_(True)
    r = torch.randn(7, 33, device=CPU).requires_grad_(True)
    w = torch.randn(33).requires_grad_(True)
    b = torch.randn(33).requires_grad_(True)
    with fastlm.use_backend("triton"):
        got, names = dispatched(ours, x, r, w, b)
        assert fastlm_ops(names) == []
        g_eager = _grads(got, (x, r, w, b))
        residual = r if op.startswith("add_") else None
        bias = b if "layer" in op else None
        eps = 1e-5 if "layer" in op else (1e-6 if op == "rms_norm" else torch.finfo(torch.float32).eps)
        y, s, _, _ = norm_ops._norm(x, residual, w, bias, 1, eps, "rms" in op, residual is not None)
        want = (y, s) if op == "add_layer_norm" else y
        g_op = _grads(want, (x, r, w, b))
    for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, e)
    for g, e in zip(g_eager, g_op):
        if g is None or e is None:
            assert g is None and e is None
        else:
            assert torch.equal(g, e)


def test_no_grad_kernel_path_runs_the_body_only():
    x = torch.randn(3, 20)
    with fastlm.use_backend("triton"), torch.no_grad():
        y, names = dispatched(lambda: fastlm.add_rms_norm(x, x, 20, return_residual=True))
    assert fastlm_ops(names) == []
    assert not y[0].requires_grad


def test_compile_still_sees_the_custom_op():
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, w = torch.randn(4, 16), torch.randn(16)
    f = torch.compile(lambda x, w: fastlm.rms_norm(fastlm.layer_norm(x, 16, w), 16, w), backend=backend,
                      fullgraph=True)
    torch.testing.assert_close(f(x, w), F.rms_norm(F.layer_norm(x, (16,), w), (16,), w))
    assert any("fastlm.norm" in g for g in graphs), graphs


@pytest.mark.parametrize("wdt,bdt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float32)])
def test_layer_norm_parameter_dtype_mix_on_cpu(wdt, bdt):
    """fastlm takes each parameter in the input's dtype or float32; torch's kernel takes some
    mixes and refuses others: both kinds give the float32 computation rounded once."""
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    w, b = torch.randn(48, dtype=wdt), torch.randn(48, dtype=bdt)
    y = fastlm.layer_norm(x, 48, w, b)
    want = F.layer_norm(x.double(), (48,), w.double(), b.double())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=8e-3, atol=2e-2)


def test_fast_path_errors_are_fastlms():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        fastlm.layer_norm(x, 7)
    with pytest.raises(ValueError, match="eps"):
        fastlm.rms_norm(x, 8, eps=-1e-5)
    with pytest.raises(TypeError, match="weight"):
        fastlm.layer_norm(x, 8, torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual"):
        fastlm.add_layer_norm(x, torch.randn(1, 8), 8)  # torch would broadcast it
    with pytest.raises(TypeError, match="residual"):
        fastlm.add_rms_norm(x, x.double(), 8)  # torch would promote it


def test_linear_fast_path_refuses_what_torch_would_take():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="bias"):
        fastlm.linear(x, w, torch.randn(1))  # torch broadcasts a (1,) bias
    with pytest.raises(ValueError, match="weight"):
        fastlm.linear(x, torch.randn(8))  # torch takes a vector weight
    with pytest.raises(TypeError, match="input"):
        fastlm.linear(torch.ones(3, 8, dtype=torch.int64), torch.ones(5, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight"):
        fastlm.linear(x, w.double())
    with pytest.raises(ValueError, match="activation"):
        fastlm.linear(x, w, None, "swiglu")
    y, names = dispatched(lambda: fastlm.linear(x, w, None, "gelu_tanh"))
    assert fastlm_ops(names) == []
    assert torch.equal(y, F.gelu(F.linear(x, w), approximate="tanh"))


@pytest.mark.parametrize("L_new,start", [(1, 0), (1, 6), (3, 4), (0, 9)])
def test_kvcache_cpu_path_is_sdpa_and_matches_the_reference(L_new, start):
    """An int cache_seqlens (a model's decode loop) on CPU: the cache write is a slice and the
    attention torch's SDPA; the same call with a tensor cache_seqlens takes the reference."""
    B, S_max, H, Hk, D = 2, 12, 4, 2, 8
    q = torch.randn(B, max(L_new, 1), H, D, dtype=torch.float64)
    kc, vc = torch.randn(B, S_max, Hk, D, dtype=torch.float64), torch.randn(B, S_max, Hk, D, dtype=torch.float64)
    k = torch.randn(B, L_new, Hk, D, dtype=torch.float64) if L_new else None
    v = torch.randn(B, L_new, Hk, D, dtype=torch.float64) if L_new else None
    kc2, vc2 = kc.clone(), vc.clone()
    seen = start if L_new else start
    got, names = dispatched(lambda: fastlm.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seen, causal=True))
    assert fastlm_ops(names) == []
    assert any("scaled_dot_product" in n or "_flash_attention" in n for n in names), names
    want = fastlm.flash_attn_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=torch.full((B,), seen), causal=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_kvcache_fast_path_refusals_are_fastlms():
    """The decode-loop fast path checks only what slicing and torch's SDPA would take silently;
    each such call must still get fastlm's error (from the checked path), and leave the caches
    untouched where the call is refused."""
    B, S_max, H, D = 2, 8, 2, 4
    q = torch.randn(B, 1, H, D)
    kc, vc = torch.randn(B, S_max, H, D), torch.randn(B, S_max, H, D)
    k, v = torch.randn(B, 1, H, D), torch.randn(B, 1, H, D)
    before = kc.clone()
    cases = [
        (ValueError, "cache_seqlens", lambda: fastlm.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=-1)),
        (ValueError, "cache", lambda: fastlm.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=S_max)),
        (ValueError, None, lambda: fastlm.flash_attn_with_kvcache(q[:1], kc, vc, k, v, cache_seqlens=2)),  # broadcast
        (ValueError, None, lambda: fastlm.flash_attn_with_kvcache(q, kc, vc, k[:1], v[:1], cache_seqlens=2)),
        ((TypeError, ValueError), None, lambda: fastlm.flash_attn_with_kvcache(q.double(), kc, vc, k, v, cache_seqlens=2)),
        (ValueError, "softmax_scale", lambda: fastlm.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=2,
                                                                              softmax_scale=float("nan"))),
    ]
    for exc, word, call in cases:
        with pytest.raises(exc, match=word):
            call()
        assert torch.equal(kc, before)
    # a window takes the checked path and gives the reference's answer
    out = fastlm.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=5, window_size=(2, 0))
    assert out.shape == q.shape


# ----------------------------------------------------------------------------- review findings (issue 17)

def test_double_backward_through_a_kernel_twin_raises_clearly():
    """A kernel's backward has no autograd formula: a double backward must raise (as the
    custom op does), never drop the second-order term silently."""
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    with fastlm.use_backend("triton"):
        y = fastlm.layer_norm(x, 16, w)
        with pytest.raises(RuntimeError, match="not differentiable"):
            # + w.sum(): w is in the graph either way, so a missing second-order path would
            # give a silent (wrong) gradient instead of an error
            (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), [x], create_graph=True)
            torch.autograd.grad(g.pow(2).sum() + w.sum(), [w])


def test_kvcache_fast_path_checks_q_device_before_writing():
    B, S_max, H, D = 1, 6, 2, 4
    kc, vc = torch.randn(B, S_max, H, D), torch.randn(B, S_max, H, D)
    before = kc.clone()
    q = torch.randn(B, 1, H, D, device="meta")
    with fastlm.use_backend("torch"), pytest.raises((ValueError, RuntimeError)):
        fastlm.flash_attn_with_kvcache(q, kc, vc, torch.randn(B, 1, H, D), torch.randn(B, 1, H, D), cache_seqlens=3)
    assert torch.equal(kc, before)


def test_norm_native_takes_mixed_parameters_on_cpu_only():
    """torch's layer_norm takes float32 parameters over a 16-bit input on CPU, not on CUDA:
    elsewhere the reference serves (here a meta tensor stands in for a CUDA one)."""
    from fastlm.ops import norm as norm_ops

    for device in ("cpu", "meta"):
        x = torch.randn(3, 32, dtype=torch.bfloat16, device=device)
        w, b = torch.randn(32, device=device), torch.randn(32, device=device)
        got = norm_ops._native(x, None, (32,), w, b, 1e-5, False, False)
        assert (got is None) == (device != "cpu")


@pytest.mark.gpu
def test_norm_torch_backend_on_cuda_keeps_dtype_under_autocast_and_takes_mixed_params():
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    with fastlm.use_backend("torch"):
        y = fastlm.layer_norm(x, 64, w, b)  # float32 parameters over bf16: torch's CUDA kernel refuses
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), F.layer_norm(x.float(), (64,), w, b), rtol=2e-2, atol=2e-2)
        with torch.autocast("cuda", torch.bfloat16):
            assert fastlm.layer_norm(x, 64, w.bfloat16(), b.bfloat16()).dtype == torch.bfloat16
            assert fastlm.rms_norm(x, 64).dtype == torch.bfloat16
            assert fastlm.add_layer_norm(x, x, 64).dtype == torch.bfloat16
