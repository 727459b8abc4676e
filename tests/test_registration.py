"""Tests for brainline.pipelines.registration on the real TCGA/BraTS volumes.

Ground truth: the shipped volumes are co-registered, so moving the FLAIR by a
known rigid motion S (``moving(y) = flair(S(y))``) makes ``S^-1`` the true
fixed->moving transform for registering it back to the T1c. Errors are
distances (mm) between the true and the estimated mapping of the brain voxels.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.pipelines.registration import (
    RegistrationConfig,
    RegistrationError,
    foreground_mask,
    register,
    registration_quality,
    resample_to,
)
from tests.shared_data import BRATS, TCGA, needs_data

# The quality check's cost is bounded in seconds (elapsed_s < 3): the module runs alone,
# after the parallel phase (README "Tests and benchmarks").
pytestmark = [needs_data(TCGA / "t1c.nii.gz"), pytest.mark.serial]

ANGLES_DEG = (4.0, -3.0, 6.0)
SHIFT_MM = (6.0, -4.0, 5.0)


@pytest.fixture(scope="module")
def t1c() -> sitk.Image:
    return sitk.ReadImage(str(TCGA / "t1c.nii.gz"))


@pytest.fixture(scope="module")
def flair() -> sitk.Image:
    return sitk.ReadImage(str(TCGA / "flair.nii.gz"))


@pytest.fixture(scope="module")
def brain_points(t1c) -> np.ndarray:
    """Physical points (LPS mm, N x 3) of every 3rd brain voxel (t1c > 0)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(t1c) > 0)[::3, ::-1].astype(float)  # (x, y, z)
    spacing = np.asarray(t1c.GetSpacing())
    direction = np.asarray(t1c.GetDirection()).reshape(3, 3)
    return np.asarray(t1c.GetOrigin()) + (idx * spacing) @ direction.T


def _centre(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()]))


def _motion(t1c: sitk.Image) -> sitk.Euler3DTransform:
    s = sitk.Euler3DTransform()
    s.SetCenter(tuple(_centre(t1c)))
    s.SetRotation(*np.radians(ANGLES_DEG))
    s.SetTranslation(SHIFT_MM)
    return s


def _apply(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    """Apply a linear (rigid/affine) transform to many points with numpy."""
    o = np.asarray(tx.TransformPoint((0.0, 0.0, 0.0)))
    a = np.column_stack([np.asarray(tx.TransformPoint(tuple(e))) - o for e in np.eye(3)])
    return pts @ a.T + o


def _errors(estimated: sitk.Transform, truth: sitk.Transform, pts: np.ndarray) -> tuple[float, float]:
    d = np.linalg.norm(_apply(estimated, pts) - _apply(truth, pts), axis=1)
    return float(d.mean()), float(d.max())


def _oblique_thick(flair: sitk.Image, motion: sitk.Transform, centre: np.ndarray) -> sitk.Image:
    """Clinical-looking 2D FLAIR: 256x256 in-plane at 0.9 mm, 5 mm axial slices
    tilted 10 deg about the left-right axis, FOV 230 mm, content moved by
    ``motion``. Each 5 mm slice is the mean of five 1 mm sub-slices (slab
    profile); the FOV is zero-padded around the brain (head-sized)."""
    tilt = sitk.Euler3DTransform()
    tilt.SetRotation(np.radians(10.0), 0.0, 0.0)
    direction = np.asarray(tilt.GetMatrix()).reshape(3, 3)
    n_slices, sub = 32, 5
    size = np.array([256, 256, n_slices * sub])
    spacing = np.array([0.9, 0.9, 1.0])
    origin = centre - direction @ ((size - 1) / 2.0 * spacing)
    fine = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    fine.SetSpacing(tuple(spacing))
    fine.SetDirection(tuple(direction.ravel()))
    fine.SetOrigin(tuple(origin))
    fine = sitk.Resample(sitk.Cast(flair, sitk.sitkFloat32), fine, motion, sitk.sitkLinear, 0.0)
    arr = sitk.GetArrayFromImage(fine).reshape(n_slices, sub, 256, 256).mean(axis=1)
    thick = sitk.GetImageFromArray(arr.astype(np.float32))
    thick.SetSpacing((0.9, 0.9, 5.0))
    thick.SetDirection(tuple(direction.ravel()))
    thick.SetOrigin(tuple(origin + direction[:, 2] * (sub - 1) / 2.0))
    return thick


def test_rigid_recovery_subvoxel_product_default(t1c, flair, brain_points):
    """FLAIR moved by 4/-3/6 deg and (6,-4,5) mm on a larger grid, registered
    back to the T1c (multi-modal) with the product default: < 1 mm mean."""
    motion = _motion(t1c)
    grid = sitk.Image([256, 256, 170], sitk.sitkFloat32)
    grid.SetOrigin(tuple(_centre(t1c) - np.array([127.5, 127.5, 84.5])))
    moving = sitk.Resample(sitk.Cast(flair, sitk.sitkFloat32), grid, motion, sitk.sitkLinear, 0.0)

    before = _errors(sitk.Euler3DTransform(), motion.GetInverse(), brain_points)
    t0 = time.perf_counter()
    res = register(t1c, moving)
    elapsed = time.perf_counter() - t0
    mean, worst = _errors(res.transform, motion.GetInverse(), brain_points)
    print(f"\nrigid 1 mm: error before {before[0]:.2f}/{before[1]:.2f} mm, after mean {mean:.3f} "
          f"max {worst:.3f} mm, {elapsed:.1f} s, iterations {res.iterations_per_level}, "
          f"quality {res.quality}, params rot {res.parameters['euler_xyz_deg']} deg")
    assert mean < 1.0 and worst < 1.5
    assert res.converged and res.flags == []
    assert res.final_metric < 0 and res.final_metric_eval < res.initial_metric
    assert res.quality["foreground_dice"] > 0.9
    # the estimate is S^-1: its rotation is the inverse of the applied one
    assert res.parameters["rotation_deg"] == pytest.approx(
        np.degrees(np.arccos((np.trace(np.asarray(motion.GetMatrix()).reshape(3, 3)) - 1) / 2)), abs=0.5)
    d = res.to_dict()
    json.dumps(d)
    assert d["direction"].startswith("fixed->moving") and "transform" not in d


def test_rigid_plus_affine_recovers_scaling(t1c, flair, brain_points):
    """FLAIR rotated, translated and scaled (1.06, 0.96, 1.03): rigid+affine
    recovers it within 1 mm."""
    motion = sitk.AffineTransform(3)
    motion.SetCenter(tuple(_centre(t1c)))
    rot = np.asarray(_motion(t1c).GetMatrix()).reshape(3, 3)
    motion.SetMatrix(tuple((rot @ np.diag([1.06, 0.96, 1.03])).ravel()))
    motion.SetTranslation(SHIFT_MM)
    grid = sitk.Image([256, 256, 170], sitk.sitkFloat32)
    grid.SetOrigin(tuple(_centre(t1c) - np.array([127.5, 127.5, 84.5])))
    moving = sitk.Resample(sitk.Cast(flair, sitk.sitkFloat32), grid, motion, sitk.sitkLinear, 0.0)
    res = register(t1c, moving, RegistrationConfig(transform="rigid+affine"))
    mean, worst = _errors(res.transform, motion.GetInverse(), brain_points)
    print(f"\nrigid+affine: mean {mean:.3f} max {worst:.3f} mm, {res.elapsed_s} s, scales "
          f"{res.parameters['scales']}, iterations {res.iterations_per_level}")
    assert mean < 1.0 and worst < 1.5 and res.flags == []
    assert len(res.iterations_per_level) == 5  # 3 rigid levels + 2 affine levels
    assert isinstance(res.transform, sitk.AffineTransform)


def test_oblique_thick_slices_registration(t1c, flair, brain_points):
    """5 mm oblique 2D FLAIR, 256x256 at 0.9 mm, registered to the 1 mm T1c."""
    motion = _motion(t1c)
    moving = _oblique_thick(flair, motion, _centre(t1c) + np.array([0.0, 8.0, -6.0]))
    assert moving.GetSize() == (256, 256, 32) and moving.GetSpacing() == (0.9, 0.9, 5.0)
    t0 = time.perf_counter()
    res = register(t1c, moving, moving_name="FLAIR", fixed_name="T1c")
    elapsed = time.perf_counter() - t0
    mean, worst = _errors(res.transform, motion.GetInverse(), brain_points)
    print(f"\noblique 5 mm: mean {mean:.3f} max {worst:.3f} mm, {elapsed:.1f} s, "
          f"iterations {res.iterations_per_level}, quality {res.quality}, flags {res.flags}")
    assert mean < 2.0
    assert res.flags == []
    out = resample_to(moving, t1c, res.transform)
    assert out.GetSize() == t1c.GetSize() and out.GetOrigin() == t1c.GetOrigin()
    assert out.GetPixelID() == sitk.sitkFloat32
    assert not res.swapped
    # the other way round (thick series as the fixed image, with a mask on its
    # grid): registered internally fine->thick and inverted; same accuracy
    back = register(moving, t1c, moving_name="T1c", fixed_name="FLAIR", fixed_mask=moving > 0)
    mean_b, worst_b = _errors(back.transform.GetInverse(), motion.GetInverse(), brain_points)
    print(f"thick as fixed: mean {mean_b:.3f} max {worst_b:.3f} mm, {back.elapsed_s} s, flags {back.flags}")
    assert back.swapped and mean_b < 2.0 and back.flags == []


@pytest.fixture(scope="module")
def clinical_pair(t1c, flair, brain_points):
    """The clinical case of issue 7: T1c 3D 1 mm, FLAIR 2D axial 5.5 mm
    (slice profile) tilted 16 deg, yaw 3 deg, roll -2 deg, in-plane 0.9 mm,
    FOV 230 mm, vertex cut by 15 mm, bias field and scanner scaling; both
    with a crude skull and scalp and a noisy (non-zero) background. Physical
    space is kept, so the true transform is the identity. Returns (fixed,
    moving, register() result)."""
    from bench.registration_qc import acquire, add_skull
    rng = np.random.default_rng(7)
    vols = add_skull({"t1c": sitk.Cast(t1c, sitk.sitkFloat32), "flair": sitk.Cast(flair, sitk.sitkFloat32)}, rng)
    fixed = acquire(vols["t1c"], brain_points, rng, slice_mm=1.0, inplane_mm=1.0, pitch_deg=4.0, fov_mm=256,
                    profile=False, noise=0.03, scale=2.0)
    moving = acquire(vols["flair"], brain_points, rng, slice_mm=5.5, inplane_mm=0.9, pitch_deg=16.0, yaw_deg=3.0,
                     roll_deg=-2.0, fov_mm=230, vertex_cut_mm=15.0, bias=0.25, scale=0.4, offset=30,
                     noise=0.03)
    return fixed, moving, register(fixed, moving, moving_name="FLAIR", fixed_name="T1c")


def test_clinical_tilted_thick_partial_coverage_is_not_flagged(clinical_pair, brain_points):
    """Issue 7: a correct registration of a tilted 5.5 mm FLAIR that covers
    less of the head than the T1c (with skull) carries no flag: the figures
    are computed on the region both fields of view cover."""
    fixed, moving, res = clinical_pair
    assert moving.GetSpacing()[2] == 5.5 and moving.GetSize()[2] < 40
    mean, worst = _errors(res.transform, sitk.Euler3DTransform(), brain_points)
    q = res.quality
    print(f"\nclinical: error {mean:.2f}/{worst:.2f} mm, {res.elapsed_s} s, dice {q['foreground_dice']}, "
          f"coverage {q['coverage']}, nmi {q['nmi']}, gain {q['similarity_gain']} ({q['best_perturbation']}), "
          f"qc {q['elapsed_s']} s, flags {res.flags}")
    assert worst < 1.5
    assert res.flags == []
    assert q["foreground_dice"] > 0.85 and q["coverage"] < 0.97  # the vertex is cut
    assert q["similarity_gain"] < 0 and q["elapsed_s"] < 3.0
    json.dumps(res.to_dict())


@pytest.mark.parametrize("error", [{"deg": 5.0, "axis": (0.3, -0.8, 0.5)}, {"mm": 5.0, "axis": (-0.6, 0.2, 0.77)}],
                         ids=["5deg", "5mm"])
def test_wrong_transform_is_flagged_in_words(clinical_pair, brain_points, error):
    """The correct result composed with a 5 deg rotation (about an oblique
    axis through the brain centre) or a 5 mm shift (oblique direction) is
    flagged as a misregistration, with the improving move in words."""
    fixed, moving, res = clinical_pair
    axis = np.asarray(error["axis"]) / np.linalg.norm(error["axis"])
    err = sitk.VersorRigid3DTransform()
    err.SetCenter(tuple(brain_points.mean(axis=0)))
    if "deg" in error:
        err.SetRotation(tuple(axis), np.radians(error["deg"]))
    else:
        err.SetTranslation(tuple(axis * error["mm"]))
    wrong = sitk.CompositeTransform([res.transform, err])  # x -> res(err(x))
    quality, flags = registration_quality(fixed, moving, wrong, fixed_name="T1c", moving_name="FLAIR")
    print(f"\nwrong {error}: gain {quality['similarity_gain']} ({quality['best_perturbation']}), flags {flags}")
    assert any(f.startswith("misregistration: FLAIR to T1c: registration likely off: similarity") for f in flags)
    assert quality["similarity_gain"] > RegistrationConfig().max_similarity_gain
    # the correct transform itself, through the same function: no flag
    assert registration_quality(fixed, moving, res.transform, fixed_name="T1c", moving_name="FLAIR")[1] == []


def test_already_aligned_series_stay_put(brain_points):
    """BraTS T2-FLAIR and T1c are co-registered: the result is ~identity
    (identity is picked as the better start) and not flagged; metric samples
    are drawn inside a brain mask dilated by 6 mm (as the docstring advises)."""
    fixed = sitk.ReadImage(str(BRATS / "t1c.nii.gz"))
    moving = sitk.ReadImage(str(BRATS / "t2f.nii.gz"))
    res = register(fixed, moving, fixed_mask=sitk.BinaryDilate(fixed > 0, [6, 6, 6]))
    mean, worst = _errors(res.transform, sitk.Euler3DTransform(), brain_points)
    print(f"\naligned: mean {mean:.3f} max {worst:.3f} mm, init {res.initializer_used}, {res.elapsed_s} s")
    assert mean < 0.5 and res.flags == []
    assert res.initializer_used == "identity"


def test_deterministic(t1c, flair):
    cfg = RegistrationConfig(shrink_factors=(4,), smoothing_sigmas_mm=(2.0,))
    a, b = register(t1c, flair, cfg), register(t1c, flair, cfg)
    assert a.parameters == b.parameters and a.final_metric == b.final_metric


def test_bad_start_is_flagged(t1c, flair):
    """Optimiser forced into a 90 deg start with too few iterations: flagged."""
    start = sitk.Euler3DTransform()
    start.SetCenter(tuple(_centre(t1c)))
    start.SetRotation(0.0, 0.0, np.radians(90.0))
    cfg = RegistrationConfig(shrink_factors=(4,), smoothing_sigmas_mm=(2.0,), max_iterations=3,
                             raise_if_not_converged=False)
    res = register(t1c, flair, cfg, initial_transform=start)
    print("\nbad start flags:", res.flags)
    codes = {f.split(":")[0] for f in res.flags}
    assert {"large_rotation", "low_dice", "not_converged"} <= codes
    assert not res.converged
    squash = sitk.AffineTransform(3)
    squash.SetCenter(tuple(_centre(t1c)))
    squash.SetMatrix((0.6, 0, 0, 0, 0.6, 0, 0, 0, 0.6))
    res = register(t1c, flair, RegistrationConfig(transform="affine", shrink_factors=(4,),
                                                  smoothing_sigmas_mm=(2.0,), max_iterations=2,
                                                  raise_if_not_converged=False), initial_transform=squash)
    assert any(f.startswith("implausible_scale") for f in res.flags), res.flags
    with pytest.raises(RegistrationError, match=r"registration of FLAIR to T1c did not converge \(final metric"):
        register(t1c, flair, RegistrationConfig(shrink_factors=(4,), smoothing_sigmas_mm=(2.0,),
                                                max_iterations=3), initial_transform=start)


def test_unrelated_image_is_flagged(t1c):
    """A 'FLAIR' that is a bright noisy box does not match a head: flagged."""
    rng = np.random.default_rng(0)
    arr = np.zeros((155, 240, 240), np.float32)
    arr[40:110, 60:200, 30:90] = rng.normal(500.0, 50.0, (70, 140, 60))
    box = sitk.GetImageFromArray(arr)
    box.CopyInformation(t1c)
    res = register(t1c, box, RegistrationConfig(shrink_factors=(4, 2), smoothing_sigmas_mm=(2.0, 1.0),
                                                raise_if_not_converged=False))
    print("\nunrelated flags:", res.flags, res.quality)
    assert any(f.startswith("low_dice") for f in res.flags)


def test_constant_and_empty_images_raise_readable_errors(t1c):
    const = sitk.Image(t1c.GetSize(), sitk.sitkInt16)
    const.CopyInformation(t1c)
    with pytest.raises(RegistrationError) as err:
        register(t1c, const, moving_name="FLAIR", fixed_name="T1c")
    msg = str(err.value)
    assert "FLAIR" in msg and "T1c" in msg and "constant" in msg
    with pytest.raises(RegistrationError, match="the T2 image is empty/constant"):
        register(const + 7, t1c, moving_name="T1c", fixed_name="T2")
    with pytest.raises(RegistrationError, match="3D volume"):
        register(t1c[:, :, 70], t1c[:, :, 71])


def test_no_overlap_is_a_readable_error(t1c, flair):
    far = sitk.TranslationTransform(3, (0.0, 0.0, 2000.0))
    with pytest.raises(RegistrationError) as err:
        register(t1c, flair, RegistrationConfig(shrink_factors=(4,), smoothing_sigmas_mm=(2.0,)),
                 initial_transform=_affine(far))
    assert "registration of FLAIR to T1c" in str(err.value)
    print("\nno overlap:", err.value)


def _affine(tx: sitk.Transform) -> sitk.AffineTransform:
    a = sitk.AffineTransform(3)
    a.SetTranslation(tx.TransformPoint((0.0, 0.0, 0.0)))
    return a


def test_resample_to_grids_and_types(t1c):
    seg = sitk.ReadImage(str(TCGA / "segmentations" / sorted(p.name for p in (TCGA / "segmentations").iterdir()
                                                               if p.name.endswith(".nii.gz"))[0]))
    ref = sitk.Image([128, 128, 40], sitk.sitkUInt8)
    ref.SetSpacing((1.8, 1.8, 4.0))
    ref.SetOrigin(tuple(_centre(t1c) - np.array([115.0, 115.0, 78.0])))
    lab = resample_to(seg, ref, None, "nearest")
    assert lab.GetPixelID() == seg.GetPixelID() and lab.GetSize() == (128, 128, 40)
    assert set(np.unique(sitk.GetArrayViewFromImage(lab))) <= set(np.unique(sitk.GetArrayViewFromImage(seg)))
    out = resample_to(t1c, ref, sitk.Euler3DTransform(), "bspline", default_value=-1)
    assert out.GetPixelID() == sitk.sitkFloat32 and out.GetSpacing() == (1.8, 1.8, 4.0)
    with pytest.raises(ValueError):
        resample_to(t1c, ref, None, "cubic")
    fg = foreground_mask(t1c)
    assert 0.1 < sitk.GetArrayViewFromImage(fg).mean() < 0.2
