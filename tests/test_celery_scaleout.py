"""Scaled-out mode on real peers: PostgreSQL (job store), redis-server
(Celery broker, append-only), one `brainline serve` gateway
(BRAINLINE_EXECUTOR=celery) and two `brainline worker` processes sharing a
workspace folder, a real Orthanc as the destination PACS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.celery_peers import Cluster, RedisServer
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_study
from tests.peers import OrthancServer, storescu
from tests.phi import BINARY_SAFE, TEXT_EXTRA

pytestmark = pytest.mark.integration

VAULT_KEY = "test-vault-key-0123456789abcdef"  # ServiceProcess's key


@pytest.fixture(scope="module")
def pg(postgres):
    """The session's PostgreSQL server (conftest); each Cluster makes its own database."""
    return postgres


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Four distinct studies of the same patient (fresh UIDs each), every 5th slice."""
    root = tmp_path_factory.mktemp("celery_studies")
    return [write_study(root / f"s{i}", TCGA, slice_step=5, **PHI) for i in range(4)]


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def pacs():
    with OrthancServer() as server:
        yield server


def _push(study, port: int) -> None:
    result = storescu(study.series["t1"].dir.parent, port)
    assert result.returncode == 0, result.stderr


def _started(records: list[dict]) -> list[tuple[int, str]]:
    return [(r["job_id"], r["stage"]) for r in records if r.get("msg") == "stage started"]


def _gateway_records(cluster: Cluster) -> list[dict]:
    path = cluster.gateway.home / "logs" / "brainline.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _dest(pacs: OrthancServer) -> dict:
    return {"BRAINLINE_DEST_DICOM": f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"}


def _wait_sent(cluster: Cluster, n_jobs: int, timeout: float = 120) -> list[dict]:
    """The outbox's sent items once ``n_jobs`` jobs have sent items, nothing
    is pending and the sent list stayed the same over two polls. Pending is
    asked first: asked after "sent", items sent in between would be in
    neither answer."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        pending = cluster.gateway.api("GET", "/api/v1/outbox", params={"state": "pending"}).json()["items"]
        items = cluster.gateway.api("GET", "/api/v1/outbox", params={"state": "sent"}).json()["items"]
        ids = sorted(i["id"] for i in items)
        if len({i["job_id"] for i in items}) >= n_jobs and not pending and ids == previous:
            return items
        previous = ids
        time.sleep(0.5)
    raise AssertionError("results not delivered in time")


def _scan_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    return hits


@pytest.mark.timeout(2400)
def test_four_studies_at_once_each_complete_once_and_workers_hold_no_phi(
        tmp_path, pg, redis_server, pacs, studies):
    with Cluster(tmp_path, pg, redis_server, workers=2, gateway_env=_dest(pacs)) as cluster:
        pushers = [threading.Thread(target=_push, args=(s, cluster.gateway.dicom_port)) for s in studies]
        for t in pushers:
            t.start()
        for t in pushers:
            t.join()
        jobs = cluster.gateway.wait_jobs(4, timeout=1800)
        assert [j["state"] for j in jobs] == ["done"] * 4, [(j["id"], j["error"]) for j in jobs]
        assert len({j["study_key"] for j in jobs}) == 4
        for job in jobs:
            assert job["attempts"] == 1
            assert all(s["state"] == "done" and s["attempts"] == 1 for s in job["stages"]), job["stages"]

        # Every (job, stage) started exactly once, in its zone.
        gateway_runs = _started(_gateway_records(cluster))
        worker_runs = [run for w in cluster.workers for run in _started(w.log_records())]
        counts = Counter(gateway_runs + worker_runs)
        assert set(counts.values()) == {1}
        assert len(counts) == 4 * len(jobs[0]["stages"])
        assert {stage for _, stage in gateway_runs} == {"pseudonymize", "find_priors", "deliver"}
        assert not {"pseudonymize", "find_priors", "deliver"} & {stage for _, stage in worker_runs}
        # Both workers did image stages (single-threaded workers share the load).
        for w in cluster.workers:
            assert w.metric("brainline_worker_tasks_total", 'outcome="done"') > 0
            assert w.metric("brainline_worker_tasks_running") == 0
            assert w.metric("brainline_queue_depth") == 0
            assert w.metric("brainline_broker_up") == 1
            health = httpx.get(w.url + "/healthz", timeout=5).json()
            assert health["status"] == "ok" and health["queues"] == ["compute"]

        # Each result object reached the PACS once.
        sent = _wait_sent(cluster, 4)
        assert len({i["sop_instance_uid"] for i in sent}) == len(sent)
        assert pacs.count_instances() == len(sent)
        assert Counter(i["kind"] for i in sent)["seg"] == 4
        assert cluster.gateway.metric("brainline_queue_depth") == 0
        assert cluster.gateway.metric("brainline_broker_up") == 1

        # PHI: the workers' environment holds no vault key, their files no identity.
        for w in cluster.workers:
            environ = Path(f"/proc/{w.proc.pid}/environ").read_bytes()
            assert b"BRAINLINE_VAULT_KEY" not in environ and VAULT_KEY.encode() not in environ
            assert not _scan_tree(w.home, BINARY_SAFE + TEXT_EXTRA)
        assert not _scan_tree(cluster.shared, BINARY_SAFE)
        gateway_env = Path(f"/proc/{cluster.gateway.proc.pid}/environ").read_bytes()
        assert VAULT_KEY.encode() in gateway_env  # the check above can fail


@pytest.mark.timeout(1800)
def test_kill9_worker_mid_segmentation_reruns_the_stage_once(tmp_path, pg, redis_server, pacs, studies):
    with Cluster(tmp_path, pg, redis_server, workers=2, gateway_env=_dest(pacs)) as cluster:
        _push(studies[0], cluster.gateway.dicom_port)
        client = redis_server.client()
        deadline = time.monotonic() + 600
        token = None
        while time.monotonic() < deadline and token is None:
            token = client.get("brainline:lease:1:segment")
            time.sleep(0.05)
        assert token, "segment never started"
        pid = int(token.split(":")[1])
        [victim] = [w for w in cluster.workers if w.proc.pid == pid]
        victim.kill9()
        [job] = cluster.gateway.wait_jobs(1, timeout=1200)
        assert job["state"] == "done", job["error"]
        assert job["attempts"] == 1
        attempts = {s["name"]: s["attempts"] for s in job["stages"]}
        assert attempts.pop("segment") == 2
        assert set(attempts.values()) == {1}
        survivor = next(w for w in cluster.workers if w is not victim)
        assert (1, "segment") in set(_started(survivor.log_records()))
        requeued = [r for r in _gateway_records(cluster) if "re-queued" in r.get("msg", "")]
        assert [r["stage"] for r in requeued] == ["segment"]
        sent = _wait_sent(cluster, 1)
        assert pacs.count_instances() == len(sent)
        assert Counter(i["kind"] for i in sent)["seg"] == 1


@pytest.mark.timeout(2400)
def test_broker_restart_mid_run_loses_nothing(tmp_path, pg, redis_server, studies):
    with Cluster(tmp_path, pg, redis_server, workers=2) as cluster:
        for study in studies[:2]:
            _push(study, cluster.gateway.dicom_port)
        client = redis_server.client()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not list(client.scan_iter("brainline:lease:*:register")):
            time.sleep(0.1)
        assert time.monotonic() < deadline, "register never started"
        redis_server.stop()
        time.sleep(3)
        redis_server.start()
        jobs = cluster.gateway.wait_jobs(2, timeout=1800)
        assert [j["state"] for j in jobs] == ["done", "done"], [j["error"] for j in jobs]
        for job in jobs:
            assert all(s["state"] == "done" for s in job["stages"])
            assert job["attempts"] == 1
        runs = Counter(_started(_gateway_records(cluster)) +
                       [r for w in cluster.workers for r in _started(w.log_records())])
        # A stage runs again only if it was cut by the restart; none ran twice at once.
        assert all(n <= 2 for n in runs.values())
        assert all(w.alive() for w in cluster.workers)
        assert cluster.gateway.alive()


def test_worker_refuses_the_vault_key_and_the_gateway_queue(tmp_path, redis_server):
    base = {k: v for k, v in os.environ.items() if not k.startswith("BRAINLINE_")}
    env = {**base, "BRAINLINE_HOME": str(tmp_path / "w"), "BRAINLINE_BROKER_URL": redis_server.url,
           "BRAINLINE_EXECUTOR": "celery"}
    cli = [sys.executable, "-m", "brainline.service.cli", "worker"]
    keyed = subprocess.run(cli + ["--queues", "compute"], env={**env, "BRAINLINE_VAULT_KEY": VAULT_KEY},
                           capture_output=True, text=True, timeout=60)
    assert keyed.returncode == 2 and "must never hold the vault key" in keyed.stderr
    gateway = subprocess.run(cli + ["--queues", "gateway"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert gateway.returncode == 2 and "gateway queue" in gateway.stderr
    cpu_gpu = subprocess.run(cli + ["--queues", "gpu"], env=env, capture_output=True, text=True, timeout=60)
    assert cpu_gpu.returncode == 2 and "BRAINLINE_DEVICE=cuda" in cpu_gpu.stderr
    amqp = subprocess.run(cli, env={**env, "BRAINLINE_BROKER_URL": "amqp://x"}, capture_output=True,
                          text=True, timeout=60)
    assert amqp.returncode == 2 and "Redis URL" in amqp.stderr


def test_segment_goes_to_gpu_only_when_a_gpu_worker_is_live(redis_server):
    from brainline.service.jobs.celery_app import WORKER_KEY, StageRuntime
    from brainline.service.settings import load_settings

    settings = load_settings({"BRAINLINE_EXECUTOR": "celery", "BRAINLINE_BROKER_URL": redis_server.url})
    rt = StageRuntime(settings=settings, store=None, runner=None, app=None, zone="gateway")
    assert rt.queue_for("segment") == "compute"
    assert rt.queue_for("pseudonymize") == "gateway" and rt.queue_for("deliver") == "gateway"
    assert rt.queue_for("register") == "compute"
    client = redis_server.client()
    client.set(WORKER_KEY + "w1", json.dumps({"queues": ["compute"]}), ex=30)
    assert rt.queue_for("segment") == "compute"
    client.set(WORKER_KEY + "g1", json.dumps({"queues": ["gpu"], "device": "cuda"}), ex=1)
    assert rt.queue_for("segment") == "gpu" and rt.queue_for("register") == "compute"
    time.sleep(1.5)  # the GPU worker stopped refreshing its entry: back to compute
    assert rt.queue_for("segment") == "compute"
