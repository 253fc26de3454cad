"""``dcmflow up`` end to end: a real Prefect server, served deployments, DICOM over the wire.

The module's stack starts as the README's "First five minutes" says, ``dcmflow up --demo`` on a
fresh home: the first tests check what a newcomer sees (processed study, preview artifacts in
the Prefect UI, ``dcmflow doctor`` passing), the rest use the same stack with a counting service.

Each stack is ``dcmflow up`` as a subprocess (its own Prefect server, database and ports);
DCMTK's ``storescu`` sends the studies; what happened is read back from the Prefect REST API
and the records database. A quiet period of 2 s closes the series.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from dcmflow.cli.demo import DEMO_SERVICES
from dcmflow.settings import Settings
from dcmflow.prefect_api import api_client
from dcmflow.stack import UP_HOME_MARK
from dcmflow.stack_state import StackState, read_state
from dcmflow.synthetic import make_ct_series
from receiver.events import SERIES_STABLE, event_id, series_resource_id
from storage.models import SessionPublic
from tasks.execution import pid_alive
from tests.receiver.conftest import free_port

STORESCU = "/usr/bin/storescu"
_LINK = re.compile(r"^\s*(preview|qc)\s+series \d+ \(([^)]*)\)\s+(http://\S+/artifacts/artifact/([0-9a-f-]{36}))$", re.MULTILINE)
_PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
DCMFLOW = [sys.executable, "-c", "from dcmflow.cli import main; main()"]
STABLE_AGE = "2"

pytestmark = pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu is not installed")

# A dcm-processor service folder: one CT job that appends to a ledger outside the session,
# so "processed exactly once" is countable across crashes ("start" and "done" lines). Only a
# series' first attempt sleeps: the kill -9 test kills it there, the attempt after the restart
# has nothing to wait for.
SETTINGS_JSON = {
    "jobName": "count-slices",
    "worker": "e2e_svc.count",
    "callback": "e2e_svc.wants",
    "timeout": "5m",
    "params": {},
}
CALLBACKS = '''
def wants(jobName, headers, params, added_params, **kwargs):
    return headers.get("Modality") == "CT"
'''
WORKERS = '''
import os, time
from pathlib import Path


def count(jobName, headers, params, added_params, **kwargs):
    ledger = Path(params["home"]) / "ledger.txt"
    again = ledger.exists() and f"start {headers['seriesId']} " in ledger.read_text()
    sleep = 0.0 if again else float(params["sleep"])
    with ledger.open("a") as fh:
        fh.write(f"start {headers['seriesId']} {os.getpid()}\\n")
    time.sleep(sleep)
    slices = len(list((Path(os.environ["DATA"]) / headers["dcmpath"]).glob("*.dcm")))
    with ledger.open("a") as fh:
        fh.write(f"done {headers['seriesId']} {slices}\\n")
'''


def write_service(root: Path, home: Path, job_sleep: float) -> Path:
    (root / "registry" / "e2e_svc").mkdir(parents=True)
    (root / "module" / "e2e_svc").mkdir(parents=True)
    job = {**SETTINGS_JSON, "params": {"home": str(home), "sleep": job_sleep}}
    (root / "registry" / "settings.json").write_text(json.dumps([job]))
    (root / "registry" / "e2e_svc" / "__init__.py").write_text(CALLBACKS)
    (root / "module" / "e2e_svc" / "__init__.py").write_text(WORKERS)
    return root


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Up:
    """One ``dcmflow up`` subprocess and what it needs."""

    home: Path
    dicom_port: int
    prefect_port: int
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    up_args: tuple[str, ...] = ()
    demo_output: str = ""

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DCMFLOW_"))}
        env.update(
            DCMFLOW_HOME=str(self.home),
            DCMFLOW_STABLE_AGE=STABLE_AGE,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            TCP_NODELAY="1",
            # Prefect server settings for the tests (the server up starts inherits them): zombie
            # runs are looked for every second, not every 5 s, and events are stored each second,
            # not every 5 s, so what the tests wait for is there sooner. Behaviour is unchanged.
            PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY="PT1S",
            PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL="1",
        )
        env.update(self.extra_env)
        return env

    @property
    def log(self) -> Path:
        return self.home.parent / f"up-{self.home.name}.log"

    def seed_prefect_db(self, migrated: Path) -> None:
        """Start the stack's own Prefect server on a copy of ``migrated`` (conftest's
        ``migrated_prefect_db``) instead of a fresh database: 7 s instead of 20 s, for a test that
        is not about a fresh home (the module's ``stack`` is)."""
        (self.home / "prefect").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated, self.home / "prefect" / "prefect.db")

    def start(self) -> StackState:
        self.process = subprocess.Popen(
            [*DCMFLOW, "up", "--port", str(self.dicom_port), "--prefect-port", str(self.prefect_port), *self.up_args],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> StackState | None:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"dcmflow up exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            state = read_state(self.home)
            return state if state is not None and state.pid == self.process.pid else None  # type: ignore[union-attr]

        return wait_for("dcmflow up to be serving", ready, timeout=240)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def api(self) -> str:
        return self.extra_env.get("PREFECT_API_URL", f"http://127.0.0.1:{self.prefect_port}/api")

    def dcmflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*DCMFLOW, *args], env=self.env, capture_output=True, text=True, check=check, timeout=120)

    def send(self, folder: Path) -> None:
        subprocess.run(
            [STORESCU, "-aec", "DCMFLOW", "127.0.0.1", str(self.dicom_port), "+sd", "+r", str(folder)],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def settings(self) -> Settings:
        """The stack's settings (its home, and any database or object store in ``extra_env``)."""
        return Settings(**{k.removeprefix("DCMFLOW_").lower(): v for k, v in self.env.items() if k.startswith("DCMFLOW_")})

    def repository(self):  # type: ignore[no-untyped-def]
        from dcmflow.wiring import repository_from

        return repository_from(self.settings())

    def sessions(self, series_uid: str) -> list[SessionPublic]:
        return [s for s in self.repository().list_sessions(series_uid=series_uid)]

    def flow_runs(self, deployment: str, **parameters: Any) -> list[dict[str, Any]]:
        body = {"deployments": {"name": {"any_": [deployment]}}, "limit": 200, "sort": "EXPECTED_START_TIME_ASC"}
        with api_client(self.api) as api:
            runs = api.post("/flow_runs/filter", json=body).raise_for_status().json()
        return [r for r in runs if all(r["parameters"].get(k) == v for k, v in parameters.items())]

    def install_service(self, job_sleep: float) -> None:
        self.dcmflow("services", "install", str(write_service(self.home.parent / f"{self.home.name}-service", self.home, job_sleep)))

    def ledger(self) -> list[str]:
        path = self.home / "ledger.txt"
        return path.read_text().splitlines() if path.exists() else []


def write_study(
    folder: Path, *, series: int = 2, slices: int = 4, study_uid: str | None = None, seed: int = 0, description: str | None = None
) -> dict[str, list[Path]]:
    """A CT study of ``series`` series as files; returns the files by series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    by_series: dict[str, list[Path]] = {}
    for index in range(series):
        extra = {"series_description": description} if description else {}
        datasets = make_ct_series(slices, 32, 32, study_uid=study_uid, seed=seed + index, **extra)
        uid = str(datasets[0].SeriesInstanceUID)
        for number, ds in enumerate(datasets):
            path = folder / f"{uid}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            by_series.setdefault(uid, []).append(path)
    return by_series


def make_up(root: Path, name: str, job_sleep: float = 0.0, *, install: bool = True) -> Up:
    home = root / name
    home.mkdir(parents=True)
    up = Up(home, free_port(), free_port())
    if install:
        up.install_service(job_sleep)
    return up


def completed(runs: list[dict[str, Any]]) -> bool:
    return bool(runs) and all(r["state"]["type"] == "COMPLETED" for r in runs)


def _failed_run_logs(up: Up) -> str:
    """The Prefect logs of the failed flow runs: what went wrong is there, not in up's log."""
    with api_client(up.api) as api:
        runs = api.post("/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}}}).json()
        logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}, "limit": 200}).json()
    return "\n".join(f"{log['level']} {log['message']}" for log in logs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """The README's first command on a fresh home: ``dcmflow up --demo`` with the embedded
    defaults and no service. Once the demo is done, the built-ins it enabled are disabled and
    the counting service installed, for the tests after the newcomer's."""
    up = make_up(tmp_path_factory.mktemp("e2e"), "home", install=False)
    up.up_args = ("--demo",)
    up.start()
    try:
        wait_for("the demo to finish", lambda: re.search("the demo (study was processed|failed)", up.log.read_text()), timeout=300)
        if "the demo study was processed" not in up.log.read_text():
            pytest.fail(up.log.read_text()[-3000:] + _failed_run_logs(up))
        up.demo_output = up.log.read_text()
        for name in DEMO_SERVICES:
            up.dcmflow("services", "disable", name)
        up.install_service(0.0)
        yield up
    finally:
        up.stop()


def test_up_demo_processes_the_study_and_links_its_previews(stack: Up) -> None:
    log = stack.demo_output
    assert "enabled the built-in service preview" in log and "enabled the built-in service qc" in log
    links = _LINK.findall(log)
    assert sorted((job, description) for job, description, _, _ in links) == [
        ("preview", "AXIAL 1.25mm LUNG"), ("preview", "AXIAL 1.25mm STND"),
        ("qc", "AXIAL 1.25mm LUNG"), ("qc", "AXIAL 1.25mm STND"),
    ]
    ui = json.loads(stack.dcmflow("status", "--json").stdout)["stack"]["ui_url"].rstrip("/")
    assert all(url.startswith(f"{ui}/artifacts/artifact/") for _, _, url, _ in links)
    # The UI served on a port of our choosing talks to the API on that port, not on 4200.
    assert httpx.get(f"{ui}/ui-settings", timeout=10).raise_for_status().json()["api_url"] == stack.api
    with api_client(stack.api) as api:
        for job, _, _, artifact_id in links:
            artifact = api.get(f"/artifacts/{artifact_id}").raise_for_status().json()
            assert artifact["type"] == "markdown" and artifact["flow_run_id"] and artifact["key"].startswith(f"{job}-series-")
            if job == "qc":
                assert "instances" in artifact["data"].lower()
                continue
            images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in _PNG.findall(artifact["data"])]
            assert len(images) == 2  # the middle slice and the montage
            for image in images:
                pixels = np.asarray(image.convert("L"), dtype=float)
                # Windowed: neither black nor saturated, with real contrast.
                assert 0.02 < (pixels > 0).mean() and (pixels >= 255).mean() < 0.5 and pixels.std() > 10


def test_doctor_passes_on_the_embedded_defaults_while_up_runs(stack: Up) -> None:
    done = stack.dcmflow("doctor", "--json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["check"]: row for row in json.loads(done.stdout)}
    assert {row["status"] for row in rows.values()} <= {"ok", "warn", "skip"}, rows
    for check in ("database", "object store", "prefect api", "prefect deployments", "services"):
        assert rows[check]["status"] == "ok", rows[check]


@pytest.fixture(scope="module")
def study(stack: Up, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A two-series study sent once, processed by the triggers (the other tests build on it)."""
    by_series = write_study(tmp_path_factory.mktemp("study"))
    stack.send(next(iter(by_series.values()))[0].parent)
    for uid in by_series:
        wait_for(f"process-series of {uid} to complete", lambda uid=uid: completed(stack.flow_runs("process-series", series_uid=uid)))
    return by_series


def test_a_sent_study_runs_process_series_per_series_and_process_study_once(stack: Up, study: dict[str, list[Path]]) -> None:
    study_uid = str(stack.repository().get_series(next(iter(study))).study_uid)
    for uid in study:
        runs = stack.flow_runs("process-series", series_uid=uid)
        assert [(r["parameters"]["revision"], r["parameters"]["trigger"]) for r in runs] == [(1, SERIES_STABLE)]
        (session,) = stack.sessions(uid)
        assert (session.state, session.revision, session.trigger) == ("completed", 1, SERIES_STABLE)
        assert session.flow_run_id == runs[0]["id"]
        jobs = stack.repository().list_jobs(uid)
        assert [(j.job_name, j.state) for j in jobs] == [("count-slices", "succeeded")]
    assert sorted(line for line in stack.ledger() if line.startswith("done")) == sorted(f"done {uid} 4" for uid in study)
    study_runs = wait_for("process-study to complete", lambda: completed(r := stack.flow_runs("process-study", study_uid=study_uid)) and r)
    assert len(study_runs) == 1 and study_runs[0]["parameters"]["revision"] == 1
    received = wait_for("study-received to complete", lambda: completed(r := stack.flow_runs("study-received", study_uid=study_uid)) and r)
    assert len(received) == 1


def test_an_identical_resend_starts_nothing(stack: Up, study: dict[str, list[Path]]) -> None:
    before = {uid: len(stack.flow_runs("process-series", series_uid=uid)) for uid in study}
    stack.send(next(iter(study.values()))[0].parent)
    time.sleep(float(STABLE_AGE) + 8)  # longer than quiet period + trigger + runner poll
    assert {uid: len(stack.flow_runs("process-series", series_uid=uid)) for uid in study} == before
    assert {stack.repository().get_series(uid).revision for uid in study} == {1}  # type: ignore[union-attr]


def test_a_late_instance_makes_revision_2_and_exactly_one_new_run(stack: Up, study: dict[str, list[Path]], tmp_path: Path) -> None:
    uid, files = next(iter(study.items()))
    import pydicom

    late = pydicom.dcmread(files[0])
    late.SOPInstanceUID = generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.InstanceNumber = 99
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    stack.send(tmp_path)
    runs = wait_for(
        "a revision 2 run to complete",
        lambda: completed(r := stack.flow_runs("process-series", series_uid=uid, revision=2)) and r,
    )
    time.sleep(3)
    assert len(stack.flow_runs("process-series", series_uid=uid, revision=2)) == len(runs) == 1
    assert [(s.revision, s.state) for s in stack.sessions(uid)] == [(1, "completed"), (2, "completed")]


def _post_event(api: str, *, event_uuid: uuid.UUID, series_uid: str, revision: Any) -> None:
    event = {
        "id": str(event_uuid),
        "occurred": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "event": SERIES_STABLE,
        "resource": {"prefect.resource.id": series_resource_id(series_uid), "dicom.series-uid": series_uid},
        "payload": {"series_uid": series_uid, "revision": revision},
    }
    with api_client(api) as client:
        client.post("/events", json=[event]).raise_for_status()


def test_a_duplicated_event_starts_no_second_session(stack: Up, study: dict[str, list[Path]]) -> None:
    uid = list(study)[1]
    same_id = event_id(SERIES_STABLE, series_resource_id(uid), 1)  # what a re-sending receiver sends
    _post_event(stack.api, event_uuid=same_id, series_uid=uid, revision=1)
    _post_event(stack.api, event_uuid=uuid.uuid4(), series_uid=uid, revision=1)  # another id, same revision
    wait_for("the duplicate's run", lambda: len(stack.flow_runs("process-series", series_uid=uid)) >= 2)
    runs = wait_for("every run of the series to end", lambda: completed(r := stack.flow_runs("process-series", series_uid=uid)) and r)
    first, *duplicates = runs
    assert duplicates and all("already" in r["state"]["message"] and first["id"] in r["state"]["message"] for r in duplicates)
    assert len(stack.sessions(uid)) == 1
    assert sum(1 for line in stack.ledger() if line.startswith(f"done {uid}")) == 1


def test_prefect_deployment_run_runs_a_manual_session(stack: Up, study: dict[str, list[Path]]) -> None:
    uid = list(study)[1]
    env = {**stack.env, "PREFECT_API_URL": stack.api}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "process-series/process-series",
         "--param", f'series_uid="{uid}"', "--watch", "--watch-timeout", "120"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    manual = [s for s in stack.sessions(uid) if s.trigger == "manual"]
    assert [(s.state, s.revision) for s in manual] == [("completed", 1)]


def test_a_run_the_server_refuses_is_reported(stack: Up) -> None:
    _post_event(stack.api, event_uuid=uuid.uuid4(), series_uid="1.2.3.4.5.6.7", revision="not-a-number")
    status = wait_for(
        "status to report the refused run",
        lambda: (s := json.loads(stack.dcmflow("status", "--json").stdout))["failed_actions"] and s,
        timeout=60,
    )
    assert status["running"] and status["stack"]["dicom_port"] == stack.dicom_port
    wait_for("up to log it", lambda: "its action failed" in stack.log.read_text(), timeout=20)


def _marked(home: Path) -> list[int]:
    from dcmflow.stack import _marked_processes

    return list(_marked_processes(home))


def test_kill_9_mid_flow_then_restart_processes_the_series_exactly_once(
    tmp_path_factory: pytest.TempPathFactory, migrated_prefect_db: Path
) -> None:
    up = make_up(tmp_path_factory.mktemp("crash"), "home", job_sleep=6)
    up.seed_prefect_db(migrated_prefect_db)
    first = up.start()
    try:
        by_series = write_study(up.home.parent / "study", series=1)
        (uid,) = by_series
        up.send(by_series[uid][0].parent)
        wait_for("the job to start", lambda: any(line.startswith(f"start {uid}") for line in up.ledger()))
        assert up.process is not None
        os.kill(up.process.pid, signal.SIGKILL)
        up.process.wait()
        job_pid = int(next(line for line in up.ledger() if line.startswith("start")).split()[2])
        # the server, the runner, the flow run and its job all stop with up (nothing to trip over)
        wait_for("every process of the stack to stop", lambda: not _marked(up.home), timeout=30)
        assert first.server_pid and len(first.runner_pids) == 2  # live and backfill
        assert not any(pid_alive(p) for p in (first.server_pid, *first.runner_pids, job_pid))
        second = up.start()  # marks the interrupted session crashed and starts its revision again
        wait_for(
            "the series to be processed after the restart",
            lambda: any(s.state == "completed" for s in up.sessions(uid)),
            timeout=180,
        )
        assert second.pid != first.pid
        states = sorted(s.state for s in up.sessions(uid))
        assert states == ["completed", "crashed"]
        assert [line.split()[0] for line in up.ledger()] == ["start", "start", "done"]
        assert sum(1 for line in up.ledger() if line.startswith("done")) == 1
    finally:
        up.stop()
    assert not _marked(up.home), "nothing of the stack may outlive a clean stop"
    assert UP_HOME_MARK  # the mark the sweep looks for is the stack's contract


def test_backfill_without_a_stack_is_one_line(tmp_path: Path) -> None:
    up = Up(tmp_path / "home", free_port(), free_port())
    done = up.dcmflow("reprocess", "--all", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("Error: no running stack for DCMFLOW_HOME=") and "\n" not in done.stderr.strip()
