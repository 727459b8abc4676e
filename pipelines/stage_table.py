"""The stage table: every image stage, in order, declared once (``STAGES``).

Each entry (:class:`Stage`) says what the stage is called, in words and in
code, which function runs it (``step(work, cfg) -> dict``: files in one
working folder only, see pipelines/image_pipeline.py), which workspace files
it reads and writes (paths relative to the workspace), its PHI zone, the
errors whose message is meant for people, and the service hook that wraps it
(``hook``, e.g. the QC stages' comparison with the site's history). Everything
else is derived from this table:

* ``brainline process`` (pipelines/process.py) runs the stages in order;
* the service (service/jobs/stage_table.py) runs the gateway stages plus
  these, wrapped by service/compute/stages.py (``service_stage``);
* the job labels ("co-registration failed: ...") and the people-facing
  errors (``PIPELINE_ERRORS`` of service/jobs/errors.py);
* the summary's timings (``timed_steps``).

Each stage writes its record to ``<stage name>.json`` in the workspace
(:func:`.records.stage_file`); the table's ``writes`` lists it.

Adding an image stage is one module plus one entry: in this list, or at run
time with :func:`register_stage` (``after=`` a named stage), or from another
package through the ``brainline.stages`` entry-point group (the entry point
names a :class:`Stage` whose ``after`` says where it goes)::

    [project.entry-points."brainline.stages"]
    my_stage = "my_site.my_stage:STAGE"
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

from brainline.models.base import SegmentationError

from .bias_correction import N4Error
from .conversion import ConversionError
from .image_pipeline import (
    PipelineConfig,
    PipelineError,
    step_bias_correct,
    step_image_qc,
    step_register,
    step_segment,
    step_segmentation_qc,
    step_skull_strip,
    step_summarize,
)
from .inputs import convert_inputs, read_selection, select_inputs, selected_files
from .records import (
    BIAS_CORRECTION_FILE,
    CONVERT_FILE,
    REGISTRATION_FILE,
    RESULTS_FILE,
    SEGMENT_FILE,
    SELECTION_FILE,
    SKULL_STRIP_FILE,
    SUMMARY_FILE,
    stage_file,
    write_record,
)
from .registration import RegistrationError
from .results import build_results
from .series_completeness import IncompleteSeriesError
from .series_selection import MissingSeriesError, RulesError
from .skull_strip import SkullStripError

log = logging.getLogger("brainline.stages")

Zone = Literal["gateway", "compute"]
GATEWAY: Zone = "gateway"
COMPUTE: Zone = "compute"
StepFn = Callable[[Path, PipelineConfig], dict]
ENTRY_POINT_GROUP = "brainline.stages"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    ``step``: the function, ``step(work, cfg) -> dict`` for an image stage
    (``work`` the workspace folder, ``cfg`` a PipelineConfig), or
    "package.module:function" imported when the stage first runs (the
    gateway's stages, ``fn(ctx)``, are named this way so that a compute worker
    never imports them). ``reads`` / ``writes``: workspace paths (a trailing
    "/" is a folder). ``zone``: "gateway" (may read the spool or the vault,
    write the outbox) or "compute" (pseudonymised workspace only).
    ``errors``: exceptions whose message is meant for people (the stage fails
    with that message); ``needs_input``: exceptions that mean the study lacks
    something (the job turns needs_input with the message); anything else is
    an internal error, reported by its kind. ``hook``: the name of a service
    wrapper run after the step (service/compute/stages.py ``HOOKS``).
    ``after``: where :func:`register_stage` or an entry point puts it.
    """

    name: str
    label: str
    step: StepFn | str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    zone: Zone = COMPUTE
    errors: tuple[type[BaseException], ...] = ()
    needs_input: tuple[type[BaseException], ...] = ()
    hook: str | None = None
    after: str | None = None

    def function(self) -> Callable:
        """The stage's function (imported now when named by module)."""
        if callable(self.step):
            return self.step
        module, _, name = self.step.partition(":")
        return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------- adapters
def step_select_series(work: Path, cfg: PipelineConfig) -> dict:
    """Assign roles T1, T1c, T2, FLAIR to the series in ``cfg.dicom_dir``
    (default ``work/dicom``) with the rules in ``cfg.series_rules`` (default
    config/series_rules.yaml); writes ``select_series.json``. A role the model
    needs (or the reference) that is missing raises MissingSeriesError, which
    names it; other missing roles are recorded (``inputs``)."""
    dicom = Path(cfg.dicom_dir) if cfg.dicom_dir else work / "dicom"
    rules = Path(cfg.series_rules) if cfg.series_rules else None
    return select_inputs(dicom, work, cfg, rules)


def step_convert(work: Path, cfg: PipelineConfig) -> dict:
    """dcm2niix every selected series into ``nifti/<role>.nii.gz`` + JSON
    sidecar; writes ``convert.json`` (``series``: the conversion record per
    role; ``note``: the selection's sentence on missing optional sequences).
    A needed series dcm2niix would interpolate raises IncompleteSeriesError;
    an optional one is dropped with a note."""
    result: dict = {"series": convert_inputs(work)}
    inputs = read_selection(work).inputs
    if inputs and inputs.note:
        result["note"] = inputs.note
    write_record(work / CONVERT_FILE, result)
    return result


def step_longitudinal(work: Path, cfg: PipelineConfig) -> dict:
    """The follow-up comparison with the priors in ``priors.json``
    (pipelines/longitudinal.py; imported when it runs)."""
    from .longitudinal import step_longitudinal as run

    return run(work, cfg)


def step_build_outputs(work: Path, cfg: PipelineConfig) -> dict:
    """DICOM SEG, TID 1500 SR, overlay series and PDF report in
    ``cfg.results_dir``, built on the reference series; an overlay or PDF
    failure is recorded (``failed``, ``notes``), a SEG or SR failure raises
    OutputsError (a PipelineError)."""
    return build_results(work, selected_files(work, cfg.reference), uid_root=cfg.uid_root or None,
                         subdir=cfg.results_dir)


# ---------------------------------------------------------------- the table
_IMAGE = (PipelineError,)
STAGES: list[Stage] = [
    Stage("select_series", "series selection", step_select_series,
          reads=("dicom/",), writes=(SELECTION_FILE,),
          errors=(MissingSeriesError, RulesError), needs_input=(MissingSeriesError,)),
    Stage("convert", "conversion", step_convert,
          reads=("dicom/", SELECTION_FILE), writes=("nifti/", CONVERT_FILE),
          errors=(ConversionError,), needs_input=(IncompleteSeriesError,)),
    Stage("register", "co-registration", step_register,
          reads=("nifti/",), writes=("registered/", REGISTRATION_FILE),
          errors=(RegistrationError, *_IMAGE)),
    Stage("skull_strip", "skull stripping", step_skull_strip,
          reads=("registered/",), writes=("brain_mask.nii.gz", SKULL_STRIP_FILE),
          errors=(SkullStripError, *_IMAGE)),
    Stage("image_qc", "image quality control", step_image_qc,   # native series + brain mask, before N4
          reads=("nifti/", "brain_mask.nii.gz", "registered/"), writes=(stage_file("image_qc"),),
          errors=_IMAGE, hook="image_qc_history"),
    Stage("bias_correct", "N4 bias correction", step_bias_correct,
          reads=("registered/", "brain_mask.nii.gz"), writes=("preprocessed/", BIAS_CORRECTION_FILE),
          errors=(N4Error, *_IMAGE)),
    Stage("segment", "tumour segmentation", step_segment,
          reads=("preprocessed/", "brain_mask.nii.gz"),
          writes=("segmentation.nii.gz", "candidates/", "model_space/", SEGMENT_FILE),
          errors=(SegmentationError, *_IMAGE)),
    Stage("segmentation_qc", "segmentation quality control", step_segmentation_qc,
          reads=("segmentation.nii.gz", "candidates/", "preprocessed/"), writes=(stage_file("segmentation_qc"),),
          errors=_IMAGE, hook="segmentation_qc_history"),
    Stage("summary", "summary", step_summarize,
          reads=("segmentation.nii.gz", "brain_mask.nii.gz", SELECTION_FILE), writes=(SUMMARY_FILE,),
          errors=_IMAGE),
    Stage("longitudinal", "longitudinal comparison", step_longitudinal,
          reads=("priors.json", "priors/", SUMMARY_FILE), writes=(stage_file("longitudinal"),),
          errors=_IMAGE),
    Stage("build_outputs", "building the DICOM results", step_build_outputs,
          reads=("dicom/", SELECTION_FILE, "segmentation.nii.gz", SUMMARY_FILE),
          writes=("results/", RESULTS_FILE), errors=_IMAGE),
]
#: The stages before and after the image steps proper (pipelines/image_pipeline.py ``STEPS``).
INPUT_STAGES = ("select_series", "convert")
FOLLOWING_STAGES = ("longitudinal", "build_outputs")

_lock = threading.RLock()
_listeners: list[Callable[[], None]] = []
_entry_points_loaded = False


def _notify() -> None:
    for listener in list(_listeners):
        listener()


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a stage is added or removed (the service's
    pipelines are derived from this table)."""
    _listeners.append(listener)


def _insert(stage: Stage, after: str | None) -> None:
    if any(s.name == stage.name for s in STAGES):
        raise ValueError(f"a stage named {stage.name!r} is in the table already")
    names = [s.name for s in STAGES]
    if after is None:
        after = "segmentation_qc"  # a new image stage runs before the summary by default
    if after not in names:
        raise ValueError(f"stage {stage.name!r} goes after {after!r}, which is not in the table "
                         f"({', '.join(names)})")
    STAGES.insert(names.index(after) + 1, stage)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        stage = ep.load()
        if not isinstance(stage, Stage):
            raise TypeError(f"entry point {ep.name!r} of {ENTRY_POINT_GROUP} is not a Stage ({ep.value})")
        _insert(stage, stage.after)
        log.info("stage added from an entry point", extra={"stage": stage.name})


def stages() -> list[Stage]:
    """Every image stage in order (entry-point stages included)."""
    with _lock:
        if not _entry_points_loaded:
            _load_entry_points()
            _notify()
        return list(STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name`` (KeyError if none)."""
    for s in stages():
        if s.name == name:
            return s
    raise KeyError(name)


def register_stage(new: Stage, after: str | None = None) -> Stage:
    """Put ``new`` into the table after the stage ``after`` (default
    ``new.after``, else before the summary); the service's pipelines and
    ``brainline process`` run it from then on."""
    with _lock:
        stages()
        _insert(new, after or new.after)
        _notify()
    return new


def unregister_stage(name: str) -> None:
    """Take the stage ``name`` out of the table."""
    with _lock:
        STAGES[:] = [s for s in STAGES if s.name != name]
        _notify()


@contextmanager
def added_stage(new: Stage, after: str | None = None) -> Iterator[Stage]:
    """``register_stage`` for the duration of a ``with`` block."""
    register_stage(new, after)
    try:
        yield new
    finally:
        unregister_stage(new.name)


def image_steps() -> list[tuple[str, StepFn]]:
    """The image steps after conversion up to the summary (``STEPS``)."""
    return [(s.name, s.function()) for s in stages()
            if s.name not in INPUT_STAGES + FOLLOWING_STAGES]


def timed_steps() -> list[str]:
    """Stages whose wall time the summary reports (``timings_s``, keyed by
    stage name; from each one's ``<stage>.json``): the image steps before the
    summary."""
    out = []
    for s in stages():
        if s.name == "summary":
            break
        if s.name in INPUT_STAGES:
            continue
        if stage_file(s.name) in s.writes:
            out.append(s.name)
    return out


def labels() -> dict[str, str]:
    """Stage name -> its name in words."""
    return {s.name: s.label for s in stages()}


def people_errors() -> tuple[type[BaseException], ...]:
    """Every stage's errors whose message is meant for people."""
    out: list[type[BaseException]] = []
    for s in stages():
        for error in (*s.errors, *s.needs_input):
            if error not in out:
                out.append(error)
    return tuple(out)
