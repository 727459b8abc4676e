"""DICOM de-identification engine (PS3.15 Annex E, pure: no database, no network).

The gateway pseudonymizes every instance before a worker sees it
(DESIGN.md, "PHI zones").  The rules live in ``config/deid_profile.yaml``
(Basic Application Level Confidentiality Profile with the Retain
Longitudinal Temporal Information with Modified Dates, Clean Descriptors and
Retain Patient Characteristics options); this module only applies them.

Typical use::

    profile = DeidProfile.load()
    ctx = DeidContext(
        pseudo_patient_id="BL-3F9A...", pseudo_patient_name="BL-3F9A...",
        date_shift_days=-1234, uid_map=vault.uid_for,
        identifying_strings=identifying_strings_of(first_instance),
    )
    clean = pseudonymize_dataset(ds, profile, ctx)

Errors are raised as :class:`DeidError`, whose messages name tags, keywords
and VRs but never a value of the dataset.
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
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

__all__ = [
    "DeidContext",
    "DeidError",
    "DeidProfile",
    "MethodCode",
    "identifying_strings_of",
    "pseudonymize_dataset",
]

ACTIONS = frozenset("DZXKCU")
TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
DATE_VRS = frozenset({"DA", "DT"})
WELL_KNOWN_UID_ROOT = "1.2.840.10008."
DEFAULT_PROFILE_RESOURCE = "deid_profile.yaml"
MAX_LO_LENGTH = 64

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
SOP_INSTANCE_UID = 0x00080018
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003


class DeidError(ValueError):
    """A dataset or profile cannot be de-identified.

    The message never contains a value from the dataset (no patient data).
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
    are removed from every cleaned or kept text value, case-insensitively.
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


@dataclass(frozen=True)
class UnlistedRules:
    """Actions for data elements the attribute list does not name."""

    default: str = "K"
    text_scrub: bool = True
    person_name: str = "D"
    uid: str = "U"
    dates: str = "C"
    uri: str = "X"
    private: str = "X"
    repeating_groups: str = "X"
    unknown_un: str = "X"
    group_length: str = "X"


@dataclass(frozen=True, eq=False)
class DeidProfile:
    """The de-identification rules, loaded from YAML (see ``load``)."""

    name: str
    method_text: str
    method_codes: tuple[MethodCode, ...]
    actions: Mapping[int, str]
    file_meta_actions: Mapping[int, str]
    keep_uid_tags: frozenset[int]
    dummy_values: Mapping[str, str]
    unlisted: UnlistedRules = field(default_factory=UnlistedRules)
    options_applied: tuple[str, ...] = ()

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
        meta = data.get("profile") or {}
        method_text = str(meta.get("method_text", "PS3.15 Annex E basic profile"))
        if len(method_text) > MAX_LO_LENGTH:
            raise DeidError(f"{source}: profile.method_text is longer than {MAX_LO_LENGTH} characters")
        return cls(
            name=str(meta.get("name", source)),
            method_text=method_text,
            method_codes=_parse_method_codes(data.get("method_codes") or [], source),
            actions=MappingProxyType(_parse_attribute_list(data.get("attributes") or [], source)),
            file_meta_actions=MappingProxyType(_parse_attribute_list(data.get("file_meta") or [], source)),
            keep_uid_tags=frozenset(_tag_of_keyword(k, source) for k in data.get("keep_uids") or []),
            dummy_values=MappingProxyType({str(k): str(v) for k, v in (data.get("dummy_values") or {}).items()}),
            unlisted=_parse_unlisted(data.get("unlisted") or {}, source),
            options_applied=tuple(
                str(o["name"]) for o in data.get("options") or [] if isinstance(o, dict) and o.get("applied")
            ),
        )

    def listed_action(self, tag: int) -> str | None:
        """Action for ``tag`` decided from the tag alone, or None if it depends on the VR."""
        action = self.actions.get(tag)
        if action is not None:
            return action
        group = tag >> 16
        if group & 1:
            return self.unlisted.private
        if (group & 0xFF00) in (0x5000, 0x6000):
            return self.unlisted.repeating_groups
        if tag & 0xFFFF == 0:
            return self.unlisted.group_length
        return None

    def unlisted_action(self, elem: DataElement) -> str:
        """Action for an element that the attribute list does not name."""
        vr = elem.VR
        if vr == "SQ":
            return "K"
        if vr == "PN":
            return self.unlisted.person_name
        if vr == "UI":
            if elem.tag in self.keep_uid_tags or _all_well_known(elem):
                return "K"
            return self.unlisted.uid
        if vr in DATE_VRS:
            return self.unlisted.dates
        if vr == "UR":
            return self.unlisted.uri
        if vr == "UN":
            return self.unlisted.unknown_un
        if vr in TEXT_VRS and self.unlisted.text_scrub:
            return "C"
        return self.unlisted.default


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


def _parse_unlisted(data: Mapping[str, Any], source: str) -> UnlistedRules:
    known = UnlistedRules.__dataclass_fields__
    unknown = set(data) - set(known)
    if unknown:
        raise DeidError(f"{source}: unknown keys in unlisted: {sorted(unknown)}")
    values = dict(data)
    for key, value in values.items():
        if key != "text_scrub":
            _check_action(value, f"{source}: unlisted.{key}")
    return UnlistedRules(**values)


# --------------------------------------------------------------------------
# Value helpers: dates, text, UIDs
# --------------------------------------------------------------------------

_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")
_DT_RE = re.compile(
    r"(?P<date>\d{8})(?P<time>\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?(?P<offset>[+-]\d{4})?"
)


def _shift_date(text: str, days: int) -> str | None:
    """Shift a DA value (YYYYMMDD, or legacy YYYY.MM.DD); None if invalid."""
    text = text.strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        shifted = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:])) + _dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{shifted.year:04d}{shifted.month:02d}{shifted.day:02d}"


def _shift_datetime(text: str, days: int) -> str | None:
    """Shift the date part of a DT value, keep its time part, drop the UTC offset.

    Values without a full date (YYYY or YYYYMM) or otherwise invalid give None.
    """
    match = _DT_RE.fullmatch(text.strip())
    if not match:
        return None
    date = _shift_date(match.group("date"), days)
    if date is None:
        return None
    return date + (match.group("time") or "")


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


def _all_well_known(elem: DataElement) -> bool:
    values = _values(elem)
    return bool(values) and all(str(v).startswith(WELL_KNOWN_UID_ROOT) for v in values)


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
    return _values(ds.data_element(keyword)) if keyword in ds else []


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
        """Apply the profile to every element of ``ds`` (and its sequences)."""
        for tag in list(ds.keys()):
            try:
                action = self.profile.listed_action(tag)
                if action == "X":
                    del ds[tag]
                    continue
                elem = ds[tag]
                if action is None:
                    action = self.profile.unlisted_action(elem)
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
        """Shift dates, scrub text, dummy person names, walk sequences."""
        vr = elem.VR
        if vr == "DA":
            shifted = (_shift_date(_date_text(v), self.ctx.date_shift_days) for v in _values(elem))
            _set_values(elem, [v for v in shifted if v is not None])
        elif vr == "DT":
            shifted = (_shift_datetime(_date_text(v), self.ctx.date_shift_days) for v in _values(elem))
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

    def map_uid(self, uid: str) -> str:
        """Original UID -> pseudonymous UID, checked, cached for this dataset."""
        uid = uid.strip("\x00 ")
        if not uid:
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
        """Remap MediaStorageSOPInstanceUID consistently, drop station names."""
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return
        for tag, action in self.profile.file_meta_actions.items():
            if tag not in meta:
                continue
            if tag == MEDIA_STORAGE_SOP_INSTANCE_UID and action == "U" and SOP_INSTANCE_UID in ds:
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


def pseudonymize_dataset(ds: Dataset, profile: DeidProfile, ctx: DeidContext) -> Dataset:
    """Return a de-identified deep copy of ``ds``; ``ds`` itself is not changed.

    Applies the profile's actions recursively (sequences included), shifts
    DA/DT values by ``ctx.date_shift_days`` (invalid or partial dates are
    emptied), remaps instance UIDs with ``ctx.uid_map`` (file meta
    MediaStorageSOPInstanceUID follows SOPInstanceUID), removes private
    elements and overlay/curve groups, and sets PatientName/PatientID to the
    pseudonyms, PatientIdentityRemoved, DeidentificationMethod and
    DeidentificationMethodCodeSequence.  PixelData is never decoded.

    Raises DeidError (message without patient data) if ``ds`` cannot be processed.
    """
    if not isinstance(ds, Dataset):
        raise DeidError("pseudonymize_dataset needs a pydicom Dataset")
    try:
        own_strings = identifying_strings_of(ds)
        out = copy.deepcopy(ds)
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
    return out
