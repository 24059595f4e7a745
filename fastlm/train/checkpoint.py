"""Checkpoints: written atomically, opened without running code from them.

A checkpoint is a directory ``RUN/checkpoints/step-NNNNNNNN/``:

    checkpoint.json      what it is (model kind and config, training options, tokenizer, step)
                         and a manifest: every other file's size and sha256
    model.safetensors    the weights (safetensors: tensors only, no pickle)
    optimizer.pt         AdamW's state      } torch.save of tensors, numbers, strings, lists and
    state.pt             scheduler, RNGs,   } dicts, read back with torch.load(weights_only=True)
                         data position      }
    tokenizer.json       the BPE tokenizer (byte-level needs no file)

and ``RUN/latest`` names the newest one. Writing: every file goes into a temporary directory
beside the final one, each is fsynced, the manifest last; the directory is renamed into place
(``os.replace``), then ``latest`` is rewritten the same way (temporary file, fsync, replace).
A crash at any point leaves the previous checkpoint and the pointer to it intact; stale
temporary directories are removed by the next save.

Reading checks the manifest first, so a truncated or corrupted file is reported by name
(``CheckpointError``) before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

FORMAT = "fastlm-checkpoint-1"
MANIFEST = "checkpoint.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be opened: missing, truncated, corrupted, or not a checkpoint."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str, text: str) -> None:
    """Write text to path so that a reader sees the old content or the new, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def step_dirs(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def save(run_dir: str, step: int, writers: dict[str, Callable[[str], None]], meta: dict, keep: int = 2) -> str:
    """Write a checkpoint for `step`: writers[name](path) writes file `name`; meta goes to the
    manifest. Returns the checkpoint's directory."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # what an earlier crash left behind
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-step-", dir=root)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    try:
        files = {}
        for name, write in writers.items():
            path = os.path.join(tmp, name)
            write(path)
            written = [path]
            if os.path.isdir(path):  # a writer that fills a directory (the n-gram model's save)
                written = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
                _fsync_dir(path)
            for p in written:
                _fsync_file(p)
                files[os.path.relpath(p, tmp).replace(os.sep, "/")] = {"bytes": os.path.getsize(p),
                                                                       "sha256": sha256(p)}
        manifest = dict(meta, format=FORMAT, step=step, files=files)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step again: move the old one aside first
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=root)
            os.replace(final, os.path.join(old, "x"))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    write_text_atomic(os.path.join(run_dir, LATEST), os.path.relpath(final, run_dir) + "\n")
    for name in os.listdir(root):
        if name.startswith(".tmp-old-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep > 0:
        for _, path in step_dirs(run_dir)[:-keep]:
            if os.path.abspath(path) != os.path.abspath(final):
                shutil.rmtree(path, ignore_errors=True)
    return final


def resolve(path: str) -> str:
    """A checkpoint directory from a checkpoint directory, a run directory (its `latest`),
    or a checkpoint's manifest file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint (file or directory not found)")
    if os.path.isfile(path):
        if os.path.basename(path) == MANIFEST:
            return os.path.dirname(os.path.abspath(path))
        raise CheckpointError(f"{path}: not a checkpoint (give its directory or the run directory)")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            target = os.path.join(path, f.read().strip())
        if not os.path.isfile(os.path.join(target, MANIFEST)):
            raise CheckpointError(f"{latest}: points to {target}, which holds no {MANIFEST}")
        return target
    found = step_dirs(path)
    if found:
        return found[-1][1]
    raise CheckpointError(f"{path}: not a checkpoint or run directory (no {MANIFEST}, no {LATEST})")


@dataclass
class Checkpoint:
    directory: str
    meta: dict

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def has(self, name: str) -> bool:
        return name in self.meta.get("files", {})

    def load_torch(self, name: str):
        """A torch.save'd file, read with weights_only=True (no code runs)."""
        import torch
        path = self.path(name)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e

    def load_weights(self, model) -> None:
        from safetensors.torch import load_model
        path = self.path("model.safetensors")
        try:
            missing, unexpected = load_model(model, path, strict=False)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
        if missing or unexpected:
            raise CheckpointError(f"{path}: does not match the model (missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]})")


def open_checkpoint(path: str, verify: bool = True) -> Checkpoint:
    directory = resolve(path)
    manifest = os.path.join(directory, MANIFEST)
    try:
        with open(manifest, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest}: not a readable checkpoint manifest, truncated or corrupted ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{manifest}: not a fastlm checkpoint manifest (format {FORMAT!r} expected)")
    if verify:
        for name, info in meta["files"].items():
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing from the checkpoint")
            size = os.path.getsize(path)
            if size != info.get("bytes"):
                raise CheckpointError(f"{path}: {size} bytes, the manifest says {info.get('bytes')}: truncated "
                                      f"or corrupted")
            if sha256(path) != info.get("sha256"):
                raise CheckpointError(f"{path}: its sha256 does not match the manifest: corrupted")
    return Checkpoint(directory, meta)


__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint", "resolve", "save", "step_dirs", "write_text_atomic"]
