"""Shared real cases for the segmentation tests and bench/baseline_accuracy.py:
paths of the shared data, file names per role, and builders of
``SegmentationInput`` (NIfTI files plus a brain mask t1c > 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brainline.models.base import SegmentationInput
from tests.shared_data import BRATS, DATA, TCGA  # noqa: F401 - re-exported for the segmentation tests

REPO = Path(__file__).resolve().parents[1]
TCGA_FILES = {"t1": "t1", "t1c": "t1c", "t2": "t2", "flair": "flair"}
BRATS_FILES = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
REFERENCES = ("fusion_simple", "fusion_mav", "hnfnetv1-20", "isen-20", "sanet0-20",
              "scan-20", "yixinmpl-20")


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def write_like(array: np.ndarray, like: sitk.Image, path: Path) -> Path:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(like)
    sitk.WriteImage(img, str(path))
    return path


def make_input(out: Path, case: Path, files: dict[str, str],
               arrays: dict[str, np.ndarray] | None = None) -> SegmentationInput:
    """NIfTI inputs in ``out`` (the case's files, or ``arrays`` on its grid)
    plus the brain mask t1c > 0."""
    out.mkdir(parents=True, exist_ok=True)
    like = sitk.ReadImage(str(case / f"{files['t1c']}.nii.gz"))
    if arrays is None:
        paths = {role: case / f"{name}.nii.gz" for role, name in files.items()}
        t1c = sitk.GetArrayFromImage(like)
    else:
        paths = {role: write_like(a.astype(np.float32), like, out / f"{role}.nii.gz")
                 for role, a in arrays.items()}
        t1c = arrays["t1c"]
    mask = write_like((t1c > 0).astype(np.uint8), like, out / "brain_mask.nii.gz")
    return SegmentationInput(paths=paths, brain_mask_path=mask)


def mirror_x(arrays: dict[str, np.ndarray], mask: np.ndarray, replace: np.ndarray) -> dict:
    """Replace the voxels where ``replace`` (broadcastable to the volume) is
    true by their mirror image across the brain's mid-sagittal plane (centre of
    the mask's x extent)."""
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    c = (xs[0] + xs[-1]) / 2.0
    src = np.clip(np.round(2 * c - np.arange(mask.shape[2])).astype(int), 0, mask.shape[2] - 1)
    return {k: np.where(replace, v[:, :, src], v) for k, v in arrays.items()}


def load_arrays(case: Path, files: dict[str, str]) -> dict[str, np.ndarray]:
    return {role: read_array(case / f"{name}.nii.gz").astype(np.float32)
            for role, name in files.items()}
