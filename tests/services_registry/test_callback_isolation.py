"""Callbacks evaluated in child processes: a hang, a dead interpreter or a clashing import costs
only its own job, and the plan says why; everything else behaves as dcm-processor's scheduler."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from services_registry import evaluate_callbacks, load_service
from services_registry.callbacks import evaluate_isolated
from services_registry.planning import plan_series
from services_registry.runtime import loaded

from .test_seed_service import HEADERS, MODULE, REGISTRY, SETTINGS

CALLBACKS = """
import ctypes, json, os, sys, time

def ok(jobName, headers, params, added_params, **kwargs):
    print("a callback printing to stdout must not break the protocol")
    return True, {"seen": sorted(added_params), "series": headers["seriesId"]}

def hang(jobName, headers, params, added_params, **kwargs):
    with open(params["pidfile"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(120)
    return True

def exit_now(jobName, headers, params, added_params, **kwargs):
    os._exit(3)

def segfault(jobName, headers, params, added_params, **kwargs):
    ctypes.string_at(0)

def adds(jobName, headers, params, added_params, **kwargs):
    added_params["written-by-" + jobName] = {"as in the seed": True}  # the shared dict itself
    return True, {"n": 1}

def not_json(jobName, headers, params, added_params, **kwargs):
    return True, {"when": object()}
"""


def _job(name: str, callback: str, position: int, **extra: object) -> dict[str, object]:
    return {"jobName": name, "worker": "common.work", "callback": f"common.{callback}",
            "sortPosition": position, **extra}


@pytest.fixture
def unruly(make_service, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """One service whose callbacks hang, exit, segfault, or behave, in this sortPosition order."""
    settings = [
        _job("first", "ok", 1),
        _job("hangs", "hang", 2, params={"pidfile": str(tmp_path / "hang.pid")}),
        _job("after-hang", "ok", 3),
        _job("exits", "exit_now", 4),
        _job("after-exit", "ok", 5),
        _job("segfaults", "segfault", 6),
        _job("adds", "adds", 7),
        _job("not-json", "not_json", 8),
        _job("last", "ok", 9),
        _job("needs-hangs", "ok", 10, dependsOn="hangs"),
    ]
    return make_service("unruly", settings, {"common/__init__.py": CALLBACKS},
                        {"common/__init__.py": "def work(**kwargs):\n    pass\n"})


def test_hang_exit_and_segfault_cost_only_their_own_jobs(
    unruly: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = load_service(unruly)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        evaluation = evaluate_isolated([spec], {**HEADERS, "seriesId": "9.9"}, timeout=1)
    assert time.monotonic() - started < 20  # one timeout, a few process starts

    assert evaluation.selected_names == ("first", "after-hang", "after-exit", "adds", "last")
    assert evaluation.reasons() == {
        "hangs": "callback timed out after 1 s",
        "exits": "callback crashed its process (exit code 3)",
        "segfaults": "callback crashed its process (killed by SIGSEGV)",
        "not-json": "callback returned params that are not JSON: Object of type object is not JSON serializable",
        "needs-hangs": "dependency 'hangs' not scheduled (hangs: callback timed out after 1 s)",
    }
    assert [r.kind for r in evaluation.rejected] == [
        "callback_timeout", "callback_crashed", "callback_crashed", "callback_raised", "dependency"]
    # the parent carried added_params across the fresh processes, in sortPosition order
    assert evaluation.added_params == {
        "first": {"seen": [], "series": "9.9"},
        "after-hang": {"seen": ["first"], "series": "9.9"},
        "after-exit": {"seen": ["after-hang", "first"], "series": "9.9"},
        "written-by-adds": {"as in the seed": True},
        "adds": {"n": 1},
        "last": {"seen": ["adds", "after-exit", "after-hang", "first", "written-by-adds"], "series": "9.9"},
        # passed its callback, dropped for its dependency: kept, as the seed keeps it
        "needs-hangs": {"seen": ["adds", "after-exit", "after-hang", "first", "last", "written-by-adds"],
                        "series": "9.9"},
    }
    # the hung process was killed, not left behind
    pid = int((tmp_path / "hang.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "callback timed out after 1 s" in caplog.text and "killed by SIGSEGV" in caplog.text


def test_the_plan_says_why(unruly: Path) -> None:
    plan = plan_series([load_service(unruly)], HEADERS, instances=1, timeout=1)
    rejected = {r["job"]: (r["kind"], r["reason"]) for r in plan.rejected}
    assert rejected["hangs"] == ("callback_timeout", "callback timed out after 1 s")
    assert rejected["exits"] == ("callback_crashed", "callback crashed its process (exit code 3)")
    assert [s["job"] for s in plan.selected] == ["first", "after-hang", "after-exit", "adds", "last"]


def test_isolated_evaluation_is_the_seeds(make_service, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """The seed service of test_seed_service gives the same evaluation in a child process."""
    spec = load_service(make_service("legacy", SETTINGS, REGISTRY, MODULE))
    with loaded([spec]) as services:
        here = evaluate_callbacks(services, HEADERS)
    with caplog.at_level(logging.ERROR):
        there = evaluate_isolated([spec], HEADERS)
    assert there == here
    assert "Exception: broken: boom" in caplog.text


def _same_names(make_service, name: str, tag: str):  # type: ignore[no-untyped-def]
    registry = {
        "common/__init__.py": """
            def cb(jobName, headers, params, added_params, **kwargs):
                import common.helpers          # at call time, by its plain name
                import helpers                 # a top-level module another service has too
                return True, {"common": common.helpers.TAG, "helpers": helpers.TAG}

            def borrow(jobName, headers, params, added_params, **kwargs):
                import only_in_alpha           # another service's module: not importable here
                return True
        """,
        "common/helpers.py": f"TAG = {tag!r}\n",
        "helpers.py": f"TAG = {tag + '-top'!r}\n",
    }
    if name == "alpha":
        registry["only_in_alpha.py"] = "X = 1\n"
    settings = [
        {"jobName": f"{name}-cb", "worker": "common.work", "callback": "common.cb"},
        {"jobName": f"{name}-borrow", "worker": "common.work", "callback": "common.borrow"},
    ]
    return load_service(make_service(name, settings, registry, {"common/__init__.py": "def work(**kw):\n    pass\n"}))


def test_modules_of_the_same_name_stay_with_their_service(make_service) -> None:  # type: ignore[no-untyped-def]
    alpha, beta = _same_names(make_service, "alpha", "A"), _same_names(make_service, "beta", "B")
    evaluation = evaluate_isolated([alpha, beta], HEADERS)
    assert evaluation.added_params == {
        "alpha-cb": {"common": "A", "helpers": "A-top"},
        "alpha-borrow": {},
        "beta-cb": {"common": "B", "helpers": "B-top"},
    }
    assert evaluation.reasons() == {"beta-borrow": "callback raised ModuleNotFoundError: No module named 'only_in_alpha'"}
    assert not [k for k in sys.modules if k.split(".")[0] in {"common", "helpers", "only_in_alpha"}]


def test_services_plan_shows_why(unruly: Path, dicom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dcmflow services plan`` evaluates with DCMFLOW_CALLBACK_TIMEOUT and prints the reasons."""
    import typer
    from typer.testing import CliRunner

    from dcmflow.cli import services
    from storage import db

    home = tmp_path / "home"
    home.mkdir()
    db.upgrade(db.create_engine(f"sqlite:///{(home / 'dcmflow.db').resolve()}"))
    monkeypatch.setenv("DCMFLOW_HOME", str(home))
    monkeypatch.setenv("DCMFLOW_CALLBACK_TIMEOUT", "1")
    app = typer.Typer(pretty_exceptions_enable=False)
    app.add_typer(services.app, name="services")
    runner = CliRunner()
    assert runner.invoke(app, ["services", "install", str(unruly)]).exit_code == 0
    result = runner.invoke(app, ["services", "plan", "--dir", str(dicom_dir / "ct")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "hangs (unruly): callback timed out after 1 s" in text
    assert "exits (unruly): callback crashed its process (exit code 3)" in text
    assert "segfaults (unruly): callback crashed its process (killed by SIGSEGV)" in text


def test_values_that_are_not_json_arrive_as_text(make_service) -> None:  # type: ignore[no-untyped-def]
    spec = load_service(make_service("texts", [
        {"jobName": "echo", "worker": "common.work", "callback": "common.echo", "params": {"n": 1}},
    ], {"common/__init__.py": """
        def echo(jobName, headers, params, added_params, **kwargs):
            return True, {"path": headers["path"], "n": params["n"]}
    """}, {"common/__init__.py": "def work(**kw):\n    pass\n"}))
    evaluation = evaluate_isolated([spec], {"path": Path("/data/x")})
    assert evaluation.added_params == {"echo": {"path": "/data/x", "n": 1}}


def test_a_hung_callback_dies_with_its_parent(unruly: Path, tmp_path: Path) -> None:
    """A flow process killed while a callback hangs leaves no process behind."""
    import signal
    import subprocess
    import textwrap

    pidfile = tmp_path / "hang.pid"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from services_registry import load_service
        from services_registry.callbacks import evaluate_isolated
        evaluate_isolated([load_service(Path({str(unruly)!r}))], {{"seriesId": "1"}}, timeout=120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(pidfile.read_text())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            return
        if "\nState:\tZ" in status:  # dead, waiting for init to reap it
            return
        time.sleep(0.1)
    pytest.fail(f"callback process {child} outlived its parent")
