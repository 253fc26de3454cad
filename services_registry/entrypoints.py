"""Services shipped in installed Python distributions (entry point group ``dcmflow.services``).

A distribution declares, in its ``pyproject.toml``::

    [project.entry-points."dcmflow.services"]
    series-summary = "my_package.services:service"

where the object is a :class:`services_registry.Service` (or a function returning one).
``dcmflow services install --entry-points`` records them (:func:`services_registry.install.install_entry_points`).
The code is imported the ordinary way: an installed distribution is importable by name in
every process of this environment, which is also how its workers are found again.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from importlib import metadata
from pathlib import Path

from services_registry._files import hash_files
from services_registry.api import Service
from services_registry.errors import ServiceValidationError
from services_registry.spec import ServiceSpec

__all__ = ["ENTRY_POINT_GROUP", "load_entry_points", "module_files"]

ENTRY_POINT_GROUP = "dcmflow.services"
"""The entry point group dcmflow reads services from."""


def module_files(module_name: str) -> Path | None:
    """Files of the top-level package (or module) holding ``module_name``, once imported."""
    for name in (module_name.split(".", 1)[0], module_name):
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file:
            path = Path(file)
            return path.parent if path.name == "__init__.py" else path
    return None


def load_entry_points(
    path: Sequence[str] | None = None, *, names: Collection[str] | None = None
) -> list[ServiceSpec]:
    """Every service advertised under :data:`ENTRY_POINT_GROUP`, sorted by name.

    The content hash covers the distribution's name and version, the entry point and the
    files of the top-level package it lives in: a new release makes a new service version.

    Parameters
    ----------
    path
        Folders to look for ``*.dist-info`` in (default: ``sys.path``), as
        :func:`importlib.metadata.distributions` takes them.
    names
        Load only the entry points of these names (others are not imported at all).

    Raises
    ------
    ServiceValidationError
        When an entry point cannot be loaded or does not give a :class:`Service`.
    """
    found = metadata.distributions(path=list(path)) if path is not None else metadata.distributions()
    wanted = set(names) if names is not None else None
    specs: dict[str, ServiceSpec] = {}
    seen: set[str] = set()
    for dist in found:
        key = f"{dist.name}=={dist.version}"
        if key in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(key)
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or (wanted is not None and ep.name not in wanted):
                continue
            location = f"entry point {ep.name} = {ep.value} ({dist.name} {dist.version})"
            try:
                obj = ep.load()
                if not isinstance(obj, Service) and callable(obj):
                    obj = obj()
            except Exception as exc:  # third-party code: report, in one line
                raise ServiceValidationError(location, None, f"cannot load: {type(exc).__name__}: {exc}") from None
            if not isinstance(obj, Service):
                raise ServiceValidationError(location, None, "does not give a services_registry.Service")
            files = module_files(ep.module)
            digest = hash_files([("module", files)] if files else [], salt=f"{dist.name}=={dist.version}\0{ep.value}")
            spec = obj.to_spec(
                source="entry_point", origin=location, entry=ep.value, content_hash=digest, name=ep.name
            )
            if spec.name in specs:
                raise ServiceValidationError(location, None, f"service name {spec.name!r} is advertised twice")
            specs[spec.name] = spec
    return [specs[k] for k in sorted(specs)]
