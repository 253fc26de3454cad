"""Shared by tests/tasks and tests/flows: a DCMFLOW_HOME with records, objects, services, series."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dcmflow.settings import Settings
from services_registry import load_service
from services_registry.install import install_service
from storage.db import create_engine, upgrade
from storage.keys import instance_key
from storage.objects import ObjectStore, open_object_store
from storage.repository import InstanceIn, Repository
from tests.factories import to_p10_bytes

STORESCP = "/usr/bin/storescp"

# Workers of the test services: every one appends start/end lines to $LOGS/trace.jsonl.
WORKERS = '''
import json, os, subprocess, sys, time
from pathlib import Path


def _trace(jobName, event, **extra):
    line = json.dumps({"job": jobName, "event": event, "t": time.time(), "pid": os.getpid(), **extra})
    with open(os.path.join(os.environ["LOGS"], "trace.jsonl"), "a") as fh:
        fh.write(line + "\\n")


def _started(job):
    try:
        with open(os.path.join(os.environ["LOGS"], "trace.jsonl")) as fh:
            return any(json.loads(line) == {**json.loads(line), "job": job, "event": "start"} for line in fh)
    except FileNotFoundError:
        return False


def record(jobName, headers, params, added_params, **kwargs):
    _trace(jobName, "start")
    meet = (params or {}).get("meet")  # wait (bounded) until that job has started too
    deadline = time.monotonic() + (params or {}).get("meet_timeout", 20)
    while meet and not _started(meet) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep((params or {}).get("sleep", 0.2))
    out = Path(os.environ["DATA"]) / "results" / f"{jobName}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"job": jobName, "series": headers["seriesId"], "saw": sorted(added_params)}))
    print(f"{jobName} done", flush=True)
    _trace(jobName, "end")
    return {"job": jobName}


def sleeper(jobName, headers, params, added_params, **kwargs):
    child = subprocess.Popen(["sleep", "60"])
    _trace(jobName, "start", child=child.pid)
    time.sleep(params["sleep"])
    _trace(jobName, "end")


def crasher(jobName, headers, params, added_params, **kwargs):
    _trace(jobName, "start")
    print("about to crash", flush=True)
    os._exit(3)


def flaky(jobName, headers, params, added_params, **kwargs):
    _trace(jobName, "start")
    marker = Path(os.environ["LOGS"]) / f"{jobName}.tried"
    if not marker.exists():
        marker.write_text("1")
        raise RuntimeError("flaky: first attempt fails")
    _trace(jobName, "end")
    return "second time lucky"


def study_count(jobName, headers, params, added_params, **kwargs):
    study_dir = Path(os.environ["DATA"]) / headers["dcmpath"]
    counts = {p.name: len(list(p.glob("*.dcm"))) for p in sorted(study_dir.iterdir())}
    out = Path(os.environ["DATA"]) / "study" / "counts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"counts": counts, "seriesIds": headers["seriesIds"], "added": added_params[jobName]}))
    return counts


def dicom_out(jobName, headers, params, added_params, **kwargs):
    import pydicom
    from pydicom.uid import generate_uid
    _trace(jobName, "start")
    series_dir = Path(os.environ["DATA"]) / headers["dcmpath"]
    out = Path(os.environ["DATA"]) / "out" / jobName
    out.mkdir(parents=True, exist_ok=True)
    for source in sorted(series_dir.iterdir())[:2]:
        ds = pydicom.dcmread(source)
        ds.SeriesDescription = "dcmflow result"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    _trace(jobName, "end")
'''

CALLBACKS = '''
def always(jobName, headers, params, added_params, **kwargs):
    return True


def send(jobName, headers, params, added_params, **kwargs):
    return True, {"storage": {"type": "dicom", "path": f"out/{jobName}", "destination": params["peer"]}}


def study_level(jobName, headers, params, added_params, **kwargs):
    return True, {"series": headers.get("seriesIds")}
'''


def write_service(root: Path, name: str, jobs: Sequence[dict[str, Any]], *, package: str = "testsvc",
                  workers: str = WORKERS, callbacks: str = CALLBACKS, requirements: str | None = None) -> Path:
    """A dcm-processor service folder ``root/name`` with the test workers and callbacks."""
    folder = root / name
    (folder / "registry" / package).mkdir(parents=True)
    (folder / "module" / package).mkdir(parents=True)
    (folder / "registry" / "settings.json").write_text(json.dumps(list(jobs), indent=2))
    (folder / "registry" / package / "__init__.py").write_text(callbacks)
    (folder / "module" / package / "__init__.py").write_text(workers)
    if requirements is not None:
        (folder / "module" / "requirements.txt").write_text(requirements)
    return folder


def job(name: str, worker: str, callback: str = "always", **fields: Any) -> dict[str, Any]:
    """One settings.json entry of the test package."""
    return {"jobName": name, "worker": f"testsvc.{worker}", "callback": f"testsvc.{callback}", **fields}


@dataclass
class Home:
    """A DCMFLOW_HOME: SQLite records, local objects, installed services."""

    root: Path
    settings: Settings
    repo: Repository
    store: ObjectStore

    def receive(self, datasets: Sequence[Dataset], calling_ae: str = "MODALITY") -> str:
        """Record ``datasets`` as received (bytes in the store under instance_key); their series UID."""
        batch = []
        for ds in datasets:
            data = to_p10_bytes(ds)
            key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            self.store.put(key, data)
            batch.append(InstanceIn(
                study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
                sha256=hashlib.sha256(data).hexdigest(), size=len(data), object_key=key,
                received_at=dt.datetime.now(dt.UTC), sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                instance_number=int(ds.InstanceNumber) if "InstanceNumber" in ds else None,
                calling_ae=calling_ae, patient_id=str(ds.get("PatientID", "")),
                modality=str(ds.get("Modality", "")), series_description=str(ds.get("SeriesDescription", "")),
                series_number=int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
            ))
        self.repo.record_instances(batch)
        return str(datasets[0].SeriesInstanceUID)

    def install(self, folder: Path, name: str | None = None) -> None:
        install_service(load_service(folder, name=name), services_dir=self.settings.services_dir,
                        repository=self.repo, store=self.store)

    @contextmanager
    def environ(self) -> Iterator[None]:
        """DCMFLOW_HOME set for the code under test (flows build Settings from the environment)."""
        saved = {k: v for k, v in os.environ.items() if k.startswith("DCMFLOW_")}
        for key in saved:
            del os.environ[key]
        os.environ["DCMFLOW_HOME"] = str(self.root)
        try:
            yield
        finally:
            for key in [k for k in os.environ if k.startswith("DCMFLOW_")]:
                del os.environ[key]
            os.environ.update(saved)


def make_home(root: Path) -> Home:
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=root)
    engine = create_engine(settings.effective_database_url)
    upgrade(engine)
    return Home(root, settings, Repository(engine), open_object_store(local_root=settings.objects_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def storescp(out_dir: Path, ae_title: str = "PACS") -> Iterator[int]:
    """A DCMTK storescp on a free loopback port, writing what it receives to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([STORESCP, "-aet", ae_title, "-od", str(out_dir), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def read_trace(home: Home, session_id: int) -> list[dict[str, Any]]:
    path = home.root / "work" / "sessions" / str(session_id) / "logs" / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
