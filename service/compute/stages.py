"""The compute stages: image work on the pseudonymized job workspace only.

Each stage is a function ``fn(ctx: StageContext) -> dict`` (see
service/jobs/context.py) whose returned dict (JSON-serializable,
pseudonymous) is stored in the job store. ``service_stage`` makes one from
an entry of the stage table (pipelines/stage_table.py: series selection,
conversion, the image steps, the longitudinal comparison and the DICOM
result objects): the entry's step on the job workspace, then the hook the
entry names (``HOOKS``: the QC stages' comparison with the site's QC history
in the job store). They never touch the spool, the vault or the outbox, so
a compute worker runs them without the vault key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.inputs import selected_files
from brainline.pipelines.records import migrate_workspace
from brainline.pipelines.registration import RegistrationConfig
from brainline.pipelines.stage_table import Stage

from ..jobs.context import StageContext, StageFn
from ..jobs.errors import NeedsInput
from .qc_history import compare_image_qc, compare_segmentation_qc, qc_config


def pipeline_config(settings, **overrides) -> PipelineConfig:
    """The image pipeline configuration from the service settings."""
    values = {"reference_role": settings.reference_role, "model": settings.model,
              "device": settings.device, **overrides}
    return PipelineConfig(
        reference=values["reference_role"],
        registration=RegistrationConfig(transform=settings.registration_transform),
        skull_strip_backend=settings.skull_strip_backend,
        device=values["device"],
        model=values["model"] or None,
        qc=qc_config(settings),
    )


def _run_config(ctx: StageContext) -> PipelineConfig:
    """The pipeline configuration of a job: the settings, the job's DICOM
    folder, the site's selection rules and UID root."""
    settings: Any = ctx.settings
    return dataclasses.replace(pipeline_config(settings), dicom_dir=str(ctx.path("dicom")),
                               series_rules=settings.series_rules or None,
                               uid_root=settings.uid_root or None)


def _qc_history(compare) -> Hook:
    def hook(ctx: StageContext, result: dict) -> dict:
        return compare(ctx.job_sessions(), ctx.job_id, ctx.workspace, ctx.settings, result)

    hook.__doc__ = compare.__doc__
    return hook


Hook = Callable[[StageContext, dict], dict]
#: Service wrappers a stage table entry may name (``Stage.hook``): run after
#: the step with its result. The QC stages compare with the site's history in
#: the job store (service/compute/qc_history.py: z-scores or discord
#: thresholds, rows stored in qc_metrics, words into the workspace for
#: the summary).
HOOKS: dict[str, Hook] = {"image_qc_history": _qc_history(compare_image_qc),
                          "segmentation_qc_history": _qc_history(compare_segmentation_qc)}


def service_stage(entry: Stage) -> StageFn:
    """The stage the service runs for the image stage ``entry`` of the stage
    table (pipelines/stage_table.py): its step on the job workspace, then its
    hook (``HOOKS``). An exception of ``entry.needs_input`` (the study lacks
    something) turns the job needs_input, its message in words, with what
    pseudonymization quarantined."""
    step = entry.function()
    hook = HOOKS[entry.hook] if entry.hook else None

    def stage(ctx: StageContext) -> dict:
        migrate_workspace(ctx.workspace)   # a job begun by an earlier version: files named after stages
        try:
            result = step(ctx.workspace, _run_config(ctx))
        except entry.needs_input as exc:  # IncompleteSeriesError: names the series, what is missing
            raise NeedsInput(str(exc) + _quarantine_hint(ctx)) from None
        return hook(ctx, result) if hook else result

    stage.__name__ = stage.__qualname__ = entry.name
    stage.__doc__ = f"{step.__doc__}\n\nThen: {hook.__doc__}" if hook else step.__doc__
    return stage


def _quarantine_hint(ctx: StageContext) -> str:
    """' Also: 1 instance quarantined: ...' when pseudonymize quarantined some."""
    try:
        note = json.loads(ctx.path("pseudonymize.json").read_text()).get("note")
    except (OSError, ValueError):
        return ""
    return f" Also: {note}." if note else ""


def reference_files(ctx: StageContext) -> list[Path]:
    """The DICOM files of the selected reference series in the workspace."""
    return selected_files(ctx.workspace, pipeline_config(ctx.settings).reference)


def __getattr__(name: str) -> StageFn:
    """The service stage of a table entry by name (``build_outputs``, ...)."""
    from brainline.pipelines.stage_table import stage

    try:
        return service_stage(stage(name))
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
