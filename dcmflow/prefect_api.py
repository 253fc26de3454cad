"""Talking to a Prefect server's REST API: create runs, read their states, read failed actions.

Every call goes through :func:`api_client`, which answers the server's "try again" the way
Prefect's own client does: a 503 (Prefect's server sends it for a database that is busy or
locked, e.g. SQLite under a burst of runs), 502, 429 or 408 is retried with exponential
back-off and jitter, honouring ``Retry-After``; so are connection resets and timeouts once
the server has answered. Plain httpx keeps ``dcmflow status`` quick to start (importing
Prefect's client takes over a second).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from typing import Any

import httpx

__all__ = [
    "FINAL_STATES",
    "RETRY_STATUSES",
    "NoSuchDeployment",
    "api_client",
    "healthy",
    "ui_url_of",
    "create_run",
    "flow_run_state",
    "crash_flow_run",
    "run_parameters",
    "failed_actions",
    "recent_flow_runs",
    "work_queues",
]

log = logging.getLogger("dcmflow.prefect")

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RETRY_STATUSES = frozenset({408, 429, 502, 503})
"""The answers Prefect's client retries (``prefect.client.base``): the server asks to try again."""
ACTION_FAILED = "prefect.automation.action.failed"


class NoSuchDeployment(LookupError):
    """The server does not know the deployment (one line for the user)."""


class _RetryingTransport(httpx.HTTPTransport):
    """An httpx transport that retries the server's "try again" answers with back-off."""

    def __init__(self, *, attempts: int, first_delay: float) -> None:
        super().__init__()
        self.attempts = attempts
        self.first_delay = first_delay
        self.connected = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                response = super().handle_request(request)
            except (httpx.TimeoutException, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                if last:
                    raise
                why = "no answer"
            except httpx.ConnectError:
                if last or not self.connected:
                    raise  # a wrong URL fails at once; a restarting server is waited for
                why = "connection refused"
            else:
                self.connected = True
                if response.status_code not in RETRY_STATUSES or last:
                    return response
                why = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After", "")
                response.read()
                response.close()
                if retry_after.isdigit():
                    time.sleep(float(retry_after))
                    continue
            delay = self.first_delay * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
            log.debug("%s %s: %s, attempt %d of %d, again in %.1f s", request.method, request.url, why, attempt,
                      self.attempts, delay)
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


def api_client(api_url: str, *, timeout: float = 10.0, attempts: int = 6, first_delay: float = 1.0) -> httpx.Client:
    """An httpx client for ``api_url`` that retries what the server says to retry (1, 2, 4, 8, 16 s)."""
    return httpx.Client(
        base_url=api_url.rstrip("/"),
        timeout=timeout,
        transport=_RetryingTransport(attempts=attempts, first_delay=first_delay),
    )


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether the server answers ``/health`` now (no retries: callers poll)."""
    try:
        return httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def ui_url_of(api_url: str) -> str:
    """The UI beside an API URL (``…/api`` → ``…``)."""
    return api_url.removesuffix("/").removesuffix("/api")


def create_run(api_url: str, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Create a flow run of ``deployment`` (``flow/deployment``); the run as JSON.

    Raises
    ------
    NoSuchDeployment
        The server does not know the deployment.
    httpx.HTTPError
        The server is unreachable or still refuses after its retries.
    """
    with api_client(api_url) as api:
        found = api.get(f"/deployments/name/{deployment}")
        if found.status_code == 404:
            raise NoSuchDeployment(f"the Prefect server at {api_url} has no deployment {deployment}: is dcmflow up running?")
        found.raise_for_status()
        created = api.post(f"/deployments/{found.json()['id']}/create_flow_run", json={"parameters": parameters})
        created.raise_for_status()
        return dict(created.json())


def flow_run_state(api_url: str, flow_run_id: str | None) -> str | None:
    """The state type of a flow run (``RUNNING`` …), or None when the server does not know it."""
    if not flow_run_id:
        return None
    with api_client(api_url) as api:
        response = api.get(f"/flow_runs/{flow_run_id}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    state = response.json().get("state") or {}
    return state.get("type")


def latest_artifact_ids(api_url: str, keys: list[str]) -> dict[str, str]:
    """The id of the newest artifact of each key the server knows (its UI page is
    ``/artifacts/artifact/<id>``; the key's page is only a list of versions)."""
    if not keys:
        return {}
    with api_client(api_url, attempts=2) as api:
        response = api.post("/artifacts/latest/filter", json={"artifacts": {"key": {"any_": keys}}})
    response.raise_for_status()
    return {a["key"]: a["latest_id"] for a in response.json() if a.get("latest_id")}


def crash_flow_run(api_url: str, flow_run_id: str, message: str) -> None:
    """Mark a flow run Crashed (forced: whatever ran it is gone)."""
    with api_client(api_url) as api:
        api.post(
            f"/flow_runs/{flow_run_id}/set_state",
            json={"state": {"type": "CRASHED", "message": message}, "force": True},
        ).raise_for_status()


def run_parameters(api_url: str, deployment_name: str, limit: int = 200) -> list[dict[str, Any]]:
    """The parameters of the latest runs (any state) of deployments called ``deployment_name``."""
    body = {"deployments": {"name": {"any_": [deployment_name]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": limit}
    with api_client(api_url) as api:
        response = api.post("/flow_runs/filter", json=body)
    response.raise_for_status()
    return [dict(r["parameters"]) for r in response.json()]


_ENDED_RUN = "already in terminal state"
"""How the server words an action's refusal to change the state of a run that has ended."""


def failed_actions(api_url: str, since: dt.datetime, limit: int = 50) -> list[dict[str, Any]]:
    """Automation actions the server could not carry out since ``since`` (oldest first).

    A trigger whose templated parameters the deployment refuses (a string for an int …)
    leaves no flow run behind, only this event: ``up`` logs it and ``status`` shows it.
    Left out: an action refused because its flow run had already ended. The zombie automation
    does that when a run's last heartbeat reaches the server after its Completed event
    (Prefect issue #21932); the run is not touched, so it is no failure of ours to report.
    """
    body = {
        "filter": {"event": {"name": [ACTION_FAILED]}, "occurred": {"since": since.isoformat()}},
        "limit": limit,
    }
    with api_client(api_url) as api:
        response = api.post("/events/filter", json=body)
    response.raise_for_status()
    found = []
    for event in response.json().get("events", []):
        resource = event.get("resource", {})
        payload = event.get("payload", {})
        if _ENDED_RUN in str(payload.get("reason", "")):
            continue
        found.append(
            {
                "id": event["id"],
                "occurred": event["occurred"],
                "automation": resource.get("prefect.resource.name", resource.get("prefect.resource.id", "")),
                "reason": payload.get("reason") or payload.get("action_type") or str(payload)[:300],
            }
        )
    return sorted(found, key=lambda f: f["occurred"])


def recent_flow_runs(api_url: str, limit: int = 10) -> list[dict[str, Any]]:
    """The latest flow runs (newest first): name, deployment, state, start time and UI link."""
    with api_client(api_url) as api:
        response = api.post("/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_DESC", "limit": limit})
        response.raise_for_status()
        deployments: dict[str, str] = {}
        runs = []
        for run in response.json():
            deployment_id = run.get("deployment_id")
            if deployment_id and deployment_id not in deployments:
                found = api.get(f"/deployments/{deployment_id}")
                deployments[deployment_id] = found.json().get("name", "") if found.status_code == 200 else ""
            state = run.get("state") or {}
            runs.append(
                {
                    "id": run["id"],
                    "name": run["name"],
                    "deployment": deployments.get(deployment_id or "", ""),
                    "state": state.get("name", ""),
                    "state_type": state.get("type", ""),
                    "message": state.get("message") or "",
                    "start_time": run.get("start_time"),
                    "parameters": run.get("parameters", {}),
                    "url": f"{ui_url_of(api_url)}/runs/flow-run/{run['id']}",
                }
            )
    return runs


def work_queues(api_url: str, pool: str) -> list[dict[str, Any]]:
    """The queues of a work pool by priority: name, priority, status (``READY`` while a worker
    polls it), last poll, and how many runs wait there (what ``status`` shows of workers and
    channels)."""
    with api_client(api_url) as api:
        found = api.post(f"/work_pools/{pool}/queues/filter", json={})
        if found.status_code == 404:
            return []
        found.raise_for_status()
        queues = []
        for queue in sorted(found.json(), key=lambda q: (q.get("priority") or 0, q["name"])):
            waiting = api.post(
                "/flow_runs/count",
                json={"work_pools": {"name": {"any_": [pool]}}, "work_pool_queues": {"name": {"any_": [queue["name"]]}},
                      "flow_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING"]}}}},
            )
            queues.append(
                {
                    "name": queue["name"],
                    "priority": queue.get("priority"),
                    "status": queue.get("status") or "",
                    "last_polled": queue.get("last_polled"),
                    "waiting": waiting.json() if waiting.status_code == 200 else None,
                }
            )
    return queues
