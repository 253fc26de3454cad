"""`dcmflow receive` runs the completeness monitor: a series sent over the network becomes
stable in the database and its ``dicom.series.stable`` event reaches the real Prefect server."""

from __future__ import annotations

import time
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from receiver import status
from receiver.events import SERIES_STABLE, STUDY_RECEIVED, STUDY_STABLE, event_id, series_resource_id
from tests.factories import make_small_series
from tests.receiver.conftest import AE_TITLE, Env, free_port
from tests.receiver.test_events import read_events
from tests.receiver.test_resilience import ReceiverProcess


def _associate(port: int):  # type: ignore[no-untyped-def]
    """An established MR storage association from AE MODALITY."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


def test_received_series_becomes_stable_and_its_event_reaches_prefect(env: Env, prefect_server: Any) -> None:
    datasets = make_small_series(6, seed=97)
    series_uid, study_uid = datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID
    receiver = ReceiverProcess(
        env.root, free_port(), workers=1, extra_env={**prefect_server.env(), "DCMFLOW_STABLE_AGE": "1"}
    )
    try:
        assoc = _associate(receiver.port)
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        assoc.release()

        deadline = time.monotonic() + 60
        series = env.repo.get_series(series_uid)
        while time.monotonic() < deadline and (series is None or series.state != "stable"):
            time.sleep(0.2)
            series = env.repo.get_series(series_uid)
        assert series is not None and series.state == "stable", receiver.output()
        assert series.instance_count == 6 and series.revision == 1

        events = read_events(
            str(prefect_server.api_url),
            [series_resource_id(series_uid), f"dicom.study.{study_uid}"],
            expect=3,
            timeout=60,
        )
        by_name = {e["event"]: e for e in events}
        assert set(by_name) == {STUDY_RECEIVED, SERIES_STABLE, STUDY_STABLE}, (events, receiver.output())
        stable = by_name[SERIES_STABLE]
        assert stable["id"] == str(event_id(SERIES_STABLE, series_resource_id(series_uid), 1))
        assert stable["payload"]["instance_count"] == 6
        assert stable["payload"]["calling_ae"] == "MODALITY"
        assert f"events: {prefect_server.api_url}" in receiver.output()
    finally:
        assert receiver.terminate() == 0, receiver.output()


def test_a_series_that_states_its_size_is_stable_when_complete_not_after_the_quiet_period(
    env: Env, prefect_server: Any
) -> None:
    """(0020,1209) Number of Series Related Instances is the expected count: with a quiet period
    of an hour the series is still stable as soon as all its instances are in and the
    association that sent them is closed."""
    datasets = make_small_series(4, seed=98)
    for ds in datasets:
        ds.NumberOfSeriesRelatedInstances = 4
    series_uid = datasets[0].SeriesInstanceUID
    receiver = ReceiverProcess(
        env.root, free_port(), workers=1, extra_env={**prefect_server.env(), "DCMFLOW_STABLE_AGE": "3600"}
    )
    try:
        assoc = _associate(receiver.port)
        for ds in datasets[:3]:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        time.sleep(3)  # recorded by now, but one short of the count: not stable
        series = env.repo.get_series(series_uid)
        assert series is not None and series.instance_count == 3 and series.state != "stable", receiver.output()
        assert series.expected_instance_count == 4
        assert assoc.send_c_store(datasets[3]).Status == status.SUCCESS
        time.sleep(3)  # the count is reached, but the association is still open: not stable
        series = env.repo.get_series(series_uid)
        assert series is not None and series.instance_count == 4 and series.state != "stable", receiver.output()
        assoc.release()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (series is None or series.state != "stable"):
            time.sleep(0.2)
            series = env.repo.get_series(series_uid)
        assert series is not None and series.state == "stable", receiver.output()
        events = read_events(str(prefect_server.api_url), [series_resource_id(series_uid)], expect=1, timeout=60)
        (stable,) = [e for e in events if e["event"] == SERIES_STABLE]
        assert stable["payload"]["reason"] == "expected_count"
        assert stable["payload"]["expected_instance_count"] == 4
    finally:
        assert receiver.terminate() == 0, receiver.output()


def _wait_stable(env: Env, series_uid: str, receiver: ReceiverProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    series = env.repo.get_series(series_uid)
    while time.monotonic() < deadline and (series is None or series.state != "stable"):
        time.sleep(0.2)
        series = env.repo.get_series(series_uid)
    assert series is not None and series.state == "stable", receiver.output()


def _send_series_one_by_one(env: Env, receiver: ReceiverProcess, *series: list[Any]) -> None:
    """C-STORE each series in its own association, wait until it is stable, then idle 2 s more."""
    for datasets in series:
        assoc = _associate(receiver.port)
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        assoc.release()
        _wait_stable(env, datasets[0].SeriesInstanceUID, receiver)
    time.sleep(2)


def _emitter_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "receiver.events" in line]


def test_without_a_prefect_api_url_the_receiver_says_once_that_events_are_off(env: Env) -> None:
    """Series still become stable; the emitter warns once at start and stays quiet over the ticks."""
    first, second = make_small_series(2, seed=91), make_small_series(2, seed=92)
    receiver = ReceiverProcess(env.root, free_port(), workers=1, extra_env={"DCMFLOW_STABLE_AGE": "1"})
    try:
        _send_series_one_by_one(env, receiver, first, second)  # several ticks apart: two refused emits
    finally:
        assert receiver.terminate() == 0, receiver.output()
    lines = _emitter_lines(receiver.output())
    assert len(lines) == 1, receiver.output()
    assert "WARNING" in lines[0]
    assert lines[0].endswith(
        "events are off: no PREFECT_API_URL; series are declared stable but no flow starts (dcmflow up sets it)"
    )
    assert "events: http" not in receiver.output()


def test_an_unreachable_prefect_is_one_warning_with_the_reason(env: Env) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    first, second = make_small_series(2, seed=93), make_small_series(2, seed=94)
    receiver = ReceiverProcess(
        env.root, free_port(), workers=1, extra_env={"PREFECT_API_URL": dead, "DCMFLOW_STABLE_AGE": "1"}
    )
    try:
        _send_series_one_by_one(env, receiver, first, second)  # two failed flushes (and the study events)
    finally:
        assert receiver.terminate() == 0, receiver.output()
    output = receiver.output()
    assert f"events: {dead}" in output
    lines = _emitter_lines(output)
    assert len(lines) == 1, output
    assert "WARNING" in lines[0] and f"cannot deliver to Prefect at {dead}: connection refused" in lines[0]
    assert env.repo.get_series(first[0].SeriesInstanceUID).emitted_revision is None  # type: ignore[union-attr]
