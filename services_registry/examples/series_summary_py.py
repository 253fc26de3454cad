"""The series-summary example written with the Python API.

Install it with ``dcmflow services install services_registry/examples/series_summary_py.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from services_registry import Service

def _is_dicom(path: Path) -> bool:
    """PS3.10 §7.1: a DICOM file has "DICM" after a 128-byte preamble."""
    with path.open("rb") as fh:
        return fh.read(132)[128:] == b"DICM"


service = Service("series-summary-py", description="Summarise every CT/MR series as JSON")


@service.job(
    name="py-series-summary",
    timeout="10m",
    priority="default",
    sort_position=10,
    params={"modalities": ["CT", "MR"], "output": "summaries-py"},
)
def summarize(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> str:
    """Write ``$DATA/<output>/<seriesId>.json`` with instance count, modality and description."""
    data = Path(os.getenv("DATA", "."))
    series_dir = data / headers["dcmpath"]
    instances = sum(1 for p in series_dir.iterdir() if p.is_file() and _is_dicom(p))
    out = data / params["output"]
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{headers['seriesId']}.json"
    target.write_text(
        json.dumps(
            {
                "seriesId": headers["seriesId"],
                "modality": headers.get("Modality"),
                "description": headers.get("SeriesDescription", ""),
                "instances": instances,
            },
            indent=2,
        )
    )
    return str(target)


@summarize.callback
def accept(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Select CT and MR series; tell the worker which modality matched."""
    modality = str(headers.get("Modality", "")).upper()
    return modality in params["modalities"], {"modality": modality}
