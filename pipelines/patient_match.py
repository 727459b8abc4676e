"""Whether two patient records name different patients.

A record is a dict with the DICOM keywords PatientID, IssuerOfPatientID and
PatientBirthDate (the vault's patient and study records use these keys). Used
wherever BrainLine takes one study as an earlier study of another's patient:
``brainline process --prior`` (pipelines/process.py) and the prior search of
the service, within BrainLine and at the PACS (service/gateway/priors.py).
"""

from __future__ import annotations

__all__ = ["PATIENT_KEYS", "another_patient"]

PATIENT_KEYS = ("PatientID", "IssuerOfPatientID", "PatientBirthDate")


def another_patient(ours: dict, theirs: dict) -> bool:
    """True when ``ours`` and ``theirs`` name different patients: a value of
    :data:`PATIENT_KEYS` that differs where both records have one."""
    return any(ours.get(k) and theirs.get(k) and ours[k] != theirs[k] for k in PATIENT_KEYS)
