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

Follow-up (``longitudinal.json`` with ``"priors" > 0``, see
pipelines/longitudinal.py): three more extras, each built on its own like the
overlay, all in the current study on the current reference series:

* ``subtraction``: one derived MR series per subtraction map (FLAIR, T1c);
* ``lesion_seg``: a SEG of the new and growing lesions (none when there is none);
* ``change_sr``: a TID 1500 SR of the change against the prior and nadir.

The PDF gets a follow-up section. The subtraction series and the change SR
reference the prior study by its (pseudonymous) UIDs: ``results.json`` lists
them (``prior_studies``, and ``prior_study_uids`` on each such object) so the
gateway can map them with the prior studies' UID maps. With dates shifted by
de-identification, DICOM words name the prior by its interval in days.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
import pydicom.errors
import SimpleITK as sitk

from brainline import __version__

from .dicom_outputs.codes import FOLLOWUP_ASSESSMENT, LESION_KINDS, AlgorithmInfo, QCFinding, qc_concept
from .dicom_outputs.lesion_seg import build_lesion_seg, lesions_on_source_grid
from .dicom_outputs.longitudinal_sr import build_change_sr, prior_evidence
from .dicom_outputs.overlay import build_overlay_series
from .dicom_outputs.pdf_report import (
    FollowUp,
    KeyImage,
    ReportContent,
    build_encapsulated_pdf,
    build_pdf_report,
    key_image_from_series,
)
from .dicom_outputs.seg import (
    EmptySegmentationError, SourceSeries, build_seg, image_on_source_grid, read_source_series,
)
from .dicom_outputs.sr import build_rano_sr, build_sr
from .dicom_outputs.subtraction import build_subtraction_series
from .image_pipeline import ROLE_LABELS, PipelineError
from .qc_steps import ensemble_finding, image_quality_finding, segmentation_finding

log = logging.getLogger("brainline.results")

RESULTS_DIR = "results"
#: Words for each result object, as they appear in messages.
OBJECT_NAMES = {"seg": "DICOM SEG", "sr": "SR (TID 1500 volumes)", "overlay": "overlay series",
                "pdf": "PDF report", "rano": "SR (RANO measurements)",
                "subtraction": "subtraction series", "lesion_seg": "DICOM SEG (new and growing lesions)",
                "change_sr": "SR (TID 1500 follow-up change)"}
#: Objects of a follow-up (built only when longitudinal.json has priors).
LONGITUDINAL_OBJECTS = ("subtraction", "lesion_seg", "change_sr")
LONGITUDINAL_FILE = "longitudinal.json"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
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
    with the reasons when a check fired), "image quality" (MRQy metrics against
    the site and scanner's history: outliers in words, or why no comparison
    was made), "segmentation quality" (plausibility flags and the components)
    and "ensemble agreement" (discord alarms and risk score) when the QC steps
    ran, one for series selection when inputs the model could use were
    missing, and one for the result objects when some were not built
    (``failed``: the ``results.json`` entries). Every flag in
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
    image_qc = summary.get("image_qc")
    if image_qc:
        claimed.update(image_qc.get("flags") or [])
        findings.append(QCFinding("image quality", *image_quality_finding(image_qc)))
    seg_qc = summary.get("segmentation_qc")
    if seg_qc:
        claimed.update(seg_qc.get("flags") or [])
        findings.append(QCFinding("segmentation quality", *segmentation_finding(seg_qc)))
        ensemble = ensemble_finding(seg_qc)
        if ensemble:
            findings.append(QCFinding("ensemble agreement", *ensemble))
    other = [f for f in summary.get("qc_flags", []) if f not in claimed]
    if other:
        findings.append(QCFinding("other checks", "flagged", "; ".join(other)))
    note = (summary.get("inputs") or {}).get("note")
    if note:
        findings.append(QCFinding("series_selection", "flagged", note))
    if failed:
        findings.append(QCFinding("result_objects", "flagged", "; ".join(f["error"] for f in failed)))
    return findings


# ------------------------------------------------------------------ follow-up


def load_longitudinal(work: Path) -> dict | None:
    """``longitudinal.json`` when it reports at least one prior, else None
    (no file, or ``"priors": 0``: no follow-up object at all)."""
    path = work / LONGITUDINAL_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if int(data.get("priors") or 0) > 0 else None


def _prior_dir(work: Path, longitudinal: dict) -> Path:
    return work / "priors" / str((longitudinal.get("comparison") or {}).get("prior_index", 0))


def prior_record(work: Path, longitudinal: dict) -> dict:
    """``priors/<k>/prior.json`` of the compared prior ({} when absent)."""
    path = _prior_dir(work, longitudinal) / "prior.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def prior_study_uid(longitudinal: dict, prior: dict) -> str | None:
    """The compared prior's (pseudonymous) Study Instance UID."""
    return (longitudinal.get("comparison") or {}).get("prior_pseudo_study_uid") or prior.get("pseudo_study_uid") or None


def _date(value: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _current_date(longitudinal: dict, source: SourceSeries) -> str:
    for tp in reversed(longitudinal.get("timepoints") or []):
        if tp.get("label") == "current" and tp.get("study_date"):
            return str(tp["study_date"])
    return str(source.first.get("StudyDate", ""))


def _prior_date(longitudinal: dict, prior: dict) -> str:
    return str((longitudinal.get("comparison") or {}).get("prior_study_date") or prior.get("study_date") or "")


def interval_days(longitudinal: dict, prior: dict, source: SourceSeries) -> int | None:
    """Days from the prior study to this one (both dates as seen in this workspace)."""
    a, b = _date(_prior_date(longitudinal, prior)), _date(_current_date(longitudinal, source))
    return (b - a).days if a and b else None


def dates_shifted(ds: pydicom.Dataset) -> bool:
    """True when de-identification shifted the dates (then words name intervals, not dates)."""
    return str(ds.get("LongitudinalTemporalInformationModified", "")).upper() == "MODIFIED"


def prior_words(longitudinal: dict, prior: dict, source: SourceSeries) -> str:
    """How DICOM words name the prior: "prior 2024-01-15", or "prior 91 days
    earlier" when the workspace dates are shifted (the gateway cannot fix dates in words)."""
    date = _date(_prior_date(longitudinal, prior))
    if date and not dates_shifted(source.first):
        return f"prior {date.isoformat()}"
    days = interval_days(longitudinal, prior, source)
    return f"prior {days} days earlier" if days is not None else "prior study"


def _workspace_dates(longitudinal: dict) -> set[str]:
    comparison = longitudinal.get("comparison") or {}
    dates = {str(tp.get("study_date") or "") for tp in longitudinal.get("timepoints") or []}
    dates |= {str(comparison.get("prior_study_date") or ""),
              str(((longitudinal.get("change") or {}).get("vs_nadir") or {}).get("study_date") or "")}
    return {d for d in dates if _date(d)}


def date_words(longitudinal: dict, source: SourceSeries, shift_days: int | None = None) -> Callable[[str], str]:
    """A function that rewrites the study dates (YYYY-MM-DD) inside follow-up
    words (notes, flags, reasons of longitudinal.json name the prior by its date).

    ``shift_days`` None (DICOM words): unchanged when the workspace dates are
    real; when de-identification shifted them (the gateway cannot fix words),
    each date becomes "[91 days before this study]". ``shift_days`` given (the
    PDF, re-rendered at the gateway): each date moves by that many days."""
    table: dict[str, str] = {}
    current = _date(_current_date(longitudinal, source))
    for value in _workspace_dates(longitudinal):
        d = _date(value)
        if shift_days is not None:
            table[d.isoformat()] = (d + dt.timedelta(days=shift_days)).isoformat()
        elif dates_shifted(source.first) and current is not None:
            days = (current - d).days
            table[d.isoformat()] = "[this study]" if days == 0 else (
                f"[{days} days before this study]" if days > 0 else f"[{-days} days after this study]")
    if not table:
        return lambda text: text
    return lambda text: re.sub(r"\d{4}-\d{2}-\d{2}", lambda m: table.get(m.group(0), m.group(0)), str(text))


def detection_ran(longitudinal: dict) -> bool:
    """Whether subtraction (and so new-lesion detection) was possible."""
    return bool((longitudinal.get("comparison") or {}).get("subtractions"))


def longitudinal_findings(longitudinal: dict | None, words: Callable[[str], str] = str) -> list[QCFinding]:
    """QC findings of a follow-up: registration of the prior ('flagged' with
    the reasons, or with the note when no subtraction was possible) and the
    other follow-up flags; ``words`` rewrites their dates (:func:`date_words`)."""
    if not longitudinal:
        return []
    reg = (longitudinal.get("comparison") or {}).get("registration") or {}
    reg_flags = [str(f) for f in reg.get("flags") or []]
    if not detection_ran(longitudinal):
        reasons = [longitudinal.get("note") or "no subtraction was possible"] + reg_flags
        finding = QCFinding("longitudinal_registration", "flagged", "; ".join(w for w in reasons if w))
    elif reg_flags:
        finding = QCFinding("longitudinal_registration", "flagged", "; ".join(reg_flags))
    else:
        quality = ", ".join(f"{k} {v:.3g}" for k, v in (reg.get("quality") or {}).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)
                            and not any(w in k for w in ("elapsed", "samples", "time")))
        finding = QCFinding("longitudinal_registration", "acceptable",
                            f"{reg.get('transform', 'rigid')} registration of the prior"
                            + (f" ({quality})" if quality else ""))
    other = [str(f) for f in longitudinal.get("flags") or [] if str(f) not in reg_flags]
    findings = [finding] + ([QCFinding("followup", "flagged", "; ".join(other))] if other else [])
    return [QCFinding(f.name, f.status, words(f.detail)) for f in findings]


def _role_header(work: Path, role: str) -> pydicom.Dataset | None:
    """A header of the current study's series of ``role`` (MR acquisition attributes), if any."""
    try:
        files = _selection(work)["files"][role]
        return pydicom.dcmread(work / files[0], stop_before_pixels=True)
    except (KeyError, IndexError, OSError, ValueError, pydicom.errors.InvalidDicomError):
        return None


def prior_objects(work: Path, longitudinal: dict, prior: dict) -> list[pydicom.Dataset]:
    """The compared prior's objects (minimal headers): its BrainLine SEG when
    prior.json names one, and the instances of its reference series when its
    DICOM files are in the prior's work folder."""
    study = prior_study_uid(longitudinal, prior)
    if not study:
        return []
    out = prior_evidence(study, prior.get("seg_series_uid"), SEG_STORAGE, [prior.get("seg_sop_instance_uid")])
    pwork = _prior_dir(work, longitudinal)
    try:
        selection = json.loads((pwork / "selection.json").read_text())
        files = selection["files"][selection["inputs"]["reference"]]
    except (OSError, ValueError, KeyError, TypeError):
        return out
    tags = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
    for f in files:
        try:
            ds = pydicom.dcmread(pwork / f, stop_before_pixels=True, specific_tags=tags)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        if str(ds.get("StudyInstanceUID", "")) == study and "SOPInstanceUID" in ds:
            out.append(ds)
    return out


def _shift(value: str, days: int) -> str:
    d = _date(value)
    return (d + dt.timedelta(days=days)).strftime("%Y%m%d") if d and days else str(value or "")


def _subtraction_key_image(work: Path, source: SourceSeries, longitudinal: dict, caption_prior: str
                           ) -> KeyImage | None:
    """A subtraction slice with the new (magenta) and growing (cyan) lesion
    outlines: the slice with the largest lesion area, else the middle one."""
    subs = (longitudinal.get("comparison") or {}).get("subtractions") or {}
    lesions = longitudinal.get("lesions") or []
    order = [x.get("sequence") for x in sorted(lesions, key=lambda x: -float(x.get("volume_mm3") or 0))]
    role = next((r for r in order + ["flair", "t1c"] + sorted(subs) if r in subs), None)
    if role is None:
        return None
    values = image_on_source_grid(sitk.ReadImage(str(work / subs[role])), source)
    kinds = np.zeros(values.shape, dtype=np.uint8)
    lesion_file = work / "longitudinal" / "lesions.nii.gz"
    if lesions and lesion_file.exists():
        ids = lesions_on_source_grid(sitk.ReadImage(str(lesion_file)), source)
        for x in lesions:
            kinds[ids == int(x["id"])] = 1 if x.get("kind") == "new" else 2
    areas = kinds.reshape(len(kinds), -1).astype(bool).sum(axis=1)
    index = int(np.argmax(areas)) if areas.max(initial=0) > 0 else len(source) // 2
    nz = np.abs(values[values != 0])
    half = float(np.percentile(nz, 99.5)) if nz.size else 1.0
    ds = source.datasets[index]
    return KeyImage(values[index], kinds[index], tuple(float(v) for v in ds.PixelSpacing),
                    (-max(half, 1e-6), max(half, 1e-6)),
                    f"{role.upper() if role == 'flair' else 'T1c'} subtraction (current - {caption_prior}), "
                    f"image {index + 1} of {len(source)}",
                    colours={1: LESION_KINDS["new"].rgb, 2: LESION_KINDS["growing"].rgb},
                    legend={1: "new lesion", 2: "growing lesion"})


def identity_shift(identity: dict, source: SourceSeries) -> int:
    """Days from the workspace dates to the dates of ``identity`` (0 offline or
    on the processing side; the patient's date shift at the gateway)."""
    a, b = _date(identity.get("study_date")), _date(source.first.get("StudyDate"))
    return (a - b).days if a and b else 0


def followup_content(work: Path, source: SourceSeries, longitudinal: dict, identity: dict) -> FollowUp:
    """The PDF follow-up section. Dates are moved by the difference between
    ``identity["study_date"]`` and the source's StudyDate, so the report
    re-rendered at the gateway shows the real dates."""
    shift = identity_shift(identity, source)
    words = date_words(longitudinal, source, shift)
    prior = prior_record(work, longitudinal)
    change = longitudinal.get("change") or {}
    assessment = longitudinal.get("assessment") or {}
    prior_date = _shift(_prior_date(longitudinal, prior), shift)
    notes = [words(n) for n in longitudinal.get("notes") or []]
    try:
        key = _subtraction_key_image(work, source, longitudinal,
                                     f"prior {_date(prior_date).isoformat()}" if _date(prior_date) else "prior")
    except Exception as exc:  # noqa: BLE001 - the picture is optional; say why it is missing
        log.warning("no subtraction key image", exc_info=True)
        key = None
        notes.append(f"No subtraction key image: {type(exc).__name__}: {' '.join(str(exc).split())}")
    return FollowUp(
        timepoints=[{**tp, "study_date": _shift(tp.get("study_date", ""), shift)}
                    for tp in longitudinal.get("timepoints") or []],
        vs_prior=change.get("vs_prior") or {}, vs_nadir=change.get("vs_nadir"),
        assessment=str(assessment.get("code") or "not assessable"), reason=words(assessment.get("reason") or ""),
        prior_date=prior_date, interval_days=interval_days(longitudinal, prior, source),
        lesions=list(longitudinal.get("lesions") or []), detection=detection_ran(longitudinal),
        note=words(longitudinal.get("note") or ""), notes=notes, key_image=key,
        nadir_date=_shift(str((change.get("vs_nadir") or {}).get("study_date") or ""), shift))


def change_texts(longitudinal: dict, words: Callable[[str], str] = str) -> list[tuple[Any, str]]:
    """Words of the change SR's Qualitative Evaluations: the assessment and
    its reason, the follow-up note and notes, why no detection was possible
    (dates rewritten by ``words``, see :func:`date_words`)."""
    assessment = longitudinal.get("assessment") or {}
    followup = qc_concept("followup")
    texts: list[tuple[Any, str]] = [(FOLLOWUP_ASSESSMENT, f"{assessment.get('code') or 'not assessable'}"
                                     + (f": {assessment['reason']}" if assessment.get("reason") else ""))]
    note = str(longitudinal.get("note") or "")
    if not detection_ran(longitudinal):
        texts.append((followup, "No subtraction or new-lesion detection was possible"
                      + (f": {note}" if note else "")))
    elif note:
        texts.append((followup, note))
    texts += [(followup, str(n)) for n in longitudinal.get("notes") or []]
    return [(concept, words(text)) for concept, text in texts]


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
        label = "FLAIR" if role == "flair" else {"t1c": "T1c"}.get(role, role)
        writer.attempt("subtraction", lambda role=role, rel=rel, number=number: writer.save("subtraction", [
            (f"subtraction_{role}_{i:04d}.dcm", ds) for i, ds in enumerate(build_subtraction_series(
                source, sitk.ReadImage(str(work / rel)), role, prior_words=words, prior_study_uid=study,
                brain_mask=mask, role_header=_role_header(work, role), algorithm=algorithm, uid_root=uid_root,
                series_number=number, method_words=method), 1)]), what=f"{label} subtraction series")
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
        [QCFinding("result_objects", "flagged", "; ".join(f["error"] for f in failed))] if failed else [])
    srs = writer.attempt("change_sr", lambda: writer.save("change_sr", [("change_sr.dcm", build_change_sr(
        source, longitudinal, algorithm, lesion_seg=lesion_seg, qc_findings=qc, texts=change_texts(longitudinal, words_of),
        prior_study_uid=study, other_evidence=prior_objects(work, longitudinal, prior),
        interval_days=interval_days(longitudinal, prior, source), detection=detection_ran(longitudinal),
        uid_root=uid_root))]))
    return [x for x in (lesion_seg, *(srs or ())) if x is not None], [study] if study else []


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
    longitudinal = load_longitudinal(work)
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
        qc_findings=qc_findings_of(summary, failed) + (longitudinal_findings(
            longitudinal, date_words(longitudinal, source, identity_shift(identity, source))) if longitudinal else []),
        reviewed=False,
        key_image=key_image_from_series(source, labels),
        notes=["A trained segmentation model should be configured for clinical use."]
        if summary.get("backends", {}).get("segmentation", {}).get("backend") == "baseline" else [],
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
        self.objects: list[dict] = []
        self.failed: list[dict] = []

    def attempt(self, kind: str, build: Callable[[], Any], what: str | None = None) -> Any:
        try:
            return build()
        except Exception as exc:  # noqa: BLE001 - each object fails on its own, in words
            log.warning("%s", failure_words(kind, exc, what), exc_info=True)
            self.failed.append({"kind": kind, "error": failure_words(kind, exc, what)})
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
    """Write SEG, SR, overlay series and PDF report to ``work/<subdir>``, each
    on its own; with a follow-up (``longitudinal.json``, priors > 0) also the
    subtraction series, the lesion SEG and the change SR.

    Returns (and writes to ``results.json``) ``{"objects": [{kind, file,
    sop_instance_uid, sop_class_uid[, prior_study_uids]}], "segmented": bool,
    "failed": [{kind, error}], "notes": [sentences], "complete": bool[,
    "prior_studies": [pseudonymous Study Instance UIDs referenced]]}``. Raises
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
    if prior_uids:  # objects naming the prior study by its pseudonymous UIDs (the gateway maps them)
        for obj in writer.objects:
            if obj["kind"] in ("subtraction", "change_sr"):
                obj["prior_study_uids"] = list(prior_uids)

    notes = [f["error"] for f in writer.failed]
    note = (summary.get("inputs") or {}).get("note")
    if note:
        notes.append(note)
    core_failures = writer.failures(*CORE_OBJECTS)
    record = {"objects": writer.objects, "segmented": seg is not None, "failed": writer.failed,
              "notes": notes, "complete": not core_failures}
    if longitudinal:
        record["prior_studies"] = prior_uids
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


def review_pdf_bytes(work: Path, source_files: list[Path], identity: dict, review) -> bytes:
    """The PDF report re-issued after a radiologist's review
    (``pdf_report.ReviewInfo``), rendered for ``identity`` like
    :func:`rerender_pdf`: ACCEPT adds the reviewer, date, score and comment;
    REJECT leaves out every volume (table, chart, key image with outlines,
    follow-up section) and says that the segmentation cannot be used."""
    summary = json.loads((work / "summary.json").read_text())
    record_file = work / "results.json"
    failed = json.loads(record_file.read_text()).get("failed", []) if record_file.exists() else []
    source = read_source_series([str(f) for f in source_files], pixels=True)
    content = report_content(work, source, summary, identity, [f for f in failed if f["kind"] != "pdf"])
    content.review = review
    content.reviewed, content.reviewed_by = not review.rejected, review.reviewer
    if review.rejected:  # nothing derived from the segmentation: only the findings on inputs and processing
        content.volumes_ml, content.tiv_ml, content.key_image, content.followup = {}, None, None, None
        content.qc_findings = [f for f in qc_findings_of(summary, [f for f in failed if f["kind"] != "pdf"])
                               if f.name.startswith(INPUT_QC_FINDINGS)]
    return build_pdf_report(content)


#: QC findings a report of a rejected segmentation keeps (about the inputs and the processing; the
#: segmentation, ensemble and follow-up findings name volumes of the rejected segmentation).
INPUT_QC_FINDINGS = ("registration", "skull", "model space", "image quality", "series_selection", "result_objects")
