"""``dcmflow demo``: send a synthetic CT study to the running stack and follow it to the end.

A newcomer's first question is "does the whole path work here?". The demo answers it with
the real path and nothing faked: C-STORE to the receiver that ``dcmflow up`` started, the
records the receiver writes, the stability decision, the flow runs that Prefect starts from
the ``dicom.series.stable`` / ``dicom.study.stable`` events, the jobs they ran. It reads
only the records database (not Prefect), so what it shows is what ``dcmflow series list`` and
``dcmflow jobs list`` show.

Wiring in ``dcmflow/cli/__init__.py``::

    from dcmflow.cli import demo
    app.command(name="demo")(demo.demo)
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from dcmflow.cli._common import load_settings, open_repository
from dcmflow.cli._output import emit, fail, info, stderr, stdout
from dcmflow.cli.process import JOB_COLUMNS

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from storage.models import JobPublic, SeriesPublic, SessionPublic, StudyPublic
    from storage.repository import Repository

    from dcmflow.settings import Settings
    from dcmflow.stack_state import StackState

__all__ = ["demo", "send_study", "DEMO_AE_TITLE", "DEFAULT_TIMEOUT", "DEMO_SERVICES"]

DEMO_AE_TITLE = "DCMFLOW-DEMO"
"""Calling AE title of the demo's C-STORE SCU (accepted as a loopback or trusted caller)."""

DEFAULT_TIMEOUT = 300.0
"""Seconds ``dcmflow demo`` follows the study before giving up."""

DEMO_SERVICES = ("preview", "qc")
"""Built-in services the demo enables when no service was ever installed: images and a report."""

POLL_SECONDS = 0.5
_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # Success and the C-STORE warnings (PS3.4 B.2.3)
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
_RUNNING = "running"  # the one unfinished session state (completed, failed, cancelled, crashed end it)
_NOT_FAILURES = {"pending", "running", "succeeded", "skipped"}  # skipped: downstream of a failure


class SendError(Exception):
    """The study could not be sent (refused association, failure status); one line."""


def _no_delay(assoc: Any) -> None:
    """Send each C-STORE at once: without TCP_NODELAY, Nagle's algorithm holds the last part of
    every dataset until the receiver's delayed ACK (~40 ms per instance on Linux, 10x the cost)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_study(series: Sequence[Sequence[Dataset]], host: str, port: int, ae_title: str,
               *, calling_ae: str = DEMO_AE_TITLE, timeout: float = 30.0) -> int:
    """C-STORE every slice in one association, as a modality sends a study (PS3.4 Annex B).

    Parameters
    ----------
    series : sequence of sequence of Dataset
        The study, one list of slices per series (explicit VR little endian, with file meta).
    host, port, ae_title : str, int, str
        The receiver (called AE title).
    calling_ae : str
        Our AE title.
    timeout : float
        Connection, ACSE, DIMSE and network timeouts in seconds.

    Returns
    -------
    int
        Instances sent (all of them: the first failure raises).

    Raises
    ------
    SendError
        No receiver answered, it rejected or aborted the association, or a C-STORE returned
        a failure status; the message says which instance and which status.
    """
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({ds.SOPClassUID for slices in series for ds in slices}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    where = f"{ae_title}@{host}:{port}"
    assoc = ae.associate(host, port, ae_title=ae_title)
    if assoc.is_rejected:
        raise SendError(f"{where} rejected the association from {calling_ae} (is {calling_ae} an allowed caller there?)")
    if not assoc.is_established:
        raise SendError(f"no DICOM receiver answered at {where} (is `dcmflow up` running and the port right?)")
    _no_delay(assoc)
    sent = 0
    try:
        for slices in series:
            for ds in slices:
                rsp = assoc.send_c_store(ds)
                status = int(rsp.Status) if "Status" in rsp else None
                if status not in _OK_STATUSES:
                    what = "no response (association aborted)" if status is None else f"status 0x{status:04X}"
                    raise SendError(f"C-STORE of instance {ds.InstanceNumber} of series {ds.SeriesNumber} "
                                    f"({ds.SOPInstanceUID}) to {where} failed: {what}")
                sent += 1
    except SendError:
        assoc.abort()
        raise
    assoc.release()
    return sent


def _enable_builtins_if_none(settings: Settings, repository: Repository) -> None:
    """On a new install nothing would run: enable the built-in preview and QC services, so the
    demo's flow runs show images and a report in the Prefect UI. A stack where any service was
    ever installed or enabled (disabled ones included) is left as its user set it."""
    from services_registry.errors import RegistryError
    from services_registry.install import enable_service
    from storage.errors import StorageError

    from dcmflow.wiring import object_store_from

    if repository.list_services(include_inactive=True):
        return
    store = object_store_from(settings)
    for name in DEMO_SERVICES:
        try:
            result = enable_service(name, services_dir=settings.services_dir, repository=repository, store=store)
        except (RegistryError, StorageError) as exc:
            fail(f"cannot enable the built-in service {name}: {exc}")
        info(f"no service was installed: enabled the built-in service {result.name} "
             f"(`dcmflow services disable {result.name}` turns it off)")


@dataclass(frozen=True)
class _Sent:
    """The study that was sent: its UID, and per series the slice count and a label for people."""

    study_uid: str
    counts: dict[str, int]
    labels: dict[str, str]

    @classmethod
    def of(cls, study: Sequence[Sequence[Dataset]]) -> _Sent:
        first = [slices[0] for slices in study]
        return cls(
            study_uid=str(first[0].StudyInstanceUID),
            counts={str(ds.SeriesInstanceUID): len(slices) for ds, slices in zip(first, study)},
            labels={str(ds.SeriesInstanceUID): f"series {ds.SeriesNumber} ({ds.SeriesDescription})" for ds in first},
        )

    def label(self, target: str | None) -> str:
        return self.labels[target] if target else "study"


@dataclass
class _Snapshot:
    """What the records say about the demo study at one poll."""

    series: dict[str, SeriesPublic | None]
    study: StudyPublic | None
    sessions: list[SessionPublic]
    jobs: dict[int, list[JobPublic]] = field(default_factory=dict)

    def session_of(self, series_uid: str | None) -> SessionPublic | None:
        """The newest session of a series (``None``: of the study itself)."""
        found = [s for s in self.sessions if s.series_uid == series_uid]
        return max(found, key=lambda s: s.id) if found else None

    def targets(self) -> list[str | None]:
        return [*self.series, None]


def _snapshot(repository: Repository, sent: _Sent) -> _Snapshot:
    """One read of the records: the series, the study, and the sessions of both."""
    sessions = repository.list_sessions(study_uid=sent.study_uid)
    snap = _Snapshot({uid: repository.get_series(uid) for uid in sent.counts}, repository.get_study(sent.study_uid), sessions)
    for target in snap.targets():
        session = snap.session_of(target)
        if session is not None:
            snap.jobs[session.id] = repository.list_jobs(session_id=session.id)
    return snap


def _waiting_for(snap: _Snapshot, sent: _Sent) -> str | None:
    """What the demo still waits for, in words, or ``None`` when every flow run finished."""
    recorded = sum(s.instance_count for s in snap.series.values() if s is not None)
    if recorded < sum(sent.counts.values()):
        return f"the receiver to record the instances ({recorded} of {sum(sent.counts.values())})"
    if any(s is None or s.state != "stable" for s in snap.series.values()):
        return ("the series to become stable (all instances in and the association closed, "
                "or DCMFLOW_STABLE_AGE seconds of quiet)")
    if snap.study is None or snap.study.state != "stable":
        return "the study to become stable"
    started = [snap.session_of(t) for t in snap.targets()]
    if any(s is None for s in started):
        missing = sum(s is None for s in started)
        return f"{missing} flow run{'s' if missing != 1 else ''} to start (process-series, process-study)"
    running = [s for s in started if s is not None and s.state == _RUNNING]
    if running:
        return f"{len(running)} flow run{'s' if len(running) != 1 else ''} to finish"
    return None


def _view(snap: _Snapshot, sent: _Sent, waiting: str, elapsed: float) -> Group:
    """The live table: one row per series and one for the study, then what we wait for."""
    table = Table(title=f"study {sent.study_uid}", title_justify="left")
    for col in ("", "instances", "state", "flow run", "jobs"):
        table.add_column(col)
    for target in snap.targets():
        series = snap.series.get(target) if target else None
        record: Any = series if target else snap.study
        count = (series.instance_count if series else 0) if target else sum(
            s.instance_count for s in snap.series.values() if s is not None)
        wanted = sent.counts[target] if target else sum(sent.counts.values())
        state = f"{record.state} r{record.revision}" if record is not None else "not recorded yet"
        session = snap.session_of(target)
        jobs = snap.jobs.get(session.id, []) if session else []
        tally: dict[str, int] = {}
        for job in jobs:
            tally[job.state] = tally.get(job.state, 0) + 1
        table.add_row(sent.label(target), f"{count}/{wanted}", state,
                      f"{session.state} (session {session.id})" if session else "",
                      ", ".join(f"{n} {s}" for s, n in sorted(tally.items())))
    return Group(table, Spinner("dots", text=f"waiting for {waiting}  ({elapsed:.0f} s)"))


def _transitions(before: _Snapshot | None, now: _Snapshot, sent: _Sent) -> list[str]:
    """One line per step a series or the study took since the last poll (the log of the run)."""
    lines = []
    for target in now.targets():
        name = sent.label(target)
        old: Any = (before.series.get(target) if target else before.study) if before else None
        new: Any = now.series.get(target) if target else now.study
        if target and new is not None and new.instance_count >= sent.counts[target] and (
                old is None or old.instance_count < sent.counts[target]):
            lines.append(f"{name}: {new.instance_count} of {sent.counts[target]} instances recorded")
        if new is not None and new.state == "stable" and (old is None or old.state != "stable"):
            lines.append(f"{name}: stable, revision {new.revision}")
        session, previous = now.session_of(target), before.session_of(target) if before else None
        if session is not None and (previous is None or previous.id != session.id):
            lines.append(f"{name}: flow run started (session {session.id})")
        if session is not None and session.state != _RUNNING and (
                previous is None or previous.id != session.id or previous.state != session.state):
            lines.append(f"{name}: flow run {session.state}")
    return lines


def _follow(repository: Repository, sent: _Sent, timeout: float) -> _Snapshot:
    """Poll the records every half second until every flow run finished, or time out."""
    start = time.monotonic()
    before: _Snapshot | None = None
    snap = _snapshot(repository, sent)
    with Live(console=stderr, transient=True, refresh_per_second=8) as live:
        while True:
            for line in _transitions(before, snap, sent):
                live.console.print(line, markup=False, highlight=False)
            waiting = _waiting_for(snap, sent)
            if waiting is None:
                return snap
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                live.stop()
                fail(f"timed out after {timeout:.0f} s waiting for {waiting}")
            live.update(_view(snap, sent, waiting, elapsed))
            time.sleep(POLL_SECONDS)
            before, snap = snap, _snapshot(repository, sent)


def _local_times(job: JobPublic) -> dict[str, Any]:
    """A job row whose times read as a wall clock (HH:MM:SS, local): the table stays narrow."""
    row = job.model_dump(mode="json")
    for key in ("started_at", "finished_at"):
        at = getattr(job, key)
        row[key] = at.astimezone().strftime("%H:%M:%S") if at is not None else None
    return row


def _artifact_links(snap: _Snapshot, sessions: list[SessionPublic], state: StackState) -> list[tuple[str, str, str]]:
    """(series UID, job, UI link) of each artifact the demo's services put on their runs: the
    preview images and the QC report, where a newcomer clicks first. The link opens the
    artifact itself; when the server cannot say its id, the key's page (its versions)."""
    import httpx

    from tasks.artifacts import job_artifact_key

    from dcmflow.prefect_api import latest_artifact_ids

    wanted = [(session.series_uid, job.job_name, job_artifact_key(job.job_name, "series", session.series_uid))
              for session in sessions for job in snap.jobs.get(session.id, [])
              if session.series_uid and job.job_name in DEMO_SERVICES and job.state == "succeeded"]
    try:
        ids = latest_artifact_ids(state.api_url, [key for _, _, key in wanted])
    except httpx.HTTPError:
        ids = {}
    ui = state.ui_url.rstrip("/")
    return [(uid, job, f"{ui}/artifacts/artifact/{ids[key]}" if key in ids else f"{ui}/artifacts/key/{key}")
            for uid, job, key in wanted]


def _report(snap: _Snapshot, sent: _Sent, state: StackState, as_json: bool) -> None:
    """The job table, the flow run links, and the exit code (1 unless every run completed)."""
    sessions = [s for s in (snap.session_of(t) for t in snap.targets()) if s is not None]
    jobs = sorted((j for s in sessions for j in snap.jobs.get(s.id, [])), key=lambda j: j.id)
    ui = state.ui_url.rstrip("/")
    links = {s.id: f"{ui}/runs/flow-run/{s.flow_run_id}" if s.flow_run_id else None for s in sessions}
    shown = _artifact_links(snap, sessions, state)
    if as_json:
        typer.echo(json.dumps({
            "study_uid": sent.study_uid,
            "series": [s.model_dump(mode="json") for s in snap.series.values() if s is not None],
            "sessions": [{**s.model_dump(mode="json"), "url": links[s.id]} for s in sessions],
            "jobs": [j.model_dump(mode="json") for j in jobs],
            "artifacts": [{"series_uid": uid, "job": job, "url": url} for uid, job, url in shown],
        }, indent=2))
    else:
        emit([_local_times(j) for j in jobs], False, columns=JOB_COLUMNS, title="jobs of the demo study")
        for session in sessions:
            target = sent.label(session.series_uid)
            stdout.print(f"{session.state:>9}  {target}  {links[session.id] or '(no flow run id)'}",
                         markup=False, highlight=False, soft_wrap=True)
        for uid, job, url in shown:
            stdout.print(f"{job:>9}  {sent.label(uid)}  {url}", markup=False, highlight=False, soft_wrap=True)
    bad = [s for s in sessions if s.state != "completed"]
    if bad:
        failed = [j for s in bad for j in snap.jobs.get(s.id, []) if j.state not in _NOT_FAILURES]
        detail = f": job {failed[0].job_name} {failed[0].state}: {failed[0].error or 'no error recorded'}" if failed else ""
        fail(f"{len(bad)} of {len(sessions)} flow runs did not complete (session {bad[0].id} {bad[0].state}){detail}")


def demo(
    host: str | None = typer.Option(None, "--host", help="Send to this host instead of the stack's receiver."),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help="Send to this port instead."),
    ae_title: str | None = typer.Option(None, "--ae-title", help="Called AE title instead of the stack's."),
    timeout: float = typer.Option(DEFAULT_TIMEOUT, "--timeout", min=1, help="Seconds to follow the study before giving up."),
    as_json: bool = typer.Option(False, "--json", help="Print series, sessions (with UI links) and jobs as JSON."),
) -> None:
    """Send a synthetic CT study to the running stack and follow it until its flow runs finish.

    Needs `dcmflow up` running for the same DCMFLOW_HOME. The demo makes a fresh two-series
    CT study (patient DEMO^CT, 20 slices of 128x128 each), enables the built-in preview and qc
    services if no service was ever installed, sends the study with C-STORE as a modality would, then shows each
    step from the records database: instances recorded, series stable, flow runs started and
    finished. At the end it prints the job table and a Prefect UI link per flow run.

    The slices carry (0020,1209) Number of Series Related Instances, so the receiver closes
    each series as soon as all of it is in: no waiting for DCMFLOW_STABLE_AGE.

    Exit code 0 when every flow run completed; 1 when one failed (with the failing job's
    error), when sending failed, or on timeout (saying what it still waited for).

    Try it: `dcmflow up` in one terminal, `dcmflow demo` in another.

    Examples:

        dcmflow demo

        dcmflow demo --timeout 600 --json

        dcmflow demo --host 10.0.0.5 --port 104 --ae-title ARCHIVE
    """
    from dcmflow.stack_state import read_state
    from dcmflow.synthetic import make_ct_study
    from dcmflow.wiring import describe_database

    settings = load_settings()
    state = read_state(settings.home)
    if state is None:
        fail(f"no running stack for DCMFLOW_HOME={settings.home}: start it with `dcmflow up`")
    repository = open_repository(settings)
    if describe_database(settings) != state.database:
        info(f"warning: the stack records into {state.database}, this shell's settings into "
             f"{describe_database(settings)}: run the demo with the same DCMFLOW_* variables as `dcmflow up`")
    _enable_builtins_if_none(settings, repository)

    study = make_ct_study()
    sent = _Sent.of(study)
    target_host = host if host is not None else ("127.0.0.1" if state.dicom_host in _WILDCARD_HOSTS else state.dicom_host)
    target_port, called = port or state.dicom_port, ae_title or state.ae_title
    with stderr.status(f"sending {sum(sent.counts.values())} instances to {called}@{target_host}:{target_port} …"):
        started = time.monotonic()
        try:
            count = send_study(study, target_host, target_port, called)
        except SendError as exc:
            fail(str(exc))
    info(f"sent study {sent.study_uid} ({len(study)} series, {count} instances, patient DEMO^CT) "
         f"to {called}@{target_host}:{target_port} in {time.monotonic() - started:.1f} s")
    _report(_follow(repository, sent, timeout), sent, state, as_json)
