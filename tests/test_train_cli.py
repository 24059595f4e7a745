"""fastlm train / eval / generate end to end at tiny sizes, on CPU with the reference backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastlm import cli
from fastlm.train import checkpoint as ck
from fastlm.train.commands import eval_main, generate_main, train_main

from .train_common import losses, train_args, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("model", ["gpt", "bert", "encdec", "lstm", "ngram"])
def test_train_eval_generate(model, corpus, tmp_path, capsys):
    run = str(tmp_path / model)
    steps = 6
    assert cli.main(["train", *train_args(model, corpus, run, steps)]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out and "validation:" in out and "sample" in out
    meta = ck.open_checkpoint(run).meta
    assert meta["model"] == model and meta["step"] == (0 if model == "ngram" else steps)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    vals = [r for r in records if r["kind"] == "val"]
    if model != "ngram":
        trained = losses(run)
        assert [s for s, _ in trained] == list(range(1, steps + 1))
        assert trained[-1][1] < trained[0][1]  # it learns
        assert os.path.getsize(os.path.join(run, "loss.png")) > 1000
        assert [r["step"] for r in vals] == [2, 4, 6] and vals[-1]["val_loss"] < vals[0]["val_loss"]
    causal = model in ("gpt", "lstm", "ngram")
    assert ("val_bits_per_byte" in vals[-1]) == causal

    assert eval_main([run, "--json", "--max-tokens", "1024"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == model and result["split"] == "val" and result["tokens"] > 0
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-6 * result["perplexity"]
    if causal:  # bits per byte = nats / ln 2 * tokens per byte (byte-level: ~1 token per byte)
        assert abs(result["bits_per_byte"] / (result["loss"] / 0.6931471805599453) - 1) < 0.05
    assert eval_main([run, "--data", os.path.join(corpus, "sub"), "--max-tokens", "512"]) == 0
    assert "(all)" in capsys.readouterr().out

    prompt = {"encdec": "abc <extra_id_0> def", "bert": "abc <mask><mask> def"}.get(model, "abc ")
    assert generate_main([run, "--prompt", prompt, "--max-new-tokens", "12", "--num-samples", "2", "--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert text.count("--- sample") == 2 and "abc" in text
    assert generate_main([run, "--prompt", prompt, "--max-new-tokens", "12", "--num-samples", "2", "--seed", "5"]) == 0
    assert capsys.readouterr().out == text  # seeded: the same samples again


def test_bpe_tokenizer_is_saved_beside_the_checkpoint(corpus, tmp_path, capsys):
    run = str(tmp_path / "bpe")
    assert train_main(train_args("gpt", corpus, run, 2, "--tokenizer", "bpe", "--bpe-vocab-size", "400")) == 0
    assert os.path.isfile(os.path.join(run, "tokenizer.json"))
    assert os.path.isfile(os.path.join(ck.resolve(run), "tokenizer.json"))
    assert generate_main([run, "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    assert eval_main([run, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bits_per_byte"] > 0 and result["tokens"] > 0
    assert train_main(["--resume", run, "--steps", "3", "--no-progress"]) == 0  # the saved tokenizer comes back
    assert ck.open_checkpoint(run).meta["step"] == 3


def test_config_file_and_command_line_combine(corpus, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "gpt", "steps": 2, "model_config": {"n_layer": 1, "positions": "rotary"},
                                  "norm": "rmsnorm"}))
    run = str(tmp_path / "cfg")
    args = train_args("gpt", corpus, run, 2, "--d-model", "48", "--n-head", "2", tiny=False)
    assert train_main(["--config", str(config), *args]) == 0
    cfg = ck.open_checkpoint(run).meta["model_config"]
    assert (cfg["n_layer"], cfg["positions"], cfg["norm"], cfg["d_model"]) == (1, "rotary", "rmsnorm", 48)


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/path"], "no such file or directory"),
    (["--n-head", "3"], "not divisible"),
    (["--n-encoder-layer", "2"], "not an option of --model gpt"),
    (["--max-seq-len", "16"], "shorter than"),
    (["--model", "transformerxl"], "expected one of"),
    (["--preset", "huge"], "--preset"),
    (["--lr", "fast"], "not a valid float"),
    (["--vocab-size", "100"], "set by the tokenizer"),
    (["--seq-len", "100000"], "fewer than one window"),
    (["--fsdp"], "several processes"),
])
def test_bad_input_stops_before_training(args, message, corpus, tmp_path, capsys):
    run = str(tmp_path / "bad")
    base = train_args("gpt", corpus, run, 2)
    rc = train_main(base + args) if "--fsdp" not in args else None
    if rc is None:
        with pytest.raises(SystemExit, match=message):
            train_main(base + args)
    else:
        assert rc == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


def test_empty_corpus_and_bad_config_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    assert train_main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no text found" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("{not json")
    assert train_main(["--config", str(tmp_path / "c.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "c.json").write_text('{"learning_speed": 3}')
    assert train_main(["--config", str(tmp_path / "c.json")]) == 2
    assert "unknown option 'learning_speed'" in capsys.readouterr().err


def test_python_dash_m_fastlm_train_help():
    out = subprocess.run([sys.executable, "-m", "fastlm", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--resume" in out.stdout and "--n-encoder-layer" in out.stdout


def test_activation_checkpointing_and_accumulation_keep_the_losses(corpus, tmp_path):
    def run(name, *extra, batch="8", dropout="0.1"):
        args = train_args("gpt", corpus, str(tmp_path / name), 3, *extra, "--dropout", dropout)
        args[args.index("--batch-size") + 1] = batch
        assert train_main(args) == 0
        return [loss for _, loss in losses(str(tmp_path / name))]

    plain = run("plain")
    assert run("ckpt", "--activation-checkpointing") == plain  # recomputation replays the same dropout masks
    whole = run("whole", dropout="0")
    halves = run("halves", "--grad-accum", "2", batch="4", dropout="0")
    assert len(whole) == 3 and whole != plain
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(halves, whole)), (halves, whole)


def test_ngram_and_gpt_are_scored_on_the_same_tokens(corpus, tmp_path, capsys):
    """The comparison table is fair only if every model is scored on the same tokens: the
    n-gram scores each window's tokens after the first, as the causal models predict them."""
    tokens = {}
    for model in ("gpt", "ngram"):
        run = str(tmp_path / model)
        assert train_main(train_args(model, corpus, run, 2)) == 0
        capsys.readouterr()
        assert eval_main([run, "--json", "--max-tokens", "1024"]) == 0
        tokens[model] = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens["ngram"] == tokens["gpt"] > 0


def test_triton_kernels_train_like_the_reference(corpus, tmp_path, monkeypatch):
    """The same tiny run on the Triton kernels (the interpreter here, a GPU in the runbook) and
    on the reference: the same per-step losses to float32 accuracy."""
    from fastlm.kernels import matmul

    calls = []
    real = matmul.linear_fwd  # the qkv and output projections, and the feed-forward block's first matmul
    monkeypatch.setattr(matmul, "linear_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = {}
    for backend in ("torch", "triton"):
        run = str(tmp_path / backend)
        args = train_args("gpt", corpus, run, 3, "--backend", backend, "--n-layer", "1", "--d-model", "32",
                          "--n-head", "2", "--eval-every", "1000", "--eval-tokens", "64", "--sample-tokens", "1",
                          "--seq-len", "16", tiny=False)
        assert train_main(args) == 0
        got[backend] = losses(run)
    assert calls, "--backend triton did not run the Triton matmul kernels"
    assert [s for s, _ in got["triton"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(got["triton"], got["torch"]):
        assert abs(a - b) < 1e-4 * abs(b), (got["triton"], got["torch"])
