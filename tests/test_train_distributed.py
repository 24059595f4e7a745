"""Two gloo processes (torchrun) with the same global batch as one process: the same losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fastlm.train import checkpoint as ck
from fastlm.train.commands import train_main

from .train_common import losses, train_args, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), n_files=12)


def _torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "fastlm", "train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: nothing left behind
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun timed out:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def _close(a, b, rtol=2e-5):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), f"step {step}: {x} vs {y}"


@pytest.mark.parametrize("model, fsdp", [("gpt", False), ("gpt", True), ("bert", False)])
def test_two_processes_match_one(model, fsdp, corpus, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ("--steps", "5", "--lr", "3e-3", "--threads", "1")
    one_args = train_args(model, corpus, one, 5, *common)
    one_args[one_args.index("--batch-size") + 1] = "8"
    assert train_main(one_args) == 0
    two_args = train_args(model, corpus, two, 5, *common, "--stop-after", "3", *(["--fsdp"] if fsdp else []))
    two_args[two_args.index("--batch-size") + 1] = "2"
    two_args += ["--grad-accum", "2"]  # 2 processes x 2 micro-batches x 2 rows = 8
    stdout = _torchrun(two_args)
    assert "x 2" in stdout and ("FSDP2" in stdout) == fsdp
    # only rank 0 wrote: one metrics line per step, one checkpoint
    assert ck.open_checkpoint(two).meta["world_size"] == 2 and len(losses(two)) == 3
    more = ["--resume", two, "--no-progress", "--threads", "1"]
    if fsdp:  # a sharded run resumes sharded (its optimizer state is saved by parameter name)
        _torchrun(more)
    else:  # a DDP checkpoint is a plain one: it continues in one process with the same global batch
        assert train_main(more) == 2  # 2 x 2 x 1 = 4 windows per step, not 8: refused
        assert train_main(more + ["--grad-accum", "4"]) == 0
    first, second = losses(one), losses(two)
    assert len(first) == 5 and first[-1][1] < first[0][1]
    _close(second, first)
    # The token accuracy is reduced as the loss: the fraction of the whole global batch's labels
    # (one rank's share alone would be about half of it).
    acc_one, acc_two = losses(one, "accuracy"), losses(two, "accuracy")
    assert [s for s, _ in acc_two] == [s for s, _ in acc_one] and any(a > 0 for _, a in acc_one)
    for (step, x), (_, y) in zip(acc_two, acc_one):
        assert abs(x - y) <= 1e-6, f"step {step}: accuracy {x} vs {y}"
