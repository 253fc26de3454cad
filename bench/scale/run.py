"""Issue 12's benchmark: series per minute with 1 and 2 workers, channel dispatch cost, archive reads.

Usage::

    python bench/scale/run.py                    # 20 series per phase, 3 dispatch repetitions (~10-15 min)
    python bench/scale/run.py --quick            # 6 series per phase, 1 repetition, 1 archive round (~6 min)
    python bench/scale/run.py --series 10 --limit 2 --keep
    python bench/scale/run.py --endpoint host:9000 --access-key K --secret-key S   # a real MinIO

One run builds the production layout on this machine (bench/scale/layout.py): a Prefect server
on PostgreSQL (SQLite when PostgreSQL does not answer), records on PostgreSQL, objects on S3
(moto's ThreadedMotoServer on loopback, or ``--endpoint``), ``dcmflow up`` with
``PREFECT_API_URL`` and ``DCMFLOW_WORK_POOL`` (the receiver only), and the service of
``bench/scale/service`` installed with ``dcmflow services install``. Then:

1. **Throughput**, per (workers 1, 2) × (sleep, cpu): N ``prefect worker start --pool P
   --work-queue live --work-queue backfill --limit L`` processes, each with its own
   ``DCMFLOW_HOME``; ``--series`` new series (one new study, synthetic CT, ``--slices`` 32×32
   slices each, NumberOfSeriesRelatedInstances set so each series closes when the association
   is released) sent by DCMTK ``storescu`` in one association; measured from the start of the
   send to the end of the last of their ``process-series`` runs (Prefect REST API). The DAG is
   a → (b, c) → d; each job sleeps 1 s (``SCALE SLEEP``) or spins 1 s of CPU (``SCALE CPU``).
   The workers are stopped, and the bench waits until no run is active, between phases.
2. **Per-job cost inline vs channel-dispatched**: a series whose DAG is one no-op job in the
   flow (``SCALE NOOP INLINE``) and one whose no-op job is on channel ``gpu`` (``SCALE NOOP
   GPU``, run by a second worker with ``--work-queue channel-gpu``), one after the other,
   ``--reps`` times after one warm-up: the Job records' started_at → finished_at, the
   series flow's ``run-job`` / ``dispatch-job`` task run, the ``run-job`` flow run on the gpu
   worker (created → Running, Running → end), and the whole ``process-series`` run.
3. **Archive reads**: ``bench/archive_read.py`` (its own moto, or ``--endpoint``), its lines
   printed in the report.

Figures are printed, never asserted (bench/README.md). Every process is stopped, both
databases dropped and the temporary folder removed at the end, on an error and on Ctrl-C
(``--keep`` keeps the folder: logs of the server, up and every worker).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT, HERE, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from layout import FINAL_STATES, Layout, machine_busy, parse_time, wait_until  # noqa: E402

SERVICE = HERE / "service"
POOL = "scale"
MODES = {"sleep": "SCALE SLEEP", "cpu": "SCALE CPU"}
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def fmt_load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def med(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def num(value: float | None, width: int = 7, digits: int = 2) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"


def write_series(folder: Path, count: int, slices: int, description: str, tag: int) -> list[str]:
    """``count`` new CT series of one new study as files under ``folder``; their UIDs."""
    from pydicom.uid import generate_uid

    from dcmflow.synthetic import make_ct_series

    folder.mkdir(parents=True)
    study = generate_uid()
    uids = []
    for index in range(count):
        uid = generate_uid()
        datasets = make_ct_series(slices, 32, 32, study_uid=study, series_uid=uid, seed=tag * 1000 + index,
                                  patient_id=f"SCALE-{tag:04d}", series_description=description, series_number=index + 1,
                                  count_in_header=True)
        for number, ds in enumerate(datasets):
            ds.save_as(folder / f"{uid}-{number}.dcm", enforce_file_format=True)
        uids.append(uid)
    return uids


def max_overlap(intervals: list[tuple[dt.datetime, dt.datetime]]) -> int:
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda p: (p[0], p[1]))
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


# --------------------------------------------------------------------------- throughput


@dataclass
class Phase:
    workers: int
    mode: str
    series: int
    completed: int = 0
    not_completed: list[str] = field(default_factory=list)
    send_s: float = 0.0
    elapsed_s: float | None = None
    first_created_s: float | None = None
    last_created_s: float | None = None
    run_median_s: float | None = None
    start_median_s: float | None = None  # Pending (a worker took it) -> Running: the flow run's process start
    concurrency: int = 0
    load_before: tuple[float, float, float] = (0, 0, 0)
    load_after: tuple[float, float, float] = (0, 0, 0)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the phase: workers, server, up
    busy: float | None = None  # fraction of the machine's CPU time busy (every process) during the phase

    @property
    def per_minute(self) -> float | None:
        return self.completed / self.elapsed_s * 60 if self.elapsed_s else None

    @property
    def cpu_per_series(self) -> float | None:
        return self.cpu["workers"] / self.series if self.cpu else None


def run_phase(layout: Layout, args: argparse.Namespace, workers: int, mode: str, tag: int) -> Phase:
    phase = Phase(workers, mode, args.series)
    layout.wait_idle()
    names = [f"w{tag}-{i + 1}" for i in range(workers)]
    for name in names:
        layout.start_worker(name, ["live", "backfill"], args.limit, args.query_seconds)
    layout.wait_workers_online(names)
    folder = layout.root / f"phase-{tag}"
    uids = set(write_series(folder, args.series, args.slices, MODES[mode], tag))
    time.sleep(2)  # a worker's first polls are behind it
    phase.load_before = load()
    cpu_before, busy_before = layout.cpu(), machine_busy()
    since = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    layout.send(folder)
    phase.send_s = time.monotonic() - t0

    def ours() -> list[dict[str, Any]]:
        return [r for r in layout.flow_runs("process-series", since) if r["parameters"].get("series_uid") in uids]

    def done() -> list[dict[str, Any]] | None:
        runs = ours()
        by_uid: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            by_uid.setdefault(run["parameters"]["series_uid"], []).append(run)
        finished = len(by_uid) == len(uids) and all(r["state"]["type"] in FINAL_STATES for r in runs)
        return runs if finished else None

    timeout = 120 + args.series * 40 / workers
    try:
        runs = wait_until(f"{len(uids)} process-series runs to end", done, timeout=timeout, every=1.0)
    except RuntimeError as exc:
        print(f"  {exc}", flush=True)
        runs = ours()
    phase.load_after = load()
    completed = [r for r in runs if r["state"]["type"] == "COMPLETED" and parse_time(r.get("end_time"))]
    phase.completed = len({r["parameters"]["series_uid"] for r in completed})
    phase.not_completed = sorted(f"{r['state']['type']} {r['state'].get('message') or ''}"[:160] for r in runs
                                 if r["state"]["type"] != "COMPLETED")
    if completed:
        last = max(parse_time(r["end_time"]) for r in completed)  # type: ignore[type-var]
        phase.elapsed_s = seconds(since, last)
        created = [s for r in runs if (s := seconds(since, parse_time(r["created"]))) is not None]
        phase.first_created_s, phase.last_created_s = min(created), max(created)
        spans = [(parse_time(r["start_time"]), parse_time(r["end_time"])) for r in completed if r.get("start_time")]
        phase.run_median_s = med([seconds(a, b) for a, b in spans])
        # a worker's slot is taken from Pending (it took the run) to the end
        slots = [(layout.pending_at(r["id"]), parse_time(r["start_time"]), parse_time(r["end_time"])) for r in completed]
        phase.start_median_s = med([seconds(p, s) for p, s, _ in slots])
        phase.concurrency = max_overlap([(p, e) for p, _, e in slots if p and e])
    layout.wait_idle()  # process-study / study-received of the phase's study too: nothing leaks on
    cpu_after, busy_after = layout.cpu(), machine_busy()
    phase.cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    phase.busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    layout.stop_workers()
    print(f"  {workers} worker(s), {mode:5}: {phase.completed}/{phase.series} series completed in "
          f"{num(phase.elapsed_s, 0, 1)} s = {num(phase.per_minute, 0, 1)} series/min "
          f"(at most {phase.concurrency} series runs at once, process start {num(phase.start_median_s, 0, 1)} s; workers' CPU {num(phase.cpu_per_series, 0, 1)} s per series; "
          f"machine {num(phase.busy * 100 if phase.busy is not None else None, 0, 0)} % busy; load {fmt_load(phase.load_before)} -> {fmt_load(phase.load_after)})",
          flush=True)
    for line in phase.not_completed[:5]:
        print(f"    not completed: {line}", flush=True)
    return phase


# --------------------------------------------------------------------------- dispatch


@dataclass
class Dispatch:
    kind: str
    warmup: bool
    series_run_s: float | None = None
    job_s: float | None = None  # Job record started_at -> finished_at
    task_s: float | None = None  # run-job / dispatch-job task run in the series flow
    job_run_pickup_s: float | None = None  # run-job flow run created -> Running (gpu only)
    job_run_s: float | None = None  # run-job flow run Running -> end (gpu only)
    state: str = ""


def run_dispatch(layout: Layout, args: argparse.Namespace) -> list[Dispatch]:
    layout.wait_idle()
    layout.start_worker("series", ["live", "backfill"], args.limit, args.query_seconds)
    layout.start_worker("gpu", ["channel-gpu"], args.limit, args.query_seconds)
    layout.wait_workers_online(["series", "gpu"])
    repository = layout.repository()
    results = []
    tag = 100
    for rep in range(args.reps + 1):
        for kind in ("inline", "gpu"):
            tag += 1
            folder = layout.root / f"dispatch-{tag}"
            (uid,) = write_series(folder, 1, args.slices, f"SCALE NOOP {kind.upper()}", tag)
            layout.wait_idle()
            since = dt.datetime.now(dt.UTC)
            layout.send(folder)
            run = wait_until(
                f"the {kind} series' run to end",
                lambda: next((r for r in layout.flow_runs("process-series", since) if r["parameters"].get("series_uid") == uid
                              and r["state"]["type"] in FINAL_STATES), None),
                timeout=240, every=0.5,
            )
            result = Dispatch(kind, warmup=rep == 0, state=run["state"]["type"])
            result.series_run_s = seconds(parse_time(run.get("start_time")), parse_time(run.get("end_time")))
            jobs = [j for j in repository.list_jobs(uid) if j.job_name == f"noop-{kind}"]
            if jobs and jobs[-1].started_at and jobs[-1].finished_at:
                result.job_s = (jobs[-1].finished_at - jobs[-1].started_at).total_seconds()
            # the job's task run is named after the job (task key run_job-… inline, dispatch_job-…
            # dispatched); task runs reach the server through events, a moment after the flow ends
            key = "dispatch_job" if kind == "gpu" else "run_job"
            tasks = wait_until(
                f"the {kind} job's task run", lambda: [t for t in layout.task_runs(run["id"])
                                                       if t["task_key"].startswith(key) and t.get("end_time")],
                timeout=30, every=0.5,
            )
            if tasks:
                task = tasks[-1]
                result.task_s = seconds(parse_time(task.get("start_time")), parse_time(task.get("end_time")))
                if kind == "gpu":
                    job_runs = [r for r in layout.flow_runs("run-job", since)
                                if (r["parameters"].get("job") or {}).get("name") == "noop-gpu"]
                    if job_runs:
                        jr = job_runs[-1]
                        result.job_run_pickup_s = seconds(parse_time(jr["created"]), parse_time(jr.get("start_time")))
                        result.job_run_s = seconds(parse_time(jr.get("start_time")), parse_time(jr.get("end_time")))
            results.append(result)
            print(f"  {'warm-up ' if result.warmup else ''}{kind:6} {result.state:9} job {num(result.job_s)} s  "
                  f"task {num(result.task_s)} s  series run {num(result.series_run_s)} s"
                  + (f"  run-job created->Running {num(result.job_run_pickup_s)} s, Running->end {num(result.job_run_s)} s"
                     if kind == "gpu" else ""), flush=True)
    layout.wait_idle()
    layout.stop_workers()
    return results


# --------------------------------------------------------------------------- archive reads


def run_archive_read(args: argparse.Namespace) -> list[str]:
    import archive_read  # bench/archive_read.py, unchanged

    argv = ["--rounds", str(args.archive_rounds)]
    if args.endpoint:
        argv += ["--endpoint", args.endpoint, "--access-key", args.access_key, "--secret-key", args.secret_key]
        if args.secure:
            argv.append("--secure")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        archive_read.main(argv)
    return out.getvalue().rstrip().splitlines()


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, layout_info: dict[str, str], phases: list[Phase], dispatch: list[Dispatch],
           archive_lines: list[str], load_before: tuple[float, float, float], load_after: tuple[float, float, float],
           wall_s: float) -> None:
    import prefect

    print()
    print("=" * 100)
    print("bench/scale report (issue 12)")
    print(f"Prefect {prefect.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"{layout_info['prefect']}; records {layout_info['records']}; S3 {layout_info['s3']}")
    print(f"settings: worker --limit {args.limit} (flow runs per worker), PREFECT_WORKER_QUERY_SECONDS={args.query_seconds}, "
          f"DCMFLOW_MAX_PARALLEL_JOBS={args.max_parallel_jobs}, DCMFLOW_STABLE_AGE={args.stable_age} "
          f"(series close on their instance count), {args.series} series × {args.slices} slices of 32×32 per phase, "
          f"DAG a -> (b, c) -> d, 1 s per job")
    print()
    print("throughput: first C-STORE of the phase -> last process-series run Completed")
    print(f"{'workers':>7} {'jobs':>6} {'series':>7} {'seconds':>8} {'series/min':>11} {'send s':>7} {'runs created s':>15} "
          f"{'start s':>8} {'run s':>6} {'max at once':>12} {'CPU s/series':>13} {'server CPU s':>13} {'machine busy':>13}  load before -> after")
    for p in phases:
        print(f"{p.workers:>7} {p.mode:>6} {p.completed:>3}/{p.series:<3} {num(p.elapsed_s, 8, 1)} {num(p.per_minute, 11, 1)} "
              f"{num(p.send_s, 7)} {num(p.first_created_s, 6, 1)} …{num(p.last_created_s, 6, 1)} {num(p.start_median_s, 8, 1)} {num(p.run_median_s, 6, 1)} {p.concurrency:>12} "
              f"{num(p.cpu_per_series, 13, 1)} {num(p.cpu.get('server'), 13, 1)} {num(p.busy * 100 if p.busy is not None else None, 11, 0)} %  "
              f"{fmt_load(p.load_before)} -> {fmt_load(p.load_after)}")
    for mode in MODES:
        one = next((p for p in phases if p.mode == mode and p.workers == 1), None)
        two = next((p for p in phases if p.mode == mode and p.workers == 2), None)
        if one and two and one.per_minute and two.per_minute:
            goal = "  (goal >= 1.8x: " + ("met" if two.per_minute >= 1.8 * one.per_minute else "NOT met") + ")" if mode == "sleep" else \
                "  (one machine's 2 cores shared by both workers: no goal)"
            print(f"ratio 2 workers / 1 worker, {mode}: {two.per_minute / one.per_minute:.2f}x{goal}")
    if dispatch:
        print()
        counted = [d for d in dispatch if not d.warmup]
        print(f"per-job cost of a no-op job, median of {len(counted) // 2} (after 1 warm-up), seconds")
        print(f"{'':22} {'Job record':>11} {'task run':>9} {'run-job created->Running':>25} {'run-job Running->end':>21} "
              f"{'process-series run':>19}")
        rows = {}
        for kind, label in (("inline", "inline (run-job task)"), ("gpu", "channel gpu (dispatch)")):
            ds = [d for d in counted if d.kind == kind]
            rows[kind] = ds
            print(f"{label:22} {num(med([d.job_s for d in ds]), 11, 3)} {num(med([d.task_s for d in ds]), 9, 3)} "
                  f"{num(med([d.job_run_pickup_s for d in ds]) if kind == 'gpu' else None, 25, 3)} "
                  f"{num(med([d.job_run_s for d in ds]) if kind == 'gpu' else None, 21, 3)} "
                  f"{num(med([d.series_run_s for d in ds]), 19, 3)}")
        warm = [d for d in dispatch if d.warmup and d.kind == "gpu"]
        inline_task, gpu_task = med([d.task_s for d in rows["inline"]]), med([d.task_s for d in rows["gpu"]])
        if inline_task is not None and gpu_task is not None:
            print(f"dispatch overhead (dispatch-job task - inline run-job task): {gpu_task - inline_task:.3f} s per job"
                  + (f"; warm-up dispatch-job task {warm[0].task_s:.3f} s" if warm and warm[0].task_s is not None else ""))
        bad = [f"{d.kind} {d.state}" for d in dispatch if d.state != "COMPLETED"]
        if bad:
            print(f"not completed: {', '.join(bad)}")
    if archive_lines:
        print()
        print("reading a 300-instance series from the S3 endpoint (bench/archive_read.py, its own endpoint and process):")
        for line in archive_lines:
            print(f"  {line}")
    print()
    print(f"load average (1, 5, 15 min): {fmt_load(load_before)} before, {fmt_load(load_after)} after; "
          f"whole run {wall_s / 60:.1f} min")
    print("=" * 100, flush=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=None, help="series per throughput phase (default 20; --quick 6)")
    parser.add_argument("--slices", type=int, default=4, help="slices (32x32) per series")
    parser.add_argument("--limit", type=int, default=2, help="flow runs per worker (prefect worker start --limit)")
    parser.add_argument("--query-seconds", default="1", help="PREFECT_WORKER_QUERY_SECONDS of the workers")
    parser.add_argument("--max-parallel-jobs", type=int, default=4, help="DCMFLOW_MAX_PARALLEL_JOBS (jobs of one run at once)")
    parser.add_argument("--stable-age", default="2", help="DCMFLOW_STABLE_AGE (the series carry their count: unused)")
    parser.add_argument("--reps", type=int, default=None, help="dispatch repetitions after one warm-up (default 3; --quick 1)")
    parser.add_argument("--archive-rounds", type=int, default=None, help="rounds of bench/archive_read.py (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="6 series per phase, 1 dispatch repetition, 1 archive round")
    parser.add_argument("--modes", default="sleep,cpu", help="throughput phases to run: sleep,cpu")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: throughput,dispatch,archive")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="admin URL of a PostgreSQL server ('' = SQLite)")
    parser.add_argument("--endpoint", help="host:port of an S3 endpoint (e.g. MinIO); default: moto on loopback")
    parser.add_argument("--access-key", default="minioadmin")
    parser.add_argument("--secret-key", default="minioadmin")
    parser.add_argument("--secure", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args(argv)
    args.series = args.series or (6 if args.quick else 20)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    args.archive_rounds = args.archive_rounds or (1 if args.quick else 3)
    skip = {s for s in args.skip.split(",") if s}
    modes = [m for m in args.modes.split(",") if m]

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    load_before = load()
    started = time.monotonic()
    print(f"load average before: {fmt_load(load_before)} ({os.cpu_count()} CPUs)", flush=True)
    root = Path(tempfile.mkdtemp(prefix="dcmflow-bench-scale-"))
    layout: Layout | None = None
    phases: list[Phase] = []
    dispatch: list[Dispatch] = []
    archive_lines: list[str] = []
    info: dict[str, str] = {}
    try:
        if not ({"throughput", "dispatch"} <= skip):
            layout = Layout.start(
                root, pool=POOL, postgres_admin=args.postgres or None,
                s3=(args.endpoint, args.access_key, args.secret_key, args.secure), stable_age=args.stable_age,
                extra={"DCMFLOW_MAX_PARALLEL_JOBS": str(args.max_parallel_jobs)},
            )
            info = {"prefect": f"Prefect server on {layout.prefect_db}", "records": layout.records_db,
                    "s3": f"{layout.s3.endpoint if layout.s3 else '?'} ({layout.s3.kind if layout.s3 else '?'})"}
            layout.dcmflow(layout.root / "receiver", "services", "install", str(SERVICE))
            print(f"service installed from {SERVICE.relative_to(ROOT)}", flush=True)
            if "throughput" not in skip:
                tag = 0
                for mode in modes:
                    for workers in (1, 2):
                        tag += 1
                        phases.append(run_phase(layout, args, workers, mode, tag))
            if "dispatch" not in skip:
                print("per-job cost inline vs channel gpu:", flush=True)
                dispatch = run_dispatch(layout, args)
            layout.close(keep=args.keep)
            layout = None
        if "archive" not in skip:
            print("bench/archive_read.py ...", flush=True)
            archive_lines = run_archive_read(args)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        if layout is not None:
            layout.close(keep=args.keep)
        elif not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    report(args, info or {"prefect": "-", "records": "-", "s3": "-"}, phases, dispatch, archive_lines, load_before, load(),
           time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
