"""A worker that dies mid-series (issue 12, item 6), end to end.

``dcmflow up`` with a work pool, a real ``prefect worker start``, a series sent with DCMTK's
``storescu``; while its job sleeps, the worker and everything it started are killed with
``SIGKILL`` (the machine dies) and another worker starts. Prefect's zombie automation marks the
silent run Crashed, the ``rerun-crashed-series`` trigger runs the series again, and that run
takes over the dead run's claim: the revision ends processed exactly once.

The declared window is 90 s (heartbeats every 30 s); this test shortens the automation's
``within`` to :data:`ZOMBIE_WINDOW` through Prefect's API, as an operator could in the UI,
which is safe here because no healthy run of this test lasts that long after a heartbeat.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dcmflow.prefect_api import api_client
from tests.dcmflow.test_up_e2e import STORESCU, Up, make_up, wait_for, write_study
from tests.prefect_server import stop_worker

pytestmark = pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu is not installed")

ZOMBIE = "dcmflow-crash-zombie-flow-runs"
ZOMBIE_WINDOW = 15
"""Seconds without a heartbeat before the test's runs are Crashed (declared: 90)."""

SETTINGS_JSON = {"jobName": "count-slices", "worker": "death_svc.count", "callback": "death_svc.wants", "timeout": "5m"}
CALLBACKS = '''
def wants(jobName, headers, params, added_params, **kwargs):
    return headers.get("Modality") == "CT"
'''
# The first attempt sleeps until it is killed; the next one writes one output file at once.
WORKERS = '''
import os, time
from pathlib import Path


def count(jobName, headers, params, added_params, **kwargs):
    ledger = Path(params["home"]) / "ledger.txt"
    first = not ledger.exists()
    with ledger.open("a") as fh:
        fh.write(f"start {headers['seriesId']} {os.getpid()}\\n")
    time.sleep(120 if first else 0)
    slices = len(list((Path(os.environ["DATA"]) / headers["dcmpath"]).glob("*.dcm")))
    out = Path(os.environ["DATA"]) / "counts" / "slices.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(str(slices))
    with ledger.open("a") as fh:
        fh.write(f"done {headers['seriesId']} {slices}\\n")
'''


def install_service(up: Up) -> None:
    root = up.home.parent / "service"
    (root / "registry" / "death_svc").mkdir(parents=True)
    (root / "module" / "death_svc").mkdir(parents=True)
    (root / "registry" / "settings.json").write_text(json.dumps([{**SETTINGS_JSON, "params": {"home": str(up.home)}}]))
    (root / "registry" / "death_svc" / "__init__.py").write_text(CALLBACKS)
    (root / "module" / "death_svc" / "__init__.py").write_text(WORKERS)
    up.dcmflow("services", "install", str(root))


def start_worker(up: Up, pool: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name],
        env={**up.env, "PREFECT_API_URL": up.api, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        stdout=(up.home.parent / f"{name}.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (flow runs and jobs leave its process group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_machine(worker: subprocess.Popen[bytes]) -> None:
    """``kill -9`` the worker's process group and everything it started: the machine dies."""
    below = descendants(worker.pid)
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait(timeout=10)


def shorten_zombie_window(api: str, seconds: int) -> None:
    """Set the declared zombie automation's ``within`` (Prefect's REST API, as the UI does)."""
    with api_client(api) as client:
        (automation,) = [a for a in client.post("/automations/filter", json={}).raise_for_status().json() if a["name"] == ZOMBIE]
        assert automation["trigger"]["within"] == 90.0  # as declared
        automation["trigger"]["within"] = seconds
        fields = ("name", "description", "enabled", "trigger", "actions", "actions_on_trigger", "actions_on_resolve")
        client.put(f"/automations/{automation['id']}", json={k: automation[k] for k in fields}).raise_for_status()


def state_time(run: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(run["state"]["timestamp"]).timestamp()


def test_a_killed_worker_s_series_runs_again_and_is_processed_once(
    tmp_path_factory: pytest.TempPathFactory, migrated_prefect_db: Path
) -> None:
    up = make_up(tmp_path_factory.mktemp("death"), "home", install=False)
    up.seed_prefect_db(migrated_prefect_db)
    up.extra_env["DCMFLOW_WORK_POOL"] = "death-pool"
    began = time.monotonic()
    install_service(up)
    up.start()
    marks = {"up": time.monotonic() - began}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        shorten_zombie_window(up.api, ZOMBIE_WINDOW)
        workers.append(start_worker(up, "death-pool", "machine-a"))
        by_series = write_study(up.home.parent / "study", series=1)
        (uid,) = by_series
        up.send(by_series[uid][0].parent)
        wait_for("the job to start on machine a", lambda: any(line.startswith("start") for line in up.ledger()), timeout=90, every=0.2)
        marks["job started"] = time.monotonic() - began
        kill_machine(workers[0])
        killed = time.time()
        workers.append(start_worker(up, "death-pool", "machine-b"))

        def ended() -> list[dict[str, Any]] | None:
            runs = up.flow_runs("process-series", series_uid=uid)
            done = len(runs) == 2 and all(r["state"]["type"] in ("COMPLETED", "CRASHED", "FAILED") for r in runs)
            return runs if done else None

        first, second = wait_for("a crash and a second run to end", ended, timeout=120)
        print(
            f"\nkill -9 → first run Crashed: {state_time(first) - killed:.1f} s; "
            f"→ second run Completed: {state_time(second) - killed:.1f} s (zombie window {ZOMBIE_WINDOW} s); "
            + ", ".join(f"{name} at {at:.1f} s" for name, at in marks.items())
        )
        assert first["state"]["type"] == "CRASHED" and "heartbeats stopped" in first["state"]["message"]
        assert second["state"]["type"] == "COMPLETED", second["state"]
        assert second["parameters"] == {"series_uid": uid, "revision": 1, "trigger": "prefect.flow-run.Crashed"}

        repository = up.repository()
        crashed, done = up.sessions(uid)
        assert (crashed.state, crashed.flow_run_id, crashed.revision) == ("crashed", first["id"], 1)
        assert (done.state, done.flow_run_id, done.revision) == ("completed", second["id"], 1)
        released = repository.get_session_data(crashed.id, "released")
        assert f"flow run {first['id']} is Crashed" in released["reason"] and second["id"] in released["reason"]
        assert [(j.job_name, j.state) for j in repository.list_jobs(session_id=crashed.id)] == [("count-slices", "crashed")]
        assert [(j.job_name, j.state) for j in repository.list_jobs(session_id=done.id)] == [("count-slices", "succeeded")]
        # processed once: one job finished; its one output stored once, under the new session's keys
        assert [line.split()[0] for line in up.ledger()] == ["start", "start", "done"]
        assert repository.list_session_files(crashed.id) == []
        (output,) = repository.list_session_files(done.id)
        assert output.object_key == f"sessions/{done.id}/files/count-slices/counts/slices.txt"
        assert len(up.flow_runs("process-series", series_uid=uid)) == 2  # the completed run is not crashed again
    finally:
        for worker in workers:
            stop_worker(worker)
        up.stop()
    print(f"test took {time.monotonic() - began:.1f} s")
