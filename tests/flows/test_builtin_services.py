"""The built-in services, enabled the way a user enables them, run through the real process-series
flow on a real Prefect server: forward sends a CT series to a real DICOM peer (DCMTK storescp)
by its rules and leaves the MR series alone, saying why; what preview and qc ask to show appears
as artifacts on the flow run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from flows import process_series
from services_registry.install import disable_service, enable_service
from storage.models import PeerBase
from tasks.artifacts import job_artifact_key
from tasks.jobs import artifact_key
from tests.factories import make_ct_series, make_small_series
from tests.flows.conftest import prefect_client_env
from tests.flows.test_study_received import artifacts_of
from tests.tasks.helpers import Home, make_home, storescp


@dataclass
class BuiltinRun:
    home: Home
    ct_uid: str
    mr_uid: str
    states: dict[str, Any]
    received: Path
    sent_ct: list[str]


@pytest.fixture(scope="module")
def builtin_run(prefect_server, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("builtin")
    home = make_home(root / "home")
    ct = make_ct_series(6, rows=32, cols=32, seed=11)
    mr = make_small_series(3, seed=12)
    ct_uid, mr_uid = home.receive(ct, calling_ae="CT_ROOM_3"), home.receive(mr, calling_ae="MR_ROOM_1")
    received = root / "pacs"
    with storescp(received) as port:
        home.repo.upsert_peer(PeerBase(name="pacs", ae_title="PACS", host="127.0.0.1", port=port))
        rules = [{"peer": "pacs", "modality": "CT", "calling_ae": ["CT_ROOM_3", "CT_ROOM_4"]}]
        dirs = {"services_dir": home.settings.services_dir, "repository": home.repo, "store": home.store}
        enable_service("forward", params={"rules": rules}, **dirs)
        enable_service("preview", **dirs)
        enable_service("qc", **dirs)
        with home.environ(), prefect_client_env(prefect_server):
            states = {uid: process_series(uid, return_state=True) for uid in (ct_uid, mr_uid)}
    return BuiltinRun(home, ct_uid, mr_uid, states, received, [str(ds.SOPInstanceUID) for ds in ct])


def test_forward_sends_the_series_its_rules_match_to_the_peer(builtin_run: BuiltinRun) -> None:
    run = builtin_run
    assert run.states[run.ct_uid].is_completed(), run.states[run.ct_uid].message
    (forward,) = [j for j in run.home.repo.list_jobs(run.ct_uid) if j.job_name == "forward"]
    assert forward.state == "succeeded"
    arrived = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in run.received.iterdir())
    assert arrived == sorted(run.sent_ct)
    sent = run.home.repo.get_session_data(forward.session_id, "sent", job_name="forward")
    assert [(s["peer"], s["status"], s["instances"]) for s in sent] == [("pacs", "sent", 6)]


def test_forward_leaves_a_series_no_rule_matches_and_says_why(builtin_run: BuiltinRun, prefect_api) -> None:  # type: ignore[no-untyped-def]
    run = builtin_run
    assert run.states[run.mr_uid].is_completed(), run.states[run.mr_uid].message
    assert "forward" not in [j.job_name for j in run.home.repo.list_jobs(run.mr_uid)]
    (dag,) = artifacts_of(run.states[run.mr_uid], artifact_key("series", run.mr_uid).replace("jobs-", "dag-", 1))
    not_selected = dag.data.split("## Not selected", 1)[1]
    assert "`forward` (forward)" in not_selected and "no rule matches modality 'MR', caller 'MR_ROOM_1'" in not_selected


def test_a_disabled_service_no_longer_runs(builtin_run: BuiltinRun, prefect_api) -> None:  # type: ignore[no-untyped-def]
    run = builtin_run
    assert disable_service("forward", repository=run.home.repo) == 1
    with run.home.environ():
        state = process_series(run.ct_uid, return_state=True)
    assert state.is_completed(), state.message
    jobs = run.home.repo.list_jobs(run.ct_uid)
    newest = max(j.session_id for j in jobs)
    assert sorted(j.job_name for j in jobs if j.session_id == newest) == ["preview", "qc"]  # forward is off
    assert not artifacts_of(state, job_artifact_key("forward", "series", run.ct_uid))


def test_preview_and_qc_show_on_the_flow_run(builtin_run: BuiltinRun, prefect_api) -> None:  # type: ignore[no-untyped-def]
    run = builtin_run
    for uid in (run.ct_uid, run.mr_uid):
        states = {j.job_name: j.state for j in run.home.repo.list_jobs(uid) if j.job_name in {"preview", "qc"}}
        assert states == {"preview": "succeeded", "qc": "succeeded"}, states
        (preview,) = artifacts_of(run.states[uid], job_artifact_key("preview", "series", uid))
        assert preview.data.count("](data:image/png;base64,") >= 1
        (qc,) = artifacts_of(run.states[uid], job_artifact_key("qc", "series", uid))
        assert qc.data.startswith("# QC") and uid in qc.data
