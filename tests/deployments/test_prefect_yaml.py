"""deployments/prefect.yaml: what it declares, that `dcmflow up` serves exactly that, and that
`prefect deploy --all` + a process worker run it on a server the user already runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.loader import (
    PREFECT_YAML,
    DeclarationError,
    build_automations,
    build_triggers,
    flow_run_env,
    read_specs,
    read_work_queues,
    runner_deployments,
    triggered_by,
)

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "process-series/process-series": ("dicom.series.stable", "dicom.series.*"),
    "process-study/process-study": ("dicom.study.stable", "dicom.study.*"),
    "study-received/study-received": ("dicom.study.received", "dicom.study.*"),
    "reprocess/reprocess": None,
    "import-folder/import-folder": None,
    "run-job/run-job": None,  # started by the series flow for channel jobs (tasks.dispatch)
}


def test_the_declaration_names_the_six_deployments_and_their_triggers() -> None:
    specs = {spec.full_name: spec for spec in read_specs()}
    assert set(specs) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        triggers = specs[name].triggers
        if expected is None:
            assert triggers == []
            continue
        trigger, *reruns = triggers
        event, resource = expected
        assert trigger["expect"] == [event] and trigger["match"] == {"prefect.resource.id": resource}
        # typed values come from the payload; labels (strings) would make the server refuse the run
        templates = [v for v in trigger["parameters"].values() if "{{" in v]
        assert templates and all(v.startswith("{{ event.payload") or v == "{{ event.event }}" for v in templates)
        if name.startswith("process-"):  # a crashed run (its worker died) runs again: test_worker_death.py
            (rerun,) = reruns
            assert rerun["expect"] == ["prefect.flow-run.Crashed"] and rerun["match"] == {"prefect.resource.id": "prefect.flow-run.*"}
            flow = name.split("/")[0]
            assert {"prefect.resource.role": "deployment", "prefect.resource.name": flow} in rerun["match_related"]
            assert set(rerun["parameters"]) == set(trigger["parameters"])  # the same run, from the crashed run's parameters
        else:
            assert reruns == []
    assert specs["process-series/process-series"].triggers[0]["parameters"]["revision"] == "{{ event.payload.revision }}"


def test_runs_send_heartbeats_and_a_zombie_automation_crashes_the_silent_ones() -> None:
    """Prefect's documented zombie-flow automation, for dcmflow's runs only, with a window
    longer than the declared heartbeat (else live runs would be crashed between beats)."""
    heartbeat = int(flow_run_env()["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    assert heartbeat >= 30  # Prefect's minimum
    (zombie,) = build_automations()
    trigger = zombie.trigger.model_dump(mode="json")
    assert trigger["posture"] == "Proactive" and trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert trigger["within"] >= 2 * heartbeat
    assert trigger["match_related"] == {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.dcmflow"}
    assert [(a.type, getattr(a, "state", None)) for a in zombie.actions] == [("change-flow-run-state", "CRASHED")]
    assert all("dcmflow" in spec.tags for spec in read_specs())  # every run is watched
    on_pool = runner_deployments(work_pool="p")
    assert all(d.job_variables == {"env": flow_run_env()} for d in on_pool)  # the workers' runs beat too


def test_served_deployments_are_the_declared_ones() -> None:
    """One list: `dcmflow up` builds its deployments from the same file `prefect deploy` reads."""
    document = yaml.safe_load(PREFECT_YAML.read_text())
    served = {d.name: d for d in runner_deployments()}
    assert set(served) == {entry["name"] for entry in document["deployments"]}
    for entry in document["deployments"]:
        deployment = served[entry["name"]]
        assert deployment.entrypoint == entry["entrypoint"]  # a module path, not a file of this checkout
        assert sorted(deployment.tags) == sorted(entry["tags"])
        declared = entry.get("triggers", [])
        assert len(deployment.triggers) == len(declared)
        for built, raw in zip(deployment.triggers, declared, strict=True):
            dumped = built.model_dump(mode="json")
            for key, value in raw.items():
                assert dumped[key] == (sorted(value) if key == "expect" else value), key
        schema = deployment._parameter_openapi_schema.model_dump() if hasattr(deployment, "_parameter_openapi_schema") else {}
        properties = (schema or deployment.parameter_openapi_schema.model_dump())["properties"]
        assert properties and all(p.get("description") for p in properties.values()), entry["name"]


def test_the_deployment_an_event_starts_is_read_from_the_declaration() -> None:
    assert triggered_by("dicom.series.stable").full_name == "process-series/process-series"
    assert triggered_by("dicom.study.stable").full_name == "process-study/process-study"
    with pytest.raises(DeclarationError, match="0 deployments are started by dicom.nothing"):
        triggered_by("dicom.nothing")


def test_event_started_runs_go_to_live_and_manual_ones_to_backfill_which_waits() -> None:
    queues = read_work_queues()
    assert queues["live"] < queues["backfill"]  # priority 1 is taken first
    assert {s.name: s.work_queue for s in read_specs()} == {
        "process-series": "live",
        "process-study": "live",
        "study-received": "live",
        "reprocess": "backfill",
        "import-folder": "backfill",
        "run-job": "live",  # its default; the series flow names the channel's queue
    }
    on_pool = {d.name: (d.work_pool_name, d.work_queue_name) for d in runner_deployments(work_pool="p")}
    assert on_pool["process-series"] == ("p", "live") and on_pool["reprocess"] == ("p", "backfill")
    assert {d.work_pool_name for d in runner_deployments()} == {None}  # served: no pool


def test_a_bad_declaration_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n    entrypoint: flows/process.py:process_series\n")
    with pytest.raises(DeclarationError, match="module-path entrypoint"):
        read_specs(bad)
    with pytest.raises(DeclarationError, match="cannot read"):
        read_specs(tmp_path / "missing.yaml")


def test_unnamed_triggers_are_named_as_prefect_deploy_names_them() -> None:
    (spec,) = [s for s in read_specs() if s.name == "process-series"]
    unnamed = type(spec)(**{**spec.__dict__, "triggers": [{k: v for k, v in spec.triggers[0].items() if k != "name"}]})
    assert [t.name for t in build_triggers(unnamed)] == ["process-series__automation_1"]


def _prefect(server, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCMFLOW_")}
    env.update(server.env())
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_prefect_deploy_all_and_a_process_worker_run_the_declaration(prefect_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert _prefect(prefect_server, "work-pool", "create", "dcmflow", "--type", "process", "--overwrite").returncode == 0
    deployed = _prefect(prefect_server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    api = prefect_server.api_url
    declared = {spec.full_name: spec.work_queue for spec in read_specs()}
    for name in EXPECTED:
        found = httpx.get(f"{api}/deployments/name/{name}", timeout=10)
        assert found.status_code == 200, name
        assert found.json()["work_pool_name"] == "dcmflow"
        assert found.json()["work_queue_name"] == declared[name]
    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=10).json()
    names = {a["name"] for a in automations}
    assert {"dicom-series-stable", "dicom-study-stable", "new-study"} <= names
    # a run on the pool, taken by a worker: the module entrypoint loads where dcmflow is installed
    home = tmp_path / "home"
    run = _prefect(prefect_server, "deployment", "run", "process-series/process-series", "--param", 'series_uid="1.2.3.4"')
    assert run.returncode == 0, run.stdout + run.stderr
    worker_env_home = {"DCMFLOW_HOME": str(home)}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DCMFLOW_")}, **prefect_server.env(), **worker_env_home}
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "dcmflow", "--run-once"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    runs = httpx.post(
        f"{api}/flow_runs/filter",
        json={"deployments": {"name": {"any_": ["process-series"]}}, "work_pools": {"name": {"any_": ["dcmflow"]}}},
        timeout=10,
    ).json()
    (ran,) = [r for r in runs if r["parameters"].get("series_uid") == "1.2.3.4"]
    # the flow ran (in the worker's process) and failed the way a bad UID fails: one clear line
    assert ran["state"]["type"] == "FAILED"
    assert "1.2.3.4" in ran["state"]["message"]
