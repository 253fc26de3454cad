"""Storage objects from the settings a flow passes in, built by :mod:`storage.wiring`.

``tasks`` may not import ``dcmflow`` (DESIGN.md: dependencies point one way), so the flow
hands over its :class:`dcmflow.settings.Settings` and this module reads only its attributes
(:class:`RuntimeSettings`). Repositories are cached per URL: a flow runs many tasks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from storage.wiring import StorageSettings, object_store_from, repository_at

if TYPE_CHECKING:
    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = ["RuntimeSettings", "repository_of", "store_of", "work_dirs"]


class RuntimeSettings(StorageSettings, Protocol):
    """What tasks read from ``dcmflow.settings.Settings``: the storage settings and these."""

    home: Path
    ae_title: str
    channel_wait: float
    callback_timeout: float
    tls_cert: Path | None
    tls_key: Path | None
    tls_ca: Path | None

    @property
    def services_dir(self) -> Path: ...


_repository = functools.lru_cache(maxsize=8)(repository_at)


def repository_of(settings: RuntimeSettings) -> Repository:
    """The records repository the settings name (one engine per URL per process)."""
    return _repository(settings.effective_database_url)


def store_of(settings: RuntimeSettings) -> ObjectStore:
    """The object store the settings name."""
    return object_store_from(settings)


def work_dirs(settings: RuntimeSettings) -> dict[str, Path]:
    """Folders under ``DCMFLOW_HOME`` the job runner uses: sessions, dispatched jobs, venvs, series cache."""
    home = Path(settings.home)
    return {
        "sessions": home / "work" / "sessions",
        "dispatched": home / "work" / "dispatched",
        "venvs": home / "venvs",
        "cache": home / "cache" / "series",
    }
