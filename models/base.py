"""Segmentation backend interface shared by every model backend.

Coordinate conventions: images are NIfTI files read with SimpleITK, so
physical space is LPS in millimetres; arrays from ``sitk.GetArrayFromImage``
are indexed (z, y, x). Label maps follow the BraTS 2023 convention.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# BraTS 2023 labels
NCR = 1  # necrotic / non-enhancing tumour core
ED = 2   # peritumoral edema
ET = 3   # enhancing tumour
LABEL_NAMES = {NCR: "necrotic/non-enhancing tumour core", ED: "peritumoral edema",
               ET: "enhancing tumour"}
ROLES = ("t1", "t1c", "t2", "flair")


class SegmentationError(RuntimeError):
    """A model cannot be loaded or run; the message says which and why."""


@dataclass
class SegmentationInput:
    """Preprocessed inputs: co-registered, skull-stripped, bias-corrected
    NIfTI volumes on one reference grid, plus the brain mask on that grid."""

    paths: dict[str, Path]
    brain_mask_path: Path

    @cached_property
    def reference(self) -> sitk.Image:
        return sitk.ReadImage(str(self.brain_mask_path))

    def image(self, role: str) -> sitk.Image:
        if role not in self.paths:
            raise SegmentationError(f"the model needs a {role} image, which is not available")
        return sitk.ReadImage(str(self.paths[role]), sitk.sitkFloat32)

    def array(self, role: str) -> np.ndarray:
        """(z, y, x) float32 intensities of one sequence."""
        return sitk.GetArrayFromImage(self.image(role))

    def mask_array(self) -> np.ndarray:
        """(z, y, x) boolean brain mask."""
        return sitk.GetArrayFromImage(self.reference) > 0

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size (x, y, z) in mm."""
        return tuple(self.reference.GetSpacing())


@dataclass
class SegmentationOutput:
    labels: np.ndarray            # (z, y, x) uint8, values in {0, NCR, ED, ET}
    backend: str                  # e.g. "baseline", "monai_bundle", "onnx"
    model_name: str               # e.g. "brats_mri_segmentation"
    model_version: str
    details: dict = field(default_factory=dict)

    def to_image(self, reference: sitk.Image) -> sitk.Image:
        """Label map as an image on the reference grid."""
        img = sitk.GetImageFromArray(self.labels.astype(np.uint8))
        img.CopyInformation(reference)
        return img


class SegmentationBackend(abc.ABC):
    """A tumour segmentation model. Implementations load everything they need
    from local files at construction (no downloads) and raise
    SegmentationError with a readable message on failure."""

    name: str = "abstract"
    #: Roles (keys of ROLES) the backend cannot run without. Series selection
    #: asks a study for these plus the reference role, and a study that lacks
    #: one ends in needs_input. Default: all four.
    required_roles: tuple[str, ...] = ROLES
    #: Roles the backend uses when a study has them and does without
    #: otherwise; a missing one is recorded and reported (summary, SR, PDF).
    optional_roles: tuple[str, ...] = ()
    #: The frame the backend's inputs must be in. None: the reference grid of
    #: the study (co-registered, skull-stripped, N4-corrected). "brats": 1 mm
    #: isotropic on the BraTS grid (SRI24 frame), skull-stripped, not
    #: bias-corrected, as BraTS-trained networks were trained; the pipeline
    #: maps the study there and the labels back (``pipelines/model_space.py``).
    input_space: str | None = None

    @abc.abstractmethod
    def segment(self, inputs: SegmentationInput) -> SegmentationOutput: ...

    def describe(self) -> dict:
        """Name and version for reports and DICOM algorithm identification."""
        return {"backend": self.name}


class ChannelInputBackend(SegmentationBackend):
    """A network with one input channel per role of ``self.input_order``:
    it needs every one of them and has no optional input."""

    input_order: tuple[str, ...] = ROLES

    @property
    def required_roles(self) -> tuple[str, ...]:
        return tuple(self.input_order)

    @property
    def optional_roles(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class InputRoles:
    """The MRI roles a segmentation backend needs (``required``) and can use
    (``optional``), as keys of ROLES."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def usable(self) -> tuple[str, ...]:
        """Every role the backend reads, in ROLES order."""
        return tuple(r for r in ROLES if r in self.required or r in self.optional)
