"""``dcmflow services``: install, enable/disable, remove, back up, list, show and dry-run plan services.

Services are dcm-processor folders (``registry/`` + ``module/``) used unchanged, or Python
modules using :class:`services_registry.Service`. Every user mistake is one line on stderr
and exit code 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.text import Text
from rich.tree import Tree

from dcmflow.cli._common import load_settings
from dcmflow.cli._output import emit, emit_one, fail, info, stdout

if TYPE_CHECKING:
    from services_registry.planning import SeriesPlan
    from storage.objects import ObjectStore
    from storage.repository import Repository

    from dcmflow.settings import Settings

app = typer.Typer(help="Install, enable, inspect and dry-run processing services.", no_args_is_help=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn registry/storage errors into one line and exit 1 (never a traceback)."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from services_registry.errors import RegistryError
    from storage.errors import StorageError

    try:
        yield
    except (RegistryError, StorageError) as exc:
        fail(str(exc))
    except (OperationalError, ProgrammingError) as exc:
        text = str(exc.orig) if exc.orig is not None else str(exc)
        if "no such table" in text or "does not exist" in text:
            fail("the database has no dcmflow tables yet; run `dcmflow db upgrade` first")
        fail(f"database error: {text.splitlines()[0] if text else type(exc).__name__}")


def _storage(settings: Settings) -> tuple[Repository, ObjectStore]:
    from dcmflow.cli._common import open_repository
    from dcmflow.wiring import object_store_from

    return open_repository(settings), object_store_from(settings)


@app.command()
def install(
    path: str | None = typer.Argument(None, help="Service folder (registry/ + module/), or a .py file / package[:attribute]."),
    name: str | None = typer.Option(None, "--name", "-n", help="Install name (default: folder or Service name)."),
    entry_points: bool = typer.Option(
        False, "--entry-points", help="Record every service advertised by installed distributions (dcmflow.services)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Validate a service, copy it under DCMFLOW_HOME/services, record it and store its bundle.

    With --entry-points, record instead every service that installed Python distributions
    advertise under the ``dcmflow.services`` entry point group (nothing is copied: the code
    is imported by name from this environment).

    Examples:

        dcmflow services install ./my_service

        dcmflow services install tests/examples/ct_volume_py.py --name ct-volume-py

        dcmflow services install --entry-points
    """
    from services_registry.install import install_service
    from services_registry.load import load_service

    if entry_points:
        if path is not None or name is not None:
            fail("--entry-points takes no PATH and no --name")
        _install_entry_points(as_json)
        return
    if path is None:
        fail("give a service PATH, or --entry-points")
    settings = load_settings()
    with _errors():
        spec = load_service(path, name=name)
        repository, store = _storage(settings)
        result = install_service(spec, services_dir=settings.services_dir, repository=repository, store=store)
    for warning in result.warnings:
        info(f"warning: {warning}")
    if as_json:
        emit_one(result, True)
        return
    what = "installed" if result.changed else "unchanged, already installed as"
    info(f"{result.name} {what} version {result.version} ({len(result.jobs)} jobs: {', '.join(result.jobs)})")


def _install_entry_points(as_json: bool) -> None:
    """``install --entry-points``: record the services of installed distributions."""
    from services_registry.entrypoints import ENTRY_POINT_GROUP
    from services_registry.install import install_entry_points

    settings = load_settings()
    with _errors():
        repository, store = _storage(settings)
        results = install_entry_points(services_dir=settings.services_dir, repository=repository, store=store)
    for result in results:
        for warning in result.warnings:
            info(f"warning: {warning}")
    if as_json:
        emit(results, True)
        return
    if not results:
        info(f"no installed distribution advertises services under {ENTRY_POINT_GROUP!r}")
    for result in results:
        what = "recorded" if result.changed else "unchanged, already recorded as"
        info(f"{result.name} {what} version {result.version} ({len(result.jobs)} jobs: {', '.join(result.jobs)})")


@app.command()
def remove(
    name: str = typer.Argument(..., help="Installed service name."),
    backup: Path | None = typer.Option(None, "--backup", "-b", help="Copy it to DIR/<name>/ first."),
) -> None:
    """Remove every version of a service (files, records, bundles), optionally backing it up first.

    Examples:

        dcmflow services remove ct-volume --backup ./backups
    """
    from services_registry.install import remove_service

    settings = load_settings()
    with _errors():
        repository, store = _storage(settings)
        count = remove_service(
            name, services_dir=settings.services_dir, repository=repository, store=store, backup=backup
        )
    info(f"removed {name} ({count} version{'s' if count != 1 else ''})" + (f", backup in {backup / name}" if backup else ""))


@app.command()
def backup(
    name: str = typer.Argument(..., help="Installed service name."),
    directory: Path = typer.Argument(..., help="Folder to copy it into (as DIR/<name>/)."),
) -> None:
    """Copy the active version of a service to DIR/<name>/ (re-installable as is).

    Examples:

        dcmflow services backup ct-volume ./backups
    """
    from services_registry.install import backup_service

    settings = load_settings()
    with _errors():
        repository, store = _storage(settings)
        target = backup_service(name, directory, services_dir=settings.services_dir, repository=repository, store=store)
    info(f"backed up {name} to {target}")


@app.command("list")
def list_services(
    everything: bool = typer.Option(
        False, "--all", "-a", help="Also list services that are available but off (the built-in ones until enabled) or disabled."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List installed services (active versions); with --all, every service you could enable.

    Examples:

        dcmflow services list

        dcmflow services list --all --json
    """
    from services_registry.install import available_services, is_builtin

    settings = load_settings()
    with _errors():
        repository, _ = _storage(settings)
        records = repository.list_services(include_inactive=everything)
        advertised = available_services() if everything else []
    if not everything:
        rows = [
            {"name": r.name, "version": r.version, "source": r.source_kind, "jobs": ", ".join(j.job_name for j in r.jobs), "summary": r.summary}
            for r in records
        ]
        if as_json:
            emit([r.model_dump(mode="json") for r in records], True)
        else:
            emit(rows, False, columns=["name", "version", "source", "jobs", "summary"], title="Installed services")
        return
    newest: dict[str, Any] = {}
    for r in records:
        if r.name not in newest or r.active or (not newest[r.name].active and r.version > newest[r.name].version):
            newest[r.name] = r
    specs = {s.name: s for s in advertised}
    rows = []
    for name in sorted(set(newest) | set(specs)):
        record, spec = newest.get(name), specs.get(name)
        state = "enabled" if record is not None and record.active else "disabled" if record is not None else "available"
        rows.append(
            {
                "name": name,
                "state": state,
                "version": record.version if record is not None else None,
                "source": "built-in" if spec is not None and is_builtin(spec) else (record.source_kind if record else "entrypoint"),
                "jobs": ", ".join(j.job_name for j in (record.jobs if record is not None else spec.jobs)),  # type: ignore[union-attr]
                "summary": (record.summary if record is not None else "") or (spec.description if spec is not None else "") or "",
            }
        )
    emit(rows, as_json, columns=["name", "state", "version", "source", "jobs", "summary"], title="Services")


def _param_values(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs: VALUE is JSON when it parses (``3``, ``true``, ``["CT"]``), a
    string otherwise; ``KEY=@file.json`` reads the JSON from a file."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--param {pair!r}: expected KEY=VALUE")
        if text.startswith("@"):
            try:
                values[key.strip()] = json.loads(Path(text[1:]).read_text())
            except (OSError, ValueError) as exc:
                fail(f"--param {key}: cannot read JSON from {text[1:]}: {exc}")
            continue
        try:
            values[key.strip()] = json.loads(text)
        except ValueError:
            values[key.strip()] = text
    return values


@app.command()
def enable(
    name: str = typer.Argument(..., help="Service name, as `dcmflow services list --all` shows it."),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="Set a param of its jobs: KEY=VALUE (JSON or text), KEY=@file.json. Repeatable."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Turn a service on: every new series is offered to its jobs from now on.

    Built-in services (preview, nifti, deid, forward, qc) are off until enabled. Params you set
    are kept until set again; a change makes a new service version.

    Examples:

        dcmflow services enable preview

        dcmflow services enable forward -p 'rules=[{"modality": "CT", "peer": "PACS"}]'

        dcmflow services enable qc -p fail_on=@qc-thresholds.json
    """
    from services_registry.install import enable_service

    values = _param_values(param)
    settings = load_settings()
    with _errors():
        repository, store = _storage(settings)
        result = enable_service(name, params=values, services_dir=settings.services_dir, repository=repository, store=store)
    for warning in result.warnings:
        info(f"warning: {warning}")
    if as_json:
        emit_one(result, True)
        return
    new = " (a new version)" if result.changed else ""
    info(f"{result.name} enabled: version {result.version}{new}, jobs {', '.join(result.jobs)}")


@app.command()
def disable(name: str = typer.Argument(..., help="Enabled service name.")) -> None:
    """Turn a service off: new series no longer run its jobs (records and files are kept;
    `dcmflow services enable NAME` turns it back on with the same params).

    Examples:

        dcmflow services disable preview
    """
    from services_registry.install import disable_service

    settings = load_settings()
    with _errors():
        repository, _ = _storage(settings)
        count = disable_service(name, repository=repository)
    info(f"{name} disabled" if count else f"{name} was disabled already")


@app.command()
def show(
    name: str = typer.Argument(..., help="Installed service name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one installed service and its job specs.

    Examples:

        dcmflow services show preview

        dcmflow services show ct-volume --json
    """
    from services_registry.errors import ServiceNotFoundError

    settings = load_settings()
    with _errors():
        repository, _ = _storage(settings)
        record = repository.get_service(name)
        if record is None:
            raise ServiceNotFoundError(name)
    if as_json:
        emit_one(record, True)
        return
    emit_one(record.model_dump(mode="json", exclude={"jobs"}), False, title=name)
    emit(
        [j.model_dump(mode="json") for j in record.jobs],
        False,
        columns=["job_name", "worker", "callback", "depends_on", "priority", "timeout_seconds", "sort_position", "disabled", "level"],
        title="jobs",
    )


def _plans_from_dir(directory: Path, specs: list[Any], settings: Settings) -> list[SeriesPlan]:
    from services_registry.errors import RegistryError
    from services_registry.headers import headers_from_dataset, read_series_folder
    from services_registry.planning import plan_series

    if not directory.is_dir():
        raise RegistryError(f"{directory}: not a folder")
    plans = []
    series = read_series_folder(directory)
    if not series:
        raise RegistryError(f"{directory}: no DICOM files with a SeriesInstanceUID")
    for uid in sorted(series):
        path, ds = series[uid].representative
        rel = path.parent.resolve().relative_to(directory.resolve()).as_posix()
        headers = headers_from_dataset(ds, dcmpath=rel)
        plans.append(plan_series(specs, headers, instances=len(series[uid].files), **_callback_options(settings)))
    return plans


def _plan_from_store(
    series_uid: str, repository: Repository, store: ObjectStore, specs: list[Any], settings: Settings
) -> SeriesPlan:
    import pydicom

    from services_registry.errors import RegistryError
    from services_registry.headers import headers_from_dataset
    from services_registry.planning import default_dcmpath, plan_series
    from storage.keys import validate_uid

    validate_uid(series_uid, "Series Instance UID")
    series = repository.get_series(series_uid)
    if series is None:
        raise RegistryError(f"no received series {series_uid}")
    instances = repository.list_instances(series_uid)
    if not instances:
        raise RegistryError(f"series {series_uid} has no stored instances")
    first = instances[0]  # ordered by InstanceNumber: the representative instance
    with store.open_stream(first.object_key) as stream:
        ds = pydicom.dcmread(stream, stop_before_pixels=True)
    headers = headers_from_dataset(ds, dcmpath=default_dcmpath(series.study_uid, series_uid))
    return plan_series(specs, headers, instances=len(instances), **_callback_options(settings))


def _callback_options(settings: Settings) -> dict[str, Any]:
    """Callbacks evaluated as the flow evaluates them: timeout, and each service's interpreter."""
    from tasks.venvs import callback_interpreter

    return {"timeout": settings.callback_timeout, "interpreter": callback_interpreter(settings.home / "venvs")}


def _render(plan: SeriesPlan) -> None:
    """The plan as a rich tree; Text objects, so brackets in names or reasons print as-is."""
    plural = "s" if plan.instances != 1 else ""
    tree = Tree(Text.assemble((f"series {plan.series_uid}", "bold"),
                              f"  {plan.modality} {plan.description!r}  {plan.instances} instance{plural}"))
    runs = tree.add(Text(f"will run ({len(plan.selected)}, ready order)", style="green"))
    for index, job in enumerate(plan.selected, 1):
        deps = f"  after {', '.join(job['dependsOn'])}" if job["dependsOn"] else ""
        runs.add(Text.assemble(
            f"{index}. ", (str(job["job"]), "bold"),
            f" ({job['service']})  priority {job['priority']}, sortPosition {job['sortPosition']}{deps}"
            f"  added_params {json.dumps(job['added_params'])}",
        ))
    skipped = tree.add(Text(f"will not run ({len(plan.rejected)})", style="red"))
    for job in plan.rejected:
        skipped.add(Text.assemble((str(job["job"]), "bold"), f" ({job['service']}): {job['reason']}"))
    dag = tree.add(Text("DAG levels (jobs in one level may run together)"))
    for depth, level in enumerate(plan.levels):
        dag.add(Text(f"level {depth}: {', '.join(level)}"))
    stdout.print(tree)


@app.command()
def plan(
    series_uid: str | None = typer.Argument(None, help="Series Instance UID of a received series."),
    directory: Path | None = typer.Option(None, "--dir", "-d", help="A folder of DICOM files not yet received."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Dry run: which jobs would run for a series, why others would not, and the DAG.

    Examples:

        dcmflow services plan 1.2.840.113619.2.55.3.1234

        dcmflow services plan --dir /path/to/one/series
    """
    from services_registry.install import installed_specs

    if (series_uid is None) == (directory is None):
        fail("give either SERIES_UID or --dir PATH")
    settings = load_settings()
    with _errors():
        repository, store = _storage(settings)
        specs = installed_specs(repository, settings.services_dir, store)
        if directory is not None:
            plans = _plans_from_dir(directory, specs, settings)
        else:
            assert series_uid is not None
            plans = [_plan_from_store(series_uid, repository, store, specs, settings)]
    if as_json:
        emit(plans, True)
        return
    if not specs:
        info("no services installed: nothing would run")
    for item in plans:
        _render(item)
