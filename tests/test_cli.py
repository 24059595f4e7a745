"""The README's two set-up commands, ``fastlm check``, and the command-line entry point."""

import re
import subprocess
import sys
from pathlib import Path

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


def test_readme_setup_commands_and_ci():
    """The README's set-up is two commands: the main job (fastlm train on its built-in default)
    and the tests, which .ci/run runs verbatim."""
    repo = Path(__file__).resolve().parent.parent
    section = (repo / "README.md").read_text().split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```\n(.*?)\n```", section, re.S)
    assert len(commands) == 2, commands
    main_job, tests = commands
    install = 'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '
    assert main_job == install + '".[train]" && .venv/bin/fastlm train'
    assert tests == install + '".[test]" && .venv/bin/python -m pytest'
    ci = (repo / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests
