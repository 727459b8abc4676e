"""Run the BrainLine image as a gateway container and a worker container,
push a study with storescu and wait for the SEG in a real Orthanc.

    python deploy/container_e2e.py [--image localhost/brainline:0.1.0]

Peers run on the host (loopback): PostgreSQL, redis-server, Orthanc (the
classes in tests/); the containers use the host network, a bind-mounted home
for the gateway (spool, outbox) and one shared workspace folder for both.
The worker container gets no BRAINLINE_VAULT_KEY. Extra `podman run`
arguments come from PODMAN_RUN_ARGS (this development VM needs
"--runtime runc --ulimit nofile=10000:10000 --ulimit nproc=5000:5000": crun
refuses its hybrid cgroup mode and the sandbox may not raise rlimits).
Exit 0 when the SEG arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.celery_peers import RedisServer  # noqa: E402
from tests.dicom_factory import write_study  # noqa: E402
from tests.peers import OrthancServer, PostgresServer, free_port, storescu  # noqa: E402

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
UID = 10001


def podman(*args, check=True, capture=False):
    engine = shutil.which("podman") or "podman"
    return subprocess.run([engine, *args], check=check, text=True, capture_output=capture)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="localhost/brainline:0.1.0")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args()
    extra = shlex.split(os.environ.get("PODMAN_RUN_ARGS", ""))
    root = Path(tempfile.mkdtemp(prefix="brainline-containers-"))
    names = []
    try:
        study = write_study(root / "study", REPO.parent / "shared" / "data" / "tcga-du-7294", slice_step=5)
        home, shared = root / "gateway-home", root / "workspaces"
        for d in (home, shared):
            d.mkdir(mode=0o700)
            os.chown(d, UID, UID)
        with PostgresServer() as pg, RedisServer() as redis, OrthancServer() as pacs:
            dicom_port, http_port, worker_port = free_port(), free_port(), free_port()
            common = {"BRAINLINE_EXECUTOR": "celery", "BRAINLINE_BROKER_URL": redis.url,
                      "BRAINLINE_DATABASE_URL": pg.url, "BRAINLINE_WORKSPACES": "/var/lib/brainline-workspaces",
                      "BRAINLINE_HTTP_BIND": "127.0.0.1"}
            gateway_env = {**common, "BRAINLINE_VAULT_KEY": "container-test-vault-key-0123456789",
                           "BRAINLINE_DICOM_PORT": dicom_port, "BRAINLINE_HTTP_PORT": http_port,
                           "BRAINLINE_STABLE_SECONDS": 2, "BRAINLINE_MIN_FREE_MB": 100,
                           "BRAINLINE_DEST_DICOM": f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"}
            worker_env = {**common, "BRAINLINE_WORKER_HTTP_PORT": worker_port}

            def run(name, env, mounts, command):
                names.append(name)
                flags = [f"--env={k}={v}" for k, v in env.items()]
                flags += [f"--volume={src}:{dst}" for src, dst in mounts]
                podman("run", "-d", "--rm", "--name", name, "--network", "host", *extra, *flags,
                       args.image, *command)

            try:
                return run_scenario(run, args, gateway_env, worker_env, home, shared, study, pacs,
                                    dicom_port, http_port, worker_port)
            finally:  # stop the containers while their peers are still up
                for name in names:
                    logs = podman("logs", "--tail", "20", name, check=False, capture=True)
                    print(f"--- {name} (last lines)\n{logs.stdout[-3000:]}{logs.stderr[-2000:]}")
                    podman("rm", "-f", name, check=False, capture=True)
                names.clear()
    finally:
        for name in names:
            podman("rm", "-f", name, check=False, capture=True)
        shutil.rmtree(root, ignore_errors=True)


def run_scenario(run, args, gateway_env, worker_env, home, shared, study, pacs,
                 dicom_port, http_port, worker_port) -> int:
    """Gateway and worker containers, one study pushed, the SEG awaited in Orthanc."""
    run("brainline-gateway", gateway_env, [(home, "/var/lib/brainline"),
                                           (shared, "/var/lib/brainline-workspaces")], ["serve"])
    wait_http(f"http://127.0.0.1:{http_port}/readyz", 180, "gateway")
    run("brainline-worker", worker_env, [(shared, "/var/lib/brainline-workspaces")],
        ["worker", "--queues", "compute"])
    wait_http(f"http://127.0.0.1:{worker_port}/readyz", 180, "worker")
    environ = podman("exec", "brainline-worker", "cat", "/proc/1/environ", capture=True).stdout
    assert "VAULT_KEY" not in environ, "the worker container holds the vault key"
    user = podman("exec", "brainline-worker", "id", "-u", capture=True).stdout.strip()
    assert user == str(UID), f"worker runs as uid {user}"
    result = storescu(study.series["t1"].dir.parent, dicom_port)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        found = httpx.post(f"{pacs.http_url}/tools/find", json={
            "Level": "Instance", "Query": {"SOPClassUID": SEG_CLASS}}, timeout=10).json()
        if found:
            jobs = httpx.get(f"http://127.0.0.1:{http_port}/api/v1/jobs", timeout=10).json()["jobs"]
            print(f"SEG arrived in Orthanc: {len(found)} instance(s); jobs: "
                  f"{[(j['id'], j['state']) for j in jobs]}")
            return 0
        time.sleep(2)
    print("no SEG arrived in time", file=sys.stderr)
    return 1


def wait_http(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} container not ready at {url}")


if __name__ == "__main__":
    sys.exit(main())
