"""Every Triton launch of every public op stays inside CUDA's grid limits.

CUDA caps grid axis 0 at 2^31 - 1 programs and axes 1 and 2 at 65535. A kernel that puts
batch x heads on axis 1 or 2 launches in every small test and fails on a GPU as soon as
B * H reaches 65536 (varlen batches of many short sequences, large decode batches).

The interpreter would run every program of such a grid one after another (minutes), so here
the launch itself is replaced: ``kernel[grid](...)`` records the kernel's name and its grid
and returns without running a program. The outputs are then whatever the allocator left
(NaN under FASTLM_POISON), which does not matter: only the grids are asserted. Each public
op runs forward and backward at B * H >= 65536 with tiny L, S and D, on the Triton backend.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from triton.runtime.jit import KernelInterface

import fastlm
from fastlm.ops import attention as attn_ops

from .conftest import DEVICE, ON_GPU

AXIS0_MAX = 2 ** 31 - 1
AXIS12_MAX = 65535
BIG = 65536  # B * H of every case


@pytest.fixture
def launches(monkeypatch):
    """The (kernel name, 3-D grid) of every launch while the test runs; no program runs."""
    recorded = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            g = grid
            if callable(g):  # a grid function gets the launch's arguments by name
                fn = getattr(self, "fn", None)
                names = list(inspect.signature(fn).parameters) if fn is not None else []
                meta = dict(zip(names, args))
                meta.update(kwargs)
                g = g(meta)
            g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
            recorded.append((getattr(self, "__name__", type(self).__name__), g))
        return launch

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    return recorded


def _rand(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, requires_grad=grad)


def _backward(*outputs):
    torch.autograd.backward([o for o in outputs], [torch.ones_like(o) for o in outputs])


# Each case runs one public op (forward, and backward where it has one) at B * H >= 65536.
def _flash_attn_func():
    for B, H, HK in ((BIG, 1, 1), (BIG // 16 + 1, 16, 4)):
        q, k, v = _rand(B, 2, H, 16, grad=True), _rand(B, 3, HK, 16, grad=True), _rand(B, 3, HK, 16, grad=True)
        _backward(fastlm.flash_attn_func(q, k, v, causal=True, window_size=(1, -1), softcap=5.0))


def _flash_attn_varlen_func():
    for B, H in ((BIG, 1), (BIG // 16 + 1, 16)):
        cu = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)  # B sequences of one token
        q, k, v = _rand(B, H, 16, grad=True), _rand(B, H, 16, grad=True), _rand(B, H, 16, grad=True)
        _backward(fastlm.flash_attn_varlen_func(q, k, v, cu, cu, 1, 1, dropout_p=0.25, causal=True))


def _flash_attn_with_kvcache():
    for B, H, HK in ((BIG, 1, 1), (BIG // 16 + 1, 16, 2)):
        k_cache, v_cache = _rand(B, 4, HK, 16), _rand(B, 4, HK, 16)
        lens = torch.randint(0, 3, (B,), dtype=torch.int32, device=DEVICE)
        fastlm.flash_attn_with_kvcache(_rand(B, 1, H, 16), k_cache, v_cache, _rand(B, 1, HK, 16),
                                       _rand(B, 1, HK, 16), cache_seqlens=lens)


def _scaled_dot_product_attention():
    for B, H in ((BIG, 1), (BIG // 16 + 1, 16)):
        q, k, v = _rand(B, H, 2, 16, grad=True), _rand(B, H, 3, 16, grad=True), _rand(B, H, 3, 16, grad=True)
        bias = _rand(1, H, 2, 3, grad=True)  # an additive mask with a gradient (the dS path)
        _backward(fastlm.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.25))


def _dropout_mask():  # the kernels' mask, as tests and debugging draw it
    seed = torch.tensor([1234], dtype=torch.int64)
    for B, H in ((BIG, 1), (BIG // 16 + 1, 16)):
        attn_ops.dropout_mask(seed, B, H, 2, 3, 0.25, "triton", DEVICE)


def _layer_norm():
    x, w, b = _rand(BIG, 16, grad=True), _rand(16, grad=True), _rand(16, grad=True)
    _backward(fastlm.layer_norm(x, (16,), w, b))


def _rms_norm():
    x, w = _rand(BIG, 16, grad=True), _rand(16, grad=True)
    _backward(fastlm.rms_norm(x, (16,), w))


def _add_layer_norm():
    x, r, w, b = _rand(BIG, 16, grad=True), _rand(BIG, 16, grad=True), _rand(16, grad=True), _rand(16, grad=True)
    _backward(*fastlm.add_layer_norm(x, r, (16,), w, b, return_residual=True))


def _add_rms_norm():
    x, r, w = _rand(BIG, 16, grad=True), _rand(BIG, 16, grad=True), _rand(16, grad=True)
    _backward(*fastlm.add_rms_norm(x, r, (16,), w, return_residual=True))


def _layer_norm_fn():  # dropout + residual + norm (issue 23) and its mask
    x, r, w, b = _rand(BIG, 16, grad=True), _rand(BIG, 16, grad=True), _rand(16, grad=True), _rand(16, grad=True)
    y, s, _, _ = fastlm.layer_norm_fn(x, w, b, r, dropout_p=0.25, prenorm=True, return_dropout_mask=True)
    _backward(y, s)


def _rotary():
    cos, sin = fastlm.rotary_cos_sin(8, 16, device=DEVICE)
    for B, S, H in ((BIG, 1, 1), (BIG // 16 + 1, 3, 16)):
        x = _rand(B, S, H, 32, grad=True)
        pos = torch.randint(0, 8, (B, S), device=DEVICE)
        _backward(fastlm.rotary(x, cos, sin, position_ids=pos))


def _apply_rotary_emb():
    cos, sin = fastlm.rotary_cos_sin(16, 16, device=DEVICE)
    x = _rand(BIG, 2, 1, 32, grad=True)
    _backward(fastlm.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.randint(0, 8, (BIG,), device=DEVICE)))


def _apply_rotary_pos_emb():
    c, s = fastlm.rotary_cos_sin(2, 16, device=DEVICE)
    cos, sin = torch.cat((c, c), -1)[None], torch.cat((s, s), -1)[None]
    q, k = _rand(BIG, 1, 2, 32, grad=True), _rand(BIG, 1, 2, 32, grad=True)
    _backward(*fastlm.apply_rotary_pos_emb(q, k, cos, sin))


def _rotary_cos_sin():  # tables built with torch: no launch, checked so that stays true
    fastlm.rotary_cos_sin(BIG, 16, device=DEVICE)


def _linear():
    x, w, b = _rand(BIG, 16, grad=True), _rand(24, 16, grad=True), _rand(24, grad=True)
    _backward(fastlm.linear(x, w, b, activation="gelu"))
    _backward(fastlm.linear(x, w))


def _feed_forward():
    x = _rand(BIG, 16, grad=True)
    w_in, b_in, w_out, b_out = _rand(32, 16, grad=True), _rand(32, grad=True), _rand(16, 32, grad=True), \
        _rand(16, grad=True)
    _backward(fastlm.feed_forward(x, w_in, b_in, w_out, b_out, activation="gelu"))
    _backward(fastlm.feed_forward(x, _rand(64, 16, grad=True), None, w_out, None, activation="swiglu",
                                  recompute=True))


def _cross_entropy():
    x = _rand(BIG, 17, grad=True)
    target = torch.randint(0, 17, (BIG,), device=DEVICE)
    _backward(fastlm.cross_entropy(x, target, label_smoothing=0.1))
    xt = _rand(17, BIG, grad=True).t()  # a non-unit class stride
    _backward(fastlm.cross_entropy(xt, target, reduction="sum"))


def _cross_entropy_with_stats():
    x = _rand(BIG, 17, grad=True)
    target = torch.randint(0, 17, (BIG,), device=DEVICE)
    loss, _ = fastlm.cross_entropy_with_stats(x, target, z_loss=1e-4, softcap=5.0)
    _backward(loss)


def _linear_cross_entropy():
    x, w = _rand(BIG, 16, grad=True), _rand(17, 16, grad=True)
    target = torch.randint(0, 17, (BIG,), device=DEVICE)
    _backward(fastlm.linear_cross_entropy(x, w, target, linear_bias=_rand(17, grad=True)))


def _linear_cross_entropy_with_stats():
    x, w = _rand(BIG, 16, grad=True), _rand(17, 16, grad=True)
    target = torch.randint(0, 17, (BIG,), device=DEVICE)
    target[::3] = -100  # (the skipped rows: sorted behind the counted ones, the kernels stop at the count)
    loss, _ = fastlm.linear_cross_entropy_with_stats(x, w, target, linear_bias=_rand(17, grad=True), chunk_size=BIG)
    _backward(loss)


def _kl_div():
    x, t = _rand(BIG, 17, grad=True), _rand(BIG, 17, grad=True)
    _backward(fastlm.kl_div(x, t, reduction="none", log_target=True))
    _backward(fastlm.kl_div(x, t.exp(), reduction="sum"))


def _jsd():
    s, t = _rand(BIG, 17, grad=True), _rand(BIG, 17)
    _backward(fastlm.jsd(s, t, torch.randint(0, 17, (BIG,), device=DEVICE), beta=0.3))


def _linear_jsd():
    x, w, xt, wt = _rand(BIG, 16, grad=True), _rand(17, 16, grad=True), _rand(BIG, 8), _rand(17, 8)
    _backward(fastlm.linear_jsd(x, w, xt, wt, chunk_size=BIG))


def _qk_norm_rotary():  # q/k RMSNorm + rotary (issue 23), per head and over all heads
    cos, sin = fastlm.rotary_cos_sin(8, 16, device=DEVICE)
    for B, S, H, Hk, norm_over in ((BIG, 1, 1, 1, "heads"), (BIG // 16 + 1, 3, 16, 4, "heads"),
                                   (BIG, 1, 2, 1, "all")):
        q, k = _rand(B, S, H, 32, grad=True), _rand(B, S, Hk, 32, grad=True)
        width = (lambda h: 32 if norm_over == "heads" else h * 32)
        qw, kw = _rand(width(H), grad=True), _rand(width(Hk), grad=True)
        _backward(*fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, norm_over=norm_over))


CASES = {
    "flash_attn_func": _flash_attn_func,
    "flash_attn_varlen_func": _flash_attn_varlen_func,
    "flash_attn_with_kvcache": _flash_attn_with_kvcache,
    "scaled_dot_product_attention": _scaled_dot_product_attention,
    "dropout_mask": _dropout_mask,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "add_layer_norm": _add_layer_norm,
    "add_rms_norm": _add_rms_norm,
    "layer_norm_fn": _layer_norm_fn,
    "rotary": _rotary,
    "apply_rotary_emb": _apply_rotary_emb,
    "apply_rotary_pos_emb": _apply_rotary_pos_emb,
    "qk_norm_rotary": _qk_norm_rotary,
    "rotary_cos_sin": _rotary_cos_sin,
    "linear": _linear,
    "feed_forward": _feed_forward,
    "cross_entropy": _cross_entropy,
    "cross_entropy_with_stats": _cross_entropy_with_stats,
    "linear_cross_entropy": _linear_cross_entropy,
    "linear_cross_entropy_with_stats": _linear_cross_entropy_with_stats,
    "kl_div": _kl_div,
    "jsd": _jsd,
    "linear_jsd": _linear_jsd,
}
NO_LAUNCH = {"rotary_cos_sin"}
NOT_OPS = {"ArgumentError", "ArgumentIndexError", "ArgumentTypeError", "BackendUnavailableError",
           "available_backends", "get_backend", "set_backend", "use_backend", "nn",
           "patch", "unpatch"}


def test_every_public_op_has_a_case():
    """A public op added to fastlm.__all__ gets a case here, or this fails."""
    assert set(fastlm.__all__) - NOT_OPS <= set(CASES), sorted(set(fastlm.__all__) - NOT_OPS - set(CASES))


@pytest.mark.parametrize("op", sorted(CASES))
def test_every_launch_fits_cudas_grid_limits(op, launches):
    with fastlm.use_backend("triton"):
        CASES[op]()
    if op in NO_LAUNCH:
        assert launches == []
        return
    assert launches, f"{op} launched no Triton kernel: the case does not test anything"
    bad = [(name, grid) for name, grid in launches
           if not (1 <= grid[0] <= AXIS0_MAX and 1 <= grid[1] <= AXIS12_MAX and 1 <= grid[2] <= AXIS12_MAX)]
    assert not bad, (f"{op}: grids past CUDA's limits (axis 0 <= {AXIS0_MAX}, axes 1, 2 <= {AXIS12_MAX}): "
                     f"{sorted(set(bad))}")


def test_attention_refuses_a_grid_past_axis_0():
    """Past 2^31 - 1 programs even axis 0 overflows: a clear error, not a failed launch."""
    from fastlm.kernels import attention as kernels
    assert kernels._grid(2 ** 15, 2 ** 16 - 1) == (2 ** 31 - 2 ** 15,)
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        kernels._grid(2 ** 15, 2 ** 16)


def test_the_recorder_sees_a_grid_past_the_limits(launches):
    """The check above can fail: a launch with 65536 programs on axis 1 is recorded as such."""
    from fastlm.kernels import attention as kernels
    kernels._dropout_mask_kernel[(1, BIG, 1)](None)
    assert launches == [("_dropout_mask_kernel", (1, BIG, 1))]


# ----------------------------------------------------------------------------- recompilation

# Sizes that change from call to call (sequence lengths, packed row counts, the strides of
# outputs sized by them) must not be specialised: Triton compiles one variant per value of
# "== 1" and "divisible by 16" of every int it specialises, so a length that moves between
# 47 and 48 compiles the kernel again. Under the interpreter nothing compiles, so this test
# computes what Triton's launcher would: the specialization key (the part of the compiled
# kernel's cache key that depends on the arguments), with Triton's own binder for a GPU
# target, from the arguments the op really passes at two lengths. Equal keys mean the GPU
# reuses the compiled kernel; test_second_length_reuses_the_compiled_kernel_on_gpu counts
# the real compilations where there is a GPU.

@pytest.fixture
def launch_args(monkeypatch):
    """(kernel, args, kwargs) of every launch while the test runs; no program runs."""
    recorded = []

    def getitem(self, grid):
        return lambda *args, **kwargs: recorded.append((self, args, kwargs))

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    return recorded


def _specialization(kernel, args, kwargs):
    """Triton's specialization of a launch of ``kernel`` (a JITFunction, or the interpreter's
    stand-in rebuilt as one with the same do_not_specialize lists) for an sm_90 target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):
        options = {k: kernel.kwargs.get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
        kernel = JITFunction(kernel.fn, **options)
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, options = binder(*args, **kwargs)
    return kernel.fn.__name__, repr(specialization), sorted(options.items())


def _attention_dense(n, D=16):
    q, k, v = (_rand(2, n, 2, D, grad=True) for _ in range(3))
    _backward(fastlm.flash_attn_func(q, k, v, causal=True))


def _attention_decode(n):
    q, k, v = _rand(2, 1, 2, 16, grad=True), _rand(2, n, 2, 16, grad=True), _rand(2, n, 2, 16, grad=True)
    _backward(fastlm.flash_attn_func(q, k, v, causal=True))


def _attention_varlen(n):
    cu = torch.tensor([0, 5, n], dtype=torch.int32, device=DEVICE)
    q, k, v = (_rand(n, 2, 16, grad=True) for _ in range(3))
    _backward(fastlm.flash_attn_varlen_func(q, k, v, cu, cu, n - 5, n - 5, dropout_p=0.1, causal=True))


def _attention_sdpa(n):
    q, k, v = (_rand(2, 2, n, 16, grad=True) for _ in range(3))
    _backward(fastlm.scaled_dot_product_attention(q, k, v, dropout_p=0.1))


def _attention_kvcache(n):
    k_cache, v_cache = _rand(2, 64, 2, 16), _rand(2, 64, 2, 16)
    fastlm.flash_attn_with_kvcache(_rand(2, n, 2, 16), k_cache, v_cache, _rand(2, n, 2, 16), _rand(2, n, 2, 16),
                                   cache_seqlens=64 - n)


def _dropout_mask_of(n):
    attn_ops.dropout_mask(torch.tensor([7], dtype=torch.int64), 2, 2, n, n + 1, 0.25, "triton", DEVICE)


def _rotary_of(n):
    cos, sin = fastlm.rotary_cos_sin(64, 16, device=DEVICE)
    _backward(fastlm.rotary(_rand(2, n, 2, 16, grad=True), cos, sin,
                            position_ids=torch.randint(0, 64, (2, n), device=DEVICE)))


VARYING = {"attention": _attention_dense, "attention decode": _attention_decode, "varlen": _attention_varlen,
           "sdpa": _attention_sdpa, "kv cache": _attention_kvcache, "dropout mask": _dropout_mask_of,
           "rotary": _rotary_of}


def _keys(launch_args, run, n):
    launch_args.clear()
    with fastlm.use_backend("triton"):
        run(n)
    assert launch_args, "nothing launched: the test would prove nothing"
    return [_specialization(*launch) for launch in launch_args]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the compilations are counted (the test below)")
@pytest.mark.parametrize("what", sorted(VARYING))
def test_a_second_length_has_the_same_specialization(what, launch_args):
    # 48 is divisible by 16 and 47 is not: a specialised length gives two keys. Both take the
    # same tiles (every BLOCK constexpr equal), so only the lengths' ints differ.
    first = _keys(launch_args, VARYING[what], 47)
    second = _keys(launch_args, VARYING[what], 48)
    assert [k[0] for k in first] == [k[0] for k in second]
    for a, b in zip(first, second):
        assert a == b, f"{a[0]} would compile again for the second length:\n{a[1]}\n{b[1]}"


@pytest.mark.skipif(ON_GPU, reason="on a GPU the compilations are counted (the test below)")
def test_the_specialization_sees_a_specialised_int(launch_args):
    """The comparison above can fail: the head dim (specialised, it never changes in a
    model) gives different keys for 16 and 24 (16 divides one of them), same tiles (32)."""
    a = _keys(launch_args, lambda n: _attention_dense(n, D=16), 47)
    b = _keys(launch_args, lambda n: _attention_dense(n, D=24), 47)
    assert a[0][0] == b[0][0] == "_attn_fwd_kernel" and a[0] != b[0]


@pytest.mark.gpu
def test_second_length_reuses_the_compiled_kernel_on_gpu():
    """On a GPU, the real count: the forward kernel's compiled-kernel cache grows once for
    the first call and not for the next lengths."""
    from fastlm.kernels import attention as kernels

    def compiled():
        return sum(len(cache[0]) for cache in kernels._attn_fwd_kernel.device_caches.values())

    q, k, v = (torch.randn(2, 47, 2, 64, device=DEVICE, dtype=torch.float16) for _ in range(3))
    fastlm.flash_attn_func(q, k, v, causal=True)
    start = compiled()
    for n in (48, 49, 64, 1, 100):
        q, k, v = (torch.randn(2, n, 2, 64, device=DEVICE, dtype=torch.float16) for _ in range(3))
        fastlm.flash_attn_func(q, k, v, causal=True)
    assert compiled() == start
