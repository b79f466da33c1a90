"""The `jetfed` command as a user meets it: a mistyped command or option is typer's usage
message and exit 2, never a traceback (run as a real subprocess, with the installed typer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: List[str]) -> subprocess.CompletedProcess[str]:
    """`jetfed ARGS`; an outer PYTHONPATH is kept, so another typer can be tried with it."""
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return subprocess.run(
        [sys.executable, "-m", "jetfed", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *python_path])),
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["demo", "--modle", "x"], "--modle"),
        (["demo", "--rounds", "x"], "--rounds"),
        (["nosuch"], "No such command 'nosuch'"),
        (["edge", "run", "--max-rounds"], "--max-rounds"),
    ],
    ids=["unknown-option", "bad-value", "unknown-command", "missing-value"],
)
def test_a_usage_mistake_is_the_usage_message_and_exit_2(args: List[str], named: str) -> None:
    result = run_cli(args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr
    assert named in result.stderr and len(result.stderr.splitlines()) <= 8, result.stderr
    assert result.stdout == ""


def test_an_uninstalled_model_is_one_line() -> None:
    """`--model` takes any Hugging Face id or folder: one that is not here is one line."""
    result = run_cli(["demo", "--model", "x"])
    assert result.returncode != 0, result.stderr
    assert result.stderr.startswith("jetfed: error: model 'x' is not installed")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_help_still_works() -> None:
    result = run_cli(["demo", "--help"])
    assert result.returncode == 0 and "--rounds" in result.stdout, result.stderr
