"""Callback processes of one evaluation, seen from the parent: start, call with a timeout, kill.

One child per service environment (its interpreter), started at the first callback that needs
it and reused for the rest of the series; see :mod:`services_registry._callback_host` for the
child and its JSON-lines protocol. The child runs in a session of its own, so a callback that
started processes of its own dies with it when its time is up.

A child that does not answer within the timeout is killed and its callback rejected as
``callback_timeout``; one that exits (``os._exit``, a segfault, ``sys.exit``) rejects its
callback as ``callback_crashed`` with the exit code or signal. Either way the next callback of
that environment gets a fresh child (it sees the series' headers as sent, not as the dead
child's callbacks left them).

A plain :mod:`subprocess` over pipes and :mod:`selectors` for the deadline: the interpreter is
per environment (``multiprocessing`` sets one executable for the whole program), and a hung
child must be killable, which ``concurrent.futures`` pools do not offer.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from services_registry._calling import CallbackOutcome, RejectionKind
from services_registry.runtime import ServiceCode
from services_registry.spec import JobSpec, ServiceSpec

__all__ = ["CallbackProcesses", "STARTUP_TIMEOUT"]

STARTUP_TIMEOUT = 60.0
"""Seconds a child may take to start (about 0.1 s; generous for a loaded machine or a cold disk)."""

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""Folder holding the ``services_registry`` package, for children in a service's venv."""


class _Died(Exception):
    """The child exited, or closed its end of the pipe."""


class _Child:
    """One running callback process."""

    def __init__(self, python: str) -> None:
        env = dict(os.environ)
        if os.path.abspath(python) == os.path.abspath(sys.executable):
            # The same interpreter imports what this process imports (installed distributions
            # put on sys.path at run time included), as if the callbacks ran here.
            paths = [p for p in sys.path if p]
        else:  # a service's venv: its own packages, and ours from the project (as the job runner)
            paths = [str(_PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.process = subprocess.Popen(
            [python, "-m", "services_registry._callback_host"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin = self.process.stdin
        self._fd = self.process.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buffer = b""
        self.ready = False

    def start(self, headers: dict[str, Any]) -> None:
        """Wait for the child's ``ready`` and hand it the series' headers."""
        self._receive(time.monotonic() + STARTUP_TIMEOUT)
        self.ready = True
        self._send({"headers": headers})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            # default=str: headers and a job's params are meant to be JSON already (they reach
            # the workers as JSON); anything else arrives as its text rather than failing the run
            self._stdin.write(json.dumps(message, default=str).encode() + b"\n")
            self._stdin.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _Died from exc

    def _receive(self, deadline: float) -> dict[str, Any]:
        """The next JSON line; :class:`TimeoutError` at ``deadline``, :class:`_Died` at EOF."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if not self._selector.select(remaining):
                continue
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                raise _Died
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def call(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one call and wait for its reply."""
        self._send(message)
        return self._receive(time.monotonic() + timeout)

    def exit_reason(self) -> str:
        """How the child ended: ``exit code 3`` or ``killed by SIGSEGV``."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return "stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def kill(self) -> None:
        """Kill the child and whatever it started (its own session)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.close()

    def end_input(self) -> None:
        """Close the child's stdin: it leaves its loop and exits."""
        try:
            self._stdin.close()
        except OSError:
            pass

    def stop(self) -> None:
        """End the child (see :meth:`end_input`); kill it, and whatever it started, if it lingers."""
        self.end_input()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def close(self) -> None:
        self._selector.close()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


class CallbackProcesses:
    """The children of one evaluation, by interpreter; a context manager that ends them all.

    Parameters
    ----------
    headers
        The series' headers (JSON-able), sent to every child once.
    timeout
        Seconds one callback may take.
    """

    def __init__(self, headers: dict[str, Any], *, timeout: float) -> None:
        self.headers = headers
        self.timeout = timeout
        self._children: dict[str, _Child] = {}

    def __enter__(self) -> CallbackProcesses:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for child in self._children.values():
            child.end_input()  # all at once: they exit side by side
        for child in self._children.values():
            child.stop()
        self._children.clear()

    def prestart(self, python: str) -> None:
        """Start the child of ``python`` without waiting for it (its first call waits)."""
        if python not in self._children:
            try:
                self._children[python] = _Child(python)
            except OSError:
                pass  # no such interpreter: its first call says so

    def call(self, python: str, spec: ServiceSpec, job: JobSpec, added_params: dict[str, Any]) -> CallbackOutcome:
        """Run ``job``'s callback in the child of ``python``; ``added_params`` is updated in place.

        Never raises for the service's sake: a timeout or a dead child is an outcome.
        """
        code = ServiceCode.of(spec)
        message = {
            "service": {**vars(code), "registry_dir": _text(code.registry_dir), "module_dir": _text(code.module_dir)},
            "job": {"name": job.job_name, "callback": job.callback, "params": job.params},
            "added_params": added_params,
        }
        child = self._children.get(python)
        try:
            if child is None:
                child = self._children[python] = _Child(python)
            if not child.ready:
                child.start(self.headers)
            reply = child.call(message, self.timeout)
        except TimeoutError:
            assert child is not None
            self._children.pop(python).kill()
            if not child.ready:
                return _not_selected("callback_crashed", f"callback process did not start within {STARTUP_TIMEOUT:g} s")
            return _not_selected("callback_timeout", f"callback timed out after {self.timeout:g} s")
        except (_Died, OSError, ValueError) as exc:
            # ValueError: a reply that is not JSON; OSError from Popen: no such interpreter
            self._children.pop(python, None)
            if child is None:
                return _not_selected("callback_crashed", f"cannot start {python}: {exc}")
            how = child.exit_reason()
            child.close()
            if not child.ready:
                return _not_selected("callback_crashed", f"callback process failed to start ({how})")
            return _not_selected("callback_crashed", f"callback crashed its process ({how})")
        added_params.clear()
        added_params.update(reply["added_params"])
        return CallbackOutcome(**reply["outcome"])


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _not_selected(kind: RejectionKind, reason: str) -> CallbackOutcome:
    return CallbackOutcome(scheduled=False, kind=kind, reason=reason)
