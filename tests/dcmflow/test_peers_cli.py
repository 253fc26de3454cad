"""``dcmflow peers`` through Typer's CliRunner: add, list, remove, and a real C-ECHO to DCMTK's storescp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dcmflow.cli import app
from tests.tasks.helpers import free_port, storescp

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def peers(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["peers", *map(str, args)])


def test_add_list_replace_remove() -> None:
    assert peers("add", "PACS", "ORTHANC", "pacs.example.org", 4242, "--receive-results").exit_code == 0
    assert peers("add", "CT1", "CT_SCANNER_1", "10.0.0.21", 104, "-d", "CT, room 3").exit_code == 0
    listed = {p["name"]: p for p in json.loads(peers("list", "--json").stdout)}
    assert listed["PACS"]["ae_title"] == "ORTHANC" and listed["PACS"]["receive_results"] is True
    assert listed["CT1"]["allow_send"] is True and listed["CT1"]["description"] == "CT, room 3"
    assert peers("add", "CT1", "CT_SCANNER_1", "10.0.0.22", 11112).exit_code == 0  # same name: replaced
    listed = {p["name"]: p for p in json.loads(peers("list", "--json").stdout)}
    assert (listed["CT1"]["host"], listed["CT1"]["port"]) == ("10.0.0.22", 11112) and len(listed) == 2
    assert peers("remove", "CT1").exit_code == 0
    assert [p["name"] for p in json.loads(peers("list", "--json").stdout)] == ["PACS"]


def test_mistakes_are_one_line() -> None:
    for result, text in [
        (peers("add", "X", "A" * 17, "h", 104), "1-16 printable characters"),
        (peers("remove", "nosuch"), "no peer named 'nosuch'"),
        (peers("echo", "nosuch"), "no peer named 'nosuch'"),
    ]:
        assert result.exit_code == 1 and text in result.stderr and "Traceback" not in result.output


def test_echo_reaches_a_real_peer_and_says_when_nothing_answers(tmp_path: Path) -> None:
    with storescp(tmp_path / "in", ae_title="STORESCP") as port:
        assert peers("add", "PACS", "STORESCP", "127.0.0.1", port).exit_code == 0
        result = peers("echo", "PACS", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "Success"
    assert peers("add", "GONE", "GONE", "127.0.0.1", free_port()).exit_code == 0
    gone = peers("echo", "GONE", "--timeout", "3")
    assert gone.exit_code == 1 and "association not established" in gone.stderr
