"""What a job wrote, kept: files → object store + SessionFile records; logs; storage requests.

dcm-processor workers write their results somewhere under ``$DATA`` (the seed's dcm2nii
writes ``DATA/nifti/<patient>/…``; our example writes ``DATA/summaries/…``), so a job's
*output folder* is its ``$DATA`` minus the received DICOM (``dicom/``): every file that is
new or changed after the job ran is that job's output.

Jobs of one session run side by side, so they cannot share one ``$DATA`` folder and still
tell whose file is whose. Each job attempt gets its own ``$DATA``: a hard-linked copy of the
session's folder (:func:`link_tree`: every earlier job's outputs, no bytes copied), whose
``dicom/`` is a symbolic link to the session's read-only received files. After the job,
its new files are linked back into the session's folder (:func:`merge_outputs`), where
dependents started later find them, as in the seed's shared ``$DATA``. Object keys::

    sessions/<session id>/files/<job>/<path under DATA>     one per output file
    sessions/<session id>/logs/<job>.log                     the job's stdout + stderr

Path segments that are not safe key names (:func:`storage.keys.is_valid_name`) are rewritten
(unsafe characters → ``_``); the SessionFile ``name`` keeps the real relative path.

*Storage requests* are dcm-processor's ``storage`` key (reference §3.3): a dict or a list of
dicts ``{type, path, destination?}`` in ``added_params[jobName]`` (from the callback) or in
the dict a worker returns. ``type: "dicom"`` outputs are sent to a peer by
:mod:`tasks.send`; other types are recorded as not sendable.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import shutil
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.keys import is_valid_name, validate_key

if TYPE_CHECKING:
    from storage.models import SessionFilePublic
    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = [
    "link_tree",
    "merge_outputs",
    "remove_tree",
    "Snapshot",
    "snapshot",
    "changed_files",
    "safe_segment",
    "session_file_key",
    "session_log_key",
    "store_outputs",
    "store_log",
    "restore_outputs",
    "storage_requests",
    "StorageRequest",
]

Snapshot = dict[str, tuple[int, int]]
"""Relative posix path → (size, mtime_ns)."""

_RE_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def link_tree(source: Path, target: Path, *, shared: Iterable[str] = ()) -> None:
    """Recreate ``source`` at ``target`` with hard links (copies across file systems).

    Folder modes are kept, so the read-only received series stays read-only. Top folders
    named in ``shared`` become one relative symbolic link to the source's folder instead of
    a copy: the job's ``$DATA/dicom`` is the session's read-only received series itself,
    one system call where hard-linking a 300-instance series costs ~40 ms on a journaling
    file system (bench/dag). Everything else is one ``os.scandir`` per folder.
    """
    target.mkdir(parents=True, exist_ok=True)
    linked = set(shared)
    modes: list[tuple[str, int]] = []
    for name in sorted(linked):
        if (source / name).is_dir() and not (target / name).exists():
            os.symlink(os.path.relpath(source / name, target), target / name, target_is_directory=True)
    _link_folder(os.fspath(source), os.fspath(target), modes, skip=linked)
    for folder, mode in reversed(modes):  # innermost first: a read-only parent is closed last
        os.chmod(folder, mode)


def _link_folder(source: str, target: str, modes: list[tuple[str, int]], skip: Collection[str] = ()) -> None:
    with os.scandir(source) as entries:
        for entry in entries:
            if entry.name in skip:
                continue
            to = os.path.join(target, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), to)
            elif entry.is_dir():
                try:
                    os.mkdir(to)
                except FileExistsError:
                    pass
                modes.append((to, stat.S_IMODE(entry.stat().st_mode)))
                _link_folder(entry.path, to, modes)
            else:
                try:
                    os.link(entry.path, to)
                except OSError:
                    shutil.copy2(entry.path, to)


def merge_outputs(job_data: Path, session_data: Path, paths: Iterable[str]) -> None:
    """Link a job's output files (relative paths) into the session's shared ``$DATA``."""
    for rel in paths:
        src, dst = job_data / rel, session_data / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.merge")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def remove_tree(folder: Path) -> None:
    """``rm -rf`` that also works through read-only folders."""
    if not folder.exists():
        return
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(folder, ignore_errors=True)


def snapshot(data_dir: Path, exclude: Iterable[str] = ("dicom",)) -> Snapshot:
    """Size and modification time of every file under ``data_dir``, top folders ``exclude`` left out.

    Excluded folders are not walked at all (the received series is read-only and never an
    output), so the scan costs what the earlier jobs' outputs cost, whatever the series size.
    Symbolic links are not followed and not listed.
    """
    found: Snapshot = {}
    if data_dir.is_dir():
        _scan(os.fspath(data_dir), "", set(exclude), found)
    return found


def _scan(folder: str, prefix: str, skip: set[str], found: Snapshot) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if not prefix and entry.name in skip:
                continue
            if entry.is_dir(follow_symlinks=False):
                _scan(entry.path, f"{prefix}{entry.name}/", skip, found)
            elif entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                found[prefix + entry.name] = (st.st_size, st.st_mtime_ns)


def changed_files(before: Snapshot, after: Snapshot) -> list[str]:
    """Paths new or changed between two snapshots, sorted."""
    return sorted(path for path, sig in after.items() if before.get(path) != sig)


def safe_segment(text: str) -> str:
    """``text`` as a safe object-key segment (unsafe characters → ``_``, no leading dot)."""
    cleaned = _RE_UNSAFE.sub("_", text)[:128] or "_"
    if cleaned.startswith(".") or not is_valid_name(cleaned):
        cleaned = "_" + cleaned.lstrip(".")[:127]
    return cleaned


def session_file_key(session_id: int, job_name: str, rel_path: str) -> str:
    """Object key of one output file of a job."""
    parts = [safe_segment(p) for p in rel_path.split("/") if p]
    return validate_key("/".join(["sessions", str(int(session_id)), "files", safe_segment(job_name), *parts]))


def session_log_key(session_id: int, job_name: str) -> str:
    """Object key of a job's log."""
    return validate_key(f"sessions/{int(session_id)}/logs/{safe_segment(job_name)}.log")


def store_outputs(
    repository: Repository,
    store: ObjectStore,
    *,
    session_id: int,
    job_name: str,
    data_dir: Path,
    paths: Iterable[str],
) -> list[SessionFilePublic]:
    """Put each file (relative to ``data_dir``) in the store and record it for the session."""
    records = []
    for rel in paths:
        data = (data_dir / rel).read_bytes()
        key = session_file_key(session_id, job_name, rel)
        content_type = mimetypes.guess_type(rel)[0] or "application/octet-stream"
        store.put(key, data, content_type=content_type)
        records.append(
            repository.add_session_file(
                session_id,
                rel,
                object_key=key,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                content_type=content_type,
                job_name=job_name,
            )
        )
    return records


def restore_outputs(
    store: ObjectStore, files: Iterable[SessionFilePublic], data_dir: Path
) -> list[str]:
    """Put stored job outputs back under ``data_dir`` at their paths; the paths written.

    How a job on another machine sees what its session's earlier jobs wrote (and how the
    series flow sees what a job on another machine wrote): from the object store, never a
    shared folder. Each file is checked against its recorded sha256; a name that would
    leave ``data_dir`` is refused.

    Raises
    ------
    OSError
        A stored file does not match its record, or its name leaves ``data_dir``.
    """
    root = data_dir.resolve()
    written = []
    for record in files:
        target = (data_dir / record.name).resolve()
        if not target.is_relative_to(root) or target == root:
            raise OSError(f"session file {record.name!r} of job {record.job_name!r} is not a path under $DATA")
        data = store.get(record.object_key)
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise OSError(f"object {record.object_key} does not match its recorded sha256")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.restore")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written.append(record.name)
    return written


def store_log(store: ObjectStore, *, session_id: int, job_name: str, log_path: Path) -> str | None:
    """Put a job's log file in the store; its key, or ``None`` when there is no log."""
    if not log_path.is_file():
        return None
    key = session_log_key(session_id, job_name)
    store.put(key, log_path.read_bytes(), content_type="text/plain")
    return key


@dataclass(frozen=True)
class StorageRequest:
    """One entry of a ``storage`` key: send ``path`` (under ``$DATA``) as ``type`` to ``destination``."""

    job_name: str
    type: str
    path: str
    destination: str | None


def _entries(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def storage_requests(job_name: str, added_params: Mapping[str, Any], result: Any) -> list[StorageRequest]:
    """The ``storage`` entries of a job: from its callback (``added_params[jobName]``) and its result."""
    entries = []
    own = added_params.get(job_name)
    if isinstance(own, Mapping):
        entries.extend(_entries(own.get("storage")))
    if isinstance(result, Mapping):
        entries.extend(_entries(result.get("storage")))
    requests = []
    for entry in entries:
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            continue
        destination = entry.get("destination")
        requests.append(
            StorageRequest(job_name, str(entry.get("type", "dicom")).lower(), path, str(destination) if destination else None)
        )
    return requests
