"""Durable jobs: creation, state changes, the runner and crash recovery.

The runner (``JobRunner.run``) is what every executor calls, locally or from
a Celery worker: it loads the job, skips stages already done, runs the rest in
order and records state, timings, results and errors in the job store.

A new job of a study supersedes the study's earlier jobs (error
"superseded by job N ..."): an earlier job still queued or running, or done,
turns ``superseded``; one still running stops before its next stage and
never delivers, its outbox rows not yet sent are cancelled. One that ended
without results (needs_input, failed, rejected) keeps its state. None of
them can be retried. A job's
``error`` is in words; tracebacks go to the log only.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from .db import FINAL_STATES, Job, ReviewState, Stage, State, utcnow
from .metrics import Metrics
from .spool import Spool
from .outbox import cancel_pending
from .stages import (
    DEFAULT_PIPELINE, PIPELINE_ERRORS, PIPELINES, SUPERSEDED, NeedsInput, Rejected, StageContext,
    Superseded,
)
from .vault import Vault

log = logging.getLogger("brainline.jobs")


class JobConflict(Exception):
    """The job is in a state that does not allow the requested change."""


#: States after which a job does nothing more (superseded has no db.State member yet).
FINAL = {state.value for state in FINAL_STATES} | {SUPERSEDED}
LIVE = {State.RECEIVED.value, State.QUEUED.value, State.RUNNING.value}
SUPERSEDED_PREFIX = "superseded by job "


def _supersede_reason(old: Job, new_id: int, new_count: int, cancelled: int) -> str:
    what = ("it had not finished" if old.state in LIVE else
            "its results were built" if old.state == State.DONE.value else f"it had ended {old.state}")
    text = (f"superseded by job {new_id}: the study was received again ({new_count} instances; this job "
            f"had {old.instance_count}) while {what}")
    if cancelled:
        text += f"; {cancelled} result object{'s' if cancelled != 1 else ''} not yet sent were cancelled"
    if old.error:
        text += f" (earlier: {old.error})"
    return text


class JobStore:
    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    def create(self, study_key: str, instance_count: int, source: str,
               pipeline: str = DEFAULT_PIPELINE, site: str | None = None) -> int:
        """A new job of ``study_key``; ``site``: the calling AE title of the
        sender ("" when pulled or unknown), which selects the review gating.
        The study's earlier jobs are superseded (see the module doc): their
        outbox rows pending or held for review are cancelled and a review they
        awaited is no longer asked for (review_state pending -> None)."""
        with self.sessions.begin() as s:
            job = Job(study_key=study_key, instance_count=instance_count, source=source,
                      pipeline=pipeline, state=State.RECEIVED.value, attempts=0,
                      site=(site or "")[:64])
            job.stages = [Stage(name=name, position=i, state=State.QUEUED.value, attempts=0)
                          for i, (name, _fn) in enumerate(PIPELINES[pipeline])]
            s.add(job)
            s.flush()
            earlier = list(s.scalars(select(Job).where(Job.study_key == study_key, Job.id < job.id,
                                                        Job.state != SUPERSEDED).with_for_update()))
            for old in earlier:
                if (old.error or "").startswith(SUPERSEDED_PREFIX):
                    continue  # ended without results and already marked
                cancelled = cancel_pending(s, [old.id], f"cancelled: job {old.id} was superseded by job {job.id}")
                old.error = _supersede_reason(old, job.id, instance_count, cancelled)
                if old.state in LIVE or old.state == State.DONE.value:
                    old.state = SUPERSEDED  # it could deliver, or did: its results are replaced
                # a job that ended without results (needs_input, failed, rejected) keeps
                # its state, and the words say it was superseded; it cannot be retried
                old.finished_at = old.finished_at or utcnow()
                if old.review_state == ReviewState.PENDING.value:
                    old.review_state = None  # the newer job is the one to review
                log.info("job superseded", extra={"job_id": old.id, "superseded_by": job.id,
                                                  "outbox_cancelled": cancelled})
            return job.id

    def superseded(self, job_id: int) -> str | None:
        """None, or the words saying which job superseded ``job_id``."""
        with self.sessions() as s:
            job = s.get(Job, job_id)
            if job is not None and job.state == SUPERSEDED:
                return job.error or f"job {job_id} was superseded"
            return None

    def mark_queued(self, job_id: int) -> None:
        with self.sessions.begin() as s:
            job = s.get(Job, job_id)
            job.state = State.QUEUED.value
            job.queued_at = utcnow()

    def get(self, job_id: int) -> Job | None:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            if job is not None:
                _ = list(job.stages)
            return job

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        with self.sessions() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
            if state:
                q = q.where(Job.state == state)
            jobs = list(s.scalars(q))
            for job in jobs:
                _ = list(job.stages)
            return jobs

    def counts_by_state(self) -> dict[str, int]:
        with self.sessions() as s:
            return dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())

    def latest_counts(self, exclude_jobs: frozenset[int] | set[int] = frozenset()) -> dict[str, int]:
        """study_key -> instance_count of its newest job; studies whose newest
        job is in ``exclude_jobs`` (e.g. its spool data were purged since) are left out."""
        with self.sessions() as s:
            newest = select(Job.study_key, func.max(Job.id).label("id")).group_by(Job.study_key).subquery()
            rows = s.execute(select(Job.study_key, Job.instance_count, Job.id).join(newest, Job.id == newest.c.id))
            return {key: count for key, count, job_id in rows if job_id not in exclude_jobs}

    def unfinished(self) -> list[int]:
        """Jobs that were received, queued or running (e.g. before a crash)."""
        live = [State.RECEIVED.value, State.QUEUED.value, State.RUNNING.value]
        with self.sessions() as s:
            return list(s.scalars(select(Job.id).where(Job.state.in_(live)).order_by(Job.id)))

    def reset_for_retry(self, job_id: int, force: bool = False) -> None:
        """Make a finished job runnable again from its first unfinished stage."""
        with self.sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            newer = s.scalar(select(func.min(Job.id)).where(Job.study_key == job.study_key, Job.id > job_id))
            if job.state == SUPERSEDED or newer is not None:
                raise JobConflict(f"job {job_id} is superseded by job {newer} and cannot be retried; "
                                  f"retry job {newer} instead" if newer else
                                  f"job {job_id} is superseded and cannot be retried")
            if not force and job.state not in FINAL - {State.DONE.value}:
                raise JobConflict(f"job {job_id} is {job.state}; only failed, needs_input or "
                                  "rejected jobs can be retried")
            for stage in job.stages:
                if stage.state != State.DONE.value:
                    stage.state = State.QUEUED.value
                    stage.error = None
            job.state = State.QUEUED.value
            job.error = None
            job.finished_at = None
            job.queued_at = utcnow()

    def finish(self, job_id: int) -> bool:
        """running -> done once, for executors that run a job stage by stage in
        several processes: a conditional update, so a repeat changes nothing."""
        from sqlalchemy import update

        with self.sessions.begin() as s:
            changed = s.execute(update(Job).where(Job.id == job_id, Job.state == State.RUNNING.value)
                                .values(state=State.DONE.value, finished_at=utcnow(), error=None)).rowcount
        return bool(changed)

    def recover(self) -> list[int]:
        """After a crash: stages left running go back to queued; return the
        unfinished jobs to re-submit."""
        ids = self.unfinished()
        with self.sessions.begin() as s:
            for job_id in ids:
                job = s.get(Job, job_id)
                for stage in job.stages:
                    if stage.state == State.RUNNING.value:
                        stage.state = State.QUEUED.value
                job.state = State.QUEUED.value
        return ids


def _update(sessions, model, row_id: int, **fields) -> None:
    """Set ``fields`` on one row of ``model`` (Job or Stage) in its own
    transaction; a superseded job keeps its state and error."""
    with sessions.begin() as s:
        row = s.get(model, row_id)
        if model is Job and row.state == SUPERSEDED:
            fields = {k: v for k, v in fields.items() if k not in ("state", "error")}
        for k, v in fields.items():
            setattr(row, k, v)


_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.S)
_FRAME = re.compile(r'\s*File "[^"]*", line \d+.*')
_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]+)")


def _last_line(match: re.Match) -> str:
    """A traceback in a message (e.g. a child process's stderr) becomes its
    last line, the exception in words."""
    lines = [line for line in match.group(0).splitlines()[1:]
             if line.strip() and not line[:1].isspace() and not line.startswith(("During handling", "The above"))]
    return lines[-1] if lines else ""


def in_words(exc: BaseException, job_id: int) -> str:
    """A stage failure for people: the message of a pipeline error (which
    names the series and reason) without any traceback or install path; for
    anything else the kind of error and where the details are."""
    if isinstance(exc, PIPELINE_ERRORS):
        text = _TRACEBACK.sub(_last_line, str(exc))
        text = " ".join(line for line in text.splitlines() if not _FRAME.fullmatch(line))
        text = _PATH.sub(lambda m: m.group(1), " ".join(text.split()))
        return (text[:1500] + " …") if len(text) > 1500 else (text or type(exc).__name__)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__}; details in the service log, job {job_id})"
    if isinstance(exc, MemoryError):
        return f"out of memory (details in the service log, job {job_id})"
    return f"internal error ({type(exc).__name__}; details in the service log, job {job_id})"


STAGE_LABELS = {"pseudonymize": "pseudonymization", "select_series": "series selection",
                "convert": "conversion", "register": "co-registration",
                "skull_strip": "skull stripping", "bias_correct": "N4 bias correction",
                "segment": "tumour segmentation", "summarize": "summary",
                "find_priors": "prior-study search", "longitudinal": "longitudinal comparison",
                "image_qc": "image quality control", "segmentation_qc": "segmentation quality control",
                "build_outputs": "building the DICOM results", "deliver": "delivery"}


class JobRunner:
    """Runs one job's stages in order; safe to call again after a crash."""

    def __init__(self, store: JobStore, spool: Spool, vault: Vault, settings, metrics: Metrics,
                 outbox=None):
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

    def run_stage(self, job_id: int, stage_name: str) -> str:
        """Run one stage of a job, when it is the job's first unfinished stage:
        the entry point of executors that send each stage to another process
        (service/celery_app.py). The caller makes sure no other process runs
        the same stage at the same time. Returns "done", "failed",
        "needs_input", "rejected", "superseded", "final" (the job has ended),
        "duplicate" (the stage is done already) or "not-next" (an earlier stage
        is not done). The job turns running (attempts + 1) when it was not."""
        job = self.store.get(job_id)
        if job is None or job.state in FINAL:
            return "final"
        stage = next((s for s in job.stages if s.name == stage_name), None)
        if stage is None or stage.state == State.DONE.value:
            return "duplicate"
        first = next(s for s in job.stages if s.state != State.DONE.value)
        if first.name != stage_name:
            return "not-next"
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
        label = STAGE_LABELS.get(stage.name, stage.name)
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
