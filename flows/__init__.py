"""dcmflow flows: ``process_series``, ``process_study``, ``reprocess``, ``import_folder``, ``study_received``, ``run_job``.

Quick start::

    from flows import process_series

    state = process_series("1.2.840.113619.2.55.3", return_state=True)
    state.is_completed()   # False when any job failed or timed out

Deployments (``deployments/prefect.yaml``) point at ``flows.process.process_series`` etc.
Names are imported lazily: a served run imports only its own flow's module (every run is a
new process, and each module costs start-up time).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["process_series", "process_study", "reprocess", "import_folder", "study_received", "run_job"]

_WHERE = {
    "process_series": "flows.process",
    "process_study": "flows.process",
    "reprocess": "flows.process",
    "import_folder": "flows.importing",
    "study_received": "flows.new_study",
    "run_job": "flows.run_job",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
