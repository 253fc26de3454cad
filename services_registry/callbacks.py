"""Callback evaluation, exactly as dcm-processor's scheduler does it (reference §2.2–2.4).

1. All jobs of all services are sorted by ``sortPosition`` (stable: ties keep service order,
   then file/declaration order) **before** any callback runs.
2. Each callback is called with exactly four keyword arguments:
   ``jobName, headers, params, added_params``. ``params`` is the job's ``params`` (``None``
   when absent); ``added_params`` is one dict shared by the whole evaluation.
3. A ``list`` or ``tuple`` return means ``(result, params)`` with ``params = r[1]`` if it is
   a dict, else ``{}``; anything else is the result, with ``{}``. A truthy result schedules
   the job and sets ``added_params[jobName] = params`` at once, so later callbacks see it.
4. A callback that raises is logged (``Exception: <jobName>: <msg>``, the seed's words) and
   its job is not scheduled; the others go on.
5. ``disabled`` jobs are skipped without calling their callback (G1 ``load_config``).
6. Then dependencies, as ``restructure_jobs``: repeated passes accept a job once all of its
   ``dependsOn`` are accepted; a job whose dependency was not scheduled is dropped. The seed
   dropped silently; we record why, naming the root cause.

Two seed bugs are *not* copied: ``added_params`` starts empty on every evaluation (the seed's
mutable default argument leaked entries between triggers), and callbacks get copies of
``headers`` and ``params`` (shared within one evaluation, as in the seed, but the caller's
objects are never mutated). As in the seed, ``added_params`` keeps the entries of jobs that
passed their callback but were later dropped for a dependency: every worker receives the
complete final dict.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from services_registry.loader import strip_mangled
from services_registry.runtime import LoadedService
from services_registry.spec import JobSpec

__all__ = ["SelectedJob", "RejectedJob", "Evaluation", "evaluate_callbacks", "interpret_result"]

logger = logging.getLogger(__name__)

RejectionKind = Literal["callback_false", "callback_raised", "disabled", "dependency"]


class SelectedJob(BaseModel):
    """A job that will run, with what its callback added."""

    model_config = ConfigDict(frozen=True)

    service: str
    job: JobSpec
    added_params: dict[str, Any]


class RejectedJob(BaseModel):
    """A job that will not run, and why (one line)."""

    model_config = ConfigDict(frozen=True)

    service: str
    job: JobSpec
    kind: RejectionKind
    reason: str


class Evaluation(BaseModel):
    """Outcome of one evaluation: selected jobs (acceptance order), rejected jobs (evaluation
    order), the final ``added_params`` every worker receives, and the evaluation order."""

    model_config = ConfigDict(frozen=True)

    selected: tuple[SelectedJob, ...]
    rejected: tuple[RejectedJob, ...]
    added_params: dict[str, Any]
    order: tuple[str, ...]

    @property
    def selected_names(self) -> tuple[str, ...]:
        """Names of the selected jobs, in acceptance order."""
        return tuple(s.job.job_name for s in self.selected)

    def reasons(self) -> dict[str, str]:
        """``{jobName: reason}`` of every rejected job."""
        return {r.job.job_name: r.reason for r in self.rejected}


def interpret_result(result: Any) -> tuple[bool, dict[str, Any], Any]:
    """Read a callback's return value the way the seed's ``check_callbacks`` does.

    Returns
    -------
    tuple
        ``(scheduled, params, raw result)``.

    Raises
    ------
    IndexError
        For an empty list or tuple (the seed's ``r[0]`` fails there too).
    """
    if isinstance(result, (list, tuple)):
        value = result[0]
        params = result[1] if len(result) > 1 and isinstance(result[1], dict) else {}
    else:
        value, params = result, {}
    return bool(value), params, value


def evaluate_callbacks(
    services: Sequence[LoadedService],
    headers: Mapping[str, Any],
    *,
    level: Literal["series", "study"] | None = "series",
) -> Evaluation:
    """Run every callback of ``services`` on ``headers`` and decide which jobs run.

    Parameters
    ----------
    services
        Loaded services, in a stable order (the installed order); their jobs keep file or
        declaration order within it.
    headers
        The trigger's headers (DESIGN.md: flat DICOM keywords plus ``dcmpath``, ``seriesId``,
        ``studyId``, ``patientId``).
    level
        Evaluate only jobs of this level (``None``: all jobs).

    Returns
    -------
    Evaluation
        Selected and rejected jobs with reasons, and the final ``added_params``.
    """
    entries = [
        (service, job)
        for service in services
        for job in service.spec.jobs
        if level is None or job.level == level
    ]
    entries.sort(key=lambda e: e[1].sort_position)  # list.sort is stable: ties keep order
    shared_headers = copy.deepcopy(dict(headers))
    added: dict[str, Any] = {}
    passed: list[tuple[LoadedService, JobSpec]] = []
    rejected: dict[str, RejectedJob] = {}

    def reject(service: LoadedService, job: JobSpec, kind: RejectionKind, reason: str) -> None:
        rejected[job.job_name] = RejectedJob(service=service.spec.name, job=job, kind=kind, reason=reason)

    for service, job in entries:
        if job.disabled:
            reject(service, job, "disabled", "disabled")
            continue
        try:
            function = service.callback(job)
            with service.context():
                raw = function(
                    jobName=job.job_name,
                    headers=shared_headers,
                    params=copy.deepcopy(job.params),
                    added_params=added,
                )
            scheduled, params, value = interpret_result(raw)
        except Exception as exc:  # a service's bug must not stop the others (seed behaviour)
            logger.error("Exception: %s: %s", job.job_name, exc)
            reject(service, job, "callback_raised", f"callback raised {type(exc).__name__}: {strip_mangled(str(exc))}")
            continue
        if scheduled:
            added[job.job_name] = params
            passed.append((service, job))
        else:
            why = params.get("reason") if isinstance(params.get("reason"), str) else None
            reject(service, job, "callback_false", f"callback returned {value!r}" + (f": {why}" if why else ""))

    accepted = _accept_by_dependencies(passed)
    accepted_names = {job.job_name for _, job in accepted}
    for service, job in passed:
        if job.job_name not in accepted_names:
            reject(service, job, "dependency", _dependency_reason(job, passed, accepted_names, rejected))
    order = tuple(job.job_name for _, job in entries)
    return Evaluation(
        selected=tuple(
            SelectedJob(service=s.spec.name, job=j, added_params=added[j.job_name]) for s, j in accepted
        ),
        rejected=tuple(rejected[name] for name in order if name in rejected),
        added_params=added,
        order=order,
    )


def _accept_by_dependencies(
    passed: list[tuple[LoadedService, JobSpec]],
) -> list[tuple[LoadedService, JobSpec]]:
    """The seed's ``restructure_jobs``: passes until nothing new is accepted; acceptance order."""
    accepted: list[tuple[LoadedService, JobSpec]] = []
    names: set[str] = set()
    remaining = list(passed)
    while True:
        progress = False
        for entry in list(remaining):
            if all(dep in names for dep in entry[1].depends_on):
                accepted.append(entry)
                names.add(entry[1].job_name)
                remaining.remove(entry)
                progress = True
        if not progress:
            return accepted


def _dependency_reason(
    job: JobSpec,
    passed: list[tuple[LoadedService, JobSpec]],
    accepted: set[str],
    rejected: Mapping[str, RejectedJob],
) -> str:
    """``dependency 'b' not scheduled (a: callback returned False)``: first missing dependency
    and the root cause, followed through dropped dependencies (cycles named)."""
    by_name = {j.job_name: j for _, j in passed}
    first = next(dep for dep in job.depends_on if dep not in accepted)
    path = [job.job_name]
    current = first
    while True:
        if current in rejected:
            cause = f"{current}: {rejected[current].reason}"
            break
        if current not in by_name:
            cause = f"{current}: not a job of this evaluation"
            break
        if current in path:
            cycle = path[path.index(current):] + [current]
            cause = "dependency cycle " + " -> ".join(cycle)
            break
        path.append(current)
        current = next(dep for dep in by_name[current].depends_on if dep not in accepted)
    return f"dependency {first!r} not scheduled ({cause})"
