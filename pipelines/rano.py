"""RANO-style bidimensional measurement of tumour components on an image grid.

For each lesion (a 3-D connected component of a binary mask on the slices of
the reference series), the measurement is taken on the slice where the lesion
has the largest area, as a radiologist does on the axial (acquisition) plane:

* **long axis**: the longest diameter of the lesion in that slice, between
  the two lesion pixels farthest apart (found on the convex hull of the pixel
  centres, in millimetres, so that anisotropic pixels are handled), measured
  from the outer edge of one pixel to the outer edge of the other;
* **short axis**: the longest diameter perpendicular to it: of all lines
  perpendicular to the long axis, the longest chord that stays inside the
  lesion (sampled at 1/10 of the smaller pixel spacing, edge to edge).

Both are returned in millimetres with their end points as continuous pixel
indices ``(row, column)`` of the slice (pixel centres at integers), and
:func:`to_patient` maps such points into the patient coordinate system (mm)
from ImagePositionPatient / ImageOrientationPatient / PixelSpacing. The
product long x short is RANO's "sum of products of perpendicular diameters"
term. RANO counts a lesion as measurable when both diameters are at least
10 mm (:attr:`Bidimensional.measurable`).

Pure numpy/scipy: no DICOM, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "Bidimensional", "ComponentMeasurement", "bidimensional", "measure_components",
    "to_patient", "label_components", "MEASURABLE_MM",
]

#: RANO: a lesion is measurable when both perpendicular diameters are >= 10 mm.
MEASURABLE_MM = 10.0

#: Chord sampling step along and across the long axis, in fractions of the
#: smaller pixel spacing.
_STEP_ACROSS = 0.1
_STEP_ALONG = 0.25


@dataclass(frozen=True)
class Bidimensional:
    """Long and short axis of a lesion in one slice.

    ``long_points`` / ``short_points``: two ``(row, column)`` points each, as
    continuous pixel indices (the centre of pixel ``[r, c]`` is ``(r, c)``).
    """

    long_mm: float
    short_mm: float
    long_points: np.ndarray     # (2, 2) row, column
    short_points: np.ndarray    # (2, 2) row, column
    area_mm2: float

    @property
    def product_mm2(self) -> float:
        return self.long_mm * self.short_mm

    @property
    def measurable(self) -> bool:
        return self.long_mm >= MEASURABLE_MM and self.short_mm >= MEASURABLE_MM


@dataclass(frozen=True)
class ComponentMeasurement:
    """One lesion: its 3-D component (1-based, by decreasing volume), the slice
    index (axis 0 of the mask) it is measured on, its size and the measurement."""

    component: int
    label_id: int               # the component's value in label_components(mask)
    slice_index: int
    voxels: int
    volume_mm3: float
    measurement: Bidimensional


def _physical(rows: np.ndarray, cols: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    return np.column_stack([rows * spacing[0], cols * spacing[1]]).astype(float)


def _hull_points(points: np.ndarray) -> np.ndarray:
    """Vertices of the 2-D convex hull (monotone chain); all points when degenerate."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return pts
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    pts = pts[order]

    def half(seq):
        out: list[np.ndarray] = []
        for p in seq:
            while len(out) >= 2:
                a, b = out[-2], out[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) <= 0:
                    out.pop()
                else:
                    break
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1])
    return hull if len(hull) >= 2 else pts


def _longest_run(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a boolean array: (length, first index, last index) of the
    longest run of True (length 0 where a row has none)."""
    n_rows, n_cols = inside.shape
    padded = np.zeros((n_rows, n_cols + 2), dtype=np.int8)
    padded[:, 1:-1] = inside
    diff = np.diff(padded, axis=1)
    best_len = np.zeros(n_rows, dtype=int)
    best_start = np.zeros(n_rows, dtype=int)
    for i in range(n_rows):
        starts = np.flatnonzero(diff[i] == 1)
        ends = np.flatnonzero(diff[i] == -1)
        if len(starts):
            lengths = ends - starts
            k = int(np.argmax(lengths))
            best_len[i], best_start[i] = lengths[k], starts[k]
    return best_len, best_start, best_start + best_len - 1


def bidimensional(mask: np.ndarray, spacing: Sequence[float]) -> Bidimensional | None:
    """Long axis and longest perpendicular diameter of a 2-D mask.

    ``spacing`` is (row spacing, column spacing) in mm, i.e. DICOM
    PixelSpacing. Returns None for an empty mask. All of the mask counts as
    one lesion (pass one component for per-lesion results).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError("bidimensional() needs a 2-D mask")
    sp = (float(spacing[0]), float(spacing[1]))
    if min(sp) <= 0:
        raise ValueError(f"pixel spacing must be positive, got {spacing}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    area = float(rows.size * sp[0] * sp[1])
    pts = _physical(rows, cols, sp)

    # --- long axis: farthest pair of pixel centres (on the hull)
    hull = _hull_points(pts)
    if len(hull) == 1:
        u = np.array([0.0, 1.0])
        a = b = hull[0]
        centre_dist = 0.0
    else:
        d2 = ((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
        a, b = hull[i], hull[j]
        if (a[0], a[1]) > (b[0], b[1]):  # stable orientation: top/left end first
            a, b = b, a
        centre_dist = float(np.sqrt(d2[i, j]))
        u = (b - a) / centre_dist
    # edge to edge: extend by the half extent of a pixel along u at both ends
    half_px = 0.5 * (abs(u[0]) * sp[0] + abs(u[1]) * sp[1])
    long_a, long_b = a - u * half_px, b + u * half_px
    long_mm = centre_dist + 2 * half_px

    # --- short axis: longest chord inside the mask perpendicular to u
    v = np.array([-u[1], u[0]])
    step_s = _STEP_ACROSS * min(sp)
    step_t = _STEP_ALONG * min(sp)
    pu, pv = (pts - a) @ u, (pts - a) @ v
    margin = max(sp)
    t = np.arange(pu.min() - margin, pu.max() + margin + step_t / 2, step_t)
    s = np.arange(pv.min() - margin, pv.max() + margin + step_s / 2, step_s)
    grid = a[None, None, :] + t[:, None, None] * u + s[None, :, None] * v   # (T, S, 2) mm
    r_idx = np.rint(grid[..., 0] / sp[0]).astype(int)
    c_idx = np.rint(grid[..., 1] / sp[1]).astype(int)
    valid = (r_idx >= 0) & (r_idx < mask.shape[0]) & (c_idx >= 0) & (c_idx < mask.shape[1])
    inside = np.zeros(r_idx.shape, dtype=bool)
    inside[valid] = mask[r_idx[valid], c_idx[valid]]
    run_len, first, last = _longest_run(inside)
    best = run_len.max()
    candidates = np.flatnonzero(run_len == best)
    mid_t = 0.5 * centre_dist
    k = int(candidates[np.argmin(np.abs(t[candidates] - mid_t))])
    short_a = a + t[k] * u + (s[first[k]] - step_s / 2) * v
    short_b = a + t[k] * u + (s[last[k]] + step_s / 2) * v
    short_mm = float(best * step_s)

    def to_index(p):
        return np.array([p[0] / sp[0], p[1] / sp[1]])

    return Bidimensional(
        long_mm=float(long_mm), short_mm=short_mm,
        long_points=np.array([to_index(long_a), to_index(long_b)]),
        short_points=np.array([to_index(short_a), to_index(short_b)]),
        area_mm2=area,
    )


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a 3-D mask: (label array, count)."""
    return ndi.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3, 3), dtype=bool))


def measure_components(
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    slice_spacing_mm: float | None = None,
    max_components: int = 5,
    min_voxels: int = 2,
) -> list[ComponentMeasurement]:
    """Bidimensional measurement of each 3-D connected component of ``mask``
    (``[slice, row, column]``, 26-connected), largest first, at most
    ``max_components``; components under ``min_voxels`` are ignored. Each is
    measured on its largest slice (ties: the slice nearest the component's
    centre). ``slice_spacing_mm`` only feeds ``volume_mm3``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError("measure_components() needs a 3-D mask [slice, row, column]")
    labels, n = label_components(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels][:max_components]
    voxel_mm3 = float(spacing[0]) * float(spacing[1]) * float(slice_spacing_mm or 0.0)
    out: list[ComponentMeasurement] = []
    for rank, lab in enumerate(order, start=1):
        comp = labels == lab
        areas = comp.reshape(comp.shape[0], -1).sum(axis=1)
        best = np.flatnonzero(areas == areas.max())
        centre = float(np.average(np.arange(len(areas)), weights=areas))
        k = int(best[np.argmin(np.abs(best - centre))])
        m = bidimensional(comp[k], spacing)
        assert m is not None
        out.append(ComponentMeasurement(rank, lab, k, int(sizes[lab - 1]), int(sizes[lab - 1]) * voxel_mm3, m))
    return out


def to_patient(points_rc: np.ndarray, position: Sequence[float], orientation: Sequence[float],
               spacing: Sequence[float]) -> np.ndarray:
    """Continuous pixel indices ``(row, column)`` of one image -> patient
    coordinates (mm), from ImagePositionPatient (centre of pixel [0, 0]),
    ImageOrientationPatient (row direction, column direction) and PixelSpacing
    (row spacing, column spacing)."""
    pts = np.atleast_2d(np.asarray(points_rc, dtype=float))
    iop = np.asarray(orientation, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index), along a column (row index)
    return (np.asarray(position, dtype=float)[None, :]
            + pts[:, 1:2] * float(spacing[1]) * row_dir[None, :]
            + pts[:, 0:1] * float(spacing[0]) * col_dir[None, :])
