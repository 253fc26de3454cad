"""Storage objects from the settings a flow passes in (the same wiring as ``dcmflow.wiring``).

``tasks`` may not import ``dcmflow`` (DESIGN.md: dependencies point one way), so the flow
hands over its :class:`dcmflow.settings.Settings` and this module reads only its attributes
(:class:`RuntimeSettings`). Engines are cached per URL: a flow runs many tasks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = ["RuntimeSettings", "repository_of", "store_of", "work_dirs"]


class RuntimeSettings(Protocol):
    """What tasks read from ``dcmflow.settings.Settings``."""

    home: Path
    s3_endpoint: str | None
    s3_access_key: str | None
    s3_secret_key: Any
    s3_bucket: str
    s3_secure: bool
    s3_region: str | None
    ae_title: str
    channel_wait: float
    tls_cert: Path | None
    tls_key: Path | None
    tls_ca: Path | None

    @property
    def effective_database_url(self) -> str: ...

    @property
    def objects_dir(self) -> Path: ...

    @property
    def services_dir(self) -> Path: ...


@functools.lru_cache(maxsize=8)
def _repository(url: str) -> Repository:
    from storage.db import create_engine
    from storage.repository import Repository

    return Repository(create_engine(url))


def repository_of(settings: RuntimeSettings) -> Repository:
    """The records repository the settings name (one engine per URL per process)."""
    return _repository(settings.effective_database_url)


def store_of(settings: RuntimeSettings) -> ObjectStore:
    """The object store the settings name."""
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


def work_dirs(settings: RuntimeSettings) -> dict[str, Path]:
    """Folders under ``DCMFLOW_HOME`` the job runner uses: sessions, dispatched jobs, venvs, series cache."""
    home = Path(settings.home)
    return {
        "sessions": home / "work" / "sessions",
        "dispatched": home / "work" / "dispatched",
        "venvs": home / "venvs",
        "cache": home / "cache" / "series",
    }
