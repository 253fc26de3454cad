"""A built-in service module imports nothing heavy: its callbacks run in a child process per
series (services_registry._callback_host), which imports the module to call them. numpy,
Pillow, pydicom, pydantic, nibabel and the anonymizer's table belong to the workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("numpy", "PIL", "pydicom", "pydantic", "pydantic_settings", "nibabel", "dicomanonymizer", "dcm2niix")


@pytest.mark.parametrize("name", ["preview", "qc", "nifti", "deid", "forward"])
def test_importing_a_builtin_service_imports_nothing_heavy(name: str) -> None:
    code = (
        f"import json, sys; import services_registry.builtin.{name}; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(done.stdout) == []
