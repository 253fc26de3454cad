"""Job processes without Prefect: real timeouts kill the process group, crashes, results, venvs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tasks.errors import EnvironmentBuildError
from tasks.execution import JobProcess, pid_alive, run_job_process
from tasks.venvs import READY_MARKER, service_python

WORKERS = '''
import os, signal, subprocess, sys, time
from pathlib import Path


def ok(jobName, headers, params, added_params, **kwargs):
    print("hello from", jobName, os.environ["DATA"] == os.getcwd(), flush=True)
    return {"seen": [jobName, headers["seriesId"], params, sorted(added_params)], "env": [os.environ[k] for k in ("DATA", "MODULES", "LOGS")]}


def stubborn(jobName, headers, params, added_params, **kwargs):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)      # ignores SIGTERM: needs the SIGKILL
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    Path(os.environ["DATA"], "pids").write_text(f"{os.getpid()} {child.pid}")
    time.sleep(60)


def raises(jobName, headers, params, added_params, **kwargs):
    raise ValueError("bad input series")


def segfault(jobName, headers, params, added_params, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def not_json(jobName, headers, params, added_params, **kwargs):
    return object()
'''


@pytest.fixture
def module_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "module" / "jobsvc"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(WORKERS)
    return tmp_path / "module"


def make(module_dir: Path, tmp_path: Path, worker: str, timeout: float = 30.0, python: str | None = None) -> JobProcess:
    import sys

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return JobProcess(
        python=python or sys.executable,
        worker=f"jobsvc.{worker}",
        import_paths=[str(module_dir)],
        kwargs={"jobName": worker, "headers": {"seriesId": "1.2.3"}, "params": None, "added_params": {"x": {}}},
        env={"DATA": str(data), "MODULES": str(module_dir), "LOGS": str(tmp_path)},
        work_dir=tmp_path / "work",
        log_path=tmp_path / "job.log",
        timeout=timeout,
    )


def test_worker_gets_the_four_keyword_arguments_and_the_environment(module_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    outcome = run_job_process(make(module_dir, tmp_path, "ok"), on_line=lines.append)
    assert outcome.status == "succeeded" and outcome.exit_code == 0
    assert outcome.result == {"seen": ["ok", "1.2.3", None, ["x"]],
                              "env": [str(tmp_path / "data"), str(module_dir), str(tmp_path)]}
    assert lines == ["hello from ok True"]
    assert "hello from ok" in (tmp_path / "job.log").read_text()


def test_timeout_kills_the_whole_group_within_a_second(module_dir: Path, tmp_path: Path) -> None:
    outcome = run_job_process(make(module_dir, tmp_path, "stubborn", timeout=1.0))
    assert outcome.status == "timed_out" and outcome.exit_code == -signal.SIGKILL
    assert 1.0 <= outcome.duration <= 2.0, outcome.duration
    leader, child = map(int, (tmp_path / "data" / "pids").read_text().split())
    time.sleep(0.1)
    assert not pid_alive(leader) and not pid_alive(child)
    assert "timed out after 1 s" in (tmp_path / "job.log").read_text()


def test_exception_fails_the_job_with_its_last_line(module_dir: Path, tmp_path: Path) -> None:
    outcome = run_job_process(make(module_dir, tmp_path, "raises"))
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.error == "exit code 1: ValueError: bad input series"


def test_signal_death_is_a_failure(module_dir: Path, tmp_path: Path) -> None:
    outcome = run_job_process(make(module_dir, tmp_path, "segfault"))
    assert outcome.status == "failed" and outcome.error == "killed by SIGKILL"


def test_unimportable_worker_and_odd_results(module_dir: Path, tmp_path: Path) -> None:
    outcome = run_job_process(make(module_dir, tmp_path, "missing"))
    assert outcome.status == "failed" and outcome.exit_code == 2 and "cannot import worker" in (outcome.error or "")
    outcome = run_job_process(make(module_dir, tmp_path, "not_json"))
    assert outcome.status == "succeeded" and outcome.result.startswith("<object object")


def test_requirements_txt_gets_one_cached_venv(module_dir: Path, tmp_path: Path) -> None:
    assert service_python(module_dir, tmp_path / "venvs", "svc", 1) == __import__("sys").executable
    (module_dir / "requirements.txt").write_text("pydicom\n")  # already satisfied: no download
    started = time.monotonic()
    python = service_python(module_dir, tmp_path / "venvs", "svc", 1)
    built = time.monotonic() - started
    assert python.startswith(str(tmp_path / "venvs" / "svc" / "1-")) and (Path(python).parents[1] / READY_MARKER).is_file()
    assert service_python(module_dir, tmp_path / "venvs", "svc", 1) == python  # cached
    outcome = run_job_process(make(module_dir, tmp_path, "ok", python=python))
    assert outcome.status == "succeeded", outcome.tail
    assert built < 60


def test_broken_requirements_is_one_line(module_dir: Path, tmp_path: Path) -> None:
    (module_dir / "requirements.txt").write_text("--no-such-pip-option\n")
    with pytest.raises(EnvironmentBuildError, match="pip install"):
        service_python(module_dir, tmp_path / "venvs", "svc", 2)
    assert not any((tmp_path / "venvs" / "svc").glob(f"*/{READY_MARKER}"))


def test_runner_imports_without_prefect(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import sys, tasks._job_runner; print('prefect' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
    assert json.loads("1") == 1
