"""REST API (FastAPI): health, readiness, Prometheus metrics and the job API.

``/api/`` requires ``Authorization: Bearer <BRAINLINE_API_TOKEN>`` when a token
is configured; ``/healthz``, ``/readyz`` and ``/metrics`` do not. Answers are
pseudonymous: jobs show keyed-hash study keys and pseudonymous UIDs only.
"""

from __future__ import annotations

import hmac
import json
from datetime import datetime

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from brainline import __version__

from .db import Job, Stage
from .dicomweb_pull import PullError, pull_study
from .jobs import JobConflict

_bearer = HTTPBearer(auto_error=False)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def stage_view(stage: Stage) -> dict:
    return {
        "name": stage.name,
        "state": stage.state,
        "attempts": stage.attempts,
        "started_at": _iso(stage.started_at),
        "finished_at": _iso(stage.finished_at),
        "duration_s": round(stage.duration_s, 3) if stage.duration_s is not None else None,
        "error": stage.error,
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
        "error": job.error,
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
            "last_error": item.last_error, "created_at": _iso(item.created_at),
            "next_attempt_at": _iso(item.next_attempt_at), "sent_at": _iso(item.sent_at)}


def create_app(ctx) -> FastAPI:
    app = FastAPI(title="BrainLine", version=__version__,
                  description="Brain MRI processing service for neuro-oncology: "
                              "health, metrics and the job API.")
    token = ctx.settings.api_token

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
        """Readiness: database, spool, listener, executor; 503 with reasons."""
        reasons = ctx.readiness()
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return {"ready": True, "reasons": []}

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(generate_latest(ctx.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    api = [Depends(require_token)]

    @app.get("/api/v1/jobs", tags=["jobs"], dependencies=api)
    def list_jobs(state: str | None = None, limit: int = 100, offset: int = 0) -> dict:
        jobs = ctx.store.list(state=state, limit=min(max(limit, 1), 1000), offset=max(offset, 0))
        return {"jobs": [job_view(j, with_stages=False) for j in jobs]}

    @app.get("/api/v1/jobs/{job_id}", tags=["jobs"], dependencies=api)
    def get_job(job_id: int) -> dict:
        job = ctx.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        return job_view(job)

    @app.post("/api/v1/jobs/{job_id}/retry", tags=["jobs"], dependencies=api, status_code=202)
    def retry_job(job_id: int) -> dict:
        try:
            ctx.store.reset_for_retry(job_id)
        except KeyError:
            raise HTTPException(404, f"job {job_id} does not exist") from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None
        ctx.executor.submit(job_id)
        return job_view(ctx.store.get(job_id))

    @app.get("/api/v1/outbox", tags=["outbox"], dependencies=api)
    def list_outbox(state: str | None = None) -> dict:
        """Result deliveries: pending, sent, failed (gave up) or rejected (refused)."""
        items = ctx.outbox.items([state] if state else None)
        return {"depth": ctx.outbox.depth(), "oldest_pending_age_s": round(ctx.outbox.oldest_pending_age(), 1),
                "destinations": sorted(ctx.outbox.destinations),
                "items": [outbox_view(i) for i in items]}

    @app.post("/api/v1/outbox/retry", tags=["outbox"], dependencies=api)
    def retry_outbox(item_id: list[int] | None = Query(default=None)) -> dict:
        """Make failed and rejected deliveries (all, or ?item_id=...) pending again."""
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

    return app
