"""Shared fixtures: real DICOM studies from ../shared/data, a real
`brainline serve` process, a real Orthanc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.dicom_factory import write_study
from tests.peers import OrthancServer, free_port

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
TCGA = DATA / "tcga-du-7294"
BRATS = DATA / "brats-gli-00001-000"

# Identity written into every test study: must never leave the gateway.
PHI = {
    "patient_name": "DOE^JANE",
    "patient_id": "PID-4711-XYZ",
    "birth_date": "19640229",
    "accession": "ACC-98765",
}
PHI_STRINGS = ["DOE^JANE", "DOE", "JANE", "PID-4711-XYZ", "19640229", "ACC-98765",
               "St Elsewhere", "HOUSE^GREGORY"]


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """4-series study, every 5th slice (4 x 31 = 124 instances)."""
    out = tmp_path_factory.mktemp("small_study")
    return write_study(out, TCGA, slice_step=5, **PHI)


@pytest.fixture(scope="session")
def full_study(tmp_path_factory):
    """4-series 240x240x155 study (620 instances)."""
    out = tmp_path_factory.mktemp("full_study")
    return write_study(out, TCGA, **PHI)


class ServiceProcess:
    """A `brainline serve` subprocess with its own home, ports and log."""

    def __init__(self, home: Path, **env):
        self.home = home
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "BRAINLINE_HOME": str(home),
            "BRAINLINE_DICOM_PORT": str(self.dicom_port),
            "BRAINLINE_HTTP_PORT": str(self.http_port),
            "BRAINLINE_DICOM_BIND": "127.0.0.1",
            "BRAINLINE_HTTP_BIND": "127.0.0.1",
            "BRAINLINE_AE_TITLE": "BRAINLINE",
            "BRAINLINE_STABLE_SECONDS": "2",
            "BRAINLINE_VAULT_KEY": "test-vault-key-0123456789abcdef",
            "BRAINLINE_MIN_FREE_MB": "100",
        }
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None
        self.stdout_path = home / "serve.out"

    @property
    def cli(self) -> list[str]:
        return [sys.executable, "-m", "brainline.service.cli"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, wait_ready: bool = True) -> "ServiceProcess":
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "brainline.service.cli", "serve"],
                                     env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"brainline serve exited: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"brainline serve not ready in 60 s: {self.output()[-3000:]}")

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    # -- API helpers -------------------------------------------------------
    def api(self, method: str, path: str, **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        token = self.env.get("BRAINLINE_API_TOKEN")
        if token:
            headers.setdefault("Authorization", f"Bearer {token}")
        return httpx.request(method, self.url + path, headers=headers, timeout=120, **kw)

    def jobs(self) -> list[dict]:
        return self.api("GET", "/api/v1/jobs").json()["jobs"]

    def job(self, job_id: int) -> dict:
        return self.api("GET", f"/api/v1/jobs/{job_id}").json()

    def wait_jobs(self, n: int, timeout: float = 120) -> list[dict]:
        """Wait until at least n jobs exist and all of them are finished."""
        final = {"done", "failed", "needs_input", "rejected"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if len(jobs) >= n and all(j["state"] in final for j in jobs):
                return [self.job(j["id"]) for j in sorted(jobs, key=lambda j: j["id"])]
            time.sleep(0.3)
        raise AssertionError(f"jobs not finished in {timeout} s: {self.jobs()}")

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (labels in line) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head.split("{")[0] == name:
                    total += float(value)
        return total


@pytest.fixture
def service_factory(tmp_path):
    started: list[ServiceProcess] = []

    def make(home: Path | None = None, start: bool = True, wait_ready: bool = True, **env):
        svc = ServiceProcess(home or tmp_path / f"home{len(started)}", **env)
        started.append(svc)
        if start:
            svc.start(wait_ready=wait_ready)
        return svc

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
def service(service_factory):
    return service_factory()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    with OrthancServer() as server:
        yield server
