"""--resume continues exactly: the per-step losses of N/2 + N/2 steps equal N straight, bit for bit."""

from __future__ import annotations

import os
import shutil

import pytest

from fastlm.train import checkpoint as ck
from fastlm.train.commands import train_main

from .train_common import losses, train_args, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), n_files=12)


def _final_hashes(run):
    files = ck.open_checkpoint(run).meta["files"]
    return {name: files[name]["sha256"] for name in ("model.safetensors", "optimizer.pt")}


@pytest.mark.parametrize("model", ["gpt", "bert", "encdec"])
def test_resume_equals_an_uninterrupted_run(model, corpus, tmp_path):
    # dropout on, so the restored RNG state matters; MLM/denoising draw per-sample randomness
    extra = ("--dropout", "0.1", "--save-every", "4", "--eval-every", "3", "--keep", "5")
    straight, parted = str(tmp_path / "straight"), str(tmp_path / "parted")
    assert train_main(train_args(model, corpus, straight, 8, *extra)) == 0
    assert train_main(train_args(model, corpus, parted, 8, *extra, "--stop-after", "6")) == 0
    assert ck.open_checkpoint(parted).meta["step"] == 6
    assert len(losses(parted)) == 6
    # a crash after step 6's log lines but before its checkpoint: back to step 4
    shutil.rmtree(os.path.join(parted, "checkpoints", "step-00000006"))
    with open(os.path.join(parted, ck.LATEST), "w") as f:
        f.write("checkpoints/step-00000004\n")
    assert train_main(["--resume", parted, "--no-progress"]) == 0
    assert losses(parted) == losses(straight)  # every step, exactly (floats compared with ==)
    assert len(losses(straight)) == 8
    assert _final_hashes(parted) == _final_hashes(straight)  # weights and optimizer state, bit for bit


def test_resume_refuses_to_change_the_run(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 4, "--stop-after", "2")) == 0
    capsys.readouterr()
    assert train_main(["--resume", run, "--lr", "0.5"]) == 2
    assert "--lr cannot change" in capsys.readouterr().err
    assert train_main(["--resume", run, "--n-layer", "3"]) == 2
    assert "cannot change" in capsys.readouterr().err
    assert train_main(["--resume", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert train_main(["--resume", run, "--steps", "6", "--no-progress"]) == 0  # a longer run is allowed
    assert ck.open_checkpoint(run).meta["step"] == 6
