"""Longitudinal follow-up (pipelines/longitudinal.py) on small synthetic work
folders made from one real BraTS 2018 case, cropped around the brain and
resampled to 2 mm (about 70 x 85 x 70 voxels) so each comparison takes a
couple of seconds.

The current study is the case itself; a prior is the same case moved by a
rigid transform, multiplied by a smooth bias field and with an intensity
drift (and, for the follow-up cases, without an inserted lesion or with a
smaller tumour). The work folders hold what the image steps would have
written (nifti/, preprocessed/, brain_mask, segmentation = the BraTS truth in
BraTS 2023 labels, summary.json); one test prepares a prior from nifti/ only
with the real image steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.lesion_location import LobeMap
from brainline.pipelines.longitudinal import LongitudinalConfig, assess, step_longitudinal, volume_change
from tests.shared_data import BRATS18, needs_data

CASE = BRATS18 / "Brats18_CBICA_ABM_1"
FILES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}

pytestmark = needs_data(CASE)


# ---------------------------------------------------------------------------
# helpers to make work folders (also used by the measurement in the README)
def load_case(case_dir: Path = CASE, spacing: float | None = 2.0, margin_mm: float = 6.0):
    """({role: image}, seg) of a BraTS case: cropped to the brain + margin and
    resampled to ``spacing`` mm (None: the 1 mm original); seg in BraTS 2023
    labels (1 NCR, 2 ED, 3 ET)."""
    name = case_dir.name
    imgs = {r: sitk.ReadImage(str(case_dir / f"{name}_{f}.nii.gz"), sitk.sitkFloat32) for r, f in FILES.items()}
    seg = sitk.ReadImage(str(case_dir / f"{name}_seg.nii.gz"), sitk.sitkUInt8)
    seg = sitk.ChangeLabel(seg, {4: 3})
    if spacing is None:
        return imgs, seg
    brain = sitk.GetArrayFromImage(imgs["t1c"]) > 0
    idx = np.argwhere(brain)
    m = int(margin_mm)
    lo = np.maximum(idx.min(axis=0) - m, 0)[::-1]
    hi = np.minimum(idx.max(axis=0) + m, np.array(brain.shape) - 1)[::-1]
    size = [int(v) for v in (hi - lo + 1)]
    ref = sitk.RegionOfInterest(imgs["t1c"], size, [int(v) for v in lo])
    new_size = [int(round(s * sp / spacing)) for s, sp in zip(ref.GetSize(), ref.GetSpacing())]
    grid = sitk.Image(new_size, sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(ref.GetDirection())
    grid.SetOrigin(ref.TransformContinuousIndexToPhysicalPoint([(spacing / sp - 1) / 2 for sp in ref.GetSpacing()]))
    ident = sitk.Transform(3, sitk.sitkIdentity)
    # anti-aliasing before the 2 mm grid; background (outside the BraTS brain) stays exactly 0
    brain_img = sitk.Cast(imgs["t1c"] > 0, sitk.sitkFloat32)
    mask = sitk.Resample(brain_img, grid, ident, sitk.sitkLinear, 0.0) > 0.5
    out = {}
    for r, im in imgs.items():
        a = sitk.Resample(sitk.SmoothingRecursiveGaussian(im, 0.5 * spacing), grid, ident, sitk.sitkLinear, 0.0)
        out[r] = sitk.Mask(a, mask)
    seg = sitk.Mask(sitk.Resample(seg, grid, ident, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8), mask)
    return out, seg


def _center(img: sitk.Image):
    return img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])


def moved(img: sitk.Image, angles_deg=(3.0, -2.0, 4.0), shift_mm=(3.0, -4.0, 2.0), nearest=False) -> sitk.Image:
    """The same grid with its content moved rigidly (rotation about the
    grid centre, degrees; shift in mm)."""
    tx = sitk.Euler3DTransform()
    tx.SetCenter(_center(img))
    tx.SetRotation(*np.deg2rad(angles_deg))
    tx.SetTranslation(shift_mm)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(img, img, tx, interp, 0.0, img.GetPixelID())


def biased(img: sitk.Image, strength=0.15, scale=1.2, offset=5.0) -> sitk.Image:
    """Multiplicative smooth bias field exp(strength * (linear + quadratic
    ramp)) and a linear intensity drift (scale, offset), 0 stays 0."""
    a = sitk.GetArrayFromImage(img)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in a.shape], indexing="ij")
    field = np.exp(strength * (0.7 * x - 0.5 * y + 0.6 * z ** 2 - 0.3))
    b = np.where(a > 0, scale * a * field + offset, 0).astype(np.float32)
    out = sitk.GetImageFromArray(b)
    out.CopyInformation(img)
    return out


def ball(img: sitk.Image, center_idx, volume_mm3: float) -> np.ndarray:
    """Partial-volume fraction (0..1, (z, y, x)) of a ball of ``volume_mm3``
    centred at index ``center_idx`` (x, y, z), 4x supersampled."""
    sp = np.array(img.GetSpacing())
    r = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    shape = sitk.GetArrayViewFromImage(img).shape
    frac = np.zeros(shape, np.float32)
    n = 4
    offs = (np.arange(n) + 0.5) / n - 0.5
    cz, cy, cx = center_idx[2], center_idx[1], center_idx[0]
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for oz in offs:
        for oy in offs:
            for ox in offs:
                d2 = (((xx + ox - cx) * sp[0]) ** 2 + ((yy + oy - cy) * sp[1]) ** 2 + ((zz + oz - cz) * sp[2]) ** 2)
                frac += (d2 <= r * r)
    return frac / n ** 3


def paint(img: sitk.Image, frac: np.ndarray, value: float) -> sitk.Image:
    a = sitk.GetArrayFromImage(img)
    b = (a * (1 - frac) + value * frac).astype(np.float32)
    out = sitk.GetImageFromArray(b)
    out.CopyInformation(img)
    return out


def write_work(work: Path, images: dict, seg: sitk.Image, summary: bool = True, date: str | None = None) -> Path:
    """A work folder as the image steps leave it (nifti = preprocessed here)."""
    work.mkdir(parents=True, exist_ok=True)
    mask = None
    for role, img in images.items():
        for sub in ("nifti", "preprocessed"):
            (work / sub).mkdir(exist_ok=True)
            sitk.WriteImage(img, str(work / sub / f"{role}.nii.gz"))
        if summary:
            m = sitk.GetArrayFromImage(img) > 1e-3
            mask = m if mask is None else (mask | m)
    if not summary:
        for role in images:
            (work / "preprocessed" / f"{role}.nii.gz").unlink()
        return work
    ref = images["t1c"] if "t1c" in images else next(iter(images.values()))
    mimg = sitk.GetImageFromArray(ndimage.binary_fill_holes(mask).astype(np.uint8))
    mimg.CopyInformation(ref)
    sitk.WriteImage(mimg, str(work / "brain_mask.nii.gz"))
    sitk.WriteImage(seg, str(work / "segmentation.nii.gz"))
    lab = sitk.GetArrayFromImage(seg)
    ml = float(np.prod(seg.GetSpacing())) / 1000.0
    vols = {str(k): round(float((lab == k).sum()) * ml, 3) for k in (1, 2, 3)}
    vols["tumor_core"] = round(float(np.isin(lab, (1, 3)).sum()) * ml, 3)
    vols["whole_tumor"] = round(float((lab > 0).sum()) * ml, 3)
    (work / "summary.json").write_text(json.dumps({"volumes_ml": vols, "reference": "t1c"}))
    return work


def write_priors(work: Path, dates: list[str], current: str = "20240601") -> None:
    (work / "priors.json").write_text(json.dumps({
        "current": {"study_date": current},
        "priors": [{"dir": f"priors/{k}", "study_date": d, "kept_as": ["most recent"], "source": "offline folder",
                    "pseudo_study_uid": f"2.25.{k + 1}", "job_id": None} for k, d in enumerate(dates)],
        "searched": ["offline folder"], "notes": []}))


def make_prior(images: dict, seg: sitk.Image, strength: float = 0.05) -> tuple[dict, sitk.Image]:
    """Rigid motion + bias + drift of every sequence (and the segmentation).
    The default bias (+-5 %) is what N4 leaves (preprocessed images); the
    test that runs the image steps on the prior uses a strong one."""
    return ({r: biased(moved(im), strength=strength, scale=s)
             for (r, im), s in zip(images.items(), (1.2, 0.9, 1.1, 1.3))},
            moved(seg, nearest=True))


def lesion_site(images: dict, seg: sitk.Image, min_mm: float = 12.0):
    """A white-matter-like voxel (x, y, z index) far from the tumour and the brain edge."""
    brain = sitk.GetArrayFromImage(images["t1c"]) > 0
    tumour = sitk.GetArrayFromImage(seg) > 0
    sp = seg.GetSpacing()[0]
    d_edge = ndimage.distance_transform_edt(brain) * sp
    d_tum = ndimage.distance_transform_edt(~tumour) * sp
    flair = sitk.GetArrayFromImage(images["flair"])
    ok = (d_edge > min_mm) & (d_tum > 25) & (flair > np.percentile(flair[brain], 40)) & \
         (flair < np.percentile(flair[brain], 70))
    idx = np.argwhere(ok)
    z, y, x = idx[len(idx) // 2]
    return (int(x), int(y), int(z))


@pytest.fixture(scope="module")
def case():
    return load_case()


@pytest.fixture
def cfg():
    return PipelineConfig(model="baseline")


def _run(tmp_path: Path, current: dict, cur_seg, prior: dict, prior_seg, cfg, lcfg=None, dates=("20240101",)):
    work = write_work(tmp_path / "current", current, cur_seg)
    for k, _ in enumerate(dates):
        write_work(work / "priors" / str(k), prior, prior_seg)
    write_priors(work, list(dates))
    t0 = time.monotonic()
    res = step_longitudinal(work, cfg, lcfg)
    res["_wall_s"] = time.monotonic() - t0
    return work, res


# ---------------------------------------------------------------------------
def test_no_change_pair_has_few_false_positives(tmp_path, case, cfg):
    images, seg = case
    prior, prior_seg = make_prior(images, seg)
    work, res = _run(tmp_path, images, seg, prior, prior_seg, cfg)
    assert res["priors"] == 1 and res["mode"] == "tumour"
    assert res["comparison"]["registration"]["flags"] == []
    assert len(res["lesions"]) <= 1, res["lesions"]
    assert res["assessment"]["code"] == "stable", res["assessment"]
    for role in ("flair", "t1c"):
        d = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "longitudinal" / f"subtraction_{role}.nii.gz")))
        cur = sitk.GetArrayFromImage(images[role])
        brain = d != 0
        # the matched prior cancels the current: robust spread < 8 % of the brain median
        assert 1.4826 * np.median(np.abs(d[brain] - np.median(d[brain]))) < 0.08 * np.median(cur[brain])
    lab = sitk.ReadImage(str(work / "longitudinal" / "lesions.nii.gz"))
    assert lab.GetSize() == seg.GetSize() and lab.GetPixelID() == sitk.sitkUInt16
    assert res["change"]["vs_prior"]["whole_tumor"]["percent"] == pytest.approx(0.0, abs=3.0)
    assert res["timepoints"][-1]["label"] == "current" and res["timepoints"][0]["label"] == "prior"


def test_new_lesion_is_found_with_its_volume(tmp_path, case, cfg):
    images, seg = case
    site = lesion_site(images, seg)
    frac = ball(images["t1c"], site, 200.0)
    brain = sitk.GetArrayFromImage(images["flair"]) > 0
    current = dict(images)
    for role, q in (("flair", 99.5), ("t1c", 99.5)):
        a = sitk.GetArrayFromImage(images[role])
        current[role] = paint(images[role], frac, float(np.percentile(a[brain], q)))
    prior, prior_seg = make_prior(images, seg)
    work, res = _run(tmp_path, current, seg, prior, prior_seg, cfg)
    new = [l for l in res["lesions"] if l["kind"] == "new"]
    truth = images["t1c"].TransformContinuousIndexToPhysicalPoint(site)
    near = [l for l in new if np.linalg.norm(np.subtract(l["centroid_lps_mm"], truth)) < 6.0]
    assert len(near) == 1, res["lesions"]
    assert near[0]["volume_mm3"] == pytest.approx(200.0, rel=0.25)
    # the partial-volume integral of the subtraction reads the lesion closer than its half-maximum extent
    assert near[0]["volume_integrated_mm3"] == pytest.approx(200.0, rel=0.15), near[0]
    assert near[0]["prior_volume_mm3"] == 0 and 0 < near[0]["confidence"] <= 1
    assert near[0]["hemisphere"] in ("left", "right", "midline") and near[0]["lobe"] != "unknown"
    assert res["lesion_location"]["method"] in ("atlas", "coordinate rules"), res.get("lesion_location")
    assert len(res["lesions"]) <= 2
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "longitudinal" / "lesions.nii.gz")))
    assert (lab == near[0]["id"]).sum() * 8.0 == pytest.approx(near[0]["volume_mm3"])
    # RANO: enhancing (painted on T1c) but 7.3 mm across: not measurable, so no progression by itself
    assert near[0]["enhancing"] is True and near[0]["measurable"] is False, near[0]
    assert near[0]["long_axis_mm"] == pytest.approx(7.3, abs=1.5), near[0]
    assert res["assessment"]["code"] == "stable", res["assessment"]
    assert "below measurable size" in res["assessment"]["reason"], res["assessment"]
    assert near[0]["id"] in res["assessment"]["new_lesions"]["below_measurable"]


def test_new_lesion_found_when_part_of_the_flair_is_zero(tmp_path, case, cfg):
    """A FLAIR left at 0 in part of the brain (a slab that stops short, a
    zero-filled public volume) must not widen the image statistics: a new
    lesion 3 robust SDs brighter than the FLAIR's own brain is bright now
    (with the zeros counted, the robust SD triples and it was dropped)."""
    images, seg = case
    brain = sitk.GetArrayFromImage(images["flair"]) > 0
    zs = np.nonzero(brain.any(axis=(1, 2)))[0]
    cut = zs[0] + int(0.5 * (zs[-1] - zs[0]))    # the lower half of the brain's slices: ~37 % of its voxels
    upper = sitk.GetArrayFromImage(images["t1c"])
    upper[:cut + 6] = 0.0
    upper_img = sitk.GetImageFromArray(upper)
    upper_img.CopyInformation(images["t1c"])
    site = lesion_site({**images, "t1c": upper_img}, seg)           # in the imaged part, away from its edge
    flair = sitk.GetArrayFromImage(images["flair"])
    flair[:cut] = 0.0
    imaged = brain & (flair > 0)
    med = float(np.median(flair[imaged]))
    sd = 1.4826 * float(np.median(np.abs(flair[imaged] - med)))
    zeroed = sitk.GetImageFromArray(flair)
    zeroed.CopyInformation(images["flair"])
    base = {**images, "flair": zeroed}
    current = {**base, "flair": paint(zeroed, ball(images["flair"], site, 400.0), med + 3.5 * sd)}
    prior, prior_seg = make_prior(base, seg)
    work, res = _run(tmp_path, current, seg, prior, prior_seg, cfg)
    truth = images["flair"].TransformContinuousIndexToPhysicalPoint(site)
    near = [l for l in res["lesions"] if l["kind"] == "new"
            and np.linalg.norm(np.subtract(l["centroid_lps_mm"], truth)) < 6.0]
    assert len(near) == 1 and near[0]["sequence"] == "flair", res["lesions"]
    assert len(res["lesions"]) <= 2, res["lesions"]


@pytest.mark.parametrize("roles, progression", [(("flair", "t1c"), True), (("flair",), False)],
                         ids=["enhancing", "flair-only"])
def test_new_measurable_enhancing_lesion_is_progression(tmp_path, case, cfg, roles, progression):
    """RANO 2.0: a new enhancing lesion with both axial diameters >= 10 mm is
    progression although the tumour did not grow; the same lesion bright on
    FLAIR only (non-enhancing) is listed but does not change the flag."""
    images, seg = case
    site = lesion_site(images, seg, min_mm=16.0)
    frac = ball(images["t1c"], site, 2000.0)   # 15.6 mm across
    brain = sitk.GetArrayFromImage(images["flair"]) > 0
    current = dict(images)
    for role in roles:
        a = sitk.GetArrayFromImage(images[role])
        current[role] = paint(images[role], frac, float(np.percentile(a[brain], 99.5)))
    prior, prior_seg = make_prior(images, seg)
    work, res = _run(tmp_path, current, seg, prior, prior_seg, cfg)
    truth = images["t1c"].TransformContinuousIndexToPhysicalPoint(site)
    [lesion] = [l for l in res["lesions"] if l["kind"] == "new"
                and np.linalg.norm(np.subtract(l["centroid_lps_mm"], truth)) < 6.0]
    assert lesion["enhancing"] is progression, lesion
    assert abs(res["change"]["vs_prior"]["3"]["delta_ml"]) < 0.5    # the tumour itself did not change
    if progression:
        assert lesion["measurable"] is True, lesion
        assert 13.5 <= lesion["short_axis_mm"] <= lesion["long_axis_mm"] <= 17.5, lesion   # 15.6 mm ball
        assert res["assessment"]["code"] == "progression suspected", res["assessment"]
        assert res["assessment"]["new_lesions"]["counted"] == [lesion["id"]]
        assert "new enhancing lesion" in res["assessment"]["reason"] and "RANO 2.0" in res["assessment"]["reason"]
    else:
        assert lesion["long_axis_mm"] is None and lesion["measurable"] is False, lesion
        assert res["assessment"]["code"] == "stable", res["assessment"]
        assert res["assessment"]["new_lesions"]["non_enhancing"] == [lesion["id"]]
        assert "non-enhancing" in res["assessment"]["reason"]


def test_new_lesion_rule_in_the_assessment(tmp_path):
    """The rule on lesion records: measurable / any / off, with the volume rule."""
    def tp(date, et, tc):
        return {"label": "prior", "study_date": date, "kept_as": [],
                "volumes_ml": {"1": tc - et, "2": 10.0, "3": et, "tumor_core": tc, "whole_tumor": tc + 10}}
    vs_prior = volume_change([tp("20240101", 3.0, 7.0), tp("20240601", 3.0, 7.0)], "tumour")[0]
    change = {"vs_prior": vs_prior, "vs_nadir": None}

    def lesion(i, enhancing, long_mm, short_mm, kind="new"):
        return {"id": i, "kind": kind, "enhancing": enhancing, "long_axis_mm": long_mm, "short_axis_mm": short_mm,
                "measurable": bool(long_mm and short_mm and min(long_mm, short_mm) >= 10.0),
                "hemisphere": "right", "lobe": "frontal"}
    big, small, flair = lesion(1, True, 14.0, 11.0), lesion(2, True, 8.0, 6.0), lesion(3, False, None, None)
    grown = lesion(4, True, 20.0, 15.0, kind="growing")
    lc = LongitudinalConfig()
    assert lc.new_lesion_rule == "measurable" == LongitudinalConfig.load().new_lesion_rule
    a = assess(change, vs_prior, lc, [big, small, flair, grown], "tumour")
    assert a["code"] == "progression suspected"
    assert a["new_lesions"] == {"rule": "measurable", "counted": [1], "below_measurable": [2], "non_enhancing": [3],
                                "not_assessed": []}
    assert "lesion 1 (right frontal, 14 x 11 mm)" in a["reason"] and "lesion 2 (right frontal, 8 x 6 mm)" in a["reason"]
    assert "increased" not in a["reason"]        # the volumes did not change
    for lesions in ([small, flair, grown], [], None):
        assert assess(change, vs_prior, lc, lesions, "tumour")["code"] == "stable"
    assert "new_lesions" not in assess(change, vs_prior, lc, None, "tumour")   # no subtraction: no detection
    assert assess(change, vs_prior, replace(lc, new_lesion_rule="any"), [small], "tumour")["code"] == \
        "progression suspected"
    off = assess(change, vs_prior, replace(lc, new_lesion_rule="off"), [big], "tumour")
    assert off["code"] == "stable" and "new_lesion_rule: off" in off["reason"]
    # both rules: the reason gives the volume and the lesion
    grew = volume_change([tp("20240101", 3.0, 7.0), tp("20240601", 5.0, 9.0)], "tumour")[0]
    both = assess({"vs_prior": grew}, grew, lc, [big], "tumour")
    assert both["code"] == "progression suspected"
    assert "enhancing tumour" in both["reason"] and "lesion 1" in both["reason"]
    (tmp_path / "bad.yaml").write_text("new_lesion_rule: sometimes\n")
    # without a T1c subtraction a new lesion's enhancement is unknown: said so, not called non-enhancing
    unknown = {"id": 5, "kind": "new", "hemisphere": "left", "lobe": "parietal"}
    u = assess(change, vs_prior, lc, [unknown], "tumour")
    assert u["code"] == "stable" and u["new_lesions"]["not_assessed"] == [5] and u["new_lesions"]["non_enhancing"] == []
    assert "could not be assessed (no T1c subtraction): lesion 5 (left parietal)" in u["reason"]
    with pytest.raises(ValueError, match="new_lesion_rule"):
        LongitudinalConfig.load(tmp_path / "bad.yaml")


def test_grown_tumour_is_growing_and_progression(tmp_path, case, cfg):
    images, seg = case
    lab = sitk.GetArrayFromImage(seg)
    brain = sitk.GetArrayFromImage(images["t1c"]) > 0
    # the prior: the tumour 2 mm smaller (its outer ring replaced by normal-looking tissue)
    core = ndimage.binary_erosion(lab > 0, np.ones((3, 3, 3)))
    ring = (lab > 0) & ~core
    small = np.where(core, lab, 0).astype(np.uint8)
    prior_images = {}
    for role, img in images.items():
        a = sitk.GetArrayFromImage(img)
        normal = float(np.median(a[brain & ~ndimage.binary_dilation(lab > 0, iterations=3)]))
        prior_images[role] = paint(img, ring.astype(np.float32), normal)
    small_seg = sitk.GetImageFromArray(small)
    small_seg.CopyInformation(seg)
    prior, prior_seg = make_prior(prior_images, small_seg)
    work, res = _run(tmp_path, images, seg, prior, prior_seg, cfg)
    growing = [l for l in res["lesions"] if l["kind"] == "growing"]
    assert growing, res["lesions"]
    g = max(growing, key=lambda l: l["growth_mm3"])
    true_growth = float(ring.sum() * 8.0)
    assert g["growth_mm3"] == pytest.approx(true_growth, rel=0.10)  # the benchmark target: <= 10 %
    assert res["change"]["vs_prior"]["whole_tumor"]["delta_ml"] == pytest.approx(true_growth / 1000, rel=0.05)
    assert res["assessment"]["code"] == "progression suspected", res["assessment"]


def test_unregistrable_prior_gives_a_note_and_no_lesions(tmp_path, case, cfg):
    images, seg = case
    rng = np.random.default_rng(1)
    noise = {}
    for role, img in images.items():
        a = rng.uniform(0, 500, sitk.GetArrayViewFromImage(img).shape).astype(np.float32)
        noise[role] = sitk.GetImageFromArray(a)
        noise[role].CopyInformation(img)
    work, res = _run(tmp_path, images, seg, noise, seg, cfg)
    assert res["lesions"] == [] and res["priors"] == 1
    assert "could not be registered" in res["note"] and "volumes compared only" in res["note"]
    assert res["flags"] and res["comparison"]["subtractions"] == {}
    assert res["change"]["vs_prior"]["whole_tumor"]["delta_ml"] == 0
    assert not (work / "longitudinal" / "subtraction_flair.nii.gz").exists()


def test_no_priors_and_broken_prior(tmp_path, case, cfg):
    images, seg = case
    work = write_work(tmp_path / "current", images, seg)
    res = step_longitudinal(work, cfg)
    assert res["priors"] == 0 and "no prior study found" in res["note"]
    assert res["assessment"]["code"] == "not assessable" and res["lesions"] == []
    assert json.loads((work / "longitudinal.json").read_text())["note"] == res["note"]
    # a prior folder with nothing usable: recorded in words, no exception
    work2 = write_work(tmp_path / "current2", images, seg)
    (work2 / "priors" / "0").mkdir(parents=True)
    write_priors(work2, ["20240101"])
    res2 = step_longitudinal(work2, cfg)
    assert res2["priors"] == 0 and "could not be processed" in res2["note"]


@pytest.mark.serial  # the 90-s bound on the added time: runs alone, after the parallel phase
def test_prior_prepared_from_nifti_and_thick_flair(tmp_path, case, cfg):
    """A prior holding only nifti/ goes through the real image steps
    (baseline segmenter); its FLAIR has 6 mm slices (thick-slice note)."""
    images, seg = case
    prior, _ = make_prior(images, seg, strength=0.2)
    fl = prior["flair"]
    thick = sitk.Image([fl.GetSize()[0], fl.GetSize()[1], int(fl.GetSize()[2] * 2 / 6)], sitk.sitkFloat32)
    thick.SetSpacing((2.0, 2.0, 6.0))
    thick.SetOrigin(fl.GetOrigin())
    thick.SetDirection(fl.GetDirection())
    prior["flair"] = sitk.Resample(sitk.SmoothingRecursiveGaussian(fl, [0.1, 0.1, 2.5]), thick,
                                   sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0)
    work = write_work(tmp_path / "current", images, seg)
    write_work(work / "priors" / "0", prior, seg, summary=False)
    write_priors(work, ["20240101"])
    t0 = time.monotonic()
    res = step_longitudinal(work, cfg)
    elapsed = time.monotonic() - t0
    assert (work / "priors" / "0" / "summary.json").exists()
    assert res["priors"] == 1 and res["comparison"]["registration"]["flags"] == [], res["note"]
    assert any("small-lesion detection is limited" in n for n in res["notes"]), res["notes"]
    r = res["comparison"]["resolution"]["flair"]
    assert r["smoothed"] == "current" and max(r["prior_mm"]) == pytest.approx(6.0, abs=0.5)
    assert len(res["lesions"]) <= 2, res["lesions"]
    assert elapsed < 90


def test_thresholds_change_the_assessment(tmp_path):
    def tp(date, et, tc):
        return {"label": "prior", "study_date": date, "kept_as": [],
                "volumes_ml": {"1": tc - et, "2": 10.0, "3": et, "tumor_core": tc, "whole_tumor": tc + 10}}
    tps = [tp("20230101", 4.0, 8.0), tp("20230601", 2.0, 6.0), tp("20240101", 2.5, 6.5), tp("20240601", 3.0, 7.5)]
    vs_prior, vs_nadir, base = volume_change(tps, "tumour")
    assert vs_nadir["study_date"] == "20230601" and vs_nadir["3"]["percent"] == pytest.approx(50.0)
    change = {"vs_prior": vs_prior, "vs_nadir": vs_nadir}
    base_change = {k: v for k, v in volume_change([base, tps[-1]], "tumour")[0].items()}
    lc = LongitudinalConfig()
    assert assess(change, base_change, lc, None, "tumour")["code"] == "progression suspected"
    lc.min_change_ml = 1.5  # ET +1.0 mL, TC +1.5 mL (+25 %): no longer progression, TC borderline (>= +25 %)
    a = assess(change, base_change, lc, None, "tumour")
    assert a["code"] == "borderline" and a["borderline"] == ["tumor_core"], a
    assert "tumour core increased against the nadir by less than the progression threshold but by at least " \
           "+25 %" in a["reason"] and "compare the images" in a["reason"], a["reason"]
    assert "tumour core 6.0 -> 7.5 mL (+25 %)" in a["reason"], a["reason"]
    lc.borderline_percent = 30.0
    assert assess(change, base_change, lc, None, "tumour")["code"] == "stable"
    lc = LongitudinalConfig(progression_percent=60.0)  # ET +50 %, TC +25 %: both in the band
    a = assess(change, base_change, lc, None, "tumour")
    assert a["code"] == "borderline" and a["borderline"] == ["3", "tumor_core"], a
    lc.borderline_percent = None
    assert assess(change, base_change, lc, None, "tumour")["code"] == "stable"
    tps2 = [tp("20230101", 10.0, 20.0), tp("20240601", 3.0, 8.0)]
    vp, vn, b = volume_change(tps2, "tumour")
    a = assess({"vs_prior": vp, "vs_nadir": vn}, vp, LongitudinalConfig(), None, "tumour")
    assert a["code"] == "decrease" and "-70 %" in a["reason"]
    assert assess({"vs_prior": vp, "vs_nadir": vn}, vp, LongitudinalConfig(decrease_percent=-80.0), None,
                  "tumour")["code"] == "stable"
    assert LongitudinalConfig.load().progression_percent == 40.0
    assert LongitudinalConfig.load().borderline_percent == 25.0
    for bad in ("45", "0", "-5"):   # the band must lie below the progression threshold
        (tmp_path / "bad.yaml").write_text(f"borderline_percent: {bad}\n")
        with pytest.raises(ValueError, match="borderline_percent must be above 0 and below progression_percent"):
            LongitudinalConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "off.yaml").write_text("borderline_percent: null\n")
    assert LongitudinalConfig.load(tmp_path / "off.yaml").borderline_percent is None


def test_lobe_map_rules():
    lobes = LobeMap()
    lo, hi = lobes.lo, lobes.hi

    def at(l, u, h):
        x = 0.5 * (lo[0] + hi[0]) + l * 0.5 * (hi[0] - lo[0])
        return (x, lo[1] + u * (hi[1] - lo[1]), lo[2] + h * (hi[2] - lo[2]))

    assert lobes.lobe(at(0.5, 0.15, 0.6)) == "frontal" and lobes.hemisphere(at(0.5, 0.15, 0.6)) == "left"
    assert lobes.lobe(at(-0.5, 0.9, 0.5)) == "occipital" and lobes.hemisphere(at(-0.5, 0.9, 0.5)) == "right"
    assert lobes.lobe(at(0.7, 0.5, 0.3)) == "temporal"
    assert lobes.lobe(at(0.4, 0.6, 0.8)) == "parietal"
    assert lobes.lobe(at(0.1, 0.8, 0.1)) == "cerebellum/brainstem"
    assert lobes.lobe(at(0.2, 0.5, 0.45)) == "insula/deep"
    assert lobes.hemisphere(at(0.0, 0.5, 0.5)) == "midline"


def test_paired_change_counts_only_changes_the_subtraction_confirms():
    """Two segmentations of an unchanged tumour that disagree (the segmenter's
    own irreproducibility) give no paired change; voxels that the current
    segmentation adds where FLAIR rose count as growth, and dropped voxels
    where it fell as shrinkage."""
    from brainline.pipelines.longitudinal import paired_change

    prior = np.zeros((20, 20, 20), np.uint8)
    prior[5:15, 5:15, 5:15] = 2          # 1000 voxels of oedema
    prior[8:12, 8:12, 8:12] = 3          # 64 voxels enhancing
    current = prior.copy()
    current[4, 5:15, 5:15] = 2           # the segmenter reaches one slice further ...
    z = {"flair": np.zeros(prior.shape), "t1c": np.zeros(prior.shape)}
    same = paired_change(current, prior, z, voxel_mm3=1.0, support_z=2.0)
    assert same["whole_tumor"]["delta_ml"] == 0.0 and same["3"]["delta_ml"] == 0.0
    z["flair"][4] = 5.0                  # ... and there FLAIR did rise: real growth of 100 mm3
    current[5, 5:10, 5:15] = 0           # dropped, but FLAIR unchanged there: not shrinkage
    grown = paired_change(current, prior, z, voxel_mm3=1.0, support_z=2.0)
    assert grown["whole_tumor"]["gained_ml"] == pytest.approx(0.1)
    assert grown["whole_tumor"]["lost_ml"] == 0.0
    assert grown["whole_tumor"]["delta_ml"] == pytest.approx(0.1)
    assert grown["whole_tumor"]["prior_ml"] == pytest.approx(1.0)
    z["flair"][5, 5:10, 5:15] = -5.0     # FLAIR fell where the voxels were dropped: shrinkage of 50 mm3
    both = paired_change(current, prior, z, voxel_mm3=1.0, support_z=2.0)
    assert both["whole_tumor"]["delta_ml"] == pytest.approx(0.05)
    assert both["whole_tumor"]["sequence"] == "flair" and both["tumor_core"]["sequence"] == "t1c"


def test_paired_change_margin_is_a_box_around_the_prior_component():
    """With ``margin_voxels`` (z, y, x) a confirmed rise counts as growth up to
    that many voxels from the prior component along each axis (a box, the
    same per axis as the margin in mm), even where the current segmentation
    missed it; one voxel further it does not."""
    from brainline.pipelines.longitudinal import paired_change

    prior = np.zeros((30, 30, 30), np.uint8)
    prior[10:20, 10:20, 10:20] = 2
    z = {"flair": np.zeros(prior.shape), "t1c": np.zeros(prior.shape)}
    z["flair"][10:20, 10:20, 20:25] = 5.0        # rose over 5 voxels along x beyond the prior edge
    z["flair"][20:23, 10:15, 10:20] = 5.0        # and over 3 slices (50 voxels each) beyond it along z
    z["flair"][21:24, 22:24, 22:24] = 5.0        # and at a corner, 2-4 voxels off on every axis
    out = paired_change(prior, prior, z, voxel_mm3=1.0, support_z=2.0, margin_voxels=(1, 2, 3))
    # x: 3 of the 5 columns (margin 3); z: 1 of the 3 slices (margin 1); corner: none
    # (axes swapped, (3, 2, 1), it would read 100 + 150)
    assert out["whole_tumor"]["gained_ml"] == pytest.approx((300 + 50) / 1000.0)
    assert paired_change(prior, prior, z, voxel_mm3=1.0, support_z=2.0)["whole_tumor"]["gained_ml"] == 0.0


def test_native_coverage_is_the_acquired_slab_less_one_slice():
    """The region a 5 mm axial acquisition covers, carried onto a 2 mm grid:
    its voxel boxes less one slice at each end (partial volume with what was
    never imaged); a transform moves it."""
    from brainline.pipelines.longitudinal_images import native_coverage

    native = sitk.Image([10, 10, 6], sitk.sitkUInt8)   # slices at z = 0, 5, ..., 25 mm: boxes -2.5 .. 27.5
    native.SetSpacing((2.0, 2.0, 5.0))
    grid = sitk.Image([10, 10, 20], sitk.sitkUInt8)     # z = -6, -4, ..., 32 mm
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin((0.0, 0.0, -6.0))
    z = -6.0 + 2.0 * np.arange(20)
    covered = native_coverage(native, grid, sitk.Transform(3, sitk.sitkIdentity))[:, 5, 5]
    assert list(z[covered]) == [4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 22.0]   # inside 2.5 .. 22.5
    everything = native_coverage(native, grid, sitk.Transform(3, sitk.sitkIdentity), margin_voxels=0)[:, 5, 5]
    assert z[everything].min() == -2.0 and z[everything].max() == 26.0
    shifted = native_coverage(native, grid, sitk.TranslationTransform(3, (0.0, 0.0, 10.0)))[:, 5, 5]
    assert list(z[shifted]) == [v - 10.0 for v in z[covered] if v - 10.0 >= -6.0]


def test_prior_flair_coverage_limits_the_subtraction(tmp_path, case, cfg):
    """A prior whose FLAIR stops short of the lower quarter of the brain (a
    limited slab): no subtraction and no lesion there, and a note in words.
    Without the coverage mask the missing slab reads as a large FLAIR rise."""
    images, seg = case
    prior, prior_seg = make_prior(images, seg)
    fl = prior["flair"]
    a = sitk.GetArrayFromImage(fl)
    brain_z = np.nonzero(a.reshape(a.shape[0], -1).max(axis=1) > 0)[0]
    cut = int(brain_z[0] + 0.25 * (brain_z[-1] - brain_z[0]))
    slab = sitk.RegionOfInterest(fl, [fl.GetSize()[0], fl.GetSize()[1], fl.GetSize()[2] - cut], [0, 0, cut])
    work = write_work(tmp_path / "current", images, seg)
    pdir = write_work(work / "priors" / "0", prior, prior_seg)
    sitk.WriteImage(slab, str(pdir / "nifti" / "flair.nii.gz"))          # the native acquisition
    on_grid = sitk.Resample(slab, fl, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0)
    sitk.WriteImage(on_grid, str(pdir / "preprocessed" / "flair.nii.gz"))  # 0 where it was not imaged
    write_priors(work, ["20240101"])
    res = step_longitudinal(work, cfg)
    assert res["comparison"]["registration"]["flags"] == [], res["note"]
    d = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "longitudinal" / "subtraction_flair.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "longitudinal" / "lesions.nii.gz")))
    # the prior's motion moves its slab edge by a few mm: nothing within the missing quarter
    low = slice(0, max(0, cut - 6))
    assert not d[low].any() and not lab[low].any()
    assert sum(1 for l in res["lesions"] if l["kind"] == "new") <= 1, res["lesions"]
    assert res["assessment"]["code"] == "stable", res["assessment"]
    cov = res["comparison"]["coverage_percent"]
    assert 50.0 < cov["flair"] < 95.0 and cov["t1c"] > 98.0, cov
    assert any("FLAIR of the two studies overlaps on" in n for n in res["notes"]), res["notes"]


def test_change_measure_follows_the_segmenter(tmp_path):
    """change_measure "auto": the two segmentations when one trained model segmented
    both timepoints (change_measure_trained), else the registered pair; the
    segmentations when no paired measure exists; an explicit setting wins."""
    from brainline.pipelines.longitudinal import change_measure

    def summ(backend):
        return {"backends": {"segmentation": {"backend": backend}}} if backend else {"volumes_ml": {}}

    paired = {k: {"delta_ml": 1.0} for k in ("whole_tumor", "tumor_core", "3")}
    keys = ("whole_tumor", "tumor_core", "3")

    def uses(lc, prior, current, pair=paired):
        return change_measure(lc, summ(prior), summ(current), pair)["uses"]

    def all_(word):
        return {k: word for k in keys}

    lc = LongitudinalConfig(change_measure="auto", change_measure_trained="segmentations")
    wang = change_measure(lc, summ("brats17-wang"), summ("brats17-wang"), paired)
    assert wang["uses"] == all_("segmentations") and "brats17-wang" in wang["reason"]
    assert wang["segmenters"] == {"prior": "brats17-wang", "current": "brats17-wang"}
    assert uses(replace(lc, change_measure_trained="paired"), "brats17-wang", "brats17-wang") == all_("paired")
    per = replace(lc, change_measure_trained={"whole_tumor": "paired", "tumor_core": "segmentations",
                                              "3": "segmentations"})
    assert uses(per, "brats17-wang", "brats17-wang") == {**all_("segmentations"), "whole_tumor": "paired"}
    assert uses(per, "baseline", "baseline") == all_("paired")
    assert uses(lc, "baseline", "baseline") == all_("paired")
    mixed = change_measure(lc, summ("baseline"), summ("brats17-wang"), paired)
    assert mixed["uses"] == all_("paired") and "different models" in mixed["reason"]
    assert uses(lc, None, None) == all_("paired")
    assert uses(lc, "brats17-wang", "brats17-wang", None) == all_("segmentations")
    # a component the pair could not measure (e.g. a core without enhancement) comes from the segmentations
    assert uses(lc, "baseline", "baseline", {"whole_tumor": {"delta_ml": 1.0}}) == \
        {**all_("segmentations"), "whole_tumor": "paired"}
    assert uses(replace(lc, change_measure="paired"), "brats17-wang", "brats17-wang") == all_("paired")
    assert uses(replace(lc, change_measure="segmentations"), "baseline", "baseline") == all_("segmentations")
    bad = tmp_path / "longitudinal.yaml"
    for text in ("change_measure: cnn\n", "change_measure_trained: {whole_tumor: bsi}\n",
                 "change_measure_trained: {NCR: paired}\n"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="change_measure"):
            LongitudinalConfig.load(bad)
    bad.write_text('change_measure_trained: {"3": segmentations, whole_tumor: paired}\n')
    assert LongitudinalConfig.load(bad).change_measure_trained == {"3": "segmentations", "whole_tumor": "paired"}


def test_assessment_uses_the_measure_the_segmenter_calls_for(tmp_path, case, cfg):
    """Unchanged images, but the current segmentation calls all oedema core (a
    segmenter that changed its mind): with one trained model at both timepoints
    and change_measure_trained "segmentations" the assessment follows the two
    segmentations (progression), and longitudinal.json says which measure and why;
    the registered pair, still recorded, saw no change."""
    images, seg = case
    prior, prior_seg = make_prior(images, seg)
    lab = sitk.GetArrayFromImage(seg)
    relabelled = sitk.GetImageFromArray(np.where(lab == 2, 1, lab).astype(np.uint8))
    relabelled.CopyInformation(seg)
    work = write_work(tmp_path / "current", images, relabelled)
    write_work(work / "priors" / "0", prior, prior_seg)
    write_priors(work, ["20240101"])
    for folder in (work, work / "priors" / "0"):
        s = json.loads((folder / "summary.json").read_text())
        s["backends"] = {"segmentation": {"backend": "brats17-wang"}}
        (folder / "summary.json").write_text(json.dumps(s))
    lc = replace(LongitudinalConfig.load(), change_measure="auto", change_measure_trained="segmentations",
                 locate=False)
    res = step_longitudinal(work, cfg, lc)
    measure = res["change"]["measure"]
    assert measure["uses"]["tumor_core"] == "segmentations" and measure["setting"] == "auto", measure
    assert "brats17-wang" in measure["reason"]
    assert res["change"]["vs_prior"]["tumor_core"]["delta_ml"] > 5.0
    assert abs(res["change"]["vs_prior_paired"]["tumor_core"]["delta_ml"]) < 1.0, res["change"]["vs_prior_paired"]
    assert res["assessment"]["code"] == "progression suspected", res["assessment"]
    assert json.loads((work / "longitudinal.json").read_text())["change"]["measure"]["uses"]["3"] == "segmentations"
