"""Real DICOM peers for integration tests and benchmarks: an Orthanc server and dcmtk storescu.

Everything binds or connects to loopback (127.0.0.1). Orthanc 1.10 has no bind-address
option, so its DICOM port listens on all interfaces; its HTTP server rejects remote
clients because RemoteAccessAllowed is false.

Example::

    with OrthancServer() as orthanc:
        storescu(study_dir, orthanc.dicom_port, called_aet=orthanc.aet)
        assert orthanc.count_instances() == 620
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import httpx

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
LOOPBACK = "127.0.0.1"


#: Ports free_port has handed out in this process.
_HANDED_OUT: set[int] = set()


def _claim_for_this_run(port: int) -> bool:
    """Claim ``port`` for this test run across processes (the xdist workers of
    one run share PYTEST_XDIST_TESTRUNUID): a file created exclusively in a
    folder of the run. False when another process of the run has it."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:     # one process: _HANDED_OUT is enough
        return True
    folder = Path(tempfile.gettempdir()) / f"brainline-test-ports-{run}"
    folder.mkdir(exist_ok=True)
    try:
        os.close(os.open(folder / str(port), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)
    and that no process of this test run has been given before: once the
    probing socket is closed the OS may offer the same port to the next call,
    in this process or in another xdist worker, and a service was once started
    with its DICOM and HTTP ports equal (CI, stop 23)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT and _claim_for_this_run(port):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 that was not handed out before")


class OrthancServer:
    """A throw-away Orthanc with the DICOMweb plugin, run as a subprocess.

    Storage, index, config and log live in a temporary directory (``.workdir``) that is
    kept across ``stop()``/``start()`` (for fault-injection tests) and removed on
    ``close()`` / context exit. ``modalities`` maps a name to ``[aet, host, port]``
    (Orthanc's DicomModalities), e.g. ``{"brainline": ["BRAINLINE", "127.0.0.1", 11112]}``.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, Sequence] | None = None,
        extra_config: dict | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.aet = aet
        self.modalities = {name: list(spec) for name, spec in (modalities or {}).items()}
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.config_path = self.workdir / "config.json"
        self.log_path = self.workdir / "orthanc.log"
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._write_config()

    # ------------------------------------------------------------------ config

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict:
        """The Orthanc configuration written to ``config.json``."""
        config = {
            "Name": "BrainLineTestOrthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": self.modalities,
            "SaveJobs": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        config.update(self.extra_config)
        return config

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    # --------------------------------------------------------------- lifecycle

    def start(self) -> "OrthancServer":
        """Start Orthanc (again) with the same config and storage; wait until /system answers."""
        if self.running:
            return self
        self._write_config()
        self._log_file = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            [ORTHANC_BINARY, str(self.config_path)],
            cwd=self.workdir, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.http_url}/system", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout`` s); storage is kept."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """Kill the process abruptly (SIGKILL), for crash tests; storage is kept."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self.stop()

    def close(self) -> None:
        """Stop Orthanc and delete its temporary directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "OrthancServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    # -------------------------------------------------------------------- REST

    def get(self, path: str, **kwargs) -> httpx.Response:
        """GET ``path`` (e.g. "/studies") on the REST API; raises for HTTP errors."""
        response = httpx.get(f"{self.http_url}{path}", timeout=kwargs.pop("timeout", 30.0), **kwargs)
        response.raise_for_status()
        return response

    def system(self) -> dict:
        """GET /system (Name, Version, DicomAet, ...)."""
        return self.get("/system").json()

    @property
    def version(self) -> str:
        return self.system()["Version"]

    def upload_dir(self, path: Path | str) -> int:
        """POST every file under ``path`` (recursively, or ``path`` itself) to /instances; return the count."""
        files = _dicom_files(path)
        with httpx.Client(base_url=self.http_url, timeout=60.0) as client:
            for file in files:
                response = client.post(
                    "/instances", content=file.read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                response.raise_for_status()
        return len(files)

    def count_instances(self) -> int:
        """Number of instances stored (GET /statistics)."""
        return int(self.get("/statistics").json()["CountInstances"])

    def studies(self) -> list[str]:
        """Orthanc IDs of the stored studies."""
        return self.get("/studies").json()

    def delete_all(self) -> None:
        """Delete every stored study (keeps the server running)."""
        with httpx.Client(base_url=self.http_url, timeout=60.0) as client:
            for study in client.get("/studies").json():
                client.delete(f"/studies/{study}").raise_for_status()


def _dicom_files(path: Path | str) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def storescu(
    paths_or_dir: Path | str | Iterable[Path | str],
    port: int,
    called_aet: str = "BRAINLINE",
    calling_aet: str = "SCANNER",
    host: str = LOOPBACK,
    extra: Sequence[str] = (),
    timeout: float | None = 600.0,
) -> subprocess.CompletedProcess:
    """Send files with dcmtk ``storescu`` over one association; never raises on failure.

    A directory is scanned recursively (``+sd +r``); a file or list of files is sent as
    given. The returned CompletedProcess has ``returncode``, ``stdout`` and ``stderr`` (text).
    """
    if isinstance(paths_or_dir, (str, os.PathLike)):
        paths_or_dir = [paths_or_dir]
    targets = [str(p) for p in paths_or_dir]
    scan = ["+sd", "+r"] if any(Path(t).is_dir() for t in targets) else []
    command = [
        "storescu", *scan, "-aet", calling_aet, "-aec", called_aet,
        *extra, host, str(port), *targets,
    ]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        return subprocess.CompletedProcess(command, 124, output or "", f"timed out after {timeout} s")


def start_storescp(config: Path, profile: str, out_dir: Path, aet: str,
                   attempts: int = 3) -> tuple[subprocess.Popen, int]:
    """Start dcmtk ``storescp`` with the association profile ``profile`` of
    ``config`` (``-xf``), storing into ``out_dir`` as ``aet``; returns the
    process and its port once it answers C-ECHO. A storescp that exits at
    once (its port taken between free_port and its bind) is started again on
    another port, up to ``attempts`` times."""
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(["storescp", "-xf", str(config), profile, "-od", str(out_dir), "-aet", aet,
                                 str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            echo = subprocess.run(["echoscu", "-aec", aet, LOOPBACK, str(port)], capture_output=True, timeout=30)
            if echo.returncode == 0:
                time.sleep(0.5)     # a storescp that could not bind has exited by now: then another listener answered
                if proc.poll() is None:
                    return proc, port
            time.sleep(0.2)
        proc.kill()
        proc.wait(30)
    raise RuntimeError(f"storescp did not start in {attempts} attempts")


def _postgres_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (Debian keeps them off the PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"PostgreSQL {name} not found: install the Debian package postgresql")
    return str(candidates[-1])


class PostgresServer:
    """A throw-away PostgreSQL cluster on a loopback port (trust auth), run as
    the ``postgres`` system user when started as root (initdb refuses root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.datadir = self.workdir / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/brainline"

    def __enter__(self) -> "PostgresServer":
        self._run(_postgres_bin("initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust")
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.workdir / "pg.log"), "-w",
                  "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1", "start")
        self._run(_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  "brainline")
        return self

    def new_database(self) -> str:
        """A fresh, empty database on this server; returns its SQLAlchemy URL.
        Tests that share one server (the session fixture ``postgres``) each
        take their own database, so no test sees another's rows."""
        import uuid

        from sqlalchemy import create_engine, text

        name = "bl_" + uuid.uuid4().hex[:10]
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url.rsplit("/", 1)[0] + "/" + name

    def __exit__(self, *exc) -> None:
        try:
            self._run(_postgres_bin("pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


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

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> "ServiceProcess":
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "brainline.service.cli", "serve"],
                                     env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
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
        raise RuntimeError(f"brainline serve not ready in {timeout:.0f} s: {self.output()[-3000:]}")

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

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def workspace(self, job_id: int) -> Path:
        return self.home / "workspaces" / f"job-{job_id:06d}"

    def jobs(self) -> list[dict]:
        return self.api("GET", "/api/v1/jobs", params={"limit": 1000}).json()["jobs"]

    def job(self, job_id: int) -> dict:
        return self.api("GET", f"/api/v1/jobs/{job_id}").json()

    def wait_jobs(self, n: int, timeout: float = 120) -> list[dict]:
        """Wait until at least n jobs exist and all of them are finished."""
        final = {"done", "failed", "needs_input", "rejected", "superseded"}
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
