"""The REST client retries what a Prefect server asks to retry, and nothing else.

A real Prefect server answers 503 when its database is busy (SQLite locked under a burst of
runs: a CI run's ``dcmflow reprocess --all`` once failed on it). That cannot be provoked on
demand, so a small real HTTP server on loopback plays the busy server here: it answers with
the scripted statuses, then 200.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from dcmflow.prefect_api import NoSuchDeployment, api_client, create_run


class _Scripted(ThreadingHTTPServer):
    def __init__(self, statuses: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses = statuses
        self.seen: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class _Handler(BaseHTTPRequestHandler):
    server: _Scripted

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append((self.command, self.path))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        if self.path.startswith("/api/deployments/name/missing"):
            status = 404
        body = json.dumps({"id": "d-1", "name": "run-1"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[_Scripted]:
    server = _Scripted([])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_busy_answers_are_retried_until_the_server_answers(scripted: _Scripted) -> None:
    scripted.statuses[:] = [503, 503, 429]
    with api_client(scripted.url, first_delay=0.01) as api:
        response = api.post("/deployments/d-1/create_flow_run", json={"parameters": {}})
    assert response.status_code == 200
    assert len(scripted.seen) == 4


def test_create_run_survives_a_busy_server(scripted: _Scripted) -> None:
    scripted.statuses[:] = [503, 200, 503]  # the lookup once, then the create once
    started = time.monotonic()
    run = create_run(scripted.url, "reprocess/reprocess", {"series_uid": "1.2.3"})
    assert run["name"] == "run-1"
    assert [method for method, _ in scripted.seen] == ["GET", "GET", "POST", "POST"]
    assert time.monotonic() - started < 10


def test_the_last_busy_answer_is_returned_after_the_attempts(scripted: _Scripted) -> None:
    scripted.statuses[:] = [503] * 10
    with api_client(scripted.url, attempts=3, first_delay=0.01) as api:
        response = api.get("/flow_runs/x")
    assert response.status_code == 503
    assert len(scripted.seen) == 3


def test_other_errors_are_not_retried(scripted: _Scripted) -> None:
    scripted.statuses[:] = [500, 422]
    with api_client(scripted.url, first_delay=0.01) as api:
        assert api.get("/flow_runs/x").status_code == 500
        assert api.get("/flow_runs/x").status_code == 422
    assert len(scripted.seen) == 2
    with pytest.raises(NoSuchDeployment, match="no deployment missing/x"):
        create_run(scripted.url, "missing/x", {})


def test_a_server_that_never_answered_fails_at_once() -> None:
    with api_client("http://127.0.0.1:9/api", first_delay=5) as api:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            api.get("/health")
    assert time.monotonic() - started < 2


def test_failed_actions_leave_out_refusals_to_touch_a_run_that_has_ended(prefect_server) -> None:  # type: ignore[no-untyped-def]
    """The zombie automation fires for a run whose last heartbeat came after its Completed event
    (Prefect issue #21932): the server refuses, the run stays Completed, nothing to report."""
    import datetime as dt
    import uuid

    from dcmflow.prefect_api import ACTION_FAILED, failed_actions

    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    marker = uuid.uuid4().hex
    reasons = {
        "ended": "Failed to set state: Run is already in terminal state COMPLETED.",
        "refused": f"Validation error in parameters {marker}: revision is not an integer",
    }
    events = [{
        "id": str(uuid.uuid4()),
        "occurred": dt.datetime.now(dt.timezone.utc).isoformat(),
        "event": ACTION_FAILED,
        "resource": {"prefect.resource.id": f"prefect.automation.{uuid.uuid4()}", "prefect.resource.name": f"{name}-{marker}"},
        "payload": {"reason": reason},
    } for name, reason in reasons.items()]
    with api_client(str(prefect_server.api_url)) as api:
        api.post("/events", json=events).raise_for_status()

    def mine() -> list[dict[str, object]]:
        return [f for f in failed_actions(str(prefect_server.api_url), since) if marker in str(f["automation"])]

    deadline = time.monotonic() + 30
    while not mine() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)  # both events were posted in one request: give the second the same chance
    assert [(f["automation"], f["reason"]) for f in mine()] == [(f"refused-{marker}", reasons["refused"])]
