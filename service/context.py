"""Wires the service's parts together: settings, database, vault, spool,
metrics, job store, runner, executor, listener and completion monitor."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from .db import make_engine, make_sessionmaker, migrate
from .gateway.completion import CompletionMonitor
from .gateway.destinations import parse_destinations
from .gateway.listener import DicomListener
from .gateway.outbox import Outbox
from .gateway.spool import Spool
from .gateway.vault import Vault, resolve_vault_key
from .jobs.executor import Executor, LocalExecutor
from .jobs.runner import JobRunner
from .jobs.store import JobStore
from .metrics import Metrics
from .settings import Settings

if TYPE_CHECKING:
    from .gateway.retention import RetentionScheduler

log = logging.getLogger("brainline.service")


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    vault: Vault
    spool: Spool
    metrics: Metrics
    store: JobStore
    runner: JobRunner
    executor: Executor
    outbox: Outbox
    listener: DicomListener | None = None
    monitor: CompletionMonitor | None = None
    dev_key: bool = False
    started: bool = field(default=False)
    retention: RetentionScheduler | None = None  # daily purge, bytes-held gauges

    @classmethod
    def build(cls, settings: Settings) -> "ServiceContext":
        """Create folders, migrate the database and build every part (nothing
        is started: see ``start``)."""
        settings.home.mkdir(parents=True, exist_ok=True)
        settings.workspace_dir.mkdir(parents=True, exist_ok=True)
        migrate(settings.database_url)
        engine = make_engine(settings.database_url)
        sessions = make_sessionmaker(engine)
        key, generated = resolve_vault_key(settings.vault_key, settings.dev_mode, settings.home)
        vault = Vault(key, sessions)
        spool = Spool(settings.spool_dir, settings.min_free_mb)
        metrics = Metrics()
        store = JobStore(sessions)
        metrics.add_jobs_by_state(store.counts_by_state)
        outbox = Outbox(sessions, parse_destinations(settings), settings, metrics)
        runner = JobRunner(store, spool, vault, settings, metrics, outbox)
        executor: Executor
        queue_depths = None  # the Celery queues' lengths, for the gateway's gauges
        if settings.executor == "celery":
            from .jobs.executor import CeleryExecutor

            celery = CeleryExecutor(settings, store, runner)
            executor, queue_depths = celery, celery.queue_depths
        else:
            executor = LocalExecutor(runner.run, settings.workers)
        from .scaleout_metrics import add_gateway_metrics

        add_gateway_metrics(metrics, spool, outbox, queue_depths)
        from .gateway.retention import RetentionScheduler

        retention = RetentionScheduler(settings, sessions, metrics, vault)
        return cls(settings=settings, engine=engine, sessions=sessions, vault=vault, spool=spool,
                   metrics=metrics, store=store, runner=runner, executor=executor, outbox=outbox,
                   dev_key=generated, retention=retention)

    def start(self) -> None:
        """Start executor, re-queue unfinished jobs, then listener and monitor."""
        s = self.settings
        if self.dev_key:
            log.warning("DEVELOPMENT MODE: the vault key was generated and is stored in "
                        f"{s.home / 'vault.key'}; set BRAINLINE_VAULT_KEY in production")
        if not s.allowed_aes:
            log.warning("BRAINLINE_ALLOWED_AES is empty: associations from any calling AE title "
                        "are accepted")
        if not s.api_token:
            log.warning("BRAINLINE_API_TOKEN is empty: the REST API under /api/ is not authenticated")
        if not self.outbox.destinations:
            log.warning("no result destination configured (BRAINLINE_DEST_DICOM / "
                        "BRAINLINE_DEST_STOWRS): results stay in the job workspaces")
        self.executor.start()
        self.outbox.start()
        for job_id in self.store.recover():
            log.info("re-queued unfinished job after restart", extra={"job_id": job_id})
            self.executor.submit(job_id)
        self.listener = DicomListener(s, self.spool, self.vault.study_key, self.metrics)
        self.listener.start()
        from .gateway.retention import purged_spool_jobs

        self.monitor = CompletionMonitor(self.spool, self.store, self.executor.submit,
                                         s.stable_seconds, self.metrics,
                                         purged_jobs=lambda: purged_spool_jobs(s.home))
        self.monitor.start()
        if self.retention:
            self.retention.start()
        self.started = True

    def stop(self) -> None:
        if self.retention:
            self.retention.stop()
        if self.listener:
            self.listener.stop()
        if self.monitor:
            self.monitor.stop()
        self.executor.stop()
        self.outbox.stop()
        self.engine.dispose()

    def readiness(self) -> list[str]:
        """Reasons the service is not ready; empty when ready."""
        from sqlalchemy import text

        reasons = []
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            reasons.append(f"database unreachable: {type(exc).__name__}")
        problem = self.spool.probe_writable()
        if problem:
            reasons.append(problem)
        free_mb = self.spool.free_bytes() / 2**20
        if free_mb < self.settings.min_free_mb:
            reasons.append(f"free space {free_mb:.0f} MB is below BRAINLINE_MIN_FREE_MB="
                           f"{self.settings.min_free_mb:.0f}; C-STORE answers Out of Resources")
        if not (self.listener and self.listener.bound):
            reasons.append("DICOM listener is not bound")
        if not self.executor.alive():
            reasons.append("executor has no live workers")
        if not (self.monitor and self.monitor.alive()):
            reasons.append("study completion monitor is not running")
        if not self.outbox.alive():
            reasons.append("outbox sender is not running")
        # An unreachable destination does not stop the gateway from accepting
        # studies (results wait in the outbox): see delivery_health().
        return reasons

    def delivery_health(self) -> dict:
        """Destinations and the outbox: for /delivery-health and the on-call,
        never for readiness."""
        import time

        now = time.monotonic()
        limit = self.settings.dest_unreachable_seconds
        destinations = []
        for name in sorted(self.outbox.destinations):
            since = self.outbox.failing_since.get(name)
            failing = 0.0 if since is None else now - since
            destinations.append({"name": name, "reachable": since is None,
                                 "failing_for_s": round(failing, 1),
                                 "unreachable": since is not None and failing > limit,
                                 "last_error": self.outbox.last_error.get(name) if since is not None else None})
        reasons = self.outbox.unreachable()
        return {"healthy": not reasons, "reasons": reasons, "destinations": destinations,
                "outbox_depth": self.outbox.depth(),
                "outbox_oldest_age_s": round(self.outbox.oldest_pending_age(), 1),
                "unreachable_after_s": limit}
