"""Prefect's floor for bench/loop/run.py: a trivial flow served with an event trigger.

Run by ``run.py`` in its own process (``PREFECT_API_URL`` set to the server of the running
``dcmflow up``)::

    python bench/loop/trivial.py [--poll 0.5]

Every ``bench.floor`` event on a resource ``bench.floor.*`` starts one run of ``noop/floor``
with ``x`` from the event's payload, in a new process, exactly as ``dcmflow serve-flows``
starts ``process-series`` (``serve(..., query_seconds=0.5)``). Nothing of dcmflow is imported.
"""

from __future__ import annotations

import argparse
import inspect

from prefect import flow, serve
from prefect.events import DeploymentEventTrigger


@flow
def noop(x: int = 0) -> None:
    """Does nothing: its run time is Prefect's own."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll", type=float, default=0.5, help="runner poll, seconds (dcmflow up uses 0.5)")
    args = parser.parse_args()
    trigger = DeploymentEventTrigger(
        expect={"bench.floor"},
        match={"prefect.resource.id": "bench.floor.*"},
        parameters={"x": "{{ event.payload.x }}"},
    )
    deployment = noop.to_deployment(name="floor", triggers=[trigger])
    assert not inspect.isawaitable(deployment)  # sync call, sync result
    serve(deployment, query_seconds=args.poll, print_starting_message=False)


if __name__ == "__main__":
    main()
