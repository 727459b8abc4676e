"""Durable jobs: creation, state changes and crash recovery (``JobStore``).

A new job of a study supersedes the study's earlier jobs (error
"superseded by job N ..."): an earlier job still queued or running, or done,
turns ``superseded``; one still running stops before its next stage and
never delivers, its outbox rows not yet sent are cancelled
(``cancel_pending``). One that ended without results (needs_input, failed,
rejected) keeps its state. None of them can be retried.
"""

from __future__ import annotations

import builtins
import logging

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from ..db import FINAL_STATES, Job, OutboxItem, OutboxState, ReviewState, Stage, State, utcnow
from .errors import SUPERSEDED
from .stage_table import DEFAULT_PIPELINE, PIPELINES

log = logging.getLogger("brainline.jobs")

CANCELLED = "cancelled"  # outbox row of a superseded job, never sent


def cancel_pending(session, job_ids: list[int], reason: str) -> int:
    """In ``session``: turn the pending (and held for review) outbox rows of
    ``job_ids`` into ``cancelled`` with ``reason``; returns how many."""
    if not job_ids:
        return 0
    rows = list(session.scalars(select(OutboxItem).where(
        OutboxItem.job_id.in_(job_ids),
        OutboxItem.state.in_([OutboxState.PENDING.value, OutboxState.HELD.value]))))
    for row in rows:
        row.state, row.last_error = CANCELLED, reason
    return len(rows)


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

    def unfinished(self) -> builtins.list[int]:
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

    def recover(self) -> builtins.list[int]:
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
