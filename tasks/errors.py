"""Exceptions raised by :mod:`tasks`.

Every message is one line a person can act on, so the CLI prints ``str(exc)`` and nothing else.

::

    TaskError                  base of everything below; the CLI catches this
    ├── SeriesNotFoundError    no received series/study with that UID, or no stored instances
    ├── JobFailedError         a job's process exited non-zero or was killed by a signal
    │   └── JobTimedOutError   a job ran past its timeout; its process group was killed
    ├── EnvironmentBuildError  a service's virtual environment could not be built
    ├── SendError              an output could not be sent to a DICOM peer (after retries)
    └── WebhookError           a study card could not be POSTed to the study webhook
"""

from __future__ import annotations

__all__ = [
    "TaskError",
    "SeriesNotFoundError",
    "JobFailedError",
    "JobTimedOutError",
    "EnvironmentBuildError",
    "SendError",
    "WebhookError",
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


class JobTimedOutError(JobFailedError):
    """A job ran past its timeout and its whole process group was killed."""


class EnvironmentBuildError(TaskError):
    """A service's virtual environment (``module/requirements.txt``) could not be built."""


class SendError(TaskError):
    """An output could not be sent to a DICOM peer, after every retry."""


class WebhookError(TaskError):
    """The study card could not be POSTed to the webhook (``retryable``: worth another try)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
