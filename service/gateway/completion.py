"""Study completion detector.

The spool is the source of truth: a study folder whose modification time
(changed by every file renamed into it) is older than BRAINLINE_STABLE_SECONDS
counts as complete. A job is created when the study holds a different number
of versions (``Spool.versions``: instances plus earlier versions kept after a
conflicting re-send) than the newest job of that study was built from, so late
instances and conflicting re-sends re-open the study and re-trigger it after
another quiet period, duplicates do not, and a restart picks up whatever
arrived before it.

The quiet period restarts with the process: a study already in the spool at
start-up (for example the first part of a push interrupted by a crash) is not
turned into a job until BRAINLINE_STABLE_SECONDS after start-up (or after the
last instance received since), however old its folder is; the sender gets the
time to re-send.

A job's site (``Job.site``) is the calling AE title that sent the study's
newest instances (``Spool.calling_ae``; "" for a study pulled over DICOMweb).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..jobs.store import JobStore
from ..metrics import Metrics
from .spool import Spool

log = logging.getLogger("brainline.completion")


class CompletionMonitor:
    def __init__(self, spool: Spool, store: JobStore, submit, stable_seconds: float,
                 metrics: Metrics, poll_seconds: float = 0.5,
                 purged_jobs: Callable[[], set[int]] | None = None):
        self.spool = spool
        self.store = store
        self.submit = submit
        self.stable_ns = int(stable_seconds * 1e9)
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self._handled_mtime: dict[str, int] = {}
        self._job_counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_ns = time.time_ns()  # quiet periods count from here at the earliest
        # () -> ids of jobs whose spool study was purged by retention since
        self._purged_jobs = purged_jobs or (lambda: set())

    def start(self) -> None:
        self._start_ns = time.time_ns()
        # a study purged by retention and received again is a new study, whatever its count
        self._job_counts = self.store.latest_counts(exclude_jobs=self._purged_jobs())
        self._thread = threading.Thread(target=self._loop, name="brainline-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check_once()
            except Exception:
                log.exception("completion check failed")

    def check_once(self, now_ns: int | None = None) -> list[int]:
        """Create jobs for studies that became stable; return their ids."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        created, waiting = [], 0
        studies = list(self.spool.studies())
        present = {key for key, _ in studies}
        for gone in [key for key in self._job_counts if key not in present]:
            # the folder went (retention purge): a later re-send is a new study
            self._job_counts.pop(gone, None)
            self._handled_mtime.pop(gone, None)
        for study_key, mtime in studies:
            if self._handled_mtime.get(study_key) == mtime:
                continue
            if now_ns - max(mtime, self._start_ns) < self.stable_ns:
                waiting += 1
                continue
            self._handled_mtime[study_key] = mtime
            count = self.spool.versions(study_key)
            if count == 0 or self._job_counts.get(study_key) == count:
                continue
            site = self.spool.calling_ae(study_key) if hasattr(self.spool, "calling_ae") else ""
            job_id = self.store.create(study_key, count, source="spool", site=site)
            self._job_counts[study_key] = count
            self.store.mark_queued(job_id)
            self.submit(job_id)
            created.append(job_id)
            log.info("study complete, job queued",
                     extra={"job_id": job_id, "study_key": study_key, "instances": count})
        self.metrics.studies_pending.set(waiting)
        return created
