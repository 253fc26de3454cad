"""What a running ``dcmflow up`` tells other commands: ``DCMFLOW_HOME/run/up.json``.

``dcmflow up`` writes it once the stack is serving and removes it when it stops; ``dcmflow
status`` and ``dcmflow demo`` read it to find the Prefect API, the UI and the DICOM port. A
file left behind by a ``kill -9`` names processes that are gone (or orphans that the next
``up`` stops): :func:`read_state` returns ``None`` when the ``up`` process it names is dead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from pydantic import BaseModel

from tasks.execution import pid_alive

__all__ = ["StackState", "state_path", "read_state", "read_state_file", "write_state", "clear_state"]


class StackState(BaseModel):
    """The running stack, as ``dcmflow up`` started it."""

    pid: int
    """The ``dcmflow up`` process."""
    api_url: str
    """Prefect API, e.g. ``http://127.0.0.1:4200/api``."""
    ui_url: str
    """Prefect UI, e.g. ``http://127.0.0.1:4200``."""
    ae_title: str
    dicom_host: str
    dicom_port: int
    home: str
    """Absolute ``DCMFLOW_HOME``."""
    database: str
    """The records database, as printed (no password)."""
    objects: str
    """Where objects live (a folder or ``s3://endpoint/bucket``)."""
    started_at: dt.datetime
    server_pid: int | None = None
    """The Prefect server that ``up`` started (its own process group), or None for an external one."""
    runner_pids: list[int] = []
    """The processes serving the deployments, one per work queue (none with a work pool)."""
    work_pool: str | None = None
    """The process work pool the flows run on (``DCMFLOW_WORK_POOL``), or None when served here."""


def state_path(home: Path) -> Path:
    """``<home>/run/up.json``."""
    return home / "run" / "up.json"


def read_state_file(home: Path) -> StackState | None:
    """The state file as written, whether or not its processes still run (None if absent or unreadable)."""
    path = state_path(home)
    try:
        return StackState.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def read_state(home: Path) -> StackState | None:
    """The running stack, or None when no ``dcmflow up`` is running for this home."""
    state = read_state_file(home)
    if state is None or not pid_alive(state.pid):
        return None
    return state


def write_state(home: Path, state: StackState) -> None:
    """Write the state file atomically (readers never see half a file)."""
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, path)


def clear_state(home: Path) -> None:
    """Remove the state file (a stopped stack)."""
    state_path(home).unlink(missing_ok=True)
