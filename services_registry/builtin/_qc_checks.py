"""The checks of the QC service: from a series' instance headers to a :class:`QcReport`.

Geometry follows PS3.3 C.7.6.2 (Image Plane): the slice normal is the cross product of the
row and column cosines of Image Orientation (Patient), and a slice's place in the stack is its
Image Position (Patient) projected on that normal. Spacing is measured between distinct
positions of the main orientation group, so a multi-echo or multi-phase series (several
images per position) is measured once per position. Everything is read from headers only.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from services_registry.builtin._qc_report import (
    DEFAULT_GAP_FACTOR,
    DEFAULT_SPACING_TOLERANCE,
    DuplicatePosition,
    Finding,
    OrientationGroup,
    QcReport,
    SizeGroup,
    SlicePoint,
    Spacing,
    SpacingIssue,
    instances_text,
    issue_text,
    point_text,
    ranges_text,
)
from services_registry.builtin._series import Slice

__all__ = ["check_series"]

_POSITION_TOLERANCE_MM = 0.01
"""Images closer than this along the normal share one position."""

_ORIENTATION_TOLERANCE = 0.01
"""Largest direction-cosine difference (≈0.6°) within one orientation group."""

_PET_FACTORS = {"NumberOfTimeSlices": "(0054,0101)", "NumberOfRRIntervals": "(0054,0061)", "NumberOfTimeSlots": "(0054,0071)"}

_MAX_NUMBER_SPAN = 100_000


# --- reading values ---------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _frames(s: Slice) -> int:
    return max(_int(s.dataset.get("NumberOfFrames")) or 1, 1)


def _image_type(s: Slice) -> set[str]:
    value = s.dataset.get("ImageType")
    values = [value] if isinstance(value, str) else list(value or [])
    return {str(v).strip().upper() for v in values}


def _common_positive(slices: Iterable[Slice], keyword: str) -> int | None:
    """The most frequent positive integer value of ``keyword`` among ``slices`` (None if absent)."""
    counts = Counter(v for s in slices if (v := _int(s.dataset.get(keyword))) is not None and v > 0)
    return counts.most_common(1)[0][0] if counts else None


def _plane(normal: Sequence[float]) -> str:
    """Radiological plane of a slice normal (LPS axes, PS3.3 C.7.6.2.1.1); oblique when >25° off."""
    axis = max(range(3), key=lambda i: abs(normal[i]))
    name = ("sagittal", "coronal", "axial")[axis]
    return name if abs(normal[axis]) >= math.cos(math.radians(25)) else f"oblique {name}"


def _dimension_key(s: Slice) -> tuple[str, ...]:
    """What legitimately tells apart images at one position: echo, phase, b-value, acquisition, type."""
    ds = s.dataset
    keywords = ("EchoNumbers", "TemporalPositionIdentifier", "TriggerTime", "DiffusionBValue", "AcquisitionNumber")
    return (*(str(ds.get(k, "")) for k in keywords), "\\".join(sorted(_image_type(s))))


def _numbers(slices: Iterable[Slice]) -> list[int | None]:
    return sorted((s.instance_number for s in slices), key=lambda n: (n is None, n or 0))


def _point(distance: float, slices: Sequence[Slice]) -> SlicePoint:
    position = slices[0].position or (0.0, 0.0, 0.0)
    return SlicePoint(round(distance, 3), _numbers(slices), [round(v, 3) for v in position])


# --- the checks -------------------------------------------------------------------------------


def _instance_numbers(slices: Sequence[Slice], not_checked: list[str]) -> tuple[list[int] | None, list[int], list[int]]:
    numbers = [s.instance_number for s in slices if s.instance_number is not None]
    if not numbers:
        not_checked.append("instance numbers: no instance carries Instance Number (0020,0013)")
        return None, [], []
    duplicates = sorted(n for n, c in Counter(numbers).items() if c > 1)
    low, high = min(numbers), max(numbers)
    if high - low > _MAX_NUMBER_SPAN:
        not_checked.append(f"missing instance numbers: range {low}–{high} is too wide to be a numbering")
        return [low, high], [], duplicates
    missing = sorted(set(range(low, high + 1)) - set(numbers))
    if len(numbers) < len(slices):
        not_checked.append(f"instance numbers: {len(slices) - len(numbers)} instance(s) carry none")
    return [low, high], missing, duplicates


def _expected(slices: Sequence[Slice], positions: int | None, number_range: list[int] | None) -> tuple[int | None, str | None]:
    """The instance count the headers announce, and which element said so (first that applies)."""
    related = _common_positive(slices, "NumberOfSeriesRelatedInstances")
    if related:
        return related, "NumberOfSeriesRelatedInstances (0020,1209)"
    per_acquisition: dict[int | None, int] = {}
    for s in slices:  # PS3.3 C.7.6.1: images of *this acquisition*; sum over the series' acquisitions
        count = _int(s.dataset.get("ImagesInAcquisition"))
        if count is None or count <= 0:
            per_acquisition = {}
            break
        acquisition = _int(s.dataset.get("AcquisitionNumber"))
        per_acquisition[acquisition] = max(per_acquisition.get(acquisition, 0), count)
    if per_acquisition:
        many = f" over {len(per_acquisition)} acquisitions" if len(per_acquisition) > 1 else ""
        return sum(per_acquisition.values()), f"ImagesInAcquisition (0020,1002){many}"
    cardiac = _common_positive(slices, "CardiacNumberOfImages")
    if cardiac and positions:  # images per cardiac cycle, at each position
        return cardiac * positions, f"CardiacNumberOfImages (0018,1090) × {positions} position(s)"
    modality = str(slices[0].dataset.get("Modality", "")).upper()
    if modality == "PT" and all(_frames(s) == 1 for s in slices):
        per_volume = _common_positive(slices, "NumberOfSlices")  # PS3.3 C.8.9.1 PET Series
        if per_volume:
            # PS3.3 C.8.9.4 Image Index: slices × time slices (dynamic) or × RR intervals × time slots (gated)
            factors = {k: f for k in _PET_FACTORS if (f := _common_positive(slices, k))}
            source = " × ".join(["NumberOfSlices (0054,0081)", *(f"{k} {_PET_FACTORS[k]}" for k in factors)])
            return per_volume * math.prod(factors.values()), source
    if number_range is not None and number_range[1] - number_range[0] <= _MAX_NUMBER_SPAN:
        return number_range[1] - number_range[0] + 1, "Instance Number range"
    return None, None


def _orientation_groups(slices: Sequence[Slice]) -> list[list[Slice]]:
    """Slices grouped by orientation within a tolerance, largest group first (then first seen)."""
    groups: list[list[Slice]] = []
    for s in sorted(slices, key=lambda s: (s.instance_number is None, s.instance_number or 0, s.path.name)):
        assert s.orientation is not None
        for group in groups:
            reference = group[0].orientation
            assert reference is not None
            if max(abs(a - b) for a, b in zip(s.orientation, reference)) <= _ORIENTATION_TOLERANCE:
                group.append(s)
                break
        else:
            groups.append([s])
    return sorted(groups, key=len, reverse=True)


def _positions(stack: Sequence[Slice]) -> tuple[list[float], list[list[Slice]]]:
    """Distinct positions along the stack's normal, ascending, with the images at each."""
    normal = stack[0].normal
    assert normal is not None
    placed = sorted(((s.distance(normal) or 0.0, s) for s in stack), key=lambda p: (p[0], p[1].instance_number or 0))
    distances: list[float] = []
    members: list[list[Slice]] = []
    for distance, s in placed:
        if distances and distance - distances[-1] < _POSITION_TOLERANCE_MM:
            members[-1].append(s)
        else:
            distances.append(distance)
            members.append([s])
    return distances, members


def _duplicates(distances: Sequence[float], members: Sequence[list[Slice]]) -> list[DuplicatePosition]:
    sizes = {len(m) for m in members}
    uniform = len(members) > 1 and len(sizes) == 1 and sizes.pop() > 1  # every position k images: multi-phase
    found = []
    for distance, group in zip(distances, members):
        if len(group) > 1:
            distinct = len({_dimension_key(s) for s in group}) == len(group)
            found.append(DuplicatePosition(_point(distance, group), explained=uniform or distinct))
    return found


def _spacing(
    stack: Sequence[Slice], distances: Sequence[float], members: Sequence[list[Slice]], gap_factor: float, tolerance: float
) -> tuple[Spacing, list[SpacingIssue], list[SpacingIssue]]:
    steps = [b - a for a, b in zip(distances, distances[1:])]
    median = statistics.median(steps)
    normal = stack[0].normal
    assert normal is not None
    gaps: list[SpacingIssue] = []
    outliers: list[SpacingIssue] = []
    for i, step in enumerate(steps):
        start, end = _point(distances[i], members[i]), _point(distances[i + 1], members[i + 1])
        if step > gap_factor * median:
            gaps.append(SpacingIssue(round(step, 3), start, end, max(round(step / median) - 1, 1)))
        elif abs(step - median) > tolerance * median:
            outliers.append(SpacingIssue(round(step, 3), start, end))
    spacing = Spacing(
        [round(v, 6) for v in normal], len(stack), len(distances), round(median, 4), round(min(steps), 4), round(max(steps), 4)
    )
    return spacing, gaps, outliers


def check_series(
    slices: Sequence[Slice],
    *,
    gap_factor: float = DEFAULT_GAP_FACTOR,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
    ignored_files: int = 0,
) -> QcReport:
    """QC one series from its instances' headers (as :func:`read_slices` gives them).

    Parameters
    ----------
    slices
        The series' instances, in any order.
    gap_factor
        A step along the normal above ``gap_factor`` × the median step is a gap.
    spacing_tolerance
        A step off the median by more than this fraction of it (and not a gap) is an outlier.
    ignored_files
        Files of the series folder that were not DICOM (reported as information).

    Returns
    -------
    QcReport
        Counts, spacing, groups and findings; ``failed`` stays empty (see :func:`apply_thresholds`).
    """
    first = min(slices, key=lambda s: (s.instance_number is None, s.instance_number or 0, s.path.name)).dataset if slices else None
    not_checked: list[str] = []
    images = [s for s in slices if s.size is not None]
    single = [s for s in images if _frames(s) == 1]
    multi = [s for s in images if _frames(s) > 1]
    localizer = any("LOCALIZER" in _image_type(s) for s in images)
    number_range, missing_numbers, duplicate_numbers = _instance_numbers(slices, not_checked)

    oriented = [s for s in single if s.normal is not None]
    groups = _orientation_groups(oriented)
    stack = [s for s in groups[0] if s.position is not None] if groups else []
    distances, members = _positions(stack) if stack else ([], [])
    duplicates = _duplicates(distances, members)
    spacing: Spacing | None = None
    gaps: list[SpacingIssue] = []
    outliers: list[SpacingIssue] = []
    if not images:
        not_checked.append("geometry: no image instances (no Rows/Columns)")
    else:
        if multi:
            frames = sum(_frames(s) for s in multi)
            not_checked.append(f"slice spacing: {len(multi)} multi-frame instance(s) ({frames} frames); frame geometry is not checked")
        unplaced = len(single) - len(stack) - sum(len(g) for g in groups[1:])
        if unplaced:
            not_checked.append(f"slice spacing: {unplaced} image(s) without Image Position/Orientation (Patient) (0020,0032/0037)")
        if localizer:
            not_checked.append("slice spacing and orientations: localizer images are planned in several planes")
        elif len(distances) >= 2:
            spacing, gaps, outliers = _spacing(stack, distances, members, gap_factor, spacing_tolerance)
        elif len(stack) == 1:
            not_checked.append("slice spacing: a single image")
        elif stack:
            not_checked.append(f"slice spacing: all {len(stack)} images at one position")
    expected, source = _expected(slices, len(distances) or None, number_range) if slices else (None, None)
    size_counts: dict[tuple[int, int], list[Slice]] = {}
    for s in images:
        assert s.size is not None
        size_counts.setdefault(s.size, []).append(s)
    report = QcReport(
        series_uid=str(first.get("SeriesInstanceUID", "")) if first is not None else "",
        modality=str(first.get("Modality", "")) if first is not None else "",
        description=str(first.get("SeriesDescription", "")) if first is not None else "",
        instances=len(slices),
        image_instances=len(images),
        frames=sum(_frames(s) for s in images),
        expected=expected,
        expected_source=source,
        instance_number_range=number_range,
        missing_instance_numbers=missing_numbers,
        duplicate_instance_numbers=duplicate_numbers,
        spacing=spacing,
        gaps=gaps,
        outliers=outliers,
        orientation_groups=[
            OrientationGroup(_plane(g[0].normal or (0, 0, 1)), [round(v, 4) for v in g[0].orientation or ()], len(g), _numbers(g))
            for g in groups
        ],
        size_groups=[
            SizeGroup(rows, cols, len(members_), _numbers(members_))
            for (rows, cols), members_ in sorted(size_counts.items(), key=lambda kv: -len(kv[1]))
        ],
        duplicate_positions=duplicates,
        localizer=localizer,
        not_checked=not_checked,
        findings=[],
    )
    return replace(report, findings=_findings(report, gap_factor, ignored_files))


# --- findings ---------------------------------------------------------------------------------


def _findings(report: QcReport, gap_factor: float, ignored_files: int) -> list[Finding]:
    found: list[Finding] = []
    if report.expected is not None and report.expected_source != "Instance Number range" and report.instances != report.expected:
        check = "missing_instances" if report.instances < report.expected else "extra_instances"
        found.append(Finding(check, "warning", f"{report.instances} instances, {report.expected} expected by {report.expected_source}"))
    if report.missing_instance_numbers:
        n = len(report.missing_instance_numbers)
        found.append(Finding("missing_instances", "warning", f"{n} missing Instance Number{'s' if n > 1 else ''}: {ranges_text(report.missing_instance_numbers)}"))
    if report.duplicate_instance_numbers:
        found.append(Finding("duplicate_instance_numbers", "warning", f"Instance Numbers used more than once: {ranges_text(report.duplicate_instance_numbers)}"))
    if report.spacing is not None:
        for check, issues, what in (("gaps", report.gaps, f"> {gap_factor:g} × median"), ("spacing_outliers", report.outliers, "off the median")):
            if issues:
                more = f"; and {len(issues) - 3} more" if len(issues) > 3 else ""
                details = "; ".join(issue_text(i) for i in issues[:3])
                label = "gap" if check == "gaps" else "spacing outlier"
                found.append(Finding(check, "warning", f"{len(issues)} {label}{'s' if len(issues) > 1 else ''} ({what} {report.spacing.median:g} mm): {details}{more}"))
    unexplained = [d for d in report.duplicate_positions if not d.explained]
    if unexplained:
        details = "; ".join(point_text(d.point) for d in unexplained[:3]) + ("; …" if len(unexplained) > 3 else "")
        found.append(Finding("duplicate_positions", "warning", f"{len(unexplained)} position(s) hold more than one image: {details}"))
    explained = len(report.duplicate_positions) - len(unexplained)
    if explained:
        found.append(Finding("duplicate_positions", "info", f"{explained} position(s) hold several images that differ in echo, phase, b-value, acquisition or type"))
    if len(report.orientation_groups) > 1:
        groups = ", ".join(f"{g.plane} ×{g.count}" for g in report.orientation_groups)
        if report.localizer:
            found.append(Finding("mixed_orientations", "info", f"localizer in {len(report.orientation_groups)} orientations: {groups}"))
        else:
            others = [n for g in report.orientation_groups[1:] for n in g.instance_numbers]
            found.append(Finding("mixed_orientations", "warning", f"{len(report.orientation_groups)} orientations: {groups} (off the main stack: {instances_text(others)}); spacing measured on the {report.orientation_groups[0].plane} stack"))
    if len(report.size_groups) > 1:
        groups = ", ".join(f"{g.rows}×{g.columns} ×{g.count}" for g in report.size_groups)
        others = [n for g in report.size_groups[1:] for n in g.instance_numbers]
        found.append(Finding("mixed_sizes", "warning", f"{len(report.size_groups)} image sizes: {groups} (minority: {instances_text(others)})"))
    if ignored_files:
        found.append(Finding("files", "info", f"{ignored_files} file(s) in the series folder are not DICOM and were ignored"))
    return found
