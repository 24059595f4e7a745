"""The harness every benchmark suite shares: timing, device ceilings, memory, result files.

A suite builds, for one case (an op, a mode, a shape), a callable per implementation and
the number of bytes the case must move at the least; :meth:`Harness.run_case` times the
callables interleaved, measures their peak memory and turns the times into rows.

Timing on CUDA reads CUDA events around each call. Before every call the L2 cache is
overwritten, so a kernel never finds its inputs cached by the previous call, and the
stream is held busy with a spin kernel for longer than the host needs to queue the call,
so the events time the device work and not Python's dispatch (a norm over 4096 x 768
bf16 moves 12 MB: about 4 us of device time, less than the host needs to launch it).
Implementations take turns call by call, in an order rotated every round, so clock
and thermal drift land on all of them alike. On CPU: time.perf_counter, same turns.

Nothing here touches a device or imports triton when imported.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

MiB = 1 << 20

# Columns of the markdown table: (row key, header).
TABLE_COLUMNS = (
    ("op", "op"), ("mode", "mode"), ("impl", "impl"), ("shape", "shape"), ("rows", "rows"), ("hidden", "hidden"),
    ("teacher_hidden", "teacher hidden"), ("width", "width"), ("dtype", "dtype"), ("ignored", "ignored"),
    ("ms", "median ms"), ("ms_vs_ignored0", "ms / ms at 0% ignored"),
    ("us_per_call", "µs/call"), ("extra_us", "extra µs"), ("ratio", "× torch"), ("goal", "goal"),
    ("gbps", "GB/s"), ("frac_copy_bw", "of copy BW"),
    ("tokens_per_s", "tokens/s"), ("tflops", "TFLOP/s"), ("frac_matmul", "of matmul peak"), ("vs_matmuls", "vs bare matmuls"),
    ("peak_mib", "peak MiB"), ("speedup_vs_eager", "vs eager"), ("speedup_vs_compile", "vs compile"),
)

EAGER, COMPILE = "torch-eager", "torch-compile"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


@dataclasses.dataclass
class Config:
    """What one run measures; built from the command line by fastlm.bench.main."""
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    reps: int = 10            # timed calls per implementation and case
    warmup: int = 2           # untimed calls first (the first one compiles)
    rows: Optional[list[int]] = None    # None: the suite's defaults for the device
    widths: Optional[list[int]] = None
    compile: bool = False     # include torch.compile
    impls: Optional[list[str]] = None   # None: every implementation that can run
    ops: Optional[list[str]] = None
    modes: Optional[list[str]] = None
    calls: Optional[int] = None         # overhead suite: calls per timed loop (None: its default)
    ignored: Optional[list[float]] = None  # lce: fractions of the targets set to ignore_index (None: its default)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def wants(self, kind: str, name: str) -> bool:
        chosen = {"impl": self.impls, "op": self.ops, "mode": self.modes}[kind]
        return chosen is None or name in chosen


# ----------------------------------------------------------------------------- timers

class CpuTimer:
    def __init__(self, reps: int):
        self.reps = reps

    def measure(self, fns: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        """Milliseconds per call for each function, calls interleaved."""
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for k in range(self.reps):
            for name in names[k % len(names):] + names[: k % len(names)]:
                start = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
        return times


class CudaTimer:
    def __init__(self, device: torch.device, reps: int):
        self.device = device
        self.reps = reps
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * MiB
        # Twice the L2, so one zero_ evicts every line the previous call left.
        self._flush = torch.empty(max(2 * l2, 64 * MiB) // 4, dtype=torch.int32, device=device)
        self._cycles_per_ms = self._calibrate_sleep()

    def _calibrate_sleep(self) -> Optional[float]:
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is None:
            return None
        sleep(1000)  # load the kernel before timing it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 2_000_000
        start.record()
        sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / max(start.elapsed_time(end), 1e-3)

    def _host_ms(self, fn: Callable[[], Any]) -> float:
        """How long the host takes to queue one call (the device may still be running it)."""
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn()
        host = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize(self.device)
        return host

    def measure(self, fns: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        host = max(self._host_ms(fn) for fn in fns.values())
        # Keep the stream busy 1.5x the host's queueing time (at least 0.1 ms) so that
        # the start event fires only once the whole call is queued behind it.
        sleep_cycles = int(self._cycles_per_ms * max(0.1, 1.5 * host)) if self._cycles_per_ms else 0
        events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in fns}
        names = list(fns)
        for k in range(self.reps):
            for name in names[k % len(names):] + names[: k % len(names)]:
                if sleep_cycles:
                    torch.cuda._sleep(sleep_cycles)
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(self.device)
        return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Memory one call allocates at its peak, above what was allocated before it (CUDA only).

    What the call returns is held until the peak is read, so outputs count; for a backward
    the saved graph existed before the call and does not.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / MiB


def cpu_peak_memory_mib(fn: Callable[[], Any]) -> float:
    """Memory one call allocates on the CPU at its peak, above what was allocated before it,
    read from the profiler's allocation events (every allocation and free through torch's CPU
    allocator, native kernels' temporaries included), in the order they happened. As for
    peak_memory_mib, what the call returns is held until the end, so outputs count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / MiB


# ----------------------------------------------------------------------------- ceilings

def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()  # warm-up: allocator, kernel load
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in pairs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """What this device does at best, measured now: the yardsticks for every row.

    copy_gbps: a device-to-device copy of a tensor far larger than any cache, counting the
    bytes read and the bytes written. matmul_tflops: a square matmul (bf16 on CUDA,
    float32 on CPU), for the compute-bound suites.
    """
    on_cuda = device.type == "cuda"
    # 64 MiB is past the last-level cache of the CPUs we run on; --quick shrinks only the
    # CUDA copy, where 256 MiB is still five times an H100's L2.
    copy_bytes = ((256 if quick else 1024) if on_cuda else 64) * MiB
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, reps=20 if on_cuda else 5)
    del src, dst

    n = (4096 if quick else 8192) if on_cuda else (512 if quick else 1024)
    mm_dtype = torch.bfloat16 if on_cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm_ms = _median_ms(lambda: a @ b, device, reps=20 if on_cuda else 3)
    del a, b
    return {
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_tflops": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12,
        "matmul_n": n,
        "matmul_dtype": dtype_name(mm_dtype),
    }


# ----------------------------------------------------------------------------- environment

def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_quiet(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the figures were measured."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        # From the package metadata: importing triton here would fix TRITON_INTERPRET too early.
        "triton": _version("triton"),
        "fastlm": _version("fastlm"),
        "platform": platform.platform(),
        "git_commit": _run_quiet(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_run_quiet(["git", "status", "--porcelain", "--untracked-files=no"])),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "FASTLM_BACKEND", "FASTLM_POISON",
                                            "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device": props.name,
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
            "driver_version": _run_quiet(["nvidia-smi", "--query-gpu=driver_version",
                                          "--format=csv,noheader", f"--id={device.index or 0}"]),
        })
    else:
        env.update({"device": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()})
    return env


# ----------------------------------------------------------------------------- shared by the suites

def standard_implementations(config: "Config", harness: "Harness", backends: tuple = ("triton", "cuda"),
                             missing: Optional[dict[str, str]] = None) -> list[str]:
    """fastlm's kernels (each backend in ``backends`` that can run here: CUDA only, the Triton
    interpreter is not timed), fastlm's reference, torch eager and torch.compile, in table
    order; a note for each one left out. ``missing``: backends fastlm has no kernel for in this
    suite, with the reason, noted when asked for by --impls."""
    import fastlm

    chosen = []
    available = fastlm.available_backends()
    for backend in backends:
        name = f"fastlm-{backend}"
        if not config.wants("impl", name):
            continue
        if not config.on_cuda:
            if backend == "triton":
                harness.note("fastlm-triton left out: on CPU the Triton kernels run only under the interpreter, "
                             "which is far too slow to time")
            continue
        if available[backend].available:
            chosen.append(name)
        else:
            harness.note(f"{name} left out: {available[backend].reason}")
    for backend, reason in (missing or {}).items():
        if config.impls and f"fastlm-{backend}" in config.impls:
            harness.note(f"fastlm-{backend} left out: {reason}")
    for name in ("fastlm-torch", EAGER):
        if config.wants("impl", name):
            chosen.append(name)
    if config.wants("impl", COMPILE):
        if config.compile:
            chosen.append(COMPILE)
        else:
            harness.note("torch-compile left out: off for this run (on by default on CUDA; --compile on to force it)")
    return chosen


def relative_check(dtype: torch.dtype, tolerances: dict, skip: tuple = ()) -> Callable[[str, Any, Any], Optional[str]]:
    """``check(impl, out, eager_out)`` for Harness.run_case: a note when an implementation gives
    NaN/inf or differs from torch eager by more than ``tolerances[dtype]`` in max |diff| over
    max |eager| (a sanity check of what is timed, not the accuracy tests). ``skip``: impls
    that compute something else on purpose."""
    tol = tolerances.get(dtype, tolerances[torch.float32])

    def check(name: str, out: Any, ref: Any) -> Optional[str]:
        if name in skip:
            return None
        for a, b in zip(out, ref):
            a, b = a.detach().float(), b.detach().float()
            if not torch.isfinite(a).all():
                return "returned NaN or inf"
            rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
            if rel > tol:
                return f"differs from torch-eager: max |diff| / max |eager| = {rel:.2e}"
        return None
    return check


# ----------------------------------------------------------------------------- harness

class Harness:
    """Runs the cases of one invocation and collects their rows and notes."""

    def __init__(self, config: Config, ceilings: dict[str, Any]):
        self.config = config
        self.ceilings = ceilings
        self.timer = CudaTimer(config.device, config.reps) if config.on_cuda else CpuTimer(config.reps)
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            print(f"note: {text}", file=sys.stderr)

    def run_case(self, meta: dict[str, Any], fns: dict[str, Callable[[], Any]], nbytes: int,
                 check: Optional[Callable[[str, Any, Any], Optional[str]]] = None) -> list[dict[str, Any]]:
        """Time one case for every implementation in ``fns`` and append its rows.

        ``meta`` names the case (op, mode, rows, width, dtype); ``nbytes`` is what the case
        must read and write at the least, the same for every implementation, so GB/s is
        comparable across them. An implementation that fails its warm-up is dropped with
        a note. ``check(impl, out, eager_out)`` may return a note when outputs disagree.
        """
        label = "/".join(str(meta[k]) for k in ("op", "mode", "rows", "width", "dtype")) \
            + (f"/{meta['ignored']:.0%} ignored" if meta.get("ignored") is not None else "")
        live: dict[str, Callable[[], Any]] = {}
        first_out: dict[str, Any] = {}
        for name, fn in fns.items():
            try:
                for _ in range(max(1, self.config.warmup)):
                    out = fn()
                if self.config.on_cuda:
                    torch.cuda.synchronize(self.config.device)
            except Exception as exc:  # a failing implementation must not sink the run
                self.note(f"{label}: {name} failed, left out: {type(exc).__name__}: {_first_line(exc)}")
                continue
            live[name] = fn
            first_out[name] = out
        if check is not None and EAGER in first_out:
            for name, out in first_out.items():
                if name != EAGER:
                    problem = check(name, out, first_out[EAGER])
                    if problem:
                        self.note(f"{label}: {name} {problem}")
        first_out.clear()  # let the warm-up outputs go before memory is measured
        if not live:
            return []

        peaks = {name: peak_memory_mib(fn, self.config.device) for name, fn in live.items()}
        times = self.timer.measure(live)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        copy_gbps = self.ceilings.get("copy_gbps")
        rows = []
        for name in live:
            ms = medians[name]
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append({
                **meta,
                "impl": name,
                "ms": ms,
                "ms_min": min(times[name]),
                "reps": len(times[name]),
                "bytes": nbytes,
                "gbps": gbps,
                "frac_copy_bw": gbps / copy_gbps if copy_gbps else None,
                "peak_mib": peaks[name],
                "speedup_vs_eager": medians[EAGER] / ms if EAGER in medians else None,
                "speedup_vs_compile": medians[COMPILE] / ms if COMPILE in medians else None,
            })
        self.rows.extend(rows)
        return rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


# ----------------------------------------------------------------------------- result files

def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("frac_copy_bw", "frac_matmul", "ignored"):
        return f"{100 * value:.0f}%"
    if key.startswith("speedup"):
        return f"{value:.2f}x"
    if key == "ms":
        return f"{value:.4g}"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    # A column no row fills (TFLOP/s in a bandwidth-bound suite, say) is left out.
    columns = [(k, h) for k, h in TABLE_COLUMNS if k in ("op", "mode", "impl") or any(r.get(k) is not None
                                                                                     for r in rows)]
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" if k in ("op", "mode", "impl", "dtype") else "--:" for k, _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def markdown_report(suite: str, env: dict[str, Any], ceilings: dict[str, Any], rows: list[dict[str, Any]],
                    notes: list[str]) -> str:
    head = [f"## {suite}", "",
            f"{env['device']} ({env['device_type']}), {env['date']}; torch {env['torch']}, "
            f"triton {env.get('triton') or '-'}, python {env['python']}"
            + (f", driver {env['driver_version']}" if env.get("driver_version") else ""), "",
            f"Measured ceilings: copy {ceilings['copy_gbps']:.1f} GB/s (read + write), "
            f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.3g} TFLOP/s.", "",
            "Times are medians; GB/s counts the bytes the op must move at the least (each tensor "
            "once), the same for every implementation; vs eager / vs compile > 1 means faster.", ""]
    body = [markdown_table(rows)]
    if notes:
        body += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(head + body) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(out_dir: Path, suite: str, env: dict[str, Any], config: Config, ceilings: dict[str, Any],
                  rows: list[dict[str, Any]], notes: list[str]) -> tuple[Path, Path, str]:
    """Write <out_dir>/<suite>.json and <suite>.md; returns both paths and the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    settings["device"], settings["dtype"] = str(config.device), dtype_name(config.dtype)
    doc = {"suite": suite, "environment": env, "settings": settings, "ceilings": ceilings,
           "rows": rows, "notes": notes}
    json_path, md_path = out_dir / f"{suite}.json", out_dir / f"{suite}.md"
    json_path.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    report = markdown_report(suite, env, ceilings, rows, notes)
    md_path.write_text(report)
    return json_path, md_path, report
