"""Run one job in its own process group, with a real timeout (no Prefect here).

Prefect's ``timeout_seconds`` cannot interrupt a blocking call in a worker thread
(reference/prefect.md §4, measured: a 1 s timeout around ``subprocess.run(["sleep", "4"])``
returned after 4 s). So every job is a child process started with
``start_new_session=True`` (its own process group) and the timeout is enforced here:
``SIGTERM`` to the whole group, ``SIGKILL`` after a short grace, so the job and anything it
started are gone within a second of the limit. After a normal exit the group is killed too,
so a worker's stray background children never outlive its job.

The child runs :mod:`tasks._job_runner` with the service's interpreter (the project's, or
the service's own virtual environment, see :mod:`tasks.venvs`), with ``DATA``, ``MODULES``
and ``LOGS`` set. Its stdout and stderr (one pipe) go line by line to a log file and to an
optional callback (the Prefect run logger).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_KILL_GRACE",
    "PROJECT_ROOT",
    "JobProcess",
    "ProcessOutcome",
    "run_job_process",
    "kill_group",
    "pid_alive",
]

DEFAULT_KILL_GRACE = 0.5
"""Seconds between ``SIGTERM`` and ``SIGKILL`` of a timed-out job's process group."""

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""Folder holding the ``tasks`` package: on the child's ``PYTHONPATH`` so the runner imports."""

_TAIL_LINES = 20


@dataclass(frozen=True)
class JobProcess:
    """What to run: one worker call in one process.

    Parameters
    ----------
    python
        Interpreter (``sys.executable`` or a service venv's ``bin/python``).
    worker
        Dotted worker name.
    import_paths
        Folders put first on the child's ``sys.path`` (the service's ``module/``, ``$MODULES``).
    kwargs
        ``jobName``, ``headers``, ``params``, ``added_params`` (JSON-serialisable).
    env
        Extra environment: ``DATA``, ``MODULES``, ``LOGS`` (added to a copy of ours).
    work_dir
        Private folder for the spec and result files.
    log_path
        File receiving the process's stdout and stderr.
    timeout
        Seconds before the process group is killed.
    cwd
        Working directory of the process (default: ``env["DATA"]`` if set).
    """

    python: str
    worker: str
    import_paths: Sequence[str]
    kwargs: Mapping[str, Any]
    env: Mapping[str, str]
    work_dir: Path
    log_path: Path
    timeout: float
    cwd: Path | None = None


@dataclass
class ProcessOutcome:
    """What happened to one job process."""

    status: Literal["succeeded", "failed", "timed_out"]
    exit_code: int | None
    pid: int
    started: float  # time.time()
    finished: float
    result: Any = None
    error: str | None = None
    tail: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        """Seconds from start to finish."""
        return self.finished - self.started


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def kill_group(proc: subprocess.Popen[bytes], grace: float = DEFAULT_KILL_GRACE) -> None:
    """``SIGTERM`` the process group of ``proc``, then ``SIGKILL`` it after ``grace`` seconds.

    The final ``SIGKILL`` goes to the group even when the leader exited on ``SIGTERM``, so
    children that ignore ``SIGTERM`` die too.
    """
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """``proc.wait(timeout)`` that returns the moment the process exits.

    ``Popen.wait`` with a timeout polls in sleeps growing to 50 ms, so a job that exits
    waits 25 ms on average for nobody (bench/dag); a pidfd (Linux ≥ 5.3) wakes ``poll`` at
    the exit itself. Elsewhere, ``Popen.wait``.

    Raises
    ------
    subprocess.TimeoutExpired
        The process still runs after ``timeout`` seconds.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or a kernel without pidfds
        proc.wait(timeout=timeout)
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    proc.wait()


def _pump(stream: Any, log: Any, tail: deque[str], on_line: Callable[[str], None] | None) -> None:
    for raw in iter(stream.readline, b""):
        log.write(raw)
        log.flush()
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        tail.append(line)
        if on_line is not None:
            try:
                on_line(line)
            except Exception:  # noqa: BLE001 - a logging problem never fails the job
                pass
    stream.close()


def _describe_exit(code: int, tail: Sequence[str]) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return f"exit code {code}" + (f": {last}" if last else "")


def run_job_process(
    job: JobProcess,
    *,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    grace: float = DEFAULT_KILL_GRACE,
) -> ProcessOutcome:
    """Run ``job`` to completion, failure or timeout.

    Parameters
    ----------
    job
        What to run.
    on_line
        Called with every line the process writes (stdout and stderr).
    on_start
        Called with the pid once the process started.
    grace
        Seconds between ``SIGTERM`` and ``SIGKILL`` on timeout.

    Returns
    -------
    ProcessOutcome
        ``succeeded`` (exit 0), ``failed`` (non-zero exit or a signal) or ``timed_out``.
    """
    job.work_dir.mkdir(parents=True, exist_ok=True)
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path = job.work_dir / "spec.json"
    result_path = job.work_dir / "result.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(
        json.dumps(
            {
                "worker": job.worker,
                "import_paths": list(job.import_paths),
                "kwargs": dict(job.kwargs),
                "result_path": str(result_path),
            },
            default=str,
        ),
        encoding="utf-8",
    )
    env = os.environ.copy()
    env.update(job.env)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    cwd = job.cwd or (Path(job.env["DATA"]) if "DATA" in job.env else None)
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    with job.log_path.open("ab") as log:
        started = time.time()
        proc = subprocess.Popen(
            [job.python, "-m", "tasks._job_runner", str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, log, tail, on_line), daemon=True)
        reader.start()
        timed_out = False
        try:
            if on_start is not None:
                on_start(proc.pid)  # inside: if it raises, the job does not run on unwatched
            _wait_exit(proc, job.timeout)  # counted from here, after on_start recorded the start
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc, grace)
        except BaseException:
            kill_group(proc, 0.0)  # the caller is going away: never leave the job behind
            raise
        finished = time.time()
        if not timed_out:
            try:  # the worker's stray children go with it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reader.join(timeout=2.0)
        if timed_out:
            message = f"timed out after {job.timeout:g} s; process group killed"
            log.write(f"dcmflow: {message}\n".encode())
    code = proc.returncode
    if timed_out:
        return ProcessOutcome("timed_out", code, proc.pid, started, finished, error=message, tail=list(tail))
    if code != 0:
        return ProcessOutcome(
            "failed", code, proc.pid, started, finished, error=_describe_exit(code, list(tail)), tail=list(tail)
        )
    result: Any = None
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except ValueError:
            result = None
    return ProcessOutcome("succeeded", 0, proc.pid, started, finished, result=result, tail=list(tail))


def default_python() -> str:
    """The project's interpreter."""
    return sys.executable
