"""Outbox: reliable, at-least-once delivery of result objects, idempotent at
the destination because a retry sends the same file (same SOP Instance UID).

Rows live in the job store, so pending deliveries survive restarts. Transient
failures back off exponentially (``outbox_retry_base_seconds`` doubling up to
``outbox_retry_max_seconds``) and turn ``failed`` after
``outbox_max_attempts``; a destination that refuses an object marks that row
``rejected`` with the reason and does not block other rows or destinations.

A job superseded by a newer job of the same study queues nothing more
(:meth:`Outbox.enqueue` raises Superseded), and its rows not yet sent turn
``cancelled`` (``cancel_pending`` in service/jobs/store.py, state string
until db.OutboxState has it); ``retry`` never re-queues them.

Review gating (service/gateway/review.py): rows queued ``held`` (``enqueue(...,
state="held")``) are never sent until a review releases them (``pending``)
or cancels them. A retraction note (IHE IOCM Key Object Selection) is also
queued for the *markers*: the Orthanc REST APIs of ``dest_orthanc_rest``,
where :class:`OrthancRetractionMarker` "sends" the note by setting the
metadata ``dest_orthanc_metadata`` on every instance the note retracts
(Orthanc 1.10 does not act on IOCM notes itself); same retries as any row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import pydicom
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from ..db import Job, OutboxItem, OutboxState, utcnow
from ..jobs.errors import SUPERSEDED, Superseded
from ..jobs.store import SUPERSEDED_PREFIX, cancel_pending
from .destinations import Destination, DestinationUnavailable

log = logging.getLogger("brainline.outbox")

BATCH = 256  # items per pass; a destination gets one association per pass
MARKER_PREFIX = "orthanc-rest:"  # outbox destination name of an OrthancRetractionMarker
RETRACTION_KIND = "kos"  # outbox kind of an IOCM retraction note (service/gateway/review.py)


class OrthancRetractionMarker(Destination):
    """Marks the instances a retraction note (Key Object Selection Document)
    references in an Orthanc, through its REST API: ``PUT
    /instances/{id}/metadata/{name}`` with the note's title, its SOP Instance
    UID and the time. The metadata name must be declared in Orthanc's
    ``UserMetadata`` configuration (else Orthanc answers 4xx: the row turns
    ``rejected`` with that reason). An instance Orthanc does not hold is
    skipped. Transport errors and HTTP 5xx raise DestinationUnavailable.
    The URL may carry credentials (``http://user:password@host:8042``)."""

    kind = "orthanc-rest"

    def __init__(self, url: str, metadata: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.metadata = metadata
        self.timeout = timeout

    @property
    def name(self) -> str:
        return MARKER_PREFIX + self.url

    @classmethod
    def from_setting(cls, entry: str, settings) -> "OrthancRetractionMarker":
        return cls(entry, getattr(settings, "dest_orthanc_metadata", "") or "BrainLineRetracted",
                   float(getattr(settings, "network_timeout", 30.0) or 30.0))

    def send(self, files: list[Path]) -> list[str | None]:
        import httpx

        outcomes: list[str | None] = []
        with httpx.Client(timeout=self.timeout) as client:
            for path in files:
                note = pydicom.dcmread(path, stop_before_pixels=True)
                code = note.ConceptNameCodeSequence[0]
                value = (f"{code.CodeValue} {code.CodeMeaning}; rejection note {note.SOPInstanceUID}; "
                         f"{utcnow().isoformat(timespec='seconds')}Z")
                refused = None
                for uid in _retracted_uids(note):
                    try:
                        found = client.post(f"{self.url}/tools/lookup", content=uid)
                        if found.status_code >= 500:
                            raise DestinationUnavailable(f"Orthanc REST {self.url}: HTTP {found.status_code}")
                        found.raise_for_status()
                        for hit in found.json():
                            if hit.get("Type") != "Instance":
                                continue
                            put = client.put(f"{self.url}/instances/{hit['ID']}/metadata/{self.metadata}",
                                             content=value.encode())
                            if put.status_code >= 500:
                                raise DestinationUnavailable(f"Orthanc REST {self.url}: HTTP {put.status_code}")
                            if put.status_code >= 400:
                                refused = (f"Orthanc refused metadata {self.metadata!r} (HTTP {put.status_code}): "
                                           "declare it in Orthanc's UserMetadata")
                                break
                    except httpx.HTTPStatusError as exc:
                        refused = f"Orthanc REST refused the lookup (HTTP {exc.response.status_code})"
                    except httpx.HTTPError as exc:
                        raise DestinationUnavailable(f"Orthanc REST {self.url} cannot be reached: "
                                                     f"{type(exc).__name__}") from None
                    if refused:
                        break
                outcomes.append(refused)
        return outcomes


def _retracted_uids(note: pydicom.Dataset) -> list[str]:
    """SOP Instance UIDs a Key Object Selection Document references (its
    Current Requested Procedure Evidence Sequence)."""
    return [str(i.ReferencedSOPInstanceUID)
            for study in note.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in study.get("ReferencedSeriesSequence", [])
            for i in series.get("ReferencedSOPSequence", [])]


def retraction_markers(settings) -> list[OrthancRetractionMarker]:
    """The markers of ``dest_orthanc_rest`` (comma-separated Orthanc REST URLs)."""
    urls = [u.strip() for u in str(getattr(settings, "dest_orthanc_rest", "") or "").split(",") if u.strip()]
    return [OrthancRetractionMarker.from_setting(u, settings) for u in urls]


class Outbox:
    def __init__(self, sessions, destinations: list[Destination], settings, metrics=None):
        self.sessions = sessions
        self.destinations = {d.name: d for d in destinations}
        #: Orthanc REST markers of retraction notes: name -> OrthancRetractionMarker
        self.markers = {m.name: m for m in retraction_markers(settings)}
        self.settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # destination name -> monotonic time of the first failure since the last success
        self.failing_since: dict[str, float] = {}
        self.last_error: dict[str, str] = {}
        if metrics is not None:
            metrics.add_outbox(self.depth, self.oldest_pending_age)

    # -- queueing ------------------------------------------------------------
    def enqueue(self, job_id: int, objects: list[tuple[str, Path]], state: str = OutboxState.PENDING.value,
                markers: bool = False) -> int:
        """Add (kind, file) pairs for every destination; idempotent per
        (destination, SOP Instance UID). Returns the number of new rows.
        Raises Superseded (nothing added) once the job has been superseded.
        ``state`` "held": kept until a review releases them; ``markers``: also
        for the Orthanc REST markers (retraction notes only)."""
        added = 0
        names = list(self.destinations) + (list(self.markers) if markers else [])
        for kind, path in objects:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SOPInstanceUID"])
            for name in names:
                try:
                    with self.sessions.begin() as s:
                        job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
                        if job is not None and job.state == SUPERSEDED:
                            raise Superseded(job.error or f"job {job_id} was superseded")
                        s.add(OutboxItem(job_id=job_id, destination=name, kind=kind, path=str(path),
                                         sop_class_uid=str(ds.SOPClassUID),
                                         sop_instance_uid=str(ds.SOPInstanceUID),
                                         state=state, attempts=0,
                                         next_attempt_at=utcnow()))
                    added += 1
                except IntegrityError:
                    pass  # already queued (a re-run of the stage)
        self._wake.set()
        return added

    def wake(self) -> None:
        """Make the sender look for due rows now (e.g. rows a review released)."""
        self._wake.set()

    # -- views ---------------------------------------------------------------
    def items(self, states: list[str] | None = None, limit: int = 500) -> list[OutboxItem]:
        with self.sessions() as s:
            q = select(OutboxItem).order_by(OutboxItem.id).limit(limit)
            if states:
                q = q.where(OutboxItem.state.in_(states))
            return list(s.scalars(q))

    def depth(self) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(OutboxItem)
                            .where(OutboxItem.state == OutboxState.PENDING.value)) or 0

    def oldest_pending_age(self) -> float:
        with self.sessions() as s:
            oldest = s.scalar(select(func.min(OutboxItem.created_at))
                              .where(OutboxItem.state == OutboxState.PENDING.value))
        return (utcnow() - oldest).total_seconds() if oldest else 0.0

    def unreachable(self) -> list[str]:
        """Destinations failing for longer than dest_unreachable_seconds."""
        limit = self.settings.dest_unreachable_seconds
        now = time.monotonic()
        return [f"destination {name} unreachable for {now - since:.0f} s: "
                f"{self.last_error.get(name, '')}"
                for name, since in self.failing_since.items() if now - since > limit]

    def cancel_earlier(self, study_key: str, job_id: int) -> int:
        """Cancel the rows not yet sent of earlier jobs of ``study_key`` (a job
        about to deliver replaces them); returns how many."""
        with self.sessions.begin() as s:
            earlier = list(s.scalars(select(Job.id).where(Job.study_key == study_key, Job.id < job_id)))
            return cancel_pending(s, earlier, f"cancelled: job {job_id} replaces these results")

    def sent_earlier(self, study_key: str, job_id: int) -> list[dict]:
        """Objects of earlier jobs of ``study_key`` already stored at a destination
        (retraction notes and Orthanc markings left out)."""
        with self.sessions() as s:
            rows = s.execute(select(OutboxItem.job_id, OutboxItem.kind, OutboxItem.destination,
                                    OutboxItem.sop_instance_uid)
                             .join(Job, Job.id == OutboxItem.job_id)
                             .where(Job.study_key == study_key, Job.id < job_id,
                                    OutboxItem.state == OutboxState.SENT.value,
                                    ~OutboxItem.destination.startswith(MARKER_PREFIX),
                                    OutboxItem.kind != RETRACTION_KIND)
                             .order_by(OutboxItem.id))
            return [{"job_id": j, "kind": k, "destination": d, "sop_instance_uid": u} for j, k, d, u in rows]

    def retry(self, item_ids: list[int] | None = None) -> int:
        """Make failed/rejected items (all, or the given ids) pending again;
        never those of a superseded job."""
        with self.sessions.begin() as s:
            q = select(OutboxItem).join(Job, Job.id == OutboxItem.job_id).where(
                OutboxItem.state.in_([OutboxState.FAILED.value, OutboxState.REJECTED.value]),
                Job.state != SUPERSEDED,
                or_(Job.error.is_(None), ~Job.error.startswith(SUPERSEDED_PREFIX)))
            if item_ids:
                q = q.where(OutboxItem.id.in_(item_ids))
            items = list(s.scalars(q))
            for item in items:
                item.state = OutboxState.PENDING.value
                item.attempts = 0
                item.next_attempt_at = utcnow()
        self._wake.set()
        return len(items)

    # -- sending ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="brainline-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:
                log.exception("outbox pass failed")
            self._wake.wait(1.0)
            self._wake.clear()

    def send_due(self) -> int:
        """Send every item whose time has come; return how many were stored."""
        with self.sessions() as s:
            due = list(s.scalars(
                select(OutboxItem).where(OutboxItem.state == OutboxState.PENDING.value,
                                         OutboxItem.next_attempt_at <= utcnow())
                .order_by(OutboxItem.id).limit(BATCH)))
        by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in due:
            by_dest[item.destination].append(item)
        stored = 0
        for name, items in by_dest.items():
            dest = self.destinations.get(name) or self.markers.get(name)
            if dest is None:
                self._record(items, error="destination no longer configured", transient=True)
                continue
            stored += self._send_batch(dest, items)  # one association for all due items
        return stored

    def _send_batch(self, dest: Destination, items: list[OutboxItem]) -> int:
        try:
            outcomes = dest.send([Path(i.path) for i in items])
        except DestinationUnavailable as exc:
            self.failing_since.setdefault(dest.name, time.monotonic())
            self.last_error[dest.name] = str(exc)
            self._record(items, error=str(exc), transient=True)
            log.warning("destination unavailable", extra={"destination": dest.name,
                                                          "items": len(items), "reason": str(exc)})
            return 0
        except (OSError, ValueError) as exc:
            self._record(items, error=f"cannot read the object: {type(exc).__name__}", transient=False)
            return 0
        self.failing_since.pop(dest.name, None)
        self.last_error.pop(dest.name, None)
        stored = 0
        with self.sessions.begin() as s:
            for item, refusal in zip(items, outcomes):
                row = s.get(OutboxItem, item.id)
                row.attempts += 1
                if refusal is None:
                    row.state, row.sent_at, row.last_error = OutboxState.SENT.value, utcnow(), None
                    stored += 1
                else:
                    row.state, row.last_error = OutboxState.REJECTED.value, refusal
                    log.warning("object refused by destination",
                                extra={"destination": dest.name, "item_id": item.id, "reason": refusal})
        log.info("delivered", extra={"destination": dest.name, "stored": stored, "items": len(items)})
        return stored

    def _record(self, items: list[OutboxItem], error: str, transient: bool) -> None:
        base = self.settings.outbox_retry_base_seconds
        cap = self.settings.outbox_retry_max_seconds
        with self.sessions.begin() as s:
            for item in items:
                row = s.get(OutboxItem, item.id)
                row.attempts += 1
                row.last_error = error
                if not transient:
                    row.state = OutboxState.REJECTED.value
                elif row.attempts >= self.settings.outbox_max_attempts:
                    row.state = OutboxState.FAILED.value
                else:
                    delay = min(cap, base * 2 ** (row.attempts - 1))
                    row.next_attempt_at = utcnow() + timedelta(seconds=delay)
