"""Choosing a segmentation backend from configuration.

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

Other type names are those of :data:`SEGMENTATION_BACKENDS` (``models/base.py``),
including third-party backends registered as entry points in the group
"brainline.segmentation_backends".

This module imports no model framework at import time; backends are imported
when asked for. The helpers shared by the backends live in ``models/base.py``
and are re-exported here for compatibility.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Mapping

from .base import (  # noqa: F401  (helpers re-exported for compatibility)
    BUNDLE_CONFIG_NAMES,
    DEFAULT_INPUT_ORDER,
    DEFAULT_LABEL_MAP,
    DEFAULT_REGIONS,
    ROLES,
    SEGMENTATION_BACKENDS,
    InputRoles,
    SegmentationBackend,
    SegmentationError,
    check_inputs,
    image_from_ras_affine,
    map_label_values,
    normalize_input_order,
    normalize_label_map,
    normalize_regions,
    reference_affine_ras,
    region_name,
    regions_to_labels,
    role_name,
)

#: The built-in backend types (``SEGMENTATION_BACKENDS.names()`` also lists
#: third-party ones).
SUPPORTED_TYPES = ("baseline", "monai_bundle", "onnx", "auto", "brats17-wang")


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
    params = inspect.signature(cls.__init__ if inspect.isclass(cls) else cls).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [n for n in params if n not in ("self", "path")]
    unknown = sorted(k for k in options if k not in params)
    if unknown and not takes_kwargs:
        raise SegmentationError(
            f"unknown option(s) for a {kind} model: {', '.join(unknown)}; "
            f"supported: {', '.join(allowed) or 'none'}")
    return cls(path, **options) if path is not None else cls(**options)


def _takes_path(factory) -> bool:
    """True when the factory's first parameter (after self) is ``path``."""
    params = [p for n, p in inspect.signature(factory.__init__ if inspect.isclass(factory) else factory)
              .parameters.items() if n != "self"]
    return bool(params) and params[0].name == "path" and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _supported() -> str:
    return ", ".join(SEGMENTATION_BACKENDS.names())


def load_backend(spec: dict | str | Path | None = None) -> SegmentationBackend:
    """Build the segmentation backend that ``spec`` describes (see module doc)."""
    if spec is None:
        spec = {"type": "baseline"}
    elif isinstance(spec, Path):
        spec = {"path": spec}
    elif isinstance(spec, str):
        s = spec.strip()
        if s == "":
            spec = {"type": "baseline"}
        elif s.lower() in SUPPORTED_TYPES or SEGMENTATION_BACKENDS.canonical(s) == s.lower():
            spec = {"type": s.lower()}
        else:
            spec = {"path": s}
    elif not isinstance(spec, Mapping):
        raise SegmentationError(
            f"model specification must be a mapping, a folder path or a type name, not "
            f"{type(spec).__name__}; supported types: {_supported()}")

    options = dict(spec)
    kind = options.pop("type", None)
    path = options.pop("path", None)
    if kind is None and isinstance(path, str) and not Path(path).expanduser().exists() \
            and SEGMENTATION_BACKENDS.canonical(path) == path.strip().lower():
        # a type name where a folder was expected (BRAINLINE_MODEL=<plugin name>)
        kind, path = path, None
    if kind is None:
        kind = detect_type(path) if path is not None else "baseline"
    kind = SEGMENTATION_BACKENDS.canonical(kind) or str(kind).strip().lower()
    if kind not in SEGMENTATION_BACKENDS:
        raise SegmentationError(f"unknown model type {kind!r}; supported types: {_supported()}")
    try:
        factory = SEGMENTATION_BACKENDS.get(kind)
    except ImportError as exc:
        what = "segmenter" if kind == "baseline" else "backend"
        raise SegmentationError(f"the {kind} {what} is not available: {exc}") from exc
    info = SEGMENTATION_BACKENDS.info(kind)

    if _takes_path(factory):
        if path is None:
            raise SegmentationError(f"a {kind} model needs a 'path' to its folder")
        return _construct(factory, kind, path, options)
    path_option = info.get("path_option", "path")
    if path is not None and path_option is not None:
        options[path_option] = path
    return _construct(factory, kind, None, options)


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
