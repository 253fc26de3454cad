"""``import_folder``: import a folder of DICOM files as a flow, so the UI can start it.

The import itself belongs to ``receiver/`` (``receiver.importer``, behind ``dcmflow import``),
which ``flows`` may not import (DESIGN.md: ``dcmflow → flows → tasks``; ``receiver`` is a
sibling). The flow therefore runs the ``dcmflow import PATH`` command in a child process,
streams its output to the run log, and fails when it fails. The received series then go
through completeness and events like any C-STORE, which start ``process_series``.
"""

from __future__ import annotations

import subprocess
import sys

from prefect import flow, get_run_logger

__all__ = ["import_folder", "IMPORT_COMMAND"]

IMPORT_COMMAND = [sys.executable, "-c", "from dcmflow.cli import main; main()", "import"]
"""``dcmflow import`` with this interpreter (no reliance on PATH)."""


@flow(name="import-folder", flow_run_name="import {path}")
def import_folder(path: str) -> int:
    """Import every DICOM file under ``path`` (``dcmflow import PATH``).

    Args:
        path: A file or folder on the machine that runs the flow; every DICOM file under it
            is imported, then goes through completeness and its triggers like any C-STORE.

    Returns
    -------
    int
        The command's exit code (0); a non-zero code fails the flow run.

    Raises
    ------
    RuntimeError
        ``dcmflow import`` failed (its last output line is the message).
    """
    logger = get_run_logger()
    proc = subprocess.Popen([*IMPORT_COMMAND, path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.strip():
            last = line
        logger.info("%s", line)
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"dcmflow import {path} failed (exit code {code}): {last}")
    return code
