"""Model space: a tilted study is brought into the BraTS frame and its
labels back (pipelines/model_space.py), on a held-out BraTS 2018 case.

The head is physically turned by 15 degrees (pitch) and 5 degrees (yaw) and
shifted 8 mm; the reference labels travel with it (nearest neighbour).
Mapped into the model frame they must land where the original BraTS labels
are (the template registration recovers the tilt), and
mapped back they must land on the tilted labels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.model_space import (
    ModelSpaceError,
    fit_model_space,
    labels_to_reference,
    map_to_model_space,
    template_image,
)
from tests.corpus import HOLDOUT_CASES, dice
from tests.reslice import pad_to_head_fov
from tests.shared_data import BRATS18, require

CASE = "CBICA_ALU"
assert CASE in HOLDOUT_CASES  # the templates are built from the tuning half only


def _case(name: str) -> sitk.Image:
    return sitk.ReadImage(str(require(BRATS18 / f"Brats18_{CASE}_1" / f"Brats18_{CASE}_1_{name}.nii.gz")))


def _tilted(image: sitk.Image, nearest: bool = False) -> sitk.Image:
    """The head physically turned by 15 degrees (pitch) and 5 degrees (yaw)
    about the volume centre and shifted 8 mm, on a head-sized 1 mm grid."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = sitk.Euler3DTransform(centre, math.radians(15.0), 0.0, math.radians(5.0), (0.0, 8.0, 0.0))
    grid = pad_to_head_fov(image)
    if nearest:
        return sitk.Resample(image, grid, turn, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Resample(image, grid, turn, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_space")
    t1 = _tilted(_case("t1"))
    seg = _tilted(_case("seg"), nearest=True)
    mask = sitk.Cast(t1 > 0, sitk.sitkUInt8)
    sitk.WriteImage(t1, str(out / "t1.nii.gz"))
    ms = fit_model_space({"t1": out / "t1.nii.gz"}, mask)
    paths = map_to_model_space(ms, {"t1": t1}, {"t1": None}, mask, out / "model")
    return ms, paths, seg, mask


def test_template_is_the_brats_grid():
    template = template_image("t1")
    original = _case("t1")
    assert template.GetSize() == original.GetSize() == (240, 240, 155)
    assert np.allclose(template.GetSpacing(), (1, 1, 1))
    assert np.allclose(template.GetOrigin(), original.GetOrigin())
    assert np.allclose(template.GetDirection(), original.GetDirection())


def test_registration_recovers_the_tilt(mapped):
    ms, _, _, _ = mapped
    record = ms.record()
    # the study was tilted by ~15.8 degrees in total; the template differs from
    # this subject by ~2 degrees, so the recovered rotation is 15.8 +- 4
    assert 11.5 <= record["parameters"]["rotation_deg"] <= 20.0, record["parameters"]
    assert record["flags"] == []
    assert record["quality"]["foreground_dice"] > 0.9


def test_labels_land_in_the_brats_frame_and_come_back(mapped):
    ms, paths, seg, mask = mapped
    in_model = sitk.Resample(seg, ms.template, ms.to_reference, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    original = sitk.GetArrayFromImage(_case("seg")) > 0
    assert dice(sitk.GetArrayFromImage(in_model) > 0, original) > 0.8
    back = labels_to_reference(in_model, ms, seg)
    assert dice(sitk.GetArrayFromImage(back) > 0, sitk.GetArrayFromImage(seg) > 0) > 0.9
    # the resampled T1 in model space overlaps the original brain
    t1_model = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["t1"]))) > 0
    assert dice(t1_model, sitk.GetArrayFromImage(_case("t1")) > 0) > 0.9


def test_unknown_space_and_missing_sequence_are_refused(tmp_path):
    mask = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    with pytest.raises(ModelSpaceError, match="unknown model space"):
        fit_model_space({"t1": tmp_path / "t1.nii.gz"}, mask, space="mni")
    with pytest.raises(ModelSpaceError, match="T1 or T1c"):
        fit_model_space({"flair": tmp_path / "flair.nii.gz"}, mask)
