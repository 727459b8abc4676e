"""Scaled-out mode: every pipeline stage is a Celery task.

One task, ``brainline.run_stage(job_id, stage_name)``, routed to a queue that
follows the PHI zones:

* ``gateway``: ``pseudonymize`` and ``deliver``. Only the gateway (``brainline
  serve`` with ``BRAINLINE_EXECUTOR=celery``) consumes it: it holds the vault
  key, the spool and the outbox.
* ``compute``: the image stages, on ``brainline worker`` processes that see
  only the pseudonymized job workspaces (``BRAINLINE_WORKSPACES`` on shared
  storage) and never the vault key.
* ``gpu``: ``segment`` when a live worker with ``BRAINLINE_DEVICE=cuda``
  consumes it; otherwise ``segment`` goes to ``compute``.

The job store (database) is the truth; the broker only carries work. Tasks
are ``acks_late`` (a message is acknowledged after the stage ran) and
idempotent: a task whose stage is already done, or whose job has ended, does
nothing. While a stage runs, its worker holds a lease in Redis
(``brainline:lease:<job>:<stage>``, renewed every third of
``BRAINLINE_STAGE_LEASE_SECONDS``), so a duplicate delivery never runs a stage
twice at once. The gateway's watchdog (``StageWatchdog``) compares the job
store with the broker every few seconds: a running stage whose lease expired
(its worker was killed) is re-queued, and a queued stage with no message
marker in the broker (the broker lost it, or a worker died between finishing
one stage and sending the next) is sent again. Either way the stage runs
again and the job completes once.

Redis is the broker (``redis://`` or ``rediss://``); it also holds the
leases, the dispatch markers and the worker registry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from celery import Celery
from kombu import Queue
from sqlalchemy import select, update

from ..db import Job, Stage, State, utcnow
from .stage_table import GATEWAY_STAGES
from .store import FINAL

if TYPE_CHECKING:
    from .runner import JobRunner
    from .store import JobStore

log = logging.getLogger("brainline.celery")

GATEWAY, COMPUTE, GPU = "gateway", "compute", "gpu"
QUEUES = (GATEWAY, COMPUTE, GPU)
#: Stages that use a GPU when one is there.
GPU_STAGES = frozenset({"segment"})
TASK_NAME = "brainline.run_stage"
KEY_PREFIX = "brainline:"


def lease_key(job_id: int, stage: str) -> str:
    return f"{KEY_PREFIX}lease:{job_id}:{stage}"


def dispatch_key(job_id: int, stage: str) -> str:
    return f"{KEY_PREFIX}dispatched:{job_id}:{stage}"


WORKER_KEY = KEY_PREFIX + "worker:"


def check_broker_url(url: str) -> None:
    from ..settings import SettingsError

    if not url.startswith(("redis://", "rediss://")):
        raise SettingsError(f"BRAINLINE_BROKER_URL must be a Redis URL (redis://host:6379/0); "
                            f"got scheme {url.split(':', 1)[0]!r}")


def make_celery(settings) -> Celery:
    """The Celery app of this process; tasks call ``current_runtime()``."""
    check_broker_url(settings.broker_url)
    app = Celery("brainline", broker=settings.broker_url, set_as_current=True)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=COMPUTE,
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_create_missing_queues=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
        enable_utc=True,
    )

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_stage(job_id: int, stage_name: str) -> str:
        return current_runtime().run_stage(int(job_id), str(stage_name))

    app.brainline_run_stage = run_stage
    return app


def redis_client(settings):
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=5,
                                health_check_interval=30)


def queue_depths(client) -> dict[str, int]:
    """Messages waiting per queue (not counting those being worked on)."""
    return {q: int(client.llen(q)) for q in QUEUES}


def live_workers(client) -> list[dict]:
    """Workers that refreshed their registry entry recently."""
    out = []
    for key in client.scan_iter(WORKER_KEY + "*"):
        raw = client.get(key)
        if raw:
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out


# --------------------------------------------------------------------------
# The runtime of one process (gateway or worker)
# --------------------------------------------------------------------------
_RUNTIME: "StageRuntime | None" = None


def current_runtime() -> "StageRuntime":
    if _RUNTIME is None:
        raise RuntimeError("no BrainLine stage runtime in this process")
    return _RUNTIME


def set_runtime(runtime: "StageRuntime | None") -> None:
    global _RUNTIME
    _RUNTIME = runtime


class Lease:
    """A Redis lock held while a stage runs, renewed by a thread."""

    def __init__(self, client, job_id: int, stage: str, seconds: float):
        self.lock = client.lock(lease_key(job_id, stage), timeout=seconds, blocking=False,
                                thread_local=False)
        self.seconds = seconds
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.lock.acquire(token=self.token):
            return False
        self._thread = threading.Thread(target=self._renew, name="brainline-lease", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.lock.reacquire()
            except Exception:  # broker briefly away: try again; the lease may lapse
                log.warning("stage lease not renewed (broker unreachable?)")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.lock.release()
        except Exception:  # expired or broker away: the watchdog sees the stage state
            pass


@dataclass
class StageRuntime:
    """Runs stages in this process. ``zone`` is ``gateway`` (runs the gateway
    stages: spool, vault and outbox at hand) or ``compute`` (a worker: no
    vault, no spool, no outbox)."""

    settings: Any           # service.settings.Settings
    store: JobStore
    runner: JobRunner       # spool/vault/outbox None on workers
    app: Celery
    zone: str
    redis: Any = None       # a redis.Redis client; made from the settings when None
    on_stage: Callable[[str, str, float], None] | None = None  # (stage, outcome, seconds)
    running: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.redis is None:
            self.redis = redis_client(self.settings)

    # -- routing -------------------------------------------------------------
    def queue_for(self, stage_name: str) -> str:
        if stage_name in GATEWAY_STAGES:
            return GATEWAY
        if stage_name in GPU_STAGES and self.gpu_available():
            return GPU
        return COMPUTE

    def gpu_available(self) -> bool:
        try:
            return any(GPU in w.get("queues", ()) for w in live_workers(self.redis))
        except Exception:
            return False

    def dispatch(self, job_id: int, stage_name: str) -> str:
        """Send one stage to its queue (marker first: the watchdog trusts it)."""
        queue = self.queue_for(stage_name)
        ttl = max(60, int(self.settings.broker_visibility_timeout))
        self.redis.set(dispatch_key(job_id, stage_name), queue, ex=ttl)
        try:
            self.app.brainline_run_stage.apply_async(
                (job_id, stage_name), queue=queue, routing_key=queue, retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1,
                              "interval_max": 3})
        except Exception:
            self.redis.delete(dispatch_key(job_id, stage_name))
            raise
        log.info("stage queued", extra={"job_id": job_id, "stage": stage_name, "queue": queue})
        return queue

    # -- running ---------------------------------------------------------------
    def run_stage(self, job_id: int, stage_name: str) -> str:
        """The body of the Celery task; idempotent (see the module's doc)."""
        if (stage_name in GATEWAY_STAGES) != (self.zone == GATEWAY):
            # delivered to the wrong zone (mis-routed by hand): send it where it belongs
            log.warning("stage arrived in the wrong zone; re-routed",
                        extra={"job_id": job_id, "stage": stage_name, "zone": self.zone})
            self.dispatch(job_id, stage_name)
            return "rerouted"
        # This message is consumed: the marker says "a message waits in the broker".
        self.redis.delete(dispatch_key(job_id, stage_name))
        blocked = self.runner.not_runnable(job_id, stage_name)
        if blocked:
            return blocked  # "not-next": an earlier stage is not done; the watchdog sends that one
        lease = Lease(self.redis, job_id, stage_name, self.settings.stage_lease_seconds)
        if not lease.acquire():
            return "busy"  # another worker runs it right now; if it dies the watchdog re-queues
        with self._lock:
            self.running += 1
        t0 = time.monotonic()
        outcome = "error"
        try:
            outcome = self._run_locked(job_id, stage_name)
            return outcome
        finally:
            with self._lock:
                self.running -= 1
            lease.release()
            if self.on_stage:
                self.on_stage(stage_name, outcome, time.monotonic() - t0)

    def _run_locked(self, job_id: int, stage_name: str) -> str:
        """Under the lease: run the stage (service/jobs/runner.py), then send the next
        one, or mark the job done after the last."""
        outcome = self.runner.run_stage(job_id, stage_name)
        if outcome != State.DONE.value:
            return outcome
        following = self.runner.next_stage(job_id)
        if following is None:
            self.finish_job(job_id)
        elif not self.store.superseded(job_id):
            self.dispatch(job_id, following)
        return outcome

    def finish_job(self, job_id: int) -> bool:
        """running -> done, once (a conditional update: a repeat changes nothing)."""
        changed = self.store.finish(job_id)
        if changed:
            log.info("job done", extra={"job_id": job_id})
        return bool(changed)


# --------------------------------------------------------------------------
# Gateway side: the watchdog that keeps the broker in line with the job store
# --------------------------------------------------------------------------
class StageWatchdog:
    """Every ``interval`` s: jobs whose dispatch failed are sent again; a
    running stage without a live lease is re-queued and sent; a queued next
    stage without a dispatch marker is sent (after ``grace`` s)."""

    def __init__(self, runtime: StageRuntime, interval: float = 5.0, grace: float = 10.0):
        self.runtime = runtime
        self.interval = interval
        self.grace = grace
        self.undispatched: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.requeued = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="brainline-stage-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # broker or database away: try again next round
                log.warning("stage watchdog round skipped", extra={"error": type(exc).__name__})

    def submit(self, job_id: int) -> None:
        """Send the job's first unfinished stage (or remember it when the broker is away)."""
        try:
            self._send_next(job_id, force=True)
            self.undispatched.discard(job_id)
        except Exception as exc:
            self.undispatched.add(job_id)
            log.warning("job not sent to the broker yet; will retry",
                        extra={"job_id": job_id, "error": type(exc).__name__})

    def _send_next(self, job_id: int, force: bool) -> None:
        rt = self.runtime
        job = rt.store.get(job_id)
        if job is None or job.state in FINAL:
            return
        first = next((s for s in job.stages if s.state != State.DONE.value), None)
        if first is None:
            rt.finish_job(job_id)
            return
        if first.state == State.RUNNING.value:
            if rt.redis.exists(lease_key(job_id, first.name)):
                return
            if not self._requeue_if_dead(first.id, job_id, first.name) and not force:
                return
            log.warning("stage re-queued: its worker stopped renewing the lease",
                        extra={"job_id": job_id, "stage": first.name})
            self.requeued += 1
            rt.dispatch(job_id, first.name)
            return
        if first.state != State.QUEUED.value:
            return
        if not force:
            if rt.redis.exists(dispatch_key(job_id, first.name)) or rt.redis.exists(lease_key(job_id, first.name)):
                return
            previous = [s for s in job.stages if s.position < first.position]
            since = max([s.finished_at for s in previous if s.finished_at] + [job.queued_at or job.created_at])
            if (utcnow() - since).total_seconds() < self.grace:
                return
            log.warning("stage sent again: the broker had no message for it",
                        extra={"job_id": job_id, "stage": first.name})
        rt.dispatch(job_id, first.name)

    def _requeue_if_dead(self, stage_id: int, job_id: int, name: str) -> bool:
        """running -> queued when the lease is still absent (re-read after the
        lease check: a stage that finished meanwhile is left alone)."""
        if self.runtime.redis.exists(lease_key(job_id, name)):
            return False
        with self.runtime.store.sessions.begin() as s:
            return bool(s.execute(update(Stage).where(Stage.id == stage_id,
                                                      Stage.state == State.RUNNING.value)
                                  .values(state=State.QUEUED.value)).rowcount)

    def check(self) -> None:
        for job_id in sorted(self.undispatched):
            self.submit(job_id)
        with self.runtime.store.sessions() as s:
            live = list(s.scalars(select(Job.id).where(
                Job.state.in_([State.QUEUED.value, State.RUNNING.value])).order_by(Job.id)))
        for job_id in live:
            if job_id not in self.undispatched:
                self._send_next(job_id, force=False)
