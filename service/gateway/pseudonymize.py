"""The ``pseudonymize`` stage (gateway side): the study from the PHI spool
into the job workspace, pseudonymized.

It is the only stage that reads the spool. Each instance is de-identified
with the vault (patient pseudonym, date shift, pseudonymous UIDs) and the
de-identification profile (PS3.15 Annex E, config/deid_profile.yaml), and
written to ``dicom/<series>/<sop>.dcm``; nothing identifying enters the
workspace. ``StudyPseudonymizer`` does the same for the prior studies that
service/gateway/priors.py retrieves.

One bad instance does not fail the study: ``pseudonymize`` quarantines an
instance that cannot be read, whose PatientID differs from the study's,
whose pixel data does not fit its transfer syntax or matrix size, or whose
matrix size differs from the rest of its series (a hard link in
``<spool>/.quarantine/<study_key>/``, the spool's file stays so the study
does not re-open), records "1 instance quarantined: <reason>" without PHI,
and processes the rest; series selection then refuses any series that the
quarantine left incomplete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import uid as dicom_uid

from ..jobs.context import StageContext
from ..jobs.errors import Rejected
from .deid import DeidContext, DeidProfile, identifying_strings_of, pseudonymize_dataset
from .spool import Spool
from .vault import Vault

log = logging.getLogger("brainline.stages")


def _identity_of(ds: pydicom.Dataset) -> dict:
    return {
        "PatientID": str(ds.get("PatientID", "") or ""),
        "IssuerOfPatientID": str(ds.get("IssuerOfPatientID", "") or ""),
        "PatientName": str(ds.get("PatientName", "") or ""),
        "PatientBirthDate": str(ds.get("PatientBirthDate", "") or ""),
        "PatientSex": str(ds.get("PatientSex", "") or ""),
    }


def _patient_key(identity: dict, study_uid: str) -> tuple[str, str]:
    """What the vault derives the patient pseudonym from: the PatientID and its
    issuer; for a study without a PatientID (an emergency or unidentified
    patient), the study itself. Such studies would otherwise all share one
    pseudonym: the prior search would link different patients' studies, and
    each study's identity record would replace the previous one, so results
    re-identified later could carry another patient's name. A NUL cannot occur
    in a PatientID (LO), so no real ID maps to these keys."""
    if identity["PatientID"].strip():
        return identity["PatientID"], identity["IssuerOfPatientID"]
    return f"\0no PatientID\0{study_uid}", ""


#: Transfer syntaxes whose pixel data dcm2niix decodes (native, deflate, JPEG
#: baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE).
NATIVE_SYNTAXES = {dicom_uid.ImplicitVRLittleEndian, dicom_uid.ExplicitVRLittleEndian,
                   dicom_uid.DeflatedExplicitVRLittleEndian, dicom_uid.ExplicitVRBigEndian}
ENCAPSULATED_SYNTAXES = {dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit, dicom_uid.JPEGLossless,
                         dicom_uid.JPEGLosslessSV1, dicom_uid.JPEGLSLossless, dicom_uid.JPEGLSNearLossless,
                         dicom_uid.JPEG2000Lossless, dicom_uid.JPEG2000, dicom_uid.RLELossless}
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF


def _pixel_problem(ds: pydicom.Dataset) -> str | None:
    """Why the pixel data of ``ds`` cannot be decoded as announced (words, no
    values), or None; objects without pixel data are not judged here."""
    if PIXEL_DATA not in ds:
        return None
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    element = ds.get_item(PIXEL_DATA)
    length = getattr(element, "length", None)
    if length is None:
        value = ds.PixelData
        length = UNDEFINED_LENGTH if getattr(ds["PixelData"], "is_undefined_length", False) else len(value)
    if syntax in ENCAPSULATED_SYNTAXES:
        if length != UNDEFINED_LENGTH:
            return "pixel data not encoded as its transfer syntax says (not encapsulated)"
        return None
    if syntax and syntax not in NATIVE_SYNTAXES:
        return "transfer syntax not one BrainLine can decode"
    if length == UNDEFINED_LENGTH:
        return "pixel data not encoded as its transfer syntax says (encapsulated)"
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "image attributes (rows, columns, bits allocated) missing or invalid"
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if length not in (expected, expected + 1):
        return "pixel data size does not match rows, columns and bits allocated"
    return None


def _plane_key(ds: pydicom.Dataset) -> tuple:
    """Matrix size and pixel spacing (rounded to 1 µm) of an image."""
    spacing = ds.get("PixelSpacing")
    try:
        spacing = tuple(round(float(v), 3) for v in spacing) if spacing else ()
    except (TypeError, ValueError):
        spacing = ("invalid",)
    return (ds.get("Rows"), ds.get("Columns"), spacing)


@dataclass
class _Scanned:
    path: Path
    patient: tuple[str, str] | None = None
    series: str = ""
    plane: tuple | None = None
    problem: str | None = None


def _scan_instance(path: Path) -> _Scanned:
    """Header of one spool file (pixel data deferred) and what is wrong with it."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not str(ds.get(keyword, "") or ""):
                return _Scanned(path, problem=f"no {keyword}")
        identity = _identity_of(ds)
        item = _Scanned(path, patient=(identity["PatientID"], identity["IssuerOfPatientID"]),
                        series=str(ds.SeriesInstanceUID))
        if PIXEL_DATA in ds:
            item.plane = _plane_key(ds)
            item.problem = _pixel_problem(ds)
        return item
    except RecursionError:
        return _Scanned(path, problem="data sets nested too deeply to read")
    except Exception as exc:  # any unreadable file: quarantine it, never fail the study
        return _Scanned(path, problem=f"not readable as DICOM ({type(exc).__name__})")


def _quarantine(ctx: StageContext, spool: Spool, path: Path, reason: str) -> None:
    """Keep a hard link (a copy across file systems) of the spool file in
    ``<spool>/.quarantine/<study_key>/`` with the reason; the spool file stays
    (removing it would change the study and re-open it)."""
    folder = spool.root / ".quarantine" / ctx.study_key
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / path.name
    if not target.exists():
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    (folder / (path.name + ".reason.txt")).write_text(reason + "\n")
    log.warning("instance quarantined", extra={"job_id": ctx.job_id, "study_key": ctx.study_key,
                                               "reason": reason})


def _quarantine_notes(reasons: list[str]) -> list[dict]:
    counts = Counter(reasons)
    return [{"instances": n, "reason": r,
             "note": f"{n} instance{'s' if n != 1 else ''} quarantined: {r}"} for r, n in counts.items()]


def _find_bad_instances(scanned: list[_Scanned]) -> dict[Path, str]:
    """path -> reason for every instance to quarantine. The study's patient
    is the one holding more than half of the readable instances (Rejected
    when none does); each series' matrix is the one most of its images have."""
    bad = {s.path: s.problem for s in scanned if s.problem and s.patient is None}
    readable = [s for s in scanned if s.patient is not None]
    if not readable:
        return bad
    patients = Counter(s.patient for s in readable if s.patient is not None)
    (study_patient, n), = patients.most_common(1)
    if len(patients) > 1 and 2 * n <= len(readable):
        raise Rejected("the study holds instances of more than one patient (different Patient IDs), "
                       "none of them holding most of the study")
    for s in readable:
        if s.patient is not None and s.patient != study_patient:
            same_id = s.patient[0] == study_patient[0]
            bad[s.path] = ("Issuer of Patient ID differs from the study's" if same_id
                           else "PatientID differs from the study's")
        elif s.problem:
            bad[s.path] = s.problem
    by_series: dict[str, list[_Scanned]] = {}
    for s in readable:
        if s.path not in bad and s.plane is not None:
            by_series.setdefault(s.series, []).append(s)
    for members in by_series.values():
        planes = Counter(s.plane for s in members)
        plane, n = planes.most_common(1)[0]
        if len(planes) > 1 and 2 * n > len(members):
            for s in members:
                if s.plane != plane:
                    bad[s.path] = "matrix size or pixel spacing differs from the rest of its series"
    return bad


class StudyPseudonymizer:
    """Pseudonymizes the instances of one study, one at a time, with the vault
    and the de-identification profile (PS3.15 Annex E, config/deid_profile.yaml):
    the patient pseudonym and date shift come from the vault (the first
    instance's PatientID and issuer, or ``patient`` when given, e.g. a prior
    study found by the current study's patient), every UID is replaced by the
    vault's pseudonymous UID and recorded in ``uid_map`` (pseudo -> original).
    ``save()`` stores the study's vault record (with its UID map, so that
    objects referencing these UIDs can be re-identified) and, unless
    ``patient`` was given, the patient's identity. Used by ``pseudonymize``
    and by the prior search (service/gateway/priors.py)."""

    def __init__(self, vault: Vault, profile: DeidProfile, patient=None):
        self.vault = vault
        self.profile = profile
        self.patient = patient          # vault.PatientPseudonym to use for every instance
        self.identity: dict | None = None
        self.study_record: dict = {}
        self.uid_map: dict[str, str] = {}
        self._deid: DeidContext | None = None

    def _mapped_uid(self, original: str) -> str:
        pseudo = self.vault.uid(original)
        self.uid_map[pseudo] = original
        return pseudo

    def _start(self, ds: pydicom.Dataset) -> DeidContext:
        identity = _identity_of(ds)
        patient = self.patient or self.vault.patient(*_patient_key(identity, str(ds.StudyInstanceUID)))
        deid = self._deid = DeidContext(
            pseudo_patient_id=patient.pseudo_id,
            pseudo_patient_name=patient.pseudo_id,
            date_shift_days=patient.date_shift_days,
            uid_map=self._mapped_uid,
            identifying_strings=identifying_strings_of(ds),
        )
        self.identity = identity
        self.study_record = {
            "StudyInstanceUID": str(ds.StudyInstanceUID),
            "AccessionNumber": str(ds.get("AccessionNumber", "") or ""),
            "StudyID": str(ds.get("StudyID", "") or ""),
            "pseudo_patient_id": patient.pseudo_id,
            "date_shift_days": patient.date_shift_days,
        }
        return deid

    @property
    def pseudo_patient_id(self) -> str | None:
        return self._deid.pseudo_patient_id if self._deid else None

    def __call__(self, ds: pydicom.Dataset) -> pydicom.Dataset:
        """One instance pseudonymized in place (raises what the profile
        raises): callers read each instance from its file only to write its
        pseudonymized version, so no deep copy is made (a quarter of the time)."""
        deid = self._deid if self._deid is not None else self._start(ds)
        return pseudonymize_dataset(ds, self.profile, deid, in_place=True)

    def write(self, clean: pydicom.Dataset, out_dir: Path) -> Path:
        """Save a pseudonymized instance as ``out_dir/<series>/<sop>.dcm``."""
        series_dir = out_dir / str(clean.SeriesInstanceUID)
        series_dir.mkdir(parents=True, exist_ok=True)
        path = series_dir / f"{clean.SOPInstanceUID}.dcm"
        clean.save_as(path, enforce_file_format=True)
        return path

    def save(self) -> str:
        """Store the vault records; return the pseudonymous StudyInstanceUID."""
        if self._deid is None or self.identity is None:
            raise ValueError("no instance of the study was pseudonymized: there is nothing to store in the vault")
        pseudo_study_uid = self.vault.uid(self.study_record["StudyInstanceUID"])
        if self.patient is None:
            self.vault.put("patient", self._deid.pseudo_patient_id, self.identity)
        # the study keeps the patient attributes it came with: its results are re-identified with
        # them even when a later study of the patient brings a corrected name (reidentify_dataset)
        self.vault.put("study", pseudo_study_uid, {**self.study_record, "uid_map": self.uid_map,
                                                   "patient": self.identity})
        return pseudo_study_uid


def deid_profile(settings) -> DeidProfile:
    """The de-identification profile of the service settings."""
    path = getattr(settings, "deid_profile", "")
    return DeidProfile.load(Path(path) if path else None)


def pseudonymize(ctx: StageContext) -> dict:
    """Copy the study from the spool into ``workspace/dicom`` pseudonymized
    (PS3.15 Annex E profile in config/deid_profile.yaml) and record the
    mapping in the vault. Output: ``dicom/<series>/<sop>.dcm``. Bad instances
    are quarantined (see the module's doc) and listed in ``quarantined``."""
    out_dir = ctx.path("dicom")
    summary_file = ctx.path("pseudonymize.json")
    if out_dir.is_dir() and summary_file.exists():
        return json.loads(summary_file.read_text())
    spool = ctx.spool
    if spool is None:
        raise RuntimeError("pseudonymize runs on the gateway: its context needs the spool")
    files = spool.instance_files(ctx.study_key)
    if not files:
        raise Rejected("the spool holds no instances for this study")
    if ctx.vault is None:
        raise RuntimeError("pseudonymize runs on the gateway: its context needs the vault")
    deid = StudyPseudonymizer(ctx.vault, deid_profile(ctx.settings))
    bad = _find_bad_instances([_scan_instance(p) for p in files])
    tmp_dir = ctx.path("dicom.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    series_seen: set[str] = set()
    written = 0
    for path in files:
        if path in bad:
            continue
        try:
            clean = deid(pydicom.dcmread(path))
        except RecursionError:
            bad[path] = "data sets nested too deeply to de-identify"
            continue
        except Exception as exc:  # one instance must not fail the study
            log.warning("instance not de-identified", exc_info=True, extra={"job_id": ctx.job_id})
            bad[path] = f"not de-identifiable ({type(exc).__name__})"
            continue
        deid.write(clean, tmp_dir)
        series_seen.add(str(clean.SeriesInstanceUID))
        written += 1

    for path, reason in bad.items():
        _quarantine(ctx, spool, path, reason)
    quarantined = _quarantine_notes(list(bad.values()))
    if not written:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise Rejected("no instance of the study could be used: "
                       + "; ".join(q["note"] for q in quarantined))
    pseudo_study_uid = deid.save()
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    result = {
        "instances": written,
        "series": len(series_seen),
        "pseudo_study_uid": pseudo_study_uid,
        "pseudo_patient_id": deid.pseudo_patient_id,
    }
    if quarantined:
        result["quarantined"] = quarantined
        result["note"] = "; ".join(q["note"] for q in quarantined)
    summary_file.write_text(json.dumps(result, indent=2))
    return result
