"""Storage objects an entry point needs from :class:`~dcmflow.settings.Settings`.

The builders are :mod:`storage.wiring`'s (the Prefect tasks use the same ones, and ``tasks``
may not import ``dcmflow``); this module adds the one-line descriptions the commands print.
``storage`` never has to know about environment variables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.wiring import engine_from, object_store_from, repository_from

if TYPE_CHECKING:
    from dcmflow.settings import Settings

__all__ = [
    "engine_from",
    "object_store_from",
    "repository_from",
    "describe_object_store",
    "describe_database",
]


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
