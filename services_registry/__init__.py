"""dcmflow's service registry: job specs, three ways to register services, callbacks, DAG plans.

Quick start::

    from services_registry import Service

    service = Service("series-summary")

    @service.job(name="summary", timeout="10m", params={"output": "summaries"})
    def summarize(jobName, headers, params, added_params, **kwargs):
        ...

    @summarize.callback
    def accept(jobName, headers, params, added_params, **kwargs):
        return headers.get("Modality") in {"CT", "MR"}

Existing dcm-processor service folders (``registry/`` + ``module/``) load unchanged with
:func:`load_service`; installed distributions advertise services under the entry point
group ``dcmflow.services`` (:func:`load_entry_points`). :func:`evaluate_callbacks` decides
which jobs run, exactly as dcm-processor's scheduler did; :func:`plan_dag` orders them.
"""

import importlib as _importlib
import sys as _sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services_registry.api import Job, Service
    from services_registry.callbacks import Evaluation, RejectedJob, SelectedJob, evaluate_callbacks
    from services_registry.dag import Plan, PlanNode, plan_dag, to_mermaid
    from services_registry.entrypoints import ENTRY_POINT_GROUP, load_entry_points
    from services_registry.errors import (
        CycleError,
        InstallError,
        PlanError,
        RegistryError,
        ServiceNotFoundError,
        ServiceValidationError,
    )
    from services_registry.headers import headers_from_dataset
    from services_registry.load import check_service, load_service
    from services_registry.runtime import LoadedService
    from services_registry.spec import PRIORITY_RANKS, JobSpec, ServiceSpec, parse_duration, priority_rank

# Names are imported on first use (PEP 562): the callback process (services_registry.callback_host)
# imports this package, and must not pay for pydicom and the rest at every start.
_HOMES = {
    "Service": "api", "Job": "api",
    "Evaluation": "callbacks", "RejectedJob": "callbacks", "SelectedJob": "callbacks",
    "evaluate_callbacks": "callbacks",
    "Plan": "dag", "PlanNode": "dag", "plan_dag": "dag", "to_mermaid": "dag",
    "ENTRY_POINT_GROUP": "entrypoints", "load_entry_points": "entrypoints",
    "CycleError": "errors", "InstallError": "errors", "PlanError": "errors", "RegistryError": "errors",
    "ServiceNotFoundError": "errors", "ServiceValidationError": "errors",
    "headers_from_dataset": "headers",
    "check_service": "load", "load_service": "load",
    "LoadedService": "runtime",
    "PRIORITY_RANKS": "spec", "JobSpec": "spec", "ServiceSpec": "spec", "parse_duration": "spec",
    "priority_rank": "spec",
}


def __getattr__(name: str) -> object:
    """Import the module that defines ``name`` when it is first asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The exported names and the submodules imported so far (as without lazy imports)."""
    return sorted({*__all__, *(name for name in globals() if f"{__name__}.{name}" in _sys.modules)})


__all__ = [
    # registering services
    "Service",
    "Job",
    "load_service",
    "check_service",
    "load_entry_points",
    "ENTRY_POINT_GROUP",
    # specs
    "JobSpec",
    "ServiceSpec",
    "PRIORITY_RANKS",
    "parse_duration",
    "priority_rank",
    # evaluating and planning
    "LoadedService",
    "headers_from_dataset",
    "evaluate_callbacks",
    "Evaluation",
    "SelectedJob",
    "RejectedJob",
    "plan_dag",
    "Plan",
    "PlanNode",
    "to_mermaid",
    # errors
    "RegistryError",
    "ServiceValidationError",
    "CycleError",
    "ServiceNotFoundError",
    "PlanError",
    "InstallError",
]
