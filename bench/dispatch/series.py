"""The "series flows" of bench/dispatch/run.py, in an importable module.

``task.delay()`` stores the *calling flow run's context* with the job's parameters, and that
context holds the flow object, pickled with cloudpickle: a flow defined in ``__main__`` or as a
closure is pickled by value with everything it references (here: locks, HTTP clients) and
``delay()`` fails with ``SerializationError ... cannot pickle '_thread.lock'``. Even at module
level the flow's *function* is pickled by value (``module.measure`` is the ``Flow``, not the
function, so cloudpickle's by-reference lookup misses), together with the module globals the
function names directly: here the bench object (locks, HTTP clients). So the flow bodies reach
it only through a module-level function (``bench()``, pickled by reference), and the task
worker must be able to import this module (it is on its ``PYTHONPATH``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

import jobs

BENCH: Any = None


def bench() -> Any:
    """The bench object set by run.py (a plain function: pickled by reference)."""
    return BENCH


@task(name="inline-job")
def inline_job(job_id: str) -> dict[str, Any]:
    """The baseline: a plain task in the series flow, spawning ``python -c pass``."""
    return jobs.job_body(job_id)


@flow(name="series-dispatch-bench")
def measure() -> dict[str, Any]:
    return bench().measure_body()


@flow(name="series-dispatch-behaviour")
def behave() -> None:
    bench().behave_body()
