"""The production layout for bench/scale/run.py, built from processes on this machine.

What ``tests/dcmflow/test_production_e2e.py`` builds, without pytest (copied, not imported:
bench/ does not import tests/):

* a Prefect server (``prefect server start`` in a subprocess) on a PostgreSQL database of its
  own when PostgreSQL answers, else on SQLite;
* the records on PostgreSQL (another database; ``dcmflow db upgrade`` first), else on a
  SQLite file every process opens;
* objects on an S3 endpoint: moto's ``ThreadedMotoServer`` on loopback in this process, or
  a real MinIO given with ``--endpoint``;
* ``dcmflow up`` with ``PREFECT_API_URL`` and ``DCMFLOW_WORK_POOL``: the receiver, and the
  deployments registered on the pool (it starts no server and runs no flows);
* ``prefect worker start`` processes, each with its own ``DCMFLOW_HOME`` (as if on its own
  machine: they share only the two databases and the object store).

Every process is started in its own process group and stopped by its id (SIGTERM, then
SIGKILL); the databases are dropped and the temporary folder removed by :meth:`Layout.close`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
DCMFLOW = [sys.executable, "-c", "from dcmflow.cli import main; main()"]
STORESCU = "/usr/bin/storescu"
ACTIVE_STATES = ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED"]
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def wait_until(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``Popen`` in a new session with SIGINT/SIGTERM held until the handle is returned, so an
    interrupt cannot leave a started process the bench does not know of."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        return subprocess.Popen(argv, start_new_session=True, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop_group(process: subprocess.Popen[bytes], grace: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Signal the process group we started (its own session), SIGKILL it after ``grace``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


# --------------------------------------------------------------------------- CPU accounting


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used by the process group ``pgid`` and its reaped children.

    Sums utime + stime + cutime + cstime over the group's live processes: a process that has
    exited and was waited for by a live member counts in that member's cutime/cstime, a live
    one by itself; read when the group is idle, that is everything the group ever ran (flow
    runs and job processes in sessions of their own included, once reaped).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[0] is the state (field 3 of stat), pgrp is field 5
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime (fields 14-17)
    return total / tick


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (every process on the machine)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]) - idle, sum(values[:8])


# --------------------------------------------------------------------------- databases


class Postgres:
    """Databases of this run on a PostgreSQL server (created here, dropped at the end)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def _connect(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=3)

    def reachable(self) -> str | None:
        """``None`` when it answers, else why not."""
        try:
            with self._connect() as conn:
                conn.execute("SELECT 1")
            return None
        except Exception as exc:  # noqa: BLE001 - any failure means: fall back to SQLite
            return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

    def create(self, name: str) -> str:
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop_all(self) -> None:
        for name in self.created:
            try:
                with self._connect() as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - report, keep cleaning
                print(f"  could not drop database {name}: {exc}", flush=True)
        self.created.clear()


def _driver(url: str, driver: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+')[0]}+{driver}://{rest}"


# --------------------------------------------------------------------------- the layout


@dataclass
class S3:
    endpoint: str
    access_key: str
    secret_key: str
    secure: bool
    kind: str
    server: Any = None  # ThreadedMotoServer when started here

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def start_s3(endpoint: str | None, access_key: str, secret_key: str, secure: bool) -> S3:
    if endpoint:
        return S3(endpoint, access_key, secret_key, secure, "external endpoint")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3(f"{host}:{port}", "testing", "testing", False, "moto's ThreadedMotoServer in the bench process, loopback", server)


@dataclass
class Layout:
    """The running pieces; :meth:`close` stops and removes all of them (idempotent)."""

    root: Path
    pool: str
    base_env: dict[str, str]
    postgres: Postgres | None = None
    prefect_db: str = "SQLite"
    records_db: str = "SQLite"
    s3: S3 | None = None
    server: subprocess.Popen[bytes] | None = None
    api_url: str = ""
    up: subprocess.Popen[bytes] | None = None
    dicom_port: int = 0
    shared: dict[str, str] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    http: httpx.Client | None = None

    # ------------------------------------------------------------------ start

    @classmethod
    def start(
        cls, root: Path, *, pool: str, postgres_admin: str | None, s3: tuple[str | None, str, str, bool],
        stable_age: str, extra: dict[str, str],
    ) -> Layout:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DCMFLOW_"))}
        env.update(
            PREFECT_HOME=str(root / "prefect-client"),  # never the user's ~/.prefect
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            TCP_NODELAY="1",
        )
        layout = cls(root=root, pool=pool, base_env=env)
        try:
            layout._start(postgres_admin, s3, stable_age, extra)
        except BaseException:
            layout.close()
            raise
        return layout

    def _start(self, postgres_admin: str | None, s3: tuple[str | None, str, str, bool], stable_age: str,
               extra: dict[str, str]) -> None:
        suffix = uuid.uuid4().hex[:8]
        prefect_url = f"sqlite+aiosqlite:///{self.root / 'prefect' / 'prefect.db'}"
        records_url = f"sqlite:///{self.root / 'records.db'}"
        if postgres_admin:
            pg = Postgres(postgres_admin)
            problem = pg.reachable()
            if problem is None:
                self.postgres = pg
                prefect_url = _driver(pg.create(f"prefect_scale_{suffix}"), "asyncpg")
                records_url = _driver(pg.create(f"records_scale_{suffix}"), "psycopg")
                self.prefect_db = f"PostgreSQL (database prefect_scale_{suffix})"
                self.records_db = f"PostgreSQL (database records_scale_{suffix})"
            else:
                print(f"PostgreSQL not reachable ({problem}): Prefect server and records on SQLite", flush=True)
        self.s3 = start_s3(*s3)
        t0 = time.monotonic()
        self._start_server(prefect_url)
        print(f"Prefect server on {self.prefect_db} up in {time.monotonic() - t0:.1f} s at {self.api_url}", flush=True)
        self.http = httpx.Client(base_url=self.api_url, timeout=30)
        self.shared = {
            "PREFECT_API_URL": self.api_url,
            "DCMFLOW_WORK_POOL": self.pool,
            "DCMFLOW_DATABASE_URL": records_url,
            "DCMFLOW_S3_ENDPOINT": self.s3.endpoint,
            "DCMFLOW_S3_ACCESS_KEY": self.s3.access_key,
            "DCMFLOW_S3_SECRET_KEY": self.s3.secret_key,
            "DCMFLOW_S3_SECURE": "true" if self.s3.secure else "false",
            "DCMFLOW_S3_BUCKET": f"dcmflow-scale-{suffix}",
            "DCMFLOW_STABLE_AGE": stable_age,
            **extra,
        }
        home = self.root / "receiver"
        home.mkdir()
        if self.postgres is not None:
            self.dcmflow(home, "db", "upgrade")  # PostgreSQL is migrated on purpose, never by `up`
        t0 = time.monotonic()
        self._start_up(home)
        print(f"dcmflow up (receiver, pool {self.pool}) ready in {time.monotonic() - t0:.1f} s; DICOM port {self.dicom_port}",
              flush=True)

    def _start_server(self, database_url: str) -> None:
        home = self.root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {k: v for k, v in self.base_env.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_API_DATABASE_CONNECTION_URL=database_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        log = (self.root / "prefect-server.log").open("ab")
        self.server = spawn(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.api_url = f"http://127.0.0.1:{port}/api"

        def healthy() -> bool:
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError("Prefect server exited:\n" + (self.root / "prefect-server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until("the Prefect server to answer /api/health", healthy, timeout=120)

    def env_for(self, home: Path) -> dict[str, str]:
        return {**self.base_env, **self.shared, "DCMFLOW_HOME": str(home)}

    def dcmflow(self, home: Path, *args: str) -> str:
        done = subprocess.run([*DCMFLOW, *args], env=self.env_for(home), cwd=home, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"dcmflow {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def _start_up(self, home: Path) -> None:
        from dcmflow.stack_state import read_state

        self.dicom_port = free_port()
        log = (self.root / "up.log").open("ab")
        self.up = spawn(
            [*DCMFLOW, "up", "--port", str(self.dicom_port), "--prefect-port", str(free_port())],
            env=self.env_for(home), cwd=home, stdout=log, stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            assert self.up is not None
            if self.up.poll() is not None:
                raise RuntimeError(f"dcmflow up exited with {self.up.returncode}:\n{(self.root / 'up.log').read_text()[-3000:]}")
            state = read_state(home)
            return state is not None and state.pid == self.up.pid

        wait_until("dcmflow up to be ready", ready, timeout=240)

    # ------------------------------------------------------------------ workers

    def start_worker(self, name: str, queues: list[str], limit: int, query_seconds: str) -> None:
        home = self.root / f"worker-{name}"
        home.mkdir()
        env = {**self.env_for(home), "PREFECT_WORKER_QUERY_SECONDS": query_seconds}
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool, "--type", "process",
                "--name", name, "--limit", str(limit)]
        for queue in queues:
            argv += ["--work-queue", queue]
        self.workers[name] = spawn(
            argv, env=env, cwd=home, stdout=(self.root / f"worker-{name}.log").open("ab"), stderr=subprocess.STDOUT,
        )

    def wait_workers_online(self, names: list[str], timeout: float = 120) -> None:
        def online() -> bool:
            for name in names:
                proc = self.workers[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{(self.root / f'worker-{name}.log').read_text()[-2000:]}")
            seen = {w["name"]: w for w in self.post(f"/work_pools/{self.pool}/workers/filter", {"limit": 100})}
            return all(n in seen and seen[n].get("status") == "ONLINE" for n in names)

        wait_until(f"workers {', '.join(names)} to be online", online, timeout=timeout)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the workers (together), the Prefect server and ``up``."""
        return {
            "workers": sum(group_cpu_seconds(p.pid) for p in self.workers.values() if p.poll() is None),
            "server": group_cpu_seconds(self.server.pid) if self.server is not None else 0.0,
            "up": group_cpu_seconds(self.up.pid) if self.up is not None else 0.0,
        }

    def stop_workers(self) -> None:
        for name in list(self.workers):
            stop_group(self.workers.pop(name), grace=30)

    # ------------------------------------------------------------------ REST

    def post(self, path: str, body: dict[str, Any]) -> Any:
        assert self.http is not None
        for attempt in range(5):
            response = self.http.post(path, json=body)
            if response.status_code not in (429, 502, 503) or attempt == 4:
                response.raise_for_status()
                return response.json()
            time.sleep(0.5 * (attempt + 1))

    def flow_runs(self, deployment: str, since: dt.datetime) -> list[dict[str, Any]]:
        body = {"deployments": {"name": {"any_": [deployment]}},
                "flow_runs": {"expected_start_time": {"after_": (since - dt.timedelta(seconds=60)).isoformat()}},
                "limit": 200, "sort": "EXPECTED_START_TIME_ASC"}
        return list(self.post("/flow_runs/filter", body))

    def active_runs(self) -> list[dict[str, Any]]:
        return list(self.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ACTIVE_STATES}}}, "limit": 50}))

    def pending_at(self, flow_run_id: str) -> dt.datetime | None:
        """When a worker took the run (its Pending state), from its state history."""
        assert self.http is not None
        response = self.http.get("/flow_run_states/", params={"flow_run_id": flow_run_id})
        response.raise_for_status()
        times = [parse_time(s["timestamp"]) for s in response.json() if s["type"] == "PENDING"]
        return min((t for t in times if t), default=None)

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return list(self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}))

    def wait_idle(self, timeout: float = 300) -> None:
        wait_until("no flow run scheduled, pending or running", lambda: not self.active_runs(), timeout=timeout, every=1.0)

    # ------------------------------------------------------------------ DICOM and records

    def send(self, folder: Path) -> None:
        """All files under ``folder`` in one association (DCMTK storescu)."""
        env = {**self.base_env, "TCP_NODELAY": "1"}
        done = subprocess.run([STORESCU, "-aec", "DCMFLOW", "127.0.0.1", str(self.dicom_port), "+sd", "+r", str(folder)],
                              env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-1000:]}")

    def repository(self):  # type: ignore[no-untyped-def]
        from dcmflow.settings import Settings
        from dcmflow.wiring import repository_from

        env = self.env_for(self.root / "receiver")
        return repository_from(Settings(**{k.removeprefix("DCMFLOW_").lower(): v for k, v in env.items()
                                           if k.startswith("DCMFLOW_")}))

    # ------------------------------------------------------------------ stop

    def close(self, keep: bool = False) -> None:
        self.stop_workers()
        if self.up is not None:
            if self.up.poll() is None:
                self.up.send_signal(signal.SIGINT)  # up's own clean stop, as Ctrl-C; then its group
                try:
                    self.up.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            stop_group(self.up, grace=10)
            self.up = None
        if self.server is not None:
            stop_group(self.server, grace=30)
            self.server = None
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.s3 is not None:
            self.s3.stop()
        if self.postgres is not None:
            self.postgres.drop_all()
        if keep:
            print(f"kept {self.root}", flush=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)
