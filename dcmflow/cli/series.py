"""``dcmflow series``: what arrived, per series.

Wiring in ``dcmflow/cli/__init__.py``::

    from dcmflow.cli import series
    app.add_typer(series.app, name="series")
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

import typer

from dcmflow.cli._common import load_settings, open_repository
from dcmflow.cli._output import emit, emit_one, fail

if TYPE_CHECKING:
    from storage.models import SeriesPublic
    from storage.repository import Repository

__all__ = ["app", "list_series", "show_series"]

app = typer.Typer(help="Series that arrived: UIDs, patient, state, revision.", no_args_is_help=True)

_COLUMNS = [  # the table; --json carries every field (study UID, patient name, expected count, …)
    "series_uid",
    "patient_id",
    "modality",
    "description",
    "instance_count",
    "state",
    "revision",
    "last_received_at",
]


class State(str, Enum):
    """Completeness states a listing can filter on."""

    receiving = "receiving"
    stable = "stable"


def _rows(repository: Repository, series: list[SeriesPublic]) -> list[dict[str, Any]]:
    """``SeriesPublic`` plus the patient's DICOM ID and name (from its study's patient)."""
    patients: dict[str, tuple[str, str]] = {}
    rows = []
    for s in series:
        if s.study_uid not in patients:
            study = repository.get_study(s.study_uid)
            patient = repository.get_patient(study.patient_id) if study is not None else None
            patients[s.study_uid] = (patient.patient_id, patient.name) if patient is not None else ("", "")
        patient_id, patient_name = patients[s.study_uid]
        rows.append({**s.model_dump(mode="json"), "patient_id": patient_id, "patient_name": patient_name})
    return rows


@app.command("list")
def list_series(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="At most this many series, most recent first."),
    state: State | None = typer.Option(None, "--state", help="Only series in this state."),
) -> None:
    """List series, most recently received first.

    Examples:

        dcmflow series list

        dcmflow series list --state stable -n 50 --json
    """
    from storage.errors import StorageError

    repository = open_repository(load_settings())
    try:
        found = repository.list_series(limit=limit, state=state.value if state is not None else None)
        rows = _rows(repository, found)
    except StorageError as exc:
        fail(str(exc))
    emit(rows, as_json, columns=_COLUMNS)


@app.command("show")
def show_series(
    uid: str = typer.Argument(..., help="Series Instance UID."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Show one series: UIDs, patient, modality, description, counts, state, revision, times.

    Examples:

        dcmflow series show 1.2.840.113619.2.55.3.1234
    """
    from storage.errors import StorageError
    from storage.keys import is_valid_uid

    if not is_valid_uid(uid):
        fail(f"not a DICOM UID: {uid!r} (digits and dots, at most 64 characters)")
    repository = open_repository(load_settings())
    try:
        found = repository.get_series(uid)
        if found is None:
            fail(f"no series {uid}")
        row = _rows(repository, [found])[0]
    except StorageError as exc:
        fail(str(exc))
    emit_one(row, as_json, title=f"series {uid}")
