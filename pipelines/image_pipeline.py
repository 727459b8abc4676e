"""The image pipeline after conversion, as file-based, idempotent steps.

Every step reads and writes files in one working folder (a job workspace, or
the OUT folder of ``brainline process``) and returns a small JSON-serializable
result that it also writes to ``<step>.json``; a step whose result file exists
returns it without redoing the work, so an interrupted run resumes.

Layout (all images NIfTI, physical space LPS in mm as SimpleITK reads them):

    nifti/<role>.nii.gz            dcm2niix output, native grid of each series
    registered/<role>.nii.gz       every sequence on the reference grid (with skull)
    brain_mask.nii.gz              brain mask on the reference grid
    preprocessed/<role>.nii.gz     skull-stripped, N4-corrected, reference grid
    segmentation.nii.gz            BraTS 2023 labels on the reference series' native grid
    image_qc.json                  MRQy image-quality metrics per native series (pipelines/qc_steps.py)
    segmentation_qc.json           components, plausibility, discord candidates' Dice (pipelines/qc_steps.py)
    candidates/<name>.nii.gz       extra label maps a backend exposes, for the discord alarms
    summary.json                   volumes, components, TIV, QC, inputs, versions, timings

Each ``<step>.json`` is written from the step's typed record and read back
through it (pipelines/records.py: RegistrationRecord, SkullStripRecord,
BiasCorrectionRecord, SegmentRecord, Summary); a step still returns the JSON
(a dict) as its result.

Which steps run, in which order, what each reads and writes and which
errors it raises for people is declared once in the stage table
(pipelines/stage_table.py); ``STEPS`` here is derived from it.

The reference grid is the native grid of the reference series (T1c by
default), so the segmentation lies on the grid of that DICOM series.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import SimpleITK as sitk

from brainline.models.base import ED, ET, LABEL_NAMES, NCR, ROLES, SegmentationInput
from brainline.models.registry import load_backend

from .bias_correction import N4Config, n4_correct
from .model_space import fit_model_space, labels_to_reference, map_to_model_space
from .nifti_io import write_nifti
from .qc_steps import (
    CANDIDATES_DIR,
    QCConfig,
    image_qc_of_study,
    image_qc_section,
    segmentation_qc_of_study,
    segmentation_qc_section,
    write_candidates,
)
from .records import (
    REGISTRATION_FILE,
    SEGMENT_FILE,
    SELECTION_FILE,
    SKULL_STRIP_FILE,
    Backends,
    BiasCorrectionRecord,
    ModelSpaceRecord,
    Record,
    RegistrationRecord,
    SegmentationProvenance,
    SegmentRecord,
    SequenceBiasCorrection,
    SequenceRegistration,
    SeriesSelection,
    SkullStripRecord,
    SkullStripSummary,
    Summary,
    TumourComponent,
    existing_file,
    read_json,
    read_record,
    stage_file,
)
from .registration import RegistrationConfig, register, resample_to
from .roles import ROLE_LABELS
from .skull_strip import SkullStripBackend, apply_mask, get_backend, skull_strip


class PipelineError(RuntimeError):
    """A step cannot go on; the message names the series and the reason."""


@dataclass
class PipelineConfig:
    reference: str = "t1c"                  # role whose grid everything is resampled to
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    skull_strip_backend: str = "deepbet"
    skull_strip_on: tuple[str, ...] = ("t1", "t1c")  # first available role is used
    device: str = "cpu"                     # "cpu" or "cuda" for the neural networks
    # A coarse B-spline mesh (200 mm knots, 3 levels -> 50 mm) models scanner
    # bias without absorbing a tumour's own hyperintensity: with 100 mm knots
    # N4 flattened the FLAIR signal of tcga-du-7294 and the baseline's
    # whole-tumour Dice fell from 0.92 to 0.73. 20/20/10 iterations: 2.5x faster,
    # same result. Fitted on 5 mm voxels (shrink 5 at 1 mm; the finest knot
    # spacing is 50 mm): 0.6x the CPU of shrink 4, bias fields correlate
    # >= 0.997 with shrink 4 on 16 corpus sequences (patterns a and b).
    n4: N4Config = field(default_factory=lambda: N4Config(spline_distance_mm=200.0,
                                                          iterations=(20, 20, 10),
                                                          shrink_factor=5))
    model: dict | str | None = None         # segmentation backend spec (None = "auto", see model_spec)
    qc: QCConfig = field(default_factory=QCConfig)  # image QC and segmentation QC steps
    # Where a run reads and writes besides the workspace (pipelines/stage_table.py):
    dicom_dir: str | None = None            # the study's DICOM files (None: <workspace>/dicom)
    series_rules: str | None = None         # series selection rules (None: config/series_rules.yaml)
    uid_root: str | None = None             # UID root of the DICOM results (None: pydicom's)
    results_dir: str = "results"            # workspace folder of the DICOM results

    def to_dict(self) -> dict:
        out = asdict(self)
        return json.loads(json.dumps(out, default=str))


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


_write = write_nifti


def _cached(work: Path, name: str, fn: Callable[[], dict | Record]) -> dict:
    """Run ``fn`` unless the stage's record file ``<name>.json`` exists;
    record its wall time (``elapsed_s``, s). ``fn`` returns the step's record
    (or its JSON); the JSON is written and returned."""
    result_file = work / stage_file(name)
    if result_file.exists():
        return json.loads(result_file.read_text())
    t0 = time.monotonic()
    result = fn()
    if isinstance(result, Record):
        result = result.to_json()
    result["elapsed_s"] = round(time.monotonic() - t0, 3)
    tmp = result_file.with_name(".tmp-" + result_file.name)
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(result_file)
    return result


def available_roles(work: Path) -> list[str]:
    return [r for r in ROLES if (work / "nifti" / f"{r}.nii.gz").exists()]


def _workers(roles: list[str], max_workers: int) -> int:
    return max(1, min(len(roles), max_workers, os.cpu_count() or 1))


def _per_sequence(fn: Callable[[str], Any], roles: list[str], max_workers: int) -> dict[str, Any]:
    """``{role: fn(role)}``, up to ``max_workers`` sequences at a time (at most
    one per core); the first exception raised by ``fn`` is re-raised."""
    with ThreadPoolExecutor(max_workers=_workers(roles, max_workers)) as pool:
        return dict(zip(roles, pool.map(fn, roles)))


# ---------------------------------------------------------------------------
def step_register(work: Path, cfg: PipelineConfig) -> dict:
    """Rigid (optionally affine) registration of every sequence to the reference."""

    def run() -> RegistrationRecord:
        roles = available_roles(work)
        if cfg.reference not in roles:
            raise PipelineError(f"the reference sequence {ROLE_LABELS.get(cfg.reference, cfg.reference)} "
                                "is missing, so nothing can be co-registered")
        fixed = _read(work / "nifti" / f"{cfg.reference}.nii.gz")
        _write(fixed, work / "registered" / f"{cfg.reference}.nii.gz")
        results = {cfg.reference: SequenceRegistration(reference=True)}
        moving_roles = [r for r in roles if r != cfg.reference]

        def one(role: str) -> SequenceRegistration:
            moving = _read(work / "nifti" / f"{role}.nii.gz")
            reg = register(fixed, moving, cfg.registration, moving_name=ROLE_LABELS[role],
                           fixed_name=ROLE_LABELS[cfg.reference])
            _write(resample_to(moving, fixed, reg.transform), work / "registered" / f"{role}.nii.gz")
            sitk.WriteTransform(reg.transform, str(work / "registered" / f"{role}_to_{cfg.reference}.tfm"))
            return SequenceRegistration.from_json(reg.to_dict())

        # Sequences are independent: two at a time (ITK releases the GIL; the
        # per-registration thread count, hence the result, is unchanged).
        results.update(_per_sequence(one, moving_roles, max_workers=2))
        return RegistrationRecord(reference=cfg.reference, sequences=results,
                                  flags=RegistrationRecord.labelled_flags(results))

    return _cached(work, "register", run)


class _LazyBackend(SkullStripBackend):
    """Loads the skull-stripping network only if the input needs it (inputs
    that are already skull-stripped never load it)."""

    def __init__(self, name: str, device: str):
        self._args = (name, device)
        self._backend = None

    def _get(self) -> SkullStripBackend:
        if self._backend is None:
            self._backend = get_backend(*self._args)
        return self._backend

    name = property(lambda self: self._get().name)
    version = property(lambda self: self._get().version)

    def brain_mask(self, image: sitk.Image) -> sitk.Image:
        return self._get().brain_mask(image)

    def describe(self) -> dict:
        return self._get().describe()


def step_skull_strip(work: Path, cfg: PipelineConfig) -> dict:
    """Brain mask on the reference grid, from T1 (or the reference) sequence."""

    def run() -> SkullStripRecord:
        roles = [r for r in cfg.skull_strip_on if (work / "registered" / f"{r}.nii.gz").exists()]
        source = roles[0] if roles else cfg.reference
        image = _read(work / "registered" / f"{source}.nii.gz")
        backend = _LazyBackend(cfg.skull_strip_backend, cfg.device)
        result = skull_strip(image, backend=backend, detect_stripped=True,
                             label=ROLE_LABELS.get(source, source))
        _write(sitk.Cast(result.mask, sitk.sitkUInt8), work / "brain_mask.nii.gz")
        return SkullStripRecord.from_json(result.to_dict()).replace(sequence=source)

    return _cached(work, "skull_strip", run)


def step_bias_correct(work: Path, cfg: PipelineConfig) -> dict:
    """N4 inside the brain mask, per sequence; writes the masked, corrected images."""

    def run() -> BiasCorrectionRecord:
        mask = sitk.ReadImage(str(work / "brain_mask.nii.gz"), sitk.sitkUInt8)
        roles = [r for r in ROLES if (work / "registered" / f"{r}.nii.gz").exists()]
        # One sequence per core, each N4 single-threaded: the fit runs on a
        # small grid, where ITK's per-iteration thread synchronisation costs
        # more than it gains (and far more on a loaded machine).
        itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        threads = max(1, itk_threads // _workers(roles, itk_threads))

        def one(role: str) -> SequenceBiasCorrection:
            n4 = n4_correct(_read(work / "registered" / f"{role}.nii.gz"), mask, cfg.n4,
                            name=ROLE_LABELS[role], threads=threads)
            _write(apply_mask(n4.corrected, mask), work / "preprocessed" / f"{role}.nii.gz")
            return SequenceBiasCorrection(elapsed_s=round(n4.elapsed_s, 3))

        return BiasCorrectionRecord(sequences=_per_sequence(one, roles, max_workers=itk_threads))

    return _cached(work, "bias_correct", run)


def model_spec(cfg: PipelineConfig) -> dict:
    """The registry spec of the configured model, with the pipeline's device.

    None or "" is the default, "auto": the shipped trained model (Wang et al.,
    BraTS 2017) when the study has T1, T1c, T2 and FLAIR, the classical
    baseline otherwise; "baseline" forces the baseline (no device); a type
    name ("brats17-wang") or a model folder selects that backend."""
    model = cfg.model
    if model is None or (isinstance(model, str) and model.strip() == ""):
        model = "auto"
    if isinstance(model, str) and model.strip().lower() == "baseline":
        return {"type": "baseline"}
    if isinstance(model, str) and model.strip().lower() in ("auto", "brats17-wang"):
        spec = {"type": model.strip().lower()}
    else:
        spec = {"path": model} if isinstance(model, (str, Path)) else dict(model)
    spec.setdefault("device", cfg.device)
    return spec


def _segment_in_model_space(work: Path, cfg: PipelineConfig, backend,
                            paths: dict[str, Path]) -> tuple[sitk.Image, object, ModelSpaceRecord]:
    """Run a backend whose ``input_space`` is a model frame: register the
    study to that frame's template, resample each sequence once from its
    native grid into it, segment there and bring the labels back to the
    reference grid. Returns (labels on the reference grid, output, record)."""
    mask = sitk.ReadImage(str(work / "brain_mask.nii.gz"), sitk.sitkUInt8)
    ms = fit_model_space(paths, mask, backend.input_space)
    native, to_native = {}, {}
    for role in paths:
        native[role] = _read(work / "nifti" / f"{role}.nii.gz")
        tfm = work / "registered" / f"{role}_to_{cfg.reference}.tfm"
        to_native[role] = sitk.ReadTransform(str(tfm)) if role != cfg.reference and tfm.exists() else None
    model_paths = map_to_model_space(ms, native, to_native, mask, work / "model_space",
                                     mask_source=thresholded_mask_source(work, native))
    # kept for the segmentation QC's flipped inference (model frame -> reference grid)
    sitk.WriteTransform(ms.to_reference, str(work / "model_space" / "to_reference.tfm"))
    inputs = SegmentationInput(paths={r: p for r, p in model_paths.items() if r != "mask"},
                               brain_mask_path=model_paths["mask"])
    output = backend.segment(inputs)
    labels = labels_to_reference(output.to_image(inputs.reference), ms, mask)
    extra = getattr(output, "candidates", None) or {}
    output.candidates = {name: labels_to_reference(_labels_image(a, inputs.reference), ms, mask)
                         for name, a in extra.items()}
    return labels, output, ModelSpaceRecord.from_json(ms.record())


def thresholded_mask_source(work: Path, roles: Iterable[str]) -> str | None:
    """The role whose "> 0" voxels are the brain mask, when the study arrived
    skull-stripped (``skull_strip.json``) and that role is among ``roles``;
    None when the skull-stripping network drew the mask. Such a mask keeps
    every slice that grazes the brain: map_to_model_space erodes it by half a
    slice of that series."""
    skull = read_record(SkullStripRecord, work / SKULL_STRIP_FILE)
    return skull.sequence if skull.already_stripped and skull.sequence in set(roles) else None


def _labels_image(labels, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(labels, np.uint8))
    img.CopyInformation(reference)
    return img


def step_segment(work: Path, cfg: PipelineConfig) -> dict:
    """Tumour segmentation with the configured backend (baseline by default),
    in the backend's input space (the reference grid, or a model frame such
    as BraTS; the labels always end on the reference grid)."""

    def run() -> SegmentRecord:
        backend = load_backend(model_spec(cfg))
        paths = {r: work / "preprocessed" / f"{r}.nii.gz" for r in ROLES
                 if (work / "preprocessed" / f"{r}.nii.gz").exists()}
        model_choice = space = candidates = None
        shutil.rmtree(work / CANDIDATES_DIR, ignore_errors=True)  # left by an interrupted run
        if hasattr(backend, "for_roles"):  # the default: trained model or baseline by the roles found
            backend, model_choice = backend.for_roles(paths)
        if getattr(backend, "input_space", None):
            labels, output, space = _segment_in_model_space(work, cfg, backend, paths)
        else:
            inputs = SegmentationInput(paths=paths, brain_mask_path=work / "brain_mask.nii.gz")
            output = backend.segment(inputs)
            labels = output.to_image(inputs.reference)
            output.candidates = {name: _labels_image(a, inputs.reference)
                                 for name, a in (getattr(output, "candidates", None) or {}).items()}
        # label maps a backend exposes besides its result (e.g. a network's
        # separate views): candidates of the segmentation QC's discord alarms
        if output.candidates:
            candidates = write_candidates(work, output.candidates)
        _write(labels, work / "segmentation.nii.gz")
        return SegmentRecord(model_choice=model_choice, model_space=space, candidates=candidates,
                             backend=output.backend, model_name=output.model_name,
                             model_version=output.model_version, details=output.details)

    return _cached(work, "segment", run)


def step_image_qc(work: Path, cfg: PipelineConfig) -> dict:
    """MRQy image-quality metrics of every converted series on its native
    grid, inside its head mask and the brain mask carried onto it
    (``image_qc.json``; see pipelines/qc_steps.py). No history here: the
    service compares with its database, offline the report says none."""
    return _cached(work, "image_qc", lambda: image_qc_of_study(work, cfg.reference, cfg.qc))


def step_segmentation_qc(work: Path, cfg: PipelineConfig) -> dict:
    """Components with volumes (mL) and locations, plausibility checks, and
    the Dice (to their majority vote) of independent candidate segmentations
    for the discord alarms (``segmentation_qc.json``; see
    pipelines/qc_steps.py)."""
    return _cached(work, "segmentation_qc", lambda: segmentation_qc_of_study(work, cfg))


def components(mask: np.ndarray, image: sitk.Image) -> list[dict]:
    """26-connected components of a (z, y, x) mask with volume (mL) and
    centroid (LPS physical coordinates, mm), largest first."""
    if not mask.any():
        return []
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    cc.CopyInformation(image)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    out = [{"volume_ml": round(stats.GetPhysicalSize(lab) / 1000.0, 3),
            "centroid_lps_mm": [round(c, 1) for c in stats.GetCentroid(lab)],
            "voxels": int(stats.GetNumberOfPixels(lab))} for lab in stats.GetLabels()]
    return sorted(out, key=lambda c: -c["volume_ml"])


def _inputs_of(work: Path):
    """The ``inputs`` record of select_series.json (roles the model needs, used and
    missing, and the sentence for the report); None without a selection."""
    return read_record(SeriesSelection, work / SELECTION_FILE).inputs


def summarize(work: Path, cfg: PipelineConfig) -> Summary:
    """The :class:`.records.Summary` of the workspace: volumes (mL), components,
    TIV, QC figures and flags, inputs used and missing, versions, timings."""
    seg = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    labels = sitk.GetArrayFromImage(seg)
    voxel_ml = float(np.prod(seg.GetSpacing())) / 1000.0
    mask = sitk.ReadImage(str(work / "brain_mask.nii.gz"))
    volumes = {str(k): round(float((labels == k).sum()) * voxel_ml, 3) for k in (NCR, ED, ET)}
    volumes["tumor_core"] = round(float(np.isin(labels, (NCR, ET)).sum()) * voxel_ml, 3)
    volumes["whole_tumor"] = round(float((labels > 0).sum()) * voxel_ml, 3)
    from .stage_table import timed_steps  # the table imports this module

    timings = {name: read_json(work / stage_file(name)).get("elapsed_s") for name in timed_steps()
               if existing_file(work / stage_file(name)).exists()}
    tiv = float((sitk.GetArrayFromImage(mask) > 0).sum()) * float(np.prod(mask.GetSpacing())) / 1000.0
    registration = read_record(RegistrationRecord, work / REGISTRATION_FILE)
    skull = read_record(SkullStripRecord, work / SKULL_STRIP_FILE)
    segment = read_record(SegmentRecord, work / SEGMENT_FILE)
    image_qc, seg_qc = image_qc_section(work), segmentation_qc_section(work)
    provenance = {k: (segment.details or {}).get(k) for k in ("licence", "citation", "intended_use")}
    return Summary(
        label_convention="BraTS 2023",
        labels={str(k): v for k, v in LABEL_NAMES.items()},
        volumes_ml=volumes,
        whole_tumor_components=[TumourComponent.from_json(c) for c in components(labels > 0, seg)],
        tiv_ml=round(tiv, 1),
        reference=registration.reference if existing_file(work / REGISTRATION_FILE).exists() else cfg.reference,
        registration={r: res.summary_entry() for r, res in registration.sequences.items()},
        qc_flags=Summary.collect_flags(registration, skull, segment.model_space, image_qc, seg_qc),
        image_qc=image_qc,
        segmentation_qc=seg_qc,
        model_space=segment.model_space,
        skull_strip=SkullStripSummary(flags=list(skull.flags), sequence=skull.sequence),
        inputs=_inputs_of(work),
        backends=Backends(
            registration="SimpleITK " + sitk.Version.VersionString(),
            skull_strip={"backend": skull.backend, "backend_version": skull.backend_version,
                         "already_stripped": skull.already_stripped},
            bias_correction="SimpleITK N4 " + sitk.Version.VersionString(),
            # provenance of a shipped model, and why it was chosen (default "auto")
            segmentation=SegmentationProvenance(
                backend=segment.backend, model_name=segment.model_name, model_version=segment.model_version,
                **{k: v for k, v in provenance.items() if v}, model_choice=segment.model_choice or None)),
        timings_s=timings,
    )


def step_summarize(work: Path, cfg: PipelineConfig) -> dict:
    """summary.json (:func:`summarize`): volumes (mL), components, TIV, QC
    figures, inputs used and missing, versions, timings."""
    return _cached(work, "summary", lambda: summarize(work, cfg))


def __getattr__(name: str) -> Any:
    """``STEPS``: the image steps after conversion up to the summary, as
    ``[(name, step)]``, from the stage table (pipelines/stage_table.py, which
    imports this module); ``TIMED_STEPS``: the result files whose wall time
    the summary reports."""
    if name == "STEPS":
        from .stage_table import image_steps

        return image_steps()
    if name == "TIMED_STEPS":
        from .stage_table import timed_steps

        return tuple(timed_steps())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
