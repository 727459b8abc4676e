"""PHI spool: received instances as files, one folder per study.

Layout::

    <home>/spool/<study_key>/<SOPInstanceUID>.dcm      current version of each instance
    <home>/spool/.conflicts/<study_key>/<SOPInstanceUID>.<ns>.dcm
                                                      earlier versions replaced by a
                                                      different instance with the same UID
    <home>/spool.incoming/                            C-STORE data sets being received (PHI
                                                      as well; next to the spool so that a
                                                      finished one is renamed, not copied)

``study_key`` is a keyed hash of the Study Instance UID (see ``Vault.study_key``),
so folder names carry no identity. Files are written atomically: a temporary file
in the same file system, ``fsync``, ``rename``, then ``fsync`` of the folder, so
that an instance acknowledged to the sender survives a crash or power loss.

A different instance received with an existing SOP Instance UID does not
silently overwrite the stored one: the stored file is moved to ``.conflicts/``
(kept, never processed), the new one takes its place, and ``versions()`` grows
by one so that the completion monitor re-opens the study (a new job after the
quiet period, also after a restart).

The calling AE title of the association that stored a study's newest
instances is kept in ``<home>/spool/<study_key>/.calling_ae`` (written when it
changes; not an instance, so counts ignore it): the job's site
(``Job.site``), which selects the review gating (``review_mode_by_site``).
Studies stored outside an association (DICOMweb pull) have none ("").
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SUFFIX = ".dcm"
CALLING_AE_FILE = ".calling_ae"   # calling AE title of the study's newest sender
CONFLICTS = ".conflicts"
INCOMING_SUFFIX = ".incoming"
_CHUNK = 1 << 20


class OutOfSpace(OSError):
    """Free space in the spool is below the configured threshold."""


class InvalidInstance(ValueError):
    """The instance cannot be filed (missing or malformed UIDs)."""


@dataclass(frozen=True)
class StoreOutcome:
    path: Path
    duplicate: bool
    conflict: bool = False  # a different version was stored before; it was kept in .conflicts/


def is_valid_uid(uid: str | None) -> bool:
    """A DICOM UID: 1 to 64 characters, digits and dots, as a full match
    (``$`` would also accept a trailing newline)."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None


class Spool:
    """Atomic, durable instance store (gateway side, holds PHI)."""

    def __init__(self, root: Path, min_free_mb: float):
        self.root = root
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp_seq = 0
        self._lock = threading.Lock()
        self._uid_locks = [threading.Lock() for _ in range(64)]  # striped by SOP UID
        self._senders: dict[str, str] = {}  # study_key -> calling AE title last written

    # -- space -----------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_space(self, incoming_bytes: int = 0) -> bool:
        return self.free_bytes() - incoming_bytes >= self.min_free_bytes

    # -- writing ---------------------------------------------------------
    def study_dir(self, study_key: str) -> Path:
        return self.root / study_key

    def conflicts_dir(self, study_key: str) -> Path:
        return self.root / CONFLICTS / study_key

    @property
    def incoming_dir(self) -> Path:
        """Folder for data sets being received (same file system as the
        spool, so that a finished one is renamed into place, not copied)."""
        folder = self.root.with_name(self.root.name + INCOMING_SUFFIX)
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    def clear_incoming(self, older_than_s: float = 0.0) -> int:
        """Remove partial receptions (left by a crash or an aborted
        association); return how many files were removed."""
        folder = self.root.with_name(self.root.name + INCOMING_SUFFIX)
        if not folder.is_dir():
            return 0
        limit = time.time() - older_than_s
        removed = 0
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    if entry.is_file() and entry.stat().st_mtime <= limit:
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    pass
        return removed

    def _new_tmp(self, folder: Path) -> Path:
        with self._lock:
            self._tmp_seq += 1
            return folder / f".tmp-{os.getpid()}-{self._tmp_seq}"

    def _uid_lock(self, key: str) -> threading.Lock:
        return self._uid_locks[hash(key) % len(self._uid_locks)]

    def store(self, study_key: str, sop_instance_uid: str, data: bytes,
              calling_ae: str | None = None) -> StoreOutcome:
        """Write one instance (bytes of a DICOM Part 10 file) durably.

        Returns ``duplicate=True`` when an identical file was already there
        (nothing written), ``conflict=True`` when a different file with the
        same SOP Instance UID was there (moved to ``.conflicts/``). Raises
        OutOfSpace or InvalidInstance; on any error no partial file is left
        behind. ``calling_ae``: the sender's AE title (None outside a DICOM
        association, e.g. a DICOMweb pull), kept as the study's site.
        """
        if not is_valid_uid(sop_instance_uid):
            raise InvalidInstance("SOP Instance UID is missing or not a valid UID")
        if not self.has_space(len(data)):
            raise OutOfSpace("free space below threshold")
        final = self.study_dir(study_key) / f"{sop_instance_uid}{SUFFIX}"
        if final.exists() and _same_content(final, data):
            return StoreOutcome(final, duplicate=True)
        folder = self._ensure_study(study_key)
        tmp = self._new_tmp(folder)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._noted(self._commit(study_key, sop_instance_uid, tmp), study_key, calling_ae)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfSpace(str(exc.strerror)) from None
            raise

    def store_file(self, study_key: str, sop_instance_uid: str, src: Path,
                   calling_ae: str | None = None, synced: bool = False) -> StoreOutcome:
        """Move a received file (DICOM Part 10, in ``incoming_dir`` or
        elsewhere on the spool's file system) into the study durably: fsync,
        rename, fsync of the folder. ``src`` is consumed (moved or removed)
        on success and left alone on error. Same outcomes as ``store``.
        ``synced=True``: the caller has fdatasync'ed ``src`` after its last
        write (the DICOM listener does it while it reads the header), so it
        is not synced again; it is still renamed and its folder fsync'ed."""
        if not is_valid_uid(sop_instance_uid):
            raise InvalidInstance("SOP Instance UID is missing or not a valid UID")
        size = src.stat().st_size
        if not self.has_space(size):
            raise OutOfSpace("free space below threshold")
        try:
            if not synced:
                fd = os.open(src, os.O_RDONLY)
                try:
                    _fdatasync(fd)
                finally:
                    os.close(fd)
            folder = self._ensure_study(study_key)
            if src.stat().st_dev == folder.stat().st_dev:
                return self._noted(self._commit(study_key, sop_instance_uid, src), study_key, calling_ae)
            # incoming folder on another file system: copy, then rename
            tmp = self._new_tmp(folder)
            try:
                shutil.copyfile(src, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                outcome = self._commit(study_key, sop_instance_uid, tmp)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            src.unlink(missing_ok=True)
            return self._noted(outcome, study_key, calling_ae)
        except OSError as exc:
            if exc.errno in (28, 122):
                raise OutOfSpace(str(exc.strerror)) from None
            raise

    def _noted(self, outcome: StoreOutcome, study_key: str, calling_ae: str | None) -> StoreOutcome:
        """Record the sender of a stored (not duplicate) instance; return ``outcome``."""
        if not outcome.duplicate and calling_ae:
            try:
                self._note_sender(study_key, calling_ae)
            except OSError:  # the instance is stored; the site falls back to the default
                pass
        return outcome

    def _note_sender(self, study_key: str, ae: str) -> None:
        """Write ``<study>/.calling_ae`` (atomically, durably) when the sender changed."""
        ae = "".join(ch for ch in ae.strip() if ch.isprintable())[:16]
        folder = self.study_dir(study_key)
        target = folder / CALLING_AE_FILE
        if not ae or (self._senders.get(study_key) == ae and target.exists()):
            return
        with self._uid_lock(f"{study_key}/{CALLING_AE_FILE}"):
            tmp = self._new_tmp(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, (ae + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            _fsync_dir(folder)
            self._senders[study_key] = ae

    def calling_ae(self, study_key: str) -> str:
        """The calling AE title that sent the study's newest instances ("" when
        unknown: pulled over DICOMweb, or stored before sites were recorded)."""
        try:
            return (self.study_dir(study_key) / CALLING_AE_FILE).read_text().strip()[:16]
        except (OSError, UnicodeDecodeError):
            return ""

    def _ensure_study(self, study_key: str) -> Path:
        folder = self.study_dir(study_key)
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            _fsync_dir(self.root)
        return folder

    def _commit(self, study_key: str, sop_instance_uid: str, tmp: Path) -> StoreOutcome:
        """Rename the fsync'ed ``tmp`` to the instance's final name; keep a
        different earlier version in ``.conflicts/``."""
        folder = self.study_dir(study_key)
        final = folder / f"{sop_instance_uid}{SUFFIX}"
        with self._uid_lock(f"{study_key}/{sop_instance_uid}"):
            conflict = False
            if final.exists():
                if _same_file_content(final, tmp):
                    tmp.unlink(missing_ok=True)
                    return StoreOutcome(final, duplicate=True)
                keep_dir = self.conflicts_dir(study_key)
                if not keep_dir.is_dir():
                    keep_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                    _fsync_dir(keep_dir.parent)
                kept = keep_dir / f"{sop_instance_uid}.{time.time_ns()}{SUFFIX}"
                os.replace(final, kept)
                _fsync_dir(keep_dir)
                conflict = True
            os.replace(tmp, final)
            _fsync_dir(folder)  # the new name is durable; a stale entry in .incoming is swept
        return StoreOutcome(final, duplicate=False, conflict=conflict)

    # -- reading ---------------------------------------------------------
    def studies(self) -> list[tuple[str, int]]:
        """(study_key, folder mtime in ns) for every study folder."""
        out = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.is_dir() and not entry.name.startswith("."):
                    out.append((entry.name, entry.stat().st_mtime_ns))
        return out

    def instance_files(self, study_key: str) -> list[Path]:
        folder = self.study_dir(study_key)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX))

    def count(self, study_key: str) -> int:
        """Number of instances (current versions) of the study."""
        return _count_dcm(self.study_dir(study_key))

    def conflict_count(self, study_key: str) -> int:
        """Number of earlier versions kept in ``.conflicts/`` for the study."""
        return _count_dcm(self.conflicts_dir(study_key))

    def versions(self, study_key: str) -> int:
        """Instances plus kept earlier versions: grows with every new
        instance and with every conflicting re-send, never with a duplicate."""
        return self.count(study_key) + self.conflict_count(study_key)

    def probe_writable(self) -> str | None:
        """Return None when the spool accepts a durable write, else why not."""
        probe = self.root / ".probe"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"ok")
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
        except OSError as exc:
            return f"spool {self.root} is not writable: {exc.strerror}"
        return None


def _count_dcm(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.name.endswith(SUFFIX))


def _same_content(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def _same_file_content(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def _fdatasync(fd: int) -> None:
    """Data and size of a file on disk (what reading it back needs)."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
