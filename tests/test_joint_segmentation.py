"""Volume change by the joint segmentation of the registered pair
(pipelines/joint_segmentation.py; ``paired_method: joint_segmentation``): the
baseline segmenter re-run on both timepoints' images on the current grid, in one
brain mask. On the 2 mm CBICA_ABM work folders of tests/test_longitudinal.py
(the segmentation files there are the BraTS truth, so the joint measure's
segmentations are the only ones the baseline makes): an unchanged tumour
reads about 0, a tumour whose 2 mm outer ring was normal tissue at the prior
reads its growth, and a trained segmenter keeps the boundary shift integral."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.longitudinal import LongitudinalConfig, step_longitudinal
from tests.shared_data import needs_data
from tests.test_longitudinal import CASE, load_case, make_prior, paint, write_priors, write_work

pytestmark = needs_data(CASE)

# paired_method_trained null: joint_segmentation is asked of every segmenter, a trained one too
JOINT = replace(LongitudinalConfig.load(), paired_method="joint_segmentation", paired_method_trained=None,
                locate=False)


@pytest.fixture(scope="module")
def case():
    return load_case()


def run(tmp_path, current: dict, cur_seg, prior: dict, prior_seg, segmenter: str = "baseline") -> dict:
    work = write_work(tmp_path / "current", current, cur_seg)
    write_work(work / "priors" / "0", prior, prior_seg)
    write_priors(work, ["20240101"])
    for folder in (work, work / "priors" / "0"):
        s = json.loads((folder / "summary.json").read_text())
        s["backends"] = {"segmentation": {"backend": segmenter}}
        (folder / "summary.json").write_text(json.dumps(s))
    return step_longitudinal(work, PipelineConfig(model="baseline"), JOINT)


def test_unchanged_tumour_reads_no_change(tmp_path, case):
    images, seg = case
    prior, prior_seg = make_prior(images, seg)
    res = run(tmp_path, images, seg, prior, prior_seg)
    joint = res["change"]["paired_methods"]["joint_segmentation"]
    paired = res["change"]["vs_prior_paired"]
    for key in ("whole_tumor", "tumor_core"):
        assert paired[key]["method"] == "joint segmentation of the registered pair", paired
        # the baseline's two segmentations of the same tumour in one frame: within 1 mL of each other
        assert abs(joint[key]["joint_current_ml"] - joint[key]["joint_prior_ml"]) < 1.0, joint[key]
        assert joint[key]["joint_current_ml"] > 5.0, joint[key]                  # it found the tumour
    assert res["change"]["measure"]["uses"]["whole_tumor"] == "paired"
    assert res["assessment"]["code"] == "stable", res["assessment"]


def test_grown_tumour_reads_its_growth(tmp_path, case):
    images, seg = case
    lab = sitk.GetArrayFromImage(seg)
    brain = sitk.GetArrayFromImage(images["t1c"]) > 0
    # the prior: the whole tumour 2 mm smaller, its outer ring normal-looking tissue
    ring = (lab > 0) & ~ndimage.binary_erosion(lab > 0, np.ones((3, 3, 3)))
    prior_images = {}
    for role, img in images.items():
        a = sitk.GetArrayFromImage(img)
        normal = float(np.median(a[brain & ~ndimage.binary_dilation(lab > 0, iterations=3)]))
        prior_images[role] = paint(img, ring.astype(np.float32), normal)
    small = sitk.GetImageFromArray(np.where(ring, 0, lab).astype(np.uint8))
    small.CopyInformation(seg)
    prior, prior_seg = make_prior(prior_images, small)
    res = run(tmp_path, images, seg, prior, prior_seg)
    wt = res["change"]["vs_prior_paired"]["whole_tumor"]
    assert wt["method"] == "joint segmentation of the registered pair", wt
    true_ml = float(ring.sum()) * 8.0 / 1000.0
    # the ring is 2 mm (one voxel) wide: the baseline's edge moves by about that much
    assert wt["delta_ml"] == pytest.approx(true_ml, rel=0.35), (wt, true_ml)


def test_trained_segmenter_keeps_the_boundary_shift(tmp_path, case):
    images, seg = case
    prior, prior_seg = make_prior(images, seg)
    res = run(tmp_path, images, seg, prior, prior_seg, segmenter="brats17-wang")
    assert "joint_segmentation" not in res["change"]["paired_methods"]
    assert res["change"]["vs_prior_paired"]["whole_tumor"]["method"] == "boundary shift integral"
