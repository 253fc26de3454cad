"""Install-time validation: each problem is one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services_registry import CycleError, ServiceValidationError, check_service, load_service
from services_registry.graph import find_cycle

CB = {"registry": {"svc/__init__.py": "def cb(**kwargs):\n    return True\n"},
      "module": {"svc/__init__.py": "def work(**kwargs):\n    pass\n"}}


def job(name: str, **extra: object) -> dict[str, object]:
    return {"jobName": name, "worker": "svc.work", "callback": "svc.cb", **extra}


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # messages show paths relative to the working directory


def message(make_service, settings: object, name: str = "svc", installed=()) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceValidationError) as info:
        check_service(load_service(make_service(name, settings, CB["registry"], CB["module"])), installed=installed)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_missing_required_field(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("a"), {"jobName": "b", "worker": "svc.work"}]) == (
        "src/svc/registry/settings.json: jobs[1].callback: required field missing")


def test_single_object_file_has_no_index(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, job("a", timeout="1x")).startswith(
        "src/svc/registry/settings.json: timeout: bad duration '1x'")


def test_bad_timeout(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("a"), job("b"), job("c", timeout="1x")]).startswith(
        "src/svc/registry/settings.json: jobs[2].timeout: bad duration '1x'")


def test_duplicate_job_name_in_one_file(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("a"), job("a")]) == (
        "src/svc/registry/settings.json: jobs[1].jobName: duplicate jobName 'a' (also jobs[0])")


def test_duplicate_job_name_across_services(make_service) -> None:  # type: ignore[no-untyped-def]
    first = load_service(make_service("first", [job("shared")], CB["registry"], CB["module"]))
    assert message(make_service, [job("mine"), job("shared")], "second", installed=[first]) == (
        "src/second/registry/settings.json: jobs[1].jobName: duplicate jobName 'shared' "
        "(already used by service 'first')")


def test_reinstalling_the_same_service_is_not_a_duplicate(make_service) -> None:  # type: ignore[no-untyped-def]
    path = make_service("svc", [job("a")], CB["registry"], CB["module"])
    check_service(load_service(path), installed=[load_service(path)])


def test_depends_on_unknown_job(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("a"), job("b", dependsOn=["a", "ghost"])]) == (
        "src/svc/registry/settings.json: jobs[1].dependsOn: unknown job 'ghost'")


def test_depends_on_a_job_of_another_installed_service_is_fine(make_service) -> None:  # type: ignore[no-untyped-def]
    first = load_service(make_service("first", [job("convert")], CB["registry"], CB["module"]))
    second = load_service(make_service("second", [job("seg", dependsOn="convert")], CB["registry"], CB["module"]))
    check_service(second, installed=[first])


def test_cycle_is_named(make_service) -> None:  # type: ignore[no-untyped-def]
    settings = [job("a", dependsOn="c"), job("b", dependsOn="a"), job("c", dependsOn=["b"]), job("d")]
    with pytest.raises(CycleError) as info:
        check_service(load_service(make_service("svc", settings, CB["registry"], CB["module"])))
    assert str(info.value) == "src/svc/registry/settings.json: jobs[0].dependsOn: dependency cycle a -> c -> b -> a"
    assert info.value.cycle == ("a", "c", "b", "a")


def test_self_dependency_is_a_cycle(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("a", dependsOn="a")]).endswith("dependency cycle a -> a")


def test_series_job_cannot_wait_for_a_study_job(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("s", level="study"), job("x", dependsOn="s")]).endswith(
        "jobs[1].dependsOn: series-level job cannot depend on study-level job 's'")


def test_callback_that_does_not_import(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("a", callback="svc.nope.cb")]).startswith(
        "src/svc/registry/settings.json: jobs[0].callback: 'svc.nope.cb' does not resolve: ModuleNotFoundError")


def test_callback_package_that_fails_on_import(make_service) -> None:  # type: ignore[no-untyped-def]
    path = make_service("svc", [job("a")], {"svc/__init__.py": "raise ValueError('bad\\nconfig')\n"}, CB["module"])
    with pytest.raises(ServiceValidationError) as info:
        check_service(load_service(path))
    assert str(info.value) == (
        "src/svc/registry/settings.json: jobs[0].callback: 'svc.cb' does not resolve: ValueError: bad config")


def test_worker_that_does_not_resolve(make_service) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, [job("a", worker="svc.missing")]) == (
        "src/svc/registry/settings.json: jobs[0].worker: 'svc.missing' does not resolve: "
        "'svc' defines no 'missing'")
    assert message(make_service, [job("a", worker="other.work")]).startswith(
        "src/svc/registry/settings.json: jobs[0].worker: 'other.work' does not resolve: no package 'other'")


def test_invalid_json_and_not_a_service(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert message(make_service, '[{"jobName": "a",]') .startswith(
        "src/svc/registry/settings.json: line 1: invalid JSON")
    with pytest.raises(ServiceValidationError, match=r"^empty: not a service"):
        (tmp_path / "empty").mkdir()
        load_service(tmp_path / "empty")
    with pytest.raises(ServiceValidationError, match=r"^nowhere: no such file or folder$"):
        load_service("nowhere")
    assert message(make_service, []) == "src/svc/registry/settings.json: no jobs (the array is empty)"


def test_bad_service_name(make_service) -> None:  # type: ignore[no-untyped-def]
    path = make_service("svc", [job("a")], CB["registry"], CB["module"])
    with pytest.raises(ServiceValidationError, match=r"name: bad service name '\.\./x'"):
        load_service(path, name="../x")


def test_unknown_fields_become_warnings(make_service) -> None:  # type: ignore[no-untyped-def]
    spec = load_service(make_service("svc", [job("a", events=["stable-series"])], CB["registry"], CB["module"]))
    check_service(spec)
    assert spec.warnings == ("src/svc/registry/settings.json: jobs[0]: unknown field 'events' kept",)


def test_find_cycle_ignores_unknown_names_and_acyclic_graphs() -> None:
    assert find_cycle({"a": ("b", "ghost"), "b": (), "c": ("a", "b")}) is None
    assert find_cycle({"x": ("y",), "y": ("z",), "z": ("y",)}) == ("y", "z", "y")
