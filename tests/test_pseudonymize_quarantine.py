"""Issue 8, part 5: one bad instance does not fail the study.

An instance with another PatientID, an unreadable or too deeply nested file,
pixel data that does not fit its transfer syntax or size, or a matrix that
differs from the rest of its series is quarantined (a copy in
``<spool>/.quarantine/<study_key>/`` with the reason), the job says so in
words without PHI, and the rest is processed when the series stay complete.

The first tests run the real service parts (database, vault, spool, job
runner; ``foundation`` pipeline: pseudonymize, select, convert) on a study
stored in the spool; the last pushes over DICOM to a real ``brainline
serve`` and runs the whole pipeline."""

from __future__ import annotations

import json
import shutil
import struct

import pydicom
import pytest
from pydicom.uid import generate_uid

from brainline.service.context import ServiceContext
from brainline.service.settings import load_settings
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_study
from tests.peers import storescu
from tests.phi import scan

OTHER_ID = "OTHER-PID-0815"


@pytest.fixture
def service_parts(tmp_path):
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path / "home"),
                              "BRAINLINE_VAULT_KEY": "test-vault-key-0123456789abcdef",
                              "BRAINLINE_MIN_FREE_MB": "10"})
    ctx = ServiceContext.build(settings)
    yield ctx
    ctx.engine.dispose()


@pytest.fixture
def study(tmp_path):
    return write_study(tmp_path / "dicom", TCGA, slice_step=5, **PHI)


def spool_study(ctx, study, extra: list = ()) -> str:
    """Store every file of ``study`` (and the ``extra`` files) in the spool."""
    key = ctx.vault.study_key(study.study_uid)
    for path in [*study.paths, *extra]:
        uid = pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID") or generate_uid()
        ctx.spool.store(key, str(uid), path.read_bytes())
    return key


def run_foundation(ctx, key) -> dict:
    job_id = ctx.store.create(key, ctx.spool.count(key), source="spool", pipeline="foundation")
    ctx.runner.run(job_id)
    job = ctx.store.get(job_id)
    return {"job": job, "stages": {s.name: s for s in job.stages}}


def other_patient_instance(study, out) -> pydicom.Dataset:
    """A screenshot-like instance of another patient filed into the study."""
    ds = pydicom.dcmread(study.series["t1"].paths[0])
    ds.PatientID, ds.PatientName = OTHER_ID, "ROE^RICHARD"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = generate_uid(), 99, "SCREEN SAVE"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    return ds


def nested_instance(study, out) -> None:
    """A file whose private sequence nests 3000 levels deep (RecursionError in readers)."""
    level = (struct.pack("<HH", 0x7FE1, 0x1001) + b"SQ\x00\x00\xff\xff\xff\xff"
             + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
    ds = pydicom.dcmread(study.series["t1"].paths[1])
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 98
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    out.write_bytes(out.read_bytes() + level * 3000)


def test_bad_instances_are_quarantined_and_the_rest_processed(service_parts, study, tmp_path):
    ctx = service_parts
    extra = tmp_path / "extra"
    extra.mkdir()
    other_patient_instance(study, extra / "other.dcm")
    nested_instance(study, extra / "nested.dcm")
    # a T2 slice whose pixel data was cut short: the T2 series loses it
    short = pydicom.dcmread(study.series["t2"].paths[12])
    short.PixelData = short.PixelData[:4000]
    short.save_as(study.series["t2"].paths[12])
    key = spool_study(ctx, study, [extra / "other.dcm", extra / "nested.dcm"])
    run = run_foundation(ctx, key)
    job, stages = run["job"], run["stages"]
    assert job.state == "done", job.error
    pseudo = json.loads(stages["pseudonymize"].result_json)
    assert pseudo["instances"] == 124 - 1
    notes = sorted(q["note"] for q in pseudo["quarantined"])
    assert notes == ["1 instance quarantined: PatientID differs from the study's",
                     "1 instance quarantined: data sets nested too deeply to read",
                     "1 instance quarantined: pixel data size does not match rows, columns and bits allocated"]
    assert pseudo["pseudo_patient_id"] == job.pseudo_patient_id
    # T2 lost a slice to the quarantine: left out with the reason; the rest is converted
    select = json.loads(stages["select_series"].result_json)
    assert set(select["roles"]) == {"t1", "t1c", "flair"}
    assert select["inputs"]["note"].startswith("T2 series 4 'AX T2 FSE' is incomplete: instance number 13 missing")
    assert set(json.loads(stages["convert"].result_json)["series"]) == {"t1", "t1c", "flair"}
    # the quarantine keeps the files with their reasons; the spool keeps the study unchanged
    folder = ctx.spool.root / ".quarantine" / key
    assert len(list(folder.glob("*.dcm"))) == 3
    assert sorted(p.read_text().strip() for p in folder.glob("*.reason.txt")) == sorted(
        q["reason"] for q in pseudo["quarantined"])
    assert ctx.spool.count(key) == 126
    # no identity of either patient on the processing side or in the job record
    ws = ctx.runner.workspace(job.id)
    record = json.dumps([s.result_json for s in job.stages]) + str(job.error)
    for text in (OTHER_ID, "ROE^RICHARD", PHI["patient_id"]):
        assert text not in record
    assert scan([ws], [OTHER_ID.encode(), b"ROE^RICHARD", PHI["patient_id"].encode()]) == []


def test_bad_instance_in_a_needed_series_ends_needs_input(service_parts, study):
    ctx = service_parts
    bad = pydicom.dcmread(study.series["flair"].paths[7])
    bad.Rows, bad.Columns = 120, 480  # same bytes, other matrix: differs from its series
    bad.save_as(study.series["flair"].paths[7])
    key = spool_study(ctx, study)
    run = run_foundation(ctx, key)
    job = run["job"]
    assert job.state == "needs_input"
    assert job.error.startswith("stage select_series: FLAIR series 5 'AX T2 FLAIR 3D' is incomplete: "
                                "instance number 8 missing")
    assert job.error.endswith("Also: 1 instance quarantined: matrix size or pixel spacing differs from "
                              "the rest of its series.")


def test_study_split_between_two_patients_is_rejected(service_parts, study, tmp_path):
    ctx = service_parts
    for path in study.series["t2"].paths + study.series["flair"].paths:
        ds = pydicom.dcmread(path)
        ds.PatientID = OTHER_ID
        ds.save_as(path)
    key = spool_study(ctx, study)
    job = run_foundation(ctx, key)["job"]
    assert job.state == "rejected"
    assert "more than one patient" in job.error and OTHER_ID not in job.error
    assert not (ctx.spool.root / ".quarantine" / key).exists()


def test_wrong_transfer_syntax_is_quarantined(service_parts, study, tmp_path):
    ctx = service_parts
    other = tmp_path / "rle.dcm"
    ds = pydicom.dcmread(study.series["t1"].paths[2])
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 97
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(other)
    # the file meta claims RLE Lossless (same length UID), the pixel data is native
    other.write_bytes(other.read_bytes().replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00", 1))
    key = spool_study(ctx, study, [other])
    run = run_foundation(ctx, key)
    assert run["job"].state == "done", run["job"].error
    pseudo = json.loads(run["stages"]["pseudonymize"].result_json)
    assert pseudo["note"] == ("1 instance quarantined: pixel data not encoded as its transfer syntax says "
                              "(not encapsulated)")


@pytest.mark.integration
def test_push_with_a_stray_patient_instance_is_processed(service, study, tmp_path):
    push = tmp_path / "push"
    shutil.copytree(study.series["t1"].dir.parent, push)
    (push / "stray").mkdir()
    other_patient_instance(study, push / "stray" / "IM_1.dcm")
    assert storescu(push, service.dicom_port).returncode == 0
    [job] = service.wait_jobs(1, timeout=600)
    assert job["state"] == "done", job
    pseudo = job["stages"][0]["result"]
    assert pseudo["note"] == "1 instance quarantined: PatientID differs from the study's"
    assert pseudo["instances"] == 124
    assert (service.workspace(job["id"]) / "results" / "seg.dcm").exists()
    assert OTHER_ID.encode() not in service.api("GET", f"/api/v1/jobs/{job['id']}").content
