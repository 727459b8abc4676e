"""Lesion follow-up (MS-like, FLAIR reference; pipelines/longitudinal.py in
"lesion" mode) on the small 2 mm work folders of tests/test_longitudinal.py:
new FLAIR lesions of MS size (not enhancing) are found and raise
"progression suspected"; a FLAIR lesion that enlarges is "growing" with its
growth; an unchanged pair that already has FLAIR lesions at both times is
"stable". The reference role is FLAIR, so registration, the mode ("auto")
and the lesion masks (segmentation + bright FLAIR) are the lesion mode's."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from brainline.pipelines.image_pipeline import PipelineConfig
from tests.shared_data import needs_data
from tests.test_longitudinal import CASE, _run, ball, load_case, make_prior, paint

pytestmark = needs_data(CASE)


@pytest.fixture(scope="module")
def case():
    return load_case()


@pytest.fixture
def cfg():
    return PipelineConfig(model="baseline", reference="flair")


def white_matter_sites(images: dict, seg: sitk.Image, n: int, seed: int = 3, min_sep_mm: float = 25.0):
    """n (x, y, z) indices in normal-looking tissue, >= 12 mm inside the
    brain, >= 25 mm from the tumour and from each other."""
    brain = sitk.GetArrayFromImage(images["flair"]) > 0
    tumour = sitk.GetArrayFromImage(seg) > 0
    sp = seg.GetSpacing()[0]
    flair = sitk.GetArrayFromImage(images["flair"])
    ok = ((ndimage.distance_transform_edt(brain) * sp > 12) & (ndimage.distance_transform_edt(~tumour) * sp > 25)
          & (flair > np.percentile(flair[brain], 40)) & (flair < np.percentile(flair[brain], 70)))
    idx = np.argwhere(ok)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for i in rng.permutation(len(idx)):
        if all(np.linalg.norm((idx[i] - c) * sp) >= min_sep_mm for c in chosen):
            chosen.append(idx[i])
        if len(chosen) == n:
            break
    assert len(chosen) == n
    return [(int(x), int(y), int(z)) for z, y, x in chosen]


def flair_lesions(images: dict, sites, volumes_mm3) -> dict:
    """The images with FLAIR-bright (99.5th percentile), non-enhancing balls."""
    brain = sitk.GetArrayFromImage(images["flair"]) > 0
    a = sitk.GetArrayFromImage(images["flair"])
    out = dict(images)
    frac = sum(ball(images["flair"], s, v) for s, v in zip(sites, volumes_mm3))
    out["flair"] = paint(images["flair"], np.clip(frac, 0, 1), float(np.percentile(a[brain], 99.5)))
    return out


def near(lesions, images, site, kind=None, mm=6.0):
    p = images["flair"].TransformContinuousIndexToPhysicalPoint(site)
    return [l for l in lesions if (kind is None or l["kind"] == kind)
            and np.linalg.norm(np.subtract(l["centroid_lps_mm"], p)) < mm]


def test_new_flair_lesions_are_found_and_progression(tmp_path, case, cfg):
    images, seg = case
    sites = white_matter_sites(images, seg, 3)
    volumes = (60.0, 150.0, 400.0)
    current = flair_lesions(images, sites, volumes)
    prior, prior_seg = make_prior(images, seg)
    work, res = _run(tmp_path, current, seg, prior, prior_seg, cfg)
    assert res["mode"] == "lesion" and res["comparison"]["registration"]["flags"] == []
    for site, volume in zip(sites, volumes):
        [lesion] = near(res["lesions"], images, site, "new")
        assert lesion["sequence"] == "flair" and lesion["prior_volume_mm3"] == 0, lesion
        assert lesion["volume_integrated_mm3"] == pytest.approx(volume, rel=0.25), (volume, lesion)
        assert "enhancing" not in lesion or lesion["enhancing"] is False, lesion   # no T1c change
    assert len(res["lesions"]) <= 4, res["lesions"]     # at most one false positive
    a = res["assessment"]
    assert a["code"] == "progression suspected" and a["reason"].startswith(f"{len(res['lesions'])} new"), a


def test_enlarging_flair_lesion_is_growing(tmp_path, case, cfg):
    images, seg = case
    [site] = white_matter_sites(images, seg, 1, seed=5)
    prior_images = flair_lesions(images, [site], [150.0])
    current = flair_lesions(images, [site], [700.0])
    prior, prior_seg = make_prior(prior_images, seg)
    work, res = _run(tmp_path, current, seg, prior, prior_seg, cfg)
    [lesion] = near(res["lesions"], images, site, mm=8.0)
    assert lesion["kind"] == "growing", res["lesions"]
    # growth from the subtraction's new voxels only (lesion mode): 550 mm^3 true
    assert lesion["growth_mm3"] == pytest.approx(550.0, rel=0.2), lesion
    assert res["assessment"]["code"] == "progression suspected"
    assert "1 enlarging" in res["assessment"]["reason"], res["assessment"]


def test_unchanged_flair_lesions_are_stable(tmp_path, case, cfg):
    images, seg = case
    sites = white_matter_sites(images, seg, 3, seed=7)
    both = flair_lesions(images, sites, (100.0, 250.0, 500.0))
    prior, prior_seg = make_prior(both, seg)
    work, res = _run(tmp_path, both, seg, prior, prior_seg, cfg)
    assert res["mode"] == "lesion"
    for site in sites:
        assert near(res["lesions"], images, site) == [], res["lesions"]   # present at both times: not reported
    assert res["lesions"] == [] and res["assessment"]["code"] == "stable", res["assessment"]
