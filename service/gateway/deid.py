"""DICOM de-identification engine (PS3.15 Annex E, pure: no database, no network).

The gateway pseudonymizes every instance before a worker sees it
(README, "Pseudonymization and the vault (PHI zones)").  The rules live in ``config/deid_profile.yaml``
(Basic Application Level Confidentiality Profile with the Retain
Longitudinal Temporal Information with Modified Dates, Clean Descriptors and
Retain Patient Characteristics options); this module only applies them.

The profile is an **allowlist**: an attribute is kept only when the profile
names it with an action other than X (keep, clean, dummy, empty or remap).
Everything else is removed, at every nesting level (the items of a kept
sequence are processed with the same allowlist): unknown public tags,
private tags, overlays (60xx), curves and audio (50xx), and every non-image
payload (encapsulated documents such as a referral PDF, SR content, waveforms,
icon images, graphic and text annotations).  Those payloads can never be
allowed: a profile that tries is refused when it is loaded.  An attribute
whose VR is not the one the DICOM dictionary gives its tag is removed too.

Instances with BurnedInAnnotation = YES are handled by policy
(``burned_in_annotation``): ``reject`` raises :class:`BurnedInAnnotation`
before anything is de-identified, so the caller can quarantine that instance;
``flag`` de-identifies it (pixels untouched) and returns a flag in words.

Typical use::

    profile = DeidProfile.load()
    ctx = DeidContext(
        pseudo_patient_id="BL-3F9A...", pseudo_patient_name="BL-3F9A...",
        date_shift_days=-1234, uid_map=vault.uid_for,
        identifying_strings=identifying_strings_of(first_instance),
    )
    result = deidentify(ds, profile, ctx, burned_in_annotation=settings.burned_in_annotation)
    result.dataset   # the de-identified copy
    result.flags     # e.g. the burned-in annotation flag, in words, for the job record

Errors are raised as :class:`DeidError` (``BurnedInAnnotation`` is one),
whose messages name tags, keywords and VRs but never a value of the dataset.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import pydicom
import yaml
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from brainline.pipelines.dicom_dates import shift_da, shift_dt

__all__ = [
    "BURNED_IN_POLICIES",
    "BurnedInAnnotation",
    "DeidContext",
    "DeidError",
    "DeidProfile",
    "DeidResult",
    "MethodCode",
    "NON_IMAGE_PAYLOADS",
    "deidentify",
    "identifying_strings_of",
    "pseudonymize_dataset",
]

ACTIONS = frozenset("DZXKCU")
TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
DATE_VRS = frozenset({"DA", "DT"})
WELL_KNOWN_UID_ROOT = "1.2.840.10008."
DEFAULT_PROFILE_RESOURCE = "deid_profile.yaml"
MAX_LO_LENGTH = 64
BURNED_IN_POLICIES = ("reject", "flag")

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
SOP_INSTANCE_UID = 0x00080018
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
BURNED_IN_ANNOTATION = 0x00280301

#: Non-image payloads: never allowed by a profile, always removed.  Keyword ->
#: what it is, in words (used in ``DeidResult.removed_payloads``).
NON_IMAGE_PAYLOADS: Mapping[str, str] = MappingProxyType({
    "EncapsulatedDocument": "encapsulated document (e.g. a PDF)",
    "EncapsulatedDocumentLength": "encapsulated document",
    "MIMETypeOfEncapsulatedDocument": "encapsulated document",
    "ListOfMIMETypes": "encapsulated document",
    "DocumentTitle": "encapsulated document",
    "HL7InstanceIdentifier": "encapsulated document",
    "SourceInstanceSequence": "encapsulated document",
    "ContentSequence": "structured report content",
    "TextValue": "structured report content",
    "ConceptNameCodeSequence": "structured report content",
    "ContentTemplateSequence": "structured report content",
    "VerifyingObserverSequence": "structured report content",
    "WaveformSequence": "waveform",
    "WaveformData": "waveform",
    "IconImageSequence": "icon image",
    "GraphicAnnotationSequence": "graphic annotation",
    "TextObjectSequence": "graphic annotation",
    "UnformattedTextValue": "graphic annotation",
    "GraphicLayerSequence": "graphic annotation",
    "TextString": "text annotation",
    "Arbitrary": "free text",
    "TextComments": "free text",
    "ReferencedPatientPhotoSequence": "patient photo",
    "OriginalAttributesSequence": "original (identifying) attribute values",
    "ModifiedAttributesSequence": "original (identifying) attribute values",
    "DigitalSignaturesSequence": "digital signature",
    "DataSetTrailingPadding": "trailing padding",
})


def _known_tag(keyword: str) -> int:
    """The tag of a keyword this module names (a typo here is a programming error)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword!r} is not a DICOM keyword")
    return tag


_PAYLOAD_TAGS: Mapping[int, str] = MappingProxyType(
    {_known_tag(k): v for k, v in NON_IMAGE_PAYLOADS.items()})


class DeidError(ValueError):
    """A dataset or profile cannot be de-identified.

    The message never contains a value from the dataset (no patient data).
    """


class BurnedInAnnotation(DeidError):
    """The instance has BurnedInAnnotation = YES and the policy is ``reject``.

    Nothing of the instance was de-identified or written: quarantine this
    instance (the rest of the study can go on).
    """


# --------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeidContext:
    """Per-patient pseudonymization parameters.

    ``uid_map`` must be deterministic (same original UID, same result) so
    that instances of a study, and studies of a patient, stay linked.
    ``identifying_strings`` (original name parts, IDs, accession number, ...)
    are removed from every cleaned text value, case-insensitively.
    """

    pseudo_patient_id: str
    pseudo_patient_name: str
    date_shift_days: int
    uid_map: Callable[[str], str]
    identifying_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_pseudonym("pseudo_patient_id", self.pseudo_patient_id)
        _check_pseudonym("pseudo_patient_name", self.pseudo_patient_name)
        if isinstance(self.date_shift_days, bool) or not isinstance(self.date_shift_days, int):
            raise DeidError("date_shift_days must be an int")
        if abs(self.date_shift_days) > 36500:
            raise DeidError("date_shift_days must be within +/- 100 years")
        if not callable(self.uid_map):
            raise DeidError("uid_map must be callable")
        strings = tuple(self.identifying_strings)
        if not all(isinstance(s, str) for s in strings):
            raise DeidError("identifying_strings must be strings")
        object.__setattr__(self, "identifying_strings", strings)


def _check_pseudonym(name: str, value: object) -> None:
    """Pseudonyms must be usable as LO / PN values."""
    if not isinstance(value, str) or not value.strip():
        raise DeidError(f"{name} must be a non-empty string")
    if len(value) > MAX_LO_LENGTH or "\\" in value:
        raise DeidError(f"{name} must be at most {MAX_LO_LENGTH} characters without backslash")


# --------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodCode:
    """One item of DeidentificationMethodCodeSequence (CID 7050)."""

    value: str
    scheme: str
    meaning: str


_TOP_LEVEL_KEYS = frozenset({"profile", "options", "method_codes", "dummy_values", "keep_uids", "file_meta",
                             "attributes"})


@dataclass(frozen=True, eq=False)
class DeidProfile:
    """The de-identification rules, loaded from YAML (see ``load``).

    ``actions`` maps every tag the profile names to its action; ``allowed``
    is the allowlist: the tags whose action is not X (``keep_uids`` are
    allowed with action K).  Anything not in ``allowed`` is removed.
    """

    name: str
    method_text: str
    method_codes: tuple[MethodCode, ...]
    actions: Mapping[int, str]
    file_meta_actions: Mapping[int, str]
    keep_uid_tags: frozenset[int]
    dummy_values: Mapping[str, str]
    options_applied: tuple[str, ...] = ()
    # Derived in __post_init__ (not constructor arguments).
    allowed: Mapping[int, str] = field(init=False, repr=False)
    allowed_file_meta: Mapping[int, str] = field(init=False, repr=False)
    _vrs: Mapping[int, frozenset[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        allowed = {t: a for t, a in self.actions.items() if a != "X"}
        for tag in self.keep_uid_tags:
            allowed.setdefault(tag, "K")
        object.__setattr__(self, "allowed", MappingProxyType(allowed))
        object.__setattr__(self, "allowed_file_meta", MappingProxyType(
            {t: a for t, a in self.file_meta_actions.items() if a != "X"}))
        object.__setattr__(self, "_vrs", MappingProxyType(
            {t: _dictionary_vrs(t) for t in (*allowed, *self.file_meta_actions)}))

    @classmethod
    def load(cls, path: Path | None = None) -> "DeidProfile":
        """Load a profile; by default the packaged ``config/deid_profile.yaml``."""
        if path is None:
            resource = resources.files("brainline.config").joinpath(DEFAULT_PROFILE_RESOURCE)
            text, source = resource.read_text(encoding="utf-8"), DEFAULT_PROFILE_RESOURCE
        else:
            text, source = Path(path).read_text(encoding="utf-8"), str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DeidError(f"de-identification profile {source} is not valid YAML: {exc}") from None
        return cls.from_mapping(data, source=source)

    @classmethod
    def from_mapping(cls, data: Any, source: str = "<mapping>") -> "DeidProfile":
        """Build and validate a profile from the parsed YAML document."""
        if not isinstance(data, dict):
            raise DeidError(f"de-identification profile {source}: top level must be a mapping")
        if "unlisted" in data:
            raise DeidError(f"{source}: 'unlisted' is not supported: the profile is an allowlist and every "
                            "attribute it does not allow is removed")
        unknown = set(data) - _TOP_LEVEL_KEYS
        if unknown:
            raise DeidError(f"{source}: unknown top-level keys {sorted(map(str, unknown))}")
        meta = data.get("profile") or {}
        method_text = str(meta.get("method_text", "PS3.15 Annex E basic profile"))
        if len(method_text) > MAX_LO_LENGTH:
            raise DeidError(f"{source}: profile.method_text is longer than {MAX_LO_LENGTH} characters")
        actions = _parse_attribute_list(data.get("attributes") or [], source)
        file_meta = _parse_attribute_list(data.get("file_meta") or [], source)
        keep_uids = frozenset(_tag_of_keyword(k, source) for k in data.get("keep_uids") or [])
        for tag in keep_uids:
            if dictionary_VR(tag) != "UI":
                raise DeidError(f"{source}: keep_uids: {keyword_for_tag(tag)} is not a UI attribute")
        for tag, action in [*actions.items(), *file_meta.items(), *((t, "K") for t in keep_uids)]:
            if action != "X":
                _check_allowable(tag, source)
        for tag in file_meta:
            if tag >> 16 != 0x0002:
                raise DeidError(f"{source}: file_meta: {Tag(tag)} is not in group 0002")
        return cls(
            name=str(meta.get("name", source)),
            method_text=method_text,
            method_codes=_parse_method_codes(data.get("method_codes") or [], source),
            actions=MappingProxyType(actions),
            file_meta_actions=MappingProxyType(file_meta),
            keep_uid_tags=keep_uids,
            dummy_values=MappingProxyType({str(k): str(v) for k, v in (data.get("dummy_values") or {}).items()}),
            options_applied=tuple(
                str(o["name"]) for o in data.get("options") or [] if isinstance(o, dict) and o.get("applied")
            ),
        )

    def action_for(self, tag: int) -> str | None:
        """The action for ``tag`` if the profile allows it, else None (remove)."""
        return self.allowed.get(tag)

    def vr_allowed(self, tag: int, vr: str | None) -> bool:
        """Whether ``vr`` is the VR the DICOM dictionary gives the allowed ``tag``."""
        return vr in self._vrs.get(tag, ())


def _dictionary_vrs(tag: int) -> frozenset[str]:
    """The VRs the dictionary allows for ``tag``: 'US or SS' gives US, SS and 'US or SS'."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return frozenset()
    return frozenset({vr, *vr.split(" or ")})


def _check_allowable(tag: int, source: str) -> None:
    """Refuse to allow what can never be allowed: payloads, private, repeating groups."""
    name = keyword_for_tag(tag) or str(Tag(tag))
    group = tag >> 16
    if tag in _PAYLOAD_TAGS:
        raise DeidError(f"{source}: {name} is a non-image payload ({_PAYLOAD_TAGS[tag]}) and cannot be allowed")
    if group & 1:
        raise DeidError(f"{source}: {name} is a private tag and cannot be allowed")
    if (group & 0xFF00) in (0x5000, 0x6000):
        raise DeidError(f"{source}: {name} is an overlay or curve (repeating group) and cannot be allowed")
    if tag & 0xFFFF == 0:
        raise DeidError(f"{source}: {name} is a group length and cannot be allowed")
    if not dictionary_has_tag(tag):
        raise DeidError(f"{source}: {name} is not in the DICOM dictionary and cannot be allowed")


def _tag_of_keyword(keyword: Any, source: str) -> int:
    tag = tag_for_keyword(str(keyword))
    if tag is None:
        raise DeidError(f"{source}: unknown DICOM keyword {keyword!r}")
    return tag


def _parse_tag(text: Any, source: str) -> int:
    match = re.fullmatch(r"\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?", str(text))
    if not match:
        raise DeidError(f"{source}: cannot parse tag {text!r}")
    return int(match.group(1) + match.group(2), 16)


def _check_action(action: Any, where: str) -> str:
    if action not in ACTIONS:
        raise DeidError(f"{where}: action must be one of {''.join(sorted(ACTIONS))}, got {action!r}")
    return action


def _parse_attribute_list(entries: Iterable[Any], source: str) -> dict[int, str]:
    """Map tag -> action; the keyword is authoritative, the tag must agree with it."""
    actions: dict[int, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or "action" not in entry:
            raise DeidError(f"{source}: each attribute needs a keyword or tag and an action")
        keyword, where = entry.get("keyword"), f"{source}: {entry.get('keyword') or entry.get('tag')}"
        tag = tag_for_keyword(str(keyword)) if keyword else None
        if keyword and tag is None:
            raise DeidError(f"{where}: unknown DICOM keyword")
        if "tag" in entry:
            listed = _parse_tag(entry["tag"], source)
            if tag is not None and listed != tag:
                raise DeidError(f"{where}: tag {entry['tag']} does not match the keyword")
            tag = listed if tag is None else tag
        if tag is None:
            raise DeidError(f"{where}: unknown keyword and no tag")
        if tag in actions:
            raise DeidError(f"{where}: listed twice")
        actions[tag] = _check_action(entry["action"], where)
    return actions


def _parse_method_codes(entries: Iterable[Any], source: str) -> tuple[MethodCode, ...]:
    codes = []
    for entry in entries:
        try:
            codes.append(MethodCode(str(entry["value"]), str(entry["scheme"]), str(entry["meaning"])))
        except (TypeError, KeyError):
            raise DeidError(f"{source}: method_codes entries need value, scheme and meaning") from None
    return tuple(codes)


# --------------------------------------------------------------------------
# Value helpers: dates, text, UIDs
# --------------------------------------------------------------------------

_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")
def _date_text(value: Any) -> str:
    """DA/DT values are str unless pydicom's datetime_conversion is enabled."""
    if isinstance(value, str):
        return value
    if isinstance(value, _dt.datetime):
        return value.strftime("%Y%m%d%H%M%S.%f")
    if isinstance(value, _dt.date):
        return value.strftime("%Y%m%d")
    return ""


def _values(elem: DataElement) -> list[Any]:
    """The element's values as a list (empty when the element is empty)."""
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _set_values(elem: DataElement, values: list[Any]) -> None:
    """Store ``values`` back; an empty list gives a zero-length element."""
    if not values:
        elem.value = elem.empty_value
    elif len(values) == 1:
        elem.value = values[0]
    else:
        elem.value = values


@functools.lru_cache(maxsize=256)
def _scrub_pattern(strings: tuple[str, ...]) -> re.Pattern[str] | None:
    """Regex matching any identifying string, case-insensitively.

    Strings of 4 characters or more match anywhere (``JohnDoe_T1``); shorter
    ones only as a whole token, so that a name part like ``LI`` does not
    mangle ``FLAIR``.  Strings shorter than 2 characters are ignored.
    """
    cleaned = sorted({s.strip() for s in strings if len(s.strip()) >= 2}, key=len, reverse=True)
    if not cleaned:
        return None
    long_ = [re.escape(s) for s in cleaned if len(s) >= 4]
    short = [re.escape(s) for s in cleaned if len(s) < 4]
    parts = []
    if long_:
        parts.append("(?:" + "|".join(long_) + ")")
    if short:
        parts.append(r"(?<![A-Za-z0-9])(?:" + "|".join(short) + r")(?![A-Za-z0-9])")
    return re.compile("|".join(parts), re.IGNORECASE)


def _scrub_text(text: str, pattern: re.Pattern[str] | None) -> str:
    """Remove identifying strings from ``text`` and tidy the left-over spaces."""
    if pattern is None:
        return text
    scrubbed = pattern.sub("", text)
    if scrubbed == text:
        return text
    return re.sub(r"[ \t]{2,}", " ", scrubbed).strip()


# --------------------------------------------------------------------------
# Identifying strings
# --------------------------------------------------------------------------

_NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName")
_ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID")


def identifying_strings_of(ds: Dataset) -> tuple[str, ...]:
    """Strings that identify the patient of ``ds``, for ``DeidContext``.

    Name components of length >= 2 (and their words), PatientID,
    OtherPatientIDs (and the IDs in OtherPatientIDsSequence), AccessionNumber,
    StudyID and the birth date in its common spellings.
    """
    found: list[str] = []
    for keyword in _NAME_KEYWORDS:
        for value in _values_of(ds, keyword):
            found.extend(_name_parts(str(value)))
    for keyword in _ID_KEYWORDS:
        found.extend(str(v) for v in _values_of(ds, keyword))
    for item in ds.get("OtherPatientIDsSequence") or []:
        found.extend(str(v) for v in _values_of(item, "PatientID"))
    for value in _values_of(ds, "PatientBirthDate"):
        found.extend(_date_spellings(_date_text(value)))
    unique = dict.fromkeys(s.strip() for s in found if len(s.strip()) >= 2)
    return tuple(unique)


def _values_of(ds: Dataset, keyword: str) -> list[Any]:
    """Values of the element named ``keyword``; empty if absent."""
    if keyword not in ds:
        return []
    elem = ds.data_element(keyword)
    return _values(elem) if elem is not None else []


def _name_parts(name: str) -> list[str]:
    """Components of a PN value (all groups), and the words inside them."""
    parts = []
    for component in re.split(r"[\^=]", name):
        component = component.strip()
        parts.append(component)
        words = re.split(r"[\s,]+", component)
        if len(words) > 1:
            parts.extend(words)
    return [p for p in parts if len(p) >= 2]


def _date_spellings(text: str) -> list[str]:
    """YYYYMMDD plus the ISO, European and US spellings of the same date."""
    text = text.strip().replace(".", "") if len(text.strip()) == 10 else text.strip()
    if len(text) != 8 or not text.isdigit():
        return [text] if text else []
    y, m, d = text[:4], text[4:6], text[6:]
    return [text, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}"]


# --------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------


class _Engine:
    """Applies one profile with one context to one dataset copy, in place."""

    def __init__(self, profile: DeidProfile, ctx: DeidContext, strings: tuple[str, ...]):
        self.profile = profile
        self.ctx = ctx
        self.pattern = _scrub_pattern(strings)
        self._uids: dict[str, str] = {}

    # -- walking -----------------------------------------------------------

    def process(self, ds: Dataset, path: tuple[BaseTag, ...] = ()) -> None:
        """Apply the allowlist to every element of ``ds`` (and its sequences).

        An element is removed unless the profile allows its tag with the VR
        the dictionary gives it; raw (undecoded) elements that are removed
        are never decoded.
        """
        profile = self.profile
        for tag in list(ds.keys()):
            try:
                action = profile.action_for(tag)
                if action is None:
                    del ds[tag]
                    continue
                elem = ds[tag]
                if not profile.vr_allowed(tag, elem.VR):
                    del ds[tag]  # e.g. an allowed keyword sent as UN or OB: its value cannot be checked
                    continue
                self.apply(ds, elem, action, path + (tag,))
            except DeidError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised without patient data
                raise DeidError(_describe_failure(path + (tag,), exc)) from None

    def process_items(self, elem: DataElement, path: tuple[BaseTag, ...]) -> None:
        for item in elem.value or []:
            self.process(item, path)

    # -- actions -----------------------------------------------------------

    def apply(self, ds: Dataset, elem: DataElement, action: str, path: tuple[BaseTag, ...]) -> None:
        """Apply ``action`` (one of D Z X K C U) to ``elem``."""
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = elem.empty_value
        elif action == "D":
            self.dummy(elem)
        elif action == "U":
            if elem.VR == "SQ":
                self.process_items(elem, path)
            elif elem.VR == "UI":
                _set_values(elem, [self.map_uid(str(v)) for v in _values(elem)])
            else:
                elem.value = elem.empty_value  # U on anything else: nothing to remap, nothing kept
        elif action == "C":
            self.clean(elem, path)
        elif elem.VR == "SQ":  # K on a sequence: keep it, but process its items
            self.process_items(elem, path)

    def dummy(self, elem: DataElement) -> None:
        """Replace with the pseudonym (PatientName / PatientID) or the VR's dummy."""
        if elem.tag == PATIENT_NAME:
            elem.value = self.ctx.pseudo_patient_name
        elif elem.tag == PATIENT_ID:
            elem.value = self.ctx.pseudo_patient_id
        elif elem.VR == "UI":
            _set_values(elem, [self.map_uid(str(v)) for v in _values(elem)])
        elif elem.VR in self.profile.dummy_values:
            elem.value = self.profile.dummy_values[elem.VR]
        else:  # sequences and binary VRs: no meaningful dummy
            elem.value = elem.empty_value

    def clean(self, elem: DataElement, path: tuple[BaseTag, ...]) -> None:
        """Shift dates, scrub text, dummy person names, walk sequences; empty anything else."""
        vr = elem.VR
        if vr == "DA":
            shifted = (shift_da(_date_text(v), self.ctx.date_shift_days) for v in _values(elem))
            _set_values(elem, [v for v in shifted if v is not None])
        elif vr == "DT":
            shifted = (shift_dt(_date_text(v), self.ctx.date_shift_days) for v in _values(elem))
            _set_values(elem, [v for v in shifted if v is not None])
        elif vr in TEXT_VRS:
            values = _values(elem)
            if any(not isinstance(v, str) for v in values):
                elem.value = elem.empty_value  # undecodable text: cannot be checked
            else:
                _set_values(elem, [s for s in (_scrub_text(v, self.pattern) for v in values) if s])
        elif vr == "PN":
            self.dummy(elem)
        elif vr == "SQ":
            self.process_items(elem, path)
        elif vr in ("CS", "IS", "DS", "TM", "AS", "US", "SS", "UL", "SL", "FL", "FD", "AT", "UV", "SV"):
            pass  # coded strings and numbers: nothing to clean
        else:
            elem.value = elem.empty_value  # binary or unexpected VR: cannot be cleaned

    def map_uid(self, uid: str) -> str:
        """Original UID -> pseudonymous UID, checked, cached for this dataset.

        DICOM well-known UIDs (1.2.840.10008.*: classes, syntaxes, coding
        schemes) identify nothing and are kept.
        """
        uid = uid.strip("\x00 ")
        if not uid or uid.startswith(WELL_KNOWN_UID_ROOT):
            return uid
        mapped = self._uids.get(uid)
        if mapped is None:
            mapped = str(self.ctx.uid_map(uid))
            if len(mapped) > 64 or not _UID_RE.fullmatch(mapped):
                raise DeidError("uid_map returned an invalid UID")
            if mapped == uid:
                raise DeidError("uid_map returned the original UID")
            self._uids[uid] = mapped
        return mapped

    # -- file meta and identity attributes ---------------------------------

    def process_file_meta(self, ds: Dataset) -> None:
        """Keep only the allowed file meta elements; MediaStorageSOPInstanceUID follows SOPInstanceUID."""
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return
        allowed = self.profile.allowed_file_meta
        for tag in list(meta.keys()):
            action = allowed.get(tag)
            if action is None or not self.profile.vr_allowed(tag, meta[tag].VR):
                del meta[tag]
            elif tag == MEDIA_STORAGE_SOP_INSTANCE_UID and action == "U" and SOP_INSTANCE_UID in ds:
                meta[tag].value = ds[SOP_INSTANCE_UID].value  # already remapped
            else:
                self.apply(meta, meta[tag], action, (Tag(tag),))

    def mark(self, ds: Dataset) -> None:
        """Set the pseudonyms and the de-identification attributes."""
        ds.PatientName = self.ctx.pseudo_patient_name
        ds.PatientID = self.ctx.pseudo_patient_id
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.profile.method_text
        ds.DeidentificationMethodCodeSequence = Sequence([_code_item(c) for c in self.profile.method_codes])
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.ctx.date_shift_days else "UNMODIFIED"


def _code_item(code: MethodCode) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def _describe_failure(path: tuple[BaseTag, ...], exc: Exception) -> str:
    """Where and what failed, without any value of the dataset."""
    where = " > ".join(f"{Tag(t)} {keyword_for_tag(t) or ('private' if Tag(t).is_private else 'unknown')}"
                       for t in path)
    return f"cannot de-identify element {where}: {type(exc).__name__}"


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeidResult:
    """What :func:`deidentify` returns.

    ``dataset``: the de-identified copy.  ``flags``: findings in words for
    the job record (no patient data), e.g. a burned-in annotation kept under
    the ``flag`` policy.  ``removed_payloads``: the kinds of non-image
    payload found in the instance and removed (e.g. "encapsulated document
    (e.g. a PDF)", "overlay", "private data elements"), in words.
    ``is_image``: whether pixel data is left (False for documents, SR, ...).
    """

    dataset: Dataset
    flags: tuple[str, ...] = ()
    removed_payloads: tuple[str, ...] = ()

    @property
    def is_image(self) -> bool:
        return any(t in self.dataset for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))


BURNED_IN_FLAG = ("burned-in annotation: the instance has BurnedInAnnotation = YES; its pixel data was kept "
                  "unchanged and may show identifying text (policy burned_in_annotation = flag)")


def _has_burned_in_annotation(ds: Dataset) -> bool:
    if BURNED_IN_ANNOTATION not in ds:
        return False
    try:
        value = ds[BURNED_IN_ANNOTATION].value
    except Exception:  # noqa: BLE001 - undecodable: treat as present, be safe
        return True
    values = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    texts = [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values if v is not None]
    return any(t.strip("\x00 ").upper() == "YES" for t in texts)


def _payloads_in(ds: Dataset) -> tuple[str, ...]:
    """The kinds of non-image payload at the top level of ``ds``, in words."""
    found: dict[str, None] = {}
    for tag in ds.keys():
        group = tag >> 16
        if tag in _PAYLOAD_TAGS:
            found[_PAYLOAD_TAGS[tag]] = None
        elif group & 1:
            found["private data elements"] = None
        elif (group & 0xFF00) == 0x6000:
            found["overlay"] = None
        elif (group & 0xFF00) == 0x5000:
            found["curve or audio"] = None
    return tuple(found)


def deidentify(ds: Dataset, profile: DeidProfile, ctx: DeidContext, *,
               burned_in_annotation: str = "reject", in_place: bool = False) -> DeidResult:
    """De-identify ``ds`` with the allowlist ``profile``; ``ds`` itself is not
    changed unless ``in_place`` (for a caller that read ``ds`` only to write
    its de-identified copy: saves a deep copy, a quarter of the time).

    Keeps only the attributes the profile allows, at every nesting level,
    applying their actions: DA/DT values shifted by ``ctx.date_shift_days``
    (invalid or partial dates are emptied), instance UIDs remapped with
    ``ctx.uid_map`` (file meta MediaStorageSOPInstanceUID follows
    SOPInstanceUID), descriptors cleaned of ``ctx.identifying_strings`` and
    the dataset's own identifying strings.  Everything else is removed:
    unknown and private tags, overlays, curves, encapsulated documents, SR
    content, waveforms, icons.  Sets PatientName/PatientID to the
    pseudonyms, PatientIdentityRemoved, DeidentificationMethod(CodeSequence)
    and LongitudinalTemporalInformationModified.  PixelData is never decoded.

    ``burned_in_annotation`` ("reject" or "flag", the setting of the same
    name): with BurnedInAnnotation = YES, "reject" raises
    :class:`BurnedInAnnotation` (nothing de-identified; quarantine the
    instance) and "flag" de-identifies it and adds a flag to the result.

    Raises DeidError (message without patient data) if ``ds`` cannot be processed.
    """
    if burned_in_annotation not in BURNED_IN_POLICIES:
        raise DeidError(f"burned_in_annotation must be one of {', '.join(BURNED_IN_POLICIES)}")
    if not isinstance(ds, Dataset):
        raise DeidError("pseudonymize_dataset needs a pydicom Dataset")
    try:
        burned_in = _has_burned_in_annotation(ds)
    except Exception as exc:  # noqa: BLE001 - re-raised without patient data
        raise DeidError(f"cannot read BurnedInAnnotation: {type(exc).__name__}") from None
    if burned_in and burned_in_annotation == "reject":
        raise BurnedInAnnotation(
            "the instance has burned-in annotation (BurnedInAnnotation = YES): its pixels may show identifying "
            "text, so it is not de-identified (policy burned_in_annotation = reject); quarantine it")
    try:
        own_strings = identifying_strings_of(ds)
        payloads = _payloads_in(ds)
        out = ds if in_place else copy.deepcopy(ds)
    except Exception as exc:  # noqa: BLE001 - re-raised without patient data
        raise DeidError(f"cannot read the dataset to de-identify it: {type(exc).__name__}") from None
    engine = _Engine(profile, ctx, ctx.identifying_strings + own_strings)
    engine.process(out)  # raises DeidError naming the failing element
    try:
        engine.process_file_meta(out)
        engine.mark(out)
    except DeidError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised without patient data
        raise DeidError(f"cannot finish de-identification (file meta / marks): {type(exc).__name__}") from None
    if isinstance(out, pydicom.FileDataset):
        out.filename = None  # the spool path may name the patient
    flags = (BURNED_IN_FLAG,) if burned_in else ()
    return DeidResult(dataset=out, flags=flags, removed_payloads=payloads)


def pseudonymize_dataset(ds: Dataset, profile: DeidProfile, ctx: DeidContext, *,
                         burned_in_annotation: str = "reject", in_place: bool = False) -> Dataset:
    """``deidentify(...).dataset``: the de-identified copy only.

    Kept for callers that do not record flags; with ``burned_in_annotation
    = "flag"`` use :func:`deidentify` so the flag reaches the job record.
    """
    return deidentify(ds, profile, ctx, burned_in_annotation=burned_in_annotation, in_place=in_place).dataset
