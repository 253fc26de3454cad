"""Exceptions raised by :mod:`tasks`.

Every message is one line a person can act on, so the CLI prints ``str(exc)`` and nothing else.

::

    TaskError                  base of everything below; the CLI catches this
    ├── SeriesNotFoundError    no received series/study with that UID, or no stored instances
    ├── JobFailedError         a job's process exited non-zero or was killed by a signal
    ├── JobTimedOutError       a job ran past its timeout; its process group was killed
    │                          (final unless the job asked ``retryOnTimeout``: ``retryable``)
    ├── EnvironmentBuildError  a service's virtual environment could not be built
    ├── SendError              an output could not be sent to a DICOM peer (after retries)
    └── WebhookError           a study card could not be POSTed to the study webhook
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TaskError",
    "SeriesNotFoundError",
    "JobFailedError",
    "JobTimedOutError",
    "EnvironmentBuildError",
    "SendError",
    "WebhookError",
    "retry_unless_final",
]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class TaskError(Exception):
    """Base class of all task errors."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class SeriesNotFoundError(TaskError):
    """No received series (or study) with that UID, or it has no stored instances."""


class JobFailedError(TaskError):
    """A job's process exited with a non-zero code or was killed by a signal."""


class JobTimedOutError(TaskError):
    """A job ran past its timeout and its whole process group was killed.

    Not a :class:`JobFailedError`: Prefect retries failures (the job's ``retries``), but a
    timeout is final, as RQ treated it, unless the job set ``retryOnTimeout``
    (``retryable``).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class EnvironmentBuildError(TaskError):
    """A service's virtual environment (``module/requirements.txt``) could not be built."""


class SendError(TaskError):
    """An output could not be sent to a DICOM peer, after every retry."""


class WebhookError(TaskError):
    """The study card could not be POSTed to the webhook (``retryable``: worth another try)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def retry_unless_final(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn`` of the job tasks: a failure is retried (up to the job's
    ``retries``), a timeout only when it is ``retryable``."""
    error = getattr(state, "data", None)
    return not isinstance(error, JobTimedOutError) or error.retryable
