"""Intensity matching and the differential bias are fitted away from the lesions
(``longitudinal_images.fit_region``, config ``match_exclude_lesion_mm``).

A soft-edged bright ball (a tumour on FLAIR, 60 % above the tissue) grows from
12 to 14 mm radius between two scans; the prior also drifts (x 1.3 + 5) and both
have noise. The growth is then read as the integrated subtraction over the ball
and 12 mm around it, divided by the contrast (mm^3). Fitted over the whole brain,
histogram matching maps the prior's bright tail onto the current's larger one and
the smooth bias field takes up the edge's broad rise: the growth is under-read.
Fitted 10 mm away from both lesions it is read within 10 %.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from brainline.pipelines.longitudinal_images import differential_bias, fit_region, match_intensity

SHAPE, SPACING = (72, 72, 72), (1.0, 1.0, 1.0)
TISSUE, LESION, NOISE = 100.0, 160.0, 2.0
R0, R1, EDGE_MM = 12.0, 14.0, 1.5


def _radius() -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE, dtype=np.float32)
    c = (np.array(SHAPE) - 1) / 2.0
    return np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2] - 6) ** 2)


def _scan(radius: float, seed: int) -> np.ndarray:
    r = _radius()
    profile = 1.0 / (1.0 + np.exp((r - radius) / (EDGE_MM / 2.0)))     # soft edge, 0.5 at the radius
    rng = np.random.default_rng(seed)
    return (TISSUE + (LESION - TISSUE) * profile + NOISE * rng.standard_normal(SHAPE)).astype(np.float32)


def _read_growth(exclude_mm: float) -> float:
    brain = ndimage.distance_transform_edt(np.pad(np.ones((64, 64, 64), bool), 4)) > 0
    current = np.where(brain, _scan(R1, 1), 0.0).astype(np.float32)
    prior = np.where(brain, 1.3 * _scan(R0, 2) + 5.0, 0.0).astype(np.float32)
    r = _radius()
    lesions = (r <= R0) | (r <= R1)
    fit, rec = fit_region(brain, lesions, SPACING, exclude_mm)
    assert rec["lesions_excluded"] == (exclude_mm > 0)
    matched, _ = match_intensity(prior, current, fit, brain, "histogram")
    field, _ = differential_bias(current, matched, brain, SPACING, 15.0, fit=fit)
    matched = matched * field
    region = r <= R1 + 12.0
    return float((current - matched)[region].sum()) / (LESION - TISSUE)


def test_growth_is_read_when_the_fit_leaves_the_lesions_out():
    true = 4.0 / 3.0 * np.pi * (R1 ** 3 - R0 ** 3)                    # 4257 mm^3
    excluded = _read_growth(10.0)
    whole = _read_growth(0.0)
    assert excluded == pytest.approx(true, rel=0.10), (excluded, true)
    assert whole < 0.8 * true, (whole, true)                           # what the whole-brain fit did


def test_fit_region_falls_back_to_the_brain():
    brain = np.ones((20, 20, 20), bool)
    lesions = np.zeros_like(brain)
    lesions[5:15, 5:15, 5:15] = True
    fit, rec = fit_region(brain, lesions, SPACING, 10.0)               # nothing would be left
    assert fit is brain and not rec["lesions_excluded"] and "less than" in rec["reason"]
    bright = np.zeros_like(brain)
    bright[10, 10, 10] = True
    fit, rec = fit_region(brain, None, SPACING, 10.0, bright=bright)      # a bright voxel: 2 mm around it
    assert rec["lesions_excluded"] and (~fit).sum() == 33
    assert fit_region(brain, None, SPACING, 10.0)[0] is brain
    assert fit_region(brain, lesions, SPACING, 0.0)[0] is brain
