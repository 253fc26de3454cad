"""The callback process: runs one series' callbacks of one service environment, one at a time.

Started by :mod:`services_registry._callback_process` as ``python -m
services_registry._callback_host`` (this interpreter, or a service's own venv). It speaks JSON
lines on its original stdin/stdout and nothing else:

* it writes ``{"ready": true}`` once imported;
* it reads ``{"headers": {...}}``: the series' headers, shared by every callback it runs (as
  in one seed evaluation);
* then, per callback, it reads ``{"service": {...}, "job": {...}, "added_params": {...}}`` and
  writes ``{"outcome": CallbackOutcome, "added_params": {...}}`` (the dict after the call: a
  callback may add to it, as in the seed).

Service code must not be able to break the protocol, so before any of it runs the protocol
moves to duplicated descriptors: fd 1 becomes a copy of stderr (``print`` in a callback lands
in the log) and fd 0 reads ``/dev/null``. A callback that hangs or kills the process is the
parent's business: it stops waiting, kills the process group and starts a new process. If the
parent itself dies, a watcher thread kills the process group within a second.

Only :mod:`services_registry._calling` and what it needs (the loader, no pydantic) are imported
up front (the package's names load lazily), so a start costs little more than an interpreter;
the services' own imports happen at their first call.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO


def _protocol() -> tuple[BinaryIO, BinaryIO]:
    """The original stdin/stdout as private pipes; fds 0 and 1 handed to service code harmlessly."""
    reader = os.fdopen(os.dup(0), "rb")
    writer = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return reader, writer


def _send(writer: BinaryIO, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message, allow_nan=True).encode() + b"\n")
    writer.flush()


def _end_with_parent(interval: float = 1.0) -> None:
    """Kill this process group once the parent is gone (killed while a callback hangs: nobody
    would ever read the answer, and stdin is only read between calls)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        if os.getpgid(0) == os.getpid():  # our own group (the parent starts us in a new session)
            os.killpg(0, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="dcmflow-parent-watch", daemon=True).start()


def main() -> int:
    """Serve callback calls until stdin closes."""
    reader, writer = _protocol()
    _end_with_parent()
    from services_registry._calling import CallbackOutcome, call_callback
    from services_registry.runtime import ServiceCallbacks, ServiceCode

    _send(writer, {"ready": True})
    headers: dict[str, Any] = {}
    services: dict[ServiceCode, ServiceCallbacks] = {}
    for line in reader:
        message = json.loads(line)
        if "headers" in message:
            headers = message["headers"]
            continue
        described = message["service"]
        code = ServiceCode(
            name=described["name"],
            source=described["source"],
            registry_dir=Path(described["registry_dir"]) if described["registry_dir"] else None,
            module_dir=Path(described["module_dir"]) if described["module_dir"] else None,
            entry=described["entry"],
        )
        if code not in services:
            services[code] = ServiceCallbacks(code)
        job = message["job"]
        added: dict[str, Any] = message["added_params"]
        outcome = call_callback(services[code], job["name"], job["callback"], job["params"], headers, added)
        try:
            _send(writer, {"outcome": outcome.to_json(), "added_params": added})
        except (TypeError, ValueError) as exc:  # params the workers could not receive either
            outcome = CallbackOutcome(
                scheduled=False,
                kind="callback_raised",
                reason=f"callback returned params that are not JSON: {exc}",
                error=f"params not JSON: {exc}",
            )
            _send(writer, {"outcome": outcome.to_json(), "added_params": json.loads(line)["added_params"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
