"""Load a dcm-processor service folder (``registry/`` + ``module/``), used unchanged.

Layout (reference §1.1)::

    my_service/
      registry/settings.json   one job object, or an array of them
      registry/...             the callback package (``registry/__init__.py`` *is* package
                               ``<install name>``, or packages inside ``registry/``)
      module/...               the worker package, same rules; optional requirements.txt
                               and script.sh (run by the seed's G0 worker at start-up)

Only the file format is read here; names are checked by :mod:`services_registry.validate`.
"""

from __future__ import annotations

import json
from pathlib import Path

from storage.keys import is_valid_name

from services_registry._files import display_path, hash_files
from services_registry.errors import ServiceValidationError
from services_registry.spec import JobSpec, ServiceSpec, job_from_mapping

__all__ = ["SETTINGS_FILE", "is_service_folder", "load_folder", "validate_service_name"]

SETTINGS_FILE = "registry/settings.json"
"""Where a service folder declares its jobs, relative to the folder."""


def is_service_folder(path: Path) -> bool:
    """True when ``path`` is a folder with ``registry/settings.json``."""
    return (path / SETTINGS_FILE).is_file()


def validate_service_name(name: str, location: str) -> str:
    """Return ``name`` if it can be a folder name and an object-key segment.

    Raises
    ------
    ServiceValidationError
        For anything but letters, digits, ``.``, ``_`` and ``-`` (not starting with ``.``).
    """
    if not is_valid_name(name):
        raise ServiceValidationError(
            location, "name", f"bad service name {name!r} (letters, digits, '.', '_' and '-' only)"
        )
    return name


def load_folder(path: Path, name: str | None = None) -> ServiceSpec:
    """Read a dcm-processor service folder into a :class:`ServiceSpec`.

    Parameters
    ----------
    path
        The service's parent folder (holding ``registry/`` and ``module/``).
    name
        Install name; defaults to the folder's name. In the seed the folders are copied to
        ``$REGISTRY/<name>`` and ``$MODULES/<name>``, so dotted names may start with it.

    Returns
    -------
    ServiceSpec
        ``source="folder"``, jobs in file order, hash over ``registry/`` and ``module/``.

    Raises
    ------
    ServiceValidationError
        Not a service folder, unreadable JSON, an entry failing :class:`JobSpec`, no jobs, or
        the same ``jobName`` twice in the file.
    """
    root = path.resolve()
    settings = root / SETTINGS_FILE
    location = display_path(settings)
    if not settings.is_file():
        raise ServiceValidationError(
            display_path(path), None, f"not a dcm-processor service folder (no {SETTINGS_FILE})"
        )
    service_name = validate_service_name(name or root.name, location)
    try:
        raw = json.loads(settings.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ServiceValidationError(location, f"line {exc.lineno}", f"invalid JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceValidationError(location, None, f"cannot read: {exc}") from None

    entries = raw if isinstance(raw, list) else [raw]
    labels = [f"jobs[{i}]" for i in range(len(entries))] if isinstance(raw, list) else [""]
    if not entries:
        raise ServiceValidationError(location, None, "no jobs (the array is empty)")
    jobs: list[JobSpec] = []
    seen: dict[str, str] = {}
    warnings: list[str] = []
    for entry, label in zip(entries, labels):
        job = job_from_mapping(entry, location, label or None)
        if job.job_name in seen:
            raise ServiceValidationError(
                location,
                ".".join(p for p in (label, "jobName") if p),
                f"duplicate jobName {job.job_name!r} (also {seen[job.job_name] or 'the file'})",
            )
        seen[job.job_name] = label
        warnings.extend(f"{location}: {label + ': ' if label else ''}{w}" for w in job.warnings)
        jobs.append(job)

    registry_dir, module_dir = root / "registry", root / "module"
    return ServiceSpec(
        name=service_name,
        source="folder",
        jobs=tuple(jobs),
        root=root,
        registry_dir=registry_dir,
        module_dir=module_dir,
        origin=location,
        job_locations=tuple(labels),
        content_hash=hash_files([("registry", registry_dir), ("module", module_dir)]),
        description=jobs[0].description if len(jobs) == 1 else None,
        warnings=tuple(warnings),
    )
