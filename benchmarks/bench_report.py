"""The report side of the benchmarks: the README's performance section is what the committed
results generate (nothing typed by hand), comparisons between runs, and the plots."""

import json
from pathlib import Path

import pytest

from fastlm.bench import main, report

REPO = Path(__file__).resolve().parent.parent


def test_readme_performance_section_is_generated_from_committed_results():
    assert report.main(["--results", str(REPO / "benchmarks" / "results"), "--readme", str(REPO / "README.md"),
                        "--check"]) == 0, "run: python -m fastlm.bench.report"


def _row(impl, ms, **kw):
    row = {"op": "rotary", "mode": "fwd", "impl": impl, "rows": 4, "width": 4096, "hidden": 128, "heads": 32,
           "dtype": "bf16", "ms": ms, "gbps": 100.0 / ms, "frac_copy_bw": 0.03 / ms, "speedup_vs_eager": None}
    row.update(kw)
    return row


def _doc(device_type, rows, date="2026-11-20T10:00:00+00:00", device="NVIDIA H100 80GB HBM3"):
    return {"suite": "rope", "environment": {"device_type": device_type, "device": device, "date": date,
                                             "torch": "2.11.0", "triton": "3.6.0"},
            "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": 750.0, "matmul_dtype": "bf16"}, "rows": rows,
            "notes": []}


def test_section_lists_gpu_runs_newest_first_with_device_and_date(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    for name, doc in (("h100-a", _doc("cuda", [_row("fastlm-triton", 0.5), _row("torch-eager", 1.0)])),
                      ("h200-b", _doc("cuda", [_row("fastlm-triton", 0.25)], date="2026-11-24T10:00:00+00:00",
                                      device="NVIDIA H200")),
                      ("cpu-c", _doc("cpu", [_row("fastlm-torch", 9.0)]))):
        (results / name).mkdir(parents=True)
        (results / name / "rope.json").write_text(json.dumps(doc))
    section = report.readme_section(results)
    assert section.startswith(report.BEGIN) and section.endswith(report.END)
    h200, h100 = section.index("### NVIDIA H200, 2026-11-24"), section.index("### NVIDIA H100 80GB HBM3, 2026-11-20")
    assert h200 < h100
    assert "benchmarks/results/h100-a/rope.json" in section
    assert "fastlm-triton" in section and "fastlm-torch" not in section  # CPU runs are not quoted
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.BEGIN}\nstale figure 999 TFLOP/s\n{report.END}\n\nafter\n"
                      f"{report.LM_BEGIN}\n{report.LM_END}\n")
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro") and "\n\nafter\n" in text
    assert "No comparison is committed yet" in text
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0


def test_splice_needs_the_markers():
    with pytest.raises(ValueError, match="markers"):
        report.splice("no markers here", "x")


def test_compare_marks_what_got_faster_or_slower():
    old = _doc("cuda", [_row("fastlm-triton", 1.0), _row("torch-eager", 1.0), _row("torch-compile", 1.0)])
    new = [_row("fastlm-triton", 0.5), _row("torch-eager", 1.02), _row("torch-compile", 2.0),
           _row("fastlm-triton", 1.0, width=8192)]  # a case the old run did not time
    table, faster, slower = report.compare(old, new)
    assert (faster, slower) == (1, 1)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert any("fastlm-triton" in ln and "2.00x" in ln and "faster" in ln for ln in lines)
    assert any("torch-compile" in ln and "0.50x" in ln and "SLOWER" in ln for ln in lines)
    assert report.compare(old, [_row("x", 1.0)])[0].startswith("no case in common")


def test_bench_main_plots_and_compares(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["rope", "--quick", "--out", str(first)]) == 0
    png = first / "rope.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["rope", "--quick", "--out", str(second), "--compare", str(first)]) == 0
    out = capsys.readouterr().out
    assert "rope against" in out and "| rotary fwd 1x64 h32 | torch-eager |" in out


def test_lm_comparison_section_takes_the_newest_comparison(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    row = {"model": "gpt", "preset": "tiny", "parameters": 850000, "train_seconds": 200.0, "loss": 1.8,
           "perplexity": 6.05, "bits_per_byte": 2.6, "tokens": 65000}
    for name, date, ppl in (("old", "2026-11-01T00:00:00+00:00", 99.0), ("new", "2026-11-25T00:00:00+00:00", 6.05)):
        (results / name).mkdir(parents=True)
        doc = {"suite": "lm-comparison", "rows": [dict(row, perplexity=ppl)],
               "environment": {"device": "AMD EPYC", "device_type": "cpu", "cpu_count": 2, "date": date,
                               "torch": "2.13.0"}}
        (results / name / "comparison.json").write_text(json.dumps(doc))
    section = report.lm_section(results)
    assert section.startswith(report.LM_BEGIN) and section.endswith(report.LM_END)
    assert "2026-11-25" in section and "| Transformer (GPT) | tiny | 0.85M | 200 s | 1.800 | 6.05 | 2.600 |" in section
    assert "99.00" not in section and "benchmarks/results/new/comparison.json" in section
