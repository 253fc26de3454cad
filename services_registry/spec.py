"""The job and service specification, in dcm-processor's words at the boundary.

A job reads exactly as an entry of a dcm-processor ``registry/settings.json`` (camelCase:
``jobName``, ``dependsOn``, ``sortPosition`` …); inside dcmflow the same values are snake_case
attributes (``job.job_name``). Both spellings are accepted on input; :meth:`JobSpec.to_settings`
gives the camelCase form back.

Priority
--------
dcm-processor G0 used ``priority`` as the RQ queue name and its workers served the queues
``default``, ``medium``, ``low`` in that order (reference §2.5); G1/G2 ignore it. dcmflow
honours it with **one ordering rank, higher runs first** (as mongo-qas dequeues, reference
§2.5). The rule is :func:`storage.priority.priority_rank`, the same one that fills the
``priority_rank`` columns, so records and plans sort the same way:

=========  ====
name       rank
=========  ====
``high``     40
``default``  30
``medium``   20
``low``      10
=========  ====

An integer priority *is* its rank, on the same scale (``35``, or ``"35"``, runs after ``high``
and before ``default``). Unknown names are rejected: in G0 they silently created a queue no
worker read.
The planner's ready order is (rank descending, sortPosition, jobName), see
:mod:`services_registry.dag`.

Timeouts
--------
A number of seconds, a digit string (RQ accepted ``"3600"``), or mongo-qas's
``NwNdNhNmNs`` string (``"1h"``, ``"30m"``, ``"1h30m"``, ``"90s"``); default ``"1h"``
(reference §2.6). ``retryDelay`` takes the same forms. A job that runs past its timeout is
killed and **not retried** (RQ failed it for good, reference §2.6), whatever ``retries`` says,
unless it sets ``retryOnTimeout: true``; ``retries`` is for failures.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from services_registry._defaults import DEFAULT_SORT_POSITION, DEFAULT_TIMEOUT
from services_registry.errors import ServiceValidationError
from storage.priority import DEFAULT_PRIORITY, PRIORITY_RANKS, priority_rank

__all__ = [
    "PRIORITY_RANKS",
    "DEFAULT_PRIORITY",
    "DEFAULT_TIMEOUT",
    "DEFAULT_SORT_POSITION",
    "JobSpec",
    "ServiceSpec",
    "parse_duration",
    "priority_rank",
    "job_from_mapping",
]

# mongo-qas misc.parse_time_to_seconds: (\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?
_RE_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNIT_SECONDS = (7 * 86400, 86400, 3600, 60, 1)
# A dotted "full function name": package[.module...].function (hyphens allowed, the seed's
# ms-sub service uses one and importlib accepts it).
_RE_DOTTED = re.compile(r"^[A-Za-z_][\w\-]*(\.[A-Za-z_][\w\-]*)+$")


def parse_duration(value: object) -> float:
    """Seconds from a number, a digit string, or an ``NwNdNhNmNs`` string.

    Parameters
    ----------
    value
        ``3600``, ``90.5``, ``"3600"``, ``"1h"``, ``"1h30m"``, ``"90s"``, ``"2d"`` …

    Returns
    -------
    float
        The duration in seconds, always > 0.

    Raises
    ------
    ValueError
        ``bad duration '1x'`` for anything else (booleans, empty strings, zero, negatives).
    """
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            seconds = float(text)
        else:
            match = _RE_DURATION.fullmatch(text)
            if not text or match is None:
                raise ValueError(f"bad duration {value!r} (seconds, or like '1h', '30m', '1h30m', '90s')")
            seconds = float(sum(int(g) * s for g, s in zip(match.groups(), _UNIT_SECONDS) if g))
    else:
        raise ValueError(f"bad duration {value!r}")
    if seconds <= 0:
        raise ValueError(f"bad duration {value!r} (must be more than zero)")
    return seconds


class JobSpec(BaseModel):
    """One job of a service: a settings.json entry, validated.

    ``jobName``, ``worker`` and ``callback`` are required, as the seed requires all three
    before it accepts an entry. Unknown fields are kept in :attr:`extra` (and reported by
    :attr:`warnings`) so a service written for a later dcm-processor still loads.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )

    job_name: str = Field(min_length=1, description="Unique name; the key of added_params.")
    worker: str = Field(description="Dotted name of the worker function, resolved under module/.")
    callback: str = Field(description="Dotted name of the callback, resolved under registry/.")
    depends_on: tuple[str, ...] = Field((), description="Jobs that must finish first.")
    priority: str | int = Field(DEFAULT_PRIORITY, description="high/default/medium/low or a rank.")
    timeout: float = Field(DEFAULT_TIMEOUT, description="Seconds before the job is killed.")
    params: dict[str, Any] | None = Field(None, description="Given to callback and worker; None if absent.")
    sort_position: int | float = Field(DEFAULT_SORT_POSITION, description="Callback order, ascending.")
    description: str | None = None
    channel: str = Field("default", description="Worker pool (G1 mongo-qas channel).")
    disabled: bool = Field(False, description="Skipped entirely when true (G1).")
    retries: int = Field(0, ge=0, description="Extra attempts after a failure (dcmflow).")
    retry_delay: float = Field(0.0, ge=0, description="Seconds between attempts (dcmflow).")
    retry_on_timeout: bool = Field(
        False, description="Retry a job that timed out too (dcmflow); else a timeout is final, as in RQ."
    )
    level: Literal["series", "study"] = Field("series", description="Runs once per series or per study.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Unknown fields, kept verbatim.")

    @model_validator(mode="before")
    @classmethod
    def _keep_unknown(cls, data: Any) -> Any:
        """Move unknown keys into ``extra`` instead of failing (the issue: "kept and reported")."""
        if not isinstance(data, dict):
            raise ValueError("a job must be a JSON object")
        known: set[str] = set()
        for name, field in cls.model_fields.items():
            known.add(name)
            known.add(field.alias or name)
        kept = {k: v for k, v in data.items() if k in known and k != "extra"}
        unknown = {k: v for k, v in data.items() if k not in known or k == "extra"}
        if unknown:
            kept["extra"] = {**unknown}
        return kept

    @field_validator("worker", "callback")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not _RE_DOTTED.fullmatch(value):
            raise ValueError(f"{value!r} is not a dotted name like 'package.function'")
        return value

    @field_validator("depends_on", mode="before")
    @classmethod
    def _depends_on(cls, value: Any) -> tuple[str, ...]:
        """``null`` → (), ``"a"`` → ("a",), ``["a", "b"]`` → ("a", "b"), duplicates dropped."""
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
            return tuple(dict.fromkeys(value))
        raise ValueError(f"must be a job name, a list of job names or null, not {value!r}")

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> str | int:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"bad priority {value!r}")
        priority_rank(value)
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("timeout", "retry_delay", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        if value == 0 and not isinstance(value, bool):
            return 0.0  # only reachable for retryDelay: timeout 0 is caught by gt below
        return parse_duration(value)

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("bad duration 0 (must be more than zero)")
        return value

    @property
    def priority_rank(self) -> int:
        """Ordering rank of :attr:`priority`; higher runs first."""
        return priority_rank(self.priority)

    @property
    def warnings(self) -> tuple[str, ...]:
        """One message per unknown field kept in :attr:`extra`."""
        return tuple(f"unknown field {key!r} kept" for key in self.extra)

    def to_settings(self) -> dict[str, Any]:
        """The camelCase settings.json form, unknown fields merged back."""
        data = self.model_dump(by_alias=True, exclude={"extra"}, mode="json")
        data["dependsOn"] = list(self.depends_on) or None
        return {**data, **self.extra}


class ServiceSpec(BaseModel):
    """One service: its jobs and where its code lives, whichever way it was registered.

    ``source`` is ``"folder"`` (a dcm-processor ``registry/`` + ``module/`` folder),
    ``"python"`` (a :class:`services_registry.Service` in a user's module or package) or
    ``"entry_point"`` (an installed distribution's ``dcmflow.services`` entry point).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    source: Literal["folder", "python", "entry_point"]
    jobs: tuple[JobSpec, ...]
    root: Path | None = Field(None, description="The service's folder, or the module's import root.")
    registry_dir: Path | None = Field(None, description="Import root of callbacks (folder: registry/).")
    module_dir: Path | None = Field(None, description="Import root of workers (folder: module/).")
    origin: str = Field(description="File or object the jobs came from, for messages.")
    job_locations: tuple[str, ...] = Field((), description="Per job: 'jobs[2]', '' or \"job 'x'\".")
    entry: str | None = Field(None, description="'module:attribute' of a Python service.")
    content_hash: str = Field(description="sha256 of the service's files; a change = a new version.")
    version: str | None = None
    description: str | None = None
    warnings: tuple[str, ...] = ()

    def job_field(self, index: int, field: str | None = None) -> str | None:
        """``jobs[2].timeout``-style field path of job ``index`` (for error messages)."""
        where = self.job_locations[index] if index < len(self.job_locations) else f"jobs[{index}]"
        parts = [p for p in (where, field) if p]
        return ".".join(parts) if parts else None


def job_from_mapping(data: Any, location: str, where: str | None) -> JobSpec:
    """Validate one settings entry, turning pydantic's report into one line.

    Parameters
    ----------
    data
        The entry as read from JSON (camelCase) or given by the Python API (snake_case).
    location
        File or object for the message (``registry/settings.json``).
    where
        The entry inside it (``jobs[2]``), or ``None`` for a single-object file.

    Raises
    ------
    ServiceValidationError
        ``registry/settings.json: jobs[2].timeout: bad duration '1x'`` for the first problem
        (and how many more there are).
    """
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        field = ".".join(str(p) for p in first["loc"] if p != "__root__")
        if first["type"] == "missing":
            message = "required field missing"
        else:
            message = str(first["msg"]).removeprefix("Value error, ")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        path = ".".join(p for p in (where, field) if p) or None
        raise ServiceValidationError(location, path, message) from None
