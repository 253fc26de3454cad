"""Channel jobs: (a) Prefect background task vs (b) a flow run per job on a channel work queue.

Usage::

    python bench/dispatch/run.py [--n 10] [--concurrent 10] [--keep]

Issue 12 item 3 ("measure both and choose"). One run, one machine, its own Prefect server
(``prefect server start`` in a subprocess, temporary ``PREFECT_HOME`` and SQLite database, as
``tests/prefect_server.py`` starts it). The "channel machine" is a set of subprocesses started
here with the same environment (same ``PREFECT_HOME``, so the local result storage folder is
shared, which is what production must replace with S3 or keys only: see README.md):

- (a) ``python bench/dispatch/jobs.py task-worker gpu``: ``prefect.task_worker.serve(job-gpu)``
  at its defaults; the series flow calls ``job_gpu.delay(...)`` and waits on the future.
- (b) a ``run-job`` deployment on the process work pool ``bench`` (queues ``channel-gpu``,
  ``channel-tpu``); ``prefect worker start --pool bench --work-queue channel-gpu --limit 10
  --prefetch-seconds 5`` with ``PREFECT_WORKER_QUERY_SECONDS=1``; the series flow calls
  ``run_deployment("run-job/run-job", work_queue_name="channel-gpu", poll_interval=0.5)``.
- inline baseline: a plain task in the flow that spawns ``python -c pass`` (as dcmflow's jobs
  are processes).

Every job body (jobs.py) writes its start time to a mark file, then spawns ``python -c pass``
and returns. Measured from inside a running flow: N jobs one after the other (submit → body
starts, submit → result back in the flow; median/min/max, after one warm-up job not counted),
then ``--concurrent`` jobs dispatched at once (wall time, first submit → last result).

Then the behaviour the DAG depends on, printed as findings: a channel no worker serves, a job
that raises, ``kill -9`` of the serving worker mid-job. Figures are printed, never asserted
(bench/README.md). All subprocesses and the server are stopped at the end, on an error and on
Ctrl-C; ``--keep`` keeps the temporary folder (logs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from tests.prefect_server import start_prefect_server  # noqa: E402  (no prefect import)

POOL = "bench"
GPU_QUEUE = "channel-gpu"
NOBODY_QUEUE = "channel-tpu"
DEPLOYMENT = "run-job/run-job"
WORKER_QUERY_SECONDS = "1"
WORKER_LIMIT = "10"
WORKER_PREFETCH = "5"
HEARTBEAT_SECONDS = "30"  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the process worker (minimum 30)
ZOMBIE_WITHIN = 75  # seconds without a heartbeat before the zombie automation marks a run Crashed
POLL_INTERVAL = 0.5

# --------------------------------------------------------------------------- processes


class Procs:
    """Subprocesses of the bench, each in its own process group, logs in the temp folder."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running[name] = proc
        return proc

    def kill9(self, name: str) -> int:
        """``kill -9`` the whole process group (the machine dies)."""
        proc = self.running.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return proc.pid

    def stop(self, name: str) -> None:
        proc = self.running.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):7.3f}  min {min(values):7.3f}  max {max(values):7.3f}"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- the bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="sequential jobs per mechanism")
    parser.add_argument("--concurrent", type=int, default=10, help="jobs dispatched at once")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args()

    print(f"uptime before: {uptime()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    t0 = time.monotonic()
    server = start_prefect_server(tmp / "prefect")
    print(f"prefect server up in {time.monotonic() - t0:.1f} s at {server.api_url}", flush=True)
    marks = tmp / "marks"
    marks.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(server.env())
    env.update(
        BENCH_MARKS=str(marks),
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp / "results"),  # shared by flow and workers
        PREFECT_WORKER_QUERY_SECONDS=WORKER_QUERY_SECONDS,
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
    )
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    procs = Procs(tmp, env)
    try:
        Bench(procs, server.api_url, marks, args.n, args.concurrent).run()
    finally:
        procs.stop_all()
        server.stop()
        print(f"uptime after:  {uptime()}", flush=True)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


class Bench:
    def __init__(self, procs: Procs, api_url: str, marks: Path, n: int, concurrent: int) -> None:
        # prefect is imported only now: its settings come from the environment set in main()
        import httpx
        from prefect import flow, task
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.states import Cancelled

        import jobs
        import series

        series.BENCH = self
        self.series = series
        self.procs, self.api, self.marks, self.n, self.c = procs, api_url, marks, n, concurrent
        self.http = httpx.Client(base_url=api_url, timeout=10)
        self.flow, self.task, self.get_client = flow, task, get_client
        self.run_deployment, self.Cancelled = run_deployment, Cancelled
        self.jobs = jobs
        self.job_gpu = jobs.channel_task("gpu")
        self.job_tpu = jobs.channel_task("tpu")
        self.seq = 0

    # ----------------------------------------------------------------- helpers

    def job_id(self, tag: str) -> str:
        self.seq += 1
        return f"{tag}-{self.seq}"

    def mark(self, job_id: str) -> float | None:
        path = self.marks / f"{job_id}.start"
        if not path.exists():
            return None
        text = path.read_text().split()
        return float(text[0]) if text else None

    def mark_pid(self, job_id: str) -> int:
        return int((self.marks / f"{job_id}.start").read_text().split()[1])

    def client(self):
        return self.get_client(sync_client=True)

    def task_workers(self, key: str) -> list[dict[str, Any]]:
        resp = self.http.post("/task_workers/filter", json={"task_worker_filter": {"task_keys": [key]}})
        resp.raise_for_status()
        return resp.json()

    def queue(self, name: str) -> Any:
        with self.client() as c:
            return c.read_work_queue_by_name(name, work_pool_name=POOL)

    def task_state(self, task_run_id: Any) -> str:
        run = self.http.get(f"/task_runs/{task_run_id}").json()
        return f"{run.get('state_type')}/{run.get('state_name')}"

    def flow_state(self, flow_run_id: Any) -> str:
        with self.client() as c:
            state = c.read_flow_run(flow_run_id).state
        return f"{state.type.value}/{state.name}" if state else "none"

    # ----------------------------------------------------------------- set-up

    def setup(self) -> None:
        t = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "work-pool", "create", POOL, "--type", "process"],
            check=True, capture_output=True, env=self.procs.env,
        )
        with self.client() as c:
            for name in (GPU_QUEUE, NOBODY_QUEUE):
                c.create_work_queue(name=name, work_pool_name=POOL)
        deployment = self.jobs.run_job.to_deployment(
            name="run-job", work_pool_name=POOL, work_queue_name=GPU_QUEUE,
            job_variables={"working_dir": str(ROOT)},  # else the worker runs it in a temp dir
        )
        deployment.apply()
        self.create_zombie_automation()
        self.start_task_worker("gpu")
        self.start_process_worker()
        print(f"set-up (pool, queues, deployment, workers ready) in {time.monotonic() - t:.1f} s", flush=True)

    def create_zombie_automation(self) -> None:
        """Prefect's documented "detect zombie flows" automation (docs/v3/advanced/detect-zombie-flows)."""
        from datetime import timedelta

        from prefect.automations import Automation
        from prefect.client.schemas.objects import StateType
        from prefect.events.actions import ChangeFlowRunState
        from prefect.events.schemas.automations import EventTrigger, Posture
        from prefect.events.schemas.events import ResourceSpecification

        Automation(
            name="crash-zombie-flows",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={
                    "prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed",
                },
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=ZOMBIE_WITHIN),
            ),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: the machine running it died")],
        ).create()

    def start_task_worker(self, channel: str) -> None:
        key = (self.job_gpu if channel == "gpu" else self.job_tpu).task_key
        self.procs.start(f"task-worker-{channel}", [sys.executable, str(HERE / "jobs.py"), "task-worker", channel])
        wait_until(f"task worker {channel}", lambda: self.task_workers(key), timeout=90)

    def start_process_worker(self) -> None:
        before = self.queue(GPU_QUEUE).last_polled
        self.procs.start(
            "worker-gpu",
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--work-queue", GPU_QUEUE,
             "--type", "process", "--limit", WORKER_LIMIT, "--prefetch-seconds", WORKER_PREFETCH, "--name", "gpu-box"],
            {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": HEARTBEAT_SECONDS},
        )
        wait_until("process worker polling channel-gpu", lambda: self.queue(GPU_QUEUE).last_polled != before, 90)

    # ----------------------------------------------------------------- one job, each mechanism

    def inline_one(self, inline_job: Any) -> tuple[float, float]:
        jid = self.job_id("inline")
        t0 = time.time()
        inline_job(jid)
        back = time.time()
        return self.mark(jid) - t0, back - t0

    def a_one(self) -> tuple[float, float]:
        jid = self.job_id("a")
        t0 = time.time()
        result = self.job_gpu.delay(jid).result()
        back = time.time()
        assert result["start"] == self.mark(jid)
        return result["start"] - t0, back - t0

    def b_one(self) -> tuple[float, float]:
        jid = self.job_id("b")
        t0 = time.time()
        run = self.run_deployment(
            DEPLOYMENT, parameters={"job_id": jid}, work_queue_name=GPU_QUEUE, timeout=None, poll_interval=POLL_INTERVAL,
        )
        result = run.state.result()
        back = time.time()
        assert result["start"] == self.mark(jid), (result, self.mark(jid))
        return result["start"] - t0, back - t0

    def inline_many(self, inline_job: Any) -> float:
        t0 = time.time()
        futures = [inline_job.submit(self.job_id("inline")) for _ in range(self.c)]
        for f in futures:
            f.result()
        return time.time() - t0

    def a_many(self) -> float:
        t0 = time.time()
        futures = [self.job_gpu.delay(self.job_id("a")) for _ in range(self.c)]
        for f in futures:
            f.result()
        return time.time() - t0

    def b_many(self) -> float:
        t0 = time.time()
        runs = [
            self.run_deployment(DEPLOYMENT, parameters={"job_id": self.job_id("b")}, work_queue_name=GPU_QUEUE, timeout=0)
            for _ in range(self.c)
        ]
        pending = {r.id for r in runs}
        with self.client() as c:
            while pending:
                time.sleep(POLL_INTERVAL)
                for rid in list(pending):
                    state = c.read_flow_run(rid).state
                    if state and state.is_final():
                        state.result()
                        pending.discard(rid)
        return time.time() - t0

    # ----------------------------------------------------------------- the run

    def run(self) -> None:
        self.setup()
        print(
            "settings: task worker serve(job-gpu) defaults (limit 10); process worker "
            f"PREFECT_WORKER_QUERY_SECONDS={WORKER_QUERY_SECONDS} --limit {WORKER_LIMIT} "
            f"--prefetch-seconds {WORKER_PREFETCH}; run_deployment(poll_interval={POLL_INTERVAL}, timeout=None); "
            "result storage: local folder shared by all processes (same PREFECT_HOME); "
            f"run-job runs: PREFECT_FLOWS_HEARTBEAT_FREQUENCY={HEARTBEAT_SECONDS} + zombie automation "
            f"(no heartbeat within {ZOMBIE_WITHIN} s -> Crashed)",
            flush=True,
        )
        figures = self.series.measure()
        print(f"\n== latency, {self.n} sequential no-op jobs from a running flow (seconds; 1 warm-up not counted) ==")
        print(f"{'mechanism':24} {'submit -> body starts':44} {'submit -> result back in flow':44} {'warm-up start/back':>20} {self.c} at once: wall")
        for name, (warm, seq, wall) in figures.items():
            print(
                f"{name:24} {stats([s for s, _ in seq]):44} {stats([b for _, b in seq]):44} "
                f"{warm[0]:8.3f} /{warm[1]:8.3f}   {wall:7.2f} s"
            )
        print(flush=True)
        self.behaviour()

    def measure_body(self) -> dict[str, Any]:
        inline_job = self.series.inline_job
        out: dict[str, Any] = {}
        for name, one, many in (
            ("inline", lambda: self.inline_one(inline_job), lambda: self.inline_many(inline_job)),
            ("(a) background task", self.a_one, self.a_many),
            ("(b) flow run on queue", self.b_one, self.b_many),
        ):
            warm = one()
            seq = [one() for _ in range(self.n)]
            wall = many()
            out[name] = (warm, seq, wall)
            print(f"  measured {name}", flush=True)
        return out

    # ----------------------------------------------------------------- behaviour

    def behaviour(self) -> None:
        print("== behaviour ==", flush=True)
        self.series.behave()

    def behave_body(self) -> None:
        self.no_worker_a()
        self.no_worker_b()
        self.raises_a()
        self.raises_b()
        self.kill_a()
        self.kill_b()
        self.kill_b_worker_only()

    def no_worker_a(self) -> None:
        key = self.job_tpu.task_key
        print(f"[a/no worker] task key of job-tpu: {key}; task workers serving it: {len(self.task_workers(key))}; "
              f"serving job-gpu: {len(self.task_workers(self.job_gpu.task_key))}")
        f1_jid = self.job_id("a-tpu")
        f1 = self.job_tpu.delay(f1_jid)
        f2_id = self.job_id("a-tpu")
        f2 = self.job_tpu.delay(f2_id)
        t0 = time.time()
        try:
            f1.result(timeout=5)
            print("[a/no worker] result() returned ?!")
        except TimeoutError as exc:
            print(f"[a/no worker] future.result(timeout=5) -> TimeoutError after {time.time() - t0:.1f} s: {exc}")
        t0 = time.time()
        f1.wait(timeout=3)
        print(f"[a/no worker] future.wait(timeout=3) returned after {time.time() - t0:.1f} s without raising; "
              f"task run state {self.task_state(f1.task_run_id)} (without a timeout, wait()/result() block for ever)")
        with self.client() as c:
            c.set_task_run_state(f2.task_run_id, self.Cancelled(message="no worker serves channel tpu"), force=True)
        print(f"[a/no worker] second job set Cancelled by the flow: {self.task_state(f2.task_run_id)}; "
              "now a tpu task worker starts ...")
        t0 = time.time()
        self.start_task_worker("tpu")
        print(f"[a/no worker]   tpu worker registered after {time.time() - t0:.1f} s")
        try:
            f1.result(timeout=30)
            time.sleep(1)  # the future hears the Completed event before the API read shows it
            print(f"[a/no worker]   the waiting job ran when the worker came: ran={self.mark(f1_jid) is not None}, "
                  f"state {self.task_state(f1.task_run_id)}, result {time.time() - t0:.1f} s after the worker started")
        except TimeoutError:
            print(f"[a/no worker]   the waiting job did NOT run within 30 s of the worker starting: "
                  f"{self.task_state(f1.task_run_id)}")
        time.sleep(2)
        print(f"[a/no worker]   the cancelled job: ran={self.mark(f2_id) is not None}, "
              f"state {self.task_state(f2.task_run_id)}")
        self.procs.stop("task-worker-tpu")

    def no_worker_b(self) -> None:
        q = self.queue(NOBODY_QUEUE)
        g = self.queue(GPU_QUEUE)
        print(f"[b/no worker] queue {NOBODY_QUEUE}: status {q.status}, last_polled {q.last_polled}; "
              f"queue {GPU_QUEUE}: status {g.status}, last_polled {g.last_polled}")
        with self.client() as c:
            workers = c.read_workers_for_work_pool(POOL)
        print(f"[b/no worker] pool workers: {[(w.name, str(w.status)) for w in workers]} (a worker does not record its queues)")
        jid = self.job_id("b-tpu")
        t0 = time.time()
        run = self.run_deployment(
            DEPLOYMENT, parameters={"job_id": jid}, work_queue_name=NOBODY_QUEUE, timeout=5, poll_interval=POLL_INTERVAL,
        )
        print(f"[b/no worker] run_deployment(timeout=5) returned after {time.time() - t0:.1f} s, state {self.flow_state(run.id)}")
        seen = []
        for _ in range(6):
            time.sleep(5)
            seen.append(self.flow_state(run.id))
        print(f"[b/no worker] states every 5 s for 30 s: {seen}")
        with self.client() as c:
            c.set_flow_run_state(run.id, self.Cancelled(message="no worker serves channel tpu"), force=True)
        print(f"[b/no worker] flow set it Cancelled: {self.flow_state(run.id)}; "
              f"queue {NOBODY_QUEUE} status now {self.queue(NOBODY_QUEUE).status}")

    def raises_a(self) -> None:
        jid = self.job_id("a-raise")
        fut = self.job_gpu.delay(jid, "raise")
        try:
            fut.result(timeout=30)
            print("[a/raise] result() returned ?!")
        except Exception as exc:  # noqa: BLE001  (reporting what comes back)
            print(f"[a/raise] future.result() raised {type(exc).__name__}: {exc}; state {self.task_state(fut.task_run_id)}")

    def raises_b(self) -> None:
        jid = self.job_id("b-raise")
        run = self.run_deployment(
            DEPLOYMENT, parameters={"job_id": jid, "mode": "raise"}, work_queue_name=GPU_QUEUE,
            timeout=60, poll_interval=POLL_INTERVAL,
        )
        try:
            run.state.result()
            print(f"[b/raise] state {run.state.type.value}, result() returned ?!")
        except Exception as exc:  # noqa: BLE001
            print(f"[b/raise] run_deployment returned state {run.state.type.value}/{run.state.name} "
                  f"(message {run.state.message!r}); state.result() raised {type(exc).__name__}: {exc}")

    def kill_a(self) -> None:
        jid = self.job_id("a-kill")
        fut = self.job_gpu.delay(jid, "sleep", 20.0)
        wait_until("a-kill job to start", lambda: self.mark(jid), 30)
        job_pid = self.mark_pid(jid)
        pid = self.procs.kill9("task-worker-gpu")
        print(f"[a/kill -9] job started in task worker pid {job_pid}; killed process group {pid}")
        seen = []
        for _ in range(8):
            time.sleep(5)
            seen.append(self.task_state(fut.task_run_id))
        print(f"[a/kill -9] task run state every 5 s for 40 s: {seen}")
        print(f"[a/kill -9] task workers serving job-gpu now: {len(self.task_workers(self.job_gpu.task_key))}")
        t0 = time.time()
        self.start_task_worker("gpu")
        time.sleep(10)
        print(f"[a/kill -9] after restarting the gpu task worker (+{time.time() - t0:.0f} s): "
              f"state {self.task_state(fut.task_run_id)}, job started again: "
              f"{self.mark_pid(jid) != job_pid}")

    def kill_b(self) -> None:
        jid = self.job_id("b-kill")
        run = self.run_deployment(
            DEPLOYMENT, parameters={"job_id": jid, "mode": "sleep", "seconds": 20.0}, work_queue_name=GPU_QUEUE, timeout=0,
        )
        wait_until("b-kill job to start", lambda: self.mark(jid), 60)
        job_pid = self.mark_pid(jid)
        wpid = self.procs.kill9("worker-gpu")
        try:
            os.kill(job_pid, signal.SIGKILL)  # the flow-run process: its own session, not in the worker's group
            job_killed = "yes"
        except ProcessLookupError:
            job_killed = "already gone with the worker's group"
        t_kill = time.time()
        print(f"[b/kill -9] killed worker group {wpid} and the run's process {job_pid} ({job_killed}) - the machine died")
        self.start_process_worker()
        seen = []
        while time.time() - t_kill < 180:
            time.sleep(10)
            seen.append(f"+{time.time() - t_kill:.0f}s {self.flow_state(run.id)}")
            if "CRASHED" in seen[-1]:
                break
        print(f"[b/kill -9] worker restarted at once; flow run state every 10 s: {seen}")
        with self.client() as c:
            state = c.read_flow_run(run.id).state
        try:
            state.result()
            print("[b/kill -9] state.result() returned ?!")
        except Exception as exc:  # noqa: BLE001
            print(f"[b/kill -9] what the flow would see: state {state.type.value} ({state.message!r}); "
                  f"state.result() raised {type(exc).__name__}")

    def kill_b_worker_only(self) -> None:
        jid = self.job_id("b-killw")
        run = self.run_deployment(
            DEPLOYMENT, parameters={"job_id": jid, "mode": "sleep", "seconds": 5.0}, work_queue_name=GPU_QUEUE, timeout=0,
        )
        wait_until("b-killw job to start", lambda: self.mark(jid), 60)
        wpid = self.procs.kill9("worker-gpu")
        print(f"[b/kill -9 worker only] killed worker group {wpid}; run's process {self.mark_pid(jid)} "
              f"alive: {pid_alive(self.mark_pid(jid))}")
        time.sleep(15)
        print(f"[b/kill -9 worker only] 15 s later: {self.flow_state(run.id)}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    main()
