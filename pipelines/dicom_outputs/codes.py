"""The one table of coded concepts used by every BrainLine DICOM output.

SEG segment descriptions, SR measurement groups, the overlay colours and the
PDF report all read their names, codes and colours from here, so that a label
means the same thing in every object.

Labels follow BraTS 2023: 1 = necrotic / non-enhancing tumour core (NCR/NET),
2 = peritumoral edema (ED), 3 = enhancing tumour (ET).

Coding choices (all from DICOM PS3.16 context groups where one exists):

* Segmented property category for every tumour label: (49755003, SCT,
  "Morphologically abnormal structure"), CID 7150.
* Segmented property types from CID 7168 "Brain Lesion Segmentation Type With
  Necrosis" / CID 7169 "... Without Necrosis":
  necrosis (6574001, SCT, "Necrosis"), edema (79654002, SCT, "Edema"),
  enhancing tumour (C113842, NCIt, "Enhancing Lesion"). The non-enhancing
  lesion concept of the same group, (C81175, NCIt, "Non-Enhancing Lesion"), is
  kept as :data:`NON_ENHANCING_LESION` for models that report it separately.
* Anatomic region of every segment: (12738006, SCT, "Brain").
* Tumour core (1+3) and whole tumour (1+2+3) are reported in the SR as
  (108369006, SCT, "Neoplasm") findings; which composite is meant is coded
  with a BrainLine-private method code (see below) and spelled out in the
  tracking identifier.
* Volumes: (118565006, SCT, "Volume") in (ml, UCUM, "milliliter").
* Total intracranial volume: Volume with finding site (1101003, SCT,
  "Intracranial") on an (91723000, SCT, "Anatomical structure") finding.
* QC findings are qualitative evaluations: a concept name per check and a
  value from (111237 / 111236 / 111235, DCM, "Usable - Meets the quality control
  standard" / "Usable - Does not meet the quality control standard" /
  "Unusable - Quality renders image unusable") or (261665006, SCT, "Unknown").
  Their details in words (why a check was flagged, which inputs were missing,
  which result object could not be built) are TEXT items, named by the check,
  in the report's (C0034375, UMLS, "Qualitative Evaluations") container.

Concepts without a standard code use the private coding scheme
``99BRAINLINE`` (PS3.16 section 8: designators starting with "99" are
private); it is declared in the SR's Coding Scheme Identification Sequence
(:func:`private_coding_scheme`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import highdicom as hd
from pydicom.sr.coding import Code

try:
    from brainline import __version__ as _BRAINLINE_VERSION
except ImportError:  # pipelines imported outside the brainline package
    _BRAINLINE_VERSION = "0.0.0"

__all__ = [
    "AlgorithmInfo", "QCFinding", "LabelConcept", "CompositeConcept", "QCConcept",
    "PRIVATE_SCHEME", "LABELS", "COMPOSITES", "QC_CHECKS", "QC_VALUES",
    "CATEGORY_ABNORMAL", "CATEGORY_ANATOMY", "BRAIN", "INTRACRANIAL", "NEOPLASM",
    "NECROSIS", "EDEMA", "ENHANCING_LESION", "NON_ENHANCING_LESION",
    "VOLUME", "UNIT_ML", "TIV", "PROCEDURE_REPORTED", "REPORT_TITLE",
    "ALGORITHM_FAMILY", "PDF_CONCEPT_NAME", "QUALITATIVE_EVALUATIONS", "DERIVATION_SEGMENTATION",
    "PURPOSE_SOURCE_IMAGE", "label_concept", "qc_concept", "qc_value",
    "private_coding_scheme",
]

#: Private coding scheme for concepts with no standard code.
PRIVATE_SCHEME = "99BRAINLINE"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


def private_coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """Coding Scheme Identification item that declares :data:`PRIVATE_SCHEME`."""
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="BrainLine private concepts",
        responsible_organization="BrainLine",
    )


# ------------------------------------------------------------------ base concepts

CATEGORY_ABNORMAL = Code("49755003", "SCT", "Morphologically abnormal structure")
CATEGORY_ANATOMY = Code("91723000", "SCT", "Anatomical structure")
BRAIN = Code("12738006", "SCT", "Brain")
INTRACRANIAL = Code("1101003", "SCT", "Intracranial")
NEOPLASM = Code("108369006", "SCT", "Neoplasm")
NECROSIS = Code("6574001", "SCT", "Necrosis")
EDEMA = Code("79654002", "SCT", "Edema")
ENHANCING_LESION = Code("C113842", "NCIt", "Enhancing Lesion")
NON_ENHANCING_LESION = Code("C81175", "NCIt", "Non-Enhancing Lesion")

#: Measurement concept and unit of every volume.
VOLUME = Code("118565006", "SCT", "Volume")
UNIT_ML = Code("ml", "UCUM", "milliliter")

#: TID 1500 procedure reported (CID 100) and document title (CID 7021).
PROCEDURE_REPORTED = Code("126020", "DCM", "Multiparametric MRI")
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
#: CID 7162 algorithm family.
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")
#: TID 1500 row "Qualitative Evaluations" container: QC findings in words (TEXT items).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: Encapsulated PDF concept name (CID 7000 "Diagnostic Imaging Report Document Titles").
PDF_CONCEPT_NAME = Code("18748-4", "LN", "Diagnostic Imaging Report")
#: Overlay images: derivation (CID 7203) and purpose of the source reference (CID 7202).
DERIVATION_SEGMENTATION = Code("113076", "DCM", "Segmentation")
PURPOSE_SOURCE_IMAGE = Code("121322", "DCM", "Source image for image processing operation")


# ------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelConcept:
    """One BraTS label: SEG segment description, SR finding and display colour."""

    value: int
    key: str                      # short name, also the SEG tracking identifier suffix
    segment_label: str            # SEG Segment Label (LO, <= 64 chars)
    description: str              # words for the PDF report
    category: Code
    property_type: Code
    rgb: tuple[int, int, int]     # outline / recommended display colour (sRGB)

    @property
    def cielab(self) -> hd.color.CIELabColor:
        """Recommended Display CIELab Value of the SEG segment."""
        return hd.color.CIELabColor.from_rgb(*self.rgb)


LABELS: Mapping[int, LabelConcept] = MappingProxyType({
    1: LabelConcept(1, "NCR", "Necrotic and non-enhancing tumor core",
                    "necrotic / non-enhancing tumour core (NCR/NET)",
                    CATEGORY_ABNORMAL, NECROSIS, (255, 40, 40)),
    2: LabelConcept(2, "ED", "Peritumoral edema", "peritumoral edema (ED)",
                    CATEGORY_ABNORMAL, EDEMA, (40, 220, 40)),
    3: LabelConcept(3, "ET", "Enhancing tumor", "enhancing tumour (ET)",
                    CATEGORY_ABNORMAL, ENHANCING_LESION, (255, 220, 0)),
})


def label_concept(value: int) -> LabelConcept:
    try:
        return LABELS[int(value)]
    except KeyError:
        raise ValueError(f"label {value} is not a BraTS 2023 label (expected one of {sorted(LABELS)})") from None


@dataclass(frozen=True)
class CompositeConcept:
    """A region made of several labels, reported in the SR only (no SEG segment)."""

    key: str                      # key in summary["volumes_ml"]
    name: str
    labels: tuple[int, ...]
    finding_type: Code
    method: Code                  # private code naming the composite


COMPOSITES: Mapping[str, CompositeConcept] = MappingProxyType({
    "tumor_core": CompositeConcept(
        "tumor_core", "Tumor core", (1, 3), NEOPLASM,
        _private("BRATS-TC", "BraTS tumor core (necrosis + enhancing tumor)")),
    "whole_tumor": CompositeConcept(
        "whole_tumor", "Whole tumor", (1, 2, 3), NEOPLASM,
        _private("BRATS-WT", "BraTS whole tumor (necrosis + edema + enhancing tumor)")),
})

#: Total intracranial volume: measurement method code (the concept is VOLUME).
TIV = _private("TIV", "Total intracranial volume")


# ----------------------------------------------------------------------------- QC


@dataclass(frozen=True)
class QCConcept:
    key: str
    concept: Code


QC_CHECKS: Mapping[str, QCConcept] = MappingProxyType({
    "image_quality": QCConcept("image_quality", Code("111101", "DCM", "Image Quality")),
    "series_selection": QCConcept("series_selection", _private("QC-SERIES", "Series selection quality")),
    "registration_quality": QCConcept("registration_quality", _private("QC-REG", "Registration quality")),
    "skull_strip_quality": QCConcept("skull_strip_quality", _private("QC-SKULL", "Skull stripping quality")),
    "segmentation_quality": QCConcept("segmentation_quality", _private("QC-SEG", "Segmentation quality")),
    "ensemble_agreement": QCConcept("ensemble_agreement", _private("QC-ENS", "Segmentation ensemble agreement")),
    "result_objects": QCConcept("result_objects", _private("QC-OUTPUTS", "Result objects completeness")),
    "longitudinal_registration": QCConcept(
        "longitudinal_registration", _private("QC-LONG", "Prior study registration quality")),
})

_ACCEPTABLE = Code("111237", "DCM", "Usable - Meets the quality control standard")
_FLAGGED = Code("111236", "DCM", "Usable - Does not meet the quality control standard")
_FAILED = Code("111235", "DCM", "Unusable - Quality renders image unusable")
_UNKNOWN = Code("261665006", "SCT", "Unknown")

#: QC status word -> coded value.
QC_VALUES: Mapping[str, Code] = MappingProxyType({
    "acceptable": _ACCEPTABLE, "pass": _ACCEPTABLE, "ok": _ACCEPTABLE,
    "flagged": _FLAGGED, "warning": _FLAGGED, "warn": _FLAGGED,
    "failed": _FAILED, "fail": _FAILED, "unusable": _FAILED,
    "unknown": _UNKNOWN, "not_assessed": _UNKNOWN,
})


def qc_concept(name: str) -> Code:
    """Concept name of a QC check; unknown checks get a private code made from the name."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in QC_CHECKS:
        return QC_CHECKS[key].concept
    value = "QC-" + "".join(c for c in key.upper() if c.isalnum() or c == "_")[:13]
    return _private(value, name.replace("_", " ").strip().capitalize()[:64])


def qc_value(status: str) -> Code:
    try:
        return QC_VALUES[status.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown QC status {status!r}; expected one of {sorted(QC_VALUES)}") from None


# ---------------------------------------------------------------- shared records


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced the results; written into every object.

    ``name`` is the application (BrainLine), ``version`` its version,
    ``backend``/``model_name``/``model_version`` the segmentation model.
    """

    name: str = "BrainLine"
    version: str = _BRAINLINE_VERSION
    backend: str = "unknown"
    model_name: str = "unknown"
    model_version: str | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    device_serial_number: str = "1"

    @property
    def model_label(self) -> str:
        """``backend/model_name[ model_version]`` (the device model name in the SR)."""
        text = f"{self.backend}/{self.model_name}"
        return f"{text} {self.model_version}" if self.model_version else text

    @property
    def software_versions(self) -> list[str]:
        """Values of SoftwareVersions (0018,1020): application then model."""
        return [f"{self.name} {self.version}"[:64], self.model_label[:64]]

    @property
    def device_uid(self) -> str:
        """Stable UID of this BrainLine installation (derived from name and serial)."""
        from pydicom.uid import generate_uid
        return str(generate_uid(prefix=None, entropy_srcs=["BrainLine device", self.name, self.device_serial_number]))

    def algorithm_parameters(self) -> dict[str, str]:
        params = {"backend": self.backend, "model": self.model_name}
        if self.model_version:
            params["model_version"] = self.model_version
        params.update({str(k): str(v) for k, v in self.parameters.items()})
        return params


@dataclass(frozen=True)
class QCFinding:
    """One quality-control result: check name (see :data:`QC_CHECKS`), status word
    (see :data:`QC_VALUES`) and optional detail text (PDF table, and a TEXT
    item of the SR's Qualitative Evaluations container)."""

    name: str
    status: str
    detail: str = ""

    @property
    def concept(self) -> Code:
        return qc_concept(self.name)

    @property
    def value(self) -> Code:
        return qc_value(self.status)

    @property
    def flagged(self) -> bool:
        return self.value != _ACCEPTABLE
