"""Image-quality metrics per series (MRQy), and comparison with a scanner's history.

The fifteen image-quality metrics (IQMs) of MRQy (Sadri et al., "MRQy — an
open-source tool for quality control of MR imaging data", Med. Phys. 47(12),
2020; reference implementation ``src/mrqy/QCF.py`` of github.com/ccipd/MRQy),
computed on one series with explicit masks instead of MRQy's per-slice Otsu
foreground, so that the figures are reproducible and comparable between
studies of a site and scanner (issue 12; MRQy's IQMs were related to BraTS
segmentation accuracy by the seed paper ``shared/seeds/000_dd2598e3ab393122.txt``).

Inputs and frames
-----------------
``image``: a SimpleITK image or a (z, y, x) numpy array (array axis 0 is the
slice axis of a converted series; "in-plane" means array axes (y, x)).
Intensities are the scanner's arbitrary units ("a.u."), not normalised.
Masks are boolean arrays on the same grid:

* ``head_mask`` (MRQy's foreground F): the head (brain, skull, scalp). When
  omitted it is derived by :func:`head_mask_from_image` (Otsu threshold,
  largest 26-connected component, 2-voxel closing, holes filled), the volume analogue of
  MRQy's Otsu + convex hull.
* background B: every voxel outside the head mask (air, with its noise and
  ghosts). In a skull-stripped or masked image B is zero-filled: the noise
  based metrics are then undefined (None) and a note says why.
* ``brain_mask``: the brain (e.g. the skull-stripping output). It holds the
  foreground patch and the tissue split; omitted -> the head mask.

Notation: f = intensities of the head voxels, b = of the background voxels;
fp = the foreground patch, bp = the background patch. A patch is a cube of 5
voxels along the finest axes (MRQy's 5 x 5 pixels; along a coarser slice axis
as many slices as cover the same distance, at least 1). fp is the patch lying
entirely in the brain mask with the highest mean intensity, bp the patch
lying entirely in the background, at least one patch width (5 voxels) away
from the head mask, with the highest mean intensity (the margin keeps
partial-volume voxels at a tight head mask out of the noise patch; ghosts
reach further and stay in it). (MRQy takes
the patch at the brightest pixel; the brightest patch *mean* is the same idea
without the single-voxel noise spike; MRQy's ``patch()`` also sits off-centre,
up-left of that pixel, through a padding slip). std is the population standard
deviation (ddof = 0), as numpy in MRQy.

Metrics (name: formula, unit) — MRQy's definitions unless stated:

* MEAN: mean(f), a.u.      * RNG: max(f) - min(f), a.u.      * VAR: var(f), a.u.^2
* CV: 100 * std(f) / mean(f), percent (shading, inhomogeneity).
* CPP, contrast per pixel: mean over the head of |h * I|, a.u., with the 3 x 3
  in-plane high-pass kernel h = (centre 1, the 8 neighbours -1/8). MRQy takes the
  signed mean over the whole slice, which is ~0 by construction (a zero-sum
  kernel on a zero-padded image); the mean absolute response is the local
  contrast the name describes (Gaussian noise sigma gives 0.846 sigma).
* PSNR: 20 * log10(max(f) / sqrt(mean over the head of (I - M)^2)), dB, with M
  the 5 x 5 in-plane median-filtered image. (MRQy filters I / max(I) and then
  compares it with I, a scale slip; here both are in the same units.)
* SNR1: std(f) / std(b).
* SNR2: mean(fp) / std(b).
* SNR3: mean(fp) / std(fp - mean(fp)) = mean(fp) / std(fp).
* SNR4: mean(fp) / std(bp).
* CNR: mean(fp - bp) / std(bp) = (mean(fp) - mean(bp)) / std(bp).
* CVP: std(fp) / mean(fp), a fraction (shading within the patch).
* CJV: (std(f) + std(b)) / |mean(f) - mean(b)| (head against air; lower is better).
* EFC, entropy focus criterion (Atkinson et al. 1997), over all N voxels of the
  image (negative values clipped to 0): with x_max = sqrt(sum x^2),
  E = sum (x / x_max) ln(x / x_max) and E_max = sqrt(N) ln(1 / sqrt(N)) (the
  value of a uniform image), EFC = E / E_max: 1 for a uniform image, 0 when all
  energy is in one voxel; ghosting and blurring raise it. (MRQy divides by
  |E_max|, which flips the sign; this follows Atkinson and MRIQC.)
* FBER: median(|f|^2) / median(|b|^2) (foreground-background energy ratio;
  MRQy reports 0 when the background energy is below 1e-3, here None).

When more than half of the background is exactly zero (a masked, skull-
stripped or resampled image), SNR1, SNR2, SNR4, CNR, CJV and FBER would measure
the masking rather than the scanner: they are None, with a note. Image QC is
meant for the converted series before skull stripping.

Two tissue-contrast metrics are added when the brain mask holds two tissue
classes (MRIQC's definitions, Esteban et al. 2017): the brain intensities are
split by a 2-class Otsu threshold into a "low" and a "high" class (on T1: grey
and white matter; on T2/FLAIR the order reverses; lesions and CSF fall in
whichever class they resemble) unless ``tissue=(low, high)`` masks are given.

* CNR_TISSUE: |mean_high - mean_low| / sqrt(std(b)^2 + std_low^2 + std_high^2)
  (Magnotta & Friedman 2006); with a zero-filled background std(b) is taken as 0.
* CJV_TISSUE: (std_low + std_high) / |mean_high - mean_low| (Ganzetti et al.
  2016; lower is better).

MRQy computes every metric per slice and averages the slices; here each is
computed once on the volume (ratios of per-slice statistics are noisy and
depend on the slice orientation). A metric that cannot be computed (empty
region, zero denominator) is None, with the reason in ``notes``.

Noise note: the background of a magnitude image is Rayleigh distributed
(std = 0.655 sigma of the underlying Gaussian noise); like MRQy, no correction
is applied, so SNRs compare within a scanner and protocol, not across.

History
-------
:func:`robust_z` and :func:`compare_to_history` compare a value with the
earlier values of the same metric, series role, site and scanner model:
z = (value - median) / (1.4826 * MAD), computed once at least 20 earlier
studies exist; |z| >= 3.5 (Iglewicz & Hoaglin's outlier cut for the modified
z-score) is reported in words, e.g. "FLAIR SNR2 far below this scanner's
usual (z = -4.2)". When the MAD is 0 (more than half of the history
identical) the scale falls back to 1.2533 x the mean absolute deviation from
the median; a history without any spread gives no z. Pure functions: the
history comes from the caller.

No network, no database.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .segmentation_qc import bounding_box

__all__ = [
    "METRICS", "TISSUE_METRICS", "HIGHER_IS_BETTER", "ImageQCConfig", "ImageQCResult",
    "HistoryComparison", "image_quality", "head_mask_from_image", "tissue_classes",
    "otsu_threshold", "efc", "robust_z", "compare_to_history", "compare_metrics_to_history",
]

METRICS: tuple[str, ...] = ("MEAN", "RNG", "VAR", "CV", "CPP", "PSNR", "SNR1", "SNR2", "SNR3",
                            "SNR4", "CNR", "CVP", "CJV", "EFC", "FBER")
TISSUE_METRICS: tuple[str, ...] = ("CNR_TISSUE", "CJV_TISSUE")

#: Which direction is better, for the words of an outlier (None: neither).
HIGHER_IS_BETTER: dict[str, bool | None] = {
    "MEAN": None, "RNG": None, "VAR": None, "CV": False, "CPP": None, "PSNR": True,
    "SNR1": True, "SNR2": True, "SNR3": True, "SNR4": True, "CNR": True, "CVP": False,
    "CJV": False, "EFC": False, "FBER": True, "CNR_TISSUE": True, "CJV_TISSUE": False,
}

#: What a worse-than-usual value of a metric typically means (for the words).
_MEANING: dict[str, str] = {
    "CV": "shading or intensity inhomogeneity", "PSNR": "noise", "SNR1": "noise",
    "SNR2": "noise", "SNR3": "noise", "SNR4": "noise or ghosting", "CNR": "noise or low contrast",
    "CVP": "shading", "CJV": "motion, noise or low contrast", "EFC": "motion (ghosting, blurring)",
    "FBER": "ringing or ghosting", "CNR_TISSUE": "low grey-white contrast or noise",
    "CJV_TISSUE": "low grey-white contrast, noise or motion",
}


@dataclass(frozen=True)
class ImageQCConfig:
    """patch_voxels: side of the fp/bp patches along the finest axes (MRQy: 5);
    median_voxels: in-plane size of the PSNR median filter (MRQy: 5);
    zero_background_fraction: above this share of exact zeros the background is
    called zero-filled (the noise-based metrics are then not comparable);
    slice_step: CPP and PSNR use every k-th slice (MRQy's "sample size"; the
    5 x 5 median filter is the most expensive step, ~1 s per 240x240x155)."""

    patch_voxels: int = 5
    median_voxels: int = 5
    zero_background_fraction: float = 0.5
    slice_step: int = 1


@dataclass
class ImageQCResult:
    """metrics: name -> value (None when undefined; units in the module doc);
    notes: why metrics are undefined or not comparable, in words;
    details: mask sizes (voxels), patch centres ((z, y, x) indices), the tissue
    split (Otsu threshold in a.u., class means/stds)."""

    metrics: dict[str, float | None]
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- helpers

def _as_array(image: sitk.Image | np.ndarray, spacing_zyx) -> tuple[np.ndarray, tuple[float, float, float]]:
    if isinstance(image, sitk.Image):
        arr = sitk.GetArrayFromImage(image).astype(np.float64)
        spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    else:
        arr = np.asarray(image, dtype=np.float64)
        spacing = tuple(float(s) for s in (spacing_zyx if spacing_zyx is not None else (1.0,) * arr.ndim))
    if arr.ndim != 3:
        raise ValueError(f"image QC needs a 3-D volume, got shape {arr.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers in mm (z, y, x), got {spacing}")
    return arr, spacing


def _mask(mask, shape, name: str) -> np.ndarray:
    if isinstance(mask, sitk.Image):
        mask = sitk.GetArrayFromImage(mask)
    m = np.asarray(mask).astype(bool)
    if m.shape != shape:
        raise ValueError(f"the {name} {m.shape} is not on the image grid {shape}")
    return m


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of ``values`` on a
    ``bins``-bin histogram between the 0.5th and 99.5th percentiles (the middle
    of the maximum when it is a plateau); the class "high" is ``values > threshold``."""
    v = np.asarray(values)
    v = (v if v.dtype in (np.float32, np.float64) else v.astype(np.float64)).ravel()
    if not np.isfinite(v).all():
        v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no values to threshold")
    lo, hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
    if not hi > lo:
        return float(lo)
    # equal-width bins as np.histogram(np.clip(v, lo, hi), bins, (lo, hi)), counted with bincount (5x faster)
    idx = ((np.clip(v, lo, hi) - lo) * (bins / (hi - lo))).astype(np.intp)
    idx[idx >= bins] = bins - 1
    hist = np.bincount(idx, minlength=bins)
    edges = np.linspace(lo, hi, bins + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    # well-separated classes leave a plateau of equal maxima over the empty gap: take its middle
    ks = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    k = int(ks[0] + ks[-1]) // 2
    return float(edges[k + 1])


def head_mask_from_image(image: sitk.Image | np.ndarray) -> np.ndarray:
    """(z, y, x) head mask of an unmasked MR series: intensity above Otsu's
    threshold of the whole volume, the largest 26-connected component, a
    closing of 2 voxels, holes filled (3-D). The volume analogue of MRQy's
    per-slice Otsu foreground with convex hull."""
    arr = sitk.GetArrayFromImage(image) if isinstance(image, sitk.Image) else np.asarray(image)
    fg = arr > otsu_threshold(arr)
    lab, n = ndi.label(fg, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    fg = lab == int(np.argmax(sizes))
    # closing and filling in the component's bounding box (+3 voxels): the same
    # result (the closing reaches 2 voxels out; the background outside the box
    # is connected to the border either way), in about half the time
    box = bounding_box(fg, 3)
    sub = ndi.binary_closing(np.pad(fg[box], 2), iterations=2)[2:-2, 2:-2, 2:-2]
    out = np.zeros_like(fg)
    out[box] = ndi.binary_fill_holes(sub)
    return out


def tissue_classes(image: sitk.Image | np.ndarray, brain_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Split the brain into two intensity classes by Otsu's threshold of the
    brain intensities: (low mask, high mask, threshold in a.u.)."""
    arr = sitk.GetArrayFromImage(image) if isinstance(image, sitk.Image) else np.asarray(image)
    m = np.asarray(brain_mask, bool)
    t = otsu_threshold(arr[m])
    return m & (arr <= t), m & (arr > t), t


def _patch_shape(spacing_zyx, side: int) -> tuple[int, int, int]:
    finest = min(spacing_zyx)
    out = []
    for s in spacing_zyx:
        n = max(1, int(round(side * finest / s)))
        out.append(n if n % 2 == 1 else n - 1 if n > 1 else 1)
    return tuple(out)


def _brightest_patch(arr: np.ndarray, region: np.ndarray, shape,
                     margin=(0, 0, 0)) -> tuple[np.ndarray | None, tuple | None]:
    """Voxels of the patch of ``shape`` (odd sizes) lying entirely in
    ``region`` and in the array, at least ``margin`` voxels (per axis) inside
    the region's border (the array's edge is no such border), whose mean
    intensity is highest, and its centre (z, y, x); (None, None) if none fits."""
    if not region.any():
        return None, None
    # work in the region's bounding box grown by the filter's half-size: a valid
    # centre lies in the region, so its window never reaches past the box
    half = [int(n) // 2 + int(mg) for n, mg in zip(shape, margin)]
    crop = bounding_box(region, max(half))
    r8 = region[crop].astype(np.uint8)
    if any(margin):
        # the window with the margin inside the region (outside the array counts as
        # region: cval 1); it holds the patch, so the patch lies in the region too
        size = tuple(int(n) + 2 * int(mg) for n, mg in zip(shape, margin))
        inside = ndi.minimum_filter(r8, size=size, mode="constant", cval=1) > 0
    else:
        inside = ndi.minimum_filter(r8, size=shape, mode="constant", cval=0) > 0
    # ... and the patch inside the array
    for axis, (n, sl) in enumerate(zip(shape, crop)):
        idx = np.arange(sl.start, sl.stop)
        ok = (idx >= n // 2) & (idx < arr.shape[axis] - n // 2)
        inside &= ok.reshape([-1 if a == axis else 1 for a in range(3)])
    if not inside.any():
        return None, None
    box = bounding_box(inside, max(shape))
    full_box = tuple(slice(c.start + b.start, c.start + b.stop) for c, b in zip(crop, box))
    sub = np.where(region[full_box], arr[full_box], 0.0).astype(np.float32)
    means = ndi.uniform_filter(sub, size=shape, mode="constant")
    means[~inside[box]] = -np.inf
    c_local = np.unravel_index(int(np.argmax(means)), means.shape)
    c = tuple(int(ci + sl.start) for ci, sl in zip(c_local, full_box))
    sl = tuple(slice(ci - n // 2, ci + n // 2 + 1) for ci, n in zip(c, shape))
    return arr[sl].ravel(), c


def _median_square(x: np.ndarray) -> float:
    """median(|x|^2), from the middle order statistics of |x| (squaring is
    monotonic there), without squaring every value."""
    a = np.abs(x)
    n = a.size
    k = n // 2
    if n % 2:
        return float(np.partition(a, k)[k]) ** 2
    lo_hi = np.partition(a, [k - 1, k])
    return 0.5 * (float(lo_hi[k - 1]) ** 2 + float(lo_hi[k]) ** 2)


def _ratio(num: float, den: float) -> float | None:
    if not (np.isfinite(num) and np.isfinite(den)) or den == 0:
        return None
    return float(num / den)


def efc(arr: np.ndarray) -> float | None:
    """Entropy focus criterion of all voxels of ``arr`` (negatives clipped to 0),
    normalised so that a uniform image gives 1 (see the module doc)."""
    a = np.asarray(arr).ravel()
    n = a.size
    x = np.asarray(a[a > 0], np.float64)    # clipped negatives and zeros add nothing to the sums
    energy = math.sqrt(float(np.dot(x, x)))
    if n < 2 or energy == 0:
        return None
    # sum p ln p with p = x / energy, as (sum x ln x - ln(energy) sum x) / energy
    e = (float(np.dot(x, np.log(x))) - math.log(energy) * float(x.sum())) / energy
    e_max = math.sqrt(n) * math.log(1.0 / math.sqrt(n))
    return e / e_max


# --------------------------------------------------------------------------- metrics

def image_quality(image: sitk.Image | np.ndarray, head_mask: np.ndarray | sitk.Image | None = None,
                  brain_mask: np.ndarray | sitk.Image | None = None, *,
                  spacing_zyx: Sequence[float] | None = None,
                  tissue: tuple[np.ndarray, np.ndarray] | None = None,
                  config: ImageQCConfig | None = None) -> ImageQCResult:
    """MRQy metrics (and CNR_TISSUE, CJV_TISSUE) of one series.

    ``image``: SimpleITK image, or (z, y, x) array with ``spacing_zyx`` in mm
    (default 1 mm); masks on the same grid (see the module doc for the masks,
    formulas and units). ``tissue``: optional (low, high) class masks for the
    tissue metrics; default: 2-class Otsu split of the brain."""
    cfg = config or ImageQCConfig()
    arr, spacing = _as_array(image, spacing_zyx)
    notes: list[str] = []
    head = _mask(head_mask, arr.shape, "head mask") if head_mask is not None else head_mask_from_image(arr)
    if not head.any():
        raise ValueError("the head mask is empty: no image-quality metrics can be computed")
    brain = _mask(brain_mask, arr.shape, "brain mask") & head if brain_mask is not None else head
    if not brain.any():
        notes.append("the brain mask does not overlap the head mask; the head is used instead")
        brain = head
    bg = ~head
    f, b = arr[head], arr[bg]
    m: dict[str, float | None] = {k: None for k in (*METRICS, *TISSUE_METRICS)}
    details: dict[str, Any] = {"head_voxels": int(head.sum()), "brain_voxels": int(brain.sum()),
                               "background_voxels": int(bg.sum()), "spacing_zyx_mm": list(spacing)}

    mean_f, std_f = float(f.mean()), float(f.std())
    m["MEAN"], m["RNG"], m["VAR"] = mean_f, float(np.ptp(f)), std_f ** 2
    m["CV"] = None if mean_f == 0 else 100.0 * std_f / mean_f

    # CPP: mean |in-plane 3x3 high-pass| over the head (computed in its bounding box)
    box = bounding_box(head, 2)
    step = max(1, int(cfg.slice_step))
    box = (slice(box[0].start, box[0].stop, step), *box[1:])
    sub = arr[box].astype(np.float32)
    kernel = np.full((1, 3, 3), -1.0 / 8.0)
    kernel[0, 1, 1] = 1.0
    hp = ndi.convolve(sub, kernel, mode="nearest")
    m["CPP"] = float(np.abs(hp[head[box]]).astype(np.float64).mean())

    # PSNR against the in-plane median-filtered image
    r = cfg.median_voxels // 2   # SimpleITK's median: multi-threaded, replicates the border like mode="nearest"
    med = sitk.GetArrayFromImage(sitk.Median(sitk.GetImageFromArray(sub), [r, r, 0]))
    mse = float(((sub - med)[head[box]].astype(np.float64) ** 2).mean())
    max_f = float(f.max())
    if mse > 0 and max_f > 0:
        m["PSNR"] = 20.0 * math.log10(max_f / math.sqrt(mse))
    else:
        notes.append("PSNR undefined: the image equals its median-filtered copy (no noise) or has no positive signal")

    shape = _patch_shape(spacing, cfg.patch_voxels)
    fp, fp_centre = _brightest_patch(arr, brain, shape)
    bp, bp_centre = _brightest_patch(arr, bg, shape, margin=shape)
    details.update(patch_shape_zyx=list(shape), foreground_patch_centre_zyx=fp_centre,
                   background_patch_centre_zyx=bp_centre)
    if fp is None:
        notes.append(f"no {shape[0]}x{shape[1]}x{shape[2]}-voxel patch fits in the brain mask: "
                     "SNR2, SNR3, SNR4, CNR and CVP undefined")

    std_b = float(b.std()) if b.size else float("nan")
    zero_bg = b.size > 0 and float((b == 0).mean()) > cfg.zero_background_fraction
    details["background_zero_fraction"] = round(float((b == 0).mean()), 4) if b.size else None
    if b.size == 0:
        notes.append("the head fills the whole field of view: no background, so SNR1, SNR2, SNR4, CNR, CJV "
                     "and FBER are undefined")
    elif zero_bg:
        notes.append(f"{100 * details['background_zero_fraction']:.0f} % of the background is exactly zero "
                     "(masked, skull-stripped or resampled image): SNR1, SNR2, SNR4, CNR, CJV and FBER would "
                     "measure the masking, not the scanner, and are left undefined")
    noise_ok = b.size > 0 and std_b > 0 and not zero_bg
    if b.size and not zero_bg and not noise_ok:
        notes.append("the background has no intensity variation: SNR1, SNR2, SNR4 and CNR are undefined")

    if noise_ok:
        m["SNR1"] = _ratio(std_f, std_b)
    if fp is not None:
        mean_fp, std_fp = float(fp.mean()), float(fp.std())
        m["SNR3"] = _ratio(mean_fp, std_fp)
        m["CVP"] = _ratio(std_fp, mean_fp)
        if noise_ok:
            m["SNR2"] = _ratio(mean_fp, std_b)
        if bp is not None:
            if not zero_bg:   # a zero-filled background measures the masking, not the noise
                std_bp = float(bp.std())
                m["SNR4"] = _ratio(mean_fp, std_bp)
                m["CNR"] = _ratio(float((fp - bp).mean()), std_bp)
        elif b.size:
            notes.append(f"no {shape[0]}x{shape[1]}x{shape[2]}-voxel patch fits in the background: "
                         "SNR4 and CNR undefined")
    if b.size and not zero_bg:
        m["CJV"] = _ratio(std_f + std_b, abs(mean_f - float(b.mean())))
        bg_energy = _median_square(b)
        if bg_energy < 1e-3:
            notes.append("FBER undefined: the background holds (almost) no energy")
        else:
            m["FBER"] = _median_square(f) / bg_energy
    m["EFC"] = efc(arr)

    # tissue contrast (MRIQC definitions) on two classes of the brain
    if tissue is not None:
        low, high = (_mask(t, arr.shape, "tissue mask") for t in tissue)
        threshold = None
    else:
        low, high, threshold = tissue_classes(arr, brain)
    if low.sum() >= 2 and high.sum() >= 2:
        ml, sl_, mh, sh = float(arr[low].mean()), float(arr[low].std()), float(arr[high].mean()), float(arr[high].std())
        noise = std_b if (noise_ok and not zero_bg) else 0.0
        m["CNR_TISSUE"] = _ratio(abs(mh - ml), math.sqrt(noise ** 2 + sl_ ** 2 + sh ** 2))
        m["CJV_TISSUE"] = _ratio(sl_ + sh, abs(mh - ml))
        details["tissue"] = {"method": "given" if tissue is not None else "2-class Otsu of brain intensities",
                             "threshold": threshold, "low": {"voxels": int(low.sum()), "mean": ml, "std": sl_},
                             "high": {"voxels": int(high.sum()), "mean": mh, "std": sh}}
    else:
        notes.append("the brain does not hold two intensity classes: CNR_TISSUE and CJV_TISSUE undefined")
    return ImageQCResult(metrics=m, notes=notes, details=details)


# --------------------------------------------------------------------------- history

MIN_HISTORY = 20
OUTLIER_Z = 3.5


@dataclass(frozen=True)
class HistoryComparison:
    """A metric against its history: ``z`` (robust z-score; None before
    ``min_history`` earlier studies or when the history has no spread),
    ``median`` and ``scale`` (1.4826 * MAD, or the mean-absolute-deviation
    fallback) of the history, ``n_history``, ``outlier`` (|z| >= threshold),
    ``worse`` (the outlier lies on the bad side of the metric; None if the
    metric has no good side) and ``words`` (a sentence for the report; None
    when not an outlier)."""

    metric: str
    value: float | None
    z: float | None
    median: float | None
    scale: float | None
    n_history: int
    outlier: bool
    worse: bool | None
    words: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _history_stats(history: Sequence[float]) -> tuple[np.ndarray, float, float]:
    h = np.asarray([v for v in history if v is not None and np.isfinite(v)], np.float64)
    if h.size == 0:
        return h, float("nan"), float("nan")
    med = float(np.median(h))
    scale = 1.4826 * float(np.median(np.abs(h - med)))
    if scale == 0:
        # more than half the history is identical: IBM/SPSS-style fallback to the
        # mean absolute deviation (1.2533 makes it consistent for a normal law)
        scale = 1.2533 * float(np.mean(np.abs(h - med)))
    return h, med, scale


def robust_z(value: float | None, history: Sequence[float], min_history: int = MIN_HISTORY) -> float | None:
    """Robust z-score (value - median) / (1.4826 * MAD) of ``value`` against
    ``history`` (earlier values of the same metric, series role, site and
    scanner; None and non-finite entries ignored). None before ``min_history``
    earlier values exist, when the value is None, or when the history has no
    spread at all (MAD and mean absolute deviation both 0)."""
    if value is None or not np.isfinite(value):
        return None
    h, med, scale = _history_stats(history)
    if h.size < min_history or not scale > 0:
        return None
    return (float(value) - med) / scale


def compare_to_history(metric: str, value: float | None, history: Sequence[float], *,
                       series: str = "", min_history: int = MIN_HISTORY,
                       threshold: float = OUTLIER_Z) -> HistoryComparison:
    """Compare one metric of one series (``series``: its role for the words,
    e.g. "FLAIR") with the scanner's history; see :class:`HistoryComparison`.

    Words of an outlier: "FLAIR SNR2 far below this scanner's usual (z = -4.2):
    noise" — the meaning is added when the deviation is on the metric's bad
    side (see ``HIGHER_IS_BETTER``)."""
    h, med, scale = _history_stats(history)
    z = robust_z(value, history, min_history)
    outlier = z is not None and abs(z) >= threshold
    better_high = HIGHER_IS_BETTER.get(metric)
    worse = None if (not outlier or better_high is None) else (z < 0) == better_high
    words = None
    if outlier:
        label = f"{series} {metric}".strip()
        words = (f"{label} far {'below' if z < 0 else 'above'} this scanner's usual (z = {z:+.1f}; "
                 f"usual {med:.4g}, this series {value:.4g}, {h.size} earlier studies)")
        if worse and metric in _MEANING:
            words += f": suspect {_MEANING[metric]}"
    return HistoryComparison(metric=metric, value=None if value is None else float(value), z=z,
                             median=med if h.size else None, scale=scale if h.size else None,
                             n_history=int(h.size), outlier=outlier, worse=worse, words=words)


def compare_metrics_to_history(metrics: dict[str, float | None], history: dict[str, Sequence[float]], *,
                               series: str = "", min_history: int = MIN_HISTORY,
                               threshold: float = OUTLIER_Z) -> tuple[dict[str, HistoryComparison], list[str]]:
    """Every metric of one series against its history (``history[metric]`` =
    earlier values). Returns (comparisons by metric, flags "iqm_outlier: words"
    for the outliers, in METRICS order)."""
    out: dict[str, HistoryComparison] = {}
    flags: list[str] = []
    for name, value in metrics.items():
        c = compare_to_history(name, value, history.get(name, ()), series=series,
                               min_history=min_history, threshold=threshold)
        out[name] = c
        if c.outlier:
            flags.append(f"iqm_outlier: {c.words}")
    return out, flags
