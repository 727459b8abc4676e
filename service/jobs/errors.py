"""How a stage ends, and its failures in words.

A stage returns its result dict, or raises one of ``NeedsInput`` (the job
turns needs_input), ``Rejected`` (rejected) or ``Superseded`` (a newer job of
the study replaced this one); anything else fails the stage. The job's
``error`` is in words (``in_words``, with the stage's label, ``stage_label``):
the message of an error a stage declares for people (``pipeline_errors()``,
from the stage table pipelines/stage_table.py; they name the series and
reason), else the kind of error; tracebacks go to the log only.
"""

from __future__ import annotations

import re

from brainline.pipelines import stage_table


class NeedsInput(Exception):
    """The study lacks something the pipeline needs; the message says what."""


class Rejected(Exception):
    """The study must not be processed; the message says why."""


#: State of a job (and of its stage that noticed) replaced by a newer job of
#: the same study; db.State has no member for it yet.
SUPERSEDED = "superseded"


class Superseded(Exception):
    """A newer job of the same study replaced this one; the message says which."""


def pipeline_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for people (they name the series and
    reason): every stage's declared ``errors`` and ``needs_input``
    (pipelines/stage_table.py)."""
    return stage_table.people_errors()


_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.S)
_FRAME = re.compile(r'\s*File "[^"]*", line \d+.*')
_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]+)")


def _last_line(match: re.Match) -> str:
    """A traceback in a message (e.g. a child process's stderr) becomes its
    last line, the exception in words."""
    lines = [line for line in match.group(0).splitlines()[1:]
             if line.strip() and not line[:1].isspace() and not line.startswith(("During handling", "The above"))]
    return lines[-1] if lines else ""


def in_words(exc: BaseException, job_id: int) -> str:
    """A stage failure for people: the message of a pipeline error (which
    names the series and reason) without any traceback or install path; for
    anything else the kind of error and where the details are."""
    if isinstance(exc, pipeline_errors()):
        text = _TRACEBACK.sub(_last_line, str(exc))
        text = " ".join(line for line in text.splitlines() if not _FRAME.fullmatch(line))
        text = _PATH.sub(lambda m: m.group(1), " ".join(text.split()))
        return (text[:1500] + " …") if len(text) > 1500 else (text or type(exc).__name__)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__}; details in the service log, job {job_id})"
    if isinstance(exc, MemoryError):
        return f"out of memory (details in the service log, job {job_id})"
    return f"internal error ({type(exc).__name__}; details in the service log, job {job_id})"


def stage_label(name: str) -> str:
    """A stage's name in words ("co-registration"), from the stage tables."""
    from .stage_table import labels  # the service table imports the compute stages

    return labels().get(name, name)


def __getattr__(name: str):
    """``PIPELINE_ERRORS`` and ``STAGE_LABELS``, derived from the stage tables."""
    if name == "PIPELINE_ERRORS":
        return pipeline_errors()
    if name == "STAGE_LABELS":
        from .stage_table import labels

        return labels()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
