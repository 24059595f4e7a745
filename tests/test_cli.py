"""The README's main job, ``fastlm check``, and the command-line entry point."""

import subprocess
import sys

from fastlm import check, cli


def test_check_quick_passes_and_prints_the_table(capsys):
    assert check.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm" in out and "add_rms_norm" in out and " 0 failed" in out
    assert "cross_entropy" in out and "flash_attn causal" in out and "sdpa masked" in out


def test_cli_help_and_unknown_command(capsys):
    assert cli.main([]) == 0
    assert "fastlm check" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2


def test_python_dash_m_fastlm_runs():
    out = subprocess.run([sys.executable, "-m", "fastlm", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fastlm check" in out.stdout
