"""What a processing run works on: headers of a series or study, the planned jobs, a session.

Plain functions (no Prefect), called by the Prefect tasks in :mod:`tasks.jobs` and tested
on their own.

Headers follow DESIGN.md: the representative instance (lowest InstanceNumber) as flat DICOM
keywords, plus ``dcmpath``, ``seriesId``, ``studyId``, ``patientId``. For a series,
``dcmpath`` is :func:`services_registry.planning.default_dcmpath` (``dicom/<study>/<series>``),
exactly what ``dcmflow services plan`` shows. For a study it is ``dicom/<study>`` (one
sub-folder per series) and the headers also carry ``seriesIds`` (G1's list), taken from the
study's first series.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pydicom
from pydantic import BaseModel

from services_registry.callbacks import DEFAULT_CALLBACK_TIMEOUT, Interpreter, evaluate_isolated
from services_registry.dag import plan_dag, to_mermaid
from services_registry.graph import with_dependents
from services_registry.headers import headers_from_dataset
from services_registry.planning import default_dcmpath
from storage.archive import instance_header, read_series_index
from storage.errors import ArchiveError, ObjectNotFoundError
from storage.keys import validate_uid

from tasks.claims import DeadRun, GaveUp, claim_revision, give_up_if_crashing
from tasks.errors import SeriesNotFoundError

if TYPE_CHECKING:
    from services_registry.spec import ServiceSpec
    from storage.models import InstancePublic
    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = [
    "Target",
    "PlannedJob",
    "PlannedRun",
    "SessionRun",
    "EarlierRun",
    "load_series_target",
    "load_study_target",
    "plan_target",
    "open_session",
    "record_jobs",
    "session_run_of",
    "link_module",
    "study_dcmpath",
]


def study_dcmpath(study_uid: str) -> str:
    """``dcmpath`` of a study materialised under ``$DATA``: ``dicom/<study>`` (series inside)."""
    return f"dicom/{validate_uid(study_uid, 'Study Instance UID')}"


class Target(BaseModel):
    """The series or study a run processes, and its headers."""

    level: Literal["series", "study"]
    study_uid: str
    series_uid: str | None
    revision: int  # the revision the run is for (its ``revision`` parameter, else the current one)
    headers: dict[str, Any]
    series: list[str]
    modality: str
    description: str
    instances: int
    current_revision: int  # the series'/study's revision when the headers were read

    @property
    def uid(self) -> str:
        """The series UID of a series target, the study UID of a study target."""
        return self.series_uid if self.level == "series" and self.series_uid else self.study_uid


class PlannedJob(BaseModel):
    """One job to run, with what its process needs."""

    name: str
    service: str
    service_version: int
    worker: str
    depends_on: tuple[str, ...]
    rank: int
    sort_position: float
    timeout: float
    retries: int
    retry_delay: float
    module_dir: str | None
    retry_on_timeout: bool = False  # a timeout is final unless the job asks (spec ``retryOnTimeout``)
    params: dict[str, Any] | None = None
    job_id: int | None = None
    channel: str = "default"  # dcm-processor's channel: not "default" runs on that channel's workers


class PlannedRun(BaseModel):
    """Jobs in ready order, the final ``added_params``, rejected jobs, the DAG as mermaid."""

    jobs: list[PlannedJob]
    added_params: dict[str, Any]
    rejected: list[dict[str, Any]]
    edges: list[tuple[str, str]]
    mermaid: str

    def job(self, name: str) -> PlannedJob:
        """The job called ``name``."""
        return next(j for j in self.jobs if j.name == name)


class SessionRun(BaseModel):
    """A session's records and folders: what every job of the run shares."""

    session_id: int
    level: Literal["series", "study"]
    study_uid: str
    series_uid: str | None
    revision: int
    headers: dict[str, Any]
    added_params: dict[str, Any]
    work_dir: str
    data_dir: str
    modules_dir: str
    logs_dir: str
    flow_run_id: str | None = None


class EarlierRun(BaseModel):
    """The session that already holds the claim of a run's (level, uid, revision)."""

    level: Literal["series", "study"]
    uid: str
    revision: int
    session_id: int
    flow_run_id: str | None
    state: str

    @property
    def message(self) -> str:
        """``series 1.2.3 revision 2 already processed by flow run <id> (session 7, completed)``."""
        by = f"flow run {self.flow_run_id}" if self.flow_run_id else "a run outside Prefect"
        return f"{self.level} {self.uid} revision {self.revision} already processed by {by} (session {self.session_id}, {self.state})"


def _read_header(store: ObjectStore, key: str) -> pydicom.Dataset:
    """The header of an instance object. pydicom needs ``tell``/``seek``, which an S3 response
    stream lacks: that one is read whole (this path serves only series without an archive)."""
    with store.open_stream(key) as stream:
        source = stream if stream.seekable() else io.BytesIO(stream.read())
        return pydicom.dcmread(source, stop_before_pixels=True)


def _representative_header(store: ObjectStore, study_uid: str, series_uid: str, instance: InstancePublic) -> pydicom.Dataset:
    """The header of ``instance``: from the series archive's index when it lists this version
    (one small GET, no pixel data read), else from the instance object. A damaged index is
    left to the materialise step to report; the header does not depend on it."""
    try:
        return instance_header(read_series_index(store, study_uid, series_uid), instance.sop_uid, instance.sha256)
    except (ObjectNotFoundError, ArchiveError):
        return _read_header(store, instance.object_key)


def load_series_target(repository: Repository, store: ObjectStore, series_uid: str, revision: int | None = None) -> Target:
    """Headers and facts of a received series.

    Raises
    ------
    SeriesNotFoundError
        No such series, or it has no stored instances.
    """
    validate_uid(series_uid, "Series Instance UID")
    series = repository.get_series(series_uid)
    if series is None:
        raise SeriesNotFoundError(f"no received series {series_uid}")
    instances = repository.list_instances(series_uid)
    if not instances:
        raise SeriesNotFoundError(f"series {series_uid} has no stored instances")
    ds = _representative_header(store, series.study_uid, series_uid, instances[0])
    headers = headers_from_dataset(ds, dcmpath=default_dcmpath(series.study_uid, series_uid), calling_ae=series.calling_ae)
    return Target(
        level="series",
        study_uid=series.study_uid,
        series_uid=series_uid,
        revision=revision if revision is not None else series.revision,
        current_revision=series.revision,
        headers=headers,
        series=[series_uid],
        modality=series.modality or str(headers.get("Modality", "")),
        description=series.description or str(headers.get("SeriesDescription", "")),
        instances=len(instances),
    )


def load_study_target(repository: Repository, store: ObjectStore, study_uid: str, revision: int | None = None) -> Target:
    """Headers and facts of a received study (every series with stored instances).

    Raises
    ------
    SeriesNotFoundError
        No such study, or none of its series has stored instances.
    """
    validate_uid(study_uid, "Study Instance UID")
    study = repository.get_study(study_uid)
    if study is None:
        raise SeriesNotFoundError(f"no received study {study_uid}")
    series = sorted(
        repository.list_series(limit=10_000, study_uid=study_uid),
        key=lambda s: (s.number if s.number is not None else 2**31, s.series_uid),
    )
    counted = [(s, repository.list_instances(s.series_uid)) for s in series]
    counted = [(s, inst) for s, inst in counted if inst]
    if not counted:
        raise SeriesNotFoundError(f"study {study_uid} has no stored instances")
    first, instances = counted[0]
    header = _representative_header(store, study_uid, first.series_uid, instances[0])
    headers = headers_from_dataset(header, dcmpath=study_dcmpath(study_uid))
    headers["seriesId"] = ""
    headers["seriesIds"] = [s.series_uid for s, _ in counted]
    return Target(
        level="study",
        study_uid=study_uid,
        series_uid=None,
        revision=revision if revision is not None else study.revision,
        current_revision=study.revision,
        headers=headers,
        series=[s.series_uid for s, _ in counted],
        modality=study.modalities or first.modality,
        description=study.description,
        instances=sum(len(i) for _, i in counted),
    )


def plan_target(
    specs: Sequence[ServiceSpec],
    target: Target,
    *,
    only_jobs: Collection[str] | None = None,
    callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT,
    interpreter: Interpreter | None = None,
) -> PlannedRun:
    """Evaluate the callbacks of ``target``'s level and plan the DAG.

    Parameters
    ----------
    specs
        Installed services (:func:`services_registry.install.installed_specs`).
    target
        From :func:`load_series_target` / :func:`load_study_target`.
    only_jobs
        Re-run only these jobs and everything that depends on them (``dcmflow reprocess
        --job``); their dependencies outside the set count as done.
    callback_timeout, interpreter
        Seconds one callback may take, and the Python of each service's callbacks
        (:func:`services_registry.callbacks.evaluate_isolated`, which runs them in child processes).

    Raises
    ------
    SeriesNotFoundError
        ``only_jobs`` names a job that is not selected for this target.
    """
    by_name = {spec.name: spec for spec in specs}
    evaluation = evaluate_isolated(
        specs, target.headers, level=target.level, timeout=callback_timeout, interpreter=interpreter
    )
    selected = list(evaluation.selected)
    if only_jobs:
        known = {s.job.job_name for s in selected}
        missing = sorted(set(only_jobs) - known)
        if missing:
            raise SeriesNotFoundError(f"job {missing[0]!r} is not selected for this {target.level} (selected: {', '.join(sorted(known)) or 'none'})")
        chosen = with_dependents(only_jobs, {s.job.job_name: s.job.depends_on for s in selected})
        selected = [
            s.model_copy(update={"job": s.job.model_copy(update={"depends_on": tuple(d for d in s.job.depends_on if d in chosen)})})
            for s in selected
            if s.job.job_name in chosen
        ]
    plan = plan_dag(selected)
    jobs = []
    for node in plan.nodes:
        spec = by_name[node.service] if node.service else None
        module_dir = spec.module_dir if spec is not None else None
        job_spec = next((j for j in spec.jobs if j.job_name == node.name), None) if spec is not None else None
        jobs.append(
            PlannedJob(
                name=node.name,
                service=node.service or "",
                service_version=int(spec.version or 0) if spec is not None and str(spec.version or "0").isdigit() else 0,
                worker=node.worker,
                depends_on=node.depends_on,
                rank=node.rank,
                sort_position=float(node.sort_position),
                timeout=node.timeout,
                retries=node.retries,
                retry_delay=node.retry_delay,
                module_dir=str(module_dir) if module_dir is not None else None,
                params=job_spec.params if job_spec is not None else None,
                channel=node.channel or "default",
                retry_on_timeout=job_spec.retry_on_timeout if job_spec is not None else False,
            )
        )
    return PlannedRun(
        jobs=jobs,
        added_params=evaluation.added_params,
        rejected=[{"job": r.job.job_name, "service": r.service, "reason": r.reason} for r in evaluation.rejected],
        edges=[tuple(e) for e in plan.edges],
        mermaid=to_mermaid(plan),
    )


def open_session(
    repository: Repository,
    target: Target,
    *,
    sessions_dir: Path,
    trigger: str,
    flow_run_id: str | None,
    claim: bool,
    dead_run: DeadRun | None = None,
) -> SessionRun | EarlierRun | GaveUp:
    """Record the run's Session (claiming its revision) and lay out the session's folders.

    Parameters
    ----------
    claim
        Claim ``(target.level, uid, target.revision)`` (:meth:`Repository.claim_session`):
        for a run started by a trigger, so the same revision is processed once. A manual run
        (``claim=False``) always gets a new session.
    dead_run
        Tells whether the holder of the claim is provably dead, so this run takes its claim
        over (:func:`tasks.claims.claim_revision`); ``None``: a held claim is never taken.

    Returns
    -------
    SessionRun | EarlierRun | GaveUp
        The new session (headers recorded, no jobs yet: :func:`record_jobs`); when the claim
        is held, the earlier session that holds it (nothing was written); or, when the
        revision's runs crashed too often, the claimed session, already failed.
    """
    if claim:
        claimed = claim_revision(
            repository,
            target.level,
            target.uid,
            target.revision,
            study_uid=target.study_uid,
            trigger=trigger,
            flow_run_id=flow_run_id,
            dead_run=dead_run,
        )
        if claimed.claimed:
            gave_up = give_up_if_crashing(repository, claimed.session.id, target.level, target.uid, target.revision)
            if gave_up is not None:
                return gave_up
        if not claimed.claimed:
            earlier = claimed.session
            return EarlierRun(
                level=target.level,
                uid=target.uid,
                revision=target.revision,
                session_id=earlier.id,
                flow_run_id=earlier.flow_run_id,
                state=earlier.state,
            )
        session = claimed.session
    else:
        session = repository.create_session(
            series_uid=target.series_uid,
            study_uid=target.study_uid,
            revision=target.revision,
            trigger=trigger,
            flow_run_id=flow_run_id,
        )
    repository.put_session_data(session.id, "headers", target.headers)
    work = sessions_dir / str(session.id)
    folders = _session_folders(work)
    return SessionRun(
        session_id=session.id,
        level=target.level,
        study_uid=target.study_uid,
        series_uid=target.series_uid,
        revision=target.revision,
        headers=target.headers,
        added_params={},
        work_dir=str(work),
        data_dir=str(folders["data"]),
        modules_dir=str(folders["modules"]),
        logs_dir=str(folders["logs"]),
        flow_run_id=flow_run_id,
    )


def _session_folders(work: Path) -> dict[str, Path]:
    folders = {name: work / name for name in ("data", "modules", "logs")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def session_run_of(repository: Repository, session_id: int, *, work_dir: Path) -> SessionRun:
    """A recorded session as this machine works on it: its headers and ``added_params`` from
    the records, its folders under ``work_dir`` on this machine (made when missing).

    How a job dispatched to another machine joins the session the series flow opened.

    Raises
    ------
    SeriesNotFoundError
        No such session, or it has no recorded headers.
    """
    session = repository.get_session(session_id)
    headers = repository.get_session_data(session_id, "headers") if session is not None else None
    if session is None or not isinstance(headers, dict) or not session.study_uid:
        raise SeriesNotFoundError(f"no session {session_id} with recorded headers")
    folders = _session_folders(work_dir)
    return SessionRun(
        session_id=session_id,
        level="series" if session.series_uid else "study",
        study_uid=session.study_uid,
        series_uid=session.series_uid,
        revision=session.revision,
        headers=headers,
        added_params=repository.get_session_data(session_id, "added_params", default={}) or {},
        work_dir=str(work_dir),
        data_dir=str(folders["data"]),
        modules_dir=str(folders["modules"]),
        logs_dir=str(folders["logs"]),
        flow_run_id=session.flow_run_id,
    )


def link_module(run: SessionRun, job: PlannedJob) -> None:
    """``$MODULES/<service>`` → the job's service ``module/`` folder, as the seed installs it."""
    if job.module_dir and job.service:
        link = Path(run.modules_dir) / job.service
        if not link.exists():
            os.symlink(job.module_dir, link, target_is_directory=True)


def record_jobs(repository: Repository, run: SessionRun, planned: PlannedRun) -> tuple[SessionRun, PlannedRun]:
    """Record one pending Job per planned job of the session, its ``added_params``, the rejected jobs.

    Also links each job's service ``module/`` folder as ``$MODULES/<service>``, as the seed
    installs it.

    Returns
    -------
    tuple
        ``run`` with the final ``added_params``, and ``planned`` with every job's record id.
    """
    from storage.models import JobBase

    records = repository.create_jobs(
        run.session_id,
        [
            JobBase(
                service_name=job.service,
                service_version=job.service_version,
                job_name=job.name,
                series_uid=run.series_uid,
                study_uid=run.study_uid,
                revision=run.revision,
                priority_rank=job.rank,
                timeout_seconds=math.ceil(job.timeout),
                max_retries=job.retries,
                flow_run_id=run.flow_run_id,
            )
            for job in planned.jobs
        ],
    )
    ids = {r.job_name: r.id for r in records}
    planned = planned.model_copy(update={"jobs": [j.model_copy(update={"job_id": ids[j.name]}) for j in planned.jobs]})
    repository.put_session_data(run.session_id, "added_params", planned.added_params)
    repository.put_session_data(run.session_id, "rejected", planned.rejected)
    for job in planned.jobs:
        link_module(run, job)
    return run.model_copy(update={"added_params": planned.added_params}), planned
