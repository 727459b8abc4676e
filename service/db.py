"""Job store: SQLAlchemy 2 models, engine set-up and Alembic migrations.

SQLite under BRAINLINE_HOME by default (WAL mode), PostgreSQL when
BRAINLINE_DATABASE_URL says so. The processing side's tables hold no patient
identity: studies are named by a keyed hash (``study_key``) and by their
pseudonymous Study Instance UID; the vault table holds only ciphertext.
All timestamps are naive UTC.
"""

from __future__ import annotations

import enum
import os
from datetime import datetime, timezone
from importlib import resources

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class State(str, enum.Enum):
    """States of jobs and stages."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NEEDS_INPUT = "needs_input"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"  # a newer job of the same study replaced it


FINAL_STATES = {State.DONE, State.FAILED, State.NEEDS_INPUT, State.REJECTED, State.SUPERSEDED}


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_key: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(16), default="dicom")
    pipeline: Mapped[str] = mapped_column(String(64), default="neuro_onco")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True, default=State.RECEIVED.value)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    pseudo_study_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    pseudo_patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    #: None (no review asked), "pending", "accepted", "rejected" (see ReviewState)
    review_state: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    #: calling AE title of the sender ("" for pulled/offline jobs): the site for gating and QC history
    site: Mapped[str | None] = mapped_column(String(64), nullable=True)

    stages: Mapped[list["Stage"]] = relationship(
        back_populates="job", order_by="Stage.position", cascade="all, delete-orphan"
    )


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=State.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    job: Mapped[Job] = relationship(back_populates="stages")


class VaultEntry(Base):
    """Encrypted pseudonymization mapping; ``lookup`` is a keyed hash."""

    __tablename__ = "vault_entries"
    __table_args__ = (UniqueConstraint("kind", "lookup"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    lookup: Mapped[str] = mapped_column(String(64))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class OutboxState(str, enum.Enum):
    PENDING = "pending"      # waiting for its (next) attempt
    SENT = "sent"            # stored by the destination
    FAILED = "failed"        # gave up after outbox_max_attempts transient failures
    REJECTED = "rejected"    # the destination refused the object (C-STORE failure, HTTP 4xx)
    CANCELLED = "cancelled"  # its job was superseded before it was sent
    HELD = "held"            # waiting for a radiologist's review (review gating "hold")


class OutboxItem(Base):
    """One result object for one destination. ``path`` is a file in the PHI
    outbox folder; retries send the same file, hence the same SOP Instance UID."""

    __tablename__ = "outbox_items"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True, default=OutboxState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class ReviewState(str, enum.Enum):
    PENDING = "pending"      # results built, waiting for a radiologist
    ACCEPTED = "accepted"    # ACCEPT: verified SR and re-issued PDF sent
    REJECTED = "rejected"    # REJECT: delivered objects retracted (IOCM KOS), PDF without volumes sent


class QCMetric(Base):
    """One image-quality metric of one series of one job (issue 12). The
    history for robust z-scores is the rows of the same site, scanner and
    role. No patient identity: site is the calling AE title, scanner the
    manufacturer and model name, protocol the series' protocol name."""

    __tablename__ = "qc_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    site: Mapped[str] = mapped_column(String(64), default="")
    scanner: Mapped[str] = mapped_column(String(128), default="")
    protocol: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    zscore: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class User(Base):
    """A review UI account. ``password_hash`` is an scrypt hash with its salt
    and parameters; roles are radiologist, technician and admin."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Review(Base):
    """A radiologist's decision on a job's segmentation (EASE): ACCEPT or
    REJECT, a score 1-5 (5 = perfect) and a comment."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    reviewer: Mapped[str] = mapped_column(String(128))   # display name at the time of review
    decision: Mapped[str] = mapped_column(String(16))    # "accepted" | "rejected"
    score: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEvent(Base):
    """Who did what and when in the review UI (log in, view identity, review)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def secure_sqlite_files(database: str | None) -> None:
    """Make a SQLite database file and its WAL/shared-memory/journal files
    0600 (they hold the job store and the vault's ciphertext)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    for suffix in SQLITE_SUFFIXES:
        try:
            os.chmod(database + suffix, 0o600)
        except FileNotFoundError:
            pass


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout, thread sharing and
    files readable by the owner only (0600)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        database = engine.url.database

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            secure_sqlite_files(database)

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database schema to the newest Alembic revision (or to
    ``revision``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("brainline.service").joinpath("migrations"))
    )
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, revision)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
