"""A run directory belongs to one run: reuse without --resume / --overwrite is refused with the
old run byte-identical, --overwrite replaces a run only once the new one has a checkpoint, a
lock keeps a second process out, a stale lock (its process gone) is taken over, and a run
refused before it starts leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastlm.train import checkpoint as ck
from fastlm.train import loop
from fastlm.train.commands import train_main
from fastlm.train.data import DataError

from .train_common import losses, train_args, tree, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), n_files=8, lines=20)


def siblings(run) -> list:
    parent, name = os.path.split(run)
    return sorted(e for e in os.listdir(parent) if e.startswith("." + name + "."))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _wait_for(predicate, proc, timeout=120, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended before {what}: rc {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            _kill(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_reusing_a_run_directory_is_refused_and_the_run_is_untouched(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 4, "--keep", "5")) == 0
    before = tree(run)
    assert "run.lock" not in before  # the lock lives as long as the run
    capsys.readouterr()
    assert train_main(train_args("gpt", corpus, run, 2, "--seed", "7")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and run in err
    assert "--resume" in err and "--overwrite" in err
    assert tree(run) == before and not siblings(run)

    # a run killed during its first save: a history and no checkpoint; refused all the same
    first = str(tmp_path / "first")
    os.makedirs(first)
    shutil.copy(os.path.join(run, "metrics.jsonl"), first)
    before = tree(first)
    assert train_main(train_args("gpt", corpus, first, 2)) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and "--overwrite" in err
    assert tree(first) == before

    # files that are no run's are not written over either, not even with --overwrite
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for extra in ((), ("--overwrite",)):
        assert train_main(train_args("gpt", corpus, str(other), 2, *extra)) == 2
        assert "todo.txt" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == ["todo.txt"]

    # an empty directory is free
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_main(train_args("gpt", corpus, str(empty), 2)) == 0
    assert ck.open_checkpoint(str(empty)).meta["step"] == 2


def test_a_refused_run_leaves_nothing_behind(corpus, tmp_path, monkeypatch, capsys):
    def no_data(*a, **k):
        raise DataError("no text found (simulated)")

    monkeypatch.setattr(loop, "load_corpus", no_data)  # refused after the directory was taken
    fresh = tmp_path / "new" / "run"
    assert train_main(train_args("gpt", corpus, str(fresh), 2)) == 2
    assert "simulated" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_main(train_args("gpt", corpus, str(empty), 2, "--tokenizer", "bpe")) == 2
    assert os.listdir(empty) == []  # as it was given: no lock left, nothing else


def test_overwrite_replaces_the_run_only_after_its_first_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 4, "--keep", "5", "--stop-after", "4")) == 0
    old = tree(run)
    old_losses = losses(run)
    real_save = ck.save
    seen = []

    def save(run_dir, step, *a, **k):
        if not seen:  # the new run's first checkpoint: until it exists the old run is as it was
            assert os.path.abspath(run_dir) != os.path.abspath(run)
            assert {k: v for k, v in tree(run).items() if k != "run.lock"} == old
        seen.append(step)
        return real_save(run_dir, step, *a, **k)

    monkeypatch.setattr(ck, "save", save)
    capsys.readouterr()
    assert train_main(train_args("gpt", corpus, run, 2, "--seed", "7", "--overwrite")) == 0
    out = capsys.readouterr().out
    assert "replaced the old one" in out and seen == [2]
    assert [s for s, _ in ck.step_dirs(run)] == [2]  # the old run's steps 2 and 4 are gone
    assert ck.open_checkpoint(run).meta["options"]["seed"] == 7
    new = losses(run)
    assert [s for s, _ in new] == [1, 2] and new != old_losses[:2]  # only the new run's history
    assert not siblings(run) and "run.lock" not in os.listdir(run)
    # the new run is a normal run: it resumes
    assert train_main(["--resume", run, "--steps", "3", "--no-progress"]) == 0
    assert ck.open_checkpoint(run).meta["step"] == 3


@pytest.mark.parametrize("crash", [OSError("disk full (simulated)"), KeyboardInterrupt()])
def test_overwrite_that_fails_before_its_first_checkpoint_leaves_the_old_run(crash, corpus, tmp_path, monkeypatch,
                                                                             capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 2)) == 0
    before = tree(run)

    def failing_save(*a, **k):
        raise crash

    monkeypatch.setattr(ck, "save", failing_save)
    with pytest.raises(type(crash)):
        train_main(train_args("gpt", corpus, run, 2, "--seed", "9", "--overwrite"))
    assert "is unchanged" in capsys.readouterr().out
    assert tree(run) == before and not siblings(run)


def test_the_lock_api(tmp_path):
    d = str(tmp_path)
    first = ck.RunLock.acquire(d)
    holder = json.load(open(os.path.join(d, ck.LOCK)))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert ck.lock_holder(d)["pid"] == os.getpid()
    with pytest.raises(ck.RunDirError, match=f"in use by another run \\(pid {os.getpid()} "):
        ck.RunLock.acquire(d)  # another open file: flock refuses it, in this process too
    first.release()
    assert not os.path.exists(os.path.join(d, ck.LOCK)) and ck.lock_holder(d) is None
    ck.RunLock.acquire(d).release()


def test_overwrite_claim_stages_beside_the_run_even_with_a_trailing_slash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    before = tree(str(run))
    claim = ck.claim_run_dir(str(run) + "/", "overwrite")
    assert os.path.dirname(claim.work) == str(tmp_path) and claim.staging
    assert os.path.basename(claim.work).startswith(".run.overwrite-")
    assert ck.lock_holder(str(run))["pid"] == os.getpid() and ck.lock_holder(claim.work)["pid"] == os.getpid()
    claim.release()  # never promoted: the staging goes, the run stays
    assert tree(str(run)) == before and not siblings(str(run))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_promote_swaps_the_new_run_in_and_deletes_the_old(exchange, tmp_path, monkeypatch):
    if not exchange:  # a system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("old\n")
    claim = ck.claim_run_dir(str(run), "overwrite")
    with open(os.path.join(claim.work, "metrics.jsonl"), "w") as f:
        f.write("new\n")
    claim.promote()
    assert claim.work == str(run) and not claim.staging
    assert (run / "metrics.jsonl").read_text() == "new\n" and not siblings(str(run))
    assert ck.lock_holder(str(run))["pid"] == os.getpid()  # the new run's lock came with it
    claim.start()
    claim.release()
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_naming_a_dead_process_is_taken_over(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 2)) == 0
    pid = _dead_pid()
    with open(os.path.join(run, ck.LOCK), "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "started": time.time() - 60}, f)
    capsys.readouterr()
    assert train_main(train_args("gpt", corpus, run, 2)) == 2  # still a run: reuse is refused
    assert "already holds a run" in capsys.readouterr().err
    assert train_main(["--resume", run, "--steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stale lock" in out and f"pid {pid} " in out and "taken over" in out
    assert ck.open_checkpoint(run).meta["step"] == 3 and not os.path.exists(os.path.join(run, ck.LOCK))


def test_a_second_process_fails_at_once_while_a_run_holds_the_directory(corpus, tmp_path):
    run = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fastlm.train.checkpoint import claim_run_dir\n"
         "claim_run_dir(sys.argv[1], 'new')\nprint('locked', flush=True)\ntime.sleep(300)\n", run],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ((), ("--overwrite",)):
            started = time.monotonic()
            second = subprocess.run([sys.executable, "-m", "fastlm", "train", *train_args("gpt", corpus, run, 2),
                                     *extra], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert "is in use by another run" in second.stderr and f"pid {holder.pid} " in second.stderr
            assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
            assert time.monotonic() - started < 60  # refused at the start, not after training
            assert os.listdir(run) == [ck.LOCK]
    finally:
        _kill(holder)


def test_two_training_processes_and_a_killed_one(corpus, tmp_path, capsys):
    """A real run holds its directory: a second `fastlm train` on it fails at once; killed
    (SIGKILL, mid-save as likely as not) it leaves a stale lock that the resume takes over."""
    run = str(tmp_path / "run")
    first = subprocess.Popen(
        [sys.executable, "-m", "fastlm", "train",
         *train_args("gpt", corpus, run, 100000, "--eval-every", "100000", "--save-every", "2", "--keep", "3")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True)
    try:
        _wait_for(lambda: os.path.exists(os.path.join(run, ck.LATEST)), first, what="the first checkpoint")
        assert train_main(train_args("gpt", corpus, run, 2)) == 2
        assert train_main(["--resume", run, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("is in use by another run") == 2 and f"pid {first.pid} " in err
    finally:
        _kill(first)
    assert os.path.exists(os.path.join(run, ck.LOCK))  # killed: nothing released it
    step = ck.open_checkpoint(run).meta["step"]
    assert train_main(["--resume", run, "--steps", str(step + 1), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stale lock" in out and f"pid {first.pid} " in out
    assert ck.open_checkpoint(run).meta["step"] == step + 1
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-") or n == ck.LOCK]
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".tmp-")]


def test_a_killed_overwrite_leaves_the_old_run_and_is_cleaned_up_later(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(train_args("gpt", corpus, run, 2)) == 0
    before = tree(run)
    new = subprocess.Popen(
        [sys.executable, "-m", "fastlm", "train",
         *train_args("gpt", corpus, run, 100000, "--eval-every", "100000", "--save-every", "100000", "--overwrite")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True)

    def staging_logged():
        return any(os.path.exists(os.path.join(tmp_path, s, "metrics.jsonl")) for s in siblings(run))

    try:
        _wait_for(staging_logged, new, what="the replacement's first log line")
    finally:
        _kill(new)
    assert {k: v for k, v in tree(run).items() if k != ck.LOCK} == before  # the old run, untouched
    assert len(siblings(run)) == 1
    capsys.readouterr()
    assert train_main(train_args("gpt", corpus, run, 2, "--seed", "3", "--overwrite")) == 0
    out = capsys.readouterr().out
    assert "stale lock" in out and "cut short" in out
    assert not siblings(run) and ck.open_checkpoint(run).meta["options"]["seed"] == 3
