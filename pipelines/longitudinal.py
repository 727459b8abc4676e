"""Longitudinal follow-up: compare the current study with its prior studies.

``step_longitudinal(work, cfg)`` reads ``W/priors.json`` (see the issue-11
contract), prepares each prior work folder ``W/priors/<k>`` that has no
``summary.json`` yet (series selection + conversion when it holds DICOM,
then the image pipeline STEPS with the same PipelineConfig), and writes

    W/longitudinal.json                       (cached: image_pipeline._cached, name "longitudinal")
    W/longitudinal/subtraction_<role>.nii.gz  float32, current - matched prior, 0 outside the brain
    W/longitudinal/lesions.nii.gz             uint16, value = lesion id (0 background)
    W/longitudinal/prior<k>_<role>.nii.gz     prior registered + intensity matched (pictures)

all on the CURRENT reference grid (the grid of ``W/segmentation.nii.gz``,
LPS physical space, mm).

Method (Penn MS CAD / MUSIC / EASE, see the issue): the most recent prior's
reference-role image (T1c, or FLAIR in lesion mode) is registered rigidly to
the current one with :func:`pipelines.registration.register` (quality check:
any flag = no subtraction and no lesions, said in words; volumes and their
change are still reported). Every sequence both studies have is resampled
onto the current grid. For FLAIR and T1c the finer timepoint is blurred to
the coarser one's resolution (per axis of the current grid, Gaussian with
sigma = sqrt((W^2 - w^2)/12) mm, W/w the coarser/finer native voxel widths
projected on that axis, so an oblique native slice direction is handled),
both get the same light blur (``smooth_voxels``: the prior has been
interpolated once more), the prior is intensity-matched to the current
inside both brain masks (``intensity_match``: histogram (default, by
measurement) or linear), a smooth differential bias field left by N4 is
removed (Lewis & Fox 2004, ``differential_bias_sigma_mm``), and the prior is
subtracted. All of this runs on the bounding box of the current brain
(+ 8 mm) and is pasted back onto the full grid. Candidates: robust z of the
subtraction (sd floored at ``min_sd_percent`` of the brain median) above
``z_threshold`` where the current image is bright (``current_min_z``), at
least ``edge_margin_mm`` inside the common brain, plus the current
segmentation; with ``combine_t2`` also the robust z of the FLAIR and T2
subtractions' sum (:func:`pipelines.longitudinal_images.combined_evidence`,
its brightness read on the FLAIR); 26-connected, >= 12 mm^3; the Penn MS CAD rule drops a new
candidate whose peak was already bright at the prior (within 2 mm);
"new" (no prior lesion there) or "growing" (prior lesion there, grown by
more than ``growth_fraction`` and ``growth_min_mm3``). See
:func:`pipelines.longitudinal_images.find_lesions`.

Volumes (mL, from each timepoint's summary.json): ET ("3"), NCR ("1"), ED
("2"), TC, WT of every timepoint, their change against the most recent prior
and against the nadir (the prior with the smallest ET in tumour mode, WT in
lesion mode; with >= 2 priors), and a RANO-like assessment (thresholds in
``config/longitudinal.yaml`` with their sources).

The change against the most recent prior is measured twice: by the two
timepoints' own segmentations (``change.vs_prior``) and on the registered
pair (``change.vs_prior_paired``; ``paired_method`` per component: by
default the boundary shift integral for WT, and for TC and ET the deformable
registration of the pair carrying the prior's segmentation plus the boundary
shift of what it left unexplained, :mod:`.deformation_change`). Which one the
assessment, the SR and the PDF use is chosen per component by the segmenter
(``change_measure``, :func:`change_measure`): the registered pair for the
baseline segmenter (irreproducible between two scans), ``change_measure_trained``
when one trained model segmented both; ``change.measure`` records the choice
and its reason in words.

A prior that cannot be prepared or registered never raises: the reason goes
to "note"/"notes"/"flags" in words, and the current study's results still go out.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from scipy import ndimage

from brainline.models.base import ET, NCR, ROLES
from brainline.models.registry import load_backend

from .boundary_shift import boundary_band, boundary_shift
from .change_choice import chosen_change
from .deformation_change import ResidualShift, propagated_growth
from .image_pipeline import ROLE_LABELS, STEPS, PipelineConfig, _cached, _write
from .joint_segmentation import JOINT_SEGMENTERS, joint_segmentation_change
from .lesion_location import locate_points
from .longitudinal_images import (
    axial_axis,
    combined_evidence,
    detection_region,
    differential_bias,
    find_lesions,
    fit_region,
    mask_box,
    match_intensity,
    native_coverage,
    new_lesion_enhancement,
    resolution_sigmas,
    robust_z,
    signal_mask,
    smooth_mm,
    voxel_extent_mm,
)
from .registration import RegistrationError, register, resample_to

log = logging.getLogger("brainline.longitudinal")

__all__ = ["LongitudinalConfig", "step_longitudinal", "prepare_prior", "volume_change", "assess", "change_measure",
           "new_lesion_finding", "NEW_LESION_RULES"]

VOLUME_KEYS = ("1", "2", "3", "tumor_core", "whole_tumor")
#: tumour mode, new_lesion_rule: "measurable" (RANO 2.0 / mRANO: a new measurable enhancing lesion is
#: progression), "any" (RANO 2010: any new enhancing lesion), "off" (new lesions listed only)
NEW_LESION_RULES = ("measurable", "any", "off")
SUBTRACTION_ROLES = ("flair", "t1c")
#: the combined T2-weighted evidence (``combine_t2``): a role of the lesion search only
#: (lesions[].sequence), made of the FLAIR and T2 subtractions
COMBINED_ROLE = "flair+t2"


@dataclass
class LongitudinalConfig:
    """Settings of the follow-up comparison; see ``config/longitudinal.yaml``
    for every key, its unit and its source."""

    mode: str = "auto"
    transform: str = "rigid"
    intensity_match: str = "histogram"
    differential_bias_sigma_mm: float = 15.0
    match_exclude_lesion_mm: float = 0.0
    histogram_levels: int = 256
    histogram_match_points: int = 32
    linear_percentiles: tuple = (5, 95, 5)
    match_resolution: bool = True
    smooth_voxels: float = 0.5
    edge_margin_mm: float = 4.0
    thick_slice_mm: float = 5.0
    z_threshold: float = 3.5
    min_sd_percent: float = 5.0
    volume_fraction_of_peak: float = 0.5
    min_volume_mm3: float = 12.0
    seg_support_z: float = 2.5
    current_min_z: float = 2.0
    combine_t2: bool = True
    combined_current_min_z: float = 1.0
    prior_bright_z: float = 3.0
    prior_bright_radius_mm: float = 2.0
    prior_bright_fraction: float = 0.5
    growth_fraction: float = 0.2
    growth_min_mm3: float = 30.0
    growth_net_fraction: float = 0.5
    growth_net_dilate_mm: float = 3.0
    lesion_bright_z: float = 3.5
    lesion_growth_excludes_prior_bright: bool = True
    confidence_z_scale: float = 3.0
    confidence_volume_mm3: float = 50.0
    progression_percent: float = 40.0
    # tumour mode: growth from this up to progression_percent reads "borderline" (None: off)
    borderline_percent: float | None = 25.0
    decrease_percent: float = -50.0
    min_change_ml: float = 1.0
    assessed_components: tuple = ("3", "tumor_core")
    paired_support_z: float = 2.0
    paired_margin_mm: float = 5.0
    paired_method: str | dict = "boundary_shift"
    # the same for a pair one trained model segmented at both timepoints; None: paired_method
    paired_method_trained: str | dict | None = None
    bsi_window: tuple = (0.1, 0.5)
    bsi_band_out_mm: float = 3.0
    bsi_band_in_mm: float = 3.0
    bsi_tissue_distance_mm: float = 5.0
    bsi_core_tissue: str = "oedema"
    bsi_core_within_tumour: bool = True
    bsi_wt_window: tuple | None = None
    bsi_wt_band_out_mm: float | None = None
    bsi_wt_band_in_mm: float | None = None
    deformation_margin_mm: float = 20.0
    deformation_iso_mm: float = 1.0
    deformation_image_sigma_mm: float = 0.5
    deformation_field_sd_mm: float = 1.0
    deformation_levels: tuple = (2, 1)
    deformation_iterations: int = 100
    change_measure: str = "auto"
    # per component ("3" ET, TC, WT) or one word; chosen by measurement (config/longitudinal.yaml)
    change_measure_trained: str | dict = "paired"
    coverage_note_fraction: float = 0.98
    new_volume_reference_percentile: float = 95.0
    new_volume_dilate_mm: float = 2.0
    # tumour mode: which new enhancing lesions raise "progression suspected" (measurable | any | off)
    new_lesion_rule: str = "measurable"
    enhancing_mean_z: float = 2.0
    locate: bool = True

    @classmethod
    def load(cls, path: Path | None = None) -> "LongitudinalConfig":
        """From YAML (``path=None``: the packaged config/longitudinal.yaml).
        Unknown keys raise ValueError naming them."""
        if path is None:
            text = resources.files("brainline.config").joinpath("longitudinal.yaml").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path or 'config/longitudinal.yaml'}: unknown key(s) {', '.join(unknown)}")
        for k in ("linear_percentiles", "assessed_components", "bsi_window", "bsi_wt_window", "deformation_levels"):
            if k in data and data[k] is not None:
                data[k] = tuple(str(v) if k == "assessed_components" else v for v in data[k])
        cfg = cls(**data)
        if cfg.mode not in ("auto", "tumour", "lesion"):
            raise ValueError(f"mode must be auto, tumour or lesion, not {cfg.mode!r}")
        if cfg.intensity_match not in ("histogram", "linear"):
            raise ValueError(f"intensity_match must be histogram or linear, not {cfg.intensity_match!r}")
        if cfg.bsi_core_tissue not in ("oedema", "brain"):
            raise ValueError(f"bsi_core_tissue must be oedema or brain, not {cfg.bsi_core_tissue!r}")
        cfg.paired_method = _per_component_setting(cfg.paired_method, PAIRED_METHODS, "paired_method")
        if cfg.paired_method_trained is not None:
            cfg.paired_method_trained = _per_component_setting(cfg.paired_method_trained, PAIRED_METHODS,
                                                               "paired_method_trained")
        if cfg.new_lesion_rule not in NEW_LESION_RULES:
            raise ValueError(f"new_lesion_rule must be {', '.join(NEW_LESION_RULES)}, not {cfg.new_lesion_rule!r}")
        if cfg.borderline_percent is not None and not 0.0 < cfg.borderline_percent < cfg.progression_percent:
            raise ValueError(f"borderline_percent must be above 0 and below progression_percent "
                             f"({cfg.progression_percent:g}), or null, not {cfg.borderline_percent!r}")
        if cfg.change_measure not in ("auto", "paired", "segmentations"):
            raise ValueError(f"change_measure must be auto, paired or segmentations, not {cfg.change_measure!r}")
        cfg.change_measure_trained = _per_component_setting(cfg.change_measure_trained, ("paired", "segmentations"),
                                                            "change_measure_trained")
        return cfg

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def _per_component_setting(value, words: tuple, key: str):
    """A setting that is one word for ET, TC and WT, or a mapping of components
    (:data:`PAIRED_COMPONENTS`: "3", "tumor_core", "whole_tumor") to words; mapping keys
    as strings. Raises ValueError naming ``key`` otherwise."""
    if isinstance(value, dict):
        value = {str(k): v for k, v in value.items()}
    given = set(value.values()) if isinstance(value, dict) else {value}
    keys = set(value) if isinstance(value, dict) else set()
    if not given <= set(words) or not keys <= set(PAIRED_COMPONENTS):
        raise ValueError(f"{key} must be one of {', '.join(words)}, or a mapping of "
                         f"{', '.join(PAIRED_COMPONENTS)} to them, not {value!r}")
    return value


def per_component(value, default: str) -> dict[str, str]:
    """A word-or-mapping setting (see :func:`_per_component_setting`) for every component."""
    if isinstance(value, dict):
        return {k: str(value.get(k, default)) for k in PAIRED_COMPONENTS}
    return {k: str(value) for k in PAIRED_COMPONENTS}


# ---------------------------------------------------------------------------
# priors
def prepare_prior(prior_dir: Path, cfg: PipelineConfig) -> dict:
    """Bring a prior work folder to a summary.json: nothing when it has one;
    else select + convert its DICOM (prior.json "dicom_dir" or ``dicom/``)
    when it has no ``nifti/`` yet, then run every image STEP (cached, so a
    folder copied from an earlier job costs nothing). Returns the summary;
    raises whatever the steps raise (the caller records it in words)."""
    if (prior_dir / "summary.json").exists():
        return json.loads((prior_dir / "summary.json").read_text())
    if not (prior_dir / "nifti" / f"{cfg.reference}.nii.gz").exists():
        from .inputs import convert_inputs, select_inputs  # inputs imports image_pipeline: import late
        info = _read_json(prior_dir / "prior.json")
        dicom_dir = Path(info["dicom_dir"]) if info.get("dicom_dir") else prior_dir / "dicom"
        if not dicom_dir.is_dir():
            raise FileNotFoundError("it has neither processed results nor DICOM files")
        select_inputs(dicom_dir, prior_dir, cfg)
        convert_inputs(prior_dir)
    result: dict = {}
    for _, step in STEPS:
        result = step(prior_dir, cfg)
    return result


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _words(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:400]


def _date(d) -> str:
    d = str(d or "")
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or "unknown date")


# ---------------------------------------------------------------------------
# volumes
def _change(ref: dict, cur: dict) -> dict:
    out = {}
    for k in VOLUME_KEYS:
        a, b = ref.get(k), cur.get(k)
        if a is None or b is None:
            continue
        a, b = float(a), float(b)
        out[k] = {"prior_ml": round(a, 3), "current_ml": round(b, 3), "delta_ml": round(b - a, 3),
                  "percent": round(100.0 * (b - a) / a, 1) if a > 0 else None}
    return out


#: Mean blur of one linear interpolation at a random sub-voxel offset t: variance t(1 - t)
#: averaged over t in [0, 1), in voxel^2 per axis (sigma ~0.41 voxel).
LINEAR_INTERPOLATION_VARIANCE = 1.0 / 6.0

#: change.vs_prior_paired measures (``paired_method``; joint_segmentation only where both
#: timepoints were segmented by one of joint_segmentation.JOINT_SEGMENTERS, else boundary_shift).
PAIRED_METHODS = ("boundary_shift", "confirmed_voxels", "joint_segmentation", "deformation", "deformation_shift")

#: The paired measures that need the deformable registration of the pair.
DEFORMATION_METHODS = ("deformation", "deformation_shift")

#: Component -> (its voxels in a BraTS 2023 label map, the subtraction that must confirm a change).
PAIRED_COMPONENTS = {"whole_tumor": (lambda a: a > 0, "flair"),
                     "tumor_core": (lambda a: np.isin(a, (NCR, ET)), "t1c"),
                     "3": (lambda a: a == ET, "t1c")}


def paired_change(current_labels: np.ndarray, prior_labels: np.ndarray, z_maps: dict[str, np.ndarray],
                  voxel_mm3: float, support_z: float, margin_voxels: tuple[int, int, int] | None = None) -> dict:
    """Volume change of each component measured on the registered pair, not
    on two independent segmentations: the prior's component (its labels
    resampled onto the current grid) plus the voxels the current segmentation
    adds where the subtraction rose (robust z > ``support_z``), minus the
    voxels it drops where the subtraction fell (z < -``support_z``).
    Segmentation differences where the images did not change are not counted:
    they are the segmenter's own irreproducibility, not the tumour's change.
    With ``margin_voxels`` (z, y, x), confirmed rises within that margin of
    the prior component count as gained even where the current segmentation
    missed them (growth at the tumour's edge).
    Same entries as the independent change (mL, %) plus ``gained_ml``,
    ``lost_ml`` and the confirming ``sequence``. Arrays: (z, y, x) on one grid."""
    out = {}
    for key, (select, role) in PAIRED_COMPONENTS.items():
        z = z_maps.get(role)
        if z is None:
            z = next(iter(z_maps.values()), None)
            role = next(iter(z_maps), role)
        if z is None:
            continue
        before, now = select(prior_labels), select(current_labels)
        reach = now
        if margin_voxels and before.any():
            # dilation by a box: the maximum filter is separable, the same voxels as
            # binary_dilation with a box of ones, in a fraction of the time (5 mm at 1 mm: 0.05 s, not 5 s)
            reach = now | ndimage.maximum_filter(before, size=[2 * m + 1 for m in margin_voxels],
                                                 mode="constant", cval=0)
        gained = int(np.count_nonzero(reach & ~before & (z > support_z)))
        lost = int(np.count_nonzero(before & ~now & (z < -support_z)))
        prior_ml = float(np.count_nonzero(before)) * voxel_mm3 / 1000.0
        current_ml = prior_ml + (gained - lost) * voxel_mm3 / 1000.0
        entry = _change({key: prior_ml}, {key: current_ml})[key]
        entry.update(gained_ml=round(gained * voxel_mm3 / 1000.0, 3), lost_ml=round(lost * voxel_mm3 / 1000.0, 3),
                     sequence=role)
        out[key] = entry
    return out


def bsi_inputs(current_labels: np.ndarray, prior_labels: np.ndarray, images: dict[str, tuple], spacing_zyx,
               tissue_distance_mm: float, core_tissue: str = "oedema", core_within_tumour: bool = True) -> dict:
    """What the boundary shift integral of each component needs (see
    :func:`bsi_change`): component -> (current image, matched prior, where the
    integral may count (both imaged; for the core, inside the tumour), prior
    mask, current mask, tissue level, lesion level, sequence).

    The clip window lies between the levels of the two classes the component's
    boundary separates (as KN-BSI, Leung et al. 2010, sets the window from the
    tissue classes' intensities): WT on FLAIR, brain (more than
    ``tissue_distance_mm`` from either tumour) and the current oedema; TC and
    ET on T1c, the current oedema (``core_tissue="oedema"``, the class the
    core's boundary borders; the brain when there are fewer than 100 oedema
    voxels) or the brain ("brain") and the current enhancing tumour.
    ``core_within_tumour``: the core's integral counts only inside the union
    of both whole tumours (a core grows inside the tumour;
    T1c changes outside it, e.g. oedema spreading into white matter, are not
    core growth). A component that cannot be integrated (no sequence, too few
    lesion or tissue voxels, a lesion not brighter than the tissue, e.g. a
    core without enhancement on T1c) is left out."""
    out = {}
    any_tumour = (current_labels > 0) | (prior_labels > 0)
    far = (ndimage.distance_transform_edt(~any_tumour, sampling=spacing_zyx) > tissue_distance_mm
           if any_tumour.any() else np.ones(any_tumour.shape, bool))
    for key, (select, role) in PAIRED_COMPONENTS.items():
        if role not in images:
            continue
        cur, pri, within = images[role]
        before, now = select(prior_labels), select(current_labels)
        lesion = ((current_labels == 2) if key == "whole_tumor" else (current_labels == ET)) & within
        if lesion.sum() < 20:
            lesion = now & within
        tissue = far & within
        if lesion.sum() < 20 or tissue.sum() < 1000:
            continue
        t_level, l_level = float(np.median(cur[tissue])), float(np.median(cur[lesion]))
        if key != "whole_tumor":
            oedema = (current_labels == 2) & within
            if core_tissue == "oedema" and oedema.sum() >= 100:
                t_level = float(np.median(cur[oedema]))
            if core_within_tumour:
                within = within & any_tumour
        if l_level > t_level:
            out[key] = (cur, pri, within, before, now, t_level, l_level, role)
    return out


def bsi_setting(lcfg: "LongitudinalConfig", key: str) -> tuple[tuple[float, float], float, float]:
    """(clip window, band out mm, band in mm) of a component: the ``bsi_wt_*``
    keys for the whole tumour where set, else ``bsi_window`` / ``bsi_band_*``."""
    window, out_mm, in_mm = tuple(lcfg.bsi_window), lcfg.bsi_band_out_mm, lcfg.bsi_band_in_mm
    if key == "whole_tumor":
        window = tuple(lcfg.bsi_wt_window) if lcfg.bsi_wt_window is not None else window
        out_mm = lcfg.bsi_wt_band_out_mm if lcfg.bsi_wt_band_out_mm is not None else out_mm
        in_mm = lcfg.bsi_wt_band_in_mm if lcfg.bsi_wt_band_in_mm is not None else in_mm
    return (float(window[0]), float(window[1])), float(out_mm), float(in_mm)


def bsi_change(current_labels: np.ndarray, prior_labels: np.ndarray, images: dict[str, tuple], spacing_zyx,
               lcfg: "LongitudinalConfig", inputs: dict | None = None) -> dict:
    """Volume change of each component by the boundary shift integral
    (:mod:`.boundary_shift`) on the registered, intensity-matched pair: WT on
    FLAIR (levels: the brain more than ``bsi_tissue_distance_mm`` from either
    whole tumour, the current oedema), TC and ET on T1c (levels: the current
    oedema, ``bsi_core_tissue``, and the current enhancing tumour; counted
    inside the tumour, ``bsi_core_within_tumour``; see :func:`bsi_inputs`); clip window
    ``bsi_window``, band ``bsi_band_out_mm`` / ``bsi_band_in_mm`` (the whole
    tumour: ``bsi_wt_*`` where set, :func:`bsi_setting`). The prior's
    component volume (its labels on the current grid) plus the integral is the
    current volume. ``images``: role -> (current, matched prior, mask where both
    were imaged), (z, y, x) on the grid of the label maps; spacing in mm
    (z, y, x); ``inputs``: :func:`bsi_inputs`, when already computed.
    Components that cannot be integrated are left out."""
    out = {}
    voxel_mm3 = float(np.prod(spacing_zyx))
    if inputs is None:
        inputs = bsi_inputs(current_labels, prior_labels, images, spacing_zyx, lcfg.bsi_tissue_distance_mm,
                            lcfg.bsi_core_tissue, lcfg.bsi_core_within_tumour)
    for key, (cur, pri, within, before, now, t_level, l_level, role) in inputs.items():
        window, out_mm, in_mm = bsi_setting(lcfg, key)
        band = boundary_band(before, now, spacing_zyx, out_mm, in_mm, within)
        r = boundary_shift(cur, pri, band, t_level, l_level, window, voxel_mm3)
        if r["delta_mm3"] is None:
            continue
        prior_ml = float(np.count_nonzero(before)) * voxel_mm3 / 1000.0
        entry = _change({key: prior_ml}, {key: max(0.0, prior_ml + r["delta_mm3"] / 1000.0)})[key]
        entry.update(gained_ml=round(r["gained_mm3"] / 1000.0, 3), lost_ml=round(r["lost_mm3"] / 1000.0, 3),
                     sequence=role, method="boundary shift integral",
                     clip_levels=r["clip_levels"], band_ml=round(r["band_voxels"] * voxel_mm3 / 1000.0, 1))
        out[key] = entry
    return out


def deformation_change(current_labels: np.ndarray, prior_labels: np.ndarray, images: dict[str, tuple],
                       grid: sitk.Image, lcfg: "LongitudinalConfig", keys=tuple(PAIRED_COMPONENTS),
                       residual_inputs: dict | None = None) -> dict[str, dict]:
    """Volume change of each component by deformable registration of the pair
    (:mod:`.deformation_change`): WT carried by the FLAIR's displacement, TC
    and ET by the T1c's (:data:`PAIRED_COMPONENTS`); the prior's component
    volume (its labels on the current grid) plus the carried mask's growth is
    the current volume. ``images``: role -> (current, matched prior, mask where
    both were imaged), (z, y, x) on ``grid`` (the cropped current grid);
    ``keys``: the components to measure (a sequence none of them needs is not
    registered). With ``residual_inputs`` (:func:`bsi_inputs`; window and
    band from :func:`bsi_setting`) the components it holds also get the
    carried growth plus the boundary shift integral of what the field left
    unexplained (current image against the warped prior). Returns
    {"deformation": {component: entry}, "deformation_shift": {component:
    entry}}; components without a prior mask or a sequence are left out."""
    out: dict[str, dict] = {"deformation": {}, "deformation_shift": {}}
    voxel_mm3 = float(np.prod(grid.GetSpacing()))
    by_role: dict[str, dict[str, np.ndarray]] = {}
    for key, (select, role) in PAIRED_COMPONENTS.items():
        before = select(prior_labels)
        if key in keys and role in images and before.any():
            by_role.setdefault(role, {})[key] = before
    residual = {}
    for key, (_, _, within, _, now, t_level, l_level, _) in (residual_inputs or {}).items():
        window, out_mm, in_mm = bsi_setting(lcfg, key)
        residual[key] = ResidualShift(now, within, t_level, l_level, window, out_mm, in_mm)
    for role, masks in by_role.items():
        cur, pri, _ = images[role]
        t0 = time.monotonic()
        r = propagated_growth(cur, pri, masks, grid, margin_mm=lcfg.deformation_margin_mm,
                              iso_mm=lcfg.deformation_iso_mm, image_sigma_mm=lcfg.deformation_image_sigma_mm,
                              field_sd_mm=lcfg.deformation_field_sd_mm,
                              levels=tuple(int(v) for v in lcfg.deformation_levels),
                              iterations=lcfg.deformation_iterations, outline=[current_labels > 0],
                              residual={k: v for k, v in residual.items() if k in masks})
        seconds = round(time.monotonic() - t0, 2)
        for key, grown in (r.get("growth_mm3") or {}).items():
            prior_ml = float(np.count_nonzero(masks[key])) * voxel_mm3 / 1000.0
            common = dict(sequence=role, registration="symmetric-forces demons",
                          mean_displacement_mm=r["mean_displacement_mm"], seconds=seconds)
            entry = _change({key: prior_ml}, {key: max(0.0, prior_ml + grown / 1000.0)})[key]
            out["deformation"][key] = {**entry, **common, "method": "deformable registration"}
            unexplained = (r.get("residual_mm3") or {}).get(key)
            if unexplained is not None:
                entry = _change({key: prior_ml}, {key: max(0.0, prior_ml + (grown + unexplained) / 1000.0)})[key]
                out["deformation_shift"][key] = {
                    **entry, **common, "method": "deformable registration and boundary shift",
                    "carried_ml": round(grown / 1000.0, 3), "residual_ml": round(unexplained / 1000.0, 3)}
    return out


#: Segmentation backends (summary.json backends.segmentation.backend) that are not a trained model.
UNTRAINED_SEGMENTERS = ("baseline",)


def segmenter_of(summary: dict) -> str | None:
    """The segmentation backend of a timepoint (summary.json
    ``backends.segmentation.backend``, e.g. "brats17-wang" or "baseline"); None when unknown."""
    seg = ((summary or {}).get("backends") or {}).get("segmentation") or {}
    name = seg.get("backend") if isinstance(seg, dict) else None
    return str(name) if name else None


def one_trained_model(prior_summary: dict, current_summary: dict) -> str | None:
    """The trained model (any backend but :data:`UNTRAINED_SEGMENTERS`) that
    segmented both timepoints, or None (the baseline, two different segmenters,
    an unknown one)."""
    prior, current = segmenter_of(prior_summary), segmenter_of(current_summary)
    return current if prior == current and current not in (None, *UNTRAINED_SEGMENTERS) else None


def paired_methods_for(lcfg: "LongitudinalConfig", prior_summary: dict, current_summary: dict) -> tuple[dict, str]:
    """The paired measure per component ("3" ET, "tumor_core", "whole_tumor") and
    the setting it came from: ``paired_method_trained`` when one trained model
    segmented both timepoints and that key is set, else ``paired_method``."""
    if lcfg.paired_method_trained is not None and one_trained_model(prior_summary, current_summary):
        return per_component(lcfg.paired_method_trained, "boundary_shift"), "paired_method_trained"
    return per_component(lcfg.paired_method, "boundary_shift"), "paired_method"


MEASURE_NAMES = {"3": "ET", "tumor_core": "TC", "whole_tumor": "WT"}


def _trained_setting(lcfg: "LongitudinalConfig") -> dict[str, str]:
    """``change_measure_trained`` per component (ET "3", TC, WT): one word for all, or a mapping."""
    return per_component(lcfg.change_measure_trained, "paired")


def change_measure(lcfg: "LongitudinalConfig", prior_summary: dict, current_summary: dict,
                   paired: dict | None) -> dict:
    """Which change against the most recent prior the assessment, the SR and the
    PDF use, per component, and why (``change.measure`` of longitudinal.json):

    * ``uses``: component ("3" ET, "tumor_core", "whole_tumor") -> "paired"
      (``change.vs_prior_paired``, the registered pair: ``paired_method``) or
      "segmentations" (``change.vs_prior``, the two timepoints' own
      segmentations); NCR and ED always come from the segmentations;
    * ``setting``: ``change_measure`` as configured; ``segmenters``: the backend
      of each timepoint; ``reason``: in words.

    ``change_measure: auto`` decides by the segmenter: when one trained model
    (any backend but :data:`UNTRAINED_SEGMENTERS`) segmented both timepoints,
    ``change_measure_trained`` (one word, or per component); otherwise (the
    baseline, two different segmenters, unknown) the paired measure, which
    does not count a segmenter's irreproducibility between two scans. A
    component without a paired measure (no subtraction was possible, or the
    integral could not be taken) always comes from the segmentations."""
    segs = {"prior": segmenter_of(prior_summary), "current": segmenter_of(current_summary)}
    rec = {"setting": lcfg.change_measure, "segmenters": segs}
    paired = paired or {}
    if not paired:
        return {**rec, "uses": {k: "segmentations" for k in PAIRED_COMPONENTS},
                "reason": "no change could be measured on the registered image pair, so the two segmentations "
                          "are compared"}
    trained = one_trained_model(prior_summary, current_summary) is not None
    if lcfg.change_measure != "auto":
        uses = {k: lcfg.change_measure for k in PAIRED_COMPONENTS}
        why = f"configured (change_measure: {lcfg.change_measure})"
    elif trained:
        uses = _trained_setting(lcfg)
        by_seg = [MEASURE_NAMES[k] for k in MEASURE_NAMES if uses[k] == "segmentations"]
        by_pair = [MEASURE_NAMES[k] for k in MEASURE_NAMES if uses[k] == "paired"]
        why = f"both studies were segmented by the trained model {segs['current']}"
        if by_seg:
            why += (f"; for {', '.join(by_seg)} its two segmentations measured growth on synthetic follow-ups "
                    f"more accurately than the registered image pair")
        if by_pair:
            why += (f"; {', '.join(by_pair)} on the registered image pair, which measured them more accurately "
                    f"or more steadily there")
    else:
        uses = {k: "paired" for k in PAIRED_COMPONENTS}
        if segs["prior"] != segs["current"] and None not in segs.values():
            why = (f"the two studies were segmented by different models ({segs['prior']} and {segs['current']}), "
                   f"so their segmentations do not compare; the registered pair is measured")
        elif segs["current"] in UNTRAINED_SEGMENTERS:
            why = (f"the {segs['current']} segmenter differs between two scans of an unchanged tumour by several "
                   f"mL; the registered pair is measured")
        else:
            why = "the segmenter is not known to be a trained model; the registered pair is measured"
    uses = {k: (u if k in paired else "segmentations") for k, u in uses.items()}
    return {**rec, "uses": uses, "reason": why}


def volume_change(timepoints: list[dict], mode: str) -> tuple[dict, dict | None, dict | None]:
    """(vs_prior, vs_nadir, baseline timepoint) from timepoints sorted by
    date, current last. The nadir is the prior with the smallest ET (tumour
    mode) or WT (lesion mode); only with >= 2 priors."""
    cur, priors = timepoints[-1], timepoints[:-1]
    vs_prior = _change(priors[-1]["volumes_ml"], cur["volumes_ml"])
    vs_nadir = None
    key = "3" if mode == "tumour" else "whole_tumor"
    if len(priors) >= 2:
        nadir = min(priors, key=lambda t: (float(t["volumes_ml"].get(key) or 0.0), t["study_date"]))
        vs_nadir = _change(nadir["volumes_ml"], cur["volumes_ml"])
        vs_nadir["study_date"] = nadir["study_date"]
    return vs_prior, vs_nadir, priors[0]


def _lesion_words(lesion: dict) -> str:
    """"lesion 2 (right frontal, 14 x 12 mm)" for the assessment's reason."""
    where = " ".join(w for w in (lesion.get("hemisphere"), lesion.get("lobe"))
                     if w and w != "unknown")
    size = (f"{lesion['long_axis_mm']:.0f} x {lesion['short_axis_mm']:.0f} mm"
            if lesion.get("long_axis_mm") is not None else None)
    inner = ", ".join(w for w in (where, size) if w)
    return f"lesion {lesion.get('id')}" + (f" ({inner})" if inner else "")


def new_lesion_finding(lesions: list[dict] | None, lcfg: LongitudinalConfig) -> dict:
    """Tumour mode: the new lesions the RANO rule counts (``new_lesion_rule``).

    RANO 2.0 (Wen et al., J Clin Oncol 2023) and mRANO (Ellingson et al.,
    Neuro-Oncology 2017): a new *measurable* enhancing lesion (both
    perpendicular diameters >= 10 mm) is progression; a new non-measurable
    one is not by itself (it is followed, and progression dates back to it
    once it becomes measurable). RANO 2010 (Wen et al., J Clin Oncol 2010):
    any new lesion. Returns ``{"rule", "counted", "below_measurable",
    "non_enhancing"}`` (lesion ids) and ``"words"`` (reason fragments)."""
    new = [l for l in lesions or [] if l.get("kind") == "new"]
    enhancing = [l for l in new if l.get("enhancing")]
    rule = lcfg.new_lesion_rule
    counted = [] if rule == "off" else [l for l in enhancing if rule == "any" or l.get("measurable")]
    small = [l for l in enhancing if l not in counted]
    plain = [l for l in new if l.get("enhancing") is False]
    unknown = [l for l in new if "enhancing" not in l]    # no T1c subtraction to tell
    words = []
    if counted:
        words.append(f"{len(counted)} new enhancing lesion(s) against the prior study: "
                     + "; ".join(_lesion_words(l) for l in counted)
                     + (" (RANO 2.0: a new measurable enhancing lesion, both diameters >= 10 mm, is progression)"
                        if rule == "measurable" else " (RANO 2010: any new enhancing lesion is progression)"))
    if small:
        words.append(f"{len(small)} new enhancing lesion(s) "
                     + ("below measurable size (both diameters >= 10 mm): " if rule == "measurable" else
                        "not counted (new_lesion_rule: off): ")
                     + "; ".join(_lesion_words(l) for l in small)
                     + (" - not progression on their own under RANO 2.0; to be followed" if rule == "measurable"
                        else ""))
    if plain:
        words.append(f"{len(plain)} new non-enhancing (FLAIR) lesion(s): "
                     + "; ".join(_lesion_words(l) for l in plain) + " - not counted by the enhancing-tumour rule")
    if unknown:
        words.append(f"{len(unknown)} new lesion(s) whose enhancement could not be assessed (no T1c subtraction): "
                     + "; ".join(_lesion_words(l) for l in unknown))
    return {"rule": rule, "counted": [l.get("id") for l in counted], "below_measurable": [l.get("id") for l in small],
            "non_enhancing": [l.get("id") for l in plain], "not_assessed": [l.get("id") for l in unknown],
            "words": words}


def assess(change: dict, baseline_change: dict | None, lcfg: LongitudinalConfig, lesions: list[dict] | None,
           mode: str) -> dict:
    """RANO-like code and the reason in words.

    Tumour mode: "progression suspected" when ET or TC (assessed_components)
    grew by >= progression_percent AND >= min_change_ml against the nadir
    (against the most recent prior without a nadir), or appeared (0 before,
    >= min_change_ml now), or when a new enhancing lesion counts under
    ``new_lesion_rule`` (:func:`new_lesion_finding`; default: measurable,
    RANO 2.0); "borderline" when none of that holds but ET or TC grew by
    >= borderline_percent (and < progression_percent) AND >= min_change_ml
    against the same study: growth this close to the threshold may be a
    progression the volume-change measures under-read (they read growth low
    on the synthetic follow-ups, README), so the reason asks for the images
    to be compared (``assessment["borderline"]``: the components); "decrease"
    when it fell by <= decrease_percent and by >= min_change_ml against the
    baseline (earliest prior); else "stable". New lesions the rule does not
    count are named in the reason.
    ``assessment["new_lesions"]`` lists the ids the rule counted and did not.
    Lesion mode: "progression suspected" when new or growing lesions were
    found, "stable" when the subtraction found none, "not assessable" when
    no subtraction was possible."""
    if mode == "lesion":
        if lesions is None:
            return {"code": "not assessable", "reason": "no subtraction was possible, so new or enlarging "
                                                        "lesions could not be assessed"}
        if lesions:
            kinds = [l["kind"] for l in lesions]
            return {"code": "progression suspected",
                    "reason": f"{kinds.count('new')} new and {kinds.count('growing')} enlarging FLAIR/T1c "
                              f"lesion(s) against the prior study"}
        return {"code": "stable", "reason": "no new or enlarging lesion against the prior study"}
    finding = new_lesion_finding(lesions, lcfg)
    words = finding.pop("words")
    extra = {"new_lesions": finding} if lesions is not None else {}
    ref = change.get("vs_nadir") or change.get("vs_prior") or {}
    ref_name = "the nadir" if change.get("vs_nadir") else "the prior study"
    names = {"3": "enhancing tumour", "tumor_core": "tumour core", "whole_tumor": "whole tumour",
             "1": "necrosis", "2": "oedema"}
    found, near, comp_texts = [], [], []
    for k in lcfg.assessed_components:
        c = ref.get(k)
        if not c:
            continue
        comp_texts.append(f"{names.get(k, k)} {c['prior_ml']:.1f} -> {c['current_ml']:.1f} mL"
                          + (f" ({c['percent']:+.0f} %)" if c["percent"] is not None else ""))
        big = c["delta_ml"] >= lcfg.min_change_ml
        if big and (c["percent"] is None or c["percent"] >= lcfg.progression_percent):
            found.append(names.get(k, k))
        elif big and lcfg.borderline_percent is not None and c["percent"] >= lcfg.borderline_percent:
            near.append(k)
    if not comp_texts and not finding["counted"]:
        return {"code": "not assessable", "reason": "; ".join(["tumour volumes are missing for the comparison",
                                                               *words]), **extra}
    rule = (f"threshold: +{lcfg.progression_percent:g} % volume and at least {lcfg.min_change_ml:g} mL "
            f"against {ref_name} (RANO volumetric equivalent)")
    if found or finding["counted"]:
        volume = ([f"{' and '.join(found)} increased against {ref_name}: " + "; ".join(comp_texts) + f"; {rule}"]
                  if found else [])
        return {"code": "progression suspected", "reason": "; ".join(volume + words), **extra}
    if near:
        return {"code": "borderline", "borderline": near, "reason": "; ".join([
            f"{' and '.join(names.get(k, k) for k in near)} increased against {ref_name} by less than the "
            f"progression threshold but by at least +{lcfg.borderline_percent:g} %: " + "; ".join(comp_texts)
            + f"; {rule}; the volume-change measures can read growth low by a quarter or more, so progression "
              "cannot be excluded: compare the images", *words]), **extra}
    base = baseline_change or {}
    dec = []
    for k in lcfg.assessed_components:
        c = base.get(k)
        if c and c["percent"] is not None and c["percent"] <= lcfg.decrease_percent \
                and -c["delta_ml"] >= lcfg.min_change_ml:
            dec.append(f"{names.get(k, k)} {c['prior_ml']:.1f} -> {c['current_ml']:.1f} mL ({c['percent']:+.0f} %)")
    if dec:
        return {"code": "decrease", "reason": "; ".join(
            ["decreased against the baseline study: " + "; ".join(dec)
             + f"; threshold: {lcfg.decrease_percent:g} % and at least {lcfg.min_change_ml:g} mL", *words]), **extra}
    return {"code": "stable", "reason": "; ".join(
        [f"no volume change beyond the thresholds against {ref_name}: " + "; ".join(comp_texts) + f"; {rule}",
         *words]), **extra}


# ---------------------------------------------------------------------------
# images
def _match_prior(p_arr: np.ndarray, c_arr: np.ndarray, fit: np.ndarray, bias_fit: np.ndarray | None,
                 common: np.ndarray, prior_mask: np.ndarray, subtracted: bool, lcfg: LongitudinalConfig,
                 grid: sitk.Image) -> tuple[np.ndarray, dict]:
    """The prior's intensities mapped onto the current's (``intensity_match``), fitted
    on ``fit``, then, for a ``subtracted`` sequence, times the differential bias field
    fitted on ``bias_fit`` (None: the common brain). Arrays on the cropped current
    grid (z, y, x); returns (matched prior, record)."""
    matched, mrec = match_intensity(p_arr, c_arr, fit, prior_mask, lcfg.intensity_match,
                                    lcfg.histogram_levels, lcfg.histogram_match_points,
                                    tuple(lcfg.linear_percentiles))
    if lcfg.differential_bias_sigma_mm > 0 and subtracted:
        f, mrec["differential_bias"] = differential_bias(c_arr, matched, common, grid.GetSpacing()[::-1],
                                                         lcfg.differential_bias_sigma_mm, fit=bias_fit)
        matched = matched * f
    return matched, mrec


def _read(path: Path, pixel=sitk.sitkFloat32) -> sitk.Image:
    return sitk.ReadImage(str(path), pixel)


def _roles(work: Path) -> list[str]:
    return [r for r in ROLES if (work / "preprocessed" / f"{r}.nii.gz").exists()]


def _axes(image: sitk.Image) -> np.ndarray:
    """Unit vectors (rows, LPS) of the image's index axes x, y, z."""
    return np.array(image.GetDirection(), dtype=float).reshape(3, 3).T


def _native_header(work: Path, role: str) -> sitk.ImageFileReader | None:
    """The header (spacing in mm, direction) of ``nifti/<role>.nii.gz``, or None."""
    p = work / "nifti" / f"{role}.nii.gz"
    if not p.exists():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    return reader


def _native_mm(work: Path, role: str, axes: np.ndarray) -> list[float] | None:
    """Extent (mm) of one native voxel of ``role`` along each of ``axes``."""
    reader = _native_header(work, role)
    if reader is None:
        return None
    img = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    img.SetSpacing(reader.GetSpacing())
    img.SetDirection(reader.GetDirection())
    return [round(float(v), 3) for v in voxel_extent_mm(img, axes)]


def _native_max_mm(work: Path, role: str) -> float | None:
    """Largest native voxel size (mm) of ``role``, e.g. a 2D slice thickness."""
    reader = _native_header(work, role)
    return None if reader is None else float(max(reader.GetSpacing()))


def _header_image(reader: sitk.ImageFileReader) -> sitk.Image:
    """An empty uint8 image with the geometry (size, spacing, origin, direction) a header describes."""
    img = sitk.Image([int(v) for v in reader.GetSize()[:3]], sitk.sitkUInt8)
    img.SetSpacing(reader.GetSpacing()[:3])
    img.SetOrigin(reader.GetOrigin()[:3])
    img.SetDirection(reader.GetDirection()[:9])
    return img


def _coverage(work: Path, role: str, reference: str, grid: sitk.Image,
              to_reference: sitk.Transform | None = None) -> np.ndarray | None:
    """Where ``work``'s native ``role`` acquisition (``nifti/<role>.nii.gz``)
    covers ``grid`` (see :func:`native_coverage`: one native voxel, e.g. one
    slice thickness, inside its edges). ``to_reference`` maps ``grid`` points to
    ``work``'s reference grid (the registration of a prior; None = the same
    frame); the study's own ``registered/<role>_to_<reference>.tfm`` carries
    them on to the native acquisition. None when the native header is missing."""
    reader = _native_header(work, role)
    if reader is None:
        return None
    chain = []
    tfm = work / "registered" / f"{role}_to_{reference}.tfm"
    if role != reference and tfm.exists():
        chain.append(sitk.ReadTransform(str(tfm)))
    if to_reference is not None:
        chain.append(to_reference)
    tx = sitk.CompositeTransform(chain) if chain else sitk.Transform(3, sitk.sitkIdentity)  # applies the last first
    return native_coverage(_header_image(reader), grid, tx)


def _neighbourhood_max(z: np.ndarray, grid: sitk.Image, radius_mm: float) -> np.ndarray:
    """Maximum of ``z`` within an ellipsoid of ``radius_mm`` (per axis of the grid)."""
    r = [int(np.floor(radius_mm / s + 1e-6)) for s in grid.GetSpacing()[::-1]]  # (z, y, x)
    if max(r) == 0:
        return z
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    fp = (zz / max(r[0], 1)) ** 2 + (yy / max(r[1], 1)) ** 2 + (xx / max(r[2], 1)) ** 2 <= 1.0 + 1e-6
    return ndimage.maximum_filter(z, footprint=fp)


def _norm_smooth(image: sitk.Image, mask: sitk.Image, sigma: np.ndarray, cache: dict | None = None) -> sitk.Image:
    """Gaussian smoothing (per-axis sigma, mm) normalised by the smoothed mask
    (no dark rim at the brain edge), 0 outside the mask. ``cache`` keeps the
    smoothed masks between calls."""
    if float(np.max(sigma)) < 0.05:
        return image
    m = sitk.Cast(mask, sitk.sitkFloat32)
    num = smooth_mm(image * m, sigma)
    key = (id(mask), tuple(round(float(v), 4) for v in sigma))
    if cache is not None and key in cache:
        den = cache[key]
    else:
        den = sitk.GetArrayFromImage(smooth_mm(m, sigma))
        if cache is not None:
            cache[key] = den
    a = sitk.GetArrayFromImage(num) / np.maximum(den, 1e-3)
    a[sitk.GetArrayViewFromImage(mask) == 0] = 0
    out = sitk.GetImageFromArray(a.astype(np.float32))
    out.CopyInformation(image)
    return out


def _compare_images(work: Path, prior_dir: Path, index: int, date_text: str, cfg: PipelineConfig,
                    lcfg: LongitudinalConfig, mode: str, paired_setting: tuple[dict, str],
                    joint_backend=None) -> dict:
    """Register, match, subtract and find lesions; returns a record with
    "registration", "ok" (False = flagged/failed, with "note"), and when ok:
    "subtractions", "resolution", "intensity_match", "lesions" (Candidates),
    "notes", "grid". ``paired_setting``: (measure per component, the key it came
    from), :func:`paired_methods_for`."""
    rec: dict = {"ok": False, "notes": [], "flags": []}
    cur_roles, pri_roles = _roles(work), _roles(prior_dir)
    common_roles = [r for r in ROLES if r in cur_roles and r in pri_roles]
    order = [cfg.reference] + [r for r in ("t1c", "flair", "t1", "t2") if r != cfg.reference]
    reg_role = next((r for r in order if r in common_roles), None)
    if reg_role is None:
        rec["note"] = (f"the prior study of {date_text} has no sequence in common with the current one, "
                       "so it could not be registered: volumes compared only")
        return rec
    grid = _read(work / "segmentation.nii.gz", sitk.sitkUInt8)
    cur_mask_img = sitk.Cast(_read(work / "brain_mask.nii.gz", sitk.sitkUInt8) > 0, sitk.sitkUInt8)
    fixed = _read(work / "preprocessed" / f"{reg_role}.nii.gz")
    moving = _read(prior_dir / "preprocessed" / f"{reg_role}.nii.gz")
    radius = [max(1, int(round(5.0 / s))) for s in fixed.GetSpacing()]
    rcfg = replace(cfg.registration, transform=lcfg.transform, raise_if_not_converged=False)
    label = ROLE_LABELS.get(reg_role, reg_role)
    try:
        reg = register(fixed, moving, rcfg, fixed_mask=sitk.BinaryDilate(cur_mask_img, radius),
                       moving_name=f"prior {label}", fixed_name=f"current {label}")
    except RegistrationError as exc:
        rec["registration"] = {"transform": lcfg.transform, "quality": {}, "flags": [_words(exc)]}
        rec["flags"] = [f"registration of the prior study ({date_text}) failed: {_words(exc)}"]
        rec["note"] = (f"the prior study of {date_text} could not be registered to the current study "
                       f"({_words(exc)}): no subtraction and no new-lesion detection; volumes compared only")
        return rec
    q = {k: v for k, v in reg.quality.items() if isinstance(v, (int, float))}
    rec["registration"] = {"transform": lcfg.transform, "sequence": reg_role, "quality": q,
                           "parameters": reg.parameters, "flags": list(reg.flags)}
    if reg.flags:
        rec["flags"] = [f"registration of the prior study ({date_text}) to the current study: {f}" for f in reg.flags]
        rec["note"] = (f"the prior study of {date_text} could not be registered reliably to the current study "
                       f"({'; '.join(reg.flags)}): no subtraction and no new-lesion detection; volumes compared only")
        return rec
    tx = reg.transform
    # work on the brain's bounding box (+ 8 mm) of the current grid: same
    # physical positions, 2-3x fewer voxels; outputs are pasted back (0 outside)
    full_grid = grid
    full_mask = sitk.GetArrayFromImage(cur_mask_img) > 0
    crop = mask_box([full_mask], grid.GetSpacing()[::-1], 8.0)
    if crop is None:
        raise ValueError("the current study's brain mask is empty")
    roi = ([c.stop - c.start for c in crop[::-1]], [c.start for c in crop[::-1]])
    grid = sitk.RegionOfInterest(full_grid, *roi)
    cur_mask_img = sitk.RegionOfInterest(cur_mask_img, *roi)

    def write_full(arr: np.ndarray, path: Path) -> None:
        full = np.zeros(full_mask.shape, np.float32)
        full[crop] = arr
        img = sitk.GetImageFromArray(full)
        img.CopyInformation(full_grid)
        _write(img, path)

    cur_mask = sitk.GetArrayFromImage(cur_mask_img) > 0
    pm_img = resample_to(sitk.Cast(_read(prior_dir / "brain_mask.nii.gz", sitk.sitkUInt8) > 0, sitk.sitkUInt8),
                         grid, tx, interpolator="nearest")
    prior_mask = sitk.GetArrayFromImage(pm_img) > 0
    common = cur_mask & prior_mask
    common_img = sitk.GetImageFromArray(common.astype(np.uint8))
    common_img.CopyInformation(grid)
    prior_lab = np.zeros(common.shape, np.uint8)  # (cropped grid from here on)
    if (prior_dir / "segmentation.nii.gz").exists():
        prior_lab = sitk.GetArrayFromImage(resample_to(_read(prior_dir / "segmentation.nii.gz", sitk.sitkUInt8),
                                                       grid, tx, interpolator="nearest"))
    prior_seg = prior_lab > 0
    cur_lab = sitk.GetArrayFromImage(grid)  # grid = the cropped current segmentation
    cur_seg = cur_lab > 0
    center = tx.GetCenter() if hasattr(tx, "GetCenter") else (0.0, 0.0, 0.0)
    R = np.stack([np.array(tx.TransformVector(tuple(float(v) for v in e), center)) for e in np.eye(3)], axis=1)
    axes = _axes(grid)
    out_dir = work / "longitudinal"
    subtractions, resolution, z_maps, prior_z, current_z, matched_rec, sd_rec = {}, {}, {}, {}, {}, {}, {}
    prior_voxel_z: dict = {}
    coverage_rec: dict = {}
    pair_images: dict = {}
    joint_images: dict = {}
    flair_bright_cur = flair_bright_pri = None
    den_cache: dict = {}
    # sequences subtracted: FLAIR and T1c (written, measured, searched); T2 too with combine_t2,
    # for the lesion search only (the combined FLAIR+T2 evidence, after the loop)
    subtracted = SUBTRACTION_ROLES + (("t2",) if lcfg.combine_t2 and {"flair", "t2"} <= set(common_roles) else ())
    evidence: dict = {}
    for role in common_roles:
        cur = _read(work / "preprocessed" / f"{role}.nii.gz")
        if cur.GetSize() == full_grid.GetSize():
            cur = sitk.RegionOfInterest(cur, *roi)
        else:
            cur = resample_to(cur, grid, sitk.Transform(3, sitk.sitkIdentity))
        pri = resample_to(_read(prior_dir / "preprocessed" / f"{role}.nii.gz"), grid, tx)
        s_cur, s_pri = np.zeros(3), np.zeros(3)
        if role in subtracted and lcfg.match_resolution:
            c_mm = _native_mm(work, role, axes)
            p_mm = _native_mm(prior_dir, role, axes @ R.T)
            res = {"current_mm": c_mm, "prior_mm": p_mm, "smoothed": None}
            if c_mm and p_mm:
                s_cur, s_pri = resolution_sigmas(np.array(c_mm), np.array(p_mm))
                if float(np.max(s_cur)) >= 0.05 or float(np.max(s_pri)) >= 0.05:
                    res["smoothed"] = "prior" if float(np.sum(s_pri ** 2)) >= float(np.sum(s_cur ** 2)) else "current"
                    res["sigma_mm"] = {"current": [round(float(v), 3) for v in s_cur],
                                       "prior": [round(float(v), 3) for v in s_pri]}
            else:
                res["note"] = "native voxel sizes unknown for one timepoint: no resolution matching"
            resolution[role] = res
        light = np.array(grid.GetSpacing()) * lcfg.smooth_voxels
        if joint_backend is not None:
            # the joint segmentation's current: also blurred as the prior was by its one extra
            # linear interpolation onto this grid (LINEAR_INTERPOLATION_VARIANCE per axis)
            joint_cur = sitk.GetArrayFromImage(_norm_smooth(
                cur, cur_mask_img, np.sqrt(s_cur ** 2 + light ** 2 + np.array(grid.GetSpacing()) ** 2
                                           * LINEAR_INTERPOLATION_VARIANCE), den_cache))
        if role in subtracted or joint_backend is not None:
            # plus the same light blur on both (the prior went through one more
            # interpolation than the current); one Gaussian: variances add
            cur = _norm_smooth(cur, cur_mask_img, np.sqrt(s_cur ** 2 + light ** 2), den_cache)
            pri = _norm_smooth(pri, pm_img, np.sqrt(s_pri ** 2 + light ** 2), den_cache)
        c_arr = sitk.GetArrayFromImage(cur)
        p_arr = sitk.GetArrayFromImage(pri)
        covered = common
        if role in subtracted:
            # only where both acquisitions imaged the brain (a thick prior FLAIR may stop short of the
            # cerebellum): the subtraction and the candidates are limited to the common native coverage
            covered = common.copy()
            for c in (_coverage(work, role, cfg.reference, grid), _coverage(prior_dir, role, cfg.reference, grid, tx)):
                if c is not None:
                    covered &= c
            fraction = float(covered.sum()) / max(1, int(common.sum()))
            coverage_rec[role] = round(100.0 * fraction, 1)
            if fraction < lcfg.coverage_note_fraction:
                rec["notes"].append(f"{ROLE_LABELS.get(role, role)} of the two studies overlaps on "
                                    f"{100.0 * fraction:.0f} % of the brain only: no subtraction outside it")
        # option: fitted away from the lesions, the segmentations (+ match_exclude_lesion_mm) and what is
        # bright on this sequence at either time (+ 2 mm)
        bright = ((robust_z(c_arr, covered)[0] > lcfg.lesion_bright_z)
                  | (robust_z(p_arr, covered)[0] > lcfg.lesion_bright_z)) if lcfg.match_exclude_lesion_mm > 0 else None
        fit, fit_rec = fit_region(covered, prior_seg | cur_seg, grid.GetSpacing()[::-1], lcfg.match_exclude_lesion_mm,
                                  bright=bright)
        excluded = bool(fit_rec["lesions_excluded"])
        matched, mrec = _match_prior(p_arr, c_arr, fit, fit & common if excluded else None, common, prior_mask,
                                     role in subtracted, lcfg, grid)
        mrec["fit"] = fit_rec
        matched_rec[role] = mrec
        if joint_backend is not None:
            # the joint measure keeps the whole-brain fit it was measured with (README "Joint segmentation run")
            joint_images[role] = (joint_cur, _match_prior(p_arr, c_arr, covered, None, common, prior_mask,
                                                          role in subtracted, lcfg, grid)[0] if excluded else matched)
        write_full(matched, out_dir / f"prior{index}_{role}.nii.gz")
        if role in subtracted:
            d = np.where(covered, c_arr - matched, 0.0).astype(np.float32)
            d[~cur_mask] = 0.0
            # image statistics from where each image has signal (not its zero-filled parts)
            cur_signal, pri_signal = signal_mask(c_arr, common), signal_mask(matched, common)
            floor = lcfg.min_sd_percent / 100.0 * float(np.median(c_arr[cur_signal])) if common.any() else 0.0
            z, _, sd_used = robust_z(d, covered, floor)
            sd_rec[role] = {"robust_sd": round(float(sd_used), 4), "floor": round(floor, 4)}
            evidence[role] = (z, covered)
            if role not in SUBTRACTION_ROLES:
                continue
            write_full(d, out_dir / f"subtraction_{role}.nii.gz")
            subtractions[role] = f"longitudinal/subtraction_{role}.nii.gz"
            z_maps[role] = z
            pair_images[role] = (c_arr, matched, covered)
            prior_image_z = robust_z(matched, common, stats_mask=pri_signal)[0]
            prior_z[role] = _neighbourhood_max(prior_image_z, grid, lcfg.prior_bright_radius_mm)
            prior_voxel_z[role] = prior_image_z
            current_z[role] = robust_z(c_arr, common, stats_mask=cur_signal)[0]
            if role == "flair":
                flair_bright_cur = current_z[role] > lcfg.lesion_bright_z
                flair_bright_pri = prior_image_z > lcfg.lesion_bright_z
    for role in SUBTRACTION_ROLES:
        mm = [m for m in (_native_max_mm(work, role), _native_max_mm(prior_dir, role)) if m]
        if role == "flair" and mm and max(mm) >= lcfg.thick_slice_mm:
            which = "prior" if (_native_max_mm(prior_dir, role) or 0) >= lcfg.thick_slice_mm else "current"
            rec["notes"].append(f"FLAIR of the {which} study has {max(mm):.1f} mm slices: small-lesion detection "
                                f"is limited")
    if not z_maps:
        rec["note"] = (f"the prior study of {date_text} has neither FLAIR nor T1c in common with the current "
                       "study: no subtraction; volumes compared only")
        return rec
    cur_lesion, pri_lesion = cur_seg.copy(), prior_seg.copy()
    if mode == "lesion" and flair_bright_cur is not None:
        cur_lesion |= flair_bright_cur
        pri_lesion |= flair_bright_pri
    voxel_mm3 = float(np.prod(grid.GetSpacing()))
    detect = detection_region(common_img, lcfg.edge_margin_mm)
    search_z, search_prior, search_current = dict(z_maps), dict(prior_z), dict(current_z)
    min_current = {r: lcfg.current_min_z for r in z_maps}
    if "t2" in evidence and "flair" in evidence:
        search_z[COMBINED_ROLE], rec["combined_t2"] = combined_evidence(evidence["flair"], evidence["t2"])
        # brightness now and at the prior from the FLAIR: a lesion and CSF are both bright on T2
        search_prior[COMBINED_ROLE], search_current[COMBINED_ROLE] = prior_z["flair"], current_z["flair"]
        prior_voxel_z[COMBINED_ROLE] = prior_voxel_z["flair"]
        min_current[COMBINED_ROLE] = lcfg.combined_current_min_z
    cands, dropped = find_lesions(search_z, search_prior, search_current, common, cur_lesion, pri_lesion, voxel_mm3,
                                  lcfg, segmentation_extent=(mode == "tumour"), detect=detect,
                                  spacing_zyx=tuple(grid.GetSpacing()[::-1]), min_current=min_current,
                                  prior_voxel_z=prior_voxel_z if lcfg.lesion_growth_excludes_prior_bright else None)
    margin = (tuple(max(0, int(round(lcfg.paired_margin_mm / s))) for s in grid.GetSpacing()[::-1])
              if lcfg.paired_margin_mm > 0 else None)
    voxels = paired_change(cur_lab, prior_lab, z_maps, voxel_mm3, lcfg.paired_support_z, margin)
    for entry in voxels.values():
        entry["method"] = "subtraction-confirmed voxels"
    bsi_in = bsi_inputs(cur_lab, prior_lab, pair_images, grid.GetSpacing()[::-1], lcfg.bsi_tissue_distance_mm,
                        lcfg.bsi_core_tissue, lcfg.bsi_core_within_tumour)
    bsi = bsi_change(cur_lab, prior_lab, pair_images, grid.GetSpacing()[::-1], lcfg, bsi_in)
    rec["paired_methods"] = {"boundary_shift": bsi, "confirmed_voxels": voxels}
    chosen_methods, rec["paired_setting"] = paired_setting
    by_deformation = [k for k, m in chosen_methods.items() if m in DEFORMATION_METHODS]
    if by_deformation:
        with_residual = {k: v for k, v in bsi_in.items() if chosen_methods.get(k) == "deformation_shift"}
        deformed = deformation_change(cur_lab, prior_lab, pair_images, grid, lcfg, by_deformation, with_residual)
        rec["paired_methods"].update({m: v for m, v in deformed.items() if v or m in chosen_methods.values()})
    if joint_backend is not None:
        rec["paired_methods"]["joint_segmentation"] = joint_segmentation_change(
            joint_backend, joint_images, common, grid.GetSpacing()[::-1],
            {k: select for k, (select, _) in PAIRED_COMPONENTS.items()}, prior_lab, _change)
    # the configured measure; a component it cannot give (e.g. no enhancement for the BSI on T1c;
    # no joint segmentation for a trained model) comes from the next one, its "method" says which
    methods = rec["paired_methods"]
    rec["paired_change"] = {}
    for k, chosen in chosen_methods.items():
        fallback = ("deformation",) if chosen == "deformation_shift" else ()   # no residual: the carried growth
        preference = [chosen, *fallback] + [m for m in ("boundary_shift", "confirmed_voxels") if m != chosen]
        entry = next(((methods.get(m) or {}).get(k) for m in preference if (methods.get(m) or {}).get(k)), None)
        if entry:
            rec["paired_change"][k] = entry
    rec.update(ok=True, subtractions=subtractions, resolution=resolution, intensity_match=lcfg.intensity_match,
               intensity_mapping=matched_rec, subtraction_sd=sd_rec, coverage_percent=coverage_rec,
               candidates=cands, dropped=dropped, grid=grid,
               full_grid=full_grid, crop=crop, z_maps=z_maps, current_z=current_z, common=common)
    return rec


def _joint_backend(methods: dict[str, str], prior_summary: dict, current_summary: dict):
    """The segmenter for the joint-segmentation measure: when the paired measure
    (``methods``, :func:`paired_methods_for`) is joint_segmentation for a component
    and one segmenter that can re-run on arrays
    (:data:`.joint_segmentation.JOINT_SEGMENTERS`) segmented both timepoints; else None."""
    if "joint_segmentation" not in methods.values():
        return None
    name = segmenter_of(current_summary)
    if name not in JOINT_SEGMENTERS or segmenter_of(prior_summary) != name:
        return None
    return load_backend({"type": name})


# ---------------------------------------------------------------------------
def step_longitudinal(work: Path, cfg: PipelineConfig, lcfg: LongitudinalConfig | None = None) -> dict:
    """Compare the current study (work folder ``work``, already through the
    image STEPS) with the priors listed in ``work/priors.json``; cached in
    ``work/longitudinal.json``. Never raises for a prior that cannot be
    prepared or registered (the reason is recorded in words)."""
    work = Path(work)

    def run() -> dict:
        t0 = time.monotonic()
        lc = lcfg or LongitudinalConfig.load()
        mode = lc.mode if lc.mode != "auto" else ("tumour" if cfg.reference == "t1c" else "lesion")
        out = {"mode": mode, "priors": 0, "note": None, "notes": [], "flags": [], "comparison": None,
               "timepoints": [], "change": {"vs_prior": None, "vs_nadir": None},
               "assessment": {"code": "not assessable", "reason": "no prior study to compare with"},
               "lesions": [], "thresholds": lc.to_dict(), "timings_s": {}}
        pj = _read_json(work / "priors.json")
        out["notes"] += [str(n) for n in pj.get("notes", [])]
        entries = list(pj.get("priors") or [])
        if not entries:
            searched = "; ".join(pj.get("searched") or [])
            out["note"] = "no prior study found" + (f" ({searched})" if searched else "") + \
                          ": no longitudinal comparison"
            return out
        cur_date = str((pj.get("current") or {}).get("study_date") or "")
        usable, problems = [], []
        t_prep = time.monotonic()
        for k, e in enumerate(entries):
            pdir = work / str(e.get("dir") or f"priors/{k}")
            date = str(e.get("study_date") or "")
            if cur_date and date and date >= cur_date:
                problems.append(f"the study of {_date(date)} is not earlier than the current one and was not used")
                continue
            try:
                summary = prepare_prior(pdir, cfg)
            except Exception as exc:  # noqa: BLE001 - a prior must never stop the current study's results
                log.warning("prior %s could not be prepared: %s", pdir.name, _words(exc))
                problems.append(f"the prior study of {_date(date)} could not be processed: {_words(exc)}")
                continue
            usable.append({"index": k, "dir": pdir, "entry": e, "summary": summary, "date": date})
        out["timings_s"]["prepare_priors"] = round(time.monotonic() - t_prep, 2)
        out["notes"] += problems
        if not usable:
            out["note"] = "no usable prior study: " + "; ".join(problems)
            return out
        usable.sort(key=lambda u: u["date"])
        out["priors"] = len(usable)
        recent = usable[-1]
        cur_summary = _read_json(work / "summary.json")
        timepoints = []
        for u in usable:
            kept = list(u["entry"].get("kept_as") or [])
            timepoints.append({"label": "prior", "study_date": u["date"],
                               "pseudo_study_uid": u["entry"].get("pseudo_study_uid"),
                               "volumes_ml": dict(u["summary"].get("volumes_ml") or {}), "kept_as": kept})
        timepoints.append({"label": "current", "study_date": cur_date, "pseudo_study_uid": None,
                           "volumes_ml": dict(cur_summary.get("volumes_ml") or {}), "kept_as": []})
        vs_prior, vs_nadir, baseline_tp = volume_change(timepoints, mode)
        if len(usable) >= 2:
            timepoints[0]["label"] = "baseline"
            if vs_nadir is not None:
                for tp in timepoints[1:-2]:
                    if tp["study_date"] == vs_nadir["study_date"]:
                        tp["label"] = "nadir"
        out["timepoints"] = timepoints
        out["change"] = {"vs_prior": vs_prior, "vs_nadir": vs_nadir}
        baseline_change = _change(baseline_tp["volumes_ml"], timepoints[-1]["volumes_ml"])

        date_text = _date(recent["date"])
        t_img = time.monotonic()
        try:
            setting = paired_methods_for(lc, recent["summary"], cur_summary)
            rec = _compare_images(work, recent["dir"], recent["index"], date_text, cfg, lc, mode, setting,
                                  _joint_backend(setting[0], recent["summary"], cur_summary))
        except Exception as exc:  # noqa: BLE001 - unreadable prior images etc.
            log.warning("longitudinal comparison failed: %s", _words(exc))
            rec = {"ok": False, "notes": [], "flags": [f"comparison with the prior study ({date_text}) failed: "
                                                       f"{_words(exc)}"],
                   "note": f"the comparison with the prior study of {date_text} failed ({_words(exc)}): "
                           "volumes compared only"}
        out["timings_s"]["compare"] = round(time.monotonic() - t_img, 2)
        out["notes"] += rec.get("notes", [])
        out["flags"] += rec.get("flags", [])
        e = recent["entry"]
        out["comparison"] = {"prior_index": recent["index"], "prior_study_date": recent["date"],
                             "prior_pseudo_study_uid": e.get("pseudo_study_uid"),
                             "registration": rec.get("registration"),
                             "intensity_match": rec.get("intensity_match"),
                             "subtractions": rec.get("subtractions", {}),
                             "resolution": rec.get("resolution", {}),
                             "intensity_mapping": rec.get("intensity_mapping", {}),
                             "subtraction_sd": rec.get("subtraction_sd", {}),
                             "coverage_percent": rec.get("coverage_percent", {}),
                             "combined_t2": rec.get("combined_t2"),
                             "candidates_dropped": rec.get("dropped", {})}
        lesions = None
        if rec.get("ok"):
            t_loc = time.monotonic()
            lesions, loc_note, out["lesion_location"] = _lesions(work, rec, lc)
            out["timings_s"]["locate"] = round(time.monotonic() - t_loc, 2)
            if loc_note:
                out["notes"].append(loc_note)
            out["lesions"] = lesions
            n_new = sum(1 for l in lesions if l["kind"] == "new")
            n_grow = len(lesions) - n_new
            out["note"] = (f"compared with the prior study of {date_text}: {n_new} new and {n_grow} growing "
                           f"lesion(s) on the subtraction")
        else:
            out["note"] = rec.get("note")
        paired = rec.get("paired_change") if rec.get("ok") else None
        assessed = out["change"]
        if paired:
            # the most recent prior measured on the registered pair (see paired_change, bsi_change);
            # a nadir or baseline further back still compares two segmentations
            out["change"]["vs_prior_paired"] = paired
            out["change"]["paired_methods"] = rec.get("paired_methods")
            out["change"]["paired_setting"] = rec.get("paired_setting")   # which key chose vs_prior_paired's measures
        # which of the two the assessment (and the SR / PDF) uses: by the segmenter (change_measure)
        measure = change_measure(lc, recent["summary"], cur_summary, paired)
        out["change"]["measure"] = measure
        if paired:
            chosen, _ = chosen_change(out["change"])
            assessed = {**out["change"], "vs_prior": chosen}
            if len(usable) == 1:
                baseline_change = chosen
        out["assessment"] = assess(assessed, baseline_change, lc, lesions, mode)
        out["timings_s"]["total"] = round(time.monotonic() - t0, 2)
        return out

    return _cached(work, "longitudinal", run)


def _lesions(work: Path, rec: dict, lc: LongitudinalConfig) -> tuple[list[dict], str | None, dict | None]:
    """lesions.nii.gz, the "lesions" list (ids by decreasing volume) with
    location, the location note, and how the lesions were located
    (``{"method": "atlas" | "coordinate rules" | "unknown", "lobe_atlas": ...}``;
    None when nothing was located)."""
    grid, full_grid, crop = rec["grid"], rec["full_grid"], rec["crop"]
    cands = sorted(rec["candidates"], key=lambda c: -c.volume_mm3)
    lab = np.zeros(sitk.GetArrayViewFromImage(full_grid).shape, np.uint16)
    sub = lab[crop]
    for i, c in enumerate(cands, start=1):
        sub[c.mask & (sub == 0)] = i
    img = sitk.GetImageFromArray(lab)
    img.CopyInformation(full_grid)
    _write(img, work / "longitudinal" / "lesions.nii.gz")
    points = [grid.TransformContinuousIndexToPhysicalPoint(c.centroid_index) for c in cands]
    locs, note, where = [{"hemisphere": "unknown", "lobe": "unknown"} for _ in cands], None, None
    if cands and lc.locate:
        try:
            mask = sitk.ReadImage(str(work / "brain_mask.nii.gz"), sitk.sitkUInt8)
            pre = {r: work / "preprocessed" / f"{r}.nii.gz" for r in _roles(work)}
            locs, lrec = locate_points(points, pre, mask)
            note = lrec.get("note")
            where = {"method": lrec.get("method"), "lobe_atlas": lrec.get("lobe_atlas")}
        except Exception as exc:  # noqa: BLE001 - location is a nicety
            note = f"lesion location unknown: {_words(exc)}"
    out = []
    spacing_zyx = tuple(grid.GetSpacing()[::-1])
    axial = axial_axis(grid.GetDirection())
    for i, (c, p, loc) in enumerate(zip(cands, points, locs), start=1):
        lesion = {"id": i, "kind": c.kind, "volume_mm3": c.volume_mm3, "volume_integrated_mm3": c.integrated_mm3,
                  "prior_volume_mm3": c.prior_volume_mm3,
                  "growth_mm3": round(c.volume_mm3 - c.prior_volume_mm3, 1),
                  "centroid_lps_mm": [round(float(v), 1) for v in p], "hemisphere": loc["hemisphere"],
                  "lobe": loc["lobe"], "confidence": c.confidence, "sequence": c.sequence,
                  "peak_z": c.peak_z}
        if c.kind == "new" and "t1c" in rec.get("z_maps", {}):
            # RANO: is it enhancing, and measurable (both axial diameters >= 10 mm)?
            lesion.update(new_lesion_enhancement(c.mask, rec["z_maps"]["t1c"], rec["current_z"]["t1c"],
                                                 rec["common"], spacing_zyx, axial, lc))
        out.append(lesion)
    return out, note, where
