"""The inference paths of the attention kernels (ALiBi, sinks, the paged cache, cache_leftpad,
split-KV) against the faults a GPU would have that the interpreter can show (found by a review
of those kernels; each test failed before its fix):

- Index tensors (block_table, cache_leftpad, cache_seqlens, cu_seqlens) are read by the
  kernels with unit stride (``BT + slot``, ``LEFTPAD_K + b``, ``SEQUSED_K + b``, ``CU_Q + b``):
  a strided or expanded one gives wrong keys (and an expanded one reads past its storage).
  (fixed: made contiguous before the launch)
- split_heuristic (num_splits=0) asks torch.cuda for the SM count on every call, fails on a CPU
  tensor under FASTLM_GPU_TILES=1 and divides by zero for an empty batch.
- num_splits is not capped (flash-attn refuses > 128): the split grid's axis 1 (CUDA's limit
  65535) and the float32 partials (num_splits x the output) grow with the cache.
- The combine kernel's launch settings at head dim 256 spill on sm_80 / sm_90, and
  gpu_compile_variants does not hold the inference variants that are launched (combine at
  head dims other than 128, float32 paged / split, packed queries over a paged cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import fastlm
from fastlm.kernels import attention as kern
from fastlm.kernels import launch

from .conftest import DEVICE
from .test_attention_kvcache import _paged


def _kvcache(backend, q, k_cache, v_cache, **kw):
    with fastlm.use_backend(backend):
        return fastlm.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), return_softmax_lse=True, **kw)


def _close(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- index tensors' strides

def test_block_table_with_strided_columns():
    """CURRENTLY FAILS. A block_table whose columns are not adjacent (a column slice of a wider
    table, or a transposed one) holds the same pages: the same answer as its contiguous copy.
    The kernel reads ``BT + slot`` (unit column stride) while it is passed only the row stride."""
    B, S_max, H, Hk, D, page = 3, 64, 2, 1, 16, 16
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    kp, vp, table = _paged(k_cache, v_cache, page)
    q = torch.randn(B, 1, H, D, device=DEVICE)
    lens = torch.tensor([17, 40, 64], dtype=torch.int32, device=DEVICE)
    wide = torch.zeros(B, 2 * table.shape[1], dtype=torch.int32, device=DEVICE)
    wide[:, ::2] = table
    transposed = table.t().contiguous().t()
    want = _kvcache("triton", q, kp, vp, cache_seqlens=lens, block_table=table)
    _close(want, _kvcache("torch", q, kp, vp, cache_seqlens=lens, block_table=table))
    for strided in (wide[:, ::2], transposed):
        assert strided.stride(1) != 1 and torch.equal(strided, table)
        _close(_kvcache("triton", q, kp, vp, cache_seqlens=lens, block_table=strided), want)


def test_cache_leftpad_not_contiguous():
    """CURRENTLY FAILS. cache_leftpad as a strided view, or one value expanded over the batch
    (stride 0: the kernel's ``LEFTPAD_K + b`` reads past its one element), pads like its
    contiguous copy."""
    B, S_max, H, Hk, D = 4, 64, 2, 1, 16
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    q = torch.randn(B, 1, H, D, device=DEVICE)
    lens = torch.tensor([40, 50, 60, 64], dtype=torch.int32, device=DEVICE)
    strided = torch.tensor([[3, 99], [5, 99], [7, 99], [9, 99]], dtype=torch.int32, device=DEVICE)[:, 0]
    expanded = torch.tensor([5], dtype=torch.int32, device=DEVICE).expand(B)
    for pad in (strided, expanded):
        want = _kvcache("triton", q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=pad.contiguous())
        _close(want, _kvcache("torch", q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=pad))
        _close(_kvcache("triton", q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=pad), want)


def test_cache_seqlens_not_contiguous():
    """CURRENTLY FAILS (older than these commits, same cause). An int32 cache_seqlens that is a
    strided view or an expanded scalar gives each batch its own length, as its contiguous copy."""
    B, S_max, H, Hk, D = 4, 64, 2, 1, 16
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    q = torch.randn(B, 1, H, D, device=DEVICE)
    strided = torch.tensor([[40, 1], [50, 1], [60, 1], [64, 1]], dtype=torch.int32, device=DEVICE)[:, 0]
    expanded = torch.tensor([33], dtype=torch.int32, device=DEVICE).expand(B)
    for lens in (strided, expanded):
        want = _kvcache("triton", q, k_cache, v_cache, cache_seqlens=lens.contiguous())
        _close(want, _kvcache("torch", q, k_cache, v_cache, cache_seqlens=lens))
        _close(_kvcache("triton", q, k_cache, v_cache, cache_seqlens=lens), want)


def test_varlen_paged_cu_seqlens_not_contiguous():
    """CURRENTLY FAILS (_check_cu returns an int32 view as it is; flash_attn_varlen_func without a
    block_table has the same cause). Offsets given as a strided view: the same answer as
    their contiguous copy, over a paged cache."""
    H, Hk, D, page, per = 2, 1, 16, 16, 3
    lq, lk = [3, 1, 17], [20, 1, 40]
    q = torch.randn(sum(lq), H, D, device=DEVICE)
    dense_k = torch.randn(3, per * page, Hk, D, device=DEVICE)
    dense_v = torch.randn(3, per * page, Hk, D, device=DEVICE)
    kp, vp, table = _paged(dense_k, dense_v, page)
    cu_q = torch.tensor([0, 3, 4, 21], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 21, 61], dtype=torch.int32, device=DEVICE)

    def strided(t):
        wide = torch.zeros(t.numel(), 2, dtype=torch.int32, device=DEVICE)
        wide[:, 0] = t
        return wide[:, 0]

    with torch.no_grad(), fastlm.use_backend("triton"):
        want = fastlm.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 17, 40, causal=True, block_table=table,
                                             return_lse=True)
        got = fastlm.flash_attn_varlen_func(q, kp, vp, strided(cu_q), strided(cu_k), 17, 40, causal=True,
                                            block_table=table, return_lse=True)
    _close(got, want)


def test_varlen_paged_does_not_copy_the_cache():
    """CURRENTLY FAILS. vLLM lays a paged cache out as (num_blocks, 2, page, Hk, D): k = kv[:, 0] and
    v = kv[:, 1] are views whose page and row dims do not merge, so _varlen_paged's argument check
    ``_check_qkv(fn, q, k.flatten(0, 1), v.flatten(0, 1))`` clones both whole caches on every call
    (on a GPU whose memory the cache fills: out of memory). The Triton path copies no cache-sized
    tensor; checking one page (k[0], v[0]: (page, Hk, D), packed) checks the same things."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Clones(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.seen = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default) and \
                    isinstance(out, torch.Tensor) and out.numel() >= self.numel:
                self.seen.append(str(func))
            return out

    pages, page, H, Hk, D = 6, 16, 2, 1, 16
    kv = torch.randn(pages, 2, page, Hk, D, device=DEVICE)
    k, v = kv[:, 0], kv[:, 1]
    q = torch.randn(3, H, D, device=DEVICE)
    cu_q = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 21, 61], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 2, 0]], dtype=torch.int32, device=DEVICE)
    with torch.no_grad(), fastlm.use_backend("triton"):
        want = fastlm.flash_attn_varlen_func(q, k.contiguous(), v.contiguous(), cu_q, cu_k, 1, 40, block_table=table)
        spy = Clones(k.numel())
        with spy:
            got = fastlm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 40, block_table=table)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not spy.seen, spy.seen


# ----------------------------------------------------------------------------- split_heuristic

@pytest.fixture
def fake_cuda_props(monkeypatch):
    """torch.cuda.get_device_properties answering 132 SMs, counting its calls; the launch
    module's SM-count cache is emptied before and after, so no fake count outlives the test."""
    calls = []

    def props(device=None):
        calls.append(device)
        return SimpleNamespace(multi_processor_count=132, name="fake")
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    launch._sm_count.cache_clear()
    yield calls
    launch._sm_count.cache_clear()


def test_split_heuristic_queries_the_device_once(fake_cuda_props):
    """CURRENTLY FAILS (3 queries). num_splits=0 runs the heuristic on every decode step: the SM
    count is a per-device constant, to be asked once (launch._sm_count caches it) rather than
    through torch.cuda.get_device_properties each call (host time, issue 17)."""
    dev = torch.device("cuda", 0)
    picks = [kern.split_heuristic(1, 8, 1, 8192, dev) for _ in range(3)]
    assert picks[0] > 1 and picks == picks[:1] * 3
    assert len(fake_cuda_props) <= 1


def test_split_heuristic_under_gpu_tiles_and_for_empty_batches(fake_cuda_props):
    """CURRENTLY FAILS. Under FASTLM_GPU_TILES=1 a CPU tensor gets the GPU's launch settings (the
    nominal SM count, as persistent_programs): the heuristic must not ask torch.cuda about a CPU
    device ("Torch not compiled with CUDA"). An empty batch or no heads (0 programs) must not
    divide by zero (2 * SMs // programs)."""
    with launch.use_gpu_tiles():
        assert kern.split_heuristic(1, 2, 1, 4096, torch.device("cpu")) > 1
        assert kern.split_heuristic(0, 2, 1, 4096, torch.device("cpu")) >= 1
    assert not [d for d in fake_cuda_props if torch.device(d if d is not None else "cuda").type == "cpu"]
    for B, H in ((0, 8), (4, 0)):
        assert kern.split_heuristic(B, H, 1, 4096, torch.device("cuda", 0)) >= 1


def test_kvcache_default_num_splits_under_gpu_tiles():
    """CURRENTLY FAILS. flash_attn_with_kvcache's default num_splits=0 on the Triton backend with
    the GPU's launch settings (what fastlm bench static and tests/test_gpu_tiles.py use) runs,
    and equals the reference."""
    B, S_max, H, Hk, D = 1, 64, 2, 1, 16
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    q = torch.randn(B, 1, H, D, device=DEVICE)
    lens = torch.tensor([50], dtype=torch.int32, device=DEVICE)
    want = _kvcache("torch", q, k_cache, v_cache, cache_seqlens=lens)
    with launch.use_gpu_tiles():
        got = _kvcache("triton", q, k_cache, v_cache, cache_seqlens=lens)
    _close(got, want)


# ----------------------------------------------------------------------------- launches (recorded, not run)

class _Recorder:
    """Stands in for a Triton kernel: records (grid, keyword arguments) of each launch, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.launches.append((grid, kwargs))
        return launch_


@pytest.fixture
def recorded(monkeypatch):
    fwd, combine = _Recorder(), _Recorder()
    monkeypatch.setattr(kern, "_attn_fwd_kernel", fwd)
    monkeypatch.setattr(kern, "_attn_combine_kernel", combine)
    return fwd, combine


def test_num_splits_is_capped(recorded):
    """CURRENTLY FAILS. num_splits is only bounded by the key blocks: num_splits=1000 over a long
    cache launches 300 splits (grid axis 1, which CUDA caps at 65535 and the combine loop walks,
    with num_splits float32 copies of the output). flash-attn refuses num_splits > 128; either
    a ValueError naming num_splits or at most 128 splits."""
    fwd, _ = recorded
    k_cache = torch.randn(1, 16 * 300, 1, 16, device=DEVICE)
    q = torch.randn(1, 1, 1, 16, device=DEVICE)
    try:
        with fastlm.use_backend("triton"):
            fastlm.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=16 * 300, num_splits=1000)
    except ValueError as err:
        assert "num_splits" in str(err)
        return
    grid = fwd.launches[-1][0]
    assert len(grid) == 1 or grid[1] <= 128, grid


def _decode_launches(recorded, dtype, D, paged=True, splits=2, varlen=False):
    """The launches the Triton backend makes, with the GPU's settings, for one decode step."""
    fwd, combine = recorded
    B, S_max, H, Hk, page = 2, 512, 4, 2, 256
    q = torch.randn(B, 1, H, D, device=DEVICE, dtype=dtype)
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE, dtype=dtype)
    with launch.use_gpu_tiles(), fastlm.use_backend("triton"), torch.no_grad():
        if varlen:
            kp = k_cache.reshape(B * S_max // page, page, Hk, D)
            table = torch.arange(B * S_max // page, dtype=torch.int32, device=DEVICE).reshape(B, -1)
            cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
            fastlm.flash_attn_varlen_func(q.flatten(0, 1), kp, kp.clone(), cu, cu * 100, 1, 200, block_table=table)
        elif paged:
            kp = k_cache.reshape(B * S_max // page, page, Hk, D)
            table = torch.arange(B * S_max // page, dtype=torch.int32, device=DEVICE).reshape(B, -1)
            fastlm.flash_attn_with_kvcache(q, kp, kp.clone(), cache_seqlens=300, block_table=table,
                                           num_splits=splits)
        else:
            fastlm.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=300, num_splits=splits)
    return fwd.launches, combine.launches


_FWD_KEYS = ("VARLEN", "PAGED", "SPLIT", "IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")


_VARIANTS: list = []


def _variants(name):
    """gpu_compile_variants() as compile_check sees it (it reads the kernels' parameters, which
    the interpreter's functions lack): (constexprs, options) of kernel ``name``."""
    if not _VARIANTS:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("import json; from fastlm.kernels import attention as A\n"
                "print(json.dumps([[k.__name__, c, o] for k, s, c, o in A.gpu_compile_variants()]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        _VARIANTS.extend(json.loads(out.stdout.splitlines()[-1]))
    return [(const, opts) for kernel, const, opts in _VARIANTS if kernel == name]


@pytest.mark.parametrize("D", [64, 128, 256])
def test_compile_variants_hold_the_combine_launches(recorded, D):
    """CURRENTLY FAILS for head dims 64 and 256. compile_check compiles what gpu_compile_variants
    lists; the merge kernel is launched with BLOCK_DV = the head dim, but only 128 is listed."""
    _, combine = _decode_launches(recorded, torch.bfloat16, D)
    assert combine, "num_splits=2 launched no merge"
    kw = combine[-1][1]
    launched = (kw["BLOCK_M"], kw["BLOCK_DV"], kw.get("num_warps", 4))
    listed = {(c["BLOCK_M"], c["BLOCK_DV"], o.get("num_warps", 4)) for c, o in _variants("_attn_combine_kernel")}
    assert launched in listed, (launched, listed)


@pytest.mark.parametrize("case", ["fp32-paged-split", "fp32-dense-split", "bf16-dense-split", "bf16-varlen-paged"])
def test_compile_variants_hold_the_inference_launches(recorded, case):
    """CURRENTLY FAILS. Split-KV decoding over a dense cache (bfloat16: the default num_splits=0
    splits a decode step with few heads), float32 (IEEE, torch's default) split decoding over a
    paged or dense cache, and packed queries over a paged cache (VARLEN with PAGED) are launched,
    but no variant of gpu_compile_variants has those constexprs: compile_check never compiles them."""
    dtype = torch.float32 if case.startswith("fp32") else torch.bfloat16
    fwd, _ = _decode_launches(recorded, dtype, 128, paged="dense" not in case, varlen="varlen" in case)
    kw = fwd[-1][1]
    launched = tuple(kw[k] for k in _FWD_KEYS) + (kw["num_warps"],)
    listed = {tuple(c[k] for k in _FWD_KEYS) + (o["num_warps"],) for c, o in _variants("_attn_fwd_kernel")}
    assert launched in listed, (dict(zip(_FWD_KEYS + ("num_warps",), launched)))


_COMPILE = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastlm.kernels import attention as kern
    from fastlm.kernels.compile_check import stack_bytes
    const, opts = json.loads(sys.argv[1])
    kernel = kern._attn_combine_kernel
    # As a launch specialises them: contiguous outputs and partials (unit head-dim stride, a
    # constexpr), 16-byte aligned pointers, 16-divisible strides of specialised ints.
    pointers = {"OP": "*fp32", "LSEP": "*fp32", "O": "*bf16", "LSE": "*fp32", "SINKS": "*fp32", "CU_Q": "*i32"}
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            continue
        if p.name in pointers:
            sig[p.name] = pointers[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in ("stride_od", "stride_pd"):
            sig[p.name] = "constexpr"
            const[p.name] = 1
        else:
            sig[p.name] = "i32"
            if not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    stacks = {}
    for arch in (80, 90):
        c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=opts)
        stacks[arch] = stack_bytes(c.asm["cubin"])
    print(json.dumps(stacks))
""")


def test_combine_launch_at_head_dim_256_does_not_spill(recorded):
    """CURRENTLY FAILS (320 B of stack on sm_90, 312 B on sm_80). The merge kernel as the launcher
    sets it up at head dim 256 (64 rows x 256 float32 accumulator and partial over 4 warps),
    compiled for sm_80 and sm_90 with a launch's specialisation, has no stack frame. 8 warps
    (or 32 rows) past head dim 128 spill nothing."""
    _, combine = _decode_launches(recorded, torch.bfloat16, 256)
    kw = combine[-1][1]
    const = {k: kw[k] for k in ("VARLEN", "SINK", "BLOCK_M", "BLOCK_DV")}
    opts = {"num_warps": kw.get("num_warps", 4)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps([const, opts])], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    stacks = json.loads(out.stdout.strip().splitlines()[-1])
    assert stacks == {"80": 0, "90": 0}, (const, opts, stacks)
