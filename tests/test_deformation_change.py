"""Volume change by deformable registration (pipelines/deformation_change.py,
``paired_method: deformation``): a bright ball that grew is measured by how
the image moved, not by the two segmentations; with ``deformation_shift`` the
boundary shift integral of what the field left unexplained is added (growth
into tissue that did not move)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from brainline.pipelines.deformation_change import ResidualShift, propagated_growth
from brainline.pipelines.dicom_outputs.longitudinal_sr import CHANGE_METHODS, change_measure_words
from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.longitudinal import LongitudinalConfig, paired_methods_for, step_longitudinal
from brainline.pipelines.longitudinal_images import mask_box
from tests.shared_data import needs_data
from tests.test_longitudinal import CASE, _run, load_case, make_prior, write_priors, write_work


def _ball_image(radius_mm: float, shape=(64, 64, 64), spacing=(1.0, 1.0, 1.0), seed=0, texture_sd: float = 0.0):
    """(image z y x, ball mask) of a lesion 1.0 on tissue 0.4 with a 1 mm edge ramp, noise SD 0.02
    (``seed``). ``texture_sd`` > 0: the tissue has a fixed texture (smooth noise, 1.5 voxels, that
    SD; the same at every scan), so a ball that grows turns tissue to lesion where it stands
    (infiltration) instead of pushing it aside."""
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing[::-1])], indexing="ij")
    r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
    frac = np.clip(radius_mm + 0.5 - r, 0.0, 1.0)
    tissue = 0.4
    if texture_sd > 0:
        texture = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(shape), 1.5)
        tissue = 0.4 + texture_sd * texture / texture.std()
    img = tissue * (1 - frac) + frac + 0.02 * np.random.default_rng(seed).standard_normal(shape)
    return img.astype(np.float32), r <= radius_mm


def _residual(current_mask):
    return ResidualShift(current_mask, np.ones(current_mask.shape, bool), 0.4, 1.0, (0.1, 0.5), 3.0, 3.0)


def test_infiltrating_ball_adds_the_residual_shift():
    """A ball grown 10 -> 12 mm into textured tissue that did not move: the
    texture holds the field back, so the carried mask alone falls short; the
    boundary shift of the current image against the warped prior adds what
    the field left unexplained (measured: carried 2,714 + residual 282 of
    2,984 mm^3)."""
    prior, prior_mask = _ball_image(10.0, seed=1, texture_sd=0.1)
    current, current_mask = _ball_image(12.0, seed=2, texture_sd=0.1)
    true = float(current_mask.sum() - prior_mask.sum())
    r = propagated_growth(current, prior, {"ball": prior_mask}, _grid(), margin_mm=12.0,
                          residual={"ball": _residual(current_mask)})
    carried, total = r["growth_mm3"]["ball"], r["growth_mm3"]["ball"] + r["residual_mm3"]["ball"]
    assert r["residual_mm3"]["ball"] > 0.03 * true, r
    assert total == pytest.approx(true, rel=0.05), (r, true)
    assert abs(total - true) < abs(carried - true), (r, true)


def test_unchanged_textured_ball_has_no_residual_whatever_the_mask():
    """Unchanged ball on textured tissue, the prior's and current masks 2 mm too
    large: carried growth and residual both near zero (< 3 % of the ball)."""
    prior, _ = _ball_image(10.0, seed=1, texture_sd=0.1)
    current, _ = _ball_image(10.0, seed=2, texture_sd=0.1)
    _, too_large = _ball_image(12.0, seed=0, texture_sd=0.1)
    r = propagated_growth(current, prior, {"ball": too_large}, _grid(), margin_mm=12.0,
                          residual={"ball": _residual(too_large)})
    assert abs(r["growth_mm3"]["ball"] + r["residual_mm3"]["ball"]) < 0.03 * too_large.sum(), r


def _grid(shape=(64, 64, 64), spacing=(1.0, 1.0, 1.0)):
    g = sitk.Image([int(v) for v in shape[::-1]], sitk.sitkUInt8)
    g.SetSpacing(spacing)
    return g


def test_grown_ball_measured_by_the_displacement():
    prior, prior_mask = _ball_image(10.0, seed=1)
    current, current_mask = _ball_image(12.0, seed=2)
    true = (current_mask.sum() - prior_mask.sum()) * 1.0
    r = propagated_growth(current, prior, {"ball": prior_mask}, _grid(), margin_mm=12.0)
    assert r["growth_mm3"]["ball"] == pytest.approx(true, rel=0.15), (r, true)
    assert r["mean_displacement_mm"] > 0.5


def test_unchanged_ball_reads_no_change_whatever_the_mask():
    """Two scans of an unchanged ball: no growth, even when the prior's mask is
    2 mm too large (a segmenter's outline adds nothing)."""
    prior, _ = _ball_image(10.0, seed=1)
    current, _ = _ball_image(10.0, seed=2)
    _, too_large = _ball_image(12.0)
    r = propagated_growth(current, prior, {"ball": too_large}, _grid(), margin_mm=12.0)
    assert abs(r["growth_mm3"]["ball"]) < 0.03 * too_large.sum(), r


def test_anisotropic_grid_is_registered_isotropically():
    """A 1 x 1 x 3 mm grid (a 2D series): the same growth within 20 %."""
    spacing = (1.0, 1.0, 3.0)
    shape = (22, 64, 64)
    prior, prior_mask = _ball_image(10.0, shape, spacing, seed=1)
    current, current_mask = _ball_image(12.0, shape, spacing, seed=2)
    true = (current_mask.sum() - prior_mask.sum()) * 3.0
    r = propagated_growth(current, prior, {"ball": prior_mask}, _grid(shape, spacing), margin_mm=12.0)
    assert r["iso_mm"] == 1.0
    assert r["growth_mm3"]["ball"] == pytest.approx(true, rel=0.2), (r, true)


def test_mask_box_margin_and_empty():
    m = np.zeros((20, 20, 20), bool)
    assert mask_box([m], (1.0, 1.0, 1.0), 5.0) is None
    m[10, 10, 10] = True
    box = mask_box([m], (2.0, 1.0, 1.0), 4.0)
    assert box == (slice(8, 13), slice(6, 15), slice(6, 15))


@needs_data(CASE)
def test_no_change_pair_measured_by_deformation(tmp_path):
    """``paired_method: deformation`` on an unchanged 2 mm pair (moved, other bias):
    every component measured by the demons field, each within 1 mL of no change (the
    benchmark rule for a no-change pair; measured: WT -0.43 of 39.5 mL, TC +0.10, ET +0.04),
    and the SR/PDF's measure names it."""
    images, seg = load_case()
    prior, prior_seg = make_prior(images, seg)
    lcfg = replace(LongitudinalConfig.load(), paired_method="deformation")
    _, res = _run(tmp_path, images, seg, prior, prior_seg, PipelineConfig(model="baseline"), lcfg)
    measured = res["change"]["paired_methods"]["deformation"]
    assert set(measured) == {"whole_tumor", "tumor_core", "3"}, measured
    for key, entry in measured.items():
        assert abs(entry["delta_ml"]) < 1.0, (key, entry)
        assert entry["method"] == "deformable registration"
    assert res["change"]["vs_prior_paired"]["whole_tumor"]["method"] == "deformable registration"
    words = change_measure_words(res["change"])
    assert "ET, TC and WT by the deformable registration of the image pair" in words, words
    assert res["assessment"]["code"] == "stable"


def _segmented_by(name: str | None) -> dict:
    return {"backends": {"segmentation": {"backend": name}}} if name else {}


def test_paired_method_trained_only_where_one_trained_model_segmented_both():
    """``paired_method_trained`` chooses the pair's measures when one trained model
    segmented both timepoints; the baseline, two different segmenters or an unknown
    one keep ``paired_method``, and so does every pair when the key is null."""
    lc = replace(LongitudinalConfig(), paired_method={"whole_tumor": "boundary_shift", "tumor_core": "deformation"},
                 paired_method_trained="deformation_shift")
    trained = {k: "deformation_shift" for k in ("3", "tumor_core", "whole_tumor")}
    plain = {"3": "boundary_shift", "tumor_core": "deformation", "whole_tumor": "boundary_shift"}
    assert paired_methods_for(lc, _segmented_by("brats17-wang"), _segmented_by("brats17-wang")) == (
        trained, "paired_method_trained")
    for prior, current in (("baseline", "baseline"), ("baseline", "brats17-wang"), ("brats17-wang", "other-net"),
                           (None, "brats17-wang"), (None, None)):
        assert paired_methods_for(lc, _segmented_by(prior), _segmented_by(current)) == (plain, "paired_method")
    unset = replace(lc, paired_method_trained=None)
    assert paired_methods_for(unset, _segmented_by("brats17-wang"), _segmented_by("brats17-wang")) == (
        plain, "paired_method")
    shipped = LongitudinalConfig.load()
    assert paired_methods_for(shipped, _segmented_by("brats17-wang"), _segmented_by("brats17-wang"))[0][
        "whole_tumor"] == "deformation_shift"
    assert paired_methods_for(shipped, _segmented_by("baseline"), _segmented_by("baseline"))[0][
        "whole_tumor"] == "boundary_shift"


def test_paired_method_trained_is_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text in ("paired_method_trained: jacobian\n", "paired_method_trained: {NCR: deformation}\n"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="paired_method_trained"):
            LongitudinalConfig.load(bad)


@needs_data(CASE)
def test_a_pair_one_trained_model_segmented_is_measured_by_paired_method_trained(tmp_path):
    """The step reads the segmenter of each timepoint from summary.json (here both
    say brats17-wang) and measures the pair with ``paired_method_trained``: WT by
    the FLAIR's deformation + residual, which the baseline's ``paired_method`` gives
    to the boundary shift; recorded as change.paired_setting. An unchanged 2 mm pair:
    within 1 mL (measured: WT -0.22 of 39.5 mL), "stable"."""
    images, seg = load_case()
    prior, prior_seg = make_prior(images, seg)
    work = write_work(tmp_path / "current", images, seg)
    write_work(work / "priors" / "0", prior, prior_seg)
    write_priors(work, ["20240101"])
    for folder in (work, work / "priors" / "0"):
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, **_segmented_by("brats17-wang")}))
    lcfg = replace(LongitudinalConfig.load(), locate=False)
    res = step_longitudinal(work, PipelineConfig(model="baseline"), lcfg)
    change = res["change"]
    assert change["paired_setting"] == "paired_method_trained"
    wt = change["vs_prior_paired"]["whole_tumor"]
    assert wt["method"] == "deformable registration and boundary shift" and wt["sequence"] == "flair", wt
    assert abs(wt["delta_ml"]) < 1.0, wt
    assert "whole_tumor" in change["paired_methods"]["deformation_shift"]
    assert change["measure"]["uses"]["whole_tumor"] == "paired"
    assert res["assessment"]["code"] == "stable"


def test_every_paired_method_has_its_own_sr_code():
    """The SR's Measurement Method names each paired measure; none falls back to
    "difference of two segmentations" (which would misstate how it was measured)."""
    from brainline.pipelines.longitudinal import PAIRED_METHODS
    words = {"boundary_shift": "boundary shift integral", "confirmed_voxels": "subtraction-confirmed voxels",
             "joint_segmentation": "joint segmentation of the registered pair",
             "deformation": "deformable registration",
             "deformation_shift": "deformable registration and boundary shift"}
    assert set(words) == set(PAIRED_METHODS)
    codes = {CHANGE_METHODS[w].value for w in words.values()}
    assert len(codes) == len(words) and CHANGE_METHODS["segmentations"].value not in codes
    assert all(len(c) <= 16 and len(CHANGE_METHODS[w].meaning) <= 64 for w, c in zip(words.values(), codes))
