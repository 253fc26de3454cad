"""Build the records repository and the object store from settings: the one place.

The command line (``dcmflow.wiring``) and the Prefect tasks (``tasks._storage``) both call
these; ``storage`` never reads the environment itself, so it takes any object with the
attributes of :class:`StorageSettings` (``dcmflow.settings.Settings`` has them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = ["StorageSettings", "engine_from", "repository_at", "repository_from", "object_store_from"]


class StorageSettings(Protocol):
    """The settings the storage layer is built from (``DCMFLOW_*`` in ``dcmflow.settings``)."""

    @property
    def effective_database_url(self) -> str: ...

    @property
    def objects_dir(self) -> Path: ...

    @property
    def s3_endpoint(self) -> str | None: ...

    @property
    def s3_access_key(self) -> str | None: ...

    @property
    def s3_secret_key(self) -> Any: ...  # pydantic SecretStr, a plain str, or None

    @property
    def s3_bucket(self) -> str: ...

    @property
    def s3_secure(self) -> bool: ...

    @property
    def s3_region(self) -> str | None: ...


def engine_from(settings: StorageSettings) -> Engine:
    """The records database engine (SQLite under ``DCMFLOW_HOME`` unless a URL is set)."""
    from storage.db import create_engine

    return create_engine(settings.effective_database_url)


def repository_at(url: str) -> Repository:
    """A :class:`~storage.repository.Repository` on a new engine for ``url``."""
    from storage.db import create_engine
    from storage.repository import Repository

    return Repository(create_engine(url))


def repository_from(settings: StorageSettings) -> Repository:
    """A :class:`~storage.repository.Repository` on the configured database."""
    return repository_at(settings.effective_database_url)


def object_store_from(settings: StorageSettings) -> ObjectStore:
    """The configured object store: MinIO/S3 when an endpoint is set, else a local folder."""
    from storage.objects import open_object_store

    secret = settings.s3_secret_key
    return open_object_store(
        local_root=settings.objects_dir,
        endpoint=settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret,
        bucket=settings.s3_bucket,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )
