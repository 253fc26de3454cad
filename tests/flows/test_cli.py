"""``dcmflow process``, ``reprocess`` and ``jobs list`` against the real Prefect server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dcmflow.cli import jobs as jobs_cli
from dcmflow.cli import process as process_cli
from tests.factories import make_small_series
from tests.tasks.helpers import Home, job, make_home, write_service


def cli_app() -> typer.Typer:
    """The wiring dcmflow/cli/__init__.py gets (see the report to the lead)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command(name="process")(process_cli.process)
    app.command(name="reprocess")(process_cli.reprocess)
    app.add_typer(jobs_cli.app, name="jobs")
    return app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    home = make_home(tmp_path / "home")
    fast = {"sleep": 0.05}
    home.install(write_service(tmp_path / "src", "cli-svc", [
        job("a", "record", params=fast),
        job("b", "record", params=fast, dependsOn="a"),
        job("c", "record", params=fast),
        job("d", "record", params=fast, dependsOn="b"),
    ]))
    monkeypatch.setenv("DCMFLOW_HOME", str(home.root))
    return home


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli_app(), list(args))
    return result.exit_code, result.stdout, result.stderr


def test_process_wait_then_reprocess_one_job_and_its_dependents(home: Home, prefect_api) -> None:  # type: ignore[no-untyped-def]
    uid = home.receive(make_small_series(2, seed=21))
    code, out, err = invoke("process", uid, "--wait", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert sorted((j["job_name"], j["state"]) for j in first) == [
        ("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded"), ("d", "succeeded")]
    code, out, err = invoke("reprocess", uid, "--job", "b", "--wait", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert sorted(j["job_name"] for j in again) == ["b", "d"]  # b and what depends on it, nothing else
    assert len({j["session_id"] for j in again} | {first[0]["session_id"]}) == 2
    session = home.repo.get_session(again[0]["session_id"])
    assert session is not None and session.trigger == "reprocess"
    code, out, _ = invoke("jobs", "list", "--series", uid, "--json")
    assert code == 0 and len(json.loads(out)) == 6
    code, out, _ = invoke("jobs", "list", "--series", uid)
    assert code == 0 and "jobs" in out  # the rich table (narrow terminal: cells are cropped)


def test_process_exits_1_when_a_job_fails(home: Home, tmp_path: Path, prefect_api) -> None:  # type: ignore[no-untyped-def]
    home.install(write_service(tmp_path / "src2", "bad-svc", [job("boom", "crasher")]))
    uid = home.receive(make_small_series(1, seed=22))
    code, out, err = invoke("process", uid, "--wait", "--json")
    assert code == 1
    states = {j["job_name"]: j["state"] for j in json.loads(out)}
    assert states["boom"] == "failed" and states["d"] == "succeeded"
    assert "boom failed" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["process", "1.2.3.999", "--wait"], "no received series 1.2.3.999"),
        (["process", "../etc", "--wait"], "invalid Series Instance UID"),
        (["reprocess", "1.2.3.999"], "no received series"),
    ],
)
def test_user_mistakes_are_one_line(home: Home, args: list[str], message: str) -> None:
    code, _out, err = invoke(*args)
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_reprocess_unknown_job_is_one_line(home: Home) -> None:
    uid = home.receive(make_small_series(1, seed=23))
    code, _out, err = invoke("reprocess", uid, "--job", "nope", "--wait")
    assert code == 1 and "no installed job named 'nope'" in err and "Traceback" not in err


def test_process_without_wait_runs_in_the_background(home: Home, prefect_env) -> None:  # type: ignore[no-untyped-def]
    from dcmflow import cli

    if not any(c.name == "process" for c in cli.app.registered_commands):
        pytest.skip("dcmflow/cli/__init__.py does not wire `process` yet")
    uid = home.receive(make_small_series(1, seed=24))
    code, _out, err = invoke("process", uid)
    assert code == 0 and "background" in err
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [j.state for j in home.repo.list_jobs(uid)]
        if len(states) == 4 and all(s == "succeeded" for s in states):
            return
        time.sleep(0.5)
    pytest.fail(f"background run did not finish: {states}")
