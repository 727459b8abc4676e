"""The stages a job runs, as the service sees them.

Each stage is a function ``fn(ctx: StageContext) -> dict`` whose returned dict
(JSON-serializable, pseudonymous) is stored in the job store. Stages read and
write files in the job workspace only, are deterministic and idempotent: a
stage that finds its outputs complete returns them without redoing the work,
so a job resumes at its first unfinished stage after a crash.

``pseudonymize`` is the only stage that reads the PHI spool; it runs on the
gateway side and writes nothing identifying into the workspace.
``find_priors`` (gateway side too, service/priors.py) reads the vault's
identity of the study to find the patient's earlier studies, within
BrainLine and at the PACS, and writes them pseudonymized into ``priors/``. The other
stages are thin wrappers around the pure functions in ``brainline.pipelines``.

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
from typing import Callable

import pydicom
from pydicom import uid as dicom_uid

from brainline.models.base import SegmentationError
from brainline.pipelines.bias_correction import N4Error
from brainline.pipelines.conversion import ConversionError
from brainline.pipelines.image_pipeline import STEPS, PipelineConfig, PipelineError
from brainline.pipelines.inputs import convert_inputs, select_inputs, selected_files
from brainline.pipelines.longitudinal import step_longitudinal
from brainline.pipelines.series_completeness import IncompleteSeriesError
from brainline.pipelines.registration import RegistrationConfig, RegistrationError
from brainline.pipelines.results import CORE_OBJECTS, OBJECT_NAMES, build_results, rerender_pdf
from brainline.pipelines.series_selection import MissingSeriesError, RulesError
from brainline.pipelines.skull_strip import SkullStripError

from .deid import DeidContext, DeidProfile, identifying_strings_of, pseudonymize_dataset
from .qc_history import compare_image_qc, compare_segmentation_qc, qc_config
from .reidentify import reidentify_dataset
from .spool import Spool
from .vault import Vault

log = logging.getLogger("brainline.stages")


class NeedsInput(Exception):
    """The study lacks something the pipeline needs; the message says what."""


class Rejected(Exception):
    """The study must not be processed; the message says why."""


#: State of a job (and of its stage that noticed) replaced by a newer job of
#: the same study; db.State has no member for it yet.
SUPERSEDED = "superseded"


class Superseded(Exception):
    """A newer job of the same study replaced this one; the message says which."""


@dataclass
class StageContext:
    job_id: int
    study_key: str
    workspace: Path
    spool: Spool
    vault: Vault
    settings: object
    outbox: object = None  # service.outbox.Outbox, None when no destination is configured
    #: () -> None, or the words "superseded by job N ..." once a newer job replaced this one
    superseded: Callable[[], str | None] | None = None
    #: the job store's sessionmaker (find_priors reads earlier jobs of the patient);
    #: None = the vault's, which lives in the same database
    sessions: object = None

    def check_superseded(self) -> None:
        """Raise Superseded when a newer job of this study replaced this one."""
        why = self.superseded() if self.superseded else None
        if why:
            raise Superseded(why)

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


def _quarantine(ctx: StageContext, path: Path, reason: str) -> None:
    """Keep a hard link (a copy across file systems) of the spool file in
    ``<spool>/.quarantine/<study_key>/`` with the reason; the spool file stays
    (removing it would change the study and re-open it)."""
    folder = ctx.spool.root / ".quarantine" / ctx.study_key
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
    patients = Counter(s.patient for s in readable)
    (study_patient, n), = patients.most_common(1)
    if len(patients) > 1 and 2 * n <= len(readable):
        raise Rejected("the study holds instances of more than one patient (different Patient IDs), "
                       "none of them holding most of the study")
    for s in readable:
        if s.patient != study_patient:
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
    and by the prior search (service/priors.py)."""

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

    def _start(self, ds: pydicom.Dataset) -> None:
        identity = _identity_of(ds)
        patient = self.patient or self.vault.patient(identity["PatientID"], identity["IssuerOfPatientID"])
        self._deid = DeidContext(
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

    @property
    def pseudo_patient_id(self) -> str | None:
        return self._deid.pseudo_patient_id if self._deid else None

    def __call__(self, ds: pydicom.Dataset) -> pydicom.Dataset:
        """One instance pseudonymized in place (raises what the profile
        raises): callers read each instance from its file only to write its
        pseudonymized version, so no deep copy is made (a quarter of the time)."""
        if self._deid is None:
            self._start(ds)
        return pseudonymize_dataset(ds, self.profile, self._deid, in_place=True)

    def write(self, clean: pydicom.Dataset, out_dir: Path) -> Path:
        """Save a pseudonymized instance as ``out_dir/<series>/<sop>.dcm``."""
        series_dir = out_dir / str(clean.SeriesInstanceUID)
        series_dir.mkdir(parents=True, exist_ok=True)
        path = series_dir / f"{clean.SOPInstanceUID}.dcm"
        clean.save_as(path, enforce_file_format=True)
        return path

    def save(self) -> str:
        """Store the vault records; return the pseudonymous StudyInstanceUID."""
        pseudo_study_uid = self.vault.uid(self.study_record["StudyInstanceUID"])
        if self.patient is None:
            self.vault.put("patient", self._deid.pseudo_patient_id, self.identity)
        self.vault.put("study", pseudo_study_uid, {**self.study_record, "uid_map": self.uid_map})
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
    files = ctx.spool.instance_files(ctx.study_key)
    if not files:
        raise Rejected("the spool holds no instances for this study")
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
        _quarantine(ctx, path, reason)
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


def find_priors(ctx: StageContext) -> dict:
    """Earlier MR studies of the same patient (gateway side): see
    service/priors.py. Writes ``priors.json`` and ``priors/<k>/``."""
    from .priors import find_priors as run  # priors.py uses StudyPseudonymizer from here

    return run(ctx)


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
    except MissingSeriesError as exc:  # IncompleteSeriesError too: names the series, what is missing
        raise NeedsInput(str(exc) + _quarantine_hint(ctx)) from None


def _quarantine_hint(ctx: StageContext) -> str:
    """' Also: 1 instance quarantined: ...' when pseudonymize quarantined some."""
    try:
        note = json.loads(ctx.path("pseudonymize.json").read_text()).get("note")
    except (OSError, ValueError):
        return ""
    return f" Also: {note}." if note else ""


def convert(ctx: StageContext) -> dict:
    """dcm2niix every selected series into ``nifti/<role>.nii.gz`` + JSON sidecar.
    A needed series dcm2niix would interpolate (unequal slice spacing) ends in
    needs_input; an optional one is dropped with a note."""
    try:
        result = {"series": convert_inputs(ctx.workspace)}
    except IncompleteSeriesError as exc:
        raise NeedsInput(str(exc) + _quarantine_hint(ctx)) from None
    note = (json.loads(ctx.path("selection.json").read_text()).get("inputs") or {}).get("note")
    if note:
        result["note"] = note
    return result


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


def _reidentified(ctx: StageContext, obj: dict, study: dict, patient: dict,
                  prior_maps: list[dict] = ()) -> pydicom.Dataset:
    ds = reidentify_dataset(pydicom.dcmread(ctx.workspace / obj["file"]), study, patient,
                            extra_uid_maps=prior_maps)
    if obj["kind"] == "pdf":
        identity = {"patient_id": patient["PatientID"], "patient_name": patient["PatientName"],
                    "study_date": str(ds.get("StudyDate", "")),
                    "accession_number": study.get("AccessionNumber", ""),
                    "study_instance_uid": study["StudyInstanceUID"]}
        rerender_pdf(ds, ctx.workspace, _reference_files(ctx), identity)
    return ds


#: Longitudinal objects (pipelines/longitudinal.py, built by build_outputs)
#: come after the SR: they reference the prior studies as well.
DELIVERY_ORDER = {"seg": 0, "sr": 1, "change_sr": 2, "lesion_seg": 3, "subtraction": 4, "pdf": 5, "overlay": 6}


def prior_uid_maps(ctx: StageContext) -> list[dict]:
    """UID maps (pseudo -> original) of the prior studies listed in
    ``priors.json`` (vault "study" records): the longitudinal objects
    reference the priors' pseudonymous UIDs. A prior without a vault record
    adds nothing (its UIDs stay pseudonymous)."""
    try:
        priors = json.loads(ctx.path("priors.json").read_text()).get("priors") or []
    except (OSError, ValueError):
        return []
    maps = []
    for prior in priors:
        record = ctx.vault.get("study", prior.get("pseudo_study_uid") or "") if prior.get("pseudo_study_uid") else None
        if record and record.get("uid_map"):
            maps.append(record["uid_map"])
    return maps


def deliver(ctx: StageContext) -> dict:
    """Re-identify the results (original patient, study and UIDs, PDF
    re-rendered with the real identity) into the PHI outbox folder and queue
    them for every configured destination. UIDs of the prior studies that
    the longitudinal objects reference are re-identified with the priors'
    vault records (``prior_uid_maps``). Sends whatever build_outputs
    built; an overlay or PDF that cannot be re-identified is left out and
    recorded (``not_delivered``), a SEG or SR that cannot fails the stage.

    A job superseded by a newer job of the same study delivers nothing
    (Superseded); objects of earlier jobs of the study still waiting in the
    outbox are cancelled before this job queues its own, and the result
    lists the earlier objects already stored (``replaces``): the new SEG/SR
    are new objects (new UIDs) that replace them; the earlier objects are
    retracted with an IHE IOCM rejection note (``retracted``, see
    service/review.py).

    Review gating (service/review.py, per site = the sender's calling AE
    title): "preliminary" queues the objects to be sent and the job awaits
    review; "hold" queues them ``held`` (sent only after ACCEPT); "off"
    asks for no review."""
    from . import review  # review.py reads helpers of this module

    ctx.check_superseded()
    results = json.loads(ctx.path("results.json").read_text())
    mode, site = review.gating(ctx)
    if ctx.outbox is None or not ctx.outbox.destinations:
        outcome = {"queued": 0, "note": "no destination configured (BRAINLINE_DEST_DICOM / "
                                        "BRAINLINE_DEST_STOWRS); results stay in the workspace"}
        if mode != "off":
            outcome["review"] = {"mode": mode, "site": site, "state": review.mark_pending(ctx)}
        return outcome
    hold = {"state": review.HELD} if mode == "hold" else {}
    pseudo = json.loads(ctx.path("pseudonymize.json").read_text())
    study = ctx.vault.get("study", pseudo["pseudo_study_uid"])
    patient = ctx.vault.get("patient", pseudo["pseudo_patient_id"])
    if study is None or patient is None:
        raise Rejected("the vault has no identity for this study, so results cannot be re-identified")
    prior_maps = prior_uid_maps(ctx)
    out_dir = ctx.settings.outbox_dir / f"job-{ctx.job_id:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    queued: list[tuple[str, Path]] = []
    skipped: dict[str, str] = {}
    # SEG and SR first, queued as soon as they are re-identified: the sender
    # stores them while the overlay series (one instance per slice) and the
    # PDF are still being re-identified.
    objects = sorted(results["objects"], key=lambda o: DELIVERY_ORDER.get(o["kind"], len(DELIVERY_ORDER)))
    cancelled = ctx.outbox.cancel_earlier(ctx.study_key, ctx.job_id)
    replaces = ctx.outbox.sent_earlier(ctx.study_key, ctx.job_id)
    added, core_queued = 0, False
    for obj in objects:
        if not core_queued and obj["kind"] not in CORE_OBJECTS:
            added += ctx.outbox.enqueue(ctx.job_id, queued, **hold)
            core_queued = True
        if obj["kind"] in skipped:
            continue  # one instance of an overlay series failed: leave the whole series out
        try:
            ds = _reidentified(ctx, obj, study, patient, prior_maps)
        except Exception as exc:
            if obj["kind"] in CORE_OBJECTS:
                raise
            log.warning("result object not delivered", exc_info=True,
                        extra={"job_id": ctx.job_id, "kind": obj["kind"]})
            skipped[obj["kind"]] = (f"{OBJECT_NAMES.get(obj['kind'], obj['kind'])} not delivered: re-identification "
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
                                             if not (core_queued and k in CORE_OBJECTS)], **hold)
    # the earlier jobs' delivered objects are retracted now, whatever the review of these
    retracted = review.retract_superseded(ctx, out_dir) if replaces else None
    result = {"objects": len(queued), "queued": added, "destinations": sorted(ctx.outbox.destinations)}
    if mode != "off":
        result["review"] = {"mode": mode, "site": site, "state": review.mark_pending(ctx)}
    if hold:
        result["held"] = added
        result["held_note"] = (f"review mode 'hold' for site {site or '(none)'}: the results are sent only after "
                               "a radiologist accepts them")
    if skipped:
        result["not_delivered"] = [{"kind": k, "error": e} for k, e in skipped.items()]
    if results.get("failed"):
        result["not_built"] = [f["error"] for f in results["failed"]]
    if cancelled:
        result["cancelled_earlier"] = cancelled
    if replaces:
        jobs = sorted({r["job_id"] for r in replaces})
        kinds = sorted({OBJECT_NAMES.get(r["kind"], r["kind"]) for r in replaces})
        result["replaces"] = replaces
        if retracted and retracted.get("instances"):
            fate = (f"the earlier ones are retracted with an IHE IOCM rejection note ({retracted['reason']}, "
                    f"{retracted['instances']} objects)")
            result["retracted"] = retracted
        elif retracted is None:
            fate = "the earlier ones were already retracted (IHE IOCM rejection note)"
        else:
            fate = "the earlier ones stay there" + (f" ({retracted['note']})" if retracted.get("note") else "")
        result["note"] = (f"these results replace those of job{'s' if len(jobs) > 1 else ''} "
                          f"{', '.join(map(str, jobs))} ({', '.join(kinds)} already stored at the "
                          f"destination); the new objects have new UIDs, {fate}")
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
        qc=qc_config(settings),
    )


def _image_step(step):
    def stage(ctx: StageContext) -> dict:
        return step(ctx.workspace, pipeline_config(ctx.settings))

    stage.__doc__ = step.__doc__
    return stage


def _qc_step(step, compare):
    """A QC step of the image pipeline (files only) followed by its
    comparison with the site's history in the job store
    (service/qc_history.py: z-scores or discord thresholds, rows stored in
    qc_metrics, words into the workspace for summarize)."""
    def stage(ctx: StageContext) -> dict:
        result = step(ctx.workspace, pipeline_config(ctx.settings))
        sessions = ctx.sessions or getattr(ctx.vault, "_sessions", None)
        return compare(sessions, ctx.job_id, ctx.workspace, ctx.settings, result)

    stage.__doc__ = f"{step.__doc__}\n\nThen: {compare.__doc__}"
    return stage


#: Image steps that the service runs with its database history.
QC_STAGES = {"image_qc": compare_image_qc, "segmentation_qc": compare_segmentation_qc}


def _service_step(name, step):
    return _qc_step(step, QC_STAGES[name]) if name in QC_STAGES else _image_step(step)


StageFn = Callable[[StageContext], dict]

PIPELINES: dict[str, list[tuple[str, StageFn]]] = {
    "foundation": [
        ("pseudonymize", pseudonymize),
        ("select_series", select),
        ("convert", convert),
    ],
    "neuro_onco": [
        ("pseudonymize", pseudonymize),
        ("find_priors", find_priors),
        ("select_series", select),
        ("convert", convert),
        *[(name, _service_step(name, step)) for name, step in STEPS],
        ("longitudinal", _image_step(step_longitudinal)),
        ("build_outputs", build_outputs),
        ("deliver", deliver),
    ],
}
DEFAULT_PIPELINE = "neuro_onco"
