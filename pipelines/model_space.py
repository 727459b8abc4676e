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
grid is registered to the template with a 12-dof affine (Mattes MI,
``pipelines.registration.register``), which also measures the registration
quality on the common region. Each sequence is then resampled *once* from
its native NIfTI into the template grid through the composed transform
(template -> reference -> native series), linear interpolation, and masked
with the brain mask carried the same way (nearest neighbour). No N4 in model
space: the BraTS training data were not bias-corrected either.

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


def map_to_model_space(ms: ModelSpace, native: dict[str, sitk.Image],
                       reference_to_native: dict[str, sitk.Transform | None],
                       brain_mask: sitk.Image, out_dir: Path) -> dict[str, Path]:
    """Resample each sequence once from its native grid into the model grid,
    masked by the brain mask carried into the same grid; writes
    ``out_dir/<role>.nii.gz`` and ``out_dir/brain_mask.nii.gz`` and returns
    the role -> path map (with "mask")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mask = resample_to(sitk.Cast(brain_mask > 0, sitk.sitkUInt8), ms.template, ms.to_reference,
                       interpolator="nearest")
    m = sitk.GetArrayViewFromImage(mask) > 0
    if not m.any():
        raise ModelSpaceError("the brain mask does not reach the model's frame after registration")
    paths: dict[str, Path] = {}
    for role, image in native.items():
        tx = _composed(ms.to_reference, reference_to_native.get(role))
        moved = resample_to(image, ms.template, tx, interpolator="linear")
        a = sitk.GetArrayFromImage(moved)
        a[~m] = 0
        a = np.clip(a, 0, None)  # negative interpolation overshoot would count as brain
        out = sitk.GetImageFromArray(a.astype(np.float32))
        out.CopyInformation(ms.template)
        paths[role] = out_dir / f"{role}.nii.gz"
        write_nifti(out, paths[role])
    paths["mask"] = out_dir / "brain_mask.nii.gz"
    write_nifti(mask, paths["mask"])
    (out_dir / "model_space.json").write_text(json.dumps(ms.record(), indent=2, default=str))
    return paths


def labels_to_reference(labels: sitk.Image, ms: ModelSpace, reference: sitk.Image) -> sitk.Image:
    """Bring a label map on the model grid back to the reference grid
    (nearest neighbour through the inverse template transform)."""
    inverse = ms.to_reference.GetInverse()
    return resample_to(sitk.Cast(labels, sitk.sitkUInt8), reference, inverse, interpolator="nearest")
