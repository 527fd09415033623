"""The code base stays lint-clean (ruff, configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            *[d for d in ("src", "tests", "bench") if (ROOT / d).is_dir()],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
