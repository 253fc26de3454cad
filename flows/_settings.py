"""The flow body is an entry point (DESIGN.md "Settings"): it builds the settings here.

A flow started by a Prefect worker has no CLI around it, so it reads ``DCMFLOW_*`` through
the one settings class itself. This is the single place where ``flows`` imports from the
``dcmflow`` package (only its leaf module ``dcmflow.settings``); tests/test_layout.py allows
exactly this edge.
"""

from __future__ import annotations

from dcmflow.settings import Settings

__all__ = ["load_settings", "max_parallel_jobs"]


def load_settings() -> Settings:
    """A fresh :class:`~dcmflow.settings.Settings` from the environment."""
    return Settings()


def max_parallel_jobs(settings: Settings, parameter: int | None) -> int:
    """The flow parameter when given, else ``DCMFLOW_MAX_PARALLEL_JOBS``."""
    return max(1, parameter if parameter is not None else settings.max_parallel_jobs)
