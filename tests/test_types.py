"""mypy over every package (STYLE.md §13).

mypy takes 30-60 s of one core. When this test is collected, conftest starts it at collection
time (:func:`start_mypy`, at low priority), so it runs on the core the rest of the suite leaves
idle and the test only collects its verdict; run alone, the test starts it itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["storage", "services_registry", "dcmflow", "receiver", "flows", "tasks", "deployments"]

_mypy: tuple[subprocess.Popen[bytes], IO[bytes]] | None = None


def start_mypy() -> None:
    """Start the mypy run this test checks, once per session, in the background (niced)."""
    global _mypy
    if _mypy is not None:
        return
    output = tempfile.NamedTemporaryFile(prefix="mypy-", suffix=".log")
    # follow_imports=silent: report only the packages listed, not the ones they import.
    process = subprocess.Popen(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", *CHECKED],
        cwd=ROOT,
        stdout=output,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.nice(10),
    )
    _mypy = (process, output)


def stop_mypy() -> None:
    """Kill a mypy run nobody waited for (the session ended before this test)."""
    if _mypy is not None and _mypy[0].poll() is None:
        _mypy[0].kill()
        _mypy[0].wait()


def test_mypy_is_clean() -> None:
    start_mypy()
    assert _mypy is not None
    process, output = _mypy
    process.wait(timeout=600)
    output.seek(0)
    assert process.returncode == 0, output.read().decode(errors="replace")
