"""Services registered from Python: a user's module (by path) and installed distributions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import services_registry
from services_registry import (
    ENTRY_POINT_GROUP,
    Service,
    ServiceValidationError,
    check_service,
    evaluate_callbacks,
    load_entry_points,
    load_service,
    plan_dag,
)
from services_registry.examples import FOLDER_EXAMPLE, PYTHON_EXAMPLE
from services_registry.runtime import loaded

MODULE = '''
    from services_registry import Service

    service = Service("svc", description="demo")

    @service.job(name="first", priority="high", timeout="90s", params={"k": 1}, sort_position=5)
    def first(jobName, headers, params, added_params, **kwargs):
        return "first ran"

    @first.callback
    def first_ok(jobName, headers, params, added_params, **kwargs):
        from svc.helpers import decide          # absolute import of its own package
        return decide(headers), {"k": params["k"]}

    @service.job(depends_on="first", retries=2, retry_delay="30s", retry_on_timeout=True, level="series")
    def second(jobName, headers, params, added_params, **kwargs):
        return added_params
'''


def write_package(root: Path) -> Path:
    package = root / "svc"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(MODULE))
    (package / "helpers.py").write_text("def decide(headers):\n    return headers.get('Modality') == 'CT'\n")
    return package


def test_builder_gives_the_same_spec_as_a_settings_file(tmp_path: Path) -> None:
    spec = load_service(write_package(tmp_path))
    assert spec.source == "python" and spec.name == "svc" and spec.entry == "svc:service"
    first, second = spec.jobs
    assert (first.job_name, first.worker, first.callback) == ("first", "svc.first", "svc.first_ok")
    assert (first.priority, first.timeout, first.params, first.sort_position) == ("high", 90.0, {"k": 1}, 5)
    assert second.callback == "services_registry.api.always"  # no callback: always scheduled
    assert (second.depends_on, second.retries, second.retry_delay, second.params) == (("first",), 2, 30.0, None)
    assert second.retry_on_timeout and not first.retry_on_timeout  # a timeout is final unless the job asks
    check_service(spec)
    with loaded([spec]) as services:
        ct = evaluate_callbacks(services, {"Modality": "CT"})
        mr = evaluate_callbacks(services, {"Modality": "MR"})
    assert ct.selected_names == ("first", "second") and ct.added_params == {"first": {"k": 1}, "second": {}}
    assert mr.reasons() == {"first": "callback returned False",
                            "second": "dependency 'first' not scheduled (first: callback returned False)"}
    assert "svc" not in sys.modules


def test_decorated_worker_still_calls_the_function() -> None:
    service = Service("x")

    @service.job()
    def work(jobName: str, **kwargs: object) -> str:
        return f"ran {jobName}"

    assert work(jobName="j") == "ran j" and work.name == "work" and repr(work) == "<Job 'work' of service 'x'>"


def test_python_api_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from services_registry import Service\nservice = Service('bad')\n"
                   "@service.job(timeout='soon')\ndef w(**kw):\n    pass\n")
    with pytest.raises(ServiceValidationError) as info:
        load_service(bad)
    assert str(info.value).endswith("bad.py: job 'w'.timeout: bad duration 'soon' (seconds, or like '1h', '30m', '1h30m', '90s')")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_installed_anywhere\n")
    with pytest.raises(ServiceValidationError, match="broken.py: import failed: ModuleNotFoundError"):
        load_service(broken)
    two = tmp_path / "two.py"
    two.write_text("from services_registry import Service\na = Service('a')\nb = Service('b')\n"
                   "@a.job()\ndef w(**kw):\n    pass\n")
    with pytest.raises(ServiceValidationError, match="2 Services"):
        load_service(two)
    assert load_service(f"{two}:a").name == "a"
    with pytest.raises(ServiceValidationError, match="declares no jobs"):
        load_service(f"{two}:b")


def test_entry_point_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution advertising ``dcmflow.services``.

    Building a wheel and pip-installing it into the venv would be slow and would leave the
    distribution in the shared venv; a real ``*.dist-info`` folder (METADATA +
    entry_points.txt, what pip writes) on a temporary sys.path entry is exactly what
    importlib.metadata reads, so this exercises the same discovery code.
    """
    site = tmp_path / "site"
    dist_info = site / "demo_services-1.2.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-services\nVersion: 1.2\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ndemo-ep = demo_ep_services:service\n"
                                                "[console_scripts]\nignored = demo_ep_services:main\n")
    (site / "demo_ep_services.py").write_text(textwrap.dedent(MODULE).replace('Service("svc"', 'Service("x"')
                                              .replace("from svc.helpers import decide", "decide = lambda h: True")
                                              .replace('name="first"', 'name="ep-first"')
                                              .replace('depends_on="first"', 'depends_on="ep-first"'))
    monkeypatch.syspath_prepend(str(site))
    try:
        specs = load_entry_points(path=[str(site)])
        assert [s.name for s in specs] == ["demo-ep"]  # the entry point's name is the service name
        spec = specs[0]
        assert spec.source == "entry_point" and spec.entry == "demo_ep_services:service"
        assert [j.worker for j in spec.jobs] == ["demo_ep_services.first", "demo_ep_services.second"]
        check_service(spec)
        with loaded([spec]) as services:
            assert evaluate_callbacks(services, {}).selected_names == ("ep-first", "second")
        assert load_entry_points(path=[str(tmp_path / "elsewhere")]) == []
    finally:
        sys.modules.pop("demo_ep_services", None)


def test_examples_load_validate_and_plan_together() -> None:
    folder = load_service(FOLDER_EXAMPLE, name="series-summary")
    python = load_service(PYTHON_EXAMPLE)
    check_service(folder)
    check_service(python, installed=[folder])
    with loaded([folder, python]) as services:
        ct = evaluate_callbacks(services, {"Modality": "CT", "seriesId": "1.2.3", "dcmpath": "ct"})
        us = evaluate_callbacks(services, {"Modality": "US", "seriesId": "1.2.4", "dcmpath": "us"})
    assert plan_dag(ct.selected).order == ("py-series-summary", "series-summary", "series-summary-markdown")
    assert ct.added_params["series-summary-markdown"] == {"source": "1.2.3.json"}
    assert us.selected_names == ()


EXPORTED = {
    "Service", "Job", "load_service", "check_service", "load_entry_points", "ENTRY_POINT_GROUP",
    "JobSpec", "ServiceSpec", "PRIORITY_RANKS", "parse_duration", "priority_rank",
    "LoadedService", "headers_from_dataset", "evaluate_callbacks", "Evaluation", "SelectedJob", "RejectedJob",
    "plan_dag", "Plan", "PlanNode", "to_mermaid",
    "RegistryError", "ServiceValidationError", "CycleError", "ServiceNotFoundError", "PlanError", "InstallError",
}


def test_exported_members() -> None:
    """The package's ``__all__`` is its contract (httpx's test_exported_members)."""
    assert set(services_registry.__all__) == EXPORTED
    assert len(services_registry.__all__) == len(EXPORTED)
    for name in services_registry.__all__:
        assert getattr(services_registry, name) is not None
    public = {n for n in dir(services_registry) if not n.startswith("_")}
    modules = {"api", "callbacks", "dag", "entrypoints", "errors", "folder", "headers", "load", "loader",
               "runtime", "spec", "validate", "examples", "planning", "install", "builtin", "graph"}
    assert public - modules == EXPORTED
