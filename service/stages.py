"""The stages a job runs, as the service sees them.

Each stage is a function ``fn(ctx: StageContext) -> dict`` whose returned dict
(JSON-serializable, pseudonymous) is stored in the job store. Stages read and
write files in the job workspace only, are deterministic and idempotent: a
stage that finds its outputs complete returns them without redoing the work,
so a job resumes at its first unfinished stage after a crash.

``pseudonymize`` is the only stage that reads the PHI spool; it runs on the
gateway side and writes nothing identifying into the workspace. The other
stages are thin wrappers around the pure functions in ``brainline.pipelines``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pydicom

from brainline.models.base import SegmentationError
from brainline.pipelines.bias_correction import N4Error
from brainline.pipelines.conversion import ConversionError
from brainline.pipelines.image_pipeline import STEPS, PipelineConfig, PipelineError
from brainline.pipelines.inputs import convert_inputs, select_inputs, selected_files
from brainline.pipelines.registration import RegistrationConfig, RegistrationError
from brainline.pipelines.results import CORE_OBJECTS, OBJECT_NAMES, build_results, rerender_pdf
from brainline.pipelines.series_selection import MissingSeriesError, RulesError
from brainline.pipelines.skull_strip import SkullStripError

from .deid import DeidContext, DeidProfile, identifying_strings_of, pseudonymize_dataset
from .reidentify import reidentify_dataset
from .spool import Spool
from .vault import Vault

log = logging.getLogger("brainline.stages")


class NeedsInput(Exception):
    """The study lacks something the pipeline needs; the message says what."""


class Rejected(Exception):
    """The study must not be processed; the message says why."""


@dataclass
class StageContext:
    job_id: int
    study_key: str
    workspace: Path
    spool: Spool
    vault: Vault
    settings: object
    outbox: object = None  # service.outbox.Outbox, None when no destination is configured

    def path(self, *parts: str) -> Path:
        return self.workspace.joinpath(*parts)


# --------------------------------------------------------------------------
# pseudonymize (gateway side)
# --------------------------------------------------------------------------
def _identity_of(ds: pydicom.Dataset) -> dict:
    return {
        "PatientID": str(ds.get("PatientID", "") or ""),
        "IssuerOfPatientID": str(ds.get("IssuerOfPatientID", "") or ""),
        "PatientName": str(ds.get("PatientName", "") or ""),
        "PatientBirthDate": str(ds.get("PatientBirthDate", "") or ""),
        "PatientSex": str(ds.get("PatientSex", "") or ""),
    }


def pseudonymize(ctx: StageContext) -> dict:
    """Copy the study from the spool into ``workspace/dicom`` pseudonymized
    (PS3.15 Annex E profile in config/deid_profile.yaml) and record the
    mapping in the vault. Output: ``dicom/<series>/<sop>.dcm``."""
    out_dir = ctx.path("dicom")
    summary_file = ctx.path("pseudonymize.json")
    if out_dir.is_dir() and summary_file.exists():
        return json.loads(summary_file.read_text())
    files = ctx.spool.instance_files(ctx.study_key)
    if not files:
        raise Rejected("the spool holds no instances for this study")
    profile = DeidProfile.load(Path(ctx.settings.deid_profile) if ctx.settings.deid_profile else None)
    tmp_dir = ctx.path("dicom.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    identity = None
    study_record: dict = {}
    uid_map: dict[str, str] = {}
    series_seen: set[str] = set()
    deid_ctx = None

    def mapped_uid(original: str) -> str:
        pseudo = ctx.vault.uid(original)
        uid_map[pseudo] = original
        return pseudo

    for path in files:
        ds = pydicom.dcmread(path)
        this_identity = _identity_of(ds)
        if identity is None:
            identity = this_identity
            patient = ctx.vault.patient(identity["PatientID"], identity["IssuerOfPatientID"])
            deid_ctx = DeidContext(
                pseudo_patient_id=patient.pseudo_id,
                pseudo_patient_name=patient.pseudo_id,
                date_shift_days=patient.date_shift_days,
                uid_map=mapped_uid,
                identifying_strings=identifying_strings_of(ds),
            )
            study_record = {
                "StudyInstanceUID": str(ds.StudyInstanceUID),
                "AccessionNumber": str(ds.get("AccessionNumber", "") or ""),
                "StudyID": str(ds.get("StudyID", "") or ""),
                "pseudo_patient_id": patient.pseudo_id,
                "date_shift_days": patient.date_shift_days,
            }
        elif (this_identity["PatientID"], this_identity["IssuerOfPatientID"]) != (
            identity["PatientID"], identity["IssuerOfPatientID"]
        ):
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise Rejected("the study holds instances of more than one patient (different Patient IDs)")
        clean = pseudonymize_dataset(ds, profile, deid_ctx)
        series_dir = tmp_dir / str(clean.SeriesInstanceUID)
        if clean.SeriesInstanceUID not in series_seen:
            series_dir.mkdir(exist_ok=True)
            series_seen.add(clean.SeriesInstanceUID)
        clean.save_as(series_dir / f"{clean.SOPInstanceUID}.dcm", enforce_file_format=True)

    pseudo_study_uid = ctx.vault.uid(study_record["StudyInstanceUID"])
    ctx.vault.put("patient", deid_ctx.pseudo_patient_id, identity)
    ctx.vault.put("study", pseudo_study_uid, {**study_record, "uid_map": uid_map})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    result = {
        "instances": len(files),
        "series": len(series_seen),
        "pseudo_study_uid": pseudo_study_uid,
        "pseudo_patient_id": deid_ctx.pseudo_patient_id,
    }
    summary_file.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------
# select_series and convert (processing side, pseudonymized data only)
# --------------------------------------------------------------------------
def select(ctx: StageContext) -> dict:
    """Assign roles T1, T1c, T2, FLAIR with the rules in config/series_rules.yaml;
    writes ``selection.json``. A study needs the roles the configured
    segmentation model needs plus the reference role: one missing ends in
    needs_input (the reason names it); other missing roles are recorded
    (``inputs`` in the result) and reported."""
    rules = Path(ctx.settings.series_rules) if ctx.settings.series_rules else None
    try:
        return select_inputs(ctx.path("dicom"), ctx.workspace, pipeline_config(ctx.settings), rules)
    except MissingSeriesError as exc:
        raise NeedsInput(str(exc)) from None


def convert(ctx: StageContext) -> dict:
    """dcm2niix every selected series into ``nifti/<role>.nii.gz`` + JSON sidecar."""
    return {"series": convert_inputs(ctx.workspace)}


# --------------------------------------------------------------------------
# results: build (processing side), re-identify and queue (gateway side)
# --------------------------------------------------------------------------
def _reference_files(ctx: StageContext) -> list[Path]:
    return selected_files(ctx.workspace, pipeline_config(ctx.settings).reference)


def build_outputs(ctx: StageContext) -> dict:
    """DICOM SEG, TID 1500 SR, overlay series and PDF report in ``results/``,
    built on the pseudonymized reference series, each on its own: an overlay
    or PDF failure is recorded in the result (``failed``, ``notes``) and in
    the SR; a SEG or SR failure fails the stage (OutputsError)."""
    return build_results(ctx.workspace, _reference_files(ctx), uid_root=ctx.settings.uid_root or None)


def _reidentified(ctx: StageContext, obj: dict, study: dict, patient: dict) -> pydicom.Dataset:
    ds = reidentify_dataset(pydicom.dcmread(ctx.workspace / obj["file"]), study, patient)
    if obj["kind"] == "pdf":
        identity = {"patient_id": patient["PatientID"], "patient_name": patient["PatientName"],
                    "study_date": str(ds.get("StudyDate", "")),
                    "accession_number": study.get("AccessionNumber", ""),
                    "study_instance_uid": study["StudyInstanceUID"]}
        rerender_pdf(ds, ctx.workspace, _reference_files(ctx), identity)
    return ds


DELIVERY_ORDER = {"seg": 0, "sr": 1, "pdf": 2, "overlay": 3}


def deliver(ctx: StageContext) -> dict:
    """Re-identify the results (original patient, study and UIDs, PDF
    re-rendered with the real identity) into the PHI outbox folder and queue
    them for every configured destination. Sends whatever build_outputs
    built; an overlay or PDF that cannot be re-identified is left out and
    recorded (``not_delivered``), a SEG or SR that cannot fails the stage."""
    results = json.loads(ctx.path("results.json").read_text())
    if ctx.outbox is None or not ctx.outbox.destinations:
        return {"queued": 0, "note": "no destination configured (BRAINLINE_DEST_DICOM / "
                                     "BRAINLINE_DEST_STOWRS); results stay in the workspace"}
    pseudo = json.loads(ctx.path("pseudonymize.json").read_text())
    study = ctx.vault.get("study", pseudo["pseudo_study_uid"])
    patient = ctx.vault.get("patient", pseudo["pseudo_patient_id"])
    if study is None or patient is None:
        raise Rejected("the vault has no identity for this study, so results cannot be re-identified")
    out_dir = ctx.settings.outbox_dir / f"job-{ctx.job_id:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    queued: list[tuple[str, Path]] = []
    skipped: dict[str, str] = {}
    # SEG and SR first, queued as soon as they are re-identified: the sender
    # stores them while the overlay series (one instance per slice) and the
    # PDF are still being re-identified.
    objects = sorted(results["objects"], key=lambda o: DELIVERY_ORDER.get(o["kind"], len(DELIVERY_ORDER)))
    added, core_queued = 0, False
    for obj in objects:
        if not core_queued and obj["kind"] not in CORE_OBJECTS:
            added += ctx.outbox.enqueue(ctx.job_id, queued)
            core_queued = True
        if obj["kind"] in skipped:
            continue  # one instance of an overlay series failed: leave the whole series out
        try:
            ds = _reidentified(ctx, obj, study, patient)
        except Exception as exc:
            if obj["kind"] in CORE_OBJECTS:
                raise
            log.warning("result object not delivered", exc_info=True,
                        extra={"job_id": ctx.job_id, "kind": obj["kind"]})
            skipped[obj["kind"]] = (f"{OBJECT_NAMES[obj['kind']]} not delivered: re-identification "
                                    f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
            for kind, path in queued:
                if kind == obj["kind"]:
                    path.unlink(missing_ok=True)  # no partial series in the PHI outbox
            continue
        target = out_dir / Path(obj["file"]).name
        tmp = target.with_name(".tmp-" + target.name)
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, target)
        queued.append((obj["kind"], target))
    queued = [(kind, path) for kind, path in queued if kind not in skipped]
    added += ctx.outbox.enqueue(ctx.job_id, [(k, p) for k, p in queued
                                             if not (core_queued and k in CORE_OBJECTS)])
    result = {"objects": len(queued), "queued": added, "destinations": sorted(ctx.outbox.destinations)}
    if skipped:
        result["not_delivered"] = [{"kind": k, "error": e} for k, e in skipped.items()]
    if results.get("failed"):
        result["not_built"] = [f["error"] for f in results["failed"]]
    return result


# Errors whose message is meant for people (they name the series and reason).
PIPELINE_ERRORS = (MissingSeriesError, RulesError, ConversionError, PipelineError,
                   RegistrationError, SkullStripError, N4Error, SegmentationError)


def pipeline_config(settings, **overrides) -> PipelineConfig:
    """The image pipeline configuration from the service settings."""
    values = {"reference_role": settings.reference_role, "model": settings.model,
              "device": settings.device, **overrides}
    return PipelineConfig(
        reference=values["reference_role"],
        registration=RegistrationConfig(transform=settings.registration_transform),
        skull_strip_backend=settings.skull_strip_backend,
        device=values["device"],
        model=values["model"] or None,
    )


def _image_step(step):
    def stage(ctx: StageContext) -> dict:
        return step(ctx.workspace, pipeline_config(ctx.settings))

    stage.__doc__ = step.__doc__
    return stage


StageFn = Callable[[StageContext], dict]

PIPELINES: dict[str, list[tuple[str, StageFn]]] = {
    "foundation": [
        ("pseudonymize", pseudonymize),
        ("select_series", select),
        ("convert", convert),
    ],
    "neuro_onco": [
        ("pseudonymize", pseudonymize),
        ("select_series", select),
        ("convert", convert),
        *[(name, _image_step(step)) for name, step in STEPS],
        ("build_outputs", build_outputs),
        ("deliver", deliver),
    ],
}
DEFAULT_PIPELINE = "neuro_onco"
