"""``brainline worker``: a Celery worker for the compute zone.

It consumes ``compute`` (and ``gpu`` when ``BRAINLINE_DEVICE=cuda``) and runs
the image stages on the pseudonymized job workspaces
(``BRAINLINE_WORKSPACES``, shared with the gateway). It never holds the vault
key: it refuses to start when ``BRAINLINE_VAULT_KEY`` is set, and it has no
spool, vault or outbox. With ``--concurrency 1`` (the default) it runs one
stage at a time in its main process (Celery's solo pool), so ``kill -9``
stops the stage with it; the gateway's watchdog then re-queues it.

HTTP on ``BRAINLINE_WORKER_HTTP_PORT``: ``/healthz`` (liveness: the process
and its Celery consumer), ``/readyz`` (database and broker answer),
``/metrics`` (Prometheus: tasks running, tasks by outcome, failures, stage
durations, queue depth per queue, broker up).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..jobs.celery_app import (
    COMPUTE,
    GATEWAY,
    GPU,
    QUEUES,
    WORKER_KEY,
    StageRuntime,
    make_celery,
    queue_depths,
    redis_client,
    set_runtime,
)

log = logging.getLogger("brainline.worker")
EX_SOFTWARE = 70  # Celery's exit code after an unrecoverable error


class WorkerError(Exception):
    """The worker cannot start; the message says why in words."""


def worker_queues(requested: str, device: str) -> list[str]:
    """The queues to consume: ``gpu`` only with a GPU; never ``gateway``."""
    queues = [q.strip() for q in requested.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        raise WorkerError(f"unknown queue {', '.join(unknown)}; a worker consumes compute and/or gpu")
    if GATEWAY in queues:
        raise WorkerError("the gateway queue (pseudonymize, deliver) is consumed by `brainline serve` "
                          "only: it needs the vault key, which workers never hold")
    if GPU in queues and device != "cuda":
        log.warning("queue gpu ignored: BRAINLINE_DEVICE is not cuda")
        queues.remove(GPU)
    if not queues:
        raise WorkerError("no queue left to consume (gpu needs BRAINLINE_DEVICE=cuda)")
    return queues


def _handler(worker: "Worker"):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # no access log
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                problems = worker.liveness()
                body = {"status": "ok" if not problems else "failing", "reasons": problems,
                        "queues": worker.queues, "tasks_running": worker.runtime.running}
                self._send(200 if not problems else 503, json.dumps(body).encode())
            elif path == "/readyz":
                problems = worker.readiness()
                self._send(200 if not problems else 503,
                           json.dumps({"ready": not problems, "reasons": problems}).encode())
            elif path == "/metrics":
                self._send(200, generate_latest(worker.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b'{"detail": "not found"}')

    return Handler


class Worker:
    runtime: StageRuntime  # set in __init__ (after the metrics whose running_fn reads it)

    def __init__(self, settings, queues: list[str], concurrency: int):
        from ..db import make_engine, make_sessionmaker
        from ..jobs.runner import JobRunner
        from ..jobs.store import JobStore
        from ..scaleout_metrics import WorkerMetrics

        if settings.vault_key:
            raise WorkerError("BRAINLINE_VAULT_KEY is set: workers must never hold the vault key "
                              "(only the gateway does); remove it from the worker's environment")
        if not settings.broker_url:
            raise WorkerError("BRAINLINE_BROKER_URL is not set (e.g. redis://redis:6379/0)")
        self.settings = settings
        self.queues = queues
        self.concurrency = concurrency
        self.hostname = f"brainline-worker@{socket.gethostname()}-{os.getpid()}"
        self.engine = make_engine(settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.app = make_celery(settings)
        self.redis = redis_client(settings)
        self.metrics = WorkerMetrics(queue_depth_fn=lambda: queue_depths(self.redis),
                                     running_fn=lambda: self.runtime.running)
        store = JobStore(self.sessions)
        # No spool, no vault, no outbox: the compute zone sees workspaces only.
        runner = JobRunner(store, None, None, settings, self.metrics, None)
        self.runtime = StageRuntime(settings=settings, store=store, runner=runner, app=self.app,
                                    zone=COMPUTE, redis=self.redis, on_stage=self.metrics.on_stage)
        self.consumer_started = threading.Event()
        self._stop = threading.Event()
        self._http: ThreadingHTTPServer | None = None

    # -- health ------------------------------------------------------------
    def liveness(self) -> list[str]:
        return [] if self.consumer_started.is_set() else ["celery consumer not started"]

    def readiness(self) -> list[str]:
        from sqlalchemy import text

        reasons = self.liveness()
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            reasons.append(f"database unreachable: {type(exc).__name__}")
        try:
            self.redis.ping()
        except Exception as exc:
            reasons.append(f"broker unreachable: {type(exc).__name__}")
        return reasons

    # -- registry of live workers (the gateway routes segment to gpu when one is there)
    def _register_loop(self) -> None:
        key = WORKER_KEY + self.hostname
        ttl = max(10, int(self.settings.stage_lease_seconds))
        while True:
            try:
                self.redis.set(key, json.dumps({"hostname": self.hostname, "queues": self.queues,
                                                "device": self.settings.device, "pid": os.getpid(),
                                                "running": self.runtime.running}), ex=ttl)
            except Exception:
                pass
            if self._stop.wait(ttl / 3):
                break
        try:
            self.redis.delete(key)
        except Exception:
            pass

    def run(self) -> int:
        from celery import signals

        self._check_schema()
        set_runtime(self.runtime)
        self._http = ThreadingHTTPServer((self.settings.http_bind, self.settings.worker_http_port),
                                         _handler(self))
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="brainline-worker-http",
                         daemon=True).start()
        threading.Thread(target=self._register_loop, name="brainline-worker-registry",
                         daemon=True).start()
        signals.worker_ready.connect(lambda **_: self.consumer_started.set(), weak=False)
        log.info("brainline worker starting", extra={"queues": self.queues, "concurrency": self.concurrency,
                                                     "http_port": self.settings.worker_http_port,
                                                     "hostname": self.hostname})
        pool = "solo" if self.concurrency == 1 else "threads"
        try:
            while True:
                worker = self.app.Worker(hostname=self.hostname, queues=self.queues, pool=pool,
                                         concurrency=self.concurrency, loglevel=self.settings.log_level,
                                         without_mingle=True, without_gossip=True, without_heartbeat=True,
                                         optimization="fair", quiet=True, redirect_stdouts=False)
                worker.start()
                if worker.exitcode != EX_SOFTWARE:  # a shutdown (signal) or a clean stop
                    return worker.exitcode or 0
                # Celery gave up after an internal error (e.g. the broker went away
                # mid-reconnect): consume again; the job store keeps the work.
                log.warning("celery consumer stopped on an error; starting it again")
                self.consumer_started.clear()
                time.sleep(2)
        finally:
            self._stop.set()
            self._http.shutdown()
            self.engine.dispose()

    def _check_schema(self) -> None:
        from sqlalchemy import inspect

        deadline = time.monotonic() + 60
        while True:
            try:
                if "jobs" in inspect(self.engine).get_table_names():
                    return
                problem = "the job store has no tables yet (start the gateway, or run `brainline migrate`)"
            except Exception as exc:
                problem = f"database unreachable: {type(exc).__name__}"
            if time.monotonic() > deadline:
                raise WorkerError(problem)
            time.sleep(2)
