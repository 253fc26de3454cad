"""A loaded service: its callbacks, callable in their own import context.

:class:`LoadedService` is what callback evaluation needs from a :class:`ServiceSpec`: the
callback functions (imported privately, see :mod:`services_registry.loader`) and a context
in which to call them, so a callback importing its own package at call time still gets its
own files. Workers are never imported here; :meth:`LoadedService.worker_problem` only checks
that a worker name resolves.

The callback part, :class:`ServiceCallbacks`, needs only where the code is
(:class:`ServiceCode`), not the pydantic spec: the callback process
(:mod:`services_registry._callback_host`) uses it without importing pydantic.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services_registry.loader import IsolatedImporter, find_attribute, top_level_names

if TYPE_CHECKING:
    from services_registry.spec import JobSpec, ServiceSpec

__all__ = ["ServiceCode", "ServiceCallbacks", "LoadedService", "loaded"]


@dataclass(frozen=True)
class ServiceCode:
    """Where a service's code is: the fields of :class:`ServiceSpec` that importing it needs."""

    name: str
    source: str
    registry_dir: Path | None
    module_dir: Path | None
    entry: str | None

    @classmethod
    def of(cls, spec: ServiceSpec) -> ServiceCode:
        """The code location of ``spec``."""
        return cls(spec.name, spec.source, spec.registry_dir, spec.module_dir, spec.entry)


def _python_tops(code: ServiceCode) -> dict[str, Path]:
    """The one top-level name of a Python-API service, from its ``entry``."""
    assert code.entry and code.registry_dir
    top = code.entry.split(":", 1)[0].split(".", 1)[0]
    package = code.registry_dir / top
    return {top: package if package.is_dir() else code.registry_dir / f"{top}.py"}


class ServiceCallbacks:
    """Callbacks of one service, resolved in a private namespace.

    Parameters
    ----------
    code
        Where the service's code is (``registry_dir``/``module_dir``).
    """

    def __init__(self, code: ServiceCode) -> None:
        self.code = code
        if code.source == "folder":
            assert code.registry_dir and code.module_dir
            self.callback_tops = top_level_names(code.registry_dir, alias=code.name)
            self.worker_tops = top_level_names(code.module_dir, alias=code.name)
            side = "registry"
        elif code.source == "python":
            self.callback_tops = self.worker_tops = _python_tops(code)
            side = "python"
        else:  # installed distribution: ordinary imports
            self.callback_tops = self.worker_tops = {}
            side = "python"
        self._importer = IsolatedImporter(code.name, side, self.callback_tops) if self.callback_tops else None
        self._callbacks: dict[str, Callable[..., Any]] = {}

    def resolve(self, dotted: str) -> Callable[..., Any]:
        """The callback function named ``dotted``, imported once.

        Raises
        ------
        ImportError, AttributeError, TypeError
            When the dotted name does not resolve to a callable.
        """
        if dotted not in self._callbacks:
            top = dotted.split(".", 1)[0]
            if self._importer is not None and top in self.callback_tops:
                self._callbacks[dotted] = self._importer.resolve(dotted)
            else:  # the seed appended $REGISTRY to PYTHONPATH: installed packages resolve too
                module_name, attribute = dotted.rsplit(".", 1)
                target = getattr(importlib.import_module(module_name), attribute)
                if not callable(target):
                    raise TypeError(f"{dotted!r} is not callable")
                self._callbacks[dotted] = target
        return self._callbacks[dotted]

    def context(self) -> Any:
        """Context manager to call this service's callbacks in (plain names → its files)."""
        return self._importer.active() if self._importer is not None else nullcontext()

    def close(self) -> None:
        """Drop the privately imported modules."""
        if self._importer is not None:
            self._importer.close()


class LoadedService(ServiceCallbacks):
    """A service's callbacks, and checks of its workers, from its :class:`ServiceSpec`.

    Parameters
    ----------
    spec
        The service; its ``registry_dir``/``module_dir`` say where the code is.
    """

    def __init__(self, spec: ServiceSpec) -> None:
        super().__init__(ServiceCode.of(spec))
        self.spec = spec

    def callback(self, job: JobSpec) -> Callable[..., Any]:
        """The callback function of ``job``, imported once (see :meth:`resolve`)."""
        return self.resolve(job.callback)

    def worker_problem(self, job: JobSpec) -> str | None:
        """Why ``job.worker`` does not resolve, or ``None`` when it does (nothing imported)."""
        top = job.worker.split(".", 1)[0]
        if top in self.worker_tops:
            return find_attribute(job.worker, self.worker_tops)
        if self.spec.source == "entry_point":
            module_name, attribute = job.worker.rsplit(".", 1)
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                return f"cannot import {module_name!r}: {exc}"
            return None if callable(getattr(module, attribute, None)) else f"{module_name!r} has no callable {attribute!r}"
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            found = None
        if found is None:
            where = "module/" if self.spec.source == "folder" else "the service"
            names = ", ".join(sorted(self.worker_tops)) or "none"
            return f"no package {top!r} in {where} (found: {names}) nor installed"
        return None


@contextmanager
def loaded(specs: Mapping[str, ServiceSpec] | list[ServiceSpec]) -> Iterator[list[LoadedService]]:
    """Load several services for one evaluation and drop their modules afterwards."""
    items = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    services = [LoadedService(spec) for spec in items]
    try:
        yield services
    finally:
        for service in services:
            service.close()
