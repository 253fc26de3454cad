"""Reading a series onto a new machine: one GET per instance object vs the series archive.

Run::

    python bench/archive_read.py                      # moto's threaded S3 server on loopback
    python bench/archive_read.py --endpoint host:9000 --access-key K --secret-key S   # a real MinIO

What a flow or job on another machine does first (issue 12 item 5): fill its empty series
cache (``tasks.materialise.fill_cache``, the code the materialise step runs) with a
300-instance synthetic 512×512 CT series (``dcmflow.synthetic``, ~0.5 MiB an instance), every
instance checked against its SHA-256 and written to disk. Each round, in turn, into a fresh
cache folder:

* **per object**: the series has no archive: the index lookup (404), then one GET per
  instance object — how every series was read before;
* **archive, whole series**: one GET of the index, one streamed GET of the part;
* **archive, 10 missing**: a cache that lacks 10 instances: the index and 10 ranged GETs;
* **per object, 8 threads** (a reference, not a dcmflow path): the same object GETs from a
  pool of 8 threads, to show how much of the per-object cost is round trips that parallel
  requests would hide.

It also times writing the archive once from the cache (``tasks.archiving.archive_series``:
what the first run of a revision adds to its materialise step). The median of ``--rounds``
rounds is printed, with the load average the run saw. Prints figures; asserts nothing
(DESIGN.md: bench/ never asserts timings).

Note on moto: the default endpoint is moto's threaded server **inside this process**, so its
request handling shares the GIL with the reader; per-request overhead is larger than a real
MinIO's. Use ``--endpoint`` for production figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dcmflow.synthetic import make_ct_series, to_p10_bytes  # noqa: E402
from storage.archive import index_key  # noqa: E402
from storage.keys import instance_key  # noqa: E402
from storage.models import InstancePublic  # noqa: E402
from storage.objects import ObjectInfo, ObjectStore, PutResult, _HashingReader, open_object_store  # noqa: E402
from tasks.archiving import archive_series  # noqa: E402
from tasks.materialise import CachedSeries, fill_cache  # noqa: E402


class CountingStore(ObjectStore):
    """A real store that counts the read requests made through it (GET, ranged GET, stream)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.location = inner.location
        self.gets = 0

    def _put(self, key: str, reader: _HashingReader, length: int | None, content_type: str) -> PutResult:
        return self.inner._put(key, reader, length, content_type)

    def _put_if_absent(self, key: str, reader: _HashingReader, length: int | None) -> PutResult:
        return self.inner._put_if_absent(key, reader, length)

    def _delete(self, key: str) -> None:
        self.inner._delete(key)

    def _get(self, key: str) -> bytes:
        self.gets += 1
        return self.inner._get(key)

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        self.gets += 1
        return self.inner._get_range(key, offset, length)

    def _open_stream(self, key: str) -> BinaryIO:
        self.gets += 1
        return self.inner._open_stream(key)

    def _exists(self, key: str) -> bool:
        return self.inner._exists(key)

    def _stat(self, key: str) -> ObjectInfo:
        return self.inner._stat(key)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner._list(prefix)

    def check(self) -> None:
        self.inner.check()


def _instances(files: list[tuple[str, str, str, bytes]]) -> list[InstancePublic]:
    """Records as ``Repository.list_instances`` returns them (no database needed here)."""
    now = dt.datetime.now(dt.UTC)
    return [
        InstancePublic(
            id=n, series_id=1, received_at=now, sop_uid=sop, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
            object_key=instance_key(study, series, sop), instance_number=n,
        )
        for n, (study, series, sop, data) in enumerate(files, start=1)
    ]


def _per_object_threads(store: ObjectStore, instances: list[InstancePublic], folder: Path, threads: int) -> int:
    folder.mkdir(parents=True)

    def one(instance: InstancePublic) -> None:
        data = store.get(instance.object_key)
        if hashlib.sha256(data).hexdigest() != instance.sha256:
            raise OSError(f"{instance.object_key} does not match its sha256")
        (folder / f"{instance.sop_uid}.dcm").write_bytes(data)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, instances))
    return len(instances)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="host:port of an S3 endpoint (e.g. MinIO); default: moto on loopback")
    parser.add_argument("--access-key", default="testing")
    parser.add_argument("--secret-key", default="testing")
    parser.add_argument("--secure", action="store_true", help="HTTPS to --endpoint")
    parser.add_argument("--bucket", default="dcmflow-bench-archive")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--missing", type=int, default=10, help="instances missing from the cache in the ranged case")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    datasets = make_ct_series(args.instances, seed=7)
    files = [(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPInstanceUID), to_p10_bytes(d)) for d in datasets]
    study, series = files[0][0], files[0][1]
    total = sum(len(f[3]) for f in files)
    print(f"synthetic CT series: {len(files)} instances of 512x512, {total / 2**20:.1f} MiB, built in {time.perf_counter() - t0:.1f} s")

    server = None
    endpoint = args.endpoint
    if endpoint is None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
    kind = "moto's threaded server in this process, loopback" if server else "external endpoint"
    load_before = os.getloadavg()
    try:
        inner = open_object_store(
            local_root=Path("."), endpoint=endpoint, access_key=args.access_key, secret_key=args.secret_key,
            secure=args.secure, bucket=args.bucket,
        )
        store = CountingStore(inner)
        for s, se, sop, data in files:
            store.put(instance_key(s, se, sop), data)
        instances = _instances(files)
        with tempfile.TemporaryDirectory(prefix="dcmflow-archive-bench-") as tmp:
            work = Path(tmp)
            seed_cache = work / "seed"
            fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=seed_cache)  # warm connections
            t0 = time.perf_counter()
            seed = CachedSeries(files=[seed_cache / study / series / f"{i.sop_uid}-{i.sha256[:16]}.dcm" for i in instances])
            report = archive_series(store, instances, seed.files, study_uid=study, series_uid=series)
            write_s = time.perf_counter() - t0
            index_size = store.stat(index_key(study, series)).size
            print(f"S3 endpoint: {endpoint} ({kind})")
            print(f"writing the archive once from the cache: {write_s:.2f} s ({report.line()}; index {index_size / 1024:.0f} KiB)")
            print()

            results: dict[str, list[tuple[int, float]]] = {}
            counter = iter(range(10**6))

            def measure(name: str, run: Callable[[Path], object]) -> None:
                folder = work / f"cache-{next(counter)}"
                before = store.gets
                start = time.perf_counter()
                run(folder)
                results.setdefault(name, []).append((store.gets - before, time.perf_counter() - start))
                shutil.rmtree(folder, ignore_errors=True)

            def per_object(folder: Path) -> None:
                got = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=folder)
                assert got.from_objects == len(instances)

            def whole(folder: Path) -> None:
                got = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=folder)
                assert got.from_archive == len(instances)

            def ranged(folder: Path) -> None:
                shutil.copytree(seed_cache, folder)
                step = max(1, len(instances) // args.missing)
                for instance in instances[::step][: args.missing]:
                    (folder / study / series / f"{instance.sop_uid}-{instance.sha256[:16]}.dcm").unlink()
                got = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=folder)
                assert got.from_archive == args.missing

            index_frame = store.inner.get(index_key(study, series))
            for _ in range(args.rounds):
                # the same series without its archive index: how a series received before
                # archives existed is read (the index is put back, untimed, after)
                store.inner.delete(index_key(study, series))
                measure("per object (no archive)", per_object)
                store.inner.put(index_key(study, series), index_frame, content_type="application/zstd")
                measure("archive, whole series", whole)
                measure(f"archive, {args.missing} missing from the cache", ranged)
                measure(f"per object, {args.threads} threads (reference)", lambda f: _per_object_threads(store, instances, f, args.threads))
    finally:
        if server is not None:
            server.stop()
    load_after = os.getloadavg()

    print(f"{'read path':<42} {'GETs':>6} {'seconds (median)':>17} {'min':>7} {'MiB/s':>7}")
    for name, runs in results.items():
        gets = runs[0][0]
        seconds = [r[1] for r in runs]
        med = statistics.median(seconds)
        moved = total if "missing" not in name else total * args.missing / len(files)
        print(f"{name:<42} {gets:>6} {med:>17.2f} {min(seconds):>7.2f} {moved / 2**20 / med:>7.0f}")
    print()
    print(
        f"{args.rounds} rounds; load average (1, 5, 15 min) {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
        f"before, {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} after; {os.cpu_count()} CPUs"
    )
    print("per-object counts include the index lookup that finds no archive (a 404); seconds include the "
          "SHA-256 check and writing each file to the cache")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
