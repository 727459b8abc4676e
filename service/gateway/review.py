"""Review gating and the result lifecycle (issue 12, item 4): what happens to
a job's results before and after a radiologist's ACCEPT or REJECT, and when a
newer job of the same study replaces them.

**Gating, per site.** A job's site is the calling AE title of the sender
(``Job.site``, set at job creation; "" for a study pulled over DICOMweb).
``review_mode`` (and ``review_mode_by_site``, e.g.
``SCANNER1=hold,SCANNER2=preliminary``) says what ``deliver`` does:

* ``preliminary`` (default, the behaviour before review existed): the
  results go out at once, marked unverified/preliminary ("Results not
  reviewed by a radiologist"), and the job awaits review
  (``review_state`` "pending");
* ``hold``: the results are re-identified and queued ``held``: the sender
  does not send them until ACCEPT (``review_state`` "pending");
* ``off``: no review is asked for (``review_state`` stays None).

A finished job (``done``) not reviewed yet (pending, or None: a site
without review, or a job from before) can be accepted or rejected once; a
superseded job cannot ("review job N instead").

**ACCEPT** (:func:`accept`): a new version of the TID 1500 volumes SR,
COMPLETE, FINAL and VERIFIED, with the Verifying Observer Sequence (the
reviewer, ``review_organization``, the time), the decision, score and
comment as content items and the earlier SR as predecessor document; and the
PDF report re-issued "Reviewed by ... on ..., score n/5". Held objects are
released, except the unreviewed SR and PDF, which the verified SR and the
re-issued PDF replace (cancelled). Everything goes through the outbox.

**REJECT** (:func:`reject`): a rejection note (IHE IOCM Key Object Selection
titled (113001, DCM, "Rejected for Quality Reasons"), pipelines/dicom_outputs/kos.py)
referencing every object of the job already stored at a destination (outbox
rows ``sent``); objects not sent yet (held or pending) are cancelled; a PDF
without volumes that says the segmentation was rejected and cannot be used,
with the reviewer's reason. With ``dest_orthanc_rest`` the note is also
"sent" to the Orthanc REST markers, which set the metadata
``dest_orthanc_metadata`` on each retracted instance (Orthanc 1.10 ignores
IOCM notes).

**Supersede** (:func:`retract_superseded`, called by ``deliver``): a new job
of a study retracts the objects earlier jobs of the study had delivered with
the same kind of note (113001; see kos.py for why), sent right away, also
when the new results are held for review.

Every retraction is recorded as an audit event (action "retract", the job
whose objects were retracted, the note's SOP Instance UID, the SOP Instance
UIDs retracted), so no object is retracted twice. ACCEPT and REJECT record a
``Review`` row; the caller records who decided in the audit (the review UI,
or service/api/review_api.py: "review_accept" / "review_reject").

PHI zones: the review objects are built from the pseudonymized workspace and
re-identified in memory with the vault, exactly like ``deliver``; only the
re-identified files are written, into the PHI outbox folder. Nothing of the
review (reviewer's words) goes into the workspace or the logs.

Known limit: an object the sender is transmitting at the very moment of a
REJECT (or of a newer job's delivery) is stored but not listed in the note.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pydicom.errors
import pydicom.multival
from sqlalchemy import func, or_, select, update

from brainline.pipelines.dicom_outputs.codes import AlgorithmInfo
from brainline.pipelines.dicom_outputs.kos import REJECTED_FOR_QUALITY, build_rejection_note, evidence_item, person_name
from brainline.pipelines.dicom_outputs.pdf_report import EncapsulatedPDF, ReviewInfo
from brainline.pipelines.dicom_outputs.seg import new_uid
from brainline.pipelines.dicom_outputs.sr import build_verified_sr
from brainline.pipelines.inputs import selected_files
from brainline.pipelines.records import ResultObject, ResultsRecord
from brainline.pipelines.results import read_results, review_pdf_bytes

from ..db import AuditEvent, Job, OutboxItem, OutboxState, Review, ReviewState, State, User, utcnow
from .outbox import MARKER_PREFIX, RETRACTION_KIND
from .reidentify import reidentify_dataset

if TYPE_CHECKING:
    from ..jobs.context import StageContext

log = logging.getLogger("brainline.review")

MODES = ("preliminary", "hold", "off")
HELD = OutboxState.HELD.value
VERIFIED_SR, REVIEWED_PDF, REJECTED_PDF = "verified_sr", "reviewed_pdf", "rejected_pdf"
KOS = RETRACTION_KIND
#: Words for the review objects (outbox kinds).
REVIEW_OBJECT_NAMES = {VERIFIED_SR: "verified SR (TID 1500 volumes)", REVIEWED_PDF: "re-issued PDF report (reviewed)",
                       REJECTED_PDF: "PDF report (segmentation rejected)", KOS: "rejection note (IOCM KOS)"}
SYSTEM_USER = "brainline"
MAX_COMMENT = 4000
#: Held kinds that ACCEPT replaces by the verified SR / re-issued PDF instead of releasing.
REPLACED_ON_ACCEPT = {"sr": VERIFIED_SR, "pdf": REVIEWED_PDF}
_PLACEHOLDER_PDF = b"%PDF-1.4\n%%EOF\n"


class ReviewError(Exception):
    """A review that cannot be done, in words for a person (wrong state,
    already reviewed, unknown job, invalid score). ``status`` is the HTTP
    status the REST API answers with (404 unknown job, 422 invalid input,
    409 wrong state)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# gating
# ---------------------------------------------------------------------------
def review_mode(settings, site: str | None) -> str:
    """The review mode of a site: ``review_mode_by_site[site]`` (exact, then
    ignoring case), else ``review_mode``."""
    by_site = getattr(settings, "review_mode_by_site", None) or {}
    site = (site or "").strip()
    if site and site in by_site:
        return by_site[site]
    folded = {str(k).upper(): v for k, v in by_site.items()}
    if site and site.upper() in folded:
        return folded[site.upper()]
    mode = str(getattr(settings, "review_mode", "") or "preliminary")
    return mode if mode in MODES else "preliminary"


def gating(sctx) -> tuple[str, str]:
    """(review mode, site) of the job of a stage context."""
    sessions = sctx.job_sessions()
    site = ""
    if sessions is not None:
        with sessions() as s:
            site = s.scalar(select(Job.site).where(Job.id == sctx.job_id)) or ""
    return review_mode(sctx.settings, site), site


def mark_pending(sctx) -> str | None:
    """The job awaits review (review_state None -> "pending"; a decision
    already taken stays). Returns the job's review_state."""
    sessions = sctx.job_sessions()
    if sessions is None:
        return None
    with sessions.begin() as s:
        job = s.get(Job, sctx.job_id)
        if job is None:
            return None
        if job.review_state is None:
            job.review_state = ReviewState.PENDING.value
        return job.review_state


# ---------------------------------------------------------------------------
# retraction notes
# ---------------------------------------------------------------------------
@dataclass
class _Sent:
    job_id: int
    kind: str
    sop_instance_uid: str
    path: str


def _sent_rows(session, job_ids: list[int]) -> list[_Sent]:
    """Objects of ``job_ids`` stored at a destination (one per SOP instance;
    retraction notes and Orthanc markings left out)."""
    if not job_ids:
        return []
    rows = session.execute(select(OutboxItem.job_id, OutboxItem.kind, OutboxItem.sop_instance_uid, OutboxItem.path)
                           .where(OutboxItem.job_id.in_(job_ids), OutboxItem.state == OutboxState.SENT.value,
                                  ~OutboxItem.destination.startswith(MARKER_PREFIX),
                                  OutboxItem.kind != KOS)
                           .order_by(OutboxItem.id))
    return list({r.sop_instance_uid: _Sent(r.job_id, r.kind, r.sop_instance_uid, r.path) for r in rows}.values())


def _retractions(session, job_ids: list[int]) -> list[dict]:
    """The audit records of earlier retractions of ``job_ids``' objects."""
    if not job_ids:
        return []
    out = []
    for job_id, detail in session.execute(select(AuditEvent.job_id, AuditEvent.detail).where(
            AuditEvent.action == "retract", AuditEvent.job_id.in_(job_ids))):
        try:
            out.append({"job_id": job_id, **json.loads(detail or "{}")})
        except ValueError:
            continue
    return out


def _evidence(rows: list[_Sent]) -> tuple[list[pydicom.Dataset], list[str]]:
    """Headers of the objects to retract, read from their re-identified files
    in the PHI outbox folder; SOP Instance UIDs whose file is gone (purged)."""
    items, missing = [], []
    for row in rows:
        try:
            items.append(evidence_item(pydicom.dcmread(row.path, stop_before_pixels=True)))
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            missing.append(row.sop_instance_uid)
    return items, missing


def _write(ds: pydicom.Dataset, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".tmp-" + target.name)
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, target)
    return target


def _retract_record(note: pydicom.Dataset, by_job: int, reason: str, uids: list[str]) -> str:
    code = note.ConceptNameCodeSequence[0]
    return json.dumps({"by_job": by_job, "reason": reason, "code": f"{code.CodeValue} {code.CodeMeaning}",
                       "kos_sop_instance_uid": str(note.SOPInstanceUID), "instances": sorted(uids)})


def retract_superseded(sctx, out_dir: Path) -> dict | None:
    """For ``deliver``: a rejection note (113001) retracting the objects that
    earlier jobs of the study delivered and that no note retracted yet,
    queued for every destination (and the Orthanc markers) as a row of this
    job, and recorded. Idempotent (a re-run re-uses the note). None when
    there is nothing to retract."""
    sessions = sctx.job_sessions()
    with sessions() as s:
        earlier = list(s.scalars(select(Job.id).where(Job.study_key == sctx.study_key, Job.id < sctx.job_id)))
        rows = _sent_rows(s, earlier)
        done = {u for r in _retractions(s, earlier) if r.get("by_job") != sctx.job_id for u in r.get("instances", [])}
    rows = [r for r in rows if r.sop_instance_uid not in done]
    target = out_dir / "retraction-superseded.dcm"
    note: pydicom.Dataset
    missing: list[str]
    if target.exists():
        note = pydicom.dcmread(target)
        listed = {str(i.ReferencedSOPInstanceUID) for st in note.CurrentRequestedProcedureEvidenceSequence
                  for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        rows, missing = [r for r in rows if r.sop_instance_uid in listed], []
    else:
        if not rows:
            return None
        evidence, missing = _evidence(rows)
        rows = [r for r in rows if r.sop_instance_uid not in missing]
        if not evidence:
            return {"instances": 0, "not_retracted": missing,
                    "note": "the earlier objects could not be retracted: their files in the outbox folder were purged"}
        jobs = sorted({r.job_id for r in rows})
        note = build_rejection_note(
            evidence, title=REJECTED_FOR_QUALITY,
            description=(f"Superseded: BrainLine processed this study again (job {sctx.job_id}); these results "
                         f"of job{'s' if len(jobs) > 1 else ''} {', '.join(map(str, jobs))} were replaced by "
                         "newer ones and must not be used."),
            algorithm=AlgorithmInfo(), uid_root=sctx.settings.uid_root or None)
        _write(note, target)
    sctx.outbox.enqueue(sctx.job_id, [(KOS, target)], markers=True)
    jobs = sorted({r.job_id for r in rows})
    with sessions.begin() as s:
        recorded = {r["job_id"] for r in _retractions(s, jobs) if r.get("by_job") == sctx.job_id}
        for job_id in jobs:
            if job_id not in recorded:
                s.add(AuditEvent(username=SYSTEM_USER, action="retract", job_id=job_id,
                                 detail=_retract_record(note, sctx.job_id, "superseded",
                                                        [r.sop_instance_uid for r in rows if r.job_id == job_id])))
    code = note.ConceptNameCodeSequence[0]
    result = {"kos_sop_instance_uid": str(note.SOPInstanceUID), "reason": f"{code.CodeValue} {code.CodeMeaning}",
              "jobs": jobs, "instances": len(rows)}
    if missing:
        result["not_retracted"] = missing
    log.info("earlier results retracted", extra={"job_id": sctx.job_id, "retracted_jobs": jobs,
                                                 "instances": len(rows)})
    return result


# ---------------------------------------------------------------------------
# ACCEPT / REJECT
# ---------------------------------------------------------------------------
def _check_input(reviewer: str, score, comment: str | None, score_required: bool,
                 comment_required: bool) -> tuple[str, int | None, str]:
    reviewer = " ".join(str(reviewer or "").split())
    if not reviewer:
        raise ReviewError("the reviewer's name is missing", 422)
    if len(reviewer) > 128:
        raise ReviewError("the reviewer's name is longer than 128 characters", 422)
    if score is None:
        if score_required:
            raise ReviewError("a score from 1 (terrible) to 5 (perfect) is required to accept", 422)
    elif isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        raise ReviewError(f"the score must be a whole number from 1 (terrible) to 5 (perfect), not {score!r}", 422)
    comment = str(comment or "").strip()
    if comment_required and not comment:
        raise ReviewError("a reason is required to reject a segmentation", 422)
    if len(comment) > MAX_COMMENT:
        raise ReviewError(f"the comment is longer than {MAX_COMMENT} characters", 422)
    return reviewer, score, comment


def _why_not_reviewable(session, job: Job | None, job_id: int) -> str | None:
    if job is None:
        return None
    if job.state == State.SUPERSEDED.value:
        newer = session.scalar(select(func.min(Job.id)).where(Job.study_key == job.study_key, Job.id > job.id))
        return (f"job {job_id} was superseded by job {newer}: review job {newer} instead" if newer
                else f"job {job_id} was superseded")
    if job.review_state in (ReviewState.ACCEPTED.value, ReviewState.REJECTED.value):
        last = session.scalars(select(Review).where(Review.job_id == job_id).order_by(Review.id.desc())).first()
        by = f" by {last.reviewer} on {last.created_at:%Y-%m-%d %H:%M} UTC" if last else ""
        return f"job {job_id} was already {job.review_state}{by}"
    if job.state != State.DONE.value:
        return f"job {job_id} is {job.state}: only a finished job with results can be reviewed"
    return None  # pending, or None: a job of a site without review (mode off, or done before) may be reviewed too


def _load_job(ctx, job_id: int) -> Job:
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise ReviewError(f"job {job_id} does not exist", 404)
        why = _why_not_reviewable(s, job, job_id)
        if why:
            raise ReviewError(why)
        return job


@dataclass
class _Identity:
    sctx: StageContext
    study: dict
    patient: dict
    prior_maps: list
    results: ResultsRecord

    def object(self, kind: str) -> ResultObject | None:
        return self.results.object_of(kind)

    def reference_files(self) -> list[Path]:
        from ..compute.stages import pipeline_config

        return selected_files(self.sctx.workspace, pipeline_config(self.sctx.settings).reference)


def _identity(ctx, job: Job) -> _Identity:
    """The job's workspace records and the vault's identity (gateway side)."""
    ws = ctx.runner.workspace(job.id)
    results = read_results(ws)
    if results is None or not (ws / "pseudonymize.json").exists():
        raise ReviewError(f"job {job.id} has no results in its workspace (purged?); the review cannot be delivered")
    sctx = ctx.runner.stage_context(job.id, job.study_key)
    pseudo = json.loads((ws / "pseudonymize.json").read_text())
    study = ctx.vault.get("study", pseudo["pseudo_study_uid"])
    patient = ctx.vault.get("patient", pseudo["pseudo_patient_id"])
    if study is None or patient is None:
        raise ReviewError(f"the vault has no identity for the study of job {job.id} (vault retention?), so the "
                          "reviewed results cannot be delivered into the patient's record")
    from .deliver import prior_uid_maps

    return _Identity(sctx, study, patient, prior_uid_maps(sctx), results)


def _review_pdf(ctx, ident: _Identity, review: ReviewInfo, referenced: list[pydicom.Dataset]) -> pydicom.Dataset | None:
    """The re-issued Encapsulated PDF (re-identified), in the series of the
    original report, next instance number; None when the job has no report."""
    obj = ident.object("pdf")
    if obj is None:
        return None
    original = pydicom.dcmread(ident.sctx.workspace / obj.file, stop_before_pixels=True)
    files = ident.reference_files()
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    title = ("BrainLine brain tumour segmentation report - REJECTED by the reviewer" if review.rejected
             else "BrainLine brain tumour volumetry report - reviewed")
    versions = original.get("SoftwareVersions")
    wrapper = EncapsulatedPDF(
        _PLACEHOLDER_PDF, source[0], series_instance_uid=str(original.SeriesInstanceUID),
        series_number=int(original.get("SeriesNumber", 303) or 303),
        sop_instance_uid=new_uid(ctx.settings.uid_root or None),
        instance_number=int(original.get("InstanceNumber", 1) or 1) + 1,
        manufacturer=str(original.get("Manufacturer", "BrainLine")), document_title=title,
        manufacturer_model_name=str(original.get("ManufacturerModelName", "") or "") or None,
        software_versions=[str(v) for v in versions] if isinstance(versions, pydicom.multival.MultiValue)
        else ([str(versions)] if versions else None),
        device_serial_number=str(original.get("DeviceSerialNumber", "") or "") or None,
        series_description=str(original.get("SeriesDescription", "") or "") or None,
        source_instances=source + referenced, verified=not review.rejected)
    ds = reidentify_dataset(wrapper, ident.study, ident.patient, extra_uid_maps=ident.prior_maps)
    identity = {"patient_id": ident.patient.get("PatientID", ""), "patient_name": ident.patient.get("PatientName", ""),
                "study_date": str(ds.get("StudyDate", "")), "accession_number": ident.study.get("AccessionNumber", ""),
                "study_instance_uid": ident.study["StudyInstanceUID"]}
    pdf = review_pdf_bytes(ident.sctx.workspace, files, identity, review)
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    return ds


def _out_dir(ctx, job_id: int) -> Path:
    return ctx.settings.outbox_dir / f"job-{job_id:06d}"


def _username(session, user_id: int | None, reviewer: str) -> str:
    user = session.get(User, user_id) if user_id else None
    return (user.username if user is not None else reviewer)[:64]


def _claim(session, job_id: int, decision: str) -> None:
    """pending (or none) -> decision, once (a concurrent review loses with ReviewError)."""
    claimed = session.execute(update(Job).where(
        Job.id == job_id, Job.state == State.DONE.value,
        or_(Job.review_state == ReviewState.PENDING.value, Job.review_state.is_(None)))
        .values(review_state=decision)).rowcount
    if not claimed:
        job = session.get(Job, job_id)
        raise ReviewError(_why_not_reviewable(session, job, job_id) or f"job {job_id} cannot be reviewed now")


def _queue(session, ctx, job_id: int, objects: list[tuple[str, Path, pydicom.Dataset]], markers: bool = False) -> int:
    names = list(ctx.outbox.destinations) + (list(ctx.outbox.markers) if markers else [])
    now = utcnow()
    for kind, path, ds in objects:
        for name in names:
            session.add(OutboxItem(job_id=job_id, destination=name, kind=kind, path=str(path),
                                   sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                                   state=OutboxState.PENDING.value, attempts=0, next_attempt_at=now))
    return len(objects) * len(names)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)



def _add_review_pdf(ctx, ident, job_id: int, kind: str, what: str, info: ReviewInfo, referenced: list,
                    objects: list, not_delivered: list) -> None:
    """Build the review's PDF report (``kind``) and append it to ``objects``;
    a failure is logged and recorded in ``not_delivered`` in words (the SR or
    the rejection note carries the decision, the PDF is an extra)."""
    try:
        pdf = _review_pdf(ctx, ident, info, referenced)
    except Exception as exc:
        log.warning("review report not built", exc_info=True, extra={"job_id": job_id, "kind": kind})
        not_delivered.append(f"{what} not built: {type(exc).__name__}")
        return
    if pdf is not None:
        objects.append((kind, _out_dir(ctx, job_id) / f"review-{kind}-{pdf.SOPInstanceUID}.dcm", pdf))


def accept(ctx, job_id: int, reviewer: str, score: int | None, comment: str | None,
           user_id: int | None) -> dict:
    """ACCEPT a job's segmentation: verified SR and re-issued PDF queued for
    every destination, held objects released (the unreviewed SR and PDF
    replaced). Returns what was done; raises ReviewError in words."""
    reviewer, score, comment = _check_input(reviewer, score, comment, score_required=True, comment_required=False)
    assert score is not None  # score_required: _check_input raised ReviewError otherwise
    job = _load_job(ctx, job_id)
    at = utcnow().replace(microsecond=0)
    org = getattr(ctx.settings, "review_organization", "") or ""
    objects: list[tuple[str, Path, pydicom.Dataset]] = []
    not_delivered: list[str] = []
    if ctx.outbox.destinations:
        ident = _identity(ctx, job)
        sr_obj = ident.object("sr")
        if sr_obj is None:
            raise ReviewError(f"job {job_id} has no SR to verify")
        original = pydicom.dcmread(ident.sctx.workspace / sr_obj.file)
        verified = build_verified_sr(original, verifying_observer=person_name(reviewer), organization=org,
                                     verified_at=at, score=score, comment=comment,
                                     uid_root=ctx.settings.uid_root or None)
        seg = ident.object("seg")
        referenced: list[pydicom.Dataset] = [verified] + (
            [pydicom.dcmread(ident.sctx.workspace / seg.file, stop_before_pixels=True)] if seg else [])
        out_ds = reidentify_dataset(verified, ident.study, ident.patient, extra_uid_maps=ident.prior_maps)
        target = _out_dir(ctx, job_id) / f"review-{VERIFIED_SR}-{out_ds.SOPInstanceUID}.dcm"
        objects.append((VERIFIED_SR, target, out_ds))
        # the verified SR carries the decision; the PDF is an extra
        _add_review_pdf(ctx, ident, job_id, REVIEWED_PDF, "re-issued PDF report",
                        ReviewInfo("accepted", reviewer, at, score, comment, org), referenced, objects, not_delivered)
        for _kind, path, ds in objects:
            _write(ds, path)
    built = {kind for kind, _, _ in objects}
    released = replaced = 0
    try:
        with ctx.sessions.begin() as s:
            _claim(s, job_id, ReviewState.ACCEPTED.value)
            review = Review(job_id=job_id, user_id=user_id, reviewer=reviewer, decision=ReviewState.ACCEPTED.value,
                            score=score, comment=comment or None, created_at=at)
            s.add(review)
            for row in s.scalars(select(OutboxItem).where(OutboxItem.job_id == job_id,
                                                          OutboxItem.state == OutboxState.HELD.value)):
                if REPLACED_ON_ACCEPT.get(row.kind) in built:
                    row.state = OutboxState.CANCELLED.value
                    row.last_error = (f"cancelled: replaced by the {REVIEW_OBJECT_NAMES[REPLACED_ON_ACCEPT[row.kind]]} "
                                      "after the review")
                    replaced += 1
                else:
                    row.state, row.next_attempt_at = OutboxState.PENDING.value, utcnow()
                    released += 1
            queued = _queue(s, ctx, job_id, objects)
            s.flush()
            review_id = review.id
    except BaseException:
        _remove([path for _, path, _ in objects])
        raise
    ctx.outbox.wake()
    log.info("review: accepted", extra={"job_id": job_id, "score": score, "queued": queued, "released": released})
    result = {"job_id": job_id, "review_id": review_id, "review_state": ReviewState.ACCEPTED.value, "score": score,
              "reviewed_at": at.isoformat() + "Z", "queued": queued, "released": released,
              "replaced": replaced,
              "objects": [{"kind": k, "sop_instance_uid": str(ds.SOPInstanceUID)} for k, _, ds in objects]}
    if not ctx.outbox.destinations:
        result["note"] = "no destination configured: the review is recorded, nothing was sent"
    if not_delivered:
        result["not_delivered"] = not_delivered
    return result


def reject(ctx, job_id: int, reviewer: str, score: int | None, comment: str | None,
           user_id: int | None) -> dict:
    """REJECT a job's segmentation: its delivered objects retracted with an
    IOCM rejection note (113001), objects not yet sent cancelled, a PDF
    without volumes (the reviewer's reason) queued. Returns what was done;
    raises ReviewError in words."""
    reviewer, score, comment = _check_input(reviewer, score, comment, score_required=False, comment_required=True)
    job = _load_job(ctx, job_id)
    at = utcnow().replace(microsecond=0)
    org = getattr(ctx.settings, "review_organization", "") or ""
    with ctx.sessions() as s:
        sent = _sent_rows(s, [job_id])
        done = {u for r in _retractions(s, [job_id]) for u in r.get("instances", [])}
    sent = [r for r in sent if r.sop_instance_uid not in done]
    objects: list[tuple[str, Path, pydicom.Dataset]] = []
    missing: list[str] = []
    not_delivered: list[str] = []
    note = None
    if ctx.outbox.destinations:
        ident = _identity(ctx, job)
        if sent:
            evidence, missing = _evidence(sent)
            sent = [r for r in sent if r.sop_instance_uid not in missing]
            if evidence:
                note = build_rejection_note(
                    evidence, title=REJECTED_FOR_QUALITY, reviewer=reviewer, organization=org or None,
                    description=f"Segmentation rejected by the reviewer on {at:%Y-%m-%d %H:%M} UTC: {comment}",
                    algorithm=AlgorithmInfo(), uid_root=ctx.settings.uid_root or None)
                objects.append((KOS, _out_dir(ctx, job_id) / f"review-kos-{note.SOPInstanceUID}.dcm", note))
        _add_review_pdf(ctx, ident, job_id, REJECTED_PDF, "PDF report of the rejection",
                        ReviewInfo("rejected", reviewer, at, score, comment, org, len(sent)), [], objects,
                        not_delivered)
        for _kind, path, ds in objects:
            _write(ds, path)
    try:
        with ctx.sessions.begin() as s:
            _claim(s, job_id, ReviewState.REJECTED.value)
            review = Review(job_id=job_id, user_id=user_id, reviewer=reviewer, decision=ReviewState.REJECTED.value,
                            score=score, comment=comment, created_at=at)
            s.add(review)
            username = _username(s, user_id, reviewer)
            if note is not None:
                s.add(AuditEvent(at=at, username=username, action="retract", job_id=job_id,
                                 detail=_retract_record(note, job_id, "rejected", [r.sop_instance_uid for r in sent])))
            cancelled = 0
            for row in s.scalars(select(OutboxItem).where(
                    OutboxItem.job_id == job_id,
                    OutboxItem.state.in_([OutboxState.HELD.value, OutboxState.PENDING.value]))):
                row.state, row.last_error = OutboxState.CANCELLED.value, "cancelled: the segmentation was rejected"
                cancelled += 1
            queued = _queue(s, ctx, job_id, [o for o in objects if o[0] != KOS])
            queued += _queue(s, ctx, job_id, [o for o in objects if o[0] == KOS], markers=True)
            s.flush()
            review_id = review.id
    except BaseException:
        _remove([path for _, path, _ in objects])
        raise
    ctx.outbox.wake()
    log.info("review: rejected", extra={"job_id": job_id, "retracted": len(sent) if note is not None else 0,
                                        "cancelled": cancelled})
    result = {"job_id": job_id, "review_id": review_id, "review_state": ReviewState.REJECTED.value, "score": score,
              "reviewed_at": at.isoformat() + "Z", "queued": queued, "cancelled": cancelled,
              "retracted": len(sent) if note is not None else 0,
              "objects": [{"kind": k, "sop_instance_uid": str(ds.SOPInstanceUID)} for k, _, ds in objects]}
    if note is not None:
        result["kos_sop_instance_uid"] = str(note.SOPInstanceUID)
    if missing:
        result["not_retracted"] = missing
    if not ctx.outbox.destinations:
        result["note"] = "no destination configured: the review is recorded, nothing was sent"
    if not_delivered:
        result["not_delivered"] = not_delivered
    return result


def review_record(ctx, job_id: int) -> dict:
    """The review state of a job, its site and mode, and its reviews (REST)."""
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise ReviewError(f"job {job_id} does not exist", 404)
        reviews = list(s.scalars(select(Review).where(Review.job_id == job_id).order_by(Review.id)))
        return {"job_id": job_id, "state": job.state, "site": job.site or "",
                "review_mode": review_mode(ctx.settings, job.site), "review_state": job.review_state,
                "reviews": [{"id": r.id, "reviewer": r.reviewer, "decision": r.decision, "score": r.score,
                             "comment": r.comment, "created_at": r.created_at.isoformat() + "Z"} for r in reviews]}

