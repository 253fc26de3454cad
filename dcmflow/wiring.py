"""Build the storage objects an entry point needs from :class:`~dcmflow.settings.Settings`.

This is the one place where settings meet the storage layer, so ``storage`` never has to
know about environment variables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.db import create_engine
from storage.objects import ObjectStore, open_object_store
from storage.repository import Repository

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from dcmflow.settings import Settings

__all__ = [
    "engine_from",
    "object_store_from",
    "repository_from",
    "describe_object_store",
    "describe_database",
]


def engine_from(settings: Settings) -> Engine:
    """The records database engine (SQLite under ``DCMFLOW_HOME`` unless a URL is set)."""
    return create_engine(settings.effective_database_url)


def repository_from(settings: Settings) -> Repository:
    """A :class:`~storage.repository.Repository` on the configured database."""
    return Repository(engine_from(settings))


def object_store_from(settings: Settings) -> ObjectStore:
    """The configured object store: MinIO/S3 when an endpoint is set, else a local folder."""
    return open_object_store(
        local_root=settings.objects_dir,
        endpoint=settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        bucket=settings.s3_bucket,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )


def describe_object_store(settings: Settings) -> str:
    """A one-line human description of where objects go (no secrets)."""
    if settings.s3_endpoint:
        scheme = "https" if settings.s3_secure else "http"
        return f"s3 {scheme}://{settings.s3_endpoint}/{settings.s3_bucket}"
    return f"local {settings.objects_dir}"


def describe_database(settings: Settings) -> str:
    """The database URL with any password masked."""
    from sqlalchemy.engine import make_url

    return make_url(settings.effective_database_url).render_as_string(hide_password=True)
