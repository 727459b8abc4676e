"""Issue 8 parts 5a and 1a: a different instance with a known SOP Instance UID
keeps both versions and re-opens the study; after a restart the quiet period
starts again, whatever the age of a study folder already in the spool."""

from __future__ import annotations

import os
import time

import pytest

from brainline.service.db import make_engine, make_sessionmaker, migrate
from brainline.service.gateway.completion import CompletionMonitor
from brainline.service.gateway.spool import Spool
from brainline.service.jobs.store import JobStore
from brainline.service.metrics import Metrics
from tests.test_listener_hardening import QUIET, mr_instance, send, spool_files


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    return make_sessionmaker(make_engine(url))


def test_conflicting_version_is_kept_and_counted(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    first = spool.store("k1", "1.2.3", b"version-1")
    assert not first.duplicate and not first.conflict
    assert spool.store("k1", "1.2.3", b"version-1").duplicate
    second = spool.store("k1", "1.2.3", b"version-2")
    assert second.conflict and not second.duplicate
    assert second.path.read_bytes() == b"version-2"
    [kept] = list(spool.conflicts_dir("k1").iterdir())
    assert kept.read_bytes() == b"version-1" and kept.name.startswith("1.2.3.")
    assert (spool.count("k1"), spool.conflict_count("k1"), spool.versions("k1")) == (1, 1, 2)
    assert spool.instance_files("k1") == [second.path]        # only current versions are processed
    assert [k for k, _ in spool.studies()] == ["k1"]           # .conflicts is not a study
    # store_file: a received file is moved in, with the same rules.
    src = spool.incoming_dir / "rx.dcm"
    src.write_bytes(b"version-2")
    assert spool.store_file("k1", "1.2.3", src).duplicate and not src.exists()
    src.write_bytes(b"version-3")
    assert spool.store_file("k1", "1.2.3", src).conflict and not src.exists()
    assert spool.versions("k1") == 3


def test_conflict_reopens_study_also_after_restart(tmp_path, sessions):
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    store = JobStore(sessions)
    jobs = []
    mon = CompletionMonitor(spool, store, jobs.append, stable_seconds=60, metrics=Metrics())
    mon.start()
    try:
        spool.store("s", "1.1", b"a")
        spool.store("s", "1.2", b"b")
        [first] = mon.check_once(time.time_ns() + 61 * 10**9)
        spool.store("s", "1.2", b"b-corrected")                       # same UID, other content
        assert mon.check_once(time.time_ns() + 10**9) == []           # quiet period restarts
        [second] = mon.check_once(time.time_ns() + 122 * 10**9)
        assert store.get(second).instance_count == 3                  # 2 instances + 1 kept version
    finally:
        mon.stop()
    fresh = CompletionMonitor(spool, store, jobs.append, stable_seconds=60, metrics=Metrics())
    fresh._job_counts = store.latest_counts()
    assert fresh.check_once(time.time_ns() + 300 * 10**9) == []      # no duplicate job after restart
    assert jobs == [first, second]


def test_quiet_period_restarts_after_restart(tmp_path, sessions):
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    spool.store("partial", "1.1", b"a")
    hour_ago = time.time() - 3600
    os.utime(spool.study_dir("partial"), (hour_ago, hour_ago))        # folder far older than the quiet period
    store = JobStore(sessions)
    jobs = []
    mon = CompletionMonitor(spool, store, jobs.append, stable_seconds=60, metrics=Metrics())
    mon.start()
    try:
        started = time.time_ns()
        assert mon.check_once(started + 30 * 10**9) == []
        assert mon.metrics.studies_pending._value.get() == 1
        [job] = mon.check_once(started + 61 * 10**9)
        assert store.get(job).instance_count == 1
    finally:
        mon.stop()


def test_service_keeps_both_versions_and_answers_success(service_factory):
    svc = service_factory(**QUIET)
    original = mr_instance(seed=1)
    assert send(svc.dicom_port, [original]) == [0]
    corrected = mr_instance(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID, seed=2)
    assert send(svc.dicom_port, [corrected, corrected]) == [0, 0]   # the repeat is a plain duplicate
    [current] = [p for p in spool_files(svc) if ".conflicts" not in p.parts]
    [kept] = [p for p in spool_files(svc) if ".conflicts" in p.parts]
    import pydicom

    assert pydicom.dcmread(current).PixelData == corrected.PixelData
    assert pydicom.dcmread(kept).PixelData == original.PixelData
    assert svc.metric("brainline_instances_conflict_total") == 1
    assert svc.metric("brainline_instances_duplicate_total") == 1
    assert svc.metric("brainline_instances_received_total") == 2
    log = svc.output()
    assert "different content" in log and original.SOPInstanceUID not in log and "HOSTILE" not in log


def test_restart_waits_a_quiet_period_before_the_job(service_factory, tmp_path):
    svc = service_factory(BRAINLINE_STABLE_SECONDS="6")
    study = mr_instance().StudyInstanceUID
    assert send(svc.dicom_port, [mr_instance(study) for _ in range(3)]) == [0, 0, 0]
    svc.kill9()                                                     # crash inside the quiet period
    [folder] = [p for p in (svc.home / "spool").iterdir() if not p.name.startswith(".")]
    hour_ago = time.time() - 3600
    os.utime(folder, (hour_ago, hour_ago))
    svc.start()
    started = time.monotonic()
    while time.monotonic() - started < 4:
        assert svc.jobs() == [], "a job was created before the quiet period after the restart"
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    while not svc.jobs():
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert time.monotonic() - started >= 5
