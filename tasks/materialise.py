"""Put a series' files where dcm-processor workers expect them: ``$DATA/<dcmpath>``.

Instances live in the object store; workers read files. A series is fetched once into a
cache (``DCMFLOW_HOME/cache/series/<study>/<series>/``, one file per SOP instance version,
named by SOP UID and content hash so a new version is a new file) and then hard-linked
(copied across file systems) into each session's data folder as ``<sop>.dcm``. Files and
the series folder are read-only for jobs (``0444`` / ``0555``): a job that tries to change
the received data fails instead of corrupting what the next job reads.

Every path segment is a validated UID (PS3.5 §9.1), never a name from the wire.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from storage.keys import validate_uid

if TYPE_CHECKING:
    from storage.models import InstancePublic
    from storage.objects import ObjectStore

__all__ = ["cached_instance", "materialise_series", "make_read_only"]

_READ_ONLY_FILE = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
_READ_ONLY_DIR = _READ_ONLY_FILE | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def cached_instance(store: ObjectStore, instance: InstancePublic, cache_dir: Path, study_uid: str, series_uid: str) -> Path:
    """The cached file of one instance version, fetched from the store when missing."""
    sop = validate_uid(instance.sop_uid, "SOP Instance UID")
    folder = cache_dir / validate_uid(study_uid, "Study Instance UID") / validate_uid(series_uid, "Series Instance UID")
    target = folder / f"{sop}-{instance.sha256[:16]}.dcm"
    if target.is_file() and target.stat().st_size == instance.size:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    data = store.get(instance.object_key)
    if hashlib.sha256(data).hexdigest() != instance.sha256:
        raise OSError(f"object {instance.object_key} does not match its recorded sha256")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _READ_ONLY_FILE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def make_read_only(folder: Path) -> None:
    """Files ``0444`` and folders ``0555`` under and including ``folder``."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), _READ_ONLY_FILE)
    for root, dirs, _ in os.walk(folder, topdown=False):
        for name in dirs:
            os.chmod(os.path.join(root, name), _READ_ONLY_DIR)
    os.chmod(folder, _READ_ONLY_DIR)


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
        Where the instances' bytes are.
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
    """
    if target.is_dir() and not os.access(target, os.W_OK):
        os.chmod(target, _READ_ONLY_DIR | stat.S_IWUSR)  # re-materialising: make it writable again
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for instance in instances:
        source = cached_instance(store, instance, cache_dir, study_uid, series_uid)
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
