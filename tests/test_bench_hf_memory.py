"""python -m fastlm.bench.hf_memory at a tiny size: each variant's training step in its own
process, the table's shape, and the patched steps' losses equal to the unpatched one."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from fastlm.bench import hf_memory  # noqa: E402


def test_hf_memory_tiny(tmp_path):
    argv = ["--out", str(tmp_path), "--vocab", "4096", "--seq", "256", "--hidden", "64", "--layers", "1",
            "--device", "cpu", "--timeout", "300"]
    assert hf_memory.main(argv) == 0
    doc = json.loads((tmp_path / "hf_memory.json").read_text())
    rows = doc["rows"]
    assert [r["variant"] for r in rows] == list(hf_memory.VARIANTS)
    assert doc["settings"]["vocab"] == 4096 and doc["settings"]["seq"] == 256
    by = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["peak_mib"] > 0 and 0 <= r["step_mib"] <= r["peak_mib"], r
        assert r["grad_norm"] is not None and r["grad_norm"] > 0, r
    # the same seed, the same weights and tokens: the same loss and gradients, to rounding
    base = by["unpatched"]
    for name in ("patched", "fused"):
        assert by[name]["loss"] == pytest.approx(base["loss"], rel=1e-4), name
        assert by[name]["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-3), name
    assert base["logits_formed"] and by["patched"]["logits_formed"] and not by["fused"]["logits_formed"]
    assert doc["goal"]["loss_rel_diff"] <= doc["goal"]["loss_rtol"]
    table = (tmp_path / "hf_memory.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(rows)  # header, rule, a row per variant
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "Goal (fastlm issue 21)" in table


def test_hf_memory_child_failure_is_reported(tmp_path):
    # A vocabulary of 0 never reaches a child; a bad spec in a child comes back as a note.
    assert hf_memory.main(["--out", str(tmp_path), "--vocab", "0"]) == 2
    with pytest.raises(RuntimeError, match="the fused step failed"):
        hf_memory.measure("fused", {"vocab": 16, "hidden": 64, "layers": 1, "seq": 8, "batch": 1, "seed": 0,
                                    "device": "no-such-device"}, timeout=120)
