"""A loaded service: its callbacks, callable in their own import context.

:class:`LoadedService` is what callback evaluation needs from a :class:`ServiceSpec`: the
callback functions (imported privately, see :mod:`services_registry.loader`) and a context
in which to call them, so a callback importing its own package at call time still gets its
own files. Workers are never imported here; :meth:`LoadedService.worker_problem` only checks
that a worker name resolves.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from services_registry.loader import IsolatedImporter, find_attribute, top_level_names
from services_registry.spec import JobSpec, ServiceSpec

__all__ = ["LoadedService", "loaded"]


def _python_tops(spec: ServiceSpec) -> dict[str, Path]:
    """The one top-level name of a Python-API service, from its ``entry``."""
    assert spec.entry and spec.registry_dir
    top = spec.entry.split(":", 1)[0].split(".", 1)[0]
    package = spec.registry_dir / top
    return {top: package if package.is_dir() else spec.registry_dir / f"{top}.py"}


class LoadedService:
    """Callbacks of one service, resolved in a private namespace.

    Parameters
    ----------
    spec
        The service; its ``registry_dir``/``module_dir`` say where the code is.
    """

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        if spec.source == "folder":
            assert spec.registry_dir and spec.module_dir
            self.callback_tops = top_level_names(spec.registry_dir, alias=spec.name)
            self.worker_tops = top_level_names(spec.module_dir, alias=spec.name)
            side = "registry"
        elif spec.source == "python":
            self.callback_tops = self.worker_tops = _python_tops(spec)
            side = "python"
        else:  # installed distribution: ordinary imports
            self.callback_tops = self.worker_tops = {}
            side = "python"
        self._importer = IsolatedImporter(spec.name, side, self.callback_tops) if self.callback_tops else None
        self._callbacks: dict[str, Callable[..., Any]] = {}

    def callback(self, job: JobSpec) -> Callable[..., Any]:
        """The callback function of ``job``, imported once.

        Raises
        ------
        ImportError, AttributeError, TypeError
            When the dotted name does not resolve to a callable.
        """
        dotted = job.callback
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

    def close(self) -> None:
        """Drop the privately imported modules."""
        if self._importer is not None:
            self._importer.close()


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
