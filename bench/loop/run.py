"""The closed loop: last C-STORE acknowledged → process-series Running / Completed, beside Prefect's floor.

Usage::

    python bench/loop/run.py [--reps 5] [--warmup 1] [--stable-age 2] [--slices 20] [--size 64]

One run, one machine, one Prefect server:

1. ``dcmflow up`` is started as a subprocess in a temporary ``DCMFLOW_HOME`` (free ports,
   ``DCMFLOW_STABLE_AGE=--stable-age``) after ``dcmflow services install`` of a trivial
   service (``tests/examples/ct_volume``: one job counting the slices); the bench waits for
   ``run/up.json`` and the deployments.
2. Prefect's floor, ``bench/loop/trivial.py``: a no-op flow served in its own process with a
   ``DeploymentEventTrigger`` on ``bench.floor`` events (``serve(..., query_seconds=0.5)``, as
   ``dcmflow serve-flows`` serves ``process-series``), on the same server.
3. Each repetition measures, one after the other (interleaved, so load hits all alike):
   ``floor`` (POST one ``bench.floor`` event), ``quiet`` (one synthetic CT series sent by a
   pynetdicom StoreSCU in this process, without (0020,1209): closed by the quiet period) and
   ``count`` (the same with NumberOfSeriesRelatedInstances = slice count: closed once all
   are in and the association is released). Before each measurement the bench waits until no
   flow run is scheduled, pending or running (study-received and process-study runs that a
   new study also triggers included).
4. The timestamps come from Prefect's public REST API: the event's ``received`` (``POST
   /events/filter``), the flow run's ``created`` (``POST /flow_runs/filter``, matched on its
   parameters) and its states' timestamps (``GET /flow_run_states/?flow_run_id=``): Pending
   (the runner picked it up and starts its process), Running (the flow's code started in
   that process), Completed. The last ack / the emit are this process's wall clock; all on
   one machine, one clock.

Figures are printed, never asserted (bench/README.md). ``up`` is stopped with SIGTERM at the
end, on an error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(ROOT))

DCMFLOW = [sys.executable, "-c", "from dcmflow.cli import main; main()"]
SERVICE = ROOT / "tests" / "examples" / "ct_volume"
SERIES_DEPLOYMENT = "process-series/process-series"
FLOOR_DEPLOYMENT = "noop/floor"
ACTIVE_STATES = ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING"]
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
MODES = ("floor", "quiet", "count")
CALLING_AE = "LOOPBENCH"


# --------------------------------------------------------------------------- small helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group we started (its own session), SIGKILL after ``grace``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"  pid {process.pid} did not stop within {grace:.0f} s: SIGKILL")
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


# --------------------------------------------------------------------------- Prefect REST API


class Api:
    """The few public Prefect REST calls the bench needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=15)
        self._flow_names: dict[str, str] = {}

    def deployment_id(self, full_name: str) -> str | None:
        response = self.http.get(f"/deployments/name/{full_name}")
        return response.json()["id"] if response.status_code == 200 else None

    def post_event(self, name: str, resource_id: str, payload: dict[str, Any]) -> None:
        event = {"id": str(uuid.uuid4()), "occurred": now().isoformat(), "event": name,
                 "resource": {"prefect.resource.id": resource_id}, "payload": payload, "related": []}
        self.http.post("/events", json=[event]).raise_for_status()

    def event(self, name: str, resource_id: str) -> dict[str, Any] | None:
        body = {"filter": {"event": {"name": [name]}, "any_resource": {"id": [resource_id]}}, "limit": 5}
        response = self.http.post("/events/filter", json=body)
        response.raise_for_status()
        events = response.json().get("events", [])
        return min(events, key=lambda e: e["received"]) if events else None

    def flow_run(self, deployment_id: str, parameter: str, value: Any) -> dict[str, Any] | None:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 50}
        response = self.http.post("/flow_runs/filter", json=body)
        response.raise_for_status()
        for run in response.json():
            if run.get("parameters", {}).get(parameter) == value:
                return run
        return None

    def states(self, flow_run_id: str) -> list[dict[str, Any]]:
        response = self.http.get("/flow_run_states/", params={"flow_run_id": flow_run_id})
        response.raise_for_status()
        return sorted(response.json(), key=lambda s: s["timestamp"])

    def failed_actions(self, since: dt.datetime) -> list[str]:
        body = {"filter": {"event": {"name": ["prefect.automation.action.failed"]}, "occurred": {"since": since.isoformat()}},
                "limit": 10}
        response = self.http.post("/events/filter", json=body)
        return [str(e.get("payload", {}).get("reason", e.get("payload"))) for e in response.json().get("events", [])]

    def trigger_fired(self, flow_run_id: str) -> dt.datetime | None:
        """When the automation that created this run fired (its ``prefect.automation.action.triggered``
        event, related to the run, carries the firing time as ``occurred``)."""
        body = {"filter": {"event": {"name": ["prefect.automation.action.triggered"]},
                           "related": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 5}
        response = self.http.post("/events/filter", json=body)
        response.raise_for_status()
        events = response.json().get("events", [])
        times = [t for e in events if (t := parse_time(e["occurred"])) is not None]
        return min(times) if times else None

    def flow_name(self, flow_id: str) -> str:
        if flow_id not in self._flow_names:
            response = self.http.get(f"/flows/{flow_id}")
            self._flow_names[flow_id] = response.json().get("name", "?") if response.status_code == 200 else "?"
        return self._flow_names[flow_id]

    def overlapping(self, flow_run_id: str, since: dt.datetime, begin: dt.datetime, end: dt.datetime) -> list[str]:
        """Flows of the other runs alive (created … ended) at some time in [begin, end]."""
        body = {"flow_runs": {"expected_start_time": {"after_": (since - dt.timedelta(seconds=60)).isoformat()}}, "limit": 50}
        response = self.http.post("/flow_runs/filter", json=body)
        response.raise_for_status()
        names = []
        for run in response.json():
            created, ended = parse_time(run["created"]), parse_time(run.get("end_time")) or now()
            if run["id"] != flow_run_id and created is not None and created <= end and ended >= begin:
                names.append(self.flow_name(run["flow_id"]))
        return sorted(names)

    def active_runs(self) -> list[dict[str, Any]]:
        body = {"flow_runs": {"state": {"type": {"any_": ACTIVE_STATES}}}, "limit": 50}
        response = self.http.post("/flow_runs/filter", json=body)
        response.raise_for_status()
        return response.json()


# --------------------------------------------------------------------------- one measurement


@dataclass
class Sample:
    mode: str
    rep: int
    start: dt.datetime
    """Last C-STORE response (dcmflow) or just before the POST of the event (floor)."""
    received: dt.datetime | None = None
    fired: dt.datetime | None = None
    """The trigger fired (automation triggered; its RunDeployment action then creates the run)."""
    created: dt.datetime | None = None
    pending: dt.datetime | None = None
    running: dt.datetime | None = None
    final: dt.datetime | None = None
    final_state: str = ""
    run_name: str = ""
    run_id: str = ""
    note: str = ""
    send_s: float = 0.0
    others: list[str] = field(default_factory=list)
    """Other flow runs alive while this one started (created … Running)."""

    def spans(self) -> dict[str, float | None]:
        return {
            "start→received": seconds(self.start, self.received),
            "received→fired": seconds(self.received, self.fired),
            "fired→created": seconds(self.fired, self.created),
            "received→created": seconds(self.received, self.created),
            "created→Pending": seconds(self.created, self.pending),
            "Pending→Running": seconds(self.pending, self.running),
            "created→Running": seconds(self.created, self.running),
            "received→Running": seconds(self.received, self.running),
            "start→Running": seconds(self.start, self.running),
            "start→Completed": seconds(self.start, self.final),
        }


def send_series(datasets: list[Any], port: int, ae_title: str) -> tuple[dt.datetime, float]:
    """C-STORE every slice in one association; returns (wall time of the last response, send seconds)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AE)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"association to {ae_title}@127.0.0.1:{port} failed")
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    last_ack = now()
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            last_ack = now()
            status = int(rsp.Status) if "Status" in rsp else None
            if status not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise RuntimeError(f"C-STORE of {ds.SOPInstanceUID} failed: {status}")
    except BaseException:
        assoc.abort()
        raise
    send_s = time.perf_counter() - t0
    assoc.release()
    return last_ack, send_s


def follow(api: Api, sample: Sample, *, event: str, resource_id: str, deployment_id: str,
           parameter: str, value: Any, timeout: float) -> Sample:
    """Poll the API until the run of ``sample`` is final (or ``timeout``), filling its timestamps."""
    deadline = time.monotonic() + timeout
    run = None
    while time.monotonic() < deadline:
        if sample.received is None:
            found = api.event(event, resource_id)
            if found is not None:
                sample.received = parse_time(found["received"])
        if run is None:
            run = api.flow_run(deployment_id, parameter, value)
        if run is not None:
            states = api.states(run["id"])
            types = {s["type"] for s in states}
            if types & FINAL_STATES and sample.received is not None:
                sample.run_name, sample.run_id = run["name"], run["id"]
                sample.created = parse_time(run["created"])
                for state in states:
                    stamp = parse_time(state["timestamp"])
                    if state["type"] == "PENDING" and sample.pending is None:
                        sample.pending = stamp
                    elif state["type"] == "RUNNING" and sample.running is None:
                        sample.running = stamp
                    elif state["type"] in FINAL_STATES:
                        sample.final, sample.final_state = stamp, state["name"]
                sample.fired = api.trigger_fired(run["id"])
                if sample.created is not None and sample.running is not None:
                    sample.others = api.overlapping(run["id"], sample.start, sample.created, sample.running)
                return sample
        time.sleep(0.2)
    sample.note = f"timed out after {timeout:.0f} s (event {'seen' if sample.received else 'not seen'}, run {'found' if run else 'not found'})"
    failures = api.failed_actions(sample.start)
    if failures:
        sample.note += "; automation actions failed: " + "; ".join(failures)[:300]
    return sample


def wait_idle(api: Api, timeout: float = 120.0) -> float:
    """Wait until no flow run is scheduled, pending or running (twice in a row); returns seconds waited."""
    t0 = time.monotonic()
    calm = 0
    while time.monotonic() - t0 < timeout:
        calm = calm + 1 if not api.active_runs() else 0
        if calm >= 2:
            break
        time.sleep(0.5)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- the stack


def make_series(n: int, size: int, seed: int, with_count: bool) -> list[Any]:
    try:
        from dcmflow.synthetic import make_ct_series
    except ImportError:  # the generator moved back or is being refactored
        from tests.factories import make_ct_series
    return make_ct_series(n, size, size, seed=seed, patient_id=f"LOOP-{os.getpid()}-{seed}", count_in_header=with_count)


def start_up(home: Path, env: dict[str, str], dicom_port: int, prefect_port: int, log: Path,
             timeout: float) -> tuple[subprocess.Popen[bytes], Any]:
    from dcmflow.stack_state import read_state_file

    out = log.open("ab")
    process = subprocess.Popen(
        [*DCMFLOW, "up", "--port", str(dicom_port), "--prefect-port", str(prefect_port)],
        env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dcmflow up exited with {process.returncode}; log {log}:\n" + log.read_text()[-3000:])
        state = read_state_file(home)
        if state is not None and state.pid == process.pid:
            return process, state
        time.sleep(0.25)
    raise RuntimeError(f"dcmflow up did not write up.json within {timeout:.0f} s; log {log}")


def start_floor(env: dict[str, str], api: Api, log: Path, timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    out = log.open("ab")
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("trivial.py"))],
        env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the floor's serve exited with {process.returncode}; log {log}")
        deployment_id = api.deployment_id(FLOOR_DEPLOYMENT)
        if deployment_id is not None:
            break
        time.sleep(0.25)
    else:
        raise RuntimeError(f"the floor deployment did not appear within {timeout:.0f} s; log {log}")
    # The trigger's automation is created after the deployment and the server's trigger
    # service loads it a moment later: an event sent before that starts nothing. Ready = a
    # probe event (x < 0) that did create a run.
    probe = 0
    while time.monotonic() < deadline:
        probe -= 1
        api.post_event("bench.floor", f"bench.floor.probe{-probe}", {"x": probe})
        for _ in range(20):
            time.sleep(0.25)
            if api.flow_run(deployment_id, "x", probe) is not None:
                return process, deployment_id
    raise RuntimeError(f"the floor's trigger started no run within {timeout:.0f} s; log {log}")


# --------------------------------------------------------------------------- report


def fmt(value: float | None) -> str:
    return "     –" if value is None else f"{value:6.2f}"


def summary(values: list[float]) -> str:
    if not values:
        return f"{'–':>6}  ({'–':>5} … {'–':>5})"
    return f"{statistics.median(values):6.2f}  ({min(values):5.2f} … {max(values):5.2f})"


def spans_of(samples: list[Sample], name: str) -> list[float]:
    return [v for s in samples if not s.note and (v := s.spans()[name]) is not None]


def median(samples: list[Sample], name: str) -> float | None:
    values = spans_of(samples, name)
    return statistics.median(values) if values else None


def report(samples: list[Sample], args: argparse.Namespace) -> None:
    counted = [s for s in samples if s.rep >= 0]
    by_mode = {m: [s for s in counted if s.mode == m] for m in MODES}
    print()
    print("every measurement (s; start = last ack for quiet/count, the POST for floor; rep -1 = warm-up, not counted)")
    names = list(Sample(mode="", rep=0, start=now()).spans())
    print(f"{'mode':<6} {'rep':>3}  " + " ".join(f"{n:>{len(n)}}" for n in names) + "  run / note")
    for s in samples:
        spans = s.spans()
        print(f"{s.mode:<6} {s.rep:>3}  " + " ".join(f"{fmt(spans[n]):>{len(n)}}" for n in names)
              + f"  {s.run_name} {s.final_state} {s.note}".rstrip()
              + (f"  [alive meanwhile: {', '.join(s.others)}]" if s.others else ""))

    print()
    counts = "/".join(str(sum(1 for s in by_mode[m] if not s.note)) for m in MODES)
    print(f"median (min … max), seconds, over the counted repetitions (floor/quiet/count: {counts} of {args.reps})")
    rows = [
        ("last ack / emit → event received", "start→received"),
        ("event received → trigger fired", "received→fired"),
        ("trigger fired → run created (action)", "fired→created"),
        ("event received → flow run created", "received→created"),
        ("created → Pending (runner poll)", "created→Pending"),
        ("Pending → Running (process start)", "Pending→Running"),
        ("created → Running", "created→Running"),
        ("event received → Running", "received→Running"),
        ("last ack / emit → Running", "start→Running"),
        ("last ack / emit → Completed", "start→Completed"),
    ]
    print(f"{'':<36} " + " ".join(f"{h:>23}" for h in ("Prefect floor (noop)", "dcmflow quiet", "dcmflow count")))
    for label, name in rows:
        print(f"{label:<36} " + " ".join(f"{summary(spans_of(by_mode[m], name)):>23}" for m in MODES))

    floor_running = median(by_mode["floor"], "received→Running")
    floor_created = median(by_mode["floor"], "created→Running")
    print()
    print("side by side (medians, s)")
    print(f"  Prefect floor: emit → Running {fmt(median(by_mode['floor'], 'start→Running'))}"
          f"   (event received → Running {fmt(floor_running)}, created → Running {fmt(floor_created)})")
    for mode in ("quiet", "count"):
        group = by_mode[mode]
        wait = args.stable_age if mode == "quiet" else 0.0
        ack_received = median(group, "start→received")
        created_running = median(group, "created→Running")
        share = None
        if ack_received is not None and created_running is not None and floor_created is not None:
            share = (ack_received - wait) + (created_running - floor_created)
        ack_running = median(group, "start→Running")
        limit = args.stable_age + 3.0 if mode == "quiet" else 3.0
        print(f"  dcmflow {mode:<5}: event received → Running {fmt(median(group, 'received→Running'))}"
              f"   last ack → Running {fmt(ack_running)}   → Completed {fmt(median(group, 'start→Completed'))}")
        what = f"(last ack → received{' − quiet ' + format(wait, 'g') + ' s' if wait else ''}) + (created → Running − floor's)"
        print(f"      dcmflow's share {fmt(share)}  = {what}"
              f" = {fmt(None if ack_received is None else ack_received - wait).strip()} + "
              f"{fmt(None if created_running is None or floor_created is None else created_running - floor_created).strip()}")
        verdict = lambda v, goal: "–" if v is None else ("met" if v <= goal else "NOT met")  # noqa: E731
        print(f"      goal share ≤ 0.5 s: {verdict(share, 0.5)};   goal last ack → Running ≤ "
              f"{'quiet + 3' if mode == 'quiet' else '3'} s (= {limit:g} s): {verdict(ack_running, limit)}")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="counted repetitions per mode")
    parser.add_argument("--warmup", type=int, default=1, help="repetitions per mode first, not counted")
    parser.add_argument("--stable-age", type=float, default=2.0, help="DCMFLOW_STABLE_AGE, s")
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="rows = columns")
    parser.add_argument("--timeout", type=float, default=180.0, help="per measurement, s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary DCMFLOW_HOME (logs) after the run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dcmflow-bench-loop-"))
    home = work / "home"
    dicom_port, prefect_port = free_port(), free_port()
    env = os.environ.copy()
    for key in [k for k in env if k.startswith("DCMFLOW_") or k == "PREFECT_API_URL"]:
        env.pop(key)
    env.update({
        "DCMFLOW_HOME": str(home),
        "DCMFLOW_STABLE_AGE": f"{args.stable_age:g}",
        "DCMFLOW_DICOM_PORT": str(dicom_port),
        "DCMFLOW_PREFECT_PORT": str(prefect_port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "TCP_NODELAY": "1",
    })
    print(f"load before: {uptime()}")
    print(f"{os.cpu_count()} CPUs; home {home}; DICOM port {dicom_port}, Prefect port {prefect_port}; "
          f"quiet period {args.stable_age:g} s; {args.slices} × {args.size}×{args.size} CT per series")

    installed = subprocess.run([*DCMFLOW, "services", "install", str(SERVICE)], env=env, cwd=ROOT,
                               capture_output=True, text=True)
    if installed.returncode != 0:
        sys.exit(f"dcmflow services install failed: {installed.stdout}{installed.stderr}")

    up = floor = None
    interrupted = False
    failed = True

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    samples: list[Sample] = []
    try:
        t0 = time.monotonic()
        up, state = start_up(home, env, dicom_port, prefect_port, work / "up.log", timeout=300)
        api = Api(state.api_url)
        series_deployment = api.deployment_id(SERIES_DEPLOYMENT)
        assert series_deployment, "process-series is not deployed"
        print(f"dcmflow up ready in {time.monotonic() - t0:.1f} s (not counted): {state.api_url}")
        floor_env = env | {"PREFECT_API_URL": state.api_url}
        t0 = time.monotonic()
        floor, floor_deployment = start_floor(floor_env, api, work / "floor.log", timeout=120)
        print(f"floor served in {time.monotonic() - t0:.1f} s (not counted)")

        seed = 0
        for rep in [-1] * args.warmup + list(range(args.reps)):
            for mode in MODES:
                wait_idle(api)
                seed += 1
                if mode == "floor":
                    sample = Sample(mode=mode, rep=rep, start=now())
                    api.post_event("bench.floor", f"bench.floor.{seed}", {"x": seed})
                    follow(api, sample, event="bench.floor", resource_id=f"bench.floor.{seed}",
                           deployment_id=floor_deployment, parameter="x", value=seed, timeout=args.timeout)
                else:
                    datasets = make_series(args.slices, args.size, seed, with_count=mode == "count")
                    uid = str(datasets[0].SeriesInstanceUID)
                    try:
                        last_ack, send_s = send_series(datasets, dicom_port, state.ae_title)
                    except RuntimeError as exc:  # recorded, not fatal: the next repetition goes on
                        samples.append(Sample(mode=mode, rep=rep, start=now(), note=f"send failed: {exc}"))
                        print(f"  {mode:<5} rep {rep:>2}: send failed: {exc}", flush=True)
                        continue
                    sample = Sample(mode=mode, rep=rep, start=last_ack, send_s=send_s)
                    follow(api, sample, event="dicom.series.stable", resource_id=f"dicom.series.{uid}",
                           deployment_id=series_deployment, parameter="series_uid", value=uid,
                           timeout=args.timeout + args.stable_age)
                samples.append(sample)
                spans = sample.spans()
                print(f"  {mode:<5} rep {rep:>2}: start → received {fmt(spans['start→received'])}  → Running "
                      f"{fmt(spans['start→Running'])}  → {sample.final_state or 'final'} {fmt(spans['start→Completed'])}"
                      f"  {sample.note}", flush=True)
        wait_idle(api)
        # the action's own events are stored by the server's event persister in batches: ask again
        for sample in samples:
            for _ in range(20):
                if sample.fired is not None or not sample.run_id:
                    break
                sample.fired = api.trigger_fired(sample.run_id)
                if sample.fired is None:
                    time.sleep(0.5)
        failed = False
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping dcmflow up")
    except Exception:  # noqa: BLE001 - print what was measured, keep the logs
        import traceback

        traceback.print_exc()
    finally:
        if floor is not None:
            stop_group(floor, grace=20)
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGTERM)  # up stops its server, runner and flow runs itself
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                stop_group(up, grace=5)
    if samples:
        report(samples, args)
        print()
        sends = [s.send_s for s in samples if s.mode != "floor" and s.rep >= 0]
        if sends:
            print(f"sending one series ({args.slices} C-STOREs, one association): median {statistics.median(sends):.2f} s")
        print(f"load after:  {uptime()}")
    if args.keep or interrupted or failed:
        print(f"logs kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
