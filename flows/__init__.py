"""dcmflow flows: ``process_series``, ``process_study``, ``reprocess``, ``import_folder``, ``study_received``.

Quick start::

    from flows import process_series

    state = process_series("1.2.840.113619.2.55.3", return_state=True)
    state.is_completed()   # False when any job failed or timed out

Deployments (``deployments/prefect.yaml``) point at ``flows.process.process_series`` etc.
"""

from __future__ import annotations

from flows.importing import import_folder
from flows.process import process_series, process_study, reprocess
from flows.study_received import study_received

__all__ = ["process_series", "process_study", "reprocess", "import_folder", "study_received"]
