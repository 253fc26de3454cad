"""Callbacks run in their service's environment: a service with module/requirements.txt in its
own venv (one child process), the others in dcmflow's interpreter (another child), with
added_params handed across in sortPosition order."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from services_registry import load_service
from services_registry.callbacks import evaluate_isolated
from tasks.venvs import callback_interpreter
from tests.tasks.helpers import job, write_service

WHERE = '''
import os, sys

def where(jobName, headers, params, added_params, **kwargs):
    return True, {"prefix": sys.prefix, "pid": os.getpid(), "saw": sorted(added_params)}
'''


def test_each_environment_gets_its_own_process(tmp_path: Path) -> None:
    own = load_service(write_service(tmp_path / "src", "own-env", [
        job("in-venv", "record", callback="where", sortPosition=2),
        job("in-venv-too", "record", callback="where", sortPosition=4),
    ], callbacks=WHERE, requirements="pydicom\n"))  # already satisfied: the venv builds offline
    shared = load_service(write_service(tmp_path / "src", "shared-env", [
        job("here", "record", callback="where", sortPosition=1),
        job("here-too", "record", callback="where", sortPosition=3),
    ], callbacks=WHERE))

    evaluation = evaluate_isolated([own, shared], {"seriesId": "1"}, interpreter=callback_interpreter(tmp_path / "venvs"))

    added = evaluation.added_params
    assert list(added) == ["here", "in-venv", "here-too", "in-venv-too"]  # sortPosition order
    venv = str(next((tmp_path / "venvs" / "own-env").iterdir()))
    assert added["in-venv"]["prefix"] == added["in-venv-too"]["prefix"] == venv
    assert added["here"]["prefix"] == added["here-too"]["prefix"] == sys.prefix
    # one process per environment, reused; neither is this one
    assert added["in-venv"]["pid"] == added["in-venv-too"]["pid"] != added["here"]["pid"] == added["here-too"]["pid"]
    assert os.getpid() not in {added["here"]["pid"], added["in-venv"]["pid"]}
    assert added["in-venv-too"]["saw"] == ["here", "here-too", "in-venv"]
