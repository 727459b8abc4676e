"""Issue 12, item 4: review gating and the result lifecycle.

One job of the small study is sent by calling AE ``SCANNER1`` with storescu to
a real DICOM listener (in this process) and processed up to ``build_outputs``
once per module (real SQLite job store, vault, spool, pipeline); each test
copies that BRAINLINE_HOME, runs ``deliver`` and the outbox against a real
Orthanc (1.10, with the retraction metadata declared in ``UserMetadata``),
and checks what the PACS holds:

* site ``hold``: nothing reaches Orthanc until ACCEPT; retention keeps the
  job; ACCEPT sends a VERIFIED TID 1500 SR (Verifying Observer Sequence,
  score and comment, the unreviewed SR as predecessor) and the re-issued PDF
  "Reviewed by ...", and releases the rest;
* REJECT (over the REST API) sends an IHE IOCM rejection note (KOS, 113001)
  whose references are exactly the instances Orthanc holds for the job,
  marks those instances in Orthanc, and sends a PDF without volumes;
* a newer job of the study retracts the earlier job's objects the same way;
* a second decision, or a decision on a superseded job, is refused.

Every object read back from Orthanc passes dciodvfy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import timedelta

import httpx
import pydicom
import pytest
from sqlalchemy import select

from brainline.pipelines.dicom_outputs.kos import person_name, retracted_instances
from brainline.service.context import ServiceContext
from brainline.service.db import AuditEvent, Job, utcnow
from brainline.service.gateway import review
from brainline.service.gateway.completion import CompletionMonitor
from brainline.service.gateway.listener import DicomListener
from brainline.service.gateway.retention import RetentionConfig, plan_purge
from brainline.service.gateway.review import ReviewError
from brainline.service.settings import SettingsError, load_settings
from tests.peers import OrthancServer, free_port, storescu
from tests.test_dicom_outputs import dciodvfy

pytestmark = pytest.mark.integration

KEY = "test-vault-key-0123456789abcdef"
META = "BrainLineRetracted"
REVIEWER = "Dr. Ada Lovelace"
ORG = "Example University Hospital"
REASON = "Tumour core includes the choroid plexus; edema misses the frontal extension"


def _env(home, **extra) -> dict:
    return {"BRAINLINE_HOME": str(home), "BRAINLINE_VAULT_KEY": KEY, "BRAINLINE_MIN_FREE_MB": "10",
            "BRAINLINE_REVIEW_ORGANIZATION": ORG, "BRAINLINE_MODEL": "baseline", **extra}


@pytest.fixture(scope="module")
def pacs():
    with OrthancServer(extra_config={"UserMetadata": {META: 1024}}) as server:
        yield server


@pytest.fixture(scope="module")
def processed(tmp_path_factory, small_study):
    """(home, job id): the small study received from calling AE SCANNER1 and
    processed up to build_outputs; deliver has not run."""
    home = tmp_path_factory.mktemp("review") / "home"
    settings = load_settings(_env(home, BRAINLINE_DICOM_PORT=str(free_port()), BRAINLINE_DICOM_BIND="127.0.0.1"))
    ctx = ServiceContext.build(settings)
    from pynetdicom import _config, dimse_messages

    saved = _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile
    listener = DicomListener(settings, ctx.spool, ctx.vault.study_key, ctx.metrics)
    listener.start()
    try:
        sent = storescu(small_study.series["t1"].dir.parent, settings.dicom_port, calling_aet="SCANNER1")
    finally:
        listener.stop()
        _config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile = saved  # process-wide
    assert sent.returncode == 0, sent.stderr
    monitor = CompletionMonitor(ctx.spool, ctx.store, lambda job_id: None, 0.0, ctx.metrics)
    [job_id] = monitor.check_once(now_ns=time.time_ns() + 10**12)
    job = ctx.store.get(job_id)
    assert job.site == "SCANNER1"  # the calling AE title of the association that sent the study
    assert job.stages[-1].name == "deliver"
    for stage in job.stages[:-1]:
        outcome = ctx.runner.run_stage(job_id, stage.name)
        assert outcome == "done", (stage.name, ctx.store.get(job_id).error)
    ctx.engine.dispose()
    return home, job_id


@pytest.fixture
def service(processed, pacs, tmp_path):
    """make(**env) -> a ServiceContext on a copy of the processed home,
    delivering to the test Orthanc (emptied first)."""
    made: list[ServiceContext] = []
    pacs.delete_all()

    def make(**env) -> ServiceContext:
        home = tmp_path / "home"
        shutil.copytree(processed[0], home)
        ctx = ServiceContext.build(load_settings(_env(
            home, BRAINLINE_DEST_DICOM=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
            BRAINLINE_DEST_ORTHANC_REST=pacs.http_url, BRAINLINE_DEST_ORTHANC_METADATA=META, **env)))
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.engine.dispose()


# -- helpers -----------------------------------------------------------------
def send_all(ctx, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while ctx.outbox.depth():
        ctx.outbox.send_due()
        if time.monotonic() > deadline:
            raise AssertionError([(i.kind, i.state, i.last_error) for i in ctx.outbox.items(["pending"])])
        time.sleep(0.05)


def stage_result(ctx, job_id: int, name: str) -> dict:
    stage = next(s for s in ctx.store.get(job_id).stages if s.name == name)
    assert stage.state == "done", stage.error
    return json.loads(stage.result_json)


def rows(ctx, state: str | None = None, job_id: int | None = None) -> list:
    return [i for i in ctx.outbox.items([state] if state else None)
            if (job_id is None or i.job_id == job_id) and not i.destination.startswith("orthanc-rest:")]


def orthanc_id(pacs, sop_uid: str) -> str:
    found = httpx.post(pacs.http_url + "/tools/lookup", content=sop_uid, timeout=30).json()
    assert found, f"{sop_uid} is not in Orthanc"
    return found[0]["ID"]


def orthanc_instance(pacs, sop_uid: str, tmp_path=None) -> pydicom.Dataset:
    raw = pacs.get(f"/instances/{orthanc_id(pacs, sop_uid)}/file", timeout=60).content
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    if tmp_path is not None:  # validated as stored by the PACS
        path = tmp_path / f"{sop_uid}.dcm"
        path.write_bytes(raw)
        errors, _ = dciodvfy(path)
        assert errors == [], (str(ds.SOPClassUID), errors)
    return ds


def orthanc_series(pacs) -> dict[str, set[str]]:
    """Series Instance UID -> SOP Instance UIDs of everything Orthanc holds."""
    instances = {i["ID"]: i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand").json()}
    return {s["MainDicomTags"]["SeriesInstanceUID"]: {instances[i] for i in s["Instances"]}
            for s in pacs.get("/series?expand").json()}


def pdf_text(ds: pydicom.Dataset, tmp_path) -> str:
    path = tmp_path / f"{ds.SOPInstanceUID}.pdf"
    path.write_bytes(bytes(ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)])
    out = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def content_items(ds) -> list:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += content_items(item)
    return out


# -- tests -------------------------------------------------------------------
def test_review_modes_per_site_from_the_settings(tmp_path):
    settings = load_settings(_env(tmp_path, BRAINLINE_REVIEW_MODE="off",
                                  BRAINLINE_REVIEW_MODE_BY_SITE="SCANNER1=hold, scanner2 = PRELIMINARY"))
    assert settings.review_mode_by_site == {"SCANNER1": "hold", "scanner2": "preliminary"}
    assert review.review_mode(settings, "SCANNER1") == "hold"
    assert review.review_mode(settings, "SCANNER2") == "preliminary"  # AE titles matched ignoring case last
    assert review.review_mode(settings, "") == review.review_mode(settings, "CT7") == "off"
    assert review.review_mode(load_settings(_env(tmp_path)), "SCANNER1") == "preliminary"  # the default
    for bad in ("SCANNER1", "SCANNER1=later", "=hold", "A" * 17 + "=hold"):
        with pytest.raises(SettingsError, match="BRAINLINE_REVIEW_MODE_BY_SITE"):
            load_settings(_env(tmp_path, BRAINLINE_REVIEW_MODE_BY_SITE=bad))
    with pytest.raises(SettingsError, match="BRAINLINE_REVIEW_MODE must be"):
        load_settings(_env(tmp_path, BRAINLINE_REVIEW_MODE="sometimes"))
    assert person_name("Dr. Ada Lovelace") == "Lovelace^Ada^^Dr."
    assert person_name("Lovelace^Ada") == "Lovelace^Ada" and person_name("Hopper") == "Hopper^"


def test_hold_keeps_results_out_of_the_pacs_until_accept(service, processed, pacs, tmp_path):
    job_id = processed[1]
    ctx = service(BRAINLINE_REVIEW_MODE_BY_SITE="SCANNER1=hold,OTHER=preliminary")
    assert ctx.runner.run(job_id) == "done"
    deliver = stage_result(ctx, job_id, "deliver")
    assert deliver["review"] == {"mode": "hold", "site": "SCANNER1", "state": "pending"}
    held = rows(ctx)
    assert held and {r.state for r in held} == {"held"} and deliver["held"] == len(held)
    assert ctx.outbox.send_due() == 0 and ctx.outbox.depth() == 0
    assert pacs.count_instances() == 0

    # retention never purges a job under review, however old
    with ctx.sessions.begin() as s:
        s.get(Job, job_id).finished_at = utcnow() - timedelta(days=400)
    plan = plan_purge(ctx.settings, ctx.sessions, RetentionConfig(retention_days=180))
    assert not [i for i in plan.items if job_id in i.job_ids]
    assert [k.reason for k in plan.kept if job_id in k.job_ids][0].startswith(
        f"job {job_id} awaits a radiologist's review")

    with pytest.raises(ReviewError, match="score from 1") as refused:
        review.accept(ctx, job_id, REVIEWER, None, None, None)
    assert refused.value.status == 422
    with pytest.raises(ReviewError, match="does not exist") as unknown:
        review.accept(ctx, job_id + 99, REVIEWER, 4, None, None)
    assert unknown.value.status == 404

    outcome = review.accept(ctx, job_id, REVIEWER, 4, "Edema margin slightly generous", None)
    assert outcome["review_state"] == "accepted" and outcome["released"] > 0 and outcome["replaced"] == 2
    send_all(ctx)
    sent = {r.kind: r.sop_instance_uid for r in rows(ctx, "sent")}
    cancelled = {r.kind: r.sop_instance_uid for r in rows(ctx, "cancelled")}
    assert set(cancelled) == {"sr", "pdf"}  # the unreviewed SR and PDF never reach the PACS
    assert {"seg", "overlay", "verified_sr", "reviewed_pdf"} <= set(sent)
    assert pacs.count_instances() == len(rows(ctx, "sent"))

    sr = orthanc_instance(pacs, sent["verified_sr"], tmp_path)
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    [observer] = sr.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == "Lovelace^Ada^^Dr." and observer.VerifyingOrganization == ORG
    assert observer.VerificationDateTime[:8] == utcnow().strftime("%Y%m%d")
    [pred] = sr.PredecessorDocumentsSequence
    assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cancelled["sr"]
    items = {(i.ConceptNameCodeSequence[0].CodeValue, i.ValueType): i for i in content_items(sr)}
    assert items[("REVIEW-SCORE", "CODE")].ConceptCodeSequence[0].CodeValue == "SCORE-4"
    assert items[("REVIEW", "CODE")].ConceptCodeSequence[0].CodeValue == "REVIEW-ACCEPT"
    assert items[("121106", "TEXT")].TextValue == "Edema margin slightly generous"
    assert ("118565006", "NUM") in items  # the volumes are those of the original report
    assert sr.PatientID == "PID-4711-XYZ" and sr.InstanceNumber == 2  # next version, in the SR's series

    pdf = orthanc_instance(pacs, sent["reviewed_pdf"], tmp_path)
    assert pdf.VerificationFlag == "VERIFIED" and pdf.PatientID == "PID-4711-XYZ"
    text = pdf_text(pdf, tmp_path)
    assert f"Reviewed by {REVIEWER} on {utcnow():%Y-%m-%d}" in text and "score 4/5" in text
    assert "PID-4711-XYZ" in text  # rendered with the real identity, like deliver
    assert "Results not reviewed" not in text

    with pytest.raises(ReviewError, match=f"already accepted by {REVIEWER}"):
        review.reject(ctx, job_id, "Dr. Grace Hopper", None, "second opinion", None)
    assert ctx.store.get(job_id).review_state == "accepted"
    # the reviewer's words stay in the PHI zone (outbox folder, PACS), never in the workspace
    assert not subprocess.run(["grep", "-rlI", "slightly generous", str(ctx.runner.workspace(job_id))],
                              capture_output=True, text=True).stdout


def test_reject_retracts_the_delivered_objects_with_a_rejection_note(service, processed, pacs, tmp_path):
    from fastapi.testclient import TestClient

    from brainline.service.api.app import create_app

    job_id = processed[1]
    ctx = service(BRAINLINE_API_TOKEN="review-token")
    assert ctx.runner.run(job_id) == "done"
    assert stage_result(ctx, job_id, "deliver")["review"] == {"mode": "preliminary", "site": "SCANNER1",
                                                              "state": "pending"}
    send_all(ctx)
    delivered = orthanc_series(pacs)
    assert {u for uids in delivered.values() for u in uids} == {r.sop_instance_uid for r in rows(ctx, "sent")}

    client = TestClient(create_app(ctx))
    auth = {"Authorization": "Bearer review-token"}
    url = f"/api/v1/jobs/{job_id}/review"
    assert client.post(url, json={"decision": "reject", "reviewer": REVIEWER}).status_code == 401
    missing = client.post(url, headers=auth, json={"decision": "reject", "reviewer": REVIEWER, "score": 2})
    assert missing.status_code == 422 and "reason is required" in missing.json()["detail"]
    answer = client.post(url, headers=auth, json={"decision": "reject", "reviewer": REVIEWER, "score": 2,
                                                  "comment": REASON})
    assert answer.status_code == 200, answer.text
    outcome = answer.json()
    assert outcome["review_state"] == "rejected" and outcome["retracted"] == sum(map(len, delivered.values()))
    send_all(ctx)

    note = orthanc_instance(pacs, outcome["kos_sop_instance_uid"], tmp_path)
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001", "DCM", "Rejected for Quality Reasons")
    assert note.Modality == "KO" and note.PatientID == "PID-4711-XYZ"
    assert retracted_instances(note) == delivered  # every delivered instance, per series
    refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content_items(note)
            if i.ValueType in ("IMAGE", "COMPOSITE")}
    assert refs == {u for uids in delivered.values() for u in uids}
    assert {note.StudyInstanceUID} == {orthanc_instance(pacs, u).StudyInstanceUID for u in list(refs)[:3]}
    description = next(i for i in content_items(note) if i.ConceptNameCodeSequence[0].CodeValue == "113012")
    assert REASON in description.TextValue
    # Orthanc 1.10 ignores IOCM notes: the retracted instances carry the metadata
    for uid in refs:
        mark = httpx.get(f"{pacs.http_url}/instances/{orthanc_id(pacs, uid)}/metadata/{META}", timeout=30)
        assert mark.status_code == 200 and mark.text.startswith("113001 Rejected for Quality Reasons")
    assert httpx.get(f"{pacs.http_url}/instances/{orthanc_id(pacs, note.SOPInstanceUID)}/metadata/{META}",
                     timeout=30).status_code == 404

    [pdf_row] = [r for r in rows(ctx, "sent") if r.kind == "rejected_pdf"]
    pdf = orthanc_instance(pacs, pdf_row.sop_instance_uid, tmp_path)
    text = pdf_text(pdf, tmp_path)
    assert f"Segmentation REJECTED by {REVIEWER}" in text and "cannot be used" in text
    assert " ".join(REASON.split()) in text and "2/5" in text
    assert "Volume (mL)" not in text and "% of TIV" not in text and "whole tumour" not in text.lower()
    assert not re.search(r"\d\s*mL\b", text), text  # no volume anywhere, QC findings included

    again = client.post(url, headers=auth, json={"decision": "accept", "reviewer": "Dr. Grace Hopper", "score": 5})
    assert again.status_code == 409 and f"already rejected by {REVIEWER}" in again.json()["detail"]
    record = client.get(url, headers=auth).json()
    assert record["review_state"] == "rejected" and record["site"] == "SCANNER1"
    assert [(r["decision"], r["score"], r["comment"]) for r in record["reviews"]] == [("rejected", 2, REASON)]
    with ctx.sessions() as s:
        actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.job_id == job_id)))
    assert "retract" in actions and "review_reject" in actions and "accept_refused" in actions


def test_a_superseding_job_retracts_the_earlier_results(service, processed, pacs, tmp_path):
    first = processed[1]
    ctx = service(BRAINLINE_REVIEW_MODE="off")  # a site without review: results go out, nothing awaits review
    assert ctx.runner.run(first) == "done"
    assert "review" not in stage_result(ctx, first, "deliver") and ctx.store.get(first).review_state is None
    send_all(ctx)
    delivered = {r.sop_instance_uid for r in rows(ctx, "sent", first)}
    old = ctx.store.get(first)
    second = ctx.store.create(old.study_key, old.instance_count + 1, source="spool", site="SCANNER1")
    assert ctx.store.get(first).state == "superseded" and ctx.store.get(first).review_state is None
    with pytest.raises(ReviewError, match=f"superseded by job {second}: review job {second} instead"):
        review.accept(ctx, first, REVIEWER, 5, None, None)

    # the new job: the same pseudonymized inputs, its results built anew (new UIDs)
    shutil.copytree(ctx.runner.workspace(first), ctx.runner.workspace(second),
                    ignore=shutil.ignore_patterns("results", "build_outputs.json"))
    with ctx.sessions.begin() as s:
        before = {st.name: st.result_json for st in s.get(Job, first).stages}
        for st in s.get(Job, second).stages:
            if st.name not in ("build_outputs", "deliver"):
                st.state, st.result_json = "done", before[st.name]
    assert ctx.runner.run(second) == "done"
    deliver = stage_result(ctx, second, "deliver")
    retracted = deliver["retracted"]
    assert retracted["jobs"] == [first] and retracted["instances"] == len(delivered)
    assert retracted["reason"] == "113001 Rejected for Quality Reasons"
    assert "the earlier ones are retracted with an IHE IOCM rejection note" in deliver["note"]
    send_all(ctx)

    note = orthanc_instance(pacs, retracted["kos_sop_instance_uid"], tmp_path)
    assert {u for uids in retracted_instances(note).values() for u in uids} == delivered
    description = next(i for i in content_items(note) if i.ConceptNameCodeSequence[0].CodeValue == "113012")
    assert f"processed this study again (job {second})" in description.TextValue
    assert {r.sop_instance_uid for r in rows(ctx, "sent", second)} & delivered == set()
    with ctx.sessions() as s:
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.job_id == first, AuditEvent.action == "retract"))
    record = json.loads(event.detail)
    assert record["by_job"] == second and set(record["instances"]) == delivered
    # a re-run of the delivery retracts nothing twice
    assert review.retract_superseded(ctx.runner.stage_context(second, old.study_key),
                                     ctx.settings.outbox_dir / f"job-{second:06d}")["instances"] == len(delivered)
    with ctx.sessions() as s:
        assert len(list(s.scalars(select(AuditEvent).where(AuditEvent.action == "retract")))) == 1
