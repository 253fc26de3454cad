"""Ingest benchmark: the same synthetic series sent by DCMTK storescu to dcmflow and to peers.

Usage (from the repository root, in the venv)::

    python bench/ingest/run.py                       # 300 × 512×512 CT + 1000 × 64×64 MR, 1 and 10 associations
    python bench/ingest/run.py --ct 100 --small 300  # quicker
    python bench/ingest/run.py --data /tmp/bench-data --systems dcmflow,dcmtk --assocs 10
    python bench/ingest/run.py --strace              # also count fsync-family calls per instance
    python bench/ingest/run.py --processes 1,2       # dcmflow with 1 and with 2 receiving processes (SO_REUSEPORT)
    python bench/ingest/run.py --repeat 3            # every cell 3 times (systems interleaved); medians

Before each system starts, the page cache is flushed (``sync``) and the script waits until the
kernel has no dirty data left, so no system pays for the previous one's write-back (DCMTK and
Orthanc leave their files unflushed). With ``--repeat N`` the whole round (every data set,
association count and system) runs N times and the table gives the median of each cell, with
every run's figure beside it: on a shared VM single runs move by ±30 %.

Each system is started fresh, on a free loopback port, with its own temporary storage; the
data set is sent once with ``TCP_NODELAY=1 /usr/bin/storescu +sd +r``, in one association or
split round-robin over N folders sent by N storescu processes at once; the wall time until the
last storescu exits is the "all acknowledged" time. For dcmflow the script also polls its
SQLite database until every instance is recorded (objects are durable before records, so this
is "objects + records complete") and reports the time from the last acknowledgement to the
last record, and the spool's own count of ``fdatasync`` calls per acknowledged instance (from
the receiver's log line at stop). With ``--strace`` every server runs under
``strace -f -c --seccomp-bpf`` and the table gives the calls that wait for the disk
(``fsync``, ``fdatasync``, ``syncfs``, ``msync``) of all its processes per instance: for
dcmflow that is the SCP's spool, ingest (object data and names, read marks) and SQLite
(tracing slows the calls it counts a little).
Timings are printed, never asserted (DESIGN.md: bench/ prints figures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
STRACE = "/usr/bin/strace"
SYSTEMS = ("dcmflow", "dcmtk", "orthanc", "pynetdicom")
SYNC_CALLS = "fsync,fdatasync,syncfs,msync,sync_file_range"


def settle_disk(timeout: float = 30.0) -> None:
    """``sync``, then wait until ``/proc/meminfo`` shows (almost) no dirty or write-back pages."""
    os.sync()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        pending_kb = int(fields["Dirty"].split()[0]) + int(fields["Writeback"].split()[0])
        if pending_kb < 4096:
            return
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_echo(port: int, aet: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run([ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers C-ECHO on port {port}")


# -- data ------------------------------------------------------------------------------------


def build_data(root: Path, n_ct: int, n_small: int) -> dict[str, Path]:
    """Write the two data sets (reused when already complete)."""
    from tests.factories import make_ct_series, make_small_series, to_p10_bytes

    sets = {"ct": (n_ct, lambda: make_ct_series(n_ct, 512, 512, seed=1)), "small": (n_small, lambda: make_small_series(n_small, 64, 64, seed=2))}
    out = {}
    for name, (n, make) in sets.items():
        if n <= 0:
            continue  # --ct 0 / --small 0: leave that set out
        folder = root / f"{name}-{n}"
        if not (folder.is_dir() and len(list(folder.glob("*.dcm"))) == n):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            t = time.perf_counter()
            for i, ds in enumerate(make()):
                (folder / f"{i:05d}.dcm").write_bytes(to_p10_bytes(ds))
            print(f"built {name}: {n} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        out[name] = folder
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.dcm"))


def split(folder: Path, parts: int) -> list[Path]:
    """``folder``'s files spread round-robin over ``parts`` sub-folders (hard links; reused)."""
    if parts == 1:
        return [folder]
    root = folder.with_name(f"{folder.name}-split{parts}")
    files = sorted(folder.glob("*.dcm"))
    subs = [root / f"{i:02d}" for i in range(parts)]
    if not (root.is_dir() and sum(len(list(d.glob("*.dcm"))) for d in subs if d.is_dir()) == len(files)):
        shutil.rmtree(root, ignore_errors=True)
        for d in subs:
            d.mkdir(parents=True)
        for i, f in enumerate(files):
            os.link(f, subs[i % parts] / f.name)
    return subs


def send(folders: list[Path], port: int, aet: str) -> tuple[float, float]:
    """storescu each folder in its own association, all at once.

    Returns the wall time until the last storescu exits (all acknowledged) and the CPU
    seconds the storescu processes used (user + system, from ``wait4``).
    """
    env = {**os.environ, "TCP_NODELAY": "1"}
    t = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", str(port), "+sd", "+r", str(folder)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    cpu = 0.0
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
    elapsed = time.perf_counter() - t
    for p in procs:
        if p.returncode != 0:
            err = p.stderr.read() if p.stderr else ""
            raise RuntimeError(f"storescu to {aet} failed ({p.returncode}): {err[-2000:]}")
    return elapsed, cpu


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every descendant, live or reaped by it."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:  # it just exited; its parent's cutime/cstime will hold it
            continue
        total += sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
        stack.extend(int(c) for c in children)
    return total


# -- systems ---------------------------------------------------------------------------------


@dataclass
class Result:
    system: str
    dataset: str
    assocs: int
    n: int
    size: int
    ack_s: float
    recorded_s: float | None = None
    syncs: int | None = None  # fsync, fdatasync, syncfs, msync calls of all the server's processes (--strace)
    spool_syncs_per_instance: float | None = None  # dcmflow: the spool's fdatasyncs per acknowledged instance
    server_cpu_s: float | None = None  # CPU of the server's processes from the first send to complete
    client_cpu_s: float | None = None  # CPU of the storescu processes

    @property
    def complete_s(self) -> float:
        return self.recorded_s if self.recorded_s is not None else self.ack_s


def _traced_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@contextmanager
def process(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, log: Path, strace: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    if strace is not None:
        cmd = [STRACE, "-f", "-c", "--seccomp-bpf", "-e", f"trace={SYNC_CALLS}", "-o", str(strace), *cmd]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # Under strace, stop the traced server (strace then writes its summary and exits).
            target = _traced_child(proc.pid) if strace is not None else None
            os.kill(target or proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


FLUSHES = ("fsync", "fdatasync", "syncfs", "msync")
"""Calls that wait for the disk (``sync_file_range`` as used here only starts write-back)."""


def strace_calls(path: Path | None) -> int | None:
    """Calls of :data:`FLUSHES` in an ``strace -c`` summary file."""
    if path is None or not path.exists():
        return None
    calls = 0
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in FLUSHES and fields[3].isdigit():
            calls += int(fields[3])
    return calls


@dataclass(frozen=True)
class Run:
    """One measurement: a data set, split over ``assocs`` associations, optionally under strace."""

    folders: list[Path]
    dataset: str
    n: int
    size: int
    work: Path
    strace: bool

    @property
    def assocs(self) -> int:
        return len(self.folders)

    def strace_file(self, name: str) -> Path | None:
        return self.work / f"{name}.strace" if self.strace else None


def spool_syncs_per_instance(log_text: str) -> float | None:
    """fdatasyncs per record over every spool's counters line (one per receiving process)."""
    found = [(int(r), int(s)) for r, s in re.findall(r"(\d+) records \([\d.]+ MB\), (\d+) fdatasyncs", log_text)]
    records = sum(r for r, _ in found)
    return sum(s for _, s in found) / records if records else None


def run_dcmflow(run: Run, workers: int, processes: int | None = None) -> Result:
    port = free_port()
    home = run.work / "dcmflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCMFLOW_")}
    env |= {"DCMFLOW_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    if processes is not None:
        env["DCMFLOW_RECEIVER_PROCESSES"] = str(processes)
    cmd = [sys.executable, "-m", "dcmflow.cli.receive", "--port", str(port), "--ingest-workers", str(workers)]
    log = run.work / "dcmflow.log"
    trace = run.strace_file("dcmflow")
    with process(cmd, env=env, cwd=REPO_ROOT, log=log, strace=trace) as proc:
        wait_for_echo(port, "DCMFLOW")
        db = sqlite3.connect(home / "dcmflow.db", timeout=30)
        t0, cpu0 = time.perf_counter(), tree_cpu(proc.pid)
        ack, client_cpu = send(run.folders, port, "DCMFLOW")
        while True:
            (count,) = db.execute("select count(*) from instance").fetchone()
            if count >= run.n:
                break
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"dcmflow recorded only {count}/{run.n}")
            time.sleep(0.01)
        recorded = time.perf_counter() - t0
        server_cpu = tree_cpu(proc.pid) - cpu0
        db.close()
    return Result(
        "dcmflow" if processes is None else f"dcmflow p{processes}", run.dataset, run.assocs, run.n, run.size, ack,
        recorded, syncs=strace_calls(trace), spool_syncs_per_instance=spool_syncs_per_instance(log.read_text(errors="replace")),
        server_cpu_s=server_cpu, client_cpu_s=client_cpu,
    )


def run_peer(name: str, run: Run, cmd: list[str], *, port: int, aet: str, env: dict[str, str] | None = None) -> Result:
    """Start a peer server, send the run's folders to it once, and measure (see :class:`Result`)."""
    trace = run.strace_file(aet.lower())
    with process(cmd, env=env, log=run.work / f"{aet.lower()}.log", strace=trace) as proc:
        wait_for_echo(port, aet)
        cpu0 = tree_cpu(proc.pid)
        ack, client_cpu = send(run.folders, port, aet)
        server_cpu = tree_cpu(proc.pid) - cpu0
    return Result(
        name, run.dataset, run.assocs, run.n, run.size, ack, syncs=strace_calls(trace),  # strace wrote it at exit
        server_cpu_s=server_cpu, client_cpu_s=client_cpu,
    )


def run_dcmtk(run: Run) -> Result:
    port = free_port()
    out = run.work / "dcmtk"
    out.mkdir()
    env = {**os.environ, "TCP_NODELAY": "1"}
    # --fork: one process per association, as DCMTK recommends for concurrent senders
    cmd = [STORESCP, "-aet", "DCMTK", "-od", str(out), *(["--fork"] if run.assocs > 1 else []), str(port)]
    return run_peer("dcmtk storescp", run, cmd, port=port, aet="DCMTK", env=env)


def run_orthanc(run: Run) -> Result:
    port, http = free_port(), free_port()
    root = run.work / "orthanc"
    root.mkdir()
    config = {
        "Name": "bench",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "StorageCompression": False,
        "StableAge": 60,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    # Debian's Orthanc links the system DCMTK, which leaves Nagle on unless TCP_NODELAY=1 is in
    # the environment (storage_perf.md §3.7; upstream Orthanc builds disable it at compile
    # time): without it every response waits for a delayed ACK (~20 instances/s).
    env = {**os.environ, "TCP_NODELAY": "1"}
    return run_peer("orthanc", run, [ORTHANC, str(root / "orthanc.json")], port=port, aet="ORTHANC", env=env)


def run_pynetdicom(run: Run) -> Result:
    port = free_port()
    out = run.work / "pynetdicom"
    out.mkdir()
    cmd = [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-aet", "PYNETDICOM"]
    return run_peer("pynetdicom storescp", run, cmd, port=port, aet="PYNETDICOM")


# -- main ------------------------------------------------------------------------------------


def medians(results: list[Result]) -> list[tuple[Result, list[Result]]]:
    """One median result per (system, data set, associations), with the runs it came from."""
    groups: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.system, r.dataset, r.assocs), []).append(r)

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    out = []
    for runs in groups.values():
        first = runs[0]
        med = replace(
            first,
            ack_s=statistics.median(r.ack_s for r in runs),
            recorded_s=median([r.recorded_s for r in runs]),
            syncs=None if first.syncs is None else round(median([r.syncs for r in runs]) or 0),
            spool_syncs_per_instance=median([r.spool_syncs_per_instance for r in runs]),
            server_cpu_s=median([r.server_cpu_s for r in runs]),
            client_cpu_s=median([r.client_cpu_s for r in runs]),
        )
        out.append((med, runs))
    return out


def table(results: list[Result]) -> str:
    lines = [
        f"{'system':<20} {'dataset':<11} {'assocs':>6} {'n':>5} {'ack inst/s':>10} {'ack MB/s':>9} "
        f"{'complete inst/s':>15} {'last ack→record':>15} {'spool syncs/inst':>16} {'flushes/inst (strace)':>21} "
        f"{'server CPU ms/inst':>18} {'storescu CPU ms/inst':>20}  ack inst/s of each run",
    ]
    for r, runs in medians(results):
        gap = f"{r.recorded_s - r.ack_s:.2f} s" if r.recorded_s is not None else "-"
        spool = f"{r.spool_syncs_per_instance:.2f}" if r.spool_syncs_per_instance is not None else "-"
        traced = f"{r.syncs / r.n:.2f}" if r.syncs is not None else "-"
        each = " / ".join(f"{x.n / x.ack_s:.0f}" for x in runs) if len(runs) > 1 else ""
        server = f"{r.server_cpu_s / r.n * 1000:.2f}" if r.server_cpu_s is not None else "-"
        client = f"{r.client_cpu_s / r.n * 1000:.2f}" if r.client_cpu_s is not None else "-"
        lines.append(
            f"{r.system:<20} {r.dataset:<11} {r.assocs:>6} {r.n:>5} {r.n / r.ack_s:>10.0f} {r.size / 1e6 / r.ack_s:>9.1f} "
            f"{r.n / r.complete_s:>15.0f} {gap:>15} {spool:>16} {traced:>21} {server:>18} {client:>20}  {each}"
        )
    return "\n".join(lines)


def ratios(results: list[Result]) -> str:
    """dcmflow against the peers, per data set and association count (acknowledged and complete)."""
    lines = ["dcmflow ÷ peer (instances/s, medians; acknowledged, and complete = recorded for dcmflow vs acknowledged for the peer):"]
    by = {(r.system, r.dataset, r.assocs): r for r, _ in medians(results)}
    for (system, dataset, assocs), ours in by.items():
        if not system.startswith("dcmflow"):
            continue
        parts = []
        for peer in ("dcmtk storescp", "orthanc", "pynetdicom storescp"):
            other = by.get((peer, dataset, assocs))
            if other is not None:
                parts.append(f"{peer.split()[0]} {other.ack_s / ours.ack_s:.2f}× ack, {other.ack_s / ours.complete_s:.2f}× complete")
        lines.append(f"  {system:<11} {dataset:<11} {assocs:>2} assoc: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=300, help="512×512 CT instances (default 300)")
    parser.add_argument("--small", type=int, default=1000, help="64×64 MR instances (default 1000)")
    parser.add_argument("--data", type=Path, help="folder for the generated data (kept; default: temporary)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--assocs", default="1,10", help="comma list of concurrent association counts (default 1,10)")
    parser.add_argument("--workers", type=int, default=1, help="dcmflow ingest worker processes")
    parser.add_argument(
        "--processes", default="", help="dcmflow receiving processes, comma list (e.g. 1,2: both, side by side; default: its setting's default)"
    )
    parser.add_argument("--strace", action="store_true", help="count fsync-family calls of every server (strace -c)")
    parser.add_argument("--repeat", type=int, default=1, help="run every cell this many times (interleaved); print medians")
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    assoc_counts = [int(a) for a in args.assocs.split(",") if a.strip()]

    load_before = os.getloadavg()
    data_root = args.data or Path(tempfile.mkdtemp(prefix="dcmflow-bench-data-"))
    data = build_data(data_root, args.ct, args.small)
    process_counts = [int(p) for p in args.processes.split(",") if p.strip()] or [None]
    runners: dict[str, Callable[[Run], Result]] = {
        "dcmflow": lambda run: run_dcmflow(run, args.workers, process_counts[0]),
        **{f"dcmflow p{p}": (lambda run, p=p: run_dcmflow(run, args.workers, p)) for p in process_counts[1:]},  # type: ignore[misc]
        "dcmtk": run_dcmtk,
        "orthanc": run_orthanc,
        "pynetdicom": run_pynetdicom,
    }
    results: list[Result] = []
    for round_ in range(1, args.repeat + 1):
        for name, folder in data.items():
            n = len(list(folder.glob("*.dcm")))
            for assocs in assoc_counts:
                folders = split(folder, assocs)
                for system in [s for name in systems for s in runners if s == name or (name == "dcmflow" and s.startswith("dcmflow p"))]:
                    work = Path(tempfile.mkdtemp(prefix=f"dcmflow-bench-{system}-"))
                    try:
                        settle_disk()
                        r = runners[system](Run(folders, folder.name, n, folder_bytes(folder), work, args.strace))
                        results.append(r)
                        print(
                            f"[{round_}/{args.repeat}] {r.system:<20} {name:<6} {assocs:>2} assoc  ack {r.ack_s:6.2f} s"
                            f"  complete {r.complete_s:6.2f} s  load {os.getloadavg()[0]:.2f}",
                            file=sys.stderr,
                        )
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"load average (1/5/15 min) at start: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
        f"at end: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; cores: {os.cpu_count()}"
        + ("; servers under strace -c" if args.strace else "")
    )
    print(table(results))
    print(ratios(results))
    if args.json:
        print(json.dumps([{**r.__dict__} for r in results], indent=2))
    if args.data is None:
        shutil.rmtree(data_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
