"""A real Prefect server for the tests, started once per session in a subprocess.

Starting one takes 15-20 s on these machines (fresh SQLite database and migrations), so the
session shares it; tests isolate themselves by using their own flow/series names.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PrefectServer", "start_prefect_server", "snapshot_database"]


@dataclass
class PrefectServer:
    """A running ``prefect server start`` subprocess."""

    api_url: str
    home: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    empty_db: Path | None = None
    """A copy of its database taken right after start (:func:`snapshot_database`), if one was."""

    def stop(self) -> None:
        """Terminate the server's whole process group and wait for it to exit."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def env(self) -> dict[str, str]:
        """Environment variables that point a client or a subprocess at this server."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_prefect_server(home: Path, *, timeout: float = 90.0, database_url: str | None = None) -> PrefectServer:
    """Start ``prefect server start`` with its own PREFECT_HOME and SQLite database
    (or ``database_url``, e.g. ``postgresql+asyncpg://…``, as in production).

    Raises
    ------
    RuntimeError
        If the server does not answer ``/api/health`` within ``timeout`` seconds; the
        message carries the tail of its log.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        DO_NOT_TRACK="1",
    )
    log_path = home / "server.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, stopped as one
    )
    api_url = f"http://127.0.0.1:{port}/api"
    server = PrefectServer(api_url, home, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"Prefect server did not become healthy within {timeout:.0f} s:\n{tail}")


def snapshot_database(server: PrefectServer, dest: Path) -> Path:
    """Copy a running server's SQLite database to ``dest`` (sqlite3's online backup: a consistent
    copy while the server runs) and return ``dest``.

    Taken right after start, it is a migrated, empty Prefect database: a ``dcmflow up`` whose home
    is seeded with it starts its server in 7 s instead of 20 s (the migrations of a fresh database).
    """
    import sqlite3

    dest.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(server.home / "prefect.db") as source, sqlite3.connect(dest) as target:
        source.backup(target)
    return dest


def stop_worker(worker: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a ``prefect worker start`` started in its own session: SIGTERM to its process group,
    then SIGKILL after ``grace`` seconds, as Docker does after its default stop timeout.

    Prefect turns a worker's first SIGTERM into SIGINT ("stop dequeuing, let the runs finish")
    and a second one into SIGKILL. Seen here (Prefect 3.8.8): a worker with no flow run left
    sometimes stays in its event loop after the first one, for half an hour until killed. The
    escalation is reported as a warning (with the process group) so it stays visible without
    failing a test whose assertions already held.
    """
    import warnings

    if worker.poll() is not None:
        return
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    still = subprocess.run(["ps", "-o", "pid=,etime=,args=", "-g", str(worker.pid)], capture_output=True, text=True).stdout
    warnings.warn(f"worker {worker.pid} did not stop within {grace:g} s of SIGTERM; killed. Its group:\n{still}", stacklevel=2)
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    worker.wait(timeout=30)


def server_unless(api_url: str | None, home: Path) -> tuple[str, PrefectServer | None]:
    """``api_url`` when a running server was named, else a new server under ``home`` (the
    caller stops it); benchmarks print its start-up time, which they do not count."""
    if api_url is not None:
        return api_url, None
    began = time.monotonic()
    server = start_prefect_server(home)
    print(f"prefect server started in {time.monotonic() - began:.1f} s (not counted)")
    return server.api_url, server
