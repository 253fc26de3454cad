"""Flow tests run against the session's real Prefect server (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def prefect_client_env(server) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Point this process's Prefect client at ``server`` (Prefect caches settings at import)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            yield
        finally:
            drain_prefect_workers()


@pytest.fixture
def prefect_api(prefect_server):  # type: ignore[no-untyped-def]
    with prefect_client_env(prefect_server):
        yield prefect_server


def drain_prefect_workers() -> None:
    """Send queued logs and events now, while the server is still up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
