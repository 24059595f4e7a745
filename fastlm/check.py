"""``fastlm check``: run every kernel that can run on this machine against its float64
reference, forward and backward, and print a short table.

On a machine without CUDA the Triton kernels run under the interpreter (this command sets
TRITON_INTERPRET=1 before triton is imported), so the check is the same code path CI tests.
Each op family contributes cases: a name, a function that runs fastlm, and the same
computation in plain torch (used in float64 as the oracle and in the test dtype as the
yardstick of fastlm.testing's tolerance rule).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Case:
    op: str
    shape: tuple
    make_inputs: Callable  # (dtype, device, generator) -> dict of named tensors
    run_fastlm: Callable  # (inputs) -> output tensor
    run_torch: Callable  # (inputs) -> output tensor, in the inputs' dtype
    constant: tuple = ()  # inputs that take no gradient and keep their dtype (targets)
    # Results that are sums fastlm adds up in another order than torch (matmuls in tiles,
    # attention's dq and dk, see tests/test_nn_attention.py): allow float32's summation floor
    # over this many terms (float32: the kernels accumulate in it whatever the input dtype).
    sum_terms: int = 0


def _norm_cases(quick: bool, on_gpu: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import fastlm

    shapes = [(4096, 4096), (2048, 8192), (64, 65537)] if on_gpu else [(64, 768), (7, 4097)]
    if quick:
        shapes = shapes[:1]

    def inputs(rows, width, residual, bias=True):
        def make(dtype, device, g):
            def rnd(*shape):
                return torch.randn(*shape, generator=g, device="cpu").to(device=device, dtype=dtype)
            d = {"x": rnd(rows, width), "weight": rnd(width)}
            if bias:
                d["bias"] = rnd(width)
            if residual:
                d["residual"] = rnd(rows, width)
            return d
        return make

    cases = []
    for rows, width in shapes:
        shape = (rows, width)
        cases += [
            Case("layer_norm", shape, inputs(rows, width, False),
                 lambda t: fastlm.layer_norm(t["x"], t["x"].shape[-1], t["weight"], t["bias"]),
                 lambda t: F.layer_norm(t["x"], t["x"].shape[-1:], t["weight"], t["bias"])),
            Case("rms_norm", shape, inputs(rows, width, False, bias=False),
                 lambda t: fastlm.rms_norm(t["x"], t["x"].shape[-1], t["weight"]),
                 lambda t: F.rms_norm(t["x"], t["x"].shape[-1:], t["weight"])),
            Case("add_layer_norm", shape, inputs(rows, width, True),
                 lambda t: fastlm.add_layer_norm(t["x"], t["residual"], t["x"].shape[-1], t["weight"], t["bias"]),
                 lambda t: F.layer_norm(t["x"] + t["residual"], t["x"].shape[-1:], t["weight"], t["bias"])),
            Case("add_rms_norm", shape, inputs(rows, width, True, bias=False),
                 lambda t: fastlm.add_rms_norm(t["x"], t["residual"], t["x"].shape[-1], t["weight"]),
                 lambda t: F.rms_norm(t["x"] + t["residual"], t["x"].shape[-1:], t["weight"])),
        ]
    return cases


def _loss_cases(quick: bool, on_gpu: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import fastlm

    shapes = [(4096, 128256), (512, 256000)] if on_gpu else [(64, 1000), (5, 50257)]
    lce_shapes = [(4096, 2048, 32000)] if on_gpu else [(64, 48, 500)]
    if quick:
        shapes, lce_shapes = shapes[:1], lce_shapes[:1]

    def ce_inputs(rows, vocab):
        def make(dtype, device, g):
            t = torch.randint(0, vocab, (rows,), generator=g)
            t[torch.rand(rows, generator=g) < 0.05] = -100
            return {"x": torch.randn(rows, vocab, generator=g).to(device=device, dtype=dtype), "t": t.to(device)}
        return make

    def lce_inputs(rows, hidden, vocab):
        def make(dtype, device, g):
            return {"x": torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype),
                    "w": (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device=device, dtype=dtype),
                    "t": torch.randint(0, vocab, (rows,), generator=g).to(device)}
        return make

    def plain_lce(t):
        logits = F.linear(t["x"], t["w"])
        return F.cross_entropy(logits, t["t"], label_smoothing=0.1)

    cases = []
    for rows, vocab in shapes:
        cases.append(Case("cross_entropy", (rows, vocab), ce_inputs(rows, vocab),
                          lambda t: fastlm.cross_entropy(t["x"], t["t"], label_smoothing=0.1, reduction="sum"),
                          lambda t: F.cross_entropy(t["x"], t["t"], label_smoothing=0.1, reduction="sum"),
                          constant=("t",)))
    for rows, hidden, vocab in lce_shapes:
        cases.append(Case("linear_cross_entropy", (rows, hidden, vocab), lce_inputs(rows, hidden, vocab),
                          lambda t: fastlm.linear_cross_entropy(t["x"], t["w"], t["t"], label_smoothing=0.1),
                          plain_lce, constant=("t",)))
    return cases


def _attention_cases(quick: bool, on_gpu: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import fastlm

    # (B, L, S, H, Hk, D): causal self-attention, grouped-query, and cross-attention with a mask.
    if on_gpu:
        flash = [(4, 2048, 2048, 16, 16, 128), (2, 1024, 1024, 32, 8, 64)]
        sdpa = [(2, 1000, 1537, 8, 8, 96)]
    else:
        flash = [(2, 33, 33, 2, 2, 32), (1, 17, 17, 4, 2, 16)]
        sdpa = [(1, 17, 40, 2, 2, 16)]
    if quick:
        flash, sdpa = flash[:1], sdpa[:1]

    def inputs(B, L, S, H, Hk, D, mask=False):
        def make(dtype, device, g):
            d = {n: torch.randn(B, n_len, h, D, generator=g).to(device=device, dtype=dtype)
                 for n, n_len, h in (("q", L, H), ("k", S, Hk), ("v", S, Hk))}
            if mask:
                m = torch.rand(B, 1, L, S, generator=g) < 0.8
                m[..., 0] = True
                d["mask"] = m.to(device)
            return d
        return make

    def torch_sdpa(t, causal=False):  # torch's SDPA in its (B, H, L, D) layout, grouped heads repeated
        group = t["q"].shape[2] // t["k"].shape[2]
        q, k, v = (x.transpose(1, 2) for x in (t["q"], t["k"], t["v"]))
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=t.get("mask"), is_causal=causal).transpose(1, 2)

    cases = []
    for shape in flash:
        cases.append(Case("flash_attn causal" if shape[3] == shape[4] else "flash_attn gqa causal", shape,
                          inputs(*shape), lambda t: fastlm.flash_attn_func(t["q"], t["k"], t["v"], causal=True),
                          lambda t: torch_sdpa(t, causal=True), sum_terms=shape[2] * shape[5]))
    for shape in sdpa:
        cases.append(Case("sdpa masked", shape, inputs(*shape, mask=True),
                          lambda t: fastlm.scaled_dot_product_attention(
                              t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["v"].transpose(1, 2),
                              attn_mask=t["mask"]).transpose(1, 2),
                          torch_sdpa, constant=("mask",), sum_terms=shape[2] * shape[5]))
    return cases


def _ffn_cases(quick: bool, on_gpu: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import fastlm

    # (tokens, d_model, hidden): the fused block, plain (gelu_tanh) and gated (swiglu).
    shapes = [(4096, 2048, 5504)] if on_gpu else [(37, 24, 33)]

    def inputs(tokens, d_model, hidden, gated):
        rows = 2 * hidden if gated else hidden

        def make(dtype, device, g):
            def rnd(*shape, scale=1.0):
                return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
            return {"x": rnd(tokens, d_model), "w_in": rnd(rows, d_model, scale=d_model ** -0.5), "b_in": rnd(rows),
                    "w_out": rnd(d_model, hidden, scale=hidden ** -0.5), "b_out": rnd(d_model)}
        return make

    def torch_block(activation):
        def run(t):
            z = F.linear(t["x"], t["w_in"], t["b_in"])
            if activation == "swiglu":
                g, u = z.chunk(2, dim=-1)
                h = F.silu(g) * u
            else:
                h = F.gelu(z, approximate="tanh")
            return F.linear(h, t["w_out"], t["b_out"])
        return run

    cases = []
    for tokens, d_model, hidden in shapes:
        for activation in (["swiglu"] if quick else ["gelu_tanh", "swiglu"]):
            cases.append(Case(f"feed_forward {activation}", (tokens, d_model, hidden),
                              inputs(tokens, d_model, hidden, activation == "swiglu"),
                              lambda t, a=activation: fastlm.feed_forward(t["x"], t["w_in"], t["b_in"], t["w_out"],
                                                                          t["b_out"], a),
                              torch_block(activation), sum_terms=max(tokens, d_model, hidden)))
    return cases


def run_case(case: Case, backend: str, dtype, device) -> dict:
    """Forward and backward of one case on one backend; the worst judged error of each."""
    import torch

    import fastlm
    from fastlm.testing import compare, summation_floor

    g = torch.Generator().manual_seed(0)
    base = case.make_inputs(dtype, device, g)
    dy = None

    def forward_backward(fn, cast):
        nonlocal dy
        t = {k: (v if k in case.constant else cast(v).detach().requires_grad_(True)) for k, v in base.items()}
        out = fn(t)
        if dy is None:
            dy = torch.randn(out.shape, generator=g).to(device)
        leaves = {k: v for k, v in t.items() if k not in case.constant}
        grads = torch.autograd.grad(out, list(leaves.values()), cast(dy.to(out.dtype)))
        return out, dict(zip(leaves.keys(), grads))

    start = time.perf_counter()
    with fastlm.use_backend(backend):
        out, grads = forward_backward(case.run_fastlm, lambda v: v)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref, ref_grads = forward_backward(case.run_torch, lambda v: v.double())
    eager, eager_grads = forward_backward(case.run_torch, lambda v: v)
    fwd = compare(out, ref, eager, "output", atol=summation_floor(ref, torch.float32, case.sum_terms))
    bwd = [compare(grads[k], ref_grads[k], eager_grads[k], f"grad of {k}",
                   atol=summation_floor(ref_grads[k], torch.float32, case.sum_terms)) for k in grads]
    worst_bwd = max(bwd, key=lambda c: (not c.ok, c.max_err / c.tol if c.tol else c.max_err))
    return {
        "op": case.op, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
        "shape": "x".join(map(str, case.shape)), "fwd": fwd, "bwd": worst_bwd,
        "ok": fwd.ok and all(c.ok for c in bwd), "seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlm check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--backend", action="append", choices=["triton", "cuda"],
                        help="check only these kernel backends (default: every one that runs here)")
    args = parser.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("fastlm check: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"

    import fastlm

    device = torch.device("cuda" if on_gpu else "cpu")
    info = fastlm.available_backends()
    print(f"fastlm {fastlm.__version__} on {torch.cuda.get_device_name() if on_gpu else 'CPU'} "
          f"(torch {torch.__version__})")
    for name, (available, reason) in info.items():
        print(f"  {name:7s} {'yes' if available else 'no ':3s}  {reason}")
    backends = [b for b in (args.backend or ["triton", "cuda"]) if info[b].available]
    if not backends:
        print("no kernel backend can run here: nothing to check", file=sys.stderr)
        return 1
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if on_gpu else [])
    if not on_gpu:
        print("  (Triton under the interpreter: bfloat16 is checked on a GPU only, see docs/ARCHITECTURE.md)")

    rows = []
    for case in (_norm_cases(args.quick, on_gpu) + _loss_cases(args.quick, on_gpu)
                 + _attention_cases(args.quick, on_gpu) + _ffn_cases(args.quick, on_gpu)):
        for backend in backends:
            for dtype in dtypes:
                rows.append(run_case(case, backend, dtype, device))

    header = f"{'op':22s} {'backend':7s} {'dtype':8s} {'shape':22s} {'fwd err':>9s} {'fwd tol':>9s} " \
             f"{'bwd err':>9s} {'bwd tol':>9s} {'time':>7s}  result"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:22s} {r['backend']:7s} {r['dtype']:8s} {r['shape']:22s} {r['fwd'].max_err:9.2e} "
              f"{r['fwd'].tol:9.2e} {r['bwd'].max_err:9.2e} {r['bwd'].tol:9.2e} {r['seconds']:6.2f}s  "
              f"{'ok' if r['ok'] else 'FAIL'}")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        for c in (r["fwd"], r["bwd"]):
            if not c.ok:
                print(f"FAIL {r['op']} {r['backend']} {r['dtype']} {r['shape']}: {c.message}")
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
