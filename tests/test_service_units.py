"""Unit tests of the service parts that need no peer: settings, vault,
spool, completion monitor, job runner resume."""

from __future__ import annotations

import time

import pytest

from brainline.service.db import Job, State, make_engine, make_sessionmaker, migrate
from brainline.service.gateway.completion import CompletionMonitor
from brainline.service.gateway.spool import InvalidInstance, OutOfSpace, Spool
from brainline.service.gateway.vault import Vault, VaultError, resolve_vault_key
from brainline.service.jobs.store import JobConflict, JobStore
from brainline.service.metrics import Metrics
from brainline.service.settings import SettingsError, load_settings


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    return make_sessionmaker(make_engine(url))


def test_settings_defaults_and_env_override(tmp_path):
    s = load_settings({})
    assert (s.dicom_port, s.ae_title, s.http_port, s.stable_seconds) == (11112, "BRAINLINE", 8080, 60)
    assert s.allowed_aes == ()
    env = {"BRAINLINE_HOME": str(tmp_path), "BRAINLINE_DICOM_PORT": "104",
           "BRAINLINE_ALLOWED_AES": "A, B ,", "BRAINLINE_STABLE_SECONDS": "2.5",
           "BRAINLINE_DEV_MODE": "yes"}
    s = load_settings(env)
    assert s.dicom_port == 104 and s.allowed_aes == ("A", "B") and s.stable_seconds == 2.5
    assert s.dev_mode is True
    assert s.database_url == f"sqlite:///{tmp_path / 'brainline.db'}"
    with pytest.raises(SettingsError, match="BRAINLINE_DICOM_PORT"):
        load_settings({"BRAINLINE_DICOM_PORT": "eleven"})


def test_vault_is_deterministic_and_encrypted(sessions, tmp_path):
    vault = Vault("a-very-secret-vault-key", sessions)
    p1, p2 = vault.patient("PID-4711-XYZ"), vault.patient("PID-4711-XYZ")
    assert p1 == p2 and p1.pseudo_id.startswith("BL-") and -3650 <= p1.date_shift_days <= -365
    assert vault.patient("OTHER") != p1
    uid = vault.uid("1.2.3.4")
    assert uid == vault.uid("1.2.3.4") and uid.startswith("2.25.") and len(uid) <= 64
    vault.put("patient", p1.pseudo_id, {"PatientName": "DOE^JANE"})
    assert vault.get("patient", p1.pseudo_id) == {"PatientName": "DOE^JANE"}
    assert b"DOE^JANE" not in (tmp_path / "db.sqlite").read_bytes()
    other = Vault("another-secret-vault-key", sessions)
    assert other.get("patient", p1.pseudo_id) is None  # lookup is keyed too
    assert other.patient("PID-4711-XYZ") != p1


def test_vault_key_resolution(tmp_path):
    with pytest.raises(VaultError, match="BRAINLINE_VAULT_KEY"):
        resolve_vault_key("", dev_mode=False, home=tmp_path)
    key, generated = resolve_vault_key("", dev_mode=True, home=tmp_path)
    assert generated and len(key) >= 32
    assert resolve_vault_key("", dev_mode=True, home=tmp_path) == (key, True)
    assert oct((tmp_path / "vault.key").stat().st_mode)[-3:] == "600"


def test_spool_atomic_duplicates_and_space(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    out = spool.store("k1", "1.2.3", b"DICM-data")
    assert out.path.read_bytes() == b"DICM-data" and not out.duplicate
    assert spool.store("k1", "1.2.3", b"DICM-data").duplicate
    assert not spool.store("k1", "1.2.3", b"DICM-data-v2").duplicate  # corrected resend replaces
    assert spool.count("k1") == 1
    with pytest.raises(InvalidInstance):
        spool.store("k1", "../../etc/passwd", b"x")
    full = Spool(tmp_path / "spool", min_free_mb=10**12)
    with pytest.raises(OutOfSpace):
        full.store("k1", "1.2.4", b"x")
    assert sorted(p.name for p in (tmp_path / "spool" / "k1").iterdir()) == ["1.2.3.dcm"]


def test_completion_monitor_quiet_period_and_reopen(tmp_path, sessions):
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    store = JobStore(sessions)
    submitted = []
    mon = CompletionMonitor(spool, store, submitted.append, stable_seconds=60, metrics=Metrics())
    spool.store("study", "1.1", b"a")
    spool.store("study", "1.2", b"b")
    assert mon.check_once() == []  # still inside the quiet period
    later = time.time_ns() + 61 * 10**9
    [job_id] = mon.check_once(later)
    assert submitted == [job_id] and store.get(job_id).instance_count == 2
    assert mon.check_once(later) == []
    spool.store("study", "1.2", b"b")  # duplicate: folder untouched
    assert mon.check_once(time.time_ns() + 122 * 10**9) == []
    spool.store("study", "1.3", b"c")  # late instance re-opens the study
    [second] = mon.check_once(time.time_ns() + 122 * 10**9)
    assert store.get(second).instance_count == 3
    # A fresh monitor (restart) does not duplicate jobs already created.
    fresh = CompletionMonitor(spool, store, submitted.append, stable_seconds=60, metrics=Metrics())
    fresh._job_counts = store.latest_counts()
    assert fresh.check_once(time.time_ns() + 200 * 10**9) == []


def test_job_store_recover_and_retry_rules(sessions):
    store = JobStore(sessions)
    job_id = store.create("k", 10, source="spool")
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        job.state = State.RUNNING.value
        job.stages[0].state = State.DONE.value
        job.stages[1].state = State.RUNNING.value
    assert store.recover() == [job_id]
    job = store.get(job_id)
    assert job.state == "queued"
    assert [s.state for s in job.stages] == ["done"] + ["queued"] * (len(job.stages) - 1)
    with pytest.raises(JobConflict):
        store.reset_for_retry(job_id)
    with sessions.begin() as s:
        s.get(Job, job_id).state = State.FAILED.value
    store.reset_for_retry(job_id)
    assert store.get(job_id).state == "queued"


def test_completion_monitor_treats_a_purged_then_resent_study_as_new(tmp_path, sessions):
    """Retention deletes a study's spool folder; the same study sent again with
    the same number of instances must become a new job (at run time and after
    a restart), not be taken for the study already processed."""
    import shutil

    spool = Spool(tmp_path / "spool", min_free_mb=0)
    store = JobStore(sessions)
    submitted = []
    mon = CompletionMonitor(spool, store, submitted.append, stable_seconds=60, metrics=Metrics())
    spool.store("study", "1.1", b"a")
    [first] = mon.check_once(time.time_ns() + 61 * 10**9)
    shutil.rmtree(spool.study_dir("study"))  # what a retention purge does
    assert mon.check_once(time.time_ns() + 62 * 10**9) == []
    spool.store("study", "1.1", b"a")  # the scanner sends it again
    [second] = mon.check_once(time.time_ns() + 130 * 10**9)
    assert second != first and store.get(second).instance_count == 1
    # After a restart: the purge log names the newest job whose spool data went.
    shutil.rmtree(spool.study_dir("study"))
    spool.store("study", "1.1", b"a")
    unaware = CompletionMonitor(spool, store, submitted.append, stable_seconds=0, metrics=Metrics())
    unaware._job_counts = store.latest_counts()
    assert unaware.check_once(time.time_ns() + 10**9) == []  # without the purge record: same count, no job
    aware = CompletionMonitor(spool, store, submitted.append, stable_seconds=0, metrics=Metrics(),
                              purged_jobs=lambda: {second})
    aware._job_counts = store.latest_counts(exclude_jobs=aware._purged_jobs())
    [third] = aware.check_once(time.time_ns() + 10**9)
    assert third not in (first, second)
