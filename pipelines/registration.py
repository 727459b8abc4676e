"""Co-registration of MR series with SimpleITK (ITKv4 registration framework).

Frames and units
----------------
* All coordinates are ITK/DICOM **LPS physical space** in **millimetres**;
  angles are reported in **degrees** (SimpleITK itself works in radians).
* :func:`register` estimates a transform ``T`` that maps a point ``x`` of the
  *fixed* image's physical space to the corresponding point ``T(x)`` of the
  *moving* image's physical space (fixed -> moving, the ITK convention). That
  is exactly what :func:`resample_to` needs to pull the moving image onto the
  fixed grid: ``out(x) = moving(T(x))`` for every voxel centre ``x`` of the
  reference grid.

Method
------
Mattes mutual information (multi-modal: FLAIR/T2/T1 to T1c), random sampling
with a fixed seed (deterministic on a given machine and thread count), a
three-level pyramid (shrink 4, 2, 1 of the fixed grid; Gaussian smoothing
sigmas 2, 1, 0 mm), gradient descent with parameter scales from physical
shift, moments-based initialisation (``CenteredTransformInitializer`` with
MOMENTS) and linear interpolation. Both images are cast to float32 and cropped
to their foreground bounding box (plus a margin) first, which does not change
physical space but saves time.

Works on clinical acquisitions: each image keeps its own grid (matrix size,
spacing, FOV, oblique direction cosines); thick 2D slices are fine as moving
or fixed images (the pyramid shrinks each axis of the sampled grid relative
to its finest spacing, so 5 mm slices are not thinned further while 1 mm
in-plane voxels are shrunk 4x and 2x). Metric samples are drawn on the fixed
grid; when the fixed voxels are much larger than the moving ones the
registration runs the other way round and the inverse is returned
(``swap_if_fixed_coarser``), so the result is always fixed -> moving.

Quality
-------
:func:`registration_quality` judges any fixed->moving transform (``register``
calls it on its result; a benchmark can inject wrong ones). Everything is
measured on the **common region**: the part of the fixed field of view whose
image under the transform lies inside the moving field of view (physical
extent of the two grids, not their foregrounds), on a grid of about
``qc_spacing_mm`` (2.5 mm) aligned with the fixed image, both images
block-averaged to that resolution. Series that cover different parts of the
head (vertex cut, short slab, small FOV) are compared only where both have
data. Figures: ``coverage`` (share of the fixed head/brain foreground in the
common region), ``foreground_dice`` (Dice of the two foregrounds inside the
common region; masks by threshold, holes filled per slice and in 3D, so a
scalp ring encloses the skull), ``nmi`` (normalised mutual information
(H(F)+H(M))/H(F,M) on the common region within the dilated union of the
foregrounds) and ``similarity_gain``: the transform is perturbed by
``qc_shift_mm`` (3 mm) along and ``qc_rotation_deg`` (3 deg) about each LPS
axis (through the brain centre) and the NMI recomputed on the same samples.
A correct registration sits at a similarity optimum (every perturbation
loses); a transform 5 mm or 5 deg off gains when moved towards the truth.
``misregistration`` is flagged when the best gain exceeds
``max_similarity_gain``, with the move that improves it in words.

No network, no database; pure image processing.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .jsonable import jsonable

__all__ = [
    "RegistrationConfig",
    "RegistrationError",
    "RegistrationResult",
    "foreground_mask",
    "register",
    "registration_quality",
    "resample_to",
    "transform_parameters",
]

TRANSFORMS = ("rigid", "affine", "rigid+affine")
INITIALIZERS = ("moments", "geometry", "identity")
_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


class RegistrationError(RuntimeError):
    """Registration failed or is impossible; the message names both sequences
    and the reason in words (e.g. "registration of FLAIR to T1c did not
    converge (final metric -0.12 after 600 iterations: ...)")."""


@dataclass
class RegistrationConfig:
    """Registration settings. Distances in mm, angles in degrees.

    transform: "rigid" (6 dof, default), "affine" (12 dof) or "rigid+affine"
        (rigid first, then an affine stage initialised from the rigid result).
    histogram_bins: Mattes mutual information joint-histogram bins.
    sampling_percentage: fraction of the (masked, cropped) fixed voxels used
        as metric samples at each pyramid level, clipped per level to
        [min_samples, max_samples] samples. Samples are drawn with ``seed``.
    shrink_factors / smoothing_sigmas_mm: the pyramid (fixed-grid shrink
        factor per level; Gaussian sigma in mm per level).
    Optimiser: regular-step gradient descent with parameter scales from
        physical shift. At level l the step starts at ``learning_rate *
        shrink_l / shrink_0`` and is multiplied by ``relaxation_factor`` at
        every change of direction; the level stops (converged) when the step
        falls below ``min_step * shrink_l`` or the gradient below
        ``gradient_tolerance``, else after ``max_iterations``. Steps are in the
        optimiser's scaled units: measured on brain MRI, a step of 2.0 moves
        voxels by about 1 mm, so the default final precision is ~0.005 mm.
    max_iterations: iteration limit per pyramid level.
    initializer: "moments" (align centres of intensity mass), "geometry"
        (align image centres) or "identity" (trust the scanner coordinates).
    try_identity: also evaluate the metric at the identity transform and start
        from it when it is better than the initializer's transform (series of
        one session share the scanner frame, so identity is often better
        than moments when the fields of view differ).
    raise_if_not_converged: raise :class:`RegistrationError` when the last
        pyramid level stops on the iteration limit; otherwise only flag it.
    crop_margin_mm: margin kept around each image's foreground bounding box.
    swap_if_fixed_coarser: when a fixed voxel is more than twice the volume
        of a moving voxel, optimise moving->fixed (samples drawn on the finer
        grid) and return the inverse; the metric values then refer to that
        direction (``RegistrationResult.swapped``).
    Plausibility thresholds (results beyond them are flagged, not raised):
        min_foreground_dice, max_rotation_deg, max_translation_mm,
        affine_scale_range, min_coverage, metric_tolerance (the final metric
        may be at most this much worse than the better start; not zero, as
        Mattes MI peaks artificially at identity for series on the same grid,
        where no interpolation blurs the moving image). min_foreground_dice
        and min_coverage apply to the common field of view (see
        :func:`registration_quality`); a Dice below min_foreground_dice is
        not flagged when at least min_foreground_inside of the moving
        foreground lies inside the fixed one and covers min_coverage of it
        (moving data in part of its field of view only).
    QC (:func:`registration_quality`): qc_spacing_mm (sample grid), qc_shift_mm
        and qc_rotation_deg (the perturbations), qc_bins (NMI histogram bins),
        qc_margin_mm (dilation of the foregrounds for the NMI samples),
        qc_max_samples, max_similarity_gain (NMI gain of the best perturbation
        above which ``misregistration`` is flagged; calibrated on
        ``bench/registration_qc.py``: correct registrations <= -0.009, 5 mm /
        5 deg errors >= +0.007).
    """

    transform: str = "rigid"
    histogram_bins: int = 50
    sampling_percentage: float = 0.1
    min_samples: int = 20_000
    max_samples: int = 60_000
    seed: int = 20240611
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    max_iterations: int = 200
    learning_rate: float = 2.0
    min_step: float = 0.01
    relaxation_factor: float = 0.5
    gradient_tolerance: float = 1e-8
    initializer: str = "moments"
    try_identity: bool = True
    raise_if_not_converged: bool = True
    crop_margin_mm: float = 15.0
    swap_if_fixed_coarser: bool = True
    min_foreground_dice: float = 0.8
    max_rotation_deg: float = 30.0
    max_translation_mm: float = 60.0
    affine_scale_range: tuple[float, float] = (0.8, 1.25)
    min_coverage: float = 0.5
    min_foreground_inside: float = 0.9
    metric_tolerance: float = 0.02
    qc_spacing_mm: float = 2.5
    qc_shift_mm: float = 3.0
    qc_rotation_deg: float = 3.0
    qc_bins: int = 32
    qc_margin_mm: float = 5.0
    qc_max_samples: int = 60_000
    max_similarity_gain: float = 0.003

    def validate(self) -> None:
        """Raise ValueError for inconsistent settings."""
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, not {self.transform!r}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"initializer must be one of {INITIALIZERS}, not {self.initializer!r}")
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm) or not self.shrink_factors:
            raise ValueError("shrink_factors and smoothing_sigmas_mm need the same, non-zero length")
        if any(int(f) < 1 for f in self.shrink_factors):
            raise ValueError("shrink factors must be >= 1")
        if not 0.0 < self.sampling_percentage <= 1.0:
            raise ValueError("sampling_percentage must be in (0, 1]")
        if self.max_iterations < 1 or self.histogram_bins < 4:
            raise ValueError("max_iterations must be >= 1 and histogram_bins >= 4")


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`.

    transform: maps fixed physical points (LPS, mm) to moving physical points.
    final_metric: Mattes MI of the last optimiser iteration (negative; lower
        is better).
    initial_metric / identity_metric / final_metric_eval: the metric evaluated
        with one fixed sample set at full resolution for the start transform,
        the identity and the result (comparable with each other).
    iterations: optimiser iterations summed over levels (and stages).
    stop_reason: the optimiser's own stop description (last level).
    parameters: see :func:`transform_parameters` (degrees, mm).
    quality: see :func:`registration_quality` (coverage, foreground_dice,
        nmi, similarity_gain, best_perturbation, ...) plus metric_improvement.
    flags: human-readable reasons the result looks implausible ("code: ...").
    """

    transform: sitk.Transform
    transform_type: str
    final_metric: float
    iterations: int
    stop_reason: str
    converged: bool
    parameters: dict[str, Any]
    quality: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    initial_metric: float = float("nan")
    identity_metric: float = float("nan")
    final_metric_eval: float = float("nan")
    initializer_used: str = ""
    swapped: bool = False
    iterations_per_level: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0
    moving_name: str = "FLAIR"
    fixed_name: str = "T1c"
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no images; the transform as parameters)."""
        return jsonable({
            "moving_name": self.moving_name,
            "fixed_name": self.fixed_name,
            "transform_type": self.transform_type,
            "direction": "fixed->moving (LPS, mm)",
            "final_metric": self.final_metric,
            "initial_metric": self.initial_metric,
            "identity_metric": self.identity_metric,
            "final_metric_eval": self.final_metric_eval,
            "initializer_used": self.initializer_used,
            "swapped": self.swapped,
            "iterations": self.iterations,
            "iterations_per_level": self.iterations_per_level,
            "stop_reason": self.stop_reason,
            "converged": self.converged,
            "parameters": self.parameters,
            "quality": self.quality,
            "flags": list(self.flags),
            "elapsed_s": self.elapsed_s,
            "config": self.config,
        })


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _check_image(image: sitk.Image, name: str, what: str) -> sitk.Image:
    """float32 copy of ``image`` or RegistrationError naming the sequence."""
    if not isinstance(image, sitk.Image):
        raise RegistrationError(f"{what} failed: the {name} input is not an image ({type(image).__name__})")
    if image.GetDimension() != 3:
        raise RegistrationError(f"{what} failed: the {name} image is {image.GetDimension()}D, a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise RegistrationError(
            f"{what} failed: the {name} image has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(colour or vector image), a scalar MR volume is needed")
    if min(image.GetSize()) < 2 or image.GetNumberOfPixels() < 1000:
        dims = "x".join(map(str, image.GetSize()))
        raise RegistrationError(f"{what} failed: the {name} image is too small ({dims} voxels)")
    img = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(arr).all():
        raise RegistrationError(f"{what} failed: the {name} image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise RegistrationError(
            f"{what} is impossible: the {name} image is empty/constant (every voxel is {lo:g})")
    return img


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (mt - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between[~np.isfinite(between)] = -1.0
    return float(centres[int(np.argmax(between))])


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """Head/brain foreground (uint8 0/1 on the image grid).

    If a single background value (0 or the image minimum) fills more than 10 %
    of the voxels (skull-stripped or zero-padded data), the foreground is every
    other voxel; otherwise Otsu's threshold on intensities clipped to the
    0.5-99.5 percentiles. Then the largest connected component, holes filled.
    """
    img = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    n = arr.size
    mn = float(arr.min())
    fg = None
    for bg in (0.0, mn):
        if np.count_nonzero(arr == bg) > 0.1 * n:
            fg = arr != bg
            break
    if fg is None:
        sub = arr.ravel()[:: max(1, n // 500_000)]
        lo, hi = np.percentile(sub, [0.5, 99.5])
        thr = _otsu_threshold(np.clip(sub, lo, hi))
        fg = arr > thr
    mask = sitk.GetImageFromArray(fg.astype(np.uint8))
    mask.CopyInformation(img)
    if not fg.any():
        return mask
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    mask = sitk.Cast(cc == 1, sitk.sitkUInt8)
    mask = sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)
    return mask


def _bbox_crop(image: sitk.Image, mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """Crop ``image`` to the bounding box of ``mask`` (same grid) plus a margin."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        return image
    bb = stats.GetBoundingBox(1)  # (x, y, z, sx, sy, sz) in index space
    size = image.GetSize()
    start, extent = [], []
    for d in range(3):
        m = int(math.ceil(margin_mm / image.GetSpacing()[d]))
        lo = max(0, bb[d] - m)
        hi = min(size[d], bb[d] + bb[d + 3] + m)
        start.append(lo)
        extent.append(hi - lo)
    if tuple(extent) == tuple(size):
        return image
    return sitk.RegionOfInterest(image, extent, start)


def _voxel_volume(image: sitk.Image) -> float:
    sp = image.GetSpacing()
    return float(sp[0] * sp[1] * sp[2])


def _mask_centroid(mask: sitk.Image) -> tuple[float, float, float]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if stats.HasLabel(1):
        return tuple(stats.GetCentroid(1))
    size = mask.GetSize()
    return tuple(mask.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in size]))


def _affine_parts(tx: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with T(x) = A @ x + b, for any linear (rigid/affine) transform."""
    o = np.asarray(tx.TransformPoint((0.0, 0.0, 0.0)))
    A = np.column_stack([np.asarray(tx.TransformPoint(tuple(e))) - o for e in np.eye(3)])
    return A, o


def _polar_rotation(A: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(A)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


def _rotation_angle_deg(r: np.ndarray) -> float:
    c = (np.trace(r) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _euler_from(tx: sitk.Transform, center: Sequence[float]) -> sitk.Euler3DTransform:
    """Closest rigid (Euler3D, centred at ``center``) to a linear transform."""
    A, _ = _affine_parts(tx)
    r = _polar_rotation(A)
    c = np.asarray(center, dtype=float)
    e = sitk.Euler3DTransform()
    e.SetCenter(tuple(c))
    e.SetMatrix(tuple(r.ravel()), 1e-5)
    e.SetTranslation(tuple(np.asarray(tx.TransformPoint(tuple(c))) - c))
    return e


def _affine_from(tx: sitk.Transform, center: Sequence[float]) -> sitk.AffineTransform:
    A, _ = _affine_parts(tx)
    c = np.asarray(center, dtype=float)
    a = sitk.AffineTransform(3)
    a.SetCenter(tuple(c))
    a.SetMatrix(tuple(A.ravel()))
    a.SetTranslation(tuple(np.asarray(tx.TransformPoint(tuple(c))) - c))
    return a


def transform_parameters(tx: sitk.Transform, center: Sequence[float] | None = None) -> dict[str, Any]:
    """Readable parameters of a rigid/affine fixed->moving transform.

    center: point (LPS mm) at which the displacement is reported; defaults to
    the transform's own centre. Returns matrix (3x3), rotation_deg (total
    rotation angle of the rotation part, degrees), euler_xyz_deg (rotation
    about the x, y, z axes, ITK Euler3D convention, degrees; rotation part for
    affines), translation_mm (displacement ``T(c) - c`` at ``center``, LPS mm),
    translation_norm_mm, scales (singular values of the matrix; 1 for rigid).
    """
    tx = tx.Downcast() if hasattr(tx, "Downcast") else tx
    if center is None:
        center = tx.GetCenter() if hasattr(tx, "GetCenter") else (0.0, 0.0, 0.0)
    c = np.asarray(center, dtype=float)
    A, _ = _affine_parts(tx)
    r = _polar_rotation(A)
    e = sitk.Euler3DTransform()
    e.SetMatrix(tuple(r.ravel()), 1e-4)
    t = np.asarray(tx.TransformPoint(tuple(c))) - c
    return {
        "center_mm": [float(v) for v in c],
        "matrix": A.round(8).tolist(),
        "rotation_deg": round(_rotation_angle_deg(r), 4),
        "euler_xyz_deg": [round(math.degrees(v), 4) for v in (e.GetAngleX(), e.GetAngleY(), e.GetAngleZ())],
        "translation_mm": [round(float(v), 4) for v in t],
        "translation_norm_mm": round(float(np.linalg.norm(t)), 4),
        "scales": [round(float(s), 6) for s in np.linalg.svd(A, compute_uv=False)],
    }


def resample_to(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                interpolator: str = "linear", default_value: float = 0.0) -> sitk.Image:
    """Resample ``moving`` onto the grid (size, spacing, origin, direction) of
    ``reference``: ``out(x) = moving(transform(x))`` for each reference voxel
    centre ``x`` (LPS mm), i.e. ``transform`` maps reference/fixed physical
    points to moving physical points, as returned by :func:`register`.

    interpolator: "linear" or "bspline" (output float32) or "nearest" (keeps
    the moving pixel type; use it for label maps). Voxels mapping outside the
    moving image get ``default_value``.
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {tuple(_INTERPOLATORS)}, not {interpolator!r}")
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    if interpolator == "nearest":
        src, out_type = moving, moving.GetPixelID()
    else:
        src, out_type = sitk.Cast(moving, sitk.sitkFloat32), sitk.sitkFloat32
    return sitk.Resample(src, reference, tx, _INTERPOLATORS[interpolator], float(default_value), out_type)


# ---------------------------------------------------------------------------
# quality control on the common field of view
# ---------------------------------------------------------------------------


_AXES = ("L-R (x)", "A-P (y)", "S-I (z)")


class _Volume:
    """An image prepared for QC: block-averaged to about ``target_mm`` per
    axis (never finer than the image) as a float32 numpy array (z, y, x),
    with its index <-> physical (LPS mm) mapping and the physical extent of
    the original image (its field of view)."""

    def __init__(self, image: sitk.Image, target_mm: float, rounding: float = 1e-6):
        sp = np.asarray(image.GetSpacing(), float)
        size = np.asarray(image.GetSize(), int)
        k = np.maximum(1, np.floor(target_mm / sp + rounding)).astype(int)
        k = np.minimum(k, np.maximum(1, size // 2))
        arr = sitk.GetArrayViewFromImage(image)  # (z, y, x)
        kz, ky, kx = int(k[2]), int(k[1]), int(k[0])
        nz, ny, nx = arr.shape[0] // kz * kz, arr.shape[1] // ky * ky, arr.shape[2] // kx * kx
        if (kz, ky, kx) != (1, 1, 1):
            arr = arr[:nz, :ny, :nx].astype(np.float32).reshape(
                nz // kz, kz, ny // ky, ky, nx // kx, kx).mean(axis=(1, 3, 5), dtype=np.float32)
        self.arr = np.ascontiguousarray(arr, dtype=np.float32)
        self.direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
        self.spacing = sp * k
        self.origin = np.asarray(image.GetOrigin(), float) + self.direction @ ((k - 1) / 2.0 * sp)
        # physical -> continuous index (x, y, z) of this array, and of the original image
        self.to_index = (np.linalg.inv(self.direction * self.spacing), self.origin)
        self._fov = (np.linalg.inv(self.direction * sp), np.asarray(image.GetOrigin(), float),
                     size.astype(float) - 0.5)

    def crop(self, mask: np.ndarray, margin: int) -> np.ndarray:
        """Crop the array to the bounding box of ``mask`` (same shape) plus
        ``margin`` voxels; returns the cropped mask (the field of view is kept)."""
        nz = np.argwhere(mask)
        lo = np.maximum(0, nz.min(axis=0) - margin)
        hi = np.minimum(mask.shape, nz.max(axis=0) + margin + 1)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        self.arr = np.ascontiguousarray(self.arr[sl])
        self.origin = self.origin + self.direction @ (lo[::-1] * self.spacing)
        self.to_index = (self.to_index[0], self.origin)
        return mask[sl]

    def points(self) -> np.ndarray:
        """Physical points (3 x N, float32) of every voxel centre, C order of ``arr``."""
        z, y, x = np.indices(self.arr.shape, dtype=np.float32).reshape(3, -1)
        return _map(self.direction * self.spacing, self.origin, np.stack([x, y, z]))

    def inside(self, pts: np.ndarray) -> np.ndarray:
        """Which physical points (3 x N) lie inside the image's field of view."""
        inv, org, hi = self._fov
        idx = _map(inv, -inv @ org, pts)
        ok = (idx[0] >= -0.5) & (idx[0] <= hi[0])
        for d in (1, 2):
            ok &= (idx[d] >= -0.5) & (idx[d] <= hi[d])
        return ok

    def sample(self, pts: np.ndarray, arr: np.ndarray | None = None) -> np.ndarray:
        """Trilinear values of ``arr`` (default: the image) at physical points
        (3 x N); edge values outside."""
        inv, org = self.to_index
        idx = _map(inv, -inv @ org, pts)
        return ndimage.map_coordinates(self.arr if arr is None else arr, idx[::-1], order=1, mode="nearest",
                                       prefilter=False)

    def foreground(self) -> np.ndarray:
        """Head/brain mask (bool, same shape): above a constant background
        (zero-filled or skull-stripped images: 5 % of the way to the 99.5th
        percentile) or else Otsu's threshold, holes filled (2D per slice along each axis,
        then 3D), largest connected component."""
        arr = self.arr
        n = arr.size
        fg = None
        for bg in (0.0, float(arr.min())):
            if np.count_nonzero(arr == bg) > 0.1 * n:
                # a constant background (zero-filled, skull-stripped): everything clearly above it,
                # so that a noise floor next to zero-filled parts is not taken for the head
                fg = arr > bg + 0.05 * (float(np.percentile(arr, 99.5)) - bg)
                break
        if fg is None:
            sub = arr.ravel()[:: max(1, n // 500_000)]
            lo, hi = np.percentile(sub, [0.5, 99.5])
            fg = arr > _otsu_threshold(np.clip(sub, lo, hi))
        # holes filled slice by slice along each axis, then in 3D: with skull, the scalp ring of
        # each slice encloses dark bone and CSF even where the slab cuts the head open
        filled = fg.copy()
        for axis in range(3):
            st = np.zeros((3, 3, 3), bool)
            st[tuple(1 if d == axis else slice(None) for d in range(3))] = ndimage.generate_binary_structure(2, 1)
            filled |= ndimage.binary_fill_holes(fg, structure=st)
        lab, n_lab = ndimage.label(filled)
        if n_lab > 1:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            filled = lab == int(np.argmax(sizes))
        return ndimage.binary_fill_holes(filled)


def _map(m: np.ndarray, c: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``m @ pts + c`` for points as columns (3 x N), in float32 without BLAS."""
    m, c = np.asarray(m, np.float64), np.asarray(c, np.float64)
    out = np.empty(pts.shape, np.float32)
    for i in range(3):
        out[i] = pts[0] * np.float32(m[i, 0]) + pts[1] * np.float32(m[i, 1]) + pts[2] * np.float32(m[i, 2]) \
            + np.float32(c[i])
    return out


def _quantise(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.clip(((x - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1)


def _nmi_q(qa: np.ndarray, qb: np.ndarray, bins: int) -> float:
    """NMI of two already quantised samples."""
    p = np.bincount(qa * bins + qb, minlength=bins * bins).astype(np.float64)
    p /= max(1.0, p.sum())
    p = p.reshape(bins, bins)

    def ent(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hj = ent(p.ravel())
    return (ent(p.sum(1)) + ent(p.sum(0))) / hj if hj > 0 else float("nan")


def _perturbations(center: np.ndarray, shift_mm: float, rot_deg: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(words, R, t) of small rigid perturbations p(x) = R (x - c) + c + t of
    the fixed space: +-shift along and +-rotation about each LPS axis through
    ``center``."""
    out = []
    for i, axis in enumerate(_AXES):
        for sign in (1.0, -1.0):
            t = np.zeros(3)
            t[i] = sign * shift_mm
            out.append((f"shifted {sign * shift_mm:+g} mm along {axis}", np.eye(3), t))
    for i, axis in enumerate(_AXES):
        for sign in (1.0, -1.0):
            a = math.radians(sign * rot_deg)
            c, s = math.cos(a), math.sin(a)
            j, k = [m for m in range(3) if m != i]
            r = np.eye(3)
            r[j, j], r[j, k], r[k, j], r[k, k] = c, -s, s, c
            out.append((f"rotated {sign * rot_deg:+g} deg about {axis}", r, center - r @ center))
    return out


def registration_quality(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None,
                         config: RegistrationConfig | None = None, *, fixed_name: str = "T1c",
                         moving_name: str = "FLAIR") -> tuple[dict[str, Any], list[str]]:
    """Quality of a given fixed->moving ``transform`` (LPS mm; None =
    identity), measured on the region both images cover.

    The common region is the part of the fixed field of view whose image
    under ``transform`` lies inside the moving field of view (physical
    extent, not the foregrounds): a moving series that covers less of the
    head (vertex cut, short slab, small FOV) is judged only where it has data.
    Everything runs on a grid of ``config.qc_spacing_mm`` aligned with the
    fixed image; both images are block-averaged to about that resolution
    first.

    Returns ``(quality, flags)``. quality holds:
      * ``coverage``: share of the fixed foreground in the common region;
      * ``foreground_dice``: Dice of the fixed and the moving foreground
        (head or brain masks) inside the common region, with
        ``foreground_inside_fixed`` (share of the moving foreground inside
        the fixed one) and ``fixed_foreground_covered`` (the converse);
      * ``nmi``: normalised mutual information (H(F)+H(M))/H(F,M) on the
        common region within the (dilated) union of the foregrounds;
      * ``similarity_gain``: the largest NMI increase found by perturbing the
        transform by ``qc_shift_mm`` along or ``qc_rotation_deg`` about each
        LPS axis (through the fixed foreground centre), and ``best_perturbation``
        in words. A correct registration sits at a similarity optimum (gain
        <= 0, up to noise); one that is millimetres or degrees off improves
        when moved towards the truth.
    flags (``code: words``): ``misregistration`` when the gain exceeds
    ``max_similarity_gain``, ``low_dice`` below ``min_foreground_dice`` (unless the moving
    foreground lies inside the fixed one: data in part of the field of view),
    ``low_coverage`` below ``min_coverage``, ``no_overlap`` when the images
    hardly share any space.
    """
    cfg = config if config is not None else RegistrationConfig()
    t0 = time.perf_counter()
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    A, b = _affine_parts(tx)
    s = float(cfg.qc_spacing_mm)
    # fixed: the sample grid (about s mm), cropped to its foreground; moving: about 0.8 s mm
    fvol, mvol = _Volume(fixed, s, 0.5), _Volume(moving, 0.8 * s)
    r = max(1, int(round(cfg.qc_margin_mm / s)))
    ffg = fvol.foreground()
    if ffg.any():
        ffg = fvol.crop(ffg, r + 1)
    shape = fvol.arr.shape
    ffg = ffg.ravel()
    pts = fvol.points()
    mfg_arr = mvol.foreground().astype(np.float32)
    mpts = _map(A, b, pts)
    common = mvol.inside(mpts)
    mfg = common & (mvol.sample(mpts, mfg_arr) >= 0.5)
    coverage = float((ffg & common).sum() / max(1, int(ffg.sum())))
    fin = ffg & common
    both = int((fin & mfg).sum())
    denom = int(fin.sum() + mfg.sum())
    dice = float(2.0 * both / denom) if denom else 0.0
    precision = both / max(1, int(mfg.sum()))  # moving foreground inside the fixed one
    recall = both / max(1, int(fin.sum()))  # fixed foreground covered by moving data

    quality: dict[str, Any] = {
        "qc_spacing_mm": [round(float(v), 3) for v in fvol.spacing],
        "coverage": round(coverage, 5),
        "foreground_dice": round(dice, 5),
        "foreground_inside_fixed": round(precision, 5),
        "fixed_foreground_covered": round(recall, 5),
        "nmi": None,
        "similarity_gain": None,
        "best_perturbation": None,
    }
    flags: list[str] = []
    pair = f"{moving_name} to {fixed_name}"

    def done() -> tuple[dict[str, Any], list[str]]:
        quality["elapsed_s"] = round(time.perf_counter() - t0, 3)
        return quality, flags

    if int((fin & mfg).sum()) < 100:
        flags.append(f"no_overlap: {pair}: the {moving_name} and {fixed_name} heads hardly share any space "
                     f"({int((fin & mfg).sum())} common voxels of about {s:g} mm)")
        return done()

    # samples: the common region (under every perturbation) within the dilated union of the foregrounds
    union = ndimage.binary_dilation((ffg | mfg).reshape(shape), iterations=r).ravel()
    cand = np.flatnonzero(union & common)
    if cand.size > cfg.qc_max_samples:
        cand = np.sort(np.random.default_rng(cfg.seed).choice(cand, cfg.qc_max_samples, replace=False))
    p = pts[:, cand]
    centre = pts[:, fin & mfg].mean(axis=1)
    perts = _perturbations(centre, cfg.qc_shift_mm, cfg.qc_rotation_deg)
    mapped = [mpts[:, cand]] + [_map(A @ R, A @ t + b, p) for _, R, t in perts]
    keep = np.ones(p.shape[1], bool)
    for q in mapped[1:]:
        keep &= mvol.inside(q)
    if keep.sum() < 100:
        keep[:] = True
    fvals = fvol.arr.ravel()[cand[keep]]
    mvals = [mvol.sample(q[:, keep]) for q in mapped]
    bins = int(cfg.qc_bins)
    flo, fhi = np.percentile(fvals, [0.5, 99.5])
    mlo, mhi = np.percentile(mvals[0], [0.5, 99.5])
    if fhi <= flo or mhi <= mlo:
        flags.append(f"low_contrast: {pair}: an image is nearly constant in the common region")
        return done()
    qf = _quantise(fvals, flo, fhi, bins)
    values = [_nmi_q(qf, _quantise(v, mlo, mhi, bins), bins) for v in mvals]
    nmi0 = values[0]
    gains = np.asarray(values[1:]) - nmi0
    best = int(np.argmax(gains))
    gain = float(gains[best])
    quality.update({
        "nmi": round(nmi0, 5),
        "similarity_gain": round(gain, 5),
        "best_perturbation": perts[best][0],
        "perturbation_gains": {w: round(float(g), 5) for (w, _, _), g in zip(perts, gains)},
        "qc_samples": int(keep.sum()),
    })
    if gain > cfg.max_similarity_gain:
        flags.append(f"misregistration: {pair}: registration likely off: similarity (NMI {nmi0:.3f}) improves "
                     f"by {gain:.3f} when {perts[best][0]} (limit {cfg.max_similarity_gain:g})")
    # a moving series with data in only part of its field of view (zero-filled slab, truncated
    # volume) lowers the Dice without any misalignment: its foreground then lies inside the fixed
    # one; that is not flagged unless it covers less than min_coverage of the fixed foreground
    partial_data = precision >= cfg.min_foreground_inside and recall >= cfg.min_coverage
    if dice < cfg.min_foreground_dice and not partial_data:
        flags.append(f"low_dice: {pair}: foreground Dice in the common field of view is {dice:.2f} "
                     f"(< {cfg.min_foreground_dice:.2f}; {100 * precision:.0f}% of the {moving_name} "
                     f"foreground lies inside the {fixed_name} foreground, which it covers to {100 * recall:.0f}%)")
    if coverage < cfg.min_coverage:
        flags.append(f"low_coverage: {pair}: the {moving_name} field of view covers only "
                     f"{100 * coverage:.0f}% of the {fixed_name} foreground")
    return done()

# ---------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------


class _Stage:
    """One registration stage (one transform type) over an explicit pyramid.

    Each level is its own ITK ``ImageRegistrationMethod`` run on images that
    were smoothed (Gaussian, sigma in mm) and, for the fixed image, shrunk
    here, so that the shrink factor can differ per axis (thick slices are not
    shrunk further along their slice direction) and the optimiser step can
    shrink with the level.
    """

    def __init__(self, cfg: RegistrationConfig, fixed: sitk.Image, moving: sitk.Image,
                 mask: sitk.Image | None, shrink: Sequence[int], sigmas: Sequence[float],
                 moving_mask: sitk.Image | None = None):
        self.cfg, self.fixed, self.moving, self.mask = cfg, fixed, moving, mask
        self.moving_mask = moving_mask
        self.shrink = [int(s) for s in shrink]
        self.sigmas = [float(s) for s in sigmas]
        self.level_iterations: list[int] = []
        self.level_stops: list[str] = []
        self._eval: tuple[sitk.Image, sitk.Image | None] | None = None

    @staticmethod
    def _factors(image: sitk.Image, f: int) -> list[int]:
        sp = image.GetSpacing()
        finest = min(sp)
        return [int(max(1, min(image.GetSize()[d] // 4 or 1, round(f * finest / sp[d])))) for d in range(3)]

    def _level_images(self, f: int, sigma: float):
        fixed = self.fixed
        if sigma > 0:
            fixed = sitk.SmoothingRecursiveGaussian(fixed, sigma)
        factors = self._factors(fixed, f)
        if any(k > 1 for k in factors):
            fixed = sitk.Shrink(fixed, factors)
        mask = None
        if self.mask is not None:
            mask = sitk.Resample(self.mask, fixed, sitk.Transform(3, sitk.sitkIdentity),
                                 sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        moving = sitk.SmoothingRecursiveGaussian(self.moving, sigma) if sigma > 0 else self.moving
        return fixed, moving, mask

    def _n_samplable(self, fixed: sitk.Image, mask: sitk.Image | None) -> int:
        if mask is None:
            return fixed.GetNumberOfPixels()
        return max(1, int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))))

    def _method(self, mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
        cfg = self.cfg
        R = sitk.ImageRegistrationMethod()
        R.SetMetricAsMattesMutualInformation(numberOfHistogramBins=cfg.histogram_bins)
        # gradients by central differences at the samples: no full gradient images per level
        R.SetMetricUseFixedImageGradientFilter(False)
        R.SetMetricUseMovingImageGradientFilter(False)
        R.SetInterpolator(sitk.sitkLinear)
        if mask is not None:
            R.SetMetricFixedMask(mask)
        if self.moving_mask is not None:
            R.SetMetricMovingMask(self.moving_mask)
        return R

    def evaluate(self, tx: sitk.Transform) -> float:
        """Metric at (nearly) full resolution on one fixed, regular sample set
        of about ``max_samples`` fixed voxels, so values are comparable."""
        if self._eval is None:
            n = self._n_samplable(self.fixed, self.mask)
            k = max(1, int(math.ceil((n / float(self.cfg.max_samples)) ** (1.0 / 3.0))))
            fixed = sitk.Shrink(self.fixed, self._factors(self.fixed, k)) if k > 1 else self.fixed
            mask = None
            if self.mask is not None:
                mask = sitk.Resample(self.mask, fixed, sitk.Transform(3, sitk.sitkIdentity),
                                     sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            self._eval = (fixed, mask)
        fixed, mask = self._eval
        R = self._method(mask)
        R.SetMetricSamplingStrategy(R.NONE)
        R.SetInitialTransform(tx, inPlace=False)
        return float(R.MetricEvaluate(fixed, self.moving))

    def run(self, tx: sitk.Transform) -> tuple[float, str, bool]:
        cfg = self.cfg
        self.level_iterations, self.level_stops = [], []
        metric, stop = float("nan"), ""
        f0 = float(self.shrink[0])
        for f, sigma in zip(self.shrink, self.sigmas):
            fixed, moving, mask = self._level_images(f, sigma)
            n_level = self._n_samplable(fixed, mask)
            target = min(max(cfg.sampling_percentage * n_level, cfg.min_samples), cfg.max_samples)
            R = self._method(mask)
            R.SetMetricSamplingStrategy(R.RANDOM)
            R.SetMetricSamplingPercentage(float(min(1.0, target / n_level)), cfg.seed)
            step = cfg.learning_rate * f / f0
            R.SetOptimizerAsRegularStepGradientDescent(
                learningRate=step, minStep=cfg.min_step * f,
                numberOfIterations=cfg.max_iterations, relaxationFactor=cfg.relaxation_factor,
                gradientMagnitudeTolerance=cfg.gradient_tolerance)
            R.SetOptimizerScalesFromPhysicalShift()
            R.SetInitialTransform(tx, inPlace=True)
            count = [0]
            R.AddCommand(sitk.sitkIterationEvent, lambda count=count: count.__setitem__(0, count[0] + 1))
            R.Execute(fixed, moving)
            metric = float(R.GetMetricValue())
            stop = R.GetOptimizerStopConditionDescription()
            self.level_iterations.append(count[0])
            self.level_stops.append(stop)
        converged = ("maximum number of iterations" not in stop.lower()
                     and self.level_iterations[-1] < cfg.max_iterations)
        return metric, stop, converged


def _initial_transform(kind: str, fixed: sitk.Image, moving: sitk.Image, center: Sequence[float],
                       cfg: RegistrationConfig, user: sitk.Transform | None) -> tuple[sitk.Transform, str]:
    if user is not None:
        base = user.Downcast() if hasattr(user, "Downcast") else user
        name = "given"
    elif cfg.initializer == "identity":
        base = sitk.Euler3DTransform()
        base.SetCenter(tuple(center))
        name = "identity"
    else:
        mode = (sitk.CenteredTransformInitializerFilter.MOMENTS if cfg.initializer == "moments"
                else sitk.CenteredTransformInitializerFilter.GEOMETRY)
        base = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), mode)
        name = cfg.initializer
    tx = _euler_from(base, center) if kind == "rigid" else _affine_from(base, center)
    return tx, name


def register(fixed: sitk.Image, moving: sitk.Image, config: RegistrationConfig | None = None, *,
             fixed_mask: sitk.Image | None = None, moving_name: str = "FLAIR", fixed_name: str = "T1c",
             initial_transform: sitk.Transform | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (both 3D scalar images, any grids).

    Returns a :class:`RegistrationResult` whose ``transform`` maps fixed
    physical points (LPS, mm) to moving physical points; pass it to
    :func:`resample_to` to bring the moving image onto the fixed grid.

    fixed_mask: optional region of the fixed image (non-zero voxels, any grid;
        resampled nearest-neighbour onto the fixed grid) where metric samples
        are drawn, e.g. a brain mask; default: the cropped fixed image. A
        tight brain mask drops the contrast at the brain edge; dilating it by
        5-10 mm keeps that (affine scaling in particular relies on it).
    moving_name / fixed_name: sequence names used in messages and flags.
    initial_transform: optional fixed->moving start transform (any linear
        transform: rigid, similarity, affine, translation), replacing the
        initializer (e.g. a previous registration); for a rigid registration
        it is projected onto the nearest rotation.

    Raises :class:`RegistrationError` for an empty/constant/non-3D image, no
    overlap, an ITK failure, or (with ``raise_if_not_converged``) an
    optimiser that stops on its iteration limit. Implausible results are not
    raised but listed in ``flags``.
    """
    cfg = config if config is not None else RegistrationConfig()
    cfg.validate()
    what = f"registration of {moving_name} to {fixed_name}"
    t0 = time.perf_counter()

    fixed_f = _check_image(fixed, fixed_name, what)
    moving_f = _check_image(moving, moving_name, what)
    fixed_fg = foreground_mask(fixed_f)
    moving_fg = foreground_mask(moving_f)
    for name, m in ((fixed_name, fixed_fg), (moving_name, moving_fg)):
        n_fg = int(np.count_nonzero(sitk.GetArrayViewFromImage(m)))
        if n_fg < 500:
            raise RegistrationError(f"{what} is impossible: the {name} image has almost no foreground "
                                    f"({n_fg} voxels above background)")
    center = _mask_centroid(fixed_fg)

    # The fixed grid is the sampling domain. When it is much coarser than the
    # moving one (e.g. 5 mm 2D T1c, 1 mm 3D FLAIR), register the other way
    # round and invert: sampling the fine image is more accurate.
    swap = cfg.swap_if_fixed_coarser and _voxel_volume(fixed_f) > 2.0 * _voxel_volume(moving_f)
    if swap:
        ref_f, ref_fg, flo_f, flo_fg = moving_f, moving_fg, fixed_f, fixed_fg
    else:
        ref_f, ref_fg, flo_f, flo_fg = fixed_f, fixed_fg, moving_f, moving_fg
    ref_center = _mask_centroid(ref_fg) if swap else center
    ref_c = _bbox_crop(ref_f, ref_fg, cfg.crop_margin_mm)
    flo_c = _bbox_crop(flo_f, flo_fg, cfg.crop_margin_mm)
    sample_mask = moving_mask = None
    if fixed_mask is not None:
        fm = sitk.Cast(fixed_mask != 0, sitk.sitkUInt8)
        n_in = int(np.count_nonzero(sitk.GetArrayViewFromImage(fm)))
        if not swap:
            sample_mask = sitk.Resample(fm, ref_c, sitk.Transform(3, sitk.sitkIdentity),
                                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            n_in = int(np.count_nonzero(sitk.GetArrayViewFromImage(sample_mask)))
        else:
            moving_mask = fm
        if n_in < 500:
            raise RegistrationError(f"{what} is impossible: the {fixed_name} mask covers almost no voxels "
                                    f"({n_in}) of the {fixed_name} image")

    kinds = {"rigid": ["rigid"], "affine": ["affine"], "rigid+affine": ["rigid", "affine"]}[cfg.transform]
    shrink, sigmas = list(cfg.shrink_factors), list(cfg.smoothing_sigmas_mm)
    stage = _Stage(cfg, ref_c, flo_c, sample_mask, shrink, sigmas, moving_mask)

    try:
        user = initial_transform
        if user is not None and swap:
            user = user.GetInverse()
        tx, init_name = _initial_transform(kinds[0], ref_f, flo_f, ref_center, cfg, user)
        initial_metric = stage.evaluate(tx)
        ident = _euler_from(sitk.Euler3DTransform(), ref_center) if kinds[0] == "rigid" else \
            _affine_from(sitk.Euler3DTransform(), ref_center)
        identity_metric = stage.evaluate(ident)
        if (initial_transform is None and cfg.try_identity and init_name != "identity"
                and identity_metric < initial_metric):
            tx, init_name, initial_metric = ident, "identity", identity_metric

        start_tx = type(tx)(tx)  # the optimiser changes tx in place
        iterations_per_level: list[int] = []
        final_metric, stop, converged = float("nan"), "", False
        for i, _kind in enumerate(kinds):
            if i > 0:  # affine stage from the rigid result, skip the coarsest level
                tx = _affine_from(tx, ref_center)
                lv = slice(1, None) if len(shrink) > 1 else slice(None)
                stage = _Stage(cfg, ref_c, flo_c, sample_mask, shrink[lv], sigmas[lv], moving_mask)
            final_metric, stop, converged = stage.run(tx)
            iterations_per_level += stage.level_iterations
        final_eval = stage.evaluate(tx)
        kept_start = None
        if final_eval > initial_metric + cfg.metric_tolerance:
            # The optimiser ended worse than where it started (e.g. two scans
            # already aligned in the scanner frame): keep the starting alignment;
            # the quality checks below judge it like any other result.
            kept_start = (final_eval, initial_metric)
            tx, final_eval = start_tx, initial_metric
        if swap:
            tx = tx.GetInverse()
        tx = _euler_from(tx, center) if kinds[-1] == "rigid" else _affine_from(tx, center)
    except RuntimeError as exc:  # ITK exceptions arrive as RuntimeError
        msg = str(exc)
        if "outside" in msg.lower() and "buffer" in msg.lower() or "all samples" in msg.lower() \
                or "too many samples" in msg.lower():
            reason = (f"the {moving_name} and {fixed_name} images do not overlap enough in physical space "
                      "after initialisation")
        else:
            reason = "ITK error: " + " ".join(msg.split())[-400:]
        raise RegistrationError(f"{what} failed: {reason}") from None

    iterations = int(sum(iterations_per_level))
    if not math.isfinite(final_metric):
        raise RegistrationError(f"{what} failed: the similarity metric is not a number "
                                f"after {iterations} iterations ({stop})")
    if not converged and cfg.raise_if_not_converged:
        raise RegistrationError(
            f"{what} did not converge (final metric {final_metric:.4f} after {iterations} iterations: {stop})")

    params = transform_parameters(tx, center)

    # --- quality on the region both images cover, at reduced resolution ---
    quality, flags = registration_quality(fixed_f, moving_f, tx, cfg, fixed_name=fixed_name,
                                          moving_name=moving_name)
    quality["nmi_explained"] = ("normalised mutual information (H(F)+H(M))/H(F,M) in the common field of view "
                                "after resampling; 1 = unrelated, 2 = one-to-one intensity mapping")
    quality["metric_improvement"] = round(initial_metric - final_eval, 6)
    if kept_start:
        quality["kept_starting_alignment"] = (
            f"the optimiser ended at Mattes MI {kept_start[0]:.4f}, worse than the starting alignment "
            f"({init_name}, {kept_start[1]:.4f}; lower is better), so the starting alignment was kept")
    if params["rotation_deg"] > cfg.max_rotation_deg:
        flags.append(f"large_rotation: rotation {params['rotation_deg']:.1f} deg (> {cfg.max_rotation_deg:g} deg)")
    if params["translation_norm_mm"] > cfg.max_translation_mm:
        flags.append(f"large_translation: translation {params['translation_norm_mm']:.1f} mm "
                     f"(> {cfg.max_translation_mm:g} mm)")
    lo, hi = cfg.affine_scale_range
    bad_scales = [s for s in params["scales"] if not lo <= s <= hi]
    if bad_scales:
        flags.append(f"implausible_scale: affine scale {', '.join(f'{s:.2f}' for s in bad_scales)} "
                     f"outside {lo:g}-{hi:g}")
    best_start = min(initial_metric, identity_metric)
    if final_eval > best_start + cfg.metric_tolerance:
        flags.append(f"metric_not_improved: Mattes MI {final_eval:.4f} is worse than at the start "
                     f"({best_start:.4f}; lower is better)")
    if not converged:
        flags.append(f"not_converged: {stop}")

    return RegistrationResult(
        transform=tx,
        transform_type=cfg.transform,
        final_metric=final_metric,
        iterations=iterations,
        stop_reason=stop,
        converged=converged,
        parameters=params,
        quality=quality,
        flags=flags,
        initial_metric=initial_metric,
        identity_metric=identity_metric,
        final_metric_eval=final_eval,
        initializer_used=init_name,
        swapped=swap,
        iterations_per_level=iterations_per_level,
        elapsed_s=round(time.perf_counter() - t0, 3),
        moving_name=moving_name,
        fixed_name=fixed_name,
        config=asdict(cfg),
    )
