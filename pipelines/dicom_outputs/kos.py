"""IHE IOCM rejection notes: Key Object Selection Documents that retract
BrainLine result objects already stored at a PACS.

IHE Radiology "Imaging Object Change Management" (IOCM) retracts instances
with a Key Object Selection Document (KOS, TID 2010) whose Document Title is
one of the rejection codes of CID 7011, which references every rejected
instance (one IMAGE or COMPOSITE content item each) and lists them, per
series, in the Current Requested Procedure Evidence Sequence. The note lives
in the same study as the instances it rejects. A receiving image manager
that implements IOCM hides (or deletes) the referenced instances.

BrainLine writes two kinds of notes, both titled
(113001, DCM, "Rejected for Quality Reasons"):

* a radiologist REJECTs a segmentation: every delivered object of the job
  (SEG, SRs, overlay series, PDF, follow-up objects); the observer is the
  reviewer (a person) and the Key Object Description carries the reason;
* a study is processed again (late instances, re-send, retry, new version):
  the new job's delivery retracts the earlier job's objects; the observer is
  the BrainLine device. 113001 fits: the earlier results were computed from
  a different (usually incomplete) version of the study and are replaced by
  better ones, which is a quality reason. 113037 "Rejected for Patient
  Safety Reasons" is meant for instances that must never be seen (wrong
  patient, wrong side; IOCM receivers may delete them at once), and 113038
  "Incorrect Modality Worklist Entry" / 113039 "Data Retention Policy
  Expired" do not describe a replaced result. The description says that the
  objects were superseded and by which newer run.

Built with highdicom (``highdicom.ko.KeyObjectSelectionDocument``) from the
headers of the objects to retract; patient and study attributes come from the
first of them, so a note built from re-identified objects is re-identified.
Pure processing: no network, no database.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from .codes import AlgorithmInfo
from .seg import new_uid

__all__ = ["REJECTED_FOR_QUALITY", "REJECTED_FOR_PATIENT_SAFETY", "REJECTION_TITLES", "build_rejection_note",
           "retracted_instances", "evidence_item", "person_name"]

#: CID 7011 rejection titles (IHE IOCM).
REJECTED_FOR_QUALITY = Code("113001", "DCM", "Rejected for Quality Reasons")
REJECTED_FOR_PATIENT_SAFETY = Code("113037", "DCM", "Rejected for Patient Safety Reasons")
REJECTION_TITLES = {c.value: c for c in (REJECTED_FOR_QUALITY, REJECTED_FOR_PATIENT_SAFETY)}

#: Header attributes an evidence item keeps: patient, study and the identity of the instance.
_KEEP = ("SpecificCharacterSet", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
         "StudyID", "AccessionNumber", "StudyDescription", "SeriesInstanceUID", "SOPInstanceUID",
         "SOPClassUID", "Rows", "Columns")
_REQUIRED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
             "StudyDate", "StudyTime")


def evidence_item(header: Dataset) -> Dataset:
    """The part of an object's header a note needs: patient module (group
    0x0010), study, series and SOP identity, and Rows/Columns (an image is
    referenced by an IMAGE item, anything else by a COMPOSITE item)."""
    item = Dataset()
    for elem in header:
        if elem.tag.group == 0x0010 or elem.keyword in _KEEP:
            item.add(elem)
    for keyword in _REQUIRED:  # Type 2 attributes the note copies from its first reference
        if keyword not in item:
            setattr(item, keyword, "")
    return item


def person_name(display_name: str) -> str:
    """A display name ("Dr. Ada Lovelace") as a DICOM PN ("Lovelace^Ada^^Dr.");
    a name that already has carets is kept. At most 64 characters."""
    text = " ".join(str(display_name).replace("\\", " ").split())
    if "^" in text:
        return text[:64]
    words = text.split(" ")
    prefix = []
    while len(words) > 1 and words[0].rstrip(".").lower() in ("dr", "prof", "mr", "mrs", "ms", "pd", "priv-doz"):
        prefix.append(words.pop(0))
    family, given = words[-1], " ".join(words[:-1])
    name = "^".join([family, given, "", " ".join(prefix)]).rstrip("^")
    return (name if "^" in name else name + "^")[:64]


def build_rejection_note(
    retracted: Sequence[Dataset],
    *,
    title: Code = REJECTED_FOR_QUALITY,
    description: str | None = None,
    reviewer: str | None = None,
    organization: str | None = None,
    algorithm: AlgorithmInfo | None = None,
    uid_root: str | None = None,
    series_number: int = 320,
    instance_number: int = 1,
    manufacturer: str = "BrainLine",
    series_description: str = "BrainLine rejection note (IOCM)",
) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection Document rejecting ``retracted`` (headers of
    the objects, e.g. :func:`evidence_item` of each; all of one study).

    ``reviewer`` (a display name or PN): the person who rejected them
    (observer context, Person); without it the BrainLine device is the
    observer. ``description``: Key Object Description (the reason in words).
    """
    if not retracted:
        raise ValueError("a rejection note needs at least one object to reject")
    studies = {str(ds.StudyInstanceUID) for ds in retracted}
    if len(studies) != 1:
        raise ValueError("a rejection note rejects objects of one study only")
    if title.value not in REJECTION_TITLES:
        raise ValueError(f"{title.value} is not an IOCM rejection title (CID 7011)")
    algorithm = algorithm or AlgorithmInfo()
    person = device = None
    if reviewer:
        person = hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=person_name(reviewer), organization_name=organization or None))
    else:
        device = hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=algorithm.device_uid, name=algorithm.name, manufacturer_name=manufacturer,
                serial_number=algorithm.device_serial_number))
    unique = list({str(ds.SOPInstanceUID): ds for ds in retracted}.values())
    content = hd.ko.KeyObjectSelection(
        document_title=title, referenced_objects=unique, observer_person_context=person,
        observer_device_context=device,
        description=" ".join(str(description).split())[:10240] if description else None)
    return hd.ko.KeyObjectSelectionDocument(
        evidence=unique, content=content, series_instance_uid=new_uid(uid_root), series_number=series_number,
        sop_instance_uid=new_uid(uid_root), instance_number=instance_number, manufacturer=manufacturer,
        series_description=series_description, manufacturer_model_name=algorithm.name,
        software_versions=list(algorithm.software_versions[:1]),
        device_serial_number=algorithm.device_serial_number)


def retracted_instances(note: Dataset) -> dict[str, set[str]]:
    """Series Instance UID -> SOP Instance UIDs a note lists as evidence."""
    out: dict[str, set[str]] = {}
    for study in note.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            out.setdefault(str(series.SeriesInstanceUID), set()).update(
                str(i.ReferencedSOPInstanceUID) for i in series.get("ReferencedSOPSequence", []))
    return out
