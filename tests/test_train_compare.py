"""python -m fastlm.train.compare: trains each model, scores all on the same tokens, writes the
JSON the README's table is generated from."""

import json

from fastlm.bench import report
from fastlm.train import compare

from .train_common import write_corpus


def test_compare_writes_the_table_the_readme_uses(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "data", n_files=12, lines=20)
    out = tmp_path / "benchmarks" / "results" / "cmp"
    extra = ["--data", corpus, "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "256",
             "--backend", "torch", "--warmup", "1", "--sample-tokens", "4"]
    assert compare.main(["--out", str(out), "--models", "ngram", "lstm", "gpt", "--max-tokens", "2048", "--", *extra]) == 0
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["suite"] == "lm-comparison" and [r["model"] for r in doc["rows"]] == ["ngram", "lstm", "gpt"]
    assert len({r["tokens"] for r in doc["rows"]}) == 1
    for r in doc["rows"]:
        assert r["perplexity"] > 1 and r["bits_per_byte"] > 0 and r["train_seconds"] > 0
        assert r["train_command"].startswith("fastlm train --model " + r["model"])
    section = report.lm_section(tmp_path / "benchmarks" / "results")
    assert "| LSTM | tiny |" in section and "| Kneser-Ney n-gram | tiny | - |" in section
