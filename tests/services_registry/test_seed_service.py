"""A service written for dcm-processor loads and plans exactly as the seed's scheduler would.

The expected outcomes below were worked out by hand from the seed's rules
(reference/dcm_processor.md §2.2-2.5), not by running our code:

* sorted by sortPosition (stable, file order on ties) before any callback runs:
  convert(-999) off(1) needs-off(2) broken(5) segment(10) ct-only(10) peek(20) report(30)
  after-broken(999) noparams(999);
* ``off`` is disabled: never called; ``broken`` raises; ``ct-only`` says no to an MR series;
* ``peek`` sees the added_params of callbacks that passed before it;
* restructure_jobs passes: convert, segment (its dependency was accepted earlier in the same
  pass), peek, report (list dependsOn: segment and convert), noparams; needs-off and
  after-broken never get their dependency and are dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services_registry import evaluate_callbacks, load_service, plan_dag, to_mermaid
from services_registry.runtime import LoadedService, loaded

SETTINGS = [  # file order deliberately different from sortPosition
    {"jobName": "report", "worker": "legacy.report", "callback": "legacy.yes",
     "dependsOn": ["segment", "convert"], "sortPosition": 30, "timeout": "30m"},
    {"jobName": "convert", "worker": "legacy.convert", "callback": "legacy.convert_cb",
     "dependsOn": None, "sortPosition": -999, "params": {"clean": True}, "timeout": "1h"},
    {"jobName": "segment", "worker": "legacy.tools.segment", "callback": "legacy.yes",
     "dependsOn": "convert", "sortPosition": 10},
    {"jobName": "broken", "worker": "legacy.report", "callback": "legacy.boom", "sortPosition": 5},
    {"jobName": "after-broken", "worker": "legacy.report", "callback": "legacy.yes", "dependsOn": "broken"},
    {"jobName": "off", "worker": "legacy.report", "callback": "legacy.yes", "disabled": True, "sortPosition": 1},
    {"jobName": "needs-off", "worker": "legacy.report", "callback": "legacy.yes",
     "dependsOn": ["off"], "sortPosition": 2},
    {"jobName": "ct-only", "worker": "legacy.report", "callback": "legacy.ct_only", "sortPosition": 10},
    {"jobName": "peek", "worker": "legacy.report", "callback": "legacy.peek", "sortPosition": 20,
     "priority": "low"},
    {"jobName": "noparams", "worker": "legacy.report", "callback": "legacy.params_probe", "priority": "high"},
]

# The seed's template layout: registry/__init__.py *is* package <install name> ("legacy").
REGISTRY = {
    "__init__.py": """
        from .main import yes, convert_cb, boom, ct_only, peek, params_probe, CALLS
    """,
    "main.py": """
        CALLS = []

        def _seen(jobName, params):
            CALLS.append((jobName, params))

        def yes(jobName, headers, params, added_params, **kwargs):
            _seen(jobName, params)
            return True

        def convert_cb(jobName, headers, params, added_params, **kwargs):
            _seen(jobName, params)
            return (True, {"out": "nifti/" + headers["seriesId"]})

        def boom(jobName, headers, params, added_params, **kwargs):
            _seen(jobName, params)
            raise RuntimeError("boom")

        def ct_only(jobName, headers, params, added_params, **kwargs):
            _seen(jobName, params)
            return headers["Modality"] == "CT", {"never": "stored"}

        def peek(jobName, headers, params, added_params, **kwargs):
            _seen(jobName, params)
            return [True, {"saw": list(added_params)}]

        def params_probe(jobName, headers, params, added_params, **kwargs):
            _seen(jobName, params)
            return (params is None, "not a dict: ignored")
    """,
}
MODULE = {
    "__init__.py": "from .main import report, convert\n",
    "main.py": """
        import numpy_is_not_needed_to_validate  # workers are never imported by the registry

        def report(jobName, headers, params, added_params, **kwargs):
            pass

        def convert(jobName, headers, params, added_params, **kwargs):
            pass
    """,
    "tools/__init__.py": "from .seg import segment\n",
    "tools/seg.py": "def segment(**kwargs):\n    pass\n",
    "requirements.txt": "numpy\n",
    "script.sh": "echo hello\n",
}
HEADERS = {"Modality": "MR", "seriesId": "1.2.3", "studyId": "1.2", "patientId": "P1", "dcmpath": "dicom/1.2/1.2.3"}


@pytest.fixture
def legacy(make_service) -> Path:  # type: ignore[no-untyped-def]
    return make_service("legacy", SETTINGS, REGISTRY, MODULE)


def test_loads_in_file_order_with_seed_defaults(legacy: Path) -> None:
    spec = load_service(legacy)
    assert spec.name == "legacy" and spec.source == "folder"
    assert [j.job_name for j in spec.jobs] == [e["jobName"] for e in SETTINGS]
    jobs = {j.job_name: j for j in spec.jobs}
    assert jobs["report"].depends_on == ("segment", "convert")  # list dependsOn
    assert jobs["segment"].depends_on == ("convert",)  # string dependsOn
    assert jobs["after-broken"].sort_position == 999 and jobs["broken"].params is None
    assert jobs["report"].timeout == 1800.0


def test_evaluates_and_plans_as_the_seed(legacy: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = load_service(legacy)
    with loaded([spec]) as services, caplog.at_level(logging.ERROR):
        evaluation = evaluate_callbacks(services, HEADERS)
        calls = services[0].callback(spec.jobs[0]).__globals__["CALLS"]

    assert evaluation.order == ("convert", "off", "needs-off", "broken", "segment", "ct-only",
                                "peek", "report", "after-broken", "noparams")
    # every callback ran, in sortPosition order, except the disabled one; params as the seed
    assert calls == [("convert", {"clean": True}), ("needs-off", None), ("broken", None), ("segment", None),
                     ("ct-only", None), ("peek", None), ("report", None), ("after-broken", None),
                     ("noparams", None)]
    assert evaluation.selected_names == ("convert", "segment", "peek", "report", "noparams")
    assert evaluation.reasons() == {
        "off": "disabled",
        "needs-off": "dependency 'off' not scheduled (off: disabled)",
        "broken": "callback raised RuntimeError: boom",
        "ct-only": "callback returned False",
        "after-broken": "dependency 'broken' not scheduled (broken: callback raised RuntimeError: boom)",
    }
    assert [r.kind for r in evaluation.rejected] == [
        "disabled", "dependency", "callback_raised", "callback_false", "dependency"]
    # one shared dict keyed by jobName; kept for jobs later dropped for a dependency (seed)
    assert evaluation.added_params == {
        "convert": {"out": "nifti/1.2.3"},
        "needs-off": {},
        "segment": {},
        "peek": {"saw": ["convert", "needs-off", "segment"]},
        "report": {},
        "after-broken": {},
        "noparams": {},
    }
    assert "Exception: broken: boom" in caplog.text

    plan = plan_dag(evaluation.selected)
    # ready order: priority rank (high > default > low), then sortPosition, then name
    assert plan.order == ("noparams", "convert", "segment", "report", "peek")
    assert plan.levels == (("noparams", "convert", "peek"), ("segment",), ("report",))
    assert set(plan.edges) == {("convert", "segment"), ("segment", "report"), ("convert", "report")}
    assert plan.node("report").service == "legacy" and plan.node("report").timeout == 1800.0
    mermaid = to_mermaid(plan)
    assert mermaid.startswith("flowchart TD\n") and mermaid.count("-->") == 3


def test_each_evaluation_starts_fresh_and_never_mutates_inputs(legacy: Path) -> None:
    spec = load_service(legacy)
    headers = dict(HEADERS)
    with loaded([spec]) as services:
        first = evaluate_callbacks(services, headers)
        second = evaluate_callbacks(services, {**headers, "Modality": "CT"})
    assert headers == HEADERS
    assert "ct-only" not in first.added_params  # the seed's mutable default leaked this
    assert second.added_params["ct-only"] == {"never": "stored"}
    assert second.added_params["peek"] == {"saw": ["convert", "needs-off", "segment", "ct-only"]}
    assert spec.jobs[1].params == {"clean": True}


def test_workers_are_resolved_without_importing(legacy: Path) -> None:
    spec = load_service(legacy)
    service = LoadedService(spec)
    try:
        assert all(service.worker_problem(job) is None for job in spec.jobs)
    finally:
        service.close()
