"""What a run writes: a non-finite loss stops it before anything is saved over the last good
checkpoint; metrics.jsonl and `fastlm eval --json` are standard JSON (non-finite values are
null, named in "nonfinite"); a save cut short leaves nothing a later save or resume keeps; a
tampered manifest is an error naming the file and the field, and never costs the history."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from fastlm.models import GPT
from fastlm.train import checkpoint as ck
from fastlm.train import metrics
from fastlm.train.commands import eval_main, generate_main, train_main

from .train_common import train_args, tree, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), n_files=8, lines=20)


def _reject(name):
    raise ValueError(f"not standard JSON: {name}")


def strict_lines(path) -> list:
    """Every line of a JSON-lines file through a parser that refuses NaN and Infinity."""
    with open(path) as f:
        return [json.loads(line, parse_constant=_reject) for line in f if line.strip()]


def poison_loss(monkeypatch, value: float, from_call: int = 1, training: bool = True):
    """GPT's loss times `value` from the from_call-th forward (in training or in eval mode)."""
    real = GPT.forward
    calls = [0]

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if self.training == training:
            calls[0] += 1
            if calls[0] >= from_call and "loss" in out:
                out = dict(out, loss=out["loss"] * value)
        return out

    monkeypatch.setattr(GPT, "forward", forward)


@pytest.mark.parametrize("value, log_every, name", [(math.nan, "1", "nan"), (math.inf, "5", "inf")])
def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(value, log_every, name, corpus, tmp_path,
                                                                      monkeypatch, capsys):
    run = str(tmp_path / "run")
    args = train_args("gpt", corpus, run, 8, "--log-every", log_every, "--save-every", "2", "--eval-every", "100")
    assert train_main([*args, "--stop-after", "2"]) == 0
    before = tree(run)
    history = open(os.path.join(run, "metrics.jsonl")).read()
    poison_loss(monkeypatch, value)  # step 3's loss is not finite (one micro-batch per step)
    capsys.readouterr()
    assert train_main(["--resume", run, "--no-progress", "--log-every", log_every]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step 3: the training loss is " + name in err
    assert "the last checkpoint (step 2" in err
    # log every step: stopped at step 3; every 5th: found before step 4's save, still naming step 3
    assert f"stopped at step {3 if log_every == '1' else 4}" in err
    after = tree(run)
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == \
        {k: v for k, v in before.items() if k != "metrics.jsonl"}
    assert [s for s, _ in ck.step_dirs(run)] == [2] and ck.open_checkpoint(run).meta["step"] == 2
    text = open(os.path.join(run, "metrics.jsonl")).read()
    assert text.startswith(history)  # the history is kept, the bad step appended when logged
    records = strict_lines(os.path.join(run, "metrics.jsonl"))
    if log_every == "1":
        bad = records[-1]
        assert bad["step"] == 3 and bad["loss"] is None and bad["nonfinite"]["loss"] == name.replace("nan", "NaN") \
            .replace("inf", "Infinity")
        assert math.isnan(metrics.read_metrics(os.path.join(run, "metrics.jsonl"))[-1]["loss"]) == (name == "nan")
    else:
        assert text == history
    # the run is not lost: without the fault it continues from step 2
    monkeypatch.undo()
    assert train_main(["--resume", run, "--no-progress"]) == 0
    assert ck.open_checkpoint(run).meta["step"] == 8


def test_a_fresh_run_that_diverges_at_once_saves_nothing(corpus, tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    poison_loss(monkeypatch, math.nan)
    assert train_main(train_args("gpt", corpus, run, 4)) == 2
    err = capsys.readouterr().err
    assert "step 1: the training loss is nan" in err and "no checkpoint was written" in err
    assert not os.path.exists(os.path.join(run, "checkpoints")) and not os.path.exists(os.path.join(run, ck.LOCK))
    assert [r["loss"] for r in strict_lines(os.path.join(run, "metrics.jsonl"))] == [None]


def test_a_learning_rate_that_blows_up_stops_at_the_first_bad_step(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 6, "--lr", "1e30", "--grad-clip", "0")) == 2
    err = capsys.readouterr().err
    # step 1's loss is the untrained model's; its update leaves weights near 1e30
    assert "step 2: the training loss is nan" in err and "no checkpoint was written" in err
    assert [r["step"] for r in strict_lines(os.path.join(run, "metrics.jsonl"))] == [1, 2]


def test_metrics_and_eval_json_are_standard_json(corpus, tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 2)) == 0
    strict_lines(os.path.join(run, "metrics.jsonl"))
    poison_loss(monkeypatch, math.inf, training=False)  # the checkpoint scores as infinitely bad
    capsys.readouterr()
    assert eval_main([run, "--json", "--max-tokens", "256"]) == 0
    line = capsys.readouterr().out.strip()
    result = json.loads(line, parse_constant=_reject)
    assert result["loss"] is None and result["perplexity"] is None
    assert result["nonfinite"]["loss"] == "Infinity" and result["nonfinite"]["perplexity"] == "Infinity"
    assert result["tokens"] > 0 and math.isfinite(result["accuracy"])
    back = metrics.loads_record(line)
    assert back["loss"] == math.inf and "nonfinite" not in back


def test_strict_encoding_round_trips_and_old_files_are_read(tmp_path):
    record = {"kind": "train", "step": 3, "loss": math.nan, "lr": math.inf, "x": -math.inf, "ok": 1.5,
              "nested": {"a": math.nan, "b": 2}, "seq": [1.0, math.inf]}
    text = metrics.dumps_strict(record, sort_keys=True)
    parsed = json.loads(text, parse_constant=_reject)
    assert parsed["loss"] is None and parsed["nonfinite"] == {"loss": "NaN", "lr": "Infinity", "x": "-Infinity"}
    assert parsed["nested"] == {"a": None, "b": 2, "nonfinite": {"a": "NaN"}} and parsed["seq"] == [1.0, "Infinity"]
    back = metrics.loads_record(text)
    assert math.isnan(back["loss"]) and back["lr"] == math.inf and back["x"] == -math.inf and back["ok"] == 1.5
    assert math.isnan(back["nested"]["a"]) and "nonfinite" not in back and "nonfinite" not in back["nested"]

    # a history written before (bare NaN) and a last line cut short by a kill
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"kind": "train", "loss": NaN, "step": 1}\n{"kind": "train", "loss": 2.0, "step": 2}\n'
                '{"kind": "train", "loss": 1.0, "step": 3}\n{"kind": "tra')
    records = metrics.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3] and math.isnan(records[0]["loss"])
    metrics.truncate_after(path, 2)
    assert [r["step"] for r in strict_lines(path)] == [1, 2]  # rewritten as standard JSON, cut line gone
    assert metrics.plot_losses(str(tmp_path)) is not None  # NaN points are gaps, not an error
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    with open(path, "a") as f:
        f.write("not json\n{}\n")
    with pytest.raises(metrics.MetricsError, match="metrics.jsonl: line 3 is not JSON"):
        metrics.read_metrics(path)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.truncate_after(path, -5)


def test_stale_temporaries_are_removed_by_the_next_save_and_by_resume(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 2)) == 0
    pointer_tmp = os.path.join(run, ".tmp-abc123")  # a kill while `latest` was rewritten
    step_tmp = os.path.join(run, "checkpoints", ".tmp-step-xyz")  # a kill while a checkpoint was written
    os.makedirs(step_tmp)
    open(os.path.join(step_tmp, "model.safetensors"), "wb").write(b"half")
    open(pointer_tmp, "w").write("checkpoints/step-000")
    capsys.readouterr()
    assert train_main(["--resume", run, "--steps", "2", "--no-progress"]) == 0  # nothing to train: no save
    out = capsys.readouterr().out
    assert f"removed {pointer_tmp}" in out and f"removed {step_tmp}" in out
    assert not os.path.exists(pointer_tmp) and not os.path.exists(step_tmp)
    open(pointer_tmp, "w").write("x")
    ck.save(run, 9, {"a.txt": lambda p: open(p, "w").write("a")}, {})
    assert not os.path.exists(pointer_tmp)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("trained") / "run")
    assert train_main(train_args("gpt", corpus, run, 2, "--stop-after", "2")) == 0
    return run


def _set(path, value):
    def edit(meta):
        *parents, last = path
        target = meta
        for p in parents:
            target = target[p]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return edit


TAMPER = [
    ("files-entry-not-a-mapping", _set(("files", "model.safetensors"), "abc"),
     "field 'files' entry 'model.safetensors'"),
    ("files-not-a-mapping", _set(("files",), ["model.safetensors"]), "field 'files'"),
    ("files-bytes-negative", _set(("files", "state.pt", "bytes"), -1), "'bytes'"),
    ("files-sha-not-hex", _set(("files", "state.pt", "sha256"), "zz"), "'sha256'"),
    ("files-outside", _set(("files", "../x"), {"bytes": 1, "sha256": "0" * 64}), "not a file name inside"),
    ("model-changed", _set(("model",), "bert"), "field 'model'"),
    ("model-unknown", _set(("model",), "transformerxl"), "field 'model'"),
    ("step-negative", _set(("step",), -5), "field 'step'"),
    ("step-string", _set(("step",), "2"), "field 'step'"),
    ("step-bool", _set(("step",), True), "field 'step'"),
    ("step-not-the-directory", _set(("step",), 1),
     "field 'step' is 1, but the checkpoint's directory is step-00000002"),
    ("options-missing", _set(("options",), KeyError), "field 'options'"),
    ("options-unknown", _set(("options", "learning_speed"), 3), "field 'options' has an unknown option"),
    ("options-wrong-type", _set(("options", "batch_size"), "4"), "field 'options' option 'batch_size'"),
    ("model-config-unknown", _set(("model_config", "n_wings"), 2), "field 'model_config'"),
    ("model-config-bad-value", _set(("model_config", "n_head"), 3), "field 'model_config'"),
    ("tokenizer-unknown", _set(("tokenizer", "kind"), "sentencepiece"), "field 'tokenizer'"),
    ("format", _set(("format",), "other"), "field 'format'"),
]


@pytest.mark.parametrize("case, edit, message", TAMPER, ids=[t[0] for t in TAMPER])
def test_a_tampered_manifest_is_named_and_keeps_the_history(case, edit, message, trained, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    manifest = os.path.join(ck.resolve(run), ck.MANIFEST)
    meta = json.load(open(manifest))
    edit(meta)
    json.dump(meta, open(manifest, "w"))
    history = open(os.path.join(run, "metrics.jsonl"), "rb").read()
    before = tree(run)
    capsys.readouterr()
    for command, argv in ((eval_main, [run]), (generate_main, [run, "--max-new-tokens", "2"]),
                          (train_main, ["--resume", run, "--steps", "4", "--no-progress"])):
        assert command(argv) == 2, (command.__name__, case)
        err = capsys.readouterr().err
        assert manifest in err and message in err, (command.__name__, err)
        assert "Traceback" not in err
    assert open(os.path.join(run, "metrics.jsonl"), "rb").read() == history  # the history is not dropped
    assert tree(run) == before


def test_a_state_file_whose_step_disagrees_is_refused_before_the_history_is_cut(trained, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    directory = ck.resolve(run)
    state_path = os.path.join(directory, "state.pt")
    state = torch.load(state_path, weights_only=True)
    state["step"] = 0
    torch.save(state, state_path)
    manifest = os.path.join(directory, ck.MANIFEST)
    meta = json.load(open(manifest))
    meta["files"]["state.pt"] = {"bytes": os.path.getsize(state_path), "sha256": ck.sha256(state_path)}
    json.dump(meta, open(manifest, "w"))
    history = open(os.path.join(run, "metrics.jsonl"), "rb").read()
    capsys.readouterr()
    assert train_main(["--resume", run, "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "state.pt: field 'step' is 0, the manifest's is 2" in err
    assert open(os.path.join(run, "metrics.jsonl"), "rb").read() == history
    assert not os.path.exists(os.path.join(run, ck.LOCK))
