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

``selection.json`` in the working folder holds the selection record
(:meth:`SelectionResult.to_dict`), ``files`` (role -> instance files,
relative to the working folder when inside it, absolute otherwise: ``brainline
process`` reads its input folder in place) and ``inputs`` (:func:`inputs_record`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from brainline.models.base import ROLES, InputRoles
from brainline.models.registry import input_roles, load_backend

from .conversion import convert_series
from .image_pipeline import ROLE_LABELS, PipelineConfig, model_spec
from .series_selection import RulesError, load_rules, scan_series, select_series

__all__ = ["backend_roles", "inputs_record", "select_inputs", "convert_inputs", "selected_files",
           "join_and"]


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
                  roles: InputRoles, reference: str) -> dict:
    """What the segmentation gets: ``{"backend", "required", "optional", "used",
    "missing", "note"}`` (role keys). ``missing``: roles of the rules with no
    series; ``note``: a sentence when a role the backend could use is missing,
    else None."""
    selected = set(selected)
    missing = [r for r in rule_roles if r not in selected]
    used = [r for r in roles.usable if r in selected]
    could_use = [r for r in missing if r in roles.usable]
    note = None
    if could_use:
        note = (f"{join_and(_labels(could_use))} not found; segmentation used "
                f"{join_and(_labels(used)) or 'no sequence'} only")
    return {"backend": backend, "reference": reference, "required": list(roles.required),
            "optional": list(roles.optional), "used": used, "missing": missing, "note": note}


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


def select_inputs(dicom_dir: Path, work: Path, cfg: PipelineConfig, rules_path: Path | None = None) -> dict:
    """Pick the series of each role in ``dicom_dir``; writes ``work/selection.json``.

    Returns the selection record without file lists (for the job store).
    Raises MissingSeriesError (names the missing role, why it is needed and
    every series considered), RulesError or SegmentationError (model cannot
    be loaded)."""
    rules = load_rules(rules_path)
    backend, roles = backend_roles(cfg)
    needed = [r for r in ROLES if r in roles.required or r == cfg.reference]
    unknown = [r for r in needed if r not in rules.roles]
    if unknown:
        raise RulesError(f"the series rules have no rule for {join_and(_labels(unknown))}, which "
                         f"the pipeline needs (model {backend}, reference {ROLE_LABELS.get(cfg.reference)})")
    selection = select_series(
        scan_series(dicom_dir), rules, required=needed,
        needed_because={r: _needed_because(r, backend, roles, cfg.reference) for r in needed})
    record = selection.to_dict()
    record["inputs"] = inputs_record(selection.roles, rules.roles, backend, roles, cfg.reference)
    files = {role: [_stored_path(f, work) for f in header.files] for role, header in selection.roles.items()}
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / ".tmp-selection.json"
    tmp.write_text(json.dumps({**record, "files": files}, indent=2, default=str))
    os.replace(tmp, work / "selection.json")
    return record


def selected_files(work: Path, role: str) -> list[Path]:
    """The instance files of the series selected for ``role`` (from selection.json)."""
    selection = json.loads((work / "selection.json").read_text())
    return [work / f for f in selection["files"][role]]


def convert_inputs(work: Path) -> dict:
    """dcm2niix every selected series into ``work/nifti/<role>.nii.gz`` + JSON
    sidecar; returns the conversion record per role. Raises ConversionError."""
    selection = json.loads((work / "selection.json").read_text())
    return {role: convert_series([work / f for f in files], work / "nifti", role).to_dict()
            for role, files in sorted(selection["files"].items())}
