"""Series completeness: is every image of a series there, evenly spaced?

A series that lost instances on the way (a push cut short, a crash before
every instance reached the spool, a sender that gave up) still converts:
dcm2niix interpolates across the gaps ("Eq_" output) and the segmentation
runs on a volume that is partly invented. This module finds such series
from header fields only, before conversion:

* **instance numbers**: gaps between the lowest and highest number received
  (and, with ImagesInAcquisition, numbers up to the announced count);
* **ImagesInAcquisition** (0020,1002), when present: fewer images received
  than the scanner announced (per AcquisitionNumber);
* **slice positions** along the slice normal (ImagePositionPatient projected
  on the normal of ImageOrientationPatient, per frame for enhanced
  multi-frame MR): a step larger than 1.5 times the smallest one is a run of
  missing slices, a step that differs from it by more than 5 % (0.02 mm at
  least) is irregular spacing; images at the same position must come in
  equal numbers (echoes, temporal positions), orientations must agree.

:func:`check_instances` is a pure function over :class:`InstanceInfo`
records; :func:`read_instance_info` reads one file's header (pixel data is
never read); :func:`check_series_files` does both.

A series cut at its end with no ImagesInAcquisition cannot be told from a
short one; the service's quiet period (a study is processed only after no
instance arrived for a while) covers that case.

Units: positions and spacings in millimetres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pydicom

from .series_selection import MissingSeriesError

__all__ = ["InstanceInfo", "Completeness", "IncompleteSeriesError", "check_instances",
           "read_instance_info", "check_series_files", "number_ranges"]

#: Header attributes read per file (pixel data never).
_TAGS = ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "ImagesInAcquisition",
         "AcquisitionNumber", "NumberOfFrames", "SharedFunctionalGroupsSequence",
         "PerFrameFunctionalGroupsSequence", "SeriesInstanceUID")

POSITION_TOLERANCE_MM = 0.01      # two images closer than this are at the same position
GAP_FACTOR = 1.5                  # a step over 1.5 x the nominal spacing means missing slices
IRREGULAR_FRACTION = 0.05         # a step off the nominal by over 5 % is irregular ...
IRREGULAR_MIN_MM = 0.02           # ... and by at least this much
ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class InstanceInfo:
    """The header fields of one instance that completeness needs.

    ``positions``/``orientation``: one (x, y, z) per frame (one for a
    single-frame image), LPS mm; None where the header has none."""

    instance_number: int | None = None
    positions: tuple[tuple[float, float, float] | None, ...] = (None,)
    orientation: tuple[float, ...] | None = None
    images_in_acquisition: int | None = None
    acquisition_number: int | None = None

    @property
    def n_frames(self) -> int:
        return max(1, len(self.positions))


@dataclass
class Completeness:
    """Outcome for one series. ``problems`` are phrases ("35 of 155 slices
    received", "instance numbers 36–155 missing"); empty means complete."""

    received: int
    expected: int | None = None
    problems: list[str] = field(default_factory=list)
    missing_instance_numbers: list[int] = field(default_factory=list)
    missing_positions: int = 0
    spacing_mm: float | None = None
    images_per_position: int = 1    # most images found at one slice position (echoes, contrasts)

    @property
    def complete(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """'35 of 155 slices received; instance numbers 36–155 missing' (or 'complete')."""
        return "; ".join(self.problems) if self.problems else "complete"

    def to_dict(self) -> dict[str, Any]:
        return {"complete": self.complete, "received": self.received, "expected": self.expected,
                "problems": list(self.problems),
                "missing_instance_numbers": number_ranges(self.missing_instance_numbers),
                "missing_positions": self.missing_positions, "spacing_mm": self.spacing_mm,
                "images_per_position": self.images_per_position}


class IncompleteSeriesError(MissingSeriesError):
    """A series a role needs is incomplete or unusable; ``str()`` says which
    series and why, in words (a MissingSeriesError, so every handler of a
    missing series handles it too)."""

    def __init__(self, missing_roles: Sequence[str], reasons: Sequence[str],
                 labels: Mapping[str, str] | None = None,
                 needed_because: Mapping[str, str] | None = None):
        super().__init__(missing_roles, [], [], labels, needed_because)
        self.reasons = list(reasons)

    def __str__(self) -> str:
        why = [f"{self.label(r)} is needed because {self.needed_because[r]}"
               for r in self.missing_roles if self.needed_because.get(r)]
        text = "; ".join(self.reasons)
        if why:
            text += " (" + "; ".join(why) + ")"
        return (text + ". The study was not segmented; send the complete series again "
                "(the study re-opens when new instances arrive).")

    def to_dict(self) -> dict[str, Any]:
        return {"error": "incomplete_series", "message": str(self),
                "missing_roles": [self.label(r) for r in self.missing_roles], "reasons": self.reasons}


# --------------------------------------------------------------------------- helpers


def number_ranges(numbers: Iterable[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1–3, 7, 9–10' (en dash)."""
    values = sorted(set(numbers))
    parts: list[str] = []
    start = prev = None
    for n in values + [None]:
        if start is None:
            start = prev = n
            continue
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = n
    return ", ".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _int(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) else None


def _group_item(ds, groups_kw: str, index: int, macro: str, keyword: str) -> Any:
    groups = ds.get(groups_kw)
    if not groups or index >= len(groups):
        return None
    seq = groups[index].get(macro)
    return seq[0].get(keyword) if seq else None


def read_instance_info(path: Path | str) -> InstanceInfo:
    """Header fields of one file (classic or enhanced multi-frame)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
    frames = _int(ds.get("NumberOfFrames")) or 1
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    positions: list[tuple[float, float, float] | None]
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        if orientation is None:
            orientation = _floats(
                _group_item(ds, "SharedFunctionalGroupsSequence", 0, "PlaneOrientationSequence",
                            "ImageOrientationPatient")
                or _group_item(ds, "PerFrameFunctionalGroupsSequence", 0, "PlaneOrientationSequence",
                               "ImageOrientationPatient"), 6)
        positions = [_floats(_group_item(ds, "PerFrameFunctionalGroupsSequence", i, "PlanePositionSequence",
                                         "ImagePositionPatient"), 3) for i in range(frames)]
    else:
        positions = [_floats(ds.get("ImagePositionPatient"), 3)] * frames
    return InstanceInfo(instance_number=_int(ds.get("InstanceNumber")), positions=tuple(positions),
                        orientation=orientation,
                        images_in_acquisition=_int(ds.get("ImagesInAcquisition")),
                        acquisition_number=_int(ds.get("AcquisitionNumber")))


def check_series_files(files: Sequence[Path | str]) -> Completeness:
    """Read the headers of ``files`` (one series) and check them; a file
    whose header cannot be read counts as missing."""
    infos, unreadable = [], 0
    for path in files:
        try:
            infos.append(read_instance_info(path))
        except Exception:  # a truncated or corrupt file: the series is not complete
            unreadable += 1
    result = check_instances(infos)
    if unreadable:
        result.problems.insert(0, f"{_plural(unreadable, 'file')} could not be read")
    return result


# --------------------------------------------------------------------------- checks


def check_instances(instances: Sequence[InstanceInfo]) -> Completeness:
    """Completeness of one series from its instances' header fields (pure)."""
    received = sum(i.n_frames for i in instances)
    result = Completeness(received=received)
    if not instances:
        result.problems.append("no images received")
        return result
    _check_images_in_acquisition(instances, result)
    _check_instance_numbers(instances, result)
    _check_positions(instances, result)
    return result


def _check_images_in_acquisition(instances: Sequence[InstanceInfo], result: Completeness) -> None:
    announced_all = {i.images_in_acquisition for i in instances}
    if len(announced_all) == 1 and None not in announced_all:
        (value,) = announced_all
        if value and result.received == value:
            result.expected = value  # one count for the whole series, all there
            return
    groups: dict[int | None, list[InstanceInfo]] = {}
    for info in instances:
        groups.setdefault(info.acquisition_number, []).append(info)
    expected_total, received_total, short = 0, 0, False
    for members in groups.values():
        announced = [i.images_in_acquisition for i in members if i.images_in_acquisition]
        if not announced:
            return  # not every acquisition announces its size: nothing to compare
        expected = max(announced)
        got = sum(i.n_frames for i in members)
        expected_total += max(expected, got)
        received_total += got
        short = short or got < expected
    result.expected = expected_total
    if short:
        result.problems.append(f"{received_total} of {expected_total} slices received")


def _check_instance_numbers(instances: Sequence[InstanceInfo], result: Completeness) -> None:
    numbers = [i.instance_number for i in instances]
    if len(instances) < 2 and not result.expected:
        return
    if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
        return  # no numbers, or numbering restarts (several acquisitions): positions decide
    if any(i.n_frames > 1 for i in instances):
        return  # multi-frame: the frames' positions decide
    present = sorted(numbers)
    low, high = present[0], present[-1]
    if result.expected and len(instances) < result.expected and low >= 1:
        low, high = 1, max(high, result.expected)
    steps = {b - a for a, b in zip(present, present[1:])}
    if len(steps) == 1 and not (result.expected and len(instances) < result.expected):
        return  # evenly numbered (1, 2, 3 ... or 1, 3, 5 ...)
    missing = sorted(set(range(low, high + 1)) - set(present))
    if missing:
        result.missing_instance_numbers = missing
        word = "number" if len(missing) == 1 else "numbers"
        result.problems.append(f"instance {word} {number_ranges(missing)} missing")


def _check_positions(instances: Sequence[InstanceInfo], result: Completeness) -> None:
    orientations = [i.orientation for i in instances]
    positions = [p for i in instances for p in i.positions]
    without = sum(1 for p in positions if p is None) + sum(
        i.n_frames for i in instances if i.orientation is None)
    if without:
        result.problems.append(f"{without} of {len(positions)} images carry no slice position or orientation")
        return
    first = orientations[0]
    if any(max(abs(a - b) for a, b in zip(o, first)) > ORIENTATION_TOLERANCE for o in orientations):
        n = len({tuple(round(v, 3) for v in o) for o in orientations})
        result.problems.append(f"the images have {n} different orientations (not one volume)")
        return
    row, col = first[:3], first[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
              row[0] * col[1] - row[1] * col[0])
    norm = math.sqrt(sum(v * v for v in normal))
    if norm < 0.5:
        result.problems.append("the image orientation is not valid (row and column directions)")
        return
    distances = sorted(sum(p[k] * normal[k] for k in range(3)) / norm for p in positions)
    clusters: list[list[float]] = [[distances[0]]]
    for d in distances[1:]:
        if d - clusters[-1][-1] <= POSITION_TOLERANCE_MM:
            clusters[-1].append(d)
        else:
            clusters.append([d])
    counts = [len(c) for c in clusters]
    result.images_per_position = max(counts)
    if len(set(counts)) > 1:
        fewer = sum(1 for c in counts if c < max(counts))
        result.problems.append(f"{_plural(fewer, 'slice position')} of {len(counts)} hold fewer images "
                               f"than the others ({max(counts)} each expected)")
    centres = [sum(c) / len(c) for c in clusters]
    steps = [b - a for a, b in zip(centres, centres[1:])]
    if not steps:
        return
    nominal = min(steps)
    result.spacing_mm = round(nominal, 4)
    tolerance = max(IRREGULAR_MIN_MM, IRREGULAR_FRACTION * nominal)
    gaps = [s for s in steps if s > GAP_FACTOR * nominal]
    irregular = [s for s in steps if abs(s - nominal) > tolerance and s <= GAP_FACTOR * nominal]
    # a gap must also be close to a whole number of steps, or the spacing is irregular
    for s in gaps:
        if abs(s / nominal - round(s / nominal)) * nominal > tolerance:
            irregular.append(s)
    if gaps:
        missing = sum(max(1, round(s / nominal) - 1) for s in gaps)
        result.missing_positions = missing
        result.problems.append(
            f"{_plural(missing, 'slice position')} missing along the slice normal "
            f"({_plural(len(gaps), 'gap')}; spacing {nominal:.3g} mm, {len(centres)} positions received)")
    if irregular:
        result.problems.append(f"slice spacing is irregular ({nominal:.3g} to {max(irregular):.3g} mm)")
