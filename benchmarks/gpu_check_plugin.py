"""pytest plugin for the GPU check (benchmarks/gpu_check.py loads it with ``-p gpu_check_plugin``).

* Runs every gpu-marked test first, so the answers the CPU cannot give arrive first when a
  stage's time box ends the run, and Hypothesis property tests last.
* ``--gpu-check-timeout SECONDS``: a per-test time limit where pytest-timeout is missing (as on
  CI's machine; the GPU machine has it). A test past its limit fails by name with a
  TimeoutError (SIGALRM, in the main thread, which is where pytest and each xdist worker run
  tests); one stuck inside C code that never returns to Python is ended with its process by
  faulthandler a little later, after its traceback is printed.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import pytest


def pytest_addoption(parser):
    parser.addoption("--gpu-check-timeout", type=float, default=0.0,
                     help="fail a test that runs longer than this many seconds (0: no limit)")
    parser.addoption("--gpu-check-count-compiles", default=None, metavar="FILE",
                     help="count the distinct kernel specialisations launched (interpreter) into FILE")


def _rank(item) -> int:
    """gpu-marked tests first; Hypothesis property tests last (each random shape is another JIT
    compile on a GPU, for the least new information per second)."""
    if item.get_closest_marker("gpu") is not None:
        return 0
    return 2 if getattr(getattr(item, "obj", None), "is_hypothesis_test", False) else 1


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_rank)  # stable: collection order within each rank


class GpuCheckTimeout(Exception):
    """Raised in a test that ran past --gpu-check-timeout."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = item.config.getoption("--gpu-check-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise GpuCheckTimeout(f"Timeout: {item.nodeid} ran longer than {limit:g}s (--gpu-check-timeout)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + 30, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- compile counting
# ``--gpu-check-count-compiles FILE`` (CPU, under the interpreter): records each distinct
# specialisation the tests launch -- kernel, argument dtypes, which integers are 1 or divisible
# by 16 and which pointers are 16-byte aligned (what Triton specialises on), constexprs and
# launch options -- and writes their number per kernel to FILE. On a GPU each one is a JIT
# compile, so this is the estimate behind the timing plan of docs/STATUS.md (a lower bound:
# gpu-marked tests do not run on CPU, and GPU launch settings can differ).

_SEEN: set = set()


def _arg_key(value):
    import torch
    if isinstance(value, torch.Tensor):
        return ("t", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return ("c", value)
    if isinstance(value, int):
        return ("i", value == 1, value % 16 == 0, abs(value) >= 2**31)
    if isinstance(value, float):
        return ("f",)
    return ("c", repr(value))


def pytest_configure(config):
    path = config.getoption("--gpu-check-count-compiles", default=None)
    if not path:
        return
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.run
    constexprs = {}

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        if fn not in constexprs:
            import inspect
            params = list(inspect.signature(fn).parameters.values())
            constexprs[fn] = [p.name for p in params]
        names = constexprs[fn]
        key = [fn.__module__ + "." + fn.__name__]
        for name, value in list(zip(names, args)) + sorted(kwargs.items()):
            key.append((name, value if "constexpr" in str(getattr(fn, "__annotations__", {}).get(name, "")) or
                        name.isupper() or name.startswith("num_") else _arg_key(value)))
        _SEEN.add(repr(key))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run


def pytest_unconfigure(config):
    path = config.getoption("--gpu-check-count-compiles", default=None)
    if not path:
        return
    import collections
    import json
    per_kernel = collections.Counter(key.split("'")[1] for key in _SEEN)
    with open(path, "w") as f:
        json.dump({"specialisations": len(_SEEN), "per_kernel": dict(per_kernel.most_common())}, f, indent=1)
