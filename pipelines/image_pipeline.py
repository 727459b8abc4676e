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
from typing import Callable

import numpy as np
import SimpleITK as sitk

from brainline.models.base import ED, ET, LABEL_NAMES, NCR, ROLES, SegmentationInput
from brainline.models.registry import load_backend

from .bias_correction import N4Config, n4_correct
from .model_space import fit_model_space, labels_to_reference, map_to_model_space
from .nifti_io import write_nifti
from .qc_steps import (CANDIDATES_DIR, QCConfig, image_qc_of_study, image_qc_section, segmentation_qc_of_study,
                       segmentation_qc_section, write_candidates)
from .registration import RegistrationConfig, register, resample_to
from .skull_strip import SkullStripBackend, apply_mask, get_backend, skull_strip

ROLE_LABELS = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}


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

    def to_dict(self) -> dict:
        out = asdict(self)
        return json.loads(json.dumps(out, default=str))


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


_write = write_nifti


def _cached(work: Path, name: str, fn: Callable[[], dict]) -> dict:
    """Run ``fn`` unless ``<name>.json`` exists; record its wall time."""
    result_file = work / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    t0 = time.monotonic()
    result = fn()
    result["elapsed_s"] = round(time.monotonic() - t0, 3)
    tmp = result_file.with_name(".tmp-" + result_file.name)
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(result_file)
    return result


def available_roles(work: Path) -> list[str]:
    return [r for r in ROLES if (work / "nifti" / f"{r}.nii.gz").exists()]


def _workers(roles: list[str], max_workers: int) -> int:
    return max(1, min(len(roles), max_workers, os.cpu_count() or 1))


def _per_sequence(fn: Callable[[str], dict], roles: list[str], max_workers: int) -> dict[str, dict]:
    """``{role: fn(role)}``, up to ``max_workers`` sequences at a time (at most
    one per core); the first exception raised by ``fn`` is re-raised."""
    with ThreadPoolExecutor(max_workers=_workers(roles, max_workers)) as pool:
        return dict(zip(roles, pool.map(fn, roles)))


# ---------------------------------------------------------------------------
def step_register(work: Path, cfg: PipelineConfig) -> dict:
    """Rigid (optionally affine) registration of every sequence to the reference."""

    def run() -> dict:
        roles = available_roles(work)
        if cfg.reference not in roles:
            raise PipelineError(f"the reference sequence {ROLE_LABELS.get(cfg.reference, cfg.reference)} "
                                "is missing, so nothing can be co-registered")
        fixed = _read(work / "nifti" / f"{cfg.reference}.nii.gz")
        _write(fixed, work / "registered" / f"{cfg.reference}.nii.gz")
        results = {cfg.reference: {"reference": True}}
        moving_roles = [r for r in roles if r != cfg.reference]

        def one(role: str) -> dict:
            moving = _read(work / "nifti" / f"{role}.nii.gz")
            reg = register(fixed, moving, cfg.registration, moving_name=ROLE_LABELS[role],
                           fixed_name=ROLE_LABELS[cfg.reference])
            _write(resample_to(moving, fixed, reg.transform), work / "registered" / f"{role}.nii.gz")
            sitk.WriteTransform(reg.transform, str(work / "registered" / f"{role}_to_{cfg.reference}.tfm"))
            return reg.to_dict()

        # Sequences are independent: two at a time (ITK releases the GIL; the
        # per-registration thread count, hence the result, is unchanged).
        results.update(_per_sequence(one, moving_roles, max_workers=2))
        flags = [f"{ROLE_LABELS[r]}: {flag}" for r, res in results.items() for flag in res.get("flags", [])]
        return {"reference": cfg.reference, "sequences": results, "flags": flags}

    return _cached(work, "registration", run)


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

    def run() -> dict:
        roles = [r for r in cfg.skull_strip_on if (work / "registered" / f"{r}.nii.gz").exists()]
        source = roles[0] if roles else cfg.reference
        image = _read(work / "registered" / f"{source}.nii.gz")
        backend = _LazyBackend(cfg.skull_strip_backend, cfg.device)
        result = skull_strip(image, backend=backend, detect_stripped=True,
                             label=ROLE_LABELS.get(source, source))
        _write(sitk.Cast(result.mask, sitk.sitkUInt8), work / "brain_mask.nii.gz")
        out = result.to_dict()
        out["sequence"] = source
        return out

    return _cached(work, "skull_strip", run)


def step_bias_correct(work: Path, cfg: PipelineConfig) -> dict:
    """N4 inside the brain mask, per sequence; writes the masked, corrected images."""

    def run() -> dict:
        mask = sitk.ReadImage(str(work / "brain_mask.nii.gz"), sitk.sitkUInt8)
        roles = [r for r in ROLES if (work / "registered" / f"{r}.nii.gz").exists()]
        # One sequence per core, each N4 single-threaded: the fit runs on a
        # small grid, where ITK's per-iteration thread synchronisation costs
        # more than it gains (and far more on a loaded machine).
        itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        threads = max(1, itk_threads // _workers(roles, itk_threads))

        def one(role: str) -> dict:
            n4 = n4_correct(_read(work / "registered" / f"{role}.nii.gz"), mask, cfg.n4,
                            name=ROLE_LABELS[role], threads=threads)
            _write(apply_mask(n4.corrected, mask), work / "preprocessed" / f"{role}.nii.gz")
            return {"elapsed_s": round(n4.elapsed_s, 3)}

        return {"sequences": _per_sequence(one, roles, max_workers=itk_threads)}

    return _cached(work, "bias_correction", run)


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
                            paths: dict[str, Path]) -> tuple[sitk.Image, object, dict]:
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
    model_paths = map_to_model_space(ms, native, to_native, mask, work / "model_space")
    # kept for the segmentation QC's flipped inference (model frame -> reference grid)
    sitk.WriteTransform(ms.to_reference, str(work / "model_space" / "to_reference.tfm"))
    inputs = SegmentationInput(paths={r: p for r, p in model_paths.items() if r != "mask"},
                               brain_mask_path=model_paths["mask"])
    output = backend.segment(inputs)
    labels = labels_to_reference(output.to_image(inputs.reference), ms, mask)
    extra = getattr(output, "candidates", None) or {}
    output.candidates = {name: labels_to_reference(_labels_image(a, inputs.reference), ms, mask)
                         for name, a in extra.items()}
    return labels, output, ms.record()


def _labels_image(labels, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(labels, np.uint8))
    img.CopyInformation(reference)
    return img


def step_segment(work: Path, cfg: PipelineConfig) -> dict:
    """Tumour segmentation with the configured backend (baseline by default),
    in the backend's input space (the reference grid, or a model frame such
    as BraTS; the labels always end on the reference grid)."""

    def run() -> dict:
        backend = load_backend(model_spec(cfg))
        paths = {r: work / "preprocessed" / f"{r}.nii.gz" for r in ROLES
                 if (work / "preprocessed" / f"{r}.nii.gz").exists()}
        result: dict = {}
        shutil.rmtree(work / CANDIDATES_DIR, ignore_errors=True)  # left by an interrupted run
        if hasattr(backend, "for_roles"):  # the default: trained model or baseline by the roles found
            backend, result["model_choice"] = backend.for_roles(paths)
        if getattr(backend, "input_space", None):
            labels, output, result["model_space"] = _segment_in_model_space(work, cfg, backend, paths)
        else:
            inputs = SegmentationInput(paths=paths, brain_mask_path=work / "brain_mask.nii.gz")
            output = backend.segment(inputs)
            labels = output.to_image(inputs.reference)
            output.candidates = {name: _labels_image(a, inputs.reference)
                                 for name, a in (getattr(output, "candidates", None) or {}).items()}
        # label maps a backend exposes besides its result (e.g. a network's
        # separate views): candidates of the segmentation QC's discord alarms
        if output.candidates:
            result["candidates"] = write_candidates(work, output.candidates)
        _write(labels, work / "segmentation.nii.gz")
        result.update({"backend": output.backend, "model_name": output.model_name,
                       "model_version": output.model_version, "details": output.details})
        return result

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


def _inputs_of(work: Path) -> dict:
    """The ``inputs`` record of selection.json (roles the model needs, used and
    missing, and the sentence for the report); empty without a selection."""
    path = work / "selection.json"
    return (json.loads(path.read_text()).get("inputs") or {}) if path.exists() else {}


def step_summarize(work: Path, cfg: PipelineConfig) -> dict:
    """summary.json: volumes (mL), components, TIV, QC figures, inputs used and
    missing, versions, timings."""

    def run() -> dict:
        seg = sitk.ReadImage(str(work / "segmentation.nii.gz"))
        labels = sitk.GetArrayFromImage(seg)
        voxel_ml = float(np.prod(seg.GetSpacing())) / 1000.0
        mask = sitk.ReadImage(str(work / "brain_mask.nii.gz"))
        volumes = {str(k): round(float((labels == k).sum()) * voxel_ml, 3) for k in (NCR, ED, ET)}
        volumes["tumor_core"] = round(float(np.isin(labels, (NCR, ET)).sum()) * voxel_ml, 3)
        volumes["whole_tumor"] = round(float((labels > 0).sum()) * voxel_ml, 3)
        steps = {name: json.loads((work / f"{name}.json").read_text())
                 for name in ("registration", "skull_strip", "image_qc", "bias_correction", "segment",
                              "segmentation_qc")
                 if (work / f"{name}.json").exists()}
        tiv = float((sitk.GetArrayFromImage(mask) > 0).sum()) * float(np.prod(mask.GetSpacing())) / 1000.0
        registration = steps.get("registration", {})
        image_qc, seg_qc = image_qc_section(work), segmentation_qc_section(work)
        return {
            "label_convention": "BraTS 2023",
            "labels": {str(k): v for k, v in LABEL_NAMES.items()},
            "volumes_ml": volumes,
            "whole_tumor_components": components(labels > 0, seg),
            "tiv_ml": round(tiv, 1),
            "reference": registration.get("reference", cfg.reference),
            "registration": {r: {k: v for k, v in res.items() if k in ("quality", "flags", "final_metric",
                                                                      "converged", "parameters")}
                             for r, res in registration.get("sequences", {}).items()},
            "qc_flags": (registration.get("flags", []) + steps.get("skull_strip", {}).get("flags", [])
                         + [f"model space: {f}" for f in steps.get("segment", {}).get("model_space", {})
                            .get("flags", [])]
                         # image-quality outliers against the site's history, implausible segmentations;
                         # discord alarms rank studies for review and stay in segmentation_qc
                         + (image_qc or {}).get("flags", []) + (seg_qc or {}).get("flags", [])),
            "image_qc": image_qc,
            "segmentation_qc": seg_qc,
            "model_space": steps.get("segment", {}).get("model_space"),
            "skull_strip": {"flags": list(steps.get("skull_strip", {}).get("flags", [])),
                            "sequence": steps.get("skull_strip", {}).get("sequence")},
            "inputs": _inputs_of(work),
            "backends": {
                "registration": "SimpleITK " + sitk.Version.VersionString(),
                "skull_strip": {k: steps.get("skull_strip", {}).get(k)
                                for k in ("backend", "backend_version", "already_stripped")},
                "bias_correction": "SimpleITK N4 " + sitk.Version.VersionString(),
                "segmentation": {
                    **{k: steps.get("segment", {}).get(k) for k in ("backend", "model_name", "model_version")},
                    # provenance of a shipped model, and why it was chosen (default "auto")
                    **{k: v for k, v in ((k, (steps.get("segment", {}).get("details") or {}).get(k))
                                         for k in ("licence", "citation", "intended_use")) if v},
                    **({"model_choice": steps["segment"]["model_choice"]}
                       if steps.get("segment", {}).get("model_choice") else {})},
            },
            "timings_s": {name: res.get("elapsed_s") for name, res in steps.items()},
        }

    return _cached(work, "summary", run)


STEPS: list[tuple[str, Callable[[Path, PipelineConfig], dict]]] = [
    ("register", step_register),
    ("skull_strip", step_skull_strip),
    ("image_qc", step_image_qc),            # native series + brain mask, before N4
    ("bias_correct", step_bias_correct),
    ("segment", step_segment),
    ("segmentation_qc", step_segmentation_qc),
    ("summarize", step_summarize),
]
