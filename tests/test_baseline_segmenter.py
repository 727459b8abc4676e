"""The built-in baseline segmenter on real data.

tcga-du-7294 (TCGA-LGG) has reference segmentations from five BraTS 2020
algorithms and their fusions (BraTS 2020 labels 1 NCR/NET, 2 ED, 4 ET);
brats-gli-00001-000 (glioblastoma) has none. Inputs are built the way the
pipeline builds them: NIfTI files per role plus a brain-mask NIfTI (here
t1c > 0, as the volumes are skull-stripped).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from brainline.models.base import ED, ET, NCR, SegmentationInput
from brainline.models.baseline import BaselineParams, BaselineSegmenter
from brainline.models.metrics import dice, volume_ml
from tests.segmentation_cases import (
    BRATS,
    BRATS_FILES,
    REFERENCES,
    TCGA,
    TCGA_FILES,
    load_arrays,
    make_input,
    mirror_x,
    read_array,
)

# test_runtime_a_few_seconds bounds the segmenter's time in seconds: the module (its
# shared run) runs alone, after the parallel phase (README "Tests and benchmarks").
pytestmark = pytest.mark.serial


def tcga_reference(name: str = "fusion_simple") -> np.ndarray:
    return read_array(TCGA / "segmentations" / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def tcga_run(tmp_path_factory):
    inputs = make_input(tmp_path_factory.mktemp("tcga"), TCGA, TCGA_FILES)
    return inputs, BaselineSegmenter().segment(inputs)


@pytest.fixture(scope="module")
def brats_run(tmp_path_factory):
    inputs = make_input(tmp_path_factory.mktemp("brats"), BRATS, BRATS_FILES)
    return inputs, BaselineSegmenter().segment(inputs)


# --------------------------------------------------------------------------- accuracy

def test_whole_tumour_dice_vs_fusion_simple(tcga_run):
    _, out = tcga_run
    ref = tcga_reference("fusion_simple")
    d = dice(out.labels > 0, ref > 0)
    assert d >= 0.85, f"WT Dice vs fusion_simple {d:.3f} < 0.85 (details: {out.details['volumes_ml']})"


def test_agrees_with_every_reference_algorithm(tcga_run):
    """Not only with the fusion: each BraTS 2020 algorithm and the majority
    vote. The five algorithms agree with the fusion at WT Dice 0.97-0.99; a baseline
    is allowed to be clearly below that, but not far off any of them."""
    _, out = tcga_run
    for name in REFERENCES:
        d = dice(out.labels > 0, tcga_reference(name) > 0)
        assert d >= 0.8, f"WT Dice vs {name}: {d:.3f}"


def test_volumes_plausible_against_reference(tcga_run):
    inputs, out = tcga_run
    ref = tcga_reference()
    wt, ref_wt = volume_ml(out.labels > 0, inputs.spacing_mm), volume_ml(ref > 0, inputs.spacing_mm)
    assert 0.7 * ref_wt <= wt <= 1.3 * ref_wt, (wt, ref_wt)
    # a lower-grade glioma without enhancement in any reference: (almost) no ET
    assert volume_ml(out.labels == ET, inputs.spacing_mm) < 0.5
    # its non-enhancing core is found (the references put 9.3 mL there)
    tc = np.isin(out.labels, (NCR, ET))
    assert volume_ml(tc, inputs.spacing_mm) > 1.0
    assert dice(tc, np.isin(ref, (1, 4))) > 0.5


# --------------------------------------------------------------------------- validity

def test_labels_and_output_metadata(tcga_run):
    inputs, out = tcga_run
    mask = inputs.mask_array()
    assert out.labels.dtype == np.uint8
    assert out.labels.shape == mask.shape
    assert set(np.unique(out.labels)) <= {0, NCR, ED, ET}
    assert not out.labels[~ndi.binary_fill_holes(mask)].any(), "tumour outside the brain"
    assert out.backend == "baseline" and out.model_version == BaselineSegmenter.version
    img = out.to_image(inputs.reference)
    assert img.GetSize() == inputs.reference.GetSize()
    json.dumps(out.details)  # goes into summary.json as is


def test_region_nesting_and_reported_volumes(tcga_run):
    inputs, out = tcga_run
    lab = out.labels
    wt, tc, et = lab > 0, np.isin(lab, (NCR, ET)), lab == ET
    assert not (et & ~tc).any() and not (tc & ~wt).any()
    # ED + NCR + ET partition WT
    parts = [(lab == v) for v in (NCR, ED, ET)]
    assert sum(p.sum() for p in parts) == wt.sum()
    sp = inputs.spacing_mm
    vols = out.details["volumes_ml"]
    for key, m in (("WT", wt), ("TC", tc), ("ET", et), ("NCR", lab == NCR), ("ED", lab == ED)):
        assert vols[key] == pytest.approx(volume_ml(m, sp), abs=1e-3)
    comps = out.details["components"]
    assert comps["seed_components"] >= 1 and comps["wt_components_kept"] >= 1
    assert {"seed_flair_z", "et_diff_z", "core_t1_max_z"} <= set(out.details["thresholds"])
    assert set(out.details["normalisation"]) == {"t1", "t1c", "t2", "flair"}


def test_runtime_a_few_seconds(tcga_run):
    _, out = tcga_run
    # measured ~2 s on one core; generous for a loaded CI machine
    assert out.details["runtime_s"] < 20


def test_deterministic(tcga_run):
    inputs, first = tcga_run
    second = BaselineSegmenter().segment(inputs)
    assert np.array_equal(first.labels, second.labels)
    strip = lambda d: {k: v for k, v in d.items() if k != "runtime_s"}  # noqa: E731
    assert strip(first.details) == strip(second.details)


# --------------------------------------------------------------------------- no tumour

def test_tumour_free_hemisphere_mirror_gives_small_wt(tmp_path):
    """The healthy hemisphere mirrored over the tumour side: a tumour-free
    brain must give (nearly) nothing, not a forced blob."""
    arrays = load_arrays(TCGA, TCGA_FILES)
    mask = arrays["t1c"] > 0
    ref = tcga_reference() > 0
    xs = np.arange(mask.shape[2])
    tumour_low_x = np.flatnonzero(ref.any(axis=(0, 1))).mean() < np.flatnonzero(mask.any(axis=(0, 1))).mean()
    mid = (np.flatnonzero(mask.any(axis=(0, 1)))[[0, -1]].sum()) / 2.0
    side = (xs < mid) if tumour_low_x else (xs > mid)
    healthy = mirror_x(arrays, mask, side[None, None, :])
    inputs = make_input(tmp_path, TCGA, TCGA_FILES, healthy)
    out = BaselineSegmenter().segment(inputs)
    wt = volume_ml(out.labels > 0, inputs.spacing_mm)
    assert wt < 5.0, f"tumour-free brain segmented {wt:.1f} mL ({out.details['components']})"


def test_tumour_region_replaced_by_mirrored_tissue_gives_small_wt(tmp_path):
    """Only the tumour (reference WT dilated by 5 mm) replaced by the mirrored
    contralateral tissue; the rest of the scan untouched."""
    arrays = load_arrays(TCGA, TCGA_FILES)
    mask = arrays["t1c"] > 0
    region = ndi.binary_dilation(tcga_reference() > 0, iterations=5)
    healthy = mirror_x(arrays, mask, region)
    inputs = make_input(tmp_path, TCGA, TCGA_FILES, healthy)
    out = BaselineSegmenter().segment(inputs)
    wt = volume_ml(out.labels > 0, inputs.spacing_mm)
    assert wt < 5.0, f"tumour-free brain segmented {wt:.1f} mL ({out.details['components']})"


# --------------------------------------------------------------------------- glioblastoma

def test_glioblastoma_case_plausible(brats_run):
    """No reference here: a non-empty, plausible, enhancing tumour in one
    hemisphere. (These BraTS files are not bias-corrected; the pipeline would
    run N4 first, which raises ET and the core.)"""
    inputs, out = brats_run
    lab, sp = out.labels, inputs.spacing_mm
    wt = volume_ml(lab > 0, sp)
    assert 30.0 <= wt <= 250.0, out.details["volumes_ml"]
    assert volume_ml(lab == ET, sp) > 0.5, out.details["volumes_ml"]
    assert volume_ml(lab == ED, sp) > 0.5 * wt  # mostly edema, as expected for this case
    # one hemisphere: nearly all of it on one side of the mid-sagittal plane
    mask = inputs.mask_array()
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    mid = (xs[0] + xs[-1]) / 2.0
    x = np.nonzero(lab)[2]
    assert max((x > mid).mean(), (x < mid).mean()) > 0.95


def test_missing_sequences_degrade_gracefully(tcga_run):
    """FLAIR alone still finds WT; without T1/T1c there is no ET."""
    inputs, full = tcga_run
    flair_only = SegmentationInput(paths={"flair": inputs.paths["flair"]},
                                   brain_mask_path=inputs.brain_mask_path)
    out = BaselineSegmenter().segment(flair_only)
    assert dice(out.labels > 0, full.labels > 0) > 0.9
    assert not (out.labels == ET).any()
    assert out.details["sequences_used"] == ["flair"]


def test_parameters_and_options():
    seg = BaselineSegmenter(seed_flair_z=4.0)
    assert seg.params.seed_flair_z == 4.0 and seg.params.roi_mm == BaselineParams().roi_mm
    assert seg.describe()["params"]["seed_flair_z"] == 4.0
    from brainline.models.base import SegmentationError
    with pytest.raises(SegmentationError, match="unknown option"):
        BaselineSegmenter(colour="red")


# --------------------------------------------------------------------------- metrics

def test_metrics():
    a = np.zeros((4, 5, 6), bool)
    b = a.copy()
    assert dice(a, b) == 1.0  # both empty
    a[0, :2] = True           # 12 voxels
    b[0, 1:3] = True          # 12 voxels, 6 shared
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, ~a) == 0.0
    assert volume_ml(a, (1.0, 1.0, 1.0)) == pytest.approx(0.012)
    assert volume_ml(np.ones((10, 10, 10)), (1.0, 2.0, 5.0)) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        dice(a, np.zeros((2, 2, 2)))
