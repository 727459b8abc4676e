"""The job runner (``JobRunner``): what every executor calls, locally or
from a Celery worker. It loads the job, skips stages already done, runs the
rest in order (the stage functions of ``PIPELINES``,
service/jobs/stage_table.py) and records state, timings, results and errors
in the job store. A job's ``error`` is in words (service/jobs/errors.py);
tracebacks go to the log only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..db import Job, Stage, State, utcnow
from ..metrics import Metrics
from .context import StageContext
from .errors import SUPERSEDED, NeedsInput, Rejected, Superseded, in_words, stage_label
from .stage_table import PIPELINES
from .store import FINAL, JobStore

if TYPE_CHECKING:
    from ..gateway.outbox import Outbox
    from ..gateway.spool import Spool
    from ..gateway.vault import Vault
    from ..scaleout_metrics import WorkerMetrics

log = logging.getLogger("brainline.jobs")


def _update(sessions, model, row_id: int, **fields) -> None:
    """Set ``fields`` on one row of ``model`` (Job or Stage) in its own
    transaction; a superseded job keeps its state and error."""
    with sessions.begin() as s:
        row = s.get(model, row_id)
        if model is Job and row.state == SUPERSEDED:
            fields = {k: v for k, v in fields.items() if k not in ("state", "error")}
        for k, v in fields.items():
            setattr(row, k, v)


def _not_runnable(job: Job | None, stage_name: str) -> str | None:
    """See ``JobRunner.not_runnable``."""
    if job is None or job.state in FINAL:
        return "final"
    stage = next((s for s in job.stages if s.name == stage_name), None)
    if stage is None or stage.state == State.DONE.value:
        return "duplicate"
    first = next((s for s in job.stages if s.state != State.DONE.value), None)
    if first is None or first.name != stage_name:
        return "not-next"
    return None


class JobRunner:
    """Runs one job's stages in order; safe to call again after a crash."""

    def __init__(self, store: JobStore, spool: Spool | None, vault: Vault | None, settings,
                 metrics: Metrics | WorkerMetrics,
                 outbox: Outbox | None = None):
        """``spool``, ``vault`` and ``outbox`` are None on a compute worker
        (service/compute/worker.py): it runs compute stages only."""
        self.store = store
        self.outbox = outbox
        self.spool = spool
        self.vault = vault
        self.settings = settings
        self.metrics = metrics

    def _context(self, job_id: int, study_key: str) -> StageContext:
        """The stage context of a job, its workspace folder created."""
        ws = self.workspace(job_id)
        ws.mkdir(parents=True, exist_ok=True)
        return StageContext(job_id=job_id, study_key=study_key, workspace=ws,
                            spool=self.spool, vault=self.vault, settings=self.settings,
                            outbox=self.outbox, superseded=lambda: self.store.superseded(job_id),
                            sessions=self.store.sessions)

    def stage_context(self, job_id: int, study_key: str) -> StageContext:
        """The stage context of a job (for work on a finished job, e.g. a review)."""
        return self._context(job_id, study_key)

    def workspace(self, job_id: int) -> Path:
        return self.settings.workspace_dir / f"job-{job_id:06d}"

    def run(self, job_id: int) -> str:
        sessions = self.store.sessions
        job = self.store.get(job_id)
        if job is None or job.state in FINAL:
            return job.state if job else "missing"
        _update(sessions, Job, job_id, state=State.RUNNING.value, attempts=job.attempts + 1,
                 started_at=job.started_at or utcnow())
        ctx = self._context(job_id, job.study_key)
        stage_fns = dict(PIPELINES[job.pipeline])
        log.info("job started", extra={"job_id": job_id, "study_key": job.study_key})
        for stage in job.stages:
            if stage.state == State.DONE.value:
                continue
            if self.store.superseded(job_id):
                log.info("job stopped: superseded", extra={"job_id": job_id, "stage": stage.name})
                return SUPERSEDED
            outcome = self._run_stage(ctx, stage, stage_fns[stage.name])
            if outcome != State.DONE:
                return outcome.value if isinstance(outcome, State) else outcome
        _update(sessions, Job, job_id, state=State.DONE.value, finished_at=utcnow(), error=None)
        if self.store.superseded(job_id):
            return SUPERSEDED
        log.info("job done", extra={"job_id": job_id})
        return State.DONE.value

    def next_stage(self, job_id: int) -> str | None:
        """The job's first unfinished stage; None when every stage is done."""
        job = self.store.get(job_id)
        return next((s.name for s in job.stages if s.state != State.DONE.value), None) if job else None

    def not_runnable(self, job_id: int, stage_name: str) -> str | None:
        """None when ``stage_name`` is the job's first unfinished stage; else
        why it does not run now: "final" (the job has ended), "duplicate" (the
        stage is done already) or "not-next" (an earlier stage is not done).
        A Celery task asks before it takes the stage's lease
        (service/jobs/celery_app.py); ``run_stage`` asks again under it."""
        return _not_runnable(self.store.get(job_id), stage_name)

    def run_stage(self, job_id: int, stage_name: str) -> str:
        """Run one stage of a job, when it is the job's first unfinished stage:
        the entry point of executors that send each stage to another process
        (service/jobs/celery_app.py). The caller makes sure no other process runs
        the same stage at the same time. Returns "done", "failed",
        "needs_input", "rejected", "superseded", or why it did not run
        (``not_runnable``). The job turns running (attempts + 1) when it was not."""
        job = self.store.get(job_id)
        blocked = _not_runnable(job, stage_name)
        if blocked:
            return blocked
        assert job is not None  # a missing job is "final" (_not_runnable)
        stage = next(s for s in job.stages if s.name == stage_name)
        if self.store.superseded(job_id):
            return SUPERSEDED
        if job.state != State.RUNNING.value:
            _update(self.store.sessions, Job, job_id, state=State.RUNNING.value,
                    attempts=job.attempts + 1, started_at=job.started_at or utcnow())
        ctx = self._context(job_id, job.study_key)
        outcome = self._run_stage(ctx, stage, dict(PIPELINES[job.pipeline])[stage_name])
        return outcome.value if isinstance(outcome, State) else str(outcome)

    def _run_stage(self, ctx: StageContext, stage: Stage, fn) -> State | str:
        sessions = self.store.sessions
        started = utcnow()
        _update(sessions, Stage, stage.id, state=State.RUNNING.value, started_at=started,
                   attempts=stage.attempts + 1, error=None)
        t0 = time.monotonic()
        log.info("stage started", extra={"job_id": ctx.job_id, "stage": stage.name})
        label = stage_label(stage.name)
        try:
            result = fn(ctx)
        except NeedsInput as exc:
            return self._finish_stage(ctx, stage, t0, State.NEEDS_INPUT, str(exc))
        except Rejected as exc:
            return self._finish_stage(ctx, stage, t0, State.REJECTED, f"{label} refused the study: {exc}")
        except Superseded as exc:
            _update(sessions, Stage, stage.id, state=SUPERSEDED, finished_at=utcnow(),
                    duration_s=time.monotonic() - t0, error=str(exc))
            log.info("job stopped: superseded", extra={"job_id": ctx.job_id, "stage": stage.name})
            return SUPERSEDED
        except Exception as exc:  # a stage failure must be recorded, never lost
            log.exception("stage failed", extra={"job_id": ctx.job_id, "stage": stage.name})
            return self._finish_stage(ctx, stage, t0, State.FAILED,
                                      f"{label} failed: {in_words(exc, ctx.job_id)}")
        duration = time.monotonic() - t0
        _update(sessions, Stage, stage.id, state=State.DONE.value, finished_at=utcnow(),
                   duration_s=duration, result_json=json.dumps(result, default=str))
        if stage.name == "pseudonymize":
            _update(sessions, Job, ctx.job_id, pseudo_study_uid=result.get("pseudo_study_uid"),
                     pseudo_patient_id=result.get("pseudo_patient_id"))
        self.metrics.stage_duration.labels(stage=stage.name).observe(duration)
        log.info("stage done", extra={"job_id": ctx.job_id, "stage": stage.name,
                                      "duration_s": round(duration, 3)})
        return State.DONE

    def _finish_stage(self, ctx, stage, t0, state: State, reason: str) -> State:
        sessions = self.store.sessions
        duration = time.monotonic() - t0
        _update(sessions, Stage, stage.id, state=state.value, finished_at=utcnow(),
                   duration_s=duration, error=reason)
        _update(sessions, Job, ctx.job_id, state=state.value, finished_at=utcnow(),
                 error=f"stage {stage.name}: {reason}")
        log.warning("job stopped", extra={"job_id": ctx.job_id, "stage": stage.name,
                                          "state": state.value, "reason": reason})
        return state
