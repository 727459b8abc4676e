"""Issue 12, part 5: retention (BRAINLINE_RETENTION_DAYS, `brainline purge`,
the service's daily purge, vault retention, bytes held).

Real SQLite job store (migrated with Alembic), real vault, real folders in a
temporary BRAINLINE_HOME; job ages are set in the database (finished_at) and
on the folders (mtime)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from datetime import timedelta

import pytest
from prometheus_client import generate_latest

from brainline.service.db import Job, OutboxItem, VaultEntry, make_engine, make_sessionmaker, migrate, utcnow
from brainline.service.gateway.retention import (
    LOG_NAME,
    RetentionConfig,
    RetentionScheduler,
    StorageUsage,
    execute_plan,
    plan_purge,
    purge,
    purged_jobs,
    register_hold_check,
    run_purge_cli,
    tree_size,
    unregister_hold_check,
)
from brainline.service.gateway.vault import Vault
from brainline.service.jobs.store import JobStore
from brainline.service.metrics import Metrics
from brainline.service.settings import load_settings

DAY = 86400
KEY = "test-vault-key-0123456789abcdef"
R180 = RetentionConfig(retention_days=180)


@pytest.fixture
def env(tmp_path):
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path / "home"), "BRAINLINE_VAULT_KEY": KEY,
                              "BRAINLINE_MIN_FREE_MB": "10"})
    settings.home.mkdir(parents=True)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    yield settings, sessions, JobStore(sessions)
    engine.dispose()


def _write(folder, names_sizes: dict[str, int], age_days: float) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.time() - age_days * DAY
    for name, size in names_sizes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        os.utime(path, (stamp, stamp))
    for sub in sorted({p for p in folder.rglob("*") if p.is_dir()} | {folder}, reverse=True):
        os.utime(sub, (stamp, stamp))
    return sum(names_sizes.values())


def make_job(env, study_key: str, state: str = "done", age_days: float = 200, outbox: tuple = ("sent",),
             instances: int = 3, patient: str | None = None, spool: bool = True) -> tuple[int, dict]:
    """A job with its spool study (``instances`` x 1000 bytes), workspace
    (5000 + 7000 bytes) and outbox folder (one 2000-byte file per row),
    finished (or created) ``age_days`` ago; returns (job id, bytes per area)."""
    settings, sessions, store = env
    job_id = store.create(study_key, instances, source="spool")
    when = utcnow() - timedelta(days=age_days)
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        job.state, job.created_at, job.pseudo_patient_id = state, when, patient
        job.finished_at = when if state in ("done", "failed", "needs_input", "rejected", "superseded") else None
        for k, st in enumerate(outbox):
            s.add(OutboxItem(job_id=job_id, destination="PACS@127.0.0.1:9", kind=f"obj{k}",
                             path=str(settings.outbox_dir / f"job-{job_id:06d}" / f"{k}.dcm"),
                             sop_class_uid="1.2.3", sop_instance_uid=f"1.2.3.{job_id}.{k}", state=st))
    sizes = {"workspace": _write(settings.workspace_dir / f"job-{job_id:06d}",
                                 {"dicom/s1/a.dcm": 5000, "summary.json": 7000}, age_days),
             "outbox": _write(settings.outbox_dir / f"job-{job_id:06d}",
                              {f"{k}.dcm": 2000 for k in range(len(outbox))}, age_days)}
    if spool:
        sizes["spool"] = _write(settings.spool_dir / study_key,
                                {f"1.2.{i}.dcm": 1000 for i in range(instances)}, age_days)
    return job_id, sizes


def areas_of(plan) -> dict[tuple[str, str], object]:
    return {(i.area, i.path.name if i.path else "-"): i for i in plan.items}


def test_old_finished_delivered_job_is_purged_recent_one_is_not(env):
    settings, sessions, _store = env
    old, old_sizes = make_job(env, "a" * 32, outbox=("sent", "sent", "cancelled"))
    failed, failed_sizes = make_job(env, "b" * 32, state="failed", outbox=())  # nothing to deliver
    recent, _ = make_job(env, "c" * 32, age_days=20)
    conflicts = _write(settings.spool_dir / ".conflicts" / ("a" * 32), {"1.2.9.1.dcm": 1000}, 200)
    with sessions.begin() as s:  # the kept earlier version counts as a version of study a
        s.get(Job, old).instance_count = 4
    _write(settings.spool_dir.with_name("spool.incoming"), {"tmpabc.dcm": 3000}, 200)
    _write(settings.spool_dir.with_name("spool.incoming"), {"tmpnew.dcm": 100}, 0)  # receiving now

    plan = plan_purge(settings, sessions, R180)
    items = areas_of(plan)
    assert set(items) == {("workspace", f"job-{old:06d}"), ("outbox", f"job-{old:06d}"), ("spool", "a" * 32),
                          ("conflicts", "a" * 32), ("workspace", f"job-{failed:06d}"),
                          ("outbox", f"job-{failed:06d}"), ("spool", "b" * 32), ("incoming", "tmpabc.dcm")}
    ws = items[("workspace", f"job-{old:06d}")]
    assert (ws.bytes, ws.files) == (12000, 2) and ws.job_ids == (old,)
    assert ws.reason == (f"job {old} done 200 days ago (more than 180), all results delivered "
                         "(2 outbox rows sent)")
    assert items[("spool", "a" * 32)].bytes == old_sizes["spool"] == 3000
    assert items[("spool", "b" * 32)].reason == (f"study {'b' * 32}: job {failed} finished, nothing waiting "
                                                 "for delivery; the last 200 days ago")
    assert plan.bytes == 12000 + 6000 + 3000 + 1000 + 12000 + 0 + 3000 + 3000 == 40000

    result = execute_plan(plan, settings, sessions)
    assert (result.items, result.bytes, result.errors, result.skipped) == (8, 40000, [], [])
    for job_id in (old, failed):
        assert not (settings.workspace_dir / f"job-{job_id:06d}").exists()
        assert not (settings.outbox_dir / f"job-{job_id:06d}").exists()
    assert not (settings.spool_dir / ("a" * 32)).exists()
    assert not (settings.spool_dir / ".conflicts" / ("a" * 32)).exists()
    assert (settings.workspace_dir / f"job-{recent:06d}").is_dir() and (settings.spool_dir / ("c" * 32)).is_dir()
    assert (settings.spool_dir.with_name("spool.incoming") / "tmpnew.dcm").exists()
    assert not list(settings.workspace_dir.glob(".purging-*"))
    with sessions() as s:  # history stays
        assert s.get(Job, old).state == "done" and s.query(OutboxItem).filter_by(job_id=old).count() == 3
    assert set(purged_jobs(settings.home)) == {old, failed}
    lines = [json.loads(x) for x in (settings.home / LOG_NAME).read_text().splitlines()]
    assert lines[-1]["run"] == "purge" and lines[-1]["bytes"] == 40000
    assert oct((settings.home / LOG_NAME).stat().st_mode & 0o777) == "0o600"
    assert plan_purge(settings, sessions, R180).items == []  # nothing left: idempotent
    assert conflicts == 1000 and failed_sizes["workspace"] == 12000


def test_undelivered_unfinished_and_held_jobs_are_kept(env):
    settings, sessions, _store = env
    pending, _ = make_job(env, "d" * 32, outbox=("sent", "pending", "failed"))
    running, _ = make_job(env, "e" * 32, state="running", outbox=())
    review, _ = make_job(env, "f" * 32, state="awaiting_review", outbox=())  # a state not final
    held, _ = make_job(env, "0" * 32, outbox=("sent",))
    never, _ = make_job(env, "1" * 32, outbox=())  # done, a deliver stage, nothing queued
    # a study with a purgeable job and a newer one still pending: the spool study stays
    shared_old, _ = make_job(env, "2" * 32, outbox=("sent",))
    shared_new, _ = make_job(env, "2" * 32, outbox=("pending",), spool=False)

    def review_hold(session, job_ids):
        return {held: f"job {held} is waiting for review"} if held in job_ids else {}

    register_hold_check(review_hold)
    try:
        plan = plan_purge(settings, sessions, R180)
    finally:
        unregister_hold_check(review_hold)
    assert set(areas_of(plan)) == {("workspace", f"job-{shared_old:06d}"), ("outbox", f"job-{shared_old:06d}")}
    kept = {k.job_ids: (k.what, k.reason) for k in plan.kept}
    assert kept[(pending,)] == (f"job {pending} (workspace folder, outbox folder, spool study {'d' * 32})",
                                f"2 result objects of job {pending} not delivered (1 failed, 1 pending)")
    assert kept[(running,)][1] == f"job {running} is running (not finished)"
    assert kept[(review,)][1] == f"job {review} is awaiting_review (not finished)"
    assert kept[(held,)][1] == f"job {held} is waiting for review"
    assert kept[(never,)][1] == f"the results of job {never} were never delivered (no destination was configured)"
    assert kept[(shared_new,)] == (f"job {shared_new} (workspace folder, outbox folder, spool study {'2' * 32})",
                                   f"1 result object of job {shared_new} not delivered (1 pending)")
    assert len(plan.kept) == 6
    result = execute_plan(plan, settings, sessions)
    assert result.items == 2
    for job_id in (pending, running, review, held, never, shared_new):
        assert (settings.outbox_dir / f"job-{job_id:06d}").is_dir()
    for key in "def012":
        assert (settings.spool_dir / (key * 32)).is_dir()


def test_job_retried_after_the_plan_is_skipped(env):
    settings, sessions, store = env
    job_id, _ = make_job(env, "3" * 32, state="failed", outbox=())
    plan = plan_purge(settings, sessions, R180)
    assert len(plan.items) == 3
    store.reset_for_retry(job_id)  # queued again before the deletion
    result = execute_plan(plan, settings, sessions)
    assert result.items == 0 and len(result.skipped) == 3
    assert result.skipped[0] == f"workspace workspaces/job-{job_id:06d}: job {job_id} is queued (not finished)"
    assert (settings.workspace_dir / f"job-{job_id:06d}").is_dir() and (settings.spool_dir / ("3" * 32)).is_dir()


def test_retention_zero_purges_nothing(env):
    settings, sessions, _store = env
    make_job(env, "4" * 32, age_days=5000)
    assert RetentionConfig.from_settings(settings) == RetentionConfig(0, 0, 24.0)  # the default
    plan, result = purge(settings, sessions)
    assert plan.items == [] and plan.notes == ["retention is off: nothing is purged"]
    assert result.items == 0 and (settings.spool_dir / ("4" * 32)).is_dir()
    assert not (settings.home / LOG_NAME).exists()


def test_settings_keys_from_the_environment(tmp_path):
    """Needs the retention keys in config/service.yaml (see the report)."""
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path), "BRAINLINE_RETENTION_DAYS": "180",
                              "BRAINLINE_VAULT_RETENTION_DAYS": "3650",
                              "BRAINLINE_RETENTION_INTERVAL_HOURS": "12"})
    assert RetentionConfig.from_settings(settings) == RetentionConfig(180, 3650, 12.0)
    extra = dataclasses.replace(settings, extra={"retention_days": -1})
    if not hasattr(settings, "retention_days"):
        with pytest.raises(ValueError, match="BRAINLINE_RETENTION_DAYS must be 0"):
            RetentionConfig.from_settings(extra)


def test_dry_run_lists_the_plan_and_deletes_nothing_then_purge_deletes(env):
    settings, sessions, _store = env
    job_id, sizes = make_job(env, "5" * 32, outbox=("sent",))
    out = io.StringIO()
    assert run_purge_cli(settings, dry_run=True, days=180, out=out) == 0
    text = out.getvalue()
    assert "to purge: 3 items, 17.0 kB in 6 files" in text  # 12000 + 2000 + 3000 bytes
    assert f"workspace  workspaces/job-{job_id:06d}" in text and "12.0 kB, 2 files" in text
    assert f"spool      spool/{'5' * 32}" in text and "3.0 kB, 3 files" in text
    assert text.rstrip().endswith("dry run: nothing was deleted")
    assert (settings.workspace_dir / f"job-{job_id:06d}").is_dir() and not (settings.home / LOG_NAME).exists()
    out = io.StringIO()
    assert run_purge_cli(settings, dry_run=False, days=180, as_json=True, out=out) == 0
    data = json.loads(out.getvalue())
    assert data["result"]["bytes"] == sum(sizes.values()) == 17000 and data["dry_run"] is False
    assert not (settings.workspace_dir / f"job-{job_id:06d}").exists()
    assert "PID" not in out.getvalue()


def test_metrics_report_bytes_held_per_area(env):
    settings, sessions, _store = env
    job_id, sizes = make_job(env, "6" * 32, outbox=("sent", "sent"))
    ws = settings.workspace_dir / f"job-{job_id:06d}"
    os.link(ws / "summary.json", ws / "summary-link.json")  # a hard link counts once
    metrics = Metrics()
    RetentionScheduler(settings, sessions, metrics, config=R180)  # registers the storage gauges
    text = generate_latest(metrics.registry).decode()
    assert f'brainline_storage_bytes{{area="spool"}} {float(sizes["spool"])}' in text
    assert f'brainline_storage_bytes{{area="workspaces"}} {float(sizes["workspace"])}' in text
    assert f'brainline_storage_bytes{{area="outbox"}} {float(sizes["outbox"])}' in text
    assert 'brainline_storage_files{area="workspaces"} 3.0' in text
    usage = StorageUsage(settings, max_age_s=3600)
    first = usage.measure()
    (ws / "more.bin").write_bytes(b"1" * 500)
    assert usage.measure() == first  # cached
    assert usage.measure(force=True)["workspaces"] == (sizes["workspace"] + 500, 4)
    usage.max_age_s = 0  # stale: answered at once from the last walk, a new walk runs behind
    (ws / "more2.bin").write_bytes(b"2" * 700)
    assert usage.measure()["workspaces"] == (sizes["workspace"] + 500, 4)
    deadline = time.monotonic() + 5
    while usage.measure()["workspaces"] != (sizes["workspace"] + 1200, 5) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert usage.measure()["workspaces"] == (sizes["workspace"] + 1200, 5)
    assert tree_size(settings.home / "missing") == (0, 0)


def test_scheduler_runs_a_purge_and_stops(env):
    settings, sessions, _store = env
    job_id, sizes = make_job(env, "7" * 32, outbox=("sent",))
    metrics = Metrics()
    scheduler = RetentionScheduler(settings, sessions, metrics, config=R180, initial_delay_s=0.05,
                                   interval_s=0.2, usage_max_age_s=0)
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while scheduler.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.runs >= 2 and scheduler.alive()
    finally:
        t0 = time.monotonic()
        scheduler.stop()
        assert time.monotonic() - t0 < 5 and not scheduler.alive()
    assert not (settings.workspace_dir / f"job-{job_id:06d}").exists()
    text = generate_latest(metrics.registry).decode()
    assert f'brainline_retention_freed_bytes_total{{area="workspace"}} {float(sizes["workspace"])}' in text
    assert 'brainline_retention_purged_files_total{area="spool"} 3.0' in text
    assert 'brainline_retention_runs_total{outcome="ok"}' in text
    assert 'brainline_storage_bytes{area="workspaces"} 0.0' in text
    off = RetentionScheduler(settings, sessions, None, config=RetentionConfig())
    off.start()
    assert not off.alive()
    off.stop()


def test_vault_records_go_when_every_job_of_the_patient_is_past_vault_retention(env):
    settings, sessions, _store = env
    vault = Vault(KEY, sessions)
    assert vault.verify_key() == "recorded"  # the key check row: never purged
    vault.put("patient", "BL-OLD", {"PatientID": "PID-1"})
    vault.put("study", "2.25.1", {"StudyInstanceUID": "1.1", "pseudo_patient_id": "BL-OLD"})
    vault.put("study", "2.25.2", {"StudyInstanceUID": "1.2", "pseudo_patient_id": "BL-OLD"})  # a PACS prior
    vault.put("patient", "BL-NEW", {"PatientID": "PID-2"})
    vault.put("study", "2.25.3", {"StudyInstanceUID": "1.3", "pseudo_patient_id": "BL-NEW"})
    vault.put("study", "2.25.4", {"StudyInstanceUID": "1.4", "pseudo_patient_id": "BL-NEW"})
    make_job(env, "8" * 32, age_days=400, patient="BL-OLD")
    make_job(env, "9" * 32, age_days=400, patient="BL-NEW")
    make_job(env, "a" * 31 + "b", age_days=30, patient="BL-NEW")  # came back last month
    with pytest.raises(ValueError, match="must not go before the data"):
        RetentionConfig.from_settings(settings, retention_days=400, vault_retention_days=365)
    config = RetentionConfig.from_settings(settings, retention_days=180, vault_retention_days=365)
    plan = plan_purge(settings, sessions, config, vault=vault)
    assert [(i.area, len(i.vault_ids)) for i in plan.items if i.area == "vault"] == [("vault", 3)]
    assert len(plan.items) == 2 * 3 + 1  # workspace, outbox, spool of the two old jobs; the vault rows
    vault_item = next(i for i in plan.items if i.area == "vault")
    assert vault_item.reason == ("patient of job 1: last job finished 400 days ago (more than 365), "
                                    "all delivered; 2 study records and the patient record")
    assert plan_purge(settings, sessions, config).notes == [
        "vault records: not checked (the vault key is not available here)"]
    result = execute_plan(plan, settings, sessions)
    assert result.vault_rows == 3
    assert vault.get("patient", "BL-OLD") is None and vault.get("study", "2.25.2") is None
    assert vault.get("study", "2.25.3")["StudyInstanceUID"] == "1.3" and vault.get("patient", "BL-NEW")
    assert not (settings.spool_dir / ("8" * 32)).exists() and not (settings.spool_dir / ("9" * 32)).exists()
    assert (settings.spool_dir / ("a" * 31 + "b")).is_dir()  # 30 days old
    with sessions() as s:  # BL-NEW's three rows and the key check row
        assert s.query(VaultEntry).count() == 4
