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

Where callbacks run
-------------------
:func:`evaluate_isolated` is what dcmflow uses: the callbacks run in child processes (one per
service environment, see :mod:`services_registry._callback_process`), each with a timeout; a
callback that hangs, kills its interpreter or breaks its imports only costs its own job, which
counts as not selected with the reason (``callback_timeout``, ``callback_crashed``). This
process drives the ``sortPosition`` order and hands the accumulated ``added_params`` to every
call, so the order and sharing above hold across processes (values travel as JSON, as they are
stored for the workers anyway). :func:`evaluate_callbacks` runs them in this process (tests of
the semantics do); both call one callback with :func:`services_registry._calling.call_callback`.

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
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from services_registry._calling import CallbackOutcome, RejectionKind, call_callback, interpret_result
from services_registry.runtime import LoadedService
from services_registry.spec import JobSpec, ServiceSpec

__all__ = [
    "SelectedJob",
    "RejectedJob",
    "Evaluation",
    "CallbackOutcome",
    "DEFAULT_CALLBACK_TIMEOUT",
    "evaluate_callbacks",
    "evaluate_isolated",
    "call_callback",
    "interpret_result",
]

logger = logging.getLogger(__name__)

DEFAULT_CALLBACK_TIMEOUT = 30.0
"""Seconds one callback may take before its job counts as not selected (``DCMFLOW_CALLBACK_TIMEOUT``)."""

Interpreter = Callable[[ServiceSpec], str]
"""The Python a service's callbacks run with (its environment); may raise when it has none."""


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


def evaluate_callbacks(
    services: Sequence[LoadedService],
    headers: Mapping[str, Any],
    *,
    level: Literal["series", "study"] | None = "series",
) -> Evaluation:
    """Run every callback of ``services`` on ``headers`` in this process and decide which jobs run.

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
    by_spec = {id(service.spec): service for service in services}
    shared_headers = copy.deepcopy(dict(headers))

    def call(spec: ServiceSpec, job: JobSpec, added: dict[str, Any]) -> CallbackOutcome:
        return call_callback(by_spec[id(spec)], job.job_name, job.callback, job.params, shared_headers, added)

    return _evaluate([service.spec for service in services], level, call)


def evaluate_isolated(
    specs: Sequence[ServiceSpec],
    headers: Mapping[str, Any],
    *,
    level: Literal["series", "study"] | None = "series",
    timeout: float = DEFAULT_CALLBACK_TIMEOUT,
    interpreter: Interpreter | None = None,
) -> Evaluation:
    """:func:`evaluate_callbacks`, with the callbacks run in child processes and a timeout each.

    Parameters
    ----------
    specs
        Services in a stable order (the installed order).
    headers
        The trigger's headers; JSON-able, as :func:`services_registry.headers.headers_from_dataset`
        gives them.
    level
        Evaluate only jobs of this level (``None``: all jobs).
    timeout
        Seconds one callback may take (its first call includes importing its service's code).
    interpreter
        The Python of a service's environment (a venv of its own); default: this interpreter
        for every service. Services with the same interpreter share one child process.

    Returns
    -------
    Evaluation
        As :func:`evaluate_callbacks`; a callback that timed out or whose process died is
        rejected as ``callback_timeout`` / ``callback_crashed`` with the reason.
    """
    from services_registry._callback_process import CallbackProcesses

    pythons: dict[str, str | Exception] = {}

    def python_of(spec: ServiceSpec) -> str | Exception:
        if spec.name not in pythons:
            try:
                pythons[spec.name] = interpreter(spec) if interpreter is not None else sys.executable
            except Exception as exc:  # e.g. its venv failed to build: only its own jobs suffer
                pythons[spec.name] = exc
        return pythons[spec.name]

    with CallbackProcesses(dict(headers), timeout=timeout) as processes:
        for spec in specs:  # start every needed process now: they boot side by side
            if any(not job.disabled and (level is None or job.level == level) for job in spec.jobs):
                python = python_of(spec)
                if not isinstance(python, Exception):
                    processes.prestart(python)

        def call(spec: ServiceSpec, job: JobSpec, added: dict[str, Any]) -> CallbackOutcome:
            python = python_of(spec)
            if isinstance(python, Exception):
                reason = f"no environment for its callbacks: {type(python).__name__}: {python}"
                return CallbackOutcome(scheduled=False, kind="callback_crashed", reason=reason)
            return processes.call(python, spec, job, added)

        return _evaluate(list(specs), level, call)


def _evaluate(
    specs: Sequence[ServiceSpec],
    level: Literal["series", "study"] | None,
    call: Callable[[ServiceSpec, JobSpec, dict[str, Any]], CallbackOutcome],
) -> Evaluation:
    """The seed's evaluation over ``call`` (which runs one callback, here or in a child)."""
    entries = [
        (spec, job)
        for spec in specs
        for job in spec.jobs
        if level is None or job.level == level
    ]
    entries.sort(key=lambda e: e[1].sort_position)  # list.sort is stable: ties keep order
    added: dict[str, Any] = {}
    passed: list[tuple[ServiceSpec, JobSpec]] = []
    rejected: dict[str, RejectedJob] = {}

    def reject(spec: ServiceSpec, job: JobSpec, kind: RejectionKind, reason: str) -> None:
        rejected[job.job_name] = RejectedJob(service=spec.name, job=job, kind=kind, reason=reason)

    for spec, job in entries:
        if job.disabled:
            reject(spec, job, "disabled", "disabled")
            continue
        outcome = call(spec, job, added)
        if outcome.scheduled:
            added[job.job_name] = outcome.params
            passed.append((spec, job))
            continue
        if outcome.kind == "callback_raised":
            logger.error("Exception: %s: %s", job.job_name, outcome.error)
        elif outcome.kind in ("callback_timeout", "callback_crashed"):
            logger.error("Callback of %s (service %s) not selected: %s", job.job_name, spec.name, outcome.reason)
        reject(spec, job, outcome.kind or "callback_false", outcome.reason or "not selected")

    accepted = _accept_by_dependencies(passed)
    accepted_names = {job.job_name for _, job in accepted}
    for spec, job in passed:
        if job.job_name not in accepted_names:
            reject(spec, job, "dependency", _dependency_reason(job, passed, accepted_names, rejected))
    order = tuple(job.job_name for _, job in entries)
    return Evaluation(
        selected=tuple(
            SelectedJob(service=s.name, job=j, added_params=added[j.job_name]) for s, j in accepted
        ),
        rejected=tuple(rejected[name] for name in order if name in rejected),
        added_params=added,
        order=order,
    )


def _accept_by_dependencies(
    passed: list[tuple[ServiceSpec, JobSpec]],
) -> list[tuple[ServiceSpec, JobSpec]]:
    """The seed's ``restructure_jobs``: passes until nothing new is accepted; acceptance order."""
    accepted: list[tuple[ServiceSpec, JobSpec]] = []
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
    passed: list[tuple[ServiceSpec, JobSpec]],
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
