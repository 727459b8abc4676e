"""Build the DICOM results of a finished pipeline run from its working folder:
DICOM SEG, TID 1500 SR, an overlay series and an Encapsulated PDF report.

Inputs: ``segmentation.nii.gz`` and ``summary.json`` in the working folder and
the DICOM instances of the reference series (the series whose native grid the
segmentation lies on). The objects copy patient and study attributes from
those instances: in the service they are pseudonymized and the gateway
re-identifies the objects; offline (``brainline process``) they are the
originals. Output: ``results/`` with one file per object and ``results.json``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom
import SimpleITK as sitk

from brainline import __version__

from .dicom_outputs.codes import AlgorithmInfo, QCFinding
from .dicom_outputs.pdf_report import (
    ReportContent,
    build_encapsulated_pdf,
    build_pdf_report,
    key_image_from_series,
)
from .dicom_outputs.overlay import build_overlay_series
from .dicom_outputs.seg import EmptySegmentationError, build_seg, read_source_series
from .dicom_outputs.sr import build_sr

RESULTS_DIR = "results"


def algorithm_of(summary: dict) -> AlgorithmInfo:
    seg = summary.get("backends", {}).get("segmentation", {}) or {}
    return AlgorithmInfo(name="BrainLine", version=__version__,
                         backend=str(seg.get("backend") or "unknown"),
                         model_name=str(seg.get("model_name") or "unknown"),
                         model_version=seg.get("model_version"))


def qc_findings_of(summary: dict) -> list[QCFinding]:
    """QC findings for the SR and the report: one per registered sequence and
    one for skull stripping, 'flagged' with the reason when a check fired."""
    findings = []
    for role, reg in sorted(summary.get("registration", {}).items()):
        if not reg or reg.get("reference"):
            continue
        flags = reg.get("flags") or []
        findings.append(QCFinding(f"registration {role}", "flagged" if flags else "acceptable",
                                  "; ".join(flags)))
    strip_flags = [f for f in summary.get("qc_flags", []) if f.lower().startswith("skull")]
    findings.append(QCFinding("skull stripping", "flagged" if strip_flags else "acceptable",
                              "; ".join(strip_flags)))
    return findings


def report_content(work: Path, source, summary: dict, identity: dict) -> ReportContent:
    """What the PDF shows. ``identity``: patient_id, patient_name, study_date,
    accession_number (pseudonyms on the processing side, originals at the gateway)."""
    labels = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    selection = json.loads((work / "selection.json").read_text()) if (work / "selection.json").exists() else {}
    sequences = {role: info.get("description", "") for role, info in selection.get("roles", {}).items()
                 if isinstance(info, dict)}
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
        qc_findings=qc_findings_of(summary),
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


def build_results(work: Path, source_files: list[Path], uid_root: str | None = None,
                  subdir: str = RESULTS_DIR) -> dict:
    """Write SEG, SR, overlay series and PDF report to ``work/<subdir>``.
    Idempotent: returns the recorded result when ``results.json`` exists
    (rebuilding would mint new UIDs)."""
    out = work / subdir
    record_file = work / "results.json"
    if record_file.exists():
        return json.loads(record_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((work / "summary.json").read_text())
    labels = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    algorithm = algorithm_of(summary)
    source = read_source_series([str(f) for f in source_files], pixels=True)
    files: list[dict] = []

    def save(kind: str, ds, name: str) -> None:
        path = out / name
        ds.save_as(path, enforce_file_format=True)
        files.append({"kind": kind, "file": f"{subdir}/{name}",
                      "sop_instance_uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.SOPClassUID)})

    try:
        seg = build_seg(source, labels, algorithm, uid_root=uid_root)
        save("seg", seg, "seg.dcm")
    except EmptySegmentationError:
        seg = None  # nothing segmented: the SR and report still say so
    sr = build_sr(seg, source, summary, qc_findings_of(summary), algorithm, uid_root=uid_root)
    save("sr", sr, "sr.dcm")
    for i, ds in enumerate(build_overlay_series(source, labels, algorithm=algorithm, uid_root=uid_root), 1):
        save("overlay", ds, f"overlay_{i:04d}.dcm")
    content = report_content(work, source, summary, identity_of(source.first))
    pdf = build_encapsulated_pdf(build_pdf_report(content), source, algorithm=algorithm, uid_root=uid_root,
                                 referenced_instances=[x for x in (seg, sr) if x is not None])
    save("pdf", pdf, "report.dcm")
    record = {"objects": files, "segmented": seg is not None}
    tmp = record_file.with_name(".tmp-results.json")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(record_file)
    return record


def rerender_pdf(pdf_ds: pydicom.Dataset, work: Path, source_files: list[Path], identity: dict) -> pydicom.Dataset:
    """Replace the PDF inside an Encapsulated PDF object with one rendered for
    ``identity`` (used by the gateway after re-identification; UIDs kept)."""
    summary = json.loads((work / "summary.json").read_text())
    source = read_source_series([str(f) for f in source_files], pixels=True)
    content = report_content(work, source, summary, identity)
    pdf = build_pdf_report(content)
    if len(pdf) % 2:
        pdf += b"\x00"
    pdf_ds.EncapsulatedDocument = pdf
    if "EncapsulatedDocumentLength" in pdf_ds:
        pdf_ds.EncapsulatedDocumentLength = len(pdf)
    return pdf_ds
