"""Typed records of what the image stages hand on, and the JSON files they live in.

Every stage of the image pipeline writes one JSON file into the workspace,
named after the stage (``<stage>.json``, :func:`stage_file`; see
pipelines/stage_table.py and pipelines/image_pipeline.py) and later stages, the
result builders, the service and ``brainline process`` read them back. The
records below are those files' one definition: a stage builds its record and
writes ``record.to_json()``; a reader calls ``Record.from_json(data)`` (or
:func:`read_record`) and uses attributes instead of string keys.

============================  =========================  ==================================
record                        file                       written by the stage
============================  =========================  ==================================
:class:`SeriesSelection`      ``select_series.json``     ``select_series`` (pipelines/inputs.py)
(conversion per role)         ``convert.json``           ``convert``
:class:`RegistrationRecord`   ``register.json``          ``register``
:class:`SkullStripRecord`     ``skull_strip.json``       ``skull_strip``
:class:`BiasCorrectionRecord` ``bias_correct.json``      ``bias_correct``
:class:`SegmentRecord`        ``segment.json``           ``segment`` (with :class:`ModelSpaceRecord`)
:class:`Summary`              ``summary.json``           ``summary`` (QC sections:
                                                         :class:`ImageQCSection`,
                                                         :class:`SegmentationQCSection`)
:class:`ResultsRecord`        ``build_outputs.json``     ``build_outputs`` (pipelines/results.py)
============================  =========================  ==================================

Workspaces written before the files were named after their stages
(``selection.json``, ``registration.json``, ``bias_correction.json``,
``results.json``) are brought up to date by :func:`migrate_workspace`
(renames in place), which the service and ``brainline process`` call before
a stage runs and the prior-study reuse calls before it copies.

Rules shared by every record (:class:`Record`):

* frozen dataclasses; every field has a default, so a file that lacks a key
  (an older workspace, a test's hand-written summary) still loads;
* ``to_json()`` writes the keys in field order, the order today's files have,
  so a file written from a record is byte-identical to one written before the
  records existed; keys marked ``omit_none`` are left out while ``None``
  (optional keys such as ``model_space`` in ``segment.json``);
* keys a record does not know are kept in ``extra`` and written back after the
  known ones: reading and rewriting a file loses nothing;
* values go through :func:`.jsonable.jsonable` (numpy scalars to Python,
  non-finite floats to ``null``).

Units are in each field's comment: volumes in mL (``_ml``) or mm³
(``_mm3``), lengths in mm, times in seconds (``_s``), positions in LPS mm.
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Self, TypeVar

from .jsonable import jsonable
from .roles import ROLE_LABELS

__all__ = [
    "Record", "read_record", "write_record", "read_json",
    "InputsRecord", "SeriesSelection",
    "SequenceRegistration", "RegistrationRecord", "SkullStripRecord", "SequenceBiasCorrection",
    "BiasCorrectionRecord", "ModelSpaceRecord", "SegmentRecord",
    "ImageQCSeries", "ImageQCSection", "SegmentationQCSection",
    "TumourComponent", "SequenceQC", "SkullStripSummary", "SegmentationProvenance", "Backends", "Summary",
    "ResultObject", "ObjectFailure", "ResultsRecord",
    "SELECTION_FILE", "REGISTRATION_FILE", "SKULL_STRIP_FILE", "BIAS_CORRECTION_FILE", "SEGMENT_FILE",
    "SUMMARY_FILE", "RESULTS_FILE", "CONVERT_FILE", "stage_file", "LEGACY_FILES", "migrate_workspace",
    "existing_file",
]


def stage_file(stage: str) -> str:
    """The workspace file of a stage's record: ``<stage>.json``."""
    return f"{stage}.json"


SELECTION_FILE = stage_file("select_series")
CONVERT_FILE = stage_file("convert")
REGISTRATION_FILE = stage_file("register")
SKULL_STRIP_FILE = stage_file("skull_strip")
BIAS_CORRECTION_FILE = stage_file("bias_correct")
SEGMENT_FILE = stage_file("segment")
SUMMARY_FILE = stage_file("summary")
RESULTS_FILE = stage_file("build_outputs")

#: Record files of workspaces written before the files were named after their
#: stages (new name -> old name).
LEGACY_FILES = {SELECTION_FILE: "selection.json", REGISTRATION_FILE: "registration.json",
                BIAS_CORRECTION_FILE: "bias_correction.json", RESULTS_FILE: "results.json"}


def migrate_workspace(work: Path) -> list[str]:
    """Rename a workspace's record files from their old names to their stage
    names (:data:`LEGACY_FILES`), where only the old one exists; returns the
    new names it wrote. Idempotent; a workspace already up to date is left
    alone."""
    done = []
    for new, old in LEGACY_FILES.items():
        if (work / old).is_file() and not (work / new).exists():
            os.replace(work / old, work / new)
            done.append(new)
    return done

#: Field metadata: leave the key out of ``to_json()`` while the value is None.
OMIT_NONE = {"omit_none": True}

R = TypeVar("R", bound="Record")


# --------------------------------------------------------------------------- base


@dataclass(frozen=True)
class Record:
    """Base of the records: JSON in and out by field (see the module doc)."""

    #: keys of the file this record does not know, kept as they were
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The file's content: known keys in field order, then ``extra``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _encode(value)
        for key, value in self.extra.items():
            out.setdefault(key, jsonable(value))
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Self:
        """The record of ``data`` (a file's content; None or {} gives the
        defaults). Nested records are built by their field types; unknown keys
        go to ``extra``. TypeError when ``data`` is not a mapping."""
        if data is None:
            data = {}
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__} needs a JSON object, not {type(data).__name__}")
        hints = _hints(cls)
        known = {f.name for f in fields(cls) if f.name != "extra"}
        kwargs = {name: _decode(hints[name], data[name]) for name in known if name in data}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (dataclasses.replace)."""
        return replace(self, **changes)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _record_type(tp: Any) -> type[Record] | None:
    return tp if isinstance(tp, type) and issubclass(tp, Record) else None


def _decode(tp: Any, value: Any) -> Any:
    """``value`` (JSON) as field type ``tp``: nested records built, the rest as it is."""
    if value is None:
        return None
    record = _record_type(tp)
    if record is not None:
        return record.from_json(value) if isinstance(value, Mapping) else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and (_record_type(arg) or typing.get_origin(arg)):
                return _decode(arg, value)
        return value
    if origin is dict and len(args) == 2 and isinstance(value, Mapping):
        return {k: _decode(args[1], v) for k, v in value.items()}
    if origin is list and args and isinstance(value, (list, tuple)):
        return [_decode(args[0], v) for v in value]
    return value


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return jsonable(value)


def existing_file(path: Path) -> Path:
    """``path``, or its old name (:data:`LEGACY_FILES`) when only that exists
    (a workspace written before the files were named after their stages)."""
    path = Path(path)
    old = LEGACY_FILES.get(path.name)
    if old and not path.exists() and (path.parent / old).exists():
        return path.parent / old
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A workspace JSON file's content (under its old name in an older
    workspace, :func:`existing_file`); {} when it is missing or not JSON."""
    try:
        data = json.loads(existing_file(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_record(cls: type[R], path: Path) -> R:
    """The record of a workspace file (defaults when the file is missing or unreadable)."""
    return cls.from_json(read_json(path))


def write_record(path: Path, record: Record | Mapping[str, Any]) -> None:
    """Write a record (or its JSON) to ``path`` atomically (temporary file,
    then rename), indented by 2 as every workspace file."""
    data = record.to_json() if isinstance(record, Record) else dict(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _list() -> Any:
    return field(default_factory=list)


def _dict() -> Any:
    return field(default_factory=dict)


# --------------------------------------------------------------------------- series selection


@dataclass(frozen=True)
class InputsRecord(Record):
    """What the segmentation gets (``select_series.json["inputs"]``, copied to
    ``summary.json["inputs"]``); role keys (t1, t1c, t2, flair)."""

    backend: str | None = None           # segmentation backend name
    reference: str | None = None         # role whose grid every result lies on
    required: list[str] = _list()        # roles the backend needs
    optional: list[str] = _list()        # roles it can use
    used: list[str] = _list()            # roles it got
    missing: list[str] = _list()         # roles of the site's rules with no series used
    dropped: dict[str, str] = _dict()    # role -> why its series was left out
    note: str | None = None              # sentence for the SR and the PDF, None when nothing is missing


@dataclass(frozen=True)
class SeriesSelection(Record):
    """``select_series.json``: the series chosen per role and why.

    ``roles``: role -> series header (``SeriesHeader.to_dict()``: series_uid,
    series_number, description, protocol_name, slice_thickness_mm (mm),
    repetition_time_ms / echo_time_ms / inversion_time_ms (ms), ...);
    ``files``: role -> instance files, relative to the workspace when inside
    it, absolute otherwise (``brainline process`` reads its input in place)."""

    roles: dict[str, dict[str, Any]] = _dict()
    missing_optional: list[str] = _list()
    considered: list[dict[str, Any]] = _list()   # every series looked at, with the reasons
    left_out: list[dict[str, Any]] = _list()     # {role, reason[, completeness]} of series not used
    inputs: InputsRecord | None = None
    files: dict[str, list[str]] = _dict()

    @property
    def reference(self) -> str | None:
        """The reference role (from ``inputs``), None when unknown."""
        return self.inputs.reference if self.inputs else None

    def description(self, role: str) -> str:
        """SeriesDescription of the series selected for ``role`` ("" when none)."""
        info = self.roles.get(role)
        return str(info.get("description", "") or "") if isinstance(info, Mapping) else ""

    def files_of(self, role: str, work: Path) -> list[Path]:
        """The instance files of ``role`` as paths (KeyError when the role has no series)."""
        return [Path(work) / f for f in self.files[role]]

    def without_files(self) -> dict[str, Any]:
        """The JSON without ``files`` (what the job store keeps)."""
        return {k: v for k, v in self.to_json().items() if k != "files"}


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class SequenceRegistration(Record):
    """One sequence of ``register.json``: ``{"reference": true}`` for the
    reference, else ``RegistrationResult.to_dict()`` of pipelines/registration.py
    (transform fixed -> moving, LPS mm; metrics are Mattes MI, lower is better)."""

    reference: bool = False               # the reference sequence (nothing registered)
    moving_name: str | None = None
    fixed_name: str | None = None
    transform_type: str | None = None     # "rigid" | "affine"
    direction: str | None = None
    final_metric: float | None = None
    initial_metric: float | None = None
    identity_metric: float | None = None
    final_metric_eval: float | None = None
    initializer_used: str | None = None
    swapped: bool | None = None
    iterations: int | None = None
    iterations_per_level: list[int] | None = None
    stop_reason: str | None = None
    converged: bool | None = None
    parameters: dict[str, Any] | None = None   # translation_mm, euler_xyz_deg, ...
    quality: dict[str, Any] | None = None      # coverage, foreground_dice, nmi, ...
    flags: list[str] = _list()                 # "code: words" reasons the result looks implausible
    elapsed_s: float | None = None
    config: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.reference:
            return {"reference": True, **{k: jsonable(v) for k, v in self.extra.items()}}
        out = super().to_json()
        out.pop("reference")
        return out

    def summary_entry(self) -> SequenceQC:
        """The sequence's entry of ``summary.json["registration"]``."""
        if self.reference:
            return SequenceQC(reference=True)
        return SequenceQC(final_metric=self.final_metric, converged=self.converged,
                          parameters=self.parameters, quality=self.quality, flags=list(self.flags))


@dataclass(frozen=True)
class RegistrationRecord(Record):
    """``register.json``: every sequence registered to the reference.
    ``flags``: the sequences' flags prefixed with their label ("FLAIR: ...")."""

    reference: str | None = None
    sequences: dict[str, SequenceRegistration] = _dict()
    flags: list[str] = _list()
    elapsed_s: float | None = field(default=None, metadata=OMIT_NONE)

    @staticmethod
    def labelled_flags(sequences: Mapping[str, SequenceRegistration]) -> list[str]:
        """"FLAIR: flag" for every flag of every sequence, in sequence order."""
        return [f"{ROLE_LABELS.get(role, role)}: {flag}" for role, seq in sequences.items() for flag in seq.flags]


# --------------------------------------------------------------------------- skull stripping, N4


@dataclass(frozen=True)
class SkullStripRecord(Record):
    """``skull_strip.json``: ``SkullStripResult.to_dict()`` of pipelines/skull_strip.py
    plus the sequence the mask was computed on."""

    backend: str | None = None
    backend_version: str | None = None
    already_stripped: bool | None = None      # the input was skull-stripped already (no network ran)
    brain_volume_ml: float | None = None      # mL
    elapsed_s: float | None = None
    evidence: dict[str, Any] = _dict()        # numbers of the stripped-input test, backend details
    flags: list[str] = _list()                # implausible volume, brain cut by the field of view
    mask_size: list[int] | None = None        # voxels (x, y, z)
    mask_spacing_mm: list[float] | None = None
    sequence: str | None = None               # role the mask was computed on


@dataclass(frozen=True)
class SequenceBiasCorrection(Record):
    elapsed_s: float | None = None            # N4 wall time, s


@dataclass(frozen=True)
class BiasCorrectionRecord(Record):
    """``bias_correct.json``: N4 per sequence (inside the brain mask)."""

    sequences: dict[str, SequenceBiasCorrection] = _dict()
    elapsed_s: float | None = field(default=None, metadata=OMIT_NONE)


# --------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class ModelSpaceRecord(Record):
    """How the study was brought into a model's frame (``ModelSpace.record()``
    of pipelines/model_space.py): the template registration's parameters
    (mm, degrees), quality on the common region and flags."""

    space: str | None = None
    template: str | None = None
    grid: dict[str, Any] | None = None        # {"size": voxels, "spacing_mm": mm}
    registered_sequence: str | None = None
    transform: str | None = None
    parameters: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    flags: list[str] = _list()


@dataclass(frozen=True)
class SegmentRecord(Record):
    """``segment.json``: the backend that segmented and how."""

    model_choice: str | None = field(default=None, metadata=OMIT_NONE)   # why "auto" chose this model
    model_space: ModelSpaceRecord | None = field(default=None, metadata=OMIT_NONE)
    candidates: list[str] | None = field(default=None, metadata=OMIT_NONE)  # extra label maps in candidates/
    backend: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    details: dict[str, Any] = _dict()         # the backend's own record (licence, citation, ...)
    elapsed_s: float | None = field(default=None, metadata=OMIT_NONE)


# --------------------------------------------------------------------------- QC sections of the summary


@dataclass(frozen=True)
class ImageQCSeries(Record):
    """One series in ``summary.json["image_qc"]["series"]`` (MRQy metrics on
    its native grid; z against the site and scanner's history)."""

    label: str | None = None
    scanner: str | None = None
    protocol: str | None = None
    metrics: dict[str, float | None] | None = None
    notes: list[str] = _list()
    error: str | None = None
    zero_background: bool = False             # zero-filled background: noise metrics undefined
    z: dict[str, float | None] | None = None  # robust z per metric (None: not compared)
    n_history: int | None = None              # earlier studies compared with
    outliers: list[str] = _list()             # outliers in words


@dataclass(frozen=True)
class ImageQCSection(Record):
    """``summary.json["image_qc"]`` (pipelines/qc_steps.py ``image_qc_section``)."""

    series: dict[str, ImageQCSeries] = _dict()
    history: dict[str, Any] = field(default_factory=lambda: {"compared": False})
    flags: list[str] = _list()                # "iqm_outlier: words"
    outliers: list[str] = _list()             # the outliers of every series, in words


@dataclass(frozen=True)
class SegmentationQCSection(Record):
    """``summary.json["segmentation_qc"]`` (pipelines/qc_steps.py
    ``segmentation_qc_section``): components (mL, LPS mm), plausibility flags,
    discord of the candidate segmentations and the risk score."""

    components: list[dict[str, Any]] = _list()
    component_words: list[str] = _list()
    volumes_ml: dict[str, float] | None = None
    flags: list[str] = _list()                # plausibility: "code: words"
    model: str | None = None
    regions: list[str] | None = None
    candidates: dict[str, Any] | None = None
    dice_to_fusion: dict[str, Any] | None = None
    discord: dict[str, Any] | None = None
    risk_score: int | None = None             # number of discord alarms
    history: dict[str, Any] = field(default_factory=lambda: {"compared": False})


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class TumourComponent(Record):
    """A 26-connected component of the whole tumour."""

    volume_ml: float | None = None            # mL
    centroid_lps_mm: list[float] | None = None
    voxels: int | None = None


@dataclass(frozen=True)
class SequenceQC(Record):
    """A sequence in ``summary.json["registration"]``: ``{}`` for the
    reference, else its registration's figures and flags."""

    reference: bool = False
    final_metric: float | None = None
    converged: bool | None = None
    parameters: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    flags: list[str] = _list()

    def to_json(self) -> dict[str, Any]:
        if self.reference:
            return {k: jsonable(v) for k, v in self.extra.items()}
        out = super().to_json()
        out.pop("reference")
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Self:
        record = super().from_json(data)
        # today's files write the reference as {} (older ones {"reference": true})
        if not data or (isinstance(data, Mapping) and data.get("reference")):
            return replace(record, reference=True)
        return record


@dataclass(frozen=True)
class SkullStripSummary(Record):
    flags: list[str] = _list()
    sequence: str | None = None


@dataclass(frozen=True)
class SegmentationProvenance(Record):
    """``summary.json["backends"]["segmentation"]``: the model and its provenance."""

    backend: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    licence: str | None = field(default=None, metadata=OMIT_NONE)
    citation: str | None = field(default=None, metadata=OMIT_NONE)
    intended_use: str | None = field(default=None, metadata=OMIT_NONE)
    model_choice: str | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True)
class Backends(Record):
    registration: str | None = None
    skull_strip: dict[str, Any] = _dict()     # backend, backend_version, already_stripped
    bias_correction: str | None = None
    segmentation: SegmentationProvenance = field(default_factory=SegmentationProvenance)


@dataclass(frozen=True)
class Summary(Record):
    """``summary.json``: what a job found, the one input of the result objects.

    ``volumes_ml`` (mL) by BraTS 2023 label ("1" NCR, "2" ED, "3" ET) and
    composite ("tumor_core", "whole_tumor"); ``tiv_ml``: total intracranial
    volume (mL); ``qc_flags``: every stage's flags in words (see
    :meth:`flags_by_check`); ``timings_s``: wall time per stage (s)."""

    label_convention: str | None = None
    labels: dict[str, str] = _dict()
    volumes_ml: dict[str, float] = _dict()
    whole_tumor_components: list[TumourComponent] = _list()
    tiv_ml: float | None = None
    reference: str | None = None
    registration: dict[str, SequenceQC] = _dict()
    qc_flags: list[str] = _list()
    image_qc: ImageQCSection | None = None
    segmentation_qc: SegmentationQCSection | None = None
    model_space: ModelSpaceRecord | None = None
    skull_strip: SkullStripSummary = field(default_factory=SkullStripSummary)
    inputs: InputsRecord | None = None
    backends: Backends = field(default_factory=Backends)
    timings_s: dict[str, float | None] = _dict()
    elapsed_s: float | None = field(default=None, metadata=OMIT_NONE)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.inputs is None:          # no select_series.json: written as {} (as before the records)
            out["inputs"] = {}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Self:
        record = super().from_json(data)
        if isinstance(data, Mapping) and not data.get("inputs"):   # {}: no select_series.json
            return replace(record, inputs=None)
        return record

    def flags_by_check(self) -> list[tuple[str, list[str]]]:
        """(QC finding, the flags it reports as they appear in ``qc_flags``)
        for every stage section that carries flags, in report order. The SR
        and the PDF report each of these findings; a flag of ``qc_flags`` that
        none claims is reported as "other checks" (:func:`.results.qc_findings_of`)."""
        checks: list[tuple[str, list[str]]] = []
        for role, reg in sorted(self.registration.items()):
            if not reg.reference:
                checks.append((f"registration {role}",
                               [f"{ROLE_LABELS.get(role, role)}: {f}" for f in reg.flags]))
        checks.append(("skull stripping", list(self.skull_strip.flags)))
        if self.model_space is not None:
            checks.append(("model space registration", [f"model space: {f}" for f in self.model_space.flags]))
        if self.image_qc is not None:
            checks.append(("image quality", list(self.image_qc.flags)))
        if self.segmentation_qc is not None:
            checks.append(("segmentation quality", list(self.segmentation_qc.flags)))
        return checks

    def unclaimed_flags(self) -> list[str]:
        """Flags of ``qc_flags`` no stage section claims (a future stage's)."""
        claimed = {f for _, flags in self.flags_by_check() for f in flags}
        return [f for f in self.qc_flags if f not in claimed]

    @staticmethod
    def collect_flags(registration: RegistrationRecord, skull_strip: SkullStripRecord,
                      model_space: ModelSpaceRecord | None, image_qc: ImageQCSection | None,
                      segmentation_qc: SegmentationQCSection | None) -> list[str]:
        """``qc_flags`` from the stage records: registration ("FLAIR: ..."),
        skull stripping, model space ("model space: ..."), image-quality
        outliers and implausible segmentations (discord alarms rank studies
        for review and stay in the segmentation-QC section)."""
        return (list(registration.flags) + list(skull_strip.flags)
                + [f"model space: {f}" for f in (model_space.flags if model_space else [])]
                + list(image_qc.flags if image_qc else []) + list(segmentation_qc.flags if segmentation_qc else []))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultObject(Record):
    """One DICOM object written by ``build_results`` (``file`` relative to the workspace)."""

    kind: str = ""                            # seg, sr, overlay, pdf, rano, subtraction, lesion_seg, change_sr
    file: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    #: pseudonymous Study Instance UIDs of prior studies the object references (the gateway maps them)
    prior_study_uids: list[str] | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True)
class ObjectFailure(Record):
    """A result object that was not built, and why in words."""

    kind: str = ""
    error: str = ""


@dataclass(frozen=True)
class ResultsRecord(Record):
    """``build_outputs.json``: the result objects of a job, what failed and why.
    ``complete``: SEG and SR were built (else nothing is delivered)."""

    objects: list[ResultObject] = _list()
    segmented: bool = False
    failed: list[ObjectFailure] = _list()
    notes: list[str] = _list()
    complete: bool = True
    #: follow-up only: the prior studies the objects reference (pseudonymous UIDs)
    prior_studies: list[str] | None = field(default=None, metadata=OMIT_NONE)

    def failures(self, *kinds: str, excluding: Iterable[str] = ()) -> list[ObjectFailure]:
        """The failures of ``kinds`` (all when none given), leaving out ``excluding``."""
        skip = set(excluding)
        return [f for f in self.failed if (not kinds or f.kind in kinds) and f.kind not in skip]

    def object_of(self, kind: str) -> ResultObject | None:
        """The first object of ``kind``, None when none was built."""
        return next((o for o in self.objects if o.kind == kind), None)
