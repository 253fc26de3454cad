"""Header parsing in ingest: the byte-level reader next to the pydicom-only path, per instance.

Usage (from the repository root, in the venv)::

    python bench/ingest/header_bench.py                    # 2000 × 64×64 MR, 200 × 512×512 CT
    python bench/ingest/header_bench.py --small 500 --ct 50 --rounds 5

Builds the two data sets of ``bench/ingest/run.py`` in memory (``tests/factories.py``,
explicit VR little endian), then times :func:`receiver.ingest.read_instance` (byte-level
:func:`receiver.header.read_header` first) and ``receiver.ingest._read_instance_pydicom``
(``read_partial`` + ``ds.get``, the path before) over every file, ``hash_bytes=False`` as the
ingest worker calls it. Prints the best of ``--rounds`` runs in µs per instance, side by
side, and checks both give equal results. Figures are printed, never asserted (DESIGN.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _best_us(read: Callable[..., Any], files: list[bytes], entry: Any, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for raw in files:
            read(raw, entry, hash_bytes=False)
        best = min(best, time.perf_counter() - start)
    return best / len(files) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000, help="64×64 MR instances")
    parser.add_argument("--ct", type=int, default=200, help="512×512 CT instances")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per path (best is printed)")
    args = parser.parse_args()

    from receiver.header import read_header
    from receiver.ingest import _read_instance_pydicom, read_instance
    from receiver.spool import SpoolEntry
    from tests.factories import make_ct_series, make_small_series, to_p10_bytes

    entry = SpoolEntry(
        received_at=dt.datetime.now(dt.UTC),
        association_id="bench",
        calling_ae="BENCH",
        sop_uid="",
    )
    sets = {
        f"small 64×64 MR ({args.small})": lambda: make_small_series(args.small, 64, 64, seed=2),
        f"CT 512×512 ({args.ct})": lambda: make_ct_series(args.ct, 512, 512, seed=1),
    }
    rows = []
    for name, make in sets.items():
        t = time.perf_counter()
        files = [to_p10_bytes(ds) for ds in make()]
        print(f"built {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        same = all(read_instance(raw, entry) == _read_instance_pydicom(raw, entry) for raw in files)
        fast = sum(read_header(raw) is not None for raw in files)
        old = _best_us(_read_instance_pydicom, files, entry, args.rounds)
        new = _best_us(read_instance, files, entry, args.rounds)
        rows.append((name, old, new, fast, len(files), same))
        del files

    print(f"{'data set':<26} {'pydicom µs':>11} {'byte-level µs':>14} {'speed-up':>9} {'fast path':>10}  equal")
    for name, old, new, fast, count, same in rows:
        print(
            f"{name:<26} {old:>11.1f} {new:>14.1f} {old / new:>8.1f}× {fast:>5}/{count:<4}  {'yes' if same else 'NO'}"
        )


if __name__ == "__main__":
    main()
