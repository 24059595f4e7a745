"""Every setting of fastlm train / eval / generate is checked before any data is read or any
directory written (issue 25): a bad value is one error line naming the option, the value and
what is allowed, exit code 2, no traceback, no run directory; good values at the edges of
the allowed ranges still run."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from fastlm.train import config
from fastlm.train.commands import eval_main, generate_main, train_main

from .train_common import train_args, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), n_files=6)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny trained GPT, its final sample drawn with the edge values (greedy, no top-k, no
    top-p, no clipping, one checkpoint kept, one thread, no warmup)."""
    out = str(tmp_path_factory.mktemp("runs") / "gpt")
    assert train_main(train_args("gpt", corpus, out, 2, "--temperature", "0", "--top-k", "0", "--top-p", "1",
                                 "--grad-clip", "0", "--keep", "1", "--threads", "1", "--warmup", "0",
                                 "--eval-tokens", "0")) == 0
    return out


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _refused(capsys, rc: int, command: str, words) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastlm {command}: error: "), err
    for word in words:
        assert word in err, (word, err)
    return err


TRAIN_REFUSALS = [
    # (model, arguments, words the error must hold)
    ("gpt", ["--lr", "nan"], ["--lr nan", "finite number > 0"]),
    ("gpt", ["--lr", "inf"], ["--lr inf", "finite number > 0"]),
    ("gpt", ["--lr", "0"], ["--lr 0.0", "> 0"]),
    ("gpt", ["--lr=-1e-3"], ["--lr -0.001", "> 0"]),
    ("gpt", ["--min-lr-ratio", "1.5"], ["--min-lr-ratio 1.5", "[0, 1]"]),
    ("gpt", ["--beta1", "1.5"], ["--beta1 1.5", "[0, 1)"]),
    ("gpt", ["--beta2", "1"], ["--beta2 1.0", "[0, 1)"]),
    ("gpt", ["--beta1", "nan"], ["--beta1 nan", "[0, 1)"]),
    ("gpt", ["--weight-decay", "-1"], ["--weight-decay -1.0", ">= 0"]),
    ("gpt", ["--grad-clip", "-1"], ["--grad-clip -1.0", ">= 0", "0: off"]),
    ("gpt", ["--grad-clip", "inf"], ["--grad-clip inf", "finite"]),
    ("gpt", ["--warmup", "-1"], ["--warmup -1", ">= 0"]),
    ("gpt", ["--seq-len", "0"], ["--seq-len 0", ">= 1"]),
    ("gpt", ["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    ("gpt", ["--grad-accum", "0"], ["--grad-accum 0", ">= 1"]),
    ("gpt", ["--steps", "0"], ["--steps 0", ">= 1"]),
    ("gpt", ["--seed", "-1"], ["--seed -1", "[0, 2^64)"]),
    ("gpt", ["--threads", "-2"], ["--threads -2", ">= 0"]),
    ("gpt", ["--keep", "0"], ["--keep 0", ">= 1"]),
    ("gpt", ["--eval-every", "0"], ["--eval-every 0", ">= 1"]),
    ("gpt", ["--save-every", "-3"], ["--save-every -3", ">= 1"]),
    ("gpt", ["--log-every", "0"], ["--log-every 0", ">= 1"]),
    ("gpt", ["--eval-tokens", "-1"], ["--eval-tokens -1", ">= 0"]),
    ("gpt", ["--stop-after", "-1"], ["--stop-after -1", ">= 0"]),
    ("gpt", ["--peak-tflops", "-1"], ["--peak-tflops -1.0", ">= 0"]),
    ("gpt", ["--sample-tokens", "-1"], ["--sample-tokens -1", ">= 0"]),
    ("gpt", ["--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    ("gpt", ["--temperature", "nan"], ["--temperature nan", "finite"]),
    ("gpt", ["--top-k", "-3"], ["--top-k -3", ">= 0", "0: off"]),
    ("gpt", ["--top-p", "2"], ["--top-p 2.0", "(0, 1]"]),
    ("gpt", ["--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
    ("gpt", ["--val-fraction", "0"], ["--val-fraction 0.0", "(0, 1)"]),
    ("gpt", ["--val-fraction", "1"], ["--val-fraction 1.0", "(0, 1)"]),
    ("gpt", ["--max-data-bytes", "0"], ["--max-data-bytes 0", ">= 1"]),
    ("gpt", ["--max-data-bytes", "lots"], ["--max-data-bytes 'lots'", "number of bytes"]),
    ("gpt", ["--tokenizer", "word"], ["--tokenizer 'word'", "byte, bpe"]),
    ("gpt", ["--tokenizer", "bpe", "--bpe-vocab-size", "300"], ["--bpe-vocab-size 300", ">= 321"]),
    ("gpt", ["--backend", "fast"], ["--backend 'fast'", "auto, torch, triton, cuda"]),
    ("gpt", ["--backend", "cuda"], ["--backend cuda", "cannot run on cpu"]),
    ("gpt", ["--device", "tpu"], ["--device 'tpu'", "cpu, cuda"]),
    # options that do nothing with the others
    ("gpt", ["--bpe-vocab-size", "500"], ["--bpe-vocab-size", "--tokenizer bpe only"]),
    ("gpt", ["--mlm-probability", "0.3"], ["--mlm-probability", "--model bert only"]),
    ("bert", ["--noise-density", "0.3"], ["--noise-density", "--model encdec only"]),
    ("gpt", ["--mean-span", "5"], ["--mean-span", "--model encdec only"]),
    ("lstm", ["--ngram-order", "3"], ["--ngram-order", "--model ngram only"]),
    ("ngram", ["--compile"], ["--model ngram", "--compile"]),
    # objectives
    ("bert", ["--mlm-probability", "0"], ["--mlm-probability 0.0", "(0, 1)"]),
    ("encdec", ["--noise-density", "1"], ["--noise-density 1.0", "(0, 1)"]),
    ("encdec", ["--mean-span", "0.5"], ["--mean-span 0.5", ">= 1"]),
    ("ngram", ["--ngram-order", "0"], ["--ngram-order 0", ">= 1"]),
    # model options, each model kind
    ("gpt", ["--n-layer", "0"], ["--n-layer 0", ">= 1"]),
    ("gpt", ["--n-kv-head", "0"], ["--n-kv-head 0", ">= 1"]),
    ("gpt", ["--d-hidden", "-4"], ["--d-hidden -4", ">= 1"]),
    ("gpt", ["--max-seq-len", "0"], ["--max-seq-len 0", ">= 1"]),
    ("gpt", ["--dropout", "1"], ["--dropout 1.0", "[0, 1)"]),
    ("gpt", ["--dropout", "nan"], ["--dropout nan", "[0, 1)"]),
    ("gpt", ["--norm-eps", "0"], ["--norm-eps 0.0", "> 0"]),
    ("gpt", ["--rotary-base", "nan"], ["--rotary-base nan", "> 1"]),
    ("gpt", ["--init-std", "-0.02"], ["--init-std -0.02", "> 0"]),
    ("gpt", ["--n-head", "3"], ["not divisible by n_head 3"]),
    ("gpt", ["--activation", "sigmoid"], ["activation", "sigmoid"]),
    ("gpt", ["--positions", "alibi"], ["positions", "alibi"]),
    ("bert", ["--type-vocab-size", "0"], ["--type-vocab-size 0", ">= 1"]),
    ("bert", ["--head-activation", "swiglu"], ["head_activation", "swiglu"]),
    ("encdec", ["--n-decoder-layer", "0"], ["--n-decoder-layer 0", ">= 1"]),
    ("encdec", ["--norm", "batchnorm"], ["norm", "batchnorm"]),
    ("lstm", ["--d-embed", "0"], ["--d-embed 0", ">= 1"]),
    ("lstm", ["--forget-bias", "inf"], ["--forget-bias inf", "finite"]),
]


@pytest.mark.parametrize("model, args, words", TRAIN_REFUSALS,
                         ids=[f"{m}:{' '.join(a)}" for m, a, _ in TRAIN_REFUSALS])
def test_train_refuses_a_bad_setting_before_reading_data_or_writing(model, args, words, tmp_path, capsys, no_cuda):
    out = str(tmp_path / "run")
    # /dev/zero as the data: were it read first, the error would be about it (or memory)
    rc = train_main(["--model", model, "--data", "/dev/zero", "--out", out, "--no-progress", "--backend", "torch",
                     *args])
    _refused(capsys, rc, "train", words)
    assert not os.path.exists(out)


def test_train_refuses_cuda_without_cuda_and_a_device_beyond_the_count(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    base = ["--data", "/dev/zero", "--out", out, "--no-progress"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(capsys, train_main(base + ["--device", "cuda"]), "train", ["--device cuda", "no CUDA device"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _refused(capsys, train_main(base + ["--device", "cuda:2"]), "train", ["--device cuda:2", "2 CUDA device(s)"])
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's rank 3 on a 2-GPU machine
    _refused(capsys, train_main(base + ["--device", "cuda"]), "train", ["--device cuda", "LOCAL_RANK is 3"])
    assert not os.path.exists(out)


def test_train_refuses_triton_where_triton_cannot_run(tmp_path, capsys, monkeypatch, no_cuda):
    out = str(tmp_path / "run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter: no Triton here
    rc = train_main(["--data", "/dev/zero", "--out", out, "--backend", "triton"])
    _refused(capsys, rc, "train", ["--backend triton", "cannot run on cpu", "TRITON_INTERPRET=1"])
    assert not os.path.exists(out)


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("keep me\n")
    _refused(capsys, train_main(["--data", "/dev/zero", "--out", str(out)]), "train", ["--out", "not a directory"])
    assert out.read_text() == "keep me\n"


def test_a_config_file_is_held_to_the_same_rules(corpus, tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text('{"lr": "nan", "model_config": {"n_layer": 1}}')
    out = str(tmp_path / "run")
    _refused(capsys, train_main(["--config", str(cfg), "--data", "/dev/zero", "--out", out]), "train", ["--lr nan"])
    assert not os.path.exists(out)
    # an option that does nothing for this model is refused on the command line, but not from
    # a file shared by several models
    cfg.write_text('{"mlm_probability": 0.2}')
    assert config.build({"data": [corpus]}, str(cfg))[0].mlm_probability == 0.2
    with pytest.raises(config.ConfigError, match="--model bert only"):
        config.build({"data": [corpus], "mlm_probability": "0.2"})


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    (["--threads", "-2"], ["--threads -2", ">= 0"]),
    (["--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
    (["--keep", "0"], ["--keep 0", ">= 1"]),
])
def test_resume_refuses_a_bad_setting_it_may_change(args, words, run, capsys):
    before = sorted(os.listdir(run))
    _refused(capsys, train_main(["--resume", run, "--no-progress", *args]), "train", words)
    assert sorted(os.listdir(run)) == before


EVAL_REFUSALS = [
    (["--batch-size", "-1"], ["--batch-size -1", ">= 1"]),
    (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    (["--max-tokens", "-5"], ["--max-tokens -5", ">= 0"]),
    (["--max-data-bytes", "0"], ["--max-data-bytes 0", ">= 1"]),
    (["--max-data-bytes", "1X"], ["--max-data-bytes '1X'", "number of bytes"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--device", "gpu"], ["--device 'gpu'"]),
    (["--backend", "fast"], ["--backend 'fast'"]),
    (["--backend", "cuda"], ["--backend cuda", "cannot run on cpu"]),
]


@pytest.mark.parametrize("args, words", EVAL_REFUSALS, ids=[" ".join(a) for a, _ in EVAL_REFUSALS])
def test_eval_refuses_a_bad_setting_before_opening_anything(args, words, tmp_path, capsys, no_cuda):
    # a checkpoint that does not exist: the setting's error comes first, not "no such checkpoint"
    rc = eval_main([str(tmp_path / "missing"), "--data", "/dev/zero", *args])
    _refused(capsys, rc, "eval", words)


GENERATE_REFUSALS = [
    (["--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    (["--temperature", "nan"], ["--temperature nan", "finite"]),
    (["--temperature", "inf"], ["--temperature inf", "finite"]),
    (["--top-k", "-3"], ["--top-k -3", ">= 0"]),
    (["--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
    (["--top-p", "2"], ["--top-p 2.0", "(0, 1]"]),
    (["--top-p", "nan"], ["--top-p nan", "(0, 1]"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens -1", ">= 0"]),
    (["--num-samples", "0"], ["--num-samples 0", ">= 1"]),
    (["--seed", "-1"], ["--seed -1", "[0, 2^64)"]),
    (["--seed", str(2 ** 64 - 1), "--num-samples", "2"], ["--seed 18446744073709551615", "--num-samples 2"]),
    (["--device", "cuda"], ["--device cuda", "no CUDA device"]),
    (["--backend", "cuda"], ["--backend cuda", "cannot run on cpu"]),
]


@pytest.mark.parametrize("args, words", GENERATE_REFUSALS, ids=[" ".join(a) for a, _ in GENERATE_REFUSALS])
def test_generate_refuses_a_bad_setting_before_opening_anything(args, words, tmp_path, capsys, no_cuda):
    _refused(capsys, generate_main([str(tmp_path / "missing"), *args]), "generate", words)


def test_generate_and_eval_refuse_triton_where_it_cannot_run(tmp_path, capsys, monkeypatch, no_cuda):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _refused(capsys, generate_main([str(tmp_path / "missing"), "--backend", "triton"]), "generate",
             ["--backend triton", "interpreter"])
    _refused(capsys, eval_main([str(tmp_path / "missing"), "--backend", "triton"]), "eval",
             ["--backend triton", "interpreter"])


def test_edge_values_are_accepted_and_run(run, capsys):
    """The fixture trained and sampled with temperature 0, top-k 0, top-p 1, grad-clip 0,
    keep 1, threads 1, warmup 0; eval and generate take their edge values too."""
    assert len(os.listdir(os.path.join(run, "checkpoints"))) == 1  # --keep 1
    capsys.readouterr()
    assert eval_main([run, "--batch-size", "1", "--max-tokens", "0", "--max-data-bytes", "64M", "--json"]) == 0
    assert '"tokens"' in capsys.readouterr().out
    greedy = ["--temperature", "0", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "6", "--prompt", "ab"]
    assert generate_main([run, *greedy, "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert generate_main([run, *greedy, "--seed", "2"]) == 0
    assert capsys.readouterr().out == first  # greedy: the seed does not matter
    assert generate_main([run, "--max-new-tokens", "0", "--seed", str(2 ** 64 - 1), "--top-p", "1e-9"]) == 0


def test_build_accepts_the_edges_of_every_range(corpus):
    options, _ = config.build({"data": [corpus], "lr": "1e-12", "beta1": "0", "beta2": "0.999", "grad_clip": "0",
                               "keep": "1", "top_k": "0", "top_p": "1", "temperature": "0", "threads": "0",
                               "warmup": "0", "eval_tokens": "0", "stop_after": "0", "peak_tflops": "0",
                               "weight_decay": "0", "min_lr_ratio": "1", "max_data_bytes": "1.5G",
                               "seed": str(2 ** 64 - 1), "sample_tokens": "0", "dropout": "0", "device": "cpu"})
    assert (options.lr, options.top_p, options.max_data_bytes) == (1e-12, 1.0, 3 << 29)
    config.build({"model": "bert", "mlm_probability": "0.5", "type_vocab_size": "1"})
    config.build({"model": "encdec", "noise_density": "0.5", "mean_span": "1"})
    config.build({"model": "ngram", "ngram_order": "1"})
    config.build({"tokenizer": "bpe", "bpe_vocab_size": "321"})
    config.build({"model": "lstm", "forget_bias": "-3", "d_embed": "none"})


def test_every_option_has_a_rule_or_a_named_check():
    """A new field of TrainOptions or of a model config cannot slip past validation unnoticed."""
    fields = {f.name: f.type for f in dataclasses.fields(config.TrainOptions)}
    fields.update({name: f.type for name, f in config.all_model_fields().items()})
    missing = [name for name, ann in fields.items()
               if name not in config.RULES and name not in config.CHECKED_ELSEWHERE and "bool" not in str(ann)]
    assert not missing, f"options with no rule: {missing}"
    others = {"max_new_tokens", "num_samples", "max_tokens"}  # eval's and generate's own
    assert set(config.RULES) <= set(fields) | others, set(config.RULES) - set(fields) - others


def test_no_number_rule_passes_nan_or_infinity():
    for name, rule in config.RULES.items():
        if "number" in rule.allowed or "integer" in rule.allowed:
            for bad in (math.nan, math.inf, -math.inf, True, "1"):
                assert not rule.test(bad), (name, bad)


@pytest.mark.parametrize("text, expected", [("1000", 1000), ("1k", 1024), ("512M", 512 << 20), ("1.5G", 3 << 29),
                                            ("2GiB", 2 << 30), ("1 TB", 1 << 40), (4096, 4096)])
def test_sizes_parse_in_powers_of_1024(text, expected):
    assert config.parse_size("max_data_bytes", text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1Q", "G"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(config.ConfigError, match="number of bytes"):
        config.parse_size("max_data_bytes", text)
