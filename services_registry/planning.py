"""Dry-run planning of one series: evaluate callbacks, then plan the DAG (no worker runs).

Used by ``dcmflow services plan``; the series flow evaluates the same way
(:func:`services_registry.callbacks.evaluate_isolated`: callbacks in child processes, each with
a timeout), so what the dry run shows is what the flow does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from services_registry.callbacks import DEFAULT_CALLBACK_TIMEOUT, Interpreter, evaluate_isolated
from services_registry.dag import plan_dag, to_mermaid
from services_registry.spec import ServiceSpec

__all__ = ["SeriesPlan", "plan_series", "default_dcmpath"]


def default_dcmpath(study_uid: str, series_uid: str) -> str:
    """``dcmpath`` of a received series materialised under ``$DATA``: ``dicom/<study>/<series>``."""
    return f"dicom/{study_uid}/{series_uid}"


class SeriesPlan(BaseModel):
    """Which jobs would run for a series, why the others would not, and in what order."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    instances: int
    dcmpath: str
    selected: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    added_params: dict[str, Any]
    order: list[str]
    levels: list[list[str]]
    edges: list[tuple[str, str]]
    mermaid: str


def plan_series(
    specs: Sequence[ServiceSpec],
    headers: Mapping[str, Any],
    *,
    instances: int,
    timeout: float = DEFAULT_CALLBACK_TIMEOUT,
    interpreter: Interpreter | None = None,
) -> SeriesPlan:
    """Evaluate every series-level callback of ``specs`` on ``headers`` and plan the DAG.

    ``timeout`` and ``interpreter`` as :func:`~services_registry.callbacks.evaluate_isolated`.
    """
    evaluation = evaluate_isolated(specs, headers, level="series", timeout=timeout, interpreter=interpreter)
    plan = plan_dag(evaluation.selected)
    return SeriesPlan(
        series_uid=str(headers.get("seriesId", "")),
        study_uid=str(headers.get("studyId", "")),
        modality=str(headers.get("Modality", "")),
        description=str(headers.get("SeriesDescription", "")),
        instances=instances,
        dcmpath=str(headers.get("dcmpath", "")),
        selected=[
            {
                "job": node.name,
                "service": node.service,
                "priority": node.priority,
                "sortPosition": node.sort_position,
                "dependsOn": list(node.depends_on),
                "timeout": node.timeout,
                "added_params": evaluation.added_params.get(node.name, {}),
            }
            for node in plan.nodes
        ],
        rejected=[
            {"job": r.job.job_name, "service": r.service, "kind": r.kind, "reason": r.reason}
            for r in evaluation.rejected
        ],
        added_params=evaluation.added_params,
        order=list(plan.order),
        levels=[list(level) for level in plan.levels],
        edges=list(plan.edges),
        mermaid=to_mermaid(plan),
    )
