"""Run one worker in this (fresh) process: ``python -m tasks._job_runner SPEC.json``.

Standard library only, so it starts fast and also runs in a service's own virtual
environment (which may not have dcmflow's dependencies). The spec file (JSON) gives:

``worker``
    Dotted name ``package.module.function``, resolved as dcm-processor's queue did: with the
    service's ``module/`` folder (and ``$MODULES``, where ``<service name>`` links to it) first
    on ``sys.path`` (reference/dcm_processor.md §3.1). Nothing of another service is importable,
    because every job has its own process.
    Services recorded from installed distributions (``dcmflow.services`` entry points) give no
    ``import_paths``: their worker is imported by its module name from this environment.
``import_paths``
    Folders put at the front of ``sys.path``, in order.
``kwargs``
    ``jobName``, ``headers``, ``params``, ``added_params``; the worker is called with exactly
    these keyword arguments.
``result_path``
    Where the worker's return value is written as JSON (``repr`` for what JSON cannot hold).

Exit code 0 when the worker returned, 1 when it raised (traceback on stderr), 2 when the
worker could not be imported. ``DATA``, ``MODULES`` and ``LOGS`` come from the environment the
caller built (:func:`tasks.execution.run_job_process`).
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _resolve(dotted: str) -> Any:
    module_name, attribute = dotted.rsplit(".", 1)
    module = importlib.import_module(module_name)
    target = getattr(module, attribute)
    if not callable(target):
        raise TypeError(f"{dotted!r} is not callable")
    return target


def main(argv: list[str] | None = None) -> int:
    """Load the spec, import the worker, call it; the exit code says what happened."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    for path in reversed(spec.get("import_paths", [])):
        sys.path.insert(0, path)
    try:
        worker = _resolve(spec["worker"])
    except Exception:  # noqa: BLE001 - reported on stderr, exit code 2
        traceback.print_exc()
        print(f"dcmflow: cannot import worker {spec['worker']!r}", file=sys.stderr)
        return 2
    kwargs = spec["kwargs"]
    try:
        result = worker(
            jobName=kwargs["jobName"],
            headers=kwargs["headers"],
            params=kwargs["params"],
            added_params=kwargs["added_params"],
        )
    except Exception:  # noqa: BLE001 - the job fails, the traceback is its log
        traceback.print_exc()
        return 1
    sys.stdout.flush()
    try:
        text = json.dumps(result)
    except (TypeError, ValueError):
        text = json.dumps(repr(result))
    Path(spec["result_path"]).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
