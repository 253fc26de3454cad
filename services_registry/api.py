"""Register a service from Python: a typed builder with decorators.

Quick start::

    from services_registry import Service

    service = Service("series-summary", description="Summarise every CT/MR series")

    @service.job(name="summary", priority="default", timeout="5m", params={"out": "summaries"})
    def summarize(jobName, headers, params, added_params, **kwargs):
        ...  # runs in its own process, with DATA, MODULES and LOGS set

    @summarize.callback
    def accept(jobName, headers, params, added_params, **kwargs):
        return headers.get("Modality") in {"CT", "MR"}, {"modality": headers.get("Modality")}

The functions keep dcm-processor's calling convention (keyword arguments ``jobName, headers,
params, added_params``), so the same function can serve in a settings.json service. A job
without a callback is always selected (:func:`always`). The decorated names must be
module-level, because the worker is found again by its dotted name in a fresh process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from services_registry._defaults import DEFAULT_SORT_POSITION, DEFAULT_TIMEOUT
from services_registry._files import display_path, hash_files
from services_registry.errors import ServiceValidationError
from services_registry.loader import IsolatedImporter, plain_module_name

if TYPE_CHECKING:  # imported where used: a service module importing Service needs no pydantic
    from services_registry.spec import JobSpec, ServiceSpec

__all__ = ["Service", "Job", "always", "load_python"]

WorkerFunction = Callable[..., Any]
CallbackFunction = Callable[..., Any]


def always(**kwargs: Any) -> bool:
    """The callback of a job that names none: always schedule it."""
    return True


def _dotted(function: Callable[..., Any], what: str, location: str, job: str) -> str:
    """``package.module.function`` of a module-level function, mangling removed."""
    qualname = getattr(function, "__qualname__", "")
    module = getattr(function, "__module__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise ServiceValidationError(
            location, f"job {job!r}.{what}", f"{qualname or function!r} must be a module-level function of an importable module"
        )
    return f"{plain_module_name(module)}.{qualname}"


class Job:
    """A job declared with :meth:`Service.job`; calling it calls the worker.

    The decorator returns this object in place of the worker function, so the module
    attribute named after the function still resolves to something callable with the
    worker's keyword arguments (that is how the job's own process finds it).
    """

    def __init__(self, service: Service, worker: WorkerFunction, options: dict[str, Any]) -> None:
        self.service = service
        self.worker = worker
        self.options = options
        self.callback_function: CallbackFunction | None = options.pop("callback", None)
        self.name: str = options.pop("name", None) or worker.__name__
        self.__wrapped__ = worker
        self.__doc__ = worker.__doc__
        self.__name__ = worker.__name__
        self.__qualname__ = worker.__qualname__
        self.__module__ = worker.__module__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.worker(*args, **kwargs)

    def callback(self, function: CallbackFunction) -> CallbackFunction:
        """Decorator: use ``function`` as this job's callback; returns it unchanged."""
        self.callback_function = function
        return function

    def __repr__(self) -> str:
        return f"<Job {self.name!r} of service {self.service.name!r}>"


class Service:
    """A service built in Python; :meth:`to_spec` gives the same record a folder gives.

    Parameters
    ----------
    name
        Service name (letters, digits, ``._-``): the install folder and bundle key use it.
    description
        Shown by ``dcmflow services list``.
    """

    def __init__(self, name: str, *, description: str | None = None) -> None:
        self.name = name
        self.description = description
        self.jobs: list[Job] = []

    def job(
        self,
        name: str | None = None,
        *,
        callback: CallbackFunction | None = None,
        depends_on: str | Sequence[str] | None = None,
        priority: str | int = "default",
        timeout: float | str = DEFAULT_TIMEOUT,
        params: Mapping[str, Any] | None = None,
        sort_position: int | float = DEFAULT_SORT_POSITION,
        description: str | None = None,
        channel: str = "default",
        disabled: bool = False,
        retries: int = 0,
        retry_delay: float | str = 0,
        retry_on_timeout: bool = False,
        level: Literal["series", "study"] = "series",
    ) -> Callable[[WorkerFunction], Job]:
        """Decorator declaring the decorated function as the worker of a new job.

        Parameters are the settings.json fields in snake_case (see :class:`JobSpec`);
        ``name`` defaults to the function's name.

        Returns
        -------
        Callable
            A decorator returning the :class:`Job` (use ``@job.callback`` on the callback).
        """
        options: dict[str, Any] = {
            "name": name,
            "callback": callback,
            "depends_on": list(depends_on) if isinstance(depends_on, (list, tuple)) else depends_on,
            "priority": priority,
            "timeout": timeout,
            "params": dict(params) if params is not None else None,
            "sort_position": sort_position,
            "description": description,
            "channel": channel,
            "disabled": disabled,
            "retries": retries,
            "retry_delay": retry_delay,
            "retry_on_timeout": retry_on_timeout,
            "level": level,
        }

        def decorate(worker: WorkerFunction) -> Job:
            job = Job(self, worker, dict(options))
            self.jobs.append(job)
            return job

        return decorate

    def to_spec(
        self,
        *,
        source: Literal["python", "entry_point"],
        origin: str,
        content_hash: str,
        root: Path | None = None,
        entry: str | None = None,
        name: str | None = None,
    ) -> ServiceSpec:
        """The :class:`ServiceSpec` of this service.

        Raises
        ------
        ServiceValidationError
            Bad name, no jobs, a field failing :class:`JobSpec`, a duplicate job name or a
            function that is not module-level.
        """
        from services_registry.folder import validate_service_name
        from services_registry.spec import ServiceSpec, job_from_mapping

        service_name = validate_service_name(name or self.name, origin)
        if not self.jobs:
            raise ServiceValidationError(origin, None, f"service {service_name!r} declares no jobs")
        jobs: list[JobSpec] = []
        labels: list[str] = []
        warnings: list[str] = []
        for job in self.jobs:
            label = f"job {job.name!r}"
            if job.name in {j.job_name for j in jobs}:
                raise ServiceValidationError(origin, f"{label}.name", f"duplicate jobName {job.name!r}")
            callback = (
                _dotted(job.callback_function, "callback", origin, job.name)
                if job.callback_function is not None
                else f"{always.__module__}.{always.__qualname__}"
            )
            data = {
                **{k: v for k, v in job.options.items() if k not in {"name", "callback"}},
                "job_name": job.name,
                "worker": _dotted(job.worker, "worker", origin, job.name),
                "callback": callback,
            }
            spec = job_from_mapping(data, origin, label)
            warnings.extend(f"{origin}: {label}: {w}" for w in spec.warnings)
            jobs.append(spec)
            labels.append(label)
        return ServiceSpec(
            name=service_name,
            source=source,
            jobs=tuple(jobs),
            root=root,
            registry_dir=root,
            module_dir=root,
            origin=origin,
            job_locations=tuple(labels),
            entry=entry,
            content_hash=content_hash,
            description=self.description,
            warnings=tuple(warnings),
        )


def _find_service(namespace: Mapping[str, Any], attribute: str | None, location: str) -> tuple[str, Service]:
    if attribute is not None:
        found = namespace.get(attribute)
        if not isinstance(found, Service):
            raise ServiceValidationError(location, attribute, "is not a services_registry.Service")
        return attribute, found
    services = [(k, v) for k, v in namespace.items() if isinstance(v, Service)]
    if len(services) != 1:
        what = "no Service" if not services else f"{len(services)} Services ({', '.join(k for k, _ in services)})"
        raise ServiceValidationError(location, None, f"{what} at module level; name one as PATH:attribute")
    return services[0]


def load_python(path: Path, *, attribute: str | None = None, name: str | None = None) -> ServiceSpec:
    """Load a Python-API service from a ``.py`` file or a package folder.

    The module is imported under a private name (see :mod:`services_registry.loader`), so
    loading it leaves nothing importable by its plain name behind.

    Parameters
    ----------
    path
        ``my_service.py`` or ``my_service/`` (with ``__init__.py``).
    attribute
        Name of the :class:`Service` object when the module holds several.
    name
        Install name overriding the service's own.

    Raises
    ------
    ServiceValidationError
        When the module cannot be imported or holds no usable Service.
    """
    path = path.resolve()
    location = display_path(path)
    is_package = path.is_dir() and (path / "__init__.py").is_file()
    if not (is_package or (path.is_file() and path.suffix == ".py")):
        raise ServiceValidationError(location, None, "not a Python module or package")
    top = path.name if is_package else path.stem
    importer = IsolatedImporter(top, "python", {top: path})
    try:
        with importer.active():
            module = importer.import_module(top)
    except Exception as exc:  # the user's code: any failure is a validation error
        importer.close()
        raise ServiceValidationError(location, None, f"import failed: {type(exc).__name__}: {exc}") from None
    try:
        attr, service = _find_service(vars(module), attribute, location)
        return service.to_spec(
            source="python",
            origin=location,
            root=path.parent,
            entry=f"{top}:{attr}",
            content_hash=hash_files([("python", path)]),
            name=name,
        )
    finally:
        importer.close()
