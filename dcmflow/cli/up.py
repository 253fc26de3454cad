"""``dcmflow up`` (the whole stack in one command) and ``dcmflow status`` (what is running).

``up`` starts a Prefect server (unless ``PREFECT_API_URL`` names one), serves the deployments
of ``deployments/prefect.yaml`` with their triggers (``serve-flows``, a hidden command run as
a child process), and runs the DICOM receiver here; see :mod:`dcmflow.stack`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from dcmflow.cli._common import load_settings, open_repository
from dcmflow.cli._output import emit, fail, stdout
from dcmflow.cli.receive import configure_logging, open_storage, receiver_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from storage.repository import Repository

    from dcmflow.settings import Settings
    from dcmflow.stack import Stack

__all__ = ["up", "status", "serve_flows", "register_flows"]

log = logging.getLogger("dcmflow.up")

ACTION_CHECK_SECONDS = 5.0
"""How often ``up`` looks for automation actions the server could not carry out."""


def _describe_objects(settings: Settings) -> str:
    if settings.s3_endpoint:
        return f"s3://{settings.s3_endpoint}/{settings.s3_bucket}"
    return str(settings.objects_dir)


def _banner(stack: Stack, settings: Settings) -> None:
    from deployments.loader import read_work_queues

    state = stack.state
    assert state is not None
    lines = [
        "[bold green]dcmflow is up[/]",
        f"  Prefect UI    {state.ui_url}",
        f"  Prefect API   {state.api_url}" + ("" if stack.server else "  (PREFECT_API_URL)"),
        f"  DICOM         AE {state.ae_title} on port {state.dicom_port}  (send with: "
        f"TCP_NODELAY=1 /usr/bin/storescu -aec {state.ae_title} 127.0.0.1 {state.dicom_port} +sd +r FOLDER)",
        (
            f"  flows         on work pool {state.work_pool} (queues by priority: {', '.join(read_work_queues())}); workers: "
            f"`PREFECT_API_URL={state.api_url} prefect worker start --pool {state.work_pool} "
            f"{' '.join(f'--work-queue {q}' for q in read_work_queues())} --limit 4`"
            if state.work_pool
            else f"  flows         served here: {settings.max_flow_runs} live runs and {settings.max_backfill_runs} "
            "backfill run(s) at once"
        ),
        f"  data          {state.home}",
        f"  records       {state.database}",
        f"  objects       {state.objects}",
        f"  series stable after {settings.stable_age:g} s of quiet (DCMFLOW_STABLE_AGE) or their expected count",
        "  try it: dcmflow demo   ·   what runs: dcmflow status   ·   stop: Ctrl-C",
    ]
    stdout.print("\n".join(lines), highlight=False, soft_wrap=True)


def _start_receiver(settings: Settings, api_url: str, repository: Repository) -> Callable[[], None]:
    """Run the receiver in this process, its events going to ``api_url``; returns its stop."""
    from receiver.runner import Receiver

    # The completeness monitor's emitter reads Prefect's settings, which Prefect builds from
    # the environment when it is first imported (after this line, in this process).
    os.environ["PREFECT_API_URL"] = api_url
    receiver = Receiver(receiver_config(settings), functools.partial(open_storage, settings), repository)
    receiver.start()
    return receiver.stop


def up(
    dicom_port: int | None = typer.Option(None, "--port", "-p", help="DICOM port (default DCMFLOW_DICOM_PORT, 11112)."),
    prefect_port: int | None = typer.Option(
        None, "--prefect-port", help="Port of the Prefect server started here (default DCMFLOW_PREFECT_PORT, 4200)."
    ),
    demo: bool = typer.Option(
        False, "--demo", help="Once up, send a synthetic CT study and show it processed (`dcmflow demo`); keep running."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run everything: Prefect server and UI, the deployments and their triggers, the DICOM receiver.

    Without PREFECT_API_URL a Prefect server is started here (its database under
    DCMFLOW_HOME/prefect, kept between runs); with it, that server is used. Every series that
    arrives is stored, declared stable, and processed by the installed services as a
    process-series flow run you can watch in the UI. Ctrl-C (or SIGTERM) stops everything;
    starting again resumes what was left (spool, waiting series, unsent events, interrupted runs).

    Examples:

        dcmflow up --demo

        DCMFLOW_STABLE_AGE=10 dcmflow up

        dcmflow up --port 104 --prefect-port 4300

        DCMFLOW_WORK_POOL=dcmflow dcmflow up
    """
    from dcmflow.stack import DCMFLOW_COMMAND, Stack, StackConfig, StackError
    from dcmflow.wiring import describe_database

    settings = load_settings()
    if dicom_port is not None:
        settings = settings.model_copy(update={"dicom_port": dicom_port})
    if prefect_port is not None:
        settings = settings.model_copy(update={"prefect_port": prefect_port})
    configure_logging(verbose)
    home = settings.home  # absolute (Settings resolves it)
    repository = open_repository(settings)  # a bad database is one line now, before anything starts
    config = StackConfig(
        home=home,
        api_url=settings.prefect_api_url,
        prefect_host=settings.prefect_host,
        prefect_port=settings.prefect_port,
        max_flow_runs=settings.max_flow_runs,
        max_backfill_runs=settings.max_backfill_runs,
        work_pool=settings.work_pool,
        ae_title=settings.ae_title,
        dicom_port=settings.dicom_port,
        database=describe_database(settings),
        objects=_describe_objects(settings),
        extra_env={"DCMFLOW_DICOM_PORT": str(settings.dicom_port)},
    )
    stopping = False
    serving = False

    def request_stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        if not serving:  # still starting: abandon the start (Stack.start stops what it started)
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(config, lambda: _start_receiver(settings, stack.api_url, repository), repository)
    demo_run: subprocess.Popen[bytes] | None = None
    try:
        stack.start()
        serving = True
        _banner(stack, settings)
        from dcmflow.stack import action_watcher

        demo_run = subprocess.Popen([*DCMFLOW_COMMAND, "demo"], env=stack.child_env()) if demo else None
        watcher = action_watcher(stack.api_url)
        next_check = 0.0
        while not stopping:
            time.sleep(0.2)
            stack.check_children()
            if demo_run is not None and demo_run.poll() is not None:
                outcome = "the demo study was processed" if demo_run.returncode == 0 else "the demo failed (see above)"
                log.info("%s; still receiving on port %d (Ctrl-C stops)", outcome, settings.dicom_port)
                demo_run = None
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + ACTION_CHECK_SECONDS
                watcher()
        log.info("stopping")
    except StackError as exc:
        stack.stop()
        fail(str(exc))
    except KeyboardInterrupt:
        stack.stop()
        fail("interrupted while starting; nothing is left running", code=130)
    finally:
        if demo_run is not None and demo_run.poll() is None:
            demo_run.terminate()
            demo_run.wait(timeout=10)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_flows(
    limit: int = typer.Option(4, "--limit", min=1, help="Flow runs at once."),
    poll: float = typer.Option(0.5, "--poll", min=0.1, help="Seconds between polls for scheduled runs."),
    queue: list[str] = typer.Option([], "--queue", help="Serve only the deployments declared on this work queue (repeatable)."),
    stack_home: Path | None = typer.Option(
        None, "--stack-home", help="Stop the stack's processes (marked with this home) when the parent dies."
    ),
) -> None:
    """Serve deployments/prefect.yaml with its triggers (run by `dcmflow up`; not for direct use)."""
    from prefect import serve

    from deployments.loader import apply_automations, read_work_queues, runner_deployments

    if stack_home is not None:
        from dcmflow.stack import watch_parent

        watch_parent(stack_home)

    first_queue = min(read_work_queues().items(), key=lambda item: item[1], default=(None, 0))[0]
    if not queue or first_queue in queue:  # one of the runners creates the declared automations
        apply_automations()
    serve(*runner_deployments(queues=queue or None), limit=limit, query_seconds=poll, print_starting_message=False)


def register_flows(
    pool: str = typer.Option(..., "--pool", help="Process work pool to register the deployments on."),
) -> None:
    """Register deployments/prefect.yaml on a work pool, creating pool and queues if missing (run by `dcmflow up`)."""
    from deployments.loader import apply_automations, read_work_queues, runner_deployments

    from dcmflow.stack import StackError, ensure_work_pool

    try:
        for change in ensure_work_pool(pool, read_work_queues()):
            typer.echo(change)
    except StackError as exc:
        fail(str(exc))
    for deployment in runner_deployments(work_pool=pool):
        deployment.apply()
        typer.echo(f"registered {deployment.flow_name}/{deployment.name} on {pool}/{deployment.work_queue_name}")
    for name in apply_automations():
        typer.echo(f"created automation {name}")


def status(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show the running stack: Prefect API and UI, DICOM AE and port, what arrived, recent flow runs.

    Examples:

        dcmflow status

        dcmflow status --json
    """
    from dcmflow.stack import collect_status

    settings = load_settings()
    report = collect_status(settings)
    if as_json:
        import json

        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_status(report)
    if not report["running"]:
        raise typer.Exit(3)


def _print_status(report: dict[str, Any]) -> None:
    if not report["running"]:
        stdout.print(f"dcmflow up is not running for {report['home']} (start it with `dcmflow up`)", highlight=False)
    else:
        stack = report["stack"]
        stdout.print(
            "\n".join(
                [
                    f"dcmflow up (pid {stack['pid']}) since {stack['started_at']}",
                    f"  Prefect UI    {stack['ui_url']}",
                    f"  Prefect API   {stack['api_url']}  ({'healthy' if report['prefect_healthy'] else 'NOT ANSWERING'})",
                    f"  DICOM         AE {stack['ae_title']} on port {stack['dicom_port']}",
                    f"  data          {stack['home']}",
                ]
            ),
            highlight=False,
        )
    counts = report["records"]
    stdout.print(
        f"  received      {counts['studies']} studies, {counts['series']} series, {counts['instances']} instances; "
        f"{report['spool_backlog']} ({report.get('spool_backlog_bytes', 0) / 1e6:.1f} MB) in the spool waiting for ingest",
        highlight=False,
    )
    if report["waiting"]:
        emit(report["waiting"], False, columns=["series_uid", "modality", "instance_count", "last_received_at"],
             title="series waiting for stability")
    if report["work_queues"]:
        emit(report["work_queues"], False, columns=["name", "priority", "status", "last_polled", "waiting"],
             title=f"work queues of pool {report['stack']['work_pool']} (READY = a worker polls it)")
    if report["flow_runs"]:
        emit(report["flow_runs"], False, columns=["name", "deployment", "state", "start_time", "url"], title="recent flow runs")
    for failure in report["failed_actions"]:
        stdout.print(f"[red]automation failed[/] {failure['occurred']}: {failure['reason']}", highlight=False)
