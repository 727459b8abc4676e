"""Series selection: find the T1, T1c, T2 and FLAIR series of a study.

Pure image-header processing, no network and no database:

* :func:`scan_series` reads the headers of every DICOM file under a folder
  (pixel data is never read) and groups them by SeriesInstanceUID into
  :class:`SeriesHeader` records; a single-frame series with two or more
  EchoNumbers (a PD/T2 dual echo) gives one record per echo.
* :func:`load_rules` reads the declarative rules (default: the packaged
  ``brainline/config/series_rules.yaml``) into :class:`SelectionRules`.
* :func:`select_series` applies the rules and returns a
  :class:`SelectionResult`, or raises :class:`MissingSeriesError` whose
  message tells a PACS administrator which series were looked at and why
  none of them fitted.

Units: repetition, echo and inversion times in milliseconds (as stored in
DICOM), slice thickness in millimetres.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from .roles import ROLE_LABELS

__all__ = [
    "ROLE_LABELS",
    "MissingSeriesError",
    "ParameterRange",
    "RoleRule",
    "RulesError",
    "ScanReport",
    "SelectionResult",
    "SelectionRules",
    "SeriesHeader",
    "load_rules",
    "rules_from_dict",
    "scan_directory",
    "scan_series",
    "select_series",
]

log = logging.getLogger(__name__)


#: Header attributes read from every file (pixel data is never read).
_HEADER_TAGS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "Modality",
    "MRAcquisitionType",
    "SliceThickness",
    "ContrastBolusAgent",
    "ContrastBolusAgentSequence",
    "ImageType",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "ScanningSequence",
    "SequenceVariant",
    "EchoPulseSequence",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DerivationCodeSequence",
    "EchoNumbers",
)

#: CID 7203 "Lossy Compression" (DCM 113040): the one derivation that leaves an
#: image the acquisition it was (dcmtk and archives that lossy-compress old
#: studies mark such images DERIVED with this code; PS3.3 C.7.6.1.1.5).
LOSSY_COMPRESSION_CODE = ("113040", "DCM")

#: Parameters a rule may constrain: attribute of SeriesHeader -> short name.
_PARAMETER_NAMES: dict[str, str] = {
    "repetition_time": "TR",
    "echo_time": "TE",
    "inversion_time": "TI",
}

_CONTRAST_MODES = ("required", "forbidden", "any")
_INVERSION_MODES = ("required", "forbidden", "any")


# ---------------------------------------------------------------------------
# Series headers
# ---------------------------------------------------------------------------


@dataclass
class SeriesHeader:
    """What selection needs to know about one series (times in ms, sizes in mm).

    ``n_instances`` counts files; ``n_frames`` counts images (equal for
    classic single-frame MR, larger for enhanced multi-frame MR).
    ``echo_number``: set when the series holds several echoes at each slice
    position (a PD/T2 dual echo, a multi-echo series): each echo is then a
    series of its own for selection (:attr:`key`), with that echo's files and
    echo time, so a T2 rule finds the T2-weighted echo and the images
    converted and built on are one per position.
    """

    series_uid: str
    series_number: int | None = None
    description: str = ""
    protocol_name: str = ""
    modality: str = ""
    sop_class_uid: str = ""
    n_instances: int = 0
    files: list[Path] = field(default_factory=list)
    mr_acquisition_type: str | None = None
    slice_thickness: float | None = None
    contrast_agent: str | None = None
    image_type: tuple[str, ...] = ()
    repetition_time: float | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    rows: int | None = None
    columns: int | None = None
    is_derived: bool = False
    n_frames: int = 0
    is_enhanced: bool = False
    study_uid: str = ""
    echo_number: int | None = None

    @property
    def key(self) -> str:
        """What tells this header from every other of the study: the series
        UID, with the echo number for one echo of a multi-echo series."""
        return self.series_uid if self.echo_number is None else f"{self.series_uid}#echo{self.echo_number}"

    @property
    def is_3d(self) -> bool:
        """True for a 3D (volume) acquisition, from MRAcquisitionType."""
        return (self.mr_acquisition_type or "").upper() == "3D"

    @property
    def n_images(self) -> int:
        """Number of 2D images (frames) in the series; at least n_instances."""
        return max(self.n_frames, self.n_instances)

    @property
    def match_text(self) -> str:
        """Text the description patterns are matched against.

        SeriesDescription (ProtocolName when empty), lower-cased, underscores
        replaced by spaces so that ``\\b`` works on ``t1_mprage_sag``.
        """
        text = self.description.strip() or self.protocol_name.strip()
        return text.lower().replace("_", " ")

    @property
    def display_name(self) -> str:
        """Short human form: ``#5 'AX T2 FSE'``."""
        number = "?" if self.series_number is None else str(self.series_number)
        text = self.description.strip() or self.protocol_name.strip() or "(no description)"
        return f"#{number} '{text}'" + (f" echo {self.echo_number}" if self.echo_number is not None else "")

    def to_dict(self, include_files: bool = False) -> dict[str, Any]:
        """JSON-serializable form; file paths only when include_files is True."""
        out: dict[str, Any] = {
            "series_uid": self.series_uid,
            "series_number": self.series_number,
            "description": self.description,
            "protocol_name": self.protocol_name,
            "modality": self.modality,
            "sop_class_uid": self.sop_class_uid,
            "n_instances": self.n_instances,
            "n_frames": self.n_frames,
            "mr_acquisition_type": self.mr_acquisition_type,
            "slice_thickness_mm": self.slice_thickness,
            "contrast_agent": self.contrast_agent,
            "image_type": list(self.image_type),
            "repetition_time_ms": self.repetition_time,
            "echo_time_ms": self.echo_time,
            "inversion_time_ms": self.inversion_time,
            "scanning_sequence": list(self.scanning_sequence),
            "sequence_variant": list(self.sequence_variant),
            "rows": self.rows,
            "columns": self.columns,
            "is_derived": self.is_derived,
            "is_enhanced": self.is_enhanced,
        }
        if self.echo_number is not None:
            out["echo_number"] = self.echo_number
        if include_files:
            out["files"] = [str(p) for p in self.files]
        return out


@dataclass
class ScanReport:
    """Outcome of :func:`scan_directory`: the series plus the files skipped."""

    series: list[SeriesHeader]
    n_files: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        """Number of files that were not usable DICOM images."""
        return len(self.skipped)


def scan_series(dicom_dir: Path) -> list[SeriesHeader]:
    """Read all DICOM headers under ``dicom_dir`` (recursively), one record per series.

    Non-DICOM files are skipped (and counted in the log); see
    :func:`scan_directory` for the counts.
    """
    return scan_directory(dicom_dir).series


def scan_directory(dicom_dir: Path) -> ScanReport:
    """Like :func:`scan_series` but also reports which files were skipped and why.

    Series are returned sorted by series number (missing numbers last), then UID.
    """
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"DICOM folder not found: {dicom_dir}")
    paths = sorted(p for p in dicom_dir.rglob("*") if p.is_file())
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        ds, why = _read_header(path)
        if ds is None:
            skipped.append((path, why))
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    series = [_series_from_instances(uid, part, echo) for uid, items in groups.items()
              for echo, part in _split_echoes(items)]
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid, s.echo_number or 0))
    if skipped:
        log.info("series scan of %s: %d files, %d skipped (not DICOM images)",
                 dicom_dir, len(paths), len(skipped))
    return ScanReport(series=series, n_files=len(paths), skipped=skipped)


def _read_header(path: Path) -> tuple[Dataset | None, str]:
    """Read the selection-relevant header of one file; (None, reason) if unusable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except InvalidDicomError:
        ds = _read_header_without_preamble(path)
        if ds is None:
            return None, "not a DICOM file"
    except Exception as exc:  # truncated or corrupt files must not stop the scan
        return None, f"unreadable DICOM: {exc}"
    if not ds.get("SeriesInstanceUID"):
        return None, "no SeriesInstanceUID (not an image instance)"
    return ds, ""


def _read_header_without_preamble(path: Path) -> Dataset | None:
    """Read DICOM files written without the 128-byte preamble (raw datasets).

    Only tried when the file starts like a group-0008 element, so that
    random files are not parsed as DICOM.
    """
    try:
        with open(path, "rb") as fh:
            start = fh.read(4)
        if start[:2] not in (b"\x08\x00", b"\x02\x00"):
            return None
        return pydicom.dcmread(path, stop_before_pixels=True, force=True,
                               specific_tags=list(_HEADER_TAGS))
    except Exception:
        return None


def _split_echoes(items: list[tuple[Path, Dataset]]) -> list[tuple[int | None, list[tuple[Path, Dataset]]]]:
    """The (path, header) pairs of one series by echo: [(None, items)] for a
    single-echo or multi-frame series; [(echo number, that echo's items), ...]
    when single-frame images carry two or more EchoNumbers (each echo of a
    PD/T2 or multi-echo series is an image of its own at every position)."""
    if any(_is_multiframe(ds) for _, ds in items):
        return [(None, items)]
    by_echo: dict[int | None, list[tuple[Path, Dataset]]] = {}
    for path, ds in items:
        by_echo.setdefault(_int_or_none(ds.get("EchoNumbers")), []).append((path, ds))
    if len(by_echo) < 2 or None in by_echo:
        return [(None, items)]
    return [(echo, by_echo[echo]) for echo in sorted(by_echo, key=lambda e: e or 0)]


def _series_from_instances(uid: str, items: list[tuple[Path, Dataset]],
                           echo_number: int | None = None) -> SeriesHeader:
    """Build one SeriesHeader from the (path, header) pairs of one series (of
    one of its echoes, ``echo_number``, for a multi-echo series)."""
    items = sorted(items, key=lambda item: str(item[0]))
    first = items[0][1]
    enhanced = _is_multiframe(first)
    image_type = _strings(first.get("ImageType"))
    if enhanced and not image_type:
        image_type = _strings(_group_value(first, "MRImageFrameTypeSequence", "FrameType"))
    return SeriesHeader(
        series_uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "") or ""),
        series_number=_int_or_none(first.get("SeriesNumber")),
        description=str(first.get("SeriesDescription", "") or "").strip(),
        protocol_name=str(first.get("ProtocolName", "") or "").strip(),
        modality=str(first.get("Modality", "") or "").upper(),
        sop_class_uid=str(first.get("SOPClassUID", "") or ""),
        n_instances=len(items),
        n_frames=sum(_int_or_none(ds.get("NumberOfFrames")) or 1 for _, ds in items),
        files=[path for path, _ in items],
        mr_acquisition_type=(str(first.get("MRAcquisitionType") or "").upper() or None),
        slice_thickness=_slice_thickness(first),
        contrast_agent=_first_contrast_agent(ds for _, ds in items),
        image_type=image_type,
        is_derived=bool(image_type) and image_type[0].upper() == "DERIVED" and not _only_lossy_compression(first),
        repetition_time=_timing(first, "RepetitionTime", "MRTimingAndRelatedParametersSequence"),
        echo_time=_echo_time(first),
        inversion_time=_inversion_time(first),
        scanning_sequence=_scanning_sequence(first),
        sequence_variant=_strings(first.get("SequenceVariant")),
        rows=_int_or_none(first.get("Rows")),
        columns=_int_or_none(first.get("Columns")),
        echo_number=echo_number,
        is_enhanced=enhanced,
    )


# --- header value helpers ---------------------------------------------------


def _only_lossy_compression(ds: Dataset) -> bool:
    """True when the image's derivation codes name lossy compression and
    nothing else: a lossy-compressed copy of an original image, which is still
    that acquisition (selected as original; its results say lossy)."""
    codes = {(str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")))
             for item in ds.get("DerivationCodeSequence") or []}
    return codes == {LOSSY_COMPRESSION_CODE}


def _is_multiframe(ds: Dataset) -> bool:
    """True for enhanced (multi-frame, functional-group) MR instances."""
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def _group_value(ds: Dataset, macro: str, keyword: str) -> Any:
    """Value of ``macro[0].keyword`` in the shared, else first per-frame, functional group."""
    for groups_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_kw)
        if not groups:
            continue
        macro_seq = groups[0].get(macro)
        if macro_seq:
            value = macro_seq[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def _float_or_none(value: Any) -> float | None:
    """First number of a (possibly multi-valued) DICOM value, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int_or_none(value: Any) -> int | None:
    """Integer form of a DICOM IS/US value, or None."""
    number = _float_or_none(value)
    return None if number is None else int(number)


def _strings(value: Any) -> tuple[str, ...]:
    """Multi-valued CS as an upper-case tuple (a single string becomes a 1-tuple)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value)


def _slice_thickness(ds: Dataset) -> float | None:
    """Slice thickness in mm (top level, else PixelMeasuresSequence)."""
    value = _float_or_none(ds.get("SliceThickness"))
    if value is None and _is_multiframe(ds):
        value = _float_or_none(_group_value(ds, "PixelMeasuresSequence", "SliceThickness"))
    return value


def _timing(ds: Dataset, keyword: str, macro: str) -> float | None:
    """A time in ms from the top level, else from a functional-group macro."""
    value = _float_or_none(ds.get(keyword))
    if value is None and _is_multiframe(ds):
        value = _float_or_none(_group_value(ds, macro, keyword))
    return value


def _echo_time(ds: Dataset) -> float | None:
    """Echo time in ms (EchoTime, or EffectiveEchoTime for enhanced MR)."""
    value = _float_or_none(ds.get("EchoTime"))
    if value is None and _is_multiframe(ds):
        value = _float_or_none(_group_value(ds, "MREchoSequence", "EffectiveEchoTime"))
    return value


def _inversion_time(ds: Dataset) -> float | None:
    """Inversion time in ms (InversionTime, or InversionTimes for enhanced MR)."""
    value = _float_or_none(ds.get("InversionTime"))
    if value is None and _is_multiframe(ds):
        value = _float_or_none(_group_value(ds, "MRModifierSequence", "InversionTimes"))
    return value


def _scanning_sequence(ds: Dataset) -> tuple[str, ...]:
    """ScanningSequence codes (SE, GR, IR, EP...); derived from EchoPulseSequence
    and InversionRecovery for enhanced MR, which has no ScanningSequence."""
    codes = _strings(ds.get("ScanningSequence"))
    if codes or not _is_multiframe(ds):
        return codes
    pulse = str(ds.get("EchoPulseSequence", "") or "").upper()
    derived = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}.get(pulse, ())
    if str(_group_value(ds, "MRModifierSequence", "InversionRecovery") or "").upper() == "YES":
        derived += ("IR",)
    return derived


def _first_contrast_agent(datasets: Iterable[Dataset]) -> str | None:
    """First non-empty contrast agent name over the instances of a series."""
    for ds in datasets:
        agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
        if not agent:
            seq = ds.get("ContrastBolusAgentSequence")
            if seq:
                item = seq[0]
                agent = str(item.get("CodeMeaning", "") or item.get("CodeValue", "") or "").strip()
        if agent and agent.upper() not in ("NONE", "NO", "N/A", "NA", "-"):
            return agent
    return None


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


class RulesError(ValueError):
    """The series-selection rules file is invalid; the message names the field."""


@dataclass(frozen=True)
class ParameterRange:
    """Inclusive range for a sequence parameter (ms); None means unbounded."""

    min: float | None = None
    max: float | None = None

    def violation(self, short_name: str, value: float) -> str | None:
        """Reason the value is out of range (``'TI 900 ms < 1500 ms'``), else None."""
        if self.min is not None and value < self.min:
            return f"{short_name} {value:g} ms < {self.min:g} ms"
        if self.max is not None and value > self.max:
            return f"{short_name} {value:g} ms > {self.max:g} ms"
        return None

    def describe(self, short_name: str) -> str:
        """``'TI >= 1500 ms'`` style text."""
        parts = []
        if self.min is not None:
            parts.append(f"{short_name} >= {self.min:g} ms")
        if self.max is not None:
            parts.append(f"{short_name} <= {self.max:g} ms")
        return " and ".join(parts)


@dataclass(frozen=True)
class RoleRule:
    """Rule for one role (T1, T1c, T2, FLAIR...). Times in ms, thickness in mm."""

    key: str
    label: str
    #: True: every study needs this role (site policy). None (the default) or
    #: False: needed when the caller says so (``select_series``'s ``required``:
    #: the segmentation backend's roles plus the reference role).
    required: bool | None
    description_include: tuple[re.Pattern[str], ...]
    description_exclude: tuple[re.Pattern[str], ...]
    contrast: str
    inversion: str
    parameters: Mapping[str, ParameterRange]
    min_instances: int
    max_slice_thickness_mm: float | None
    allow_derived: bool
    image_type_exclude: frozenset[str]

    def describe(self) -> str:
        """One-line human description of the rule, for error messages."""
        parts = []
        if self.description_include:
            parts.append("description matches " + " or ".join(
                f"'{p.pattern}'" for p in self.description_include))
        if self.description_exclude:
            parts.append("not " + " or ".join(f"'{p.pattern}'" for p in self.description_exclude))
        if self.contrast == "required":
            parts.append("post-contrast")
        elif self.contrast == "forbidden":
            parts.append("without contrast")
        if self.inversion == "required":
            parts.append("inversion recovery")
        elif self.inversion == "forbidden":
            parts.append("no inversion pulse")
        parts.extend(rng.describe(_PARAMETER_NAMES[name]) for name, rng in self.parameters.items())
        if not self.allow_derived:
            parts.append("original (not DERIVED) images")
        parts.append(f">= {self.min_instances} images")
        if self.max_slice_thickness_mm is not None:
            parts.append(f"slices <= {self.max_slice_thickness_mm:g} mm")
        return f"{self.label}: " + ", ".join(parts)


@dataclass(frozen=True)
class SelectionRules:
    """All series-selection rules: global exclusions plus one RoleRule per role."""

    roles: Mapping[str, RoleRule]
    modalities: frozenset[str]
    description_exclude: tuple[re.Pattern[str], ...]
    contrast_description: re.Pattern[str] | None
    pre_contrast_description: re.Pattern[str] | None
    missing_parameter: str = "pass"
    source: str = "<dict>"

    def label(self, role: str) -> str:
        """Conventional label of a role key ('flair' -> 'FLAIR')."""
        rule = self.roles.get(role)
        return rule.label if rule else ROLE_LABELS.get(role, role.upper())

    def describe(self) -> list[str]:
        """One line per role describing what it requires."""
        return [rule.describe() for rule in self.roles.values()]


_TOP_KEYS = {"version", "defaults", "roles"}
_DEFAULT_KEYS = {
    "modalities", "allow_derived", "image_type_exclude", "description_exclude",
    "min_instances", "max_slice_thickness_mm", "contrast_description",
    "pre_contrast_description", "missing_parameter",
}
_ROLE_KEYS = {
    "label", "required", "description_include", "description_exclude", "contrast",
    "inversion", "parameters", "min_instances", "max_slice_thickness_mm",
    "allow_derived", "image_type_exclude",
}


def load_rules(path: Path | None = None) -> SelectionRules:
    """Load and validate series-selection rules from YAML.

    ``path=None`` loads the packaged default ``brainline/config/series_rules.yaml``.
    Raises :class:`RulesError` naming the file and the offending field.
    """
    if path is None:
        resource = resources.files("brainline.config").joinpath("series_rules.yaml")
        text, source = resource.read_text(encoding="utf-8"), "brainline.config/series_rules.yaml"
    else:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RulesError(f"cannot read series rules {path}: {exc}") from exc
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}") from exc
    return rules_from_dict(data, source=source)


def rules_from_dict(data: Any, source: str = "<dict>") -> SelectionRules:
    """Validate a parsed rules mapping (same schema as the YAML) into SelectionRules."""
    ctx = _Ctx(source)
    ctx.mapping(data, "", _TOP_KEYS)
    version = data.get("version", 1)
    if version != 1:
        ctx.fail("version", f"unsupported version {version!r} (expected 1)")
    defaults = data.get("defaults") or {}
    ctx.mapping(defaults, "defaults", _DEFAULT_KEYS)
    roles_data = data.get("roles")
    if not isinstance(roles_data, Mapping) or not roles_data:
        ctx.fail("roles", "must be a non-empty mapping of role name -> rule")
    base = {
        "min_instances": ctx.integer(defaults.get("min_instances", 1), "defaults.min_instances"),
        "max_slice_thickness_mm": ctx.number_or_none(
            defaults.get("max_slice_thickness_mm"), "defaults.max_slice_thickness_mm"),
        "allow_derived": ctx.boolean(defaults.get("allow_derived", False), "defaults.allow_derived"),
        "image_type_exclude": ctx.string_list(
            defaults.get("image_type_exclude", []), "defaults.image_type_exclude"),
    }
    roles = {
        str(key): _role_from_dict(str(key), value, base, ctx)
        for key, value in roles_data.items()
    }
    missing_parameter = defaults.get("missing_parameter", "pass")
    if missing_parameter not in ("pass", "fail"):
        ctx.fail("defaults.missing_parameter", f"must be 'pass' or 'fail', got {missing_parameter!r}")
    return SelectionRules(
        roles=roles,
        modalities=frozenset(m.upper() for m in ctx.string_list(
            defaults.get("modalities", ["MR"]), "defaults.modalities")),
        description_exclude=ctx.patterns(
            defaults.get("description_exclude", []), "defaults.description_exclude"),
        contrast_description=ctx.pattern_or_none(
            defaults.get("contrast_description"), "defaults.contrast_description"),
        pre_contrast_description=ctx.pattern_or_none(
            defaults.get("pre_contrast_description"), "defaults.pre_contrast_description"),
        missing_parameter=missing_parameter,
        source=source,
    )


def _role_from_dict(key: str, data: Any, base: Mapping[str, Any], ctx: _Ctx) -> RoleRule:
    """Validate one ``roles.<key>`` entry; unset limits inherit from defaults."""
    where = f"roles.{key}"
    ctx.mapping(data, where, _ROLE_KEYS)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
        ctx.fail(where, "role names must be lower-case identifiers such as 't1c'")
    include = ctx.patterns(data.get("description_include", []), f"{where}.description_include")
    if not include:
        ctx.fail(f"{where}.description_include", "needs at least one pattern")
    contrast = data.get("contrast", "any")
    if contrast not in _CONTRAST_MODES:
        ctx.fail(f"{where}.contrast", f"must be one of {', '.join(_CONTRAST_MODES)}; got {contrast!r}")
    inversion = data.get("inversion", "any")
    if inversion not in _INVERSION_MODES:
        ctx.fail(f"{where}.inversion", f"must be one of {', '.join(_INVERSION_MODES)}; got {inversion!r}")
    return RoleRule(
        key=key,
        label=str(data.get("label") or ROLE_LABELS.get(key, key.upper())),
        required=None if data.get("required") is None else ctx.boolean(data["required"], f"{where}.required"),
        description_include=include,
        description_exclude=ctx.patterns(data.get("description_exclude", []),
                                         f"{where}.description_exclude"),
        contrast=contrast,
        inversion=inversion,
        parameters=_parameters_from_dict(data.get("parameters") or {}, f"{where}.parameters", ctx),
        min_instances=ctx.integer(data.get("min_instances", base["min_instances"]),
                                  f"{where}.min_instances"),
        max_slice_thickness_mm=ctx.number_or_none(
            data.get("max_slice_thickness_mm", base["max_slice_thickness_mm"]),
            f"{where}.max_slice_thickness_mm"),
        allow_derived=ctx.boolean(data.get("allow_derived", base["allow_derived"]),
                                  f"{where}.allow_derived"),
        image_type_exclude=frozenset(v.upper() for v in ctx.string_list(
            data.get("image_type_exclude", base["image_type_exclude"]),
            f"{where}.image_type_exclude")),
    )


def _parameters_from_dict(data: Any, where: str, ctx: _Ctx) -> dict[str, ParameterRange]:
    """Validate ``parameters: {inversion_time: {min: 1500}}`` (ms)."""
    ctx.mapping(data, where, set(_PARAMETER_NAMES))
    out = {}
    for name, spec in data.items():
        ctx.mapping(spec, f"{where}.{name}", {"min", "max"})
        rng = ParameterRange(ctx.number_or_none(spec.get("min"), f"{where}.{name}.min"),
                             ctx.number_or_none(spec.get("max"), f"{where}.{name}.max"))
        if rng.min is None and rng.max is None:
            ctx.fail(f"{where}.{name}", "needs min and/or max (ms)")
        if rng.min is not None and rng.max is not None and rng.min > rng.max:
            ctx.fail(f"{where}.{name}", f"min {rng.min:g} is larger than max {rng.max:g}")
        out[name] = rng
    return out


class _Ctx:
    """Validation helpers that raise RulesError prefixed with source and field path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str) -> None:
        """Raise RulesError for field ``where``."""
        field_name = where or "top level"
        raise RulesError(f"invalid series rules ({self.source}): {field_name}: {message}")

    def mapping(self, value: Any, where: str, allowed: set[str]) -> None:
        """Require a mapping whose keys are all in ``allowed``."""
        if not isinstance(value, Mapping):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            self.fail(where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, got {value!r}")
        return value

    def integer(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(where, f"expected a non-negative integer, got {value!r}")
        return value

    def number_or_none(self, value: Any, where: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            self.fail(where, f"expected a non-negative number, got {value!r}")
        return float(value)

    def string_list(self, value: Any, where: str) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(where, f"expected a list of strings, got {value!r}")
        return list(value)

    def patterns(self, value: Any, where: str) -> tuple[re.Pattern[str], ...]:
        return tuple(self._compile(p, f"{where}[{i}]")
                     for i, p in enumerate(self.string_list(value, where)))

    def pattern_or_none(self, value: Any, where: str) -> re.Pattern[str] | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.fail(where, f"expected a regular expression string, got {value!r}")
        return self._compile(value, where)

    def _compile(self, pattern: str, where: str) -> re.Pattern[str]:
        try:
            return re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            self.fail(where, f"invalid regular expression {pattern!r}: {exc}")
            raise  # unreachable; keeps type checkers happy


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def contrast_evidence(series: SeriesHeader, rules: SelectionRules) -> tuple[bool, str]:
    """(post-contrast?, why) from ContrastBolusAgent and the description.

    An explicit pre-contrast description ("pre", "non-contrast", "w/o")
    wins over a filled-in ContrastBolusAgent, since some sites set the agent
    on every series of the exam.
    """
    text = series.match_text
    pre = rules.pre_contrast_description.search(text) if rules.pre_contrast_description else None
    if pre:
        return False, f"description says pre-contrast ('{pre.group(0)}')"
    if series.contrast_agent:
        return True, f"ContrastBolusAgent '{series.contrast_agent}'"
    post = rules.contrast_description.search(text) if rules.contrast_description else None
    if post:
        return True, f"description says post-contrast ('{post.group(0)}')"
    return False, "no ContrastBolusAgent and no post-contrast words in the description"


def has_inversion(series: SeriesHeader) -> bool:
    """True when the sequence has an inversion pulse.

    ScanningSequence (IR present or not) decides when the header has it;
    otherwise an InversionTime > 0 ms counts as an inversion pulse.
    """
    if series.scanning_sequence:
        return "IR" in series.scanning_sequence
    return bool(series.inversion_time and series.inversion_time > 0)


def evaluate_role(series: SeriesHeader, role: RoleRule, rules: SelectionRules) -> list[str]:
    """Reasons why ``series`` cannot fill ``role``; an empty list means it matches."""
    reasons = _generic_rejections(series, role, rules)
    reasons += _description_rejections(series, role)
    reasons += _contrast_rejections(series, role, rules)
    reasons += _sequence_rejections(series, role, rules)
    return reasons


def _generic_rejections(series: SeriesHeader, role: RoleRule, rules: SelectionRules) -> list[str]:
    """Modality, DERIVED/localizer/reformat, global description exclusions, size limits."""
    reasons = []
    if rules.modalities and series.modality not in rules.modalities:
        reasons.append(f"modality {series.modality or '(none)'} is not {'/'.join(sorted(rules.modalities))}")
    if series.is_derived and not role.allow_derived:
        reasons.append("ImageType is DERIVED")
    bad_types = [v for v in series.image_type if v in role.image_type_exclude]
    if bad_types:
        reasons.append(f"ImageType contains {'/'.join(bad_types)}")
    for pattern in rules.description_exclude:
        hit = pattern.search(series.match_text)
        if hit:
            reasons.append(f"description contains '{hit.group(0)}' (never selected)")
            break
    if series.n_images < role.min_instances:
        reasons.append(f"only {series.n_images} images (< {role.min_instances})")
    limit = role.max_slice_thickness_mm
    if limit is not None and series.slice_thickness is not None and series.slice_thickness > limit:
        reasons.append(f"slice thickness {series.slice_thickness:g} mm > {limit:g} mm")
    return reasons


def _description_rejections(series: SeriesHeader, role: RoleRule) -> list[str]:
    """Role-specific include / exclude description patterns."""
    text = series.match_text
    if not any(p.search(text) for p in role.description_include):
        wanted = " or ".join(p.pattern for p in role.description_include)
        return [f"description does not match {wanted}"]
    for pattern in role.description_exclude:
        hit = pattern.search(text)
        if hit:
            return [f"description contains '{hit.group(0)}' (excluded for {role.label})"]
    return []


def _contrast_rejections(series: SeriesHeader, role: RoleRule, rules: SelectionRules) -> list[str]:
    """Post-contrast required / forbidden."""
    if role.contrast == "any":
        return []
    post, why = contrast_evidence(series, rules)
    if role.contrast == "required" and not post:
        return [f"not post-contrast ({why})"]
    if role.contrast == "forbidden" and post:
        return [f"post-contrast ({why})"]
    return []


def _sequence_rejections(series: SeriesHeader, role: RoleRule, rules: SelectionRules) -> list[str]:
    """Inversion pulse and TR/TE/TI ranges (ms)."""
    reasons = []
    inverted = has_inversion(series)
    if role.inversion == "forbidden" and inverted:
        ti = f", TI {series.inversion_time:g} ms" if series.inversion_time else ""
        reasons.append(f"inversion-recovery sequence{ti}")
    if role.inversion == "required" and not inverted:
        reasons.append("no inversion pulse")
    for name, rng in role.parameters.items():
        short = _PARAMETER_NAMES[name]
        value = getattr(series, name)
        if value is None:
            if rules.missing_parameter == "fail":
                reasons.append(f"{short} not in the header")
            continue
        problem = rng.violation(short, value)
        if problem:
            reasons.append(problem)
    return reasons


def preference_key(series: SeriesHeader) -> tuple:
    """Sort key, larger is better: 3D, thinner slices, more images, later series number."""
    thickness = series.slice_thickness if series.slice_thickness is not None else math.inf
    return (series.is_3d, -thickness, series.n_images,
            series.series_number if series.series_number is not None else -1)


def _why_preferred(winner: SeriesHeader, loser: SeriesHeader) -> str:
    """Which preference criterion made ``winner`` beat ``loser``."""
    if winner.is_3d != loser.is_3d:
        return "3D acquisition"
    if winner.slice_thickness != loser.slice_thickness:
        return f"thinner slices ({_mm(winner.slice_thickness)} vs {_mm(loser.slice_thickness)})"
    if winner.n_images != loser.n_images:
        return f"more images ({winner.n_images} vs {loser.n_images})"
    return "later series number"


def _mm(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g} mm"


# ---------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------


@dataclass
class SelectionResult:
    """Chosen series per role plus the reasoning for every series considered."""

    roles: dict[str, SeriesHeader]
    considered: list[dict[str, Any]]
    missing_optional: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary (no file lists)."""
        return {
            "roles": {role: s.to_dict(include_files=False) for role, s in self.roles.items()},
            "missing_optional": list(self.missing_optional),
            "considered": [dict(entry) for entry in self.considered],
        }


class MissingSeriesError(Exception):
    """A required role (e.g. FLAIR) has no acceptable series.

    ``missing_roles`` holds role keys ('flair'), ``considered`` the same
    per-series entries as :attr:`SelectionResult.considered`, ``rules_tried``
    one line per missing role. ``str()`` is a sentence for a PACS administrator.
    """

    def __init__(self, missing_roles: Sequence[str], considered: Sequence[Mapping[str, Any]],
                 rules_tried: Sequence[str] = (), labels: Mapping[str, str] | None = None,
                 needed_because: Mapping[str, str] | None = None):
        super().__init__(list(missing_roles), list(considered), list(rules_tried), dict(labels or {}),
                         dict(needed_because or {}))
        self.missing_roles = list(missing_roles)
        self.considered = list(considered)
        self.rules_tried = list(rules_tried)
        self.labels = dict(labels or {})
        #: role -> why the study needs it ("the segmentation model (baseline) needs it")
        self.needed_because = dict(needed_because or {})

    def label(self, role: str) -> str:
        """Conventional label for a role key."""
        return self.labels.get(role) or ROLE_LABELS.get(role, role.upper())

    def __str__(self) -> str:
        wanted = _join_or([self.label(r) for r in self.missing_roles])
        why = [f"{self.label(r)}: {self.needed_because[r]}" for r in self.missing_roles
               if self.needed_because.get(r)]
        message = f"no {wanted} series found" + (f" ({'; '.join(why)})" if why else "") + "; series considered: "
        if self.considered:
            message += ", ".join(self._describe_entry(e) for e in self.considered)
        else:
            message += "none (the study holds no image series)"
        if self.rules_tried:
            message += "; rules tried: " + "; ".join(self.rules_tried)
        return message

    def _describe_entry(self, entry: Mapping[str, Any]) -> str:
        """``#5 'AX T2 FSE' (selected as T2; not FLAIR: reason)``."""
        notes = []
        if entry.get("selected_as"):
            notes.append(f"selected as {entry['selected_as']}")
        else:
            matched = [v["label"] for v in entry.get("roles", {}).values() if v.get("matched")]
            if matched:
                notes.append("matched " + "/".join(matched))
        for role in self.missing_roles:
            verdict = entry.get("roles", {}).get(role)
            if verdict and not verdict.get("matched"):
                notes.append(f"not {self.label(role)}: {'; '.join(verdict['reasons'])}")
            elif verdict:
                notes.append(f"{self.label(role)}: {verdict['why']}")
        number = "?" if entry.get("series_number") is None else entry["series_number"]
        return f"#{number} '{entry.get('description') or '(no description)'}' ({'; '.join(notes)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form for the job store."""
        return {"error": "missing_series", "message": str(self),
                "missing_roles": [self.label(r) for r in self.missing_roles],
                "needed_because": {self.label(r): w for r, w in self.needed_because.items()},
                "considered": self.considered, "rules_tried": self.rules_tried}


def _join_or(words: list[str]) -> str:
    """'A', 'A or B', 'A, B or C'."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def select_series(series: list[SeriesHeader], rules: SelectionRules,
                  required: Iterable[str] | None = None,
                  needed_because: Mapping[str, str] | None = None) -> SelectionResult:
    """Pick one series per role following ``rules``.

    Matching series are ranked by :func:`preference_key`; a series fills at
    most one role. Roles with the fewest candidates are filled first (ties in
    rules order), so a series that fits two roles goes where it is needed.

    A role is required when its rule says ``required: true`` or when it is in
    ``required`` (the roles the segmentation backend needs plus the reference
    role); with ``required`` None, every rule not marked ``required: false``
    counts as required. Raises :class:`MissingSeriesError` when a
    required role stays empty (``needed_because``: role -> why, for the
    message); other missing roles are listed in ``missing_optional``.
    """
    wanted = None if required is None else set(required)
    verdicts = {s.key: {k: evaluate_role(s, r, rules) for k, r in rules.roles.items()}
                for s in series}
    candidates = {
        key: sorted((s for s in series if not verdicts[s.key][key]),
                    key=preference_key, reverse=True)
        for key in rules.roles
    }
    chosen = _assign(candidates, list(rules.roles))
    considered = [_considered_entry(s, verdicts[s.key], chosen, candidates, rules)
                  for s in series]
    missing = [k for k in rules.roles if k not in chosen]
    missing_required = [k for k in missing if _is_required(rules.roles[k], wanted)]
    if missing_required:
        raise MissingSeriesError(
            missing_required, considered,
            rules_tried=[rules.roles[k].describe() for k in missing_required],
            labels={k: r.label for k, r in rules.roles.items()},
            needed_because={k: w for k, w in (needed_because or {}).items() if k in missing_required},
        )
    roles = {k: chosen[k] for k in rules.roles if k in chosen}
    return SelectionResult(roles=roles, considered=considered, missing_optional=missing)


def _is_required(rule: RoleRule, wanted: set[str] | None) -> bool:
    if wanted is None:
        return rule.required is not False
    return bool(rule.required) or rule.key in wanted


def _assign(candidates: Mapping[str, list[SeriesHeader]], order: list[str]) -> dict[str, SeriesHeader]:
    """Greedy one-series-per-role assignment, most constrained role first."""
    taken: set[str] = set()
    chosen: dict[str, SeriesHeader] = {}
    for key in sorted(order, key=lambda k: (len(candidates[k]), order.index(k))):
        for s in candidates[key]:
            if s.series_uid not in taken:
                chosen[key] = s
                taken.add(s.series_uid)
                break
    return chosen


def _considered_entry(series: SeriesHeader, verdicts: Mapping[str, list[str]],
                      chosen: Mapping[str, SeriesHeader],
                      candidates: Mapping[str, list[SeriesHeader]],
                      rules: SelectionRules) -> dict[str, Any]:
    """Per-series record: what it is, and for every role why it was or wasn't used."""
    selected_as = next((rules.label(k) for k, s in chosen.items() if s.key == series.key), None)
    used_as = selected_as or next((rules.label(k) for k, s in chosen.items()   # another echo of it
                                   if s.series_uid == series.series_uid), None)
    roles = {}
    for key, reasons in verdicts.items():
        label = rules.label(key)
        if reasons:
            roles[key] = {"label": label, "matched": False, "selected": False,
                          "why": "rejected: " + "; ".join(reasons), "reasons": list(reasons)}
            continue
        winner = chosen.get(key)
        if winner is not None and winner.key == series.key:
            why = "selected"
        elif used_as is not None:
            why = f"matched, but already used as {used_as}"
        elif winner is not None:
            why = f"matched, but {winner.display_name} preferred ({_why_preferred(winner, series)})"
        else:
            why = "matched, not used"
        roles[key] = {"label": label, "matched": True, "selected": why == "selected",
                      "why": why, "reasons": []}
    return {
        "series_number": series.series_number,
        "description": series.description or series.protocol_name,
        "series_uid": series.series_uid,
        "n_images": series.n_images,
        "mr_acquisition_type": series.mr_acquisition_type,
        "slice_thickness_mm": series.slice_thickness,
        "selected_as": selected_as,
        "roles": roles,
    } | ({"echo_number": series.echo_number} if series.echo_number is not None else {})
