"""Segmentation backend interface shared by every model backend: the
:class:`SegmentationBackend` base class, the registry of backends
(``SEGMENTATION_BACKENDS``, decorator :func:`segmentation_backend`) and the
small helpers every backend shares (input checks, role names, turning model
outputs into BraTS 2023 labels). Backends import this module, never
``registry.py`` (which chooses a backend from configuration).

Coordinate conventions: images are NIfTI files read with SimpleITK, so
physical space is LPS in millimetres; arrays from ``sitk.GetArrayFromImage``
are indexed (z, y, x). Label maps follow the BraTS 2023 convention.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .plugins import Registry

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
    #: Label maps the backend exposes besides ``labels`` (name -> uint8 array
    #: on the same grid and in the same space as ``labels``), e.g. a network's
    #: separate views; the segment step saves them as candidates of the
    #: segmentation QC's discord alarms (``pipelines/qc_steps.py``).
    candidates: dict[str, np.ndarray] = field(default_factory=dict)

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

    input_order: Sequence[str] = ROLES

    @property
    def required_roles(self) -> tuple[str, ...]:
        return tuple(self.input_order)

    @required_roles.setter
    def required_roles(self, value: tuple[str, ...]) -> None:
        raise AttributeError("a ChannelInputBackend's required_roles follow its input_order; set input_order")

    @property
    def optional_roles(self) -> tuple[str, ...]:
        return ()

    @optional_roles.setter
    def optional_roles(self, value: tuple[str, ...]) -> None:
        raise AttributeError("a ChannelInputBackend has no optional roles")


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


# --------------------------------------------------------------------------
# Registry of segmentation backends
# --------------------------------------------------------------------------

#: Segmentation backends by type name. A backend registers its class with
#: ``@segmentation_backend("name", *aliases)``; ``load_backend`` (registry.py)
#: builds it as ``cls(**options)``, or ``cls(path, **options)`` when the
#: constructor's first parameter is ``path``. ``path_option="weights"`` passes
#: a spec's ``path`` as that keyword instead; ``path_option=None`` ignores it.
#: Third-party backends: entry points in the group
#: "brainline.segmentation_backends" (name = "package.module:Class").
SEGMENTATION_BACKENDS: Registry[type[SegmentationBackend]] = Registry(
    "segmentation backend", error=SegmentationError,
    entry_point_group="brainline.segmentation_backends")
segmentation_backend = SEGMENTATION_BACKENDS.register

# Built-in backends, imported on first use (none imports a model framework
# before it is asked for). Order = order in messages.
SEGMENTATION_BACKENDS.register_module("baseline", f"{__package__}.baseline")
SEGMENTATION_BACKENDS.register_module("monai_bundle", f"{__package__}.monai_bundle", "bundle", "monai")
SEGMENTATION_BACKENDS.register_module("onnx", f"{__package__}.onnx_backend")
SEGMENTATION_BACKENDS.register_module("auto", f"{__package__}.wang_backend")
SEGMENTATION_BACKENDS.register_module("brats17-wang", f"{__package__}.wang_backend")

BUNDLE_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")

# --------------------------------------------------------------------------
# Helpers shared by the backends
# --------------------------------------------------------------------------

_ROLE_ALIASES = {
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1-gd": "t1c", "t1_gd": "t1c",
    "t1+c": "t1c", "t1post": "t1c", "t1-ce": "t1c", "t1wce": "t1c", "t1c+": "t1c",
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1-native": "t1", "t1native": "t1",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2-flair": "flair", "t2flair": "flair",
    "t2_flair": "flair",
}

# region channel names -> canonical
_REGION_ALIASES = {
    "tc": "TC", "tumor core": "TC", "tumour core": "TC", "tumorcore": "TC",
    "wt": "WT", "whole tumor": "WT", "whole tumour": "WT", "wholetumor": "WT",
    "et": "ET", "enhancing tumor": "ET", "enhancing tumour": "ET", "enhancing": "ET",
    "ncr": "NCR", "necrosis": "NCR", "necrotic": "NCR", "ncr/net": "NCR", "net": "NCR",
    "ed": "ED", "edema": "ED", "oedema": "ED", "peritumoral edema": "ED", "snfh": "ED",
    "bg": "BG", "background": "BG", "none": "BG", "-": "BG", "": "BG",
}
# painting order: later regions override earlier ones
_REGION_PAINT = (("WT", ED), ("ED", ED), ("TC", NCR), ("NCR", NCR), ("ET", ET))

DEFAULT_INPUT_ORDER = ("t1c", "t1", "t2", "flair")
DEFAULT_REGIONS = ("TC", "WT", "ET")
# BraTS 2023 labels, plus the 2017-2020 ET label 4
DEFAULT_LABEL_MAP = {0: 0, 1: NCR, 2: ED, 3: ET, 4: ET}


def role_name(name) -> str | None:
    """Canonical role ('t1', 't1c', 't2', 'flair') for a sequence name, or None."""
    key = str(name).strip().lower().replace(" ", "")
    if key in ROLES:
        return key
    return _ROLE_ALIASES.get(key)


def normalize_input_order(order: Iterable, what: str) -> list[str]:
    if isinstance(order, str) or order is None:
        raise SegmentationError(f"{what}: input_order must be a list of roles, got {order!r}")
    out = []
    for r in order:
        role = role_name(r)
        if role is None:
            raise SegmentationError(
                f"{what}: unknown input role {r!r}; known roles: {', '.join(ROLES)}")
        out.append(role)
    if not out:
        raise SegmentationError(f"{what}: input_order is empty")
    return out


def region_name(name) -> str | None:
    if name is None:
        return "BG"
    key = str(name).strip().lower().replace("_", " ")
    if key.upper() in ("TC", "WT", "ET", "NCR", "ED", "BG"):
        return key.upper()
    return _REGION_ALIASES.get(key)


def normalize_regions(names: Iterable, what: str) -> list[str]:
    out = []
    for n in names:
        r = region_name(n)
        if r is None:
            raise SegmentationError(
                f"{what}: unknown output channel name {n!r}; use TC, WT, ET, NCR, ED or BG")
        out.append(r)
    return out


def normalize_label_map(mapping: Mapping | None, what: str, base: Mapping | None = None) -> dict[int, int]:
    """{source value: BraTS 2023 label}; entries update ``base`` (identity 0..3 by default)."""
    out = dict(base if base is not None else {0: 0, 1: NCR, 2: ED, 3: ET})
    for k, v in (mapping or {}).items():
        try:
            k_i, v_i = int(k), int(v)
        except (TypeError, ValueError):
            raise SegmentationError(f"{what}: label mapping entries must be integers, got {k!r}: {v!r}") from None
        if v_i not in (0, NCR, ED, ET):
            raise SegmentationError(
                f"{what}: label {k_i} maps to {v_i}, which is not a BraTS 2023 label (0, 1, 2, 3)")
        out[k_i] = v_i
    return out


def regions_to_labels(channels: np.ndarray, names: list[str], threshold: float = 0.5) -> np.ndarray:
    """(C, ...) per-region scores -> uint8 BraTS 2023 labels: ET where ET;
    NCR where TC and not ET; ED where WT and not TC (also NCR/ED channels)."""
    if channels.shape[0] != len(names):
        raise SegmentationError(
            f"the model produced {channels.shape[0]} output channels but the channel map "
            f"names {len(names)} ({', '.join(names)})")
    labels = np.zeros(channels.shape[1:], np.uint8)
    for region, label in _REGION_PAINT:
        for i, n in enumerate(names):
            if n == region:
                labels[channels[i] > threshold] = label
    return labels


def map_label_values(values: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Integer label map (any source convention) -> uint8 BraTS 2023 labels."""
    v = np.rint(np.asarray(values)).astype(np.int64)
    present = np.unique(v)
    unknown = [int(x) for x in present if int(x) not in mapping]
    if unknown:
        raise SegmentationError(
            f"the model produced label value(s) {unknown} that the label mapping "
            f"{dict(sorted(mapping.items()))} does not cover")
    out = np.zeros(v.shape, np.uint8)
    for src in present:
        out[v == src] = mapping[int(src)]
    return out


def check_inputs(inputs: SegmentationInput, roles: Sequence[str], what: str) -> sitk.Image:
    """Every needed role present and on the reference grid; returns the reference."""
    missing = [r for r in roles if r not in inputs.paths]
    if missing:
        have = ", ".join(sorted(inputs.paths)) or "none"
        raise SegmentationError(
            f"{what} needs {', '.join(roles)}; missing {', '.join(missing)} (available: {have})")
    try:
        ref = inputs.reference
    except RuntimeError as exc:
        raise SegmentationError(f"cannot read the brain mask {inputs.brain_mask_path}: {exc}") from exc
    for r in roles:
        path = Path(inputs.paths[r])
        if not path.is_file():
            raise SegmentationError(f"{what}: the {r} image {path} does not exist")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise SegmentationError(f"{what}: cannot read the {r} image {path}: {exc}") from exc
        if reader.GetDimension() != 3 or tuple(reader.GetSize()) != tuple(ref.GetSize()):
            raise SegmentationError(
                f"{what}: shape mismatch: the {r} image is {tuple(reader.GetSize())} voxels "
                f"(x, y, z) but the reference grid is {tuple(ref.GetSize())}")
        if (not np.allclose(reader.GetSpacing(), ref.GetSpacing(), atol=1e-3)
                or not np.allclose(reader.GetOrigin(), ref.GetOrigin(), atol=1e-2)
                or not np.allclose(reader.GetDirection(), ref.GetDirection(), atol=1e-4)):
            raise SegmentationError(
                f"{what}: the {r} image has the right size but not the reference geometry "
                f"(spacing/origin/direction differ); inputs must be resampled to the reference grid")
    return ref


def reference_affine_ras(ref: sitk.Image) -> np.ndarray:
    """4x4 voxel (x, y, z index) -> RAS mm affine of a SimpleITK image (as nibabel/MONAI see it)."""
    d = np.asarray(ref.GetDirection(), float).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d @ np.diag(ref.GetSpacing())
    a[:3, 3] = ref.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


def image_from_ras_affine(array_xyz: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image from an (x, y, z)-indexed array and a RAS affine."""
    a = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, float)
    m = a[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise SegmentationError("the model output has a degenerate affine")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(x) for x in (m / spacing).ravel()])
    img.SetOrigin([float(x) for x in a[:3, 3]])
    return img
