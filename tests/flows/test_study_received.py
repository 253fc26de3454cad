"""study_received against the real Prefect server: the study card artifact and the webhook.

A study (CT + MR series) is recorded once per module through ``Repository.record_instances``;
a local ``http.server`` in a thread plays the webhook, answering per path from a script.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from flows.new_study import study_received
from storage.keys import instance_key
from storage.repository import InstanceIn
from tasks.study_card import StudyCard, card_artifact_key, card_markdown, redact_url, study_card
from tests.flows.conftest import drain_prefect_workers
from tests.tasks.helpers import Home, make_home

STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"
CT_UID = STUDY_UID + ".1"
MR_UID = STUDY_UID + ".2"
T0 = dt.datetime(2024, 1, 31, 8, 15, 0, tzinfo=dt.UTC)

EXPECTED_CARD = {
    "study_uid": STUDY_UID,
    "patient_name": "DOE^JANE",
    "patient_id": "PID-42",
    "accession_number": "ACC-7",
    "study_description": "CHEST|ABD *contrast*",
    "study_date": "2024-01-31",
    "modalities": ["CT", "MR"],
    "calling_ae": "CT_SCANNER",
    "first_received_at": T0.isoformat(),
    "series_count": 2,
    "instance_count": 5,
}


# --------------------------------------------------------------------------- fixtures


def _instance(series_uid: str, n: int, modality: str, at: dt.datetime, calling_ae: str) -> InstanceIn:
    sop = f"{series_uid}.{n}"
    return InstanceIn(
        study_uid=STUDY_UID, series_uid=series_uid, sop_uid=sop,
        sha256=hashlib.sha256(sop.encode()).hexdigest(), size=100,
        object_key=instance_key(STUDY_UID, series_uid, sop), received_at=at, calling_ae=calling_ae,
        patient_id="PID-42", patient_name="DOE^JANE", patient_birth_date="19700101", patient_sex="F",
        study_date="20240131", study_time="081000", study_description="CHEST|ABD *contrast*",
        accession_number="ACC-7", modality=modality, series_number=1 if modality == "CT" else 2,
        instance_number=n,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    h = make_home(tmp_path_factory.mktemp("study-received") / "home")
    ct = [_instance(CT_UID, n, "CT", T0 + dt.timedelta(seconds=n), "CT_SCANNER") for n in range(3)]
    mr = [_instance(MR_UID, n, "MR", T0 + dt.timedelta(minutes=5, seconds=n), "MR_SCANNER") for n in range(2)]
    h.repo.record_instances(ct)
    h.repo.record_instances(mr)
    return h


@dataclass
class Hook:
    """A webhook on loopback: ``script[path]`` is the statuses it answers, in turn (then 200)."""

    port: int
    script: dict[str, list[int]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str, userinfo: str = "", query: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"http://{at}127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def to(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    state = Hook(port=0)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            path, _, query = self.path.partition("?")
            with lock:
                state.requests.append({"path": path, "query": query, "headers": dict(self.headers), "body": body})
                statuses = state.script.get(path, [])
                status = statuses.pop(0) if statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def run(home: Home, prefect_api, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run the flow with DCMFLOW_HOME = ``home`` plus ``env``; its final state."""

    def _run(study_uid: str = STUDY_UID, received: dict[str, Any] | None = None, **env: str) -> Any:
        monkeypatch.setenv("DCMFLOW_HOME", str(home.root))
        monkeypatch.setenv("DCMFLOW_STUDY_WEBHOOK_RETRY_DELAY", "0.01")
        for key, value in env.items():
            monkeypatch.setenv(f"DCMFLOW_{key.upper()}", value)
        return study_received(study_uid, received, return_state=True)

    return _run


def artifacts_of(state: Any, key: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )


def flow_run_of(state: Any) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def logs_of(flow_run_id: UUID) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    drain_prefect_workers()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


# --------------------------------------------------------------------------- flow runs


def test_card_is_published_as_an_artifact_and_nothing_posted_without_a_webhook(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    before = len(hook.requests)
    state = run()
    assert state.is_completed(), state.message
    assert "no webhook" in state.message
    assert state.result() == EXPECTED_CARD
    (artifact,) = artifacts_of(state, card_artifact_key(STUDY_UID))
    assert artifact.key == "study-1-2-826-0-1-3680043-8-498-4242"
    assert artifact.description == "new study" and artifact.type == "markdown"
    text = artifact.data
    for expected in ("DOE^JANE (ID PID-42)", "ACC-7", "CHEST\\|ABD \\*contrast\\*", "2024-01-31", "CT, MR",
                     "CT\\_SCANNER", "| Series | 2 |", "| Instances | 5 |", f"`{STUDY_UID}`"):
        assert expected in text, (expected, text)
    assert len(hook.requests) == before


def test_manual_run_is_named_from_the_records(run) -> None:  # type: ignore[no-untyped-def]
    state = run()
    assert flow_run_of(state).name == f"new study CT/MR 'CHEST|ABD *contrast*' …{STUDY_UID[-12:]}"


def test_webhook_receives_the_same_card_as_json(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    state = run(study_webhook_url=hook.url("/ok"))
    assert state.is_completed(), state.message
    assert f"posted to http://127.0.0.1:{hook.port}/ok" in state.message
    (request,) = hook.to("/ok")
    assert json.loads(request["body"]) == EXPECTED_CARD
    assert request["headers"]["Content-Type"] == "application/json"
    assert "Authorization" not in request["headers"]
    assert artifacts_of(state, card_artifact_key(STUDY_UID))


def test_event_payload_fills_gaps_and_names_the_run(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    earlier = T0 - dt.timedelta(seconds=30)
    received = {
        "study_uid": STUDY_UID, "patient_id": "PID-42", "revision": 1, "modalities": ["CT"],
        "description": "CHEST", "series_uids": [CT_UID], "instance_count": 3,
        "calling_ae": "FIRST_SENDER", "first_received_at": earlier.isoformat(),
    }
    state = run(received=received, study_webhook_url=hook.url("/event"))
    assert state.is_completed(), state.message
    card = json.loads(hook.to("/event")[0]["body"])
    # the event's first sender and first receipt win; the records' counts are newer than the event's
    assert card == {**EXPECTED_CARD, "calling_ae": "FIRST_SENDER", "first_received_at": earlier.isoformat()}
    assert flow_run_of(state).name == f"new study CT 'CHEST' …{STUDY_UID[-12:]}"


def test_webhook_failing_twice_succeeds_on_retry(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    hook.script["/flaky"] = [500, 503]
    state = run(study_webhook_url=hook.url("/flaky"))
    assert state.is_completed(), state.message
    bodies = [json.loads(r["body"]) for r in hook.to("/flaky")]
    assert len(bodies) == 3 and all(b == EXPECTED_CARD for b in bodies)


def test_webhook_always_failing_fails_the_run_with_one_line_and_no_secret(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    hook.script["/down"] = [500] * 10
    url = hook.url("/down", userinfo="alice:pa55word", query="token=t0ps3cret")
    state = run(study_webhook_url=url, study_webhook_retries="2")
    assert state.is_failed()
    assert state.message == (
        f"study card of {STUDY_UID} not delivered: webhook http://127.0.0.1:{hook.port}/down?… "
        "answered 500 Internal Server Error (after 3 attempts)"
    )
    requests = hook.to("/down")
    assert len(requests) == 3
    # credentials of the URL went as basic auth, the query as it was
    assert requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"alice:pa55word").decode()
    assert requests[0]["query"] == "token=t0ps3cret"
    # the card artifact was created before the webhook was tried
    assert artifacts_of(state, card_artifact_key(STUDY_UID))
    logs = logs_of(state.state_details.flow_run_id)
    assert "answered 500" in logs
    assert "pa55word" not in logs and "t0ps3cret" not in logs and "alice" not in logs


def test_webhook_refusing_the_card_is_not_retried(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    hook.script["/gone"] = [404] * 5
    state = run(study_webhook_url=hook.url("/gone"))
    assert state.is_failed()
    assert "answered 404 Not Found (not retried" in state.message
    assert len(hook.to("/gone")) == 1


def test_unreachable_webhook_fails_with_one_line(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = run(study_webhook_url=f"http://127.0.0.1:{port}/x", study_webhook_retries="1")
    assert state.is_failed()
    assert state.message.startswith(f"study card of {STUDY_UID} not delivered: webhook http://127.0.0.1:{port}/x unreachable")
    assert state.message.endswith("(after 2 attempts)") and "\n" not in state.message


def test_unknown_study_fails_with_one_line(run, hook: Hook) -> None:  # type: ignore[no-untyped-def]
    before = len(hook.requests)
    state = run("1.2.3.999", study_webhook_url=hook.url("/ok"))
    assert state.is_failed()
    assert state.message == "no received study with Study Instance UID 1.2.3.999"
    assert not artifacts_of(state, card_artifact_key("1.2.3.999"))
    assert len(hook.requests) == before


def test_invalid_uid_fails_with_one_line(run) -> None:  # type: ignore[no-untyped-def]
    state = run("1.2/../../etc")
    assert state.is_failed()
    assert state.message == (
        "invalid Study Instance UID '1.2/../../etc': expected digits and dots, at most 64 characters"
    )


# --------------------------------------------------------------------------- without a flow run


def test_parameters_are_documented_for_the_ui() -> None:
    from prefect.utilities.callables import parameter_schema

    # what a deployment of the flow shows in the UI (runner.py and `prefect deploy` call this on the flow)
    schema = parameter_schema(study_received).model_dump()
    props = schema["properties"]
    assert schema["required"] == ["study_uid"]
    assert props["study_uid"]["type"] == "string" and "Study Instance UID" in props["study_uid"]["description"]
    assert props["received"]["default"] is None and "dicom.study.received" in props["received"]["description"]
    assert study_received.name == "study-received"
    assert "Parameters\n----------\nstudy_uid\n" in (study_received.__doc__ or "").replace("    ", "")


def test_card_from_records_alone_and_markdown_is_inert(home: Home) -> None:
    study = home.repo.get_study(STUDY_UID)
    assert study is not None
    card = study_card(study, home.repo.get_patient(study.patient_id), home.repo.list_series(study_uid=STUDY_UID))
    assert card.as_json() == EXPECTED_CARD
    hostile = StudyCard(**{**card.as_json(), "modalities": ("CT",), "study_description": "x | <script>\n# y"})
    table = card_markdown(hostile)
    assert "x \\| \\<script\\> # y" in table and "<script>" not in table


def test_bad_study_date_is_kept_raw(home: Home) -> None:
    study = home.repo.get_study(STUDY_UID)
    assert study is not None
    for raw, shown in [("20240231", "20240231"), ("2024.01.31", "2024-01-31"), ("", "")]:
        card = study_card(study.model_copy(update={"date": raw}), None, [])
        assert card.study_date == shown
        assert (card.series_count, card.patient_name) == (0, "")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@hooks.example.org/services/x?token=abc#frag", "https://hooks.example.org/services/x?…"),
        ("http://127.0.0.1:8080/hook", "http://127.0.0.1:8080/hook"),
        ("not a url", "<webhook URL>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_webhook_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dcmflow.settings import Settings

    assert Settings().study_webhook_url is None
    assert (Settings().study_webhook_timeout, Settings().study_webhook_retries) == (10.0, 4)
    monkeypatch.setenv("DCMFLOW_STUDY_WEBHOOK_URL", "https://u:hunter2@h/x")
    monkeypatch.setenv("DCMFLOW_STUDY_WEBHOOK_TIMEOUT", "2.5")
    s = Settings()
    assert s.study_webhook_url is not None and s.study_webhook_url.get_secret_value() == "https://u:hunter2@h/x"
    assert "hunter2" not in repr(s) and s.study_webhook_timeout == 2.5
