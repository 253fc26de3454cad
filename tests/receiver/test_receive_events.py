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
