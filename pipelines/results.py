"""Build the DICOM results of a finished pipeline run from its working folder:
DICOM SEG, TID 1500 SR, an overlay series and an Encapsulated PDF report.

Inputs: ``segmentation.nii.gz``, ``summary.json`` (and ``selection.json`` when
present) in the working folder and the DICOM instances of the reference series
(the series whose native grid the segmentation lies on). The objects copy
patient and study attributes from those instances: in the service they are
pseudonymized and the gateway re-identifies the objects; offline
(``brainline process``) they are the originals. Output: ``results/`` with one
file per object and ``results.json``.

Every object is built on its own, so one failing builder costs only its own
object:

* the **overlay series** and the **PDF report** are extras: when one fails,
  the failure is recorded in words in ``results.json`` (``failed``, ``notes``;
  the job store keeps it as the stage result) and as a "Result objects
  completeness" QC finding in the SR (and in the PDF when the overlay failed);
  the other objects are written and delivered as usual;
* the **SEG** and the **SR** are the core result. Each is still built when
  the other fails (the SR then records the missing SEG; nothing is lost for
  inspection), but a SEG or SR failure raises :class:`OutputsError` after
  ``results.json`` is written: the job fails loudly and nothing is delivered,
  because the SR is the object that carries the volumes and every QC finding
  (failures included) into the PACS, and a SEG without it would reach
  readers with no quality information. A re-run rebuilds everything.

An empty segmentation is not a failure: no SEG, and the SR and PDF say so.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import pydicom
import SimpleITK as sitk

from brainline import __version__

from .dicom_outputs.codes import AlgorithmInfo, QCFinding
from .dicom_outputs.overlay import build_overlay_series
from .dicom_outputs.pdf_report import (
    ReportContent,
    build_encapsulated_pdf,
    build_pdf_report,
    key_image_from_series,
)
from .dicom_outputs.seg import EmptySegmentationError, build_seg, read_source_series
from .dicom_outputs.sr import build_rano_sr, build_sr
from .image_pipeline import ROLE_LABELS, PipelineError

log = logging.getLogger("brainline.results")

RESULTS_DIR = "results"
#: Words for each result object, as they appear in messages.
OBJECT_NAMES = {"seg": "DICOM SEG", "sr": "SR (TID 1500 volumes)", "overlay": "overlay series",
                "pdf": "PDF report", "rano": "SR (RANO measurements)"}
#: Objects without which a job has failed.
CORE_OBJECTS = ("seg", "sr")


class OutputsError(PipelineError):
    """The SEG or the SR could not be built; the message names it and why."""


def algorithm_of(summary: dict) -> AlgorithmInfo:
    seg = summary.get("backends", {}).get("segmentation", {}) or {}
    provenance = {k: str(seg[k]) for k in ("licence", "citation", "intended_use", "model_choice") if seg.get(k)}
    return AlgorithmInfo(name="BrainLine", version=__version__,
                         backend=str(seg.get("backend") or "unknown"),
                         model_name=str(seg.get("model_name") or "unknown"),
                         model_version=seg.get("model_version"), parameters=provenance)


def qc_findings_of(summary: dict, failed: list[dict] | None = None) -> list[QCFinding]:
    """QC findings for the SR and the report: one per registered sequence, one
    for skull stripping and one for the model-space registration ('flagged'
    with the reasons when a check fired), one for series selection when inputs
    the model could use were missing, and one for the result objects when some
    were not built (``failed``: the ``results.json`` entries). Every flag in
    ``summary["qc_flags"]`` reaches one of them: flags no stage claims are
    reported as "other checks"."""
    findings = []
    claimed: set[str] = set()
    for role, reg in sorted(summary.get("registration", {}).items()):
        if not reg or reg.get("reference"):
            continue
        flags = reg.get("flags") or []
        claimed.update(f"{ROLE_LABELS.get(role, role)}: {f}" for f in flags)
        findings.append(QCFinding(f"registration {role}", "flagged" if flags else "acceptable",
                                  "; ".join(flags)))
    strip_flags = list((summary.get("skull_strip") or {}).get("flags") or [])
    claimed.update(strip_flags)
    findings.append(QCFinding("skull stripping", "flagged" if strip_flags else "acceptable",
                              "; ".join(strip_flags)))
    space = summary.get("model_space")
    if space:
        space_flags = list(space.get("flags") or [])
        claimed.update(f"model space: {f}" for f in space_flags)
        findings.append(QCFinding("model space registration", "flagged" if space_flags else "acceptable",
                                  "; ".join(space_flags)))
    other = [f for f in summary.get("qc_flags", []) if f not in claimed]
    if other:
        findings.append(QCFinding("other checks", "flagged", "; ".join(other)))
    note = (summary.get("inputs") or {}).get("note")
    if note:
        findings.append(QCFinding("series_selection", "flagged", note))
    if failed:
        findings.append(QCFinding("result_objects", "flagged", "; ".join(f["error"] for f in failed)))
    return findings


def _selection(work: Path) -> dict:
    path = work / "selection.json"
    return json.loads(path.read_text()) if path.exists() else {}


def report_content(work: Path, source, summary: dict, identity: dict,
                   failed: list[dict] | None = None) -> ReportContent:
    """What the PDF shows. ``identity``: patient_id, patient_name, study_date,
    accession_number (pseudonyms on the processing side, originals at the
    gateway); ``failed``: result objects not built (``results.json`` entries)."""
    labels = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    selection = _selection(work)
    sequences = {ROLE_LABELS.get(role, role): info.get("description", "")
                 for role, info in selection.get("roles", {}).items() if isinstance(info, dict)}
    for role in (selection.get("inputs") or {}).get("missing", []):
        sequences[ROLE_LABELS.get(role, role)] = "not found in the study"
    return ReportContent(
        patient_id=identity.get("patient_id", ""),
        patient_name=identity.get("patient_name", ""),
        study_date=identity.get("study_date", ""),
        accession_number=identity.get("accession_number", ""),
        study_instance_uid=identity.get("study_instance_uid", ""),
        sequences=sequences,
        algorithm=algorithm_of(summary),
        volumes_ml=summary.get("volumes_ml", {}),
        tiv_ml=summary.get("tiv_ml"),
        qc_findings=qc_findings_of(summary, failed),
        reviewed=False,
        key_image=key_image_from_series(source, labels),
        notes=["A trained segmentation model should be configured for clinical use."]
        if summary.get("backends", {}).get("segmentation", {}).get("backend") == "baseline" else [],
        generated_at=dt.datetime.now(),
    )


def identity_of(ds: pydicom.Dataset) -> dict:
    return {"patient_id": str(ds.get("PatientID", "")), "patient_name": str(ds.get("PatientName", "")),
            "study_date": str(ds.get("StudyDate", "")), "accession_number": str(ds.get("AccessionNumber", "")),
            "study_instance_uid": str(ds.get("StudyInstanceUID", ""))}


def failure_words(kind: str, exc: BaseException) -> str:
    """``overlay series not built: ValueError: ...`` (one line)."""
    reason = " ".join(str(exc).split()) or "no message"
    return f"{OBJECT_NAMES.get(kind, kind)} not built: {type(exc).__name__}: {reason}"[:1000]


class _Writer:
    """Writes result objects into ``out`` and keeps the record of what was
    built and what failed. :meth:`attempt` runs one builder; its failure is
    recorded, logged and swallowed."""

    def __init__(self, out: Path, subdir: str):
        self.out, self.subdir = out, subdir
        self.objects: list[dict] = []
        self.failed: list[dict] = []

    def attempt(self, kind: str, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except Exception as exc:  # noqa: BLE001 - each object fails on its own, in words
            log.warning("%s", failure_words(kind, exc), exc_info=True)
            self.failed.append({"kind": kind, "error": failure_words(kind, exc)})
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
            self.objects.append({"kind": kind, "file": f"{self.subdir}/{name}",
                                 "sop_instance_uid": str(ds.SOPInstanceUID),
                                 "sop_class_uid": str(ds.SOPClassUID)})
        return [ds for _, ds in items]

    def failures(self, *kinds: str) -> list[dict]:
        return [f for f in self.failed if not kinds or f["kind"] in kinds]


def build_results(work: Path, source_files: list[Path], uid_root: str | None = None,
                  subdir: str = RESULTS_DIR) -> dict:
    """Write SEG, SR, overlay series and PDF report to ``work/<subdir>``, each on its own.

    Returns (and writes to ``results.json``) ``{"objects": [{kind, file,
    sop_instance_uid, sop_class_uid}], "segmented": bool, "failed": [{kind,
    error}], "notes": [sentences], "complete": bool}``. Raises
    :class:`OutputsError` when the SEG or the SR failed (see the module doc).
    Idempotent: a complete record is returned as it is (rebuilding would mint
    new UIDs); an incomplete one (core failure) is rebuilt from scratch.
    """
    out = work / subdir
    record_file = work / "results.json"
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if record.get("complete", True):
            return record
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((work / "summary.json").read_text())
    labels = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    algorithm = algorithm_of(summary)
    source = read_source_series([str(f) for f in source_files], pixels=True)
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
    # The PDF is rendered before the SR so that a rendering failure reaches the
    # SR's QC findings; it is wrapped afterwards to reference the SR.
    pdf_bytes = writer.attempt("pdf", lambda: build_pdf_report(
        report_content(work, source, summary, identity_of(source.first), writer.failures())))
    srs = writer.attempt("sr", lambda: writer.save("sr", [("sr.dcm", build_sr(
        seg, source, summary, qc_findings_of(summary, writer.failures()), algorithm, uid_root=uid_root))]))
    if pdf_bytes is not None:
        writer.attempt("pdf", lambda: writer.save("pdf", [("report.dcm", build_encapsulated_pdf(
            pdf_bytes, source, algorithm=algorithm, uid_root=uid_root,
            referenced_instances=[x for x in (seg, *(srs or ())) if x is not None]))]))

    notes = [f["error"] for f in writer.failed]
    note = (summary.get("inputs") or {}).get("note")
    if note:
        notes.append(note)
    core_failures = writer.failures(*CORE_OBJECTS)
    record = {"objects": writer.objects, "segmented": seg is not None, "failed": writer.failed,
              "notes": notes, "complete": not core_failures}
    tmp = record_file.with_name(".tmp-results.json")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(record_file)
    if core_failures:
        built = ", ".join(sorted({OBJECT_NAMES[o["kind"]] for o in writer.objects})) or "nothing"
        raise OutputsError("; ".join(f["error"] for f in core_failures)
                           + f" (built: {built}; nothing is delivered until SEG and SR are built)")
    return record


def rerender_pdf(pdf_ds: pydicom.Dataset, work: Path, source_files: list[Path], identity: dict) -> pydicom.Dataset:
    """Replace the PDF inside an Encapsulated PDF object with one rendered for
    ``identity`` (used by the gateway after re-identification; UIDs kept). The
    report shows the same QC findings as the one built by :func:`build_results`."""
    summary = json.loads((work / "summary.json").read_text())
    record_file = work / "results.json"
    failed = json.loads(record_file.read_text()).get("failed", []) if record_file.exists() else []
    source = read_source_series([str(f) for f in source_files], pixels=True)
    content = report_content(work, source, summary, identity, [f for f in failed if f["kind"] != "pdf"])
    pdf = build_pdf_report(content)
    if len(pdf) % 2:
        pdf += b"\x00"
    pdf_ds.EncapsulatedDocument = pdf
    if "EncapsulatedDocumentLength" in pdf_ds:
        pdf_ds.EncapsulatedDocumentLength = len(pdf)
    return pdf_ds
