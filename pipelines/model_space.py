"""Model space: bring a study into the frame a network was trained in, and
its segmentation back to the reference series' native grid.

Networks trained on BraTS-preprocessed data (e.g. the Wang et al. cascade)
expect 1 mm isotropic, skull-stripped volumes in the SRI24 atlas frame, on
the 240 x 240 x 155 BraTS grid. A backend declares this with
``input_space = "brats"`` (``models/base.py``); the segment step then calls
:func:`map_to_model_space` and :func:`labels_to_reference`.

Frame: the templates in ``models/templates/`` (``scripts/build_brats_template.py``:
the average robust-z T1 and T1c of the six tuning BraTS 2018 cases, on the
BraTS grid itself). The study's skull-stripped T1 (or T1c) on the reference
grid is registered rigidly to the template (Mattes MI,
``pipelines.registration.register``, ``MODEL_SPACE_REGISTRATION``), which also
measures the registration quality on the common region. Each sequence is then
resampled *once* from its native NIfTI into the template grid through the
composed transform (template -> reference -> native series), cubic B-spline
interpolation, and masked with the brain mask carried the same way (nearest
neighbour). A mask thresholded from a skull-stripped thick-slice series
(> 0) keeps every slice that grazes the brain; it is eroded by half a slice
(:func:`mask_erosion_mm`), because the rim of dim partial-volume voxels it
adds shifts the networks' per-volume normalisation (mean and standard
deviation over the brain) and the whole tumour grows. No N4 in model space:
the BraTS training data were not bias-corrected either (and N4's field,
carried into the frame, took the normalised pattern-b inputs of 4 of 5
studies further from the original BraTS volumes, not closer).

All transforms map fixed physical points to moving physical points (LPS,
mm), as SimpleITK resampling expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .nifti_io import write_nifti
from .registration import RegistrationConfig, register, resample_to

SPACES = ("brats",)
# sequence registered to the template, first available
TEMPLATE_ROLES = ("t1", "t1c")

# Affine to a template of another subject population: the brain is sampled
# through a 5 mm-dilated mask (affine scaling relies on the brain edge), the
# optimiser starts from the centres of mass, and a result outside the usual
# head-size range is flagged, not raised.
MODEL_SPACE_REGISTRATION = RegistrationConfig(
    transform="rigid", initializer="moments", try_identity=False,
    raise_if_not_converged=False, min_foreground_dice=0.7, max_rotation_deg=45.0,
    max_translation_mm=120.0, affine_scale_range=(0.75, 1.33))


class ModelSpaceError(RuntimeError):
    """The study cannot be brought into the model's frame; the message says why."""


@dataclass
class ModelSpace:
    """The mapping of one study into the model frame.

    template: the template image (model grid: size, spacing, origin, direction).
    to_reference: maps template physical points to reference-grid physical points.
    registration: ``RegistrationResult.to_dict()`` of the template registration
        (parameters in mm/degrees, quality on the common region, flags).
    """

    space: str
    template: sitk.Image
    to_reference: sitk.Transform
    registration: dict
    template_role: str

    def record(self) -> dict:
        """JSON-able description for summary.json."""
        reg = self.registration
        return {"space": self.space, "template": f"brats18_{self.template_role}",
                "grid": {"size": list(self.template.GetSize()),
                         "spacing_mm": list(self.template.GetSpacing())},
                "registered_sequence": self.template_role,
                "transform": reg.get("transform_type"),
                "parameters": reg.get("parameters"),
                "quality": reg.get("quality"),
                "flags": list(reg.get("flags", []))}


def template_image(role: str) -> sitk.Image:
    """The packaged BraTS-frame template of ``role`` ("t1" or "t1c")."""
    ref = resources.files("brainline.models").joinpath("templates", f"brats18_{role}.nii.gz")
    with resources.as_file(ref) as path:
        if not Path(path).exists():
            raise ModelSpaceError(f"the BraTS template for {role} is not installed ({path})")
        return sitk.ReadImage(str(path), sitk.sitkFloat32)


def fit_model_space(preprocessed: dict[str, Path], brain_mask: sitk.Image, space: str = "brats",
                    config: RegistrationConfig | None = None) -> ModelSpace:
    """Register the study's skull-stripped T1 (else T1c), on the reference
    grid, to the template of ``space``."""
    if space not in SPACES:
        raise ModelSpaceError(f"unknown model space {space!r}; known: {', '.join(SPACES)}")
    role = next((r for r in TEMPLATE_ROLES if r in preprocessed), None)
    if role is None:
        raise ModelSpaceError("a T1 or T1c sequence is needed to map the study into the model's frame")
    template = template_image(role)
    moving = sitk.ReadImage(str(preprocessed[role]), sitk.sitkFloat32)
    mask_t = sitk.Cast(template > 0, sitk.sitkUInt8)
    fixed_mask = sitk.BinaryDilate(mask_t, [5, 5, 5])
    reg = register(template, moving, config or MODEL_SPACE_REGISTRATION, fixed_mask=fixed_mask,
                   moving_name=f"{role.upper()} (study)", fixed_name=f"BraTS {role.upper()} template")
    return ModelSpace(space=space, template=template, to_reference=reg.transform,
                      registration=reg.to_dict(), template_role=role)


def _composed(to_reference: sitk.Transform, reference_to_native: sitk.Transform | None) -> sitk.Transform:
    """template -> native: reference_to_native(to_reference(x))."""
    if reference_to_native is None:
        return to_reference
    return sitk.CompositeTransform([reference_to_native, to_reference])


def through_plane_spacing_mm(image: sitk.Image) -> float:
    """The largest voxel spacing of ``image`` (mm): the slice spacing of a 2D series."""
    return float(max(image.GetSpacing()))


def mask_erosion_mm(slice_spacing_mm: float, model_spacing_mm: float = 1.0) -> float:
    """How far (mm) a brain mask drawn on slices ``slice_spacing_mm`` apart
    reaches beyond the brain: half a slice, less half a model voxel.

    A thick slice that only grazes the brain is brain on that slice (its
    partial-volume average is not background), so such a mask overshoots the
    brain surface by up to a whole slice along the slice normal, half a slice
    on average. In the 1 mm model frame this rim is a layer of dim,
    partial-volume voxels that BraTS's skull strip does not have; it lowers the
    mean and widens the spread of the per-volume normalisation the networks
    apply (mean and standard deviation over the brain). 0 for a 1 mm grid."""
    return max(0.0, (float(slice_spacing_mm) - float(model_spacing_mm)) / 2.0)


def erode_mm(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    """``mask`` (uint8) without its contour voxels (those with a background
    neighbour) and every voxel closer than ``radius_mm`` minus half a voxel to
    them (Euclidean, in mm: ITK's signed Maurer distance to the contour).
    On a voxel staircase this cuts about one voxel deeper than ``radius_mm``
    (a ball of radius 20 mm eroded by 3 mm keeps a ball of about 16 mm).
    Unchanged for a radius of 0, and when nothing would be left."""
    if radius_mm <= 0:
        return mask
    dist = sitk.SignedMaurerDistanceMap(mask, insideIsPositive=True, squaredDistance=False,
                                        useImageSpacing=True)
    half = 0.5 * min(mask.GetSpacing())
    eroded = sitk.Cast(dist >= float(radius_mm) - half + 1e-6, sitk.sitkUInt8)
    eroded = sitk.And(eroded, sitk.Cast(mask > 0, sitk.sitkUInt8))
    if not sitk.GetArrayViewFromImage(eroded).any():
        return mask
    eroded.CopyInformation(mask)
    return eroded


def map_to_model_space(ms: ModelSpace, native: dict[str, sitk.Image],
                       reference_to_native: dict[str, sitk.Transform | None],
                       brain_mask: sitk.Image, out_dir: Path, *, mask_source: str | None = None,
                       mask_erode_mm: float | None = None, interpolator: str = "bspline") -> dict[str, Path]:
    """Resample each sequence once from its native grid into the model grid,
    masked by the brain mask carried into the same grid; writes
    ``out_dir/<role>.nii.gz`` and ``out_dir/brain_mask.nii.gz`` and returns
    the role -> path map (with "mask").

    ``mask_source``: the role (in ``native``) whose intensities the brain
    mask was thresholded from (> 0: a study that came skull-stripped). Such a
    mask keeps every slice that grazes the brain, so it is eroded in the
    model frame by :func:`mask_erosion_mm` of that series' slice spacing.
    None (a mask drawn by a skull-stripping network, which does not keep
    a slice for a trace of brain; its overshoot was not measured here):
    not eroded. ``mask_erode_mm`` overrides the erosion (0: none).
    The erosion is recorded in ``model_space.json`` (``brain_mask``).

    ``interpolator``: "bspline" (cubic; default) or "linear". Through 4-6 mm
    slices the cubic B-spline keeps more of a lesion's contrast than linear
    interpolation between slice centres; its overshoot below zero is clipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mask = resample_to(sitk.Cast(brain_mask > 0, sitk.sitkUInt8), ms.template, ms.to_reference,
                       interpolator="nearest")
    if mask_erode_mm is None:
        mask_erode_mm = 0.0
        if mask_source is not None:
            if mask_source not in native:
                raise ModelSpaceError(f"the brain mask's source {mask_source!r} is not among the sequences")
            mask_erode_mm = mask_erosion_mm(through_plane_spacing_mm(native[mask_source]),
                                            min(ms.template.GetSpacing()))
    carried_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(mask.GetSpacing())) / 1000
    mask = erode_mm(mask, mask_erode_mm)
    m = sitk.GetArrayViewFromImage(mask) > 0
    if not m.any():
        raise ModelSpaceError("the brain mask does not reach the model's frame after registration")
    paths: dict[str, Path] = {}
    for role, image in native.items():
        tx = _composed(ms.to_reference, reference_to_native.get(role))
        moved = resample_to(image, ms.template, tx, interpolator=interpolator)
        a = sitk.GetArrayFromImage(moved)
        a[~m] = 0
        a = np.clip(a, 0, None)  # negative interpolation overshoot would count as brain
        out = sitk.GetImageFromArray(a.astype(np.float32))
        out.CopyInformation(ms.template)
        paths[role] = out_dir / f"{role}.nii.gz"
        write_nifti(out, paths[role])
    paths["mask"] = out_dir / "brain_mask.nii.gz"
    write_nifti(mask, paths["mask"])
    record = ms.record()
    record["interpolator"] = interpolator
    record["brain_mask"] = {
        "source": mask_source, "eroded_mm": round(float(mask_erode_mm), 2), "carried_ml": round(carried_ml, 1),
        "ml": round(float(m.sum()) * float(np.prod(mask.GetSpacing())) / 1000, 1)}
    (out_dir / "model_space.json").write_text(json.dumps(record, indent=2, default=str))
    return paths


def labels_to_reference(labels: sitk.Image, ms: ModelSpace, reference: sitk.Image) -> sitk.Image:
    """Bring a label map on the model grid back to the reference grid
    (nearest neighbour through the inverse template transform)."""
    inverse = ms.to_reference.GetInverse()
    return resample_to(sitk.Cast(labels, sitk.sitkUInt8), reference, inverse, interpolator="nearest")
