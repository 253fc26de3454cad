"""services_registry.graph: the one owner of job order and cycles (graphlib underneath)."""

from __future__ import annotations

import graphlib

import pytest

from services_registry.graph import ReadyQueue, cycle_of, find_cycle, ready_key, with_dependents

RANKS = {"a": 30, "b": 40, "c": 30, "d": 10}


def key(name: str) -> tuple[int, float, str]:
    return ready_key(RANKS[name], 999, name)


def test_ready_queue_hands_out_dependents_only_after_done() -> None:
    queue = ReadyQueue({"a": (), "b": (), "c": ("a", "b"), "d": ()}, key)
    assert [queue.pop(), queue.pop(), queue.pop()] == ["b", "a", "d"]  # rank 40, then 30, then 10
    assert len(queue) == 0
    queue.done("a")
    assert not queue  # c still waits for b
    queue.done("b")
    assert queue.pop() == "c"


def test_a_job_whose_dependency_never_succeeds_is_never_ready() -> None:
    queue = ReadyQueue({"a": (), "c": ("a",)}, key)
    assert queue.pop() == "a" and not queue  # a failed: nobody calls done("a")


def test_drain_is_the_ready_order_and_cycles_raise() -> None:
    assert ReadyQueue({"c": ("a",), "a": (), "b": ()}, key).drain() == ["b", "a", "c"]
    with pytest.raises(graphlib.CycleError) as info:
        ReadyQueue({"a": ("b",), "b": ("a",)}, key)
    assert cycle_of(info.value) == ("a", "b", "a")
    assert find_cycle({"a": ("c",), "b": ("a",), "c": ("b",)}) == ("a", "c", "b", "a")


def test_with_dependents_follows_dependents_transitively() -> None:
    graph = {"a": (), "b": ("a",), "c": ("b",), "d": (), "e": ("d", "c")}
    assert with_dependents({"b"}, graph) == {"b", "c", "e"}
    assert with_dependents(set(), graph) == set()
