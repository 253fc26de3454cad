"""Read ``deployments/prefect.yaml`` and build the same deployments for ``dcmflow up`` to serve.

``prefect.yaml`` is the one declaration of dcmflow's deployments and triggers: ``prefect
deploy --all --prefect-file deployments/prefect.yaml`` deploys it to a work pool, and
``dcmflow up`` serves it through :func:`runner_deployments`. Both validate each trigger with
Prefect's own ``DeploymentTriggerTypes`` model and name unnamed triggers the way ``prefect
deploy`` does, so a served trigger and a deployed one are the same automation. The file's
``automations:`` (the zombie-flow automation, whose action is not "run this deployment") are
built with Prefect's ``AutomationCore`` model and created by :func:`apply_automations`, as
``prefect automation create --from-file`` would. Nothing here decides anything: the flows
live in ``flows/``, the stack in ``dcmflow/``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.events.schemas.automations import AutomationCore
    from prefect.deployments.runner import RunnerDeployment
    from prefect.events import DeploymentTriggerTypes

__all__ = [
    "PREFECT_YAML",
    "DeploymentSpec",
    "read_specs",
    "triggered_by",
    "read_work_queues",
    "build_triggers",
    "runner_deployments",
    "flow_run_env",
    "build_automations",
    "apply_automations",
    "DeclarationError",
]

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
"""The declaration, packaged with dcmflow."""


class DeclarationError(ValueError):
    """``prefect.yaml`` does not declare deployments the way the loader needs (one line)."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One ``deployments:`` entry of ``prefect.yaml``, the fields that serving uses."""

    name: str
    entrypoint: str
    """Module path of the flow, e.g. ``flows.process.process_series``."""
    flow_name: str
    """The flow's own name (``flows.process.process_series`` → ``process-series``)."""
    description: str = ""
    tags: list[str] = field(default_factory=list)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    concurrency_limit: int | None = None
    work_queue: str | None = None
    """The queue of its work pool (``live`` for event-started runs, ``backfill`` for manual)."""
    job_variables: dict[str, Any] = field(default_factory=dict)
    """Of its work pool's runs: ``env`` carries the flow-run heartbeat setting."""

    @property
    def full_name(self) -> str:
        """``flow-name/deployment-name``, as ``prefect deployment run`` takes it."""
        return f"{self.flow_name}/{self.name}"


def _flow_name(entrypoint: str) -> str:
    """The ``@flow(name=...)`` convention of ``flows/``: the function name with dashes."""
    return entrypoint.rsplit(".", 1)[-1].replace("_", "-")


def read_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The deployments declared in ``path`` (plain data; Prefect is not imported).

    Raises
    ------
    DeclarationError
        The file is missing, not YAML, or an entry lacks a name or a module-path entrypoint.
    """
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeclarationError(f"cannot read {path}: {exc}") from None
    entries = (document or {}).get("deployments") or []
    specs = []
    for index, entry in enumerate(entries, start=1):
        name, entrypoint = entry.get("name"), entry.get("entrypoint")
        if not name or not entrypoint or ":" in entrypoint or entrypoint.endswith(".py"):
            raise DeclarationError(
                f"{path}: deployment #{index} needs a name and a module-path entrypoint (package.module.flow)"
            )
        specs.append(
            DeploymentSpec(
                name=name,
                entrypoint=entrypoint,
                flow_name=_flow_name(entrypoint),
                description=" ".join(str(entry.get("description") or "").split()),
                tags=list(entry.get("tags") or []),
                triggers=[dict(t) for t in entry.get("triggers") or []],
                parameters=dict(entry.get("parameters") or {}),
                concurrency_limit=entry.get("concurrency_limit"),
                work_queue=(entry.get("work_pool") or {}).get("work_queue_name"),
                job_variables=dict((entry.get("work_pool") or {}).get("job_variables") or {}),
            )
        )
    return specs


def _document(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DeclarationError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise DeclarationError(f"{path}: not a mapping of deployments and definitions")
    return document


def read_work_queues(path: Path = PREFECT_YAML) -> dict[str, int]:
    """The work queues of the declaration and their priorities (``definitions.work_queues``)."""
    document = _document(path)
    queues = (document.get("definitions") or {}).get("work_queues") or {}
    if not all(isinstance(name, str) and isinstance(priority, int) and priority >= 1 for name, priority in queues.items()):
        raise DeclarationError(f"{path}: definitions.work_queues maps queue names to priorities (1 = first)")
    return dict(queues)


def flow_run_env(path: Path = PREFECT_YAML) -> dict[str, str]:
    """The environment every flow run gets (``definitions.flow_run_env``: the heartbeat setting).

    Work-pool runs get it as their ``env`` job variable; ``dcmflow up`` puts it in the
    environment of the runs it serves.
    """
    env = (_document(path).get("definitions") or {}).get("flow_run_env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise DeclarationError(f"{path}: definitions.flow_run_env maps variable names to strings")
    return dict(env)


def build_automations(path: Path = PREFECT_YAML) -> list[AutomationCore]:
    """The declaration's ``automations:`` as Prefect models (validated as the CLI validates them).

    Raises
    ------
    DeclarationError
        An entry is not a valid Prefect automation (the first error, in one line).
    """
    from prefect.events.schemas.automations import AutomationCore
    from pydantic import ValidationError

    built = []
    for index, entry in enumerate(_document(path).get("automations") or [], start=1):
        try:
            built.append(AutomationCore.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise DeclarationError(f"{path}: automation #{index}: {where}: {first['msg']}") from None
    return built


def apply_automations(path: Path = PREFECT_YAML) -> list[str]:
    """Create the declaration's automations on the current Prefect API, replacing those of the
    same name (so a restart applies edits, as re-deploying does for triggers); their names."""
    from prefect.client.orchestration import get_client

    automations = build_automations(path)
    with get_client(sync_client=True) as client:
        for automation in automations:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
    return [automation.name for automation in automations]


def triggered_by(event: str, path: Path = PREFECT_YAML) -> DeploymentSpec:
    """The deployment whose trigger expects ``event`` (``dicom.series.stable`` → process-series).

    Raises
    ------
    DeclarationError
        No deployment, or more than one, is started by that event.
    """
    found = [spec for spec in read_specs(path) if any(event in (t.get("expect") or []) for t in spec.triggers)]
    if len(found) != 1:
        raise DeclarationError(f"{path}: {len(found)} deployments are started by {event}, expected one")
    return found[0]


def build_triggers(spec: DeploymentSpec) -> list[DeploymentTriggerTypes]:
    """The spec's triggers as Prefect models, named as ``prefect deploy`` names them."""
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    triggers = []
    for index, trigger in enumerate(spec.triggers, start=1):
        values = {"name": f"{spec.name}__automation_{index}", **trigger}
        triggers.append(adapter.validate_python(values))
    return triggers


def runner_deployments(
    path: Path = PREFECT_YAML, *, work_pool: str | None = None, queues: Sequence[str] | None = None
) -> list[RunnerDeployment]:
    """Every deployment of ``path`` as a ``RunnerDeployment``: for ``prefect.serve``, or, with
    ``work_pool``, to register on that pool (each on its declared queue) for workers to run.

    The entrypoint is recorded as the module path (not a file of this checkout), so a run
    starts wherever dcmflow is installed. ``queues`` keeps only the deployments declared on
    those work queues (``dcmflow up`` serves ``live`` and ``backfill`` in runners of their own).
    """
    from prefect.flows import load_flow_from_entrypoint
    from prefect.types.entrypoint import EntrypointType

    deployments: list[RunnerDeployment] = []
    for spec in read_specs(path):
        if queues is not None and spec.work_queue not in queues:
            continue
        flow: Flow[..., Any] = load_flow_from_entrypoint(spec.entrypoint, use_placeholder_flow=False)
        if flow.name != spec.flow_name:
            raise DeclarationError(f"{path}: {spec.entrypoint} is flow {flow.name!r}, expected {spec.flow_name!r}")
        triggers: list[Any] = list(build_triggers(spec))
        deployment = flow.to_deployment(  # sync here: to_deployment is async only in async code
            name=spec.name,
            description=spec.description or None,
            tags=spec.tags,
            parameters=spec.parameters or None,
            triggers=triggers,
            concurrency_limit=spec.concurrency_limit,
            entrypoint_type=EntrypointType.MODULE_PATH,
            work_pool_name=work_pool,
            work_queue_name=spec.work_queue if work_pool else None,
            job_variables=spec.job_variables if work_pool else None,
        )
        assert not inspect.isawaitable(deployment)
        deployments.append(deployment)
    return deployments
