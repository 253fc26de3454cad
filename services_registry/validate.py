"""Install-time checks that need more than one job: names, dependencies, cycles, imports.

The seed checked none of this: a duplicate ``jobName`` was logged and skipped (first one in
an unspecified glob order won), and a job depending on an unknown job or on a cycle was
silently never scheduled (reference §1.2, §2.4). dcmflow refuses such a service at install
time with one line naming the file and field, because a silent drop is found by a
radiologist missing a report, much later.
"""

from __future__ import annotations

from collections.abc import Sequence

from services_registry.errors import CycleError, ServiceValidationError
from services_registry.graph import find_cycle
from services_registry.loader import strip_mangled
from services_registry.runtime import LoadedService
from services_registry.spec import ServiceSpec

__all__ = ["validate_services", "check_resolvable"]


def validate_services(services: Sequence[ServiceSpec], *, installed: Sequence[ServiceSpec] = ()) -> None:
    """Check job names and dependencies of ``services`` together with ``installed`` ones.

    ``dependsOn`` may name a job of another service (the seed resolved it across all
    registry jobs), so the check runs over everything that will be installed at once.

    Raises
    ------
    ServiceValidationError
        A ``jobName`` used twice (also across services), ``dependsOn`` naming an unknown job,
        or a series-level job depending on a study-level one (it would run before the study
        is complete).
    CycleError
        ``dependsOn`` links form a cycle; the message names it ``a -> b -> a``.
    """
    owners: dict[str, tuple[ServiceSpec, int]] = {}
    checked = [(s, False) for s in installed if s.name not in {n.name for n in services}]
    checked += [(s, True) for s in services]
    for service, _ in checked:
        for index, job in enumerate(service.jobs):
            if job.job_name in owners:
                other, _i = owners[job.job_name]
                raise ServiceValidationError(
                    service.origin,
                    service.job_field(index, "jobName"),
                    f"duplicate jobName {job.job_name!r} (already used by service {other.name!r})"
                    if other.name != service.name
                    else f"duplicate jobName {job.job_name!r}",
                )
            owners[job.job_name] = (service, index)
    for service, is_new in checked:
        if not is_new:
            continue
        for index, job in enumerate(service.jobs):
            for dep in job.depends_on:
                if dep not in owners:
                    raise ServiceValidationError(
                        service.origin, service.job_field(index, "dependsOn"), f"unknown job {dep!r}"
                    )
                dep_job = owners[dep][0].jobs[owners[dep][1]]
                if job.level == "series" and dep_job.level == "study":
                    raise ServiceValidationError(
                        service.origin,
                        service.job_field(index, "dependsOn"),
                        f"series-level job cannot depend on study-level job {dep!r}",
                    )
    graph = {name: svc.jobs[i].depends_on for name, (svc, i) in owners.items()}
    cycle = find_cycle(graph)
    if cycle is not None:
        service, index = owners[cycle[0]]
        raise CycleError(service.origin, service.job_field(index, "dependsOn"), cycle)


def check_resolvable(service: LoadedService) -> None:
    """Check that every callback imports (privately) and every worker name resolves.

    Callbacks are imported, as the seed's scheduler imports them, because they run in the
    scheduling process; workers are only located (see :mod:`services_registry.loader`).

    Raises
    ------
    ServiceValidationError
        ``registry/settings.json: jobs[1].callback: 'pkg.nope' does not resolve: ...``.
    """
    spec = service.spec
    for index, job in enumerate(spec.jobs):
        try:
            service.callback(job)
        except Exception as exc:  # the service's code: any failure means "does not resolve"
            raise ServiceValidationError(
                spec.origin,
                spec.job_field(index, "callback"),
                f"{job.callback!r} does not resolve: {type(exc).__name__}: {strip_mangled(str(exc))}",
            ) from None
        problem = service.worker_problem(job)
        if problem is not None:
            raise ServiceValidationError(
                spec.origin, spec.job_field(index, "worker"), f"{job.worker!r} does not resolve: {problem}"
            )
