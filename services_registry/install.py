"""Install, remove and back up services, like dcm-processor's ``service.sh``, with versions.

``service.sh install`` copied ``registry/`` and ``module/`` to ``$REGISTRY/<name>`` and
``$MODULES/<name>`` after ``rm -rf`` of the old copy (reference §1.1). dcmflow keeps every
version instead:

* files: ``<services_dir>/<name>/<version>/`` holding ``registry/`` + ``module/`` (folder
  services) or ``python/<module or package>`` (Python services), plus ``dcmflow-service.json``
  (name, source, entry, hash: what is needed to load it again);
* records: the service and its job specs through :class:`storage.repository.Repository`,
  which numbers versions and keeps one active: unchanged content (same ``content_hash``)
  is the same version, changed content is version n+1;
* bundle: a reproducible ``.tar.gz`` of that folder in the object store at
  ``services/<name>/<version>.tar.gz`` (key built only from validated names), so a worker on
  another machine fetches exactly that version (:func:`ensure_local`).

Services of installed distributions (entry point group ``dcmflow.services``) are recorded by
:func:`install_entry_points` without copying: they are imported by name from the environment,
and :func:`installed_specs` loads them from there again, refusing code that differs from
what was recorded. dcmflow's own built-in services (:mod:`services_registry.builtin`) are
advertised the same way but stay off until :func:`enable_service` records them, optionally
with some of their ``params`` set by the user (kept as ``paramsOverride`` in the job record's
``extra`` and folded into the version's content hash, so new params make a new version);
:func:`disable_service` makes every version inactive.

Nothing is copied, recorded or uploaded before the service passed every check of
:func:`services_registry.check_service` against the other installed services.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import tarfile
import tempfile
from pathlib import Path
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from storage.errors import ObjectNotFoundError, StorageError
from storage.keys import validate_key, validate_name

from services_registry._files import iter_files
from services_registry.api import load_python
from services_registry.entrypoints import load_entry_points, module_files
from services_registry.errors import InstallError, ServiceNotFoundError, ServiceValidationError
from services_registry.folder import load_folder
from services_registry.load import check_service
from services_registry.spec import JobSpec, ServiceSpec
from services_registry.validate import validate_services

if TYPE_CHECKING:
    from storage.models import ServicePublic
    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = [
    "MANIFEST",
    "InstallResult",
    "bundle_key",
    "install_service",
    "install_entry_points",
    "BUILTIN_PACKAGE",
    "is_builtin",
    "available_services",
    "enable_service",
    "disable_service",
    "installed_specs",
    "installed_version",
    "ensure_local",
    "remove_service",
    "backup_service",
]

MANIFEST = "dcmflow-service.json"
"""File in each installed version folder saying how to load it again."""

_SOURCE_KIND = {"folder": "folder", "python": "python", "entry_point": "entrypoint"}

BUILTIN_PACKAGE = "services_registry.builtin"
"""Package of the services that come with dcmflow (off until enabled)."""

_OVERRIDE = "paramsOverride"
"""Key, in a job record's ``extra``, of the params the user set with ``enable --param``."""

Overrides = Mapping[str, Mapping[str, Any]]
"""Params set by the user, per job name."""


def is_builtin(spec: ServiceSpec) -> bool:
    """Whether ``spec`` is one of dcmflow's own services (:mod:`services_registry.builtin`)."""
    return spec.source == "entry_point" and (spec.entry or "").startswith(BUILTIN_PACKAGE + ".")


def _with_overrides(spec: ServiceSpec, overrides: Overrides) -> ServiceSpec:
    """``spec`` with the user's params merged into its jobs' params, and a content hash that
    covers them (unchanged when there are none, so plain installs keep their hash)."""
    used = {job: dict(values) for job, values in overrides.items() if values}
    if not used:
        return spec
    jobs = tuple(
        j.model_copy(update={"params": {**(j.params or {}), **used[j.job_name]}}) if j.job_name in used else j
        for j in spec.jobs
    )
    blob = json.dumps(used, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(f"{spec.content_hash}\0{blob}".encode()).hexdigest()
    return spec.model_copy(update={"jobs": jobs, "content_hash": digest})


def _recorded_overrides(record: ServicePublic) -> dict[str, dict[str, Any]]:
    return {j.job_name: dict(j.extra[_OVERRIDE]) for j in record.jobs if j.extra.get(_OVERRIDE)}


class InstallResult(BaseModel):
    """What ``install`` did; ``changed`` is false when the same content was installed already."""

    name: str
    version: int
    changed: bool
    content_hash: str
    source: str
    install_path: str | None
    bundle_key: str | None
    jobs: list[str]
    warnings: list[str]


def bundle_key(name: str, version: int) -> str:
    """Object key of a service version's bundle: ``services/<name>/<version>.tar.gz``."""
    return validate_key(f"services/{validate_name(name, 'service name')}/{int(version)}.tar.gz")


def _version_dir(services_dir: Path, name: str, version: int) -> Path:
    return services_dir / validate_name(name, "service name") / str(int(version))


def _copy_service(spec: ServiceSpec, target: Path) -> None:
    """Copy the service's files into ``target`` (a new folder) and write the manifest."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".git")
    if spec.source == "folder":
        assert spec.root is not None
        shutil.copytree(spec.root / "registry", target / "registry", ignore=ignore)
        module = spec.root / "module"
        if module.is_dir():
            shutil.copytree(module, target / "module", ignore=ignore)
    elif spec.source == "python":
        assert spec.root is not None and spec.entry
        top = spec.entry.split(":", 1)[0]
        source = spec.root / top if (spec.root / top).is_dir() else spec.root / f"{top}.py"
        (target / "python").mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target / "python" / source.name, ignore=ignore)
        else:
            shutil.copy2(source, target / "python" / source.name)
    else:
        target.mkdir(parents=True)
    manifest = {"name": spec.name, "source": spec.source, "entry": spec.entry, "content_hash": spec.content_hash}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _bundle(folder: Path) -> bytes:
    """A reproducible tar.gz of ``folder`` (sorted names, zero times and owners)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in iter_files(folder):
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    return buffer.getvalue()


def _load_version(folder: Path, name: str, version: int) -> ServiceSpec:
    """Load an installed version folder back into a spec (using its manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise InstallError(f"{folder}: unreadable {MANIFEST}: {exc}") from None
    if manifest["source"] == "folder":
        spec = load_folder(folder, name=name)
    elif manifest["source"] == "python":
        module, _, attribute = str(manifest["entry"]).partition(":")
        path = folder / "python" / module
        spec = load_python(path if path.is_dir() else path.with_suffix(".py"), attribute=attribute or None, name=name)
    else:
        raise InstallError(f"{folder}: source {manifest['source']!r} is not installed from files")
    return spec.model_copy(update={"version": str(version)})


def _job_record(job: JobSpec, override: Mapping[str, Any] | None = None) -> Any:
    from storage.models import ServiceJobBase

    extra = dict(job.extra)
    if override:
        extra[_OVERRIDE] = dict(override)
    if float(job.sort_position) != int(job.sort_position):
        extra["sortPosition"] = job.sort_position  # the column is an integer; keep the exact value
    return ServiceJobBase(
        job_name=job.job_name,
        worker=job.worker,
        callback=job.callback,
        depends_on=list(job.depends_on),
        priority=str(job.priority),
        priority_rank=job.priority_rank,
        timeout_seconds=math.ceil(job.timeout),
        params=job.params,
        sort_position=int(job.sort_position),
        description=job.description or "",
        channel=job.channel,
        disabled=job.disabled,
        retries=job.retries,
        retry_delay_seconds=math.ceil(job.retry_delay),
        level=job.level,
        extra=extra,
    )


def ensure_local(record: ServicePublic, services_dir: Path, store: ObjectStore) -> Path:
    """The local folder of an installed version, fetched from its bundle when missing.

    Raises
    ------
    InstallError
        When the folder is missing here and the bundle cannot be fetched.
    """
    folder = _version_dir(services_dir, record.name, record.version)
    if (folder / MANIFEST).is_file():
        return folder
    if record.install_path and (Path(record.install_path) / MANIFEST).is_file():
        return Path(record.install_path)
    if not record.bundle_key:
        raise InstallError(f"service {record.name!r} version {record.version} has no files here and no bundle")
    try:
        data = store.get(validate_key(record.bundle_key))
    except StorageError as exc:
        raise InstallError(f"service {record.name!r} version {record.version}: cannot fetch bundle: {exc}") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(staging, filter="data")  # refuses absolute paths and '..'
        staging.replace(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _entry_point_spec(record: ServicePublic, found: dict[str, ServiceSpec]) -> ServiceSpec:
    """The recorded entry-point service, as the installed distribution gives it now."""
    code = found.get(record.name)
    if code is None:
        raise InstallError(
            f"service {record.name!r} was registered from an entry point, but no installed distribution "
            f"advertises it now; install the distribution again or run `dcmflow services remove {record.name}`"
        )
    spec = _with_overrides(code, _recorded_overrides(record))
    if spec.content_hash != record.content_hash:
        raise InstallError(
            f"service {record.name!r}: the installed distribution ({spec.origin}) differs from recorded "
            f"version {record.version}; run `dcmflow services install --entry-points` to record it"
        )
    return spec.model_copy(update={"version": str(record.version)})


def installed_specs(
    repository: Repository, services_dir: Path, store: ObjectStore, *, skip: Collection[str] = ()
) -> list[ServiceSpec]:
    """Specs of every active installed service, except those named in ``skip``.

    Folder and Python services are loaded from their version folder (fetched from the
    bundle when missing here); entry-point services from the installed distribution, which
    must still have the recorded content.

    Raises
    ------
    InstallError
        Files or bundle missing, or an entry-point service is gone or changed since it was
        recorded.
    """
    records = [r for r in repository.list_services() if r.name not in skip]
    wanted = [r.name for r in records if r.source_kind == _SOURCE_KIND["entry_point"]]
    found = {s.name: s for s in load_entry_points(names=wanted)} if wanted else {}
    specs = []
    for record in records:
        if record.source_kind == _SOURCE_KIND["entry_point"]:
            specs.append(_entry_point_spec(record, found))
        else:
            specs.append(_load_version(ensure_local(record, services_dir, store), record.name, record.version))
    return specs


def installed_version(
    repository: Repository, services_dir: Path, store: ObjectStore, name: str, version: int
) -> ServiceSpec:
    """The spec of one recorded version of a service, on this machine.

    What a job dispatched to another machine runs: the version its session planned, even
    if a newer one was installed since. Folder and Python services come from the version
    folder here, fetched from the version's bundle in the object store when missing.

    Raises
    ------
    InstallError
        No such version recorded, or its files or bundle are missing.
    """
    record = repository.get_service(name, version)
    if record is None:
        raise InstallError(f"service {name!r} has no recorded version {version}")
    if record.source_kind == _SOURCE_KIND["entry_point"]:
        return _entry_point_spec(record, {s.name: s for s in load_entry_points(names=[name])})
    return _load_version(ensure_local(record, services_dir, store), record.name, record.version)


def install_entry_points(
    *, services_dir: Path, repository: Repository, store: ObjectStore, path: Sequence[str] | None = None
) -> list[InstallResult]:
    """Record every service advertised under ``dcmflow.services`` by installed distributions,
    except dcmflow's built-in ones (off until :func:`enable_service`).

    Nothing is copied to ``services_dir``: an installed distribution is importable by name in
    every process of this environment, and that is how callbacks and workers are found. The
    files of the package are still bundled in the object store (``services/<name>/<version>.tar.gz``)
    so that each recorded version can be inspected or restored. The same checks as
    :func:`install_service` run first, for all the advertised services together (duplicate
    ``jobName`` also across them and the other installed services), and nothing is
    recorded unless every one passes.

    Parameters
    ----------
    path
        Folders to look for ``*.dist-info`` in (default: ``sys.path``).

    Returns
    -------
    list[InstallResult]
        One per advertised service, sorted by name; ``changed`` is false for content
        recorded already (same distribution version and files).

    Raises
    ------
    ServiceValidationError
        A service fails a check, or its name belongs to a service installed from files.
    InstallError
        Recording or uploading failed.
    """
    specs = [s for s in load_entry_points(path) if not is_builtin(s)]
    if not specs:
        return []
    names = {s.name for s in specs}
    history = repository.list_services(include_inactive=True)
    for spec in specs:
        _refuse_files_service(spec, history)
    others = installed_specs(repository, services_dir, store, skip=names)
    validate_services(specs, installed=others)
    for spec in specs:
        check_service(spec, installed=others + [s for s in specs if s.name != spec.name])
    try:
        return [_record_entry_point(spec, history, repository, store) for spec in specs]
    except (OSError, StorageError) as exc:
        raise InstallError(f"cannot record entry-point services: {type(exc).__name__}: {exc}") from None


def _refuse_files_service(spec: ServiceSpec, history: Sequence[ServicePublic]) -> None:
    kinds = {r.source_kind for r in history if r.name == spec.name}
    if kinds - {_SOURCE_KIND["entry_point"]}:
        raise ServiceValidationError(
            spec.origin, None, f"service name {spec.name!r} is installed from files already; remove it first"
        )


def _carried_overrides(code: ServiceSpec, newest: ServicePublic | None, new: Overrides) -> dict[str, dict[str, Any]]:
    """The newest version's user params that ``code`` still has, updated with ``new``."""
    params = {j.job_name: (j.params or {}) for j in code.jobs}
    old = _recorded_overrides(newest) if newest is not None else {}
    merged: dict[str, dict[str, Any]] = {}
    for job, values in [*old.items(), *new.items()]:
        if job in params:
            merged.setdefault(job, {}).update({k: v for k, v in values.items() if k in params[job]})
    return merged


def _record_entry_point(
    code: ServiceSpec,
    history: Sequence[ServicePublic],
    repository: Repository,
    store: ObjectStore,
    new: Overrides | None = None,
) -> InstallResult:
    """Record ``code`` (with the user's params kept from the newest version, plus ``new``)."""
    versions = [r for r in history if r.name == code.name]
    newest = max(versions, key=lambda r: r.version) if versions else None
    overrides = _carried_overrides(code, newest, new or {})
    spec = _with_overrides(code, overrides)
    if newest is not None and newest.content_hash == spec.content_hash:
        record = _register(repository, spec, None, newest.bundle_key, overrides)
        return _result(spec, record, changed=False)
    version = (newest.version + 1) if newest else 1
    key = _bundle_entry_point(spec, version, store)
    record = _register(repository, spec, None, key, overrides)
    if record.version != version:
        raise InstallError(f"service {spec.name!r}: another install recorded version {record.version} meanwhile")
    return _result(spec, record, changed=True)


def available_services() -> list[ServiceSpec]:
    """Every service advertised under ``dcmflow.services`` here, built-in ones included."""
    return load_entry_points()


def _params_by_job(code: ServiceSpec, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``params`` set on every job of ``code`` that declares them; an unknown name is an error."""
    by_job: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        jobs = [j.job_name for j in code.jobs if j.params and key in j.params]
        if not jobs:
            known = sorted({k for j in code.jobs for k in (j.params or {})})
            raise ServiceValidationError(
                f"service {code.name!r}", f"param {key!r}", f"no such param; it has: {', '.join(known) or 'none'}"
            )
        for job in jobs:
            by_job.setdefault(job, {})[key] = value
    return by_job


def enable_service(
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    services_dir: Path,
    repository: Repository,
    store: ObjectStore,
) -> InstallResult:
    """Turn a service on: record an advertised one (built-in or third-party), or make the
    newest recorded version of a disabled one active again.

    Parameters
    ----------
    params
        Values for params the service's jobs declare (entry-point services only). They are
        kept for later versions until set again, and a change makes a new version.

    Raises
    ------
    ServiceNotFoundError
        Nothing advertised or recorded by that name.
    ServiceValidationError
        An unknown param, a failing check, or the name belongs to a service installed from files.
    InstallError
        Recording or uploading failed.
    """
    history = repository.list_services(include_inactive=True)
    mine = [r for r in history if r.name == name]
    found = load_entry_points(names=[name])
    if not found:
        if not mine:
            raise ServiceNotFoundError(name)
        if params:
            raise InstallError(f"service {name!r} is installed from files: change its params there and install it again")
        newest = max(mine, key=lambda r: r.version)
        record = repository.set_service_active(name, newest.version)
        assert record is not None
        return _result(_load_version(ensure_local(record, services_dir, store), name, record.version), record, changed=not newest.active)
    code = found[0]
    _refuse_files_service(code, history)
    new = _params_by_job(code, params or {})
    check_service(code, installed=installed_specs(repository, services_dir, store, skip={name}))
    try:
        return _record_entry_point(code, history, repository, store, new)
    except (OSError, StorageError) as exc:
        raise InstallError(f"cannot enable {name!r}: {type(exc).__name__}: {exc}") from None


def disable_service(name: str, *, repository: Repository) -> int:
    """Turn a service off: no version is active, so no new session plans its jobs. Records,
    files and bundles stay (sessions that planned it still finish; ``enable`` turns it back on).

    Returns
    -------
    int
        Versions that were active (0 when it was off already).

    Raises
    ------
    ServiceNotFoundError
        Nothing recorded by that name.
    ServiceValidationError
        An active service depends on one of its jobs.
    """
    if not any(r.name == name for r in repository.list_services(include_inactive=True)):
        raise ServiceNotFoundError(name)
    record = repository.get_service(name)
    if record is None:
        return 0
    _refuse_dependents(record, repository)
    repository.set_service_active(name, None)
    return 1


def _refuse_dependents(record: ServicePublic, repository: Repository) -> None:
    """Refuse to take ``record`` away while another active service's job depends on its jobs:
    in the seed that dependent would silently never be scheduled again."""
    own = {j.job_name for j in record.jobs}
    for other in repository.list_services():
        if other.name == record.name:
            continue
        for job in other.jobs:
            needed = own.intersection(job.depends_on)
            if needed:
                raise ServiceValidationError(
                    f"service {other.name!r}",
                    f"job {job.job_name!r}.dependsOn",
                    f"depends on {sorted(needed)[0]!r} of {record.name!r}; disable or remove {other.name!r} first",
                )


def _bundle_entry_point(spec: ServiceSpec, version: int, store: ObjectStore) -> str | None:
    """Store the files of the package holding ``spec``'s entry point; ``None`` if it has none."""
    assert spec.entry
    files = module_files(spec.entry.split(":", 1)[0])
    if files is None:
        return None
    with tempfile.TemporaryDirectory(prefix="dcmflow-ep-") as tmp:
        folder = Path(tmp)
        (folder / "python").mkdir()
        if files.is_dir():
            shutil.copytree(files, folder / "python" / files.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(files, folder / "python" / files.name)
        manifest = {"name": spec.name, "source": spec.source, "entry": spec.entry,
                    "content_hash": spec.content_hash, "origin": spec.origin}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        key = bundle_key(spec.name, version)
        store.put(key, _bundle(folder), content_type="application/gzip")
    return key


def install_service(
    spec: ServiceSpec, *, services_dir: Path, repository: Repository, store: ObjectStore
) -> InstallResult:
    """Validate ``spec`` against the installed services, then copy, record and bundle it.

    Parameters
    ----------
    spec
        A service from :func:`services_registry.load_service` (folder or Python).
    services_dir
        ``Settings.services_dir``.

    Returns
    -------
    InstallResult
        Version and whether anything changed.

    Raises
    ------
    ServiceValidationError
        The service fails a check (nothing is written).
    InstallError
        Copying, recording or uploading failed.
    """
    if spec.source == "entry_point":
        raise InstallError(f"{spec.origin}: entry-point services are installed with pip, not copied")
    others = installed_specs(repository, services_dir, store, skip={spec.name})
    check_service(spec, installed=others)
    try:
        history = [s for s in repository.list_services(include_inactive=True) if s.name == spec.name]
        newest = max(history, key=lambda s: s.version) if history else None
        if newest is not None and newest.content_hash == spec.content_hash:
            record = _register(repository, spec, newest.install_path, newest.bundle_key)
            ensure_local(record, services_dir, store)
            return _result(spec, record, changed=False)
        version = (newest.version + 1) if newest else 1
        target = _version_dir(services_dir, spec.name, version)
        if target.exists():
            shutil.rmtree(target)  # left over from an install that failed before recording
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=target.parent))
        try:
            shutil.rmtree(staging)
            _copy_service(spec, staging)
            staging.replace(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        key = bundle_key(spec.name, version)
        store.put(key, _bundle(target), content_type="application/gzip")
        record = _register(repository, spec, str(target.resolve()), key)
        if record.version != version:
            raise InstallError(f"service {spec.name!r}: another install recorded version {record.version} meanwhile")
        return _result(spec, record, changed=True)
    except (OSError, StorageError) as exc:
        raise InstallError(f"cannot install {spec.name!r}: {type(exc).__name__}: {exc}") from None


def _register(
    repository: Repository, spec: ServiceSpec, path: str | None, key: str | None, overrides: Overrides | None = None
) -> ServicePublic:
    from storage.models import ServiceBase

    service = ServiceBase(
        name=spec.name,
        content_hash=spec.content_hash,
        source_kind=_SOURCE_KIND[spec.source],
        install_path=path,
        bundle_key=key,
        summary=spec.description or "",
    )
    overrides = overrides or {}
    return repository.register_service(service, [_job_record(job, overrides.get(job.job_name)) for job in spec.jobs])


def _result(spec: ServiceSpec, record: ServicePublic, *, changed: bool) -> InstallResult:
    return InstallResult(
        name=record.name,
        version=record.version,
        changed=changed,
        content_hash=record.content_hash,
        source=spec.source,
        install_path=record.install_path,
        bundle_key=record.bundle_key,
        jobs=[j.job_name for j in spec.jobs],
        warnings=list(spec.warnings),
    )


def backup_service(
    name: str, destination: Path, *, services_dir: Path, repository: Repository, store: ObjectStore
) -> Path:
    """Copy the active version of ``name`` to ``destination/<name>/`` (seed: ``service.sh backup``).

    The copy is a service folder again (``registry/`` + ``module/``, or the Python module), so
    ``dcmflow services install destination/<name>`` restores it.

    Raises
    ------
    ServiceNotFoundError
        No installed service of that name.
    InstallError
        ``destination/<name>`` exists already, or copying failed.
    """
    record = repository.get_service(name)
    if record is None:
        raise ServiceNotFoundError(name)
    source = ensure_local(record, services_dir, store)
    target = destination / validate_name(name, "service name")
    if target.exists():
        raise InstallError(f"{target}: exists already; choose another backup folder")
    try:
        if (source / "python").is_dir():
            shutil.copytree(source / "python", target)
        else:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(MANIFEST, "__pycache__"))
    except OSError as exc:
        raise InstallError(f"cannot back up {name!r} to {target}: {exc}") from None
    return target


def remove_service(
    name: str,
    *,
    services_dir: Path,
    repository: Repository,
    store: ObjectStore,
    backup: Path | None = None,
) -> int:
    """Remove every version of ``name``: records, files and bundles (seed: ``service.sh remove``).

    Refused while a job of another installed service depends on one of its jobs: in the seed
    that dependent would silently never be scheduled again.

    Returns
    -------
    int
        Number of versions removed.

    Raises
    ------
    ServiceNotFoundError
        No installed service of that name.
    ServiceValidationError
        Another service depends on it.
    InstallError
        The backup or the deletion failed.
    """
    record = repository.get_service(name)
    if record is None:
        raise ServiceNotFoundError(name)
    _refuse_dependents(record, repository)
    if backup is not None:
        backup_service(name, backup, services_dir=services_dir, repository=repository, store=store)
    versions = repository.list_services(include_inactive=True)
    try:
        for version in versions:
            if version.name == name and version.bundle_key:
                try:
                    store.delete(version.bundle_key)
                except ObjectNotFoundError:
                    pass
        removed = repository.remove_service(name)
        shutil.rmtree(services_dir / validate_name(name, "service name"), ignore_errors=True)
    except StorageError as exc:
        raise InstallError(f"cannot remove {name!r}: {exc}") from None
    return removed
