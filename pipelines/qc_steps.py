"""Quality-control steps of the image pipeline (issue 12): image quality per
series and segmentation QC, file-based and idempotent like the other steps
(:mod:`.image_pipeline` runs them as ``image_qc`` and ``segmentation_qc``).

image_qc -> ``image_qc.json`` (after skull stripping, before N4)
-----------------------------------------------------------------
For every converted series (``nifti/<role>.nii.gz``: its native grid, before
resampling, skull stripping and N4, as :mod:`.image_qc` requires) the MRQy
metrics of :func:`.image_qc.image_quality` are computed with

* head mask: :func:`.image_qc.head_mask_from_image` of the series itself
  (Otsu threshold, largest 26-connected component, closing, holes filled),
  computed on every second voxel along the axes finer than 1.6 mm of series
  with more than 2 million voxels and brought back by nearest neighbour (up
  to 8x less work; the head's edge is then placed to within one voxel, which
  moves VAR and CV by up to ~20 % against a full-resolution mask: the same
  rule for every study keeps the history comparable);
* brain mask: the pipeline's brain mask (``brain_mask.nii.gz``, from the
  skull-stripping step on the reference grid) carried onto the series'
  native grid, nearest neighbour, through the inverse of the series'
  registration transform (``registered/<role>_to_<reference>.tfm``, which
  maps reference points to series points); the reference series lies on that
  grid already. A series whose transform cannot be inverted uses its head
  mask as the brain, with a note.

Scanner and protocol come from the first DICOM instance of the series (in
the service a pseudonymized one: the de-identification profile keeps
Manufacturer and ManufacturerModelName and keeps ProtocolName and
SeriesDescription with identifying strings removed): ``scanner`` =
"Manufacturer ManufacturerModelName", ``protocol`` = ProtocolName, else
SeriesDescription.

Series are measured :attr:`QCConfig.workers` at a time (threads: ITK's
median filter and numpy's reductions release the GIL), and the CPP/PSNR
filters run on about :attr:`QCConfig.cpp_slices` (24) slices evenly spread (every
k-th slice, MRQy's "sample size"; :class:`.image_qc.ImageQCConfig`
``slice_step``): both are averages over the head, and 24 slices hold
hundreds of thousands of head voxels.

There is no history here (pipelines hold no database): the service compares
each metric with the same site, scanner and role's history and writes
``image_qc_history.json`` (``service/qc_history.py``); offline
(``brainline process``) the report says that no comparison was made.

segmentation_qc -> ``segmentation_qc.json`` (after segment)
-----------------------------------------------------------
The delivered segmentation (``segmentation.nii.gz``, reference grid) gets
:func:`.segmentation_qc.segmentation_qc`: WT components with volumes (mL),
LPS centroids (mm) and hemisphere (midline from the brain mask), and the
plausibility checks. Then independent candidate segmentations of the same
study are made and each one's Dice to their majority-vote fusion is
recorded per region (:func:`.segmentation_qc.fusion_dice`); the candidate
named ``model`` is the delivered one. Candidate sources
(:data:`DISCORD_SOURCES`, chosen by :attr:`QCConfig.discord`):

* ``exposed``: label maps a backend exposes besides its result (its
  ``SegmentationOutput.candidates``, e.g. a network's separate views), saved
  by the segment step in ``candidates/<name>.nii.gz`` on the reference grid;
* ``baseline``: the classical baseline (:mod:`brainline.models.baseline`) on
  the preprocessed sequences, independent of a trained model;
* ``baseline_t1c_flair``: the baseline on T1c and FLAIR only (another view of
  the study);
* ``baseline_split_0.3`` / ``baseline_split_0.5``: the baseline with its
  lesion/surroundings split moved to its tried neighbours (parameter
  perturbation);
* ``flip``: the delivered model run again on left-right flipped inputs,
  flipped back (test-time flip; a second inference: about 100 CPU-seconds on
  1 core for the trained model, so not in "auto" on the CPU).

"auto": ``exposed``; with the baseline delivered ``baseline_t1c_flair`` (when
it used more than T1c and FLAIR), ``baseline_split_0.3``,
``baseline_split_0.5`` (the set of ``bench/qc_discord.py`` without the flip,
which gives the baseline's own result back); with any other model
``baseline``, and ``flip`` when it runs on a GPU. Baseline candidates run on a
``discord_grid_mm`` isotropic grid over the brain (2 mm by default: 8x fewer
voxels, about a second each) and come back to the reference grid by nearest
neighbour; the alarm rule compares each candidate with its own history, so a
coarser candidate only shifts its own usual Dice. The ET region is left out
when no T1c was segmented (no candidate can find enhancement).

Alarms need the Dice history of each candidate (the service's database):
offline only undefined-Dice alarms can fire and the result says so.
``summary.json`` gets both sections through :func:`image_qc_section` and
:func:`segmentation_qc_section`; :func:`image_quality_finding`,
:func:`segmentation_finding` and :func:`ensemble_finding` give the QC
findings of the SR and the PDF.

No network, no database.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from .image_qc import METRICS, TISSUE_METRICS, ImageQCConfig, head_mask_from_image, image_quality
from .nifti_io import write_nifti
from .records import SELECTION_FILE, ImageQCSection, SegmentationQCSection, SeriesSelection, read_record
from .roles import ROLE_LABELS
from .segmentation_qc import SegmentationQCConfig, discord_from_dice, fusion_dice, lr_array_axis, segmentation_qc

__all__ = [
    "QCConfig", "DISCORD_SOURCES", "IMAGE_QC_FILE", "IMAGE_QC_HISTORY_FILE", "SEGMENTATION_QC_FILE",
    "SEGMENTATION_QC_HISTORY_FILE", "CANDIDATES_DIR", "MODEL_CANDIDATE", "ROLE_WORDS",
    "parse_discord", "image_qc_of_study", "segmentation_qc_of_study", "series_header",
    "image_qc_section", "segmentation_qc_section", "image_quality_finding", "segmentation_finding",
    "ensemble_finding", "write_candidates",
]

IMAGE_QC_FILE = "image_qc.json"
IMAGE_QC_HISTORY_FILE = "image_qc_history.json"
SEGMENTATION_QC_FILE = "segmentation_qc.json"
SEGMENTATION_QC_HISTORY_FILE = "segmentation_qc_history.json"
CANDIDATES_DIR = "candidates"
#: Candidate name of the delivered segmentation.
MODEL_CANDIDATE = "model"
#: Role spellings (the one table, :data:`.roles.ROLE_LABELS`; this name is kept for importers).
ROLE_WORDS = ROLE_LABELS
_ROLES = ("t1", "t1c", "t2", "flair")

#: Candidate sources of the discord alarms (see the module doc).
DISCORD_SOURCES: dict[str, str] = {
    "exposed": "label maps the segmentation backend exposes besides its result",
    "baseline": "the classical baseline on all sequences present",
    "baseline_t1c_flair": "the classical baseline on T1c and FLAIR only",
    "baseline_split_0.3": "the classical baseline with its lesion split at 0.3",
    "baseline_split_0.5": "the classical baseline with its lesion split at 0.5",
    "flip": "the delivered model on left-right flipped inputs, flipped back",
}
_BASELINE_VARIANTS: dict[str, tuple[dict, tuple[str, ...] | None]] = {
    "baseline": ({}, None),
    "baseline_t1c_flair": ({}, ("t1c", "flair")),
    "baseline_split_0.3": ({"split": 0.3}, None),
    "baseline_split_0.5": ({"split": 0.5}, None),
}
#: Longest candidate name: the database metric "discord_<name>_<region>" fits 32 characters.
MAX_CANDIDATE_NAME = 20


def parse_discord(value: str) -> tuple[str, ...]:
    """Candidate sources from a setting: "auto", "off" (none) or a
    comma-separated list of :data:`DISCORD_SOURCES` (ValueError naming the
    unknown ones)."""
    words = [w.strip().lower() for w in str(value or "auto").split(",") if w.strip()]
    if words in ([], ["auto"]):
        return ("auto",)
    if words == ["off"]:
        return ()
    unknown = [w for w in words if w not in DISCORD_SOURCES and w != "auto"]
    if unknown:
        raise ValueError(f"unknown discord candidate source(s) {', '.join(unknown)}; known: auto, off, "
                         + ", ".join(DISCORD_SOURCES))
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class QCConfig:
    """Configuration of the QC steps.

    workers: series measured at a time by image QC (threads);
    iqm: the MRQy metric settings (patch and median-filter sizes);
    cpp_slices: CPP and PSNR use every k-th slice, k = max(1, slices // cpp_slices);
    discord: candidate sources of the discord alarms ("auto", "off", or a
        comma-separated list of :data:`DISCORD_SOURCES`);
    discord_grid_mm: isotropic grid spacing in mm of the baseline candidates
        (0 = the reference grid);
    segmentation: plausibility thresholds and the discord rule used offline."""

    workers: int = 2
    iqm: ImageQCConfig = field(default_factory=ImageQCConfig)
    cpp_slices: int = 24
    discord: str = "auto"
    discord_grid_mm: float = 2.0
    segmentation: SegmentationQCConfig = field(default_factory=SegmentationQCConfig)

    def __post_init__(self):
        parse_discord(self.discord)
        if self.workers < 1:
            raise ValueError("QC workers must be at least 1")
        if self.discord_grid_mm < 0:
            raise ValueError("the discord candidate grid must be 0 (reference grid) or a spacing in mm")


# --------------------------------------------------------------------------- helpers

def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _round(v: float | None, digits: int = 6) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def is_prior_folder(work: Path) -> bool:
    """A prior study's work folder (``priors/<k>/`` with ``prior.json``):
    QC runs on the current study only."""
    return (work / "prior.json").exists()


def series_header(work: Path, role: str) -> dict:
    """Scanner and protocol of the series selected for ``role`` (first DICOM
    instance listed in ``select_series.json``): manufacturer, model,
    ``scanner`` ("Manufacturer ManufacturerModelName"), ``protocol``
    (ProtocolName, else SeriesDescription), ``field_strength_t`` (tesla).
    Empty strings when the selection or the file is missing."""
    out = {"manufacturer": "", "model": "", "scanner": "", "protocol": "", "series_description": "",
           "field_strength_t": None}
    files = read_record(SeriesSelection, work / SELECTION_FILE).files.get(role) or []
    if not files:
        return out
    try:
        ds = pydicom.dcmread(work / files[0], stop_before_pixels=True,
                             specific_tags=["Manufacturer", "ManufacturerModelName", "ProtocolName",
                                            "SeriesDescription", "MagneticFieldStrength"])
    except Exception:  # noqa: BLE001 - a header we cannot read leaves the scanner unknown
        return out

    def text(keyword: str) -> str:
        return " ".join(str(ds.get(keyword, "") or "").split())

    out.update(manufacturer=text("Manufacturer"), model=text("ManufacturerModelName"),
               protocol=(text("ProtocolName") or text("SeriesDescription"))[:128],
               series_description=text("SeriesDescription")[:128])
    out["scanner"] = " ".join(w for w in (out["manufacturer"], out["model"]) if w)[:128]
    try:
        out["field_strength_t"] = float(ds.MagneticFieldStrength) if "MagneticFieldStrength" in ds else None
    except (TypeError, ValueError):
        pass
    return out


def _brain_mask_on_series(work: Path, role: str, reference: str, image: sitk.Image
                          ) -> tuple[np.ndarray | None, str]:
    """The pipeline's brain mask on the native grid of ``role`` ((z, y, x)
    bool) and how it got there; (None, why) when it cannot be carried."""
    path = work / "brain_mask.nii.gz"
    if not path.exists():
        return None, "no brain mask: the head mask stands in"
    mask = sitk.ReadImage(str(path), sitk.sitkUInt8)
    if role == reference:
        tx: sitk.Transform = sitk.Transform()
        how = "the skull-stripping mask (reference grid)"
    else:
        tfm = work / "registered" / f"{role}_to_{reference}.tfm"
        if not tfm.exists():
            return None, "no registration transform: the head mask stands in for the brain"
        try:
            tx = sitk.ReadTransform(str(tfm)).GetInverse()
        except RuntimeError:
            return None, "the registration transform cannot be inverted: the head mask stands in for the brain"
        how = "the skull-stripping mask carried through the inverse registration"
    on_series = sitk.Resample(mask, image, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr = sitk.GetArrayViewFromImage(on_series) > 0
    if not arr.any():
        return None, "the brain mask does not reach this series' field of view: the head mask stands in"
    return np.array(arr), how


def _head_mask(arr: np.ndarray, spacing_zyx) -> np.ndarray:
    """:func:`.image_qc.head_mask_from_image`; for volumes above 2 million
    voxels on every second voxel along the axes finer than 1.6 mm, then
    repeated back onto the grid."""
    steps = [2 if s < 1.6 else 1 for s in spacing_zyx]
    if arr.size <= 2_000_000 or steps == [1, 1, 1]:
        return head_mask_from_image(arr)
    small = head_mask_from_image(arr[::steps[0], ::steps[1], ::steps[2]])
    for axis, k in enumerate(steps):
        small = small.repeat(k, axis) if k > 1 else small
    return np.ascontiguousarray(small[:arr.shape[0], :arr.shape[1], :arr.shape[2]])


def _one_series(work: Path, role: str, reference: str, cfg: QCConfig) -> dict:
    t0 = time.perf_counter()
    image = sitk.ReadImage(str(work / "nifti" / f"{role}.nii.gz"), sitk.sitkFloat32)
    if image.GetDimension() != 3:
        image = image[:, :, :, 0] if image.GetDimension() == 4 else image
    arr = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    head = _head_mask(arr, spacing)
    brain, how = _brain_mask_on_series(work, role, reference, image)
    iqm = replace(cfg.iqm, slice_step=max(1, arr.shape[0] // max(1, cfg.cpp_slices)))
    result = image_quality(arr, head, brain, spacing_zyx=spacing, config=iqm)
    notes = list(result.notes)
    if brain is None:
        notes.append(how)
    details = {k: result.details.get(k) for k in ("head_voxels", "brain_voxels", "background_voxels",
                                                   "background_zero_fraction", "spacing_zyx_mm")}
    return {"role": role, "label": ROLE_WORDS.get(role, role), **series_header(work, role),
            "metrics": {k: _round(v) for k, v in result.metrics.items()},
            "notes": notes, "masks": {"head": "Otsu foreground of the series (largest component, closed, filled)",
                                      "brain": how if brain is not None else "the head mask"},
            "details": details, "slice_step": iqm.slice_step, "elapsed_s": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- image QC

def image_qc_of_study(work: Path, reference: str, cfg: QCConfig | None = None) -> dict:
    """Image QC of every converted series of the study in ``work`` (see the
    module doc); the content of ``image_qc.json``."""
    cfg = cfg or QCConfig()
    if is_prior_folder(work):
        return {"skipped": "prior study: quality control runs on the current study only", "series": {}}
    roles = [r for r in _ROLES if (work / "nifti" / f"{r}.nii.gz").exists()]
    workers = max(1, min(cfg.workers, len(roles) or 1, os.cpu_count() or 1))

    def one(role: str) -> dict:
        try:
            return _one_series(work, role, reference, cfg)
        except Exception as exc:  # noqa: BLE001 - QC of one series must not fail the study
            return {"role": role, "label": ROLE_WORDS.get(role, role), **series_header(work, role), "metrics": {},
                    "notes": [], "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        series = dict(zip(roles, pool.map(one, roles)))
    return {"series": series, "workers": workers, "metrics": list(METRICS + TISSUE_METRICS),
            "history": {"compared": False,
                        "note": "not compared with a history: the service compares each series with its "
                                "site and scanner's earlier studies (brainline process keeps none)"}}


# --------------------------------------------------------------------------- candidates

def write_candidates(work: Path, candidates: dict[str, sitk.Image]) -> list[str]:
    """Save label maps (on the reference grid) as ``candidates/<name>.nii.gz``
    for the discord alarms; names are cut to :data:`MAX_CANDIDATE_NAME`
    characters of ``[a-z0-9_.]``. Returns the names written."""
    names = []
    for name, image in candidates.items():
        clean = "".join(c for c in str(name).lower().replace("-", "_") if c.isalnum() or c in "_.")
        clean = clean[:MAX_CANDIDATE_NAME] or f"c{len(names)}"
        if clean == MODEL_CANDIDATE:
            clean = "model_other"
        write_nifti(sitk.Cast(image, sitk.sitkUInt8), work / CANDIDATES_DIR / f"{clean}.nii.gz")
        names.append(clean)
    return names


def _coarse_grid(reference: sitk.Image, mask: np.ndarray, grid_mm: float) -> sitk.Image | None:
    """An isotropic ``grid_mm`` grid over the brain's bounding box (+4 mm),
    with the reference's direction; None when the reference is as coarse."""
    if grid_mm <= 0 or float(np.prod(reference.GetSpacing())) >= 0.9 * grid_mm ** 3:
        return None
    nz = np.nonzero(mask)
    lo = np.array([int(i.min()) for i in nz][::-1], float)   # (x, y, z) index
    hi = np.array([int(i.max()) for i in nz][::-1], float)
    spacing = np.array(reference.GetSpacing())
    margin = np.ceil(4.0 / spacing)
    lo, hi = lo - margin, hi + margin
    origin = reference.TransformContinuousIndexToPhysicalPoint(lo.tolist())
    size = [max(1, int(math.ceil((h - l + 1) * s / grid_mm))) for l, h, s in zip(lo, hi, spacing)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([grid_mm] * 3)
    grid.SetOrigin(origin)
    grid.SetDirection(reference.GetDirection())
    return grid


def _baseline_candidates(work: Path, names: list[str], grid_mm: float, reference: sitk.Image,
                         notes: list[str]) -> dict[str, np.ndarray]:
    """The baseline variants ``names`` on the preprocessed sequences, as
    (z, y, x) label maps on the reference grid."""
    from brainline.models.baseline import BaselineSegmenter

    roles = [r for r in _ROLES if (work / "preprocessed" / f"{r}.nii.gz").exists()]
    if "flair" not in roles:
        notes.append("baseline candidates need FLAIR, which is not available")
        return {}
    images = {r: sitk.ReadImage(str(work / "preprocessed" / f"{r}.nii.gz"), sitk.sitkFloat32) for r in roles}
    mask_img = sitk.ReadImage(str(work / "brain_mask.nii.gz"), sitk.sitkUInt8)
    mask_full = sitk.GetArrayViewFromImage(mask_img) > 0
    if not mask_full.any():
        notes.append("the brain mask is empty: no baseline candidates")
        return {}
    grid = _coarse_grid(reference, mask_full, grid_mm)
    if grid is not None:
        arrays = {r: sitk.GetArrayFromImage(sitk.Resample(im, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                          sitk.sitkFloat32)) for r, im in images.items()}
        m = sitk.Resample(sitk.Cast(mask_img, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
        mask = sitk.GetArrayFromImage(m) >= 0.5
        spacing = (grid_mm,) * 3
    else:
        arrays = {r: sitk.GetArrayFromImage(im) for r, im in images.items()}
        mask = np.array(mask_full)
        spacing = tuple(float(s) for s in reference.GetSpacing()[::-1])
    for a in arrays.values():
        a[~mask] = 0
    out = {}
    for name in names:
        overrides, use = _BASELINE_VARIANTS[name]
        chosen = {r: arrays[r] for r in (use or roles) if r in arrays}
        if use and set(use) - set(chosen):
            notes.append(f"{name}: needs {' and '.join(ROLE_WORDS[r] for r in use)}; not run")
            continue
        try:
            labels, _ = BaselineSegmenter(**overrides).segment_arrays(chosen, mask, spacing)
        except Exception as exc:  # noqa: BLE001 - a QC candidate must not fail the study
            notes.append(f"{name}: not made ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            continue
        if grid is not None:
            small = sitk.GetImageFromArray(labels.astype(np.uint8))
            small.CopyInformation(grid)
            labels = sitk.GetArrayFromImage(sitk.Resample(small, reference, sitk.Transform(),
                                                          sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
        out[name] = labels
    return out


def _flip_candidate(work: Path, cfg, reference: sitk.Image, notes: list[str]) -> np.ndarray | None:
    """The delivered backend on left-right flipped inputs, flipped back, on
    the reference grid (``cfg``: the PipelineConfig); None with a note when
    it cannot run."""
    from brainline.models.base import SegmentationInput
    from brainline.models.registry import load_backend

    from .image_pipeline import model_spec
    from .model_space import resample_to

    segment = _json(work / "segment.json")
    paths = {r: work / "preprocessed" / f"{r}.nii.gz" for r in _ROLES
             if (work / "preprocessed" / f"{r}.nii.gz").exists()}
    backend = load_backend(model_spec(cfg))
    if hasattr(backend, "for_roles"):
        backend, _ = backend.for_roles(paths)
    space = segment.get("model_space")
    tmp = work / CANDIDATES_DIR / ".flip"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if getattr(backend, "input_space", None):
            ms_dir = work / "model_space"
            tfm = ms_dir / "to_reference.tfm"
            if not space or not tfm.exists():
                notes.append("flip: the model-space inputs of the segment step are not available")
                return None
            src = {r: ms_dir / f"{r}.nii.gz" for r in paths if (ms_dir / f"{r}.nii.gz").exists()}
            mask_path = ms_dir / "brain_mask.nii.gz"
        else:
            src, mask_path = paths, work / "brain_mask.nii.gz"
        first = sitk.ReadImage(str(mask_path))
        axis = lr_array_axis(first)
        flipped = {}
        for role, p in {**src, "mask": mask_path}.items():
            img = sitk.ReadImage(str(p))
            a = np.ascontiguousarray(np.flip(sitk.GetArrayFromImage(img), axis))
            out = sitk.GetImageFromArray(a)
            out.CopyInformation(img)
            flipped[role] = tmp / f"{role}.nii.gz"
            write_nifti(out, flipped[role])
        inputs = SegmentationInput(paths={r: p for r, p in flipped.items() if r != "mask"},
                                   brain_mask_path=flipped["mask"])
        output = backend.segment(inputs)
        labels = np.ascontiguousarray(np.flip(np.asarray(output.labels, np.uint8), axis))
        if getattr(backend, "input_space", None):
            img = sitk.GetImageFromArray(labels)
            img.CopyInformation(first)
            back = resample_to(img, reference, sitk.ReadTransform(str(tfm)).GetInverse(), interpolator="nearest")
            labels = sitk.GetArrayFromImage(back)
        return labels.astype(np.uint8)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _candidate_plan(sources: tuple[str, ...], delivered_backend: str, roles: list[str], device: str
                    ) -> list[str]:
    if sources == ("auto",):
        plan = ["exposed"]
        if delivered_backend == "baseline":
            if "t1c" in roles and set(roles) - {"t1c", "flair"}:
                plan.append("baseline_t1c_flair")
            plan += ["baseline_split_0.3", "baseline_split_0.5"]
        else:
            plan.append("baseline")
            if str(device).startswith("cuda"):
                plan.append("flip")
        return plan
    plan = []
    for s in sources:
        if s == "auto":
            plan += [p for p in _candidate_plan(("auto",), delivered_backend, roles, device) if p not in plan]
        elif s not in plan:
            plan.append(s)
    return plan


# --------------------------------------------------------------------------- segmentation QC

def segmentation_qc_of_study(work: Path, cfg) -> dict:
    """Segmentation QC of the study in ``work`` (``cfg``: the PipelineConfig,
    whose ``qc`` is a :class:`QCConfig`); the content of
    ``segmentation_qc.json`` (see the module doc)."""
    qc: QCConfig = cfg.qc
    if is_prior_folder(work):
        return {"skipped": "prior study: quality control runs on the current study only"}
    seg = sitk.ReadImage(str(work / "segmentation.nii.gz"), sitk.sitkUInt8)
    labels = sitk.GetArrayFromImage(seg)
    mask_path = work / "brain_mask.nii.gz"
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0 if mask_path.exists() else None
    record = segmentation_qc(labels, brain, seg, config=qc.segmentation)
    segment = _json(work / "segment.json")
    backend = str(segment.get("backend") or "unknown")
    model = " ".join(str(segment.get(k) or "") for k in ("backend", "model_version")).strip() or "unknown"
    used = [r for r in _ROLES if (work / "preprocessed" / f"{r}.nii.gz").exists()]
    regions = ("WT", "TC", "ET") if "t1c" in used else ("WT", "TC")

    sources = parse_discord(qc.discord)
    plan = _candidate_plan(sources, backend, used, cfg.device)
    notes: list[str] = []
    timings: dict[str, float] = {}
    candidates: dict[str, np.ndarray] = {MODEL_CANDIDATE: labels}
    made_by = {MODEL_CANDIDATE: f"the delivered segmentation ({model})"}
    if "exposed" in plan:
        for p in sorted((work / CANDIDATES_DIR).glob("*.nii.gz")):
            name = p.name[:-len(".nii.gz")]
            img = sitk.ReadImage(str(p), sitk.sitkUInt8)
            if img.GetSize() != seg.GetSize():
                notes.append(f"candidate {name} is not on the reference grid; left out")
                continue
            candidates[name] = sitk.GetArrayFromImage(img)
            made_by[name] = "exposed by the segmentation backend"
    variants = [p for p in plan if p in _BASELINE_VARIANTS and not (p == "baseline" and backend == "baseline")]
    if variants:
        t0 = time.perf_counter()
        made = _baseline_candidates(work, variants, qc.discord_grid_mm, seg, notes)
        for name, lab in made.items():
            candidates[name] = lab
            grid = f" on a {qc.discord_grid_mm:g} mm grid" if qc.discord_grid_mm else ""
            made_by[name] = DISCORD_SOURCES[name] + grid
        timings["baseline_candidates"] = round(time.perf_counter() - t0, 3)
    if "flip" in plan:
        t0 = time.perf_counter()
        try:
            flip = _flip_candidate(work, cfg, seg, notes)
        except Exception as exc:  # noqa: BLE001 - a QC candidate must not fail the study
            flip = None
            notes.append(f"flip: the flipped inference failed ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})")
        if flip is not None:
            candidates["flip"] = flip
            made_by["flip"] = DISCORD_SOURCES["flip"]
        timings["flip"] = round(time.perf_counter() - t0, 3)

    record["model"] = model
    record["regions"] = list(regions)
    record["candidates"] = {"names": list(candidates), "made_by": made_by, "sources": list(plan),
                            "notes": notes, "elapsed_s": timings}
    if len(candidates) >= 2:
        table, _ = fusion_dice(candidates, regions)
        record["dice_to_fusion"] = {n: {r: _round(d, 5) for r, d in per.items()} for n, per in table.items()}
        result = discord_from_dice(record["dice_to_fusion"], None, regions=regions, config=qc.segmentation)
        record["discord"] = result.to_dict()
        record["risk_score"] = result.risk_score
    else:
        record["dice_to_fusion"] = {}
        record["discord"] = None
        record["risk_score"] = None
        notes.append("fewer than two candidate segmentations: no discord alarms")
    record["history"] = {"compared": False,
                         "note": "no Dice history: alarm thresholds come from the service's earlier studies "
                                 "(brainline process keeps none); only undefined Dice values raise alarms"}
    return record


# --------------------------------------------------------------------------- summary and findings

def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1] if words else ""


def image_qc_section(work: Path) -> ImageQCSection | None:
    """``summary.json["image_qc"]``: per series the scanner, protocol,
    metrics and notes; ``history`` (compared with the site's earlier studies,
    or why not), ``outliers`` (words) and ``flags`` ("iqm_outlier: ...").
    None when the image_qc step did not run."""
    base = _json(work / IMAGE_QC_FILE)
    if not base or base.get("skipped"):
        return None
    hist = _json(work / IMAGE_QC_HISTORY_FILE)
    series = {}
    for role, s in (base.get("series") or {}).items():
        h = (hist.get("series") or {}).get(role) or {}
        series[role] = {"label": s.get("label"), "scanner": s.get("scanner"), "protocol": s.get("protocol"),
                        "metrics": s.get("metrics"), "notes": s.get("notes", []), "error": s.get("error"),
                        "zero_background": (s.get("details") or {}).get("background_zero_fraction") is not None
                        and (s.get("details") or {}).get("background_zero_fraction") > 0.5,
                        "z": h.get("z"), "n_history": h.get("n_history"), "outliers": h.get("outliers", [])}
    history = hist.get("history") if hist else base.get("history")
    flags = list(hist.get("flags", [])) if hist else []
    return ImageQCSection.from_json({"series": series, "history": history or {"compared": False}, "flags": flags,
                                     "outliers": [w for s in series.values() for w in s["outliers"]]})


def segmentation_qc_section(work: Path) -> SegmentationQCSection | None:
    """``summary.json["segmentation_qc"]``: components (volumes, centroids,
    hemispheres, in words too), plausibility flags, candidates, discord (with
    the history when the service compared it) and the risk score. None when
    the step did not run."""
    base = _json(work / SEGMENTATION_QC_FILE)
    if not base or base.get("skipped"):
        return None
    hist = _json(work / SEGMENTATION_QC_HISTORY_FILE)
    discord = hist.get("discord") if hist else base.get("discord")
    plausibility = [f for f in base.get("flags", []) if not f.startswith(("discord_alarm", "discord_no_history"))]
    return SegmentationQCSection.from_json({
        "components": base.get("components", []), "component_words": base.get("component_words", []),
        "volumes_ml": base.get("volumes_ml"), "flags": plausibility, "model": base.get("model"),
        "regions": base.get("regions"), "candidates": base.get("candidates"),
        "dice_to_fusion": base.get("dice_to_fusion"), "discord": discord,
        "risk_score": None if discord is None else discord.get("risk_score"),
        "history": (hist.get("history") if hist else base.get("history")) or {"compared": False}})


def image_quality_finding(section: ImageQCSection | dict) -> tuple[str, str]:
    """(status, detail) of the "image quality" QC finding: flagged with the
    outliers in words (and any flag of the section not worded by an
    outlier); acceptable when every series was compared with its
    history without one; not_assessed when some series had no history to
    compare with (the detail says why: too few earlier studies of the site
    and scanner, or no history at all offline)."""
    section = ImageQCSection.from_json(section)
    series = section.series
    history = section.history or {}
    label = {r: s.label or r for r, s in series.items()}
    # the outliers in words, and any flag whose words are not among them (every flag is reported)
    outliers = list(section.outliers)
    outliers += [f for f in section.flags if f.split(": ", 1)[-1] not in outliers]
    compared = [r for r, s in series.items() if s.z]
    waiting = [r for r in series if r not in compared]
    parts = list(outliers)
    if outliers:
        status = "flagged"
    elif series and not waiting:
        status = "acceptable"
        parts.append(f"MRQy metrics of {_join([label[r] for r in series])} within this scanner's usual range "
                     f"(|robust z| < {history.get('outlier_z', 3.5):g})")
    else:
        status = "not_assessed"
    if waiting:
        counted = [r for r in waiting if series[r].n_history is not None]
        if counted:
            need = history.get("min_history", 20)
            parts.append("not compared: " + "; ".join(
                f"{label[r]}: {series[r].n_history} earlier stud{'y' if series[r].n_history == 1 else 'ies'} "
                f"of this site and scanner, {need} needed" for r in counted))
        if len(counted) < len(waiting):
            parts.append(f"MRQy metrics of {_join([label[r] for r in waiting if r not in counted])} recorded, "
                         + (history.get("note") or "not compared with a history"))
    parts += [f"{label[r]}: metrics not computed ({s.error})" for r, s in series.items() if s.error]
    zero = [label[r] for r, s in series.items() if s.zero_background]
    if zero:
        parts.append(f"{_join(zero)}: noise metrics undefined (zero-filled background: skull-stripped or "
                     "masked series)")
    return status, "; ".join(parts)


def segmentation_finding(section: SegmentationQCSection | dict) -> tuple[str, str]:
    """(status, detail) of the "segmentation quality" QC finding: the
    plausibility flags (flagged) and the components in words."""
    section = SegmentationQCSection.from_json(section)
    flags = section.flags
    comps = section.component_words
    parts = list(flags)
    if comps:
        shown = comps[:5] + ([f"{len(comps) - 5} more components"] if len(comps) > 5 else [])
        parts.append(f"{len(comps)} component{'s' if len(comps) != 1 else ''}: " + "; ".join(shown))
    else:
        parts.append("no tumour component")
    return ("flagged" if flags else "acceptable"), "; ".join(parts)


def ensemble_finding(section: SegmentationQCSection | dict, flag_fraction: float = 0.5) -> tuple[str, str] | None:
    """(status, detail) of the "ensemble agreement" QC finding (None without
    candidates): the risk score (number of discord alarms), the candidates'
    WT Dice to their majority vote and the alarms in words (how each
    candidate was made is in ``summary.json``); flagged when more than
    ``flag_fraction`` of the candidate/region pairs alarm (with alpha = 0.1
    about half alarm on an ordinary study: the score ranks studies for
    review), not_assessed when no alarm threshold exists yet and no Dice is
    undefined."""
    section = SegmentationQCSection.from_json(section)
    discord = section.discord
    if not discord:
        return None
    rows = discord.get("rows") or []
    alarms = [r for r in rows if r.get("alarm")]
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    risk, top = discord.get("risk_score", len(alarms)), discord.get("max_score", len(rows))
    wt = [f"{r['candidate']} {r['dice']:.3f}" for r in rows if r["region"] == "WT" and r.get("dice") is not None]
    parts = [f"risk score {risk} of {top} (alarms over {len(names)} candidate segmentations x "
             f"{len(rows) // max(len(names), 1)} regions; candidates: {', '.join(names)})"]
    if wt:
        parts.append("WT Dice to their majority vote: " + ", ".join(wt))

    def alarm_words(r: dict) -> str:
        if r.get("dice") is None:
            return f"{r['candidate']} {r['region']}: undefined (no {r['region']} in the candidate nor the vote)"
        return (f"{r['candidate']} {r['region']}: Dice {r['dice']:.3f} below this candidate's usual "
                f"(threshold {r['threshold']:.3f})")

    if alarms:
        parts.append("alarms: " + "; ".join(alarm_words(r) for r in alarms))
    no_threshold = all(r.get("threshold") is None for r in rows)
    history = section.history or {}
    if any(r.get("threshold") is None and r.get("dice") is not None for r in rows):
        parts.append(history.get("note") or "no alarm thresholds yet (no Dice history)")
    if alarms and len(alarms) > flag_fraction * max(top, 1):
        status = "flagged"
    elif no_threshold and not alarms:
        status = "not_assessed"
    else:
        status = "acceptable"
    return status, "; ".join(parts)
