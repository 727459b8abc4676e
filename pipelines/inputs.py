"""Series selection and conversion of one study: the part of the pipeline
before the image steps, shared by the service stages (``select_series``,
``convert``) and ``brainline process``.

The roles a study must have depend on the configured segmentation backend:
it declares the roles it needs and the ones it can use
(:func:`brainline.models.registry.input_roles`). Series selection requires the
needed roles plus the reference role (every result lies on its grid) plus any
role the site's rules mark ``required: true``; a study without one raises
:class:`MissingSeriesError` whose message names the role and why it is
needed. A missing role the backend could have used is recorded, and the
summary, SR and PDF say so ("T1 and T2 not found; segmentation used T1c and
FLAIR only").

Every selected series is checked for completeness first
(:mod:`.series_completeness`: instance-number and slice-position gaps,
ImagesInAcquisition) and, for the reference role, for being single-frame
images or one multi-frame instance (the DICOM results are built on it). A series that fails
is left out and selection runs again without it, so a complete duplicate
takes its place. A needed role left without a usable series raises
:class:`IncompleteSeriesError` (a MissingSeriesError) naming the series and
what is missing ("FLAIR series 5 'AX T2 FLAIR 3D' is incomplete: 35 of 155
slices received; instance numbers 36–155 missing"); an optional role is
dropped and the note says why. Conversion refuses a series dcm2niix would
interpolate (``_Eq`` output, :class:`UnequalSpacingError`) the same way.

``select_series.json`` in the working folder is a :class:`.records.SeriesSelection`:
the selection record (:meth:`SelectionResult.to_dict`), ``left_out``,
``inputs`` (:func:`inputs_record`) and ``files`` (role -> instance files,
relative to the working folder when inside it, absolute otherwise: ``brainline
process`` reads its input folder in place).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from brainline.models.base import ROLES, InputRoles
from brainline.models.registry import input_roles, load_backend

from .conversion import UnequalSpacingError, convert_series
from .image_pipeline import PipelineConfig, model_spec
from .records import SELECTION_FILE, InputsRecord, SeriesSelection, existing_file, read_record, write_record
from .roles import ROLE_LABELS
from .series_completeness import IncompleteSeriesError, check_series_files
from .series_selection import (
    MissingSeriesError,
    RulesError,
    SeriesHeader,
    load_rules,
    scan_series,
    select_series,
)

__all__ = ["backend_roles", "inputs_record", "select_inputs", "convert_inputs", "selected_files", "read_selection",
           "join_and", "series_problem", "IncompleteSeriesError"]


def join_and(words: Sequence[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _labels(roles: Iterable[str]) -> list[str]:
    return [ROLE_LABELS.get(r, r) for r in roles]


def backend_roles(cfg: PipelineConfig) -> tuple[str, InputRoles]:
    """(backend name, the roles it needs and can use) of the configured model.
    Constructs the backend (for a model folder: reads its configuration and
    loads it), so a broken model is reported at series selection already."""
    backend = load_backend(model_spec(cfg))
    return backend.name, input_roles(backend)


def inputs_record(selected: Iterable[str], rule_roles: Iterable[str], backend: str,
                  roles: InputRoles, reference: str, dropped: dict[str, str] | None = None) -> dict:
    """What the segmentation gets: ``{"backend", "required", "optional", "used",
    "missing", "dropped", "note"}`` (role keys). ``missing``: roles of the rules
    with no series used; ``dropped``: role -> why its series was left out
    (incomplete); ``note``: a sentence when a role the backend could use is
    missing or dropped, else None."""
    selected = set(selected)
    dropped = {r: why for r, why in (dropped or {}).items() if r not in selected}
    missing = [r for r in rule_roles if r not in selected]
    used = [r for r in roles.usable if r in selected]
    not_found = [r for r in missing if r in roles.usable and r not in dropped]
    parts = []
    if not_found:
        parts.append(f"{join_and(_labels(not_found))} not found")
    parts += [dropped[r] for r in roles.usable if r in dropped]
    note = None
    if parts:
        note = "; ".join(parts) + f"; segmentation used {join_and(_labels(used)) or 'no sequence'} only"
    return InputsRecord(backend=backend, reference=reference, required=list(roles.required),
                        optional=list(roles.optional), used=used, missing=missing, dropped=dropped,
                        note=note).to_json()


def _needed_because(role: str, backend: str, roles: InputRoles, reference: str) -> str:
    reasons = []
    if role in roles.required:
        reasons.append(f"the segmentation model ({backend}) needs it")
    if role == reference:
        reasons.append("it is the reference sequence whose grid every result lies on")
    return " and ".join(reasons) or "the site's series rules require it"


def _stored_path(path: Path, work: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(work.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def series_name(role: str, header: SeriesHeader) -> str:
    """'FLAIR series 5 'AX T2 FLAIR 3D''."""
    number = "?" if header.series_number is None else header.series_number
    text = header.description or header.protocol_name
    echo = f" echo {header.echo_number}" if header.echo_number is not None else ""
    return f"{ROLE_LABELS.get(role, role)} series {number}" + (f" '{text}'" if text else "") + echo


def series_problem(role: str, header: SeriesHeader, reference: str) -> tuple[str, dict] | None:
    """Why the series selected for ``role`` cannot be used (words), with the
    completeness record; None when it can."""
    multi_frame = header.is_enhanced or header.n_frames > header.n_instances
    if role == reference and multi_frame and header.n_instances != 1:
        return (f"{series_name(role, header)} is an enhanced (multi-frame) MR series in "
                f"{header.n_instances} instances, and the results are built on the reference series as one "
                f"multi-frame instance or as single-frame images: send it as one instance or as classic MR "
                f"images (most scanners can export either)", {"multi_frame": True,
                                                              "instances": header.n_instances})
    report = check_series_files(header.files)
    if not report.complete:
        return f"{series_name(role, header)} is incomplete: {report.describe()}", report.to_dict()
    if role == reference and report.images_per_position > 1:
        return (f"{series_name(role, header)} holds {report.images_per_position} images at each slice "
                f"position that are not echoes of one scan (several contrasts or repeated acquisitions in one "
                f"series), and the results are built on the reference series one image per position: send "
                f"each contrast or acquisition as a series of its own", report.to_dict())
    return None


def select_inputs(dicom_dir: Path, work: Path, cfg: PipelineConfig, rules_path: Path | None = None) -> dict:
    """Pick the series of each role in ``dicom_dir``; writes ``work/select_series.json``.

    Every selected series must be complete (and the reference series
    single-frame images or one multi-frame instance); one that is not is left out and the selection runs again
    without it. Returns the selection record without file lists (for the job
    store). Raises MissingSeriesError (names the missing role, why it is
    needed and every series considered), IncompleteSeriesError (a needed role
    has only incomplete series: names the series and what is missing),
    RulesError or SegmentationError (model cannot be loaded)."""
    rules = load_rules(rules_path)
    backend, roles = backend_roles(cfg)
    needed = [r for r in ROLES if r in roles.required or r == cfg.reference]
    unknown = [r for r in needed if r not in rules.roles]
    if unknown:
        raise RulesError(f"the series rules have no rule for {join_and(_labels(unknown))}, which "
                         f"the pipeline needs (model {backend}, reference {ROLE_LABELS.get(cfg.reference)})")
    needed_because = {r: _needed_because(r, backend, roles, cfg.reference) for r in needed}
    series = scan_series(dicom_dir)
    left_out: dict[str, tuple[str, str, dict]] = {}  # series key -> (role, why, record)
    checked: dict[tuple[str, bool], tuple[str, dict] | None] = {}  # (series key, as reference) -> problem
    while True:
        pool = [s for s in series if s.key not in left_out]
        try:
            selection = select_series(pool, rules, required=needed, needed_because=needed_because)
        except MissingSeriesError as exc:
            reasons = [why for role, why, _ in left_out.values() if role in exc.missing_roles]
            if reasons:
                raise IncompleteSeriesError(
                    exc.missing_roles, reasons, labels=exc.labels,
                    needed_because={r: needed_because[r] for r in exc.missing_roles
                                    if r in needed_because}) from None
            raise
        bad = {}
        for role, header in selection.roles.items():
            key = (header.key, role == cfg.reference)
            if key not in checked:
                checked[key] = series_problem(role, header, cfg.reference)
            problem = checked[key]
            if problem is not None:
                bad[header.key] = (role, *problem)
        if not bad:
            break
        left_out.update(bad)
    dropped = {}
    for role, why, _ in left_out.values():
        if role not in selection.roles and role not in dropped:
            dropped[role] = why + "; it was left out"
    record = SeriesSelection.from_json({
        **selection.to_dict(),
        "left_out": [{"role": role, "reason": why, "completeness": rec} for role, why, rec in left_out.values()],
        "inputs": inputs_record(selection.roles, rules.roles, backend, roles, cfg.reference, dropped),
        "files": {role: [_stored_path(f, work) for f in header.files] for role, header in selection.roles.items()}})
    write_record(work / SELECTION_FILE, record)
    return record.without_files()


def read_selection(work: Path) -> SeriesSelection:
    """``work/select_series.json`` (FileNotFoundError when series selection has not run)."""
    path = existing_file(work / SELECTION_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: series selection has not run")
    return read_record(SeriesSelection, path)


def selected_files(work: Path, role: str) -> list[Path]:
    """The instance files of the series selected for ``role`` (from select_series.json)."""
    return read_selection(work).files_of(role, work)


def convert_inputs(work: Path) -> dict:
    """dcm2niix every selected series into ``work/nifti/<role>.nii.gz`` + JSON
    sidecar; returns the conversion record per role. A series dcm2niix would
    interpolate (unequal slice spacing) is refused: a needed role raises
    IncompleteSeriesError, an optional role is dropped from select_series.json
    with a note. Raises ConversionError for other failures."""
    selection = read_selection(work)
    inputs = selection.inputs
    needed = set(inputs.required) | ({inputs.reference} if inputs.reference else set()) if inputs else set()
    out: dict = {}
    dropped: dict[str, str] = {}
    for role, files in sorted(selection.files.items()):
        try:
            out[role] = convert_series([work / f for f in files], work / "nifti", role).to_dict()
        except UnequalSpacingError:
            header = selection.roles[role]
            number = "?" if header.get("series_number") is None else header["series_number"]
            why = (f"{ROLE_LABELS.get(role, role)} series {number} '{header.get('description', '')}' has "
                   f"unequally spaced slices (missing or irregular); dcm2niix would interpolate them")
            if role in needed or not inputs:
                because = "the pipeline needs it"
                if inputs:
                    because = _needed_because(role, inputs.backend, InputRoles(
                        required=tuple(inputs.required), optional=tuple(inputs.optional)), inputs.reference)
                raise IncompleteSeriesError([role], [why], needed_because={role: because}) from None
            dropped[role] = why + "; it was left out"
    if dropped:
        _drop_roles(work, selection, dropped)
    return out


def _drop_roles(work: Path, selection: SeriesSelection, dropped: dict[str, str]) -> None:
    """Remove optional roles from select_series.json and say so in its inputs note."""
    inputs = selection.inputs
    files = {r: f for r, f in selection.files.items() if r not in dropped}
    kept = {r: h for r, h in selection.roles.items() if r not in dropped}
    for role in dropped:
        for name in (f"{role}.nii.gz", f"{role}.json", f"{role}.conversion.json"):
            (work / "nifti" / name).unlink(missing_ok=True)
    rule_roles = list(dict.fromkeys(list(inputs.missing) + list(kept) + list(dropped)))
    roles = InputRoles(required=tuple(inputs.required), optional=tuple(inputs.optional))
    new_inputs = InputsRecord.from_json(inputs_record(
        kept, [r for r in ROLES if r in rule_roles] or rule_roles, inputs.backend, roles, inputs.reference,
        {**inputs.dropped, **dropped}))
    write_record(work / SELECTION_FILE, selection.replace(
        roles=kept, files=files, inputs=new_inputs,
        left_out=list(selection.left_out) + [{"role": r, "reason": why} for r, why in dropped.items()]))
