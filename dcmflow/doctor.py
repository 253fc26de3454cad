"""The checks of ``dcmflow doctor``: is this installation ready to run, and if not, what to fix.

Each check is a small function returning one :class:`CheckResult` (``ok``, ``warn``,
``fail`` or ``skip`` when a check it needs failed) with a one-line detail and a one-line fix.
:func:`run_checks` runs them in order, each in a daemon thread bounded by a timeout, so an
unreachable host (a database or S3 endpoint that drops packets) makes one row fail after a
few seconds instead of hanging the command; an abandoned thread dies with the process.

The checks read; the only things they write are what any dcmflow command writes (the S3
bucket is created if missing; a missing service folder is fetched from its bundle) and one
probe object under ``doctor/`` in the object store, deleted again. A missing embedded SQLite
database is not created: the first command creates and migrates it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from services_registry.spec import ServiceSpec
    from storage.objects import ObjectStore
    from storage.repository import Repository

    from dcmflow.settings import Settings
    from dcmflow.stack_state import StackState

__all__ = [
    "Status",
    "CheckResult",
    "DEFAULT_TIMEOUT",
    "DCMTK_TOOLS",
    "run_checks",
    "check_settings",
    "check_database",
    "check_object_store",
    "check_dicom_port",
    "check_prefect_api",
    "check_prefect_deployments",
    "check_services",
    "check_dcmtk",
]

Status = Literal["ok", "warn", "fail", "skip"]

DEFAULT_TIMEOUT = 5.0
"""Seconds one check may take before it counts as failed (``dcmflow doctor --timeout``)."""

DCMTK_TOOLS = (Path("/usr/bin/storescu"), Path("/usr/bin/storescp"))
"""The DCMTK programs the test suite sends and receives DICOM with, as a third-party peer."""

PROBE_PREFIX = "doctor"
"""Object-store prefix of the probe object (written, read back, deleted)."""


class CheckResult(BaseModel):
    """One row of the doctor's report."""

    check: str
    """Stable name: ``database``, ``object store``, ``service <name>`` …"""
    status: Status
    detail: str
    fix: str = ""
    """One line saying what to do; empty when there is nothing to do."""
    seconds: float = 0.0


def _result(check: str, status: Status, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(check=check, status=status, detail=detail, fix=fix)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _bounded(
    check: str, func: Callable[[], list[CheckResult]], timeout: float, hint: str = "see the detail"
) -> list[CheckResult]:
    """Run ``func`` in a daemon thread; a failure or an overrun becomes one ``fail`` row (``hint``)."""
    outcome: list[list[CheckResult]] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(func())
        except BaseException as exc:  # any failure of the checked thing is the report, never a traceback
            error.append(exc)

    started = time.perf_counter()
    thread = threading.Thread(target=target, name=f"doctor-{check}", daemon=True)
    thread.start()
    thread.join(timeout)
    elapsed = round(time.perf_counter() - started, 3)
    if thread.is_alive():
        rows = [_result(check, "fail", f"no answer within {timeout:g} s", f"{hint} (or raise --timeout)")]
    elif error:
        rows = [_result(check, "fail", _first_line(error[0]), hint)]
    else:
        rows = outcome[0]
    rows[0].seconds = elapsed  # a check with several rows (services): its first row is the summary
    return rows


# -- settings -------------------------------------------------------------------------------


def check_settings() -> tuple[CheckResult, Settings | None]:
    """Build :class:`Settings` from the environment; a bad ``DCMFLOW_*`` variable is one line."""
    from pydantic import ValidationError

    from dcmflow.cli._common import settings_problems
    from dcmflow.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        return _result("settings", "fail", settings_problems(exc), "correct the DCMFLOW_* variables named"), None
    return _result("settings", "ok", f"DCMFLOW_HOME {settings.home}"), settings


# -- database -------------------------------------------------------------------------------


def _missing_sqlite_file(settings: Settings) -> Path | None:
    """The SQLite file the settings name when it does not exist yet (else ``None``)."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.effective_database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    if url.database.startswith("file:") or Path(url.database).exists():
        return None
    return Path(url.database)


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    from storage import db

    return {script.revision for script in ScriptDirectory.from_config(db.alembic_config()).walk_revisions()}


def check_database(settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """The records database answers and is at the newest migration this dcmflow ships.

    The embedded SQLite database migrates itself when a command opens it, so one that is
    missing or behind is not a failure; a PostgreSQL database behind is (``dcmflow db upgrade``).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from storage import db

    from dcmflow.wiring import describe_database

    where = describe_database(settings)
    sqlite = make_url(settings.effective_database_url).get_backend_name() == "sqlite"
    path = _missing_sqlite_file(settings)
    if path is not None:
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK):
            return _result("database", "fail", f"{where} cannot be created: {parent} is not writable",
                           "make that folder writable, or set DCMFLOW_HOME or DCMFLOW_DATABASE_URL")
        return _result("database", "ok", f"{where} not created yet: the first dcmflow command creates and migrates it")
    kwargs = {} if sqlite else {"connect_args": {"connect_timeout": max(1, int(timeout))}, "poolclass": NullPool}
    engine = db.create_engine(settings.effective_database_url, **kwargs)
    try:
        try:
            current = db.current_revision(engine)
        except Exception as exc:  # the driver's error: refused, unknown database, bad password, not a database
            text = _first_line(getattr(exc, "orig", None) or exc)  # the driver's words, not SQLAlchemy's wrapper
            fix = (
                "create that database (e.g. createdb) and run `dcmflow db upgrade`, or fix DCMFLOW_DATABASE_URL"
                if "does not exist" in text
                else "start the database server, or fix DCMFLOW_DATABASE_URL"
            )
            return _result("database", "fail", f"cannot connect to {where}: {text}", fix)
    finally:
        engine.dispose()
    head = db.head_revision()
    if current == head:
        return _result("database", "ok", f"{where} at revision {head} (the newest)")
    if current is not None and current not in _known_revisions():
        return _result("database", "fail", f"{where} is at revision {current}, unknown to this dcmflow (head {head})",
                       "install the dcmflow version that migrated it, or point DCMFLOW_DATABASE_URL elsewhere")
    behind = f"{where} is at revision {current or '(empty)'}, the newest is {head}"
    if sqlite:
        return _result("database", "warn", f"{behind}; the embedded database migrates itself on the next command",
                       "run `dcmflow db upgrade`")
    return _result("database", "fail", behind, "run `dcmflow db upgrade`")


# -- object store ---------------------------------------------------------------------------


def check_object_store(settings: Settings) -> CheckResult:
    """The object store answers and keeps what is written: put, get and delete a probe object."""
    from storage.errors import ObjectNotFoundError

    from dcmflow.wiring import describe_object_store, object_store_from

    where = describe_object_store(settings)
    fix = (
        f"start the S3/MinIO server at {settings.s3_endpoint}, or fix DCMFLOW_S3_ENDPOINT (and _ACCESS_KEY, "
        "_SECRET_KEY, _BUCKET, _SECURE)"
        if settings.s3_endpoint
        else f"make {settings.objects_dir} writable, or set DCMFLOW_HOME"
    )
    key = f"{PROBE_PREFIX}/{socket.gethostname()[:40] or 'host'}-{os.getpid()}-{uuid.uuid4().hex[:12]}.probe"
    data = b"dcmflow doctor probe " + os.urandom(32)
    try:
        store = object_store_from(settings)
        store.put_if_absent(key, data)
        try:
            if store.get(key) != data:
                return _result("object store", "fail", f"{where}: the probe object read back differs from what was written",
                               "check the storage server's health")
        finally:
            store.delete(key)
        try:
            store.get(key)
        except ObjectNotFoundError:
            pass
        else:
            return _result("object store", "fail", f"{where}: the probe object is still there after its delete",
                           "check the storage server's health")
    except Exception as exc:  # unreachable, refused credentials, missing permission, full disk
        return _result("object store", "fail", f"{where}: {_first_line(exc)}", fix)
    return _result("object store", "ok", f"{where}: probe object {key} written, read back and deleted")


# -- DICOM port ------------------------------------------------------------------------------


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _echo(settings: Settings, ae_title: str, port: int, timeout: float) -> str | None:
    """C-ECHO ``ae_title`` on loopback ``port``: ``None`` on Success, else why not."""
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="DCMFLOW-DOCTOR")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    tls_args = None
    if settings.tls_cert is not None:  # our receiver speaks TLS: any certificate will do to ask it
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
        tls_args = (context, "")
    with _quiet("pynetdicom"):
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, tls_args=tls_args)
        if not assoc.is_established:
            return f"association rejected for called AE {ae_title!r}" if assoc.is_rejected else "no DICOM association"
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    return None if code == 0x0000 else f"C-ECHO status {code if code is None else hex(code)}"


def check_dicom_port(settings: Settings, state: StackState | None, timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """The DICOM port is free, or our running receiver has it (it answers C-ECHO to our AE).

    ``dcmflow up`` records its pid, port and AE title in ``up.json``; a port held while no
    ``up`` runs for this home makes ``dcmflow up`` refuse to start.
    """
    from dcmflow.stack import port_in_use

    port = state.dicom_port if state is not None else settings.dicom_port
    ae_title = state.ae_title if state is not None else settings.ae_title
    in_use = port_in_use(state.dicom_host if state is not None else "", port)
    if state is None:
        if not in_use:
            return _result("dicom port", "ok", f"port {port} is free for the receiver (AE {ae_title})")
        return _result("dicom port", "fail", f"port {port} is in use, and no dcmflow up runs for {settings.home} "
                       "(another program, a `dcmflow receive`, or an up of another DCMFLOW_HOME)",
                       f"set DCMFLOW_DICOM_PORT to a free port, or stop what listens on {port}")
    if not in_use:
        return _result("dicom port", "fail", f"dcmflow up (pid {state.pid}) should listen on port {port}, but nothing "
                       "does", "look at the output of dcmflow up, then restart it")
    problem = _echo(settings, ae_title, port, timeout * 0.6)  # answer before the check's own deadline
    if problem is None:
        return _result("dicom port", "ok", f"port {port}: our receiver (dcmflow up, pid {state.pid}) answers C-ECHO "
                       f"as AE {ae_title}")
    return _result("dicom port", "fail", f"port {port} is held while dcmflow up (pid {state.pid}) runs, but C-ECHO "
                   f"to AE {ae_title} failed: {problem}", "restart dcmflow up; `dcmflow status` shows it")


# -- Prefect --------------------------------------------------------------------------------


def _api_url(settings: Settings, state: StackState | None) -> str | None:
    return state.api_url if state is not None else settings.prefect_api_url


def check_prefect_api(settings: Settings, state: StackState | None, timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """The Prefect API answers ``/health``: that of the running ``dcmflow up``, or PREFECT_API_URL.

    With neither, nothing is wrong yet: ``dcmflow up`` starts its own server.
    """
    from dcmflow.prefect_api import healthy

    api = _api_url(settings, state)
    if api is None:
        return _result("prefect api", "warn", f"no Prefect server: dcmflow up is not running for {settings.home} "
                       "and PREFECT_API_URL is unset", "start it with dcmflow up")
    if healthy(api, timeout=timeout):
        return _result("prefect api", "ok", f"{api} is healthy")
    if state is not None:
        return _result("prefect api", "fail", f"dcmflow up (pid {state.pid}) runs, but its Prefect API {api} does "
                       "not answer /health", "restart dcmflow up; `dcmflow status` shows it")
    return _result("prefect api", "fail", f"PREFECT_API_URL={api} does not answer /health",
                   "start that Prefect server, or fix or unset PREFECT_API_URL")


def _expected_triggers() -> list[str]:
    """Automation names the declaration makes: each trigger (named as ``prefect deploy`` does)
    and each of its ``automations:``."""
    from deployments.loader import build_automations, read_specs

    names = [
        str(trigger.get("name") or f"{spec.name}__automation_{index}")
        for spec in read_specs()
        for index, trigger in enumerate(spec.triggers, start=1)
    ]
    return names + [automation.name for automation in build_automations()]


def check_prefect_deployments(settings: Settings, state: StackState | None, timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """Every deployment of ``deployments/prefect.yaml`` and every trigger and automation it
    declares exist (and are enabled) on the Prefect server."""
    from deployments.loader import read_specs

    from dcmflow.prefect_api import api_client

    api = _api_url(settings, state)
    assert api is not None
    names = [spec.full_name for spec in read_specs()]
    with api_client(api, timeout=timeout, attempts=1) as client:
        missing = []
        for name in names:
            found = client.get(f"/deployments/name/{name}")
            if found.status_code == 404:
                missing.append(name)
            else:
                found.raise_for_status()
        listed = client.post("/automations/filter", json={})
        listed.raise_for_status()
    automations = {a["name"]: bool(a.get("enabled", True)) for a in listed.json()}
    expected = _expected_triggers()
    absent = [n for n in expected if n not in automations]
    disabled = [n for n in expected if automations.get(n) is False]
    if missing or absent:
        parts = [f"deployments missing: {', '.join(missing)}" if missing else "",
                 f"automations missing: {', '.join(absent)}" if absent else ""]
        detail = f"{api}: " + "; ".join(p for p in parts if p)
        if state is not None:
            return _result("prefect deployments", "fail", detail, "restart dcmflow up (it serves them and their triggers)")
        return _result("prefect deployments", "warn", detail + " (dcmflow up is not running)",
                       "start dcmflow up, or `prefect deploy --all --prefect-file deployments/prefect.yaml`")
    if disabled:
        return _result("prefect deployments", "warn", f"{api}: automations disabled: {', '.join(disabled)}",
                       "enable them in the Prefect UI (Automations)")
    return _result("prefect deployments", "ok", f"{len(names)} deployments and {len(expected)} triggers/automations "
                   "present and enabled")


# -- services -------------------------------------------------------------------------------


def _venv_problem(settings: Settings, name: str, version: str | None, module_dir: Path | None) -> tuple[Status, str] | None:
    """A service version's own venv (``module/requirements.txt``): built, half-built or not yet."""
    from tasks.venvs import READY_MARKER, venv_dir

    number = int(version) if version is not None and version.isdigit() else 0  # as the job runner numbers it
    venv = venv_dir(module_dir, settings.home / "venvs", name, number)  # the runner's DCMFLOW_HOME/venvs
    if venv is None:
        return None
    if not (venv / READY_MARKER).is_file():
        return "warn", f"its venv {venv} is not built yet (the first series' callbacks build it with pip)"
    if not os.access(venv / "bin" / "python", os.X_OK):
        return "fail", f"its venv {venv} has no usable bin/python (delete the folder; the next job rebuilds it)"
    return None


def _service_fix(name: str) -> str:
    return f"install a fixed version (`dcmflow services install PATH`) or `dcmflow services remove {name}`"


def _load_one(settings: Settings, repository: Repository, store: ObjectStore, name: str,
              others: set[str]) -> ServiceSpec | CheckResult:
    """One installed service through the registry's own loading, or the row saying why not."""
    from services_registry.errors import RegistryError
    from services_registry.install import installed_specs

    try:
        (spec,) = installed_specs(repository, settings.services_dir, store, skip=others)
    except RegistryError as exc:  # InstallError: files, bundle or distribution gone or changed
        return _result(f"service {name}", "fail", str(exc), _service_fix(name))
    except Exception as exc:  # the bundle's store, a manifest the loader chokes on
        return _result(f"service {name}", "fail", _first_line(exc), _service_fix(name))
    return spec


def _check_one(settings: Settings, spec: ServiceSpec, others: list[ServiceSpec]) -> CheckResult:
    """Install's own checks (names, dependsOn, callbacks import, workers resolve), then its venv."""
    from services_registry.errors import RegistryError
    from services_registry.load import check_service

    check = f"service {spec.name}"
    try:
        check_service(spec, installed=others)
    except RegistryError as exc:  # names the file and field already
        return _result(check, "fail", str(exc), _service_fix(spec.name))
    except Exception as exc:  # the service's own code failing while it loads
        return _result(check, "fail", _first_line(exc), _service_fix(spec.name))
    jobs = f"v{spec.version}: {len(spec.jobs)} job(s); callbacks import, workers resolve"
    problem = _venv_problem(settings, spec.name, spec.version, spec.module_dir)
    if problem is None:
        return _result(check, "ok", jobs)
    status, why = problem
    fix = "run one job of it where pip reaches its index" if status == "warn" else "delete that venv folder"
    return _result(check, status, f"{jobs}; {why}", fix)


def check_services(settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> list[CheckResult]:
    """Every active installed service loads through the registry's own loading, its callbacks
    import, its workers resolve, its dependencies hold, and its venv is built if it has one."""
    from dcmflow.wiring import object_store_from, repository_from

    if _missing_sqlite_file(settings) is not None:
        return [_result("services", "ok", "no services installed (no database yet)")]
    repository = repository_from(settings)
    store = object_store_from(settings)
    names = sorted({record.name for record in repository.list_services()})
    if not names:
        return [_result("services", "ok", "no services installed")]
    deadline = time.monotonic() + timeout
    outcome: dict[str, ServiceSpec | CheckResult] = {}
    for name in names:  # all first: a dependsOn may name a job of a service later in the list
        outcome[name] = _load_one(settings, repository, store, name, set(names) - {name})
    specs = {name: spec for name, spec in outcome.items() if not isinstance(spec, CheckResult)}
    rows = [_result("services", "ok", f"{len(names)} installed: {', '.join(names)}")]
    for name in names:
        started = time.perf_counter()
        found = outcome[name]
        if isinstance(found, CheckResult):
            row = found
        elif time.monotonic() > deadline:
            row = _result(f"service {name}", "fail", f"not checked: the services took over {timeout:g} s",
                          "raise --timeout")
        else:
            row = _check_one(settings, found, [s for n, s in specs.items() if n != name])
        row.seconds = round(time.perf_counter() - started, 3)
        rows.append(row)
    failed = [r.check.removeprefix("service ") for r in rows[1:] if r.status == "fail"]
    if failed:
        rows[0] = _result("services", "fail", f"{len(failed)} of {len(names)} broken: {', '.join(failed)}",
                          "see the rows of those services")
    return rows


# -- DCMTK ----------------------------------------------------------------------------------


def check_dcmtk(timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """DCMTK's storescu/storescp, the independent DICOM peer of the test suite (not of dcmflow)."""
    missing = [str(tool) for tool in DCMTK_TOOLS if not os.access(tool, os.X_OK)]
    if missing:
        return _result("dcmtk", "warn", f"{', '.join(missing)} missing: needed by the test suite",
                       "install DCMTK (apt-get install dcmtk)")
    done = subprocess.run([str(DCMTK_TOOLS[0]), "--version"], capture_output=True, text=True, timeout=timeout,
                          check=False)
    version = next((line.strip("$ ") for line in done.stdout.splitlines() if "storescu" in line), "")
    return _result("dcmtk", "ok", f"{', '.join(map(str, DCMTK_TOOLS))} present{f' ({version})' if version else ''}")


# -- all ------------------------------------------------------------------------------------


def _skip(check: str, why: str) -> CheckResult:
    return _result(check, "skip", f"not checked: {why}")


def run_checks(timeout: float = DEFAULT_TIMEOUT) -> list[CheckResult]:
    """Every check, in order; those that need a failed one are ``skip``.

    Parameters
    ----------
    timeout
        Seconds each check may take (the services check gets three times as long: it
        imports their callbacks).

    Returns
    -------
    list[CheckResult]
        One row per check (plus one per installed service).
    """
    from dcmflow.stack_state import read_state

    started = time.perf_counter()
    settings_row, settings = check_settings()
    settings_row.seconds = round(time.perf_counter() - started, 3)
    rows = [settings_row]
    if settings is None:
        needs = "the settings are invalid"
        rows += [_skip(name, needs) for name in ("database", "object store", "dicom port", "prefect api",
                                                  "prefect deployments", "services")]
        return rows + _bounded("dcmtk", lambda: [check_dcmtk(timeout)], timeout)
    state = read_state(settings.home)
    database = _bounded("database", lambda: [check_database(settings, timeout)], timeout,
                        "check that the database host is reachable, or fix DCMFLOW_DATABASE_URL")
    objects = _bounded("object store", lambda: [check_object_store(settings)], timeout,
                       "check that the S3 endpoint is reachable, or fix DCMFLOW_S3_ENDPOINT")
    rows += database + objects
    rows += _bounded("dicom port", lambda: [check_dicom_port(settings, state, timeout)], timeout,
                     "set DCMFLOW_DICOM_PORT to a free port")
    prefect = _bounded("prefect api", lambda: [check_prefect_api(settings, state, timeout)], timeout,
                       "check the Prefect server (PREFECT_API_URL or dcmflow up)")
    rows += prefect
    if prefect[0].status == "ok":
        rows += _bounded("prefect deployments", lambda: [check_prefect_deployments(settings, state, timeout)],
                         timeout, "restart dcmflow up")
    else:
        rows.append(_skip("prefect deployments", "no healthy Prefect API"))
    if database[0].status != "ok" or objects[0].status == "fail":
        rows.append(_skip("services", "the database is not ready or the object store failed"))
    else:
        rows += _bounded("services", lambda: check_services(settings, timeout * 3), timeout * 3 + 1,
                         "see `dcmflow services list`")
    rows += _bounded("dcmtk", lambda: [check_dcmtk(timeout)], timeout)
    return rows
