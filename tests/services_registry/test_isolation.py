"""Callback and worker packages share top-level names; services must not see each other."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from services_registry import ServiceValidationError, check_service, evaluate_callbacks, load_service
from services_registry.runtime import loaded


def _service(make_service, name: str, job: str, *, worker: str = "common.work"):  # type: ignore[no-untyped-def]
    """A service whose registry/ and module/ both hold a package named ``common``."""
    registry = {
        "common/__init__.py": """
            from .helpers import tag              # relative import
            import common.config as cfg           # absolute intra-package import

            def cb(jobName, headers, params, added_params, **kwargs):
                return True, {"who": tag(), "cfg": cfg.NAME}

            def lazy(jobName, headers, params, added_params, **kwargs):
                import common.helpers             # imported while the callback runs
                from common.config import NAME
                return True, {"who": common.helpers.tag(), "cfg": NAME}
        """,
        "common/helpers.py": f"def tag():\n    return {name!r}\n",
        "common/config.py": f"NAME = {name + '-config'!r}\n",
    }
    module = {"common/__init__.py": f"def work(**kwargs):\n    return {name!r}\n"}
    settings = [
        {"jobName": f"{job}-cb", "worker": worker, "callback": "common.cb"},
        {"jobName": f"{job}-lazy", "worker": "common.work", "callback": "common.lazy"},
    ]
    return make_service(name, settings, registry, module)


def test_two_services_with_the_same_package_names_stay_apart(make_service) -> None:  # type: ignore[no-untyped-def]
    alpha = load_service(_service(make_service, "alpha", "a"))
    beta = load_service(_service(make_service, "beta", "b"))
    check_service(alpha)
    check_service(beta, installed=[alpha])
    with loaded([alpha, beta]) as services:
        evaluation = evaluate_callbacks(services, {"seriesId": "1"})
    assert evaluation.added_params == {
        "a-cb": {"who": "alpha", "cfg": "alpha-config"},
        "a-lazy": {"who": "alpha", "cfg": "alpha-config"},
        "b-cb": {"who": "beta", "cfg": "beta-config"},
        "b-lazy": {"who": "beta", "cfg": "beta-config"},
    }
    assert not [k for k in sys.modules if k == "common" or k.startswith("common.")]


def test_an_existing_plain_module_is_shadowed_only_while_the_service_runs(make_service) -> None:  # type: ignore[no-untyped-def]
    alpha = load_service(_service(make_service, "alpha", "a"))
    outsider = types.ModuleType("common")
    sys.modules["common"] = outsider
    try:
        with loaded([alpha]) as services:
            evaluation = evaluate_callbacks(services, {})
        assert evaluation.added_params["a-lazy"]["who"] == "alpha"
        assert sys.modules["common"] is outsider
    finally:
        del sys.modules["common"]


def test_callbacks_never_see_the_worker_package(
    make_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """registry/common has no ``work``: the module/ package of the same name is invisible."""
    monkeypatch.chdir(tmp_path)
    path = make_service("alpha", [{"jobName": "x", "worker": "common.work", "callback": "common.work"}],
                        {"common/__init__.py": "X = 1\n"}, {"common/__init__.py": "def work(**kw):\n    pass\n"})
    with pytest.raises(ServiceValidationError) as info:
        check_service(load_service(path))
    assert str(info.value) == (
        "src/alpha/registry/settings.json: jobs[0].callback: 'common.work' does not resolve: "
        "AttributeError: module 'common' has no attribute 'work'"
    )


def test_a_worker_resolves_only_in_its_own_service(make_service) -> None:  # type: ignore[no-untyped-def]
    alpha = load_service(_service(make_service, "alpha", "a"))
    gamma = _service(make_service, "gamma", "g", worker="common.other")
    with pytest.raises(ServiceValidationError, match=r"jobs\[0\]\.worker: 'common.other' does not resolve: "
                                                     r"'common' defines no 'other'"):
        check_service(load_service(gamma), installed=[alpha])


def test_seed_layout_registry_folder_is_the_install_name(tmp_path: Path, make_service) -> None:  # type: ignore[no-untyped-def]
    """dcm-processor's template: registry/__init__.py is package <name>; --name renames it."""
    settings = {"jobName": "tempJob", "worker": "svc.worker", "callback": "svc.callback", "dependsOn": None,
                "priority": "default", "timeout": "1h", "params": {}, "sortPosition": 0,
                "description": "Template Service"}
    path = make_service(
        "temp", settings,
        {"__init__.py": "from .main import callback\n",
         "main.py": "def callback(jobName, headers, params, added_params, **kwargs):\n"
                    "    return True, {'custom-data': 'Some new data'}\n"},
        {"__init__.py": "from .main import worker\n", "main.py": "def worker(**kwargs):\n    pass\n"},
    )
    with pytest.raises(ServiceValidationError, match="'svc.callback' does not resolve"):
        check_service(load_service(path))  # installed as "temp", "svc" means nothing
    spec = load_service(path, name="svc")
    check_service(spec)
    with loaded([spec]) as services:
        evaluation = evaluate_callbacks(services, {})
    assert evaluation.added_params == {"tempJob": {"custom-data": "Some new data"}}
    assert spec.jobs[0].params == {} and spec.jobs[0].sort_position == 0


def test_evaluation_survives_other_threads_importing_meanwhile(make_service) -> None:  # type: ignore[no-untyped-def]
    """Prefect's own threads import modules while callbacks run in a flow (seen in CI as
    'dictionary changed size during iteration'); isolation must not trip over them."""
    import threading

    alpha = load_service(_service(make_service, "alpha", "a"))
    stop = threading.Event()

    def churn() -> None:  # another thread importing and unloading modules, as fast as it can
        n = 0
        while not stop.is_set():
            name = f"_dcmflow_churn_{n % 64}"
            sys.modules[name] = types.ModuleType(name)
            sys.modules.pop(f"_dcmflow_churn_{(n + 32) % 64}", None)
            n += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so a race shows at once
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(20):
            with loaded([alpha]) as services:
                evaluation = evaluate_callbacks(services, {})
            assert evaluation.rejected == ()
            assert evaluation.selected_names == ("a-cb", "a-lazy")
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        for key in [k for k in sys.modules.copy() if k.startswith("_dcmflow_churn_")]:
            del sys.modules[key]
