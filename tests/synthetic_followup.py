"""Synthetic follow-up pairs with known truth, made from the real shared cases (issue 11).

From one BraTS 2018 case (NIfTI t1, t1ce, t2, flair, seg; labels 1/2/4 -> BraTS 2023
1 NCR, 2 ED, 3 ET) this writes a *current* study and a *prior* study of the same
patient as BrainLine work folders, so that the image pipeline (register, skull_strip,
bias_correct, segment, summarize) and the longitudinal step run on them unchanged:

    OUT/<case>_<variant>/truth.json                  everything drawn, and the truth (below)
    OUT/<case>_<variant>/truth/labels_current.nii.gz  BraTS 2023 labels at the current timepoint (current grid)
    OUT/<case>_<variant>/truth/labels_prior.nii.gz    BraTS 2023 labels at the prior (prior grid)
    OUT/<case>_<variant>/truth/new_lesions.nii.gz     uint16 id map of the inserted new lesions (current grid)
    OUT/<case>_<variant>/truth/growth.nii.gz          uint8 label of the grown voxels (current grid; 2 ED, 3 ET)
    OUT/<case>_<variant>/truth/prior_to_current.tfm   the rigid motion (prior LPS point -> current LPS point)
    OUT/<case>_<variant>/current/nifti/<role>.nii.gz  the current study (roles t1, t1c, t2, flair)
    OUT/<case>_<variant>/current/priors.json          as the service's find_priors stage writes it
    OUT/<case>_<variant>/current/priors/0/nifti/<role>.nii.gz, prior.json   the prior study (unprocessed)

The truth lies outside the current work folder, so nothing the pipeline reads can see it.

Variants (``VARIANTS``):

* ``nochange``: the same anatomy at both timepoints;
* ``grown``:   the largest tumour component grows at the current timepoint: its core
  advances into the oedema, then the whole tumour into the brain (generator v5: a
  displacement of image and labels together along a smooth outward field, lobulated
  by a smooth random factor, so the visible edge moves with the label and the tissue
  beyond is pushed aside; constrained to the brain mask); truth = the growth of WT,
  TC, ET and ED in mm^3 (exact voxel counts of the truth label maps);
* ``new``:     1-4 new lesions of 15-500 mm^3 (log-uniform) inserted into the current
  timepoint inside white/grey matter (not CSF), >= 20 mm from the tumour and >= 5 mm
  inside the brain, smooth edges (1.5 mm linear ramp; the mask is the 0.5 level),
  FLAIR/T2/T1 like the case's edema, T1c enhancing (like its enhancing tumour) for
  about half of them; truth = per lesion mask id, volume (mm^3), centroid (LPS mm);
* ``thick``:   as ``new``, with the prior FLAIR resampled to 5 mm axial slices
  (boxcar slice profile): small-lesion detection is limited there;
* ``infiltrated``: as ``grown``, but the tumour grows *into* the tissue around it
  instead of pushing it aside: the displacement ends within INFILTRATION_TAPER_MM
  (+ the field's 1.5 mm smoothing) beyond the moved rim, so the tissue there stays
  where it was and the tissue the edge advanced over is overwritten by the lesion's
  profile (no mass effect). A registration that explains growth by moving the
  tissue finds little to move.

Every variant: the prior gets a random rigid motion (rotation about the brain centre
by 0.3-1 x ``max_rotation_deg`` around a random axis, translation of 0.3-1 x
``max_translation_mm`` in a random direction) on its own grid (the moved brain's
bounding box plus a margin; cubic B-spline interpolation, so the prior is as sharp
as the never-resampled current), a smooth multiplicative bias field (quadratic, 5-15 %)
different from the current's, an intensity drift (v -> gain * p99 * (v / p99)^gamma +
offset * p99 inside the head; gain 0.6-1.6, gamma 0.85-1.15, offset -0.02..0.04) and
independent Gaussian noise at both timepoints (``noise`` x the median brain intensity,
inside the head only, so the background stays exactly 0 and the inputs still look
skull-stripped). The current keeps the source grid.

Coordinates: physical space LPS in mm as SimpleITK reads the NIfTI files; arrays are
indexed (z, y, x). ``spacing_mm`` (an integer multiple of the source 1 mm, e.g. 2)
block-averages the source first (fast tests); truth volumes are then voxel counts of
that grid.

Every parameter comes from an RNG seeded by (seed, case, variant) and is written to
truth.json: the same arguments give the same files. CLI::

    python -m tests.synthetic_followup --out DIR [--cases 2013_11,CBICA_ABM] [--variants nochange,grown,new]
                                       [--seed 0] [--spacing 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from tests.corpus import (
    BRATS18_CASES,
    DEFAULT_DATA,
    HOLDOUT_CASES,
    TUNE_CASES,
    Grid,
    _bias_field,
    _key,
    _labels,
    _read_float,
    corpus_cases,
    sample,
)

GENERATOR_VERSION = 5                # 2: a grown region is painted with the fraction it gained (_grow_tumour)
                                     # 3: and the visible edge of the lesion moves out with its boundary
                                     # 4: new lesions only where every sequence has signal and where they
                                     #    come out brighter than the tissue there (_insert_lesions)
                                     # 5: growth is a displacement of image and labels (_grow_tumour):
                                     #    v2-v4's painted growth did not carry its truth (README);
                                     #    + variant "infiltrated" (stop 18; the others unchanged)
ROLES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
VARIANTS: tuple[str, ...] = ("nochange", "grown", "new", "thick", "infiltrated")
GROWN_VARIANTS: tuple[str, ...] = ("grown", "infiltrated")      # variants whose truth is a grown tumour
CASES: tuple[str, ...] = BRATS18_CASES
NCR, ED, ET = 1, 2, 3

PRIOR_DATE, CURRENT_DATE = "20240108", "20240702"
PRIOR_MARGIN_MM = 12.0               # prior grid: moved brain bounding box + this margin
BIAS_AMPLITUDE = (0.05, 0.15)        # relative amplitude of each bias field
GAIN = (0.6, 1.6)                    # prior drift
GAMMA = (0.85, 1.15)
OFFSET = (-0.02, 0.04)               # x p99 of the brain
NEW_LESION_MM3 = (15.0, 500.0)
NEW_LESION_COUNT = (1, 4)
LESION_EDGE_MM = 1.5                 # width of the linear ramp of a new lesion's contrast
TUMOUR_DISTANCE_MM = 20.0            # new lesions this far from the whole tumour at least
BRAIN_DEPTH_MM = 5.0                 # ... and this deep inside the brain (beyond their radius)
LESION_SPACING_MM = 10.0             # gap between two new lesions
LESION_MIN_CONTRAST = 0.05           # a new lesion's painted FLAIR (T1c if enhancing) >= (1 + this) x local tissue
LOCAL_TISSUE_MM = 3.0                # local tissue level: tissue-weighted Gaussian mean (sigma, mm)
WT_GROWTH = (0.10, 0.30)             # fraction of the grown component's WT volume
TC_GROWTH = (0.20, 0.50)             # fraction of its TC volume
GROWTH_ROUGHNESS = 0.35              # grown tumour: growth distance varies by +- this (smooth, 4 mm)
GROWTH_TAPER_MM = 10.0               # ... the displacement fades over this beyond the moved rim (mass effect)
CORE_RIM_MM = 2.0                    # the core's visible edge on T1c, moved with it
CORE_TAPER_MM = 6.0                  # ... its displacement fades over this into the oedema
EDGE_PROFILE_MM = (-4.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)   # truth.json edge profiles: shells (mm)
THICK_MM = 5.0
LESION_TEXTURE_SCALE = 0.3           # painted texture SD of a new lesion = this x its label's robust CV
TEXTURE_MM = 2.0                     # smoothing of the painted texture (Gaussian sigma)
RIM_MAX_MM = 8.0                     # grown tumour: its visible edge (up to this far outside the label) moves with it
INFILTRATION_TAPER_MM = 1.0          # infiltrated: the displacement ends this close beyond the moved rim


@dataclass
class FollowupPair:
    """One generated pair: folders and the truth dict (truth.json)."""

    root: Path
    truth: dict = field(repr=False)

    @property
    def current(self) -> Path:
        """The current study's work folder (run the image STEPS and the longitudinal step here)."""
        return self.root / "current"

    @property
    def prior(self) -> Path:
        return self.root / "current" / "priors" / "0"

    @property
    def case_id(self) -> str:
        return self.truth["case_id"]

    @property
    def variant(self) -> str:
        return self.truth["variant"]

    def truth_image(self, name: str) -> sitk.Image:
        """``labels_current``, ``labels_prior``, ``new_lesions`` or ``growth``."""
        return sitk.ReadImage(str(self.root / "truth" / f"{name}.nii.gz"))

    def prior_to_current(self) -> sitk.Transform:
        return sitk.ReadTransform(str(self.root / "truth" / "prior_to_current.tfm"))


def pair_name(case_id: str, variant: str) -> str:
    return f"{case_id}_{variant}"


def load_pair(root: Path | str) -> FollowupPair:
    root = Path(root)
    return FollowupPair(root, json.loads((root / "truth.json").read_text()))


# --------------------------------------------------------------------------- small helpers


def _image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(like)
    return out


def _write(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def _grid(image: sitk.Image) -> Grid:
    return Grid(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                tuple(image.GetDirection()))


def _physical(image: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """LPS mm of (N, 3) voxel indices given in (z, y, x) order."""
    ijk = np.asarray(zyx, float)[:, ::-1]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (ijk * np.array(image.GetSpacing())) @ direction.T


def _spacing_zyx(image: sitk.Image) -> tuple[float, float, float]:
    return tuple(image.GetSpacing()[::-1])


def _voxel_mm3(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian-smoothed white noise with zero mean and unit SD."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    sd = float(f.std())
    return (f - float(f.mean())) / sd if sd > 0 else f


def _bbox(mask: np.ndarray, margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def volumes_ml(labels: np.ndarray, voxel_mm3: float) -> dict[str, float]:
    """BraTS 2023 volumes in mL, keyed like summary.json's ``volumes_ml``."""
    v = voxel_mm3 / 1000.0
    out = {str(k): round(float((labels == k).sum()) * v, 4) for k in (NCR, ED, ET)}
    out["tumor_core"] = round(float(np.isin(labels, (NCR, ET)).sum()) * v, 4)
    out["whole_tumor"] = round(float((labels > 0).sum()) * v, 4)
    return out


# --------------------------------------------------------------------------- source


def load_source(case_id: str, data_root: Path | str = DEFAULT_DATA,
                spacing_mm: float | None = None) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """The case's four sequences (float32) and BraTS 2023 labels (uint8) on the source
    1 mm grid, or block-averaged to ``spacing_mm`` (an integer multiple of 1 mm; labels
    by nearest neighbour at the block centres)."""
    case = corpus_cases(data_root, [case_id])[0]
    images = {r: _read_float(str(case.images[r])) for r in ROLES}
    labels = _labels(str(case.reference))
    if spacing_mm and spacing_mm > 1.0:
        factor = int(round(spacing_mm / min(labels.GetSpacing())))
        if factor > 1:
            images = {r: sitk.BinShrink(im, [factor] * 3) for r, im in images.items()}
            ref = next(iter(images.values()))
            labels = sitk.Resample(labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return images, labels


def _label_stats(arrays: dict[str, np.ndarray], labels: np.ndarray) -> dict[int, dict[str, tuple[float, float]]]:
    """Per label, per role: (median, robust coefficient of variation capped at 0.25)."""
    out: dict[int, dict[str, tuple[float, float]]] = {}
    for lab in (NCR, ED, ET):
        mask = labels == lab
        if mask.sum() < 20:
            continue
        out[lab] = {}
        for role, a in arrays.items():
            v = a[mask]
            v = v[v > 0]
            if v.size < 20:
                continue
            med = float(np.median(v))
            cv = 1.4826 * float(np.median(np.abs(v - med))) / med if med > 0 else 0.0
            out[lab][role] = (med, min(cv, 0.25))
    return out


def _paint(arrays: dict[str, np.ndarray], weight: np.ndarray, box: tuple[slice, ...],
           targets: dict[str, tuple[float, float]], rng: np.random.Generator, sigma_vox,
           texture_scale: float) -> None:
    """Blend, inside ``box``, every role towards its target texture:
    ``v = (1 - w) v + w median (1 + texture_scale cv f)`` with f a smooth unit-SD
    random field (the added noise brings back the fine-grained part)."""
    shape = weight.shape
    for role, (med, cv) in targets.items():
        texture = med * (1.0 + texture_scale * cv * _smooth_field(rng, shape, sigma_vox))
        sub = arrays[role][box]
        arrays[role][box] = np.where(weight > 0, (1.0 - weight) * sub + weight * texture, sub).astype(np.float32)


# --------------------------------------------------------------------------- growth


def _levels(arrays: dict[str, np.ndarray], labels: np.ndarray, brain: np.ndarray, spacing_zyx,
            stats: dict) -> dict[str, tuple[float, float]]:
    """The tissue and lesion levels the growth is measured against (source image units):
    ``"wt"``: FLAIR of the brain more than 5 mm from any tumour, and the case's edema
    median; ``"tc"``: T1c of the edema (what an advancing core replaces), and the
    median of the case's enhancing tumour (absent when the case has none)."""
    out = {}
    wt = labels > 0
    far = brain & ~wt & (ndimage.distance_transform_edt(~wt, sampling=spacing_zyx) > 5.0)
    if ED in stats and "flair" in stats[ED] and far.sum() > 1000:
        out["wt"] = (float(np.median(arrays["flair"][far])), stats[ED]["flair"][0])
    if ED in stats and ET in stats and "t1c" in stats[ED] and "t1c" in stats[ET]:
        out["tc"] = (stats[ED]["t1c"][0], stats[ET]["t1c"][0])
    return out


def _outward_field(rng: np.random.Generator, region: np.ndarray, spacing_zyx, rim_mm: float,
                   taper_mm: float, infiltrate: bool = False) -> tuple[np.ndarray, float]:
    """A smooth displacement field pointing out of ``region`` (bool, (z, y, x)), in mm per
    unit of the growth distance: (3,) + shape, components (z, y, x).

    Its size along the outward normal (the gradient of the signed distance to the
    region's boundary, smoothed 1 mm) is 1 from ``t_in`` inside the boundary to
    ``rim_mm`` outside it (the lesion and its visible edge move out together), falling
    linearly to 0 deeper inside (over ``t_in`` = 0.8 x the region's depth, at most 8 mm:
    the interior stretches) and beyond (over ``taper_mm``: the tissue there is pushed
    aside), times a smooth random factor 1 +- 0.35 (4 mm; lobulated growth); each
    component smoothed by a 1.5 mm Gaussian. Returns the field and the largest growth
    distance (mm) that keeps the map monotone along the normal (0.7 x the shorter ramp
    / the factor's maximum; ``infiltrate``: 0.7 x the inner ramp / the maximum, the
    outer ramp may be shorter than the growth: the tissue the rim advances over is
    overwritten, the ``infiltrated`` variant)."""
    d_out = ndimage.distance_transform_edt(~region, sampling=spacing_zyx)
    d_in = ndimage.distance_transform_edt(region, sampling=spacing_zyx)
    signed = (d_out - d_in).astype(np.float32)
    t_in = float(max(min(8.0, 0.8 * float(d_in.max())), 2.0 * min(spacing_zyx)))
    weight = np.where(signed < 0, np.clip(1.0 + signed / t_in, 0.0, 1.0),
                      np.clip(1.0 - (signed - rim_mm) / taper_mm, 0.0, 1.0)).astype(np.float32)
    smooth = ndimage.gaussian_filter(signed, [1.0 / s for s in spacing_zyx])
    grad = np.gradient(smooth, *spacing_zyx)
    norm = np.sqrt(sum(g * g for g in grad))
    factor = 1.0 + GROWTH_ROUGHNESS * np.clip(_smooth_field(rng, region.shape, [4.0 / s for s in spacing_zyx]),
                                              -2.0, 2.0)
    sigma = [1.5 / s for s in spacing_zyx]
    field_ = np.stack([ndimage.gaussian_filter(weight * factor * g / np.maximum(norm, 1e-6), sigma)
                       for g in grad]).astype(np.float32)
    ramp = t_in if infiltrate else min(t_in, taper_mm)
    return field_, 0.7 * ramp / float(factor.max())


def _warp(values: np.ndarray, displacement_mm: np.ndarray, spacing_zyx, order: int) -> np.ndarray:
    """``values`` pulled along the displacement: out(x) = values(x - displacement(x))
    (spline of ``order``; 0 = nearest, for labels)."""
    grid = np.indices(values.shape, dtype=np.float32)
    coords = [grid[i] - displacement_mm[i] / spacing_zyx[i] for i in range(3)]
    out = ndimage.map_coordinates(values, coords, order=order, mode="nearest", prefilter=order > 1)
    return out.astype(values.dtype)


def _displace_to(rng: np.random.Generator, region: np.ndarray, n_voxels: int, spacing_zyx, rim_mm: float,
                 taper_mm: float, infiltrate: bool = False) -> tuple[np.ndarray, float]:
    """The displacement (mm, (3,) + shape) that grows ``region`` by about ``n_voxels``
    (bisection of the growth distance along :func:`_outward_field`, 12 steps, capped at
    the monotone limit), and that distance (mm)."""
    unit, limit = _outward_field(rng, region, spacing_zyx, rim_mm, taper_mm, infiltrate)
    target = int(region.sum()) + n_voxels
    lo, hi = 0.0, limit
    if (_warp(region.astype(np.uint8), hi * unit, spacing_zyx, 0) > 0).sum() <= target:
        return hi * unit, hi
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        if (_warp(region.astype(np.uint8), mid * unit, spacing_zyx, 0) > 0).sum() < target:
            lo = mid
        else:
            hi = mid
    s = 0.5 * (lo + hi)
    return s * unit, s


def _edge_profile(values: np.ndarray, region: np.ndarray, within: np.ndarray, spacing_zyx,
                  distances_mm: Sequence[float] = EDGE_PROFILE_MM, shell_mm: float = 1.0) -> list[float | None]:
    """Median of ``values`` in shells ``shell_mm`` thick centred at signed distances (mm;
    < 0 inside) from the boundary of ``region``, inside ``within`` (None where a shell
    has < 20 voxels)."""
    signed = (ndimage.distance_transform_edt(~region, sampling=spacing_zyx)
              - ndimage.distance_transform_edt(region, sampling=spacing_zyx))
    out: list[float | None] = []
    for d in distances_mm:
        sel = within & (signed > d - shell_mm / 2.0) & (signed <= d + shell_mm / 2.0)
        out.append(round(float(np.median(values[sel])), 2) if sel.sum() >= 20 else None)
    return out


def _grow_tumour(rng, arrays, labels, brain, image, stats,
                 infiltrate: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Grow the largest whole-tumour component, then its core (generator v5).
    ``infiltrate`` (variant ``infiltrated``): the displacement ends within
    INFILTRATION_TAPER_MM beyond the moved rim instead of GROWTH_TAPER_MM /
    CORE_TAPER_MM: no mass effect, the tissue the edge advances over is overwritten.

    Growth is a displacement, as a lesion that expands moves its whole visible
    profile out: the image and the label map are pulled along a smooth outward field
    (:func:`_outward_field`). First the core (TC) grows into the oedema by about
    TC_GROWTH of its volume (its edge and CORE_RIM_MM beyond move by the growth
    distance, fading over CORE_TAPER_MM). Then the whole tumour: its edge and visible
    rim (up to RIM_MAX_MM outside the label: the BraTS labels end inside the visible
    hyperintensity) move out, the interior stretches and the tissue beyond is pushed
    aside over GROWTH_TAPER_MM (mass effect), until the WT has grown by WT_GROWTH of
    the component's source volume. Distances by bisection. Everything stays inside the
    brain mask (label voxels outside it are cleared; the image outside the head is
    zeroed by the caller). Truth = exact voxel counts of the label maps. Images: cubic
    spline; labels: nearest. Because intensities move with the labels, the image
    keeps its profile across the moved boundary (``edge_profiles``: medians in 1 mm
    shells at signed distances from the label, before and after). Generators v2-v4
    painted the grown voxels instead; the image change they made in the boundary band
    was 0.72-1.35 (WT, FLAIR) and 0.55-1.18 (TC, T1c) of the grown voxel count on the
    12 cases, noiseless (README)."""
    spacing = _spacing_zyx(image)
    step = float(min(spacing))
    vox = _voxel_mm3(image)
    wt = labels > 0
    cc, n = ndimage.label(wt, structure=np.ones((3, 3, 3)))
    sizes = ndimage.sum(np.ones_like(cc), cc, index=np.arange(1, n + 1))
    comp = cc == (int(np.argmax(sizes)) + 1)
    wt_frac = float(rng.uniform(*WT_GROWTH))
    tc_frac = float(rng.uniform(*TC_GROWTH))
    tc = comp & np.isin(labels, (NCR, ET))
    levels = _levels(arrays, labels, brain, spacing, stats)

    margin = int(math.ceil((RIM_MAX_MM + GROWTH_TAPER_MM + 12.0) / step))
    box = _bbox(comp, margin, labels.shape)
    before = {r: a[box].copy() for r, a in arrays.items()}       # the source where it changes
    new_labels = labels.copy()
    distance = {}
    # the core first (into the oedema; where the oedema is thin it pushes the whole tumour's edge too),
    # then the whole tumour, to its requested volume counted from the source
    for key, rim, taper in (("tumor_core", CORE_RIM_MM, CORE_TAPER_MM), ("whole_tumor", RIM_MAX_MM, GROWTH_TAPER_MM)):
        if key == "tumor_core":
            region, n_voxels = tc[box], int(round(tc_frac * tc.sum()))
        else:                       # the component as it is now (the core's push moved it by < 6 mm)
            near = ndimage.binary_dilation(comp[box], iterations=int(math.ceil(6.0 / step)))
            region = near & (new_labels[box] > 0)
            n_voxels = int(comp.sum()) + int(round(wt_frac * comp.sum())) - int(region.sum())
        if not region.any() or n_voxels <= 0:
            continue
        taper = INFILTRATION_TAPER_MM if infiltrate else taper
        disp, distance[key] = _displace_to(rng, region, n_voxels, spacing, rim, taper, infiltrate)
        for role in arrays:
            arrays[role][box] = np.maximum(_warp(arrays[role][box], disp, spacing, 3), 0.0)
        warped = _warp(new_labels[box], disp, spacing, 0)
        warped[~brain[box]] = 0
        new_labels[box] = warped

    growth = np.where(((new_labels > 0) & ~wt) | (np.isin(new_labels, (NCR, ET)) & ~np.isin(labels, (NCR, ET))),
                      new_labels, 0).astype(np.uint8)
    # the visible edge moved with the label: the image's median profile across the boundary, before and after
    profiles = {}
    for key, role, comp_labels in (("whole_tumor", "flair", (NCR, ED, ET)), ("tumor_core", "t1c", (NCR, ET))):
        within = brain[box]
        profiles[key] = {"role": role,
                         "prior": _edge_profile(before[role], np.isin(labels[box], comp_labels), within, spacing),
                         "current": _edge_profile(arrays[role][box], np.isin(new_labels[box], comp_labels), within,
                                                  spacing)}
    centroid = _physical(image, np.argwhere(comp).mean(axis=0, keepdims=True))[0]
    info = {
        "component_centroid_lps_mm": [round(float(c), 2) for c in centroid],
        "component_prior_mm3": {"whole_tumor": round(float(comp.sum()) * vox, 1),
                                "tumor_core": round(float(tc.sum()) * vox, 1)},
        "requested_fraction": {"whole_tumor": round(wt_frac, 4), "tumor_core": round(tc_frac, 4)},
        "growth_distance_mm": {k: round(float(v), 3) for k, v in distance.items()},
        "levels": {k: [round(float(v), 3) for v in lv] for k, lv in levels.items()},
        # median of the noiseless source (before motion, bias and drift) in 1 mm shells at these signed
        # distances (mm, < 0 inside) from the label's boundary, at the prior and now: the same when the
        # visible edge moved with the label
        "edge_profile_mm": list(EDGE_PROFILE_MM),
        "edge_profiles": profiles,
        "method": "displacement growth: image and labels pulled along a smooth outward field that moves the "
                  "tumour's edge and visible rim out by the growth distance (bisection to the requested "
                  "volume; +-35 % lobulation, 4 mm), stretching the interior and "
                  + ("overwriting the tissue the rim advances over (infiltration, no mass effect)" if infiltrate
                     else "pushing the tissue beyond aside")
                  + "; the core first (into the oedema), then the whole tumour; inside the brain mask",
        "infiltrating": infiltrate,
    }
    return new_labels, growth, info


# --------------------------------------------------------------------------- new lesions


def _tissue_mask(arrays: dict[str, np.ndarray], brain: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Brain white/grey matter: not CSF (T1 or FLAIR dark), not tumour."""
    inside = brain & (labels == 0)
    t1, fl = arrays["t1"], arrays["flair"]
    csf = (t1 < np.percentile(t1[inside], 15)) | (fl < np.percentile(fl[inside], 12))
    csf = ndimage.binary_dilation(csf & brain, iterations=1)
    return inside & ~csf


def _local_levels(arrays: dict[str, np.ndarray], tissue: np.ndarray, spacing_zyx) -> dict[str, np.ndarray]:
    """FLAIR and T1c level of the tissue around each voxel: Gaussian (LOCAL_TISSUE_MM) mean of
    the ``tissue`` voxels only (source image units; inf where no tissue is near)."""
    sigma = [LOCAL_TISSUE_MM / s for s in spacing_zyx]
    weight = ndimage.gaussian_filter(tissue.astype(np.float32), sigma)
    out = {}
    for role in ("flair", "t1c"):
        if role in arrays:
            total = ndimage.gaussian_filter(np.where(tissue, arrays[role], 0.0).astype(np.float32), sigma)
            out[role] = np.where(weight > 1e-3, total / np.maximum(weight, 1e-3), np.inf)
    return out


def _insert_lesions(rng, arrays, labels, brain, image, stats, n: int | None = None,
                    volumes: Sequence[float] | None = None) -> tuple[np.ndarray, list[dict]]:
    spacing = np.array(_spacing_zyx(image))
    vox = _voxel_mm3(image)
    shape = labels.shape
    # v4: only where every sequence imaged the brain (BraTS 2013_20's FLAIR is 0 in a third of it)
    signal = np.logical_and.reduce([arrays[r] > 0 for r in ROLES if r in arrays])
    tissue = _tissue_mask(arrays, brain, labels) & signal
    tissue_level = _local_levels(arrays, tissue, spacing)
    # distance maps (mm) on the brain's bounding box only (+ a 1-voxel zero border)
    crop = _bbox(brain, 1, shape)
    depth = np.zeros(shape, np.float32)
    from_tumour = np.zeros(shape, np.float32)
    tissue_depth = np.zeros(shape, np.float32)
    depth[crop] = ndimage.distance_transform_edt(brain[crop], sampling=spacing)
    tissue_depth[crop] = ndimage.distance_transform_edt(tissue[crop], sampling=spacing)
    tumour_free = labels[crop] == 0
    from_tumour[crop] = ndimage.distance_transform_edt(tumour_free, sampling=spacing) if not tumour_free.all() \
        else np.inf
    if n is None:
        n = int(rng.integers(NEW_LESION_COUNT[0], NEW_LESION_COUNT[1] + 1))
    if volumes is None:
        volumes = np.exp(rng.uniform(math.log(NEW_LESION_MM3[0]), math.log(NEW_LESION_MM3[1]), size=n))
    ids = np.zeros(shape, np.uint16)
    lesions: list[dict] = []
    placed: list[tuple[np.ndarray, float]] = []
    for k, volume in enumerate(volumes, start=1):
        ratios = rng.uniform(0.75, 1.35, size=3)
        r_eq = (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0)
        axes = r_eq * ratios / float(np.prod(ratios)) ** (1.0 / 3.0)       # same volume
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        a, b, c, d = q
        rot = np.array([[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)],
                        [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                        [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]])
        r_max = float(axes.max())
        enhancing = bool(rng.random() < 0.5)
        targets = dict(stats[ED])
        if enhancing:  # the case's enhancing tumour, else the 99th T1c percentile of the brain
            targets["t1c"] = stats[ET]["t1c"] if "t1c" in stats.get(ET, {}) else \
                (float(np.percentile(arrays["t1c"][brain], 99)), 0.1)
        ok = ((tissue_depth >= r_max * 0.8 + 1.0) & (depth >= r_max + BRAIN_DEPTH_MM)
              & (from_tumour >= TUMOUR_DISTANCE_MM + r_max))
        # v4: a FLAIR lesion is hyperintense (an enhancing one on T1c too): not where the tissue is
        # already as bright as the level painted (BraTS 2013_11's oedema is darker than its white matter)
        # (the brightest local level over the lesion's box and 2 mm beyond: its whole surroundings)
        reach = np.maximum(1, 2 * np.ceil((r_max + 2.0) / spacing).astype(int) + 1)
        for role in ("flair", "t1c") if enhancing else ("flair",):
            if role in targets and role in tissue_level:
                brightest = ndimage.maximum_filter(tissue_level[role], size=tuple(int(v) for v in reach))
                ok &= brightest * (1.0 + LESION_MIN_CONTRAST) <= targets[role][0]
        cand = np.argwhere(ok)
        centre = None
        for _ in range(200):
            if cand.size == 0:
                break
            c_vox = cand[int(rng.integers(len(cand)))]
            c_mm = c_vox * spacing
            if all(np.linalg.norm(c_mm - p) >= r_max + r + LESION_SPACING_MM for p, r in placed):
                centre = c_vox
                break
        if centre is None:
            continue
        placed.append((centre * spacing, r_max))
        half = np.ceil((r_max + LESION_EDGE_MM + 2.0) / spacing).astype(int)
        box = tuple(slice(max(0, int(c - h)), min(s, int(c + h + 1))) for c, h, s in zip(centre, half, shape))
        zz, yy, xx = np.meshgrid(*[np.arange(sl.start, sl.stop) for sl in box], indexing="ij")
        offsets = np.stack([zz - centre[0], yy - centre[1], xx - centre[2]], axis=-1) * spacing  # mm (z, y, x)
        # random sub-voxel centre so that small lesions are not all voxel-symmetric
        offsets = offsets - rng.uniform(-0.5, 0.5, size=3) * spacing
        local = offsets @ rot                                           # ellipsoid frame
        r_norm = np.sqrt(((local / axes) ** 2).sum(axis=-1))
        free = ids[box] == 0
        n_vox = max(1, int(round(volume / vox)))
        order = np.argsort(np.where(free, r_norm, np.inf).ravel(), kind="stable")
        s = float(r_norm.ravel()[order[n_vox - 1]])
        if n_vox < order.size:
            s = 0.5 * (s + float(r_norm.ravel()[order[n_vox]]))          # the 0.5 level between the two
        mask = np.zeros(r_norm.size, bool)
        mask[order[:n_vox]] = True
        mask = mask.reshape(r_norm.shape)
        weight = np.clip(0.5 + (s - r_norm) * r_eq / LESION_EDGE_MM, 0.0, 1.0).astype(np.float32)
        weight = np.where(ids[box] == 0, weight, 0.0).astype(np.float32)
        weight[mask] = np.maximum(weight[mask], 0.5)
        _paint(arrays, weight, box, targets, rng, [TEXTURE_MM / sp for sp in spacing],
               texture_scale=LESION_TEXTURE_SCALE)
        ids[box][mask] = k
        zyx = np.argwhere(ids == k)
        centroid = _physical(image, zyx).mean(axis=0)
        lesions.append({
            "id": k, "requested_mm3": round(float(volume), 2), "volume_mm3": round(float(mask.sum()) * vox, 2),
            "voxels": int(mask.sum()), "centroid_lps_mm": [round(float(v), 2) for v in centroid],
            "semi_axes_mm": [round(float(v), 2) for v in axes], "enhancing": enhancing,
            "distance_to_tumour_mm": round(float(from_tumour[tuple(centre)]), 1),
            "depth_in_brain_mm": round(float(depth[tuple(centre)]), 1),
        })
    return ids, lesions


# --------------------------------------------------------------------------- motion and intensities


def _draw_motion(rng: np.random.Generator, centre: np.ndarray, max_rotation_deg: float,
                 max_translation_mm: float) -> tuple[sitk.Euler3DTransform, dict]:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = float(rng.uniform(0.3, 1.0)) * max_rotation_deg
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    shift = direction * float(rng.uniform(0.3, 1.0)) * max_translation_mm
    versor = sitk.VersorRigid3DTransform()
    versor.SetCenter([float(c) for c in centre])
    versor.SetRotation([float(a) for a in axis], math.radians(angle))
    versor.SetTranslation([float(t) for t in shift])
    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(c) for c in centre])
    euler.SetMatrix(versor.GetMatrix())
    euler.SetTranslation(versor.GetTranslation())
    return euler, {"rotation_axis": [round(float(a), 5) for a in axis], "rotation_deg": round(angle, 3),
                   "translation_mm": [round(float(t), 3) for t in shift],
                   "translation_norm_mm": round(float(np.linalg.norm(shift)), 3),
                   "centre_lps_mm": [round(float(c), 3) for c in centre],
                   "euler_parameters": [round(float(p), 6) for p in euler.GetParameters()],
                   "meaning": "prior_to_current maps a point of the prior's physical space (LPS mm) to the "
                              "point of the same anatomy in the current's; registering the prior (moving) to "
                              "the current (fixed) should recover its inverse"}


def _prior_grid(image: sitk.Image, brain: np.ndarray, motion: sitk.Transform) -> sitk.Image:
    """Axis-aligned grid (source spacing and direction) holding the moved brain plus a margin."""
    pts = _physical(image, np.argwhere(brain)[::7])
    inverse = motion.GetInverse()
    moved = np.array([inverse.TransformPoint([float(v) for v in p]) for p in pts[:: max(1, len(pts) // 20000)]])
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # extent along each grid axis
    proj = moved @ direction
    lo_g, hi_g = proj.min(axis=0) - PRIOR_MARGIN_MM, proj.max(axis=0) + PRIOR_MARGIN_MM
    size = [int(math.ceil((h - l) / s)) + 1 for l, h, s in zip(lo_g, hi_g, spacing)]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin([float(v) for v in direction @ lo_g])
    return ref


def _smooth_bias(grid: Grid, values: np.ndarray, coefficients, amplitude: float, centre: np.ndarray,
                 step: int = 4) -> np.ndarray:
    """tests.corpus._bias_field (quadratic, max |f| = 1 over the head) evaluated on
    every ``step``-th voxel and linearly interpolated: the same smooth field, 20x cheaper."""
    coarse_values = values[::step, ::step, ::step]
    coarse = Grid(tuple(coarse_values.shape[::-1]), tuple(s * step for s in grid.spacing), grid.origin,
                  grid.direction)
    field_img = sitk.GetImageFromArray(_bias_field(coarse, coarse_values, coefficients, amplitude, centre))
    field_img.SetSpacing(coarse.spacing)
    field_img.SetOrigin(coarse.origin)
    field_img.SetDirection(coarse.direction)
    ref = sitk.Image([int(v) for v in grid.size], sitk.sitkFloat32)
    ref.SetSpacing(grid.spacing)
    ref.SetOrigin(grid.origin)
    ref.SetDirection(grid.direction)
    # extrapolate at the far border (beyond the last coarse sample) with the nearest coarse value
    full = sitk.Resample(field_img, ref, sitk.Transform(), sitk.sitkLinear, 1.0, sitk.sitkFloat32, True)
    return sitk.GetArrayFromImage(full)


def _intensity(rng: np.random.Generator, values: np.ndarray, grid: Grid, centre: np.ndarray, *,
               bias: tuple[float, float], drift: bool, noise: float) -> tuple[np.ndarray, dict]:
    """Bias field, optional drift, noise; inside the head only (> 0); background stays 0."""
    head = values > 0
    amplitude = float(rng.uniform(*bias)) if bias[1] > 0 else 0.0
    coefficients = rng.normal(size=9)
    out = values.astype(np.float32)
    if amplitude > 0:
        out = out * _smooth_bias(grid, out, coefficients, amplitude, centre)
    record = {"bias_amplitude": round(amplitude, 4), "bias_coefficients": [round(float(c), 5) for c in coefficients]}
    p99 = float(np.percentile(out[head], 99)) if head.any() else 1.0
    if drift:
        gain, gamma, offset = float(rng.uniform(*GAIN)), float(rng.uniform(*GAMMA)), float(rng.uniform(*OFFSET))
        v = np.clip(out[head], 0.0, None) / p99
        out[head] = (gain * p99 * v ** gamma + offset * p99).astype(np.float32)
        record.update(gain=round(gain, 4), gamma=round(gamma, 4), offset_of_p99=round(offset, 4),
                      p99_before=round(p99, 3))
    sd = noise * float(np.median(out[head])) if head.any() and noise > 0 else 0.0
    if sd > 0:
        out[head] += rng.normal(0.0, sd, size=int(head.sum())).astype(np.float32)
    floor = 0.005 * p99
    out[head] = np.maximum(out[head], floor)
    record["noise_sd"] = round(sd, 4)
    return out, record


def _move(image: sitk.Image, grid: sitk.Image, motion: sitk.Transform, head: sitk.Image,
          interpolation: str = "bspline") -> sitk.Image:
    """``image`` on ``grid`` through ``motion`` (prior -> current points) by cubic
    B-spline interpolation (keeps the source's sharpness: a linear interpolation
    would blur the prior against the never-resampled current; "linear" is 10x
    faster, for tests), clipped at 0 and set to exactly 0 outside the moved
    ``head`` mask."""
    interpolator = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear}[interpolation]
    moved = sitk.Resample(image, grid, motion, interpolator, 0.0, sitk.sitkFloat32)
    values = np.clip(sitk.GetArrayFromImage(moved), 0.0, None)
    values[sitk.GetArrayViewFromImage(head) == 0] = 0.0
    out = _image(values.astype(np.float32), moved)
    return out


def _thick(image: sitk.Image, thickness: float = THICK_MM) -> sitk.Image:
    """``image`` re-acquired as axial 2D slices of ``thickness`` mm (boxcar profile),
    same in-plane grid (tests.corpus.sample)."""
    size, spacing = list(image.GetSize()), list(image.GetSpacing())
    extent = size[2] * spacing[2]
    n = int(math.ceil(extent / thickness))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # first slice centre half a thick slice above the first voxel's lower edge
    first = np.array(image.GetOrigin()) + direction[:, 2] * (-spacing[2] / 2.0 + thickness / 2.0)
    grid = Grid((size[0], size[1], n), (spacing[0], spacing[1], thickness), tuple(float(v) for v in first),
                tuple(image.GetDirection()))
    return sample(image, {"grid": grid.to_dict(), "acquisition": "2D", "slice_thickness_mm": thickness})


# --------------------------------------------------------------------------- the pair


def _uid(*parts: str) -> str:
    """A deterministic 2.25 UID (the pseudonymous study UID of the prior)."""
    digest = hashlib.sha256("/".join(("brainline-synthetic-followup", *parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def make_pair(case_id: str, variant: str, out_dir: Path | str, seed: int = 0, *,
              data_root: Path | str = DEFAULT_DATA, spacing_mm: float | None = None,
              max_rotation_deg: float = 8.0, max_translation_mm: float = 8.0,
              bias: tuple[float, float] = BIAS_AMPLITUDE, noise: float = 0.02,
              drift: bool = True, n_new: int | None = None, new_volumes_mm3: Sequence[float] | None = None,
              thick_prior_flair: bool | None = None, prior_interpolation: str = "bspline",
              name: str | None = None) -> FollowupPair:
    """Write one (prior, current) pair under ``out_dir/<case>_<variant>`` (or ``name``)
    and return it. ``n_new`` / ``new_volumes_mm3`` fix the new lesions (variants
    ``new``, ``thick``); ``thick_prior_flair`` defaults to ``variant == "thick"``;
    ``prior_interpolation`` "bspline" (default, realistic sharpness) or "linear" (fast
    tests; blurs the prior). ``bias`` is the range of the bias amplitude (0, 0 = none),
    ``noise`` the noise SD as a fraction of the median brain intensity."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    started = time.perf_counter()
    rng = np.random.default_rng(_key(seed, case_id, variant, "followup"))
    root = Path(out_dir) / (name or pair_name(case_id, variant))
    if root.exists():
        shutil.rmtree(root)
    current_dir, prior_dir = root / "current", root / "current" / "priors" / "0"

    images, label_img = load_source(case_id, data_root, spacing_mm)
    ref = images["t1c"]
    arrays = {r: sitk.GetArrayFromImage(images[r]).astype(np.float32) for r in ROLES}
    labels = sitk.GetArrayFromImage(label_img).astype(np.uint8)
    head = np.zeros(labels.shape, bool)
    for a in arrays.values():
        head |= a > 0
    brain = ndimage.binary_fill_holes(head)
    vox = _voxel_mm3(ref)
    stats = _label_stats(arrays, labels)
    brain_pts = _physical(ref, np.argwhere(brain)[::11])
    centre = brain_pts.mean(axis=0)

    # ---- anatomy at both timepoints
    prior_arrays = {r: a.copy() for r, a in arrays.items()}
    current_labels = labels.copy()
    new_ids = np.zeros(labels.shape, np.uint16)
    growth = np.zeros(labels.shape, np.uint8)
    growth_info, lesions = None, []
    if variant in GROWN_VARIANTS:
        current_labels, growth, growth_info = _grow_tumour(rng, arrays, labels, brain, ref, stats,
                                                           infiltrate=variant == "infiltrated")
    elif variant in ("new", "thick"):
        new_ids, lesions = _insert_lesions(rng, arrays, labels, brain, ref, stats, n=n_new,
                                           volumes=new_volumes_mm3)
    # painting may touch voxels of the head's zero background near the edge: keep it zero
    for a in arrays.values():
        a[~head] = 0.0

    # ---- motion of the prior
    motion, motion_info = _draw_motion(rng, centre, max_rotation_deg, max_translation_mm)
    prior_ref = _prior_grid(ref, brain, motion)
    thick = (variant == "thick") if thick_prior_flair is None else bool(thick_prior_flair)

    # the prior's head (where the source is > 0), by linear interpolation of the mask
    prior_head = sitk.Resample(sitk.Cast(_image(head.astype(np.uint8), ref), sitk.sitkFloat32), prior_ref, motion,
                               sitk.sitkLinear, 0.0, sitk.sitkFloat32) >= 0.5

    # ---- intensities and files
    cur_grid = _grid(ref)
    current_record, prior_record = {}, {}
    for role in ROLES:
        values, current_record[role] = _intensity(rng, arrays[role], cur_grid, centre, bias=bias, drift=False,
                                                  noise=noise)
        _write(_image(values, ref), current_dir / "nifti" / f"{role}.nii.gz")
        moved = _move(_image(prior_arrays[role], ref), prior_ref, motion, prior_head, prior_interpolation)
        if role == "flair" and thick:
            moved = _thick(moved)
        moved_values = sitk.GetArrayFromImage(moved)
        values, prior_record[role] = _intensity(rng, moved_values, _grid(moved), centre, bias=bias, drift=drift,
                                                noise=noise)
        prior_record[role]["spacing_mm"] = [round(v, 4) for v in moved.GetSpacing()]
        _write(_image(values, moved), prior_dir / "nifti" / f"{role}.nii.gz")

    truth_dir = root / "truth"
    prior_labels = sitk.Resample(label_img, prior_ref, motion, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    _write(_image(current_labels, label_img), truth_dir / "labels_current.nii.gz")
    _write(prior_labels, truth_dir / "labels_prior.nii.gz")
    _write(_image(new_ids, label_img), truth_dir / "new_lesions.nii.gz")
    _write(_image(growth, label_img), truth_dir / "growth.nii.gz")
    sitk.WriteTransform(motion, str(truth_dir / "prior_to_current.tfm"))

    # ---- priors.json / prior.json (the contract of issue 11)
    prior_uid = _uid(str(seed), case_id, variant, "prior")
    entry = {"dir": "priors/0", "study_date": PRIOR_DATE, "kept_as": ["most recent", "baseline"],
             "source": "offline folder", "pseudo_study_uid": prior_uid, "job_id": None}
    (prior_dir / "prior.json").write_text(json.dumps(entry, indent=1))
    (current_dir / "priors.json").write_text(json.dumps({
        "current": {"study_date": CURRENT_DATE}, "priors": [entry],
        "searched": ["synthetic follow-up: one earlier study given"], "notes": []}, indent=1))

    vol_prior = volumes_ml(labels, vox)
    vol_current = volumes_ml(current_labels, vox)
    truth = {
        "generator": "tests/synthetic_followup.py", "generator_version": GENERATOR_VERSION,
        "case_id": case_id, "variant": variant, "seed": seed,
        "split": "tune" if case_id in TUNE_CASES else "holdout" if case_id in HOLDOUT_CASES else "other",
        "spacing_mm": [round(v, 4) for v in ref.GetSpacing()],
        "labels": "BraTS 2023 (1 NCR, 2 ED, 3 ET; source 4 -> 3)",
        "current": {"dir": "current", "study_date": CURRENT_DATE, "intensity": current_record,
                    "size": list(ref.GetSize())},
        "prior": {"dir": "current/priors/0", "study_date": PRIOR_DATE, "pseudo_study_uid": prior_uid,
                  "motion": motion_info, "intensity": prior_record, "size": list(prior_ref.GetSize()),
                  "thick_flair_mm": THICK_MM if thick else None, "interpolation": prior_interpolation},
        "noise": noise,
        "volumes_ml": {"prior": vol_prior, "current": vol_current},
        "change_mm3": {k: round((vol_current[k] - vol_prior[k]) * 1000.0, 1) for k in vol_prior},
        "growth": growth_info,
        "new_lesions": lesions,
        "files": {"labels_current": "truth/labels_current.nii.gz", "labels_prior": "truth/labels_prior.nii.gz",
                  "new_lesions": "truth/new_lesions.nii.gz", "growth": "truth/growth.nii.gz",
                  "prior_to_current": "truth/prior_to_current.tfm"},
        "generation_s": round(time.perf_counter() - started, 2),
    }
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return FollowupPair(root, truth)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic follow-up pairs with known truth (issue 11).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated BraTS 2018 case ids (default all 12)")
    parser.add_argument("--variants", default="nochange,grown,new", help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=None, help="block-average the source to this spacing (mm)")
    args = parser.parse_args(argv)
    for case in [c for c in args.cases.split(",") if c]:
        for variant in [v for v in args.variants.split(",") if v]:
            pair = make_pair(case, variant, args.out, args.seed, data_root=args.data, spacing_mm=args.spacing)
            t = pair.truth
            extra = (f"growth WT {t['change_mm3']['whole_tumor']:.0f} mm3 TC {t['change_mm3']['tumor_core']:.0f} mm3"
                     if variant in GROWN_VARIANTS else
                     f"{len(t['new_lesions'])} new lesions "
                     + ", ".join(f"{l['volume_mm3']:.0f}" for l in t["new_lesions"])
                     + " mm3" if t["new_lesions"] else "")
            print(f"{pair.root}: motion {t['prior']['motion']['rotation_deg']:.1f} deg "
                  f"{t['prior']['motion']['translation_norm_mm']:.1f} mm; {extra} ({t['generation_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
