"""The review web UI (issue 12 item 3): log-in, sessions, CSRF, roles, the
worklist, the images sent to the browser, the identity view, the audit trail
and the `brainline user` command, against a real SQLite store and vault with
FastAPI's TestClient; and one test in real headless Chromium against a real
`brainline serve` that processed a study pushed with storescu and delivers to
a real Orthanc: log in, open the job, toggle labels, scroll (load time and
frames per second measured and printed), show the identity, accept with
score 4 and, when service/gateway/review.py is there, find the VERIFIED SR in
Orthanc; then, in the same service, REJECT a second study's job with a
reason and find in Orthanc the IOCM rejection note (KOS, 113001) that
references exactly the job's delivered instances, those instances flagged
with the retraction metadata (Orthanc's UserMetadata, set through
BRAINLINE_DEST_ORTHANC_REST) and the rejection PDF. Screenshots go to the
test's tmp dir and, with BRAINLINE_TEST_ARTIFACTS=DIR, to DIR/review_ui/."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient
from sqlalchemy import select

from brainline.pipelines.dicom_outputs.kos import retracted_instances
from brainline.service import cli
from brainline.service.api import auth
from brainline.service.api.app import create_app
from brainline.service.api.review_ui import prepare_volumes, short_uid
from brainline.service.context import ServiceContext
from brainline.service.db import AuditEvent, Job, QCMetric, Review, User
from brainline.service.settings import load_settings
from tests.browser import Browser, chromium_binary
from tests.conftest import PHI, PHI_STRINGS, TCGA
from tests.dicom_factory import write_study
from tests.peers import ORTHANC_BINARY, OrthancServer, storescu
from tests.phi import find_phi, scan

PASSWORD = "correct horse battery"
PHI_VALUES = {"name": PHI["patient_name"], "id": PHI["patient_id"], "birth": PHI["birth_date"],
              "accession": PHI["accession"]}
HAVE_REVIEW = importlib.util.find_spec("brainline.service.gateway.review") is not None


# ------------------------------------------------------------------ fixtures
def _write(arr: np.ndarray, path: Path, like: sitk.Image) -> None:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def make_workspace(work: Path) -> dict:
    """A small processed workspace: four skull-stripped sequences on one grid
    whose x axis runs toward the patient's RIGHT (direction -1 on x, as
    NIfTI-converted images often have), brain mask, segmentation with a
    tumour in the LEFT hemisphere, summary.json."""
    nz, ny, nx = 24, 40, 36
    ref = sitk.Image(nx, ny, nz, sitk.sitkFloat32)
    ref.SetSpacing((1.0, 1.2, 1.5))
    ref.SetOrigin((50.0, -20.0, -10.0))
    ref.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    z, y, x = np.mgrid[:nz, :ny, :nx]
    brain = ((z - 12) / 8.0) ** 2 + ((y - 20) / 12.0) ** 2 + ((x - 18) / 11.0) ** 2 <= 1
    r = np.sqrt(((z - 12) * 1.5) ** 2 + ((y - 20) * 1.2) ** 2 + ((x - 11) * 1.0) ** 2)  # x index 11: phys x 39 (left)
    labels = np.zeros((nz, ny, nx), np.uint8)
    labels[(r <= 6.5) & brain] = 2
    labels[(r <= 4.5) & brain] = 3
    labels[(r <= 2.5) & brain] = 1
    rng = np.random.default_rng(7)
    base = {"t1": 300.0, "t1c": 320.0, "t2": 500.0, "flair": 400.0}
    for role, level in base.items():
        arr = np.where(brain, level + rng.normal(0, 15, brain.shape), 0).astype(np.float32)
        arr[labels == 2] += 150 if role in ("t2", "flair") else -40
        arr[labels == 3] += 250 if role == "t1c" else 0
        _write(arr, work / "preprocessed" / f"{role}.nii.gz", ref)
    _write(brain.astype(np.uint8), work / "brain_mask.nii.gz", ref)
    _write(labels, work / "segmentation.nii.gz", ref)
    seg = sitk.ReadImage(str(work / "segmentation.nii.gz"))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.ConnectedComponent(seg > 0, True))
    voxel_ml = 1.0 * 1.2 * 1.5 / 1000
    vol = {str(k): round(float((labels == k).sum()) * voxel_ml, 3) for k in (1, 2, 3)}
    vol["tumor_core"] = round(vol["1"] + vol["3"], 3)
    vol["whole_tumor"] = round(float((labels > 0).sum()) * voxel_ml, 3)
    summary = {"volumes_ml": vol, "tiv_ml": round(float(brain.sum()) * voxel_ml, 1),
               "whole_tumor_components": [{"volume_ml": round(stats.GetPhysicalSize(lab) / 1000, 3),
                                           "centroid_lps_mm": [round(c, 1) for c in stats.GetCentroid(lab)],
                                           "voxels": int(stats.GetNumberOfPixels(lab))}
                                          for lab in stats.GetLabels()],
               "qc_flags": ["FLAIR to T1c: registration likely off: similarity improves when rotated"],
               "backends": {"segmentation": {"backend": "baseline", "model_name": "brainline-baseline",
                                             "model_version": "2.1"}}}
    (work / "summary.json").write_text(json.dumps(summary))
    (work / "segmentation_qc.json").write_text(json.dumps({"flags": [{"message": "2 discord alarms"}]}))
    return {"labels": labels, "brain": brain, "summary": summary}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    home = tmp_path_factory.mktemp("review_ui") / "home"
    settings = load_settings({"BRAINLINE_HOME": str(home), "BRAINLINE_VAULT_KEY": "test-vault-key-0123456789abcdef",
                              "BRAINLINE_MIN_FREE_MB": "10"})
    ctx = ServiceContext.build(settings)
    for name, role, display in (("rad", "radiologist", "Dr Ada Rad"), ("tech", "technician", "Tom Tech"),
                                ("boss", "admin", "Ann Admin")):
        auth.add_user(ctx.sessions, name, PASSWORD, role, display)

    def job(state="done", review_state="pending", site="SCANNER1", workspace=True, key=None) -> int:
        job_id = ctx.store.create(key or f"study-{time.monotonic_ns()}", 96, source="spool")
        with ctx.sessions.begin() as s:
            row = s.get(Job, job_id)
            row.state, row.review_state, row.site = state, review_state, site
            row.pseudo_study_uid = f"2.25.{31415926535897932384626 + job_id}"
            row.pseudo_patient_id = "BL-0123456789ABCDEF"
        if workspace:
            make_workspace(settings.workspace_dir / f"job-{job_id:06d}")
        return job_id

    ctx.vault.put("patient", "BL-0123456789ABCDEF", {
        "PatientID": PHI["patient_id"], "IssuerOfPatientID": "", "PatientName": PHI["patient_name"],
        "PatientBirthDate": PHI["birth_date"], "PatientSex": "F"})
    yield ctx, job
    ctx.engine.dispose()


@pytest.fixture
def client(parts):
    ctx, _job = parts
    with TestClient(create_app(ctx), base_url="http://testserver") as c:
        yield c


def login(client: TestClient, username: str, password: str = PASSWORD, next_path: str = "/review/worklist"):
    page = client.get("/review/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/review/login", data={"username": username, "password": password, "csrf_token": token,
                                              "next": next_path}, follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def events(ctx, action: str | None = None) -> list[AuditEvent]:
    with ctx.sessions() as s:
        query = select(AuditEvent).order_by(AuditEvent.id)
        return list(s.scalars(query.where(AuditEvent.action == action) if action else query))


def table(html: str, table_id: str) -> str:
    m = re.search(rf'<table[^>]*id="{table_id}"[^>]*>(.*?)</table>', html, re.S)
    assert m, f"no table {table_id}"
    return m.group(1)


# ---------------------------------------------------------------- passwords
def test_password_hash_is_salted_scrypt():
    a, b = auth.hash_password(PASSWORD), auth.hash_password(PASSWORD)
    assert a != b and a.startswith("scrypt$32768$8$1$")
    assert auth.verify_password(PASSWORD, a) and auth.verify_password(PASSWORD, b)
    assert not auth.verify_password(PASSWORD + "x", a)
    assert not auth.verify_password(PASSWORD, "md5$abc") and not auth.verify_password(PASSWORD, "garbage")
    with pytest.raises(auth.UserError, match="at least 10 characters"):
        auth.check_password_rules("short")


# ------------------------------------------------------------ log-in, logout
def test_login_wrong_password_then_right_one(parts, client):
    ctx, _ = parts
    first = client.get("/review/worklist", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"].startswith("/review/login?next=/review/worklist")
    n_failed = len(events(ctx, "login_failed"))
    bad = login(client, "rad", "not the password")
    assert bad.status_code == 401 and "wrong username or password" in bad.text
    unknown = login(client, "nobody", PASSWORD)
    assert unknown.status_code == 401 and "wrong username or password" in unknown.text
    failed = events(ctx, "login_failed")[n_failed:]
    assert [(e.username, e.detail) for e in failed] == [("rad", "wrong password"), ("nobody", "unknown user")]
    ok = login(client, "rad")
    assert ok.status_code == 303 and ok.headers["location"] == "/review/worklist"
    cookie = next(h for h in ok.headers.get_list("set-cookie") if h.startswith("brainline_review="))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/review" in flags
    assert "secure" not in flags  # plain HTTP here; Secure when the API speaks HTTPS
    assert events(ctx, "login")[-1].username == "rad"
    page = client.get("/review/worklist")
    assert page.status_code == 200 and "Dr Ada Rad" in page.text
    assert client.get("/review/login", follow_redirects=False).headers["location"] == "/review/worklist"
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "same-origin"  # "no-referrer" makes browsers post "Origin: null"
    with ctx.sessions() as s:
        assert s.scalar(select(User).where(User.username == "rad")).last_login_at is not None


def test_cookies_are_secure_over_https(parts):
    ctx, _ = parts
    tls = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, tls_cert="/run/cert.pem",
                                                                tls_key="/run/key.pem"))
    with TestClient(create_app(tls), base_url="https://testserver") as c:
        ok = login(c, "boss")
        assert ok.status_code == 303
        cookie = next(h for h in ok.headers.get_list("set-cookie") if h.startswith("brainline_review="))
        assert "; secure" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert c.get("/review/worklist").status_code == 200


def test_login_form_needs_its_csrf_token(client):
    client.get("/review/login")
    refused = client.post("/review/login", data={"username": "rad", "password": PASSWORD, "csrf_token": "forged"},
                          follow_redirects=False)
    assert refused.status_code == 403 and "stale" in refused.text
    assert client.get("/review/worklist", follow_redirects=False).status_code == 303


def test_failed_logins_are_throttled(parts, client):
    ctx, _ = parts
    for _ in range(5):
        assert login(client, "tech", "wrong password!").status_code == 401
    locked = login(client, "tech")  # the right password, but too soon
    assert locked.status_code == 429 and "too many failed log-ins" in locked.text
    assert events(ctx, "login_locked")[-1].username == "tech"
    assert login(client, "rad").status_code == 303  # another user is not locked out


def test_logout_revokes_the_session(parts, client):
    ctx, _ = parts
    assert login(client, "rad").status_code == 303
    page = client.get("/review/worklist")
    stolen = client.cookies.get("brainline_review")
    assert client.post("/review/logout", data={}, follow_redirects=False).status_code == 403  # no CSRF token
    out = client.post("/review/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert out.status_code == 303 and "logged%20out" in out.headers["location"]
    assert events(ctx, "logout")[-1].username == "rad"
    again = client.get("/review/worklist", headers={"Cookie": f"brainline_review={stolen}"},  # no use any more
                       follow_redirects=False)
    assert again.status_code == 303 and "logged%20out" in again.headers["location"]


def test_session_expires(parts):
    ctx, _ = parts
    short = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, review_session_minutes=0.02))
    with TestClient(create_app(short)) as c:  # 1.2 s without a request ends the session
        assert login(c, "rad").status_code == 303
        assert c.get("/review/worklist").status_code == 200
        time.sleep(2.6)
        gone = c.get("/review/worklist", follow_redirects=False)
        assert gone.status_code == 303 and "expired" in gone.headers["location"]
        assert c.get("/review/jobs/1/volumes.json").status_code == 401
    manager = auth.SessionManager(b"k" * 32, idle_minutes=30, max_hours=12)
    with ctx.sessions() as s:
        user = s.scalar(select(User).where(User.username == "rad"))
    assert manager.read(manager.issue(user)).user_id == user.id
    with pytest.raises(auth.SessionInvalid, match="expired"):  # 12 h after log-in, however active
        manager.read(manager.issue(user, login_at=time.time() - 12 * 3600 - 5))
    with pytest.raises(auth.SessionInvalid):  # signed with another key
        auth.SessionManager(b"x" * 32, 30, 12).read(manager.issue(user))


def test_password_change_and_disabling_end_sessions(parts, client):
    ctx, _ = parts
    auth.add_user(ctx.sessions, "temp", PASSWORD, "technician", "Temp")
    assert login(client, "temp").status_code == 303
    assert client.get("/review/worklist").status_code == 200
    auth.set_password(ctx.sessions, "temp", PASSWORD + " 2")
    moved = client.get("/review/worklist", follow_redirects=False)
    assert moved.status_code == 303 and "password%20was%20changed" in moved.headers["location"]
    assert login(client, "temp", PASSWORD + " 2").status_code == 303
    auth.set_active(ctx.sessions, "temp", False)
    off = client.get("/review/worklist", follow_redirects=False)
    assert off.status_code == 303 and "disabled" in off.headers["location"]
    assert login(client, "temp", PASSWORD + " 2").status_code == 401


# ------------------------------------------------------------- CSRF, roles
def test_posts_without_csrf_token_are_refused(parts, client):
    ctx, job = parts
    job_id = job()
    assert login(client, "rad").status_code == 303
    page = client.get(f"/review/jobs/{job_id}")
    token = csrf_of(page.text)
    n = len(events(ctx, "csrf_refused"))
    for data, hdrs in (({"decision": "accept", "score": "4"}, {}),
                       ({"decision": "accept", "score": "4", "csrf_token": "0" * 64}, {}),
                       ({"decision": "accept", "score": "4", "csrf_token": token}, {"Origin": "https://evil.example"})):
        refused = client.post(f"/review/jobs/{job_id}/review", data=data, headers=hdrs, follow_redirects=False)
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    assert client.post(f"/review/jobs/{job_id}/identity", json={}).status_code == 403
    assert len(events(ctx, "csrf_refused")) == n + 4
    with ctx.sessions() as s:
        assert s.scalars(select(Review).where(Review.job_id == job_id)).all() == []


def test_technician_views_but_may_not_review_or_see_identity(parts, client):
    ctx, job = parts
    job_id = job()
    assert login(client, "tech").status_code == 303
    page = client.get(f"/review/jobs/{job_id}")
    assert page.status_code == 200
    assert 'id="viewer"' in page.text and 'id="review-not-allowed"' in page.text
    assert 'id="review-form"' not in page.text and 'id="show-identity"' not in page.text
    token = csrf_of(page.text)
    refused = client.post(f"/review/jobs/{job_id}/review",
                          data={"decision": "accept", "score": "5", "csrf_token": token})
    assert refused.status_code == 403 and "may view results but not accept" in refused.text
    assert events(ctx, "review_refused")[-1].job_id == job_id
    who = client.post(f"/review/jobs/{job_id}/identity", headers={"X-CSRF-Token": token}, json={})
    assert who.status_code == 403 and not find_phi(who.content, PHI_VALUES)
    assert events(ctx, "identity_refused")[-1].username == "tech"
    assert client.get("/review/audit").status_code == 403
    assert client.get(f"/review/jobs/{job_id}/volumes.json").status_code == 200  # viewing is allowed


def test_review_form_checks_its_fields(parts, client):
    _ctx, job = parts
    job_id = job()
    assert login(client, "rad").status_code == 303
    token = csrf_of(client.get(f"/review/jobs/{job_id}").text)
    for data, words in (({"decision": "accept"}, "accepting needs a score"),
                        ({"decision": "accept", "score": "7"}, "score must be a whole number from 1 to 5"),
                        ({"decision": "reject", "score": "2"}, "rejecting needs a comment"),
                        ({"score": "3"}, "choose accept or reject")):
        answer = client.post(f"/review/jobs/{job_id}/review", data={**data, "csrf_token": token})
        assert answer.status_code == 422 and words in answer.text.lower(), answer.text[-500:]


@pytest.mark.skipif(not HAVE_REVIEW, reason="service/gateway/review.py (review.accept/reject) is not there yet")
def test_review_of_a_job_that_cannot_be_reviewed_is_refused_in_words(parts, client):
    ctx, job = parts
    job_id = job(state="failed", review_state=None)
    assert login(client, "rad").status_code == 303
    token = csrf_of(client.get(f"/review/jobs/{job_id}").text)
    answer = client.post(f"/review/jobs/{job_id}/review", data={"decision": "accept", "score": "4",
                                                                 "csrf_token": token})
    assert answer.status_code == 409 and "cannot be accepted" in answer.text
    assert events(ctx, "accept_refused")[-1].job_id == job_id


# --------------------------------------------------------- worklist, pages
def test_worklist_lists_jobs_awaiting_review_pseudonymised(parts, client):
    ctx, job = parts
    pending = job(review_state="pending", site="MRI3T")
    not_asked = job(review_state=None)
    failed = job(state="failed", review_state=None)
    accepted = job(review_state="accepted")
    with ctx.sessions.begin() as s:
        s.add(Review(job_id=accepted, reviewer="Dr Ada Rad", decision="accepted", score=5, comment="fine"))
    assert login(client, "tech").status_code == 303
    page = client.get("/review/worklist")
    html = page.text
    rows = {name: set(map(int, re.findall(r'data-job="(\d+)"', table(html, name))))
            for name in ("pending", "not-requested", "reviewed")}
    assert pending in rows["pending"] and not_asked in rows["not-requested"] and accepted in rows["reviewed"]
    assert failed not in set().union(*rows.values())
    uid = ctx.store.get(pending).pseudo_study_uid
    assert short_uid(uid) in html and uid[-6:] in html and "MRI3T" in html
    summary = json.loads((ctx.settings.workspace_dir / f"job-{pending:06d}" / "summary.json").read_text())
    row = re.search(rf'<tr data-job="{pending}">(.*?)</tr>', table(html, "pending"), re.S).group(1)
    assert f"{summary['volumes_ml']['whole_tumor']:.1f}" in row
    assert '<span class="badge warn">2</span>' in row  # the registration flag and the discord alarm
    assert "sent as preliminary" in row  # no outbox rows held
    not_asked_page = client.get(f"/review/jobs/{not_asked}").text
    assert 'id="review-closed"' in not_asked_page and "review mode off" in not_asked_page
    assert "Dr Ada Rad, score 5" in table(html, "reviewed")
    assert not find_phi(page.content, PHI_VALUES)


def test_job_page_shows_volumes_components_findings_and_audit(parts, client):
    ctx, job = parts
    job_id = job()
    auth.audit(ctx.sessions, "rad", "identity_view", job_id, "patient identity shown")
    assert login(client, "tech").status_code == 303
    page = client.get(f"/review/jobs/{job_id}")
    html = page.text
    findings = re.search(r'<ul class="findings" id="findings">(.*?)</ul>', html, re.S).group(1)
    assert "registration likely off" in findings and "2 discord alarms" in findings
    assert len(re.findall(r'class="goto"', table(html, "components"))) == 1
    assert "identity_view" in table(html, "audit")
    assert not find_phi(page.content, PHI_VALUES)
    assert client.get("/review/jobs/99999999").status_code == 404


# -------------------------------------------------------- images for the UI
def test_volumes_are_sent_as_oriented_windowed_bytes(parts, client):
    ctx, job = parts
    job_id = job()
    work = ctx.settings.workspace_dir / f"job-{job_id:06d}"
    assert client.get(f"/review/jobs/{job_id}/volumes.json").status_code == 401
    assert client.get(f"/review/jobs/{job_id}/volume/t1c").status_code == 401
    assert login(client, "tech").status_code == 303
    meta = client.get(f"/review/jobs/{job_id}/volumes.json").json()
    assert meta["roles"] == ["t1", "t1c", "t2", "flair"] and meta["volumes"][-1] == "seg"
    nz, ny, nx = meta["shape"]
    assert meta["spacing"] == [1.5, 1.2, 1.0]
    arrays = {}
    for name in meta["volumes"]:
        answer = client.get(f"/review/jobs/{job_id}/volume/{name}")
        assert answer.status_code == 200 and answer.headers["content-encoding"] == "gzip"
        arrays[name] = np.frombuffer(answer.content, np.uint8).reshape(nz, ny, nx)
    seg = arrays["seg"]
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    # the grid's x axis ran toward the patient's right with the tumour at low x
    # indices; oriented to LPS it is in the higher columns (the patient's left,
    # drawn on the right of the screen)
    assert np.nonzero(seg)[2].mean() > nx / 2
    # cropped to the brain (+4 voxels), windowed inside it: ET bright on T1c
    assert nx < 36 and ny < 40
    t1c = arrays["t1c"]
    assert t1c.max() == 255 and t1c[0, 0, 0] == 0
    assert t1c[seg == 3].mean() > np.median(t1c[(seg == 0) & (t1c > 0)]) + 100
    [comp] = meta["components"]
    assert seg[tuple(comp["position"])] > 0  # "Go" lands in the tumour
    assert seg[meta["start"][0]].any()
    assert client.get(f"/review/jobs/{job_id}/volume/secret").status_code == 404
    # cached, and rebuilt when an input changes
    stamp = (work / "review" / "t1c.u8.gz").stat().st_mtime_ns
    assert prepare_volumes(work)["shape"] == [nz, ny, nx]
    assert (work / "review" / "t1c.u8.gz").stat().st_mtime_ns == stamp
    time.sleep(0.01)
    (work / "summary.json").write_text((work / "summary.json").read_text())
    os.utime(work / "summary.json", ns=(time.time_ns(), time.time_ns() + 10**9))
    prepare_volumes(work)
    assert (work / "review" / "t1c.u8.gz").stat().st_mtime_ns != stamp
    assert gzip.decompress((work / "review" / "seg.u8.gz").read_bytes()) == seg.tobytes()


def test_static_files_and_no_path_tricks(client):
    js = client.get("/review/static/viewer.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "requestAnimationFrame" in js.text and "http://" not in js.text and "https://" not in js.text
    assert client.get("/review/static/review.css").status_code == 200
    for bad in ("..%2Fauth.py", "%2E%2E%2Fapi.py", "nothere.js", "job.html"):
        assert client.get(f"/review/static/{bad}").status_code == 404


# ------------------------------------------------------------------ identity
def test_identity_is_shown_only_on_request_and_audited(parts, client, caplog):
    ctx, job = parts
    job_id = job()
    caplog.set_level(logging.DEBUG)
    assert login(client, "rad").status_code == 303
    page = client.get(f"/review/jobs/{job_id}")
    assert 'id="show-identity"' in page.text and not find_phi(page.content, PHI_VALUES)
    n = len(events(ctx, "identity_view"))
    token = csrf_of(page.text)
    answer = client.post(f"/review/jobs/{job_id}/identity", headers={"X-CSRF-Token": token}, json={})
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["patient_name"] == "DOE, JANE" and body["patient_id"] == PHI["patient_id"]
    assert body["birth_date"] == "1964-02-29" and body["sex"] == "F"
    [event] = events(ctx, "identity_view")[n:]
    assert (event.username, event.job_id) == ("rad", job_id)
    everything = " ".join(f"{e.username} {e.action} {e.detail}" for e in events(ctx))
    assert not find_phi(everything.encode(), PHI_VALUES)
    assert not any(s in caplog.text for s in PHI_STRINGS)
    no_vault = job()
    with ctx.sessions.begin() as s:
        s.get(Job, no_vault).pseudo_patient_id = "BL-FFFFFFFFFFFFFFFF"
    missing = client.post(f"/review/jobs/{no_vault}/identity", headers={"X-CSRF-Token": token}, json={})
    assert missing.status_code == 404 and "vault holds no identity" in missing.json()["detail"]


def test_image_qc_overview_for_logged_in_users(parts, client):
    ctx, job = parts
    job_id = job(site="MRI3T")
    with ctx.sessions.begin() as s:
        s.add(QCMetric(job_id=job_id, site="MRI3T", scanner="ACME Magnet 3T", protocol="AX FLAIR", role="flair",
                       metric="SNR1", value=12.5))
    refused = client.get("/review/qc", follow_redirects=False)
    assert refused.status_code == 303 and "/review/login" in refused.headers["location"]
    assert login(client, "tech").status_code == 303
    page = client.get("/review/qc")
    assert page.status_code == 200 and "ACME Magnet 3T" in page.text and "MRI3T" in page.text
    assert page.headers["content-security-policy"] == "default-src 'none'; style-src 'unsafe-inline'"
    assert 'href="/review/qc"' in client.get("/review/worklist").text


def test_admin_reads_the_audit_trail(client):
    assert login(client, "boss").status_code == 303
    page = client.get("/review/audit")
    assert page.status_code == 200 and "login" in table(page.text, "audit-table")


# ---------------------------------------------------------------- CLI
def test_user_command(parts, monkeypatch, capsys):
    ctx, _ = parts
    umask = os.umask(0o022)  # cli.main sets the process umask: give it back afterwards
    os.umask(umask)
    try:
        _user_command(ctx, monkeypatch, capsys)
    finally:
        os.umask(umask)


def _user_command(ctx, monkeypatch, capsys):
    monkeypatch.setenv("BRAINLINE_HOME", str(ctx.settings.home))
    monkeypatch.setenv("BRAINLINE_VAULT_KEY", "test-vault-key-0123456789abcdef")

    def run(*argv, stdin=""):
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = cli.main(["user", *argv])
        return code, capsys.readouterr()

    code, out = run("add", "dr.who", "--role", "radiologist", "--display-name", "Dr  Who", stdin="tardis-blue-box\n")
    assert code == 0 and 'added (radiologist, "Dr Who")' in out.out
    user = auth.get_user(ctx.sessions, "dr.who")
    assert auth.verify_password("tardis-blue-box", user.password_hash) and user.display_name == "Dr Who"
    assert run("add", "dr.who", "--role", "technician", stdin="another-password\n")[0] == 1
    code, out = run("add", "nurse", "--role", "technician", stdin="short\n")
    assert code == 1 and "at least 10 characters" in out.err
    assert run("add", "bad name", "--role", "technician", stdin="long-enough-pw\n")[0] == 1
    code, out = run("passwd", "dr.who", stdin="regeneration-42\n")
    assert code == 0 and auth.authenticate(ctx.sessions, "dr.who", "regeneration-42")[1] == "ok"
    assert run("disable", "dr.who")[0] == 0
    assert auth.authenticate(ctx.sessions, "dr.who", "regeneration-42") == (None, "account disabled")
    code, out = run("list", "--json")
    listed = {u["username"]: u for u in json.loads(out.out)}
    assert listed["dr.who"]["active"] is False and listed["rad"]["role"] == "radiologist"
    assert "scrypt$" not in out.out and "password" not in out.out
    assert run("enable", "dr.who")[0] == 0 and auth.get_user(ctx.sessions, "dr.who").active
    assert run("passwd", "nobody", stdin="whatever-long\n")[0] == 1
    assert {e.action for e in events(ctx) if e.username.startswith("cli:")} >= {
        "user_add", "user_passwd", "user_disable", "user_enable"}


# ------------------------------------------------------- the browser test
ARTIFACTS = os.environ.get("BRAINLINE_TEST_ARTIFACTS")
COLOUR_COUNT = """((role) => {
  const c = document.querySelector('.panel[data-role="' + role + '"] canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let red = 0, green = 0, yellow = 0;
  for (let i = 0; i < d.length; i += 4) {
    const r = d[i], g = d[i + 1], b = d[i + 2];
    if (r - g > 60 && r - b > 60) red++;
    else if (g - r > 60 && g - b > 60) green++;
    else if (r - b > 80 && g - b > 80 && Math.abs(r - g) < 80) yellow++;
  }
  return {red, green, yellow};
})"""
SCROLL_FPS = """new Promise((resolve) => {
  const v = window.brainlineViewer, canvas = document.querySelector('.panel canvas');
  v.setPlane('axial');
  const n = v.geom().n, steps = Math.max(30, 2 * (n - 1));
  v.goTo([0, v.state.pos[1], v.state.pos[2]]);
  let i = 0, t0 = 0, f0 = 0, dir = 1, first = -1, last = -1;
  function tick() {
    if (i === 0) { t0 = performance.now(); f0 = v.frames; first = v.state.pos[0]; }
    if (i === steps) { resolve({ms: performance.now() - t0, steps, frames: v.frames - f0, n, first, last}); return; }
    if (v.state.pos[0] >= n - 1) dir = -1;
    if (v.state.pos[0] <= 0) dir = 1;
    canvas.dispatchEvent(new WheelEvent('wheel', {deltaY: 100 * dir, bubbles: true, cancelable: true}));
    last = v.state.pos[0];
    i++;
    requestAnimationFrame(tick);
  }
  requestAnimationFrame(() => requestAnimationFrame(tick));
})"""


def _save(path: Path) -> None:
    if ARTIFACTS:
        out = Path(ARTIFACTS) / "review_ui"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)


def _verified_srs(orthanc, study_uid: str) -> list[dict]:
    found = httpx.post(orthanc.http_url + "/tools/find", json={"Level": "Instance", "Query": {
        "Modality": "SR", "StudyInstanceUID": study_uid}}, timeout=30).json()
    tags = [orthanc.get(f"/instances/{i}/simplified-tags").json() for i in found]
    return [t for t in tags if t.get("VerificationFlag") == "VERIFIED"]


def _wait_js(browser: Browser, expression: str, timeout: float, what: str):
    """Like Browser.wait_for, across a page load (the old page's context goes away)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = browser.evaluate(expression)
        except RuntimeError:  # no execution context while the next page loads
            value = None
        if value:
            return value
        browser.pump(0.2)
    raise AssertionError(f"timed out waiting for {what}; console tail: {browser.console[-15:]}")


KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
RETRACTED = "BrainLineRetracted"  # BRAINLINE_DEST_ORTHANC_METADATA's default
REASON = "Edema misses the frontal extension; tumour core includes the choroid plexus"


@pytest.fixture
def pacs():
    """An Orthanc that declares the retraction metadata in its UserMetadata
    (else it refuses the marks of a REJECT), as in test_review_lifecycle."""
    if not Path(ORTHANC_BINARY).exists():
        pytest.skip("needs Orthanc (scripts/install-system-deps.sh)")
    with OrthancServer(extra_config={"UserMetadata": {RETRACTED: 1024}}) as server:
        yield server


def _outbox_rows(svc, job_id: int) -> list[dict]:
    return [i for i in svc.api("GET", "/api/v1/outbox").json()["items"] if i["job_id"] == job_id]


def _wait_outbox(svc, job_id: int, kinds: set[str] = frozenset(), timeout: float = 120) -> list[dict]:
    """The job's outbox rows once none is pending any more and rows of each of ``kinds`` exist."""
    deadline = time.monotonic() + timeout
    while True:
        found = _outbox_rows(svc, job_id)
        if found and kinds <= {r["kind"] for r in found} and all(r["state"] != "pending" for r in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox of job {job_id} not sent in {timeout} s: {found}")
        time.sleep(0.3)


def _orthanc_id(pacs, sop_uid: str) -> str:
    found = httpx.post(pacs.http_url + "/tools/lookup", content=sop_uid, timeout=30).json()
    assert found, f"{sop_uid} is not in Orthanc"
    return found[0]["ID"]


def _study_series(pacs, study_uid: str) -> dict[str, set[str]]:
    """Series Instance UID -> SOP Instance UIDs that Orthanc holds in the study."""
    [study] = httpx.post(pacs.http_url + "/tools/lookup", content=study_uid, timeout=30).json()
    out: dict[str, set[str]] = {}
    for series in pacs.get(f"/studies/{study['ID']}/series").json():
        out[series["MainDicomTags"]["SeriesInstanceUID"]] = {
            i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get(f"/series/{series['ID']}/instances").json()}
    return out


def _instance(pacs, sop_uid: str) -> pydicom.Dataset:
    raw = pacs.get(f"/instances/{_orthanc_id(pacs, sop_uid)}/file", timeout=60).content
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))


def _mark(pacs, sop_uid: str) -> httpx.Response:
    return httpx.get(f"{pacs.http_url}/instances/{_orthanc_id(pacs, sop_uid)}/metadata/{RETRACTED}", timeout=30)


@pytest.mark.integration
def test_review_in_chromium(service_factory, pacs, small_study, tmp_path):
    if chromium_binary() is None or not Path(ORTHANC_BINARY).exists():
        pytest.skip("needs chromium and Orthanc (scripts/install-system-deps.sh)")
    t_start = time.monotonic()
    # a second, smaller study of the patient (new UIDs; T1c and FLAIR, every 10th slice: a few seconds
    # of processing), for the REJECT; both studies go over one association
    second = write_study(tmp_path / "study2", TCGA, slice_step=10, roles=("t1c", "flair"), **PHI)
    svc = service_factory(BRAINLINE_DEST_DICOM=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
                          BRAINLINE_DEST_ORTHANC_REST=pacs.http_url)
    assert storescu([small_study.series["t1"].dir.parent, tmp_path / "study2"], svc.dicom_port).returncode == 0
    for name, role, display in (("rad", "radiologist", "Dr Ada Rad"), ("tech", "technician", "Tom Tech")):
        made = subprocess.run([*svc.cli, "user", "add", name, "--role", role, "--display-name", display],
                              input=PASSWORD + "\n", env=svc.env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
    jobs = svc.wait_jobs(2, timeout=300)
    assert len(jobs) == 2 and all(j["state"] == "done" for j in jobs), jobs
    # which job is which study: where Orthanc filed each job's delivered objects
    study_of = {}
    for j in jobs:
        sent = [r for r in _wait_outbox(svc, j["id"]) if r["state"] == "sent"]
        assert sent, j["id"]
        instance = pacs.get(f"/instances/{_orthanc_id(pacs, sent[0]['sop_instance_uid'])}/study").json()
        study_of[instance["MainDicomTags"]["StudyInstanceUID"]] = j["id"]
    assert set(study_of) == {small_study.study_uid, second.study_uid}, study_of
    job_id, rejected_id = study_of[small_study.study_uid], study_of[second.study_uid]
    t_job = time.monotonic() - t_start
    figures = {}
    # software compositing at the display's 60 Hz, as on a workstation; the SwiftShader GL that OHIF's
    # WebGL needs holds requestAnimationFrame to ~18 Hz on a loaded 2-core machine, whatever the page draws
    browser = Browser(chromium_binary(), tmp_path / "profile", size=(1500, 950), gpu_args=("--disable-gpu",))
    try:
        browser.navigate(svc.url + "/review/worklist")
        browser.wait_for("!!document.getElementById('login-form')", timeout=30, what="the log-in form")
        browser.screenshot(tmp_path / "review_login.png")
        browser.evaluate("document.getElementById('username').value = 'rad';"
                         f"document.getElementById('password').value = {json.dumps(PASSWORD)};"
                         "document.getElementById('login-button').click(); true")
        _wait_js(browser, "!!document.getElementById('pending') && location.pathname.endsWith('/worklist')",
                 30, "the worklist")
        assert browser.evaluate(f"!!document.querySelector('tr[data-job=\"{job_id}\"] a.job-link')")
        browser.screenshot(tmp_path / "review_worklist.png")
        browser.evaluate(f"document.querySelector('tr[data-job=\"{job_id}\"] a.job-link').click(); true")
        _wait_js(browser, "window.brainlineViewer && (brainlineViewer.ready || brainlineViewer.error)", 60,
                 "the viewer")
        assert browser.evaluate("brainlineViewer.error") is None, browser.evaluate("brainlineViewer.error")
        figures["load_first_ms"] = browser.evaluate("brainlineViewer.loadMs")
        browser.evaluate("document.body.dataset.stale = '1'; true")
        browser.navigate(svc.url + f"/review/jobs/{job_id}")  # again: the arrays are cached now
        _wait_js(browser, "!document.body.dataset.stale && window.brainlineViewer && brainlineViewer.ready", 60,
                 "the viewer")
        figures["load_ms"] = browser.evaluate("brainlineViewer.loadMs")
        assert not find_phi(browser.evaluate("document.documentElement.outerHTML").encode(), PHI_VALUES)
        meta = browser.evaluate("brainlineViewer.meta")
        assert meta["roles"] == ["t1", "t1c", "t2", "flair"]
        browser.screenshot(tmp_path / "review_job.png")
        # label toggles: the start slice holds the tumour's largest cross-section
        present = browser.evaluate("brainlineViewer.sliceLabels()")
        before = browser.evaluate(COLOUR_COUNT + "('flair')")
        assert present["2"] > 0 and before["green"] > 20, (present, before)
        browser.evaluate("document.getElementById('label-2').click(); true")
        browser.pump(0.2)
        without_ed = browser.evaluate(COLOUR_COUNT + "('flair')")
        assert without_ed["green"] == 0 and not browser.evaluate("brainlineViewer.state.show[2]"), without_ed
        if present["3"] > 0:
            assert without_ed["yellow"] > 0
            browser.evaluate("document.getElementById('label-3').click(); true")
            browser.pump(0.2)
            assert browser.evaluate(COLOUR_COUNT + "('flair')")["yellow"] == 0
            browser.evaluate("document.getElementById('label-3').click(); true")
        browser.evaluate("document.getElementById('label-2').click(); true")
        browser.evaluate("brainlineViewer.setOpacity(0); true")
        browser.pump(0.2)
        assert sum(browser.evaluate(COLOUR_COUNT + "('flair')").values()) == 0
        browser.evaluate("brainlineViewer.setOpacity(0.45); true")
        # scrolling: a real mouse wheel, the keyboard, the slider
        rect = browser.evaluate("(() => { const r = document.querySelector('.panel canvas').getBoundingClientRect();"
                                " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        k0 = browser.evaluate("brainlineViewer.state.pos[0]")
        delta = -100 if k0 > 0 else 100
        browser.call("Input.dispatchMouseEvent", type="mouseWheel", x=rect[0], y=rect[1], deltaX=0, deltaY=delta)
        browser.wait_for(f"brainlineViewer.state.pos[0] === {k0 + (1 if delta > 0 else -1)}", timeout=5,
                         what="the wheel to move one slice")
        k1 = browser.evaluate("brainlineViewer.state.pos[0]")
        browser.call("Input.dispatchKeyEvent", type="rawKeyDown", key="ArrowUp", code="ArrowUp",
                      windowsVirtualKeyCode=38)
        browser.call("Input.dispatchKeyEvent", type="keyUp", key="ArrowUp", code="ArrowUp", windowsVirtualKeyCode=38)
        browser.wait_for(f"brainlineViewer.state.pos[0] === Math.min({k1 + 1}, brainlineViewer.geom().n - 1)",
                         timeout=5, what="ArrowUp to move one slice")
        browser.wait_for("document.getElementById('slice-out').textContent.startsWith("
                         "(brainlineViewer.state.pos[0] + 1) + ' / ')", timeout=5, what="the slice number drawn")
        scroll = browser.evaluate(SCROLL_FPS)
        figures["fps"] = round(1000.0 * scroll["steps"] / scroll["ms"], 1)
        figures["scroll"] = scroll
        assert scroll["frames"] >= scroll["steps"] - 2, scroll  # every step was drawn
        browser.evaluate("document.querySelector('button.plane[data-plane=\"coronal\"]').click(); true")
        browser.wait_for("brainlineViewer.geom().axis === 1", timeout=5, what="the coronal plane")
        browser.evaluate("document.querySelector('button.goto').click(); true")
        browser.pump(0.3)
        browser.screenshot(tmp_path / "review_coronal.png")
        browser.evaluate("document.querySelector('button.plane[data-plane=\"axial\"]').click(); true")
        # the identity, on request only
        browser.evaluate("document.getElementById('show-identity').click(); true")
        shown = browser.wait_for("(() => { const b = document.getElementById('identity');"
                                 " return b && !b.hidden ? b.innerText : ''; })()", timeout=15, what="the identity")
        assert "DOE, JANE" in shown and PHI["patient_id"] in shown, shown
        browser.evaluate("document.querySelector('#identity button').click(); true")  # hide it again
        # ACCEPT with score 4
        verified_before = len(_verified_srs(pacs, small_study.study_uid))
        browser.evaluate("document.getElementById('decision-accept').click();"
                         "document.getElementById('score').value = '4';"
                         "document.getElementById('comment').value = 'good segmentation, minor edema flaw';"
                         "document.getElementById('review-submit').click(); true")
        outcome = _wait_js(browser, "(() => { const ok = document.getElementById('review-done');"
                                    " const bad = document.getElementById('review-error');"
                                    " return ok ? 'ok' : (bad ? bad.innerText : ''); })()", 120, "the review outcome")
        _wait_js(browser, "window.brainlineViewer && brainlineViewer.ready", 30, "the viewer after the review")
        browser.screenshot(tmp_path / "review_accepted.png")
        audit = browser.evaluate("document.getElementById('audit').innerText")
        assert "identity_view" in audit and "rad" in audit
        if HAVE_REVIEW:
            assert outcome == "ok", outcome
            assert "review_accept" in audit and "score 4" in audit
            reviews = browser.evaluate("document.getElementById('reviews').innerText")
            assert "Dr Ada Rad" in reviews and "accepted" in reviews and "4" in reviews
            deadline = time.monotonic() + 120
            while len(_verified_srs(pacs, small_study.study_uid)) <= verified_before and time.monotonic() < deadline:
                time.sleep(0.25)
            verified = _verified_srs(pacs, small_study.study_uid)
            assert len(verified) == verified_before + 1, verified
            assert all(v["PatientID"] == PHI["patient_id"] for v in verified)  # re-identified on the way out
        else:
            assert "not available in this installation" in outcome, outcome
        if HAVE_REVIEW:
            # REJECT the second study's job (sent as preliminary) with a reason and score 2
            before = _wait_outbox(svc, rejected_id)
            delivered = {r["sop_instance_uid"] for r in before
                         if r["state"] == "sent" and not r["destination"].startswith("orthanc-rest:")}
            in_pacs = _study_series(pacs, second.study_uid)
            assert delivered and {u for uids in in_pacs.values() for u in uids} == delivered, (in_pacs, before)
            browser.navigate(svc.url + "/review/worklist")
            link = f"#pending tr[data-job=\"{rejected_id}\"] a.job-link"
            _wait_js(browser, f"!!document.querySelector('{link}')", 30, "the second job in the worklist")
            assert browser.evaluate(f"!!document.querySelector('#reviewed tr[data-job=\"{job_id}\"]')")
            browser.evaluate(f"document.querySelector('{link}').click(); true")
            _wait_js(browser, f"location.pathname.endsWith('/jobs/{rejected_id}') && window.brainlineViewer"
                              " && (brainlineViewer.ready || brainlineViewer.error)", 60, "the second job's viewer")
            assert browser.evaluate("brainlineViewer.error") is None, browser.evaluate("brainlineViewer.error")
            t_reject = time.monotonic()
            browser.evaluate("document.getElementById('decision-reject').click();"
                             "document.getElementById('score').value = '2';"
                             f"document.getElementById('comment').value = {json.dumps(REASON)};"
                             "document.getElementById('review-submit').click(); true")
            outcome = _wait_js(browser, "(() => { const ok = document.getElementById('review-done');"
                                        " const bad = document.getElementById('review-error');"
                                        " return ok ? ok.innerText : (bad ? 'ERROR ' + bad.innerText : ''); })()",
                               120, "the rejection's outcome")
            _wait_js(browser, "window.brainlineViewer && brainlineViewer.ready", 30, "the viewer after rejecting")
            browser.screenshot(tmp_path / "review_rejected.png")
            assert outcome.startswith("You rejected this result"), outcome
            audit = browser.evaluate("document.getElementById('audit').innerText")
            assert "review_reject" in audit and "retracted" in audit, audit
            reviews = browser.evaluate("document.getElementById('reviews').innerText")
            assert "Dr Ada Rad" in reviews and "rejected" in reviews and REASON in reviews, reviews
            assert browser.evaluate("!!document.getElementById('review-closed')"
                                    " && !document.getElementById('review-form')")
        console = "\n".join(browser.console)
        assert "EXCEPTION" not in console, console[-2000:]
    finally:
        browser.close()
        for png in tmp_path.glob("review_*.png"):
            _save(png)
    if HAVE_REVIEW:
        # in Orthanc: the rejection note, the retracted instances flagged, the rejection PDF
        after = _wait_outbox(svc, rejected_id, {"kos", "rejected_pdf"}, timeout=60)
        figures["reject_s"] = round(time.monotonic() - t_reject, 1)  # from the click to all sent and marked
        new_rows = [r for r in after if r["kind"] in ("kos", "rejected_pdf")]
        assert {r["state"] for r in new_rows} == {"sent"}, new_rows  # DICOM destination and the marker
        assert sorted(r["destination"].startswith("orthanc-rest:") for r in new_rows if r["kind"] == "kos") == [
            False, True]
        [kos_uid] = {r["sop_instance_uid"] for r in new_rows if r["kind"] == "kos"}
        [pdf_uid] = {r["sop_instance_uid"] for r in new_rows if r["kind"] == "rejected_pdf"}
        found = httpx.post(pacs.http_url + "/tools/find", json={"Level": "Instance", "Query": {
            "Modality": "KO", "StudyInstanceUID": second.study_uid}}, timeout=30).json()
        assert [pacs.get(f"/instances/{i}").json()["MainDicomTags"]["SOPInstanceUID"] for i in found] == [kos_uid]
        note = _instance(pacs, kos_uid)
        title = note.ConceptNameCodeSequence[0]
        assert (note.SOPClassUID, note.Modality, note.StudyInstanceUID) == (KOS_CLASS, "KO", second.study_uid)
        assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
            "113001", "DCM", "Rejected for Quality Reasons")
        assert note.PatientID == PHI["patient_id"]  # re-identified on the way out
        assert retracted_instances(note) == in_pacs  # exactly the job's delivered objects, per series
        texts = [str(getattr(i, "TextValue", "")) for i in note.ContentSequence]
        assert any(REASON in t for t in texts), texts
        for uid in delivered:
            mark = _mark(pacs, uid)
            assert mark.status_code == 200 and mark.text.startswith("113001 Rejected for Quality Reasons"), (
                uid, mark.status_code, mark.text)
            assert kos_uid in mark.text
        assert _mark(pacs, kos_uid).status_code == 404
        for uids in _study_series(pacs, small_study.study_uid).values():  # the accepted study: untouched
            assert all(_mark(pacs, u).status_code == 404 for u in uids)
        pdf = _instance(pacs, pdf_uid)
        assert pdf.StudyInstanceUID == second.study_uid and pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
        pdf_path = tmp_path / "rejected.pdf"
        pdf_path.write_bytes(bytes(pdf.EncapsulatedDocument)[:int(pdf.EncapsulatedDocumentLength)])
        text = " ".join(subprocess.run(["pdftotext", "-layout", str(pdf_path), "-"], capture_output=True,
                                       text=True, timeout=60).stdout.split())
        assert "Segmentation REJECTED by Dr Ada Rad" in text and REASON in text and "2/5" in text, text
        assert "Volume (mL)" not in text, text
    # pseudonymised pixels only in the workspace cache; no identity in the log
    cache = svc.workspace(job_id) / "review"
    assert (cache / "meta.json").exists()
    assert not find_phi((cache / "meta.json").read_bytes(), PHI_VALUES)
    assert scan([svc.home / "logs", svc.stdout_path]) == []
    figures["job_s"] = round(t_job, 1)
    figures["total_s"] = round(time.monotonic() - t_start, 1)
    print(f"\nreview UI: job {job_id} processed in {figures['job_s']} s; page load {figures['load_first_ms']:.0f} ms "
          f"(first, arrays built), {figures['load_ms']:.0f} ms (cached); scrolling {figures['fps']} frames/s "
          f"({figures['scroll']['steps']} wheel steps over {figures['scroll']['n']} slices in "
          f"{figures['scroll']['ms']:.0f} ms); rejected job {rejected_id}: note, PDF and "
          f"marks in Orthanc {figures.get('reject_s', '-')} s after the click; test {figures['total_s']} s")
    assert figures["load_ms"] <= 2000, figures
    assert figures["fps"] >= 10, figures
