"""The local object store: plain files under one folder, one file per key.

Used by the embedded single-machine setup (``DCMFLOW_HOME/objects``) and by tests. The key
``a/b/c.dcm`` is the file ``root/a/b/c.dcm``, so an operator can inspect objects with ``ls``.

Durability and atomicity come from the classic POSIX recipe: write a temporary file in the
target's own folder, ``fsync`` it, then move it into place (``os.replace`` for an overwrite,
``os.link`` for create-if-absent, which fails with ``EEXIST`` when the name exists), then
``fsync`` the folder so the new name survives a power cut. Temporary names start with ``.``,
which :func:`storage.keys.validate_key` refuses, so they can never collide with a key and are
never listed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from storage.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStoreUnavailableError,
    StorageError,
)
from storage.keys import validate_key
from storage.objects import ObjectInfo, ObjectStore, PutResult, _HashingReader

__all__ = ["LocalObjectStore"]

_TMP_PREFIX = ".tmp-"
_CHUNK = 1024 * 1024


def _fsync_dir(path: Path) -> None:
    """Make a rename/link in ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folders(folder: Path) -> None:
    """``mkdir -p`` whose new folders survive a power cut: each new one's parent is fsynced.

    Fsyncing an object's folder makes its name durable, not the folder's own entry in its
    parent; a new study or series folder would otherwise rest on the file system's goodwill.
    Folders that exist cost one ``stat``.

    Raises
    ------
    NotADirectoryError
        If the folder or one of its parents is a file.
    """
    missing: list[Path] = []
    while True:
        try:
            mode = os.stat(folder).st_mode  # one stat: another writer may create it meanwhile
        except FileNotFoundError:
            missing.append(folder)
            folder = folder.parent
            continue
        if not stat.S_ISDIR(mode):
            raise NotADirectoryError(errno.ENOTDIR, "a file where a folder belongs", str(folder))
        break
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            if not new.is_dir():
                raise
        _fsync_dir(new.parent)  # also when another writer made it: its sync may not be done


class LocalObjectStore(ObjectStore):
    """Objects as files under ``root``.

    Parameters
    ----------
    root : Path
        Folder holding the objects; created (with parents) if missing.

    Notes
    -----
    Empty folders left behind by :meth:`delete` are not pruned: removing them could race with
    a concurrent :meth:`put` into the same folder, and they cost nothing (they are never
    listed).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.location = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreUnavailableError(f"local object store {self.root} cannot be created: {exc}") from exc

    # -- helpers ----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _unavailable(self, key: str, exc: OSError) -> ObjectStoreUnavailableError:
        return ObjectStoreUnavailableError(f"local object store {self.root}: {key}: {exc.strerror or exc}")

    def _write_temp(self, key: str, reader: _HashingReader) -> tuple[Path, Path]:
        """Stream ``reader`` into a fsynced temporary file beside the target; return both paths."""
        final = self._path(key)
        try:
            _make_folders(final.parent)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StorageError(f"cannot store {key}: a parent of it is an object") from exc
        tmp = final.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as out:
                while chunk := reader.read(_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, final

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
        )

    # -- hooks ------------------------------------------------------------------------------

    def _put(self, key: str, reader: _HashingReader, length: int | None, content_type: str) -> PutResult:
        try:
            tmp, final = self._write_temp(key, reader)
            if length is not None and reader.size != length:
                tmp.unlink(missing_ok=True)
                raise ValueError(f"stream ended after {reader.size} of {length} bytes for {key}")
            try:
                os.replace(tmp, final)
            except IsADirectoryError as exc:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"cannot store {key}: it is a prefix of other objects") from exc
            _fsync_dir(final.parent)
        except OSError as exc:
            raise self._unavailable(key, exc) from exc
        return PutResult(key, reader.size, reader.sha256.hexdigest())

    def _put_if_absent(self, key: str, reader: _HashingReader, length: int | None) -> PutResult:
        try:
            tmp, final = self._write_temp(key, reader)
            try:
                if length is not None and reader.size != length:
                    raise ValueError(f"stream ended after {reader.size} of {length} bytes for {key}")
                # link() is atomic and refuses an existing name: the local If-None-Match.
                os.link(tmp, final)
            except FileExistsError as exc:
                raise ObjectExistsError(key) from exc
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise self._unavailable(key, exc) from exc
        return PutResult(key, reader.size, reader.sha256.hexdigest())

    def put_file_if_absent(self, key: str, path: Path, *, sha256: str | None = None, sync: bool = True) -> PutResult:
        """Make the existing file ``path`` the object ``key`` by hard-linking it, if the key is free.

        The local counterpart of :meth:`put_if_absent` for a file that is already on disk, on
        the same file system and durable (its data fsynced), such as a receive-spool file:
        no byte is copied or fsynced again; only the new name is made durable (``link`` then
        ``fsync`` of the key's folder). The object and ``path`` share one inode afterwards, so
        the caller must never modify the file in place (deleting or renaming ``path`` is fine).
        Falls back to copying (:meth:`put_if_absent`) when hard links are impossible (another
        file system, or one without links).

        Parameters
        ----------
        key : str
            Object key; validated before any I/O.
        path : Path
            The durable source file.
        sha256 : str, optional
            The file's SHA-256 hex digest if the caller already computed it (trusted as is);
            otherwise the file is read and hashed.
        sync : bool
            ``False`` leaves making the new name durable to the caller, who links many files and
            then calls :meth:`sync_names` once for all of them (one ``fsync`` per folder instead
            of one per object).

        Returns
        -------
        PutResult
            Key, size and SHA-256 of the object.

        Raises
        ------
        ObjectExistsError
            If the key already holds an object.
        InvalidKeyError
            If ``key`` is not a valid object key.
        ObjectStoreUnavailableError
            If the store cannot be written or ``path`` cannot be read.
        """
        validate_key(key)
        final = self._path(key)
        try:
            try:
                _make_folders(final.parent)
            except (FileExistsError, NotADirectoryError) as exc:
                raise StorageError(f"cannot store {key}: a parent of it is an object") from exc
            size = os.stat(path).st_size
            if sha256 is None:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                sha256 = digest.hexdigest()
            try:
                os.link(path, final)  # atomic, refuses an existing name: the local If-None-Match
            except FileExistsError as exc:
                raise ObjectExistsError(key) from exc
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                with open(path, "rb") as f:
                    return self.put_if_absent(key, f)
            if sync:
                _fsync_dir(final.parent)
        except OSError as exc:
            raise self._unavailable(key, exc) from exc
        return PutResult(key, size, sha256)

    def sync_names(self, keys: Iterable[str]) -> None:
        """Make the names of objects put with ``sync=False`` durable: one ``fsync`` per folder.

        Raises
        ------
        InvalidKeyError
            If a key is not a valid object key.
        ObjectStoreUnavailableError
            If a folder cannot be synced.
        """
        folders = {self._path(validate_key(key)).parent for key in keys}
        for folder in sorted(folders):
            try:
                _fsync_dir(folder)
            except OSError as exc:
                raise self._unavailable(str(folder), exc) from exc

    def _delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a prefix, not an object: nothing stored under exactly this key
        except OSError as exc:
            raise self._unavailable(key, exc) from exc

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFoundError(key) from exc
        except OSError as exc:
            raise self._unavailable(key, exc) from exc

    def _get(self, key: str) -> bytes:
        with self._open(key) as f:
            try:
                return f.read()
            except OSError as exc:
                raise self._unavailable(key, exc) from exc

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        with self._open(key) as f:
            try:
                return os.pread(f.fileno(), length, offset)
            except OSError as exc:
                raise self._unavailable(key, exc) from exc

    def _open_stream(self, key: str) -> BinaryIO:
        return self._open(key)

    def _exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:  # pragma: no cover - permission problems on a parent
            raise self._unavailable(key, exc) from exc

    def _stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(key) from exc
        except OSError as exc:
            raise self._unavailable(key, exc) from exc
        if not path.is_file():
            raise ObjectNotFoundError(key)
        return self._info(key, st)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the deepest folder the prefix names completely, then filter by the
        # partial last segment; sort the keys, since directory order is arbitrary.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(head) if head else self.root
        found: list[tuple[str, os.stat_result]] = []

        def onerror(exc: OSError) -> None:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise self._unavailable(prefix, exc)

        for dirpath, dirnames, filenames in os.walk(start, onerror=onerror):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in filenames:
                if name.startswith("."):
                    continue  # temporary files and anything that is not a valid key
                key = base + name
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # deleted while we walked
                found.append((key, st))
        found.sort(key=lambda item: item[0])
        for key, st in found:
            yield self._info(key, st)

    def check(self) -> None:
        """Verify the folder exists and is writable.

        Raises
        ------
        ObjectStoreUnavailableError
            If it is not.
        """
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise ObjectStoreUnavailableError(f"local object store {self.root} is missing or not writable")
