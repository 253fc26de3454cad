"""Ingest benchmark: the same synthetic series sent by DCMTK storescu to dcmflow and to peers.

Usage (from the repository root, in the venv)::

    python -m bench.ingest.run                       # 500 × 512×512 CT + 2000 × 64×64 MR
    python -m bench.ingest.run --ct 100 --small 300  # quicker
    python -m bench.ingest.run --data /tmp/bench-data --systems dcmflow,dcmtk

Each system is started fresh, on a free loopback port, with its own temporary storage; the
data set is sent once with ``TCP_NODELAY=1 /usr/bin/storescu +sd +r`` (one association), and
the wall time of storescu is the "all acknowledged" time. For dcmflow the script also polls its
SQLite database until every instance is recorded (objects are put before records, so this is
"objects + records complete") and reports the time from the last acknowledgement to the last
record. Timings are printed, never asserted (DESIGN.md: bench/ prints figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
SYSTEMS = ("dcmflow", "dcmtk", "orthanc", "pynetdicom")


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


def send(folder: Path, port: int, aet: str) -> float:
    """storescu the folder in one association; return the wall time (all acknowledged)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    t = time.perf_counter()
    r = subprocess.run(
        [STORESCU, "-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", str(port), "+sd", "+r", str(folder)],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed ({r.returncode}): {r.stderr[-2000:]}")
    return elapsed


# -- systems ---------------------------------------------------------------------------------


@dataclass
class Result:
    system: str
    dataset: str
    n: int
    size: int
    ack_s: float
    recorded_s: float | None = None

    @property
    def complete_s(self) -> float:
        return self.recorded_s if self.recorded_s is not None else self.ack_s


@contextmanager
def process(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_dcmflow(folder: Path, n: int, work: Path, workers: int) -> Result:
    port = free_port()
    home = work / "dcmflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCMFLOW_")}
    env |= {"DCMFLOW_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "dcmflow.cli.receive", "--port", str(port), "--ingest-workers", str(workers)]
    with process(cmd, env=env, cwd=REPO_ROOT, log=work / "dcmflow.log"):
        wait_for_echo(port, "DCMFLOW")
        db = sqlite3.connect(home / "dcmflow.db", timeout=30)
        t0 = time.perf_counter()
        ack = send(folder, port, "DCMFLOW")
        while True:
            (count,) = db.execute("select count(*) from instance").fetchone()
            if count >= n:
                break
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"dcmflow recorded only {count}/{n}")
            time.sleep(0.01)
        recorded = time.perf_counter() - t0
        db.close()
    return Result("dcmflow", folder.name, n, folder_bytes(folder), ack, recorded)


def run_dcmtk(folder: Path, n: int, work: Path) -> Result:
    port = free_port()
    out = work / "dcmtk"
    out.mkdir()
    env = {**os.environ, "TCP_NODELAY": "1"}
    with process([STORESCP, "-aet", "DCMTK", "-od", str(out), str(port)], env=env, log=work / "dcmtk.log"):
        wait_for_echo(port, "DCMTK")
        ack = send(folder, port, "DCMTK")
    return Result("dcmtk storescp", folder.name, n, folder_bytes(folder), ack)


def run_orthanc(folder: Path, n: int, work: Path) -> Result:
    port, http = free_port(), free_port()
    root = work / "orthanc"
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
    with process([ORTHANC, str(root / "orthanc.json")], env=env, log=work / "orthanc.log"):
        wait_for_echo(port, "ORTHANC")
        ack = send(folder, port, "ORTHANC")
    return Result("orthanc", folder.name, n, folder_bytes(folder), ack)


def run_pynetdicom(folder: Path, n: int, work: Path) -> Result:
    port = free_port()
    out = work / "pynetdicom"
    out.mkdir()
    cmd = [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-aet", "PYNETDICOM"]
    with process(cmd, log=work / "pynetdicom.log"):
        wait_for_echo(port, "PYNETDICOM")
        ack = send(folder, port, "PYNETDICOM")
    return Result("pynetdicom storescp", folder.name, n, folder_bytes(folder), ack)


# -- main ------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    lines = [
        f"{'system':<22} {'dataset':<12} {'n':>5} {'ack inst/s':>11} {'ack MB/s':>9} {'complete inst/s':>16} {'complete MB/s':>14} {'last ack→record':>16}",
    ]
    for r in results:
        gap = f"{r.recorded_s - r.ack_s:.2f} s" if r.recorded_s is not None else "-"
        lines.append(
            f"{r.system:<22} {r.dataset:<12} {r.n:>5} {r.n / r.ack_s:>11.0f} {r.size / 1e6 / r.ack_s:>9.1f} "
            f"{r.n / r.complete_s:>16.0f} {r.size / 1e6 / r.complete_s:>14.1f} {gap:>16}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=500, help="512×512 CT instances (default 500)")
    parser.add_argument("--small", type=int, default=2000, help="64×64 MR instances (default 2000)")
    parser.add_argument("--data", type=Path, help="folder for the generated data (kept; default: temporary)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--workers", type=int, default=1, help="dcmflow ingest worker processes")
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")

    load_before = os.getloadavg()[0]
    data_root = args.data or Path(tempfile.mkdtemp(prefix="dcmflow-bench-data-"))
    data = build_data(data_root, args.ct, args.small)
    runners: dict[str, Callable[[Path, int, Path], Result]] = {
        "dcmflow": lambda f, n, w: run_dcmflow(f, n, w, args.workers),
        "dcmtk": run_dcmtk,
        "orthanc": run_orthanc,
        "pynetdicom": run_pynetdicom,
    }
    results: list[Result] = []
    for name, folder in data.items():
        n = len(list(folder.glob("*.dcm")))
        for system in systems:
            work = Path(tempfile.mkdtemp(prefix=f"dcmflow-bench-{system}-"))
            try:
                r = runners[system](folder, n, work)
                results.append(r)
                print(f"{r.system:<20} {name:<6} ack {r.ack_s:6.2f} s  complete {r.complete_s:6.2f} s", file=sys.stderr)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print(f"1-min load average at start: {load_before:.2f}; cores: {os.cpu_count()}")
    print(table(results))
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    if args.data is None:
        shutil.rmtree(data_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
