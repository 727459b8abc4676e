"""Growth must be a net rise of the subtraction (pipelines/longitudinal_images.find_lesions,
``_net_rise``): a thin bright structure present at both times (the septum pellucidum,
a vessel) that moved by 2 mm rises on one side and falls on the other, and is not
a growing lesion; a lesion that grew is. Synthetic 1 mm images, lesion mode; no
shared data; about a second."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from brainline.pipelines.longitudinal import LongitudinalConfig
from brainline.pipelines.longitudinal_images import find_lesions, robust_z

CFG = LongitudinalConfig()
SHAPE = (48, 64, 64)
SPACING = (1.0, 1.0, 1.0)


def image(structure: np.ndarray, seed: int) -> np.ndarray:
    """Tissue at 100 with noise sd 3, the structure (0..1) at +60, blurred by 0.7 voxel."""
    rng = np.random.default_rng(seed)
    clean = ndimage.gaussian_filter(100.0 + 60.0 * structure.astype(np.float32), 0.7)
    return (clean + rng.normal(0.0, 3.0, SHAPE)).astype(np.float32)


def sheet(x0: int) -> np.ndarray:
    """A 2-voxel-thick bright plate of 14 x 14 voxels (392 mm^3) at columns x0, x0 + 1."""
    s = np.zeros(SHAPE, bool)
    s[17:31, 25:39, x0:x0 + 2] = True
    return s


def ball(radius_mm: float) -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE)
    c = (np.asarray(SHAPE) - 1) / 2.0
    return (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius_mm ** 2


def run(prior_structure: np.ndarray, current_structure: np.ndarray, cfg=CFG):
    """find_lesions as the step calls it in lesion mode (lesion = FLAIR z > lesion_bright_z)."""
    brain = np.ones(SHAPE, bool)
    cur, pri = image(current_structure, 1), image(prior_structure, 2)
    z_sub = robust_z(cur - pri, brain)[0]
    cur_z, pri_z = robust_z(cur, brain)[0], robust_z(pri, brain)[0]
    pri_near = ndimage.maximum_filter(pri_z, size=5)    # prior_bright_radius_mm 2 at 1 mm
    return find_lesions({"flair": z_sub}, {"flair": pri_near}, {"flair": cur_z}, brain,
                        cur_z > cfg.lesion_bright_z, pri_z > cfg.lesion_bright_z, 1.0, cfg,
                        segmentation_extent=False, spacing_zyx=SPACING, prior_voxel_z={"flair": pri_z})


def test_shifted_thin_structure_is_not_growth():
    cands, dropped = run(sheet(30), sheet(32))
    assert [c for c in cands if c.kind == "growing"] == [], cands
    assert dropped["no_net_rise"] >= 1, dropped
    # the rule is what removes it: without it the shift reads as growth
    off = replace(CFG, growth_net_fraction=-1e9)
    assert [c.kind for c in run(sheet(30), sheet(32), off)[0]] == ["growing"]


def test_grown_lesion_is_growth():
    prior, current = ball(4.0), ball(6.0)          # 268 -> 905 mm^3
    cands, dropped = run(prior, current)
    [c] = cands
    assert c.kind == "growing" and dropped["no_net_rise"] == 0, (cands, dropped)
    truth = float(current.sum() - prior.sum())
    assert 0.6 * truth < c.volume_mm3 - c.prior_volume_mm3 < 1.4 * truth, (c, truth)


def test_unchanged_lesion_is_not_growth():
    cands, dropped = run(ball(5.0), ball(5.0))
    assert [c for c in cands if c.kind == "growing"] == [], cands


def brightened(shell_prior_z: float, voxel_rule: bool = True):
    """find_lesions on noiseless z maps, lesion mode: a lesion of z 10 (4 mm
    ball) at the prior whose 4-6 mm shell was at ``shell_prior_z`` (under
    lesion_bright_z) and is at z 10 now, so the subtraction rose there by
    10 - shell_prior_z."""
    core, whole = ball(4.0), ball(6.0)
    shell = whole & ~core
    pri_z = np.where(core, 10.0, np.where(shell, shell_prior_z, 0.0)).astype(np.float32)
    cur_z = np.where(whole, 10.0, 0.0).astype(np.float32)
    z_sub = cur_z - pri_z
    brain = np.ones(SHAPE, bool)
    return find_lesions({"flair": z_sub}, {"flair": ndimage.maximum_filter(pri_z, size=5)}, {"flair": cur_z},
                        brain, cur_z > CFG.lesion_bright_z, pri_z > CFG.lesion_bright_z, 1.0, CFG,
                        segmentation_extent=False, spacing_zyx=SPACING,
                        prior_voxel_z={"flair": pri_z} if voxel_rule else None)


def test_structure_that_only_grew_brighter_did_not_enlarge():
    """Lesion mode: a growth whose voxels were already bright at the prior
    (z 3.3: above the Penn rule's prior_bright_z 3, under lesion_bright_z
    3.5) and only brightened is not enlargement (the septum pellucidum of
    CBICA_ALU's `new` pair); the same shell rising from z 1 is."""
    assert CFG.prior_bright_z < 3.3 < CFG.lesion_bright_z
    cands, dropped = brightened(3.3)
    assert [c for c in cands if c.kind == "growing"] == [] and dropped["bright_at_prior"] == 1, (cands, dropped)
    # the voxel rule is what removes it: without prior_voxel_z the brightening reads as growth
    [before] = brightened(3.3, voxel_rule=False)[0]
    assert before.kind == "growing"
    [grown] = brightened(1.0)[0]
    assert grown.kind == "growing" and grown.volume_mm3 == before.volume_mm3, (grown, before)

