"""Offline run of the whole pipeline on a folder of DICOM files of one study
(``brainline process INPUT --out OUT [--prior PRIOR ...]``): series selection
and conversion as in the service (:mod:`.inputs`), then the image pipeline
steps, the longitudinal comparison with the prior studies given (folders of
DICOM files of earlier studies of the same patient; :mod:`.longitudinal`) and
the DICOM results: every stage of the stage table (pipelines/stage_table.py)
in order. No network, no database."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import pydicom

from .image_pipeline import PipelineConfig
from .records import Summary, migrate_workspace
from .stage_table import INPUT_STAGES, stages

log = logging.getLogger("brainline.process")


class PriorError(ValueError):
    """A ``--prior`` folder cannot be used; the message names it and why."""


def study_date_of(folder: Path) -> str:
    """StudyDate (YYYYMMDD) of the first DICOM file under ``folder`` that has
    one; "" when none does."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate"])
        except Exception:  # not DICOM: keep looking
            continue
        date = str(ds.get("StudyDate", "") or "")
        if len(date) == 8 and date.isdigit():
            return date
    return ""


def write_offline_priors(input_dir: Path, prior_dirs: Sequence[Path], out: Path) -> dict:
    """``out/priors.json`` and ``out/priors/<k>/prior.json`` for the prior
    studies given on the command line (the contract of
    :mod:`.longitudinal`): each prior's DICOM stays where it is
    (``dicom_dir``), every prior earlier than the current study is used, the
    earliest is the baseline. Raises PriorError for a folder that is missing,
    has no dated DICOM file, or is not earlier than the current study."""
    current = study_date_of(input_dir)
    found: list[tuple[str, Path]] = []
    for folder in prior_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise PriorError(f"prior {folder} is not a folder of DICOM files")
        date = study_date_of(folder)
        if not date:
            raise PriorError(f"prior {folder} holds no DICOM file with a study date")
        if current and date >= current:
            raise PriorError(f"prior {folder} ({date}) is not earlier than the current study ({current})")
        found.append((date, folder.resolve()))
    found.sort()
    priors = []
    for k, (date, folder) in enumerate(sorted(found, reverse=True)):  # most recent first
        kept = (["most recent"] if k == 0 else []) + (["baseline"] if (date, folder) == found[0] else [])
        entry = {"dir": f"priors/{k}", "study_date": date, "kept_as": kept or ["earlier"],
                 "source": "offline folder", "pseudo_study_uid": None, "job_id": None}
        (out / entry["dir"]).mkdir(parents=True, exist_ok=True)
        (out / entry["dir"] / "prior.json").write_text(json.dumps({**entry, "dicom_dir": str(folder)}, indent=2))
        priors.append(entry)
    record = {"current": {"study_date": current}, "priors": priors,
              "searched": [f"{len(priors)} prior folder{'s' if len(priors) != 1 else ''} given on the command line"],
              "notes": []}
    (out / "priors.json").write_text(json.dumps(record, indent=2))
    return record


def process_study(input_dir: Path, out: Path, cfg: PipelineConfig | None = None,
                  rules_path: Path | None = None, uid_root: str | None = None,
                  on_step: Callable[[str], None] | None = None,
                  priors: Sequence[Path] = ()) -> dict:
    """Run everything; returns summary.json's content plus ``outputs`` (the
    ``build_outputs.json`` record: objects written, ``failed``, ``notes``).
    ``on_step(name)`` is called after each step (for progress bars). The DICOM
    results (SEG, SR, overlay, PDF) reference the input instances and go to
    ``out/dicom``; an overlay or PDF that cannot be built is logged (a warning
    on stderr) and recorded, the run still succeeds. Raises OutputsError when
    the SEG or the SR cannot be built. ``priors``: folders of earlier studies
    of the same patient (PriorError when one cannot be used); the follow-up
    comparison goes to ``longitudinal.json`` and its DICOM objects to
    ``out/dicom``."""
    cfg = dataclasses.replace(cfg or PipelineConfig(), dicom_dir=str(input_dir),
                              series_rules=str(rules_path) if rules_path else None,
                              uid_root=uid_root, results_dir="dicom")
    out.mkdir(parents=True, exist_ok=True)
    migrate_workspace(out)   # an OUT folder of an earlier version: record files under their stage names
    if priors:
        write_offline_priors(input_dir, priors, out)
    results: dict[str, dict] = {}
    for stage in stages():
        if stage.zone != "compute":
            continue
        results[stage.name] = stage.function()(out, cfg)
        if on_step and stage.name != INPUT_STAGES[0]:
            on_step(_OFFLINE_NAMES.get(stage.name, stage.name))
    result = results["summary"]
    inputs = Summary.from_json(result).inputs
    if inputs and inputs.note:
        log.warning("%s", inputs.note)  # output failures were logged when they happened
    return {**result, "outputs": results["build_outputs"], "longitudinal": results["longitudinal"]}


#: Progress names of ``brainline process`` that differ from the stage names:
#: selection and conversion report once, the DICOM results as "dicom_results".
_OFFLINE_NAMES = {INPUT_STAGES[-1]: "select_and_convert", "build_outputs": "dicom_results"}


def __getattr__(name: str):
    """``STEP_NAMES``: the names ``on_step`` reports, in order (from the stage table)."""
    if name == "STEP_NAMES":
        return [_OFFLINE_NAMES.get(s.name, s.name) for s in stages()
                if s.zone == "compute" and s.name != INPUT_STAGES[0]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
