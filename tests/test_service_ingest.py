"""Integration: dcmtk plays the scanner against a real `brainline serve`."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from tests.peers import storescu
from tests.phi import BINARY_SAFE, TEXT_EXTRA, scan

pytestmark = pytest.mark.integration


def spool_files(svc) -> list[Path]:
    return sorted((svc.home / "spool").rglob("*.dcm"))


def echoscu(port: int, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", "BRAINLINE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_echo_and_unknown_calling_ae_rejected(service_factory, small_study):
    svc = service_factory(BRAINLINE_ALLOWED_AES="SCANNER, PACS")
    assert echoscu(svc.dicom_port, "SCANNER").returncode == 0
    bad = echoscu(svc.dicom_port, "INTRUDER")
    assert bad.returncode != 0
    assert "reject" in (bad.stdout + bad.stderr).lower()
    pushed = storescu(small_study.series["t1"].dir, svc.dicom_port, calling_aet="INTRUDER")
    assert pushed.returncode != 0
    assert spool_files(svc) == []
    assert svc.metric("brainline_rejections_total", 'reason="calling_ae_not_allowed"') == 2


def test_push_study_runs_job_and_leaks_no_phi(service, small_study):
    result = storescu(small_study.series["t1"].dir.parent, service.dicom_port)
    assert result.returncode == 0, result.stderr
    assert len(spool_files(service)) == small_study.n_instances == 124
    [job] = service.wait_jobs(1)
    assert job["state"] == "done", job
    assert job["instance_count"] == 124
    assert [s["name"] for s in job["stages"]] == [
        "pseudonymize", "find_priors", "select_series", "convert", "register", "skull_strip", "image_qc",
        "bias_correct", "segment", "segmentation_qc", "summary", "longitudinal", "build_outputs", "deliver"]
    assert all(s["state"] == "done" and s["duration_s"] is not None for s in job["stages"])
    selection = next(s for s in job["stages"] if s["name"] == "select_series")["result"]
    assert set(selection["roles"]) == {"t1", "t1c", "t2", "flair"}
    ws = service.home / "workspaces" / f"job-{job['id']:06d}"
    for role in ("t1", "t1c", "t2", "flair"):
        assert (ws / "nifti" / f"{role}.nii.gz").stat().st_size > 10_000
        assert (ws / "nifti" / f"{role}.json").exists()
        assert (ws / "preprocessed" / f"{role}.nii.gz").exists()
    assert (ws / "summary.json").exists() and (ws / "results" / "seg.dcm").exists()
    assert "no destination configured" in job["stages"][-1]["result"]["note"]
    assert service.metric("brainline_instances_received_total") == 124
    assert service.metric("brainline_jobs", 'state="done"') == 1
    assert service.metric("brainline_stage_duration_seconds_count", 'stage="convert"') == 1

    # The workspace holds pseudonymized DICOM: new identity, new UIDs.
    sample = pydicom.dcmread(next((ws / "dicom").rglob("*.dcm")))
    assert sample.PatientID == job["pseudo_patient_id"] != "PID-4711-XYZ"
    assert sample.StudyInstanceUID == job["pseudo_study_uid"] != small_study.study_uid
    assert sample.PatientIdentityRemoved == "YES"

    # PHI scan: the spool (gateway) has it, nothing on the processing side does.
    assert scan([service.home / "spool"], [b"PID-4711-XYZ"]), "scanner sanity check failed"
    api_text = [service.api("GET", "/api/v1/jobs").content, service.api("GET", f"/api/v1/jobs/{job['id']}").content,
                service.api("GET", "/metrics").content]
    for blob in api_text:
        assert not [n for n in BINARY_SAFE + TEXT_EXTRA if n in blob]
    service.stop()
    assert scan([ws]) == []
    assert scan([service.home / "logs", service.stdout_path], BINARY_SAFE + TEXT_EXTRA) == []
    db_files = [p for p in service.home.glob("brainline.db*")]
    assert db_files and scan(db_files) == []


def test_malformed_instance_refused_rest_lands(service, small_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(small_study.series["t1"].dir.parent, study)
    bad = pydicom.dcmread(next((study / "t2").glob("*.dcm")))
    del bad.StudyInstanceUID
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad.save_as(study / "t2" / "IM_bad.dcm")
    result = storescu(study, service.dicom_port, extra=("--no-halt", "-v"))
    assert "error: cannotunderstand" in (result.stdout + result.stderr).lower()
    assert len(spool_files(service)) == 124
    assert service.metric("brainline_rejections_total", 'reason="malformed"') == 1
    [job] = service.wait_jobs(1)
    assert job["instance_count"] == 124 and job["state"] == "done"


def test_concurrent_associations(service, small_study):
    results = []
    threads = [threading.Thread(target=lambda d=info.dir: results.append(storescu(d, service.dicom_port)))
               for info in small_study.series.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0, 0, 0]
    assert len(spool_files(service)) == 124
    assert service.metric("brainline_associations_received_total") == 4
    [job] = service.wait_jobs(1)
    assert job["instance_count"] == 124


def test_duplicate_push_is_idempotent(service, small_study):
    storescu(small_study.series["t1"].dir.parent, service.dicom_port)
    service.wait_jobs(1)
    again = storescu(small_study.series["t1"].dir.parent, service.dicom_port)
    assert again.returncode == 0
    time.sleep(4)  # longer than the quiet period
    assert len(service.jobs()) == 1
    assert len(spool_files(service)) == 124
    assert service.metric("brainline_instances_duplicate_total") == 124


def test_missing_flair_then_late_instances(service, small_study):
    for role in ("t1", "t1c", "t2"):
        assert storescu(small_study.series[role].dir, service.dicom_port).returncode == 0
    [first] = service.wait_jobs(1)
    assert first["state"] == "needs_input"
    assert first["instance_count"] == 93
    assert "FLAIR" in first["error"]
    assert "AX T2 FSE" in first["error"] and "AX T1 3D PRE" in first["error"]
    # Retrying without new data ends the same way, with a second attempt.
    assert service.api("POST", f"/api/v1/jobs/{first['id']}/retry").status_code == 202
    time.sleep(1)
    [first] = service.wait_jobs(1)
    assert first["state"] == "needs_input"
    assert next(s for s in first["stages"] if s["name"] == "select_series")["attempts"] == 2
    # The FLAIR arrives late: the study re-opens and a new job covers all of it.
    assert storescu(small_study.series["flair"].dir, service.dicom_port).returncode == 0
    first, second = service.wait_jobs(2)
    assert second["instance_count"] == 124 and second["state"] == "done"
    assert service.api("POST", f"/api/v1/jobs/{second['id']}/retry").status_code == 409


def test_kill9_during_job_resumes_after_restart(service, small_study):
    # The 124-instance study, not the 620-instance one: what is checked (the job
    # is caught running with finished stages, killed, and after the restart those
    # stages are not run again, the rest is, in the same workspace) does not
    # depend on the study's size, and the job still runs for seconds after its
    # first stage (the registration alone), far longer than one poll below.
    assert storescu(small_study.series["t1"].dir.parent, service.dicom_port).returncode == 0
    deadline = time.monotonic() + 120
    killed_after = None
    while time.monotonic() < deadline:
        jobs = service.jobs()
        if jobs:
            job = service.job(jobs[0]["id"])
            done = [s["name"] for s in job["stages"] if s["state"] == "done"]
            if job["state"] == "running" and done:
                service.kill9()
                killed_after = done
                break
            assert job["state"] in ("queued", "running", "received"), job
        time.sleep(0.05)
    assert killed_after, "the job was never caught between stages"
    before = {s["name"]: s for s in job["stages"]}
    service.start()
    [job] = service.wait_jobs(1)
    assert job["state"] == "done", job
    assert job["attempts"] == 2
    for stage in job["stages"]:
        if stage["name"] in killed_after:
            assert stage["attempts"] == 1
            assert stage["finished_at"] == before[stage["name"]]["finished_at"]
    assert len(list((service.home / "workspaces").iterdir())) == 1


def test_disk_full_answers_out_of_resources(service_factory, small_study):
    svc = service_factory(BRAINLINE_MIN_FREE_MB=str(10**12), wait_ready=False)
    ready = svc.api("GET", "/readyz")
    assert ready.status_code == 503
    assert any("free space" in r for r in ready.json()["reasons"])
    result = storescu(small_study.series["t1"].dir, svc.dicom_port, extra=("-v",))
    assert "refused: outofresources" in (result.stdout + result.stderr).lower()
    assert list((svc.home / "spool").rglob("*")) == []
    assert svc.metric("brainline_rejections_total", 'reason="out_of_resources"') >= 1
