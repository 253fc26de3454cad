"""The job spec: camelCase boundary, defaults from the seed, durations, priorities."""

from __future__ import annotations

import pytest

from services_registry import JobSpec, ServiceValidationError, parse_duration, priority_rank
from services_registry.spec import job_from_mapping

BASE = {"jobName": "a", "worker": "svc.worker", "callback": "svc.callback"}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(3600, 3600.0), (90.5, 90.5), ("3600", 3600.0), ("1h", 3600.0), ("30m", 1800.0),
     ("1h30m", 5400.0), ("90s", 90.0), ("2d", 172800.0), ("1w", 604800.0), (" 1H ", 3600.0)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["1x", "", "h1", "1h 30m", "-5", 0, -1, True, None, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(value)


def test_seed_defaults() -> None:
    job = JobSpec.model_validate(BASE)
    assert job.timeout == 3600.0  # "1h" everywhere in the seed
    assert job.sort_position == 999  # registry default in load_config
    assert job.params is None  # job.get("params"): missing means None, not {}
    assert job.priority == "default" and job.channel == "default"
    assert job.depends_on == () and not job.disabled
    assert job.retries == 0 and job.retry_delay == 0 and job.level == "series"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, ()), ("convert", ("convert",)), (["a", "b"], ("a", "b")), ([], ()), (["a", "a"], ("a",))],
)
def test_depends_on_is_normalised_to_a_tuple(raw: object, expected: tuple[str, ...]) -> None:
    assert JobSpec.model_validate({**BASE, "dependsOn": raw}).depends_on == expected


def test_camel_case_outside_snake_case_inside() -> None:
    job = JobSpec.model_validate({**BASE, "sortPosition": -999, "retryDelay": "30s", "dependsOn": "x"})
    assert (job.job_name, job.sort_position, job.retry_delay) == ("a", -999, 30.0)
    same = JobSpec(job_name="a", worker="svc.worker", callback="svc.callback", sort_position=-999,
                   retry_delay=30, depends_on=["x"])
    assert same == job
    settings = job.to_settings()
    assert settings["jobName"] == "a" and settings["sortPosition"] == -999 and settings["dependsOn"] == ["x"]



def test_retry_on_timeout_is_off_unless_asked() -> None:
    assert JobSpec.model_validate(BASE).retry_on_timeout is False
    job = JobSpec.model_validate({**BASE, "retries": 2, "retryOnTimeout": True})
    assert job.retry_on_timeout is True and job.to_settings()["retryOnTimeout"] is True and not job.extra

def test_priority_rank_is_one_ordering_higher_first() -> None:
    ranks = [priority_rank(p) for p in ("high", "default", "medium", "low")]
    assert ranks == sorted(ranks, reverse=True)  # seed: default > medium > low; high above
    assert priority_rank(35) == 35 and priority_rank("high") > 35 > priority_rank("default")
    assert JobSpec.model_validate({**BASE, "priority": "LOW"}).priority_rank == priority_rank("low")
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        priority_rank("urgent")


def test_unknown_fields_are_kept_and_reported() -> None:
    job = JobSpec.model_validate({**BASE, "events": ["stable-series"], "gpu": True})
    assert job.extra == {"events": ["stable-series"], "gpu": True}
    assert job.warnings == ("unknown field 'events' kept", "unknown field 'gpu' kept")
    assert job.to_settings()["gpu"] is True


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"worker": "s.w", "callback": "s.c"}, "f.json: jobs[2].jobName: required field missing"),
        ({"jobName": "a", "callback": "s.c"}, "f.json: jobs[2].worker: required field missing"),
        ({**BASE, "timeout": "1x"}, "f.json: jobs[2].timeout: bad duration '1x'"),
        ({**BASE, "worker": "nodots"}, "f.json: jobs[2].worker: 'nodots' is not a dotted name"),
        ({**BASE, "priority": "urgent"}, "f.json: jobs[2].priority: unknown priority 'urgent'"),
        ({**BASE, "dependsOn": 5}, "f.json: jobs[2].dependsOn: must be a job name"),
        ({**BASE, "level": "patient"}, "f.json: jobs[2].level: "),
        ("just text", "f.json: jobs[2]: a job must be a JSON object"),
    ],
)
def test_validation_errors_are_one_line_naming_file_and_field(entry: object, message: str) -> None:
    with pytest.raises(ServiceValidationError) as info:
        job_from_mapping(entry, "f.json", "jobs[2]")
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text
