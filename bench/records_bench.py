"""How fast the Repository records instances: 10,000 instances (20 series x 500), in batches.

Usage::

    python bench/records_bench.py                      # SQLite file (WAL) + PostgreSQL on 127.0.0.1
    python bench/records_bench.py --postgres URL       # PostgreSQL admin URL (a database is created and dropped)
    python bench/records_bench.py --no-postgres

Each (backend, batch size) run starts from a freshly migrated database, records every
instance once (all ``new``), then sends them all again (all ``duplicate``: the cost of a
modality re-sending a study). It prints figures and asserts nothing about them: they depend
on the machine. Compare with reference/storage_perf.md §3.6 (commit per batch, not per row).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.db import create_engine, upgrade
from storage.repository import InstanceIn, RecordStatus, Repository

STUDY = "1.2.826.0.1.3680043.10.999"
SERIES = 20
PER_SERIES = 500
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def make_instances() -> list[InstanceIn]:
    """20 series x 500 instances of one study, arriving series after series."""
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    out = []
    for s in range(1, SERIES + 1):
        series_uid = f"{STUDY}.{s}"
        for n in range(1, PER_SERIES + 1):
            sop = f"{series_uid}.{n}"
            out.append(
                InstanceIn(
                    study_uid=STUDY,
                    series_uid=series_uid,
                    sop_uid=sop,
                    sha256=hashlib.sha256(sop.encode()).hexdigest(),
                    size=525_000,
                    object_key=f"instances/{STUDY}/{series_uid}/{sop}.dcm",
                    received_at=t0 + dt.timedelta(milliseconds=len(out)),
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    instance_number=n,
                    calling_ae="BENCHSCU",
                    patient_id="BENCH-1",
                    patient_name="Bench^Patient",
                    modality="CT",
                    series_number=s,
                    series_description=f"bench {s}",
                )
            )
    return out


def run(url: str, instances: list[InstanceIn], batch: int) -> tuple[float, float]:
    """Seconds to record everything once (new), then again (duplicates)."""
    engine = create_engine(url)
    try:
        upgrade(engine)
        repo = Repository(engine)
        timings = []
        for expected in (RecordStatus.NEW, RecordStatus.DUPLICATE):
            start = time.perf_counter()
            for i in range(0, len(instances), batch):
                out = repo.record_instances(instances[i : i + batch])
                if out[0].status is not expected:
                    raise SystemExit(f"unexpected outcome {out[0].status} (wanted {expected})")
            timings.append(time.perf_counter() - start)
        total = sum(s.instance_count for s in repo.list_series(limit=SERIES))
        if total != len(instances):
            raise SystemExit(f"recorded {total} instances, expected {len(instances)}")
        return timings[0], timings[1]
    finally:
        engine.dispose()


@contextmanager
def sqlite_db() -> Iterator[Callable[[], str]]:
    """Fresh SQLite files in a temporary folder, one per call."""
    with tempfile.TemporaryDirectory(prefix="dcmflow-bench-") as tmp:
        yield lambda: f"sqlite:///{Path(tmp) / uuid.uuid4().hex}.db"


@contextmanager
def postgres_db(admin_url: str) -> Iterator[Callable[[], str]]:
    """Fresh PostgreSQL databases, one per call, all dropped at the end."""
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def fresh() -> str:
        name = f"dcmflow_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        names.append(name)
        return admin.url.set(database=name).render_as_string(hide_password=False)

    try:
        yield fresh
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=DEFAULT_PG_ADMIN, help="PostgreSQL admin URL (default: %(default)s)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--batches", default="100,500", help="comma-separated batch sizes (default: %(default)s)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    instances = make_instances()
    n = len(instances)
    print(f"record_instances: {n} instances ({SERIES} series x {PER_SERIES}), one transaction per batch")
    print(f"{'backend':<12}{'batch':>7}{'new s':>9}{'new inst/s':>12}{'dup s':>9}{'dup inst/s':>12}")

    def report(backend: str, fresh: Callable[[], str]) -> None:
        for batch in batches:
            new_s, dup_s = run(fresh(), instances, batch)
            print(f"{backend:<12}{batch:>7}{new_s:>9.2f}{n / new_s:>12,.0f}{dup_s:>9.2f}{n / dup_s:>12,.0f}")

    with sqlite_db() as fresh:
        report("sqlite-wal", fresh)
    if not args.no_postgres:
        try:
            with postgres_db(args.postgres) as fresh:
                report("postgresql", fresh)
        except Exception as exc:  # unreachable server: say so, keep the SQLite figures
            print(f"postgresql  skipped: {exc.__class__.__name__}: {str(exc).strip().splitlines()[0]}")


if __name__ == "__main__":
    main()
