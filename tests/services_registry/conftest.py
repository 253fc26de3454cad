"""Helpers to write real dcm-processor service folders and DICOM files for the tests."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

ServiceFactory = Callable[..., Path]


def write_service(
    root: Path,
    settings: Any,
    registry: Mapping[str, str] | None = None,
    module: Mapping[str, str] | None = None,
) -> Path:
    """Write a service folder: ``registry/settings.json`` plus the given source files.

    ``registry``/``module`` map a path relative to that folder to its (dedented) source.
    """
    (root / "registry").mkdir(parents=True, exist_ok=True)
    (root / "module").mkdir(parents=True, exist_ok=True)
    text = settings if isinstance(settings, str) else json.dumps(settings, indent=2)
    (root / "registry" / "settings.json").write_text(text)
    for side, files in (("registry", registry or {}), ("module", module or {})):
        for rel, source in files.items():
            path = root / side / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def make_service(tmp_path: Path) -> ServiceFactory:
    """``make_service(name, settings, registry={...}, module={...})`` → folder under tmp_path."""

    def make(name: str, settings: Any, registry: Mapping[str, str] | None = None,
             module: Mapping[str, str] | None = None) -> Path:
        return write_service(tmp_path / "src" / name, settings, registry, module)

    return make


@pytest.fixture(autouse=True)
def no_module_leaks() -> Iterator[None]:
    """Every test must leave sys.modules without new plain names from service code."""
    before = set(sys.modules)
    yield
    leaked = {
        name for name in set(sys.modules) - before
        if name.split(".")[0] in {"legacy", "common", "series_summary", "series_summary_py", "demo", "svc"}
    }
    assert not leaked, f"service modules leaked into sys.modules: {sorted(leaked)}"


@pytest.fixture
def dicom_dir(tmp_path: Path) -> Path:
    """A folder with two real series: CT_small.dcm and MR_small.dcm (pydicom test data),
    each in its own sub-folder, plus a file that is not DICOM."""
    root = tmp_path / "incoming"
    for name, sub in (("CT_small.dcm", "ct"), ("MR_small.dcm", "mr")):
        (root / sub).mkdir(parents=True)
        shutil.copy(get_testdata_file(name), root / sub / name)
    (root / "README.txt").write_text("not DICOM")
    return root


def series_uid_of(name: str) -> str:
    """SeriesInstanceUID of a pydicom test file."""
    return str(pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True).SeriesInstanceUID)
