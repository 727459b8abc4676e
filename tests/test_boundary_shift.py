"""The boundary shift integral (pipelines/boundary_shift.py) on images with a
known lesion: a bright ball with a soft (linear ramp) edge whose radius grows,
on a 1 mm grid; tissue 100, lesion 200, a little noise."""

from __future__ import annotations

import numpy as np
import pytest

from brainline.pipelines.boundary_shift import boundary_band, boundary_shift

SHAPE = (64, 64, 64)
SPACING = (1.0, 1.0, 1.0)


def ball_image(radius_mm: float, rng: np.random.Generator, ramp_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask of its 0.5 level): lesion fraction 1 inside radius - ramp/2,
    0 beyond radius + ramp/2, linear between; noise SD 2 (2 % of the contrast)."""
    z, y, x = np.indices(SHAPE, dtype=np.float32)
    r = np.sqrt((z - 32) ** 2 + (y - 32) ** 2 + (x - 32) ** 2)
    frac = np.clip((radius_mm + ramp_mm / 2 - r) / ramp_mm, 0.0, 1.0)
    image = 100.0 + 100.0 * frac + rng.normal(0.0, 2.0, SHAPE)
    return image.astype(np.float32), frac >= 0.5


def test_growth_of_a_soft_edged_ball_is_its_volume_change():
    rng = np.random.default_rng(0)
    prior, prior_mask = ball_image(10.0, rng)
    current, current_mask = ball_image(12.0, rng)
    true = float(current_mask.sum() - prior_mask.sum())   # mm^3 (1 mm voxels)
    band = boundary_band(prior_mask, current_mask, SPACING, 4.0, 2.0, np.ones(SHAPE, bool))
    r = boundary_shift(current, prior, band, 100.0, 200.0, (0.0, 1.0), 1.0)
    assert r["delta_mm3"] == pytest.approx(true, rel=0.05)
    assert r["lost_mm3"] < 0.05 * true
    # shrinkage reads as the same volume, negative
    back = boundary_shift(prior, current, band, 100.0, 200.0, (0.0, 1.0), 1.0)
    assert back["delta_mm3"] == pytest.approx(-true, rel=0.05)


def test_segmentations_that_disagree_on_unchanged_images_give_no_change():
    """The segmentations only say where to integrate: a current mask one voxel
    larger all round (the segmenter's irreproducibility) adds nothing when the
    images are two noisy scans of the same ball."""
    rng = np.random.default_rng(1)
    prior, prior_mask = ball_image(10.0, rng)
    current, _ = ball_image(10.0, rng)
    bigger = np.zeros(SHAPE, bool)
    z, y, x = np.indices(SHAPE)
    bigger[(z - 32) ** 2 + (y - 32) ** 2 + (x - 32) ** 2 <= 11.0 ** 2] = True
    counted = float(bigger.sum() - prior_mask.sum())   # what two voxel counts would call growth
    band = boundary_band(prior_mask, bigger, SPACING, 4.0, 2.0, np.ones(SHAPE, bool))
    r = boundary_shift(current, prior, band, 100.0, 200.0, (0.0, 1.0), 1.0)
    assert abs(r["delta_mm3"]) < 0.05 * counted, (r, counted)


def test_a_lesion_not_brighter_than_the_tissue_is_not_integrated():
    rng = np.random.default_rng(2)
    prior, mask = ball_image(10.0, rng)
    band = boundary_band(mask, mask, SPACING, 3.0, 1.0, np.ones(SHAPE, bool))
    assert boundary_shift(prior, prior, band, 150.0, 150.0, (0.0, 1.0), 1.0)["delta_mm3"] is None
