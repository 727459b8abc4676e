"""N4 bias-field correction (N4ITK, Tustison et al. 2010) with SimpleITK.

Model: ``image = true_image * bias`` with a smooth multiplicative ``bias``.
N4 estimates ``log(bias)`` as a cubic B-spline on a shrunk copy of the image
(inside a mask); the field is then evaluated at FULL resolution with
``GetLogBiasFieldAsImage(full_image)`` and the image divided by it:
``corrected = image / exp(log_bias)``. The output has exactly the input grid
(size, spacing, origin, direction; LPS mm) and is float32.

The overall scale of a multiplicative bias cannot be identified; by default
the log bias field is shifted to zero mean inside the mask, so the corrected
image keeps the geometric-mean intensity of the input inside the mask.

N4 needs positive intensities: voxels <= 0 are left out of the fit (removed
from the mask) and are still divided by the (positive) field in the output,
so background zeros stay zero.

Spacing-aware shrinking: ``shrink_factor`` applies to the finest axis; thick
slices are shrunk less along their slice axis (5 mm slices stay 5 mm when the
in-plane 1 mm is shrunk to 4 mm, and so on).

No network, no database; pure image processing.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = ["N4Config", "N4Error", "N4Result", "n4_correct"]


class N4Error(RuntimeError):
    """Bias correction impossible or failed; the message names the image and the reason."""


@dataclass
class N4Config:
    """N4 settings.

    shrink_factor: fit on the image shrunk by this factor along its finest axis
        (other axes proportionally less; never below 1).
    iterations: maximum iterations per fitting level; the number of levels is
        ``len(iterations)`` (the B-spline mesh doubles at each level).
    convergence_threshold: stop a level when the coefficient of variation of
        the change of the corrected log image falls below this.
    spline_distance_mm: distance between B-spline knots at the first level in
        mm (the number of control points per axis is ``ceil(extent /
        distance) + spline_order``); ignored when ``control_points`` is set.
    control_points: explicit control points per axis at the first level
        (each > spline_order).
    bias_field_fwhm: FWHM of the Gaussian deconvolved from the log-intensity
        histogram (histogram sharpening).
    wiener_filter_noise, histogram_bins: N4's histogram sharpening settings.
    zero_mean_log_bias: shift the log bias field to zero mean inside the mask.
    crop_margin_mm: the fit runs on the mask's bounding box plus this margin;
        outside it the field repeats its border values.
    """

    shrink_factor: int = 4
    iterations: tuple[int, ...] = (50, 50, 30)
    convergence_threshold: float = 1e-6
    spline_distance_mm: float | None = 100.0
    control_points: tuple[int, ...] | None = None
    spline_order: int = 3
    bias_field_fwhm: float = 0.15
    wiener_filter_noise: float = 0.01
    histogram_bins: int = 200
    zero_mean_log_bias: bool = True
    crop_margin_mm: float = 10.0

    def validate(self) -> None:
        if self.shrink_factor < 1:
            raise ValueError("shrink_factor must be >= 1")
        if not self.iterations or any(int(i) < 1 for i in self.iterations):
            raise ValueError("iterations must be a non-empty sequence of positive counts")
        if self.control_points is None and (self.spline_distance_mm is None or self.spline_distance_mm <= 0):
            raise ValueError("set spline_distance_mm > 0 or control_points")
        if self.control_points is not None and any(int(c) <= self.spline_order for c in self.control_points):
            raise ValueError(f"control_points must all be > spline_order ({self.spline_order})")
        if not 0 < self.bias_field_fwhm:
            raise ValueError("bias_field_fwhm must be > 0")


@dataclass
class N4Result:
    """Output of :func:`n4_correct`.

    corrected: float32, same grid as the input.
    log_bias_field: float32 natural-log bias, same grid (``corrected = image /
        exp(log_bias_field)``).
    elapsed_s: wall time in seconds.
    iterations: iterations run, summed over levels.
    """

    corrected: sitk.Image
    log_bias_field: sitk.Image
    elapsed_s: float
    iterations: int
    iterations_per_level: list[int] = field(default_factory=list)
    convergence: float = float("nan")
    shrink_factors: list[int] = field(default_factory=list)
    control_points: list[int] = field(default_factory=list)
    mask_voxels: int = 0
    bias_range: tuple[float, float] = (float("nan"), float("nan"))
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no images)."""

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(float(v)) else None

        return {
            "elapsed_s": num(self.elapsed_s),
            "iterations": int(self.iterations),
            "iterations_per_level": [int(i) for i in self.iterations_per_level],
            "convergence": num(self.convergence),
            "shrink_factors": [int(v) for v in self.shrink_factors],
            "control_points": [int(v) for v in self.control_points],
            "mask_voxels": int(self.mask_voxels),
            "bias_range": [num(v) for v in self.bias_range],
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()},
        }


def _shrink_factors(image: sitk.Image, shrink: int) -> list[int]:
    sp = image.GetSpacing()
    finest = min(sp)
    out = []
    for d, n in enumerate(image.GetSize()):
        f = max(1, int(round(shrink * finest / sp[d])))
        out.append(max(1, min(f, n // 8 if n >= 8 else 1)))
    return out


def _bbox(mask_arr: np.ndarray, image: sitk.Image, margin_mm: float) -> tuple[list[int], list[int]]:
    """(start index, size) in sitk (x, y, z) order of the mask's bounding box plus a margin."""
    nz = np.nonzero(mask_arr)
    dim = image.GetDimension()
    lo, size = [], []
    for d in range(dim):
        ax = nz[dim - 1 - d]  # numpy axes are reversed
        m = int(math.ceil(margin_mm / image.GetSpacing()[d]))
        a = max(0, int(ax.min()) - m)
        b = min(image.GetSize()[d], int(ax.max()) + 1 + m)
        lo.append(a)
        size.append(b - a)
    return lo, size


def _coarse_grid(image: sitk.Image, factors: list[int]) -> sitk.Image:
    """Empty grid covering exactly the same physical extent (first to last
    voxel centre) as ``image`` with about ``factors`` times its spacing."""
    size, spacing = [], []
    for n, sp, f in zip(image.GetSize(), image.GetSpacing(), factors):
        m = max(2, int(math.ceil((n - 1) / float(f))) + 1) if n > 1 else 1
        size.append(m)
        spacing.append((n - 1) * sp / (m - 1) if m > 1 else sp)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(image.GetOrigin())
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    return grid


def _default_mask(image: sitk.Image) -> sitk.Image:
    from brainline.pipelines.registration import foreground_mask  # Otsu / non-background foreground

    return foreground_mask(image)


def n4_correct(image: sitk.Image, mask: sitk.Image | None = None, config: N4Config | None = None, *,
               name: str = "image", threads: int | None = None) -> N4Result:
    """N4-correct ``image`` (2D or 3D scalar) inside ``mask``.

    mask: non-zero voxels are fitted (any integer/float image; resampled
        nearest-neighbour onto the image grid if its grid differs). Default:
        the foreground (non-background voxels of skull-stripped/zero-padded
        data, else Otsu's threshold; largest component, holes filled).
    name: the sequence name used in error messages.
    threads: ITK threads for the N4 fit (default: SimpleITK's global
        default); 1 when several sequences are corrected concurrently.

    Raises :class:`N4Error` for constant/empty images, empty masks and ITK
    failures.
    """
    cfg = config if config is not None else N4Config()
    cfg.validate()
    what = f"N4 bias correction of {name}"
    t0 = time.perf_counter()
    if not isinstance(image, sitk.Image) or image.GetDimension() not in (2, 3):
        raise N4Error(f"{what} is impossible: a 2D or 3D image is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise N4Error(f"{what} is impossible: the image has several components per voxel")
    img = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(arr).all():
        raise N4Error(f"{what} is impossible: the image contains NaN or infinite values")
    if float(arr.max()) <= 0 or float(arr.max()) - float(arr.min()) <= 1e-6 * abs(float(arr.max())):
        raise N4Error(f"{what} is impossible: the image is empty/constant or has no positive intensities "
                      f"(range {float(arr.min()):g} to {float(arr.max()):g})")

    if mask is not None and (not isinstance(mask, sitk.Image) or mask.GetDimension() != img.GetDimension()):
        raise N4Error(f"{what} is impossible: the mask must be a {img.GetDimension()}D image, like the image")
    if mask is None:
        m = _default_mask(img)
    else:
        m = mask
        same = (m.GetSize() == img.GetSize()
                and np.allclose(m.GetSpacing(), img.GetSpacing(), atol=1e-4)
                and np.allclose(m.GetOrigin(), img.GetOrigin(), atol=1e-3)
                and np.allclose(m.GetDirection(), img.GetDirection(), atol=1e-5))
        m = sitk.Cast(m != 0, sitk.sitkUInt8)
        if same:
            m.CopyInformation(img)
        else:
            m = sitk.Resample(m, img, sitk.Transform(img.GetDimension(), sitk.sitkIdentity),
                              sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # N4 takes logs: only positive voxels are fitted
    m = sitk.Cast(sitk.And(m, sitk.Cast(img > 0, sitk.sitkUInt8)), sitk.sitkUInt8)
    mask_arr = sitk.GetArrayFromImage(m).astype(bool)
    n_mask = int(mask_arr.sum())
    if n_mask < 100:
        raise N4Error(f"{what} is impossible: the mask holds only {n_mask} voxels with positive intensity")

    # fit on the mask's bounding box (plus a margin) only: N4 evaluates its
    # B-spline on every voxel of the fitted grid at every iteration
    crop_lo, crop_size = _bbox(mask_arr, img, cfg.crop_margin_mm)
    img_crop = sitk.RegionOfInterest(img, crop_size, crop_lo)
    mask_crop = sitk.RegionOfInterest(m, crop_size, crop_lo)
    factors = _shrink_factors(img_crop, cfg.shrink_factor)
    small = _coarse_grid(img_crop, factors)
    ident = sitk.Transform(img.GetDimension(), sitk.sitkIdentity)
    small_img = sitk.Resample(sitk.Maximum(img_crop, 0.0), small, ident, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    small_mask = sitk.Resample(mask_crop, small, ident, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if int(np.count_nonzero(sitk.GetArrayViewFromImage(small_mask))) < 50:
        raise N4Error(f"{what} is impossible: the mask is too small for shrink factor {cfg.shrink_factor}")
    small = small_img

    if cfg.control_points is not None:
        cps = [int(c) for c in cfg.control_points]
        if len(cps) != img.GetDimension():
            raise N4Error(f"{what}: control_points needs {img.GetDimension()} values")
    else:
        cps = []
        for n, sp in zip(small.GetSize(), small.GetSpacing()):
            extent = max(sp, (n - 1) * sp)
            cps.append(int(math.ceil(extent / float(cfg.spline_distance_mm))) + cfg.spline_order)

    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in cfg.iterations])
    corrector.SetConvergenceThreshold(float(cfg.convergence_threshold))
    corrector.SetNumberOfControlPoints(cps)
    corrector.SetSplineOrder(int(cfg.spline_order))
    corrector.SetBiasFieldFullWidthAtHalfMaximum(float(cfg.bias_field_fwhm))
    corrector.SetWienerFilterNoise(float(cfg.wiener_filter_noise))
    corrector.SetNumberOfHistogramBins(int(cfg.histogram_bins))
    corrector.SetMaskLabel(1)
    if threads is not None:
        corrector.SetNumberOfThreads(max(1, int(threads)))
    per_level = [0] * len(cfg.iterations)

    def _tick() -> None:
        lvl = corrector.GetCurrentLevel()
        if 0 <= lvl < len(per_level):
            per_level[lvl] += 1

    corrector.AddCommand(sitk.sitkIterationEvent, _tick)
    try:
        corrector.Execute(small, small_mask)
        # full resolution on the cropped region (same physical extent as the
        # coarse grid, so the B-spline lattice maps exactly), ...
        log_bias = corrector.GetLogBiasFieldAsImage(img_crop)
    except RuntimeError as exc:
        raise N4Error(f"{what} failed: ITK error: {' '.join(str(exc).split())[-400:]}") from None

    log_bias = sitk.Cast(log_bias, sitk.sitkFloat32)
    # ... extended to the whole grid by repeating its border values
    upper = [int(n - lo - sz) for n, lo, sz in zip(img.GetSize(), crop_lo, crop_size)]
    if any(crop_lo) or any(upper):
        log_bias = sitk.ZeroFluxNeumannPad(log_bias, [int(v) for v in crop_lo], upper)
    log_bias.CopyInformation(img)
    lb = sitk.GetArrayFromImage(log_bias)
    if not np.isfinite(lb).all():
        raise N4Error(f"{what} failed: the estimated bias field is not finite")
    if cfg.zero_mean_log_bias:
        lb = lb - np.float32(lb[mask_arr].mean())
    bias = np.exp(lb)
    out_arr = (sitk.GetArrayViewFromImage(img) / bias).astype(np.float32)
    corrected = sitk.GetImageFromArray(out_arr)
    corrected.CopyInformation(img)
    log_bias = sitk.GetImageFromArray(lb.astype(np.float32))
    log_bias.CopyInformation(img)
    inside = bias[mask_arr]
    return N4Result(
        corrected=corrected,
        log_bias_field=log_bias,
        elapsed_s=round(time.perf_counter() - t0, 3),
        iterations=int(sum(per_level)),
        iterations_per_level=per_level,
        convergence=float(corrector.GetCurrentConvergenceMeasurement()),
        shrink_factors=factors,
        control_points=cps,
        mask_voxels=n_mask,
        bias_range=(float(inside.min()), float(inside.max())),
        config=asdict(cfg),
    )
