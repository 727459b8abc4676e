"""Segmentation QC: components, plausibility checks and ensemble-discord alarms.

Frames and units
----------------
Label maps and masks are (z, y, x) arrays as ``sitk.GetArrayFromImage``
returns them, on the grid of a ``reference`` SimpleITK image (its spacing,
origin and direction give physical space: LPS, millimetres; +x points to the
patient's left, +y posterior, +z superior). Labels follow BraTS 2023 (1 =
necrotic / non-enhancing core NCR, 2 = edema ED, 3 = enhancing tumour ET);
BraTS 2020's 4 is read as 3. Regions: WT = {1, 2, 3}, TC = {1, 3}, ET = {3}.
Volumes are in mL, centroids in LPS mm. Flags are "code: words" strings, as
the other stages raise them.

1. Components (:func:`tumour_components`): 26-connected components of WT,
   largest first, each with its volume, per-label volumes, LPS centroid and
   hemisphere. The midline is the plane through the brain mask's centroid
   perpendicular to the patient's left-right (LPS x) axis; a component with
   >= 90 % of its voxels on one side lies in that hemisphere, otherwise it is
   "bilateral". (A head turned by theta degrees about the vertical moves the
   true mid-sagittal plane by d * tan(theta) at distance d from the centroid:
   components within a few mm of the midline may be misassigned.)
2. Plausibility (:func:`plausibility_flags`): tumour outside the brain mask,
   TC not inside WT, ET not inside TC (possible when a model predicts the
   regions as separate channels), implausible total volumes, many fragments,
   an empty segmentation.
3. Ensemble discord (Kofler et al., "Robust, primitive, and unsupervised
   quality estimation for segmentation ensembles", Front. Neurosci. 2021;
   ``shared/seeds``): candidate segmentations of one study (the trained model's
   views, the classical baseline, test-time flips, ...) are fused by majority
   vote per region (nested: ET, then TC, then WT; on tcga-du-7294 it agrees
   with BraTS Toolkit's multi-label vote ``fusion_mav`` to Dice 0.995 WT, 0.992
   TC); each candidate's Dice to the fusion is compared with that
   candidate's history: an alarm is raised when it falls below
   ``median - alpha * MAD`` of the history (alpha = 0.1, MAD = median absolute
   deviation, unscaled, as in the paper) or when it is undefined (candidate
   and fusion both empty). The risk score is the number of alarms over all
   candidates and regions. Without enough history (``min_history``) only the
   undefined-Dice alarms can fire, and the result says so.
   Reading it: with alpha = 0.1 the threshold sits just below the median, so
   about half of the candidates alarm on an ordinary study (the paper's Table
   1); the score ranks studies for review, it is not a failure verdict. The
   undefined rule also fires when all candidates agree that there is no ET (a
   non-enhancing tumour): one alarm per candidate; pass ``regions=("WT",
   "TC")`` where that is expected.
   :func:`flip_segmentations` makes test-time-flip candidates from any segment
   callable.

No network, no database.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

__all__ = [
    "REGIONS", "SegmentationQCConfig", "Component", "CandidateDiscord", "DiscordResult",
    "to_brats2023", "region_masks", "dice", "tumour_components", "midline_x_mm", "plausibility_flags",
    "majority_vote", "fuse_labels", "alarm_threshold", "fusion_dice", "discord_from_dice", "discord_alarms",
    "flip_segmentations",
    "lr_array_axis", "segmentation_qc",
]

REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
LABEL_KEYS = {1: "NCR", 2: "ED", 3: "ET"}
_CONN26 = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class SegmentationQCConfig:
    """Thresholds of the plausibility checks and the discord rule.

    outside_brain_min_ml / outside_brain_max_fraction: flag tumour outside the
        brain mask when more than this volume AND this share of WT lie outside
        (a rim of partial-volume voxels is normal);
    containment_min_ml: flag TC outside WT / ET outside TC above this volume;
    max_wt_ml: larger WT is implausible (the largest of the shared BraTS cases
        is ~217 mL; a hemisphere is ~600 mL); max_wt_brain_fraction: likewise
        as a share of the brain mask;
    min_wt_ml: a non-empty WT below this is a speck, not a measurable lesion;
    max_components: more WT components than this is a fragmented result;
    hemisphere_fraction: share of a component on one side to call it left/right;
    alpha, min_history, mad_scale: the discord rule (alarm below
        median - alpha * mad_scale * MAD of >= min_history earlier values)."""

    outside_brain_min_ml: float = 0.5
    outside_brain_max_fraction: float = 0.02
    containment_min_ml: float = 0.05
    max_wt_ml: float = 400.0
    max_wt_brain_fraction: float = 0.35
    min_wt_ml: float = 0.1
    max_components: int = 10
    hemisphere_fraction: float = 0.9
    alpha: float = 0.1
    min_history: int = 10
    mad_scale: float = 1.0


# --------------------------------------------------------------------------- basics

def _arr(x) -> np.ndarray:
    return sitk.GetArrayFromImage(x) if isinstance(x, sitk.Image) else np.asarray(x)


def to_brats2023(labels) -> np.ndarray:
    """uint8 copy of a label map with BraTS 2020's 4 (ET) mapped to 3."""
    out = np.asarray(_arr(labels)).astype(np.uint8, copy=True)
    out[out == 4] = 3
    return out


def region_masks(labels) -> dict[str, np.ndarray]:
    """WT, TC and ET boolean masks of a label map (BraTS 2020 or 2023)."""
    lab = to_brats2023(labels)
    return {name: np.isin(lab, values) for name, values in REGIONS.items()}


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice 2|A & B| / (|A| + |B|) of two boolean masks; None when both are empty."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return None if total == 0 else 2.0 * int(np.count_nonzero(np.logical_and(a, b))) / total


def _voxel_ml(reference: sitk.Image | None, spacing_zyx) -> float:
    if reference is not None:
        return float(np.prod(reference.GetSpacing())) / 1000.0
    return float(np.prod(spacing_zyx if spacing_zyx is not None else (1.0, 1.0, 1.0))) / 1000.0


def _index_to_lps(reference: sitk.Image | None, idx_zyx: np.ndarray, spacing_zyx=None) -> np.ndarray:
    """(n, 3) continuous (z, y, x) indices -> (n, 3) LPS points in mm. Without a
    reference image: identity direction, zero origin, ``spacing_zyx``."""
    idx_xyz = np.asarray(idx_zyx, np.float64)[:, ::-1]
    if reference is None:
        sp = np.asarray(spacing_zyx if spacing_zyx is not None else (1.0, 1.0, 1.0), np.float64)[::-1]
        return idx_xyz * sp
    d = np.asarray(reference.GetDirection(), np.float64).reshape(3, 3)
    sp = np.asarray(reference.GetSpacing(), np.float64)
    o = np.asarray(reference.GetOrigin(), np.float64)
    return o + (idx_xyz * sp) @ d.T


def _lps_x_of_voxels(shape, reference, spacing_zyx) -> Callable[[np.ndarray], np.ndarray]:
    """Function mapping (n, 3) integer (z, y, x) indices to their LPS x in mm."""
    if reference is None:
        sx = float((spacing_zyx or (1.0, 1.0, 1.0))[2])
        return lambda idx: idx[:, 2] * sx
    d = np.asarray(reference.GetDirection(), np.float64).reshape(3, 3)
    sp = np.asarray(reference.GetSpacing(), np.float64)
    ox = float(reference.GetOrigin()[0])
    row = d[0] * sp  # x_lps = ox + sum_j d[0, j] * sp[j] * idx_xyz[j]
    return lambda idx: ox + idx[:, 2] * row[0] + idx[:, 1] * row[1] + idx[:, 0] * row[2]


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels (None if empty)."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, int(nz[0]) - margin), min(mask.shape[axis], int(nz[-1]) + margin + 1)))
    return tuple(out)


def midline_x_mm(brain_mask, reference: sitk.Image | None = None, spacing_zyx=None) -> float | None:
    """LPS x (mm) of the midline plane: the brain mask's centroid x. None for an empty mask."""
    m = np.asarray(_arr(brain_mask)).astype(bool)
    if not m.any():
        return None
    centre = np.array([ndi.center_of_mass(m)])
    return float(_index_to_lps(reference, centre, spacing_zyx)[0, 0])


# --------------------------------------------------------------------------- components

@dataclass
class Component:
    """One 26-connected WT component: ``index`` (1 = largest), ``voxels``,
    ``volume_ml``, ``label_volumes_ml`` (NCR/ED/ET inside it), ``centroid_lps_mm``,
    ``hemisphere`` ("left" | "right" | "bilateral" | None without a brain mask),
    ``left_fraction`` (share of its voxels on the patient's left of the midline)."""

    index: int
    voxels: int
    volume_ml: float
    label_volumes_ml: dict[str, float]
    centroid_lps_mm: list[float]
    hemisphere: str | None
    left_fraction: float | None

    def describe(self) -> str:
        side = f", {self.hemisphere} hemisphere" if self.hemisphere else ""
        c = ", ".join(f"{v:.0f}" for v in self.centroid_lps_mm)
        return f"component {self.index}: {self.volume_ml:.1f} mL{side}, centre (LPS) {c} mm"


def tumour_components(labels, reference: sitk.Image | None = None, brain_mask=None, *,
                      spacing_zyx=None, config: SegmentationQCConfig | None = None) -> list[Component]:
    """WT components of a label map, largest first (see the module doc).
    ``reference`` gives the geometry (else ``spacing_zyx`` in mm, identity
    direction, zero origin); ``brain_mask`` (same grid) gives the midline."""
    cfg = config or SegmentationQCConfig()
    lab = to_brats2023(labels)
    if brain_mask is not None and np.shape(_arr(brain_mask)) != lab.shape:
        raise ValueError(f"the brain mask {np.shape(_arr(brain_mask))} is not on the segmentation grid {lab.shape}")
    wt = lab > 0
    if not wt.any():
        return []
    voxel_ml = _voxel_ml(reference, spacing_zyx)
    mid = midline_x_mm(brain_mask, reference, spacing_zyx) if brain_mask is not None else None
    box = bounding_box(wt, 1)  # work in the tumour's bounding box
    offset = np.array([sl.start for sl in box], np.float64)
    lab, wt = lab[box], wt[box]
    cc, n = ndi.label(wt, structure=_CONN26)
    to_x = _lps_x_of_voxels(lab.shape, reference, spacing_zyx)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    per_label = {k: np.bincount(cc.ravel(), weights=(lab.ravel() == k), minlength=n + 1) for k in LABEL_KEYS}
    centres = np.asarray(ndi.center_of_mass(wt, cc, range(1, n + 1)), np.float64).reshape(-1, 3) + offset
    lps = _index_to_lps(reference, centres, spacing_zyx)
    left = None
    if mid is not None:
        idx = np.argwhere(wt) + offset.astype(np.int64)
        is_left = to_x(idx) > mid
        left = np.bincount(cc[wt], weights=is_left, minlength=n + 1) / np.maximum(sizes, 1)
    comps = []
    for i in range(1, n + 1):
        lf = None if left is None else float(left[i])
        hemi = None
        if lf is not None:
            hemi = "left" if lf >= cfg.hemisphere_fraction else "right" if lf <= 1 - cfg.hemisphere_fraction \
                else "bilateral"
        comps.append(Component(
            index=0, voxels=int(sizes[i]), volume_ml=round(float(sizes[i]) * voxel_ml, 3),
            label_volumes_ml={LABEL_KEYS[k]: round(float(per_label[k][i]) * voxel_ml, 3) for k in LABEL_KEYS},
            centroid_lps_mm=[round(float(v), 1) for v in lps[i - 1]], hemisphere=hemi,
            left_fraction=None if lf is None else round(lf, 3)))
    comps.sort(key=lambda c: -c.voxels)
    for i, c in enumerate(comps, 1):
        c.index = i
    return comps


# --------------------------------------------------------------------------- plausibility

def plausibility_flags(segmentation, brain_mask=None, reference: sitk.Image | None = None, *,
                       spacing_zyx=None, components: Sequence[Component] | None = None,
                       config: SegmentationQCConfig | None = None) -> list[str]:
    """Plausibility checks in words, as "code: words" flags.

    ``segmentation``: a label map, or a dict of region masks {"WT", "TC", "ET"}
    (e.g. a model's three sigmoid channels thresholded), where nesting is not
    guaranteed. Codes: ``empty_segmentation``, ``tumour_outside_brain``,
    ``tc_outside_wt``, ``et_outside_tc``, ``implausible_volume``,
    ``tiny_volume``, ``fragmented``."""
    cfg = config or SegmentationQCConfig()
    if isinstance(segmentation, Mapping):
        regions = {k: np.asarray(_arr(v)).astype(bool) for k, v in segmentation.items()}
        missing = [k for k in REGIONS if k not in regions]
        if missing:
            raise ValueError(f"region masks missing: {', '.join(missing)}")
    else:
        regions = region_masks(segmentation)
    voxel_ml = _voxel_ml(reference, spacing_zyx)
    wt, tc, et = regions["WT"], regions["TC"], regions["ET"]
    flags: list[str] = []
    wt_ml = float(np.count_nonzero(wt)) * voxel_ml
    if not (wt.any() or tc.any() or et.any()):
        return ["empty_segmentation: no tumour was segmented; check that the study shows a lesion "
                "and that the right series were used"]
    brain = None
    if brain_mask is not None:
        brain = np.asarray(_arr(brain_mask)).astype(bool)
        if brain.shape != wt.shape:
            raise ValueError(f"the brain mask {brain.shape} is not on the segmentation grid {wt.shape}")
        tumour = wt | tc | et
        out_ml = float(np.count_nonzero(tumour & ~brain)) * voxel_ml
        frac = out_ml / max(float(np.count_nonzero(tumour)) * voxel_ml, 1e-9)
        if out_ml > cfg.outside_brain_min_ml and frac > cfg.outside_brain_max_fraction:
            flags.append(f"tumour_outside_brain: {out_ml:.1f} mL ({100 * frac:.0f} %) of the segmented tumour "
                         "lies outside the brain mask (skull stripping too tight, or a false positive in "
                         "scalp, orbit or skull)")
    for inner, outer, code in (("TC", "WT", "tc_outside_wt"), ("ET", "TC", "et_outside_tc")):
        ml = float(np.count_nonzero(regions[inner] & ~regions[outer])) * voxel_ml
        if ml > cfg.containment_min_ml:
            names = {"WT": "whole tumour", "TC": "tumour core", "ET": "enhancing tumour"}
            flags.append(f"{code}: {ml:.2f} mL of the {names[inner]} ({inner}) lies outside the "
                         f"{names[outer]} ({outer}); the regions must be nested")
    if wt_ml > cfg.max_wt_ml:
        flags.append(f"implausible_volume: whole tumour {wt_ml:.0f} mL exceeds {cfg.max_wt_ml:.0f} mL")
    elif brain is not None and brain.any():
        brain_ml = float(np.count_nonzero(brain)) * voxel_ml
        if wt_ml > cfg.max_wt_brain_fraction * brain_ml:
            flags.append(f"implausible_volume: whole tumour {wt_ml:.0f} mL is {100 * wt_ml / brain_ml:.0f} % of "
                         f"the brain mask ({brain_ml:.0f} mL)")
    if 0 < wt_ml < cfg.min_wt_ml:
        flags.append(f"tiny_volume: whole tumour only {wt_ml:.2f} mL, below {cfg.min_wt_ml} mL: "
                     "likely noise, not a measurable lesion")
    if components is None and not isinstance(segmentation, Mapping):
        components = tumour_components(segmentation, reference, None, spacing_zyx=spacing_zyx, config=cfg)
    if components is not None and len(components) > cfg.max_components:
        flags.append(f"fragmented: the whole tumour falls into {len(components)} separate components "
                     f"(more than {cfg.max_components})")
    return flags


# --------------------------------------------------------------------------- discord

def majority_vote(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Equally weighted majority vote: a voxel is in the fusion when more than
    half of the masks hold it (strict majority; with two masks: their
    intersection; ties of an even count are left out)."""
    if not masks:
        raise ValueError("majority vote of no masks")
    votes = np.zeros(np.shape(masks[0]), np.uint16)
    for m in masks:
        if np.shape(m) != votes.shape:
            raise ValueError(f"candidate masks differ in shape: {np.shape(m)} vs {votes.shape}")
        votes += np.asarray(m, bool)
    return 2 * votes.astype(np.int32) > len(masks)


def fuse_labels(candidates: Sequence[np.ndarray]) -> np.ndarray:
    """Fused BraTS 2023 label map of several label maps: majority vote per
    region, nested (ET; TC = vote(TC) | ET; WT = vote(WT) | TC), then NCR =
    TC - ET, ED = WT - TC."""
    regions = [region_masks(c) for c in candidates]
    et = majority_vote([r["ET"] for r in regions])
    tc = majority_vote([r["TC"] for r in regions]) | et
    wt = majority_vote([r["WT"] for r in regions]) | tc
    out = np.zeros(wt.shape, np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 3
    return out


def alarm_threshold(history: Sequence[float | None], alpha: float = 0.1, *, min_history: int = 10,
                    mad_scale: float = 1.0) -> tuple[float | None, float | None, float | None, int]:
    """(median, MAD, threshold = median - alpha * mad_scale * MAD, n) of the
    finite values of ``history``; median, MAD and threshold are None with fewer
    than ``min_history`` values."""
    h = np.asarray([v for v in history if v is not None and np.isfinite(v)], np.float64)
    if h.size < max(1, min_history):
        return None, None, None, int(h.size)
    med = float(np.median(h))
    mad = float(np.median(np.abs(h - med)))
    return med, mad, med - alpha * mad_scale * mad, int(h.size)


@dataclass
class CandidateDiscord:
    """One candidate and region: Dice to the fusion (None: undefined), the
    history's median/MAD/threshold (None without enough history), ``alarm``
    and ``reason`` in words."""

    candidate: str
    region: str
    dice: float | None
    median: float | None
    mad: float | None
    threshold: float | None
    n_history: int
    alarm: bool
    reason: str


@dataclass
class DiscordResult:
    """``rows`` per candidate and region; ``risk_score`` = number of alarms;
    ``mean_dice`` per region (mean Dice of the candidates to the fusion,
    undefined ones left out); ``fusion`` (label map, not serialised by
    :meth:`to_dict`; None when built from Dice values alone); ``flags`` ("discord_alarm: words" and
    "discord_no_history: words")."""

    rows: list[CandidateDiscord]
    risk_score: int
    max_score: int
    mean_dice: dict[str, float | None]
    fusion: np.ndarray | None = field(repr=False)
    flags: list[str] = field(default_factory=list)

    def dice_of(self, candidate: str, region: str = "WT") -> float | None:
        for r in self.rows:
            if r.candidate == candidate and r.region == region:
                return r.dice
        raise KeyError(f"{candidate}/{region}")

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "risk_score": self.risk_score,
                "max_score": self.max_score, "mean_dice": self.mean_dice, "flags": self.flags}


def fusion_dice(candidates: Mapping[str, np.ndarray], regions: Sequence[str] = ("WT", "TC", "ET")
                ) -> tuple[dict[str, dict[str, float | None]], np.ndarray]:
    """Each candidate's Dice to the majority-vote fusion of all candidates, per
    region: ``({name: {region: dice or None}}, fused BraTS 2023 label map)``.
    ``candidates``: name -> label map on one grid (at least 2). The work is
    done in the bounding box of the candidates' union."""
    if len(candidates) < 2:
        raise ValueError("discord needs at least two candidate segmentations")
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown region(s) {unknown}; known: {', '.join(REGIONS)}")
    names = list(candidates)
    shapes = {np.shape(candidates[n]) for n in names}
    if len(shapes) != 1:
        raise ValueError(f"candidate segmentations lie on different grids: {sorted(shapes)}")
    full = [to_brats2023(candidates[n]) for n in names]
    union = np.zeros(full[0].shape, bool)
    for c in full:
        union |= c > 0
    fusion = np.zeros(full[0].shape, np.uint8)
    box = bounding_box(union, 1) or tuple(slice(0, 1) for _ in full[0].shape)  # all empty: any voxel will do
    masks = {n: region_masks(c[box]) for n, c in zip(names, full)}
    fusion[box] = fuse_labels([c[box] for c in full])
    fused = region_masks(fusion[box])
    table = {n: {region: dice(masks[n][region], fused[region]) for region in regions} for n in names}
    return table, fusion


def discord_from_dice(dice_to_fusion: Mapping[str, Mapping[str, float | None]],
                      history: Mapping[str, Mapping[str, Sequence[float | None]]] | None = None, *,
                      regions: Sequence[str] = ("WT", "TC", "ET"),
                      config: SegmentationQCConfig | None = None,
                      fusion: np.ndarray | None = None) -> DiscordResult:
    """The alarm rule on Dice values already computed (:func:`fusion_dice`):
    ``dice_to_fusion`` name -> region -> Dice (None = undefined); ``history``
    as in :func:`discord_alarms`. Used by the service, which computes the
    Dice values in the pipeline and reads the history from its database."""
    cfg = config or SegmentationQCConfig()
    history = history or {}
    rows: list[CandidateDiscord] = []
    flags: list[str] = []
    no_history: list[str] = []
    for region in regions:
        for n, per_region in dice_to_fusion.items():
            d = per_region.get(region)
            med, mad, thr, nh = alarm_threshold(history.get(n, {}).get(region, ()), cfg.alpha,
                                                min_history=cfg.min_history, mad_scale=cfg.mad_scale)
            if d is None:
                alarm, reason = True, f"{region} Dice to the fusion undefined (candidate and fusion both empty)"
            elif thr is None:
                alarm, reason = False, f"only {nh} earlier values, {cfg.min_history} needed for a threshold"
                no_history.append(f"{n}/{region}")
            elif d < thr:
                alarm, reason = True, (f"{region} Dice to the fusion {d:.3f} below this candidate's usual "
                                       f"(threshold {thr:.3f} = median {med:.3f} - {cfg.alpha} x MAD {mad:.3f})")
            else:
                alarm, reason = False, f"{region} Dice to the fusion {d:.3f} >= threshold {thr:.3f}"
            rows.append(CandidateDiscord(n, region, d, med, mad, thr, nh, alarm, reason))
            if alarm:
                flags.append(f"discord_alarm: {n}: {reason}")
    if no_history:
        flags.append(f"discord_no_history: no alarm threshold yet for {', '.join(no_history)} "
                     f"(fewer than {cfg.min_history} earlier studies)")
    mean_dice = {}
    for region in regions:
        vals = [r.dice for r in rows if r.region == region and r.dice is not None]
        mean_dice[region] = float(np.mean(vals)) if vals else None
    return DiscordResult(rows=rows, risk_score=sum(r.alarm for r in rows), max_score=len(rows),
                         mean_dice=mean_dice, fusion=fusion, flags=flags)


def discord_alarms(candidates: Mapping[str, np.ndarray],
                   history: Mapping[str, Mapping[str, Sequence[float | None]]] | None = None, *,
                   regions: Sequence[str] = ("WT", "TC", "ET"),
                   config: SegmentationQCConfig | None = None) -> DiscordResult:
    """Ensemble-discord alarms (Kofler et al. 2021; module doc).

    ``candidates``: name -> label map (same grid; at least 2). ``history``:
    name -> region -> earlier Dice-to-fusion values of that candidate (same
    site and pipeline version), e.g. ``{"baseline": {"WT": [0.97, ...]}}``.
    A candidate or region missing from the history has none."""
    table, fusion = fusion_dice(candidates, regions)
    return discord_from_dice(table, history, regions=regions, config=config, fusion=fusion)


def lr_array_axis(reference: sitk.Image) -> int:
    """Array axis (0 = z, 1 = y, 2 = x of a (z, y, x) array) that runs most
    nearly along the patient's left-right (LPS x) direction."""
    d = np.asarray(reference.GetDirection(), np.float64).reshape(3, 3)
    image_axis = int(np.argmax(np.abs(d[0])))  # image axis (i, j, k) with the largest x component
    return 2 - image_axis


def flip_segmentations(segment: Callable[[dict[str, np.ndarray], np.ndarray | None], np.ndarray],
                       arrays: Mapping[str, np.ndarray], mask: np.ndarray | None = None, *,
                       axes: Sequence[Sequence[int]] = ((2,),), prefix: str = "flip") -> dict[str, np.ndarray]:
    """Test-time-flip candidates: for each tuple of array axes in ``axes``,
    flip every input (and ``mask``) along them, run ``segment(flipped_arrays,
    flipped_mask)`` (which returns a label map on the same grid, or a tuple
    whose first item is one) and flip the result back. Returns
    ``{"flip_<axes>": labels}``, e.g. ``"flip_x"`` for axis 2 (use
    :func:`lr_array_axis` for the patient's left-right axis)."""
    letters = "zyx"
    out: dict[str, np.ndarray] = {}
    for ax in axes:
        ax = tuple(int(a) for a in ax)
        flipped = {k: np.ascontiguousarray(np.flip(v, ax)) for k, v in arrays.items()}
        fmask = None if mask is None else np.ascontiguousarray(np.flip(mask, ax))
        result = segment(flipped, fmask)
        if isinstance(result, tuple):
            result = result[0]
        result = np.asarray(result)
        out[f"{prefix}_{''.join(letters[a] for a in ax)}"] = np.ascontiguousarray(np.flip(result, ax))
    return out


# --------------------------------------------------------------------------- all together

def segmentation_qc(labels, brain_mask=None, reference: sitk.Image | None = None, *,
                    candidates: Mapping[str, np.ndarray] | None = None,
                    history: Mapping[str, Mapping[str, Sequence[float | None]]] | None = None,
                    spacing_zyx=None, regions: Sequence[str] = ("WT", "TC", "ET"),
                    config: SegmentationQCConfig | None = None) -> dict[str, Any]:
    """The segmentation-QC record of one study: ``components`` (dicts),
    ``volumes_ml`` (WT/TC/ET/NCR/ED), ``flags`` (plausibility + discord),
    ``discord`` (:meth:`DiscordResult.to_dict`, or None without candidates;
    ``candidates`` should include the delivered ``labels`` under its own name)
    and ``risk_score`` (None without candidates). JSON-serialisable."""
    cfg = config or SegmentationQCConfig()
    lab = to_brats2023(labels)
    voxel_ml = _voxel_ml(reference, spacing_zyx)
    comps = tumour_components(lab, reference, brain_mask, spacing_zyx=spacing_zyx, config=cfg)
    flags = plausibility_flags(lab, brain_mask, reference, spacing_zyx=spacing_zyx, components=comps, config=cfg)
    volumes = {name: round(float(np.count_nonzero(m)) * voxel_ml, 3) for name, m in region_masks(lab).items()}
    volumes.update({LABEL_KEYS[k]: round(float(np.count_nonzero(lab == k)) * voxel_ml, 3) for k in (1, 2)})
    discord = None
    if candidates:
        res = discord_alarms(candidates, history, regions=regions, config=cfg)
        discord = res.to_dict()
        flags += res.flags
    return {"components": [asdict(c) for c in comps], "component_words": [c.describe() for c in comps],
            "volumes_ml": volumes, "flags": flags, "discord": discord,
            "risk_score": None if discord is None else discord["risk_score"]}
