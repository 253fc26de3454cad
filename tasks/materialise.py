"""Put a series' files where dcm-processor workers expect them: ``$DATA/<dcmpath>``.

Instances live in the object store; workers read files. A series is fetched once into a
cache (``DCMFLOW_HOME/cache/series/<study>/<series>/``, one file per SOP instance version,
named by SOP UID and content hash so a new version is a new file) and then hard-linked
(copied across file systems) into each session's data folder as ``<sop>.dcm``. Files and
the series folder are read-only for jobs (``0444`` / ``0555``): a job that tries to change
the received data fails instead of corrupting what the next job reads.

Where the bytes come from (:func:`fill_cache`), for the instances the cache lacks:

1. the **series archive** (:mod:`storage.archive`), when its index lists the instance with its
   recorded SHA-256: one GET per part streamed front to back when at least
   :data:`WHOLE_PART_FRACTION` of the part is wanted (a series onto a new machine: one GET
   per series), else one ranged GET per instance (a few late instances);
2. otherwise the **instance object** (one GET each): series received before archives
   existed, or instances not archived yet.

Every instance is checked against the SHA-256 recorded when it was received, whichever way
it came. A damaged archive (a part missing, truncated or not matching its index) raises
:class:`~storage.errors.ArchiveError` naming the part: never wrong bytes, and no silent
slow path that would hide the damage. Nothing reads the index when the cache already holds
the whole series.

Every path segment is a validated UID (PS3.5 §9.1), never a name from the wire.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from storage.archive import read_part_instances, read_series_index
from storage.errors import ArchiveError, ObjectNotFoundError, ObjectRangeError
from storage.keys import validate_uid

if TYPE_CHECKING:
    from storage.archive import ArchivedInstance, SeriesIndex
    from storage.models import InstancePublic
    from storage.objects import ObjectStore

__all__ = [
    "WHOLE_PART_FRACTION",
    "CachedSeries",
    "cached_instance",
    "fill_cache",
    "place_series",
    "materialise_series",
    "make_read_only",
]

WHOLE_PART_FRACTION = 0.5
"""Stream a whole part (one GET) when the instances wanted from it hold at least this share of
its bytes; below it, one ranged GET per instance reads less. A request costs a round trip
(milliseconds); a 512 KiB instance costs about as much again on a fast link."""

_READ_ONLY_FILE = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
_READ_ONLY_DIR = _READ_ONLY_FILE | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


@dataclass
class CachedSeries:
    """The cache files of a series, one per instance in the order given, and how they came.

    Attributes
    ----------
    files : list of Path
        Cache file of each instance, in the order of the ``instances`` given.
    index : SeriesIndex or None
        The archive index if :func:`fill_cache` read it (``None``: no archive, or not read).
    index_read : bool
        Whether the index was looked up (False when the cache already held everything).
    from_cache, from_archive, from_objects : int
        Instances already cached, read from the archive, read from their own objects.
    requests : int
        GET requests made (index included).
    """

    files: list[Path]
    index: SeriesIndex | None = None
    index_read: bool = False
    from_cache: int = 0
    from_archive: int = 0
    from_objects: int = 0
    requests: int = 0
    parts: list[str] = field(default_factory=list)

    def line(self) -> str:
        """``300 instances: 0 cached, 300 from the archive, 0 from instance objects (2 GETs)``."""
        return (
            f"{len(self.files)} instances: {self.from_cache} cached, {self.from_archive} from the archive, "
            f"{self.from_objects} from instance objects ({self.requests} GETs)"
        )


def _series_folder(cache_dir: Path, study_uid: str, series_uid: str) -> Path:
    return cache_dir / validate_uid(study_uid, "Study Instance UID") / validate_uid(series_uid, "Series Instance UID")


def _cache_file(folder: Path, instance: InstancePublic) -> Path:
    return folder / f"{validate_uid(instance.sop_uid, 'SOP Instance UID')}-{instance.sha256[:16]}.dcm"


def _is_cached(path: Path, instance: InstancePublic) -> bool:
    return path.is_file() and path.stat().st_size == instance.size


def _write_cache(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temp file + rename), read-only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _READ_ONLY_FILE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_instance(store: ObjectStore, instance: InstancePublic, cache_dir: Path, study_uid: str, series_uid: str) -> Path:
    """The cached file of one instance version, fetched from its own object when missing."""
    folder = _series_folder(cache_dir, study_uid, series_uid)
    target = _cache_file(folder, instance)
    if _is_cached(target, instance):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    data = store.get(instance.object_key)
    if hashlib.sha256(data).hexdigest() != instance.sha256:
        raise OSError(f"object {instance.object_key} does not match its recorded sha256")
    _write_cache(target, data)
    return target


def _archived(index: SeriesIndex | None, instance: InstancePublic) -> ArchivedInstance | None:
    if index is None:
        return None
    try:
        return index.find(instance.sop_uid, instance.sha256)
    except ObjectNotFoundError:
        return None


def _read_from_archive(
    store: ObjectStore, index: SeriesIndex, wanted: list[tuple[ArchivedInstance, Path]], report: CachedSeries
) -> None:
    """Fill the cache from the archive: a whole part per GET, or one ranged GET per instance."""
    by_part: dict[int, list[tuple[ArchivedInstance, Path]]] = {}
    for entry, path in wanted:
        by_part.setdefault(entry.part, []).append((entry, path))
    sizes = {p.number: p.size for p in index.parts}
    for number, items in sorted(by_part.items()):
        key = index.part_key(number)
        report.parts.append(key)
        paths = {entry.offset: path for entry, path in items}
        if sum(e.length for e, _ in items) >= WHOLE_PART_FRACTION * sizes.get(number, 0):
            report.requests += 1
            for entry, data in read_part_instances(store, index, number, [e for e, _ in items]):
                _write_cache(paths[entry.offset], data)
                report.from_archive += 1
            continue
        for entry, path in items:
            report.requests += 1
            try:
                data = store.get_range(key, entry.offset, entry.length)
            except (ObjectNotFoundError, ObjectRangeError):
                raise ArchiveError(f"series archive part {key} is missing or shorter than its index says") from None
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ArchiveError(f"instance {entry.sop_uid} in {key} does not match its SHA-256: the part is damaged")
            _write_cache(path, data)
            report.from_archive += 1


def fill_cache(
    store: ObjectStore,
    instances: Sequence[InstancePublic],
    *,
    study_uid: str,
    series_uid: str,
    cache_dir: Path,
) -> CachedSeries:
    """Make the series cache hold every instance of ``instances`` (see the module docstring).

    Parameters
    ----------
    store
        Where the archive and the instance objects are.
    instances
        Latest version of each instance (:meth:`Repository.list_instances`).
    study_uid, series_uid
        The series.
    cache_dir
        The shared series cache (``DCMFLOW_HOME/cache/series``).

    Returns
    -------
    CachedSeries
        The cache file of each instance and where the bytes came from.

    Raises
    ------
    ArchiveError
        The archive's index is unreadable, or a part it lists is missing or damaged.
    OSError
        An instance object does not match its recorded SHA-256.
    """
    folder = _series_folder(cache_dir, study_uid, series_uid)
    files = [_cache_file(folder, i) for i in instances]
    report = CachedSeries(files=files)
    missing = [(i, p) for i, p in zip(instances, files) if not _is_cached(p, i)]
    report.from_cache = len(files) - len(missing)
    if not missing:
        return report
    folder.mkdir(parents=True, exist_ok=True)
    report.index_read, report.requests = True, 1
    try:
        report.index = read_series_index(store, study_uid, series_uid)
    except ObjectNotFoundError:
        report.index = None
    archived: list[tuple[ArchivedInstance, Path]] = []
    loose: list[InstancePublic] = []
    for instance, path in missing:
        entry = _archived(report.index, instance)
        if entry is not None:
            archived.append((entry, path))
        else:
            loose.append(instance)
    if archived and report.index is not None:
        _read_from_archive(store, report.index, archived, report)
    for instance in loose:
        cached_instance(store, instance, cache_dir, study_uid, series_uid)
        report.requests += 1
        report.from_objects += 1
    return report


def make_read_only(folder: Path) -> None:
    """Files ``0444`` and folders ``0555`` under and including ``folder``."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), _READ_ONLY_FILE)
    for root, dirs, _ in os.walk(folder, topdown=False):
        for name in dirs:
            os.chmod(os.path.join(root, name), _READ_ONLY_DIR)
    os.chmod(folder, _READ_ONLY_DIR)


def place_series(instances: Sequence[InstancePublic], cached: CachedSeries, target: Path) -> int:
    """Hard-link (or copy) each cached file to ``target/<sop>.dcm`` and make ``target`` read-only.

    Returns
    -------
    int
        Number of files placed.
    """
    if target.is_dir() and not os.access(target, os.W_OK):
        os.chmod(target, _READ_ONLY_DIR | stat.S_IWUSR)  # re-materialising: make it writable again
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for instance, source in zip(instances, cached.files):
        link = target / f"{validate_uid(instance.sop_uid, 'SOP Instance UID')}.dcm"
        if link.exists():
            link.unlink()
        try:
            os.link(source, link)
        except OSError:
            link.write_bytes(source.read_bytes())
        count += 1
    make_read_only(target)
    return count


def materialise_series(
    store: ObjectStore,
    instances: Sequence[InstancePublic],
    *,
    study_uid: str,
    series_uid: str,
    cache_dir: Path,
    target: Path,
) -> int:
    """Make ``target`` hold one ``<sop>.dcm`` per instance, read-only.

    Parameters
    ----------
    store
        Where the instances' bytes are (the series archive, else the instance objects).
    instances
        Latest version of each instance (:meth:`Repository.list_instances`).
    cache_dir
        The shared series cache.
    target
        ``$DATA/<dcmpath>`` of one session.

    Returns
    -------
    int
        Number of files placed.

    Raises
    ------
    ArchiveError, OSError
        As for :func:`fill_cache`.
    """
    cached = fill_cache(store, instances, study_uid=study_uid, series_uid=series_uid, cache_dir=cache_dir)
    return place_series(instances, cached, target)
