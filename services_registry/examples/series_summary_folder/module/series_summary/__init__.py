"""Workers of the series-summary example (dcm-processor calling convention).

Each runs in its own process with ``DATA``, ``MODULES`` and ``LOGS`` set; the series' files
are in ``$DATA/<headers['dcmpath']>``.
"""

import json
import os
from pathlib import Path

from series_summary.report import render_markdown


def _output_dir(params):
    out = Path(os.getenv("DATA", ".")) / (params or {}).get("output", "summaries")
    out.mkdir(parents=True, exist_ok=True)
    return out


def worker(jobName, headers, params, added_params, **kwargs):
    """Write ``$DATA/<output>/<seriesId>.json``: instance count, modality, description."""
    series_dir = Path(os.getenv("DATA", ".")) / headers["dcmpath"]
    instances = 0
    for path in sorted(series_dir.iterdir()):
        if path.is_file():
            with path.open("rb") as fh:
                instances += fh.read(132)[128:132] == b"DICM"
    summary = {
        "seriesId": headers["seriesId"],
        "studyId": headers.get("studyId"),
        "patientId": headers.get("patientId"),
        "modality": headers.get("Modality"),
        "description": headers.get("SeriesDescription", ""),
        "instances": instances,
    }
    target = _output_dir(params) / added_params[jobName]["file"]
    target.write_text(json.dumps(summary, indent=2))
    return str(target)


def markdown_worker(jobName, headers, params, added_params, **kwargs):
    """Render the JSON summary written by ``series-summary`` as markdown next to it."""
    source = _output_dir(params) / added_params[jobName]["source"]
    target = source.with_suffix(".md")
    target.write_text(render_markdown(json.loads(source.read_text())))
    return str(target)
