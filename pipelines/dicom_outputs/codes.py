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

* QC concept codes are unique per check: fixed codes for the known checks,
  ``QC-REG-<ROLE>`` "Registration quality (<role>)" per registered sequence,
  and for any other name a code made from the whole name (hashed when it is
  longer than a Code Value), never a truncation shared by two checks.
* RANO-style bidimensional measurements: (103339001, SCT, "Long Axis") and
  (103340004, SCT, "Short Axis") in (mm, UCUM, "millimeter"), method
  (C114879, NCIt, "RANO") from CID 6147.
* Algorithm family (CID 7162) by backend type: trained models (onnx,
  monai_bundle) (123110, DCM, "Artificial Intelligence"); the classical
  baseline (123108, DCM, "Multispectral Processing").
* Device Serial Number of the installation: :func:`default_device_serial`.

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

from ..roles import ROLE_LABELS

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
    "ALGORITHM_FAMILY", "AI_FAMILY", "MULTISPECTRAL_FAMILY", "BACKEND_FAMILIES", "algorithm_family",
    "LONG_AXIS", "SHORT_AXIS", "UNIT_MM", "RANO_METHOD", "OHIF_BIDIRECTIONAL",
    "default_device_serial", "PDF_CONCEPT_NAME", "QUALITATIVE_EVALUATIONS", "DERIVATION_SEGMENTATION",
    "PURPOSE_SOURCE_IMAGE", "label_concept", "qc_concept", "qc_value",
    "private_coding_scheme",
    # longitudinal follow-up (issue 11)
    "LESION", "NEW_FINDING", "INCREASE_IN_SIZE", "LESION_KINDS", "LesionKind", "lesion_kind",
    "DERIVATION_SUBTRACTION", "UNIT_MM3", "UNIT_PERCENT", "UNIT_DAY", "UNIT_COUNT", "CERTAINTY_OF_FINDING",
    "VOLUME_PRIOR", "VOLUME_NADIR", "VOLUME_CHANGE_PRIOR", "VOLUME_CHANGE_NADIR", "PERCENT_CHANGE_PRIOR",
    "PERCENT_CHANGE_NADIR", "INTERVAL_SINCE_PRIOR", "NUMBER_NEW_LESIONS", "NUMBER_GROWING_LESIONS",
    "FOLLOWUP_ASSESSMENT", "ASSESSMENTS", "assessment_code", "LESION_CHANGE", "PRIOR_STUDY_COMPARED",
    "LOBES", "LATERALITY", "MIDLINE", "lesion_site",
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

#: Bidimensional (RANO) measurement: long and short axis (CID 7470) in mm. The
#: meanings are spelled "Long Axis"/"Short Axis" as dcmjs writes them, because
#: OHIF's Bidirectional adapter finds the two NUM items by code meaning.
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
SHORT_AXIS = Code("103340004", "SCT", "Short Axis")
UNIT_MM = Code("mm", "UCUM", "millimeter")
#: Measurement method of the bidimensional groups (CID 6147 "Response Criteria").
RANO_METHOD = Code("C114879", "NCIt", "RANO")
#: Tracking identifier prefix that OHIF (cornerstone3D adapters) rehydrates as a
#: Bidirectional tool; a readable suffix follows it.
OHIF_BIDIRECTIONAL = "Cornerstone3DTools@^0.1.0:Bidirectional"

#: TID 1500 procedure reported (CID 100) and document title (CID 7021).
PROCEDURE_REPORTED = Code("126020", "DCM", "Multiparametric MRI")
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
#: CID 7162 "Surface Processing Algorithm Families": trained models (AI) and
#: the classical baseline (robust z-scores of FLAIR/T2/T1/T1c combined, 2-means
#: clustering in that multichannel feature space, morphology).
AI_FAMILY = Code("123110", "DCM", "Artificial Intelligence")
MULTISPECTRAL_FAMILY = Code("123108", "DCM", "Multispectral Processing")
#: Default algorithm family of each segmentation backend type, used when the
#: backend does not declare its own (``algorithm_family`` class attribute).
BACKEND_FAMILIES: Mapping[str, Code] = MappingProxyType({
    "baseline": MULTISPECTRAL_FAMILY,
    "monai_bundle": AI_FAMILY,
    "onnx": AI_FAMILY,
})
#: Family of backends that are neither declared nor known (a trained model is the norm).
ALGORITHM_FAMILY = AI_FAMILY
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
    "followup": QCConcept("followup", _private("QC-FOLLOWUP", "Follow-up comparison")),
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


_QC_ALIASES = {"skull_stripping": "skull_strip_quality", "registration": "registration_quality",
               "segmentation": "segmentation_quality", "ensemble": "ensemble_agreement"}
_CODE_VALUE_MAX = 16  # Code Value is SH


def _qc_key(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())


def _unique_value(prefix: str, key: str) -> str:
    """``prefix + KEY`` when it fits in a Code Value, else a shortened form with a
    hash of the full key, so that two names never share a code."""
    import hashlib
    text = "".join(c for c in key.upper() if c.isalnum() or c in "_-")
    value = prefix + text
    if len(value) <= _CODE_VALUE_MAX:
        return value
    digest = hashlib.sha256(key.encode()).hexdigest()[:4].upper()
    return f"{prefix}{text[:_CODE_VALUE_MAX - len(prefix) - 5]}-{digest}"


def qc_concept(name: str) -> Code:
    """Concept name of a QC check.

    Known checks (:data:`QC_CHECKS`, and aliases such as "skull stripping") have
    fixed codes; "registration <role>" gets one code per sequence
    (``QC-REG-T1C`` "Registration quality (T1c)"); any other name gets a
    private code made from the whole name (hashed when longer than a Code Value
    allows), so distinct checks never share a code.
    """
    key = _qc_key(name)
    key = _QC_ALIASES.get(key, key)
    if key in QC_CHECKS:
        return QC_CHECKS[key].concept
    if key.startswith("registration_"):
        role = key[len("registration_"):]
        return _private(_unique_value("QC-REG-", role),
                        f"Registration quality ({ROLE_LABELS.get(role, role.replace('_', ' '))})"[:64])
    return _private(_unique_value("QC-", key), name.replace("_", " ").strip().capitalize()[:64])


def qc_value(status: str) -> Code:
    try:
        return QC_VALUES[status.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown QC status {status!r}; expected one of {sorted(QC_VALUES)}") from None


# ---------------------------------------------------------------- shared records


def algorithm_family(backend: str) -> Code:
    """CID 7162 family of a segmentation backend type (:data:`BACKEND_FAMILIES`;
    Artificial Intelligence for a type not listed). A backend that knows better
    passes its own code as :attr:`AlgorithmInfo.family`."""
    return BACKEND_FAMILIES.get(str(backend), ALGORITHM_FAMILY)


def default_device_serial(env: Mapping[str, str] | None = None) -> str:
    """Device Serial Number of this BrainLine installation (SR device observer,
    General Equipment). In order:

    1. ``BRAINLINE_DEVICE_SERIAL`` (the site's asset tag or registration number);
    2. ``BL-`` + 10 hex digits of a hash of ``BRAINLINE_UID_ROOT``, the site's
       registered UID root, which is stable for the lifetime of an installation;
    3. ``BL-`` + 10 hex digits of a hash of the host name
       (stable only as long as the host keeps its name: set 1 or 2 in production).
    """
    import hashlib
    import os
    import socket
    env = os.environ if env is None else env
    explicit = str(env.get("BRAINLINE_DEVICE_SERIAL", "")).strip()
    if explicit:
        return explicit[:64]
    basis = str(env.get("BRAINLINE_UID_ROOT", "")).strip()
    basis = f"uid-root:{basis}" if basis else f"host:{socket.gethostname()}"
    return "BL-" + hashlib.sha256(basis.encode()).hexdigest()[:10].upper()


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
    device_serial_number: str = field(default_factory=lambda: default_device_serial())
    #: CID 7162 algorithm family; None = by backend type (:func:`algorithm_family`).
    family: Code | None = None

    @property
    def algorithm_family(self) -> Code:
        return self.family if self.family is not None else algorithm_family(self.backend)

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
        """Stable UID of this BrainLine installation: ``2.25.`` + 128 bits of a hash
        of the name and serial number (same installation, same UID)."""
        import hashlib
        digest = hashlib.sha256("\x00".join(["BrainLine device", self.name, self.device_serial_number]).encode())
        return f"2.25.{int(digest.hexdigest()[:32], 16)}"

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


# ------------------------------------------------------- longitudinal follow-up
#
# Change against earlier studies (pipelines/longitudinal.py, issue 11):
#
# * new / growing lesions are SEG segments and SR findings of type (52988006,
#   SCT, "Lesion"), category Morphologically abnormal structure, with the kind
#   as a segmented property type modifier / SR qualitative evaluation:
#   (129721008, SCT, "New finding") or (15454001, SCT, "Increase in size");
# * subtraction images: derivation (113062, DCM, "Pixel by pixel subtraction"), CID 7203;
# * volumes at earlier timepoints, volume changes (mL or mm3) and percent
#   changes, the interval since the prior and the follow-up assessment have no
#   standard concept: private codes, spelled out in their meanings;
# * lesion location: lobe (SCT, CID 6210-like) with laterality Left/Right
#   (CID 244) or the topographical modifier Midline;
# * lesion confidence: (111012, DCM, "Certainty of Finding") in percent.

LESION = Code("52988006", "SCT", "Lesion")
NEW_FINDING = Code("129721008", "SCT", "New finding")
INCREASE_IN_SIZE = Code("15454001", "SCT", "Increase in size")
DERIVATION_SUBTRACTION = Code("113062", "DCM", "Pixel by pixel subtraction")
UNIT_MM3 = Code("mm3", "UCUM", "cubic millimeter")
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_DAY = Code("d", "UCUM", "day")
UNIT_COUNT = Code("1", "UCUM", "no units")
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")

VOLUME_PRIOR = _private("VOL-PRIOR", "Volume at prior study")
VOLUME_NADIR = _private("VOL-NADIR", "Volume at nadir study")
VOLUME_CHANGE_PRIOR = _private("DVOL-PRIOR", "Volume change since prior study")
VOLUME_CHANGE_NADIR = _private("DVOL-NADIR", "Volume change since nadir study")
PERCENT_CHANGE_PRIOR = _private("PVOL-PRIOR", "Percent volume change since prior study")
PERCENT_CHANGE_NADIR = _private("PVOL-NADIR", "Percent volume change since nadir study")
INTERVAL_SINCE_PRIOR = _private("INTERVAL-PRIOR", "Interval since prior study")
NUMBER_NEW_LESIONS = _private("N-NEW-LESIONS", "Number of new lesions")
NUMBER_GROWING_LESIONS = _private("N-GROW-LESIONS", "Number of growing lesions")
LESION_CHANGE = _private("LESION-CHANGE", "Lesion change since prior study")
PRIOR_STUDY_COMPARED = _private("PRIOR-STUDY", "Prior study compared")
FOLLOWUP_ASSESSMENT = _private("FU-ASSESSMENT", "Follow-up volumetric assessment")

#: Assessment words of longitudinal.json -> coded value of FOLLOWUP_ASSESSMENT.
ASSESSMENTS: Mapping[str, Code] = MappingProxyType({
    "progression suspected": _private("FU-PROGRESSION", "Progression suspected"),
    "stable": _private("FU-STABLE", "Stable"),
    "borderline": _private("FU-BORDERLINE", "Borderline growth, below the progression threshold"),
    "decrease": _private("FU-DECREASE", "Decrease"),
    "not assessable": _private("FU-NA", "Not assessable"),
})


def assessment_code(words: str) -> Code:
    """Coded follow-up assessment of the words in longitudinal.json ("stable", ...)."""
    try:
        return ASSESSMENTS[" ".join(str(words).lower().split())]
    except KeyError:
        raise ValueError(f"unknown follow-up assessment {words!r}; expected one of {sorted(ASSESSMENTS)}") from None


@dataclass(frozen=True)
class LesionKind:
    """A kind of lesion of the follow-up (new or growing): SEG segment and SR finding."""

    key: str                  # "new" | "growing" (longitudinal.json)
    segment_label: str        # prefix of the SEG Segment Label
    modifier: Code            # segmented property type modifier / SR lesion change value
    rgb: tuple[int, int, int]

    @property
    def cielab(self) -> hd.color.CIELabColor:
        return hd.color.CIELabColor.from_rgb(*self.rgb)


LESION_KINDS: Mapping[str, LesionKind] = MappingProxyType({
    "new": LesionKind("new", "New lesion", NEW_FINDING, (255, 0, 255)),
    "growing": LesionKind("growing", "Growing lesion", INCREASE_IN_SIZE, (0, 200, 255)),
})


def lesion_kind(key: str) -> LesionKind:
    try:
        return LESION_KINDS[str(key)]
    except KeyError:
        raise ValueError(f"unknown lesion kind {key!r}; expected one of {sorted(LESION_KINDS)}") from None


#: Lobe words of longitudinal.json -> anatomic location (SCT).
LOBES: Mapping[str, Code] = MappingProxyType({
    "frontal": Code("83251001", "SCT", "Frontal lobe"),
    "parietal": Code("16630005", "SCT", "Parietal lobe"),
    "temporal": Code("78277001", "SCT", "Temporal lobe"),
    "occipital": Code("31065004", "SCT", "Occipital lobe"),
    "insula/deep": _private("INSULA-DEEP", "Insula or deep grey and white matter"),
    "cerebellum/brainstem": _private("INFRATENTORIAL", "Cerebellum or brainstem"),
    "unknown": BRAIN,
})
#: Hemisphere words -> laterality (CID 244); "midline" is a topographical modifier.
LATERALITY: Mapping[str, Code] = MappingProxyType({
    "left": Code("7771000", "SCT", "Left"),
    "right": Code("24028007", "SCT", "Right"),
})
MIDLINE = Code("261129000", "SCT", "Midline")


def lesion_site(lobe: str, hemisphere: str) -> hd.sr.FindingSite:
    """SR finding site of a lesion from its lobe and hemisphere words."""
    location = LOBES.get(str(lobe), BRAIN)
    side = LATERALITY.get(str(hemisphere))
    if side is not None:
        return hd.sr.FindingSite(location, laterality=side)
    if str(hemisphere) == "midline":
        return hd.sr.FindingSite(location, topographical_modifier=MIDLINE)
    return hd.sr.FindingSite(location)
