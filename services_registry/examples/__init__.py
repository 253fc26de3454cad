"""Example services, one per registration style, used by the tests and the README.

* ``series_summary_folder/``: a dcm-processor service folder (``registry/settings.json`` array,
  callbacks in ``registry/series_summary/``, workers in ``module/series_summary/``: the same
  top-level package name on both sides, as dcm-processor services have).
* ``series_summary_py.py``: the same idea with the Python API (:class:`services_registry.Service`).

Both accept CT and MR series and write a JSON summary (instance count, modality,
description) of the series under ``$DATA/<params.output>/``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXAMPLES_DIR", "FOLDER_EXAMPLE", "PYTHON_EXAMPLE"]

EXAMPLES_DIR = Path(__file__).parent
"""This folder."""

FOLDER_EXAMPLE = EXAMPLES_DIR / "series_summary_folder"
"""The dcm-processor-format example service."""

PYTHON_EXAMPLE = EXAMPLES_DIR / "series_summary_py.py"
"""The Python-API example service."""
