"""The job bodies that bench/dispatch/run.py dispatches, and the processes that serve them.

Imported by ``run.py`` (the series-flow side) and run as a program on the "channel machine"::

    python bench/dispatch/jobs.py task-worker CHANNEL   # (a) prefect.task_worker.serve(job-CHANNEL)

The ``run-job`` flow (mechanism (b)) is run by ``prefect worker start`` from the deployment
``run.py`` registers (entrypoint ``bench/dispatch/jobs.py:run_job``). Nothing of dcmflow is
imported: every body does what a dcmflow job costs at least, spawning ``python -c pass``.

Every body writes ``$BENCH_MARKS/<job_id>.start`` (its own wall clock, one machine, one clock)
when it starts, so the bench sees "job body started" without going through Prefect, and returns
``{"start": t, "pid": pid}`` through Prefect's result storage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

MODES = ("noop", "raise", "sleep")


def job_body(job_id: str, mode: str = "noop", seconds: float = 30.0) -> dict[str, Any]:
    """What one job does: mark its start, then spawn ``python -c pass``, raise, or sleep."""
    start = time.time()
    marks = os.environ.get("BENCH_MARKS")
    if marks:
        Path(marks, f"{job_id}.start").write_text(f"{start!r} {os.getpid()}\n")
    if mode == "raise":
        raise RuntimeError(f"job {job_id} failed on purpose")
    if mode == "sleep":
        time.sleep(seconds)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return {"start": start, "pid": os.getpid()}


def channel_task(channel: str):
    """The background task of one channel: task name ``job-<channel>``, its own task key.

    A task worker subscribes by *task key*, which Prefect derives from the function's
    ``__qualname__`` and a hash of its code object, not from the task's ``name``:
    ``with_options(name=...)`` keeps the key, so one function for all channels would let a
    ``gpu`` worker run ``cpu`` jobs. Each channel therefore gets its own function object with
    its own ``__qualname__`` (``job_gpu``); the flow and the worker must build it from the same
    code (same file, same lines), or the keys differ and the job is never picked up.
    """

    def _job(job_id: str, mode: str = "noop", seconds: float = 30.0) -> dict[str, Any]:
        return job_body(job_id, mode, seconds)

    _job.__name__ = _job.__qualname__ = f"job_{channel}"
    return task(name=f"job-{channel}", persist_result=True, retries=0)(_job)


@flow(name="run-job", persist_result=True)
def run_job(job_id: str, mode: str = "noop", seconds: float = 30.0) -> dict[str, Any]:
    """(b): one job as its own flow run of the ``run-job`` deployment, on a channel queue."""
    return job_body(job_id, mode, seconds)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "task-worker":
        raise SystemExit("usage: jobs.py task-worker CHANNEL")
    from prefect.task_worker import serve

    job = channel_task(sys.argv[2])
    print(f"serving {job.name} key={job.task_key}", flush=True)
    serve(job)  # default limit (10), as the brief asks


if __name__ == "__main__":
    main()
