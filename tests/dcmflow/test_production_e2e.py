"""The production layout end to end, for real except MinIO (issue 12's "done when").

* a Prefect server on PostgreSQL (its own database), records on PostgreSQL (another one),
  objects on the S3 endpoint on loopback (moto's threaded server, or MinIO when
  ``DCMFLOW_TEST_S3_ENDPOINT`` is set);
* ``dcmflow up`` with ``PREFECT_API_URL`` and ``DCMFLOW_WORK_POOL``: the receiver, and the
  deployments registered on the pool (it starts no server and serves nothing);
* two process workers with separate ``DCMFLOW_HOME``s, as if on two machines: ``series``
  takes the pool's ``live`` and ``backfill`` queues with ``--limit 1``, ``gpu`` takes only
  ``channel-gpu``. They share nothing but the two databases and the object store.

A service's DAG ``prep → infer (channel gpu) → report`` runs each job where it must, the
outputs flowing through the object store; a ``tpu`` job no worker serves fails at once with
the reason, its dependent skipped. Then a backlog of backfill runs and a new live series:
the live series starts before the backlog is through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dcmflow.prefect_api import api_client
from tests.conftest import S3Endpoint, _pg_admin_connect
from tests.dcmflow.test_up_e2e import Up, wait_for, write_study
from tests.prefect_server import PrefectServer, start_prefect_server, stop_worker
from tests.receiver.conftest import free_port

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="DCMTK storescu is not installed"),
]

POOL = "prod-e2e"
JOBS = [
    {"jobName": "prep", "worker": "chan_svc.prep", "callback": "chan_svc.wants", "timeout": "2m"},
    {"jobName": "infer", "worker": "chan_svc.infer", "callback": "chan_svc.wants", "dependsOn": "prep",
     "channel": "gpu", "timeout": "2m"},
    {"jobName": "report", "worker": "chan_svc.report", "callback": "chan_svc.wants", "dependsOn": "infer",
     "timeout": "2m"},
    {"jobName": "tpu-job", "worker": "chan_svc.prep", "callback": "chan_svc.wants", "channel": "tpu", "timeout": "2m"},
    {"jobName": "after-tpu", "worker": "chan_svc.prep", "callback": "chan_svc.wants", "dependsOn": "tpu-job",
     "timeout": "2m"},
]
CALLBACKS = '''
def wants(jobName, headers, params, added_params, **kwargs):
    return headers.get("Modality") == "CT"
'''
WORKERS = '''
import os
from pathlib import Path


def _out(headers, folder):
    path = Path(os.environ["DATA"]) / folder / (headers["seriesId"] + ".txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def prep(jobName, headers, params, added_params, **kwargs):
    slices = len(list((Path(os.environ["DATA"]) / headers["dcmpath"]).glob("*.dcm")))
    _out(headers, "prep").write_text(f"{slices}")


def infer(jobName, headers, params, added_params, **kwargs):
    slices = (Path(os.environ["DATA"]) / "prep" / (headers["seriesId"] + ".txt")).read_text()
    _out(headers, "infer").write_text(f"{slices} slices in {os.environ['DATA']}")


def report(jobName, headers, params, added_params, **kwargs):
    found = (Path(os.environ["DATA"]) / "infer" / (headers["seriesId"] + ".txt")).read_text()
    _out(headers, "report").write_text("report: " + found)
'''


def _write_service(root: Path) -> Path:
    (root / "registry" / "chan_svc").mkdir(parents=True)
    (root / "module" / "chan_svc").mkdir(parents=True)
    (root / "registry" / "settings.json").write_text(json.dumps(JOBS))
    (root / "registry" / "chan_svc" / "__init__.py").write_text(CALLBACKS)
    (root / "module" / "chan_svc" / "__init__.py").write_text(WORKERS)
    return root


def _database(name: str) -> str:
    with _pg_admin_connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop(name: str) -> None:
    with _pg_admin_connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Layout:
    """The servers, ``dcmflow up`` and the two workers."""

    def __init__(self, root: Path, server: PrefectServer, records_url: str, s3: S3Endpoint) -> None:
        self.root = root
        self.server = server
        self.shared = {
            "PREFECT_API_URL": server.api_url,
            "DCMFLOW_WORK_POOL": POOL,
            "DCMFLOW_CHANNEL_WAIT": "8",  # a channel nobody serves fails after 8 s (default 30)
            "DCMFLOW_DATABASE_URL": records_url,
            "DCMFLOW_S3_ENDPOINT": s3.endpoint,
            "DCMFLOW_S3_ACCESS_KEY": s3.access_key,
            "DCMFLOW_S3_SECRET_KEY": s3.secret_key,
            "DCMFLOW_S3_SECURE": "true" if s3.secure else "false",
            "DCMFLOW_S3_BUCKET": f"dcmflow-e2e-{uuid.uuid4().hex[:10]}",
        }
        home = root / "receiver"
        home.mkdir()
        self.up = Up(home, free_port(), free_port(), extra_env=dict(self.shared))
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start_worker(self, name: str, *queues: str) -> Path:
        home = self.root / f"worker-{name}"
        home.mkdir()
        env = {**self.up.env, "DCMFLOW_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"]
        for queue in queues:
            argv += ["--work-queue", queue]
        self.workers[name] = subprocess.Popen(
            argv, env=env, cwd=home, stdout=(self.root / f"worker-{name}.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return home

    def stop(self) -> None:
        for worker in self.workers.values():
            stop_worker(worker)
        self.up.stop()

    def flow_runs(self, deployment: str, **parameters: Any) -> list[dict[str, Any]]:
        return self.up.flow_runs(deployment, **parameters)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, s3_endpoint: S3Endpoint) -> Iterator[Layout]:
    root = tmp_path_factory.mktemp("production")
    suffix = uuid.uuid4().hex[:8]
    prefect_db, records_db = _database(f"prefect_e2e_{suffix}"), _database(f"records_e2e_{suffix}")
    base = postgres_url.rsplit("/", 1)[0]
    server = start_prefect_server(root / "prefect", database_url=f"{base.replace('+psycopg', '+asyncpg')}/{prefect_db}")
    built = Layout(root, server, f"{base}/{records_db}", s3_endpoint)
    try:
        built.up.dcmflow("db", "upgrade")  # a PostgreSQL database is migrated on purpose, not by `up`
        built.up.start()
        built.up.dcmflow("services", "install", str(_write_service(root / "service")))
        yield built
    finally:
        built.stop()
        server.stop()
        _drop(prefect_db)
        _drop(records_db)


def _outputs(up: Up, series_uid: str) -> dict[str, str]:
    """Each stored output file's text, by job, of the series' latest session (read from the store)."""
    from dcmflow.wiring import object_store_from

    repository, store = up.repository(), object_store_from(up.settings())
    session = up.sessions(series_uid)[-1]
    return {f.job_name: store.get(f.object_key).decode() for f in repository.list_session_files(session.id)}


def test_channel_jobs_run_on_their_workers_and_live_series_pass_the_backlog(layout: Layout) -> None:
    up = layout.up
    with api_client(up.api) as api:
        queues = api.post(f"/work_pools/{POOL}/queues/filter", json={}).raise_for_status().json()
    priorities = {q["name"]: q["priority"] for q in queues}
    assert priorities["live"] < priorities["backfill"]  # up created the pool and its queues
    layout.start_worker("series", "live", "backfill")
    gpu_home = layout.start_worker("gpu", "channel-gpu")
    by_series = write_study(layout.root / "study", series=1)
    (uid,) = by_series
    up.send(by_series[uid][0].parent)
    (series_run,) = wait_for("process-series to end", lambda: (r := up.flow_runs("process-series", series_uid=uid))
                             and r[0]["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED"} and r, timeout=240)
    jobs = {j.job_name: j for j in up.repository().list_jobs(uid)}
    assert {name: j.state for name, j in jobs.items()} == {
        "prep": "succeeded", "infer": "succeeded", "report": "succeeded", "tpu-job": "failed", "after-tpu": "skipped",
    }, {name: j.error for name, j in jobs.items()}
    assert series_run["state"]["type"] == "FAILED" and "tpu-job failed" in series_run["state"]["message"]
    assert "no worker serves channel 'tpu'" in (jobs["tpu-job"].error or "")
    assert "dependency 'tpu-job' failed" in (jobs["after-tpu"].error or "")
    # infer ran on the gpu worker, in its own home, from what prep stored; report saw infer's output
    outputs = _outputs(up, uid)
    assert outputs["prep"] == "4"
    assert outputs["infer"].startswith(f"4 slices in {gpu_home}")
    assert outputs["report"] == "report: " + outputs["infer"]
    (job_run,) = up.flow_runs("run-job")
    assert job_run["work_queue_name"] == "channel-gpu" and job_run["state"]["type"] == "COMPLETED"
    assert job_run["parameters"]["job"]["name"] == "infer" and job_run["parent_task_run_id"]
    status = json.loads(up.dcmflow("status", "--json").stdout)  # which queues, channels too, have workers
    queues = {q["name"]: q for q in status["work_queues"]}
    assert queues["channel-gpu"]["status"] == "READY" and queues["live"]["status"] == "READY"
    assert queues["channel-tpu"]["status"] == "NOT_READY" and queues["channel-tpu"]["waiting"] == 0

    # a backlog of backfill runs, then a new series: it starts while most of the backlog waits
    backlog = []
    for _ in range(3):  # `dcmflow reprocess --all` queues one backfill run per received series (one here)
        queued = up.dcmflow("reprocess", "--all", "--job", "after-tpu", "--json", check=False)
        assert queued.returncode == 0, queued.stderr
        backlog += [{"id": q["flow_run_id"]} for q in json.loads(queued.stdout)]
    assert len(backlog) == 3
    fresh = write_study(layout.root / "fresh", series=1, seed=7)
    (new_uid,) = fresh
    up.send(fresh[new_uid][0].parent)
    (live,) = wait_for("the new series' run to start", lambda: (r := up.flow_runs("process-series", series_uid=new_uid))
                       and r[0]["start_time"] and r, timeout=180)
    assert live["work_queue_name"] == "live"
    with api_client(up.api) as api:
        runs = {r["id"]: r for r in api.post("/flow_runs/filter", json={"limit": 100}).raise_for_status().json()}
    waiting = [run["id"] for run in backlog if not runs[run["id"]]["start_time"] or runs[run["id"]]["start_time"] > live["start_time"]]
    assert len(waiting) >= 2, f"the live run waited behind the backlog: {[runs[b['id']]['start_time'] for b in backlog]}"
    assert all(runs[b["id"]]["work_queue_name"] == "backfill" for b in backlog)
