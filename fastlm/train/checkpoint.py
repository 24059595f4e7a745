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
temporary files and directories (``.tmp-*``) are removed by the next save, and by a resume.

Reading checks the manifest first, so a truncated or corrupted file is reported by name
(``CheckpointError``) before anything is loaded; a manifest whose fields are not what this
module writes (a ``files`` entry that is not a mapping, a negative step, a step that is not
its directory's) is reported naming the file and the field.

A run directory belongs to one run (``claim_run_dir``): it holds ``run.lock`` while a run
writes to it, so a second run on it fails at once, and a new run does not start where an
earlier one left files unless it continues it (``--resume``) or replaces it
(``--overwrite``: the new run writes beside it and takes the name at its first checkpoint).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import ConfigError

FORMAT = "fastlm-checkpoint-1"
MANIFEST = "checkpoint.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be opened: missing, truncated, corrupted, or not a checkpoint."""


class RunDirError(ConfigError):
    """--out names a directory this run may not write to: another run's files are there (and
    neither --resume nor --overwrite says what to do with them), or a live run holds its lock."""


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


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Remove what a save killed part-way left: ``RUN/.tmp-*`` (the pointer's temporary file)
    and ``RUN/checkpoints/.tmp-*`` (a checkpoint's temporary directory, or one moved aside).
    Called with the run's lock held, so no live writer owns them. Returns what was removed."""
    removed = []
    for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if not name.startswith(".tmp-"):
                continue
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            removed.append(path)
    return removed


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
    remove_stale_temporaries(run_dir)  # what an earlier crash left behind
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


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(meta, directory: str) -> None:
    """What ``save`` writes, or a CheckpointError naming the manifest and the field: a tampered
    or hand-edited manifest is refused before anything is read by what it says."""
    manifest = os.path.join(directory, MANIFEST)

    def bad(what: str):
        raise CheckpointError(f"{manifest}: {what}")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        bad(f"not a fastlm checkpoint manifest (field 'format' {FORMAT!r} expected)")
    files = meta.get("files")
    if not isinstance(files, dict):
        bad(f"field 'files' must be a mapping of file name to {{bytes, sha256}}, got {type(files).__name__}")
    for name, info in files.items():
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or name == MANIFEST:
            bad(f"field 'files' entry {name!r}: not a file name inside the checkpoint")
        if not isinstance(info, dict):
            bad(f"field 'files' entry {name!r} must be a mapping {{bytes, sha256}}, got {type(info).__name__}")
        if not _is_int(info.get("bytes")) or info["bytes"] < 0:
            bad(f"field 'files' entry {name!r}: 'bytes' must be a non-negative integer, got {info.get('bytes')!r}")
        if not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"]):
            bad(f"field 'files' entry {name!r}: 'sha256' must be 64 hex digits, got {info.get('sha256')!r}")
    step = meta.get("step")
    if not _is_int(step) or step < 0:
        bad(f"field 'step' must be a non-negative integer, got {step!r}")
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(directory)))
    if m and int(m.group(1)) != step:
        bad(f"field 'step' is {step}, but the checkpoint's directory is {os.path.basename(directory)}")


def open_checkpoint(path: str, verify: bool = True) -> Checkpoint:
    directory = resolve(path)
    manifest = os.path.join(directory, MANIFEST)
    try:
        with open(manifest, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest}: not a readable checkpoint manifest, truncated or corrupted ({e})") from e
    check_manifest(meta, directory)
    if verify:
        for name, info in meta["files"].items():
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing from the checkpoint")
            size = os.path.getsize(path)
            if size != info["bytes"]:
                raise CheckpointError(f"{path}: {size} bytes, the manifest says {info['bytes']}: truncated "
                                      f"or corrupted")
            if sha256(path) != info["sha256"]:
                raise CheckpointError(f"{path}: its sha256 does not match the manifest: corrupted")
    return Checkpoint(directory, meta)


# --- one run per run directory -------------------------------------------------------------

LOCK = "run.lock"
# What makes a directory a run's: any of these (or a leftover temporary) in it. A directory
# that is empty, or does not exist yet, is free; one holding only other files is not a run
# and is not written to either (--overwrite would delete them with the run).
RUN_ENTRIES = ("checkpoints", LATEST, "metrics.jsonl", LOCK, "loss.png", "tokenizer.json")


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or name.startswith(".tmp-")


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid) -> Optional[bool]:
    """Whether a process of this host is running (None: cannot tell)."""
    if not _is_int(pid) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return None
    return True


def _read_holder(fd_or_path) -> dict:
    try:
        if isinstance(fd_or_path, int):
            os.lseek(fd_or_path, 0, os.SEEK_SET)
            raw = os.read(fd_or_path, 1 << 16)
        else:
            with open(fd_or_path, "rb") as f:
                raw = f.read(1 << 16)
        holder = json.loads(raw.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_text(holder: dict) -> str:
    if not holder:
        return "holder not recorded"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {when}"


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the pid in the file is all there is
    fcntl = None


def _try_flock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        holder = _read_holder(fd)
        return not (holder.get("host") == _host() and _pid_alive(holder.get("pid")) is not False)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


class RunLock:
    """``RUN/run.lock``, held for a run's lifetime: created with O_CREAT|O_EXCL and locked
    with flock, it records the holder's pid, host and start time. The kernel drops a flock
    when its process ends however it ends, so a lock file that can be locked is stale (its
    run was killed): it is taken over and ``stale`` says whose it was. Release unlinks the
    file while still holding it; a process that opened the old file then sees that the path
    is no longer its file and tries again."""

    def __init__(self, path: str, fd: int, stale: Optional[dict] = None, created: bool = True):
        self.path, self.fd, self.stale, self.created = path, fd, stale, created

    @classmethod
    def acquire(cls, directory: str) -> "RunLock":
        path = os.path.join(directory, LOCK)
        for _ in range(20):
            created = False
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:  # released meanwhile
                    continue
            locked = False
            try:
                if not _try_flock(fd):
                    raise RunDirError(f"{directory} is in use by another run ({_holder_text(_read_holder(fd))}, "
                                      f"lock {path}): wait for it to end, or choose another --out")
                locked = True
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if not same:  # its holder released it (unlinked) between our open and our lock
                    os.close(fd)
                    continue
                stale = None if created else _read_holder(fd)
                if stale is not None and not stale:
                    # Empty: another run created it an instant ago and is about to lock it (its
                    # O_EXCL and its flock are two calls), or one was killed between the two.
                    if time.time() - os.fstat(fd).st_mtime < 5:
                        raise RunDirError(f"{directory} is being taken by another run (lock {path} was just "
                                          f"created): choose another --out")
                    stale = {"unrecorded": True}
                record = json.dumps({"pid": os.getpid(), "host": _host(), "started": time.time()}).encode()
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, record + b"\n")
                os.fsync(fd)
                return cls(path, fd, stale, created)
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                if created and locked:  # created and still ours; never another run's file
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                raise
        raise RunDirError(f"{path}: could not take the run's lock (it kept changing hands)")

    def moved(self, directory: str) -> None:
        """Its directory was renamed: the open file is the same, its path is not."""
        self.path = os.path.join(directory, LOCK)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def lock_holder(directory: str) -> Optional[dict]:
    """The holder of a live lock on the directory (a dict, {} when not recorded), or None when
    no live run holds it (no lock file, or a stale one). Only reads: nothing is written."""
    path = os.path.join(directory, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if fcntl is None:  # pragma: no cover
            return None if _try_flock(fd) else _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return _read_holder(fd)
            raise
        return None
    finally:
        os.close(fd)  # drops the probe's shared lock


def _exchange(a: str, b: str) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where not
    available, and the caller renames twice."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@dataclass
class RunClaim:
    """A run directory taken for one run. ``directory`` is the run's name (what it is called
    once its first checkpoint exists), ``work`` where it writes now: the same directory, or
    for --overwrite of an existing run a sibling ``.NAME.overwrite-*`` until ``promote``
    (after the new run's first checkpoint) swaps the two and deletes the old run."""
    directory: str
    work: str
    lock: RunLock
    old_lock: Optional[RunLock] = None  # --overwrite: the replaced run's lock, held until it is gone
    created: list = field(default_factory=list)  # directories this claim made (removed if abandoned)
    notes: list = field(default_factory=list)  # what to tell the user (stale lock taken over, ...)
    started: bool = False

    @property
    def staging(self) -> bool:
        return os.path.abspath(self.work) != os.path.abspath(self.directory)

    def start(self) -> None:
        """The run has begun writing its history: a failure from here keeps what it wrote
        (except a replacement's staging directory, which never had a checkpoint)."""
        self.started = True

    def promote(self) -> Optional[str]:
        """After the first checkpoint of a replacement: the new run takes the name, the old
        run is deleted. Returns where the old run was moved before deletion (None if no swap)."""
        if not self.staging:
            return None
        parent = os.path.dirname(os.path.abspath(self.directory))
        if _exchange(self.work, self.directory):
            old = trash = self.work
        else:  # two renames: a crash between them leaves both runs under hidden sibling names
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(self.directory))}.replaced-",
                                     dir=parent)
            old = os.path.join(trash, "run")
            os.rename(self.directory, old)
            os.rename(self.work, self.directory)
        _fsync_dir(parent)
        self.lock.moved(self.directory)
        self.work = self.directory
        if self.old_lock is not None:
            self.old_lock.moved(old)
            self.old_lock.release()
            self.old_lock = None
        shutil.rmtree(trash, ignore_errors=True)
        return old

    def release(self) -> None:
        """The run ended (finished, stopped or failed): the locks go. A replacement that never
        reached its first checkpoint is removed; the run it was to replace is untouched."""
        if self.staging:
            self.lock.release()
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = self.directory
            if self.old_lock is not None:
                self.old_lock.release()
                self.old_lock = None
            return
        if not self.started:  # refused before writing any history: leave nothing behind
            self.lock.release()
            for path in reversed(self.created):
                shutil.rmtree(path, ignore_errors=True)
            if not self.created:  # an empty directory it was given: empty again
                for name in os.listdir(self.directory):
                    p = os.path.join(self.directory, name)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
            return
        self.lock.release()


def _makedirs(path: str) -> list:
    """os.makedirs, returning the directories it created, outermost first."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return list(reversed(missing))[:1]  # removing the outermost removes the rest


def _stale_siblings(directory: str) -> list[str]:
    """Staging directories of replacements that were killed before their first checkpoint."""
    parent, name = os.path.split(os.path.abspath(directory))
    if not os.path.isdir(parent):
        return []
    found = []
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}.overwrite-", f".{name}.replaced-")):
            path = os.path.join(parent, entry)
            if os.path.isdir(path) and lock_holder(path) is None:
                found.append(path)
    return found


def claim_run_dir(directory: str, mode: str = "new") -> RunClaim:
    """Take `directory` for a run. mode "new": it must not exist, or be empty; "resume": it is
    the run being continued; "overwrite": an existing run there is replaced, atomically (the
    new run writes into a sibling until its first checkpoint, see RunClaim.promote).

    "A run exists" in a directory when it holds any of RUN_ENTRIES (a checkpoint, the pointer,
    metrics.jsonl, a lock, the loss plot, a tokenizer) or a leftover ``.tmp-*``. Nothing is
    written before every check has passed: a refused run leaves no file and no directory."""
    if mode not in ("new", "resume", "overwrite"):
        raise ValueError(f"mode {mode!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise RunDirError(f"--out {directory}: exists and is not a directory")
    entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    holder = lock_holder(directory) if entries else None
    if holder is not None:
        raise RunDirError(f"{directory} is in use by another run ({_holder_text(holder)}, lock "
                          f"{os.path.join(directory, LOCK)}): wait for it to end, or choose another --out")
    run_entries = [e for e in entries if _is_run_entry(e)]
    others = [e for e in entries if not _is_run_entry(e)]
    notes = []
    if mode == "resume":
        lock = RunLock.acquire(directory)
        claim = RunClaim(directory, directory, lock, started=True)
        for path in remove_stale_temporaries(directory):
            notes.append(f"removed {path}, left by a save that was cut short")
    elif not entries:
        created = _makedirs(directory)
        claim = RunClaim(directory, directory, RunLock.acquire(directory), created=created)
    elif mode == "new":
        if run_entries:
            has_checkpoint = bool(step_dirs(directory)) or os.path.exists(os.path.join(directory, LATEST))
            what = "a run (" + ", ".join(run_entries) + ")"
            advice = ("--resume " + directory + " continues it, --overwrite replaces it" if has_checkpoint else
                      "it has no checkpoint to resume; --overwrite replaces it")
            raise RunDirError(f"--out {directory} already holds {what}: {advice}, or choose another --out")
        raise RunDirError(f"--out {directory} is not empty and holds no fastlm run ({', '.join(others[:5])}"
                          f"{', ...' if len(others) > 5 else ''}): choose an empty or new directory")
    else:  # overwrite an existing run
        if others:
            raise RunDirError(f"--overwrite {directory}: refused, it holds files that are not a run's "
                              f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}) and they would be "
                              f"deleted with it")
        old_lock, work = RunLock.acquire(directory), None
        try:
            for path in _stale_siblings(directory):
                shutil.rmtree(path, ignore_errors=True)
                notes.append(f"removed {path}, left by an --overwrite that was cut short")
            parent, name = os.path.split(os.path.abspath(directory))
            work = tempfile.mkdtemp(prefix=f".{name}.overwrite-", dir=parent)
            os.chmod(work, 0o777 & ~_umask())
            lock = RunLock.acquire(work)
        except BaseException:
            old_lock.release()
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise
        claim = RunClaim(directory, work, lock, old_lock=old_lock, started=False)
        notes.append(f"--overwrite: the new run writes to {work} until its first checkpoint, then replaces "
                     f"{directory}")
    stale = claim.old_lock.stale if claim.old_lock is not None else claim.lock.stale
    if stale is not None:
        notes.insert(0, f"{os.path.join(directory, LOCK)}: stale lock of a run that is gone ({_holder_text(stale)}"
                        f"), taken over")
    claim.notes = notes + claim.notes
    return claim


__all__ = ["Checkpoint", "CheckpointError", "RunClaim", "RunDirError", "RunLock", "check_manifest", "claim_run_dir",
           "lock_holder", "open_checkpoint", "remove_stale_temporaries", "resolve", "save", "step_dirs",
           "write_text_atomic"]
