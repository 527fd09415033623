"""The code base stays lint-clean and formatted (ruff, configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = [d for d in ("src", "tests", "bench") if (ROOT / d).is_dir()]


@pytest.mark.parametrize(
    "command", [["check"], ["format", "--check"]], ids=["ruff check", "ruff format"]
)
def test_ruff_is_clean(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *FOLDERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
