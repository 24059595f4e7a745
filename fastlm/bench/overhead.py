"""The "overhead" benchmark suite: what one call of each public op costs, fastlm against the
torch function it replaces, at tiny shapes where the work is nothing and the host is all.

    fastlm bench overhead --device cpu --threads 1      # the CPU path, one torch thread
    fastlm bench overhead --quick                       # 200 calls a loop, the small large-cases

Every public op of ``fastlm`` (layer_norm, rms_norm, add_layer_norm, add_rms_norm, layer_norm_fn,
cross_entropy, cross_entropy with z_loss and softcap, linear_cross_entropy,
scaled_dot_product_attention (causal), flash_attn_func, flash_attn_varlen_func,
flash_attn_with_kvcache, linear with and without an activation, feed_forward with a plain
and a gated activation, rotary) is called at a tiny shape (4x64 norms, 8x32 cross-entropy,
attention 1x2x8x16, linear 4x64 . 64x64) against what a PyTorch user writes instead: the
torch function where there is one (F.layer_norm, F.rms_norm, F.cross_entropy,
F.scaled_dot_product_attention, F.linear), otherwise the plain composition (x + r then the
norm; softcap * tanh and logsumexp^2 around F.cross_entropy; F.linear then F.cross_entropy;
SDPA on transposed views for flash_attn_func; a loop of SDPA over the sequences for the
varlen function; a cache write then SDPA for the KV cache; F.linear, the activation,
F.linear for the FFN; Llama's rotate_half for rotary).

Modes: "fwd" calls the op on inputs that do not require grad (no graph is recorded);
"fwd+bwd" on inputs that require grad, then the backward of the output's sum
(torch.autograd.grad, so no .grad accumulates). flash_attn_with_kvcache is inference only
and has no "fwd+bwd" row.

Method: per case, each implementation runs N calls in a loop timed with time.perf_counter
(on CUDA with torch.cuda.synchronize() only at the loop's ends, so the figure is the host's
time to queue the kernel path: at these shapes the device queue is never the bottleneck);
the implementations take turns loop by loop, in an order rotated every round, for 5 rounds.
The row gives the median per-call time in microseconds ("us_per_call"), and on fastlm's row
the extra microseconds over torch ("extra_us", fastlm - torch, from the medians) and the
ratio fastlm / torch ("ratio"). N is --calls (default 2000; --quick 200), cut so that one loop
lasts at most about half a second (a slow implementation is not timed for minutes; "calls"
in the JSON says how many were timed). Set the thread count yourself: ``--threads 1`` (or
OMP_NUM_THREADS=1) as the README's command does; a CPU's torch ops are otherwise free to use
every core. Noise from other processes lands on both implementations alike; read the
ratios.

"large" cases check the CPU path's other goal, within 1.1x of torch at large shapes with
equal or lower peak memory: layer_norm and rms_norm over 8192 x 4096 and cross_entropy over
8192 x 32000 (--quick: 2048 x 4096 and 1024 x 32000; --rows / --widths replace the rows and
widths of the large cases), with the peak memory of one call ("peak_mib": above what was
allocated before it, its outputs included; on CPU read from the profiler's allocation events,
see runner.cpu_peak_memory_mib). ``--ops tiny`` or ``--ops large`` runs one group; op names
select ops in both.

Implementations: "fastlm" (the default backend choice, "auto"), "torch-eager"; with --impls
also fastlm-torch, fastlm-triton, fastlm-cuda (the backend set around the whole loop, so the
context manager is not timed). fastlm-triton is left out on CPU: the interpreter is not timed.

Goals (issue 17; a note per row that misses one, and the "goal" column): extra time over
torch at most 10 us a call forward and 25 us forward + backward; on the CPU path at most
1.2x torch at the tiny shapes and 1.1x with no more peak memory at the large ones.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .runner import EAGER, Config, Harness, cpu_peak_memory_mib, dtype_name, peak_memory_mib

MODES = ("fwd", "fwd+bwd")
FASTLM = "fastlm"
IMPLS = (FASTLM, "fastlm-torch", "fastlm-triton", "fastlm-cuda", EAGER)
GROUPS = ("tiny", "large")
DEFAULT_CALLS, QUICK_CALLS = 2000, 200
ROUNDS = 5
LOOP_BUDGET_S = 0.5  # one timed loop lasts at most about this long (at least one call)
# Issue 17's goals.
EXTRA_GOAL_US = {"fwd": 10.0, "fwd+bwd": 25.0}
CPU_RATIO_GOAL = {"tiny": 1.2, "large": 1.1}
EPS = 1e-5


@dataclass
class Case:
    """One op at one shape: ``make(requires_grad)`` builds fresh inputs and returns
    (fastlm call, torch call, leaves): the calls take no argument and return a tensor or a
    tuple; leaves are the inputs the backward differentiates (those that require grad)."""
    op: str
    group: str
    shape: str
    rows: int
    width: int
    make: Callable[[bool], tuple[Callable[[], Any], Callable[[], Any]]]
    modes: tuple = MODES
    heads: Optional[int] = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the cases

def _grads(*tensors: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None and t.requires_grad]


def _rand(*shape, device, dtype, grad, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def _norm_case(op: str, rows: int, width: int, group: str, device, dtype) -> Case:
    import fastlm

    shape = (width,)
    fused, bias = op.startswith("add_") or op == "layer_norm_fn", op.endswith("layer_norm") or op == "layer_norm_fn"

    def make(grad: bool):
        x = _rand(rows, width, device=device, dtype=dtype, grad=grad)
        r = _rand(rows, width, device=device, dtype=dtype, grad=grad) if fused else None
        w = _rand(width, device=device, dtype=dtype, grad=grad, scale=0.1, shift=1.0)
        b = _rand(width, device=device, dtype=dtype, grad=grad, scale=0.1) if bias else None
        leaves = _grads(x, r, w, b)
        if op == "layer_norm":
            return ((lambda: fastlm.layer_norm(x, shape, w, b, EPS)), (lambda: F.layer_norm(x, shape, w, b, EPS)),
                    leaves)
        if op == "rms_norm":
            return (lambda: fastlm.rms_norm(x, shape, w, EPS)), (lambda: F.rms_norm(x, shape, w, EPS)), leaves
        if op == "add_layer_norm":
            return ((lambda: fastlm.add_layer_norm(x, r, shape, w, b, EPS)),
                    (lambda: F.layer_norm(x + r, shape, w, b, EPS)), leaves)
        if op == "layer_norm_fn":  # flash-attn's signature, no dropout: the same call as add_layer_norm
            return ((lambda: fastlm.layer_norm_fn(x, w, b, r, eps=EPS)),
                    (lambda: F.layer_norm(x + r, shape, w, b, EPS)), leaves)
        return ((lambda: fastlm.add_rms_norm(x, r, shape, w, EPS)), (lambda: F.rms_norm(x + r, shape, w, EPS)),
                leaves)
    return Case(op, group, f"{rows}x{width}", rows, width, make)


def _ce_case(op: str, rows: int, vocab: int, group: str, device, dtype, z_loss: float = 0.0,
             softcap: Optional[float] = None) -> Case:
    import fastlm

    def make(grad: bool):
        logits = _rand(rows, vocab, device=device, dtype=dtype, grad=grad, scale=2.0)
        target = torch.randint(0, vocab, (rows,), device=device)
        if not z_loss and softcap is None:
            return ((lambda: fastlm.cross_entropy(logits, target)), (lambda: F.cross_entropy(logits, target)),
                    _grads(logits))

        def plain():  # what a user writes for Gemma 2's softcap and PaLM's z-loss
            capped = softcap * torch.tanh(logits / softcap)
            lse = torch.logsumexp(capped.float(), dim=-1)
            return F.cross_entropy(capped, target) + z_loss * (lse * lse).mean()
        return (lambda: fastlm.cross_entropy(logits, target, z_loss=z_loss, softcap=softcap)), plain, _grads(logits)
    extra = {"z_loss": z_loss, "softcap": softcap} if z_loss or softcap is not None else {}
    return Case(op, group, f"{rows}x{vocab}", rows, vocab, make, extra=extra)


def _ce_stats_case(rows: int, vocab: int, device, dtype) -> Case:
    import fastlm

    def make(grad: bool):
        logits = _rand(rows, vocab, device=device, dtype=dtype, grad=grad, scale=2.0)
        target = torch.randint(0, vocab, (rows,), device=device)

        def ours():
            loss, stats = fastlm.cross_entropy_with_stats(logits, target)
            return loss, stats.lse, stats.accuracy

        def plain():  # what a training loop logs beside the loss: two more passes over the logits
            lse = torch.logsumexp(logits.detach().float(), dim=-1)
            return F.cross_entropy(logits, target), lse, (logits.detach().argmax(-1) == target).float().mean()
        return ours, plain, _grads(logits)
    return Case("cross_entropy_with_stats", "tiny", f"{rows}x{vocab}", rows, vocab, make)


def _lce_case(rows: int, hidden: int, vocab: int, device, dtype) -> Case:
    import fastlm

    def make(grad: bool):
        h = _rand(rows, hidden, device=device, dtype=dtype, grad=grad)
        w = _rand(vocab, hidden, device=device, dtype=dtype, grad=grad, scale=hidden ** -0.5)
        target = torch.randint(0, vocab, (rows,), device=device)
        return ((lambda: fastlm.linear_cross_entropy(h, w, target)),
                (lambda: F.cross_entropy(F.linear(h, w), target)), _grads(h, w))
    return Case("linear_cross_entropy", "tiny", f"{rows}x{hidden}.{hidden}x{vocab}", rows, vocab, make,
                extra={"hidden": hidden})


def _lce_stats_case(rows: int, hidden: int, vocab: int, device, dtype) -> Case:
    import fastlm

    def make(grad: bool):
        h = _rand(rows, hidden, device=device, dtype=dtype, grad=grad)
        w = _rand(vocab, hidden, device=device, dtype=dtype, grad=grad, scale=hidden ** -0.5)
        target = torch.randint(0, vocab, (rows,), device=device)

        def ours():
            loss, stats = fastlm.linear_cross_entropy_with_stats(h, w, target)
            return loss, stats.accuracy

        def plain():  # the loss and the token accuracy a training loop logs, from the logits
            logits = F.linear(h, w)
            return F.cross_entropy(logits, target), (logits.detach().argmax(-1) == target).float().mean()
        return ours, plain, _grads(h, w)
    return Case("linear_cross_entropy_with_stats", "tiny", f"{rows}x{hidden}.{hidden}x{vocab}", rows, vocab, make,
                extra={"hidden": hidden})


def _distill_cases(rows: int, hidden: int, vocab: int, device, dtype) -> list[Case]:
    """kl_div, jsd and linear_jsd; the torch side of jsd is what a user writes (TRL's GKD loss:
    the mixture's log by logaddexp, then F.kl_div twice)."""
    import fastlm

    def logp(grad: bool):
        return torch.log_softmax(_rand(rows, vocab, device=device, dtype=torch.float32, grad=False, scale=2.0),
                                 -1).to(dtype).requires_grad_(grad)

    def plain_jsd(s, t, beta=0.5):
        log_m = torch.logaddexp(t + torch.tensor(beta).log(), s + torch.tensor(1 - beta).log())
        return (beta * F.kl_div(log_m, t, reduction="batchmean", log_target=True)
                + (1 - beta) * F.kl_div(log_m, s, reduction="batchmean", log_target=True))

    def kl(grad: bool):
        x, t = logp(grad), logp(False).exp()
        return ((lambda: fastlm.kl_div(x, t, reduction="batchmean")),
                (lambda: F.kl_div(x, t, reduction="batchmean")), _grads(x))

    def jsd(grad: bool):
        s, t = logp(grad), logp(False)
        return (lambda: fastlm.jsd(s, t)), (lambda: plain_jsd(s, t)), _grads(s)

    def linear_jsd(grad: bool):
        h = _rand(rows, hidden, device=device, dtype=dtype, grad=grad)
        w = _rand(vocab, hidden, device=device, dtype=dtype, grad=grad, scale=hidden ** -0.5)
        ht = _rand(rows, hidden, device=device, dtype=dtype, grad=False)
        wt = _rand(vocab, hidden, device=device, dtype=dtype, grad=False, scale=hidden ** -0.5)
        return ((lambda: fastlm.linear_jsd(h, w, ht, wt)),
                (lambda: plain_jsd(torch.log_softmax(F.linear(h, w).float(), -1),
                                   torch.log_softmax(F.linear(ht, wt).float(), -1)).to(dtype)), _grads(h, w))
    return [Case("kl_div", "tiny", f"{rows}x{vocab}", rows, vocab, kl),
            Case("jsd", "tiny", f"{rows}x{vocab}", rows, vocab, jsd),
            Case("linear_jsd", "tiny", f"{rows}x{hidden}.{hidden}x{vocab}", rows, vocab, linear_jsd,
                 extra={"hidden": hidden})]


def _attention_cases(B: int, H: int, L: int, D: int, device, dtype) -> list[Case]:
    import fastlm

    def qkv(grad: bool, layout: str):
        shape = (B, H, L, D) if layout == "bhld" else (B, L, H, D)
        return [_rand(*shape, device=device, dtype=dtype, grad=grad) for _ in range(3)]

    def sdpa(grad: bool):
        q, k, v = qkv(grad, "bhld")
        return ((lambda: fastlm.scaled_dot_product_attention(q, k, v, is_causal=True)),
                (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), _grads(q, k, v))

    def flash(grad: bool):
        q, k, v = qkv(grad, "blhd")

        def plain():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
            return out.transpose(1, 2)
        return (lambda: fastlm.flash_attn_func(q, k, v, causal=True)), plain, _grads(q, k, v)

    # Two packed sequences of lengths 3 and L - 3 (L tokens in all), causal.
    lengths = [3, L - 3] if L > 3 else [L]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)

    def varlen(grad: bool):
        q, k, v = (_rand(L, H, D, device=device, dtype=dtype, grad=grad) for _ in range(3))
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)

        def plain():  # a loop of SDPA over the sequences, as without a varlen kernel
            outs = []
            for s, e in zip(offsets[:-1], offsets[1:]):
                o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                   v[s:e].transpose(0, 1), is_causal=True)
                outs.append(o.transpose(0, 1))
            return torch.cat(outs)
        return ((lambda: fastlm.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)),
                plain, _grads(q, k, v))

    # Decoding: a cache of 2 L positions, L - 1 filled; one new token is written at L - 1
    # (the same place every call) and attends to the first L keys.
    filled = L - 1

    def kvcache(grad: bool):
        q, k, v = (_rand(B, 1, H, D, device=device, dtype=dtype, grad=False) for _ in range(3))
        k_cache, v_cache = (_rand(B, 2 * L, H, D, device=device, dtype=dtype, grad=False) for _ in range(2))
        k_plain, v_plain = k_cache.clone(), v_cache.clone()

        def plain():  # the cache write, then SDPA over the filled part (one query: no mask needed)
            k_plain[:, filled:filled + 1] = k
            v_plain[:, filled:filled + 1] = v
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k_plain[:, :filled + 1].transpose(1, 2),
                                                 v_plain[:, :filled + 1].transpose(1, 2))
            return out.transpose(1, 2)
        return (lambda: fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=filled,
                                                       causal=True)), plain, []

    shape = f"{B}x{H}x{L}x{D}"
    return [Case("scaled_dot_product_attention", "tiny", shape + " causal", L, D, sdpa, heads=H),
            Case("flash_attn_func", "tiny", shape + " causal", L, D, flash, heads=H),
            Case("flash_attn_varlen_func", "tiny", f"{'+'.join(map(str, lengths))}x{H}x{D} causal", L, D, varlen,
                 heads=H),
            Case("flash_attn_with_kvcache", "tiny", f"{B}x{H}x1x{D}, cache {filled}+1", filled + 1, D, kvcache,
                 modes=("fwd",), heads=H)]


def _linear_cases(rows: int, d: int, n: int, device, dtype) -> list[Case]:
    import fastlm

    def make_linear(activation: Optional[str]):
        def make(grad: bool):
            x = _rand(rows, d, device=device, dtype=dtype, grad=grad)
            w = _rand(n, d, device=device, dtype=dtype, grad=grad, scale=d ** -0.5)
            b = _rand(n, device=device, dtype=dtype, grad=grad, scale=0.1)
            if activation is None:
                return (lambda: fastlm.linear(x, w, b)), (lambda: F.linear(x, w, b)), _grads(x, w, b)
            return ((lambda: fastlm.linear(x, w, b, activation=activation)),
                    (lambda: F.gelu(F.linear(x, w, b), approximate="tanh")), _grads(x, w, b))
        return make

    return [Case("linear", "tiny", f"{rows}x{d}.{d}x{n}", rows, n, make_linear(None), extra={"hidden": d}),
            Case("linear gelu_tanh", "tiny", f"{rows}x{d}.{d}x{n}", rows, n, make_linear("gelu_tanh"),
                 extra={"hidden": d})]


def _ffn_cases(rows: int, d: int, hidden: int, device, dtype) -> list[Case]:
    import fastlm

    from .ffn import eager_block

    def make_ffn(activation: str):
        def make(grad: bool):
            gated = activation == "swiglu"
            x = _rand(rows, d, device=device, dtype=dtype, grad=grad)
            w_in = _rand((2 if gated else 1) * hidden, d, device=device, dtype=dtype, grad=grad, scale=d ** -0.5)
            b_in = _rand((2 if gated else 1) * hidden, device=device, dtype=dtype, grad=grad, scale=0.1)
            w_out = _rand(d, hidden, device=device, dtype=dtype, grad=grad, scale=hidden ** -0.5)
            b_out = _rand(d, device=device, dtype=dtype, grad=grad, scale=0.1)
            return ((lambda: fastlm.feed_forward(x, w_in, b_in, w_out, b_out, activation)),
                    (lambda: eager_block(x, w_in, b_in, w_out, b_out, activation)),
                    _grads(x, w_in, b_in, w_out, b_out))
        return make

    return [Case(f"feed_forward {act}", "tiny", f"{rows}x{d}, hidden {hidden}", rows, d, make_ffn(act),
                 extra={"hidden": hidden}) for act in ("gelu_tanh", "swiglu")]


def _rotary_case(B: int, L: int, H: int, D: int, device, dtype) -> Case:
    import fastlm

    from .rope import eager_rope

    def make(grad: bool):
        x = _rand(B, L, H, D, device=device, dtype=dtype, grad=grad)
        cos, sin = fastlm.rotary_cos_sin(L, D, device=device)
        return (lambda: fastlm.rotary(x, cos, sin)), (lambda: eager_rope(x, cos, sin)), _grads(x)
    return Case("rotary", "tiny", f"{B}x{L}x{H}x{D}", L, D, make, heads=H)


def _apply_rotary_emb_case(B: int, L: int, H: int, D: int, device, dtype) -> Case:
    """flash-attn's apply_rotary_emb interface (a KV-cache offset) against the same formula."""
    import fastlm

    from .rope import eager_rope

    def make(grad: bool):
        x = _rand(B, L, H, D, device=device, dtype=dtype, grad=grad)
        cos, sin = fastlm.rotary_cos_sin(2 * L, D, device=device)
        return ((lambda: fastlm.apply_rotary_emb(x, cos, sin, seqlen_offsets=L)),
                (lambda: eager_rope(x, cos[L:], sin[L:])), _grads(x))
    return Case("apply_rotary_emb", "tiny", f"{B}x{L}x{H}x{D}, offset {L}", L, D, make, heads=H)


def _apply_rotary_pos_emb_case(B: int, L: int, H: int, D: int, device, dtype) -> Case:
    """Hugging Face's apply_rotary_pos_emb interface (q and k (B, H, S, D), cos/sin (1, S, D))
    against its own formula."""
    import fastlm

    def make(grad: bool):
        q = _rand(B, H, L, D, device=device, dtype=dtype, grad=grad)
        k = _rand(B, H, L, D, device=device, dtype=dtype, grad=grad)
        c, s = fastlm.rotary_cos_sin(L, D, device=device)
        cos, sin = torch.cat((c, c), -1)[None].to(dtype), torch.cat((s, s), -1)[None].to(dtype)

        def rotate_half(x):
            return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)

        def plain():
            cs, sn = cos[:, None], sin[:, None]
            return q * cs + rotate_half(q) * sn, k * cs + rotate_half(k) * sn
        return (lambda: fastlm.apply_rotary_pos_emb(q, k, cos, sin)), plain, _grads(q, k)
    return Case("apply_rotary_pos_emb", "tiny", f"{B}x{H}x{L}x{D} q and k", L, D, make, heads=H)


def _qk_norm_rotary_case(B: int, L: int, H: int, D: int, device, dtype) -> Case:
    """q/k RMSNorm + rotary (issue 23) against HF's chain: two RMSNorms, then the rotary."""
    import fastlm

    from .rope import eager_qk_norm_rope

    def make(grad: bool):
        q = _rand(B, L, H, D, device=device, dtype=dtype, grad=grad)
        k = _rand(B, L, H, D, device=device, dtype=dtype, grad=grad)
        qw = _rand(D, device=device, dtype=dtype, grad=grad, scale=0.1, shift=1.0)
        kw = _rand(D, device=device, dtype=dtype, grad=grad, scale=0.1, shift=1.0)
        cos, sin = fastlm.rotary_cos_sin(L, D, device=device)
        return ((lambda: fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin)),
                (lambda: eager_qk_norm_rope(q, k, qw, kw, cos, sin)), _grads(q, k, qw, kw))
    return Case("qk_norm_rotary", "tiny", f"{B}x{L}x{H}x{D} q and k", L, D, make, heads=H)


def tiny_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    """One case per public op (two for cross_entropy, linear and feed_forward), tiny shapes."""
    cases = [_norm_case(op, 4, 64, "tiny", device, dtype)
             for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "layer_norm_fn")]
    cases.append(_ce_case("cross_entropy", 8, 32, "tiny", device, dtype))
    cases.append(_ce_case("cross_entropy z_loss+softcap", 8, 32, "tiny", device, dtype, z_loss=1e-4, softcap=30.0))
    cases.append(_ce_stats_case(8, 32, device, dtype))
    cases.append(_lce_case(8, 64, 32, device, dtype))
    cases.append(_lce_stats_case(8, 64, 32, device, dtype))
    cases += _distill_cases(8, 64, 32, device, dtype)
    cases += _attention_cases(1, 2, 8, 16, device, dtype)
    cases += _linear_cases(4, 64, 64, device, dtype)
    cases += _ffn_cases(4, 64, 128, device, dtype)
    cases.append(_rotary_case(1, 8, 2, 16, device, dtype))
    cases.append(_apply_rotary_emb_case(1, 8, 2, 16, device, dtype))
    cases.append(_apply_rotary_pos_emb_case(1, 8, 2, 16, device, dtype))
    cases.append(_qk_norm_rotary_case(1, 8, 2, 16, device, dtype))
    return cases


def large_cases(config: Config) -> list[Case]:
    """The CPU path's large shapes: norms (8192 x 4096; --quick 2048 x 4096) and cross_entropy
    (8192 x 32000; --quick 1024 x 32000). --rows / --widths replace the rows / widths."""
    device, dtype = config.device, config.dtype
    norm_rows, ce_rows = (2048, 1024) if config.quick else (8192, 8192)
    cases = []
    for rows in config.rows or [norm_rows]:
        for width in config.widths or [4096]:
            cases += [_norm_case(op, rows, width, "large", device, dtype) for op in ("layer_norm", "rms_norm")]
    for rows in config.rows or [ce_rows]:
        for vocab in config.widths or [32000]:
            cases.append(_ce_case("cross_entropy", rows, vocab, "large", device, dtype))
    return cases


def cases_for(config: Config) -> list[Case]:
    """The cases this run measures: --ops may name groups ("tiny", "large") and ops."""
    chosen = config.ops or []
    groups = [g for g in GROUPS if g in chosen] or list(GROUPS)
    names = [o for o in chosen if o not in GROUPS]
    out = []
    if "tiny" in groups:
        out += tiny_cases(config.device, config.dtype)
    if "large" in groups:
        out += large_cases(config)
    return [c for c in out if not names or c.op in names or c.op.split(" ")[0] in names]


# ----------------------------------------------------------------------------- timing

def implementations(config: Config, harness: Harness) -> list[str]:
    import fastlm

    chosen = [name for name in IMPLS if (config.impls and name in config.impls)
              or (not config.impls and name in (FASTLM, EAGER))]
    available = fastlm.available_backends()
    for name in list(chosen):
        if name.startswith("fastlm-"):
            backend = name.split("-", 1)[1]
            if backend == "triton" and not config.on_cuda:
                harness.note("fastlm-triton left out: on CPU the Triton kernels run only under the interpreter, "
                             "which is far too slow to time")
                chosen.remove(name)
            elif not available[backend].available:
                harness.note(f"{name} left out: {available[backend].reason}")
                chosen.remove(name)
            elif backend != "torch" and not config.on_cuda:
                harness.note(f"{name} left out: it runs on CUDA tensors only")
                chosen.remove(name)
    for name in config.impls or []:
        if name not in IMPLS:
            harness.note(f"{name} left out: the overhead suite knows {', '.join(IMPLS)}")
    return chosen


def _scope(impl: str):
    import fastlm

    if impl.startswith("fastlm-"):
        return fastlm.use_backend(impl.split("-", 1)[1])
    return contextlib.nullcontext()


def mode_call(mode: str, forward: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[], Any]:
    """fwd: the forward; fwd+bwd: the forward, then autograd.grad of the output's sum."""
    if mode == "fwd":
        return forward

    def forward_backward():
        out = forward()
        loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        return torch.autograd.grad(loss, leaves)
    return forward_backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop_s(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return time.perf_counter() - start


def time_calls(fns: dict[str, Callable[[], Any]], calls: int, device: torch.device, estimate_s: float,
               rounds: int = ROUNDS, budget_s: float = LOOP_BUDGET_S) -> tuple[dict[str, list[float]], int]:
    """Microseconds per call of each function: ``rounds`` loops of n calls each, the functions
    taking turns loop by loop (order rotated every round). n is ``calls``, cut so that a loop
    of the slowest function (``estimate_s`` a call, from the warm-up) lasts about ``budget_s``
    (at least one call). Returns the per-round figures and n."""
    n = max(1, min(calls, int(budget_s / max(estimate_s, 1e-9))))
    names = list(fns)
    out: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            with _scope(name):
                out[name].append(_loop_s(fns[name], n, device) / n * 1e6)
    return out, n


def peak_mib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return peak_memory_mib(fn, device)
    return cpu_peak_memory_mib(fn)


def _flatten(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _disagreement(ours: Any, ref: Any, dtype: torch.dtype) -> Optional[str]:
    tol = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-3)
    for a, b in zip(_flatten(ours), _flatten(ref)):
        if a.shape != b.shape:
            return f"returned shape {list(a.shape)} where torch returned {list(b.shape)}"
        a, b = a.detach().float(), b.detach().float()
        if not torch.isfinite(a).all():
            return "returned NaN or inf"
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        if rel > tol:
            return f"differs from torch: max |diff| / max |torch| = {rel:.2e}"
    return None


# ----------------------------------------------------------------------------- the suite

def run(config: Config, harness: Harness) -> None:
    """Every case of the suite for this run; rows and notes go to ``harness``."""
    impls = implementations(config, harness)
    calls = config.calls or (QUICK_CALLS if config.quick else DEFAULT_CALLS)
    modes = [m for m in MODES if config.wants("mode", m)]
    on_cpu = config.device.type == "cpu"
    if on_cpu:
        harness.note(f"torch uses {torch.get_num_threads()} CPU thread(s) (--threads sets it)")
    for case in cases_for(config):
        for mode in modes:
            label = f"{case.op} {mode} {case.shape}"
            if mode not in case.modes:
                harness.note(f"{case.op}: no {mode} row (it is inference only: no gradient flows through it)")
                continue
            grad = mode == "fwd+bwd"
            fns: dict[str, Callable[[], Any]] = {}
            first: dict[str, Any] = {}
            slowest = 0.0  # seconds per call of the slowest implementation in the warm-up
            for impl in impls:
                # Fresh inputs per implementation: the same values (same seed), not shared graphs.
                torch.manual_seed(0)
                ours, plain, leaves = case.make(grad)
                fn = mode_call(mode, plain if impl == EAGER else ours, leaves)
                try:
                    # Large cases take seconds a call: one warm-up call is enough there.
                    warm = []
                    with _scope(impl):
                        for _ in range(1 if case.group == "large" else max(3, config.warmup)):
                            _sync(config.device)
                            start = time.perf_counter()
                            out = fn()
                            _sync(config.device)
                            warm.append(time.perf_counter() - start)
                    slowest = max(slowest, min(warm))
                except Exception as exc:  # one failing implementation must not sink the run
                    text = str(exc).strip()
                    harness.note(f"{label}: {impl} failed, left out: {type(exc).__name__}: "
                                 f"{text.splitlines()[0][:300] if text else ''}")
                    continue
                fns[impl], first[impl] = fn, out
            if EAGER in first:
                for impl in first:
                    if impl != EAGER:
                        problem = _disagreement(first[impl], first[EAGER], config.dtype)
                        if problem:
                            harness.note(f"{label}: {impl} {problem}")
            first.clear()
            if not fns:
                continue
            peaks: dict[str, Optional[float]] = {}
            if case.group == "large":
                for impl, fn in fns.items():
                    with _scope(impl):
                        peaks[impl] = peak_mib(fn, config.device)
            times, n = time_calls(fns, calls, config.device, slowest)
            med = {impl: statistics.median(ts) for impl, ts in times.items()}
            base = med.get(EAGER)
            rows = []
            for impl in fns:
                us = med[impl]
                row: dict[str, Any] = {
                    "op": case.op, "mode": mode, "impl": impl, "group": case.group, "shape": case.shape,
                    "rows": case.rows, "width": case.width, "heads": case.heads, "dtype": dtype_name(config.dtype),
                    **case.extra,
                    "us_per_call": us, "us_min": min(times[impl]), "us_rounds": times[impl], "ms": us / 1e3,
                    "calls": n, "rounds": len(times[impl]), "peak_mib": peaks.get(impl),
                }
                if impl != EAGER and base is not None:
                    row["extra_us"] = us - base
                    row["ratio"] = us / base
                    row["speedup_vs_eager"] = base / us
                    row["goal"] = _goal(row, case.group, config, harness, label, peaks)
                rows.append(row)
            harness.rows.extend(rows)
            summary = ", ".join(f"{impl} {med[impl]:.1f} us" for impl in fns)
            print(f"overhead: {label}: {summary} ({n} calls x {ROUNDS})", file=sys.stderr)


def _goal(row: dict[str, Any], group: str, config: Config, harness: Harness, label: str,
          peaks: dict[str, Optional[float]]) -> str:
    """"met" or what was missed; a note for each miss."""
    missed = []
    if group == "tiny":
        limit = EXTRA_GOAL_US[row["mode"]]
        if row["extra_us"] > limit:
            missed.append(f"+{row['extra_us']:.1f} us > {limit:.0f} us")
    if config.device.type == "cpu":
        limit = CPU_RATIO_GOAL[group]
        if row["ratio"] > limit:
            missed.append(f"{row['ratio']:.2f}x > {limit}x torch")
        ours, theirs = peaks.get(row["impl"]), peaks.get(EAGER)
        if group == "large" and ours is not None and theirs is not None and ours > theirs * 1.01 + 0.5:
            missed.append(f"peak {ours:.0f} MiB > torch's {theirs:.0f} MiB")
    if missed:
        harness.note(f"goal missed: {label} {row['impl']}: " + "; ".join(missed))
        return "missed: " + "; ".join(missed)
    return "met"
