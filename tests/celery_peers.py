"""Real peers of the scaled-out mode: a redis-server (broker, AOF persistence),
`brainline worker` processes, and a whole cluster (PostgreSQL, Redis, one
gateway, N workers, shared workspaces) for tests and bench/throughput.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.peers import PostgresServer, ServiceProcess, free_port


class RedisServer:
    """A throw-away redis-server on loopback with append-only persistence
    (fsync on every write), restartable with its data."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server not found: run scripts/install-system-deps.sh")
        self.binary = binary
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--protected-mode", "yes"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not answer")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _clean_env() -> dict:
    """The parent's environment without any BRAINLINE_* variable (no vault key),
    with the suite's model pin (the baseline, see conftest)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAINLINE_")}
    env["BRAINLINE_MODEL"] = os.environ.get("BRAINLINE_MODEL", "baseline")
    return env


class WorkerProcess:
    """A `brainline worker` subprocess with its own home (logs) and HTTP port."""

    def __init__(self, home: Path, queues: str = "compute", **env):
        self.home = home
        self.http_port = free_port()
        self.queues = queues
        self.env = {**_clean_env(), "BRAINLINE_HOME": str(home), "BRAINLINE_HTTP_BIND": "127.0.0.1",
                    "BRAINLINE_WORKER_HTTP_PORT": str(self.http_port), "BRAINLINE_EXECUTOR": "celery",
                    **{k: str(v) for k, v in env.items()}}
        self.proc: subprocess.Popen | None = None
        self.stdout_path = home / "worker.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> "WorkerProcess":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "WorkerProcess":
        """Start the process without waiting for it (see ``wait_ready``)."""
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "brainline.service.cli", "worker",
                                      "--queues", self.queues], env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT)
        out.close()
        return self

    def wait_ready(self, timeout: float = 60) -> "WorkerProcess":
        """Wait until the launched worker answers /readyz (RuntimeError if it exits or times out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"brainline worker exited: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"brainline worker not ready in {timeout:.0f} s: {self.output()[-3000:]}")

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def log_records(self) -> list[dict]:
        import json

        path = self.home / "logs" / "worker.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]

    def metric(self, name: str, labels: str = "") -> float:
        body = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name) and labels in line and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head.split("{")[0] == name:
                    total += float(value)
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM) without waiting; ``stop`` waits."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def new_database(pg: PostgresServer) -> str:
    """A fresh database on ``pg``; returns its SQLAlchemy URL (PostgresServer.new_database)."""
    return pg.new_database()


class Cluster:
    """One gateway (`brainline serve`, BRAINLINE_EXECUTOR=celery) and N workers
    on a fresh PostgreSQL database, a Redis broker and a shared workspace folder."""

    def __init__(self, root: Path, pg: PostgresServer, redis: RedisServer, workers: int = 2,
                 gateway_env: dict | None = None, worker_env: dict | None = None):
        self.root = root
        self.redis = redis
        self.database_url = new_database(pg)
        self.shared = root / "shared-workspaces"
        self.shared.mkdir(parents=True, exist_ok=True, mode=0o700)
        common = {"BRAINLINE_EXECUTOR": "celery", "BRAINLINE_BROKER_URL": redis.url,
                  "BRAINLINE_DATABASE_URL": self.database_url, "BRAINLINE_WORKSPACES": str(self.shared),
                  "BRAINLINE_STAGE_LEASE_SECONDS": "6"}
        self.gateway = ServiceProcess(root / "gateway", **common, **(gateway_env or {}))
        self.worker_env = {**common, **(worker_env or {})}
        self.workers = [WorkerProcess(root / f"worker{i}", **self.worker_env) for i in range(workers)]

    def start(self) -> "Cluster":
        self.gateway.start()  # migrates the database first
        # the workers start side by side (each spends seconds importing), then each must be ready
        for w in self.workers:
            w.launch()
        for w in self.workers:
            w.wait_ready()
        return self

    def add_worker(self) -> WorkerProcess:
        w = WorkerProcess(self.root / f"worker{len(self.workers)}", **self.worker_env)
        self.workers.append(w)
        return w.start()

    def stop(self) -> None:
        for w in self.workers:  # all workers shut down side by side, then the gateway
            w.terminate()
        for w in self.workers:
            w.stop()
        self.gateway.stop()

    def __enter__(self) -> "Cluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
