"""storage.priority: the one priority rule, shared by records and the job spec."""

from __future__ import annotations

import pytest

from services_registry import JobSpec
from storage.priority import priority_rank


def test_names_integers_and_integer_text_share_one_scale() -> None:
    assert [priority_rank(p) for p in ("high", "default", "medium", "low")] == [40, 30, 20, 10]
    assert priority_rank(35) == priority_rank("35") == priority_rank(" 35 ") == 35
    assert priority_rank(" LOW ") == 10


@pytest.mark.parametrize("bad", ["urgent", "normal", "", True])
def test_unknown_names_and_booleans_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="priority"):
        priority_rank(bad)  # type: ignore[arg-type]


def test_the_spec_ranks_as_the_records_do() -> None:
    base = {"jobName": "j", "worker": "s.w", "callback": "s.c"}
    for priority in ("high", "medium", 35):
        job = JobSpec.model_validate({**base, "priority": priority})
        assert job.priority_rank == priority_rank(str(job.priority))
