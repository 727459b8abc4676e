"""Executors run jobs. The interface is small so that a Celery executor can
slot in without touching the stages: it only has to call ``JobRunner.run``
with a job id in a worker process."""

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
