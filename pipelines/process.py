"""Offline run of the whole pipeline on a folder of DICOM files of one study
(``brainline process INPUT --out OUT``): series selection and conversion as in
the service (:mod:`.inputs`), then the image pipeline steps and the DICOM
results. No network, no database."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .image_pipeline import STEPS, PipelineConfig
from .inputs import convert_inputs, select_inputs, selected_files
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


def process_study(input_dir: Path, out: Path, cfg: PipelineConfig | None = None,
                  rules_path: Path | None = None, uid_root: str | None = None,
                  on_step: Callable[[str], None] | None = None) -> dict:
    """Run everything; returns summary.json's content plus ``outputs`` (the
    ``results.json`` record: objects written, ``failed``, ``notes``).
    ``on_step(name)`` is called after each step (for progress bars). The DICOM
    results (SEG, SR, overlay, PDF) reference the input instances and go to
    ``out/dicom``; an overlay or PDF that cannot be built is logged (a warning
    on stderr) and recorded, the run still succeeds. Raises OutputsError when
    the SEG or the SR cannot be built."""
    cfg = cfg or PipelineConfig()
    out.mkdir(parents=True, exist_ok=True)
    select_and_convert(input_dir, out, rules_path, cfg)
    if on_step:
        on_step("select_and_convert")
    result: dict = {}
    for name, step in STEPS:
        result = step(out, cfg)
        if on_step:
            on_step(name)
    record = build_results(out, selected_files(out, cfg.reference), uid_root=uid_root, subdir="dicom")
    if on_step:
        on_step("dicom_results")
    note = (result.get("inputs") or {}).get("note")
    if note:
        log.warning("%s", note)  # output failures were logged when they happened
    return {**result, "outputs": record}


STEP_NAMES = ["select_and_convert"] + [name for name, _ in STEPS] + ["dicom_results"]
