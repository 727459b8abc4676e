"""Integration: REST API, authentication and DICOMweb pull from a real Orthanc."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_api_token_and_open_health_endpoints(service_factory):
    svc = service_factory(BRAINLINE_API_TOKEN="s3cret-token")
    assert httpx.get(svc.url + "/api/v1/jobs").status_code == 401
    assert httpx.get(svc.url + "/api/v1/jobs",
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert svc.api("GET", "/api/v1/jobs").json() == {"jobs": []}
    assert svc.api("GET", "/api/v1/jobs/999").status_code == 404
    assert httpx.get(svc.url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(svc.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    metrics = httpx.get(svc.url + "/metrics").text
    for name in ("brainline_instances_received_total", "brainline_associations_received_total",
                 "brainline_jobs{", "brainline_stage_duration_seconds"):
        assert name in metrics
    assert "/api/v1/jobs/{job_id}/retry" in httpx.get(svc.url + "/openapi.json").json()["paths"]
    assert httpx.get(svc.url + "/docs").status_code == 200


def test_pull_over_dicomweb_from_orthanc(service_factory, orthanc, small_study):
    orthanc.upload_dir(small_study.series["t1"].dir.parent)
    svc = service_factory(BRAINLINE_DICOMWEB_URL=orthanc.dicomweb_url)
    missing = svc.api("POST", "/api/v1/studies/1.2.3.4.5.6.7.8.9/pull")
    assert missing.status_code == 404
    assert "not found" in missing.json()["detail"]
    assert svc.api("POST", "/api/v1/studies/not-a-uid/pull").status_code == 400
    resp = svc.api("POST", f"/api/v1/studies/{small_study.study_uid}/pull")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["instances"] == 124 and body["new_instances"] == 124 and body["series"] == 4
    [job] = svc.wait_jobs(1)
    assert job["state"] == "done", job
    assert job["instance_count"] == 124
    assert svc.metric("brainline_instances_received_total", 'source="dicomweb"') == 124


def test_cli_pull_feeds_running_service(service_factory, orthanc, small_study):
    orthanc.upload_dir(small_study.series["t1"].dir.parent)
    svc = service_factory(BRAINLINE_DICOMWEB_URL=orthanc.dicomweb_url)
    cli = [sys.executable, "-m", "brainline.service.cli", "pull", "--quiet"]
    env = {**svc.env}
    missing = subprocess.run(cli + ["--study-uid", "1.2.3.999"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1 and "was not found" in missing.stderr
    ok = subprocess.run(cli + ["--study-uid", small_study.study_uid], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert '"instances": 124' in ok.stdout
    [job] = svc.wait_jobs(1)
    assert job["state"] == "done" and job["instance_count"] == 124
    listing = subprocess.run([sys.executable, "-m", "brainline.service.cli", "jobs"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "done" in listing.stdout
