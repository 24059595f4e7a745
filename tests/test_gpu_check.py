"""The GPU check (benchmarks/gpu_check.py) rehearsed on CPU: its --dry-run runs every stage
(interpreter, tiny shapes) and leaves the same files as on the GPU, so a typo or a missing
import cannot waste the GPU machine's few minutes. Also: a stage past its time box is killed,
recorded, and the next stage runs; the budget skips what no longer fits; a killed run leaves
its answers; the JSON lines, the summary, the pytest log parsing and the pytest plugin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

from fastlm.bench import report  # noqa: E402

FILES = {"results.jsonl", "summary.md", "logs.tar.gz", "bench.tar.gz"}
PASSING = {"ok", "refused"}


def _env() -> dict:
    # The check sets what its stages need; the test process's own settings must not leak in.
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLM_POISON")}


def _run(tmp: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp / "out"),
           "--work", str(tmp / "work"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    start = time.monotonic()
    proc = _run(tmp, "--dry-run")
    return tmp / "out", proc, time.monotonic() - start


def test_dry_run_runs_every_stage_and_leaves_the_gpu_runs_files(dry_run):
    out, proc, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES  # the device tool returns at most 8 files
    lines = _lines(out)
    assert lines[0]["stage"] == "start" and lines[0]["dry_run"] is True
    assert lines[-1]["stage"] == "end" and lines[-1]["status"] == "ok"
    stages = {r["stage"]: r for r in lines[1:-1]}
    assert list(stages) == gpu_check.STAGES
    for name, rec in stages.items():
        allowed = PASSING | ({"skipped"} if name == "cuda-build" else set())  # no nvcc: skipped
        assert rec["status"] in allowed, rec
        assert set(rec) >= {"stage", "status", "seconds", "box_s", "rc", "log", "summary", "details"}
    device = stages["device"]["details"]
    assert device["env"]["torch"] and device["ceilings"]["copy_gbps"] > 0 and device["triton_jit"]["correct"]
    assert stages["correctness"]["details"]["counts"]["passed"] > 0
    for suite, _, _ in gpu_check.BENCH:
        assert stages[f"bench-{suite}"]["details"]["rows"] > 0, suite
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{s}.log" for s in ("device", "correctness", "cuda-tests", "memcheck")} <= names
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"bench/{suite}.json" for suite, _, _ in gpu_check.BENCH} <= names
    summary = (out / "summary.md").read_text()
    for name in gpu_check.STAGES:
        assert f"| {name} |" in summary
    assert "## Benchmarks" in summary and "## Ceilings" in summary
    assert proc.stdout.rstrip().splitlines()[-1].startswith("[gpu_check]")
    assert summary.splitlines()[2] in proc.stdout  # the summary is printed last


def test_collect_files_a_run_where_the_readme_report_reads_it(dry_run, tmp_path):
    out, proc, _ = dry_run
    assert proc.returncode == 0
    with pytest.raises(ValueError, match="dry run"):  # CPU figures must not pass for committed results
        gpu_check.collect(out, tmp_path / "benchmarks" / "results")
    dest = gpu_check.collect(out, tmp_path / "benchmarks" / "results", dry_ok=True)
    assert dest.name.endswith("-dry-run-" + _lines(out)[0]["date"][:10])
    assert {"results.jsonl", "summary.md", "logs.tar.gz", "bench"} <= {p.name for p in dest.iterdir()}
    docs = sorted((dest / "bench").glob("*.json"))
    assert {d.stem for d in docs} == {suite for suite, _, _ in gpu_check.BENCH}
    # A CPU run is never quoted; the same files from a GPU run are, as they are.
    assert "No GPU results" in report.readme_section(tmp_path / "benchmarks" / "results")
    for doc_path in docs:
        doc = json.loads(doc_path.read_text())
        doc["environment"].update(device_type="cuda", device="NVIDIA H200")
        doc_path.write_text(json.dumps(doc))
    section = report.readme_section(tmp_path / "benchmarks" / "results")
    assert "### NVIDIA H200" in section and f"{dest.name}/bench/attention.json" in section


def test_a_stage_past_its_time_box_is_killed_recorded_and_the_next_stage_runs(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--stages", "correctness", "cuda-tests", "--box", "correctness=6")
    assert proc.returncode == 1, proc.stdout[-3000:]
    lines = _lines(tmp_path / "out")
    stages = {r["stage"]: r for r in lines}
    assert stages["correctness"]["status"] == "timeout" and stages["correctness"]["box_s"] == 6
    assert stages["correctness"]["seconds"] < 30  # killed, process group and all
    assert stages["cuda-tests"]["status"] == "ok"
    assert lines[-1] == {**lines[-1], "stage": "end", "status": "failed", "failed_stages": ["correctness"]}
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        log = tar.extractfile("logs/correctness.log").read().decode()
    assert "killed after" in log and "time box 6s" in log
    assert "| correctness | timeout |" in (tmp_path / "out" / "summary.md").read_text()


def test_the_budget_skips_the_stages_that_no_longer_fit(tmp_path):
    # The dry run's correctness stage takes half a minute: the budget ends inside it.
    proc = _run(tmp_path, "--dry-run", "--stages", "correctness", "cuda-tests", "bench-rope", "--budget", "9")
    assert proc.returncode == 1
    stages = {r["stage"]: r for r in _lines(tmp_path / "out")}
    assert stages["correctness"]["status"] == "timeout" and stages["correctness"]["box_s"] <= 9
    assert stages["cuda-tests"]["status"] == "skipped" and stages["bench-rope"]["status"] == "skipped"
    assert "no time left" in stages["bench-rope"]["summary"]


def test_a_killed_run_leaves_what_it_had(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--dry-run", "--stages", "device", "correctness"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the device stage is recorded
        path = tmp_path / "out" / "results.jsonl"
        if path.exists() and '"stage": "device"' in path.read_text():
            break
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    lines = _lines(tmp_path / "out")
    assert [r["stage"] for r in lines] == ["start", "device", "correctness", "end"]
    assert lines[2]["status"] == "killed" and lines[-1]["status"] == "killed"
    assert "| correctness | killed |" in (tmp_path / "out" / "summary.md").read_text()


XDIST_LOG = """\
16 workers [9 items]
[gw0] [ 10%] PASSED tests/test_norm.py::test_widths[triton-rms-17]
[gw1] [ 20%] FAILED tests/test_attention.py::test_fwd[128-8192]
[gw2] [ 30%] SKIPPED tests/test_rotary.py::test_x
[gw3] [ 40%] ERROR tests/test_ffn.py::test_y
FAILED tests/test_attention.py::test_fwd[128-8192] - AssertionError: max abs diff 0.3
FAILED tests/test_ce.py::test_hang - Failed: Timeout >60.0s
ERROR tests/test_ffn.py::test_y - RuntimeError: CUDA error
======= 2 failed, 1 passed, 1 skipped, 1 error in 12.34s =======
"""


def test_parse_pytest_log_lists_failures_by_name_with_their_reasons():
    parsed = gpu_check.parse_pytest_log(XDIST_LOG)
    assert parsed["finished"]
    assert parsed["counts"] == {"failed": 2, "passed": 1, "skipped": 1, "errors": 1}
    assert parsed["failures"] == ["tests/test_attention.py::test_fwd[128-8192]", "tests/test_ce.py::test_hang",
                                  "tests/test_ffn.py::test_y"]
    assert parsed["failure_reasons"]["tests/test_attention.py::test_fwd[128-8192]"].startswith("AssertionError")
    assert parsed["timeouts"] == ["tests/test_ce.py::test_hang"]


def test_parse_pytest_log_of_a_killed_run_counts_the_tests_that_ended():
    text = "\n".join(XDIST_LOG.splitlines()[:5]) + "\ntests/test_norm.py::test_a PASSED   [ 50%]\n" \
                                                   "tests/test_norm.py::test_b FAILED   [ 60%]\n"
    parsed = gpu_check.parse_pytest_log(text)
    assert not parsed["finished"]
    assert parsed["counts"] == {"passed": 2, "failed": 2, "skipped": 1, "errors": 1}
    assert parsed["collected"] == 9 and parsed["not_run"] == 3
    assert "tests/test_norm.py::test_b" in parsed["failures"]


def test_summary_table_lists_stages_failures_and_speedups(tmp_path):
    records = [
        {"stage": "correctness", "status": "failed", "seconds": 99.4, "box_s": 170, "summary": "1 failed",
         "details": {"failures": ["tests/a.py::t"], "failure_reasons": {"tests/a.py::t": "boom"}}},
        {"stage": "bench-ce", "status": "ok", "seconds": 20, "box_s": 35, "summary": "3 rows",
         "details": {"headline": [{"case": "cross_entropy fwd 4096 128256",
                                   "ms": {"fastlm-triton": 0.5, "torch-eager": 2.0, "torch-compile": 1.0,
                                          "liger": 0.6}}]}},
    ]
    text = gpu_check.summary_markdown(records, None, dry=False)
    assert "| correctness | failed | 99 | 170 | 1 failed |" in text
    assert "- correctness: `tests/a.py::t` -- boom" in text
    assert "| ce | cross_entropy fwd 4096 128256 | 0.5 | 4.00x | 2.00x |" in text and "liger 0.6" in text


def _pytest(tmp_path, *args):
    env = dict(_env(), PYTHONPATH=str(REPO / "benchmarks"), TRITON_INTERPRET="1")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "gpu_check_plugin",
                           "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_plugin_fails_a_test_past_its_timeout_by_name_and_runs_gpu_tests_first(tmp_path):
    (tmp_path / "test_t.py").write_text(
        "import time, pytest\nfrom hypothesis import given, settings, strategies as st\n"
        "@given(st.integers())\n@settings(max_examples=2)\ndef test_property(n):\n    pass\n"
        "def test_slow():\n    time.sleep(30)\n"
        "def test_quick():\n    pass\n"
        "@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n")
    start = time.monotonic()
    out = _pytest(tmp_path, "test_t.py", "--gpu-check-timeout", "1")
    assert time.monotonic() - start < 25
    assert out.returncode == 1
    parsed = gpu_check.parse_pytest_log(out.stdout)
    assert parsed["failures"] == ["test_t.py::test_slow"] and parsed["counts"] == {"failed": 1, "passed": 3}
    assert "ran longer than 1s" in out.stdout
    order = [line.split("::")[1].split()[0] for line in out.stdout.splitlines() if line.startswith("test_t.py::")]
    assert order == ["test_on_gpu", "test_slow", "test_quick", "test_property"]


def test_gpu_check_sh_is_the_entry_point(tmp_path):
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--list"], capture_output=True,
                         text=True, env=dict(_env(), PYTHON=sys.executable), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bench-attention" in out.stdout and "budget 450s" in out.stdout


def test_the_plan_fits_eight_minutes():
    assert gpu_check.DEFAULT_BUDGET <= 8 * 60 - 20
    assert [s for s, _, _ in gpu_check.BENCH][:2] == ["attention", "lce"]
    assert gpu_check.STAGES[:2] == ["device", "correctness"]


def test_every_gpu_bench_command_parses_and_names_real_ops():
    """The GPU's benchmark arguments never run on CPU: check them here, as fastlm.bench reads them."""
    from fastlm.bench import build_parser, model, norm, overhead  # noqa: F401

    for suite, args, box in gpu_check.BENCH:
        parsed = build_parser().parse_args([suite, *gpu_check.COMMON_GPU, *args])
        assert parsed.suite == [suite] and box > 0
        if suite == "norm":
            assert set(parsed.ops) <= set(norm.OPS)
        if suite == "model":
            assert set(parsed.ops) <= set(model.GPU_MODELS) and parsed.reps == 10
        if suite == "overhead":
            assert parsed.ops == ["tiny"]


def test_correctness_leaves_out_only_files_that_exist():
    for name in gpu_check.NOT_OP_TESTS:
        assert (REPO / "tests" / name).exists(), name


def test_a_bug_in_a_stage_is_recorded_and_the_next_stage_runs(tmp_path, monkeypatch):
    def broken(check):
        raise KeyError("a typo in gpu_check")

    monkeypatch.setattr(gpu_check, "stage_device", broken)
    args = gpu_check.argparse.Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "work"), dry_run=True,
                                        budget=300.0, stages=["device", "cuda-tests"])
    monkeypatch.setattr(gpu_check.signal, "signal", lambda *a: None)  # leave pytest's handlers alone
    monkeypatch.setattr(gpu_check, "install_liger", lambda check: {})
    assert gpu_check.run(args) == 1
    stages = {r["stage"]: r for r in _lines(tmp_path / "out")}
    assert stages["device"]["status"] == "error" and "KeyError" in stages["device"]["summary"]
    assert stages["cuda-tests"]["status"] == "ok" and stages["end"]["failed_stages"] == ["device"]


def test_plugin_counts_the_kernel_specialisations_a_gpu_would_compile(tmp_path):
    (tmp_path / "test_k.py").write_text(
        "import torch, triton, triton.language as tl\n"
        "@triton.jit\n"
        "def _copy(x, y, n, BLOCK: tl.constexpr):\n"
        "    o = tl.arange(0, BLOCK)\n"
        "    tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)\n"
        "def test_launches():\n"
        "    for n, block in ((16, 16), (32, 16), (5, 16), (5, 32)):\n"  # 16, 32: one key; 5: another
        "        x = torch.randn(n)\n"
        "        _copy[(1,)](x, torch.empty_like(x), n, BLOCK=block)\n")
    out = _pytest(tmp_path, "test_k.py", "--gpu-check-count-compiles", str(tmp_path / "count.json"))
    assert out.returncode == 0, out.stdout[-3000:]
    counted = json.loads((tmp_path / "count.json").read_text())
    assert counted["specialisations"] == 3 and counted["per_kernel"] == {"test_k._copy": 3}


def test_headline_keeps_ignored_fractions_apart():
    """The lce suite times each shape at 0% and 85% ignored targets: two headline cases,
    not one overwritten by the other."""
    rows = [{"op": "linear_cross_entropy", "mode": "fwd+bwd", "rows": 8192, "width": 128256, "hidden": 4096,
             "impl": "fastlm-triton", "ms": ms, "ignored": ignored} for ms, ignored in ((10.0, 0.0), (2.0, 0.85))]
    cases = gpu_check.headline("lce", rows)
    assert [c["case"] for c in cases] == ["linear_cross_entropy fwd+bwd 8192 128256 4096",
                                          "linear_cross_entropy fwd+bwd 8192 128256 4096 ign85%"]
    assert [c["ms"]["fastlm-triton"] for c in cases] == [10.0, 2.0]
