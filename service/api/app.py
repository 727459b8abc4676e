"""REST API (FastAPI): health, readiness, Prometheus metrics and the job API.

``/api/`` requires ``Authorization: Bearer <BRAINLINE_API_TOKEN>`` when a token
is configured; ``/healthz``, ``/readyz``, ``/delivery-health`` and ``/metrics`` do not. Answers are
pseudonymous: jobs show keyed-hash study keys and pseudonymous UIDs only.

Errors are answered in words (``{"detail": "<sentence>"}``): out-of-range
numbers are refused with 404 (ids) or 422 (query parameters), and an
unexpected exception is logged with its stack frames and answered 500 with a
short sentence and an error id to find it in the log; no traceback or install
path ever reaches a client.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import sys
from datetime import datetime
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from brainline import __version__

from ..db import Job, OutboxState, Stage, State
from ..gateway.dicomweb_pull import PullError, pull_study
from ..jobs.errors import stage_label
from ..jobs.store import JobConflict
from .qc_api import create_qc_router

log = logging.getLogger("brainline.api")

_bearer = HTTPBearer(auto_error=False)

# Largest id, limit and offset a database integer holds (SQLite and
# PostgreSQL BIGINT); larger numbers would raise OverflowError in the driver.
MAX_DB_INT = 2**63 - 1
MAX_LIMIT = 1000
JOB_STATES = tuple(s.value for s in State)


# -- errors in words --------------------------------------------------------
_TRACEBACK = "Traceback (most recent call last):"


_PACKAGES_RE = re.compile(r"(?:/[^\s/'\"]+)*/(?:site|dist)-packages/")


def _install_prefixes() -> list[str]:
    """The package's own folder and the interpreter's library folders."""
    roots = {str(Path(__file__).resolve().parents[2]), sys.prefix + "/lib", sys.base_prefix + "/lib",
             sys.exec_prefix + "/lib"}
    return sorted((r.rstrip("/") + "/" for r in roots if len(r.strip("/")) > 3), key=len, reverse=True)


_PREFIXES = _install_prefixes()


def in_words(text: str | None) -> str | None:
    """An error message fit for a client: no Python traceback (only its last
    line, the exception in words) and no install paths."""
    if not text:
        return text
    if _TRACEBACK in text:
        head, _, tail = text.partition(_TRACEBACK)
        lines = [line for line in tail.splitlines()
                 if line.strip() and not line[:1].isspace() and _TRACEBACK not in line
                 and not line.startswith(("During handling", "The above exception"))]
        text = head.rstrip() + (" " if head.strip() else "") + (lines[-1] if lines else "")
    text = _PACKAGES_RE.sub("", text)
    for prefix in _PREFIXES:
        text = text.replace(prefix, "")
    return text.strip() or "internal error"


def _validation_sentence(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body")]
        where = ".".join(loc) or "request"
        msg = str(err.get("msg", "is not valid")).rstrip(".")
        msg = msg[:1].lower() + msg[1:]
        parts.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(parts)


def _check_id(kind: str, value: int) -> int:
    if not 1 <= value <= MAX_DB_INT:
        raise HTTPException(404, f"{kind} {value} does not exist")
    return value


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def stage_view(stage: Stage) -> dict:
    return {
        "name": stage.name,
        "label": stage_label(stage.name),  # in words, from the stage table
        "state": stage.state,
        "attempts": stage.attempts,
        "started_at": _iso(stage.started_at),
        "finished_at": _iso(stage.finished_at),
        "duration_s": round(stage.duration_s, 3) if stage.duration_s is not None else None,
        "error": in_words(stage.error),
        "result": json.loads(stage.result_json) if stage.result_json else None,
    }


def job_view(job: Job, with_stages: bool = True) -> dict:
    view = {
        "id": job.id,
        "state": job.state,
        "study_key": job.study_key,
        "pseudo_study_uid": job.pseudo_study_uid,
        "pseudo_patient_id": job.pseudo_patient_id,
        "source": job.source,
        "pipeline": job.pipeline,
        "instance_count": job.instance_count,
        "attempts": job.attempts,
        "error": in_words(job.error),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "duration_s": _duration(job.started_at, job.finished_at),
    }
    if with_stages:
        view["stages"] = [stage_view(s) for s in job.stages]
    return view


def outbox_view(item) -> dict:
    return {"id": item.id, "job_id": item.job_id, "destination": item.destination, "kind": item.kind,
            "sop_instance_uid": item.sop_instance_uid, "state": item.state, "attempts": item.attempts,
            "last_error": in_words(item.last_error), "created_at": _iso(item.created_at),
            "next_attempt_at": _iso(item.next_attempt_at), "sent_at": _iso(item.sent_at)}


def create_app(ctx) -> FastAPI:
    app = FastAPI(title="BrainLine", version=__version__,
                  description="Brain MRI processing service for neuro-oncology: "
                              "health, metrics and the job API.")
    token = ctx.settings.api_token

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_sentence(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        error_id = secrets.token_hex(6)
        log.error("unexpected error in the REST API", exc_info=(type(exc), exc, exc.__traceback__),
                  extra={"error_id": error_id, "path": request.url.path, "method": request.method})
        return JSONResponse({"detail": f"internal error (error id {error_id}; the service log has "
                                       "the details)", "error_id": error_id}, status_code=500)

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if not token:
            return
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["health"])
    def readyz():
        """Readiness means "can accept studies": database, spool (writable, free
        space), listener, executor, completion monitor and outbox sender;
        503 with reasons. An unreachable destination PACS does not count
        (results wait in the outbox): see /delivery-health."""
        reasons = ctx.readiness()
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return {"ready": True, "reasons": []}

    @app.get("/delivery-health", tags=["health"])
    def delivery_health():
        """Result delivery: per destination whether the last attempt failed and
        for how long, outbox depth and oldest age; 503 when a destination has
        been unreachable longer than BRAINLINE_DEST_UNREACHABLE_SECONDS. For
        monitoring, not for a readiness probe."""
        health = ctx.delivery_health()
        return JSONResponse(health, status_code=200 if health["healthy"] else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(generate_latest(ctx.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    api = [Depends(require_token)]

    @app.get("/api/v1/jobs", tags=["jobs"], dependencies=api)
    def list_jobs(state: str | None = None,
                  limit: int = Query(100, ge=1, le=MAX_LIMIT, description="jobs per page (1 to 1000)"),
                  offset: int = Query(0, ge=0, le=MAX_DB_INT, description="jobs to skip")) -> dict:
        if state is not None and state not in JOB_STATES:
            raise HTTPException(422, f"invalid request: state must be one of {', '.join(JOB_STATES)}")
        jobs = ctx.store.list(state=state, limit=limit, offset=offset)
        return {"jobs": [job_view(j, with_stages=False) for j in jobs]}

    @app.get("/api/v1/jobs/{job_id}", tags=["jobs"], dependencies=api)
    def get_job(job_id: int) -> dict:
        job = ctx.store.get(_check_id("job", job_id))
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        return job_view(job)

    @app.post("/api/v1/jobs/{job_id}/retry", tags=["jobs"], dependencies=api, status_code=202)
    def retry_job(job_id: int) -> dict:
        try:
            ctx.store.reset_for_retry(_check_id("job", job_id))
        except KeyError:
            raise HTTPException(404, f"job {job_id} does not exist") from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None
        ctx.executor.submit(job_id)
        return job_view(ctx.store.get(job_id))

    @app.get("/api/v1/outbox", tags=["outbox"], dependencies=api)
    def list_outbox(state: str | None = None) -> dict:
        """Result deliveries: pending, sent, failed (gave up) or rejected (refused)."""
        states = tuple(o.value for o in OutboxState)
        if state is not None and state not in states:
            raise HTTPException(422, f"invalid request: state must be one of {', '.join(states)}")
        items = ctx.outbox.items([state] if state else None)
        return {"depth": ctx.outbox.depth(), "oldest_pending_age_s": round(ctx.outbox.oldest_pending_age(), 1),
                "destinations": sorted(ctx.outbox.destinations),
                "items": [outbox_view(i) for i in items]}

    @app.post("/api/v1/outbox/retry", tags=["outbox"], dependencies=api)
    def retry_outbox(item_id: list[int] | None = Query(default=None)) -> dict:
        """Make failed and rejected deliveries (all, or ?item_id=...) pending again."""
        for value in item_id or ():
            _check_id("outbox item", value)
        return {"requeued": ctx.outbox.retry(item_id)}

    @app.post("/api/v1/studies/{study_uid}/pull", tags=["studies"], dependencies=api,
              status_code=202)
    async def pull(study_uid: str) -> dict:
        """Retrieve a study from BRAINLINE_DICOMWEB_URL (QIDO-RS + WADO-RS) into
        the spool; a job follows after the quiet period."""
        try:
            result = await run_in_threadpool(pull_study, ctx.settings, ctx.spool,
                                             ctx.vault.study_key, study_uid, ctx.metrics)
        except PullError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        body = result.to_dict()
        body["study_key"] = ctx.vault.study_key(study_uid)
        body["next"] = (f"a job starts after {ctx.settings.stable_seconds:g} s without new "
                        "instances; see GET /api/v1/jobs")
        return body

    from .review_ui import review_router  # the review web UI under /review (its own log-in)

    app.include_router(review_router(ctx))
    app.include_router(create_qc_router(ctx))  # /api/v1/qc and /qc (service/api/qc_api.py)
    from .review_api import router as review_api_router  # POST/GET /api/v1/jobs/{id}/review (service/api/review_api.py)
    app.include_router(review_api_router(ctx, require_token))
    return app
