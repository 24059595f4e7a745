"""The benchmark runner: ``python -m fastlm.bench SUITE`` or ``fastlm bench SUITE``.

    python -m fastlm.bench norm [--out DIR] [--quick] [--rows R ...] [--widths N ...]
                                [--dtype bf16|fp16|fp32] [--reps N] [--compile auto|on|off]
    python -m fastlm.bench ce   [--rows N ...] [--widths VOCAB ...]   cross_entropy
    python -m fastlm.bench lce  [--rows N ...] [--widths VOCAB ...] [--ignored F ...]   linear_cross_entropy (H from
                                 the defaults), each case with these fractions of the targets ignored (default 0 0.85)
    python -m fastlm.bench distill [--rows N ...] [--widths VOCAB ...]   kl_div, jsd, linear_jsd
    python -m fastlm.bench attention [--rows SEQLEN ...] [--widths HEAD_DIM ...]   flash attention
    python -m fastlm.bench ffn  [--rows TOKENS ...] [--widths D_MODEL ...]   feed_forward (gelu_tanh, swiglu)
    python -m fastlm.bench rope [--rows BATCH ...] [--widths SEQLEN ...]     rotary
    python -m fastlm.bench model [--rows BATCH ...] [--widths SEQLEN ...]   GPT-2 training steps (tokens/s, MFU);
                                 on CPU also the `fastlm train` tiny GPT: training and decoding tokens/s
    python -m fastlm.bench overhead [--calls N] [--ops tiny|large|OP ...]   per-call host cost of every op
                                 at tiny shapes, fastlm vs the torch call it replaces (and the CPU path at
                                 large shapes: time and peak memory); e.g. --device cpu --threads 1
    python -m fastlm.bench static [--quick] [--ops OP ...] [--modes fwd bwd]   no timing: registers, spills,
                                 shared memory, occupancy and wgmma of every launched Triton variant compiled for
                                 sm_90/sm_80, and the bytes the memory-bound ops move (see fastlm/bench/static.py)
    python -m fastlm.bench all  ...                           every suite (or name several: ffn attention)

Each suite writes <out>/<suite>.json (device, versions, date, measured ceilings, every
row), <out>/<suite>.md (the table, also printed) and <out>/<suite>.png (speedup over eager
and fraction of the device's ceiling per case). ``--compare OLD.json`` (or a folder of
them) prints what got faster or slower since that run. The device ceilings are measured
once per run and shared by its suites. See fastlm/bench/runner.py for how times are taken.

Importing this package touches no device and does not import triton.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

# Suite name -> module under fastlm.bench with run(config, harness) and the names it accepts.
SUITES = {"norm": "fastlm.bench.norm", "ce": "fastlm.bench.ce", "lce": "fastlm.bench.lce",
          "distill": "fastlm.bench.distill",
          "attention": "fastlm.bench.attention", "ffn": "fastlm.bench.ffn", "model": "fastlm.bench.model", "rope": "fastlm.bench.rope",
          "overhead": "fastlm.bench.overhead", "static": "fastlm.bench.static"}

_DEFAULT_REPS = {("cuda", False): 100, ("cuda", True): 10, ("cpu", False): 10, ("cpu", True): 3}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlm bench",
        description="Time fastlm's ops against PyTorch eager and torch.compile; write JSON and markdown.")
    p.add_argument("suite", nargs="+", choices=sorted(SUITES) + ["all"],
                   help='the suites to run, in order; "all" runs every suite')
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="folder for <suite>.json and <suite>.md (default: ./bench-out)")
    p.add_argument("--quick", action="store_true",
                   help="the smallest shape and few repetitions: checks the harness, not the kernels")
    p.add_argument("--rows", type=_positive_int, nargs="+", help="row counts (default: the suite's for the device)")
    p.add_argument("--widths", type=_positive_int, nargs="+", help="row widths (default: the suite's for the device)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="element type (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--reps", type=_positive_int,
                   help="timed calls per implementation and case (default: 100 on CUDA, 10 on CPU; --quick 10 / 3)")
    p.add_argument("--warmup", type=_positive_int, default=None, help="untimed calls first (default: 3 CUDA, 1 CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to run (default: CUDA when present)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="include torch.compile (auto: on CUDA only; on CPU each compile takes tens of seconds)")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help="only these implementations (fastlm-triton, fastlm-cuda, fastlm-torch, torch-eager, "
                        "torch-compile, liger; attention: sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math, flash-attn, xformers; ffn: matmuls; "
                        "model: hf-gpt2, hf-gpt2-fastlm)")
    p.add_argument("--ops", nargs="+", metavar="OP", help="only these ops (norm: layer_norm, rms_norm, "
                                                          "add_layer_norm, add_rms_norm; ce: cross_entropy; "
                                                          "lce: linear_cross_entropy; distill: kl_div, jsd, "
                                                          "linear_jsd; model: gpt2-124m, gpt2-350m, "
                                                          "gpt-tiny, tiny-gpt-train, tiny-gpt-decode; overhead: "
                                                          "tiny, large (the groups) or any public op's name)")
    p.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "fwd+bwd"], help="only these modes")
    p.add_argument("--ignored", type=_fraction, nargs="+", metavar="F",
                   help="lce: fractions of the targets set to ignore_index, one row per fraction, each timed "
                        "against the fraction-0 row (default: 0 0.85)")
    p.add_argument("--calls", type=_positive_int,
                   help="overhead: calls per timed loop (default 2000; --quick 200)")
    p.add_argument("--threads", type=_positive_int,
                   help="torch.set_num_threads(N) before anything runs (default: torch's own choice, or "
                        "OMP_NUM_THREADS); the overhead and model figures in the README use --threads 1")
    p.add_argument("--compare", type=Path, metavar="OLD",
                   help="an earlier run's <suite>.json (or its folder): print what got faster or slower")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suites named in ``argv``; returns 0 if every suite ran, 1 otherwise."""
    args = build_parser().parse_args(argv)

    import torch

    from . import report as report_mod
    from . import runner

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastlm bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    on_cuda = device.type == "cuda"
    config = runner.Config(
        device=device,
        dtype=runner.DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")],
        quick=args.quick,
        reps=args.reps or _DEFAULT_REPS[(device.type, args.quick)],
        warmup=args.warmup or (3 if on_cuda else 1),
        rows=args.rows,
        widths=args.widths,
        compile={"on": True, "off": False}.get(args.compile, on_cuda),
        impls=args.impls,
        ops=args.ops,
        modes=args.modes,
        calls=args.calls,
        ignored=args.ignored,
    )
    if on_cuda:
        torch.cuda.set_device(device)

    env = runner.environment(device)
    ceilings = runner.measure_ceilings(device, quick=args.quick)
    print(f"fastlm bench on {env['device']}: copy {ceilings['copy_gbps']:.1f} GB/s, "
          f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.3g} TFLOP/s", file=sys.stderr)

    status = 0
    suites = sorted(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    for suite in suites:
        harness = runner.Harness(config, ceilings)
        if env["env"].get("FASTLM_POISON") == "1":
            harness.note("FASTLM_POISON=1 was set: every kernel output is filled with NaN first, "
                         "which slows the fastlm kernels")
        if not on_cuda:
            harness.note("on CPU a case's tensors may sit in cache, so its GB/s can pass the copy "
                         "bandwidth, which is measured on a tensor larger than the cache")
        try:
            importlib.import_module(SUITES[suite]).run(config, harness)
        except Exception:  # keep what was measured; the other suites still run
            traceback.print_exc()
            harness.note(f"the {suite} suite stopped early: {traceback.format_exc().strip().splitlines()[-1]}")
            status = 1
        json_path, md_path, report = runner.write_results(args.out, suite, env, config, ceilings,
                                                          harness.rows, harness.notes)
        print(report)
        png = report_mod.plot(suite, harness.rows, args.out / f"{suite}.png",
                              title=f"{suite} on {env['device']}, {env['date'][:10]}")
        print(f"wrote {json_path}, {md_path}" + (f" and {png}" if png else " (no plot: matplotlib missing)"),
              file=sys.stderr)
        if args.compare is not None:
            old = report_mod.load_compare(args.compare, suite)
            if old is None:
                print(f"--compare: {args.compare} holds no results for the {suite} suite", file=sys.stderr)
            else:
                table, faster, slower = report_mod.compare(old, harness.rows)
                print(f"\n{suite} against {args.compare} ({old['environment'].get('device')}, "
                      f"{old['environment'].get('date', '?')[:10]}): {faster} faster, {slower} slower (> 5%)\n")
                print(table)
    return status
