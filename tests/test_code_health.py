"""The code-health gate: ruff and mypy, configured in pyproject.toml, report nothing.

Unit tier: no process but the two checkers. mypy keeps its cache in .mypy_cache (a warm run is
about a second; a cold one, as on a fresh CI checkout, is what the README's test table reports)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # ruff and mypy run as processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _check(args: list[str]) -> None:
    tool = BIN / args[0]
    if not tool.exists():
        pytest.fail(f"{args[0]} is not installed beside {sys.executable}: pip install -e '.[test]'")
    res = subprocess.run([str(tool), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(args)} found:\n{res.stdout}{res.stderr}"


def test_ruff_finds_nothing():
    _check(["ruff", "check", "--no-cache", "src", "tests", "benchmarks"])


def test_mypy_finds_nothing():
    _check(["mypy"])  # files and options: [tool.mypy] in pyproject.toml
