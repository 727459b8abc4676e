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


def test_core_window_lies_between_oedema_and_enhancement_and_counts_inside_the_tumour():
    """pipelines.longitudinal.bsi_change for the tumour core on T1c: with
    bsi_core_tissue="oedema" its window lies between the two classes its boundary
    separates, oedema (here brighter than the brain, 120 vs 100) and enhancing tumour
    (200); and (bsi_core_within_tumour, the default) a T1c change just outside the whole
    tumour (150 where the brain was 100) is not core growth. The settings before
    2026-11-30 (brain level, band not limited to the tumour) read 0.75 x the growth plus
    that change."""
    from dataclasses import replace

    from brainline.pipelines.longitudinal import LongitudinalConfig, bsi_change

    z, y, x = np.indices(SHAPE, dtype=np.float32)
    r = np.sqrt((z - 32) ** 2 + (y - 32) ** 2 + (x - 32) ** 2)
    prior_lab = np.where(r <= 5.0, 3, np.where(r <= 7.5, 2, 0)).astype(np.uint8)
    current_lab = np.where(r <= 6.0, 3, np.where(r <= 7.5, 2, 0)).astype(np.uint8)
    levels = {0: 100.0, 2: 120.0, 3: 200.0}
    prior = np.vectorize(levels.get)(prior_lab).astype(np.float32)
    current = np.vectorize(levels.get)(current_lab).astype(np.float32)
    current[(r > 7.5) & (r <= 9.0)] = 150.0
    images = {"t1c": (current, prior, np.ones(SHAPE, bool))}
    true = float((r <= 6.0).sum() - (r <= 5.0).sum())
    assert LongitudinalConfig.load().bsi_core_within_tumour
    lc = replace(LongitudinalConfig.load(), bsi_core_tissue="oedema", bsi_core_within_tumour=True)
    result = bsi_change(current_lab, prior_lab, images, SPACING, lc)
    assert "whole_tumor" not in result                                # no FLAIR given
    for key in ("tumor_core", "3"):
        assert 1000.0 * result[key]["delta_ml"] == pytest.approx(true, rel=0.01), key
        assert result[key]["clip_levels"] == [pytest.approx(128.0), pytest.approx(160.0)]
    old = bsi_change(current_lab, prior_lab, images, SPACING,
                     replace(lc, bsi_core_tissue="brain", bsi_core_within_tumour=False))
    outside = float(((r > 7.5) & (r <= 9.0)).sum())
    # (the band reaches most of the brightened shell: 3 mm from the discrete core)
    assert 0.6 * outside < 1000.0 * old["tumor_core"]["delta_ml"] - 0.75 * true < 1.0 * outside
    # each change alone
    level_only = bsi_change(current_lab, prior_lab, images, SPACING, replace(lc, bsi_core_within_tumour=False))
    assert 1000.0 * level_only["tumor_core"]["delta_ml"] > true + 0.4 * outside
    band_only = bsi_change(current_lab, prior_lab, images, SPACING, replace(lc, bsi_core_tissue="brain"))
    assert 1000.0 * band_only["tumor_core"]["delta_ml"] == pytest.approx(0.75 * true, rel=0.02)


def test_band_taken_on_the_masks_box_equals_the_whole_grid_band():
    """boundary_band takes the distances on the union's box widened by the
    outer band (not the whole grid): the same voxels as the band from
    whole-grid distances, for masks at the grid's edge, overlapping or not,
    one of them empty, on anisotropic voxels."""
    from scipy import ndimage

    from brainline.pipelines.boundary_shift import boundary_distances

    rng = np.random.default_rng(3)
    shape = (40, 50, 60)
    z, y, x = np.indices(shape)
    ball = (z - 20) ** 2 + (y - 25) ** 2 + (x - 30) ** 2 <= 64
    edge = np.zeros(shape, bool)
    edge[:4, :12, -5:] = True                          # touches three faces of the grid
    pairs = [(ball, ndimage.binary_dilation(ball, iterations=2)), (ball, edge), (edge, edge | (x > 55)),
             (ball, np.zeros(shape, bool)), (rng.random(shape) > 0.999, ball)]
    within = rng.random(shape) > 0.2
    for spacing in ((1.0, 1.0, 1.0), (4.0, 0.9, 0.9)):
        for out_mm, in_mm in ((3.0, 3.0), (12.0, 1.0), (0.5, 0.0)):
            for prior, current in pairs:
                whole = boundary_band(prior, current, spacing, out_mm, in_mm, within,
                                      boundary_distances(prior, current, spacing))
                assert np.array_equal(boundary_band(prior, current, spacing, out_mm, in_mm, within), whole)
    assert not boundary_band(np.zeros(shape, bool), np.zeros(shape, bool), SPACING, 3.0, 3.0, within).any()
