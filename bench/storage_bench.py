"""Storage benchmark: series-index compression and single-instance read latency.

Run::

    python bench/storage_bench.py                 # local object store only
    python bench/storage_bench.py --s3            # plus an S3 endpoint (starts moto on loopback)
    python bench/storage_bench.py --s3 --endpoint host:9000 --access-key K --secret-key S

Prints figures; asserts nothing about timings (DESIGN.md: bench/ never asserts timings).

(a) Metadata compression on a 200-slice synthetic 512×512 CT series (tests/factories.py, a
    realistic ~260-element GE CT header whose per-slice values vary): raw DICOM JSON bytes,
    zstd-3 per instance, one zstd frame over the whole series (what index.json.zst is), and,
    for comparison, zstd-19 and a trained dictionary.
(b) Latency of reading one instance: a ranged GET into the archive part vs a full GET of the
    same instance stored as its own object vs a full GET of the whole part tar.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from storage.archive import index_key, pack_series, read_instance  # noqa: E402
from storage.keys import instance_key  # noqa: E402
from storage.objects import ObjectStore, open_object_store  # noqa: E402
from tests.factories import make_ct_series, to_p10_bytes  # noqa: E402


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _time_calls(fn: Callable[[], object], n: int) -> list[float]:
    fn()  # warm up connection pool and page cache
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def compression(files: list[bytes], index_frame: bytes, metadata: list[dict], train_docs: list[bytes]) -> None:
    docs = [json.dumps(m, separators=(",", ":")).encode() for m in metadata]
    raw = sum(len(d) for d in docs)
    print("(a) metadata compression: 200-slice 512x512 CT series")
    print(f"    instances                         {len(files)}  ({_fmt_bytes(sum(len(f) for f in files))} of P10)")
    print(f"    elements per header               {len(metadata[0])}")
    print(f"    raw DICOM JSON (bulk as URIs)     {_fmt_bytes(raw)}  ({raw / len(docs):,.0f} B per instance)")
    rows = []
    for level in (3, 19):
        c = zstandard.ZstdCompressor(level=level)
        t0 = time.perf_counter()
        per = sum(len(c.compress(d)) for d in docs)
        rows.append((f"per instance, zstd-{level}", per, (time.perf_counter() - t0) * 1e6 / len(docs), "us/doc"))
    dictionary = zstandard.train_dictionary(16 * 1024, train_docs)
    c = zstandard.ZstdCompressor(level=3, dict_data=dictionary)
    t0 = time.perf_counter()
    per = sum(len(c.compress(d)) for d in docs)
    rows.append(("per instance, zstd-3 + 16 KiB dict*", per, (time.perf_counter() - t0) * 1e6 / len(docs), "us/doc"))
    blob = b"[" + b",".join(docs) + b"]"
    for level in (3, 19):
        t0 = time.perf_counter()
        size = len(zstandard.ZstdCompressor(level=level).compress(blob))
        rows.append((f"whole series, one frame, zstd-{level}", size, (time.perf_counter() - t0) * 1000, "ms total"))
    for name, size, cost, unit in rows:
        print(f"    {name:<38}{_fmt_bytes(size):>12}  {raw / size:7.1f}x   {cost:8.1f} {unit}")
    body = zstandard.ZstdDecompressor().decompress(index_frame)
    print(
        f"    index.json.zst as written (level 3, incl. offsets/hashes): {_fmt_bytes(len(body))} -> "
        f"{_fmt_bytes(len(index_frame))}  {len(body) / len(index_frame):.1f}x"
    )
    print("    * dictionary trained on a different synthetic series (other seed, same scanner template)")


def latency(name: str, store: ObjectStore, files: list[bytes], sops: list[str], study: str, series: str,
            reads: int, part_reads: int) -> None:
    index = pack_series(store, study, series, files)
    for sop, raw in zip(sops, files):
        store.put(instance_key(study, series, sop), raw)
    rng = random.Random(1)
    picks = [rng.randrange(len(sops)) for _ in range(reads + 1)]
    it1, it2 = iter(picks), iter(picks)
    ranged = _time_calls(lambda: read_instance(store, index, sops[next(it1)], verify=False), reads)
    whole = _time_calls(lambda: store.get(instance_key(study, series, sops[next(it2)])), reads)
    part = index.part_key(0)
    part_size = store.stat(part).size
    tar = _time_calls(lambda: store.get(part), part_reads)
    idx = _time_calls(lambda: store.get(index_key(study, series)), reads)
    print(f"(b) one-instance read latency, {name} ({len(files[0]) / 1024:.0f} KiB instances)")
    print(f"    {'method':<44}{'n':>5}{'median ms':>11}{'p95 ms':>10}")
    for label, values in [
        ("ranged GET into part tar (read_instance)", ranged),
        ("full GET of the instance object", whole),
        (f"full GET of the whole part tar ({_fmt_bytes(part_size)})", tar),
        ("GET of index.json.zst (metadata, no tar)", idx),
    ]:
        print(f"    {label:<44}{len(values):>5}{statistics.median(values):>11.2f}{_percentile(values, 0.95):>10.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3", action="store_true", help="also measure an S3 endpoint (moto on loopback unless --endpoint)")
    parser.add_argument("--endpoint", help="host:port of an existing S3 endpoint (e.g. MinIO)")
    parser.add_argument("--access-key", default="testing")
    parser.add_argument("--secret-key", default="testing")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--part-reads", type=int, default=20, help="full-part GETs (each ~100 MiB)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    series = make_ct_series(args.instances, 512, 512, seed=1)
    files = [to_p10_bytes(ds) for ds in series]
    train = [
        json.dumps(to_json, separators=(",", ":")).encode()
        for to_json in _header_json(make_ct_series(args.instances, 64, 64, seed=2))
    ]
    study, series_uid = str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID)
    sops = [str(ds.SOPInstanceUID) for ds in series]
    print(f"synthetic series built in {time.perf_counter() - t0:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        local = open_object_store(local_root=Path(tmp) / "objects")
        t0 = time.perf_counter()
        index = pack_series(local, study, series_uid, files)
        pack_s = time.perf_counter() - t0
        print(f"pack_series (local, {len(files)} instances, {_fmt_bytes(sum(map(len, files)))}): {pack_s:.2f} s")
        print()
        compression(files, local.get(index_key(study, series_uid)), [e.metadata for e in index.instances], train)
        print()
        local2 = open_object_store(local_root=Path(tmp) / "objects2")
        latency("local store (page cache warm)", local2, files, sops, study, series_uid, args.reads, args.part_reads)

    if args.s3:
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
        try:
            s3 = open_object_store(
                local_root=Path("."), endpoint=endpoint, access_key=args.access_key,
                secret_key=args.secret_key, bucket="dcmflow-bench",
            )
            print()
            kind = "moto in this process, loopback" if server else "external endpoint"
            latency(f"S3 {endpoint} ({kind})", s3, files, sops, study, series_uid, args.reads, args.part_reads)
        finally:
            if server is not None:
                server.stop()
    return 0


def _header_json(datasets: list) -> list[dict]:
    """DICOM JSON of headers the way the archive builds it (bulk values as URIs)."""
    import io

    import pydicom

    out = []
    for ds in datasets:
        head = pydicom.dcmread(io.BytesIO(to_p10_bytes(ds)), stop_before_pixels=True)
        out.append(head.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "archives/x?offset=0&length=0"))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
