"""Image side of the longitudinal comparison: the prior on the current grid,
intensity matching, resolution matching, subtraction and lesion candidates.

Frames and units: SimpleITK images in LPS physical space (mm); numpy arrays
from ``sitk.GetArrayFromImage`` in (z, y, x) index order; volumes in mm^3.
Everything here lies on the CURRENT reference grid (the grid of the current
``segmentation.nii.gz``); the prior is pulled onto it with a transform that
maps current physical points to prior physical points (the ITK fixed ->
moving convention of :mod:`.registration`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .rano import bidimensional

__all__ = ["mask_box", "robust_z", "signal_mask", "fit_region", "match_intensity", "differential_bias",
           "voxel_extent_mm", "resolution_sigmas",
           "smooth_mm", "native_coverage", "Candidate", "find_lesions", "STRUCTURE_26", "axial_axis",
           "new_lesion_enhancement"]

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


# ---------------------------------------------------------------------------
def mask_box(masks: list[np.ndarray], spacing_zyx, margin_mm: float) -> tuple[slice, ...] | None:
    """The bounding box (slices, z y x) of the union of ``masks`` widened by
    ``margin_mm`` (rounded up to whole voxels per axis) on every side and
    clipped to the array; None when the union is empty."""
    union = np.zeros(masks[0].shape, bool)
    for m in masks:
        union |= m
    if not union.any():
        return None
    nz = np.argwhere(union)
    pad = np.array([int(np.ceil(margin_mm / s)) for s in spacing_zyx])
    lo = np.maximum(nz.min(axis=0) - pad, 0)
    hi = np.minimum(nz.max(axis=0) + pad + 1, np.array(union.shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def robust_z(values: np.ndarray, mask: np.ndarray, min_sd: float = 0.0,
             stats_mask: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """(values - median) / max(1.4826 MAD, min_sd) with median/MAD taken
    inside ``stats_mask`` (default ``mask``); returns (z, median, robust sd
    used). Outside ``mask`` z is 0."""
    inside = values[mask if stats_mask is None else stats_mask]
    if inside.size == 0:
        return np.zeros_like(values, dtype=np.float32), 0.0, 1.0
    med = float(np.median(inside))
    sd = 1.4826 * float(np.median(np.abs(inside - med)))
    if sd <= 1e-12:
        sd = float(np.std(inside)) or 1.0
    sd = max(sd, float(min_sd))
    z = np.zeros_like(values, dtype=np.float32)
    z[mask] = (values[mask] - med) / sd
    return z, med, sd


def signal_mask(values: np.ndarray, mask: np.ndarray, min_voxels: int = 1000) -> np.ndarray:
    """The voxels of ``mask`` where the image has signal (> 0): an image's
    intensity statistics (brain median, robust SD) must not count voxels the
    acquisition left at 0 inside the brain mask (a FLAIR slab that stops short,
    zero-filled parts of a public volume): a third of the brain at 0 widened
    a FLAIR's robust SD from ~40 to 169 and put every new lesion below
    ``current_min_z``. ``mask`` itself when fewer than ``min_voxels`` have signal."""
    signal = mask & (values > 0)
    return signal if int(signal.sum()) >= min_voxels else mask


def fit_region(common: np.ndarray, lesions: np.ndarray | None, spacing_zyx, exclude_mm: float,
               bright: np.ndarray | None = None, bright_mm: float = 2.0,
               min_fraction: float = 0.5) -> tuple[np.ndarray, dict]:
    """Where the two timepoints' intensities are matched (and the differential bias
    fitted): ``common`` less the voxels within ``exclude_mm`` (mm) of ``lesions`` (the
    two timepoints' segmentations, united) and within ``bright_mm`` of ``bright``
    (voxels bright at either timepoint: lesions no segmentation holds, e.g. MS-like
    FLAIR lesions). A lesion that grew or shrank changes the brightest part of the
    histogram and the local intensity ratio; fitted over it, the matching and the
    smooth bias field take up part of the very change that is to be measured.
    ``common`` itself when ``exclude_mm`` <= 0, or when less than ``min_fraction``
    of it would remain."""
    if exclude_mm <= 0:
        return common, {"lesions_excluded": False}
    near = np.zeros(common.shape, bool)
    for mask, mm in ((lesions, exclude_mm), (bright, bright_mm)):
        if mask is not None and mask.any():
            near |= ndimage.distance_transform_edt(~mask, sampling=spacing_zyx) <= mm
    if not near.any():
        return common, {"lesions_excluded": False}
    fit = common & ~near
    if fit.sum() < min_fraction * common.sum():
        return common, {"lesions_excluded": False, "reason": f"less than {min_fraction:.0%} of the brain "
                                                             f"lies away from the lesions"}
    return fit, {"lesions_excluded": True, "exclude_mm": exclude_mm, "bright_mm": bright_mm,
                 "fit_percent_of_brain": round(100.0 * float(fit.sum()) / max(1, int(common.sum())), 1)}


def _interp_extended(values: np.ndarray, xs: np.ndarray, ys: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """The monotone mapping (xs -> ys, xs increasing) at ``values``, extended beyond
    the fitted range by straight lines instead of held flat: above it with the
    least-squares slope of the mapping at the 50th-99th percentiles of ``fitted``
    (the values it was fitted on), below it with that at the 1st-50th. A lesion
    left out of the fit (:func:`fit_region`) is brighter than anything fitted; a
    flat extension would map all of it to the fitted maximum."""
    out = np.interp(values, xs, ys)
    for sel, q, edge in ((values > xs[-1], (50, 60, 70, 80, 90, 95, 99), -1),
                         (values < xs[0], (1, 5, 10, 20, 30, 40, 50), 0)):
        if sel.any():
            qx = np.percentile(fitted, q)
            slope = float(np.polyfit(qx, np.interp(qx, xs, ys), 1)[0]) if np.ptp(qx) > 0 else 1.0
            out[sel] = ys[edge] + max(slope, 0.0) * (values[sel] - xs[edge])
    return out


def match_intensity(prior: np.ndarray, current: np.ndarray, common: np.ndarray, prior_mask: np.ndarray,
                    method: str = "histogram", levels: int = 256, match_points: int = 32,
                    percentiles: tuple[float, float, float] = (5, 95, 5)) -> tuple[np.ndarray, dict]:
    """Map the prior's intensities onto the current's, fitted on ``common``
    (both brain masks; :func:`fit_region`) and applied to the prior's brain
    (``prior_mask``; 0 elsewhere). Returns (matched prior, record).

    "histogram": ``sitk.HistogramMatching`` of the fitted voxels (quantile
    mapping at ``match_points`` points, ``levels`` bins), extended to the rest
    of the prior brain by monotone interpolation of that mapping.
    "linear": least-squares line current = a * prior + b through the
    percentiles ``first..last step`` of both (robust to lesions and bias).
    """
    src, ref = prior[common].astype(np.float32), current[common].astype(np.float32)
    out = np.zeros_like(prior, dtype=np.float32)
    if src.size < 100:
        out[prior_mask] = prior[prior_mask]
        return out, {"method": "none", "reason": "too few common brain voxels"}
    if method == "histogram":
        s_img = sitk.GetImageFromArray(src.reshape(1, 1, -1))
        r_img = sitk.GetImageFromArray(ref.reshape(1, 1, -1))
        m = sitk.GetArrayFromImage(sitk.HistogramMatching(s_img, r_img, numberOfHistogramLevels=int(levels),
                                                          numberOfMatchPoints=int(match_points),
                                                          thresholdAtMeanIntensity=False)).ravel()
        order = np.argsort(src, kind="stable")
        xs, ys = src[order], m[order]
        xs, first = np.unique(xs, return_index=True)
        ys = np.maximum.accumulate(ys[first])
        rest = prior_mask & ~common
        out[rest] = _interp_extended(prior[rest], xs, ys, src)
        out[common] = m
        return out, {"method": "histogram", "levels": int(levels), "match_points": int(match_points)}
    if method == "linear":
        q = np.arange(percentiles[0], percentiles[1] + 1e-9, percentiles[2])
        ps, pr = np.percentile(src, q), np.percentile(ref, q)
        a, b = np.polyfit(ps, pr, 1)
        out[prior_mask] = a * prior[prior_mask] + b
        return out, {"method": "linear", "slope": round(float(a), 5), "intercept": round(float(b), 4)}
    raise ValueError(f"intensity_match must be 'histogram' or 'linear', not {method!r}")


def differential_bias(current: np.ndarray, prior: np.ndarray, common: np.ndarray, spacing_zyx,
                      sigma_mm: float, exclude_z: float = 2.0,
                      fit: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Smooth multiplicative field F (current ~ F x prior) left after N4 and
    global matching (differential bias correction, Lewis & Fox, NeuroImage
    2004): Gaussian (sigma_mm) normalised convolution of log(current/prior)
    over the common brain (over ``fit`` when given: :func:`fit_region`; the
    field is carried into the rest by the convolution), leaving out voxels that
    changed (|robust z of the difference| > exclude_z) and dark voxels (< 20 %
    of the median). Returns (F on the whole grid, 1 outside the brain; record)."""
    med = float(np.median(current[common])) if common.any() else 0.0
    ok = (common if fit is None else fit) & (current > 0.2 * med) & (prior > 0.2 * med)
    if ok.sum() < 1000 or sigma_mm <= 0:
        return np.ones_like(current, dtype=np.float32), {"applied": False}
    z, _, _ = robust_z(current - prior, common)
    w = (ok & (np.abs(z) <= exclude_z)).astype(np.float32)
    lr = np.zeros_like(current, dtype=np.float32)
    lr[ok] = np.log(current[ok] / prior[ok])
    def smooth(a: np.ndarray) -> np.ndarray:  # recursive (IIR) Gaussian: cost independent of sigma
        img = sitk.GetImageFromArray(a.astype(np.float32))
        img.SetSpacing([float(v) for v in spacing_zyx[::-1]])
        return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma_mm)))

    num = smooth(lr * w)
    den = smooth(w)
    field = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
    field[~common] = 0.0
    f = np.exp(field).astype(np.float32)
    inside = f[common]
    return f, {"applied": True, "sigma_mm": sigma_mm,
               "field_percent_p5_p95": [round(100 * (float(np.percentile(inside, q)) - 1), 2) for q in (5, 95)]}


# ---------------------------------------------------------------------------
def voxel_extent_mm(native: sitk.Image, axes: np.ndarray) -> np.ndarray:
    """Width (mm) of one native voxel of ``native`` along each of ``axes``
    (3 unit vectors, rows, LPS): the projection of the oblique voxel box,
    sum_i |a . d_i| s_i (d_i, s_i: native direction cosines and spacing)."""
    d = np.array(native.GetDirection(), dtype=float).reshape(3, 3)  # columns = index axes
    s = np.array(native.GetSpacing(), dtype=float)
    return np.abs(axes @ d) @ s


def resolution_sigmas(current_mm: np.ndarray, prior_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis Gaussian sigmas (mm) that bring the finer timepoint to the
    coarser one's resolution: a voxel of width w blurs like a box of
    variance w^2/12, so sigma = sqrt((W^2 - w^2) / 12) where W = max of both.
    Returns (sigma for the current, sigma for the prior)."""
    target = np.maximum(current_mm, prior_mm)
    s_cur = np.sqrt(np.clip(target ** 2 - current_mm ** 2, 0, None) / 12.0)
    s_pri = np.sqrt(np.clip(target ** 2 - prior_mm ** 2, 0, None) / 12.0)
    return s_cur, s_pri


def smooth_mm(image: sitk.Image, sigma_mm: np.ndarray) -> sitk.Image:
    """Gaussian smoothing with per-axis sigma in mm along the image's axes
    (an axis with sigma below 0.05 mm is left alone)."""
    sigma = [float(v) for v in sigma_mm]
    if max(sigma) < 0.05:
        return image
    sigma = [max(v, 1e-3) for v in sigma]
    return sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)


def native_coverage(native: sitk.Image, grid: sitk.Image, transform: sitk.Transform,
                    margin_voxels: int = 1) -> np.ndarray:
    """Where the voxel centres of ``grid`` lie inside the field of view that the
    voxels of ``native`` actually cover (an acquisition's own grid, e.g. a
    prior's 5 mm axial FLAIR), less ``margin_voxels`` native voxels at each end
    of every native axis: one slice thickness along the slice axis, where the
    edge slice is partial volume with what was never imaged. ``transform`` maps
    ``grid`` physical points (LPS mm) to ``native`` physical points (the ITK
    fixed -> moving convention). Returns a (z, y, x) bool array on ``grid``."""
    size = list(native.GetSize())
    ones = np.zeros(size[::-1], np.uint8)
    m = int(max(0, margin_voxels))
    inner = tuple(slice(m, n - m) if n > 2 * m else slice(0, 0) for n in size[::-1])
    ones[inner] = 1
    img = sitk.GetImageFromArray(ones)
    img.CopyInformation(native)
    out = sitk.Resample(img, grid, transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out) > 0


# ---------------------------------------------------------------------------
@dataclass
class Candidate:
    """One new or growing lesion on the current grid."""

    kind: str                      # "new" | "growing"
    mask: np.ndarray = field(repr=False)   # (z, y, x) bool, the voxels labelled in lesions.nii.gz
    volume_mm3: float
    prior_volume_mm3: float
    peak_z: float
    sequence: str
    centroid_index: tuple[float, float, float]   # (x, y, z) continuous index
    confidence: float
    integrated_mm3: float | None = None   # new lesions: partial-volume integral of the subtraction (see find_lesions)


def _confidence(peak_z: float, volume_mm3: float, cfg) -> float:
    cz = 1.0 - np.exp(-max(0.0, peak_z - cfg.z_threshold) / cfg.confidence_z_scale)
    cv = 1.0 - np.exp(-max(0.0, volume_mm3) / cfg.confidence_volume_mm3)
    return round(float(np.clip(cz * cv, 0.0, 1.0)), 3)


def detection_region(brain: sitk.Image, margin_mm: float) -> np.ndarray:
    """Where lesion candidates may lie: ``brain`` (uint8 mask) eroded by
    ``margin_mm`` (a ball, at least one voxel per axis; 0 = no erosion), as a
    (z, y, x) bool array. The brain edge is partial volume of two resampled
    masks; so is the edge of the volume where the brain reaches it (a field of
    view cut through the cerebellum): outside the grid counts as not brain."""
    arr = sitk.GetArrayFromImage(brain) > 0
    if margin_mm <= 0:
        return arr
    radius = [max(1, int(round(margin_mm / s))) for s in brain.GetSpacing()]
    return sitk.GetArrayFromImage(sitk.BinaryErode(brain, radius, sitk.sitkBall, 0.0, 1.0, False)) > 0


def combined_evidence(flair: tuple[np.ndarray, np.ndarray], t2: tuple[np.ndarray, np.ndarray]
                      ) -> tuple[np.ndarray, dict]:
    """One T2-weighted evidence map from the FLAIR and T2 subtractions, as
    multi-sequence subtraction methods do (SuBLIME, Sweeney et al., AJNR 2013):
    a new T2/FLAIR lesion rises on both, the noise of two acquisitions does not
    add up, and a misregistered CSF edge rises on one and falls on the other
    (CSF is dark on FLAIR, bright on T2). ``flair``/``t2``: (robust z of the
    subtraction, where it is defined), (z, y, x) on one grid. Returns the robust
    z of their sum inside both (sd floored at sqrt(2), the sum of two independent
    unit-sd maps; 0 elsewhere) and a record (its robust sd, the two maps'
    correlation inside both)."""
    both = flair[1] & t2[1]
    total = np.where(both, flair[0] + t2[0], 0.0).astype(np.float32)
    z, _, sd = robust_z(total, both, float(np.sqrt(2.0)))
    corr = float(np.corrcoef(flair[0][both], t2[0][both])[0, 1]) if int(both.sum()) > 2 else None
    return z, {"robust_sd": round(float(sd), 4), "correlation": None if corr is None else round(corr, 3)}


def find_lesions(z_maps: dict[str, np.ndarray], prior_z: dict[str, np.ndarray], current_z: dict[str, np.ndarray],
                 brain: np.ndarray, current_lesion: np.ndarray, prior_lesion: np.ndarray, voxel_mm3: float,
                 cfg, segmentation_extent: bool = True, detect: np.ndarray | None = None,
                 spacing_zyx: tuple[float, float, float] | None = None,
                 min_current: dict[str, float] | None = None,
                 prior_voxel_z: dict[str, np.ndarray] | None = None) -> tuple[list[Candidate], dict]:
    """New and growing lesions.

    z_maps: robust z of each subtraction (role -> (z, y, x) array);
    prior_z / current_z: robust z of the matched prior / current image of
    each role (the false-positive rule; new signal must be bright now);
    brain: common brain mask; detect: where subtraction candidates may lie
    (default ``brain``; the caller keeps them off the brain edge); current_lesion /
    prior_lesion: the lesion masks of both timepoints on the current grid
    (segmentation, plus bright FLAIR in lesion mode).

    Candidate voxels S = z > z_threshold where the current image is bright
    (current z > current_min_z, or ``min_current[role]``), any role. Components (26-connected)
    of S | current_lesion | prior_lesion:

    * without prior lesion voxels: "new" unless the peak voxel (highest z) was
      already bright at the prior (Penn MS CAD: prior z, maximum within
      prior_bright_radius_mm, above prior_bright_z or above
      prior_bright_fraction x the current z there: a thin vessel blurred by
      resampling is not new) or
      the subtraction never reaches seg_support_z. Its extent: voxels with
      z >= max(z_threshold, volume_fraction_of_peak x 95th-percentile z), plus
      the current lesion voxels; kept when >= min_volume_mm3 (MUSIC).
    * with prior lesion voxels P: the current lesion there plus the new
      subtraction voxels outside P is the current volume v, p = |P|;
      "growing" when v - p > max(growth_fraction x p, growth_min_mm3) and the
      subtraction shows >= min_volume_mm3 of new voxels, and the subtraction
      rose on balance around them (see ``_net_rise``: a thin bright structure
      that moved or was blurred by resampling gives a rise on one side and a
      fall beside it, no net rise; a lesion that grew gives a net rise).
    segmentation_extent: True (tumour mode, lesion masks = segmentations):
    the current lesion voxels count in a lesion's extent and volume; False
    (lesion mode, lesion masks include bright FLAIR): a new lesion is its
    half-maximum subtraction region and a growing lesion's growth is the new
    subtraction voxels only (v = p + new voxels), as the bright masks of two
    differently blurred timepoints are not comparable voxel for voxel; with
    ``prior_voxel_z`` (role -> robust z of the matched prior image, voxel by
    voxel, not the neighbourhood maximum of ``prior_z``) a growing lesion
    whose new voxels were already bright at the prior by the new-lesion
    rule's own limit (their median prior z above min(prior_bright_z,
    prior_bright_fraction x their median current z)) is dropped as
    "bright_at_prior": a lesion, or a bright normal structure such as the
    septum pellucidum, that only grew brighter did not enlarge.
    A new lesion also gets ``integrated_mm3``: its volume as the integral of
    the subtraction over its extent dilated by ``new_volume_dilate_mm``,
    each voxel counting min(z / z_ref, 1) with z_ref the
    ``new_volume_reference_percentile`` of z inside the extent (the lesion's
    plateau contrast): partial-volume voxels count in part, noise cancels
    (no clipping at 0). spacing_zyx: voxel size in mm (default: isotropic
    from voxel_mm3).
    Returns (candidates, counts of what was dropped and why).
    """
    if spacing_zyx is None:
        spacing_zyx = (voxel_mm3 ** (1.0 / 3.0),) * 3
    roles = list(z_maps)
    zmax = np.max(np.stack([z_maps[r] for r in roles]), axis=0) if roles else np.zeros(brain.shape, np.float32)
    zarg = np.argmax(np.stack([z_maps[r] for r in roles]), axis=0) if roles else np.zeros(brain.shape, int)
    S = np.zeros(brain.shape, bool)
    for r in roles:
        S |= (z_maps[r] > cfg.z_threshold) & (current_z[r] > (min_current or {}).get(r, cfg.current_min_z))
    S &= brain if detect is None else (detect & brain)
    union = S | (current_lesion & brain) | (prior_lesion & brain)
    lab, n = ndimage.label(union, structure=STRUCTURE_26)
    min_vox = cfg.min_volume_mm3 / voxel_mm3
    dropped = {"below_min_volume": 0, "bright_at_prior": 0, "no_subtraction_support": 0, "not_grown": 0,
               "no_net_rise": 0}
    out: list[Candidate] = []
    if n == 0:
        return out, dropped
    slices = ndimage.find_objects(lab)
    for i, sl in enumerate(slices, start=1):
        comp = lab[sl] == i
        zc, sc = zmax[sl], S[sl]
        p_vox = prior_lesion[sl] & comp
        cur = current_lesion[sl] & comp
        if comp.sum() < min_vox:
            dropped["below_min_volume"] += 1
            continue
        support = comp & sc
        peak_z = float(zc[comp].max())
        if not p_vox.any():
            if peak_z < cfg.seg_support_z or not support.any():
                dropped["no_subtraction_support"] += 1
                continue
            zs = np.where(support, zc, -np.inf)
            pk = np.unravel_index(int(np.argmax(zs)), zs.shape)
            role = roles[int(zarg[sl][pk])]
            if float(prior_z[role][sl][pk]) > _prior_bright_limit(float(current_z[role][sl][pk]), cfg):
                dropped["bright_at_prior"] += 1
                continue
            level = max(cfg.z_threshold, cfg.volume_fraction_of_peak * float(np.percentile(zc[support], 95)))
            region = comp & (zc >= level)
            if segmentation_extent:
                region |= cur
            region = _largest_touching(region, pk)
            if region.sum() < min_vox:
                dropped["below_min_volume"] += 1
                continue
            vol = float(region.sum() * voxel_mm3)
            cand = _candidate("new", region, sl, lab.shape, vol, 0.0, peak_z, role, vol, cfg)
            cand.integrated_mm3 = _integrated_volume(z_maps[role][sl], region, brain[sl], voxel_mm3, spacing_zyx,
                                                     cfg)
            out.append(cand)
            continue
        grown = support & ~p_vox
        if grown.any():
            level = max(cfg.z_threshold, cfg.volume_fraction_of_peak * float(np.percentile(zc[grown], 95)))
            grown &= zc >= level
        region = (cur | grown) if segmentation_extent else (p_vox | grown)
        p = float(p_vox.sum() * voxel_mm3)
        v = float(region.sum() * voxel_mm3)
        new_vox = float((grown.sum()) * voxel_mm3)
        if v - p <= max(cfg.growth_fraction * p, cfg.growth_min_mm3) or new_vox < cfg.min_volume_mm3:
            dropped["not_grown"] += 1
            continue
        if (not segmentation_extent and prior_voxel_z
                and _grown_bright_at_prior(grown, zarg[sl], roles, prior_voxel_z, current_z, sl, cfg)):
            dropped["bright_at_prior"] += 1
            continue
        gz = np.where(grown, zc, -np.inf)
        pk = np.unravel_index(int(np.argmax(gz)), gz.shape)
        role = roles[int(zarg[sl][pk])]
        if not _net_rise(z_maps[role], grown, sl, brain, spacing_zyx, cfg):
            dropped["no_net_rise"] += 1
            continue
        out.append(_candidate("growing", region, sl, lab.shape, v, p, float(zc[pk]), role, v - p, cfg))
    return out, dropped


def _partial_volume_sum(z: np.ndarray, region: np.ndarray, brain: np.ndarray, spacing_zyx, dilate_mm: float,
                        percentile: float) -> float | None:
    """Sum of min(z / z_ref, 1) over ``region`` dilated by ``dilate_mm`` (a ball, mm) inside
    ``brain``, z_ref the ``percentile`` of z over ``region``; negatives count (noise and a fall
    beside a rise cancel). In voxels; None when ``region`` is empty or z_ref <= 0. Arrays on one
    (z, y, x) box; the dilation stops at its edge."""
    if not region.any():
        return None
    ref = float(np.percentile(z[region], percentile))
    if ref <= 0:
        return None
    around = ndimage.binary_dilation(region, structure=_ball(dilate_mm, spacing_zyx)) & brain
    return float(np.minimum(z[around] / ref, 1.0).sum())


def _integrated_volume(z: np.ndarray, region: np.ndarray, brain: np.ndarray, voxel_mm3: float, spacing_zyx,
                       cfg) -> float | None:
    """Partial-volume volume (mm^3) of a new lesion from its subtraction z (see find_lesions)."""
    total = _partial_volume_sum(z, region, brain, spacing_zyx, cfg.new_volume_dilate_mm,
                                cfg.new_volume_reference_percentile)
    return None if total is None else round(total * voxel_mm3, 1)


def _net_rise(z: np.ndarray, grown: np.ndarray, sl: tuple, brain: np.ndarray, spacing_zyx, cfg) -> bool:
    """Did the subtraction rise on balance where a lesion grew?

    z: robust z of the subtraction on the whole grid; grown: the growth voxels
    (a boolean array on the component's bounding box ``sl``). The partial-volume
    sum (:func:`_partial_volume_sum`, z_ref the 95th percentile of z over the
    growth) over the growth dilated by ``growth_net_dilate_mm`` (the box padded so
    the dilation is whole) is compared with the growth's voxel count: a lesion
    that grew adds about its growth, a thin bright structure shifted by residual
    misregistration or sharpened against a blurred prior (septum pellucidum,
    vessels) adds a fall next to each rise, about 0. True when the net sum is at
    least ``growth_net_fraction`` x the growth."""
    pad = [int(np.ceil(cfg.growth_net_dilate_mm / s)) + 1 for s in spacing_zyx]
    big = tuple(slice(max(0, a.start - p), min(n, a.stop + p)) for a, p, n in zip(sl, pad, z.shape))
    g = np.zeros(tuple(b.stop - b.start for b in big), bool)
    g[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, big))] = grown
    net = _partial_volume_sum(z[big], g, brain[big], spacing_zyx, cfg.growth_net_dilate_mm, 95.0)
    return net is not None and net >= cfg.growth_net_fraction * float(g.sum())


def _largest_touching(region: np.ndarray, peak: tuple) -> np.ndarray:
    """The 26-connected part of ``region`` holding ``peak`` (else the largest)."""
    lab, n = ndimage.label(region, structure=STRUCTURE_26)
    if n <= 1:
        return region
    k = lab[peak] if lab[peak] else int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    return lab == k


def _candidate(kind, region, sl, shape, vol, prior_vol, peak_z, role, size_for_conf, cfg) -> Candidate:
    full = np.zeros(shape, dtype=bool)
    full[sl] = region
    zc, yc, xc = (float(c.mean()) for c in np.nonzero(full))
    return Candidate(kind=kind, mask=full, volume_mm3=round(vol, 1), prior_volume_mm3=round(prior_vol, 1),
                     peak_z=round(peak_z, 2), sequence=role, centroid_index=(xc, yc, zc),
                     confidence=_confidence(peak_z, size_for_conf, cfg))


# ---------------------------------------------------------------------------
def axial_axis(direction) -> int:
    """The numpy (z, y, x) axis of a grid across which the patient's axial
    planes lie: the index axis whose direction (SimpleITK ``GetDirection()``,
    LPS) is closest to superior-inferior. Slices along it are the axial (or
    nearest-to-axial, for an oblique grid) planes RANO measures on."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)   # column k: direction of index axis k (x, y, z)
    return 2 - int(np.argmax(np.abs(d[2, :])))


def _prior_bright_limit(current_z: float, cfg) -> float:
    """The Penn MS CAD rule's limit: prior robust z above min(prior_bright_z,
    prior_bright_fraction x the current z) was already bright at the prior."""
    return min(cfg.prior_bright_z, cfg.prior_bright_fraction * current_z)


def _grown_bright_at_prior(grown: np.ndarray, role_index: np.ndarray, roles: list[str], prior_voxel_z: dict,
                           current_z: dict, sl: tuple[slice, ...], cfg) -> bool:
    """Whether a growing lesion's new voxels (bool, the box ``sl``) were
    already bright at the prior, as the new-lesion rule asks of a new
    lesion's peak: their median prior z (voxel by voxel, on the role whose
    subtraction is highest at each voxel, ``role_index`` into ``roles``)
    above min(prior_bright_z, prior_bright_fraction x their median current z)."""
    prior, now = [], []
    for k, role in enumerate(roles):
        at = grown & (role_index == k)
        if role in prior_voxel_z and at.any():
            prior.append(prior_voxel_z[role][sl][at])
            now.append(current_z[role][sl][at])
    if not prior:
        return False
    p, c = float(np.median(np.concatenate(prior))), float(np.median(np.concatenate(now)))
    return p > _prior_bright_limit(c, cfg)


def _ball(radius_mm: float, spacing_zyx) -> np.ndarray:
    r = [max(0, int(round(radius_mm / s))) for s in spacing_zyx]
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    return ((zz * spacing_zyx[0]) ** 2 + (yy * spacing_zyx[1]) ** 2 + (xx * spacing_zyx[2]) ** 2
            <= radius_mm ** 2 + 1e-6)


#: sub-pixel size (mm) at which a lesion's axial slice is measured (see _subpixel_bidimensional)
SUBPIXEL_MM = 0.25


def _subpixel_bidimensional(part: np.ndarray, z: np.ndarray, level: float, spacing: list[float]):
    """Bidimensional measurement of one lesion slice at sub-pixel resolution.

    On whole pixels an edge-to-edge diameter over-reads a small lesion by up
    to a pixel diagonal (a 9.8 mm disc on 2 mm pixels reads 11.6 mm). Here the
    subtraction ``z`` is interpolated (linear) onto sub-pixels of about
    :data:`SUBPIXEL_MM` (pixel centres kept: sub-pixel centres at i + (j +
    0.5)/f - 0.5) and thresholded at ``level`` (the lesion's half maximum)
    inside ``part`` dilated by one pixel; the piece holding the most
    sub-pixels is measured with :func:`pipelines.rano.bidimensional`."""
    f = max(1, int(np.ceil(max(spacing) / SUBPIXEL_MM)))
    near = ndimage.binary_dilation(part, structure=np.ones((3, 3), bool))
    rows, cols = np.nonzero(near)
    r = rows.min() + (np.arange((rows.max() - rows.min() + 1) * f) + 0.5) / f - 0.5
    c = cols.min() + (np.arange((cols.max() - cols.min() + 1) * f) + 0.5) / f - 0.5
    rr, cc = np.meshgrid(r, c, indexing="ij")
    values = ndimage.map_coordinates(z.astype(np.float32), [rr, cc], order=1, mode="nearest")
    inside = ndimage.map_coordinates(near.astype(np.uint8), [np.rint(rr), np.rint(cc)], order=0) > 0
    mask = inside & (values >= level)
    lab, n = ndimage.label(mask)
    if n > 1:
        mask = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    return bidimensional(mask, [s / f for s in spacing])


def new_lesion_enhancement(region: np.ndarray, z_t1c: np.ndarray, current_z_t1c: np.ndarray, brain: np.ndarray,
                           spacing_zyx, axial: int, cfg) -> dict:
    """Is a new lesion enhancing, and how large is its enhancing part in the
    axial plane (RANO: a new *measurable enhancing* lesion is progression)?

    ``region``: the lesion's voxels; ``z_t1c``: robust z of the T1c
    subtraction; ``current_z_t1c``: robust z of the current T1c image; all
    (z, y, x) on one grid of voxel size ``spacing_zyx`` (mm); ``axial``: the
    numpy axis across axial planes (:func:`axial_axis`).

    * **enhancing**: within the lesion dilated by ``new_volume_dilate_mm``,
      at least ``min_volume_mm3`` of voxels whose T1c rose (subtraction z >
      ``z_threshold``) and are bright now (current T1c z > ``current_min_z``),
      or the mean T1c subtraction z over the lesion is at least
      ``enhancing_mean_z`` and the lesion is brighter than the brain's median
      on the current T1c (mean robust z > 0): a small or faint enhancing lesion
      whose few voxels reach neither ``z_threshold`` nor ``current_min_z``
      (25 mm^3 at 20 % contrast: mean subtraction z 2.8, current z ~1); over a
      non-enhancing lesion the mean subtraction z is about 0;
    * **enhancing part**: those dilated-lesion voxels where the T1c
      subtraction reaches half its plateau (z >= 0.5 x the 95th percentile
      of z inside the lesion, and > ``current_min_z`` on the current T1c): the
      half-maximum edge of a partial-volume lesion is its true edge; the
      26-connected piece holding the strongest rise;
    * **diameters**: :func:`pipelines.rano.bidimensional` (long axis and the
      longest perpendicular, edge to edge, mm) on the axial slice where that
      part has the largest area, at sub-pixel resolution
      (:func:`_subpixel_bidimensional`); ``measurable`` when both are >= 10 mm.

    Returns ``{"enhancing", "enhancing_mm3", "long_axis_mm", "short_axis_mm",
    "measurable"}`` (diameters None when not enhancing)."""
    out = {"enhancing": False, "enhancing_mm3": 0.0, "long_axis_mm": None, "short_axis_mm": None,
           "measurable": False}
    if not region.any():
        return out
    voxel_mm3 = float(np.prod(spacing_zyx))
    around = ndimage.binary_dilation(region, structure=_ball(cfg.new_volume_dilate_mm, spacing_zyx)) & brain
    rose = around & (z_t1c > cfg.z_threshold) & (current_z_t1c > cfg.current_min_z)
    faint = (float(z_t1c[region].mean()) >= cfg.enhancing_mean_z
             and float(current_z_t1c[region].mean()) > 0.0)
    if rose.sum() * voxel_mm3 < cfg.min_volume_mm3 and not faint:
        return out
    plateau = float(np.percentile(z_t1c[region | rose], 95))
    part = around & (z_t1c >= 0.5 * plateau) & (current_z_t1c > cfg.current_min_z)
    peak = np.unravel_index(int(np.argmax(np.where(rose if rose.any() else region, z_t1c, -np.inf))), z_t1c.shape)
    lab, n = ndimage.label(part, structure=STRUCTURE_26)
    if lab[peak]:
        part = lab == lab[peak]
    out.update(enhancing=True, enhancing_mm3=round(float(part.sum()) * voxel_mm3, 1))
    if not part.any():
        return out
    planes = np.moveaxis(part, axial, 0)
    in_plane = [float(s) for k, s in enumerate(spacing_zyx) if k != axial]
    k = int(np.argmax(planes.reshape(planes.shape[0], -1).sum(axis=1)))
    m = _subpixel_bidimensional(planes[k], np.moveaxis(z_t1c, axial, 0)[k], 0.5 * plateau, in_plane)
    if m is not None:
        out.update(long_axis_mm=round(m.long_mm, 1), short_axis_mm=round(m.short_mm, 1),
                   measurable=bool(m.measurable))
    return out
