"""Quick checks of tests.synthetic_followup, the generator of synthetic follow-up pairs (issue 11).

About 30 s: one 1 mm pair with new lesions (volumes and contrast measured in the
image), the rest on 2 mm block-averaged sources.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from tests.shared_data import BRATS18, needs_data
from tests.synthetic_followup import (
    GENERATOR_VERSION,
    ROLES,
    _edge_profile,
    _label_stats,
    _levels,
    load_pair,
    load_source,
    make_pair,
)

CASE = "CBICA_ABM"
pytestmark = needs_data(BRATS18)


def arr(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("followup")


@pytest.fixture(scope="module")
def new_pair(out):
    """1 mm, no bias field and no noise (so the painted contrast can be measured against
    the source), lesions of fixed volume; the prior still moves and drifts."""
    return make_pair(CASE, "new", out, seed=3, new_volumes_mm3=[20.0, 60.0, 180.0, 450.0], noise=0.0,
                     bias=(0.0, 0.0), prior_interpolation="linear", name="clean_new")


def test_layout_follows_the_contract(new_pair):
    cur, prior = new_pair.current, new_pair.prior
    assert sorted(p.name for p in (cur / "nifti").iterdir()) == sorted(f"{r}.nii.gz" for r in ROLES)
    assert sorted(p.name for p in (prior / "nifti").iterdir()) == sorted(f"{r}.nii.gz" for r in ROLES)
    priors = json.loads((cur / "priors.json").read_text())
    assert priors["priors"][0]["dir"] == "priors/0"
    assert json.loads((prior / "prior.json").read_text()) == priors["priors"][0]
    assert priors["priors"][0]["study_date"] < priors["current"]["study_date"]
    assert not (cur / "truth.json").exists() and (new_pair.root / "truth.json").exists()
    # already skull-stripped inputs: exact-zero background at both timepoints
    for folder in (cur, prior):
        values = arr(folder / "nifti" / "flair.nii.gz")
        assert (values == 0).mean() > 0.3 and values.min() >= 0


def test_new_lesion_volumes_and_contrast_match_the_truth(new_pair):
    truth = new_pair.truth
    lesions = truth["new_lesions"]
    assert len(lesions) == 4
    ids = sitk.GetArrayFromImage(new_pair.truth_image("new_lesions"))
    images, _ = load_source(CASE)
    source = sitk.GetArrayFromImage(images["flair"])
    current = arr(new_pair.current / "nifti" / "flair.nii.gz")
    for lesion in lesions:
        mask = ids == lesion["id"]
        # the truth mask has the requested volume (1 mm voxels)
        assert int(mask.sum()) == lesion["voxels"]
        assert abs(lesion["volume_mm3"] - lesion["requested_mm3"]) <= 0.10 * lesion["requested_mm3"] + 1.0
        # ... and the image carries it: the voxels whose FLAIR went more than half way from
        # the source towards the lesion's level (75th percentile inside the mask)
        assert np.median(current[mask]) > 1.15 * np.median(source[mask]), lesion
        near = np.zeros_like(mask)
        zz, yy, xx = np.argwhere(mask).T
        near[max(zz.min() - 4, 0):zz.max() + 5, max(yy.min() - 4, 0):yy.max() + 5,
             max(xx.min() - 4, 0):xx.max() + 5] = True
        level = float(np.percentile(current[mask], 75))
        gap = level - source
        measured = near & (gap > 0) & (current - source > 0.5 * gap)
        assert abs(int(measured.sum()) - int(mask.sum())) <= 0.10 * mask.sum() + 2, (lesion, int(measured.sum()))
        dice = 2 * (measured & mask).sum() / (measured.sum() + mask.sum())
        assert dice > 0.85, (lesion, dice)
        # away from the tumour, inside the brain
        assert lesion["distance_to_tumour_mm"] >= 20.0
    # the centroids are in LPS mm of the current grid
    img = new_pair.truth_image("new_lesions")
    for lesion in lesions:
        idx = img.TransformPhysicalPointToIndex(lesion["centroid_lps_mm"])
        assert ids[idx[2], idx[1], idx[0]] == lesion["id"]


def test_prior_is_moved_by_the_recorded_motion(new_pair):
    truth = new_pair.truth["prior"]["motion"]
    assert 0.3 * 8.0 - 1e-6 <= truth["rotation_deg"] <= 8.0 + 1e-6
    assert 0.3 * 8.0 - 1e-6 <= truth["translation_norm_mm"] <= 8.0 + 1e-6
    motion = new_pair.prior_to_current()
    cur_lab, prior_lab = new_pair.truth_image("labels_current"), new_pair.truth_image("labels_prior")
    stats = {}
    for name, image in (("current", cur_lab), ("prior", prior_lab)):
        s = sitk.LabelShapeStatisticsImageFilter()
        s.Execute(sitk.Cast(image > 0, sitk.sitkUInt8))
        stats[name] = np.array(s.GetCentroid(1))
    # the tumour centroid of the prior, carried by prior_to_current, lands on the current one
    mapped = np.array(motion.TransformPoint(stats["prior"].tolist()))
    assert np.linalg.norm(mapped - stats["current"]) < 1.0
    assert np.linalg.norm(stats["prior"] - stats["current"]) > 1.0
    # the prior's images are on their own grid, and aligned by the truth motion they match the current
    prior_t1 = sitk.ReadImage(str(new_pair.prior / "nifti" / "t1.nii.gz"), sitk.sitkFloat32)
    cur_t1 = sitk.ReadImage(str(new_pair.current / "nifti" / "t1.nii.gz"), sitk.sitkFloat32)
    assert prior_t1.GetSize() != cur_t1.GetSize()
    aligned = sitk.GetArrayFromImage(sitk.Resample(prior_t1, cur_t1, motion.GetInverse(), sitk.sitkLinear, 0.0))
    unaligned = sitk.GetArrayFromImage(sitk.Resample(prior_t1, cur_t1, sitk.Transform(), sitk.sitkLinear, 0.0))
    c = sitk.GetArrayFromImage(cur_t1)
    brain = c > 0
    r_aligned = np.corrcoef(c[brain], aligned[brain])[0, 1]
    r_unaligned = np.corrcoef(c[brain], unaligned[brain])[0, 1]
    assert r_aligned > 0.9 > r_unaligned + 0.1, (r_aligned, r_unaligned)


def test_grown_tumour_truth_and_seeds_reproduce(out):
    a = make_pair(CASE, "grown", out, seed=5, spacing_mm=2, name="grown_a")
    b = make_pair(CASE, "grown", out, seed=5, spacing_mm=2, name="grown_b")
    ta = {k: v for k, v in a.truth.items() if k != "generation_s"}
    assert ta == {k: v for k, v in b.truth.items() if k != "generation_s"}
    for role in ROLES:
        assert np.array_equal(arr(a.prior / "nifti" / f"{role}.nii.gz"), arr(b.prior / "nifti" / f"{role}.nii.gz"))
        assert np.array_equal(arr(a.current / "nifti" / f"{role}.nii.gz"), arr(b.current / "nifti" / f"{role}.nii.gz"))

    # growth: exact voxel counts of the truth label maps, inside the brain, grown by the requested fraction
    current_labels = sitk.GetArrayFromImage(a.truth_image("labels_current"))
    images, source_labels_img = load_source(CASE, spacing_mm=2)
    source_labels = sitk.GetArrayFromImage(source_labels_img)
    growth = sitk.GetArrayFromImage(a.truth_image("growth"))
    voxel = 8.0
    wt_growth = a.truth["change_mm3"]["whole_tumor"]
    tc_growth = a.truth["change_mm3"]["tumor_core"]
    assert wt_growth == pytest.approx(((current_labels > 0).sum() - (source_labels > 0).sum()) * voxel, abs=1.0)
    core = np.isin(current_labels, (1, 3))
    assert tc_growth == pytest.approx((core.sum() - np.isin(source_labels, (1, 3)).sum()) * voxel, abs=1.0)
    assert ((growth > 0) == (((current_labels > 0) & (source_labels == 0))
                             | (core & ~np.isin(source_labels, (1, 3))))).all()
    info = a.truth["growth"]
    # the whole tumour to its requested volume (bisection of the growth distance); the core roughly
    # (the whole tumour's growth stretches it too)
    assert wt_growth == pytest.approx(info["requested_fraction"]["whole_tumor"]
                                      * info["component_prior_mm3"]["whole_tumor"], rel=0.10)
    assert tc_growth == pytest.approx(info["requested_fraction"]["tumor_core"]
                                      * info["component_prior_mm3"]["tumor_core"], rel=0.5)
    assert wt_growth > 1000 and tc_growth > 500
    assert 0.0 < info["growth_distance_mm"]["whole_tumor"] < 5.0
    head = sitk.GetArrayFromImage(images["t1"]) > 0
    assert head[growth > 0].all()
    assert (source_labels[growth == 2] == 0).all()          # new oedema lies outside the old tumour
    # the grown shell looks like the case's own edema on FLAIR (brighter than the brain it replaced)
    cur_flair = arr(a.current / "nifti" / "flair.nii.gz")
    src_flair = sitk.GetArrayFromImage(images["flair"])
    shell = growth == 2
    assert np.median(cur_flair[shell]) > 1.1 * np.median(src_flair[shell])
    assert load_pair(a.root).truth == a.truth


def _profile_2mm(values, region, within, distances):
    """The generator's edge profile on the 2 mm grid, in 2 mm shells."""
    return np.array(_edge_profile(values, region, within, (2.0, 2.0, 2.0), distances, shell_mm=2.0), dtype=float)


def test_grown_tumour_image_carries_the_truth(out):
    """Generator v5: a grown tumour's visible edge moves out with its label, so the image
    carries the truth. Measured from the files against the source (no bias, no noise: the
    current is the grown source): the FLAIR profile across the whole tumour's boundary
    (medians in 2 mm shells from 2 mm inside to 8 mm outside the label) at the current
    timepoint around the current label is the source's around the source label. Growing
    the label and leaving the image (or painting only the grown voxels, generators v2-v4)
    fails this: outside the new boundary the image would still show the tissue."""
    pair = make_pair(CASE, "grown", out, seed=5, spacing_mm=2, noise=0.0, bias=(0.0, 0.0),
                     prior_interpolation="linear", name="grown_clean")
    assert pair.truth["generator_version"] == GENERATOR_VERSION == 5
    images, source_labels_img = load_source(CASE, spacing_mm=2)
    src = {r: sitk.GetArrayFromImage(images[r]).astype(np.float32) for r in ROLES}
    labels = sitk.GetArrayFromImage(source_labels_img)
    current_labels = sitk.GetArrayFromImage(pair.truth_image("labels_current"))
    brain = ndimage.binary_fill_holes(src["t1"] > 0)
    tissue, lesion = _levels(src, labels, brain, (2.0, 2.0, 2.0), _label_stats(src, labels))["wt"]
    assert lesion > 1.2 * tissue                                     # edema is bright on FLAIR
    distances = (-2.0, 2.0, 4.0, 6.0, 8.0)
    current = arr(pair.current / "nifti" / "flair.nii.gz")
    before = _profile_2mm(src["flair"], labels > 0, brain, distances)
    after = _profile_2mm(current, current_labels > 0, brain, distances)
    assert before[1] > tissue + 0.15 * (lesion - tissue)            # the edge outside the label is visible
    assert np.abs(after - before).max() < 0.08 * (lesion - tissue), (before, after)
    # the label did move: around the OLD label the current image is brighter just outside
    stale = _profile_2mm(current, labels > 0, brain, distances)
    assert stale[1] - before[1] > 0.1 * (lesion - tissue), (before, stale)
    # the generator's own record agrees (1 mm shells on the noiseless arrays)
    prof = pair.truth["growth"]["edge_profiles"]["whole_tumor"]
    dev = [abs(p - c) for p, c in zip(prof["prior"], prof["current"]) if p is not None and c is not None]
    assert max(dev) < 0.1 * (lesion - tissue)


def test_thick_prior_flair(out):
    pair = make_pair(CASE, "thick", out, seed=1, spacing_mm=2, name="thick", prior_interpolation="linear")
    flair = sitk.ReadImage(str(pair.prior / "nifti" / "flair.nii.gz"))
    t1 = sitk.ReadImage(str(pair.prior / "nifti" / "t1.nii.gz"))
    assert flair.GetSpacing()[2] == pytest.approx(5.0) and t1.GetSpacing()[2] == pytest.approx(2.0)
    assert pair.truth["prior"]["thick_flair_mm"] == 5.0
    assert 1 <= len(pair.truth["new_lesions"]) <= 4
    assert all(15.0 * 0.5 <= l["volume_mm3"] <= 500.0 * 1.1 for l in pair.truth["new_lesions"])


@pytest.mark.parametrize("case", ["2013_20", "2013_11"])
def test_new_lesions_are_imaged_and_hyperintense(out, case):
    """Generator v4: a new lesion lies where every sequence imaged the brain (2013_20's
    FLAIR is 0 in a third of it) and is brighter than the tissue around it on FLAIR, and
    on T1c when enhancing (2013_11's oedema level is below its white matter; v3 painted
    lesions darker than their surroundings on both)."""
    pair = make_pair(case, "new", out, seed=0, spacing_mm=2, new_volumes_mm3=[60.0, 120.0, 240.0, 480.0],
                     noise=0.0, bias=(0.0, 0.0), prior_interpolation="linear", name=f"v4_{case}")
    images, _ = load_source(case, spacing_mm=2)
    source = {r: sitk.GetArrayFromImage(images[r]) for r in ROLES}
    ids = sitk.GetArrayFromImage(pair.truth_image("new_lesions"))
    lesions = pair.truth["new_lesions"]
    assert lesions, "no lesion placed"
    for lesion in lesions:
        mask = ids == lesion["id"]
        assert all((source[r][mask] > 0).all() for r in ROLES), lesion
        shell = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_dilation(mask) & (ids == 0)
        for role in ("flair", "t1c") if lesion["enhancing"] else ("flair",):
            current = arr(pair.current / "nifti" / f"{role}.nii.gz")
            assert np.median(current[mask]) > np.median(current[shell]), (case, role, lesion)


def test_infiltrated_tumour_leaves_the_tissue_beyond_in_place(out):
    """Variant ``infiltrated``: the tumour grows into the tissue instead of pushing it
    aside. Noiseless 2 mm CBICA_ABM pairs against the source: 12-16 mm outside the
    current whole tumour (beyond the 8 mm visible rim, the 1 mm taper and the field's
    smoothing) the infiltrated current is the source (measured: mean |difference|
    0.00), where the ``grown`` variant's mass effect moved it (4.1, 2.5 % of the
    tissue level); both grow the whole tumour by about the same volume, and the
    infiltrated one still moves the visible edge with its label."""
    images, _ = load_source(CASE, spacing_mm=2)
    src = sitk.GetArrayFromImage(images["flair"]).astype(np.float32)
    brain = ndimage.binary_fill_holes(src > 0)
    shift = {}
    for variant in ("grown", "infiltrated"):
        pair = make_pair(CASE, variant, out, seed=5, spacing_mm=2, noise=0.0, bias=(0.0, 0.0),
                         prior_interpolation="linear", name=f"{variant}_beyond")
        current = arr(pair.current / "nifti" / "flair.nii.gz")
        labels_now = sitk.GetArrayFromImage(pair.truth_image("labels_current")) > 0
        outside = ndimage.distance_transform_edt(~labels_now, sampling=(2.0, 2.0, 2.0))
        shell = brain & (outside > 12.0) & (outside <= 16.0)
        shift[variant] = float(np.abs(current[shell] - src[shell]).mean()) / float(np.median(src[shell]))
        assert pair.truth["change_mm3"]["whole_tumor"] > 0.05 * pair.truth["volumes_ml"]["prior"]["whole_tumor"] * 1000
        assert pair.truth["growth"]["infiltrating"] is (variant == "infiltrated")
        if variant == "infiltrated":
            prof = pair.truth["growth"]["edge_profiles"]["whole_tumor"]
            dev = [abs(p - c) / p for p, c in zip(prof["prior"], prof["current"]) if p and c]
            assert max(dev) < 0.05, prof
    assert shift["infiltrated"] < 0.002 and shift["grown"] > 0.01, shift
