"""One entry for every way of naming a service: a folder, a Python file or package.

``load_service`` reads and validates the definition alone; ``check_service`` adds what needs
the other installed services (names, dependencies, cycles) and the code (callbacks import,
workers resolve). Installing runs both, so a bad service never reaches the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from services_registry._files import display_path
from services_registry.api import load_python
from services_registry.errors import ServiceValidationError
from services_registry.folder import is_service_folder, load_folder
from services_registry.runtime import LoadedService
from services_registry.spec import ServiceSpec
from services_registry.validate import check_resolvable, validate_services

__all__ = ["load_service", "check_service"]


def load_service(target: str | Path, *, name: str | None = None) -> ServiceSpec:
    """Read the service at ``target``.

    Parameters
    ----------
    target
        A dcm-processor service folder (``registry/settings.json`` inside), a ``.py`` file or
        a package folder using :class:`services_registry.Service`, optionally followed by
        ``:attribute`` to pick one Service object of a module.
    name
        Install name (default: the folder name, or the Service's own name).

    Raises
    ------
    ServiceValidationError
        When ``target`` is none of those or its definition is invalid.
    """
    text = str(target)
    attribute: str | None = None
    path = Path(text)
    if not path.exists() and ":" in text:
        head, _, attribute = text.rpartition(":")
        path = Path(head)
    if not path.exists():
        raise ServiceValidationError(display_path(path), None, "no such file or folder")
    if path.is_dir() and is_service_folder(path):
        if attribute:
            raise ServiceValidationError(display_path(path), None, "':attribute' applies to Python services only")
        return load_folder(path, name=name)
    if (path.is_dir() and (path / "__init__.py").is_file()) or path.suffix == ".py":
        return load_python(path, attribute=attribute, name=name)
    raise ServiceValidationError(
        display_path(path), None, "not a service (no registry/settings.json, not a .py file or package)"
    )


def check_service(spec: ServiceSpec, *, installed: Sequence[ServiceSpec] = ()) -> None:
    """Everything install checks beyond the file format.

    Raises
    ------
    ServiceValidationError
        Duplicate job names (also across ``installed``), unknown ``dependsOn``, cycles,
        callbacks that do not import, workers that do not resolve.
    """
    validate_services([spec], installed=installed)
    service = LoadedService(spec)
    try:
        check_resolvable(service)
    finally:
        service.close()
