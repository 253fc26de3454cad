"""Orchestration cost per job of the series flow, split into its parts (issue 15).

Usage::

    python bench/dag/run.py [--reps 3] [--sizes 20,300] [--max-parallel 4]
                            [--database-url postgresql+psycopg://…] [--api-url URL] [--keep]

Two services' worth of no-op jobs are installed in a fresh ``DCMFLOW_HOME``: a **chain** of
10 jobs (``chain-0`` → ``chain-1`` → … → ``chain-9``) and 10 **independent** jobs
(``free-0`` … ``free-9``). For each series size (synthetic 64×64 MR, as received: objects in
the local store, records in SQLite or ``--database-url``), ``process_series`` runs in this
process against a real Prefect server (started here unless ``--api-url``; start-up not
counted) with ``only_jobs`` picking one shape, exactly as a triggered run does: inline
execution, every record, log, output and artifact written. The first run of each
(size, shape) fills the series cache and warms imports; it is not counted.

The parts are measured by wrapping, in this process only, the functions the flow and the
``run-job`` task call (:class:`Parts`: each wrapped call's own time, its wrapped callees
subtracted, charged to the job whose thread made it):

=====================  ================================================================
part                   what
=====================  ================================================================
submit → running       ``run_job…submit()`` in the flow → the task body starts (Prefect)
records                every :class:`storage.repository.Repository` call of the job
materialise/link       the job's own ``$DATA`` (hard-linked copy of the session folder)
snapshots              the before/after scans that find the job's outputs
process                the job's process: start, no-op worker, exit (its own cost)
outputs                outputs linked back, stored (object store) and recorded
log upload             the job's log into the object store
venv lookup            which interpreter runs the job
other in task          the rest of the task body (logger calls, dicts, result)
finished → seen        the body returned → the flow's ``as_completed`` sees it (Prefect)
flow between jobs      the flow's scheduling loop between one job seen and the next submit
=====================  ================================================================

Per job: every part above, their sum (*job total*, submit → seen), *orchestration* (the sum
and the flow's time between jobs, minus ``process``: what dcmflow and Prefect add to a job),
and the DAG's wall time (first submit → last job seen) divided by 10. For the chain, wall
÷ 10 ≈ job total; the independent jobs overlap (``--max-parallel``), so their parts, the
``process`` most, stretch with the contention of two cores while wall ÷ 10 shrinks. Per series, beside it: the flow's own steps (headers,
callbacks, session and job records, materialise, artifacts, finish) and the whole flow run.
``process floor`` is ``python -m tasks._job_runner`` of a no-op worker alone, no dcmflow
around it: what a job's process costs on this machine.

Figures are printed, never asserted (bench/README.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

N_JOBS = 10
NOOP_WORKER = "def noop(jobName, headers, params, added_params, **kwargs):\n    return {'job': jobName}\n"
ALWAYS = "def always(**kwargs):\n    return True\n"

JOB_PARTS = [
    "submit → running",
    "records",
    "materialise/link",
    "snapshots",
    "process",
    "outputs",
    "log upload",
    "venv lookup",
    "other in task",
    "finished → seen",
    "flow between jobs",
]
SERIES_PARTS = ["load headers", "callbacks + plan", "session", "record jobs", "materialise", "artifacts", "finish"]

# tasks.jobs names → part (whatever of these the module has is wrapped; see Parts.install)
TASK_HOOKS = {
    "link_tree": "materialise/link",
    "remove_tree": "materialise/link",
    "prepare_job_data": "materialise/link",
    "snapshot": "snapshots",
    "changed_files": "snapshots",
    "run_job_process": "process",
    "merge_outputs": "outputs",
    "store_outputs": "outputs",
    "store_log": "log upload",
    "service_python": "venv lookup",
}
FLOW_HOOKS = {
    "load_target": "load headers",
    "plan_jobs": "callbacks + plan",
    "start_session": "session",
    "record_jobs": "record jobs",
    "materialise": "materialise",
    "publish_artifacts": "artifacts",
    "finish_session": "finish",
}


def dag() -> list[dict[str, object]]:
    """The chain and the independent jobs, one service."""

    def job(name: str, **fields: object) -> dict[str, object]:
        return {"jobName": name, "worker": "noopsvc.noop", "callback": "noopsvc.always", **fields}

    chain = [job(f"chain-{i}", **({"dependsOn": f"chain-{i - 1}"} if i else {})) for i in range(N_JOBS)]
    return chain + [job(f"free-{i}") for i in range(N_JOBS)]


class Parts:
    """Exclusive time per (job, part), from wrapped calls on the job's thread."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.job_parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.series_parts: dict[str, float] = defaultdict(float)
        self.marks: dict[str, dict[str, float]] = defaultdict(dict)
        self.undo: list[Callable[[], None]] = []
        self.quote = False

    def reset(self) -> None:
        self.job_parts.clear()
        self.series_parts.clear()
        self.marks.clear()

    def _stack(self) -> list[list[float]]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack  # type: ignore[no-any-return]

    @contextmanager
    def timed(self, part: str, *, series: bool = False) -> Iterator[None]:
        stack = self._stack()
        frame = [0.0]  # time of wrapped callees
        stack.append(frame)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            stack.pop()
            if stack:
                stack[-1][0] += elapsed
            own = elapsed - frame[0]
            job = getattr(self.local, "job", None)
            with self.lock:
                if job is not None and not series:
                    self.job_parts[job][part] += own
                elif series:
                    self.series_parts[part] += own

    def wrap(self, owner: Any, name: str, part: str, *, series: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.timed(part, series=series):
                return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        self.undo.append(lambda: setattr(owner, name, original))

    def install(self) -> None:
        import flows._dag as dag_module
        import flows.process as process_module
        import tasks.jobs as jobs_module
        from storage.repository import Repository

        for name in dir(Repository):
            if not name.startswith("_") and callable(getattr(Repository, name)):
                self.wrap(Repository, name, "records")
        for name, part in TASK_HOOKS.items():
            if hasattr(jobs_module, name):
                self.wrap(jobs_module, name, part)
        original_execute = jobs_module.execute_job

        def execute_job(settings: Any, run: Any, job: Any, **kwargs: Any) -> Any:
            self.local.job = job.name
            self.marks[job.name]["running"] = time.perf_counter()
            try:
                with self.timed("task body"):
                    return original_execute(settings, run, job, **kwargs)
            finally:
                self.marks[job.name]["returned"] = time.perf_counter()
                self.local.job = None

        jobs_module.execute_job = execute_job  # type: ignore[assignment]
        self.undo.append(lambda: setattr(jobs_module, "execute_job", original_execute))

        parts = self
        original_task = dag_module.run_job

        class TimedTask:
            """``run_job`` as the DAG runner sees it; ``submit`` notes the time per job."""

            def __init__(self, task: Any) -> None:
                self.task = task

            def with_options(self, **options: Any) -> TimedTask:
                return TimedTask(self.task.with_options(**options))

            def submit(self, settings: Any, run: Any, job: Any) -> Any:
                parts.marks[job.name]["submit"] = time.perf_counter()
                if parts.quote:  # what flows/_dag would save by passing quote(...)
                    from prefect.utilities.annotations import quote

                    future = self.task.submit(quote(settings), quote(run), quote(job))
                else:
                    future = self.task.submit(settings, run, job)
                parts.marks[job.name]["future"] = future  # type: ignore[assignment]
                return future

        dag_module.run_job = TimedTask(original_task)  # type: ignore[assignment]
        self.undo.append(lambda: setattr(dag_module, "run_job", original_task))
        original_completed = dag_module.as_completed

        def as_completed(futures: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            for future in original_completed(futures, *args, **kwargs):
                seen = time.perf_counter()
                for name, marks in list(parts.marks.items()):
                    if marks.get("future") is future and "seen" not in marks:
                        marks["seen"] = seen
                yield future

        dag_module.as_completed = as_completed  # type: ignore[assignment]
        self.undo.append(lambda: setattr(dag_module, "as_completed", original_completed))
        for name, part in FLOW_HOOKS.items():
            self.wrap(process_module, name, part, series=True)

    def uninstall(self) -> None:
        while self.undo:
            self.undo.pop()()

    def per_job(self) -> dict[str, float]:
        """Mean seconds per job and part over the jobs of one DAG run; ``dag wall`` too."""
        names = [n for n in self.marks if "seen" in self.marks[n]]
        out: dict[str, float] = defaultdict(float)
        for name in names:
            marks, own = self.marks[name], self.job_parts[name]
            out["submit → running"] += marks["running"] - marks["submit"]
            out["finished → seen"] += marks["seen"] - marks["returned"]
            for part, seconds in own.items():
                if part != "task body":
                    out[part] += seconds
            out["other in task"] += own["task body"]
        ordered = sorted(names, key=lambda n: self.marks[n]["submit"])
        first = min(self.marks[n]["submit"] for n in names)
        last = max(self.marks[n]["seen"] for n in names)
        wall = last - first
        busy = sum(self.marks[n]["seen"] - self.marks[n]["submit"] for n in ordered)
        counted = {k: v / len(names) for k, v in out.items()}
        counted["flow between jobs"] = max(0.0, wall - busy) / len(names) if _is_chain(ordered) else 0.0
        counted["dag wall"] = wall
        counted["job total"] = busy / len(names)
        return counted


def _is_chain(names: list[str]) -> bool:
    return all(n.startswith("chain-") for n in names)


def process_floor(work: Path, reps: int = 10) -> float:
    """Median seconds of ``python -m tasks._job_runner`` for a no-op worker, nothing around it."""
    import json

    folder = work / "floor"
    (folder / "noopsvc").mkdir(parents=True)
    (folder / "noopsvc" / "__init__.py").write_text(NOOP_WORKER)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"worker": "noopsvc.noop", "import_paths": [str(folder)], "result_path": str(folder / "r.json"),
                                "kwargs": {"jobName": "x", "headers": {}, "params": None, "added_params": {}}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tasks._job_runner", str(spec)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="counted runs per (size, shape), after one warm-up")
    parser.add_argument("--sizes", default="20,300", help="instances per series, comma-separated")
    parser.add_argument("--shapes", default="chain,independent", help="which DAGs: chain, independent")
    parser.add_argument("--max-parallel", type=int, default=4, help="jobs at once (the independent jobs)")
    parser.add_argument("--database-url", default=None, help="records database (default: SQLite in the temp home)")
    parser.add_argument("--api-url", default=None, help="a running Prefect server (default: start one)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--quote", action="store_true",
                        help="submit the run-job tasks with quote()d arguments (no Prefect introspection): what it would save")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from tests.factories import make_small_series
    from tests.prefect_server import server_unless
    from tests.tasks.helpers import make_home, write_service

    print(f"uptime before: {os.popen('uptime').read().strip()}")
    work = Path(tempfile.mkdtemp(prefix="dcmflow-bench-dag-"))
    api_url, server = server_unless(args.api_url, work / "prefect")
    if args.database_url:
        os.environ["DCMFLOW_DATABASE_URL"] = args.database_url
    home = make_home(work / "home")
    if args.database_url:
        from dcmflow.settings import Settings
        from storage.db import create_engine, upgrade
        from storage.repository import Repository

        home.settings = Settings(home=home.root, database_url=args.database_url)
        engine = create_engine(args.database_url)
        upgrade(engine)
        home.repo = Repository(engine)
    home.install(write_service(work / "src", "noop-svc", dag(), package="noopsvc", workers=NOOP_WORKER, callbacks=ALWAYS))
    uids = {n: home.receive(make_small_series(n, seed=n, patient_id=f"BENCH-DAG-{n}")) for n in sizes}
    floor = process_floor(work)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import process_series

    os.environ["DCMFLOW_HOME"] = str(home.root)
    parts = Parts()
    parts.quote = args.quote
    parts.install()
    shapes = {"chain": [f"chain-{i}" for i in range(N_JOBS)], "independent": [f"free-{i}" for i in range(N_JOBS)]}
    shapes = {name: jobs for name, jobs in shapes.items() if name in args.shapes.split(",")}
    results: dict[tuple[int, str], list[dict[str, float]]] = defaultdict(list)
    series_results: dict[tuple[int, str], list[dict[str, float]]] = defaultdict(list)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            for size in sizes:
                for shape, jobs in shapes.items():
                    for rep in range(args.reps + 1):
                        parts.reset()
                        t0 = time.perf_counter()
                        state = process_series(uids[size], only_jobs=jobs[:1] if shape == "chain" else jobs,
                                               max_parallel=args.max_parallel, return_state=True)
                        wall = time.perf_counter() - t0
                        assert state.is_completed(), state.message
                        if rep == 0:
                            continue
                        per_job = parts.per_job()
                        results[(size, shape)].append(per_job)
                        series_results[(size, shape)].append({**parts.series_parts, "flow run": wall})
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        parts.uninstall()
        if server is not None:
            server.stop()
    _report(sizes, shapes, results, series_results, floor, args)
    print(f"uptime after: {os.popen('uptime').read().strip()}")
    if args.keep:
        print(f"kept {work}")
    else:
        from tasks.outputs import remove_tree  # the received series is read-only

        remove_tree(work)


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row.get(key, 0.0) for row in rows)


def _report(sizes: list[int], shapes: dict[str, list[str]], results: dict[tuple[int, str], list[dict[str, float]]],
            series_results: dict[tuple[int, str], list[dict[str, float]]], floor: float, args: argparse.Namespace) -> None:
    columns = [(size, shape) for size in sizes for shape in shapes]
    records = "SQLite" if not args.database_url else "PostgreSQL"
    print()
    print(f"per job, ms (median of {args.reps} runs; {N_JOBS} no-op jobs; independent: max {args.max_parallel} at once; "
          f"records {records}, local object store, {os.cpu_count()} CPUs)")
    head = f"{'part':<28}" + "".join(f"{f'{size} {shape}':>18}" for size, shape in columns)
    print(head)
    print("-" * len(head))

    def row(label: str, values: list[float]) -> None:
        print(f"{label:<28}" + "".join(f"{v * 1000:>18.1f}" for v in values))

    for part in JOB_PARTS:
        row(part, [_median(results[c], part) for c in columns])
    print("-" * len(head))
    row("job total (submit → seen)", [_median(results[c], "job total") for c in columns])
    row("orchestration (all − proc)", [
        statistics.median(r["job total"] + r["flow between jobs"] - r.get("process", 0.0) for r in results[c]) for c in columns
    ])
    row("DAG wall / 10", [_median(results[c], "dag wall") / N_JOBS for c in columns])
    print(f"{'process floor (bare runner)':<28}{floor * 1000:>18.1f}")
    print()
    print("per series, ms (the flow's own steps, once per run)")
    print(head)
    print("-" * len(head))
    for part in [*SERIES_PARTS, "flow run"]:
        print(f"{part:<28}" + "".join(f"{_median(series_results[c], part) * 1000:>18.1f}" for c in columns))


if __name__ == "__main__":
    main()
