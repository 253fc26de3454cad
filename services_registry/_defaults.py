"""Defaults of a job spec that the Python API's signatures show, as plain constants.

They live apart from :mod:`services_registry.spec` (pydantic) so that a service module doing
``from services_registry import Service`` imports no pydantic: the callback process imports
every Python service's module once per series.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_SORT_POSITION"]

DEFAULT_TIMEOUT = 3600.0
"""Seconds a job may run when ``timeout`` is absent: ``"1h"`` everywhere in the seed."""

DEFAULT_SORT_POSITION = 999
"""``sortPosition`` of a registry job that names none (seed ``load_config``)."""
