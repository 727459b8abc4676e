"""REST routes of the review lifecycle for scripts (the review web UI calls
service/gateway/review.py directly): ``POST /api/v1/jobs/{id}/review`` (ACCEPT or
REJECT) and ``GET /api/v1/jobs/{id}/review``. Behind the same bearer token as
the rest of ``/api/v1``. Errors are sentences: 404 unknown job, 409 wrong
state (already reviewed, superseded, not finished), 422 invalid
input (score outside 1-5, a rejection without a reason)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field

from ..gateway import review
from .auth import audit

MAX_DB_INT = 2**63 - 1


class ReviewRequest(BaseModel):
    decision: Literal["accept", "reject"] = Field(description="accept: verified SR and re-issued PDF; reject: "
                                                              "retraction (IOCM KOS) and a PDF without volumes")
    reviewer: str = Field(min_length=1, max_length=128, description="the reviewer's name as it should appear "
                                                                    "in the verified SR and the PDF")
    score: int | None = Field(default=None, ge=1, le=5, description="1 (terrible) to 5 (perfect); required to accept")
    comment: str | None = Field(default=None, max_length=review.MAX_COMMENT,
                                description="comment; required to reject (the reason)")


def router(ctx, require_token) -> APIRouter:
    """The review routes for the service context ``ctx``; ``require_token``
    is the API's bearer-token dependency."""
    routes = APIRouter(tags=["review"], dependencies=[Depends(require_token)])

    def _job_id(job_id: int) -> int:
        if not 1 <= job_id <= MAX_DB_INT:
            raise HTTPException(404, f"job {job_id} does not exist")
        return job_id

    @routes.post("/api/v1/jobs/{job_id}/review")
    def post_review(job_id: int, body: ReviewRequest) -> dict:
        """ACCEPT or REJECT the segmentation of a finished job not reviewed yet."""
        username = f"api:{' '.join(body.reviewer.split())}"[:64]
        try:
            if body.decision == "accept":
                outcome = review.accept(ctx, _job_id(job_id), body.reviewer, body.score, body.comment, None)
            else:
                outcome = review.reject(ctx, _job_id(job_id), body.reviewer, body.score, body.comment or "", None)
        except review.ReviewError as exc:
            if exc.status != 404:
                audit(ctx.sessions, username, f"{body.decision}_refused", job_id, detail=str(exc)[:500])
            raise HTTPException(exc.status, str(exc)) from None
        audit(ctx.sessions, username, f"review_{body.decision}", job_id,
              detail=f"{body.decision}ed over the REST API" + (f", score {body.score}" if body.score else ""))
        return outcome

    @routes.get("/api/v1/jobs/{job_id}/review")
    def get_review(job_id: int) -> dict:
        """A job's site, review mode, review state and reviews."""
        try:
            return review.review_record(ctx, _job_id(job_id))
        except review.ReviewError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    return routes
