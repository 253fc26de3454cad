"""mypy over every package (STYLE.md §13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["storage", "services_registry", "dcmflow", "receiver", "flows", "tasks", "deployments"]


def test_mypy_is_clean() -> None:
    # follow_imports=silent: report only the packages listed, not the ones they import.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", *CHECKED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
