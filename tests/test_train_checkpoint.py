"""Checkpoints: atomic writes, verified reads, no code run when opening one."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from fastlm.train import checkpoint as ck
from fastlm.train.commands import eval_main, train_main
from fastlm.train.evaluate import load

from .train_common import train_args, write_corpus


def _writers(value):
    return {"a.pt": lambda p: torch.save({"x": torch.full((4,), float(value))}, p),
            "b.txt": lambda p: open(p, "w").write(f"value {value}")}


def test_save_then_open_verifies_and_keeps_the_latest(tmp_path):
    run = str(tmp_path / "run")
    for step in (1, 2, 3):
        ck.save(run, step, _writers(step), {"note": step}, keep=2)
    assert [s for s, _ in ck.step_dirs(run)] == [2, 3]
    opened = ck.open_checkpoint(run)
    assert opened.meta["step"] == 3 and opened.meta["note"] == 3
    assert torch.equal(opened.load_torch("a.pt")["x"], torch.full((4,), 3.0))
    assert ck.open_checkpoint(os.path.join(run, "checkpoints", "step-00000002")).meta["step"] == 2


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    ck.save(run, 1, _writers(1), {})

    def crash(path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        ck.save(run, 2, {"a.pt": crash}, {})
    with pytest.raises(KeyboardInterrupt):  # killed while the second file is written
        ck.save(run, 2, {**_writers(2), "c": lambda p: (_ for _ in ()).throw(KeyboardInterrupt())}, {})
    opened = ck.open_checkpoint(run)
    assert opened.meta["step"] == 1 and torch.equal(opened.load_torch("a.pt")["x"], torch.full((4,), 1.0))
    assert [s for s, _ in ck.step_dirs(run)] == [1]
    ck.save(run, 2, _writers(2), {})
    assert ck.open_checkpoint(run).meta["step"] == 2
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".tmp")]


def test_a_crash_while_the_pointer_is_rewritten_keeps_the_old_pointer(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    ck.save(run, 1, _writers(1), {})

    def failing_replace(src, dst):
        if os.path.basename(dst) == ck.LATEST:
            raise OSError("power cut (simulated)")
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        ck.save(run, 2, _writers(2), {})
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert ck.open_checkpoint(run).meta["step"] == 1  # latest still names step 1, which is intact


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_file_is_named(tmp_path, damage):
    run = str(tmp_path / "run")
    ck.save(run, 1, _writers(1), {})
    path = os.path.join(ck.resolve(run), "a.pt")
    raw = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif damage == "flip":
        open(path, "wb").write(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    else:
        os.unlink(path)
    with pytest.raises(ck.CheckpointError, match=r"a\.pt"):
        ck.open_checkpoint(run)


def test_a_damaged_manifest_is_named(tmp_path):
    run = str(tmp_path / "run")
    ck.save(run, 1, _writers(1), {})
    manifest = os.path.join(ck.resolve(run), ck.MANIFEST)
    text = open(manifest).read()
    open(manifest, "w").write(text[: len(text) // 2])
    with pytest.raises(ck.CheckpointError, match="checkpoint.json"):
        ck.open_checkpoint(run)
    with pytest.raises(ck.CheckpointError, match="no such checkpoint"):
        ck.open_checkpoint(str(tmp_path / "elsewhere"))


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + _Boom.target,))


def test_opening_never_runs_code_from_the_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    _Boom.target = str(tmp_path / "pwned")
    ck.save(run, 1, {"state.pt": lambda p: open(p, "wb").write(pickle.dumps({"x": _Boom()}, protocol=2))}, {})
    opened = ck.open_checkpoint(run)  # the manifest matches: the file is what was written
    with pytest.raises(ck.CheckpointError, match=r"state\.pt"):
        opened.load_torch("state.pt")
    assert not os.path.exists(_Boom.target)


def test_a_trained_checkpoint_with_a_truncated_weights_file_fails_eval_naming_it(tmp_path, capsys):
    data = write_corpus(tmp_path, n_files=8)
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", data, run, 2)) == 0
    weights = os.path.join(ck.resolve(run), "model.safetensors")
    raw = open(weights, "rb").read()
    open(weights, "wb").write(raw[:-100])
    capsys.readouterr()
    assert eval_main([run]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    # the manifest knew the size; even without it safetensors' own check names the file
    manifest = os.path.join(ck.resolve(run), ck.MANIFEST)
    meta = json.load(open(manifest))
    meta["files"]["model.safetensors"].update(bytes=len(raw) - 100, sha256=ck.sha256(weights))
    json.dump(meta, open(manifest, "w"))
    with pytest.raises(ck.CheckpointError, match="model.safetensors"):
        load(run)
