"""Offline run of the whole pipeline on a folder of DICOM files of one study
(``brainline process INPUT --out OUT [--prior PRIOR ...]``): series selection
and conversion as in the service (:mod:`.inputs`), then the image pipeline
steps, the longitudinal comparison with the prior studies given (folders of
DICOM files of earlier studies of the same patient; :mod:`.longitudinal`) and
the DICOM results: every stage of the stage table (pipelines/stage_table.py)
in order. No network, no database."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import pydicom

from .image_pipeline import PipelineConfig
from .patient_match import PATIENT_KEYS, another_patient
from .records import Summary, migrate_workspace
from .stage_table import INPUT_STAGES, stages

log = logging.getLogger("brainline.process")


class InputError(ValueError):
    """The input folder is not the DICOM files of one study of one patient;
    the message says why, with file counts and folders, not identities."""


class PriorError(InputError):
    """A ``--prior`` folder cannot be used; the message names it and why."""


_STUDY_TAGS = ["StudyInstanceUID", "StudyDate", "PatientID", "IssuerOfPatientID", "PatientBirthDate"]


@dataclasses.dataclass
class FolderStudy:
    """The one study a folder holds (its headers; PHI stays in memory)."""

    study_uid: str
    study_date: str            # YYYYMMDD, "" when no file has a valid one
    patient: dict              # PatientID, IssuerOfPatientID, PatientBirthDate ("" when absent)


def folder_study(folder: Path, what: str = "the input folder") -> FolderStudy:
    """The study of the DICOM files under ``folder``. Raises InputError when
    they belong to several studies or several patients: the pipeline would
    otherwise take a series of one patient and a series of another into one
    result (a folder of two studies did, before this check)."""
    studies: dict[str, list[Path]] = {}
    patients: set[tuple[str, str]] = set()
    dates: dict[str, str] = {}
    first: dict[str, dict] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_STUDY_TAGS)
        except Exception:  # not DICOM (DICOMDIR, README, ...): skipped as the conversion does
            continue
        uid = str(ds.get("StudyInstanceUID", "") or "")
        if not uid:
            continue
        studies.setdefault(uid, []).append(path)
        person = (str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or ""))
        if person[0]:
            patients.add(person)
        date = str(ds.get("StudyDate", "") or "")
        if len(date) == 8 and date.isdigit():
            dates.setdefault(uid, date)
        if not first.get(uid, {}).get("PatientID"):   # the first file that names the patient
            first[uid] = {k: str(ds.get(k, "") or "") for k in PATIENT_KEYS}
    if len(studies) > 1:
        where = "; ".join(f"{len(files)} files under {files[0].parent.relative_to(folder)}"
                          for files in sorted(studies.values(), key=len, reverse=True))
        raise InputError(f"{what} {folder} holds {len(studies)} studies ({where}): give the folder of one study")
    if len(patients) > 1:
        raise InputError(f"{what} {folder} holds files of {len(patients)} patients (different PatientID or "
                         "issuer): give the folder of one patient's study")
    if not studies:
        return FolderStudy("", "", {})
    (uid,) = studies
    return FolderStudy(uid, dates.get(uid, ""), first[uid])


@dataclasses.dataclass
class OfflinePriors:
    """The checked ``--prior`` folders: (study date, folder) pairs, the
    current study's date and notes in words."""

    current_date: str
    found: list[tuple[str, Path]]
    notes: list[str]


def check_offline_priors(input_dir: Path, prior_dirs: Sequence[Path]) -> OfflinePriors:
    """Check the input folder (one study of one patient, else InputError)
    and each prior folder. Raises PriorError for a folder that is missing,
    holds several studies or patients, is another patient's study (PatientID,
    issuer or birth date), has no dated DICOM file, or is not earlier than
    the current study. Writes nothing."""
    this = folder_study(input_dir)
    current = this.study_date
    found: list[tuple[str, Path]] = []
    notes: list[str] = []
    for folder in prior_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise PriorError(f"prior {folder} is not a folder of DICOM files")
        try:
            study = folder_study(folder, "prior")
        except InputError as exc:
            raise PriorError(str(exc)) from None
        if not study.study_date:
            raise PriorError(f"prior {folder} holds no DICOM file with a study date")
        if another_patient(this.patient, study.patient):
            raise PriorError(f"prior {folder} is another patient's study (its PatientID, issuer or birth date "
                             "differs from the current study's)")
        if current and study.study_date >= current:
            raise PriorError(f"prior {folder} ({study.study_date}) is not earlier than the current study "
                             f"({current})")
        if not (this.patient.get("PatientID") and study.patient.get("PatientID")):
            notes.append(f"prior {folder.name}: no PatientID on one side, so it could not be checked to be "
                         "the same patient")
        found.append((study.study_date, folder.resolve()))
    return OfflinePriors(current, found, notes)


def write_offline_priors(input_dir: Path, prior_dirs: Sequence[Path], out: Path,
                         checked: OfflinePriors | None = None) -> dict:
    """``out/priors.json`` and ``out/priors/<k>/prior.json`` for the prior
    studies given on the command line (the contract of
    :mod:`.longitudinal`): each prior's DICOM stays where it is
    (``dicom_dir``), every prior earlier than the current study is used, the
    earliest is the baseline. ``checked``: :func:`check_offline_priors`'s
    answer when the caller has it (else it is asked; PriorError)."""
    checked = checked or check_offline_priors(input_dir, prior_dirs)
    current, found, notes = checked.current_date, list(checked.found), checked.notes
    found.sort()
    priors = []
    for k, (date, folder) in enumerate(sorted(found, reverse=True)):  # most recent first
        kept = (["most recent"] if k == 0 else []) + (["baseline"] if (date, folder) == found[0] else [])
        entry = {"dir": f"priors/{k}", "study_date": date, "kept_as": kept or ["earlier"],
                 "source": "offline folder", "pseudo_study_uid": None, "job_id": None}
        (out / entry["dir"]).mkdir(parents=True, exist_ok=True)
        (out / entry["dir"] / "prior.json").write_text(json.dumps({**entry, "dicom_dir": str(folder)}, indent=2))
        priors.append(entry)
    record = {"current": {"study_date": current}, "priors": priors,
              "searched": [f"{len(priors)} prior folder{'s' if len(priors) != 1 else ''} given on the command line"],
              "notes": notes}
    (out / "priors.json").write_text(json.dumps(record, indent=2))
    return record


def process_study(input_dir: Path, out: Path, cfg: PipelineConfig | None = None,
                  rules_path: Path | None = None, uid_root: str | None = None,
                  on_step: Callable[[str], None] | None = None,
                  priors: Sequence[Path] = ()) -> dict:
    """Run everything; returns summary.json's content plus ``outputs`` (the
    ``build_outputs.json`` record: objects written, ``failed``, ``notes``).
    ``on_step(name)`` is called after each step (for progress bars). The DICOM
    results (SEG, SR, overlay, PDF) reference the input instances and go to
    ``out/dicom``; an overlay or PDF that cannot be built is logged (a warning
    on stderr) and recorded, the run still succeeds. Raises OutputsError when
    the SEG or the SR cannot be built. ``priors``: folders of earlier studies
    of the same patient (PriorError when one cannot be used: not one study,
    another patient's, not earlier); InputError when ``input_dir`` holds
    several studies or patients; the follow-up
    comparison goes to ``longitudinal.json`` and its DICOM objects to
    ``out/dicom``."""
    cfg = dataclasses.replace(cfg or PipelineConfig(), dicom_dir=str(input_dir),
                              series_rules=str(rules_path) if rules_path else None,
                              uid_root=uid_root, results_dir="dicom")
    checked = check_offline_priors(input_dir, priors)   # before anything is written: InputError / PriorError
    out.mkdir(parents=True, exist_ok=True)
    migrate_workspace(out)   # an OUT folder of an earlier version: record files under their stage names
    if priors:
        write_offline_priors(input_dir, priors, out, checked)
    results: dict[str, dict] = {}
    for stage in stages():
        if stage.zone != "compute":
            continue
        results[stage.name] = stage.function()(out, cfg)
        if on_step and stage.name != INPUT_STAGES[0]:
            on_step(_OFFLINE_NAMES.get(stage.name, stage.name))
    result = results["summary"]
    inputs = Summary.from_json(result).inputs
    if inputs and inputs.note:
        log.warning("%s", inputs.note)  # output failures were logged when they happened
    return {**result, "outputs": results["build_outputs"], "longitudinal": results["longitudinal"]}


#: Progress names of ``brainline process`` that differ from the stage names:
#: selection and conversion report once, the DICOM results as "dicom_results".
_OFFLINE_NAMES = {INPUT_STAGES[-1]: "select_and_convert", "build_outputs": "dicom_results"}


def __getattr__(name: str):
    """``STEP_NAMES``: the names ``on_step`` reports, in order (from the stage table)."""
    if name == "STEP_NAMES":
        return [_OFFLINE_NAMES.get(s.name, s.name) for s in stages()
                if s.zone == "compute" and s.name != INPUT_STAGES[0]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
