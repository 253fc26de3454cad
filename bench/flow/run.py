"""Orchestration overhead of the per-series flow: a 10-job DAG of no-op workers per series.

Usage::

    python bench/flow/run.py [--series 5] [--max-parallel 4] [--api-url http://127.0.0.1:4200/api]

Without ``--api-url`` a Prefect server is started for the run (own SQLite database, as the
tests do); its start-up is not counted. Each series is processed by ``process_series`` in
this process, one after the other. The DAG: ``root`` → 8 independent jobs → ``sink`` (fan-out
then fan-in), every worker returns at once, so the whole flow time is overhead: Prefect
bookkeeping, headers, callbacks and planning, session records, file materialisation, one
Python process per job, output scan, artifacts. The work part (worker call time measured
inside the job process) is printed too, and subtracted.

Figures are printed, never asserted (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

NOOP_WORKERS = '''
import json, os, time


def noop(jobName, headers, params, added_params, **kwargs):
    t0 = time.perf_counter()
    result = {"job": jobName}
    with open(os.path.join(os.environ["LOGS"], "work.jsonl"), "a") as fh:
        fh.write(json.dumps({"job": jobName, "work": time.perf_counter() - t0}) + "\\n")
    return result
'''


def dag() -> list[dict[str, object]]:
    def job(name: str, **fields: object) -> dict[str, object]:
        return {"jobName": name, "worker": "noopsvc.noop", "callback": "noopsvc.always", **fields}

    middle = [f"step-{i}" for i in range(8)]
    return [job("root"), *(job(n, dependsOn="root") for n in middle), job("sink", dependsOn=middle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=5)
    parser.add_argument("--max-parallel", type=int, default=4)
    parser.add_argument("--api-url", default=None)
    args = parser.parse_args()

    from tests.factories import make_small_series
    from tests.prefect_server import server_unless
    from tests.tasks.helpers import make_home, write_service

    work = Path(tempfile.mkdtemp(prefix="dcmflow-bench-flow-"))
    api_url, server = server_unless(args.api_url, work / "prefect")
    home = make_home(work / "home")
    home.install(write_service(work / "src", "noop-svc", dag(), package="noopsvc", workers=NOOP_WORKERS,
                               callbacks="def always(**kwargs):\n    return True\n"))
    uids = [home.receive(make_small_series(4, seed=100 + i, patient_id=f"BENCH-{i}")) for i in range(args.series + 1)]

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import process_series

    os.environ["DCMFLOW_HOME"] = str(home.root)
    walls, works = [], []
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            for i, uid in enumerate(uids):
                t0 = time.perf_counter()
                state = process_series(uid, max_parallel=args.max_parallel, return_state=True)
                wall = time.perf_counter() - t0
                assert state.is_completed(), state.message
                session = max(j.session_id for j in home.repo.list_jobs(uid))
                lines = (home.root / "work" / "sessions" / str(session) / "logs" / "work.jsonl").read_text().splitlines()
                work_s = sum(json.loads(line)["work"] for line in lines)
                if i == 0:
                    print(f"warm-up series: {wall:.2f} s (first flow run in this process, not counted)")
                    continue
                walls.append(wall)
                works.append(work_s)
            jobs = [j for uid in uids[1:] for j in home.repo.list_jobs(uid)]
            job_s = [(j.finished_at - j.started_at).total_seconds() for j in jobs]
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        if server is not None:
            server.stop()
    mean_wall = statistics.mean(walls)
    overhead = mean_wall - statistics.mean(works)
    print()
    print(f"10-job DAG (root → 8 parallel → sink), no-op workers, max {args.max_parallel} at once, {len(walls)} series, {os.cpu_count()} CPUs")
    print(f"{'flow wall time per series':<42} mean {mean_wall:6.2f} s   min {min(walls):6.2f} s   max {max(walls):6.2f} s")
    print(f"{'worker work per series':<42} {statistics.mean(works) * 1000:8.3f} ms")
    print(f"{'orchestration overhead per series':<42} {overhead:6.2f} s   (goal <= 2 s)")
    print(f"{'one job (record start -> finish)':<42} mean {statistics.mean(job_s):6.3f} s   max {max(job_s):6.3f} s")
    print(f"{'series per minute (one flow at a time)':<42} {60 / mean_wall:6.1f}")


if __name__ == "__main__":
    main()
