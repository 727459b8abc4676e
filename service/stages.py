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

from brainline.pipelines.conversion import convert_series
from brainline.pipelines.series_selection import (
    MissingSeriesError,
    load_rules,
    scan_series,
    select_series,
)

from .deid import DeidContext, DeidProfile, identifying_strings_of, pseudonymize_dataset
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
    writes ``selection.json``. A missing required role ends in needs_input."""
    rules = load_rules(Path(ctx.settings.series_rules) if ctx.settings.series_rules else None)
    series = scan_series(ctx.path("dicom"))
    try:
        selection = select_series(series, rules)
    except MissingSeriesError as exc:
        raise NeedsInput(str(exc)) from None
    record = selection.to_dict()
    record["files"] = {
        role: [str(Path(f).relative_to(ctx.workspace)) for f in header.files]
        for role, header in selection.roles.items()
    }
    ctx.path("selection.json").write_text(json.dumps(record, indent=2, default=str))
    return selection.to_dict()


def convert(ctx: StageContext) -> dict:
    """dcm2niix every selected series into ``nifti/<role>.nii.gz`` + JSON sidecar."""
    selection = json.loads(ctx.path("selection.json").read_text())
    results = {}
    for role, rel_files in sorted(selection["files"].items()):
        files = [ctx.workspace / f for f in rel_files]
        results[role] = convert_series(files, ctx.path("nifti"), role).to_dict()
    return {"series": results}


StageFn = Callable[[StageContext], dict]

PIPELINES: dict[str, list[tuple[str, StageFn]]] = {
    "foundation": [
        ("pseudonymize", pseudonymize),
        ("select_series", select),
        ("convert", convert),
    ],
}
DEFAULT_PIPELINE = "foundation"
