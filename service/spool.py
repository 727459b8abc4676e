"""PHI spool: received instances as files, one folder per study.

Layout: ``<home>/spool/<study_key>/<SOPInstanceUID>.dcm`` where ``study_key`` is
a keyed hash of the Study Instance UID (see ``Vault.study_key``), so folder
names carry no identity. Files are written atomically: a temporary file in the
same folder, ``fsync``, ``rename``, then ``fsync`` of the folder, so that an
instance acknowledged to the sender survives a crash or power loss.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SUFFIX = ".dcm"


class OutOfSpace(OSError):
    """Free space in the spool is below the configured threshold."""


class InvalidInstance(ValueError):
    """The instance cannot be filed (missing or malformed UIDs)."""


@dataclass(frozen=True)
class StoreOutcome:
    path: Path
    duplicate: bool


def is_valid_uid(uid: str | None) -> bool:
    return bool(uid) and len(uid) <= 64 and bool(_UID_RE.match(uid))


class Spool:
    """Atomic, durable instance store (gateway side, holds PHI)."""

    def __init__(self, root: Path, min_free_mb: float):
        self.root = root
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp_seq = 0
        self._lock = threading.Lock()

    # -- space -----------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_space(self, incoming_bytes: int = 0) -> bool:
        return self.free_bytes() - incoming_bytes >= self.min_free_bytes

    # -- writing ---------------------------------------------------------
    def study_dir(self, study_key: str) -> Path:
        return self.root / study_key

    def store(self, study_key: str, sop_instance_uid: str, data: bytes) -> StoreOutcome:
        """Write one instance (bytes of a DICOM Part 10 file) durably.

        Returns ``duplicate=True`` when an identical file was already there
        (nothing written). Raises OutOfSpace or InvalidInstance; on any error
        no partial file is left behind.
        """
        if not is_valid_uid(sop_instance_uid):
            raise InvalidInstance("SOP Instance UID is missing or not a valid UID")
        if not self.has_space(len(data)):
            raise OutOfSpace("free space below threshold")
        folder = self.study_dir(study_key)
        final = folder / f"{sop_instance_uid}{SUFFIX}"
        if final.exists() and _same_content(final, data):
            return StoreOutcome(final, duplicate=True)
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root)
        with self._lock:
            self._tmp_seq += 1
            tmp = folder / f".tmp-{os.getpid()}-{self._tmp_seq}"
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
            os.replace(tmp, final)
            _fsync_dir(folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfSpace(str(exc.strerror)) from None
            raise
        return StoreOutcome(final, duplicate=False)

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
        folder = self.study_dir(study_key)
        if not folder.is_dir():
            return 0
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.name.endswith(SUFFIX))

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


def _same_content(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
