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
