"""Exceptions raised by :mod:`services_registry`.

Every message is one line a person can act on: it names the file (or Python object) and the
field, so the CLI prints ``str(exc)`` and nothing else.

::

    RegistryError                    base of everything below; the CLI catches this
    ├── ServiceValidationError       a service definition is wrong (file + field + reason)
    │   └── CycleError               dependsOn forms a cycle, named ``a -> b -> c -> a``
    ├── ServiceNotFoundError         no installed service of that name
    ├── PlanError                    a DAG was asked for jobs whose dependencies are missing
    └── InstallError                 copying, recording or bundling an installed service failed
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "RegistryError",
    "ServiceValidationError",
    "CycleError",
    "ServiceNotFoundError",
    "PlanError",
    "InstallError",
]


def _one_line(text: str) -> str:
    """Collapse whitespace so a message can never spill onto a second line."""
    return " ".join(str(text).split())


class RegistryError(Exception):
    """Base class of all service registry errors."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class ServiceValidationError(RegistryError):
    """A service definition failed validation; nothing was installed.

    Parameters
    ----------
    location
        The file (``registry/settings.json``) or Python object the problem is in.
    field
        Where inside it (``jobs[2].timeout``); ``None`` when the whole location is wrong.
    message
        What is wrong, e.g. ``bad duration '1x'``.
    """

    def __init__(self, location: str, field: str | None, message: str) -> None:
        self.location = location
        self.field = field
        self.reason = _one_line(message)
        parts = [location] + ([field] if field else []) + [self.reason]
        super().__init__(": ".join(parts))


class CycleError(ServiceValidationError):
    """``dependsOn`` links form a cycle; ``cycle`` lists it with the first name repeated last."""

    def __init__(self, location: str, field: str | None, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__(location, field, "dependency cycle " + " -> ".join(self.cycle))


class ServiceNotFoundError(RegistryError):
    """No installed service has that name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no installed service named {name!r}")


class PlanError(RegistryError):
    """Planning was asked for a job whose dependency is not among the planned jobs."""


class InstallError(RegistryError):
    """Installing, removing or backing up a service failed (files, records or objects)."""
