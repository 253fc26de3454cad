"""Calling one callback exactly as dcm-processor's ``check_callbacks`` does, and what it decided.

Kept free of pydantic and of the specs: the callback process
(:mod:`services_registry._callback_host`) imports only this, the loader and
:mod:`services_registry.runtime`, so it starts in a fraction of the time the whole package takes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from services_registry.loader import strip_mangled
from services_registry.runtime import ServiceCallbacks

__all__ = ["RejectionKind", "CallbackOutcome", "interpret_result", "call_callback"]

RejectionKind = Literal[
    "callback_false", "callback_raised", "callback_timeout", "callback_crashed", "disabled", "dependency"
]


@dataclass(frozen=True)
class CallbackOutcome:
    """What one callback decided: scheduled with ``params``, or not, with the kind and reason.

    Also the reply of the callback process, so it stays JSON (:meth:`to_json`). ``error``
    keeps the raw message of a callback that raised, for the seed's log line.
    """

    scheduled: bool
    params: dict[str, Any] = field(default_factory=dict)
    kind: RejectionKind | None = None
    reason: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The outcome as a JSON object (``params`` as the callback returned them)."""
        return asdict(self)


def interpret_result(result: Any) -> tuple[bool, dict[str, Any], Any]:
    """Read a callback's return value the way the seed's ``check_callbacks`` does.

    Returns
    -------
    tuple
        ``(scheduled, params, raw result)``.

    Raises
    ------
    IndexError
        For an empty list or tuple (the seed's ``r[0]`` fails there too).
    """
    if isinstance(result, (list, tuple)):
        value = result[0]
        params = result[1] if len(result) > 1 and isinstance(result[1], dict) else {}
    else:
        value, params = result, {}
    return bool(value), params, value


def call_callback(
    service: ServiceCallbacks,
    job_name: str,
    callback: str,
    params: dict[str, Any] | None,
    headers: dict[str, Any],
    added_params: dict[str, Any],
) -> CallbackOutcome:
    """Call the ``callback`` of job ``job_name`` in this process, as the seed does.

    ``headers`` and ``added_params`` are handed over as they are (shared objects: a callback
    may change them); ``params`` (the job's) is copied.
    """
    try:
        function = service.resolve(callback)
        with service.context():
            raw = function(jobName=job_name, headers=headers, params=copy.deepcopy(params), added_params=added_params)
        scheduled, returned, value = interpret_result(raw)
    except Exception as exc:  # a service's bug must not stop the others (seed behaviour)
        return CallbackOutcome(
            scheduled=False,
            kind="callback_raised",
            reason=f"callback raised {type(exc).__name__}: {strip_mangled(str(exc))}",
            error=str(exc),
        )
    if scheduled:
        return CallbackOutcome(scheduled=True, params=returned)
    why = returned.get("reason") if isinstance(returned.get("reason"), str) else None
    return CallbackOutcome(
        scheduled=False, kind="callback_false", reason=f"callback returned {value!r}" + (f": {why}" if why else "")
    )
