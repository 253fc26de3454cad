"""Events: the pure builders, and the Prefect emitter against a real ``prefect server start``.

The real Prefect server is the session-wide ``prefect_server`` fixture of tests/conftest.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.completeness import CompletenessMonitor, MonitorOptions
from receiver.events import (
    MAX_RELATED_SERIES,
    SERIES_STABLE,
    STUDY_RECEIVED,
    STUDY_STABLE,
    PrefectEmitter,
    StudySeen,
    event_id,
    series_stable_event,
    study_received_event,
    study_stable_event,
)
from storage.db import create_engine, upgrade
from storage.repository import InstanceIn, Repository, SeriesClaim, StudyClaim

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.88.1", "1.2.826.0.1.3680043.8.498.88.1.1"


def series_claim(revision: int = 1, uid: str = SERIES, **kw: Any) -> SeriesClaim:
    values: dict[str, Any] = dict(
        series_uid=uid,
        study_uid=STUDY,
        patient_id="PAT-9",
        modality="MR",
        description="T1 sag",
        revision=revision,
        instance_count=40,
        expected_instance_count=None,
        calling_ae="SCANNER1",
        first_received_at=NOW - dt.timedelta(seconds=90),
        last_received_at=NOW - dt.timedelta(seconds=61),
        stable_at=NOW,
        reason="quiet",
    )
    values.update(kw)
    return SeriesClaim(**values)


# --------------------------------------------------------------------------- pure builders


def test_series_event_resource_labels_related_and_payload() -> None:
    spec = series_stable_event(series_claim())
    assert spec.event == SERIES_STABLE
    assert spec.resource_id == f"dicom.series.{SERIES}"
    assert spec.resource["dicom.study-uid"] == STUDY
    assert spec.resource["dicom.patient-id"] == "PAT-9"
    assert spec.resource["dicom.modality"] == "MR"
    assert spec.resource["dicom.revision"] == "1"
    assert all(isinstance(v, str) for v in spec.resource.values())  # Prefect labels are strings
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in spec.related}
    assert roles == {"study": f"dicom.study.{STUDY}", "patient": "dicom.patient.PAT-9"}
    assert spec.payload["series_uid"] == SERIES and spec.payload["study_uid"] == STUDY
    assert spec.payload["revision"] == 1 and spec.payload["instance_count"] == 40
    assert spec.payload["calling_ae"] == "SCANNER1"
    assert "added_sop_uids" not in spec.payload
    assert spec.occurred == NOW


def test_event_ids_are_deterministic_per_event_resource_and_revision() -> None:
    a, b = series_stable_event(series_claim()), series_stable_event(series_claim(instance_count=41))
    assert a.id == b.id == event_id(SERIES_STABLE, f"dicom.series.{SERIES}", 1)
    assert series_stable_event(series_claim(revision=2)).id != a.id
    assert event_id(STUDY_STABLE, f"dicom.study.{STUDY}", 1) != event_id(STUDY_RECEIVED, f"dicom.study.{STUDY}", 1)
    assert a.id.version == 5


def test_revision_two_lists_what_was_added() -> None:
    added = [f"{SERIES}.{i}" for i in range(600)]
    spec = series_stable_event(series_claim(revision=2), added_instance_count=600, added_sop_uids=added)
    assert spec.payload["added_instance_count"] == 600
    assert len(spec.payload["added_sop_uids"]) == 500 and spec.payload["added_sop_uids_truncated"] is True
    assert spec.resource["dicom.revision"] == "2"


def test_revision_two_takes_what_was_added_from_the_claim() -> None:
    listed = tuple(f"{SERIES}.{i}" for i in range(3))
    spec = series_stable_event(
        series_claim(revision=2, added_instance_count=4, added_sop_uids=listed, added_sop_uids_truncated=True)
    )
    assert spec.payload["added_instance_count"] == 4
    assert spec.payload["added_sop_uids"] == list(listed) and spec.payload["added_sop_uids_truncated"] is True
    first = series_stable_event(series_claim(added_instance_count=38))  # versions counted by the repository
    assert first.payload["added_instance_count"] == 38 and "added_sop_uids" not in first.payload
    assert series_stable_event(series_claim()).payload["added_instance_count"] == 40  # no count: instance_count


def test_study_events() -> None:
    uids = tuple(f"{STUDY}.{i}" for i in range(MAX_RELATED_SERIES + 10))
    claim = StudyClaim(
        study_uid=STUDY, patient_id="", revision=3, series_uids=uids, instance_count=99, modalities="CT\\MR", stable_at=NOW
    )
    spec = study_stable_event(claim, calling_ae="PACS", series_revisions={uids[0]: 3})
    assert spec.resource_id == f"dicom.study.{STUDY}" and spec.resource["dicom.revision"] == "3"
    assert spec.payload["modalities"] == ["CT", "MR"] and spec.payload["series_count"] == len(uids)
    assert spec.payload["series_revisions"] == {uids[0]: 3}
    assert [r["prefect.resource.role"] for r in spec.related] == ["series"] * MAX_RELATED_SERIES  # no patient ID
    received = study_received_event(
        StudySeen(
            study_uid=STUDY, patient_id="P", modalities="CT", description="", calling_ae="X", first_received_at=NOW
        )
    )
    assert received.event == STUDY_RECEIVED and received.payload["revision"] == 1
    assert received.id == event_id(STUDY_RECEIVED, f"dicom.study.{STUDY}", 1)


def test_emitter_without_an_api_url_refuses_without_starting_a_server(caplog: pytest.LogCaptureFixture) -> None:
    emitter = PrefectEmitter()
    if emitter.enabled:
        pytest.skip("a Prefect API URL is configured in this environment")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="receiver.events"):
        assert emitter.emit(series_stable_event(series_claim())) is False
        assert emitter.emit(series_stable_event(series_claim(revision=2))) is False
        assert emitter.flush() is False
    assert time.monotonic() - started < 2  # no ephemeral Prefect server was started
    assert len([r for r in caplog.records if "no Prefect API URL" in r.getMessage()]) == 1
    emitter.close()


# --------------------------------------------------------------------------- real Prefect server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prefect_api_url(prefect_server: Any) -> str:
    """The session's real Prefect server (tests/conftest.py)."""
    return str(prefect_server.api_url)


def read_events(url: str, resource_ids: list[str], *, expect: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Events stored by the server for these resources (polls: the server persists in batches)."""
    body = {
        "filter": {
            "occurred": {
                "since": (NOW - dt.timedelta(days=1)).isoformat(),
                "until": (NOW + dt.timedelta(days=1)).isoformat(),
            },
            "any_resource": {"id": resource_ids},
            "event": {"prefix": ["dicom."]},
        },
        "limit": 50,
    }
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{url}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        events: list[dict[str, Any]] = response.json()["events"]
        if len(events) >= expect or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_prefect_stores_each_event_once_with_labels_and_payload(prefect_api_url: str) -> None:
    series_uid = f"{SERIES}.{uuid.uuid4().int % 10**9}"
    spec = series_stable_event(series_claim(uid=series_uid))
    emitter = PrefectEmitter(prefect_api_url)
    try:
        assert emitter.emit(spec) and emitter.emit(spec)  # queued once
        assert emitter.flush() is True
        assert emitter.emit(spec)  # a re-send after a crash: same id, sent again
        assert emitter.flush() is True
    finally:
        emitter.close()
    time.sleep(3)  # give a (wrong) duplicate time to be persisted too
    events = read_events(prefect_api_url, [spec.resource_id], expect=1)
    assert len(events) == 1, events
    (got,) = events
    assert got["id"] == str(spec.id)
    assert got["event"] == SERIES_STABLE
    assert got["resource"] == spec.resource
    assert {r["prefect.resource.role"]: r["prefect.resource.id"] for r in got["related"]} == {
        "study": f"dicom.study.{STUDY}",
        "patient": "dicom.patient.PAT-9",
    }
    assert got["payload"] == spec.payload


def test_monitor_emits_to_prefect_once_across_restarts(prefect_api_url: str, tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'dcmflow.db'}")
    upgrade(engine)
    repo = Repository(engine)
    study = f"{STUDY}.{uuid.uuid4().int % 10**9}"
    series = f"{study}.1"
    t0 = dt.datetime.now(dt.UTC)
    repo.record_instances(
        [
            InstanceIn(
                study_uid=study,
                series_uid=series,
                sop_uid=f"{series}.{i}",
                sha256=f"{i:064x}",
                size=10,
                object_key=f"instances/{study}/{series}/{series}.{i}.dcm",
                received_at=t0,
                calling_ae="SCANNER1",
                patient_id="PAT-9",
                modality="CT",
            )
            for i in range(1, 4)
        ]
    )

    class KilledBeforeMark(PrefectEmitter):
        """Sends for real, then the process "dies" before the monitor can mark the series."""

        sent_series = False

        def emit(self, spec: Any) -> bool:
            self.sent_series |= spec.event == SERIES_STABLE
            return super().emit(spec)

        def flush(self, timeout: float = 10.0) -> bool:
            sent = super().flush(timeout)
            if self.sent_series:
                raise SystemExit("killed between emit and mark")
            return sent

    first = KilledBeforeMark(prefect_api_url)
    try:
        with pytest.raises(SystemExit):
            CompletenessMonitor(repo, first, MonitorOptions(stable_age=1), claimer="rx-a").tick(t0 + dt.timedelta(seconds=2))
    finally:
        first.close()
    assert repo.get_series(series).emitted_revision is None  # type: ignore[union-attr]

    second = PrefectEmitter(prefect_api_url)
    try:
        report = CompletenessMonitor(repo, second, MonitorOptions(stable_age=1), claimer="rx-b").tick(
            t0 + dt.timedelta(seconds=120)
        )
    finally:
        second.close()
    assert [e.event for e in report.recovered].count(SERIES_STABLE) == 1
    assert repo.get_series(series).emitted_revision == 1  # type: ignore[union-attr]

    ids = [f"dicom.series.{series}", f"dicom.study.{study}"]
    time.sleep(3)
    events = read_events(prefect_api_url, ids, expect=3)
    assert sorted(e["event"] for e in events) == [SERIES_STABLE, STUDY_RECEIVED, STUDY_STABLE], events
    assert len({e["id"] for e in events}) == 3


def test_unreachable_server_is_reported_by_flush(caplog: pytest.LogCaptureFixture) -> None:
    emitter = PrefectEmitter(f"http://127.0.0.1:{_free_port()}/api")
    try:
        with caplog.at_level(logging.WARNING, logger="receiver.events"):
            assert emitter.emit(series_stable_event(series_claim())) is True  # queued: fire-and-forget
            assert emitter.flush(timeout=30) is False
        assert any("will be re-sent" in r.getMessage() for r in caplog.records)
    finally:
        emitter.close()
