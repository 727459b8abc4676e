"""Executors run jobs. ``LocalExecutor`` (the default) runs whole jobs in a
thread pool of the service process (``JobRunner.run``). ``CeleryExecutor``
(``BRAINLINE_EXECUTOR=celery``) sends each stage as a Celery task to the queue
of its PHI zone (see ``service/jobs/celery_app.py``): the gateway itself consumes
the ``gateway`` queue (pseudonymize, deliver) with an embedded Celery worker,
``brainline worker`` processes consume ``compute`` and ``gpu``."""

from __future__ import annotations

import abc
import logging
import queue
import threading

log = logging.getLogger("brainline.executor")


class Executor(abc.ABC):
    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def submit(self, job_id: int) -> None:
        """Queue a job; returns at once."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def alive(self) -> bool:
        """True when the executor can make progress on queued jobs."""


class LocalExecutor(Executor):
    """A pool of worker threads inside the service process."""

    def __init__(self, run_job, workers: int = 2):
        self._run_job = run_job
        self._workers = max(1, workers)
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._pending: set[int] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._loop, name=f"brainline-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                self._pending.discard(job_id)
            try:
                self._run_job(job_id)
            except Exception:  # the runner records failures; keep the worker alive
                log.exception("executor: job crashed outside a stage", extra={"job_id": job_id})


class CeleryExecutor(Executor):
    """Gateway side of the scaled-out mode: ``submit`` sends a job's first
    unfinished stage to its queue; an embedded Celery worker (thread pool of
    ``BRAINLINE_WORKERS`` threads) consumes the ``gateway`` queue; the stage
    watchdog re-queues stages of lost workers and messages the broker lost."""

    def __init__(self, settings, store, runner):
        from .celery_app import GATEWAY, StageRuntime, StageWatchdog, make_celery

        self.settings = settings
        self.app = make_celery(settings)
        self.runtime = StageRuntime(settings=settings, store=store, runner=runner, app=self.app,
                                    zone=GATEWAY)
        interval = max(1.0, min(5.0, settings.stage_lease_seconds / 3))
        self.watchdog = StageWatchdog(self.runtime, interval=interval,
                                      grace=max(5.0, settings.stage_lease_seconds))
        self._worker = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        from .celery_app import set_runtime

        set_runtime(self.runtime)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run_worker, name="brainline-gateway-queue",
                                        daemon=True)
        self._thread.start()
        self.watchdog.start()

    def _run_worker(self) -> None:
        """Consume the gateway queue; a consumer that stops on its own (e.g.
        kombu giving up after the broker restarted) is started again."""
        from .celery_app import GATEWAY

        while not self._stopping.is_set():
            self._worker = self.app.WorkController(
                app=self.app, hostname=f"brainline-gateway@{_host()}", queues=[GATEWAY],
                pool="threads", concurrency=max(1, self.settings.workers), loglevel="WARNING",
                without_heartbeat=True, without_mingle=True, without_gossip=True, optimization="fair")
            try:
                self._worker.start()
            except BaseException:  # noqa: BLE001 - logged, then started again
                log.exception("gateway queue consumer stopped")
            if self._stopping.wait(2.0):
                return
            log.warning("gateway queue consumer stopped unexpectedly; starting it again")

    def submit(self, job_id: int) -> None:
        self.watchdog.submit(job_id)

    def stop(self) -> None:
        self._stopping.set()
        self.watchdog.stop()
        if self._worker is not None:
            try:
                self._worker.stop(in_sighandler=False)
            except Exception:  # already stopping
                pass
        if self._thread:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive() and self.watchdog.alive())

    def queue_depths(self) -> dict[str, int]:
        from .celery_app import queue_depths

        return queue_depths(self.runtime.redis)


def _host() -> str:
    import os
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
