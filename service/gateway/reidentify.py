"""Re-identification of result objects (gateway side).

Objects are built by the processing side on pseudonymized data: they carry
pseudonymous patient attributes and reference pseudonymous UIDs. Before they
leave, every UID found in the study's vault map is swapped back to the
original (so SEG/SR reference the original Study, Series and SOP Instance
UIDs and land in the right study), the patient and study identity is
restored, source-derived dates are shifted back, and the de-identification
markers are removed. UIDs of the new objects themselves are not in the map
and are kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

import pydicom
from pydicom.dataset import Dataset

from brainline.pipelines.dicom_dates import unshift_value

# Dates copied from the (date-shifted) source into new objects.
SOURCE_DATES = ("StudyDate", "AcquisitionDate")
SOURCE_DATETIMES = ("AcquisitionDateTime",)
# Dates describing the new object itself: set to the real creation time.
CREATION_DATES = (("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"),
                  ("InstanceCreationDate", "InstanceCreationTime"))
DEID_MARKERS = ("PatientIdentityRemoved", "DeidentificationMethod",
                "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified")


class ReidentificationError(RuntimeError):
    """The vault has no mapping for the object's study."""


def _swap_uids(ds: Dataset, uid_map: dict[str, str]) -> int:
    swapped = 0
    for elem in ds.iterall():
        if elem.VR != "UI" or elem.value in (None, ""):
            continue
        if elem.VM > 1:
            new = [uid_map.get(str(v), str(v)) for v in elem.value]
            swapped += sum(1 for a, b in zip(new, elem.value) if a != str(b))
            elem.value = new
        elif str(elem.value) in uid_map:
            elem.value = uid_map[str(elem.value)]
            swapped += 1
    return swapped


def study_patient(study: dict | None, patient: dict | None) -> dict | None:
    """The patient attributes a study came with (its vault study record keeps
    them: name, ID, issuer, birth date, sex), else the vault's patient record
    (records written before the study kept them; each new study of the patient
    replaces the patient record, so a name corrected later would otherwise
    appear on an earlier study's results)."""
    return (study or {}).get("patient") or patient


def reidentify_dataset(ds: Dataset, study: dict, patient: dict, now: datetime | None = None,
                       extra_uid_maps: Iterable[dict] = ()) -> Dataset:
    """Return a re-identified copy of ``ds``.

    ``study``: the vault's study record (original StudyInstanceUID,
    AccessionNumber, StudyID, date_shift_days, uid_map pseudo->original);
    ``patient``: the vault's patient record (PatientID, PatientName, ...),
    used when the study record does not hold the patient attributes the study
    came with (records written before it did); the study's win, so results
    carry the name, birth date and sex of their own study even when a later
    study of the patient corrected them.
    ``extra_uid_maps``: UID maps of other studies of the same patient that the
    object references (the prior studies of a longitudinal comparison); the
    object must still belong to ``study``, whose map wins on a conflict.
    Dates copied from a prior keep the (shared) patient date shift.
    """
    if "uid_map" not in study:
        raise ReidentificationError("the vault record of this study has no UID map")
    uid_map: dict[str, str] = {}
    for extra in extra_uid_maps:
        uid_map.update(extra)
    uid_map.update(study["uid_map"])
    out = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(ds)))
    _swap_uids(out, uid_map)
    if out.get("StudyInstanceUID") != study["StudyInstanceUID"]:
        raise ReidentificationError("the object does not belong to the study of this job")
    patient = study_patient(study, patient) or {}
    out.PatientName = patient.get("PatientName", "")
    out.PatientID = patient.get("PatientID", "")
    if patient.get("IssuerOfPatientID"):
        out.IssuerOfPatientID = patient["IssuerOfPatientID"]
    out.PatientBirthDate = patient.get("PatientBirthDate", "")
    out.PatientSex = patient.get("PatientSex", "")
    out.AccessionNumber = study.get("AccessionNumber", "")
    out.StudyID = study.get("StudyID", "")
    shift = int(study.get("date_shift_days", 0))
    for keyword in SOURCE_DATES + SOURCE_DATETIMES:
        elem = out.data_element(keyword) if keyword in out else None
        if elem is not None:
            elem.value = unshift_value(elem.value, elem.VR, shift) or elem.value
    now = now or datetime.now()
    for date_kw, time_kw in CREATION_DATES:
        if date_kw in out:
            setattr(out, date_kw, now.strftime("%Y%m%d"))
            setattr(out, time_kw, now.strftime("%H%M%S"))
    for keyword in DEID_MARKERS:
        if keyword in out:
            delattr(out, keyword)
    return out


def _to_bytes(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


