"""Choosing a segmentation backend from configuration, plus the small helpers
that every model backend shares (input checks, role names, turning model
outputs into BraTS 2023 labels).

``load_backend(spec)`` accepts:

* ``None`` or ``"baseline"``: the built-in :class:`BaselineSegmenter`;
* ``"auto"``: :class:`AutoSegmenter`, the shipped trained model (Wang et al.,
  BraTS 2017) when a study has T1, T1c, T2 and FLAIR, the baseline otherwise;
* ``"brats17-wang"``: :class:`WangCascadeBackend` (needs all four sequences);
* ``{"type": "monai_bundle", "path": "/models/brats_mri_segmentation", ...}``:
  a MONAI bundle folder (other keys are constructor options of
  :class:`MonaiBundleBackend`);
* ``{"type": "onnx", "path": "/models/my_net", ...}``: a folder with
  ``model.onnx`` + ``model.yaml`` (:class:`OnnxBackend`);
* a folder path (``str`` or ``Path``), or a dict with ``path`` and no
  ``type``: auto-detected (``configs/inference.{json,yaml,yml}`` -> bundle,
  ``model.onnx`` -> onnx).

This module imports no model framework at import time; backends are imported
when asked for.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import SimpleITK as sitk

from .base import ED, ET, NCR, ROLES, InputRoles, SegmentationBackend, SegmentationError, SegmentationInput

SUPPORTED_TYPES = ("baseline", "auto", "brats17-wang", "monai_bundle", "onnx")
BUNDLE_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


# --------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------

def detect_type(path: str | Path) -> str:
    """'monai_bundle' or 'onnx' for a model folder, else SegmentationError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SegmentationError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix == ".onnx":
            return "onnx"
        raise SegmentationError(
            f"model path {p} is a file; give the model folder (a MONAI bundle with "
            f"configs/inference.json, or a folder with model.onnx + model.yaml)")
    if any((p / "configs" / n).is_file() for n in BUNDLE_CONFIG_NAMES):
        return "monai_bundle"
    if (p / "model.onnx").is_file():
        return "onnx"
    raise SegmentationError(
        f"cannot tell what kind of model {p} holds: expected configs/inference.json "
        f"(or .yaml) for a MONAI bundle, or model.onnx for an ONNX model")


def _construct(cls, kind: str, path, options: dict):
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [n for n in params if n not in ("self", "path")]
    unknown = sorted(k for k in options if k not in params)
    if unknown and not takes_kwargs:
        raise SegmentationError(
            f"unknown option(s) for a {kind} model: {', '.join(unknown)}; "
            f"supported: {', '.join(allowed) or 'none'}")
    return cls(path, **options) if path is not None else cls(**options)


def load_backend(spec: dict | str | Path | None = None) -> SegmentationBackend:
    """Build the segmentation backend that ``spec`` describes (see module doc)."""
    if spec is None:
        spec = {"type": "baseline"}
    elif isinstance(spec, Path):
        spec = {"path": spec}
    elif isinstance(spec, str):
        s = spec.strip()
        if s.lower() in SUPPORTED_TYPES:
            spec = {"type": s.lower()}
        elif s == "":
            spec = {"type": "baseline"}
        else:
            spec = {"path": s}
    elif not isinstance(spec, Mapping):
        raise SegmentationError(
            f"model specification must be a mapping, a folder path or a type name, not "
            f"{type(spec).__name__}; supported types: {', '.join(SUPPORTED_TYPES)}")

    options = dict(spec)
    kind = options.pop("type", None)
    path = options.pop("path", None)
    if kind is None:
        kind = detect_type(path) if path is not None else "baseline"
    kind = str(kind).strip().lower()
    if kind in ("bundle", "monai"):
        kind = "monai_bundle"

    if kind == "baseline":
        try:
            from .baseline import BaselineSegmenter
        except ImportError as exc:
            raise SegmentationError(f"the baseline segmenter is not available: {exc}") from exc
        if path is not None:
            options["path"] = path
        return _construct(BaselineSegmenter, "baseline", None, options)
    if kind not in SUPPORTED_TYPES:
        raise SegmentationError(
            f"unknown model type {kind!r}; supported types: {', '.join(SUPPORTED_TYPES)}")
    if kind == "auto":
        from .wang_backend import AutoSegmenter
        return _construct(AutoSegmenter, kind, None, options)
    if kind == "brats17-wang":
        from .wang_backend import WangCascadeBackend
        if path is not None:
            options["weights"] = path
        return _construct(WangCascadeBackend, kind, None, options)
    if path is None:
        raise SegmentationError(f"a {kind} model needs a 'path' to its folder")
    if kind == "monai_bundle":
        from .monai_bundle import MonaiBundleBackend
        return _construct(MonaiBundleBackend, kind, path, options)
    from .onnx_backend import OnnxBackend
    return _construct(OnnxBackend, kind, path, options)


def input_roles(backend: SegmentationBackend) -> InputRoles:
    """The roles ``backend`` needs and can use, from its ``required_roles`` /
    ``optional_roles`` declaration (see :class:`SegmentationBackend`)."""
    declared = list(backend.required_roles) + list(backend.optional_roles)
    unknown = sorted({r for r in declared if r not in ROLES})
    if unknown:
        raise SegmentationError(f"the {backend.name} backend declares unknown input roles "
                                f"{', '.join(unknown)}; known roles: {', '.join(ROLES)}")
    required = tuple(r for r in ROLES if r in backend.required_roles)
    return InputRoles(required, tuple(r for r in ROLES if r in backend.optional_roles and r not in required))


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
            raise SegmentationError(f"{what}: label mapping entries must be integers, got {k!r}: {v!r}")
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


def check_inputs(inputs: SegmentationInput, roles: list[str], what: str) -> sitk.Image:
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
