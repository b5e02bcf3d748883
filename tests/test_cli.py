"""The ``mlsde`` command end to end on a tiny setting."""

import json
import subprocess
import sys

import pytest

from multilevel_sde import __version__
from multilevel_sde.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 0 and "demo" in capsys.readouterr().out


def test_demo_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--k", "3", "--paths", "16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ML-EM" in printed and "EM, top level" in printed
    rows = json.loads(out.read_text())
    assert {r["method"].split(",")[0] for r in rows} == {"EM", "ML-EM"}
    assert all(r["rms_error"] > 0 and r["cost"] > 0 for r in rows)


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err


def test_console_script_module_entry():
    done = subprocess.run([sys.executable, "-m", "multilevel_sde.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and __version__ in done.stdout
