"""n-gram, LSTM and Transformer side by side on the same data: the table in the README.

    python -m fastlm.train.compare --out benchmarks/results/lm-comparison-<machine>-<date>
                                   [--models ngram lstm gpt] [--preset tiny] [-- extra train options]

Trains each model with ``fastlm train`` (its preset, the built-in corpus unless the extra
options say otherwise), scores each with ``fastlm eval`` on the same validation tokens, and
writes ``comparison.json`` (machine, versions, date, the commands, every figure) and
``comparison.md``. ``python -m fastlm.bench.report`` puts the newest such table in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

MODELS = ("ngram", "lstm", "gpt")
NAMES = {"ngram": "Kneser-Ney n-gram", "lstm": "LSTM", "gpt": "Transformer (GPT)"}


def _quiet_json(fn, argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fn(argv)
    if rc != 0:
        raise RuntimeError(f"{fn.__name__}({argv}) exited {rc}")
    from .metrics import loads_record  # non-finite figures come back as floats (null + "nonfinite" in the JSON)
    return loads_record(out.getvalue().strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = ["| model | preset | parameters | training time | val loss (nats/token) | perplexity | bits per byte |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f}M" if r.get("parameters") else "-"
        lines.append(f"| {NAMES.get(r['model'], r['model'])} | {r['preset']} | {params} | {r['train_seconds']:.0f} s | "
                     f"{r['loss']:.3f} | {r['perplexity']:.2f} | {r['bits_per_byte']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(prog="python -m fastlm.train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-tokens", type=int, default=1 << 20, help="validation tokens to score (fastlm eval's)")
    args = p.parse_args(argv)

    import torch

    from ..bench.runner import environment
    from .commands import eval_main, train_main
    from .evaluate import load

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        run = args.out / "runs" / model
        # --overwrite: a comparison run again into the same --out retrains its own runs/ (atomically)
        train_args = ["--model", model, "--preset", args.preset, "--out", str(run), "--overwrite", "--no-progress",
                      *extra]
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = train_main(train_args)
        if rc != 0:
            print(f"compare: fastlm train {' '.join(train_args)} exited {rc}", file=sys.stderr)
            return rc
        seconds = time.perf_counter() - start
        eval_args = [str(run), "--json", "--max-tokens", str(args.max_tokens)]
        result = _quiet_json(eval_main, eval_args)
        loaded = load(str(run), torch.device("cpu"))
        params = sum(p.numel() for p in loaded.model.parameters()) if model != "ngram" else None
        rows.append({"model": model, "preset": args.preset, "parameters": params, "train_seconds": seconds,
                     "train_command": "fastlm train " + " ".join(train_args),
                     "eval_command": "fastlm eval " + " ".join(eval_args), **result})
        print(f"compare: {model}: {result['perplexity']:.3f} perplexity, {result['bits_per_byte']:.3f} bits/byte "
              f"({seconds:.0f} s to train)", file=sys.stderr)
    tokens = {r["tokens"] for r in rows}
    if len(tokens) != 1:
        print(f"compare: the models were scored on different token counts {sorted(tokens)}", file=sys.stderr)
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc = {"suite": "lm-comparison", "environment": environment(device), "rows": rows}
    from .metrics import dumps_strict
    (args.out / "comparison.json").write_text(dumps_strict(doc, indent=2, default=str) + "\n")
    (args.out / "comparison.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
