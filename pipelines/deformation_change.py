"""Volume change of a lesion by deformable registration of the pair
(label propagation, as in Jacobian-integration / tensor-based morphometry:
Boyes et al., NeuroImage 32:159 (2006); for tumour growth, Angelini et al.,
IEEE TMI 26:762 (2007)).

The prior, already rigidly registered and intensity-matched onto the current
grid, is registered to the current image once more with a non-rigid
displacement field (ITK's symmetric-forces demons, multi-resolution); the
prior's lesion mask is carried by that field into the current anatomy, and
the change is the volume of the carried mask minus the prior's:

    dV = voxel_mm3 * ( sum_x M_prior(x + u(x)) - sum_x M_prior(x) )

with u the displacement (mm) defined on the current grid and M_prior
linearly interpolated (partial voxels count). The segmentations say *what*
the lesion is at the prior; *how much* it changed comes from how the image
moved, so a segmenter that outlines the same tumour differently at two
scans adds nothing.

A smooth field explains a lesion that pushed its surroundings aside; one that
grew *into* the tissue (infiltration: the tissue beyond the edge turned to
lesion without moving) is only partly explained, and the regularised field
falls short of a sharp displacement too. With ``residual`` the boundary shift
integral (:mod:`.boundary_shift`) of the current image against the *warped*
prior, over the band around the carried and the current masks, adds what the
field left unexplained (``residual_mm3``): zero where the warp matched the
images, the intensity change where it did not (the deformation + residual
form of Freeborough & Fox's BSI after non-rigid registration).

Arrays are (z, y, x) on one grid (the cropped current grid: ``grid`` gives
its spacing, origin and direction), intensities in the units of the current
image. The registration runs on an isotropic ``iso_mm`` resampling of the
lesions' bounding box + ``margin_mm`` (a 5 mm 2D series is not smoothed
unevenly along its slices); displacement smoothing ``field_sd_mm`` and image
smoothing ``image_sigma_mm`` in mm of that finest grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .boundary_shift import boundary_band, boundary_shift
from .longitudinal_images import mask_box

__all__ = ["ResidualShift", "demons_field", "propagated_growth"]


@dataclass(frozen=True)
class ResidualShift:
    """What the boundary shift of one mask's residual needs (module docstring):
    the current segmentation of the component and where the integral may count
    (bool, (z, y, x) on the caller's grid), the tissue and lesion levels
    (current image units), the clip window (fractions from tissue to lesion)
    and the band (mm outside the union / inside the intersection)."""

    current_mask: np.ndarray
    within: np.ndarray
    tissue_level: float
    lesion_level: float
    window: tuple[float, float]
    band_out_mm: float
    band_in_mm: float


def _image(arr: np.ndarray, grid: sitk.Image, box: tuple[slice, ...]) -> sitk.Image:
    """``arr[box]`` as an image placed where it lies on ``grid``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr[box], dtype=np.float32))
    img.SetSpacing(grid.GetSpacing())
    img.SetDirection(grid.GetDirection())
    img.SetOrigin(grid.TransformIndexToPhysicalPoint([int(s.start) for s in box[::-1]]))
    return img


def _isotropic(img: sitk.Image, iso_mm: float) -> sitk.Image:
    """The same box resampled to ``iso_mm`` voxels (linear), same origin and direction."""
    extent = np.array(img.GetSize()) * np.array(img.GetSpacing())
    size = [max(1, int(round(e / iso_mm))) for e in extent]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [iso_mm] * 3,
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def demons_field(fixed: sitk.Image, moving: sitk.Image, levels: tuple[int, ...], iterations: int,
                 field_sd_voxels: float) -> sitk.Image:
    """Displacement field (mm, on ``fixed``'s grid) taking ``fixed`` points to
    ``moving`` points: symmetric-forces demons, coarse to fine by the shrink
    factors ``levels`` (e.g. (2, 1)), ``iterations`` per level, the field
    smoothed by a Gaussian of ``field_sd_voxels`` voxels of each level."""
    field = None
    for level in levels:
        f_img = sitk.Shrink(fixed, [level] * 3) if level > 1 else fixed
        m_img = sitk.Shrink(moving, [level] * 3) if level > 1 else moving
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(iterations))
        demons.SetStandardDeviations(float(field_sd_voxels))
        if field is None:
            field = demons.Execute(f_img, m_img)
        else:
            start = sitk.Resample(field, f_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field = demons.Execute(f_img, m_img, start)
    return field


def propagated_growth(current: np.ndarray, prior: np.ndarray, masks: dict[str, np.ndarray], grid: sitk.Image,
                      *, margin_mm: float = 20.0, iso_mm: float = 1.0, image_sigma_mm: float = 0.5,
                      field_sd_mm: float = 1.0, levels: tuple[int, ...] = (2, 1), iterations: int = 100,
                      outline: list[np.ndarray] | None = None,
                      residual: dict[str, ResidualShift] | None = None) -> dict:
    """Growth (mm^3) of each prior mask in ``masks`` (name -> bool array) as the
    deformable registration of ``prior`` (matched) to ``current`` carries it
    (module docstring). ``outline``: more masks whose box the registration
    must cover (e.g. the current segmentation); ``residual``: name -> what the
    boundary shift of that mask's residual needs. Returns {"growth_mm3":
    {name: mm^3}, "residual_mm3": {name: mm^3} (the names of ``residual``
    that could be integrated), "iso_mm", "mean_displacement_mm" (over the
    prior masks' union)}, or {} when there is nothing to carry or the images
    are blank."""
    spacing_zyx = tuple(grid.GetSpacing()[::-1])
    box = mask_box(list(masks.values()) + list(outline or []), spacing_zyx, margin_mm)
    if box is None:
        return {}
    cur_img = _isotropic(_image(current, grid, box), iso_mm)
    pri_img = _isotropic(_image(prior, grid, box), iso_mm)
    c = sitk.GetArrayViewFromImage(cur_img)
    if not (c > 0).any():
        return {}
    scale = float(np.percentile(c[c > 0], 99))
    if scale <= 0:
        return {}
    fixed = sitk.SmoothingRecursiveGaussian(cur_img / scale, image_sigma_mm) if image_sigma_mm > 0 else cur_img / scale
    moving = sitk.SmoothingRecursiveGaussian(pri_img / scale, image_sigma_mm) if image_sigma_mm > 0 else pri_img / scale
    field = demons_field(fixed, moving, levels, iterations, field_sd_mm / iso_mm)
    disp = sitk.GetArrayFromImage(field)
    warp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    voxel_mm3 = iso_mm ** 3

    def iso_mask(mask: np.ndarray) -> sitk.Image:
        return _isotropic(_image(mask.astype(np.float32), grid, box), iso_mm)

    warped_prior = (sitk.GetArrayFromImage(sitk.Resample(pri_img, cur_img, warp, sitk.sitkLinear, 0.0))
                    if residual else None)
    growth, unexplained = {}, {}
    union = np.zeros(sitk.GetArrayViewFromImage(fixed).shape, bool)
    for name, mask in masks.items():
        m_img = iso_mask(mask)
        before = sitk.GetArrayFromImage(m_img)
        after = sitk.GetArrayFromImage(sitk.Resample(m_img, m_img, warp, sitk.sitkLinear, 0.0))
        growth[name] = float(after.sum() - before.sum()) * voxel_mm3
        union |= before > 0.5
        spec = (residual or {}).get(name)
        if spec is not None and warped_prior is not None:
            now = sitk.GetArrayFromImage(iso_mask(spec.current_mask)) > 0.5
            within = sitk.GetArrayFromImage(iso_mask(spec.within)) > 0.5
            band = boundary_band(after > 0.5, now, (iso_mm,) * 3, spec.band_out_mm, spec.band_in_mm, within)
            r = boundary_shift(c, warped_prior, band, spec.tissue_level, spec.lesion_level, spec.window, voxel_mm3)
            if r["delta_mm3"] is not None:
                unexplained[name] = r["delta_mm3"]
    mean_disp = float(np.linalg.norm(disp[union], axis=1).mean()) if union.any() else 0.0
    return {"growth_mm3": growth, "residual_mm3": unexplained, "iso_mm": iso_mm,
            "mean_displacement_mm": round(mean_disp, 3)}
