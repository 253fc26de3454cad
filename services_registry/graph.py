"""Order and cycles of a job graph: the one owner of both, on :mod:`graphlib`.

A graph maps each job to its ``dependsOn`` (its predecessors, as
:class:`graphlib.TopologicalSorter` reads a mapping). Install validation asks
:func:`find_cycle`, the planner drains a :class:`ReadyQueue` into its ready order, and the
flow that runs the jobs takes them from a :class:`ReadyQueue` as their dependencies succeed,
so all three agree on what "ready" means and in which order ready jobs go: the smallest
:func:`ready_key` first (higher priority rank, then lower ``sortPosition``, then ``jobName``).
"""

from __future__ import annotations

import graphlib
import heapq
from collections.abc import Callable, Collection, Iterable, Mapping

__all__ = ["ReadyKey", "ReadyQueue", "cycle_of", "find_cycle", "ready_key", "with_dependents"]

ReadyKey = tuple[int, float, str]
"""Sort key among ready jobs; smaller goes first."""


def ready_key(rank: int, sort_position: float, name: str) -> ReadyKey:
    """Higher priority rank first, then lower ``sortPosition``, then ``jobName``."""
    return (-rank, float(sort_position), name)


def find_cycle(graph: Mapping[str, Iterable[str]]) -> tuple[str, ...] | None:
    """The first dependency cycle of ``graph`` (``job -> its dependsOn``), or ``None``.

    Deterministic for a given mapping order (graphlib searches nodes in insertion order). The
    cycle follows ``dependsOn`` with its first name repeated at the end (``("a", "b", "a")``:
    ``a`` depends on ``b``, which depends on ``a``). Edges to unknown names are ignored.
    """
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return cycle_of(exc)
    return None


def cycle_of(error: graphlib.CycleError) -> tuple[str, ...]:
    """The cycle ``error`` carries, following ``dependsOn`` (as :func:`find_cycle` returns it)."""
    # graphlib lists each node before its successor: a dependency before its dependent
    return tuple(reversed(error.args[1]))


class ReadyQueue:
    """Jobs of a DAG handed out once all their dependencies are :meth:`done`, best key first.

    A job whose dependency never becomes done (it failed, or was skipped) is never handed out.

    Raises
    ------
    graphlib.CycleError
        From the constructor, when ``graph`` has a cycle (:func:`find_cycle` names it).
    """

    def __init__(self, graph: Mapping[str, Iterable[str]], key: Callable[[str], ReadyKey]) -> None:
        self._sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter(graph)
        self._sorter.prepare()
        self._key = key
        self._heap: list[tuple[ReadyKey, str]] = []
        self._pull()

    def _pull(self) -> None:
        for name in self._sorter.get_ready():
            heapq.heappush(self._heap, (self._key(name), name))

    def __len__(self) -> int:
        """Number of jobs ready now."""
        return len(self._heap)

    def pop(self) -> str:
        """The best ready job (``IndexError`` when none is ready)."""
        return heapq.heappop(self._heap)[1]

    def done(self, name: str) -> None:
        """``name`` succeeded: its dependents whose dependencies are all done become ready."""
        self._sorter.done(name)
        self._pull()

    def drain(self) -> list[str]:
        """The whole ready order, every job taken as done as soon as it is handed out."""
        order: list[str] = []
        while self._heap:
            name = self.pop()
            order.append(name)
            self.done(name)
        return order


def with_dependents(names: Collection[str], graph: Mapping[str, Iterable[str]]) -> set[str]:
    """``names`` and every job that depends on one of them, directly or through others."""
    dependents: dict[str, list[str]] = {}
    for name, deps in graph.items():
        for dep in deps:
            dependents.setdefault(dep, []).append(name)
    chosen = set(names)
    stack = list(chosen)
    while stack:
        for child in dependents.get(stack.pop(), ()):
            if child not in chosen:
                chosen.add(child)
                stack.append(child)
    return chosen
