"""Retention: purge the data of finished, delivered jobs after a set number of
days (``BRAINLINE_RETENTION_DAYS``; EASE keeps images at most 6 months = 180)
and, separately, the vault records that re-identify them
(``BRAINLINE_VAULT_RETENTION_DAYS``).

What is purged (a :class:`PurgePlan` first, then :func:`execute_plan`):

* ``workspace``: ``<workspaces>/job-NNNNNN`` (pseudonymized data) and
  ``outbox``: ``<home>/outbox/job-NNNNNN`` (re-identified results, PHI) of a
  job that is *purgeable*: its state is final (done, failed, needs_input,
  rejected, superseded), it finished at least ``retention_days`` ago, every
  outbox row of it is ``sent`` or ``cancelled``, a done job with a
  ``deliver`` stage queued at least one object, it does not await a
  radiologist's review (``review_state`` "pending") and has no outbox row
  ``held`` for review, and no hold check (:func:`register_hold_check`) holds
  it. Any other state (received, queued, running) holds the job: only the
  final states listed in ``db.FINAL_STATES`` are purgeable. A review needs
  the workspace (the verified SR and re-issued PDF are built from it) and
  the outbox folder (a rejection note is built from the delivered files).
* ``spool``: ``<home>/spool/<study_key>/`` (the received instances, PHI) when
  every job of the study is purgeable, the folder holds as many versions as
  the newest job was built from (nothing new arrived) and its modification
  time is older than the retention period; with it the study's
  ``spool/.conflicts/<study_key>/`` and ``spool/.quarantine/<study_key>/``.
  A study folder without any job is never purged (it was never processed).
* ``priors``: ``spool/.priors/job-N/`` left by an interrupted prior
  retrieval, ``incoming``: ``spool.incoming/`` files left by an interrupted
  reception, and ``workspace``/``outbox`` folders of jobs the database does
  not know: by age (modification time older than the retention period).
* ``vault`` (only with ``vault_retention_days`` > 0): per pseudonymous
  patient, when every job of the patient is purgeable by the vault period
  (finished at least ``vault_retention_days`` ago, delivered, not held), the
  patient record and every study record of that patient (its own studies
  and the priors retrieved from the PACS for it). Records of patients that no
  job refers to go when they were last written longer ago than the period.
  After that, results of those studies can no longer be re-identified: a
  late re-run, a correction or a review decision cannot be delivered into
  the patient's record; a new study of the patient gets the same pseudonym
  again (pseudonyms are keyed hashes), only the stored mapping is gone.
  Vault retention needs data retention and is not shorter (the records
  must not go before the data they re-identify).

Job rows, stage results, outbox rows and the audit stay in the database; each
purged item is appended to ``<home>/retention.log.jsonl`` (job ids, study
keys, areas, bytes; no patient data), which :func:`purged_jobs` reads.

Sizes are apparent file sizes in bytes (``st_size``), each inode counted once
per walk (hard links into ``.quarantine`` or between workspaces are counted
once), symbolic links are never followed. Times are naive UTC (like the
database); ages of folders and files are their modification times.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import func, select

from ..db import FINAL_STATES, Job, OutboxItem, OutboxState, ReviewState, Stage, State, VaultEntry, utcnow

log = logging.getLogger("brainline.retention")

#: Job states whose data may be purged; anything else (live) is held, and so is a job awaiting review.
PURGEABLE_JOB_STATES = frozenset(s.value for s in FINAL_STATES)
#: Outbox states that count as delivered (or never to be delivered).
DELIVERED_OUTBOX_STATES = frozenset({OutboxState.SENT.value, OutboxState.CANCELLED.value})
LIVE_JOB_STATES = frozenset({State.RECEIVED.value, State.QUEUED.value, State.RUNNING.value})
LOG_NAME = "retention.log.jsonl"
PURGING_PREFIX = ".purging-"
INCOMING_SUFFIX = ".incoming"   # spool.Spool.incoming_dir: <spool>.incoming next to the spool
CONFLICTS, QUARANTINE, PRIORS = ".conflicts", ".quarantine", ".priors"
DAY_S = 86400.0

#: A hold check answers, for the job ids it is given, ``{job_id: reason}``
#: for the jobs whose data must be kept (e.g. a review in progress).
HoldCheck = Callable[[object, list[int]], dict[int, str]]
_HOLD_CHECKS: list[HoldCheck] = []


def register_hold_check(fn: HoldCheck) -> HoldCheck:
    """Add a check that keeps jobs' data (and vault records): ``fn(session,
    job_ids) -> {job_id: reason in words}``. Usable as a decorator."""
    if fn not in _HOLD_CHECKS:
        _HOLD_CHECKS.append(fn)
    return fn


def unregister_hold_check(fn: HoldCheck) -> None:
    if fn in _HOLD_CHECKS:
        _HOLD_CHECKS.remove(fn)


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------
def _setting(settings, name: str, default):
    value = getattr(settings, name, None)
    if value is None:
        value = (getattr(settings, "extra", None) or {}).get(name)
    return default if value is None or value == "" else value


@dataclass(frozen=True)
class RetentionConfig:
    """``retention_days``: days after a job finished before its spool,
    workspace and outbox data go (0 = keep forever); ``vault_retention_days``:
    days before the vault records of a patient go (0 = keep forever);
    ``interval_hours``: hours between the service's purges."""

    retention_days: int = 0
    vault_retention_days: int = 0
    interval_hours: float = 24.0

    @classmethod
    def from_settings(cls, settings, **overrides) -> "RetentionConfig":
        values: dict[str, Any] = {"retention_days": int(_setting(settings, "retention_days", 0)),
                  "vault_retention_days": int(_setting(settings, "vault_retention_days", 0)),
                  "interval_hours": float(_setting(settings, "retention_interval_hours", 24.0))}
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if self.retention_days < 0:
            raise ValueError("BRAINLINE_RETENTION_DAYS must be 0 (keep forever) or more")
        if self.vault_retention_days < 0:
            raise ValueError("BRAINLINE_VAULT_RETENTION_DAYS must be 0 (keep forever) or more")
        if self.interval_hours <= 0:
            raise ValueError("BRAINLINE_RETENTION_INTERVAL_HOURS must be more than 0")
        if self.vault_retention_days and not 0 < self.retention_days <= self.vault_retention_days:
            raise ValueError("BRAINLINE_VAULT_RETENTION_DAYS needs BRAINLINE_RETENTION_DAYS set and not "
                             "longer: the vault records must not go before the data they re-identify")

    @property
    def enabled(self) -> bool:
        return self.retention_days > 0 or self.vault_retention_days > 0


# ---------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------
def tree_size(path: Path, seen: set | None = None) -> tuple[int, int]:
    """(bytes, files) under ``path`` (a file counts itself): apparent sizes,
    each inode once (``seen`` shares the inode set between calls), symbolic
    links counted as links, never followed. Missing paths count 0."""
    seen = set() if seen is None else seen
    total = files = 0
    try:
        st = os.lstat(path)
    except OSError:
        return 0, 0
    if not os.path.isdir(path) or os.path.islink(path):
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            return st.st_size, 1
        return 0, 1
    stack = [os.fspath(path)]
    while stack:
        folder = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                files += 1
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += st.st_size
    return total, files


def storage_areas(settings) -> dict[str, Path]:
    """The folders whose bytes the metrics report: spool (with .conflicts,
    .quarantine, .priors), incoming (receptions in progress), workspaces,
    outbox."""
    spool = settings.spool_dir
    return {"spool": spool, "incoming": spool.with_name(spool.name + INCOMING_SUFFIX),
            "workspaces": settings.workspace_dir, "outbox": settings.outbox_dir}


class StorageUsage:
    """Bytes and files held per area. The first :meth:`measure` walks the
    folders; later ones return the last figures and, when they are older
    than ``max_age_s`` seconds, start one walk in a background thread (a
    walk takes about 0.2 s per 10,000 files here, too long for a scrape of a
    full spool). ``measure(force=True)`` walks now. Thread-safe."""

    def __init__(self, settings, max_age_s: float = 300.0):
        self.areas = storage_areas(settings)
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._walking = threading.Lock()
        self._at = -1e18
        self._values: dict[str, tuple[int, int]] | None = None
        self.last_walk_s = 0.0

    def _walk(self) -> dict[str, tuple[int, int]]:
        with self._walking:
            t0 = time.monotonic()
            values = {name: tree_size(path) for name, path in self.areas.items()}
            with self._lock:
                self._values, self._at = values, time.monotonic()
                self.last_walk_s = self._at - t0
            return dict(values)

    def _walk_quietly(self) -> None:
        try:
            self._walk()
        except Exception:  # metrics must never break the service
            log.exception("measuring the bytes held failed")

    def measure(self, force: bool = False) -> dict[str, tuple[int, int]]:
        with self._lock:
            values, stale = self._values, time.monotonic() - self._at > self.max_age_s
        if force or values is None:
            return self._walk()
        if stale and not self._walking.locked():
            threading.Thread(target=self._walk_quietly, name="brainline-storage-usage", daemon=True).start()
        return dict(values)


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PurgeItem:
    """One thing to delete. ``area``: spool, conflicts, quarantine, priors,
    incoming, workspace, outbox or vault; ``path``: None for vault rows
    (``vault_ids``); ``reason`` in words, no patient data."""

    area: str
    path: Path | None
    bytes: int
    files: int
    reason: str
    job_ids: tuple[int, ...] = ()
    study_key: str | None = None
    vault_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class KeptItem:
    """Data older than the retention period that is kept, and why."""

    what: str
    reason: str
    job_ids: tuple[int, ...] = ()


@dataclass
class PurgePlan:
    config: RetentionConfig
    now: datetime
    items: list[PurgeItem] = field(default_factory=list)
    kept: list[KeptItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def files(self) -> int:
        return sum(i.files for i in self.items)

    def by_area(self) -> dict[str, tuple[int, int, int]]:
        """area -> (items, bytes, files)."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for i in self.items:
            row = out[i.area]
            row[0] += 1
            row[1] += i.bytes
            row[2] += i.files if i.area != "vault" else len(i.vault_ids)
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}

    def describe(self) -> list[str]:
        """The plan in words, one line per item (job ids and study keys only)."""
        c = self.config
        lines = [("data: purged when finished and delivered more than "
                  f"{c.retention_days} days ago (BRAINLINE_RETENTION_DAYS)") if c.retention_days else
                 "data: kept forever (BRAINLINE_RETENTION_DAYS=0)",
                 (f"vault records: purged {c.vault_retention_days} days after a patient's last job "
                  "(BRAINLINE_VAULT_RETENTION_DAYS)") if c.vault_retention_days else
                 "vault records: kept forever (BRAINLINE_VAULT_RETENTION_DAYS=0)"]
        lines.append(f"to purge: {len(self.items)} item{'s' if len(self.items) != 1 else ''}, "
                     f"{human_bytes(self.bytes)} in {self.files} files")
        for i in self.items:
            size = (f"{len(i.vault_ids)} row{'s' if len(i.vault_ids) != 1 else ''}" if i.area == "vault"
                    else f"{human_bytes(i.bytes)}, {i.files} file{'s' if i.files != 1 else ''}")
            lines.append(f"  {i.area:<10} {self._rel(i.path):<44} {size:>22}  {i.reason}")
        if self.kept:
            lines.append(f"kept although older than the retention period: {len(self.kept)}")
            lines += [f"  {k.what}: {k.reason}" for k in self.kept]
        lines += self.notes
        return lines

    @staticmethod
    def _rel(path: Path | None) -> str:
        if path is None:
            return "-"
        return f"{path.parent.name}/{path.name}"

    def as_dict(self) -> dict:
        return {"retention_days": self.config.retention_days,
                "vault_retention_days": self.config.vault_retention_days,
                "now": self.now.isoformat(timespec="seconds"),
                "bytes": self.bytes, "files": self.files,
                "items": [{"area": i.area, "path": None if i.path is None else str(i.path), "bytes": i.bytes,
                           "files": i.files, "reason": i.reason, "job_ids": list(i.job_ids),
                           "study_key": i.study_key, "vault_rows": len(i.vault_ids)} for i in self.items],
                "kept": [{"what": k.what, "reason": k.reason, "job_ids": list(k.job_ids)} for k in self.kept],
                "notes": list(self.notes)}


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


@dataclass
class _JobInfo:
    id: int
    study_key: str
    state: str
    instance_count: int
    pseudo_patient_id: str | None
    created_at: datetime
    finished_at: datetime | None
    has_deliver: bool = False
    review_state: str | None = None
    outbox: Counter = field(default_factory=Counter)
    hold: str | None = None          # why its data must stay, whatever its age

    @property
    def ended_at(self) -> datetime:
        return self.finished_at or self.created_at


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _hold_reason(job: _JobInfo, extra: dict[int, str]) -> str | None:
    if job.state not in PURGEABLE_JOB_STATES:
        return f"job {job.id} is {job.state} (not finished)"
    if job.id in extra:
        return extra[job.id]
    if job.review_state == ReviewState.PENDING.value:
        return (f"job {job.id} awaits a radiologist's review (accept or reject it; a site that does not review "
                "sets BRAINLINE_REVIEW_MODE=off)")
    held = job.outbox.get(OutboxState.HELD.value, 0)
    if held:
        return f"{_plural(held, 'result object')} of job {job.id} held until a radiologist's review"
    waiting = {s: n for s, n in job.outbox.items() if s not in DELIVERED_OUTBOX_STATES}
    if waiting:
        n = sum(waiting.values())
        states = ", ".join(f"{c} {s}" for s, c in sorted(waiting.items()))
        return f"{_plural(n, 'result object')} of job {job.id} not delivered ({states})"
    if job.state == State.DONE.value and job.has_deliver and not job.outbox:
        return f"the results of job {job.id} were never delivered (no destination was configured)"
    return None


def _load_jobs(session, job_ids: Iterable[int] | None = None) -> dict[int, _JobInfo]:
    q = select(Job.id, Job.study_key, Job.state, Job.instance_count, Job.pseudo_patient_id,
               Job.created_at, Job.finished_at, Job.review_state)
    if job_ids is not None:
        job_ids = list(job_ids)
        q = q.where(Job.id.in_(job_ids))
    jobs = {r.id: _JobInfo(r.id, r.study_key, r.state, r.instance_count or 0, r.pseudo_patient_id,
                           r.created_at, r.finished_at, review_state=r.review_state) for r in session.execute(q)}
    if not jobs:
        return jobs
    ids = list(jobs)
    stages = select(Stage.job_id).where(Stage.name == "deliver")
    rows = select(OutboxItem.job_id, OutboxItem.state, func.count()).group_by(OutboxItem.job_id, OutboxItem.state)
    if job_ids is not None:  # all jobs: no IN list (SQLite limits bound parameters)
        stages, rows = stages.where(Stage.job_id.in_(ids)), rows.where(OutboxItem.job_id.in_(ids))
    for (job_id,) in session.execute(stages):
        if job_id in jobs:
            jobs[job_id].has_deliver = True
    for job_id, state, n in session.execute(rows):
        if job_id in jobs:
            jobs[job_id].outbox[state] = n
    extra: dict[int, str] = {}
    for check in list(_HOLD_CHECKS):
        extra.update(check(session, ids) or {})
    for job in jobs.values():
        job.hold = _hold_reason(job, extra)
    return jobs


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(os.lstat(path).st_mtime, timezone.utc).replace(tzinfo=None)
    except OSError:
        return None


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def _job_id_of(name: str) -> int | None:
    if name.startswith("job-") and name[4:].isdigit():
        return int(name[4:])
    return None


def _count_dcm(folder: Path) -> int:
    return sum(1 for e in _scandir(folder) if e.name.endswith(".dcm"))


def _days(delta: timedelta) -> int:
    return int(delta.total_seconds() // DAY_S)


def plan_purge(settings, sessions, config: RetentionConfig | None = None, now: datetime | None = None,
               vault=None) -> PurgePlan:
    """What a purge would delete now (nothing is changed). ``now``: naive
    UTC; ``vault``: the service's Vault, needed only for vault retention."""
    config = config or RetentionConfig.from_settings(settings)
    now = now or utcnow()
    plan = PurgePlan(config=config, now=now)
    if not config.enabled:
        plan.notes.append("retention is off: nothing is purged")
        return plan
    with sessions() as session:
        jobs = _load_jobs(session)
    for root in (settings.spool_dir, settings.workspace_dir, settings.outbox_dir):
        for entry in _scandir(root):
            if entry.name.startswith(PURGING_PREFIX):
                size, files = tree_size(Path(entry.path))
                plan.items.append(PurgeItem("leftover", Path(entry.path), size, files,
                                            "left by an interrupted purge"))
    if config.retention_days:
        _plan_data(plan, settings, jobs, now - timedelta(days=config.retention_days))
    if config.vault_retention_days:
        if vault is None:
            plan.notes.append("vault records: not checked (the vault key is not available here)")
        else:
            _plan_vault(plan, sessions, vault, jobs, now - timedelta(days=config.vault_retention_days))
    return plan


def _plan_data(plan: PurgePlan, settings, jobs: dict[int, _JobInfo], cutoff: datetime) -> None:
    days = plan.config.retention_days
    now = plan.now
    purgeable = {j.id for j in jobs.values() if j.hold is None and j.ended_at <= cutoff}
    # a live job of the same patient may be reusing an earlier workspace as a prior right now
    busy_patients = {j.pseudo_patient_id for j in jobs.values()
                     if j.state in LIVE_JOB_STATES and j.pseudo_patient_id}
    by_study: dict[str, list[_JobInfo]] = defaultdict(list)
    for j in jobs.values():
        by_study[j.study_key].append(j)

    held: dict[int, list[str]] = defaultdict(list)   # job id -> what of it is kept
    holds: dict[int, str] = {}                       # job id -> why (its hold)

    def held_note(job: _JobInfo, what: str) -> None:
        if job.hold is not None and job.ended_at <= cutoff:
            held[job.id].append(what)
            holds[job.id] = job.hold

    # per job: workspace and outbox folder
    ws_root, ob_root = settings.workspace_dir, settings.outbox_dir
    for area, root in (("workspace", ws_root), ("outbox", ob_root)):
        for entry in sorted(_scandir(root), key=lambda e: e.name):
            job_id = _job_id_of(entry.name)
            if job_id is None:
                continue
            path = Path(entry.path)
            job = jobs.get(job_id)
            if job is None:
                mtime = _mtime(path)
                if mtime is not None and mtime <= cutoff:
                    size, files = tree_size(path)
                    plan.items.append(PurgeItem(area, path, size, files,
                                                f"no job {job_id} in the database; last written "
                                                f"{_days(now - mtime)} days ago", (job_id,)))
                continue
            if job_id in purgeable:
                if area == "workspace" and job.pseudo_patient_id in busy_patients:
                    continue  # next time: a job of the same patient is running
                size, files = tree_size(path)
                delivered = job.outbox.get(OutboxState.SENT.value, 0)
                plan.items.append(PurgeItem(
                    area, path, size, files,
                    f"job {job_id} {job.state} {_days(now - job.ended_at)} days ago (more than {days}), "
                    + (f"all results delivered ({_plural(delivered, 'outbox row')} sent)" if delivered
                       else "nothing to deliver"),
                    (job_id,), job.study_key))
            else:
                held_note(job, f"{area} folder")

    # per study: spool folder with its .conflicts and .quarantine
    spool = settings.spool_dir
    purged_studies: set[str] = set()
    for entry in sorted(_scandir(spool), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        key, path = entry.name, Path(entry.path)
        study_jobs = by_study.get(key, [])
        mtime = _mtime(path)
        if mtime is None or mtime > cutoff:
            continue
        if not study_jobs:
            plan.kept.append(KeptItem(f"spool study {key}", "no job of this study in the database "
                                      "(never processed); remove it by hand if it is not wanted"))
            continue
        blocking = [j for j in study_jobs if j.id not in purgeable]
        if blocking:
            for job in blocking:
                held_note(job, f"spool study {key}")
            continue
        newest = max(study_jobs, key=lambda j: j.id)
        versions = _count_dcm(path) + _count_dcm(spool / CONFLICTS / key)
        if versions != newest.instance_count:
            plan.kept.append(KeptItem(f"spool study {key}",
                                      f"{versions} instances in the spool, its newest job {newest.id} was built "
                                      f"from {newest.instance_count}: received again and not processed yet",
                                      (newest.id,)))
            continue
        ids = tuple(sorted(j.id for j in study_jobs))
        last = max(j.ended_at for j in study_jobs)
        size, files = tree_size(path)
        plan.items.append(PurgeItem(
            "spool", path, size, files,
            f"study {key}: {'job' if len(ids) == 1 else 'jobs'} {', '.join(map(str, ids))} finished, "
            f"nothing waiting for delivery; the last {_days(now - last)} days ago", ids, key))
        purged_studies.add(key)
    for area, sub in (("conflicts", CONFLICTS), ("quarantine", QUARANTINE)):
        for entry in sorted(_scandir(spool / sub), key=lambda e: e.name):
            key, path = entry.name, Path(entry.path)
            study_jobs = by_study.get(key, [])
            ids = tuple(sorted(j.id for j in study_jobs))
            if key in purged_studies:
                reason = f"study {key}: purged with its spool folder"
            elif (spool / key).exists():
                continue  # the study's folder stays (versions() counts .conflicts)
            else:
                mtime = _mtime(path)
                if mtime is None or mtime > cutoff or any(j.id not in purgeable for j in study_jobs):
                    continue
                reason = (f"study {key}: its spool folder is gone and "
                          + (f"its jobs ({', '.join(map(str, ids))}) are finished and delivered" if ids
                             else "no job of this study is in the database")
                          + f"; last written {_days(now - mtime)} days ago")
            size, files = tree_size(path)
            plan.items.append(PurgeItem(area, path, size, files, reason, ids, key))
    for job_id, parts in sorted(held.items()):
        plan.kept.append(KeptItem(f"job {job_id} ({', '.join(parts)})", holds[job_id], (job_id,)))
    # stale PHI folders of interrupted prior retrievals
    for entry in sorted(_scandir(spool / PRIORS), key=lambda e: e.name):
        path, job_id = Path(entry.path), _job_id_of(entry.name)
        job = jobs.get(job_id) if job_id is not None else None
        mtime = _mtime(path)
        if (job is not None and job.state in LIVE_JOB_STATES) or mtime is None or mtime > cutoff:
            continue
        size, files = tree_size(path)
        plan.items.append(PurgeItem("priors", path, size, files,
                                    f"prior retrieval of job {job_id} left behind, "
                                    f"{_days(now - mtime)} days old", (job_id,) if job_id else ()))
    # receptions that never finished
    incoming = spool.with_name(spool.name + INCOMING_SUFFIX)
    for entry in sorted(_scandir(incoming), key=lambda e: e.name):
        path = Path(entry.path)
        mtime = _mtime(path)
        if mtime is None or mtime > cutoff:
            continue
        size, files = tree_size(path)
        plan.items.append(PurgeItem("incoming", path, size, files,
                                    f"reception left unfinished {_days(now - mtime)} days ago"))


# ---------------------------------------------------------------------------
# vault
# ---------------------------------------------------------------------------
def _vault_lookup(vault, kind: str, pseudonym: str) -> str:
    """The keyed-hash lookup of a vault row (as Vault.put computes it)."""
    return vault._mac(f"lookup-{kind}", pseudonym).hex()


def _vault_record(vault, ciphertext: bytes) -> dict | None:
    try:
        return json.loads(vault._fernet.decrypt(bytes(ciphertext)))
    except Exception:
        return None


def _plan_vault(plan: PurgePlan, sessions, vault, jobs: dict[int, _JobInfo], cutoff: datetime) -> None:
    days = plan.config.vault_retention_days
    by_patient: dict[str, list[_JobInfo]] = defaultdict(list)
    for job in jobs.values():
        if job.pseudo_patient_id:
            by_patient[job.pseudo_patient_id].append(job)
    expired = {pid for pid, pjobs in by_patient.items()
               if all(j.hold is None and j.ended_at <= cutoff for j in pjobs)}
    patient_of_lookup = {_vault_lookup(vault, "patient", pid): pid for pid in by_patient}
    rows: dict[str, list[int]] = defaultdict(list)       # patient -> vault row ids
    studies: Counter = Counter()
    orphans: list[int] = []
    unreadable = 0
    with sessions() as session:
        entries = session.execute(select(VaultEntry.id, VaultEntry.kind, VaultEntry.lookup,
                                         VaultEntry.ciphertext, VaultEntry.updated_at)
                                  .where(VaultEntry.kind.in_(["patient", "study"]))).all()
    for row in entries:
        if row.kind == "patient":
            pid = patient_of_lookup.get(row.lookup)
        else:
            record = _vault_record(vault, row.ciphertext)
            if record is None:
                unreadable += 1
                continue
            pid = record.get("pseudo_patient_id")
        if pid in by_patient:
            if pid in expired:
                rows[pid].append(row.id)
                studies[pid] += row.kind == "study"
        elif (row.updated_at or plan.now) <= cutoff:
            orphans.append(row.id)
    for pid in sorted(rows, key=lambda p: min(j.id for j in by_patient[p])):
        ids = tuple(sorted(j.id for j in by_patient[pid]))
        last = max(j.ended_at for j in by_patient[pid])
        plan.items.append(PurgeItem(
            "vault", None, 0, 0,
            f"patient of {'job' if len(ids) == 1 else 'jobs'} {', '.join(map(str, ids))}: last job finished "
            f"{_days(plan.now - last)} days ago (more than {days}), all delivered; "
            f"{_plural(studies[pid], 'study record')}"
            + (" and the patient record" if len(rows[pid]) > studies[pid] else ""),
            ids, None, tuple(sorted(rows[pid]))))
    if orphans:
        plan.items.append(PurgeItem("vault", None, 0, 0,
                                    f"{_plural(len(orphans), 'record')} of patients no job refers to, "
                                    f"last written more than {days} days ago", (), None, tuple(sorted(orphans))))
    for pid, pjobs in by_patient.items():
        holds = [j.hold for j in pjobs if j.hold is not None and j.ended_at <= cutoff]
        if holds and pid not in expired:
            plan.kept.append(KeptItem("vault records of the patient of job " + str(min(j.id for j in pjobs)),
                                      holds[0], tuple(sorted(j.id for j in pjobs))))
    if unreadable:
        plan.notes.append(f"{_plural(unreadable, 'vault study record')} could not be decrypted and were kept")


# ---------------------------------------------------------------------------
# deletion
# ---------------------------------------------------------------------------
@dataclass
class PurgeResult:
    items: int = 0
    bytes: int = 0
    files: int = 0
    vault_rows: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _remove(path: Path) -> None:
    """Delete a file or a folder: a folder is first renamed to
    ``.purging-<name>-<ns>`` next to it (atomic: a late instance of the
    study makes a new folder, the completion monitor ignores dot names),
    then removed; never follows symbolic links."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    if path.name.startswith(PURGING_PREFIX):
        target = path
    else:
        target = path.with_name(f"{PURGING_PREFIX}{path.name}-{time.time_ns()}")
        os.replace(path, target)
    shutil.rmtree(target)


def _still_purgeable(sessions, job_ids: tuple[int, ...]) -> str | None:
    """Re-check just before deleting (a job may have been retried since the
    plan was made): None, or why not."""
    if not job_ids:
        return None
    with sessions() as session:
        jobs = _load_jobs(session, job_ids)
    for job_id in job_ids:
        job = jobs.get(job_id)
        if job is not None and job.hold is not None:
            return job.hold
    return None


def execute_plan(plan: PurgePlan, settings, sessions, metrics=None) -> PurgeResult:
    """Delete what ``plan`` lists, append each deletion to
    ``<home>/retention.log.jsonl`` and count it in ``metrics``. An item whose
    job changed since the plan (e.g. retried) is skipped; an error on one
    item does not stop the others."""
    t0 = time.monotonic()
    result = PurgeResult()
    log_path = settings.home / LOG_NAME
    at = utcnow().isoformat(timespec="seconds") + "Z"
    for item in plan.items:
        if item.area != "leftover":
            why = _still_purgeable(sessions, item.job_ids)
            if why is not None:
                result.skipped.append(f"{item.area} {PurgePlan._rel(item.path)}: {why}")
                continue
        try:
            if item.area == "vault":
                with sessions.begin() as session:
                    for row_id in item.vault_ids:
                        entry = session.get(VaultEntry, row_id)
                        if entry is not None:
                            session.delete(entry)
                result.vault_rows += len(item.vault_ids)
            elif item.path is not None:  # every other area is a file or folder
                _remove(item.path)
        except OSError as exc:
            result.errors.append(f"{item.area} {PurgePlan._rel(item.path)}: {exc.strerror or type(exc).__name__}")
            log.warning("purge of an item failed", extra={"area": item.area, "job_ids": list(item.job_ids),
                                                          "error": exc.strerror or type(exc).__name__})
            continue
        result.items += 1
        result.bytes += item.bytes
        result.files += item.files
        _append_log(log_path, {"at": at, "area": item.area, "job_ids": list(item.job_ids),
                               "study_key": item.study_key, "name": None if item.path is None else item.path.name,
                               "bytes": item.bytes, "files": item.files, "vault_rows": len(item.vault_ids),
                               "reason": item.reason})
        if metrics is not None:
            metrics.retention_purged_files.labels(area=item.area).inc(
                len(item.vault_ids) if item.area == "vault" else item.files)
            metrics.retention_freed_bytes.labels(area=item.area).inc(item.bytes)
    result.seconds = time.monotonic() - t0
    _append_log(log_path, {"at": at, "run": "purge", "retention_days": plan.config.retention_days,
                           "vault_retention_days": plan.config.vault_retention_days, "items": result.items,
                           "bytes": result.bytes, "files": result.files, "vault_rows": result.vault_rows,
                           "skipped": len(result.skipped), "errors": len(result.errors),
                           "seconds": round(result.seconds, 3)})
    log.info("purge done", extra={"items": result.items, "bytes": result.bytes, "files": result.files,
                                  "vault_rows": result.vault_rows, "skipped": len(result.skipped),
                                  "errors": len(result.errors)})
    return result


def _append_log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def _log_records(home: Path) -> list[dict]:
    """The records of ``<home>/retention.log.jsonl`` (unreadable lines skipped)."""
    try:
        lines = (home / LOG_NAME).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def purged_jobs(home: Path) -> dict[int, str]:
    """job id -> UTC time (ISO) its data (workspace, outbox folder or spool
    study) were first purged, from ``<home>/retention.log.jsonl``."""
    out: dict[int, str] = {}
    for record in _log_records(home):
        if record.get("area") in ("workspace", "outbox", "spool"):
            for job_id in record.get("job_ids") or []:
                out.setdefault(int(job_id), record.get("at", ""))
    return out


def purged_spool_jobs(home: Path) -> set[int]:
    """Ids of the jobs whose spool study folder was purged (from
    ``<home>/retention.log.jsonl``): a study received again after that is new
    to the completion monitor, whatever its instance count."""
    return {int(j) for record in _log_records(home) if record.get("area") == "spool"
            for j in record.get("job_ids") or []}


def purge(settings, sessions, config: RetentionConfig | None = None, vault=None, metrics=None,
          dry_run: bool = False, now: datetime | None = None) -> tuple[PurgePlan, PurgeResult | None]:
    """Plan, then (unless ``dry_run``) delete. Returns (plan, result or None)."""
    plan = plan_purge(settings, sessions, config, now=now, vault=vault)
    if metrics is not None:
        metrics.retention_kept.set(len(plan.kept))
    if dry_run or not plan.items:
        return plan, (None if dry_run else PurgeResult())
    return plan, execute_plan(plan, settings, sessions, metrics)


# ---------------------------------------------------------------------------
# the service's daily purge and the CLI
# ---------------------------------------------------------------------------
class RetentionScheduler:
    """Runs :func:`purge` every ``interval_hours`` (first ``initial_delay_s``
    after start) in a daemon thread, and exports the bytes held per area
    (``brainline_storage_bytes{area}``) on ``metrics``. Does nothing but
    the metrics when retention is off."""

    def __init__(self, settings, sessions, metrics=None, vault=None, config: RetentionConfig | None = None,
                 initial_delay_s: float = 300.0, interval_s: float | None = None,
                 usage_max_age_s: float = 300.0):
        self.settings = settings
        self.sessions = sessions
        self.metrics = metrics
        self.vault = vault
        self.config = config or RetentionConfig.from_settings(settings)
        self.initial_delay_s = initial_delay_s
        self.interval_s = interval_s if interval_s is not None else self.config.interval_hours * 3600.0
        self.usage = StorageUsage(settings, usage_max_age_s)
        self.runs = 0
        self.last_result: PurgeResult | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if metrics is not None and hasattr(metrics, "add_storage"):
            metrics.add_storage(self.usage.measure)

    def start(self) -> None:
        if not self.config.enabled:
            log.info("retention is off (BRAINLINE_RETENTION_DAYS=0, BRAINLINE_VAULT_RETENTION_DAYS=0)")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="brainline-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> PurgeResult | None:
        try:
            _plan, result = purge(self.settings, self.sessions, self.config, vault=self.vault,
                                  metrics=self.metrics)
        except Exception:
            log.exception("purge failed")
            if self.metrics is not None:
                self.metrics.retention_runs.labels(outcome="failed").inc()
            return None
        finally:
            self.usage.measure(force=True)
        assert result is not None  # None only for a dry run
        self.runs += 1
        self.last_result = result
        if self.metrics is not None:
            self.metrics.retention_runs.labels(outcome="ok" if not result.errors else "errors").inc()
            self.metrics.retention_last_run.set(time.time())
        return result

    def _loop(self) -> None:
        delay = self.initial_delay_s
        while not self._stop.wait(delay):
            self.run_once()
            delay = self.interval_s


def run_purge_cli(settings, dry_run: bool = False, days: int | None = None, vault_days: int | None = None,
                  as_json: bool = False, out=None) -> int:
    """``brainline purge [--dry-run] [--days N] [--vault-days N] [--json]``:
    print the plan, delete unless ``dry_run``. Safe next to a running
    service (only data of finished, delivered jobs; re-checked per item).
    Exit 0, or 1 when an item could not be deleted, 2 on a usage error."""
    import sys

    from ..db import make_engine, make_sessionmaker, migrate

    out = out or sys.stdout
    try:
        config = RetentionConfig.from_settings(settings, retention_days=days, vault_retention_days=vault_days)
    except ValueError as exc:
        print(f"brainline: {exc}", file=sys.stderr)
        return 2
    settings.home.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        sessions = make_sessionmaker(engine)
        vault = None
        if config.vault_retention_days:
            from .vault import Vault, resolve_vault_key

            key, _generated = resolve_vault_key(settings.vault_key, settings.dev_mode, settings.home)
            vault = Vault(key, sessions)
            vault.verify_key(record=False)
        plan, result = purge(settings, sessions, config, vault=vault, dry_run=dry_run)
        if as_json:
            data = plan.as_dict()
            data["dry_run"] = dry_run
            if result is not None:
                data["result"] = {"items": result.items, "bytes": result.bytes, "files": result.files,
                                  "vault_rows": result.vault_rows, "skipped": result.skipped,
                                  "errors": result.errors}
            print(json.dumps(data, indent=2), file=out)
        else:
            for line in plan.describe():
                print(line, file=out)
            if dry_run:
                print("dry run: nothing was deleted", file=out)
            elif result is not None:
                print(f"purged {result.items} items, {human_bytes(result.bytes)} in {result.files} files"
                      + (f", {result.vault_rows} vault rows" if result.vault_rows else "")
                      + f" ({result.seconds:.1f} s)", file=out)
                for line in result.skipped:
                    print(f"  skipped {line}", file=out)
                for line in result.errors:
                    print(f"  not deleted: {line}", file=out)
        return 1 if result is not None and result.errors else 0
    finally:
        engine.dispose()
