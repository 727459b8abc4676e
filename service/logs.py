"""Structured JSON-lines logging.

Every record is one JSON object per line with ``ts`` (UTC ISO 8601), ``level``,
``logger``, ``msg`` and any ``extra=`` fields. Callers must only pass
pseudonymous keys (job id, study key, pseudonymous UIDs), never patient data.

A record with an exception carries ``exc_type`` and ``traceback``: the stack
frames (file, line, function, source line) without the exception's message,
which may quote data. The log folder is created 0700 and log files 0600.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and key != "color_message":
                payload[key] = value
        if record.exc_info:
            payload["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            if record.exc_info[2] is not None:
                payload["traceback"] = "".join(traceback.format_tb(record.exc_info[2]))
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Send JSON lines to stderr and, when given, to ``log_file``."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        for path, private in ((log_file.parent, 0o700), (log_file, 0o600)):
            try:
                os.chmod(path, private)
            except OSError:  # not ours (e.g. a shared log folder): leave it
                pass
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    # pynetdicom logs dataset summaries (incl. patient fields) at DEBUG and
    # association details at INFO: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # their DEBUG lines carry request URLs, and a QIDO-RS query for priors names the PatientID
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pydicom quotes offending element values (names, dates) in its
    # warnings and log records: never let them through.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
