"""Offline run of the whole pipeline on a folder of DICOM files of one study
(``brainline process INPUT --out OUT [--prior PRIOR ...]``): series selection
and conversion as in the service (:mod:`.inputs`), then the image pipeline
steps, the longitudinal comparison with the prior studies given (folders of
DICOM files of earlier studies of the same patient; :mod:`.longitudinal`) and
the DICOM results. No network, no database."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import pydicom

from .image_pipeline import STEPS, PipelineConfig
from .inputs import convert_inputs, select_inputs, selected_files
from .longitudinal import step_longitudinal
from .results import build_results

log = logging.getLogger("brainline.process")


def select_and_convert(input_dir: Path, out: Path, rules_path: Path | None = None,
                       cfg: PipelineConfig | None = None) -> dict:
    """Pick the series of each role in ``input_dir`` (the roles the configured
    model needs, plus the reference) and convert them to ``out/nifti``.
    Raises MissingSeriesError (its message names the missing role, why it is
    needed and the series considered) or ConversionError (names the series)."""
    selection = select_inputs(input_dir, out, cfg or PipelineConfig(), rules_path)
    return {"selection": selection, "conversion": convert_inputs(out)}


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
    ``results.json`` record: objects written, ``failed``, ``notes``).
    ``on_step(name)`` is called after each step (for progress bars). The DICOM
    results (SEG, SR, overlay, PDF) reference the input instances and go to
    ``out/dicom``; an overlay or PDF that cannot be built is logged (a warning
    on stderr) and recorded, the run still succeeds. Raises OutputsError when
    the SEG or the SR cannot be built. ``priors``: folders of earlier studies
    of the same patient (PriorError when one cannot be used); the follow-up
    comparison goes to ``longitudinal.json`` and its DICOM objects to
    ``out/dicom``."""
    cfg = cfg or PipelineConfig()
    out.mkdir(parents=True, exist_ok=True)
    if priors:
        write_offline_priors(input_dir, priors, out)
    select_and_convert(input_dir, out, rules_path, cfg)
    if on_step:
        on_step("select_and_convert")
    result: dict = {}
    for name, step in STEPS:
        result = step(out, cfg)
        if on_step:
            on_step(name)
    longitudinal = step_longitudinal(out, cfg)
    if on_step:
        on_step("longitudinal")
    record = build_results(out, selected_files(out, cfg.reference), uid_root=uid_root, subdir="dicom")
    if on_step:
        on_step("dicom_results")
    note = (result.get("inputs") or {}).get("note")
    if note:
        log.warning("%s", note)  # output failures were logged when they happened
    return {**result, "outputs": record, "longitudinal": longitudinal}


STEP_NAMES = ["select_and_convert"] + [name for name, _ in STEPS] + ["longitudinal", "dicom_results"]
