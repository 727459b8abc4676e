"""Volume change of a lesion by the boundary shift integral (BSI).

Freeborough & Fox, IEEE TMI 16:623 (1997) measured brain atrophy from the
*intensity* difference of a registered, intensity-normalised pair of scans,
integrated over the boundary region and clipped between the tissue and CSF
levels, instead of counting the voxels of two segmentations; Camara et al.
(NeuroImage 2008) and the later KN-BSI work keep that form. Applied to a
lesion that is brighter than the tissue around it (FLAIR oedema, enhancing
tumour on T1c):

    dV = voxel_mm3 * sum over the band E of [ f(current) - f(prior) ],
    f(v) = clip((v - lo) / (hi - lo), 0, 1),
    lo = t + window_low * (l - t),  hi = t + window_high * (l - t),

t the median of the brain away from the lesion (normal tissue), l the
median of the lesion (e.g. the oedema on FLAIR), both measured on the current
image; E = the voxels within ``band_out_mm`` outside the union of the two
lesion masks and within ``band_in_mm`` inside their intersection (so the
segmentations only say *where* to integrate, not *how much* changed). A voxel
that turned half lesion (partial volume, a soft edge) counts half; a
segmentation that differs between two unchanged scans adds nothing, because
the images did not change there.

Arrays are (z, y, x) on one grid (the current reference grid, cropped),
intensities in the units of the current image (the prior already matched to
it), distances in mm, volumes in mm^3.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .longitudinal_images import mask_box

__all__ = ["boundary_distances", "boundary_band", "boundary_shift"]


def boundary_distances(prior: np.ndarray, current: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray | None]:
    """(distance outside ``prior | current``, distance inside ``prior & current``),
    Euclidean, mm; the second is None when the masks do not overlap."""
    union, both = prior | current, prior & current
    outside = ndimage.distance_transform_edt(~union, sampling=spacing_zyx) if union.any() \
        else np.full(union.shape, np.inf)
    inside = ndimage.distance_transform_edt(both, sampling=spacing_zyx) if both.any() else None
    return outside, inside


def boundary_band(prior: np.ndarray, current: np.ndarray, spacing_zyx, out_mm: float, in_mm: float,
                  within: np.ndarray, distances: tuple | None = None) -> np.ndarray:
    """The boundary region E: ``within`` and at most ``out_mm`` outside
    ``prior | current`` and at most ``in_mm`` inside ``prior & current``
    (Euclidean distances in mm; bool arrays, same shape). ``distances``:
    :func:`boundary_distances` of the same masks, when already computed."""
    if distances is None:
        # only voxels within out_mm of the union can be in the band: the distances are taken on
        # the union's box widened by out_mm + one voxel (exact there: every union voxel is inside
        # it, and its outer layer is outside both masks), not on the whole grid
        box = mask_box([prior, current], spacing_zyx, out_mm + max(spacing_zyx))
        band = np.zeros(prior.shape, bool)
        if box is not None:
            band[box] = boundary_band(prior[box], current[box], spacing_zyx, out_mm, in_mm, within[box],
                                      boundary_distances(prior[box], current[box], spacing_zyx))
        return band
    outside, inside = distances
    band = outside <= out_mm
    if inside is not None:
        band &= ~(inside > in_mm)
    return band & within


def boundary_shift(current: np.ndarray, prior: np.ndarray, band: np.ndarray, tissue_level: float,
                   lesion_level: float, window: tuple[float, float], voxel_mm3: float) -> dict:
    """BSI of a bright lesion over ``band`` (see the module docstring).

    ``current`` / ``prior``: the two images on one grid, the prior
    intensity-matched to the current; ``tissue_level`` / ``lesion_level``:
    normal tissue and lesion intensity (current image units); ``window``:
    (low, high) as fractions of the way from tissue to lesion. Returns
    ``delta_mm3`` (growth > 0), ``gained_mm3`` / ``lost_mm3`` (sums of the
    positive / negative voxel terms) and the clip levels. A lesion not
    brighter than the tissue gives ``delta_mm3`` None (nothing to integrate)."""
    lo = tissue_level + window[0] * (lesion_level - tissue_level)
    hi = tissue_level + window[1] * (lesion_level - tissue_level)
    rec = {"tissue_level": round(float(tissue_level), 3), "lesion_level": round(float(lesion_level), 3),
           "clip_levels": [round(float(lo), 3), round(float(hi), 3)], "band_voxels": int(band.sum())}
    if not hi > lo:
        return {**rec, "delta_mm3": None, "gained_mm3": None, "lost_mm3": None}
    c = np.clip((current[band].astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    p = np.clip((prior[band].astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    d = c - p
    return {**rec, "delta_mm3": float(d.sum()) * voxel_mm3, "gained_mm3": float(d[d > 0].sum()) * voxel_mm3,
            "lost_mm3": float(-d[d < 0].sum()) * voxel_mm3}
