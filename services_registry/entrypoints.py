"""Services shipped in installed Python distributions (entry point group ``dcmflow.services``).

A distribution declares, in its ``pyproject.toml``::

    [project.entry-points."dcmflow.services"]
    series-summary = "my_package.services:service"

where the object is a :class:`services_registry.Service` (or a function returning one).
The code is imported the ordinary way: an installed distribution is importable by name in
every process of this environment, which is also how its workers are found again.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from services_registry._files import hash_files
from services_registry.api import Service
from services_registry.errors import ServiceValidationError
from services_registry.spec import ServiceSpec

__all__ = ["ENTRY_POINT_GROUP", "load_entry_points"]

ENTRY_POINT_GROUP = "dcmflow.services"
"""The entry point group dcmflow reads services from."""


def _module_files(module_name: str) -> Path | None:
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file)
    return path.parent if path.name == "__init__.py" else path


def load_entry_points(path: Sequence[str] | None = None) -> list[ServiceSpec]:
    """Every service advertised under :data:`ENTRY_POINT_GROUP`, sorted by name.

    Parameters
    ----------
    path
        Folders to look for ``*.dist-info`` in (default: ``sys.path``), as
        :func:`importlib.metadata.distributions` takes them.

    Raises
    ------
    ServiceValidationError
        When an entry point cannot be loaded or does not give a :class:`Service`.
    """
    found = metadata.distributions(path=list(path)) if path is not None else metadata.distributions()
    specs: dict[str, ServiceSpec] = {}
    for dist in found:
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
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
            files = _module_files(ep.module)
            digest = hash_files([("module", files)] if files else [], salt=f"{dist.name}=={dist.version}\0{ep.value}")
            spec = obj.to_spec(
                source="entry_point", origin=location, entry=ep.value, content_hash=digest, name=ep.name
            )
            if spec.name in specs:
                raise ServiceValidationError(location, None, f"service name {spec.name!r} is advertised twice")
            specs[spec.name] = spec
    return [specs[k] for k in sorted(specs)]
