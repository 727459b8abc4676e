"""The sequence roles of a study and how messages and reports spell them.

Role keys (``t1``, ``t1c``, ``t2``, ``flair``) are what select_series.json, the
workspace file names (``nifti/<role>.nii.gz``) and the stage records use;
:data:`ROLE_LABELS` is the one conventional spelling for words ("T1c
series 5", "FLAIR: misregistration ...", "Registration quality (T1c)").
"""

from __future__ import annotations

__all__ = ["ROLE_LABELS", "role_label"]

#: Conventional spelling of the standard roles in messages and reports.
ROLE_LABELS: dict[str, str] = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}


def role_label(role: str) -> str:
    """"T1c" for ``t1c``; an unknown role as it is."""
    return ROLE_LABELS.get(role, role)
