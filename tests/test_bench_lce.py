"""The "lce" suite's ignored-targets setting (fastlm/bench/ce.py run_lce): rows per fraction of
ignored targets, each row's time over the fraction-0 row's, TFLOP/s over the counted rows; the
--ignored option; the report keeping the fractions apart. End to end through fastlm.bench.main
on the tiny CPU shape."""

import json
import math

import pytest
import torch

from fastlm.bench import build_parser
from fastlm.bench import ce as ce_bench
from fastlm.bench import main, report, runner


@pytest.mark.parametrize("rows", [1, 17, 256])
def test_ignored_targets(rows):
    vocab = 113
    by_fraction = {f: ce_bench.ignored_targets(rows, vocab, f, "cpu") for f in (0.0, 0.3, 0.85)}
    base = by_fraction[0.0]
    assert (base >= 0).all() and (base < vocab).all()
    previous = torch.zeros(rows, dtype=torch.bool)
    for f, t in by_fraction.items():
        ignored = t == -100
        assert int(ignored.sum()) == round(f * rows)
        assert torch.equal(t[~ignored], base[~ignored])      # only the ignoring differs
        assert (ignored | ~previous).all()                    # a larger fraction ignores a superset
        previous = ignored
        assert torch.equal(t, ce_bench.ignored_targets(rows, vocab, f, "cpu"))  # a fixed seed
    if rows >= 17:  # random positions, not the first rows
        assert not torch.equal(by_fraction[0.3][: round(0.3 * rows)], torch.full((round(0.3 * rows),), -100))


def _run(tmp_path, *args):
    # On CPU wherever it runs (the GPU's correctness stage too): the tiny shape, no compile.
    assert main(["lce", "--quick", "--device", "cpu", "--compile", "off", "--out", str(tmp_path), *args]) == 0
    doc = json.loads((tmp_path / "lce.json").read_text())
    assert not [n for n in doc["notes"] if "failed" in n or "differs" in n or "stopped" in n], doc["notes"]
    return doc, (tmp_path / "lce.md").read_text()


def test_default_fractions_and_ratios(tmp_path):
    doc, table = _run(tmp_path)
    rows = doc["rows"]
    tokens, hidden, vocab = ce_bench.CPU_LCE[0]
    assert {r["ignored"] for r in rows} == set(ce_bench.LCE_IGNORED) == {0.0, 0.85}
    impls = {r["impl"] for r in rows}
    assert impls >= {"fastlm-torch", runner.EAGER}
    # every (impl, mode) has one row per fraction
    assert len(rows) == len(impls) * 2 * len(ce_bench.LCE_IGNORED)
    base = {(r["impl"], r["mode"]): r for r in rows if r["ignored"] == 0.0}
    for row in rows:
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["counted_rows"] == tokens - round(row["ignored"] * tokens)
        ratio = row["ms_vs_ignored0"]
        assert math.isfinite(ratio) and ratio > 0
        assert ratio == pytest.approx(row["ms"] / base[(row["impl"], row["mode"])]["ms"])
        if row["ignored"] == 0.0:
            assert ratio == 1.0
        flops = ce_bench.lce_flops(row["mode"], row["counted_rows"], hidden, vocab)
        assert row["tflops"] == pytest.approx(flops / (row["ms"] * 1e-3) / 1e12) and row["tflops"] > 0
    assert any("counted rows only" in n for n in doc["notes"])
    header = next(line for line in table.splitlines() if line.startswith("| op |"))
    assert "| ignored |" in header and "| ms / ms at 0% ignored |" in header
    assert "| 85% |" in table and "| 0% |" in table


def test_chosen_fractions(tmp_path):
    doc, _ = _run(tmp_path, "--ignored", "0", "0.5", "0.5", "0.9", "--modes", "fwd")
    rows = doc["rows"]
    assert [r["ignored"] for r in rows if r["impl"] == runner.EAGER] == [0.0, 0.5, 0.9]  # duplicates dropped
    assert all(r["ms_vs_ignored0"] > 0 for r in rows)


def test_without_fraction_zero_no_ratio(tmp_path):
    doc, table = _run(tmp_path, "--ignored", "0.5", "--modes", "fwd")
    assert {r["ignored"] for r in doc["rows"]} == {0.5}
    assert all(r["ms_vs_ignored0"] is None for r in doc["rows"])
    assert any("0 is not among the ignored fractions" in n for n in doc["notes"])
    header = next(line for line in table.splitlines() if line.startswith("| op |"))
    assert "| ignored |" in header and "ms / ms at 0% ignored" not in header  # a column no row fills is left out


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1", "x"])
def test_ignored_option_rejects_non_fractions(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lce", "--ignored", bad])
    assert "--ignored" in capsys.readouterr().err


def test_report_keeps_fractions_apart():
    """Rows that differ only in the fraction are different cases in comparisons and plots."""
    rows = [{"op": "linear_cross_entropy", "mode": "fwd", "impl": "x", "rows": 8, "width": 10, "hidden": 4,
             "dtype": "fp32", "ignored": f, "ms": ms} for f, ms in ((0.0, 2.0), (0.85, 1.0))]
    assert report.case_label(rows[0]) != report.case_label(rows[1])
    table, faster, slower = report.compare({"rows": rows}, [dict(rows[0], ms=1.0), dict(rows[1], ms=2.0)])
    assert (faster, slower) == (1, 1), table
