"""Issue 8, part 1: a re-sent study supersedes the earlier job instead of
adding results.

When a study gets a new job (re-sent, or re-opened by new instances), its
earlier jobs turn ``superseded`` ("superseded by job N ..."): one still
queued or running stops before its next stage and never delivers, its outbox
rows not yet sent are cancelled and never retried, and it cannot be retried.
A new job whose predecessor already delivered sends new objects (new UIDs)
and records which earlier objects they replace.

Real service parts (SQLite job store, vault, spool, outbox, runner) and, in
the last test, a real ``brainline serve`` delivering to a real Orthanc."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from brainline.service.context import ServiceContext
from brainline.service.db import Job, OutboxItem
from brainline.service.jobs.errors import SUPERSEDED, Superseded, in_words
from brainline.service.jobs.store import JobConflict
from brainline.service.settings import load_settings
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_study
from tests.peers import storescu
from tests.test_pseudonymize_quarantine import spool_study


@pytest.fixture
def parts(tmp_path):
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path / "home"),
                              "BRAINLINE_VAULT_KEY": "test-vault-key-0123456789abcdef",
                              "BRAINLINE_MIN_FREE_MB": "10",
                              "BRAINLINE_DEST_DICOM": "PACS@127.0.0.1:9"})  # never started here
    ctx = ServiceContext.build(settings)
    yield ctx
    ctx.engine.dispose()


@pytest.fixture
def study(tmp_path):
    return write_study(tmp_path / "dicom", TCGA, slice_step=5, **PHI)


def test_new_job_supersedes_earlier_ones_of_the_same_study(parts):
    store = parts.store
    first = store.create("study-a", 93, source="spool")
    other = store.create("study-b", 10, source="spool")
    second = store.create("study-a", 124, source="spool")
    job = store.get(first)
    assert job.state == SUPERSEDED
    assert job.error == (f"superseded by job {second}: the study was received again (124 instances; this job "
                         "had 93) while it had not finished")
    assert store.get(other).state == "received" and store.get(second).state == "received"
    with pytest.raises(JobConflict, match=f"job {first} is superseded"):
        store.reset_for_retry(first)
    assert parts.runner.run(first) == SUPERSEDED
    assert store.get(first).stages[0].state == "queued"  # nothing ran
    assert store.superseded(second) is None
    third = store.create("study-a", 124, source="dicomweb")
    assert store.get(second).state == SUPERSEDED and f"superseded by job {third}" in store.get(second).error
    assert store.get(first).error.startswith(f"superseded by job {second}")  # superseded once only


def test_job_that_ended_without_results_keeps_its_state(parts):
    store = parts.store
    ended = store.create("study-c", 93, source="spool")
    with parts.sessions.begin() as s:
        row = s.get(Job, ended)
        row.state, row.error = "needs_input", "stage select_series: no FLAIR series found"
    newer = store.create("study-c", 124, source="spool")
    job = store.get(ended)
    assert job.state == "needs_input"
    assert job.error == (f"superseded by job {newer}: the study was received again (124 instances; this job had "
                         "93) while it had ended needs_input (earlier: stage select_series: no FLAIR series found)")
    with pytest.raises(JobConflict, match=f"superseded by job {newer} and cannot be retried; retry job {newer}"):
        store.reset_for_retry(ended)
    store.create("study-c", 125, source="spool")
    assert store.get(ended).error == job.error  # marked once


def test_pending_results_of_a_superseded_job_are_cancelled_never_sent(parts, study):
    store, outbox = parts.store, parts.outbox
    first = store.create("study-a", 124, source="spool")
    objects = [("seg", study.series["t1c"].paths[0]), ("sr", study.series["t1c"].paths[1])]
    assert outbox.enqueue(first, objects) == 2  # the PACS is down: they wait
    second = store.create("study-a", 125, source="spool")
    items = outbox.items()
    assert [i.state for i in items] == ["cancelled", "cancelled"]
    assert items[0].last_error == f"cancelled: job {first} was superseded by job {second}"
    assert "2 result objects not yet sent were cancelled" in store.get(first).error
    assert outbox.retry() == 0 and outbox.depth() == 0
    with parts.sessions.begin() as s:  # a row the PACS had refused before: not retried either
        s.get(OutboxItem, items[0].id).state = "rejected"
    assert outbox.retry() == 0 and outbox.depth() == 0
    with pytest.raises(Superseded, match=f"superseded by job {second}"):
        outbox.enqueue(first, [("pdf", study.series["t1c"].paths[2])])
    assert len(outbox.items()) == 2
    # the new job queues its own objects; nothing of the first one is left to send
    assert outbox.enqueue(second, [("seg", study.series["t1c"].paths[3])]) == 1
    assert outbox.cancel_earlier("study-a", second) == 0
    assert [i.job_id for i in outbox.items(["pending"])] == [second]
    assert outbox.sent_earlier("study-a", second) == []


def test_running_job_stops_when_superseded(parts, study):
    key = spool_study(parts, study)
    first = parts.store.create(key, 124, source="spool", pipeline="foundation")
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(parts.runner.run(first)))
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if parts.store.get(first).stages[0].state == "done":
            break
        time.sleep(0.02)
    second = parts.store.create(key, 124, source="spool", pipeline="foundation")
    worker.join(300)
    assert outcome == [SUPERSEDED]
    job = parts.store.get(first)
    assert job.state == SUPERSEDED and job.error.startswith(f"superseded by job {second}")
    assert any(s.state == "queued" for s in job.stages) or job.stages[-1].state == "done"
    # the new job runs normally
    assert parts.runner.run(second) == "done"


def test_errors_are_words_without_traceback_or_paths():
    from brainline.pipelines.conversion import ConversionError
    try:
        {}["x"]
    except KeyError as exc:
        assert in_words(exc, 7) == "internal error (KeyError; details in the service log, job 7)"
    text = in_words(ConversionError(
        "dcm2niix failed converting series 't2': Traceback (most recent call last):\n"
        '  File "/work/main/.venv/lib/python3.11/site-packages/x.py", line 3, in f\nValueError: bad'), 7)
    assert text == "dcm2niix failed converting series 't2': ValueError: bad"
    assert in_words(ConversionError("cannot read /opt/brainline/lib/python3.11/site-packages/a/b.dcm"), 1) == \
        "cannot read b.dcm"
    assert in_words(FileNotFoundError(2, "No such file or directory", "/home/x/y"), 3).startswith(
        "No such file or directory (FileNotFoundError")


@pytest.mark.integration
def test_resent_study_replaces_delivered_results(service_factory, orthanc, study, tmp_path):
    """The first push lost one T2 slice (T2 left out, results delivered); the
    scanner re-sends the study: one new job, the first superseded, new
    results that say which delivered ones they replace."""
    svc = service_factory(BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    late = study.series["t2"].paths[12]
    held = tmp_path / "held.dcm"
    late.rename(held)
    assert storescu(study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
    [first] = svc.wait_jobs(1, timeout=600)
    assert first["state"] == "done", first
    selection = next(s for s in first["stages"] if s["name"] == "select_series")
    assert "T2 series 4 'AX T2 FSE' is incomplete" in selection["result"]["inputs"]["note"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        items = svc.api("GET", "/api/v1/outbox").json()["items"]
        if items and all(i["state"] == "sent" for i in items):
            break
        time.sleep(0.5)
    first_items = {i["kind"]: i["sop_instance_uid"] for i in items}
    # the scanner re-sends the whole study, now complete
    held.rename(late)
    assert storescu(study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
    old, new = wait_jobs(svc, 2, timeout=600)
    assert old["state"] == "superseded"
    assert old["error"].startswith(f"superseded by job {new['id']}: the study was received again (124 "
                                   "instances; this job had 123) while its results were built")
    assert new["state"] == "done", new
    deliver = new["stages"][-1]["result"]
    assert {(r["kind"], r["sop_instance_uid"]) for r in deliver["replaces"] if r["kind"] in ("seg", "sr")} == {
        ("seg", first_items["seg"]), ("sr", first_items["sr"])}
    assert deliver["note"].startswith(f"these results replace those of job {old['id']} (")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        items = svc.api("GET", "/api/v1/outbox").json()["items"]
        if all(i["state"] == "sent" for i in items):
            break
        time.sleep(0.5)
    new_items = {i["kind"]: i["sop_instance_uid"] for i in items if i["job_id"] == new["id"]}
    assert new_items["seg"] != first_items["seg"]
    assert not [i for i in items if i["state"] == "cancelled"]
    assert orthanc_has(orthanc, new_items["seg"]) and orthanc_has(orthanc, first_items["seg"])


def wait_jobs(svc, n: int, timeout: float) -> list[dict]:
    """Like ServiceProcess.wait_jobs, with superseded counted as finished."""
    final = {"done", "failed", "needs_input", "rejected", SUPERSEDED}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = svc.jobs()
        if len(jobs) >= n and all(j["state"] in final for j in jobs):
            return [svc.job(j["id"]) for j in sorted(jobs, key=lambda j: j["id"])]
        time.sleep(0.3)
    raise AssertionError(f"jobs not finished in {timeout} s: {svc.jobs()}")


def orthanc_id(orthanc, sop_uid: str) -> str:
    found = httpx.post(orthanc.http_url + "/tools/lookup", content=sop_uid, timeout=30).json()
    return found[0]["ID"] if found else ""


def orthanc_has(orthanc, sop_uid: str) -> bool:
    return bool(orthanc_id(orthanc, sop_uid))
