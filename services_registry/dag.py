"""Plan the DAG of selected jobs: pure data, no Prefect.

Edges come from ``dependsOn`` (fan-in allowed: a job may wait for several). The ready order
is the order a single worker would start jobs in: among the jobs whose dependencies are all
done, the highest priority rank first, then the lowest ``sortPosition``, then ``jobName``
(priority ranks in :mod:`services_registry.spec`). ``levels`` groups jobs by depth (longest chain of
dependencies before them): everything in one level may run at the same time.
"""

from __future__ import annotations

import graphlib
import re
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from services_registry.callbacks import SelectedJob
from services_registry import graph
from services_registry.errors import PlanError
from services_registry.spec import JobSpec

__all__ = ["PlanNode", "Plan", "plan_dag", "to_mermaid", "ready_key"]


class PlanNode(BaseModel):
    """One job in the plan, with what the runner needs to schedule it."""

    model_config = ConfigDict(frozen=True)

    name: str
    service: str | None
    worker: str
    depends_on: tuple[str, ...]
    priority: str | int
    rank: int
    sort_position: int | float
    level: str
    timeout: float
    retries: int
    retry_delay: float
    channel: str


class Plan(BaseModel):
    """The DAG as data: nodes (ready order), edges ``(dependency, dependent)``, depth levels."""

    model_config = ConfigDict(frozen=True)

    nodes: tuple[PlanNode, ...]
    edges: tuple[tuple[str, str], ...]
    levels: tuple[tuple[str, ...], ...]
    order: tuple[str, ...]

    def node(self, name: str) -> PlanNode:
        """The node called ``name``."""
        return next(n for n in self.nodes if n.name == name)


def ready_key(job: JobSpec) -> tuple[int, float, str]:
    """Sort key among ready jobs: higher priority rank, then lower sortPosition, then jobName."""
    return graph.ready_key(job.priority_rank, job.sort_position, job.job_name)


def plan_dag(jobs: Iterable[JobSpec | SelectedJob]) -> Plan:
    """Build the DAG of ``jobs`` (usually :attr:`Evaluation.selected`).

    Raises
    ------
    PlanError
        When a job depends on a job that is not in ``jobs``, or on a cycle; callback
        evaluation drops such jobs first, so this signals a caller's mistake.
    """
    specs: dict[str, JobSpec] = {}
    services: dict[str, str | None] = {}
    for item in jobs:
        spec = item.job if isinstance(item, SelectedJob) else item
        if spec.job_name in specs:
            raise PlanError(f"job {spec.job_name!r} given twice")
        specs[spec.job_name] = spec
        services[spec.job_name] = item.service if isinstance(item, SelectedJob) else None
    for spec in specs.values():
        for dep in spec.depends_on:
            if dep not in specs:
                raise PlanError(f"job {spec.job_name!r} depends on {dep!r}, which is not planned")
    depends = {name: spec.depends_on for name, spec in specs.items()}
    try:
        order = graph.ReadyQueue(depends, lambda name: ready_key(specs[name])).drain()
    except graphlib.CycleError as exc:
        raise PlanError("dependency cycle " + " -> ".join(graph.cycle_of(exc))) from None
    depth: dict[str, int] = {}
    for name in order:
        depth[name] = max((depth[d] + 1 for d in specs[name].depends_on), default=0)

    levels: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for name in order:
        levels[depth[name]].append(name)
    for level in levels:
        level.sort(key=lambda n: ready_key(specs[n]))
    nodes = tuple(
        PlanNode(
            name=name,
            service=services[name],
            worker=specs[name].worker,
            depends_on=specs[name].depends_on,
            priority=specs[name].priority,
            rank=specs[name].priority_rank,
            sort_position=specs[name].sort_position,
            level=specs[name].level,
            timeout=specs[name].timeout,
            retries=specs[name].retries,
            retry_delay=specs[name].retry_delay,
            channel=specs[name].channel,
        )
        for name in order
    )
    edges = tuple((dep, name) for name in order for dep in specs[name].depends_on)
    return Plan(nodes=nodes, edges=edges, levels=tuple(tuple(lv) for lv in levels), order=tuple(order))


def to_mermaid(plan: Plan) -> str:
    """Mermaid ``flowchart`` text of the plan (for Prefect markdown artifacts and docs)."""
    ids = {node.name: f"j{i}" for i, node in enumerate(plan.nodes)}  # names may hold any character
    lines = ["flowchart TD"]
    for node in plan.nodes:
        label = re.sub(r'["<>]', "_", node.name)
        lines.append(f'    {ids[node.name]}["{label}"]')
    for dep, name in plan.edges:
        lines.append(f"    {ids[dep]} --> {ids[name]}")
    return "\n".join(lines) + "\n"
