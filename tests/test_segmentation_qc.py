"""Segmentation QC (pipelines/segmentation_qc.py): components and their
location, plausibility checks, and ensemble-discord alarms — on synthetic
label maps and on the real discord of five BraTS 2020 algorithms on
tcga-du-7294."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.segmentation_qc import (
    SegmentationQCConfig,
    alarm_threshold,
    dice,
    discord_alarms,
    flip_segmentations,
    fuse_labels,
    lr_array_axis,
    majority_vote,
    midline_x_mm,
    plausibility_flags,
    region_masks,
    segmentation_qc,
    tumour_components,
)
from tests.shared_data import TCGA, require

ALGORITHMS = ("hnfnetv1-20", "isen-20", "sanet0-20", "scan-20", "yixinmpl-20")


def reference(shape_zyx, spacing_xyz=(1.0, 1.0, 2.0), direction=None, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.Image([int(s) for s in shape_zyx[::-1]], sitk.sitkUInt8)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def box(shape, z, y, x):
    m = np.zeros(shape, bool)
    m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return m


SHAPE = (20, 40, 40)
BRAIN = box(SHAPE, (2, 18), (4, 36), (4, 36))   # brain mask, centre x index 19.5


# --------------------------------------------------------------------------- components

def test_components_volumes_centroids_and_hemispheres():
    ref = reference(SHAPE, spacing_xyz=(1.0, 1.0, 2.0))      # 2 mm slices: 2 uL per voxel
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:9, 10:20, 25:33] = 2                                 # 320 voxels, x index 25..32 (> midline)
    lab[6:8, 12:16, 27:31] = 1                                 # 32 voxels NCR inside
    lab[10:12, 20:25, 8:12] = 4                                # BraTS 2020 ET label, 40 voxels, right side
    comps = tumour_components(lab, ref, BRAIN)
    assert [c.voxels for c in comps] == [320, 40]
    big, small = comps
    assert big.volume_ml == pytest.approx(320 * 2e-3) and big.label_volumes_ml == {
        "NCR": pytest.approx(0.064), "ED": pytest.approx(0.576), "ET": 0.0}
    assert small.label_volumes_ml["ET"] == pytest.approx(0.08)
    # centroid in LPS mm: index (x, y, z) = (28.5, 14.5, 6.5) * spacing
    assert big.centroid_lps_mm == pytest.approx([28.5, 14.5, 13.0], abs=0.05)
    # identity direction: +x index = patient's left
    assert (big.hemisphere, small.hemisphere) == ("left", "right")
    assert "left hemisphere" in big.describe() and "0.6 mL" in big.describe()


def test_hemisphere_follows_the_patient_frame_not_the_array():
    # the same arrays with x flipped in space (direction -1 along x, RAS-like storage):
    # the component at high x index now lies on the patient's right
    d = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    ref = reference(SHAPE, direction=d, origin=(100.0, 0.0, 0.0))
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:9, 10:20, 25:33] = 2
    (c,) = tumour_components(lab, ref, BRAIN)
    assert c.hemisphere == "right" and c.left_fraction == 0.0
    assert c.centroid_lps_mm[0] == pytest.approx(100.0 - 28.5)
    assert midline_x_mm(BRAIN, ref) == pytest.approx(100.0 - 19.5)
    # a lesion across the midline
    lab[:] = 0
    lab[5:9, 10:20, 14:26] = 2
    assert tumour_components(lab, ref, BRAIN)[0].hemisphere == "bilateral"
    # without a brain mask there is no midline
    assert tumour_components(lab, ref)[0].hemisphere is None


# --------------------------------------------------------------------------- plausibility

def test_plausible_segmentation_has_no_flags():
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:9, 10:20, 25:33] = 2
    lab[6:8, 12:16, 27:31] = 3
    assert plausibility_flags(lab, BRAIN, reference(SHAPE)) == []


def test_tumour_outside_brain_and_nesting_and_volumes():
    ref = reference(SHAPE, spacing_xyz=(1.0, 1.0, 2.0))
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:6, 10:20, 25:33] = 2          # slices 0..1 outside the brain box (z < 2): 1 slice of 5 = 80 vox = 0.16 mL
    flags = plausibility_flags(lab, BRAIN, ref, config=SegmentationQCConfig(outside_brain_min_ml=0.1))
    assert len(flags) == 1 and flags[0].startswith("tumour_outside_brain: 0.2 mL (20 %)")
    # default: half a millilitre must be outside before it is flagged
    assert plausibility_flags(lab, BRAIN, ref) == []
    # separate region channels that are not nested
    wt = box(SHAPE, (5, 9), (10, 20), (25, 33))
    tc = box(SHAPE, (5, 9), (10, 20), (20, 28))     # sticks out of WT by 5 columns
    et = box(SHAPE, (6, 8), (12, 16), (12, 18))     # entirely outside TC: 48 voxels, 0.096 mL
    flags = plausibility_flags({"WT": wt, "TC": tc, "ET": et}, BRAIN, ref)
    codes = [f.split(":")[0] for f in flags]
    assert codes == ["tc_outside_wt", "et_outside_tc"]
    assert "0.40 mL of the tumour core (TC) lies outside the whole tumour (WT)" in flags[0]
    # implausible volume (share of the brain) and a speck
    huge = BRAIN.astype(np.uint8) * 2
    assert any(f.startswith("implausible_volume") for f in plausibility_flags(huge, BRAIN, ref))
    speck = np.zeros(SHAPE, np.uint8)
    speck[10, 20, 20] = 2
    assert [f.split(":")[0] for f in plausibility_flags(speck, BRAIN, ref)] == ["tiny_volume"]
    assert plausibility_flags(np.zeros(SHAPE, np.uint8), BRAIN, ref)[0].startswith("empty_segmentation")


def test_fragmented():
    lab = np.zeros(SHAPE, np.uint8)
    for i in range(12):
        lab[4 + (i % 3) * 4, 6 + (i // 3) * 6, 10:14] = 2
    flags = plausibility_flags(lab, BRAIN, reference(SHAPE))
    assert any(f.startswith("fragmented: the whole tumour falls into 12") for f in flags)


# --------------------------------------------------------------------------- fusion and alarms

def test_majority_vote_and_nested_fusion():
    a, b, c = (np.array(v, bool) for v in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]))
    assert majority_vote([a, b, c]).tolist() == [True, True, True, False]
    assert majority_vote([a, b]).tolist() == [True, False, False, False]   # tie left out
    l1 = np.array([[[3, 1, 2, 0]]], np.uint8)
    l2 = np.array([[[3, 3, 2, 2]]], np.uint8)
    l3 = np.array([[[1, 2, 0, 0]]], np.uint8)
    fused = fuse_labels([l1, l2, l3])
    # ET: 2 of 3 at voxel 0; TC (1|3): voxels 0, 1; WT: voxels 0, 1, 2
    assert fused.tolist() == [[[3, 1, 2, 0]]]


def test_alarm_threshold():
    med, mad, thr, n = alarm_threshold([0.9, 0.8, 0.95, 0.7, 0.85], alpha=0.1, min_history=5)
    assert (med, mad, n) == (0.85, pytest.approx(0.05), 5) and thr == pytest.approx(0.845)
    assert alarm_threshold([0.9, None, float("nan")], min_history=2) == (None, None, None, 1)


def _blob(shift=0):
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:13, 10:22, 12 + shift:26 + shift] = 2
    lab[7:11, 13:19, 15 + shift:22 + shift] = 1
    return lab


def test_discord_alarm_on_the_outlying_candidate():
    cands = {"a": _blob(), "b": _blob(1), "c": _blob(-1), "bad": _blob(9)}
    res0 = discord_alarms(cands, regions=("WT",))
    d = {r.candidate: r.dice for r in res0.rows}
    assert d["bad"] < 0.5 < min(d["a"], d["b"], d["c"])
    assert res0.risk_score == 0 and any(f.startswith("discord_no_history") for f in res0.flags)
    history = {n: {"WT": [0.93, 0.95, 0.9, 0.96, 0.94, 0.92, 0.95, 0.97, 0.91, 0.94]} for n in cands}
    res = discord_alarms(cands, history, regions=("WT", "TC"))
    alarmed = {(r.candidate, r.region) for r in res.rows if r.alarm}
    assert ("bad", "WT") in alarmed and not any(c == "a" for c, _ in alarmed)
    assert res.risk_score == len(alarmed) and res.max_score == 8
    wt_bad = next(r for r in res.rows if r.candidate == "bad" and r.region == "WT")
    assert wt_bad.threshold == pytest.approx(0.94 - 0.1 * 0.015) and "below this candidate's usual" in wt_bad.reason
    # TC has no history: no threshold, said so
    assert all(not r.alarm and r.threshold is None for r in res.rows if r.region == "TC")


def test_undefined_dice_raises_an_alarm():
    empty = np.zeros(SHAPE, np.uint8)
    res = discord_alarms({"a": empty, "b": empty, "c": _blob()}, regions=("WT",))
    assert [r.alarm for r in res.rows] == [True, True, False]    # a, b: both empty vs empty fusion
    assert res.rows[2].dice == 0.0 and res.risk_score == 2
    with pytest.raises(ValueError, match="at least two"):
        discord_alarms({"a": empty})


# --------------------------------------------------------------------------- flips

def test_flip_segmentations_flip_back():
    rng = np.random.default_rng(0)
    flair = rng.normal(0, 0.3, SHAPE)       # no noise voxel reaches the threshold of 2.5
    flair[5:9, 10:20, 25:33] += 5
    calls = []

    def threshold(arrays, mask):            # flip-equivariant segmenter
        calls.append(mask is not None and bool(mask[3, 5, 5]))
        return np.where((arrays["flair"] > 2.5) & mask, 2, 0).astype(np.uint8)

    direct = threshold({"flair": flair}, BRAIN)
    out = flip_segmentations(threshold, {"flair": flair}, BRAIN, axes=((2,), (0, 1)))
    assert set(out) == {"flip_x", "flip_zy"} and calls == [True] * 3   # the mask travels with the inputs
    for labels in out.values():
        assert np.array_equal(labels, direct)

    def leftmost_half(arrays, mask):        # not equivariant: keeps array columns < 20 only
        lab = threshold(arrays, mask)
        lab[..., 20:] = 0
        return lab, {"details": 1}

    flipped = flip_segmentations(leftmost_half, {"flair": flair}, BRAIN)["flip_x"]
    assert flipped[5:9, 10:20, 25:33].mean() > 0.9 * 2          # the lesion, seen in the flipped frame
    assert not leftmost_half({"flair": flair}, BRAIN)[0].any()
    assert dice(flipped > 0, direct > 0) > 0.9


def test_lr_array_axis():
    assert lr_array_axis(reference(SHAPE)) == 2
    # a sagittal stack: image axis k (array axis 0) runs along patient x
    sag = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert lr_array_axis(reference(SHAPE, direction=sag)) == 0


# --------------------------------------------------------------------------- real discord

@pytest.fixture(scope="module")
def tcga():
    require(TCGA / "segmentations" / "scan-20.nii.gz")
    segs = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(TCGA / "segmentations" / f"{n}.nii.gz")))
            for n in (*ALGORITHMS, "fusion_mav")}
    ref = sitk.ReadImage(str(TCGA / "flair.nii.gz"))
    return segs, ref, sitk.GetArrayFromImage(ref) > 0


def test_tcga_five_algorithms_real_discord(tcga):
    segs, ref, brain = tcga
    res = discord_alarms({n: segs[n] for n in ALGORITHMS})
    # our per-region majority vote agrees with BraTS Toolkit's multi-label vote
    ours, btk = region_masks(res.fusion), region_masks(segs["fusion_mav"])
    assert dice(ours["WT"], btk["WT"]) > 0.99 and dice(ours["TC"], btk["TC"]) > 0.98
    wt = {r.candidate: r.dice for r in res.rows if r.region == "WT"}
    tc = {r.candidate: r.dice for r in res.rows if r.region == "TC"}
    assert all(0.95 < v < 1.0 for v in wt.values())
    assert all(0.85 < v < 1.0 for v in tc.values())
    assert max(tc.values()) - min(tc.values()) > 0.03          # the spread is real
    # ET: two algorithms found a little enhancement the others and the fusion did not
    et = {r.candidate: (r.dice, r.alarm) for r in res.rows if r.region == "ET"}
    assert et["hnfnetv1-20"] == (0.0, False) and et["sanet0-20"] == (0.0, False)   # no history yet
    assert all(et[n] == (None, True) for n in ("isen-20", "scan-20", "yixinmpl-20"))
    assert res.risk_score == 3


def test_tcga_history_from_leave_one_algorithm_out_and_a_misregistered_candidate(tcga):
    """History per algorithm: its Dice to the fusion of each 4-algorithm subset
    containing it (real variation); then one algorithm's mask displaced by 6 mm
    (a misregistered input) must alarm."""
    segs, ref, brain = tcga
    history: dict[str, dict[str, list[float]]] = {n: {"WT": [], "TC": []} for n in ALGORITHMS}
    for left_out in ALGORITHMS:
        sub = {n: segs[n] for n in ALGORITHMS if n != left_out}
        r = discord_alarms(sub, regions=("WT", "TC"))
        for row in r.rows:
            history[row.candidate][row.region].append(row.dice)
    cfg = SegmentationQCConfig(min_history=4)
    normal = discord_alarms({n: segs[n] for n in ALGORITHMS}, history, regions=("WT", "TC"), config=cfg)
    moved = dict({n: segs[n] for n in ALGORITHMS})
    moved["scan-20"] = np.roll(segs["scan-20"], 6, axis=1)
    bad = discord_alarms(moved, history, regions=("WT", "TC"), config=cfg)
    row = next(r for r in bad.rows if r.candidate == "scan-20" and r.region == "WT")
    assert row.alarm and row.dice < min(history["scan-20"]["WT"]) - 0.05
    assert bad.risk_score > normal.risk_score
    # the whole QC record of the delivered fusion, JSON-ready
    rec = segmentation_qc(segs["fusion_mav"], brain, ref, candidates=moved, history=history,
                          regions=("WT", "TC"), config=cfg)
    assert len(rec["components"]) >= 1 and rec["components"][0]["hemisphere"] in ("left", "right")
    assert rec["volumes_ml"]["WT"] == pytest.approx(24.188) and rec["risk_score"] == bad.risk_score
    assert any(f.startswith("discord_alarm: scan-20") for f in rec["flags"])
    import json
    json.dumps(rec)
