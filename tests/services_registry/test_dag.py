"""DAG planning as a pure function: fan-in, ready order, levels, mermaid."""

from __future__ import annotations

import pytest

from services_registry import JobSpec, PlanError, plan_dag, to_mermaid


def job(name: str, deps: object = None, priority: object = "default", sort: float = 999) -> JobSpec:
    return JobSpec.model_validate({"jobName": name, "worker": "s.w", "callback": "s.c", "dependsOn": deps,
                                   "priority": priority, "sortPosition": sort})


def test_fan_in_and_ready_order() -> None:
    plan = plan_dag([
        job("merge", ["left", "right"]), job("left", "root", sort=2), job("right", "root", "high"),
        job("root", sort=50), job("solo", priority="low", sort=0), job("urgent", priority=35),
    ])
    # ready: root(30), solo(10), urgent(35) -> urgent, root; then right(40) before left(30) and solo
    assert plan.order == ("urgent", "root", "right", "left", "merge", "solo")
    assert plan.levels == (("urgent", "root", "solo"), ("right", "left"), ("merge",))
    assert set(plan.edges) == {("root", "left"), ("root", "right"), ("left", "merge"), ("right", "merge")}
    assert plan.node("merge").depends_on == ("left", "right")


def test_ties_fall_back_to_sort_position_then_name() -> None:
    plan = plan_dag([job("b", sort=1), job("a", sort=1), job("c", sort=0)])
    assert plan.order == ("c", "a", "b")


def test_missing_dependency_or_cycle_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="'b' depends on 'a', which is not planned"):
        plan_dag([job("b", "a")])
    with pytest.raises(PlanError, match="dependency cycle a -> b -> a"):
        plan_dag([job("a", "b"), job("b", "a")])
    with pytest.raises(PlanError, match="given twice"):
        plan_dag([job("a"), job("a")])


def test_empty_plan_and_mermaid() -> None:
    assert plan_dag([]).order == () and plan_dag([]).levels == ()
    text = to_mermaid(plan_dag([job('we"ird<name>'), job("b", 'we"ird<name>')]))
    assert text == 'flowchart TD\n    j0["we_ird_name_"]\n    j1["b"]\n    j0 --> j1\n'
