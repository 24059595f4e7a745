"""Peak memory of one training step of a Hugging Face Llama, unpatched against patched.

    python -m fastlm.bench.hf_memory [--out DIR] [--vocab 128256] [--hidden 512] [--layers 2]
                                     [--seq 2048] [--batch 1] [--device auto|cpu|cuda]

A Llama-architecture model (transformers.LlamaConfig: the given vocabulary, hidden size and
depth, float32, random weights from a fixed seed; nothing is downloaded) takes one training
step, a forward with labels and a backward, in three variants, each in a fresh process so no
variant inherits another's allocator state or high-water mark:

    unpatched   transformers as it is: the (tokens, vocab) logits, then its ForCausalLMLoss
    patched     fastlm.integrations.transformers.apply(model): fastlm's attention, norms,
                rotary, MLP and loss on those same logits
    fused       apply(model, fused_linear_loss=True): the loss by fastlm.linear_cross_entropy
                from the hidden states, chunk by chunk; the logits are never formed

Why a fresh process each: on a CPU the figure is the peak resident memory (VmHWM, reset just
before the step through /proc/self/clear_refs where Linux allows it, else ru_maxrss, which
counts from the process's start), and a high-water mark cannot be taken back within a
process. On a GPU it is torch.cuda.max_memory_allocated, reset before the step. Both count
everything the process holds at that moment: the libraries (on CPU), the weights, the
gradients and the step's activations; "step MiB" is the part above what was held just
before the step. The loss of each variant is recorded beside it (the same seed gives the
same weights and tokens, so the losses must agree to rounding), with the gradients' total
norm as a second check that the step computed the same thing.

Writes <out>/hf_memory.json (environment, settings, one row per variant, the goal) and
<out>/hf_memory.md (the table, also printed). The goal, from fastlm issue 21: the fused
step's peak at most half the unpatched step's, at equal loss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

MiB = 2 ** 20
VARIANTS = ("unpatched", "patched", "fused")
WHAT = {"unpatched": "transformers as it is (logits, then ForCausalLMLoss)",
        "patched": "fastlm apply(model): fastlm layers, loss on the logits",
        "fused": "fastlm apply(model, fused_linear_loss=True): no logits"}
_RESULT = "HF_MEMORY_RESULT "  # the line a child prints its row on
GOAL_RATIO = 0.5  # the fused step's peak over the unpatched step's, at most
LOSS_RTOL = 1e-4  # the losses' relative difference, at most (float32, summed in another order)


# ----------------------------------------------------------------------------- in the child

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    """Reset this process's resident high-water mark (Linux 4.0+); False where that fails."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _cpu_peak_kib(reset_worked: bool) -> int:
    hwm = _status_kib("VmHWM") if reset_worked else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _cpu_now_kib() -> int:
    rss = _status_kib("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build_model(spec: dict[str, Any], device):
    """The Llama of ``spec``: random float32 weights from spec["seed"], in training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = spec["hidden"]
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=hidden, intermediate_size=spec.get("intermediate")
                         or 4 * hidden, num_hidden_layers=spec["layers"], num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max(spec["seq"], 2048),
                         tie_word_embeddings=False)
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.float32)
    model.train()
    return model


def run_variant(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One training step of ``variant`` in this process; its row (peak memory, loss, ...)."""
    import torch

    import fastlm  # noqa: F401  (imported by every variant, so the libraries weigh the same)
    from fastlm.integrations import transformers as fastlm_hf

    device = torch.device(spec["device"])
    model = build_model(spec, device)
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    input_ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=generator).to(device)
    labels = input_ids.clone()
    if variant != "unpatched":
        fastlm_hf.apply(model, fused_linear_loss=variant == "fused")
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset = _reset_cpu_peak()
        before = _cpu_now_kib() * 1024
    start = time.perf_counter()
    out = model(input_ids=input_ids, labels=labels)
    loss = out.loss
    logits_formed = out.logits is not None
    loss.backward()
    if on_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if on_cuda:
        peak = torch.cuda.max_memory_allocated(device)
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = _cpu_peak_kib(reset) * 1024
        how = "VmHWM (reset before the step)" if reset else "ru_maxrss (since the process started)"
    grads = [p.grad.double().norm() for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.stack(grads).norm()) if grads else None
    return {"variant": variant, "what": WHAT[variant], "peak_mib": peak / MiB, "before_mib": before / MiB,
            "step_mib": (peak - before) / MiB, "loss": float(loss.detach()), "grad_norm": grad_norm,
            "logits_formed": logits_formed, "seconds": seconds, "measured_by": how}


def _child_main(variant: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        import torch
        torch.set_num_threads(spec["threads"])
    row = run_variant(variant, spec)
    print(_RESULT + json.dumps(row), flush=True)
    return 0


# ----------------------------------------------------------------------------- in the parent

def measure(variant: str, spec: dict[str, Any], timeout: Optional[float] = None) -> dict[str, Any]:
    """Run ``variant`` in a fresh Python process and return its row; raises RuntimeError with
    the child's last output when it fails."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the fastlm package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "fastlm.bench.hf_memory", "--child", variant,
                           "--spec", json.dumps(spec)], capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    raise RuntimeError(f"hf_memory: the {variant} step failed (exit {proc.returncode}):\n" + "\n".join(tail))


def goal(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The issue's goal: the fused step's peak / the unpatched step's, and the losses' agreement."""
    by = {r["variant"]: r for r in rows}
    if "unpatched" not in by or "fused" not in by:
        return None
    base, fused = by["unpatched"], by["fused"]
    ratio = fused["peak_mib"] / base["peak_mib"]
    loss_rel = abs(fused["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-30)
    return {"peak_ratio": ratio, "max_ratio": GOAL_RATIO, "loss_rel_diff": loss_rel, "loss_rtol": LOSS_RTOL,
            "met": ratio <= GOAL_RATIO and loss_rel <= LOSS_RTOL}


def markdown(doc: dict[str, Any]) -> str:
    env, s, rows = doc["environment"], doc["settings"], doc["rows"]
    base = next((r for r in rows if r["variant"] == "unpatched"), None)
    lines = ["## hf_memory", "",
             f"{env['device']} ({env['device_type']}), {env['date']}; torch {env['torch']}, "
             f"transformers {doc.get('transformers') or '-'}, python {env['python']}", "",
             f"One training step (forward with labels, backward) of a Llama-architecture model: vocabulary "
             f"{s['vocab']:,}, hidden {s['hidden']}, {s['layers']} layers, batch {s['batch']} x {s['seq']:,} tokens, "
             f"float32, random weights (seed {s['seed']}). Each variant in a fresh process; peak = "
             f"{rows[0]['measured_by'] if rows else '-'} during the step, everything the process holds "
             f"(weights, gradients, activations" + (", libraries" if env["device_type"] == "cpu" else "")
             + "); step = the peak above what was held just before the step.", "",
             "| variant | what runs | peak MiB | step MiB | peak vs unpatched | loss | grad norm | logits formed "
             "| step s |",
             "|---|---|--:|--:|--:|--:|--:|---|--:|"]
    for r in rows:
        vs = f"{r['peak_mib'] / base['peak_mib']:.2f}x" if base else "-"
        gn = f"{r['grad_norm']:.6g}" if r.get("grad_norm") is not None else "-"
        lines.append(f"| {r['variant']} | {r['what']} | {r['peak_mib']:,.0f} | {r['step_mib']:,.0f} | {vs} | "
                     f"{r['loss']:.6f} | {gn} | {'yes' if r['logits_formed'] else 'no'} | {r['seconds']:.2f} |")
    g = doc.get("goal")
    if g is not None:
        lines += ["", f"Goal (fastlm issue 21): the fused step's peak at most {g['max_ratio']:.2f}x the unpatched "
                      f"step's at equal loss: {g['peak_ratio']:.2f}x, loss relative difference "
                      f"{g['loss_rel_diff']:.1e} (at most {g['loss_rtol']:.0e}): "
                      + ("met." if g["met"] else "missed.")]
    if doc.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench.hf_memory",
                                description="Peak memory of one training step of a Hugging Face Llama, unpatched "
                                            "vs fastlm-patched, each in a fresh process.")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for hf_memory.json and .md")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary (default Llama 3's 128,256)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512; heads of 64)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--timeout", type=float, default=None, help="seconds per child at most")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child_main(args.child, args.spec)
    for name in ("vocab", "hidden", "layers", "seq", "batch"):
        if getattr(args, name) < 1:
            print(f"hf_memory: --{name} must be positive", file=sys.stderr)
            return 2
    import torch

    from .runner import environment

    if args.device == "cuda" and not torch.cuda.is_available():
        print("hf_memory: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    spec = {"vocab": args.vocab, "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
            "seq": args.seq, "batch": args.batch, "seed": args.seed, "device": device, "threads": args.threads}
    rows, notes, status = [], [], 0
    for variant in args.variants:
        print(f"hf_memory: {variant} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(variant, spec, args.timeout))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            notes.append(f"{variant} failed: {str(exc).strip().splitlines()[-1]}")
            print(str(exc), file=sys.stderr)
            status = 1
    try:
        from importlib.metadata import version
        tf_version = version("transformers")
    except Exception:
        tf_version = None
    env = environment(torch.device(device))
    if args.threads:
        env["torch_threads"] = args.threads
    doc = {"suite": "hf_memory", "environment": env, "transformers": tf_version,
           "settings": {k: v for k, v in spec.items()}, "rows": rows, "goal": goal(rows), "notes": notes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_memory.json").write_text(json.dumps(doc, indent=2) + "\n")
    report = markdown(doc)
    (args.out / "hf_memory.md").write_text(report)
    print(report)
    print(f"wrote {args.out / 'hf_memory.json'} and {args.out / 'hf_memory.md'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
