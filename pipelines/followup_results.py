"""What the follow-up result objects say, from ``longitudinal.json``.

A follow-up (``longitudinal.json`` with ``"priors" > 0``, see
pipelines/longitudinal.py) adds three objects to the results of a job, each
built on its own by :func:`.results.build_results`, all in the current study
on the current reference series:

* ``subtraction``: one derived MR series per subtraction map (FLAIR, T1c);
* ``lesion_seg``: a SEG of the new and growing lesions (none when there is none);
* ``change_sr``: a TID 1500 SR of the change against the prior and nadir.

This module holds what they and the PDF's follow-up section say: the compared
prior (``priors/<k>/prior.json``) and its objects, the interval between the
studies, the QC findings of the comparison and the words of the change SR.

Dates: the subtraction series and the change SR reference the prior study by
its (pseudonymous) UIDs; ``results.json`` lists them (``prior_studies``, and
``prior_study_uids`` on each such object) so the gateway can map them with the
prior studies' UID maps. When de-identification shifted the dates, DICOM words
name the prior by its interval in days (the gateway cannot fix dates inside
words); the PDF, re-rendered at the gateway, moves each date by the patient's
shift (:mod:`.dicom_dates`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
import pydicom.errors
import SimpleITK as sitk

from .dicom_dates import parse_da, shift_da
from .dicom_outputs.charset import declare_usable_character_set
from .dicom_outputs.codes import FOLLOWUP_ASSESSMENT, LESION_KINDS, QCFinding, qc_concept
from .dicom_outputs.lesion_seg import lesions_on_source_grid
from .dicom_outputs.longitudinal_sr import change_measure_words, change_vs_prior, lesion_volumes, prior_evidence
from .dicom_outputs.pdf_report import FollowUp, KeyImage
from .dicom_outputs.seg import image_on_source_grid
from .dicom_outputs.source_series import LOSSY_ATTRIBUTES, SourceSeries
from .records import SELECTION_FILE, SeriesSelection, read_record

__all__ = [
    "LONGITUDINAL_OBJECTS", "LONGITUDINAL_FILE", "SEG_STORAGE", "load_longitudinal", "prior_record",
    "prior_study_uid", "interval_days", "dates_shifted", "prior_words", "date_words", "detection_ran",
    "longitudinal_findings", "role_header", "prior_objects", "identity_shift", "followup_content", "change_texts",
]

log = logging.getLogger("brainline.results")

#: Objects of a follow-up (built only when longitudinal.json has priors).
LONGITUDINAL_OBJECTS = ("subtraction", "lesion_seg", "change_sr")
LONGITUDINAL_FILE = "longitudinal.json"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


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
    """The date of a DA value (or of the date part of a DT value); None when it is not one."""
    return parse_da(str(value or "")[:8])


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


def role_header(work: Path, role: str, source: SourceSeries) -> pydicom.Dataset | None:
    """A header of the current study's series of ``role`` (MR acquisition
    attributes), if any: the source series' own when ``role`` is its series
    (nothing is read again), else the first instance of the role's series."""
    try:
        files = read_record(SeriesSelection, work / SELECTION_FILE).files_of(role, work)
        if {p.resolve() for p in files} & {p.resolve() for p in source.paths[:1]}:
            return source.first
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        declare_usable_character_set(header)
        return header
    except (KeyError, IndexError, OSError, ValueError, pydicom.errors.InvalidDicomError):
        return None


def prior_role_headers(work: Path, longitudinal: dict, role: str) -> list[pydicom.Dataset]:
    """Headers (file meta and the lossy compression attributes) of the compared prior's
    series of ``role``, when its DICOM files are in the prior's work folder;
    [] when they are not (a prior given as NIfTI)."""
    pwork = _prior_dir(work, longitudinal)
    try:
        files = read_record(SeriesSelection, pwork / SELECTION_FILE).files_of(role, pwork)
    except KeyError:
        return []
    out = []
    for path in files:
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(LOSSY_ATTRIBUTES)))
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
    return out


def prior_objects(work: Path, longitudinal: dict, prior: dict) -> list[pydicom.Dataset]:
    """The compared prior's objects (minimal headers): its BrainLine SEG when
    prior.json names one, and the instances of its reference series when its
    DICOM files are in the prior's work folder."""
    study = prior_study_uid(longitudinal, prior)
    if not study:
        return []
    out = prior_evidence(study, prior.get("seg_series_uid"), SEG_STORAGE, [prior.get("seg_sop_instance_uid")])
    pwork = _prior_dir(work, longitudinal)
    selection = read_record(SeriesSelection, pwork / SELECTION_FILE)
    files = selection.files.get(selection.reference or "") or []
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
    """A workspace date (DA) moved by ``days`` for the PDF; as it is when it is not a date."""
    text = str(value or "")
    return (shift_da(text[:8], days) or text) if days else text


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
    # the change against the prior as the assessment measures it (the registered pair where there is one),
    # new lesions by their partial-volume integral (longitudinal_sr.change_vs_prior / lesion_volumes)
    vs_prior, _ = change_vs_prior(change)
    lesions = []
    for lesion in longitudinal.get("lesions") or []:
        volume, growth = lesion_volumes(lesion)
        lesions.append({**lesion, "volume_mm3": volume, "growth_mm3": growth})
    return FollowUp(
        timepoints=[{**tp, "study_date": _shift(tp.get("study_date", ""), shift)}
                    for tp in longitudinal.get("timepoints") or []],
        vs_prior=vs_prior, vs_nadir=change.get("vs_nadir"), measure=change_measure_words(change),
        assessment=str(assessment.get("code") or "not assessable"), reason=words(assessment.get("reason") or ""),
        prior_date=prior_date, interval_days=interval_days(longitudinal, prior, source),
        lesions=lesions, detection=detection_ran(longitudinal),
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
