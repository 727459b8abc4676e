"""Offline run of the whole pipeline on a folder of DICOM files of one study
(``brainline process INPUT --out OUT``): series selection and conversion as in
the service, then the image pipeline steps. No network, no database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .conversion import convert_series
from .image_pipeline import STEPS, PipelineConfig
from .results import build_results
from .series_selection import load_rules, scan_series, select_series


def select_and_convert(input_dir: Path, out: Path, rules_path: Path | None = None) -> dict:
    """Pick T1/T1c/T2/FLAIR in ``input_dir`` and convert them to ``out/nifti``.
    Raises MissingSeriesError (its message names the missing role and the
    series considered) or ConversionError (names the series)."""
    series = scan_series(input_dir)
    selection = select_series(series, load_rules(rules_path))
    record = selection.to_dict()
    record["files"] = {role: [str(f) for f in h.files] for role, h in selection.roles.items()}
    (out / "selection.json").write_text(json.dumps(record, indent=2, default=str))
    conversions = {role: convert_series(list(h.files), out / "nifti", role).to_dict()
                   for role, h in sorted(selection.roles.items())}
    return {"selection": selection.to_dict(), "conversion": conversions}


def process_study(input_dir: Path, out: Path, cfg: PipelineConfig | None = None,
                  rules_path: Path | None = None, uid_root: str | None = None,
                  on_step: Callable[[str], None] | None = None) -> dict:
    """Run everything; returns summary.json's content. ``on_step(name)`` is
    called after each step (for progress bars). The DICOM results (SEG, SR,
    overlay, PDF) reference the input instances and go to ``out/dicom``."""
    cfg = cfg or PipelineConfig()
    out.mkdir(parents=True, exist_ok=True)
    select_and_convert(input_dir, out, rules_path)
    if on_step:
        on_step("select_and_convert")
    result: dict = {}
    for name, step in STEPS:
        result = step(out, cfg)
        if on_step:
            on_step(name)
    selection = json.loads((out / "selection.json").read_text())
    build_results(out, [Path(f) for f in selection["files"][cfg.reference]], uid_root=uid_root,
                  subdir="dicom")
    if on_step:
        on_step("dicom_results")
    return result


STEP_NAMES = ["select_and_convert"] + [name for name, _ in STEPS] + ["dicom_results"]
