#!/usr/bin/env python3
"""The GPU check: every answer the GPU machine can give, in one command of at most 8 minutes.

    python3 benchmarks/gpu_check.py [--out DIR] [--budget SECONDS] [--stages NAME ...] [--dry-run]
    bash benchmarks/gpu_check.sh [DIR]                  (the same, the entry point the docs name)
    python3 benchmarks/gpu_check.py --list              the stages, their time boxes and commands
    python3 benchmarks/gpu_check.py --collect DIR       file a run's output under benchmarks/results/

The stages, most valuable first; each runs in its own process group with its own time box
(a stage that overruns is killed, recorded as "timeout", and the next one runs), and the whole
run keeps inside --budget (default 450 s: a stage is given what is left of it at most):

  device        versions (torch, triton, CUDA, driver, SMs, clocks, the packages the stages use),
                one Triton JIT compile timed, and the ceilings: a 1 GiB device-to-device copy and
                an 8192^3 bf16 matmul (fastlm.bench.runner.measure_ceilings)
  correctness   the op tests (every gpu-marked test first) on CUDA: pytest-xdist, one worker per
                core, a per-test timeout (pytest-timeout, or this folder's gpu_check_plugin.py
                where it is missing); failures listed by name
  cuda-build    the CUDA extension (python -m fastlm.cuda_build --arch 90: ninja, parallel);
                started in the background when the run starts, so it compiles during the tests
  cuda-tests    tests/test_cuda_backend.py on the built extension (pytest-xdist), and
                tests/test_cuda_mma.py (the mma.sync/ldmatrix lane layouts on the hardware)
  memcheck,     compute-sanitizer on small attention and cross-entropy cases (fastlm's "cuda" and
  racecheck     "triton" backends), beside cuda-tests; where the machine refuses the tool, what
                it said is recorded and the run goes on
  bench-*       the headline benchmarks at the sizes in BENCH below, one suite per stage, each
                side by side with torch eager, torch.compile, SDPA's backends and Liger-Kernel
                (when its wheel is carried in .whl/: benchmarks/fetch_liger.sh)

Output, all under --out (default $OUT, else ./gpu-out), within the device tool's limits (at
most 8 files, 2 folders deep) and written as the run goes, so a killed run still leaves
every stage that finished:

  results.jsonl   one JSON object per line: a "start" line (plan, budget, versions of this
                  script's inputs), then one per stage as it ends ({"stage", "status": ok |
                  failed | timeout | skipped | refused | killed | error (this script's own
                  bug, the traceback in its log), "seconds", "box_s", "rc",
                  "log", "summary", "details"}), then an "end" line
  summary.md      the table of stages, the failures by name, the ceilings, and the headline
                  benchmark figures; rewritten after every stage, printed last
  logs.tar.gz     logs/<stage>.log for every stage (and the junit XML of the pytest stages)
  bench.tar.gz    bench/<suite>.json, .md, .png: what fastlm.bench wrote (benchmarks/results/
                  takes these as they are: --collect unpacks them there)

--dry-run runs the same stages on CPU: Triton's interpreter, tiny shapes and test selections,
the same files and summary, in a couple of minutes (tests/test_gpu_check.py runs it in CI).
Exit status: 0 when every stage that ran passed (a refused sanitizer counts as passed), 1
otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

# Test files left out of the correctness stage: no op on CUDA in them (training, the n-gram
# and LSTM baselines, the CLI, the benchmark harness, this check), or run by another stage
# (the CUDA extension's build and tests, the CPU-only AOT compile and CUDA emulator).
NOT_OP_TESTS = [
    "test_gpu_compile.py", "test_cuda_build.py", "test_cuda_emulated.py", "test_cuda_backend.py",
    "test_cuda_install.py", "test_cuda_emulator_hazards.py", "test_cuda_mma.py",
    "test_train_checkpoint.py", "test_train_cli.py", "test_train_compare.py", "test_train_data.py",
    "test_train_rundir.py", "test_train_outputs.py", "test_train_validation.py", "test_train_data_limits.py",
    "test_train_distributed.py", "test_train_metrics.py", "test_train_resume.py", "test_convergence.py",
    "test_models_lstm.py", "test_ngram.py", "test_cli.py", "test_testing.py",
    "test_bench_attention.py", "test_bench_model.py", "test_bench_overhead.py", "test_bench_distill.py",
    "test_bench_lce.py",
    "test_gpu_check.py", "test_triton36.py",
]
# The dry run's correctness selection: a few quick tests per kind, a gpu-marked one among them
# (skipped on CPU, selected all the same), so the stage's whole path runs in seconds.
DRY_TESTS = ["tests/test_norm.py", "-k", "test_many_and_few_rows or test_gpu_bfloat16_model_widths"]
DRY_CUDA_TESTS = ["tests/test_cuda_backend.py", "-k", "test_cuda_backend_is_built or strided"]

# The benchmark stages: (suite, arguments on the GPU, time box in seconds), most valuable
# first. Quick sizes: one or two real shapes per op, 30 timed calls per implementation.
COMMON_GPU = ["--reps", "30", "--warmup", "3", "--compile", "on"]
BENCH = [
    ("attention", ["--rows", "2048", "8192", "--widths", "128", "--modes", "fwd", "bwd"], 75),
    # (0% and 85% ignored targets: the second shows the skipped rows' saving, issue 22)
    ("lce", ["--rows", "8192", "--widths", "128256", "--ignored", "0", "0.85"], 60),
    ("ce", ["--rows", "4096", "--widths", "128256", "--modes", "fwd", "bwd"], 35),
    ("distill", ["--rows", "8192", "--widths", "128256", "--modes", "fwd+bwd"], 45),
    ("norm", ["--rows", "16384", "--widths", "4096", "--ops", "rms_norm", "layer_norm", "dropout_add_rms_norm",
              "--modes", "fwd", "bwd"], 50),
    ("ffn", ["--rows", "8192", "--widths", "4096", "--modes", "fwd+bwd"], 40),
    # (issue 23's fusions: q/k norm + rotary in one launch, rotary inside attention, each vs its chain)
    ("rope", ["--rows", "4", "--widths", "4096", "--modes", "fwd", "bwd", "--ops", "rotary", "qk_norm_rotary",
              "rotary_attention"], 60),
    ("overhead", ["--ops", "tiny", "--calls", "500"], 30),
    ("model", ["--ops", "gpt2-124m", "--reps", "10"], 100),
]
DRY_BENCH_ARGS = ["--device", "cpu", "--quick", "--compile", "off", "--reps", "2", "--warmup", "1"]
DRY_BENCH_BOX: dict[str, float] = {}  # --box for a bench stage in a dry run
DRY_BENCH_EXTRA = {"overhead": ["--calls", "20", "--ops", "rms_norm", "scaled_dot_product_attention",
                                 "--rows", "64", "--widths", "256"], "model": ["--ops", "gpt-tiny"]}

# Time boxes (seconds) of the other stages: (GPU, dry run).
BOXES = {"device": (60, 60), "correctness": (200, 150), "cuda-build": (200, 300), "cuda-tests": (60, 90),
         "memcheck": (90, 60), "racecheck": (90, 60)}
PER_TEST_TIMEOUT = {False: 90, True: 120}  # seconds, per test: GPU, dry run
DEFAULT_BUDGET = 450  # seconds: 7.5 minutes, so the 8 minute promise holds with the final summary
MIN_BOX = 5           # a stage that would get less than this is skipped

STAGES = ["device", "correctness", "cuda-build", "cuda-tests", "memcheck", "racecheck"] + \
         [f"bench-{suite}" for suite, _, _ in BENCH]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- running commands

@dataclasses.dataclass
class Proc:
    """A stage's command running in its own process group, its output in a log file."""
    name: str
    popen: subprocess.Popen
    log: Path
    box: float
    started: float

    def wait(self, limit: Optional[float] = None) -> tuple[Optional[int], float, bool]:
        """(exit code, seconds, timed out): waits at most until the time box ends (or
        ``limit`` seconds from now, if sooner); an overrun kills the whole process group."""
        deadline = self.started + self.box
        if limit is not None:
            deadline = min(deadline, time.monotonic() + limit)
        try:
            rc = self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            return rc, time.monotonic() - self.started, False
        except subprocess.TimeoutExpired:
            kill_group(self.popen)
            with open(self.log, "a") as f:
                f.write(f"\n[gpu_check] killed after {time.monotonic() - self.started:.0f}s: "
                        f"time box {self.box:.0f}s\n")
            return self.popen.returncode, time.monotonic() - self.started, True


def kill_group(popen: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            popen.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Check:
    def __init__(self, out: Path, work: Path, dry: bool, budget: float, stages: list[str]):
        self.out, self.work, self.dry, self.stages = out, work, dry, stages
        self.logs, self.bench = work / "logs", work / "bench"
        for d in (out, self.logs, self.bench):
            d.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.budget = budget
        self.records: list[dict[str, Any]] = []
        self.running: list[Proc] = []
        self.py = sys.executable
        self.env = self._base_env()
        self.liger: Optional[str] = None

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(REPO), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(path)
        env["PYTHONUNBUFFERED"] = "1"
        for key in ("FASTLM_POISON", "FASTLM_BACKEND", "TRITON_INTERPRET"):
            env.pop(key, None)
        if self.dry:
            # The CPU rehearsal: the interpreter, and no GPU even where one exists.
            env["TRITON_INTERPRET"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def bench_env(self) -> dict[str, str]:
        """The stages' environment with Liger-Kernel's install folder on the path, if installed."""
        env = dict(self.env)
        if self.liger:
            env["PYTHONPATH"] = self.liger + os.pathsep + env["PYTHONPATH"]
        return env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def box(self, want: float) -> float:
        """The time box a stage gets: what it wants, at most what is left of the budget; 0 when
        so little is left (under MIN_BOX) that the stage is skipped."""
        left = self.remaining()
        return 0.0 if left < MIN_BOX else min(want, left)

    def spawn(self, name: str, cmd: list[str], box: float, env: Optional[dict[str, str]] = None) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write(f"[gpu_check] {_now()} {name}: {shlex.join(cmd)} (time box {box:.0f}s)\n")
            f.flush()
            popen = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log, box, time.monotonic())
        self.running.append(proc)
        return proc

    def finish(self, proc: Proc, limit: Optional[float] = None) -> tuple[Optional[int], float, bool]:
        result = proc.wait(limit)
        if proc in self.running:
            self.running.remove(proc)
        return result

    # ------------------------------------------------------------------------- records and files

    def record(self, stage: str, status: str, seconds: float = 0.0, box: Optional[float] = None,
               rc: Optional[int] = None, summary: str = "", **details: Any) -> dict[str, Any]:
        rec = {"stage": stage, "status": status, "seconds": round(seconds, 1),
               "box_s": None if box is None else round(box), "rc": rc,
               "log": f"logs/{stage}.log" if (self.logs / f"{stage}.log").exists() else None,
               "summary": summary, "at_s": round(time.monotonic() - self.start, 1), "details": details}
        self.records.append(rec)
        self.write_line(rec)
        print(f"[gpu_check] {stage}: {status} in {seconds:.0f}s" + (f" -- {summary}" if summary else ""), flush=True)
        self.save()
        return rec

    def write_line(self, obj: dict[str, Any]) -> None:
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save(self) -> None:
        """summary.md and the two archives, each replaced whole (never half-written)."""
        _atomic_write(self.out / "summary.md", summary_markdown(self.records, self.bench, self.dry).encode())
        _atomic_tar(self.out / "logs.tar.gz", self.logs, "logs")
        if any(self.bench.iterdir()):
            _atomic_tar(self.out / "bench.tar.gz", self.bench, "bench")

    def kill_all(self, why: str) -> None:
        for proc in list(self.running):
            kill_group(proc.popen)
            with open(proc.log, "a") as f:
                f.write(f"\n[gpu_check] killed: {why}\n")
            self.running.remove(proc)
            self.record(proc.name, "killed", time.monotonic() - proc.started, proc.box, summary=why)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_tar(path: Path, folder: Path, arcname: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    _atomic_write(path, buf.getvalue())


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-400:]


# ----------------------------------------------------------------------------- pytest stages

_RESULT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")
_FAILED_LINE = re.compile(r"^(?:\[gw\d+\]\s+\[\s*\d+%\]\s+)?(FAILED|ERROR)\s+(\S+::\S+)")
_FAILED_V = re.compile(r"^(\S+::\S+)\s+(FAILED|ERROR)\b")


def parse_pytest_log(text: str) -> dict[str, Any]:
    """Counts and failures by name from a pytest log (-v -ra, with or without xdist): the
    final line's counts when pytest got to print it, else counts of the per-test lines (a
    killed run)."""
    failures: dict[str, str] = {}
    counts: dict[str, int] = {}
    per_test = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    final = None
    collected = None
    for line in text.splitlines():
        s = line.strip()
        m = re.search(r"(?:collected|workers \[)\s*(\d+) items?", s)
        if m and collected is None:
            collected = int(m.group(1))
        m = _FAILED_LINE.match(s)
        if m:
            node = m.group(2)
            reason = s.split(" - ", 1)[1] if " - " in s else failures.get(node, "")
            failures[node] = reason[:300]
        m = _FAILED_V.match(s)
        if m:
            failures.setdefault(m.group(1), "")
        for word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            if re.search(rf"(^\[gw\d+\]\s+\[\s*\d+%\]\s+{word}\s|::\S*\s+{word}(\s|$))", s):
                per_test["error" if word == "ERROR" else word.lower()] += 1
                break
        if re.match(r"^=+ .*\d+ (passed|failed|errors?|skipped|deselected).* in [\d.]+s", s):
            final = s
    if final:
        for n, word in _RESULT.findall(final):
            counts["errors" if word.startswith("error") else word] = int(n)
    else:
        counts = {k if k != "error" else "errors": v for k, v in per_test.items() if v}
    timeouts = sorted(n for n, r in failures.items() if "Timeout" in r or "timed out" in r)
    ran = sum(v for k, v in counts.items() if k not in ("deselected",))
    not_run = None if collected is None or final else max(0, collected - ran)
    return {"counts": counts, "collected": collected, "not_run": not_run,
            "failures": sorted(failures), "failure_reasons": failures,
            "timeouts": timeouts, "finished": final is not None}


def pytest_command(check: Check, name: str, selection: list[str]) -> list[str]:
    cmd = [check.py, "-m", "pytest", *selection, "-v", "-rfE", "-p", "no:cacheprovider", "-o", "addopts=",
           "--junitxml", str(check.logs / f"{name}-junit.xml"), "--durations", "15"]
    if importlib.util.find_spec("pytest_benchmark") is not None:
        cmd += ["-p", "no:benchmark"]
    xdist = importlib.util.find_spec("xdist") is not None
    if xdist:
        cmd += ["-n", str(2 if check.dry else (os.cpu_count() or 1))]
    limit = PER_TEST_TIMEOUT[check.dry]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # Under xdist the thread method ends a hung worker (a kernel that never returns cannot
        # be interrupted by a signal); xdist reports its test as failed and starts another.
        cmd += ["--timeout", str(limit), "--timeout-method", "thread" if xdist else "signal"]
    else:
        cmd += ["-p", "gpu_check_plugin", "--gpu-check-timeout", str(limit)]
    cmd += ["-p", "gpu_check_plugin"] if "gpu_check_plugin" not in cmd else []
    return cmd


def run_pytest(check: Check, name: str, selection: list[str], want_box: float) -> dict[str, Any]:
    box = check.box(want_box)
    if not box:
        return check.record(name, "skipped", summary="no time left in the budget")
    # One inductor compile thread per worker: 16 workers x 16 compile processes would thrash.
    env = dict(check.env, TORCHINDUCTOR_COMPILE_THREADS="1")
    proc = check.spawn(name, pytest_command(check, name, selection), box, env=env)
    rc, seconds, timed_out = check.finish(proc)
    parsed = parse_pytest_log(proc.log.read_text(errors="replace"))
    counts = parsed["counts"]
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or _tail(proc.log, 2)
    if parsed["not_run"]:
        summary += f", {parsed['not_run']} of {parsed['collected']} not run"
    if parsed["failures"]:
        summary += "; failed: " + ", ".join(parsed["failures"][:5]) + (" ..." if len(parsed["failures"]) > 5 else "")
    status = "timeout" if timed_out else ("ok" if rc == 0 or (rc == 5 and not parsed["failures"]) else "failed")
    return check.record(name, status, seconds, box, rc, summary, **parsed)


# ----------------------------------------------------------------------------- the stages

def stage_device(check: Check) -> None:
    box = check.box(BOXES["device"][check.dry])
    if not box:
        check.record("device", "skipped", summary="no time left in the budget")
        return
    cmd = [check.py, str(Path(__file__).resolve()), "--probe", "device"] + (["--dry-run"] if check.dry else [])
    proc = check.spawn("device", cmd, box, env=check.bench_env())  # with Liger's path: its version is listed
    rc, seconds, timed_out = check.finish(proc)
    found: dict[str, Any] = {}
    for line in proc.log.read_text(errors="replace").splitlines():
        if line.startswith("GPU_CHECK_"):
            key, _, payload = line.partition(" ")
            try:
                found[key[len("GPU_CHECK_"):].lower()] = json.loads(payload)
            except ValueError:
                pass
    env, ceil = found.get("env", {}), found.get("ceilings", {})
    summary = f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}"
    if ceil:
        summary += (f"; copy {ceil['copy_gbps']:.0f} GB/s, {ceil['matmul_n']}^3 {ceil['matmul_dtype']} matmul "
                    f"{ceil['matmul_tflops']:.3g} TFLOP/s")
    if found.get("triton_jit"):
        summary += f"; one Triton JIT compile {found['triton_jit'].get('first_call_s', 0):.2f}s"
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    check.record("device", status, seconds, box, rc, summary, **found)


def nvcc_path() -> Optional[str]:
    found = shutil.which("nvcc")
    return found or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def start_cuda_build(check: Check) -> Optional[Proc]:
    if nvcc_path() is None:
        return None
    box = check.box(BOXES["cuda-build"][check.dry])
    if not box:
        return None
    cmd = [check.py, "-m", "fastlm.cuda_build", "--arch", "90", "--verbose"]
    if check.dry:  # leave the checkout's fastlm/ as it is: CI's other tests read whether _C is built
        cmd += ["--out", str(check.work / "cuda_out"), "--build-dir", str(check.work / "cuda_build")]
    else:
        cmd += ["--build-dir", str(check.work / "cuda_build")]
    return check.spawn("cuda-build", cmd, box)


def stage_cuda_build(check: Check, proc: Optional[Proc]) -> bool:
    if proc is None:  # a CPU machine may lack nvcc; the GPU machine must have it
        if nvcc_path() is not None:
            check.record("cuda-build", "skipped", summary="no time left in the budget")
        else:
            check.record("cuda-build", "skipped" if check.dry else "failed", summary="nvcc not found")
        return False
    rc, seconds, timed_out = check.finish(proc, limit=max(0.0, check.remaining()))
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    text = proc.log.read_text(errors="replace")
    errors = [ln.strip() for ln in text.splitlines() if " error" in ln or "error:" in ln][:20]
    summary = "built" if status == "ok" else ("; ".join(errors[:3]) or _tail(proc.log, 2))
    check.record("cuda-build", status, seconds, proc.box, rc, summary[:400], errors=errors)
    return status == "ok"


def sanitizer_path() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    for candidate in ([found] if found else []) + ["/usr/local/cuda/bin/compute-sanitizer",
                                                   "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]:
        if candidate and os.path.exists(candidate):
            return candidate
    return None


_REFUSED = ("Device not supported", "not supported", "error 999", "Unable to",
            "Target application terminated before first instrumented")


def start_sanitizers(check: Check) -> list[tuple[str, Optional[Proc], str]]:
    """memcheck and racecheck on the small cases, side by side (correctness only: they share the
    GPU with cuda-tests, which times nothing). Without compute-sanitizer (CPU, or a machine
    lacking it) the cases run bare, so their code is exercised all the same."""
    tool = sanitizer_path()
    probe = [check.py, str(Path(__file__).resolve()), "--probe", "sanitize"] + (["--dry-run"] if check.dry else [])
    started = []
    for name in ("memcheck", "racecheck"):
        if name not in check.stages:
            continue
        box = check.box(BOXES[name][check.dry])
        if not box:
            started.append((name, None, "no time left in the budget"))
            continue
        if tool is None:
            cmd, note = probe, "compute-sanitizer not found: the cases ran without it"
        else:
            cmd, note = [tool, "--tool", name, "--error-exitcode", "3", "--print-limit", "30", *probe], ""
        if tool is None and name == "racecheck":  # the bare cases once are enough
            started.append((name, None, note))
            continue
        started.append((name, check.spawn(name, cmd, box), note))
    return started


def finish_sanitizers(check: Check, started: list[tuple[str, Optional[Proc], str]]) -> None:
    for name, proc, note in started:
        if proc is None:
            check.record(name, "skipped" if "budget" in note else "refused", summary=note)
            continue
        rc, seconds, timed_out = check.finish(proc)
        text = proc.log.read_text(errors="replace")
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        errors = int(m.group(1)) if m else None
        cases = len(re.findall(r"^case .* ok$", text, re.M))
        refused = next((r for r in _REFUSED if r in text), None) if rc != 0 and not cases else None
        if timed_out:
            status = "timeout"
        elif refused:
            status = "refused"
        elif note:  # no sanitizer: the cases' own exit code
            status = "refused" if rc == 0 else "failed"
        else:
            status = "ok" if rc == 0 and not errors else "failed"
        summary = note or (f"{errors} errors" if errors is not None else "") + f", {cases} cases ran"
        if refused:
            summary = f"refused: {_tail(proc.log, 2)}"
        check.record(name, status, seconds, proc.box, rc, summary.strip(", "), errors=errors, cases=cases,
                     sanitizer=sanitizer_path())


def stage_bench(check: Check, suite: str, args: list[str], want_box: float) -> None:
    name = f"bench-{suite}"
    box = check.box(want_box if not check.dry else DRY_BENCH_BOX.get(name, 120))
    if not box:
        check.record(name, "skipped", summary="no time left in the budget")
        return
    extra = DRY_BENCH_ARGS + DRY_BENCH_EXTRA.get(suite, []) if check.dry else COMMON_GPU + args
    cmd = [check.py, "-m", "fastlm.bench", suite, "--out", str(check.bench), *extra]
    proc = check.spawn(name, cmd, box, env=check.bench_env())
    rc, seconds, timed_out = check.finish(proc)
    doc = None
    try:
        doc = json.loads((check.bench / f"{suite}.json").read_text())
    except (OSError, ValueError):
        pass
    rows = doc.get("rows", []) if doc else []
    notes = doc.get("notes", []) if doc else []
    impls = sorted({r.get("impl") for r in rows if r.get("ms")})
    status = "timeout" if timed_out else ("ok" if rc == 0 and doc else "failed")
    summary = f"{len(rows)} rows, impls: {', '.join(impls)}" if doc else _tail(proc.log, 2)
    check.record(name, status, seconds, box, rc, summary, rows=len(rows), impls=impls, notes=notes[:20],
                 headline=headline(suite, rows))


def install_liger(check: Check) -> dict[str, Any]:
    """Liger-Kernel, a peer in the benchmarks, from a wheel carried in .whl/ (there is no package
    index on the GPU machine): installed into the work folder, put on the benchmarks' path."""
    wheels = sorted((REPO / ".whl").glob("liger_kernel-*.whl"))
    if not wheels:
        return {"liger": "no wheel in .whl/ (benchmarks/fetch_liger.sh downloads it): benchmarks run without Liger"}
    target = check.work / "site"
    out = subprocess.run([check.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--target", str(target), str(wheels[-1])], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return {"liger": f"pip could not install {wheels[-1].name}: {out.stderr.strip()[-300:]}"}
    check.liger = str(target)
    return {"liger": f"installed {wheels[-1].name}"}


# ----------------------------------------------------------------------------- summary

def headline(suite: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: fastlm's time and its speedups over eager and compile, and each peer's time."""
    cases: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if not r.get("ms"):
            continue
        ignored = r.get("ignored")
        key = (r.get("op"), r.get("mode"), r.get("rows"), r.get("width"), r.get("hidden"),
               f"ign{round(100 * ignored)}%" if ignored else None)
        case = cases.setdefault(key, {"case": " ".join(str(k) for k in key if k is not None), "ms": {}})
        case["ms"][r["impl"]] = round(r["ms"], 4)
        if r.get("peak_mib") is not None:
            case.setdefault("peak_mib", {})[r["impl"]] = round(r["peak_mib"], 1)
    return list(cases.values())


def _speedup(ms: dict[str, float], impl: str, base: str) -> str:
    if impl in ms and base in ms and ms[impl]:
        return f"{ms[base] / ms[impl]:.2f}x"
    return "-"


def summary_markdown(records: list[dict[str, Any]], bench: Optional[Path], dry: bool) -> str:
    lines = [f"# GPU check{' (dry run on CPU)' if dry else ''}, {_now()}", "",
             "| stage | status | seconds | box | summary |", "|---|---|--:|--:|---|"]
    for r in records:
        summary = str(r.get("summary", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', 0):.0f} | "
                     f"{r.get('box_s') if r.get('box_s') is not None else '-'} | {summary[:300]} |")
    failures = [(r["stage"], name, r["details"].get("failure_reasons", {}).get(name, ""))
                for r in records for name in r.get("details", {}).get("failures", [])]
    if failures:
        lines += ["", f"## Failures ({len(failures)})", ""]
        lines += [f"- {stage}: `{name}`" + (f" -- {why}" if why else "") for stage, name, why in failures[:200]]
    device = next((r for r in records if r["stage"] == "device"), None)
    if device and device["details"].get("ceilings"):
        c = device["details"]["ceilings"]
        lines += ["", "## Ceilings", "", f"copy {c['copy_gbps']:.0f} GB/s ({c['copy_bytes'] >> 20} MiB), "
                  f"{c['matmul_n']}^3 {c['matmul_dtype']} matmul {c['matmul_tflops']:.3g} TFLOP/s"]
    bench_rows = [(r["stage"][len("bench-"):], case) for r in records if r["stage"].startswith("bench-")
                  for case in r.get("details", {}).get("headline", [])]
    if bench_rows:
        lines += ["", "## Benchmarks (median ms; fastlm's speedup over each peer)", "",
                  "| suite | case | fastlm ms | vs eager | vs compile | peers ms | peak MiB |",
                  "|---|---|--:|--:|--:|---|---|"]
        for suite, case in bench_rows:
            ms = case["ms"]
            mine = next((i for i in ("fastlm-triton", "fastlm-cuda", "fastlm", "fastlm-torch") if i in ms), None)
            peers = ", ".join(f"{k} {v:.4g}" for k, v in ms.items() if k != mine)
            peak = ", ".join(f"{k} {v:.0f}" for k, v in case.get("peak_mib", {}).items())
            lines.append(f"| {suite} | {case['case']} | {ms[mine]:.4g} | {_speedup(ms, mine, 'torch-eager')} | "
                         f"{_speedup(ms, mine, 'torch-compile')} | {peers} | {peak} |" if mine else
                         f"| {suite} | {case['case']} | - | - | - | {peers} | {peak} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the run

def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("results.jsonl", "summary.md", "logs.tar.gz", "bench.tar.gz"):
        (out / stale).unlink(missing_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    stages = args.stages or STAGES
    check = Check(out, work, args.dry_run, args.budget, stages)

    def on_signal(signum, _frame):
        check.kill_all(f"gpu_check received signal {signum}")
        check.write_line({"stage": "end", "status": "killed", "seconds": round(time.monotonic() - check.start, 1)})
        print(summary_markdown(check.records, check.bench, check.dry), flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    setup = install_liger(check) if any(s.startswith("bench-") for s in stages) else {}
    check.write_line({"stage": "start", "date": _now(), "dry_run": check.dry, "budget_s": args.budget,
                      "stages": stages, "work": str(work), "python": sys.version.split()[0],
                      "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain",
                                                                                         "--untracked-files=no")),
                      "argv": sys.argv[1:], **setup})
    print(f"[gpu_check] {'dry run on CPU; ' if check.dry else ''}budget {args.budget:.0f}s; out {out}; "
          f"work {work}; {setup.get('liger', '')}", flush=True)

    def guard(name: str, fn: Callable[..., Any], *fn_args: Any, default: Any = None) -> Any:
        """A bug in this script's own code for one stage is recorded, and the next stage runs."""
        try:
            return fn(*fn_args)
        except Exception as exc:  # noqa: BLE001
            import traceback
            (check.logs / f"{name}.error.log").write_text(traceback.format_exc())
            check.record(name, "error", summary=f"gpu_check itself failed: {type(exc).__name__}: {exc}"[:400])
            return default

    build = guard("cuda-build", start_cuda_build, check) if "cuda-build" in stages else None
    if "device" in stages:
        guard("device", stage_device, check)
    if "correctness" in stages:
        selection = DRY_TESTS if check.dry else ["tests"] + [
            f"--ignore=tests/{name}" for name in NOT_OP_TESTS]
        guard("correctness", run_pytest, check, "correctness", selection, BOXES["correctness"][check.dry])
    built = guard("cuda-build", stage_cuda_build, check, build, default=False) if "cuda-build" in stages else False
    sanitizers = guard("sanitizers", start_sanitizers, check, default=[])
    if "cuda-tests" in stages:
        if built or check.dry or "cuda-build" not in stages:
            guard("cuda-tests", run_pytest, check, "cuda-tests",
                  DRY_CUDA_TESTS if check.dry else ["tests/test_cuda_backend.py", "tests/test_cuda_mma.py"],
                  BOXES["cuda-tests"][check.dry])
        else:
            check.record("cuda-tests", "skipped", summary="the CUDA extension did not build")
    guard("sanitizers", finish_sanitizers, check, sanitizers)
    for suite, suite_args, box in BENCH:
        if f"bench-{suite}" in stages:
            guard(f"bench-{suite}", stage_bench, check, suite, suite_args, box)

    total = time.monotonic() - check.start
    bad = [r["stage"] for r in check.records if r["status"] in ("failed", "timeout", "killed", "error")]
    check.write_line({"stage": "end", "status": "ok" if not bad else "failed", "seconds": round(total, 1),
                      "failed_stages": bad})
    check.save()
    print()
    print(summary_markdown(check.records, check.bench, check.dry), flush=True)
    print(f"[gpu_check] {len(check.records)} stages in {total:.0f}s; files in {out}: "
          f"{', '.join(sorted(p.name for p in out.iterdir()))}", flush=True)
    return 1 if bad else 0


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ----------------------------------------------------------------------------- probes (run as stages)

def probe_device(dry: bool) -> int:
    """Prints GPU_CHECK_ENV, GPU_CHECK_TRITON_JIT and GPU_CHECK_CEILINGS lines (JSON)."""
    import importlib.metadata as md
    import platform

    import torch

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    def quiet(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "torch_cuda": torch.version.cuda, "cuda_available": cuda}
    for pkg in ("torch", "triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "pytest-benchmark",
                "pybind11", "ninja", "transformers", "matplotlib", "liger-kernel"):
        env[pkg] = version(pkg)
    nvcc = quiet(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    env["compute_sanitizer"] = sanitizer_path()
    smi = quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                 "clocks.max.mem,power.limit,temperature.gpu", "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update({"device": p.name, "compute_capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)})
        if smi:
            fields = [f.strip() for f in smi.splitlines()[0].split(",")]
            env.update({"driver": fields[1], "clock_sm_mhz": fields[3], "clock_max_sm_mhz": fields[4],
                        "clock_max_mem_mhz": fields[5]})
    else:
        env["device"] = "cpu (dry run)" if dry else "no CUDA device"
    print("GPU_CHECK_ENV " + json.dumps(env), flush=True)
    print(f"nvcc: {nvcc}\nnvidia-smi: {smi}", flush=True)
    if not cuda and not dry:
        print("torch sees no CUDA device", flush=True)
        return 1

    # One Triton JIT compile, timed: what each new kernel specialisation costs the test stages.
    import triton
    import triton.language as tl

    @triton.jit
    def _add(x, y, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out + offs, tl.load(x + offs, mask=mask) + tl.load(y + offs, mask=mask), mask=mask)

    device = torch.device("cuda" if cuda else "cpu")
    x = torch.randn(1000, device=device)
    y = torch.randn(1000, device=device)
    out = torch.empty_like(x)
    t0 = time.perf_counter()
    _add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    _add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
    if cuda:
        torch.cuda.synchronize()
    again = time.perf_counter() - t0
    ok = bool(torch.allclose(out, x + y))
    jit = {"first_call_s": round(first, 3), "second_call_s": round(again, 5), "correct": ok,
           "interpreted": bool(os.environ.get("TRITON_INTERPRET"))}
    print("GPU_CHECK_TRITON_JIT " + json.dumps(jit), flush=True)

    from fastlm.bench import runner
    ceilings = runner.measure_ceilings(device, quick=dry)
    print("GPU_CHECK_CEILINGS " + json.dumps(ceilings), flush=True)
    return 0 if ok else 1


def probe_sanitize(dry: bool) -> int:
    """Small attention and cross-entropy cases, forward and backward, on each native backend that
    can run here (under compute-sanitizer on the GPU). Prints "case NAME ok" per case."""
    import torch

    import fastlm

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = [b for b in ("cuda", "triton") if fastlm.available_backends()[b].available and cuda] or ["auto"]
    failed = 0
    for backend in backends:
        for name, fn in (("attention", _attention_case), ("cross_entropy", _ce_case)):
            try:
                with fastlm.use_backend(backend):
                    fn(fastlm, torch, device, dtype)
                if cuda:
                    torch.cuda.synchronize()
                print(f"case {name} {backend} ok", flush=True)
            except Exception as exc:  # report each case, then fail
                failed += 1
                print(f"case {name} {backend} FAILED: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


def _attention_case(fastlm, torch, device, dtype) -> None:
    q, k, v = (torch.randn(1, 2, 65, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = fastlm.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.float().square().sum().backward()
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (out.float() - ref).abs().max() < 0.1, "attention differs from torch"


def _ce_case(fastlm, torch, device, dtype) -> None:
    logits = torch.randn(17, 1000, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 1000, (17,), device=device)
    target[::5] = -100
    loss = fastlm.cross_entropy(logits, target)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(logits.float(), target)
    assert (loss.float() - ref).abs() < 0.05, "cross_entropy differs from torch"


# ----------------------------------------------------------------------------- collecting a run

def collect(src: Path, results: Path, dry_ok: bool = False) -> Path:
    """File a run's output (the folder holding results.jsonl) as results/<device>-<date>/:
    summary.md, results.jsonl, logs.tar.gz and the bench files unpacked (bench/*.json: what
    python -m fastlm.bench.report reads). A dry run is refused unless ``dry_ok``: its CPU
    figures would be taken for a committed CPU run (the README's host-overhead table)."""
    lines = [json.loads(line) for line in (src / "results.jsonl").read_text().splitlines() if line.strip()]
    start = next((r for r in lines if r.get("stage") == "start"), {})
    if start.get("dry_run") and not dry_ok:
        raise ValueError(f"{src} holds a dry run (CPU, tiny shapes): not results to commit")
    device = next((r for r in lines if r.get("stage") == "device"), {})
    name = (device.get("details", {}).get("env", {}).get("device") or "unknown")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    if start.get("dry_run"):
        slug += "-dry-run"
    dest = results / f"{slug}-{str(start.get('date', _now()))[:10]}"
    dest.mkdir(parents=True, exist_ok=True)
    for file in ("results.jsonl", "summary.md", "logs.tar.gz"):
        if (src / file).exists():
            shutil.copy(src / file, dest / file)
    if (src / "bench.tar.gz").exists():
        with tarfile.open(src / "bench.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("bench/")
                       and "/" not in m.name[len("bench/"):] and not m.name.endswith(".log")]
            for m in members:
                data = tar.extractfile(m).read()
                (dest / "bench").mkdir(exist_ok=True)
                (dest / m.name).write_bytes(data)
    return dest


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-out",
                   help="output folder (default: $OUT, else ./gpu-out)")
    p.add_argument("--work", help="folder for logs and bench files while running (default: a new temporary one)")
    p.add_argument("--dry-run", action="store_true", help="the same stages on CPU: interpreter, tiny shapes")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET})")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="only these stages (the order stays the plan's)")
    p.add_argument("--box", nargs="+", default=[], metavar="STAGE=SECONDS",
                   help="another time box for a stage (e.g. correctness=240 bench-model=150)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--collect", type=Path, metavar="DIR", help="file DIR's output under --results and exit")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--probe", choices=["device", "sanitize"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe == "device":
        return probe_device(args.dry_run)
    if args.probe == "sanitize":
        return probe_sanitize(args.dry_run)
    if args.collect:
        try:
            print(collect(args.collect, args.results))
        except (OSError, ValueError) as exc:
            print(f"gpu_check --collect: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.list:
        for stage in STAGES:
            if stage.startswith("bench-"):
                suite, sargs, box = next(b for b in BENCH if f"bench-{b[0]}" == stage)
                print(f"{stage:14s} box {box:4d}s  python -m fastlm.bench {suite} {shlex.join(COMMON_GPU + sargs)}")
            else:
                print(f"{stage:14s} box {BOXES[stage][0]:4d}s")
        print(f"budget {DEFAULT_BUDGET}s; per-test timeout {PER_TEST_TIMEOUT[False]}s")
        return 0
    if args.budget <= 0:
        p.error("--budget must be positive")
    for item in args.box:
        stage, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if stage not in STAGES or value <= 0:
            p.error(f"--box: expected STAGE=SECONDS with a stage of {STAGES}, got {item!r}")
        if stage.startswith("bench-"):
            BENCH[:] = [(s, a, value if f"bench-{s}" == stage else b) for s, a, b in BENCH]
            DRY_BENCH_BOX[stage] = value
        else:
            BOXES[stage] = (value, value)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
