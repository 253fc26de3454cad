"""Fixtures for the receiver tests: a real SQLite database, a local object store, a spool,
an in-process SCP on a free loopback port, and helpers to open the same storage in child
processes (ingest workers, a receiver subprocess)."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from receiver import status
from receiver.associations import AssociationTracker, CallerPolicy
from receiver.ingest import Ingester
from receiver.scp import ScpConfig, start_scp
from receiver.spool import Spool, SpoolEntry
from storage.db import create_engine, upgrade
from storage.objects import ObjectStore, open_object_store
from storage.repository import Repository
from tests.factories import make_ct_series, make_small_series, to_p10_bytes

logging.getLogger("pynetdicom").setLevel(logging.WARNING)

DCMTK_STORESCU = "/usr/bin/storescu"
DCMTK_ECHOSCU = "/usr/bin/echoscu"
AE_TITLE = "DCMFLOW"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_local_storage(objects_dir: str, db_url: str) -> tuple[ObjectStore, Repository]:
    """Module-level (picklable through functools.partial) storage opener for child processes."""
    return open_object_store(local_root=Path(objects_dir)), Repository(create_engine(db_url))


@dataclass
class Env:
    """One test's storage: database, local objects, spool."""

    root: Path
    db_url: str
    objects_dir: Path
    spool_dir: Path
    repo: Repository
    store: ObjectStore
    spool: Spool

    def factory(self) -> functools.partial[tuple[ObjectStore, Repository]]:
        return functools.partial(open_local_storage, str(self.objects_dir), self.db_url)

    def ingester(self, **kw: object) -> Ingester:
        return Ingester(self.spool, self.store, self.repo, **kw)  # type: ignore[arg-type]

    def instance_count(self) -> int:
        import sqlalchemy as sa

        with self.repo.engine.connect() as conn:
            return int(conn.execute(sa.text("select count(*) from instance")).scalar_one())


TEST_SEGMENT_SIZE = 4 * 1024**2
"""Spool segments of the tests: small, so that a test prepares them fast and rolls over."""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    db_url = f"sqlite:///{tmp_path / 'dcmflow.db'}"
    engine = create_engine(db_url)
    upgrade(engine)
    objects = tmp_path / "objects"
    spool = Spool(tmp_path / "spool", min_free_bytes=0, min_free_fraction=0.0, segment_size=TEST_SEGMENT_SIZE)
    yield Env(
        root=tmp_path,
        db_url=db_url,
        objects_dir=objects,
        spool_dir=tmp_path / "spool",
        repo=Repository(engine),
        store=open_object_store(local_root=objects),
        spool=spool,
    )
    spool.close()


@dataclass
class RunningScp:
    port: int
    tracker: AssociationTracker
    policy: CallerPolicy


@pytest.fixture
def scp(env: Env) -> Iterator[RunningScp]:
    """An SCP on a free loopback port writing into ``env.spool`` (ingest is run by the test)."""
    tracker = AssociationTracker()
    policy = CallerPolicy()
    port = free_port()
    server = start_scp(ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port), env.spool, tracker, policy)
    try:
        yield RunningScp(port, tracker, policy)
    finally:
        server.shutdown()


def spooled(spool: Spool) -> list[tuple[SpoolEntry, bytes]]:
    """Every record waiting in the spool, in log order (read without moving any read mark)."""
    reader = spool.reader()
    try:
        return reader.read(1_000_000)
    finally:
        reader.close()


def store_acknowledged(assoc: Any, ds: Dataset) -> bool | None:
    """Send one C-STORE on a pynetdicom association: True if answered Success, False for any
    other status, None if the association broke (what a sender saw acknowledged stops there)."""
    try:
        rsp = assoc.send_c_store(ds)
    except Exception:
        return None
    if not assoc.is_established or "Status" not in rsp:
        return None
    return bool(rsp.Status == status.SUCCESS)


def write_series(folder: Path, datasets: list[Dataset]) -> list[Path]:
    """Write datasets as P10 files into ``folder``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"{i:05d}.dcm"
        p.write_bytes(to_p10_bytes(ds))
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def study() -> list[Dataset]:
    """A two-series study: 12 small CT slices (128×128) and 30 small MR images, one study UID."""
    ct = make_ct_series(12, 128, 128, seed=7)
    mr = make_small_series(30, study_uid=ct[0].StudyInstanceUID, seed=7)
    return ct + mr
