"""Build the DICOM results of a finished pipeline run from its working folder:
DICOM SEG, TID 1500 SR, an overlay series and an Encapsulated PDF report.

Inputs: ``segmentation.nii.gz``, ``summary.json`` (a :class:`.records.Summary`;
and ``select_series.json`` when present) in the working folder and the DICOM
instances of the reference series (the series whose native grid the
segmentation lies on), read once into a
:class:`.dicom_outputs.source_series.SourceSeries` that every builder gets.
The objects copy patient and study attributes from those instances: in the
service they are pseudonymized and the gateway re-identifies the objects;
offline (``brainline process``) they are the originals. Output: ``results/``
with one file per object and ``build_outputs.json`` (a :class:`.records.ResultsRecord`).

Every object is built on its own, so one failing builder costs only its own
object:

* the **overlay series** and the **PDF report** are extras: when one fails,
  the failure is recorded in words in ``build_outputs.json`` (``failed``, ``notes``;
  the job store keeps it as the stage result) and as a "Result objects
  completeness" QC finding in the SR (and in the PDF when the overlay failed);
  the other objects are written and delivered as usual;
* the **SEG** and the **SR** are the core result. Each is still built when
  the other fails (the SR then records the missing SEG; nothing is lost for
  inspection), but a SEG or SR failure raises :class:`OutputsError` after
  ``build_outputs.json`` is written: the job fails loudly and nothing is delivered,
  because the SR is the object that carries the volumes and every QC finding
  (failures included) into the PACS, and a SEG without it would reach
  readers with no quality information. A re-run rebuilds everything.

An empty segmentation is not a failure: no SEG, and the SR and PDF say so.

Follow-up (``longitudinal.json`` with ``"priors" > 0``): three more extras,
each built on its own like the overlay (subtraction series, lesion SEG,
change SR), and a follow-up section in the PDF; what they say, and how dates
are named, is in :mod:`.followup_results`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pydicom
import SimpleITK as sitk

from brainline import __version__

from .dicom_outputs.codes import AlgorithmInfo, QCFinding
from .dicom_outputs.lesion_seg import build_lesion_seg
from .dicom_outputs.longitudinal_sr import build_change_sr
from .dicom_outputs.overlay import build_overlay_series
from .dicom_outputs.pdf_report import ReportContent, build_encapsulated_pdf, build_pdf_report, key_image_from_series
from .dicom_outputs.seg import EmptySegmentationError, build_seg
from .dicom_outputs.source_series import SourceSeries, read_source_series
from .dicom_outputs.sr import build_rano_sr, build_sr
from .dicom_outputs.subtraction import build_subtraction_series
from .followup_results import (  # noqa: F401 - names kept importable from here
    LONGITUDINAL_FILE,
    LONGITUDINAL_OBJECTS,
    SEG_STORAGE,
    change_texts,
    date_words,
    dates_shifted,
    detection_ran,
    followup_content,
    identity_shift,
    interval_days,
    load_longitudinal,
    longitudinal_findings,
    prior_objects,
    prior_record,
    prior_role_headers,
    prior_study_uid,
    prior_words,
    role_header,
)
from .image_pipeline import PipelineError
from .qc_steps import ensemble_finding, image_quality_finding, segmentation_finding
from .records import (
    RESULTS_FILE,
    SELECTION_FILE,
    SUMMARY_FILE,
    ObjectFailure,
    ResultObject,
    ResultsRecord,
    SeriesSelection,
    Summary,
    existing_file,
    read_record,
    write_record,
)
from .roles import ROLE_LABELS

log = logging.getLogger("brainline.results")

RESULTS_DIR = "results"
#: Words for each result object, as they appear in messages.
OBJECT_NAMES = {"seg": "DICOM SEG", "sr": "SR (TID 1500 volumes)", "overlay": "overlay series",
                "pdf": "PDF report", "rano": "SR (RANO measurements)",
                "subtraction": "subtraction series", "lesion_seg": "DICOM SEG (new and growing lesions)",
                "change_sr": "SR (TID 1500 follow-up change)"}
#: Objects without which a job has failed.
CORE_OBJECTS = ("seg", "sr")


class OutputsError(PipelineError):
    """The SEG or the SR could not be built; the message names it and why."""


def read_summary(work: Path) -> Summary:
    """``work/summary.json`` as a :class:`.records.Summary` (FileNotFoundError
    when the summary stage has not run)."""
    return Summary.from_json(json.loads((work / SUMMARY_FILE).read_text()))


def read_results(work: Path) -> ResultsRecord | None:
    """``work/build_outputs.json`` as a :class:`.records.ResultsRecord`; None when it does not exist."""
    path = existing_file(work / RESULTS_FILE)
    return ResultsRecord.from_json(json.loads(path.read_text())) if path.exists() else None


def algorithm_of(summary: Summary | Mapping[str, Any]) -> AlgorithmInfo:
    """The algorithm that made the results (backend, model, provenance), from the summary."""
    seg = Summary.from_json(summary).backends.segmentation
    provenance = {k: str(getattr(seg, k)) for k in ("licence", "citation", "intended_use", "model_choice")
                  if getattr(seg, k)}
    return AlgorithmInfo(name="BrainLine", version=__version__,
                         backend=str(seg.backend or "unknown"),
                         model_name=str(seg.model_name or "unknown"),
                         model_version=seg.model_version, parameters=provenance)


def _failure_words(failed: Iterable[ObjectFailure | Mapping[str, Any]] | None) -> list[str]:
    return [ObjectFailure.from_json(f).error for f in failed or ()]


def qc_findings_of(summary: Summary | Mapping[str, Any],
                   failed: Iterable[ObjectFailure | Mapping[str, Any]] | None = None) -> list[QCFinding]:
    """QC findings for the SR and the report: one per registered sequence, one
    for skull stripping and one for the model-space registration ('flagged'
    with the reasons when a check fired), "image quality" (MRQy metrics against
    the site and scanner's history: outliers in words, or why no comparison
    was made), "segmentation quality" (plausibility flags and the components)
    and "ensemble agreement" (discord alarms and risk score) when the QC steps
    ran, one for series selection when inputs the model could use were
    missing, and one for the result objects when some were not built
    (``failed``: the ``build_outputs.json`` entries). Every flag in
    ``summary.qc_flags`` reaches one of them (:meth:`.records.Summary.flags_by_check`):
    flags no stage claims are reported as "other checks"."""
    summary = Summary.from_json(summary)
    findings = []
    for name, flags in summary.flags_by_check():
        if name.startswith("registration "):
            role = name[len("registration "):]
            own = list(summary.registration[role].flags)   # the sequence's flags, without its label
            findings.append(QCFinding(name, "flagged" if own else "acceptable", "; ".join(own)))
        elif name == "skull stripping":
            findings.append(QCFinding(name, "flagged" if flags else "acceptable", "; ".join(flags)))
        elif name == "model space registration":
            own = list(summary.model_space.flags)
            findings.append(QCFinding(name, "flagged" if own else "acceptable", "; ".join(own)))
        elif name == "image quality":
            findings.append(QCFinding(name, *image_quality_finding(summary.image_qc)))
        elif name == "segmentation quality":
            findings.append(QCFinding(name, *segmentation_finding(summary.segmentation_qc)))
            ensemble = ensemble_finding(summary.segmentation_qc)
            if ensemble:
                findings.append(QCFinding("ensemble agreement", *ensemble))
        else:  # a stage section added to Summary.flags_by_check without a finding here
            findings.append(QCFinding(name, "flagged" if flags else "acceptable", "; ".join(flags)))
    other = summary.unclaimed_flags()
    if other:
        findings.append(QCFinding("other checks", "flagged", "; ".join(other)))
    note = summary.inputs.note if summary.inputs else None
    if note:
        findings.append(QCFinding("series_selection", "flagged", note))
    errors = _failure_words(failed)
    if errors:
        findings.append(QCFinding("result_objects", "flagged", "; ".join(errors)))
    return findings


def _build_followup(work: Path, source: SourceSeries, longitudinal: dict, algorithm: AlgorithmInfo,
                    writer: "_Writer", uid_root: str | None) -> tuple[list[pydicom.Dataset], list[str]]:
    """Subtraction series, lesion SEG and change SR, each on its own. Returns
    (objects the PDF should reference, prior study UIDs they reference)."""
    prior = prior_record(work, longitudinal)
    study = prior_study_uid(longitudinal, prior)
    words = prior_words(longitudinal, prior, source)
    comparison = longitudinal.get("comparison") or {}
    reg = comparison.get("registration") or {}
    method = ", ".join(w for w in (f"{reg.get('transform')} registration" if reg.get("transform") else "",
                                   f"{comparison.get('intensity_match')} intensity matching"
                                   if comparison.get("intensity_match") else "") if w)
    mask_file = work / "brain_mask.nii.gz"
    mask = sitk.ReadImage(str(mask_file)) if mask_file.exists() else None
    for number, (role, rel) in enumerate(sorted((comparison.get("subtractions") or {}).items()), start=310):
        writer.attempt("subtraction", lambda role=role, rel=rel, number=number: writer.save("subtraction", [
            (f"subtraction_{role}_{i:04d}.dcm", ds) for i, ds in enumerate(build_subtraction_series(
                source, sitk.ReadImage(str(work / rel)), role, prior_words=words, prior_study_uid=study,
                brain_mask=mask, role_header=role_header(work, role, source),
                prior_headers=prior_role_headers(work, longitudinal, role), algorithm=algorithm,
                uid_root=uid_root, series_number=number, method_words=method), 1)]),
            what=f"{ROLE_LABELS.get(role, role)} subtraction series")
    lesion_seg = None
    lesions = longitudinal.get("lesions") or []
    if lesions and detection_ran(longitudinal):
        def lesion_items() -> list[pydicom.Dataset]:
            ds = build_lesion_seg(source, sitk.ReadImage(str(work / "longitudinal" / "lesions.nii.gz")),
                                  lesions, algorithm, uid_root=uid_root)
            return writer.save("lesion_seg", [("lesion_seg.dcm", ds)]) if ds is not None else []
        built = writer.attempt("lesion_seg", lesion_items)
        lesion_seg = built[0] if built else None
    failed = writer.failures(*LONGITUDINAL_OBJECTS)
    words_of = date_words(longitudinal, source)
    qc = longitudinal_findings(longitudinal, words_of) + (
        [QCFinding("result_objects", "flagged", "; ".join(f.error for f in failed))] if failed else [])
    srs = writer.attempt("change_sr", lambda: writer.save("change_sr", [("change_sr.dcm", build_change_sr(
        source, longitudinal, algorithm, lesion_seg=lesion_seg, qc_findings=qc,
        texts=change_texts(longitudinal, words_of), prior_study_uid=study,
        other_evidence=prior_objects(work, longitudinal, prior),
        interval_days=interval_days(longitudinal, prior, source), detection=detection_ran(longitudinal),
        uid_root=uid_root))]))
    return [x for x in (lesion_seg, *(srs or ())) if x is not None], [study] if study else []


def report_content(work: Path, source: SourceSeries, summary: Summary | Mapping[str, Any], identity: dict,
                   failed: Iterable[ObjectFailure | Mapping[str, Any]] | None = None) -> ReportContent:
    """What the PDF shows. ``identity``: patient_id, patient_name, study_date,
    accession_number (pseudonyms on the processing side, originals at the
    gateway); ``failed``: result objects not built (``build_outputs.json`` entries)."""
    summary = Summary.from_json(summary)
    failed = list(failed or ())
    labels = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    selection = read_record(SeriesSelection, work / SELECTION_FILE)
    sequences = {ROLE_LABELS.get(role, role): info.get("description", "")
                 for role, info in selection.roles.items() if isinstance(info, dict)}
    for role in (selection.inputs.missing if selection.inputs else []):
        sequences[ROLE_LABELS.get(role, role)] = "not found in the study"
    longitudinal = load_longitudinal(work)
    return ReportContent(
        patient_id=identity.get("patient_id", ""),
        patient_name=identity.get("patient_name", ""),
        study_date=identity.get("study_date", ""),
        accession_number=identity.get("accession_number", ""),
        study_instance_uid=identity.get("study_instance_uid", ""),
        sequences=sequences,
        algorithm=algorithm_of(summary),
        volumes_ml=summary.volumes_ml,
        tiv_ml=summary.tiv_ml,
        qc_findings=qc_findings_of(summary, failed) + (longitudinal_findings(
            longitudinal, date_words(longitudinal, source, identity_shift(identity, source))) if longitudinal else []),
        reviewed=False,
        key_image=key_image_from_series(source, labels),
        notes=["A trained segmentation model should be configured for clinical use."]
        if summary.backends.segmentation.backend == "baseline" else [],
        generated_at=dt.datetime.now(),
        followup=followup_content(work, source, longitudinal, identity) if longitudinal else None,
    )


def identity_of(ds: pydicom.Dataset) -> dict:
    return {"patient_id": str(ds.get("PatientID", "")), "patient_name": str(ds.get("PatientName", "")),
            "study_date": str(ds.get("StudyDate", "")), "accession_number": str(ds.get("AccessionNumber", "")),
            "study_instance_uid": str(ds.get("StudyInstanceUID", ""))}


def failure_words(kind: str, exc: BaseException, what: str | None = None) -> str:
    """``overlay series not built: ValueError: ...`` (one line); ``what``
    names the object instead of :data:`OBJECT_NAMES` (e.g. "FLAIR subtraction series")."""
    reason = " ".join(str(exc).split()) or "no message"
    return f"{what or OBJECT_NAMES.get(kind, kind)} not built: {type(exc).__name__}: {reason}"[:1000]


class _Writer:
    """Writes result objects into ``out`` and keeps the record of what was
    built and what failed. :meth:`attempt` runs one builder; its failure is
    recorded, logged and swallowed."""

    def __init__(self, out: Path, subdir: str):
        self.out, self.subdir = out, subdir
        self.objects: list[ResultObject] = []
        self.failed: list[ObjectFailure] = []

    def attempt(self, kind: str, build: Callable[[], Any], what: str | None = None) -> Any:
        try:
            return build()
        except Exception as exc:  # noqa: BLE001 - each object fails on its own, in words
            log.warning("%s", failure_words(kind, exc, what), exc_info=True)
            self.failed.append(ObjectFailure(kind=kind, error=failure_words(kind, exc, what)))
            return None

    def save(self, kind: str, items: list[tuple[str, pydicom.Dataset]]) -> list[pydicom.Dataset]:
        """Write (file name, dataset) pairs; all or none (a partial series is removed)."""
        written: list[Path] = []
        try:
            for name, ds in items:
                path = self.out / name
                ds.save_as(path, enforce_file_format=True)
                written.append(path)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        for name, ds in items:
            self.objects.append(ResultObject(kind=kind, file=f"{self.subdir}/{name}",
                                             sop_instance_uid=str(ds.SOPInstanceUID),
                                             sop_class_uid=str(ds.SOPClassUID)))
        return [ds for _, ds in items]

    def failures(self, *kinds: str) -> list[ObjectFailure]:
        return [f for f in self.failed if not kinds or f.kind in kinds]


def build_results(work: Path, source_files: list[Path], uid_root: str | None = None,
                  subdir: str = RESULTS_DIR) -> dict:
    """Write SEG, SR, overlay series and PDF report to ``work/<subdir>``, each
    on its own; with a follow-up (``longitudinal.json``, priors > 0) also the
    subtraction series, the lesion SEG and the change SR. The source series
    is read once (``source_files``, pixel data included: the overlay shows
    every slice) and handed to every builder.

    Returns (and writes to ``build_outputs.json``) the JSON of a
    :class:`.records.ResultsRecord`: ``{"objects": [{kind, file,
    sop_instance_uid, sop_class_uid[, prior_study_uids]}], "segmented": bool,
    "failed": [{kind, error}], "notes": [sentences], "complete": bool[,
    "prior_studies": [pseudonymous Study Instance UIDs referenced]]}``. Raises
    :class:`OutputsError` when the SEG or the SR failed (see the module doc).
    Idempotent: a complete record is returned as it is (rebuilding would mint
    new UIDs); an incomplete one (core failure) is rebuilt from scratch.
    """
    out = work / subdir
    record_file = work / RESULTS_FILE
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if ResultsRecord.from_json(record).complete:
            return record
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = read_summary(work)
    labels = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    algorithm = algorithm_of(summary)
    source = read_source_series(source_files, pixels=True)
    writer = _Writer(out, subdir)

    def seg_items() -> list[pydicom.Dataset]:
        try:
            ds = build_seg(source, labels, algorithm, uid_root=uid_root)
        except EmptySegmentationError:
            return []  # nothing segmented: the SR and report say so
        return writer.save("seg", [("seg.dcm", ds)])

    segs = writer.attempt("seg", seg_items)
    seg = segs[0] if segs else None
    writer.attempt("overlay", lambda: writer.save("overlay", [
        (f"overlay_{i:04d}.dcm", ds) for i, ds in enumerate(
            build_overlay_series(source, labels, algorithm=algorithm, uid_root=uid_root), 1)]))
    # RANO bidimensional measurements: an extra, like the overlay (a failure is
    # recorded and reaches the SR's QC findings); a separate SR because OHIF
    # cannot open one that mixes planar measurements with the volumes.
    if seg is not None:
        writer.attempt("rano", lambda: writer.save("rano", [
            ("rano_sr.dcm", ds) for ds in [build_rano_sr(seg, source, algorithm, uid_root=uid_root)]
            if ds is not None]))
    # Follow-up objects (subtraction series, lesion SEG, change SR): extras,
    # each on its own; built before the PDF and the SR so that their failures
    # reach both.
    longitudinal = load_longitudinal(work)
    followup_refs: list[pydicom.Dataset] = []
    prior_uids: list[str] = []
    if longitudinal:
        built = writer.attempt("change_sr", lambda: _build_followup(
            work, source, longitudinal, algorithm, writer, uid_root), what="follow-up objects")
        if built is not None:
            followup_refs, prior_uids = built
    # The PDF is rendered before the SR so that a rendering failure reaches the
    # SR's QC findings; it is wrapped afterwards to reference the SR.
    pdf_bytes = writer.attempt("pdf", lambda: build_pdf_report(
        report_content(work, source, summary, identity_of(source.first), writer.failures())))
    srs = writer.attempt("sr", lambda: writer.save("sr", [("sr.dcm", build_sr(
        seg, source, summary, qc_findings_of(summary, writer.failures()) + (
            longitudinal_findings(longitudinal, date_words(longitudinal, source)) if longitudinal else []),
        algorithm, uid_root=uid_root))]))
    if pdf_bytes is not None:
        writer.attempt("pdf", lambda: writer.save("pdf", [("report.dcm", build_encapsulated_pdf(
            pdf_bytes, source, algorithm=algorithm, uid_root=uid_root,
            referenced_instances=[x for x in (seg, *(srs or ()), *followup_refs) if x is not None]))]))
    objects = writer.objects
    if prior_uids:  # objects naming the prior study by its pseudonymous UIDs (the gateway maps them)
        objects = [o.replace(prior_study_uids=list(prior_uids)) if o.kind in ("subtraction", "change_sr") else o
                   for o in objects]

    notes = [f.error for f in writer.failed]
    if summary.inputs and summary.inputs.note:
        notes.append(summary.inputs.note)
    core_failures = writer.failures(*CORE_OBJECTS)
    record = ResultsRecord(objects=objects, segmented=seg is not None, failed=list(writer.failed), notes=notes,
                           complete=not core_failures, prior_studies=list(prior_uids) if longitudinal else None)
    write_record(record_file, record)
    if core_failures:
        built = ", ".join(sorted({OBJECT_NAMES[o.kind] for o in objects})) or "nothing"
        raise OutputsError("; ".join(f.error for f in core_failures)
                           + f" (built: {built}; nothing is delivered until SEG and SR are built)")
    return record.to_json()


def _report_for(work: Path, source_files: list[Path], identity: dict) -> tuple[ReportContent, Summary, list]:
    """The report content rendered for ``identity`` with the QC findings of
    the one :func:`build_results` wrote (every failure but the PDF's own).
    The source series is read as headers; the key image reads its one slice."""
    summary = read_summary(work)
    results = read_results(work)
    failed = results.failures(excluding=("pdf",)) if results else []
    source = read_source_series(source_files)
    return report_content(work, source, summary, identity, failed), summary, failed


def rerender_pdf(pdf_ds: pydicom.Dataset, work: Path, source_files: list[Path], identity: dict) -> pydicom.Dataset:
    """Replace the PDF inside an Encapsulated PDF object with one rendered for
    ``identity`` (used by the gateway after re-identification; UIDs kept). The
    report shows the same QC findings as the one built by :func:`build_results`."""
    content, _, _ = _report_for(work, source_files, identity)
    pdf = build_pdf_report(content)
    if len(pdf) % 2:
        pdf += b"\x00"
    pdf_ds.EncapsulatedDocument = pdf
    if "EncapsulatedDocumentLength" in pdf_ds:
        pdf_ds.EncapsulatedDocumentLength = len(pdf)
    return pdf_ds


def review_pdf_bytes(work: Path, source_files: list[Path], identity: dict, review) -> bytes:
    """The PDF report re-issued after a radiologist's review
    (``pdf_report.ReviewInfo``), rendered for ``identity`` like
    :func:`rerender_pdf`: ACCEPT adds the reviewer, date, score and comment;
    REJECT leaves out every volume (table, chart, key image with outlines,
    follow-up section) and says that the segmentation cannot be used."""
    content, summary, failed = _report_for(work, source_files, identity)
    content.review = review
    content.reviewed, content.reviewed_by = not review.rejected, review.reviewer
    if review.rejected:  # nothing derived from the segmentation: only the findings on inputs and processing
        content.volumes_ml, content.tiv_ml, content.key_image, content.followup = {}, None, None, None
        content.qc_findings = [f for f in qc_findings_of(summary, failed) if f.name.startswith(INPUT_QC_FINDINGS)]
    return build_pdf_report(content)


#: QC findings a report of a rejected segmentation keeps (about the inputs and the processing; the
#: segmentation, ensemble and follow-up findings name volumes of the rejected segmentation).
INPUT_QC_FINDINGS = ("registration", "skull", "model space", "image quality", "series_selection", "result_objects")
