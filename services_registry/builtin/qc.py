"""QC: a per-series quality report, failing the job only when the user's thresholds say so.

Enable it (thresholds are optional; by default the job never fails)::

    dcmflow services enable qc -p 'fail_on={"missing_instances": 0, "gaps": 0, "mixed_sizes": true}'

For every series it checks what a reader of the images would trip over: the instance count
against the count the headers announce, missing and repeated Instance Numbers, the spacing of
slices along the slice normal (gaps and outliers, with the positions between which they occur),
mixed orientations and matrix sizes, and several images at one position. The report goes to
``$DATA/<output>/<seriesId>.md`` (shown on the flow run) and ``.json``; the worker's result
(session data) sums it up. Count thresholds fail the job when the measure is *above* the limit
(``0`` = any), ``mixed_*`` thresholds when ``true`` and the series is mixed; the report is
written before the job fails, so it is stored either way. ``gap_factor`` (1.5) and
``spacing_tolerance`` (0.1) tune what counts as a gap (a step above 1.5 × the median) and an
outlier (a step more than 10 % off the median). Single images, multi-frame instances,
localizers and instances without pixels get a report that says what could not be checked.

:func:`check_series` is the pure part (slices in, :class:`QcReport` out) and reads headers only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from services_registry import Service
from services_registry.builtin._qc_checks import check_series
from services_registry.builtin._qc_report import (
    DEFAULT_GAP_FACTOR,
    DEFAULT_SPACING_TOLERANCE,
    FAIL_ON_DEFAULTS,
    Finding,
    QcReport,
    apply_thresholds,
    parse_fail_on,
    render_markdown,
)
from services_registry.builtin._series import data_dir, output_dir, read_slices, series_folder

__all__ = [
    "service",
    "qc",
    "accept_every_series",
    "QcFailed",
    "QcReport",
    "Finding",
    "FAIL_ON_DEFAULTS",
    "check_series",
    "parse_fail_on",
    "apply_thresholds",
    "render_markdown",
]

service = Service("qc", description="Per-series QC report: counts, missing instances, spacing gaps, mixed geometry")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
"""A series UID is a safe file name (PS3.5 §9.1); anything else is written as ``series``."""


class QcFailed(Exception):
    """The series exceeded a threshold of ``fail_on``; the report was written first."""


def _float_param(params: Mapping[str, Any], name: str, default: float, minimum: float) -> float:
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum:
        raise ValueError(f"qc: {name} must be a number above {minimum:g}, not {value!r}")
    return float(value)


@service.job(
    name="qc",
    timeout="5m",
    sort_position=10,
    params={
        "output": "qc",
        "fail_on": dict(FAIL_ON_DEFAULTS),
        "gap_factor": DEFAULT_GAP_FACTOR,
        "spacing_tolerance": DEFAULT_SPACING_TOLERANCE,
    },
    description="Write a QC report of the series; fail only over the fail_on thresholds",
)
def qc(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Write ``$DATA/<output>/<seriesId>.md`` and ``.json``; raise :class:`QcFailed` over a threshold."""
    params = params or {}
    fail_on = parse_fail_on(params.get("fail_on"))
    gap_factor = _float_param(params, "gap_factor", DEFAULT_GAP_FACTOR, 1.0)
    tolerance = _float_param(params, "spacing_tolerance", DEFAULT_SPACING_TOLERANCE, 0.0)
    if "dcmpath" not in headers:
        raise ValueError("qc: the headers name no series folder (dcmpath)")
    folder = series_folder(headers)
    if not folder.is_dir():
        raise FileNotFoundError(f"qc: series folder {headers['dcmpath']} does not exist under $DATA")
    files = [p for p in folder.iterdir() if p.is_file()]
    slices = read_slices(folder)
    if not slices:
        raise ValueError(f"qc: no DICOM instance in {headers['dcmpath']} ({len(files)} other file(s))")
    report = check_series(slices, gap_factor=gap_factor, spacing_tolerance=tolerance, ignored_files=len(files) - len(slices))
    report = apply_thresholds(report, fail_on)

    uid = str(headers.get("seriesId") or report.series_uid)
    name = uid if _UID.match(uid) else "series"
    try:
        relative = (data_dir() / str(params.get("output") or "qc")).resolve().relative_to(data_dir().resolve()).as_posix()
    except ValueError:
        raise ValueError(f"qc: output {params.get('output')!r} is not a folder under $DATA") from None
    out = output_dir(params, "qc")
    markdown, data = out / f"{name}.md", out / f"{name}.json"
    markdown.write_text(render_markdown(report), encoding="utf-8")
    data.write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    for finding in report.findings:
        print(f"qc {finding.severity}: {finding.check}: {finding.message}")
    print(f"qc: {report.instances} instances, {report.problems} problem(s), {'passed' if report.passed else 'FAILED'}")
    if report.failed:
        raise QcFailed(f"QC failed thresholds: {'; '.join(report.failed)} (report {relative}/{name}.md)")
    measures = report.measures()
    return {
        "findings": report.problems,
        "passed": True,
        "instances": report.instances,
        "expected": report.expected,
        "expected_source": report.expected_source,
        "missing_instances": measures["missing_instances"],
        "gaps": measures["gaps"],
        "spacing_outliers": measures["spacing_outliers"],
        "duplicate_positions": measures["duplicate_positions"],
        "orientations": len(report.orientation_groups),
        "sizes": len(report.size_groups),
        "not_checked": report.not_checked,
        "report": f"{relative}/{name}.json",
        "artifacts": [{"type": "markdown", "path": f"{relative}/{name}.md", "title": "QC"}],
    }


@qc.callback
def accept_every_series(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> bool:
    """QC applies to every series: the report says what could not be checked."""
    return True
