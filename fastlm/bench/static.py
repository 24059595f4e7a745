"""The "static" suite: what the compiler and an exact byte count say, without a GPU (issue 19).

    python -m fastlm.bench static [--quick] [--ops norm cross_entropy rotary attention ffn]
    python -m fastlm.bench.static compile [--arch 90 80] [--only REGEX] [--hot]   (worker; JSON rows)
    python -m fastlm.bench.static bytes [--only REGEX]                            (worker; JSON rows)

compile: every Triton kernel variant the benchmark shapes and the models launch, found by
calling the real launchers (kernels/norm.py, cross_entropy.py, rotary.py, attention.py,
matmul.py) with FASTLM_GPU_TILES=1 on CPU tensors of the real shapes (``torch.empty``: no
memory is touched) and catching each ``kernel[grid](...)`` before it runs. The caught
arguments go through Triton's own binder for the target (``create_function_from_signature``
and ``JITFunction._pack_args``), so the variant has exactly the specialisation a launch on
the GPU gets: 16-divisible pointers, strides and sizes (``tt.divisibility`` attributes) and
unit strides as constants. Each variant is compiled for sm_90 and sm_80 and reported with
its registers, stack (a Triton kernel has no local arrays: stack means spilled registers;
ptxas -v's spill stores are read when there is a stack), shared memory, CTAs per SM (from
registers, shared memory, warps) and the SASS's HGMMA (wgmma, sm_90) and HMMA counts.
Results are cached by the kernel's source hash (Triton's cache_key, which covers the jit
functions it calls) and the variant key in $FASTLM_STATIC_CACHE (default
~/.cache/fastlm/static), so a rerun only reads JSON.

bytes: the memory-bound ops at small but block-realistic shapes (FASTLM_GPU_TILES=1) run
under the Triton interpreter with its load/store wrapped; every element a launch loads or
stores is counted (its mask applied). Reported per op and pass: bytes requested, distinct
bytes touched, and the minimum an ideal kernel moves (each input read once, each output
written once), with requested / minimum as ``bytes_ratio``. Requested bytes include re-reads
that a GPU's L2 would serve (a weight row read by every program); distinct bytes do not.
The norm backward's minimum counts one weight gradient, not the per-program partials the
kernel writes; the nominal SM count is scaled so that a program gets as many rows as at the
benchmark shape (4096 rows over 132 SMs x 4), so the partials weigh what they weigh there.
The figures are Triton-version specific (3.6 and 3.9 allocate registers differently).

Both workers run in subprocesses: compiling needs TRITON_INTERPRET unset and counting needs
it set, and either must hold when fastlm.kernels is first imported.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

# Shared memory: a block's opt-in maximum, and an SM's total (A100 164 KiB, H100 228 KiB).
SHARED_LIMIT = {80: 166912, 90: 232448}
SHARED_PER_SM = {80: 167936, 90: 233472}
RESERVED_SHARED_PER_CTA = 1024  # the driver's per-block reservation (sm_80 and later)
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 65536, 64, 32

CACHE_ENV = "FASTLM_STATIC_CACHE"
FIGURES_VERSION = 2  # part of the cache key: bump it when compile_variant's figures change

# Extra table columns for this suite's rows (the runner drops columns no row fills, so the
# other suites' tables do not change).
COLUMNS = (("kernel", "kernel"), ("arch", "arch"), ("warps", "warps"), ("stages", "stages"),
           ("regs", "regs"), ("stack", "stack B"), ("spill_stores", "spill st B"),
           ("smem", "smem B"), ("ctas_per_sm", "CTAs/SM"), ("hgmma", "HGMMA"), ("hmma", "HMMA"),
           ("launches", "launches"), ("loaded", "loaded B"), ("stored", "stored B"), ("memory", "memory B"),
           ("ideal", "ideal B"), ("bytes_ratio", "requested ratio"), ("memory_ratio", "memory ratio"),
           ("by_tensor", "requested / memory per tensor"))


# ----------------------------------------------------------------------------- launch cases
# A case: (family, op, mode, shape label, dtype name, fn) where fn() calls the real launchers.

def _dt(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


NORM_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
NORM_WIDTHS = (768, 1024, 2048, 4096, 8192, 16384)   # fastlm/bench/norm.py's GPU widths, GPT-2's, and 16384
NORM_ROWS = 4096
CE_SHAPES = ((4096, 32000), (4096, 50257), (4096, 128256), (4096, 256000))  # fastlm/bench/ce.py's GPU_CE vocabularies
# (batch, seqlen, heads, head dim, rotary dim, interleaved, model): fastlm/bench/rope.py's GPU
# shapes (full rotary), GPT-NeoX (head dim 128, rotary 32) and GPT-J (head dim 256, rotary 64,
# interleaved); model: as fastlm/models/gpt.py calls it, q a view of the packed qkv projection
# and position ids (S,).
ROPE_SHAPES = ((1, 4096, 32, 128, 128, False, False), (16, 1024, 12, 64, 64, False, False),
               (8, 2048, 32, 128, 32, False, False), (8, 2048, 16, 256, 64, True, False),
               (8, 2048, 32, 128, 32, False, True), (8, 2048, 16, 256, 64, True, True))
ATTN_SHAPES = ((8, 2048, 16, 64), (8, 2048, 16, 128))   # fastlm/bench/attention.py: 16384 tokens, d_model 2048
# The attention calls beyond plain causal, as fastlm/ops/attention.py passes them to the kernels
# (at ATTN_SHAPES' head dims): name -> options of one call. Models: GPT (causal, dropout while
# training, grouped-query heads), BERT and the encoder-decoder (packed sequences with dropout);
# users: SDPA's float masks with and without their gradient ((B, 1, 1, S) padding, (1, H, L, S)
# T5 / ALiBi-like, full-size), sliding windows (Mistral), soft-capping (Gemma 2).
ATTN_VARIANTS = {
    "causal": dict(window=(-1, 0)),
    "full": dict(window=(-1, -1)),
    "causal dropout 0.1": dict(window=(-1, 0), dropout=0.1),
    "causal gqa 4 kv heads": dict(window=(-1, 0), groups=4),
    "sliding window 1024 causal": dict(window=(1023, 0)),
    "softcap 50 causal": dict(window=(-1, 0), softcap=50.0),
    "padding mask (B,1,1,S)": dict(window=(-1, -1), mask=("B", 1, 1, "S")),
    "padding mask (B,1,1,S) with grad": dict(window=(-1, -1), mask=("B", 1, 1, "S"), bias_grad=True),
    "t5 bias (1,H,L,S) with grad": dict(window=(-1, -1), mask=(1, "H", "L", "S"), bias_grad=True),
    "full mask (B,H,L,S) with grad": dict(window=(-1, -1), mask=("B", "H", "L", "S"), bias_grad=True),
    "varlen dropout 0.1": dict(window=(-1, -1), varlen=True, dropout=0.1),
    "varlen causal": dict(window=(-1, 0), varlen=True),
}
# Other head dims (d_model 2048), plain causal and as the models that use them call them
# (Gemma 2: head dim 256, soft-capping, sliding window), and float32 inputs (IEEE float32 dots,
# torch's default, and TF32 when torch's matmul setting allows it).
ATTN_MORE = (((8, 2048, 64, 32), ("causal",)),
             ((8, 2048, 8, 256), ("causal", "softcap 50 causal", "sliding window 1024 causal")))
ATTN_FP32 = (((8, 2048, 16, 64), ("causal", "causal dropout 0.1")), ((8, 2048, 16, 128), ("causal",)))
FFN_SHAPES = ((8192, 768), (8192, 4096))                # fastlm/bench/ffn.py (tokens, d_model), hidden 4 x d_model


def _norm_cases(dtypes, widths=NORM_WIDTHS, rows=NORM_ROWS, empty=None):
    import torch
    from fastlm.kernels import norm as K
    new = empty or torch.empty
    cases = []
    for dt in dtypes:
        for n in widths:
            for op in NORM_OPS:
                rms, add = "rms" in op, op.startswith("add")

                def fwd(n=n, dt=dt, rms=rms, add=add):
                    x = new(rows, n, dtype=_dt(dt))
                    r = new(rows, n, dtype=_dt(dt)) if add else None
                    w, b = new(n, dtype=torch.float32), (None if rms else new(n, dtype=torch.float32))
                    K.norm_fwd(x, r, w, b, 1, 1e-5, rms, keep_sum=add)

                def bwd(n=n, dt=dt, rms=rms, add=add):
                    x, dy = new(rows, n, dtype=_dt(dt)), new(rows, n, dtype=_dt(dt))
                    ds = new(rows, n, dtype=_dt(dt)) if add else None
                    w, b = new(n, dtype=torch.float32), (None if rms else new(n, dtype=torch.float32))
                    mean, rstd = new(rows, dtype=torch.float32), new(rows, dtype=torch.float32).abs() + 0.5
                    K.norm_bwd(dy, ds, x, w, b, mean, rstd, 1, rms)

                shape = f"{rows}x{n}"
                cases += [("norm", op, "fwd", shape, dt, fwd), ("norm", op, "bwd", shape, dt, bwd)]
    return cases


def _ce_cases(dtypes, shapes=CE_SHAPES, empty=None, target_fill=None):
    import torch
    from fastlm.kernels import cross_entropy as K
    new = empty or torch.empty
    cases = []
    for dt in dtypes:
        for rows, vocab in shapes:
            def targets(rows=rows, vocab=vocab):
                return target_fill(rows, vocab) if target_fill else torch.zeros(rows, dtype=torch.int64)

            def fwd(rows=rows, vocab=vocab, dt=dt, targets=targets):
                K.cross_entropy_fwd(new(rows, vocab, dtype=_dt(dt)), targets(), None, -100, 0.0, 0.0, 0.0)

            def bwd(rows=rows, vocab=vocab, dt=dt, targets=targets):
                logits = new(rows, vocab, dtype=_dt(dt))
                lse = new(rows, dtype=torch.float32)
                coef = new(rows, dtype=torch.float32)
                K.cross_entropy_bwd(new(rows, dtype=torch.float32), logits, targets(), None, lse, coef,
                                    -100, 0.0, 0.0)

            shape = f"{rows}x{vocab}"
            cases += [("cross_entropy", "cross_entropy", "fwd", shape, dt, fwd),
                      ("cross_entropy", "cross_entropy", "bwd", shape, dt, bwd)]
    return cases


def _rope_cases(dtypes, shapes=ROPE_SHAPES, empty=None):
    import torch
    from fastlm.kernels import rotary as K
    new = empty or torch.empty
    cases = []
    for dt in dtypes:
        for b, s, h, d, rot, inter, model in shapes:
            def call(conj, b=b, s=s, h=h, d=d, rot=rot, inter=inter, model=model, dt=dt):
                if model:  # q of a packed (B, S, 3H, D) projection, as fastlm/models/gpt.py splits it
                    x = new(b, s, 3 * h, d, dtype=_dt(dt))[:, :, :h]
                    pos = torch.arange(s)
                else:
                    x, pos = new(b, s, h, d, dtype=_dt(dt)), None
                cos, sin = new(s, rot // 2, dtype=torch.float32), new(s, rot // 2, dtype=torch.float32)
                K.rotary_fwd(x, cos, sin, pos, interleaved=inter, conjugate=conj)

            shape = (f"{b}x{s}x{h}x{d} rot{rot}" + (" interleaved" if inter else "")
                     + (" qkv-view positions" if model else ""))
            cases += [("rotary", "rotary", "fwd", shape, dt, lambda c=call: c(False)),
                      ("rotary", "rotary", "bwd", shape, dt, lambda c=call: c(True))]
    return cases


def _attn_cases(dtypes, shapes=ATTN_SHAPES, variants=None):
    """variants: names in ATTN_VARIANTS; None: every variant (and ATTN_MORE, ATTN_FP32) for
    the full suite's shapes, the plain causal call for others (the hot list's)."""
    import torch
    from fastlm.kernels import attention as K
    full_suite = variants is None and shapes == ATTN_SHAPES
    if variants is None:
        variants = tuple(ATTN_VARIANTS) if full_suite else ("causal",)
    plan = [(dt, shape, name, False) for dt in dtypes for shape in shapes for name in variants]
    if full_suite:
        plan += [(dt, shape, name, False) for dt in dtypes for shape, names in ATTN_MORE for name in names]
        plan += [("fp32", shape, name, tf32) for shape, names in ATTN_FP32 for name in names for tf32 in (False, True)]

    def call(mode, dt, b, s, h, d, window, tf32, groups=1, dropout=0.0, softcap=0.0, mask=None, bias_grad=False,
             varlen=False):
        new = lambda *shape, dtype=_dt(dt): torch.empty(*shape, dtype=dtype)  # noqa: E731
        rows = (b * s,) if varlen else (b, s)
        q, k, v = new(*rows, h, d), new(*rows, h // groups, d), new(*rows, h // groups, d)
        sizes = {"B": b, "H": h, "L": s, "S": s}
        m = new(*(sizes.get(n, n) for n in mask)) if mask else None
        seed = torch.empty(1, dtype=torch.int64) if dropout else None
        packed = (torch.arange(b + 1, dtype=torch.int32) * s, torch.arange(b + 1, dtype=torch.int32) * s)
        lens = dict(cu_seqlens_q=packed[0], cu_seqlens_k=packed[1], max_seqlen_q=s, max_seqlen_k=s) if varlen else {}
        matmul = torch.backends.cuda.matmul
        before = matmul.allow_tf32
        matmul.allow_tf32 = tf32  # the launchers read torch's setting (IEEE float32 dots unless TF32 is allowed)
        try:
            if mode == "fwd":
                K.attention_fwd(q, k, v, d ** -0.5, False, *window, softcap, m, dropout, seed, **lens)
            else:
                out, dout = torch.empty_like(q), torch.empty_like(q)
                lse = torch.empty(*((h, b * s) if varlen else (b, h, s)), dtype=torch.float32)
                K.attention_bwd(dout, q, k, v, out, lse, d ** -0.5, False, *window, softcap, m, dropout, seed,
                                bias_grad=bias_grad, **lens)
        finally:
            matmul.allow_tf32 = before

    cases = []
    for dt, (b, s, h, d), name, tf32 in plan:
        options = ATTN_VARIANTS[name]
        shape = f"{b}x{s}x{h}x{d} {name}" + ((" tf32" if tf32 else " ieee") if dt == "fp32" else "")
        for mode in ("fwd", "bwd"):
            if mode == "fwd" and options.get("bias_grad"):
                continue  # the same forward as without the gradient
            cases.append(("attention", "attention", mode, shape, dt,
                          lambda mode=mode, dt=dt, b=b, s=s, h=h, d=d, tf32=tf32, options=options:
                          call(mode, dt, b, s, h, d, tf32=tf32, **options)))
    return cases


def _ffn_cases(dtypes, shapes=FFN_SHAPES):
    import torch
    from fastlm.kernels import matmul as K
    cases = []
    for dt in dtypes:
        for tokens, d in shapes:
            hidden = 4 * d

            def t(*shape, dt=dt):
                return torch.empty(*shape, dtype=_dt(dt))

            # As fastlm/ops/ffn.py calls the kernels: w_in (hidden or 2 hidden, d), w_out (d, hidden).
            def fwd(gated, tokens=tokens, d=d, hidden=hidden, t=t):
                x, w_out = t(tokens, d), t(d, hidden)
                if gated:
                    h, _ = K.gated_fwd(x, t(2 * hidden, d), None, "swiglu", save_gu=True)
                else:
                    h, _ = K.linear_fwd(x, t(hidden, d), t(hidden), "gelu_tanh", save_preact=True)
                K.linear_fwd(h, w_out, t(d), None)

            def bwd(gated, tokens=tokens, d=d, hidden=hidden, t=t):
                x, dy, h, w_out = t(tokens, d), t(tokens, d), t(tokens, hidden), t(d, hidden)
                if gated:
                    w_in = t(2 * hidden, d)
                    dpre, _ = K.matmul_dgated(dy, w_out.t(), t(tokens, 2 * hidden), "swiglu")
                else:
                    w_in = t(hidden, d)
                    dpre, _ = K.matmul_dact(dy, w_out.t(), t(tokens, hidden), "gelu_tanh")
                K.matmul(dy.t(), h.t())      # dw_out
                K.matmul(dpre, w_in.t())     # dx
                K.matmul(dpre.t(), x.t())    # dw_in

            shape = f"{tokens}x{d} hidden {hidden}"
            cases += [("ffn", "gelu_tanh", "fwd", shape, dt, lambda f=fwd: f(False)),
                      ("ffn", "gelu_tanh", "bwd", shape, dt, lambda f=bwd: f(False)),
                      ("ffn", "swiglu", "fwd", shape, dt, lambda f=fwd: f(True)),
                      ("ffn", "swiglu", "bwd", shape, dt, lambda f=bwd: f(True))]
    return cases


def _lce_cases(dtypes, shapes=CE_SHAPES[1:3]):
    """The fused linear cross-entropy's loss part: one chunk of logits (its default chunk at
    8192 tokens, hidden 4096), loss and gradient in one launch."""
    import torch
    from fastlm.kernels import cross_entropy as K
    from fastlm.ops.linear_cross_entropy import default_chunk_size
    cases = []
    for dt in dtypes:
        for _, vocab in shapes:
            rows = default_chunk_size(8192, 4096, vocab)

            def both(rows=rows, vocab=vocab, dt=dt):
                logits = torch.empty(rows, vocab, dtype=_dt(dt))
                K.cross_entropy_fwd_bwd(logits, torch.zeros(rows, dtype=torch.int64), None, -100, 0.0, 0.0, 0.0,
                                        torch.empty(()).expand(rows), out=logits)
            cases.append(("lce", "linear_cross_entropy (loss part)", "fwd+bwd", f"{rows}x{vocab}", dt, both))
    return cases


def _dact_cases(dtypes, shapes=((8192, 3072),)):
    """The standalone activation backward (a fastlm.nn linear with an activation whose output
    gradient comes from outside the FFN)."""
    import torch
    from fastlm.kernels import matmul as K
    return [("ffn", "dact gelu_tanh", "bwd", f"{m}x{n}", dt,
             lambda m=m, n=n, dt=dt: K.dact(torch.empty(m, n, dtype=_dt(dt)), torch.empty(m, n, dtype=_dt(dt)),
                                            "gelu_tanh"))
            for dt in dtypes for m, n in shapes]


def compile_cases(hot: bool = False) -> list:
    """Every launch case the suite compiles; ``hot``: the forward and backward kernels at the
    benchmark shapes in bf16 and fp16 (attention plain causal: its other variants, masks,
    dropout, varlen, head dims, float32, are the rest), what CI holds free of spills."""
    dtypes = ("bf16", "fp16")
    if hot:
        return (_norm_cases(dtypes) + _ce_cases(dtypes) + _lce_cases(dtypes) + _rope_cases(dtypes)
                + _attn_cases(dtypes, variants=("causal",)) + _ffn_cases(dtypes) + _dact_cases(dtypes))
    return (_norm_cases(dtypes) + _ce_cases(dtypes) + _lce_cases(dtypes) + _rope_cases(dtypes) + _attn_cases(dtypes)
            + _ffn_cases(dtypes) + _dact_cases(dtypes))


# ----------------------------------------------------------------------------- capturing launches

@contextlib.contextmanager
def capture_launches() -> Iterator[list]:
    """While active, ``kernel[grid](...)`` of every fastlm Triton kernel records
    (kernel, args, kwargs) instead of running. Needs TRITON_INTERPRET unset."""
    import triton
    from fastlm.kernels import attention, cross_entropy, matmul, norm, rotary
    kernels = []
    for module in (norm, cross_entropy, rotary, attention, matmul):
        for value in vars(module).values():
            if isinstance(value, triton.runtime.JITFunction) and value not in kernels:
                kernels.append(value)
    launches: list = []
    for k in kernels:
        k.run = (lambda k: lambda *args, grid, warmup, **kwargs: launches.append((k, args, kwargs)))(k)
    try:
        yield launches
    finally:
        for k in kernels:
            k.__dict__.pop("run", None)


def _variant(kernel, args, kwargs, arch: int):
    """(signature, constexprs, attrs, options) of a launch as Triton specialises it for sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _cache_dir() -> Path:
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastlm" / "static")
    path.mkdir(parents=True, exist_ok=True)
    return path


def ctas_per_sm(arch: int, regs: int, warps: int, smem: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in 256-register units),
    shared memory (plus the per-CTA reservation), warps and the CTA cap."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // warps
    by_smem = SHARED_PER_SM[arch] // (smem + RESERVED_SHARED_PER_CTA)
    return int(min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM))


def _ptxas(arch: int) -> list[str]:
    """The ptxas Triton uses for sm_<arch> and the flags that change its register allocation."""
    import inspect

    from triton.backends.nvidia import compiler
    tool = compiler.get_ptxas(arch).path if hasattr(compiler, "get_ptxas") else None
    if tool is None:
        from triton import knobs
        tool = knobs.nvidia.ptxas.path
    flags = ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(compiler) else []
    return [tool, *flags, f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}"]


def _inspect(compiled, arch: int) -> dict:
    """Registers, stack, spill stores and MMA instruction counts of a compiled kernel."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", "-sass", cubin],
                             capture_output=True, text=True, check=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+)", out)
        if found is None:
            raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-300:]!r}")
        regs, stack = int(found[1]), int(found[2])
        spill_stores = 0
        if stack:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run([*_ptxas(arch), "-v", ptx, "-o", os.path.join(tmp, "v.cubin")],
                                 capture_output=True, text=True).stderr
            m = re.search(r"(\d+) bytes spill stores", log)
            spill_stores = int(m[1]) if m else -1
    sass = [line for line in out.splitlines() if "/*" in line and ";" in line]
    return {"regs": regs, "stack": stack, "spill_stores": spill_stores,
            "hgmma": sum("HGMMA" in line for line in sass),
            "hmma": sum(re.search(r"\bHMMA\b", line) is not None for line in sass),
            "wgmma_ptx": compiled.asm["ptx"].count("wgmma.mma_async")}


def compile_variant(kernel, args, kwargs, arch: int) -> dict:
    """Figures of one launch compiled for sm_<arch>, from the cache when it has them."""
    import triton
    from triton.compiler import ASTSource
    target, signature, constexprs, attrs, options = _variant(kernel, args, kwargs, arch)
    opts = {k: v for k, v in sorted(options.__dict__.items()) if not callable(v)}
    key_doc = json.dumps([FIGURES_VERSION, kernel.cache_key, triton.__version__, arch, signature, repr(sorted(constexprs.items())),
                          repr(sorted(attrs.items())), repr(opts)], default=repr)
    key = hashlib.sha256(key_doc.encode()).hexdigest()[:32]
    path = _cache_dir() / f"{kernel.__name__}-sm{arch}-{key}.json"
    if path.exists():
        try:
            return dict(json.loads(path.read_text()), cached=True)
        except ValueError:
            pass
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options.__dict__)
    md = compiled.metadata
    figures = _inspect(compiled, arch)
    result = {"kernel": kernel.__name__, "arch": f"sm_{arch}", "warps": md.num_warps, "stages": md.num_stages,
              **figures, "smem": md.shared, "ctas_per_sm": ctas_per_sm(arch, figures["regs"], md.num_warps, md.shared),
              "smem_ok": md.shared <= SHARED_LIMIT[arch], "variant": key,
              "div16_args": [kernel.params[k[0]].name for k, v in attrs.items() if len(k) == 1 and v],
              "unit_args": [p.name for p in kernel.params if not p.is_constexpr and signature.get(p.name) == "constexpr"],
              "compile_s": round(time.perf_counter() - start, 3)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return dict(result, cached=False)


def run_compile(archs=(90, 80), only: str = "", hot: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("static compile: unset TRITON_INTERPRET (the interpreter does not compile)")
    os.environ["FASTLM_GPU_TILES"] = "1"
    os.environ.pop("FASTLM_POISON", None)
    rows = []
    for family, op, mode, shape, dt, fn in compile_cases(hot):
        label = f"{family}/{op}/{mode}/{shape}/{dt}"
        if only and not re.search(only, label):
            continue
        try:
            with capture_launches() as launches:
                fn()
        except Exception as exc:  # a launcher that refuses the case: a row says so, the rest still run
            rows.append({"op": op, "mode": mode, "impl": "triton", "shape": shape, "dtype": dt, "kernel": "-",
                         "arch": "-", "error": f"launch: {type(exc).__name__}: {str(exc)[:300]}"})
            continue
        for kernel, args, kwargs in launches:
            for arch in archs:
                meta = {"op": op, "mode": mode, "impl": f"triton sm_{arch}", "shape": shape, "dtype": dt}
                try:
                    rows.append({**meta, **compile_variant(kernel, args, kwargs, arch)})
                except Exception as exc:  # report every failure, not just the first
                    rows.append({**meta, "kernel": kernel.__name__, "arch": f"sm_{arch}",
                                 "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return rows


# ----------------------------------------------------------------------------- counting bytes

class _Counter:
    """Wraps the interpreter's C load/store: every unmasked element is counted, and
    attributed to the kernel argument whose storage holds it (``tensors``: (name, start, end)
    of each tensor argument of the launches so far; set by ``watch``).

    Each launch (a kernel's, or a torch op's that a launcher runs around its kernels: the sum
    of the weight-gradient partials) is a segment: ``memory`` counts, per segment, the distinct
    bytes it loads plus those it stores. That is the traffic to memory when the caches serve
    every re-read within a launch (a weight row read by every program, a row read twice by one
    program) and none across launches (a tensor written by one launch and read by the next
    comes back from memory)."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self):
        self.loaded = self.stored = 0
        self.segments: list = []  # per launch: (name, load parts, store parts); a part: (addresses, size)
        self.tensors: list = []
        self.in_kernel = False

    def _segment(self):
        if not self.segments:
            self.begin("(outside a launch)")
        return self.segments[-1]

    def begin(self, name: str) -> None:
        self.segments.append((name, [], []))

    def watch(self, kernel):
        """Record the tensor arguments of every launch of ``kernel`` (an InterpretedFunction)."""
        run = kernel.run
        names = list(getattr(kernel, "arg_names", None) or [])

        def watched(*args, grid, warmup, **kwargs):
            for i, arg in enumerate(args):
                if hasattr(arg, "untyped_storage"):
                    st = arg.untyped_storage()
                    name = names[i] if i < len(names) else f"arg{i}"
                    self.tensors.append((name, st.data_ptr(), st.data_ptr() + st.nbytes()))
            self.begin(getattr(kernel, "__name__", "kernel"))
            self.in_kernel = True
            try:
                return run(*args, grid=grid, warmup=warmup, **kwargs)
            finally:
                self.in_kernel = False
        kernel.run = watched

    def add(self, kind: str, addresses, size: int) -> None:
        """Count elements at ``addresses`` (numpy uint64) of ``size`` bytes, loaded or stored."""
        if kind == "ld":
            self.loaded += addresses.size * size
            self._segment()[1].append((addresses, size))
        else:
            self.stored += addresses.size * size
            self._segment()[2].append((addresses, size))

    def load(self, ptrs, mask, other, dtype):
        import numpy as np
        sel = ptrs[mask] if mask is not None else ptrs.ravel()
        self.add("ld", sel.astype(np.uint64).ravel(), np.dtype(dtype).itemsize)
        return self.inner.load(ptrs, mask, other, dtype)

    def store(self, ptrs, value, mask):
        import numpy as np
        sel = ptrs[mask] if mask is not None else ptrs.ravel()
        self.add("st", sel.astype(np.uint64).ravel(), value.dtype.itemsize)
        return self.inner.store(ptrs, value, mask)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @staticmethod
    def _distinct(parts) -> int:
        import numpy as np
        total = 0
        for size in {s for _, s in parts}:
            ptrs = [p for p, s in parts if s == size and p.size]
            if ptrs:
                total += np.unique(np.concatenate(ptrs)).size * size
        return total

    def memory(self) -> int:
        return sum(self._distinct(lds) + self._distinct(sts) for _, lds, sts in self.segments)

    def launches(self) -> str:
        return ", ".join(name for name, _, _ in self.segments)

    def by_tensor(self) -> str:
        """"NAME ld/st requested÷memory" per argument, e.g. "W ld 64x": the kernels requested
        64 times the bytes of W that reach memory (the rest are cache hits)."""
        spans: dict = {}
        for name, lo, hi in self.tensors:
            key = (lo, hi)
            if key not in spans:
                spans[key] = []
            if name not in spans[key]:
                spans[key].append(name)
        out = []
        for kind, index in (("ld", 1), ("st", 2)):
            for (lo, hi), names in sorted(spans.items(), key=lambda kv: kv[0]):
                requested = memory = 0
                for seg in self.segments:
                    sel = [(p[(p >= lo) & (p < hi)], s) for p, s in seg[index]]
                    requested += sum(p.size * s for p, s in sel)
                    memory += self._distinct(sel)
                if requested:
                    out.append(f"{'/'.join(names)} {kind} {requested / memory:.2g}x")
        return ", ".join(out)


def _addresses(t):
    """Byte addresses of every element of tensor ``t`` (numpy uint64), whatever its strides."""
    import numpy as np
    idx = np.zeros((), dtype=np.int64)
    for size, stride in zip(t.shape, t.stride()):
        idx = idx[..., None] + np.arange(size, dtype=np.int64) * stride
    return (t.data_ptr() + idx.ravel() * t.element_size()).astype(np.uint64)


def _torch_ops_counted(counter):
    """A dispatch mode that counts the torch ops run outside the kernels (each a launch:
    its tensor inputs read, its outputs written); views and allocations move nothing."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    silent = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh"}
    write_only = {"fill_", "zero_", "zeros", "zeros_like", "full", "full_like", "ones", "ones_like", "arange"}

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if counter.in_kernel or func.is_view or name in silent:
                return out
            counter.begin(f"torch {name}")
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if name not in write_only:
                for t in tree_leaves((args, kwargs)):
                    if not isinstance(t, torch.Tensor):
                        continue
                    if any(t is o for o in outs) and not name.endswith("_"):
                        continue  # an out= argument: written, not read
                    counter.add("ld", _addresses(t), t.element_size())
            for t in outs:
                counter.add("st", _addresses(t), t.element_size())
            return out
    return Mode()


# Small but block-realistic shapes (the GPU's tiles, FASTLM_GPU_TILES=1): several programs,
# more than one block per row where the benchmark shape has it. Rows are few (the interpreter
# is slow); what a row costs does not depend on how many there are, except the norm backward's
# partial sums, for which the SM count is scaled (run_bytes).
BYTES_NORM = ((64, 768), (64, 4096), (32, 16384))
BYTES_CE = ((16, 32000),)
BYTES_LCE = ((16, 32000),)   # one chunk of logits, as the fused linear cross-entropy passes it
BYTES_ROPE = ((2, 64, 4, 128, 128, False, False), (2, 64, 4, 128, 32, False, True))
BYTES_DACT = ((64, 3072),)   # the GPT-2 FFN's hidden width (fastlm/bench/ffn.py)
# The ratio that CI holds (tests/test_static_evidence.py): memory bytes (see _Counter) over
# the minimum, for every memory-bound op at these shapes.
MAX_MEMORY_RATIO = 1.10


def _ideal(family: str, op: str, mode: str, shape: str, dt: str) -> int:
    """The bytes an ideal kernel moves: every input read once, every output written once."""
    import torch
    e = torch.empty(0, dtype=_dt(dt)).element_size()
    if family == "norm":
        rows, n = (int(v) for v in shape.split("x"))
        rms, add = "rms" in op, op.startswith("add")
        params = n * 4 * (1 if rms else 2)
        stats = rows * 4 * (1 if rms else 2)
        if mode == "fwd":  # x (+ residual) and the parameters in; y (+ the sum) and the statistics out
            return rows * n * e * ((2 if add else 1) + (2 if add else 1)) + params + stats
        # x, dy (+ ds), the weight and the statistics in; dx and the parameters' gradients out
        return rows * n * e * ((3 if add else 2) + 1) + params + stats + params
    if family == "cross_entropy":
        rows, vocab = (int(v) for v in shape.split("x"))
        if mode == "fwd":  # logits and targets in; loss, lse, coef out
            return rows * vocab * e + rows * 8 + 3 * rows * 4
        return 2 * rows * vocab * e + rows * 8 + 3 * rows * 4  # logits, targets, lse, coef, dloss in; dx out
    if family == "lce":  # logits and targets in; loss, lse, coef and the gradient (over the logits) out
        rows, vocab = (int(v) for v in shape.split("x"))
        return 2 * rows * vocab * e + rows * 8 + 3 * rows * 4
    if family == "rotary":
        dims, rot = shape.split(" rot")
        b, s, h, d = (int(v) for v in dims.split("x"))
        if "positions" in shape:  # the position ids (S,) int64 are read too; x's other heads are not
            return 2 * b * s * h * d * e + 2 * s * (int(rot.split()[0]) // 2) * 4 + s * 8
        rot = int(rot.split()[0])
        return 2 * b * s * h * d * e + 2 * s * (rot // 2) * 4  # x in, out out; the cos and sin tables in
    if family == "ffn":  # dy and z in, dz out; the bias gradient (float32) out
        rows, n = (int(v) for v in shape.split("x"))
        return 3 * rows * n * e + n * 4
    raise ValueError(family)


def _bytes_cases(randn, targets):
    import torch
    from fastlm.kernels import cross_entropy as CE
    from fastlm.kernels import matmul as MM
    cases = []
    for rows, n in BYTES_NORM:
        cases += _norm_cases(("bf16",), widths=(n,), rows=rows, empty=randn)
    cases += _ce_cases(("bf16",), shapes=BYTES_CE, empty=randn, target_fill=targets)
    for rows, vocab in BYTES_LCE:
        def lce(rows=rows, vocab=vocab):
            logits = randn(rows, vocab, dtype=torch.bfloat16)
            scale = torch.tensor(1.0 / rows).expand(rows)  # "mean": the chunk's rows' upstream gradient
            CE.cross_entropy_fwd_bwd(logits, targets(rows, vocab), None, -100, 0.0, 0.0, 0.0, scale, out=logits)
        cases.append(("lce", "linear_cross_entropy (loss part)", "fwd+bwd", f"{rows}x{vocab}", "bf16", lce))
    cases += _rope_cases(("bf16",), shapes=BYTES_ROPE, empty=randn)
    for rows, n in BYTES_DACT:
        def dact(rows=rows, n=n):
            MM.dact(randn(rows, n, dtype=torch.bfloat16), randn(rows, n, dtype=torch.bfloat16), "gelu_tanh")
        cases.append(("ffn", "dact gelu_tanh", "bwd", f"{rows}x{n}", "bf16", dact))
    return cases


def run_bytes(only: str = "") -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("static bytes: set TRITON_INTERPRET=1 (the count runs under the interpreter)")
    os.environ["FASTLM_GPU_TILES"] = "1"
    os.environ.pop("FASTLM_POISON", None)
    import torch
    import triton.runtime.interpreter as interp
    from fastlm.kernels import cross_entropy, launch, matmul, norm, rotary
    counter = _Counter(interp._interpreter)
    interp._interpreter = counter
    for module in (norm, cross_entropy, rotary, matmul):
        for value in vars(module).values():
            if isinstance(value, interp.InterpretedFunction):
                counter.watch(value)
    # The launchers run under a dispatch mode that counts their own torch ops (each a launch).
    launchers = [(norm, "norm_fwd"), (norm, "norm_bwd"), (cross_entropy, "cross_entropy_fwd"),
                 (cross_entropy, "cross_entropy_bwd"), (cross_entropy, "cross_entropy_fwd_bwd"),
                 (rotary, "rotary_fwd"), (matmul, "dact")]
    originals = {(m, n): getattr(m, n) for m, n in launchers}

    def counted(fn):
        def run(*args, **kwargs):
            with _torch_ops_counted(counter):
                return fn(*args, **kwargs)
        return run
    nominal = launch.NOMINAL_SM_COUNT
    torch.manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype)

    def targets(rows, vocab):
        return torch.randint(0, vocab, (rows,))

    rows_out = []
    try:
        for (m, n), fn in originals.items():
            setattr(m, n, counted(fn))
        for family, op, mode, shape, dt, fn in _bytes_cases(randn, targets):
            if only and not re.search(only, f"{family}/{op}/{mode}/{shape}/{dt}"):
                continue
            counter.reset()
            if family == "norm":
                # The backward's persistent programs each write a row of weight-gradient
                # partials: scale the nominal SM count so a program gets the rows it gets at
                # the benchmark shape (NORM_ROWS rows), and the partials weigh what they weigh there.
                launch.NOMINAL_SM_COUNT = max(1, round(int(shape.split("x")[0]) * nominal / NORM_ROWS))
            try:
                fn()
            finally:
                launch.NOMINAL_SM_COUNT = nominal
            ideal = _ideal(family, op, mode, shape, dt)
            moved = counter.loaded + counter.stored
            memory = counter.memory()
            rows_out.append({"op": op, "mode": mode, "impl": "interpreter count", "shape": shape, "dtype": dt,
                             "launches": counter.launches(), "loaded": counter.loaded, "stored": counter.stored,
                             "memory": memory, "ideal": ideal, "bytes_ratio": moved / ideal,
                             "memory_ratio": memory / ideal, "by_tensor": counter.by_tensor()})
    finally:
        interp._interpreter = counter.inner
        for (m, n), fn in originals.items():
            setattr(m, n, fn)
    return rows_out


# ----------------------------------------------------------------------------- the suite

def _worker(kind: str, extra: list[str], timeout: float = 3600) -> tuple[list[dict], str]:
    env = dict(os.environ)
    env.pop("FASTLM_POISON", None)
    if kind == "compile":
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    env["FASTLM_GPU_TILES"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its (and 3.6's) default
    proc = subprocess.run([sys.executable, "-m", "fastlm.bench.static", kind, *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"static {kind} worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def collect(quick: bool = False, only: str = "", archs=(90, 80), bytes_count: bool = True) -> list[dict]:
    """The workers' rows (Triton compile, csrc/'s nvcc figures, then bytes)."""
    extra = ["--arch", *map(str, archs)] + (["--hot"] if quick else []) + (["--only", only] if only else [])
    rows, _ = _worker("compile", extra)
    more, _ = _worker("csrc", ["--arch", *map(str, archs)] + (["--only", only] if only else []))
    rows += more  # csrc/'s CUDA C++ kernels (fastlm/bench/static_csrc.py)
    if bytes_count:
        more, _ = _worker("bytes", ["--only", only] if only else [])
        rows += more
    return rows


def _register_columns() -> None:
    from . import runner
    have = {k for k, _ in runner.TABLE_COLUMNS}
    runner.TABLE_COLUMNS = tuple(runner.TABLE_COLUMNS) + tuple(c for c in COLUMNS if c[0] not in have)


def run(config, harness) -> None:
    """The "static" suite: figures from the compiler and the interpreter, no timing."""
    _register_columns()
    only = "|".join(re.escape(o) for o in (config.ops or []))
    modes = set(config.modes or ("fwd", "bwd", "fwd+bwd"))
    start = time.perf_counter()
    rows = collect(quick=config.quick, only=only)
    rows = [r for r in rows if r.get("mode") in modes]
    harness.rows.extend(rows)
    errors = [r for r in rows if "error" in r]
    for r in errors:
        harness.note(f"{r['op']}/{r['mode']}/{r['shape']}/{r['dtype']} {r['kernel']} {r['arch']}: {r['error']}")
    spills = sorted({(r["kernel"], r["arch"], r["shape"], r["dtype"], r["stack"]) for r in rows if r.get("stack")})
    harness.note(f"{sum('regs' in r for r in rows)} compiled variants ({sum(bool(r.get('cached')) for r in rows)} "
                 f"from the cache), {len(errors)} failed, {len(spills)} with a stack (spilled registers); "
                 f"{sum('bytes_ratio' in r for r in rows)} byte counts; {time.perf_counter() - start:.0f}s")
    harness.note("stack B: the per-thread stack frame (a Triton kernel's stack is spilled registers); "
                 "spill st B: ptxas -v's spill stores; CTAs/SM from registers, shared memory and warps; "
                 "HGMMA/HMMA: tensor-core instructions in the SASS (HGMMA is sm_90's wgmma)")
    harness.note("bytes ratio: bytes the kernels load and store (every element, as requested; a GPU's L2 "
                 "serves re-reads of a small tensor such as the weight) over the minimum (each input read "
                 "once, each output written once); distinct ratio: distinct bytes touched over that minimum")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["compile", "bytes", "csrc"])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--only", default="", help="only the cases whose family/op/mode/shape/dtype matches")
    parser.add_argument("--hot", action="store_true", help="compile: only the few hot variants (the test's)")
    args = parser.parse_args(argv)
    if args.kind == "csrc":  # nvcc's figures of csrc/'s kernels; --only matches op/mode/shape/dtype
        from .static_csrc import run_csrc
        rows = [r for r in run_csrc(args.arch)
                if re.search(args.only, f"{r['op']}/{r['mode']}/{r['shape']}/{r['dtype']}")]
    else:
        rows = run_compile(args.arch, args.only, args.hot) if args.kind == "compile" else run_bytes(args.only)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
