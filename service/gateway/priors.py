"""Prior studies of the same patient, found automatically (gateway stage
``find_priors``, right after ``pseudonymize``).

Sources, in this order (``BRAINLINE_PRIOR_SEARCH``: off | brainline | pacs | both):

* **BrainLine**: earlier jobs of the same pseudonymous patient
  (``Job.pseudo_patient_id``), state done, another study, whose
  (date-shifted) StudyDate is earlier than the current one (the shift is per
  patient, so the order is that of the real dates). Their outputs are reused:
  hard links (copies across file systems) of ``dicom/``, ``nifti/``,
  ``registered/``, ``preprocessed/``, the masks and segmentation and the
  cached step json files, so the image steps are no-ops for them.
* **The PACS**, asked by the *real* patient ID (read from the vault, kept in
  memory only): QIDO-RS + WADO-RS when a DICOMweb PACS is configured
  (``BRAINLINE_PRIOR_PACS_DICOMWEB``, default ``BRAINLINE_DICOMWEB_URL``),
  else (or when it cannot be reached) C-FIND + C-GET (Study Root, the storage
  SCP role on the same association) against ``BRAINLINE_PRIOR_PACS_DICOM``,
  or C-FIND + C-MOVE to a short-lived storage SCP of BrainLine's own with
  ``BRAINLINE_PRIOR_RETRIEVE=move`` (service/gateway/prior_move.py).
  Only earlier MR studies count and only their MR series are retrieved.
  Retrieved instances land in a PHI folder ``<spool>/.priors/<job>/`` (0700),
  are pseudonymized into ``priors/<k>/dicom/`` with the same vault and
  profile as the current study (same pseudonym, same date shift; the prior's
  vault "study" record keeps its UID map for re-identification) and the PHI
  folder is removed.

A PACS study that BrainLine already processed (same pseudonymous UID) is
taken from BrainLine. Kept (``BRAINLINE_PRIOR_KEEP``): the most recent prior
and the baseline (earliest) or the nadir (smallest tumour core among
BrainLine's own earlier results; baseline with a note when no volume is
known); one study kept for two reasons is kept once (``kept_as`` lists
both). A PACS that cannot be reached, a query error or a timeout never fails
the job: ``priors.json`` says so in words (no PHI) and the job goes on.

Output (the contract of pipelines/longitudinal.py): ``priors.json`` and
``priors/<k>/`` (k = 0 the most recent) with ``prior.json``. Nothing
identifying is written into the workspace or the log: notes name the kind of
error, never a URL with its query, an exception text or a patient attribute.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from brainline.pipelines.dicom_dates import parse_da, shift_da
from brainline.pipelines.patient_match import another_patient
from brainline.pipelines.records import (
    BIAS_CORRECTION_FILE,
    REGISTRATION_FILE,
    RESULTS_FILE,
    SEGMENT_FILE,
    SELECTION_FILE,
    SKULL_STRIP_FILE,
    SUMMARY_FILE,
    migrate_workspace,
)

from ..db import Job, State
from ..jobs.context import StageContext
from .pseudonymize import ENCAPSULATED_SYNTAXES, NATIVE_SYNTAXES, StudyPseudonymizer, deid_profile
from .reidentify import study_patient
from .vault import PatientPseudonym, Vault

if TYPE_CHECKING:
    from .spool import Spool

log = logging.getLogger("brainline.priors")

PRIOR_MODALITY = "MR"
#: MR storage SOP classes retrieved with C-GET (MR Image, Enhanced MR, Legacy Converted Enhanced MR).
MR_STORAGE = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
#: Processed outputs of an earlier job reused for a prior (hard-linked).
REUSED_DIRS = ("dicom", "nifti", "registered", "preprocessed")
REUSED_FILES = (SELECTION_FILE, "brain_mask.nii.gz", "segmentation.nii.gz", REGISTRATION_FILE,
                SKULL_STRIP_FILE, BIAS_CORRECTION_FILE, SEGMENT_FILE, SUMMARY_FILE)
WEB_SOURCE = "PACS (QIDO-RS/WADO-RS)"
DIMSE_SOURCE = "PACS (C-FIND/C-GET)"


class PriorSearchError(RuntimeError):
    """The PACS could not be asked or could not deliver; the message is in
    words and carries no identity."""


@dataclass
class Candidate:
    """An earlier study of the patient. ``study_date`` is date-shifted
    (pseudonymized, YYYYMMDD); ``original_uid`` (PACS only) stays in memory."""

    study_date: str
    pseudo_study_uid: str
    source: str
    job_id: int | None = None
    workspace: Path | None = None
    tumor_core_ml: float | None = None
    original_uid: str | None = None
    kept_as: list[str] = field(default_factory=list)
    series: int = 0


# --------------------------------------------------------------------------
# settings and dates
# --------------------------------------------------------------------------
def _setting(settings, name: str, default):
    return getattr(settings, name, default)


def search_mode(settings) -> str:
    """off | brainline | pacs | both (settings.py fills the default in)."""
    mode = str(_setting(settings, "prior_search", "") or "").lower()
    if mode:
        return mode
    return "both" if (_setting(settings, "prior_pacs_dicomweb", "") or _setting(settings, "prior_pacs_dicom", "")) \
        else "brainline"


def _shift(yyyymmdd: str, days: int) -> str:
    """``yyyymmdd`` (a DA, or the date part of a longer value) moved by
    ``days`` (the vault's date shift, pipelines/dicom_dates.py, the same rule
    the de-identification applies); '' when invalid."""
    return shift_da(str(yyyymmdd or "")[:8], days) or ""


def _vault(ctx: StageContext) -> Vault:
    """The gateway's vault (a compute worker's context has none)."""
    if ctx.vault is None:
        raise RuntimeError(f"job {ctx.job_id}: the prior search needs the vault, which only the gateway holds")
    return ctx.vault


def _spool(ctx: StageContext) -> Spool:
    """The gateway's spool (a compute worker's context has none)."""
    if ctx.spool is None:
        raise RuntimeError(f"job {ctx.job_id}: the prior search needs the spool, which only the gateway holds")
    return ctx.spool


def _as_date(yyyymmdd: str) -> date | None:
    """The calendar date of ``yyyymmdd`` (its first 8 characters); None when invalid."""
    return parse_da(str(yyyymmdd or "")[:8])


def study_date_of(work: Path) -> str:
    """StudyDate (YYYYMMDD, as stored: date-shifted) of the pseudonymized
    study in ``work/dicom``; '' when none can be read."""
    for path in sorted((work / "dicom").glob("*/*.dcm"))[:5]:
        try:
            value = str(pydicom.dcmread(path, stop_before_pixels=True).get("StudyDate", "") or "")
        except Exception:
            continue
        if _as_date(value):
            return value[:8]
    return ""


# --------------------------------------------------------------------------
# BrainLine: earlier jobs of the same pseudonymous patient
# --------------------------------------------------------------------------
def _workspace_of(ctx: StageContext, job_id: int) -> Path:
    return ctx.workspace.parent / f"job-{job_id:06d}"


def _tumor_core_ml(work: Path) -> float | None:
    try:
        volumes = json.loads((work / "summary.json").read_text()).get("volumes_ml") or {}
        value = volumes.get("tumor_core")
        return None if value is None else float(value)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def brainline_candidates(ctx: StageContext, pseudo_patient_id: str, current_date: str,
                         deadline: float, patient: dict | None = None) -> tuple[list[Candidate], list[str]]:
    """Done jobs of the same pseudonymous patient with an earlier study date
    (one per study, the newest job). An earlier-dated job of the patient
    still running is waited for until ``deadline`` (time.monotonic()).
    ``patient``: the current study's patient attributes; a job whose study
    came with another birth date (:func:`another_patient`: the same ID and
    issuer reused, or a registry error) is another patient's and is left out."""
    sessions = ctx.job_sessions()
    if sessions is None:
        return [], ["BrainLine jobs could not be searched (no job store)"]
    notes: list[str] = []
    waited = False
    while True:
        with sessions() as s:
            rows = list(s.execute(select(Job.id, Job.study_key, Job.state, Job.pseudo_study_uid)
                                  .where(Job.pseudo_patient_id == pseudo_patient_id,
                                         Job.study_key != ctx.study_key, Job.id != ctx.job_id)
                                  .order_by(Job.id.desc())))
        running = [r for r in rows if r.state == State.RUNNING.value
                   and (d := study_date_of(_workspace_of(ctx, r.id))) and d < current_date]
        if not running or time.monotonic() >= deadline:
            if running:
                notes.append(f"{len(running)} earlier BrainLine job{'s' if len(running) > 1 else ''} of "
                             "this patient had not finished in time and could not be used")
            break
        waited = True
        time.sleep(1.0)
    if waited:
        log.info("waited for an earlier job of the patient", extra={"job_id": ctx.job_id})
    found: dict[str, Candidate] = {}
    others = 0
    for row in rows:
        if row.state != State.DONE.value or row.study_key in found or not row.pseudo_study_uid:
            continue
        if patient and another_patient(patient, study_patient(_vault(ctx).get("study", row.pseudo_study_uid),
                                                              None) or {}):
            others += 1
            continue
        work = _workspace_of(ctx, row.id)
        study_date = study_date_of(work)
        if not study_date or study_date >= current_date or not (work / "summary.json").exists():
            continue
        found[row.study_key] = Candidate(study_date=study_date, pseudo_study_uid=row.pseudo_study_uid,
                                         source=f"BrainLine job {row.id}", job_id=row.id, workspace=work,
                                         tumor_core_ml=_tumor_core_ml(work))
    if others:
        notes.append(f"{_plural(others, 'earlier BrainLine study', 'earlier BrainLine studies')} of this "
                     "patient ID came with another birth date (another patient's) and "
                     f"{'was' if others == 1 else 'were'} left out")
    return list(found.values()), notes


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (a copy across file systems)."""
    for path in src.rglob("*"):
        if path.is_dir():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def reuse_job_outputs(candidate: Candidate, out: Path, reference_role: str) -> dict:
    """Link the processed outputs of an earlier job into ``out``; return what
    prior.json adds (the job's SEG and reference series UIDs)."""
    src = candidate.workspace
    if src is None:
        raise ValueError(f"the prior of {candidate.study_date} is not a BrainLine job (no workspace to reuse)")
    out.mkdir(parents=True, exist_ok=True)
    migrate_workspace(src)   # an earlier version's job: its record files under their stage names
    for name in REUSED_DIRS:
        if (src / name).is_dir():
            _link_tree(src / name, out / name)
    for name in REUSED_FILES:
        if (src / name).is_file():
            _link_tree_file(src / name, out / name)
    extra: dict = {}
    try:
        selection = json.loads((src / SELECTION_FILE).read_text())
        reference = (selection.get("inputs") or {}).get("reference") or selection.get("reference") or reference_role
        roles = selection.get("roles") or {}
        entry = roles.get(reference) or roles.get(reference_role) or {}
        if entry.get("series_uid"):
            extra["reference_series_uid"] = entry["series_uid"]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        objects = json.loads((src / RESULTS_FILE).read_text()).get("objects") or []
        seg = next((o for o in objects if o.get("kind") == "seg"), None)
        if seg:
            extra["seg_sop_instance_uid"] = seg["sop_instance_uid"]
            header = pydicom.dcmread(src / seg["file"], stop_before_pixels=True)
            extra["seg_series_uid"] = str(header.SeriesInstanceUID)
    except (OSError, ValueError, KeyError, AttributeError, pydicom.errors.InvalidDicomError):
        pass
    return extra


def _link_tree_file(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------
# the PACS
# --------------------------------------------------------------------------
@dataclass
class PacsStudy:
    """A study found at the PACS (PHI: gateway memory only)."""

    study_uid: str
    study_date: str          # as at the PACS (real date)
    series: list[str] = field(default_factory=list)   # MR series UIDs, when known
    # IssuerOfPatientID and PatientBirthDate as the PACS gave them ("" when it did not): a
    # regional PACS holds several hospitals' IDs, and the query is by ID (another_patient)
    patient: dict = field(default_factory=dict)


def _value(item: dict, tag: str, default=""):
    return (item.get(tag, {}).get("Value") or [default])[0]


class DicomWebPacs:
    """QIDO-RS search and WADO-RS retrieval (dicomweb-client)."""

    source = WEB_SOURCE
    kind = "DICOMweb"

    def __init__(self, url: str, settings, timeout: float):
        session = requests.Session()
        if _setting(settings, "dicomweb_username", "") and url == _setting(settings, "dicomweb_url", ""):
            session.auth = (settings.dicomweb_username, settings.dicomweb_password)
        self.client = DICOMwebClient(url=url, session=session, timeout=timeout)
        # dicomweb-client retries every failed request 5 times with back-off
        # (30 s for a PACS that is down): one try, the job goes on without priors.
        self.client.set_http_retry_params(retry=False)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise PriorSearchError(f"{what} at the PACS failed (HTTP {status})") from None
        except requests.Timeout:
            raise PriorSearchError(f"{what} at the PACS timed out") from None
        except requests.RequestException as exc:
            raise PriorSearchError(f"the PACS could not be reached over DICOMweb ({type(exc).__name__})") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise PriorSearchError(f"{what} at the PACS gave an answer that cannot be read "
                                   f"({type(exc).__name__})") from None

    def find_studies(self, patient_id: str) -> list[PacsStudy]:
        found = self._call("the QIDO-RS study search", self.client.search_for_studies,
                           search_filters={"PatientID": patient_id, "ModalitiesInStudy": PRIOR_MODALITY},
                           fields=["StudyDate", "ModalitiesInStudy", "PatientID", "IssuerOfPatientID",
                                   "PatientBirthDate"])
        studies = []
        for item in found or []:
            if _value(item, "00100020") not in ("", patient_id):
                continue  # a PACS that ignores the filter
            modalities = (item.get("00080061", {}).get("Value") or [])
            if modalities and PRIOR_MODALITY not in modalities:
                continue
            studies.append(PacsStudy(_value(item, "0020000D"), str(_value(item, "00080020")),
                                     patient={"IssuerOfPatientID": str(_value(item, "00100021")),
                                              "PatientBirthDate": str(_value(item, "00100030"))}))
        return [s for s in studies if s.study_uid]

    def retrieve(self, study: PacsStudy, folder: Path, deadline: float) -> int:
        series = self._call("the QIDO-RS series search", self.client.search_for_series,
                            study_instance_uid=study.study_uid, fields=["Modality"])
        wanted = [_value(s, "0020000E") for s in series or [] if _value(s, "00080060") == PRIOR_MODALITY]
        study.series = [uid for uid in wanted if uid]
        written = 0
        for series_uid in study.series:
            iterator = self._call("the WADO-RS retrieval", self.client.iter_series,
                                  study.study_uid, series_uid)
            while True:
                if time.monotonic() > deadline:
                    raise PriorSearchError("retrieving the prior from the PACS took longer than "
                                           "BRAINLINE_PRIOR_TIMEOUT_SECONDS")
                ds = self._call("the WADO-RS retrieval", next, iterator, None)
                if ds is None:
                    break
                _save_part10(ds, folder / f"{written:06d}.dcm")
                written += 1
        return written


def _save_part10(ds: pydicom.Dataset, path: Path) -> None:
    from .dicomweb_pull import with_part10_meta

    with_part10_meta(ds).save_as(path, enforce_file_format=True)


def check_retrieve_status(status, what: str, deadline: float, hint: str = "") -> None:
    """Raise PriorSearchError, in words, for a C-GET/C-MOVE response that
    failed, never came, or came after ``deadline`` (time.monotonic() s);
    ``hint`` is added to a failure status. Pending, success and warning
    (0xB000: some sub-operations failed) pass."""
    code = getattr(status, "Status", None)
    if code is None:
        raise PriorSearchError(f"the {what} at the DICOM PACS got no answer (timeout or abort)")
    if time.monotonic() > deadline:
        raise PriorSearchError("retrieving the prior from the PACS took longer than "
                               "BRAINLINE_PRIOR_TIMEOUT_SECONDS")
    if code not in (0x0000, 0xFF00, 0xFF01, 0xB000):
        raise PriorSearchError(f"the {what} at the DICOM PACS failed (status 0x{code:04X}){hint}")


class DimsePacs:
    """C-FIND (Study Root) + C-GET (storage SCP role on the same association)."""

    source = DIMSE_SOURCE
    kind = "DICOM"
    find_context = STUDY_ROOT_FIND

    def __init__(self, address: str, settings, timeout: float):
        aet, _, hostport = address.partition("@")
        host, _, port = hostport.rpartition(":")
        self.aet, self.host, self.port = aet, host, int(port)
        self.calling = _setting(settings, "ae_title", "BRAINLINE")
        self.timeout = timeout

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def _associate(self, ae, handlers=None, roles=None):
        assoc = ae.associate(self.host, self.port, ae_title=self.aet, evt_handlers=handlers or [],
                             ext_neg=roles)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "could not be reached"
            raise PriorSearchError(f"the DICOM PACS {why}")
        return assoc

    def _find(self, assoc, query: pydicom.Dataset) -> list[pydicom.Dataset]:
        answers = []
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            code = getattr(status, "Status", None)
            if code is None:
                raise PriorSearchError("the C-FIND at the DICOM PACS got no answer (timeout or abort)")
            if code in (0xFF00, 0xFF01) and identifier is not None:
                answers.append(identifier)
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise PriorSearchError(f"the C-FIND at the DICOM PACS failed (status 0x{code:04X})")
        return answers

    def find_studies(self, patient_id: str) -> list[PacsStudy]:
        ae = self._ae()
        ae.add_requested_context(STUDY_ROOT_FIND)
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient_id
        query.IssuerOfPatientID = ""
        query.PatientBirthDate = ""
        query.StudyInstanceUID = ""
        query.StudyDate = ""
        query.ModalitiesInStudy = PRIOR_MODALITY
        assoc = self._associate(ae)
        try:
            answers = self._find(assoc, query)
        finally:
            assoc.release()
        studies = []
        for ds in answers:
            if str(ds.get("PatientID", "") or "") not in ("", patient_id):
                continue
            modalities = ds.get("ModalitiesInStudy") or []
            modalities = [modalities] if isinstance(modalities, str) else list(modalities)
            if modalities and PRIOR_MODALITY not in modalities:
                continue
            if ds.get("StudyInstanceUID"):
                studies.append(PacsStudy(str(ds.StudyInstanceUID), str(ds.get("StudyDate", "") or ""),
                                         patient={k: str(ds.get(k, "") or "")
                                                  for k in ("IssuerOfPatientID", "PatientBirthDate")}))
        return studies

    what = "C-GET"
    hint = ""   # added to a failure status, in words

    def send_retrieve(self, assoc, request: pydicom.Dataset):
        """The responses of one retrieve request (C-GET here) on ``assoc``."""
        return assoc.send_c_get(request, STUDY_ROOT_GET)

    def retrieve_series(self, assoc, study: PacsStudy, deadline: float) -> None:
        """List the study's MR series on ``assoc`` and retrieve each one
        (``send_retrieve``); PriorSearchError, in words, when one fails."""
        study.series = self.series_of(assoc, study)
        for series_uid in study.series:
            request = pydicom.Dataset()
            request.QueryRetrieveLevel = "SERIES"
            request.StudyInstanceUID = study.study_uid
            request.SeriesInstanceUID = series_uid
            for status, _identifier in self.send_retrieve(assoc, request):
                check_retrieve_status(status, self.what, deadline, self.hint)

    def retrieve_on(self, assoc, study: PacsStudy, deadline: float) -> None:
        """``retrieve_series`` on an established ``assoc``, then release it;
        aborted instead when the retrieval fails."""
        try:
            self.retrieve_series(assoc, study, deadline)
        except PriorSearchError:
            assoc.abort()
            raise
        assoc.release()

    def series_of(self, assoc, study: PacsStudy) -> list[str]:
        """The MR series of ``study`` (C-FIND at SERIES level on ``assoc``)."""
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study.study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        return [str(ds.SeriesInstanceUID) for ds in self._find(assoc, query)
                if str(ds.get("Modality", "")) == PRIOR_MODALITY and ds.get("SeriesInstanceUID")]

    def retrieve(self, study: PacsStudy, folder: Path, deadline: float) -> int:
        from pynetdicom import build_role, evt

        ae = self._ae()
        ae.add_requested_context(self.find_context)
        ae.add_requested_context(STUDY_ROOT_GET)
        syntaxes = sorted(NATIVE_SYNTAXES) + sorted(ENCAPSULATED_SYNTAXES)
        for sop_class in MR_STORAGE:
            ae.add_requested_context(sop_class, syntaxes)
        roles = [build_role(sop_class, scp_role=True) for sop_class in MR_STORAGE]
        written = [0]

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            if str(ds.get("Modality", "")) != PRIOR_MODALITY:
                return 0x0000  # accepted, not kept
            _save_part10(ds, folder / f"{written[0]:06d}.dcm")
            written[0] += 1
            return 0x0000

        self.retrieve_on(self._associate(ae, [(evt.EVT_C_STORE, on_store)], roles), study, deadline)
        return written[0]


def configured_pacs(settings, timeout: float) -> list[DicomWebPacs | DimsePacs]:
    """The PACS to ask, in order: DICOMweb first, then DICOM."""
    pacs: list[DicomWebPacs | DimsePacs] = []
    url = _setting(settings, "prior_pacs_dicomweb", "")
    if url:
        pacs.append(DicomWebPacs(url, settings, timeout))
    address = _setting(settings, "prior_pacs_dicom", "")
    if address:
        if _setting(settings, "prior_retrieve", "get") == "move":
            from .prior_move import DimseMovePacs

            pacs.append(DimseMovePacs(address, settings, timeout))
        else:
            pacs.append(DimsePacs(address, settings, timeout))
    return pacs


def _plural(n: int, word: str, plural: str | None = None) -> str:
    """'1 earlier study', '2 earlier studies'."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {plural or (word[:-1] + 'ies' if word.endswith('y') else word + 's')}"


def pacs_candidates(ctx: StageContext, pacs_list: list, patient: dict, current_uid: str,
                    current_real_date: str, shift_days: int) -> tuple[list[Candidate], object, list[str], list[str]]:
    """Ask the PACS (the first that answers) for the earlier MR studies of
    ``patient`` (the current study's PatientID, IssuerOfPatientID and
    PatientBirthDate; a study of the same ID with another issuer or birth date
    is another patient's and is left out). Returns (candidates, the PACS that
    answered or None, searched words, notes)."""
    searched, notes = [], []
    for pacs in pacs_list:
        try:
            studies = pacs.find_studies(patient["PatientID"])
        except PriorSearchError as exc:
            notes.append(f"{exc}; priors were not searched there")
            log.warning("prior search at the PACS failed", extra={"job_id": ctx.job_id, "pacs": pacs.kind,
                                                                   "reason": str(exc)})
            continue
        except Exception as exc:  # never fail the job for the PACS
            notes.append(f"the prior search at the {pacs.kind} PACS failed ({type(exc).__name__})")
            log.warning("prior search at the PACS failed", extra={"job_id": ctx.job_id, "pacs": pacs.kind,
                                                                   "error": type(exc).__name__})
            continue
        earlier, later, others = [], 0, 0
        for study in studies:
            if study.study_uid == current_uid:
                continue
            if another_patient(patient, study.patient):
                others += 1
                continue
            if not _as_date(study.study_date) or study.study_date[:8] >= current_real_date:
                later += 1
                continue
            earlier.append(Candidate(study_date=_shift(study.study_date, shift_days),
                                     pseudo_study_uid=_vault(ctx).uid(study.study_uid), source=pacs.source,
                                     original_uid=study.study_uid))
        words = f"PACS over {pacs.kind}: {_plural(len(earlier), 'earlier MR study')}"
        if later:
            words += f" ({later} not earlier than this one or undated, left out)"
        if others:
            words += (f" ({_plural(others, 'study')} with this patient ID but another issuer or birth date, "
                      "another patient's, left out)")
        searched.append(words)
        return earlier, pacs, searched, notes
    return [], None, searched, notes


def retrieve_prior(ctx: StageContext, pacs, candidate: Candidate, phi_dir: Path, out: Path,
                   patient, deadline: float) -> int:
    """Retrieve the prior's MR series into ``phi_dir`` and pseudonymize them
    into ``out/dicom`` (same patient pseudonym and date shift as the current
    study); store its vault "study" record. Returns the instances written."""
    for folder in (phi_dir.parent.parent, phi_dir.parent, phi_dir):   # <spool>/.priors/<job>/<k>
        folder.mkdir(exist_ok=True, mode=0o700)
    if candidate.original_uid is None:
        raise PriorSearchError("the prior has no study UID at the PACS")
    study = PacsStudy(candidate.original_uid, "")
    n = pacs.retrieve(study, phi_dir, deadline)
    if not n:
        raise PriorSearchError("the PACS returned no MR instance of the prior study")
    deid = StudyPseudonymizer(_vault(ctx), deid_profile(ctx.settings), patient=patient)
    tmp = out / "dicom.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    written, series = 0, set()
    for path in sorted(phi_dir.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            if str(ds.get("StudyInstanceUID", "")) != candidate.original_uid:
                continue
            clean = deid(ds)
        except Exception as exc:  # one instance does not lose the prior
            log.warning("prior instance not de-identified",
                        extra={"job_id": ctx.job_id, "error": type(exc).__name__})
            continue
        deid.write(clean, tmp)
        series.add(str(clean.SeriesInstanceUID))
        written += 1
    if not written:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PriorSearchError("no instance of the prior study could be de-identified")
    deid.save()
    os.replace(tmp, out / "dicom")
    candidate.series = len(series)
    return written


# --------------------------------------------------------------------------
# which priors to keep
# --------------------------------------------------------------------------
def choose(candidates: list[Candidate], keep: list[str]) -> tuple[list[Candidate], list[str]]:
    """Keep the most recent and the baseline (earliest) or nadir (smallest
    tumour core among BrainLine results) candidates; set ``kept_as``.
    Returns (kept, most recent first; notes)."""
    notes: list[str] = []
    if not candidates:
        return [], notes
    ordered = sorted(candidates, key=lambda c: (c.study_date, c.job_id or 0))
    chosen: dict[int, Candidate] = {}

    def mark(candidate: Candidate, label: str) -> None:
        if label not in candidate.kept_as:
            candidate.kept_as.append(label)
        chosen[id(candidate)] = candidate

    for word in keep:
        if word == "recent":
            mark(ordered[-1], "most recent")
        elif word == "baseline":
            mark(ordered[0], "baseline")
        elif word == "nadir":
            known = [c for c in ordered if c.tumor_core_ml is not None]
            if known:
                mark(min(known, key=lambda c: (c.tumor_core_ml, c.study_date)), "nadir")
            else:
                notes.append("the nadir could not be chosen (no tumour volume of an earlier study is known "
                             "to BrainLine): the baseline study was kept instead")
                mark(ordered[0], "baseline")
    kept = sorted(chosen.values(), key=lambda c: c.study_date, reverse=True)
    return kept, notes


# --------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _entry(c: Candidate, k: int) -> dict:
    return {"dir": f"priors/{k}", "study_date": c.study_date, "kept_as": list(c.kept_as),
            "source": c.source, "pseudo_study_uid": c.pseudo_study_uid, "job_id": c.job_id}


def _result(record: dict) -> dict:
    out = {"priors": len(record["priors"]),
           "kept": [{k: p[k] for k in ("dir", "study_date", "kept_as", "source")} for p in record["priors"]],
           "searched": record["searched"]}
    if record["notes"]:
        out["notes"] = record["notes"]
        out["note"] = "; ".join(record["notes"])
    return out


def find_priors(ctx: StageContext) -> dict:
    """Find, keep and prepare the prior studies of this study's patient
    (see the module's doc). Writes ``priors.json`` and ``priors/<k>/``;
    never fails the job for a prior (notes in words instead)."""
    record_file = ctx.path("priors.json")
    if record_file.exists():
        return _result(json.loads(record_file.read_text()))
    settings = ctx.settings
    pseudo = json.loads(ctx.path("pseudonymize.json").read_text())
    current_date = study_date_of(ctx.workspace)
    record: dict[str, Any] = {"current": {"study_date": current_date}, "priors": [], "searched": [], "notes": []}
    mode = search_mode(settings)
    priors_dir = ctx.path("priors")
    shutil.rmtree(priors_dir, ignore_errors=True)
    if mode == "off":
        record["searched"].append("prior search is off (BRAINLINE_PRIOR_SEARCH=off)")
        _write_json(record_file, record)
        return _result(record)
    if not current_date:
        record["notes"].append("the study has no valid study date, so earlier studies cannot be told apart")
        _write_json(record_file, record)
        return _result(record)
    timeout = float(_setting(settings, "prior_timeout_seconds", 120.0))
    candidates: list[Candidate] = []
    vault = _vault(ctx)
    patient_record = vault.get("patient", pseudo["pseudo_patient_id"])
    study = vault.get("study", pseudo["pseudo_study_uid"])
    current_patient = study_patient(study, patient_record)   # the attributes this study came with
    if mode in ("brainline", "both") and patient_record is not None and not patient_record.get("PatientID"):
        # its pseudonym is the study's own (pseudonymize._patient_key): nothing to search
        record["notes"].append("the study has no patient ID, so no earlier BrainLine study is linked to it")
    elif mode in ("brainline", "both"):
        found, notes = brainline_candidates(ctx, pseudo["pseudo_patient_id"], current_date,
                                            time.monotonic() + timeout, current_patient)
        candidates += found
        record["searched"].append(f"BrainLine jobs of this patient: {_plural(len(found), 'earlier study')}")
        record["notes"] += notes
    pacs = None
    deadline = time.monotonic() + timeout   # for the PACS: search and retrieval together
    if mode in ("pacs", "both"):
        pacs_list = configured_pacs(settings, timeout)
        if not pacs_list:
            record["searched"].append("no PACS is configured for the prior search "
                                      "(BRAINLINE_PRIOR_PACS_DICOMWEB / BRAINLINE_PRIOR_PACS_DICOM)")
        elif not (patient_record and patient_record.get("PatientID") and study):
            record["notes"].append("the study has no patient ID, so the PACS was not asked for priors")
        else:
            shift = int(study.get("date_shift_days", 0))
            assert current_patient is not None  # patient_record was checked above
            found, pacs, searched, notes = pacs_candidates(
                ctx, pacs_list, current_patient, study["StudyInstanceUID"],
                _shift(current_date, -shift), shift)
            record["searched"] += searched
            record["notes"] += notes
            known = {c.pseudo_study_uid for c in candidates}
            candidates += [c for c in found if c.pseudo_study_uid not in known]
    max_age = int(_setting(settings, "prior_max_age_days", 0) or 0)
    if max_age:
        current = _as_date(current_date)
        assert current is not None  # study_date_of gives a valid date or "" (returned above)
        limit = (current - timedelta(days=max_age)).strftime("%Y%m%d")
        too_old = [c for c in candidates if c.study_date < limit]
        if too_old:
            candidates = [c for c in candidates if c.study_date >= limit]
            record["notes"].append(f"{_plural(len(too_old), 'earlier study')} older than {max_age} days "
                                   "(BRAINLINE_PRIOR_MAX_AGE_DAYS) left out")
    keep = [w.strip() for w in str(_setting(settings, "prior_keep", "recent,baseline")).split(",") if w.strip()]
    kept, notes = choose(candidates, keep)
    record["notes"] += notes
    phi_root = _spool(ctx).root / ".priors" / f"job-{ctx.job_id:06d}"
    # the prior gets the current study's pseudonym and date shift, whatever its issuer says
    patient = PatientPseudonym(pseudo["pseudo_patient_id"], int(study["date_shift_days"])) if study else None
    try:
        k = 0
        for candidate in kept:
            out = priors_dir / str(k)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            extra: dict = {}
            try:
                if candidate.workspace is not None:
                    extra = reuse_job_outputs(candidate, out, _setting(settings, "reference_role", "t1c"))
                else:
                    retrieve_prior(ctx, pacs, candidate, phi_root / str(k), out, patient, deadline)
            except PriorSearchError as exc:
                record["notes"].append(f"the prior of {candidate.study_date} could not be used: {exc}")
                shutil.rmtree(out, ignore_errors=True)
                continue
            except Exception as exc:  # a prior never fails the job
                log.warning("prior not prepared", extra={"job_id": ctx.job_id, "error": type(exc).__name__})
                record["notes"].append(f"the prior of {candidate.study_date} could not be used "
                                       f"({type(exc).__name__})")
                shutil.rmtree(out, ignore_errors=True)
                continue
            entry = _entry(candidate, k)
            _write_json(out / "prior.json", {**entry, **extra})
            record["priors"].append(entry)
            k += 1
    finally:
        shutil.rmtree(phi_root, ignore_errors=True)
        try:
            phi_root.parent.rmdir()
        except OSError:
            pass
    _write_json(record_file, record)
    log.info("prior search done", extra={"job_id": ctx.job_id, "priors": len(record["priors"])})
    return _result(record)
