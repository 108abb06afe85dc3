"""The command line: help works, unknown input fails without a traceback."""

import subprocess
import sys

from cryoflex.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    parser = build_parser()
    help_text = parser.format_help()
    assert "info" in help_text


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "usage" in capsys.readouterr().out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "cryoflex", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "cryoflex" in result.stdout
