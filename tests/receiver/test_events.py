"""Events: the pure builders, and the Prefect emitter against a real ``prefect server start``.

The real Prefect server is the session-wide ``prefect_server`` fixture of tests/conftest.py.
Answers the real server cannot be made to give on demand (HTTP 409, 422 for one event of a
batch, a check of the Authorization header) come from a small HTTP server on loopback that
records what it receives; a server that is down is a port nobody listens on.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import datetime as dt
import json
import logging
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.completeness import CompletenessMonitor, MonitorOptions
from receiver import events as events_module
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


# --------------------------------------------------------------------------- emitter, no server


def _off_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("events are off: no PREFECT_API_URL")]


def test_emitter_without_an_api_url_warns_once_and_refuses_without_trying(caplog: pytest.LogCaptureFixture) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    with temporary_settings(restore_defaults={PREFECT_API_URL}), caplog.at_level(logging.DEBUG, logger="receiver.events"):
        emitter = PrefectEmitter()
        assert not emitter.enabled
        for tick in range(5):  # the monitor's ticks: each emit refused at once, nothing retried
            assert emitter.emit(series_stable_event(series_claim(revision=tick + 1))) is False
            assert emitter.flush() is False
        emitter.close()
    assert time.monotonic() - started < 2  # no ephemeral Prefect server, no network
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "receiver.events"]
    assert _off_warnings(caplog) == [warning]
    assert warning.getMessage() == (
        "events are off: no PREFECT_API_URL; series are declared stable but no flow starts (dcmflow up sets it)"
    )


def test_an_event_prefect_would_refuse_is_not_buffered_and_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    emitter = PrefectEmitter(f"http://127.0.0.1:{_free_port()}/api")  # never contacted
    good = series_stable_event(series_claim())
    no_role = series_stable_event(series_claim(revision=2))
    no_role.related[0].pop("prefect.resource.role")  # Prefect requires a role on related resources
    huge = series_stable_event(series_claim(revision=3))
    huge.payload["blob"] = "x" * (emitter.max_event_bytes + 1)
    with caplog.at_level(logging.WARNING, logger="receiver.events"):
        assert emitter.emit(good) is True
        for _ in range(3):
            assert emitter.emit(no_role) is False
            assert emitter.emit(huge) is False
    emitter.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "receiver.events"]
    assert len(messages) == 2, messages
    assert f"(id {no_role.id}) cannot be sent" in messages[0] and "prefect.resource.role" in messages[0]
    assert f"(id {huge.id}) cannot be sent" in messages[1] and "PREFECT_EVENTS_MAXIMUM_SIZE_BYTES" in messages[1]
    assert all(f"{SERIES_STABLE} for dicom.series.{SERIES}" in m for m in messages)


def test_the_emitter_names_no_prefect_internals() -> None:
    """Only Prefect's public API: no private module, no private attribute of Prefect's objects."""
    path = Path(events_module.__file__)
    source = path.read_text()
    for private in ("_instances", "_instance_cache_lock", "_queue", "_stopped", "prefect._internal", "EventsWorker"):
        assert private not in source, private
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prefect":
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), node.module
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("prefect.") and "._" in a.name for a in node.names)


# --------------------------------------------------------------------------- a recording HTTP server


@dataclass
class Recorder:
    """What the loopback HTTP server received, and what it answers next."""

    url: str
    port: int
    requests: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    answers: list[tuple[int, str]] = field(default_factory=list)  # (status, body); empty: 204

    def events(self) -> list[dict[str, Any]]:
        return [e for _, body in self.requests for e in body]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """An HTTP server on loopback that records ``POST /api/events`` and answers as told."""
    state = Recorder(url="", port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length", "0"))
            state.requests.append((dict(self.headers), json.loads(self.rfile.read(length))))
            code, body = state.answers.pop(0) if state.answers else (204, "")
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = int(server.server_address[1])
    state.url = f"http://127.0.0.1:{state.port}/api"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_one_id_twice_in_a_batch_is_sent_once_in_chunks(recorder: Recorder) -> None:
    specs = [series_stable_event(series_claim(revision=r)) for r in range(1, 8)]
    emitter = PrefectEmitter(recorder.url, chunk_size=3)
    try:
        for spec in specs:
            assert emitter.emit(spec) and emitter.emit(spec)
        assert emitter.flush() is True
        assert emitter.flush() is True  # nothing buffered since: nothing sent
    finally:
        emitter.close()
    assert [len(body) for _, body in recorder.requests] == [3, 3, 1]
    sent = recorder.events()
    assert [e["id"] for e in sent] == [str(s.id) for s in specs]
    assert sent[0]["event"] == SERIES_STABLE and sent[0]["resource"] == specs[0].resource
    assert sent[0]["payload"] == specs[0].payload
    headers = recorder.requests[0][0]
    assert headers["Content-Type"] == "application/json" and "Authorization" not in headers


def test_an_http_error_is_one_warning_with_its_first_line_then_one_info_on_recovery(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    recorder.answers = [
        (409, "Conflict: the events pipeline is paused\nsecond line is not shown"),
        (500, "Internal Server Error"),
        (503, '{"detail": "Service Unavailable"}'),
    ]
    emitter = PrefectEmitter(recorder.url)
    spec = series_stable_event(series_claim())
    try:
        with caplog.at_level(logging.INFO, logger="receiver.events"):
            for _ in range(3):  # three ticks of an outage
                assert emitter.emit(spec) is True
                assert emitter.flush() is False
            assert emitter.emit(spec) is True
            assert emitter.flush() is True
            assert emitter.emit(spec) is True
            assert emitter.flush() is True
    finally:
        emitter.close()
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "receiver.events"]
    assert len(records) == 2, records
    (level, warning), (info_level, info) = records
    assert level == "WARNING" and info_level == "INFO"
    assert "HTTP 409 Conflict: Conflict: the events pipeline is paused;" in warning and "second line" not in warning
    assert recorder.url in warning and "will be re-sent" in warning
    assert "again" in info and "3 failed attempt(s)" in info
    assert len(recorder.requests) == 5  # every flush was tried: the buffer was re-filled each time


def test_an_event_the_server_refuses_is_named_and_not_sent_again(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = series_stable_event(series_claim()), series_stable_event(series_claim(revision=2))
    detail = {"detail": [{"loc": ["body", 1, "payload", "revision"], "msg": "revision is too new", "type": "value_error"}]}
    recorder.answers = [(422, json.dumps(detail))]
    emitter = PrefectEmitter(recorder.url)
    try:
        with caplog.at_level(logging.WARNING, logger="receiver.events"):
            assert emitter.emit(good) and emitter.emit(bad)
            assert emitter.flush() is False  # the monitor marks neither
            assert emitter.emit(good) is True
            assert emitter.emit(bad) is False  # refused before: the monitor can mark the others
            assert emitter.flush() is True
    finally:
        emitter.close()
    (message,) = [r.getMessage() for r in caplog.records if r.name == "receiver.events"]
    assert f"{SERIES_STABLE} for dicom.series.{SERIES} (id {bad.id}) cannot be sent" in message
    assert "HTTP 422: payload.revision: revision is too new" in message
    assert [e["id"] for e in recorder.events()] == [str(good.id), str(bad.id), str(good.id)]


def test_a_chunk_a_proxy_finds_too_large_is_split(recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    specs = [series_stable_event(series_claim(revision=r)) for r in range(1, 5)]
    too_large = (413, "<html><title>413 Request Entity Too Large</title></html>")
    recorder.answers = [too_large, (204, ""), (204, "")]
    emitter = PrefectEmitter(recorder.url)
    try:
        assert all(emitter.emit(s) for s in specs)
        assert emitter.flush() is True
        recorder.answers = [too_large]  # even one event alone is too large: that event is named
        with caplog.at_level(logging.WARNING, logger="receiver.events"):
            assert emitter.emit(specs[0]) and emitter.flush() is False
            assert emitter.emit(specs[0]) is False
    finally:
        emitter.close()
    assert [len(body) for _, body in recorder.requests] == [4, 2, 2, 1]
    (message,) = [r.getMessage() for r in caplog.records if r.name == "receiver.events"]
    assert f"(id {specs[0].id}) cannot be sent: HTTP 413 Request Entity Too Large" in message


def test_self_hosted_auth_as_prefect_clients_send_it(recorder: Recorder) -> None:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    spec = series_stable_event(series_claim())
    dead = f"http://127.0.0.1:{_free_port()}/api"
    cases: list[tuple[dict[Any, Any], str]] = [
        ({PREFECT_API_URL: recorder.url, PREFECT_API_AUTH_STRING: "admin:s3cret:x"}, "Basic "),
        ({PREFECT_API_URL: recorder.url, PREFECT_API_KEY: "pnu_key"}, "Bearer pnu_key"),
        ({PREFECT_API_URL: dead, PREFECT_API_AUTH_STRING: "admin:pw", PREFECT_API_KEY: "k"}, "Basic "),
    ]
    for updates, expected in cases:
        with temporary_settings(updates=updates):
            # the last case: an explicit URL wins over PREFECT_API_URL (a dead port here)
            emitter = PrefectEmitter(recorder.url if updates[PREFECT_API_URL] == dead else None)
        assert emitter.api_url == recorder.url
        try:
            assert emitter.emit(spec) and emitter.flush() is True
        finally:
            emitter.close()
    got = [headers["Authorization"] for headers, _ in recorder.requests]
    assert got[0] == "Basic " + base64.b64encode(b"admin:s3cret:x").decode()
    assert got[1] == "Bearer pnu_key"
    assert got[2] == "Basic " + base64.b64encode(b"admin:pw").decode()  # the auth string wins over the key


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
        assert emitter.emit(spec) and emitter.emit(spec)  # buffered once
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
    assert dt.datetime.fromisoformat(got["occurred"]) == spec.occurred


def test_a_batch_in_several_chunks_arrives_whole(prefect_api_url: str) -> None:
    base = f"{SERIES}.{uuid.uuid4().int % 10**9}"
    specs = [series_stable_event(series_claim(uid=f"{base}.{i}")) for i in range(7)]
    emitter = PrefectEmitter(prefect_api_url, chunk_size=3)
    try:
        assert all(emitter.emit(s) for s in specs)
        assert emitter.flush() is True
    finally:
        emitter.close()
    # the filter of the brief: by event name and resource id
    body = {"filter": {"event": {"name": [SERIES_STABLE]}, "any_resource": {"id": [s.resource_id for s in specs]}}, "limit": 50}
    deadline = time.monotonic() + 30
    while True:
        events = httpx.post(f"{prefect_api_url}/events/filter", json=body, timeout=10).raise_for_status().json()["events"]
        if len(events) >= len(specs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(e["id"] for e in events) == sorted(str(s.id) for s in specs)


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


class _Forwarder(socketserver.ThreadingTCPServer):
    """A TCP relay from a port to the real Prefect server: "the server is back" on the old port."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.target = target

        class Relay(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with socket.create_connection(target) as upstream:
                    pipes = [
                        threading.Thread(target=_pipe, args=(self.request, upstream), daemon=True),
                        threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True),
                    ]
                    for t in pipes:
                        t.start()
                    for t in pipes:
                        t.join()

        super().__init__(("127.0.0.1", port), Relay)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_unreachable_server_warns_once_then_says_when_delivery_works_again(
    prefect_api_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()  # nobody listens here: connection refused
    emitter = PrefectEmitter(f"http://127.0.0.1:{port}/api")
    specs = [series_stable_event(series_claim(uid=f"{SERIES}.{uuid.uuid4().int % 10**9}")) for _ in range(2)]
    forwarder: _Forwarder | None = None
    try:
        with caplog.at_level(logging.INFO, logger="receiver.events"):
            for _ in range(4):  # four ticks of the monitor while Prefect is down
                assert emitter.emit(specs[0]) is True  # buffered: delivery is confirmed by flush
                assert emitter.flush(timeout=5) is False
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "receiver.events"]
            assert len(warnings) == 1, warnings
            assert "connection refused" in warnings[0] and f"127.0.0.1:{port}" in warnings[0]

            host, target_port = httpx.URL(prefect_api_url).host, httpx.URL(prefect_api_url).port
            assert target_port is not None
            forwarder = _Forwarder(port, (host, target_port))
            threading.Thread(target=forwarder.serve_forever, daemon=True).start()
            for spec in specs:
                assert emitter.emit(spec) is True
            assert emitter.flush() is True
            assert emitter.emit(specs[1]) and emitter.flush() is True  # no second info line
    finally:
        emitter.close()
        if forwarder is not None:
            forwarder.shutdown()
            forwarder.server_close()
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "receiver.events"]
    assert [level for level, _ in records] == ["WARNING", "INFO"], records
    assert "delivering to Prefect" in records[1][1] and "4 failed attempt(s)" in records[1][1]
    assert len(read_events(prefect_api_url, [s.resource_id for s in specs], expect=2)) == 2
