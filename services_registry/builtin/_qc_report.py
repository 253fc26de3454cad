"""The QC report of one series: what was found, the thresholds that fail a job, its markdown.

A :class:`QcReport` is plain data (dataclasses, JSON via :meth:`QcReport.to_json`) so the worker
can store it as session data and a file; :func:`apply_thresholds` compares its
:meth:`QcReport.measures` with the user's ``fail_on`` and :func:`render_markdown` gives the
short table and findings list shown on the flow run in the Prefect UI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "FAIL_ON_DEFAULTS",
    "DEFAULT_GAP_FACTOR",
    "DEFAULT_SPACING_TOLERANCE",
    "Severity",
    "Finding",
    "SlicePoint",
    "SpacingIssue",
    "Spacing",
    "OrientationGroup",
    "SizeGroup",
    "DuplicatePosition",
    "QcReport",
    "parse_fail_on",
    "apply_thresholds",
    "render_markdown",
    "ranges_text",
    "instances_text",
    "point_text",
    "issue_text",
]

Severity = Literal["info", "warning", "error"]

FAIL_ON_DEFAULTS: dict[str, int | bool | None] = {
    "missing_instances": None,
    "gaps": None,
    "spacing_outliers": None,
    "duplicate_positions": None,
    "mixed_orientations": False,
    "mixed_sizes": False,
}
"""Thresholds that fail the job: a count (fail when above it) or ``None``; a bool for ``mixed_*``."""

DEFAULT_GAP_FACTOR = 1.5
"""A step along the normal larger than this many median spacings is a gap."""

DEFAULT_SPACING_TOLERANCE = 0.1
"""A step off the median by more than this fraction (and not a gap) is an outlier."""

_SHOWN = 10


@dataclass(frozen=True)
class Finding:
    """One thing the report found; ``check`` names the threshold (or check) it belongs to."""

    check: str
    severity: Severity
    message: str


@dataclass(frozen=True)
class SlicePoint:
    """A position of the stack: distance along the normal (mm), its instances, its first IPP."""

    distance: float
    instance_numbers: list[int | None]
    position: list[float]


@dataclass(frozen=True)
class SpacingIssue:
    """An irregular step between two neighbouring positions of the stack (``start`` < ``end`` along the normal)."""

    spacing: float
    start: SlicePoint
    end: SlicePoint
    missing_estimate: int = 0


@dataclass(frozen=True)
class Spacing:
    """Steps between neighbouring positions along ``normal`` (mm)."""

    normal: list[float]
    images: int
    positions: int
    median: float
    min: float
    max: float


@dataclass(frozen=True)
class OrientationGroup:
    """Images sharing one Image Orientation (Patient)."""

    plane: str
    orientation: list[float]
    count: int
    instance_numbers: list[int | None]


@dataclass(frozen=True)
class SizeGroup:
    """Images sharing one matrix (Rows × Columns)."""

    rows: int
    columns: int
    count: int
    instance_numbers: list[int | None]


@dataclass(frozen=True)
class DuplicatePosition:
    """Several images at one position; ``explained`` when they differ in echo, phase, b-value…"""

    point: SlicePoint
    explained: bool


@dataclass(frozen=True)
class QcReport:
    """Everything :func:`check_series` found about one series (JSON via :meth:`to_json`)."""

    series_uid: str
    modality: str
    description: str
    instances: int
    image_instances: int
    frames: int
    expected: int | None
    expected_source: str | None
    instance_number_range: list[int] | None
    missing_instance_numbers: list[int]
    duplicate_instance_numbers: list[int]
    spacing: Spacing | None
    gaps: list[SpacingIssue]
    outliers: list[SpacingIssue]
    orientation_groups: list[OrientationGroup]
    size_groups: list[SizeGroup]
    duplicate_positions: list[DuplicatePosition]
    localizer: bool
    not_checked: list[str]
    findings: list[Finding]
    failed: list[str] = field(default_factory=list)

    @property
    def missing_instances(self) -> int:
        """Best estimate of instances missing: by the expected count or by Instance Number."""
        short = self.expected - self.instances if self.expected is not None else 0
        return max(short, len(self.missing_instance_numbers), 0)

    def measures(self) -> dict[str, int]:
        """The value each ``fail_on`` threshold is compared with (``mixed_*``: number of groups)."""
        return {
            "missing_instances": self.missing_instances,
            "gaps": len(self.gaps),
            "spacing_outliers": len(self.outliers),
            "duplicate_positions": sum(1 for d in self.duplicate_positions if not d.explained),
            "mixed_orientations": 0 if self.localizer else len(self.orientation_groups),
            "mixed_sizes": len(self.size_groups),
        }

    @property
    def passed(self) -> bool:
        """No ``fail_on`` threshold was exceeded."""
        return not self.failed

    @property
    def problems(self) -> int:
        """Findings that are warnings or errors (info findings only explain)."""
        return sum(1 for f in self.findings if f.severity != "info")

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-able data, with its measures and verdict."""
        return {**asdict(self), "passed": self.passed, "measures": self.measures()}


# --- text ------------------------------------------------------------------------------------


def ranges_text(numbers: Sequence[int], limit: int = 20) -> str:
    """``3, 7–9, 12`` for [3, 7, 8, 9, 12], cut after ``limit`` runs."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs[:limit])
    return text + (f", … ({len(runs) - limit} more runs)" if len(runs) > limit else "")


def instances_text(numbers: Sequence[int | None]) -> str:
    """``instances 6, 21`` (the first few; ``?`` for an instance without a number)."""
    shown = ", ".join("?" if n is None else str(n) for n in numbers[:_SHOWN])
    return f"instance{'s' if len(numbers) > 1 else ''} {shown}{', …' if len(numbers) > _SHOWN else ''}"


def point_text(point: SlicePoint) -> str:
    """``instance 9 at -10.5 mm``: where a position is, for a reader of the report."""
    return f"{instances_text(point.instance_numbers)} at {point.distance:g} mm"


def issue_text(issue: SpacingIssue) -> str:
    """One irregular step in words, with the positions it lies between."""
    missing = f" (~{issue.missing_estimate} slice{'s' if issue.missing_estimate > 1 else ''} missing)" if issue.missing_estimate else ""
    return f"{issue.spacing:g} mm between {point_text(issue.start)} and {point_text(issue.end)}{missing}"


# --- thresholds ------------------------------------------------------------------------------


def parse_fail_on(value: Any) -> dict[str, int | bool | None]:
    """``fail_on`` from params, merged over :data:`FAIL_ON_DEFAULTS`.

    Raises
    ------
    ValueError
        An unknown threshold name, or a value of the wrong kind (one line, naming it).
    """
    if value is None:
        return dict(FAIL_ON_DEFAULTS)
    if not isinstance(value, Mapping):
        raise ValueError(f"qc: fail_on must be a mapping of thresholds, not {value!r}")
    unknown = sorted(set(value) - set(FAIL_ON_DEFAULTS))
    if unknown:
        raise ValueError(f"qc: unknown fail_on threshold(s) {', '.join(map(repr, unknown))}; known: {', '.join(FAIL_ON_DEFAULTS)}")
    merged = dict(FAIL_ON_DEFAULTS)
    for name, limit in value.items():
        if name.startswith("mixed_"):
            if limit is not None and not isinstance(limit, bool):
                raise ValueError(f"qc: fail_on.{name} must be true or false, not {limit!r}")
        elif limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"qc: fail_on.{name} must be a count ≥ 0 (fail when above it) or null, not {limit!r}")
        merged[name] = limit
    return merged


def apply_thresholds(report: QcReport, fail_on: Mapping[str, int | bool | None]) -> QcReport:
    """The report with ``failed`` saying which thresholds were exceeded, their findings made errors.

    A count threshold is exceeded when its measure (:meth:`QcReport.measures`) is above it; a
    ``mixed_*`` threshold set to true when the series has more than one group.
    """
    measures = report.measures()
    exceeded: dict[str, str] = {}
    for name, limit in fail_on.items():
        value = measures[name]
        if name.startswith("mixed_"):
            if limit is True and value > 1:
                exceeded[name] = f"{name}: {value} {name.removeprefix('mixed_')}"
        elif limit is not None and not isinstance(limit, bool) and value > limit:
            exceeded[name] = f"{name} {value} > {limit}"
    findings = [replace(f, severity="error") if f.check in exceeded and f.severity == "warning" else f for f in report.findings]
    return replace(report, failed=list(exceeded.values()), findings=findings)


# --- rendering -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_ICONS = {"info": "ℹ️", "warning": "⚠️", "error": "❌"}


def render_markdown(report: QcReport) -> str:
    """A short table and the findings, readable on the flow run in the Prefect UI."""
    title = _cell(report.description or "series")
    lines = [f"# QC: {title} ({report.modality or '?'})", "", f"Series `{report.series_uid}`", ""]
    if report.failed:
        lines.append(f"**Failed**: {'; '.join(report.failed)}")
    else:
        lines.append(f"**Passed**: {report.problems} warning(s)" if report.problems else "**Passed**: no problems found")
    expected = f" of {report.expected} expected ({report.expected_source})" if report.expected is not None else ""
    rows = [("Instances", f"{report.instances}{expected}")]
    if report.frames != report.image_instances:
        rows.append(("Frames", f"{report.frames} in {report.image_instances} image instance(s)"))
    if report.instance_number_range is not None:
        low, high = report.instance_number_range
        missing = f", missing {ranges_text(report.missing_instance_numbers)}" if report.missing_instance_numbers else ""
        rows.append(("Instance Numbers", f"{low}–{high}{missing}"))
    if report.spacing is not None:
        sp = report.spacing
        normal = ", ".join(f"{v:.3g}" for v in sp.normal)
        rows.append(("Slice spacing", f"median {sp.median:g} mm (min {sp.min:g}, max {sp.max:g}); {sp.positions} positions along ({normal})"))
        rows.append(("Gaps / outliers", f"{len(report.gaps)} / {len(report.outliers)}"))
    else:
        rows.append(("Slice spacing", "not checked"))
    if report.orientation_groups:
        rows.append(("Orientations", ", ".join(f"{g.plane} ×{g.count}" for g in report.orientation_groups)))
    if report.size_groups:
        rows.append(("Sizes", ", ".join(f"{g.rows}×{g.columns} ×{g.count}" for g in report.size_groups)))
    duplicates = report.measures()["duplicate_positions"]
    rows.append(("Duplicate positions", str(duplicates) if duplicates else "none"))
    lines += ["", "| Check | Result |", "|---|---|", *(f"| {a} | {_cell(b)} |" for a, b in rows), ""]
    lines += ["## Findings", ""]
    lines += [f"- {_ICONS[f.severity]} **{f.check}**: {f.message}" for f in report.findings] or ["- none"]
    issues = [("gap", i) for i in report.gaps] + [("outlier", i) for i in report.outliers]
    if issues:
        lines += ["", "## Irregular spacing", "", "| Kind | Step (mm) | From | To |", "|---|---|---|---|"]
        lines += [f"| {kind} | {i.spacing:g} | {_cell(point_text(i.start))} | {_cell(point_text(i.end))} |" for kind, i in issues[:50]]
        if len(issues) > 50:
            lines.append(f"\n… {len(issues) - 50} more in the JSON report")
    if report.not_checked:
        lines += ["", "## Not checked", "", *(f"- {n}" for n in report.not_checked)]
    return "\n".join(lines) + "\n"
