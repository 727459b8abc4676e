"""RANO measurement of a new lesion on the subtraction
(pipelines/longitudinal_images.new_lesion_enhancement, axial_axis): on
synthetic z maps of blurred ellipsoids with known diameters, on isotropic,
thick-slice and sagittal grids. No shared data; about a second."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from brainline.pipelines.longitudinal import LongitudinalConfig
from brainline.pipelines.longitudinal_images import axial_axis, new_lesion_enhancement

CFG = LongitudinalConfig()


def lesion_z(shape, spacing_zyx, diameters_zyx, peak=12.0, noise=0.7, seed=0):
    """(z map, lesion mask, brain): an ellipsoid of the given diameters (mm)
    at the grid centre, z = peak inside, partial volume at the edge (8x
    supersampled), blurred by 0.5 voxel, plus Gaussian noise of sd ``noise``."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing_zyx, float)
    centre = (np.asarray(shape) - 1) / 2.0 + np.array([0.0, 0.3, 0.3])   # an axial slice through the equator
    frac = np.zeros(shape, np.float32)
    offs = (np.arange(8) + 0.5) / 8 - 0.5
    idx = np.indices(shape).astype(np.float32)
    for o in offs:   # supersample along each axis in turn (separable enough for a smooth edge)
        d2 = sum(((idx[a] + (o if a == 0 else 0) - centre[a]) * sp[a] / (diameters_zyx[a] / 2)) ** 2
                 for a in range(3))
        frac += (d2 <= 1.0) / 8
    z = ndimage.gaussian_filter(frac * peak, 0.5) + rng.normal(0, noise, shape).astype(np.float32)
    return z.astype(np.float32), frac >= 0.5, np.ones(shape, bool)


@pytest.mark.parametrize("spacing, diameters, measurable", [
    ((1.0, 1.0, 1.0), (14.0, 16.0, 12.0), True),     # 16 x 12 in the axial plane
    ((1.0, 1.0, 1.0), (14.0, 16.0, 8.0), False),     # 16 x 8: one diameter short
    ((5.0, 0.9, 0.9), (20.0, 18.0, 13.0), True),     # thick axial slices (20 mm tall: no slab partial volume)
    ((2.0, 2.0, 2.0), (10.0, 9.6, 9.6), False),      # just under 10 mm
])
def test_diameters_in_the_axial_plane(spacing, diameters, measurable):
    shape = tuple(int(np.ceil((d + 12) / s)) for d, s in zip(diameters, spacing))
    z, mask, brain = lesion_z(shape, spacing, diameters)
    current = np.where(mask, 5.0, 0.0)
    out = new_lesion_enhancement(mask, z, current, brain, spacing, 0, CFG)
    assert out["enhancing"] is True
    axial_d = sorted(diameters[1:], reverse=True)
    pixel = max(spacing[1:])
    assert out["long_axis_mm"] == pytest.approx(axial_d[0], abs=max(1.0, 0.6 * pixel)), out
    assert out["short_axis_mm"] == pytest.approx(axial_d[1], abs=max(1.0, 0.6 * pixel)), out
    assert out["measurable"] is measurable


def test_not_enhancing_without_a_t1c_rise():
    z, mask, brain = lesion_z((30, 30, 30), (1, 1, 1), (14, 14, 14), peak=0.0)   # T1c unchanged: noise only
    out = new_lesion_enhancement(mask, z, np.full(z.shape, 5.0), brain, (1, 1, 1), 0, CFG)
    assert out["enhancing"] is False and out["long_axis_mm"] is None and out["measurable"] is False
    z, mask, brain = lesion_z((30, 30, 30), (1, 1, 1), (14, 14, 14))
    out = new_lesion_enhancement(mask, z, np.zeros(z.shape), brain, (1, 1, 1), 0, CFG)   # dark now
    assert out["enhancing"] is False


def test_a_sagittal_grid_is_measured_in_the_axial_plane():
    # index axes: x along A-P, y along S-I (inferior), z along L-R: a sagittal stack
    direction = (0, 0, 1,
                 1, 0, 0,
                 0, -1, 0)
    assert axial_axis(direction) == 1           # numpy (z, y, x): y is superior-inferior
    assert axial_axis(np.eye(3).ravel()) == 0   # an axial grid
    spacing = (1.0, 1.0, 1.0)
    # diameters (numpy z = L-R 16 mm, y = S-I 8 mm, x = A-P 12 mm): axial plane = L-R x A-P = 16 x 12
    z, mask, brain = lesion_z((30, 30, 30), spacing, (16.0, 8.0, 12.0))
    out = new_lesion_enhancement(mask, z, np.where(mask, 5.0, 0.0), brain, spacing, axial_axis(direction), CFG)
    assert out["long_axis_mm"] == pytest.approx(16.0, abs=1.0) and out["short_axis_mm"] == pytest.approx(12.0, abs=1.0)
    assert out["measurable"] is True
    wrong = new_lesion_enhancement(mask, z, np.where(mask, 5.0, 0.0), brain, spacing, 0, CFG)
    assert wrong["short_axis_mm"] < 10.0    # measured across the wrong plane it would read 12 x 8


def test_a_small_faint_enhancing_lesion_is_enhancing():
    """25 mm^3 (3.6 mm across) enhancing by z ~4 at its centre: too few voxels
    above z_threshold for the volume test, but its mean T1c rise says enhancing;
    the same lesion without a T1c rise is not."""
    for peak, expected in ((4.5, True), (0.0, False)):
        z, mask, brain = lesion_z((24, 24, 24), (1, 1, 1), (3.6, 3.6, 3.6), peak=peak, noise=0.7, seed=2)
        # fewer than 12 mm^3 above z_threshold near it: the volume test alone would not call it enhancing
        assert (z[ndimage.binary_dilation(mask, iterations=2)] > CFG.z_threshold).sum() < 12
        out = new_lesion_enhancement(mask, z, np.where(mask, 3.0, 0.0), brain, (1, 1, 1), 0, CFG)
        assert out["enhancing"] is expected, (peak, out)
        assert out["measurable"] is False
