"""The combined FLAIR + T2 evidence of the new-lesion search (``combine_t2``,
pipelines/longitudinal_images.combined_evidence): a new T2-hyperintense lesion
rises on both subtractions, so their sum finds a lesion too faint for the FLAIR
alone, while a misregistered CSF edge (dark on FLAIR, bright on T2) cancels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.longitudinal import COMBINED_ROLE, LongitudinalConfig
from brainline.pipelines.longitudinal_images import combined_evidence
from tests.shared_data import BRATS18, needs_data
from tests.test_longitudinal import _run, ball, lesion_site, load_case, make_prior, paint

CASE = BRATS18 / "Brats18_CBICA_ABM_1"


def test_combined_evidence_adds_a_lesion_and_cancels_a_csf_edge():
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    inside = np.ones(shape, bool)
    flair = (0.4 * rng.standard_normal(shape)).astype(np.float32)   # below the unit floor, as with the 5 % floor
    t2 = (0.4 * rng.standard_normal(shape)).astype(np.float32)
    lesion = np.zeros(shape, bool)
    lesion[10:14, 10:14, 10:14] = True
    flair[lesion] += 2.8                                              # each alone below z 3.5
    t2[lesion] += 2.8
    edge = np.zeros(shape, bool)
    edge[25:29, 25:29, 25:29] = True
    flair[edge] += 4.0                                                # CSF -> tissue: FLAIR rises ...
    t2[edge] -= 4.0                                                   # ... T2 falls
    z, rec = combined_evidence((flair, inside), (t2, inside))
    assert rec["robust_sd"] == pytest.approx(np.sqrt(2.0), abs=1e-3)          # the floor: two independent unit maps
    assert float(np.median(z[lesion])) > 3.5 > float(np.median(flair[lesion]))
    assert abs(float(np.median(z[edge]))) < 1.0
    assert abs(rec["correlation"]) < 0.2
    # outside where both are defined: 0
    half = inside.copy()
    half[:, :, 20:] = False
    z2, _ = combined_evidence((flair, inside), (t2, half))
    assert not z2[:, :, 20:].any() and z2[lesion].min() > 3.0


def _painted(images, frac, bright_z: float, flair_floors: float, t2_floors: float):
    """(current images, SD floor %) with the lesion ``frac`` painted ``bright_z``
    robust SDs above the FLAIR's brain median, which is ``flair_floors`` SD floors
    above the FLAIR there; T2 raised (or, negative, lowered) by ``t2_floors`` floors
    of its brain median."""
    brain = sitk.GetArrayFromImage(images["flair"]) > 0
    fl = sitk.GetArrayFromImage(images["flair"])
    med = float(np.median(fl[brain]))
    sd = 1.4826 * float(np.median(np.abs(fl[brain] - med)))
    level = med + bright_z * sd
    core = frac > 0.99
    contrast = float(np.mean(level - fl[core]))
    assert contrast > 0
    floor_percent = 100.0 * contrast / (flair_floors * med)
    t2 = sitk.GetArrayFromImage(images["t2"])
    t2_level = float(np.mean(t2[core])) + t2_floors * floor_percent / 100.0 * float(np.median(t2[brain]))
    assert t2_level > 0
    current = dict(images, flair=paint(images["flair"], frac, level), t2=paint(images["t2"], frac, t2_level))
    return current, floor_percent


@needs_data(CASE)
def test_faint_flair_and_t2_lesion_found_only_with_both(tmp_path):
    """A 400 mm^3 lesion 2.8 floors bright on each of FLAIR and T2 subtraction
    (bright now: 3 robust SDs above the FLAIR's brain median): the FLAIR alone
    misses it (z < z_threshold 3.5), the combined evidence (about 2 x 2.8 /
    sqrt(2) = 4.0) finds it, named "flair+t2"."""
    images, seg = load_case(CASE)
    site = lesion_site(images, seg)
    frac = ball(images["t1c"], site, 400.0)
    current, floor_percent = _painted(images, frac, 3.0, 2.8, 2.8)   # 2.8 floors on FLAIR and on T2
    prior, prior_seg = make_prior(images, seg)
    base = replace(LongitudinalConfig.load(), min_sd_percent=floor_percent)
    truth = images["t1c"].TransformContinuousIndexToPhysicalPoint(site)
    cfg = PipelineConfig(model="baseline")
    found = {}
    for on in (False, True):
        lcfg = replace(base, combine_t2=on, combined_current_min_z=min(base.combined_current_min_z, 2.0))
        _, res = _run(tmp_path / str(on), current, seg, prior, prior_seg, cfg, lcfg)
        found[on] = [x for x in res["lesions"] if x["kind"] == "new"
                     and np.linalg.norm(np.subtract(x["centroid_lps_mm"], truth)) < 6.0]
        assert len(res["lesions"]) <= 2, res["lesions"]
        if on:
            assert res["comparison"]["combined_t2"]["robust_sd"] >= np.sqrt(2.0) - 1e-3
    assert found[False] == [], found[False]
    assert len(found[True]) == 1 and found[True][0]["sequence"] == COMBINED_ROLE, found[True]
    assert found[True][0]["volume_mm3"] > 100.0


@needs_data(CASE)
def test_flair_bright_t2_dark_lesion_is_still_found(tmp_path):
    """The combined map is one more search map, not a filter: a new lesion bright
    on FLAIR but dark on T2 (a haemorrhagic or mineralised focus; the generator's
    lesions are all T2-bright) cancels in the FLAIR + T2 sum, and is still found
    on the FLAIR subtraction alone (6 floors up on FLAIR, 6 down on T2)."""
    images, seg = load_case(CASE)
    site = lesion_site(images, seg)
    frac = ball(images["t1c"], site, 400.0)
    current, floor_percent = _painted(images, frac, 4.0, 6.0, -6.0)  # 6 floors up on FLAIR, 6 down on T2
    prior, prior_seg = make_prior(images, seg)
    lcfg = replace(LongitudinalConfig.load(), min_sd_percent=floor_percent, combine_t2=True)
    truth = images["t1c"].TransformContinuousIndexToPhysicalPoint(site)
    _, res = _run(tmp_path, current, seg, prior, prior_seg, PipelineConfig(model="baseline"), lcfg)
    found = [x for x in res["lesions"] if x["kind"] == "new"
             and np.linalg.norm(np.subtract(x["centroid_lps_mm"], truth)) < 6.0]
    assert len(found) == 1 and found[0]["sequence"] == "flair", res["lesions"]
    assert found[0]["volume_mm3"] > 100.0
    assert "combined_t2" in res["comparison"]                        # the combined map was searched too
