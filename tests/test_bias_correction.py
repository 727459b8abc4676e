"""Tests for brainline.pipelines.bias_correction (N4) on the real TCGA FLAIR.

The shipped volumes carry their own (unknown) bias, so the check is N4's
response to a known field: with ``b0`` estimated on the original volume and
``b1`` on the volume multiplied by a synthetic field ``f``, ``b1 / b0`` must
reproduce ``f`` inside the brain.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.bias_correction import N4Config, N4Error, n4_correct
from tests.shared_data import TCGA, needs_data

pytestmark = needs_data(TCGA / "flair.nii.gz")

FAST = N4Config(iterations=(20, 20, 10))


@pytest.fixture(scope="module")
def flair() -> sitk.Image:
    return sitk.ReadImage(str(TCGA / "flair.nii.gz"))


def _field(shape: tuple[int, ...], brain: np.ndarray) -> np.ndarray:
    """1 + 0.3 * ramp, ramp in [-1, 1] over the brain: mostly linear in x,
    some y, plus a quadratic term in z (numpy z, y, x order)."""
    z, y, x = np.indices(shape, dtype=np.float32)

    def unit(c: np.ndarray) -> np.ndarray:
        lo, hi = c[brain].min(), c[brain].max()
        return 2.0 * (c - lo) / (hi - lo) - 1.0

    ramp = 0.8 * unit(x) - 0.3 * unit(y) + 0.2 * (2.0 * unit(z) ** 2 - 1.0)
    return (1.0 + 0.3 * ramp / np.abs(ramp[brain]).max()).astype(np.float32)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
            and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection())


def _cv(v: np.ndarray) -> float:
    return float(v.std() / v.mean())


def test_synthetic_field_is_recovered_product_default(flair):
    arr = sitk.GetArrayFromImage(flair).astype(np.float32)
    brain = arr > 0
    field = _field(arr.shape, brain)
    biased = sitk.GetImageFromArray(arr * field)
    biased.CopyInformation(flair)

    t0 = time.perf_counter()
    ref = n4_correct(flair)          # N4's view of the original volume
    res = n4_correct(biased)         # ... and of the same volume times the field
    elapsed = time.perf_counter() - t0

    b0 = np.exp(sitk.GetArrayFromImage(ref.log_bias_field))
    b1 = np.exp(sitk.GetArrayFromImage(res.log_bias_field))
    r = float(np.corrcoef((b1 / b0)[brain], field[brain])[0, 1])
    ratio = (b1 / b0)[brain] / field[brain]
    rel = float(np.abs(ratio / ratio.mean() - 1.0).mean())
    corrected = sitk.GetArrayFromImage(res.corrected)
    cv_biased, cv_corr = _cv((arr * field)[brain]), _cv(corrected[brain])
    print(f"\nN4 default: r={r:.4f}, mean relative field error {100 * rel:.2f}%, CV {cv_biased:.4f} -> "
          f"{cv_corr:.4f} (original {_cv(arr[brain]):.4f}), {res.elapsed_s:.1f} s per volume "
          f"({elapsed:.1f} s for two), iterations {res.iterations_per_level}, control points "
          f"{res.control_points}, shrink {res.shrink_factors}")
    assert r > 0.9 and rel < 0.03
    assert cv_corr < cv_biased
    assert _same_grid(res.corrected, biased) and _same_grid(res.log_bias_field, biased)
    assert res.corrected.GetPixelID() == sitk.sitkFloat32 and res.log_bias_field.GetPixelID() == sitk.sitkFloat32
    # corrected = image / exp(log_bias), zeros stay zero
    np.testing.assert_allclose(corrected, arr * field / b1, rtol=1e-4, atol=1e-3)
    assert np.all(corrected[~brain & (arr == 0)] == 0)
    # zero-mean log field inside the mask keeps the intensity scale
    assert abs(float(np.log(b1[brain]).mean())) < 1e-3
    assert res.iterations == sum(res.iterations_per_level) > 0
    json.dumps(res.to_dict())


def test_thick_oblique_slices_negative_values_and_explicit_mask(flair):
    """2D-like acquisition (0.9 x 0.9 x 5 mm, tilted), negative values in the
    background and an explicit mask on another grid: runs, same grid out."""
    tilt = sitk.Euler3DTransform()
    tilt.SetRotation(np.radians(8.0), 0.0, 0.0)
    ref = sitk.Image([256, 256, 30], sitk.sitkFloat32)
    ref.SetSpacing((0.9, 0.9, 5.0))
    ref.SetDirection(tilt.GetMatrix())
    centre = np.asarray(flair.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in flair.GetSize()]))
    ref.SetOrigin(tuple(centre - np.asarray(tilt.GetMatrix()).reshape(3, 3) @ np.array([115.0, 115.0, 72.5])))
    thick = sitk.Resample(sitk.Cast(flair, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, -20.0)
    mask = sitk.Cast(flair > 0, sitk.sitkUInt8)  # 1 mm grid, resampled inside
    res = n4_correct(thick, mask, FAST, name="FLAIR")
    print(f"\nN4 thick slices: {res.elapsed_s:.1f} s, shrink {res.shrink_factors}, control points "
          f"{res.control_points}")
    assert res.shrink_factors == [4, 4, 1]
    assert _same_grid(res.corrected, thick)
    out = sitk.GetArrayFromImage(res.corrected)
    assert np.isfinite(out).all() and (out < 0).any()  # negatives kept (divided by a positive field)


def test_errors_are_readable(flair):
    const = sitk.Image(flair.GetSize(), sitk.sitkFloat32) + 5.0
    with pytest.raises(N4Error, match="N4 bias correction of T2 is impossible: the image is empty/constant"):
        n4_correct(const, None, FAST, name="T2")
    empty_mask = sitk.Image(flair.GetSize(), sitk.sitkUInt8)
    empty_mask.CopyInformation(flair)
    with pytest.raises(N4Error, match="mask holds only 0 voxels"):
        n4_correct(flair, empty_mask, FAST, name="FLAIR")
    with pytest.raises(ValueError):
        n4_correct(flair, None, N4Config(control_points=(3, 3, 3)))
