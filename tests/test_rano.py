"""RANO-style bidimensional measurement (pipelines/rano.py).

Synthetic shapes with known diameters (rotated ellipses on anisotropic pixels,
a rectangle, a ring, two lesions) and a real BraTS 2020 reference
segmentation of tcga-du-7294 on its T1c DICOM grid, checked against a brute
force search over all pixel pairs and all perpendicular chords.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.dicom_outputs import read_source_series
from brainline.pipelines.rano import (
    MEASURABLE_MM,
    bidimensional,
    label_components,
    measure_components,
    to_patient,
)
from tests.dicom_factory import write_study
from tests.test_dicom_outputs import TCGA, dicom_grid, load_brats2020


def ellipse(a_mm: float, b_mm: float, theta: float, spacing, shape=(240, 240), centre=(0.0, 0.0)) -> np.ndarray:
    """Ellipse with semi-axes a (along angle theta from the column axis) and b, in mm."""
    r, c = np.mgrid[:shape[0], :shape[1]]
    y = (r - shape[0] / 2) * spacing[0] - centre[0]
    x = (c - shape[1] / 2) * spacing[1] - centre[1]
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    return (u / a_mm) ** 2 + (v / b_mm) ** 2 <= 1.0


def physical(points_rc: np.ndarray, spacing) -> np.ndarray:
    return np.asarray(points_rc) * np.asarray(spacing, dtype=float)


def inside(mask: np.ndarray, points_rc: np.ndarray, n: int = 200) -> bool:
    """Every sample of the segment between the two points lies on the mask."""
    p, q = points_rc
    ts = np.linspace(0.02, 0.98, n)
    pts = np.rint(p[None, :] + ts[:, None] * (q - p)[None, :]).astype(int)
    return bool(np.all(mask[pts[:, 0], pts[:, 1]]))


@pytest.mark.parametrize("a, b, theta_deg, spacing", [
    (20.0, 8.0, 30.0, (0.5, 0.7)),
    (25.0, 5.5, 68.0, (0.9, 0.9)),
    (10.0, 6.0, -40.0, (0.45, 0.45)),
    (15.0, 15.0, 0.0, (1.0, 1.0)),
    (30.0, 12.0, 125.0, (0.94, 0.94)),
])
def test_rotated_ellipse(a, b, theta_deg, spacing):
    theta = np.radians(theta_deg)
    mask = ellipse(a, b, theta, spacing)
    m = bidimensional(mask, spacing)
    tol = float(np.hypot(*spacing))  # one pixel diagonal: the resolution of a pixel mask
    assert m.long_mm == pytest.approx(2 * a, abs=tol)
    assert m.short_mm == pytest.approx(2 * b, abs=tol)
    long_vec = np.diff(physical(m.long_points, spacing), axis=0)[0]
    short_vec = np.diff(physical(m.short_points, spacing), axis=0)[0]
    # the end points are as far apart as reported
    assert np.linalg.norm(long_vec) == pytest.approx(m.long_mm, rel=1e-9)
    assert np.linalg.norm(short_vec) == pytest.approx(m.short_mm, rel=1e-9)
    # perpendicular, and the long axis lies along the ellipse's major axis
    assert abs(np.dot(long_vec, short_vec)) / (m.long_mm * m.short_mm) < 1e-9
    if a > b:
        angle = np.degrees(np.arctan2(long_vec[0], long_vec[1])) % 180
        assert min(abs(angle - theta_deg % 180), 180 - abs(angle - theta_deg % 180)) < 4.0
    assert m.product_mm2 == pytest.approx(m.long_mm * m.short_mm)
    assert m.area_mm2 == pytest.approx(np.count_nonzero(mask) * spacing[0] * spacing[1])


def test_rectangle_and_measurability():
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:30, 10:50] = True  # 10 x 40 pixels of 0.5 mm: 5 mm x 20 mm
    m = bidimensional(mask, (0.5, 0.5))
    assert m.long_mm == pytest.approx(np.hypot(5.0, 20.0), abs=0.71)  # the diagonal is the longest diameter
    assert not m.measurable  # the perpendicular is < 10 mm
    big = bidimensional(ellipse(12.0, 9.0, 0.3, (0.5, 0.5)), (0.5, 0.5))
    assert big.measurable and big.short_mm >= MEASURABLE_MM


def test_short_axis_stays_inside_a_concave_lesion():
    """A ring-shaped lesion: the perpendicular chord must not span the hole."""
    sp = (0.5, 0.5)
    ring = ellipse(20.0, 20.0, 0.0, sp) & ~ellipse(14.0, 14.0, 0.0, sp)
    m = bidimensional(ring, sp)
    assert m.long_mm == pytest.approx(40.0, abs=0.5)
    assert inside(ring, m.short_points)
    assert m.short_mm < 40.0 * 0.8  # a chord within the ring, not the full diameter


def test_single_pixel_and_empty():
    assert bidimensional(np.zeros((5, 5), bool), (1, 1)) is None
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    m = bidimensional(one, (0.8, 0.6))
    assert m.long_mm > 0 and m.short_mm > 0
    with pytest.raises(ValueError):
        bidimensional(np.zeros((2, 2, 2), bool), (1, 1))
    with pytest.raises(ValueError):
        bidimensional(one, (0, 1))


def test_components_largest_slice_and_order():
    sp = (0.5, 0.5)
    vol = np.zeros((9, 200, 200), dtype=bool)
    # lesion A: slices 1..5, largest (a = 18 mm) on slice 3
    for k, a in zip(range(1, 6), (6, 12, 18, 12, 6)):
        vol[k] |= ellipse(a, a * 0.6, 0.4, sp, shape=(200, 200), centre=(-20, -20))
    # lesion B: smaller, slices 5..7, largest on slice 6
    for k, a in zip(range(5, 8), (3, 7, 3)):
        vol[k] |= ellipse(a, a * 0.9, 1.0, sp, shape=(200, 200), centre=(25, 25))
    found = measure_components(vol, sp, slice_spacing_mm=2.0)
    assert [f.slice_index for f in found] == [3, 6]
    assert found[0].voxels > found[1].voxels
    assert found[0].measurement.long_mm == pytest.approx(36.0, abs=0.71)
    assert found[1].measurement.long_mm == pytest.approx(14.0, abs=0.71)
    assert found[0].volume_mm3 == pytest.approx(found[0].voxels * 0.5 * 0.5 * 2.0)
    labels, n = label_components(vol)
    assert n == 2 and np.all(vol[labels == found[0].label_id])
    assert measure_components(vol, sp, max_components=1)[0].component == 1
    assert measure_components(np.zeros((2, 3, 3), bool), sp) == []


def test_to_patient_on_an_oblique_plane():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    iop = [c, s, 0.0, 0.0, 0.0, -1.0]
    ipp = [10.0, -20.0, 30.0]
    pts = to_patient(np.array([[0.0, 0.0], [4.0, 10.0]]), ipp, iop, (0.5, 0.8))
    assert np.allclose(pts[0], ipp)
    assert np.allclose(pts[1], np.array(ipp) + 10 * 0.8 * np.array([c, s, 0]) + 4 * 0.5 * np.array([0, 0, -1]))
    # distances in the patient frame equal the reported diameters
    sp = (0.5, 0.8)
    m = bidimensional(ellipse(15.0, 6.0, 0.5, sp), sp)
    ends = to_patient(m.long_points, ipp, iop, sp)
    assert np.linalg.norm(ends[1] - ends[0]) == pytest.approx(m.long_mm)


# ----------------------------------------------------------------- real lesion


def brute_force(mask: np.ndarray, spacing) -> tuple[float, float]:
    """Longest pixel-centre distance, and the longest in-mask chord perpendicular
    to it (dense sampling): a slow, independent reference."""
    rows, cols = np.nonzero(mask)
    pts = np.column_stack([rows * spacing[0], cols * spacing[1]])
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    i, j = np.unravel_index(np.argmax(d), d.shape)
    return float(d[i, j]), (pts[j] - pts[i]) / d[i, j]


@pytest.fixture(scope="module")
def real_case(tmp_path_factory):
    study = write_study(tmp_path_factory.mktemp("rano_study"), TCGA, slice_step=5, roles=("t1c",))
    t1c = study.series["t1c"]
    grid, _ = dicom_grid(t1c.dir)
    labels = sitk.Resample(load_brats2020("hnfnetv1-20"), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    return t1c, sitk.GetArrayFromImage(labels)


def test_real_segmentation(real_case):
    t1c, arr = real_case
    series = read_source_series(t1c.paths)
    spacing = [float(v) for v in series.first.PixelSpacing]
    core = np.isin(arr, (1, 3))
    found = measure_components(core, spacing)
    assert found, "the reference segmentation has a tumour core"
    labels, _ = label_components(core)
    for f in found:
        comp = labels == f.label_id
        areas = comp.sum(axis=(1, 2))
        assert areas[f.slice_index] == areas.max()  # measured on the component's largest slice
        sl = comp[f.slice_index]
        m = f.measurement
        ref_long, ref_dir = brute_force(sl, spacing)
        # edge to edge = centre to centre + at most one pixel
        assert ref_long <= m.long_mm <= ref_long + np.hypot(*spacing) + 1e-6
        long_vec = np.diff(physical(m.long_points, spacing), axis=0)[0]
        assert abs(abs(np.dot(long_vec / np.linalg.norm(long_vec), ref_dir)) - 1) < 1e-3
        short_vec = np.diff(physical(m.short_points, spacing), axis=0)[0]
        assert abs(np.dot(long_vec, short_vec)) < 1e-6 * m.long_mm * m.short_mm
        assert 0 < m.short_mm <= m.long_mm
        assert inside(sl, m.short_points)
        # the end points of both axes lie on (or within half a pixel of) the lesion
        for p in (*m.long_points, *m.short_points):
            r, c = np.clip(np.rint(p).astype(int), 0, np.array(sl.shape) - 1)
            window = sl[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
            assert window.any()
    # the largest tumour core of this case is several centimetres across
    assert found[0].measurement.long_mm > 25
