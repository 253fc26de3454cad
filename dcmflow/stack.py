"""The processes of ``dcmflow up``: a Prefect server, the deployments served, the receiver.

``up`` is a supervisor. It starts

1. a Prefect server (``prefect server start``, its database under ``DCMFLOW_HOME/prefect``,
   kept between runs), unless ``PREFECT_API_URL`` names one, and waits until it is healthy;
2. the processes that serve ``deployments/prefect.yaml`` with its triggers (``dcmflow
   serve-flows``, one per work queue: ``live`` runs never wait behind ``backfill`` ones), and
   waits until the deployments exist; or, with a work pool, registers them there for workers;
3. the DICOM receiver (SCP, ingest processes, completeness monitor) in this process.

Children get ``DCMFLOW_HOME`` as an absolute path (served runs inherit this environment),
the API URL, and the mark ``DCMFLOW_UP_HOME=<home>``, which every descendant inherits: the
flow runs the runner starts and the jobs they start (in process groups of their own). When
``up`` is killed (``kill -9``), the server gets a parent-death signal and the runner's
guardian thread (:func:`watch_parent`) stops every marked process; whatever still survives is
found by the same mark and stopped when ``up`` starts again, before anything binds a port.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tasks.execution import pid_alive

from dcmflow.prefect_api import (
    FINAL_STATES,
    NoSuchDeployment,
    crash_flow_run,
    create_run,
    failed_actions,
    flow_run_state,
    healthy,
    recent_flow_runs,
    run_parameters,
    ui_url_of,
    work_queues,
)

from dcmflow.stack_state import StackState, clear_state, read_state, write_state

if TYPE_CHECKING:
    from deployments.loader import DeploymentSpec
    from storage.repository import Repository

    from dcmflow.settings import Settings

__all__ = [
    "UP_HOME_MARK",
    "StackError",
    "StackConfig",
    "Stack",
    "stop_orphans",
    "port_in_use",
    "watch_parent",
    "ensure_work_pool",
    "resume_runs",
    "action_watcher",
    "collect_status",
]

log = logging.getLogger("dcmflow.up")

UP_HOME_MARK = "DCMFLOW_UP_HOME"
"""Environment variable that marks every process ``up`` started, directly or not."""

DCMFLOW_COMMAND = [sys.executable, "-c", "from dcmflow.cli import main; main()"]
"""``dcmflow`` with this interpreter (no reliance on PATH)."""

_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """The stack cannot start or went down (one line for the user)."""


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    """What ``up`` runs, resolved from settings and options at the entry point."""

    home: Path
    """Absolute ``DCMFLOW_HOME``."""
    api_url: str | None
    """An external Prefect API (``PREFECT_API_URL``), or None to start one."""
    prefect_host: str = "127.0.0.1"
    prefect_port: int = 4200
    max_flow_runs: int = 4
    max_backfill_runs: int = 1
    """Runs of the ``backfill`` queue's deployments (reprocess, imports) at once, beside the live ones."""
    work_pool: str | None = None
    """Register the deployments on this process work pool (workers run them) instead of serving."""
    poll_seconds: float = 0.5
    """How often the runner asks for scheduled runs (Prefect's default is 10 s)."""
    server_timeout: float = 180.0
    ae_title: str = "DCMFLOW"
    dicom_host: str = ""
    dicom_port: int = 11112
    database: str = ""
    objects: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    """Added to every child's environment (settings the served runs must see)."""


def _gone() -> contextlib.suppress:
    """Signalling a process that already exited is fine."""
    return contextlib.suppress(ProcessLookupError, PermissionError)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the orphan sweep at the next start covers it
        pass


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound (another process listens there)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


def _marked_processes(home: Path) -> Iterator[int]:
    """Pids whose environment carries ``DCMFLOW_UP_HOME=<home>`` (Linux /proc)."""
    needle = f"{UP_HOME_MARK}={home}".encode()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            yield int(entry.name)


def stop_orphans(home: Path, *, grace: float = 10.0) -> list[int]:
    """Stop what an ``up`` for ``home`` that died left running; returns the pids signalled.

    Does nothing while that ``up`` is alive (the caller refuses to start a second one).
    """
    pids = list(_marked_processes(home))
    for pid in pids:
        with _gone():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            with _gone():
                os.kill(pid, signal.SIGKILL)
    return pids


def watch_parent(home: Path, *, every: float = 0.5) -> threading.Thread:
    """In the runner: when ``up`` dies, stop every process of the stack, then exit.

    The flow runs the runner starts live in sessions of their own, and the jobs they start
    in process groups of their own, so no signal reaches them when ``up`` is killed; this
    thread notices its parent is gone within ``every`` seconds and sweeps them (and the
    server) by the stack's mark. Prefect's own SIGTERM handling is not used here: with the
    server dying at the same moment it waits minutes on API calls.
    """
    parent = os.getppid()

    def guard() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        log.error("dcmflow up (pid %d) is gone: stopping the stack's processes", parent)
        stop_orphans(home, grace=5.0)
        os._exit(1)

    thread = threading.Thread(target=guard, name="dcmflow-up-guardian", daemon=True)
    thread.start()
    return thread


def ensure_work_pool(pool: str, queues: dict[str, int]) -> list[str]:
    """Create the process work pool and its queues if missing; set the queues' priorities.

    Uses Prefect's client (``PREFECT_API_URL``); returns what it created or changed, in words.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    done = []
    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
            if found.type != "process":
                raise StackError(f"work pool {pool} is of type {found.type!r}; dcmflow's flows need a process pool")
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            done.append(f"created process work pool {pool}")
        for name, priority in queues.items():
            try:
                queue = client.read_work_queue_by_name(name, work_pool_name=pool)
            except ObjectNotFound:
                client.create_work_queue(name=name, work_pool_name=pool, priority=priority)
                done.append(f"created queue {name} (priority {priority})")
                continue
            if queue.priority != priority:
                client.update_work_queue(queue.id, priority=priority)
                done.append(f"queue {name}: priority {queue.priority} -> {priority}")
    return done


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, grace: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        with _gone():
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, grace)
            with _gone():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Stack:
    """Start, watch and stop the processes of one ``dcmflow up``.

    Parameters
    ----------
    config : StackConfig
        What to run.
    start_receiver : callable
        Starts the receiver in this process and returns its ``stop`` (called last on start,
        first on stop), so this module does not need to know the receiver's wiring.
    repository : Repository, optional
        The records; with it, :func:`resume_runs` runs between the runner and the receiver.
    """

    def __init__(
        self,
        config: StackConfig,
        start_receiver: Callable[[], Callable[[], None]],
        repository: Repository | None = None,
    ) -> None:
        self.config = config
        self.repository = repository
        self.resumed: list[str] = []
        self._start_receiver = start_receiver
        self._stop_receiver: Callable[[], None] | None = None
        self.server: _Child | None = None
        self.runners: list[_Child] = []
        self.api_url = config.api_url or f"http://{config.prefect_host}:{config.prefect_port}/api"
        self.state: StackState | None = None

    # ------------------------------------------------------------------ environment

    def child_env(self) -> dict[str, str]:
        """The environment of every child: ours, absolute settings, the API URL and the mark."""
        env = os.environ.copy()
        env.update(self.config.extra_env)
        env.update(
            {
                "DCMFLOW_HOME": str(self.config.home),
                "PREFECT_API_URL": self.api_url,
                UP_HOME_MARK: str(self.config.home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1",
                # served runs are new processes: let them reuse compiled byte-code (cached in
                # the home, so an unwritable install is fine too) instead of recompiling
                "PYTHONPYCACHEPREFIX": str(self.config.home / "pycache"),
            }
        )
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        # the declared flow-run environment (prefect.yaml): the heartbeat the zombie automation
        # watches, so a served run whose process dies becomes Crashed; up's own environment wins
        from deployments.loader import flow_run_env

        for name, value in flow_run_env().items():
            env.setdefault(name, value)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], *, die_with_parent: bool = True) -> _Child:
        logs = self.config.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        return _Child(name, process, log_path)

    # ------------------------------------------------------------------ start

    def check_free(self) -> None:
        """Refuse to start next to a running ``up``, or on a busy port (one line)."""
        cfg = self.config
        running = read_state(cfg.home)
        # a container's `up` has the same pid at every start: its own pid in the file is stale
        if running is not None and running.pid != os.getpid():
            raise StackError(f"dcmflow up is already running for {cfg.home} (pid {running.pid}); `dcmflow status` shows it")
        swept = stop_orphans(cfg.home)
        if swept:
            log.warning("stopped %d process(es) left behind by an earlier dcmflow up (pids %s)", len(swept), swept)
        if port_in_use(cfg.dicom_host, cfg.dicom_port):
            raise StackError(f"DICOM port {cfg.dicom_port} is in use: stop what listens there or set DCMFLOW_DICOM_PORT")
        if cfg.api_url is None and port_in_use(cfg.prefect_host, cfg.prefect_port):
            raise StackError(
                f"Prefect port {cfg.prefect_host}:{cfg.prefect_port} is in use: set DCMFLOW_PREFECT_PORT, "
                "or PREFECT_API_URL to use the Prefect server that runs there"
            )

    def start_server(self) -> None:
        """Start ``prefect server start`` (unless external) and wait until it answers."""
        cfg = self.config
        if cfg.api_url is not None:
            if not healthy(cfg.api_url, timeout=10):
                raise StackError(f"the Prefect server at PREFECT_API_URL={cfg.api_url} does not answer {cfg.api_url}/health")
            return
        prefect_home = cfg.home / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        env = self.child_env()
        env.pop("PREFECT_API_URL")
        env["PREFECT_HOME"] = str(prefect_home)
        # As settings, not only flags: the UI asks the API at PREFECT_SERVER_UI_API_URL, which
        # Prefect derives from these (from the flags alone it would point at port 4200).
        env["PREFECT_SERVER_API_HOST"], env["PREFECT_SERVER_API_PORT"] = cfg.prefect_host, str(cfg.prefect_port)
        if not any(k in env for k in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")):
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", cfg.prefect_host, "--port", str(cfg.prefect_port)]
        log.info("starting the Prefect server on %s:%d (database under %s)", cfg.prefect_host, cfg.prefect_port, prefect_home)
        self.server = self._spawn("prefect-server", argv, env)
        self._wait(lambda: healthy(self.api_url), self.server, "the Prefect server to answer", cfg.server_timeout)

    def start_runner(self) -> None:
        """Serve ``deployments/prefect.yaml`` (a child process), or register it on the work pool;
        then wait until its deployments exist."""
        cfg = self.config
        if cfg.work_pool is not None:
            argv = [*DCMFLOW_COMMAND, "register-flows", "--pool", cfg.work_pool]
            log.info("registering the deployments on work pool %s", cfg.work_pool)
            registering = self._spawn("register-flows", argv, self.child_env())
            if registering.process.wait(timeout=cfg.server_timeout) != 0:
                raise StackError(f"could not register the deployments on work pool {cfg.work_pool}:\n{registering.tail()}")
            return
        # One runner per work queue of the declaration: a backlog of manual runs (backfill)
        # has runner slots of its own and never holds back the runs DICOM events start (live).
        from deployments.loader import read_specs, read_work_queues

        specs, declared = read_specs(), list(read_work_queues())
        unserved = [spec.name for spec in specs if declared and spec.work_queue not in declared]
        if unserved:
            raise StackError(f"deployments/prefect.yaml: {', '.join(unserved)} on no declared work queue ({', '.join(declared)})")
        queues: list[str | None] = [*declared] or [None]  # no queues declared: one runner serves everything
        for queue in queues:
            limit = cfg.max_backfill_runs if queue == "backfill" else cfg.max_flow_runs
            argv = [
                *DCMFLOW_COMMAND,
                "serve-flows",
                *(("--queue", queue) if queue else ()),
                *("--limit", str(limit), "--poll", str(cfg.poll_seconds), "--stack-home", str(cfg.home)),
            ]
            # no parent-death signal: its guardian (watch_parent) stops the flow runs and jobs too
            name = f"serve-flows-{queue}" if queue else "serve-flows"
            self.runners.append(self._spawn(name, argv, self.child_env(), die_with_parent=False))
        names = [spec.full_name for spec in specs]

        def served() -> bool:
            try:
                return all(
                    httpx.get(f"{self.api_url}/deployments/name/{name}", timeout=2).status_code == 200 for name in names
                )
            except httpx.HTTPError:
                return False

        for runner in self.runners:
            self._wait(served, runner, "the deployments to be served", cfg.server_timeout)

    def _wait(self, ready: Callable[[], bool], child: _Child, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if child.process.poll() is not None:
                raise StackError(f"{child.name} exited (code {child.process.returncode}) while waiting for {what}:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f} s waiting for {what}; log: {child.log_path}")
            time.sleep(0.25)

    def start(self) -> StackState:
        """Start everything (see the module docstring); on failure stop what started and raise."""
        cfg = self.config
        self.check_free()
        try:
            self.start_server()
            self.start_runner()
            if self.repository is not None:
                try:
                    self.resumed = resume_runs(self.api_url, self.repository, own_server=self.server is not None)
                except (httpx.HTTPError, NoSuchDeployment) as exc:
                    log.error("could not resume interrupted runs (their sessions stay marked running): %s", exc)
            self._stop_receiver = self._start_receiver()
        except BaseException:
            self.stop()
            raise
        self.state = StackState(
            pid=os.getpid(),
            api_url=self.api_url,
            ui_url=ui_url_of(self.api_url),
            ae_title=cfg.ae_title,
            dicom_host=cfg.dicom_host,
            dicom_port=cfg.dicom_port,
            home=str(cfg.home),
            database=cfg.database,
            objects=cfg.objects,
            started_at=dt.datetime.now(dt.UTC),
            server_pid=self.server.process.pid if self.server else None,
            runner_pids=[runner.process.pid for runner in self.runners],
            work_pool=cfg.work_pool,
        )
        write_state(cfg.home, self.state)
        return self.state

    # ------------------------------------------------------------------ run and stop

    def check_children(self) -> None:
        """Raise :class:`StackError` when the server or the runner has exited."""
        for child in (self.server, *self.runners):
            if child is not None and child.process.poll() is not None:
                raise StackError(f"{child.name} exited (code {child.process.returncode}); its log: {child.log_path}\n{child.tail()}")

    def stop(self) -> None:
        """Stop the receiver, then the runner (its flow runs end), then the server (idempotent)."""
        if self._stop_receiver is not None:
            stop, self._stop_receiver = self._stop_receiver, None
            stop()
        for child in (*self.runners, self.server):
            if child is not None:
                log.info("stopping %s", child.name)
                child.stop()
        self.runners, self.server = [], None
        stop_orphans(self.config.home)  # flow runs and jobs live in sessions of their own
        if self.state is not None:
            clear_state(self.config.home)
            self.state = None


# --------------------------------------------------------------------------- around the stack

STABLE_EVENT_OF_LEVEL = {"series": "dicom.series.stable", "study": "dicom.study.stable"}
"""A (series or study, revision) is processed by the deployment prefect.yaml starts on this event."""
UNCLAIMED_WINDOW = dt.timedelta(days=1)
"""How far back ``up`` looks for stable events that never became a run."""


def _deployment_of(level: str) -> DeploymentSpec:
    from deployments.loader import triggered_by

    return triggered_by(STABLE_EVENT_OF_LEVEL[level])


def _start_run(api_url: str, level: str, uid: str, revision: int) -> dict[str, Any]:
    """A recovery run of the level's deployment for (uid, revision)."""
    uid_param = "series_uid" if level == "series" else "study_uid"
    parameters = {uid_param: uid, "revision": revision, "trigger": "recovery"}
    return create_run(api_url, _deployment_of(level).full_name, parameters)


def _runs_of(api_url: str, level: str) -> set[tuple[Any, Any]]:
    """(uid, revision) of every run of the level's deployment the server knows (any state)."""
    uid_param = "series_uid" if level == "series" else "study_uid"
    return {(p.get(uid_param), p.get("revision")) for p in run_parameters(api_url, _deployment_of(level).name)}


def resume_runs(api_url: str, repository: Repository, *, own_server: bool, now: dt.datetime | None = None) -> list[str]:
    """Start again what a stopped or killed stack left unprocessed; returns the new flow run ids.

    1. A claimed session still RUNNING whose flow run cannot be running any more (this
       stack's own server and runner were restarted, or Prefect says the run ended) is marked
       crashed, its claim released and its flow run marked Crashed; a new run claims the same
       (series or study, revision).
    2. A revision whose stable event went out in the last day but that no run claimed, and
       of which the server has no run either (the server died between accepting the event
       and its trigger firing), gets its run now.

    Call it before the receiver starts, so nothing emitted meanwhile is counted as lost.
    """
    now = now or dt.datetime.now(dt.UTC)
    started = []
    for claim in repository.list_stale_claims():
        state = flow_run_state(api_url, claim.flow_run_id)
        if state is not None and state not in FINAL_STATES and not own_server:
            continue  # an external server: another runner may still be running it
        reason = f"interrupted: dcmflow up stopped while flow run {claim.flow_run_id} ran"
        if not repository.release_claim(claim.session_id, reason=reason):
            continue
        if claim.flow_run_id and state is not None and state not in FINAL_STATES:
            crash_flow_run(api_url, claim.flow_run_id, reason)
        run = _start_run(api_url, claim.level, claim.uid, claim.revision)
        started.append(run["id"])
        log.warning(
            "%s %s revision %d was interrupted (session %d): started it again as flow run %r",
            claim.level, claim.uid, claim.revision, claim.session_id, run["name"],
        )
    for level in STABLE_EVENT_OF_LEVEL:
        lost = repository.list_unclaimed_emitted(level, stable_after=now - UNCLAIMED_WINDOW, stable_before=now)
        if not lost:
            continue
        known = _runs_of(api_url, level)
        for uid, revision in lost:
            if (uid, revision) in known:
                continue  # its run exists (scheduled, or it ran without claiming: an older dcmflow)
            run = _start_run(api_url, level, uid, revision)
            started.append(run["id"])
            log.warning(
                "%s %s revision %d: its stable event never became a run (the server stopped first): "
                "started flow run %r", level, uid, revision, run["name"],
            )
    return started


def action_watcher(api_url: str) -> Callable[[], list[dict[str, Any]]]:
    """A callable that logs (once each) the automation actions that failed since it was made."""
    since = dt.datetime.now(dt.UTC)
    seen: set[str] = set()

    def check() -> list[dict[str, Any]]:
        try:
            new = [f for f in failed_actions(api_url, since) if f["id"] not in seen]
        except httpx.HTTPError as exc:
            log.debug("cannot read failed automation actions: %s", exc)
            return []
        for failure in new:
            seen.add(failure["id"])
            log.error("automation %r: its action failed: %s", failure["automation"], failure["reason"])
        return new

    return check


def collect_status(settings: Settings) -> dict[str, Any]:
    """Everything ``dcmflow status`` prints, as plain data (``--json`` prints it as is)."""
    from receiver.spools import total_depth
    from storage.models import SeriesState

    from dcmflow.wiring import repository_from

    home = settings.home
    state = read_state(home)
    report: dict[str, Any] = {
        "running": state is not None,
        "home": str(home),
        "stack": state.model_dump(mode="json") if state else None,
        "prefect_healthy": False,
        "flow_runs": [],
        "failed_actions": [],
        "work_queues": [],
    }
    repository = repository_from(settings)
    report["records"] = repository.count_records()
    report["waiting"] = [
        s.model_dump(mode="json", include={"series_uid", "modality", "instance_count", "last_received_at", "revision"})
        for s in repository.list_series(limit=50, state=SeriesState.RECEIVING.value)
    ]
    depth = total_depth(settings.spool_dir)  # every receiving process's spool
    report["spool_backlog"], report["spool_backlog_bytes"] = depth  # instances, bytes
    if state is not None:
        report["prefect_healthy"] = healthy(state.api_url)
        if report["prefect_healthy"]:
            report["flow_runs"] = recent_flow_runs(state.api_url)
            report["failed_actions"] = failed_actions(state.api_url, state.started_at)
            if state.work_pool:
                report["work_queues"] = work_queues(state.api_url, state.work_pool)
    return report
