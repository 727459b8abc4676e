"""Quality-control overview (issue 12): ``GET /api/v1/qc`` (JSON) and
``GET /qc`` (an HTML page), per site and scanner: the number of series, the
median of each MRQy metric per series role, the discord figures per site and
model, and the most recent outliers in words (figures from
service/compute/qc_history.py). Pseudonymous: sites are calling AE titles, jobs are
named by id.

Authentication: both routes take ``Authorization: Bearer
<BRAINLINE_API_TOKEN>`` like the rest of ``/api/v1`` (open when no token is
configured, like them). A user logged in to the review UI sees the same
page at ``/review/qc`` (service/api/review_ui.py: its session cookie is
scoped to ``/review``).
"""

from __future__ import annotations

import hmac
import html

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from brainline.pipelines.image_qc import METRICS, TISSUE_METRICS

from ..compute.qc_history import qc_overview

_bearer = HTTPBearer(auto_error=False)


def create_qc_router(ctx) -> APIRouter:
    """The /api/v1/qc and /qc routes of the service context ``ctx``."""
    router = APIRouter()
    token = ctx.settings.api_token
    default_z = float(getattr(ctx.settings, "qc_outlier_z", 3.5))

    def token_ok(creds: HTTPAuthorizationCredentials | None) -> bool:
        if not token:
            return True
        return creds is not None and hmac.compare_digest(creds.credentials.encode(), token.encode())

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if not token_ok(creds):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def overview(days: int, outliers: int) -> dict:
        return qc_overview(ctx.sessions, days=days, outliers=outliers, outlier_z=default_z)

    @router.get("/api/v1/qc", tags=["qc"], dependencies=[Depends(require_token)])
    async def qc_json(days: int = Query(90, ge=1, le=3650, description="days of history (1 to 3650)"),
                      outliers: int = Query(20, ge=0, le=500, description="recent outliers listed (0 to 500)")
                      ) -> dict:
        """Image-quality metrics per site, scanner and series role (series
        count, protocols, median per metric), discord figures per site and
        model, recent outliers in words."""
        return await run_in_threadpool(overview, days, outliers)

    @router.get("/qc", tags=["qc"], response_class=HTMLResponse)
    async def qc_page(creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
                      days: int = Query(90, ge=1, le=3650), outliers: int = Query(20, ge=0, le=500)):
        """The same figures as an HTML page (bearer token; logged-in review-UI
        users: /review/qc)."""
        if not token_ok(creds):
            return HTMLResponse(_page("Quality control", "<p>Send the API bearer token to see this page, "
                                                          "or log in to the review UI and open /review/qc.</p>"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        data = await run_in_threadpool(overview, days, outliers)
        return HTMLResponse(render_overview(data))

    return router


# --------------------------------------------------------------------------- HTML

_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px;text-align:right}th{background:#eee}
td.l,th.l{text-align:left}h2{margin-top:1.5em}.note{color:#555;font-size:13px}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _num(v) -> str:
    return "–" if v is None else html.escape(f"{v:.4g}")


def render_overview(data: dict) -> str:
    """The /qc page of :func:`brainline.service.compute.qc_history.qc_overview`'s figures."""
    e = html.escape
    metrics = list(METRICS + TISSUE_METRICS)
    parts = [f"<p class='note'>Since {e(data['since'])} ({data['days']} days). Medians per series role; "
             f"outliers: |robust z| &ge; {data['outlier_z']:g} against the same site, scanner and role. "
             "Metric definitions: MRQy (Sadri et al. 2020), see pipelines/image_qc.py.</p>"]
    if not data["sites"]:
        parts.append("<p>No quality-control figures yet.</p>")
    for site in data["sites"]:
        parts.append(f"<h2>Site {e(site['site'] or '(unknown calling AE title)')}</h2>")
        for sc in site["scanners"]:
            parts.append(f"<h3>{e(sc['scanner'] or '(unknown scanner)')}: {sc['series']} series, "
                         f"{sc['studies']} studies</h3>")
            head = "".join(f"<th>{e(m)}</th>" for m in metrics)
            rows = "".join(
                f"<tr><td class='l'>{e(r['label'])}</td><td class='l'>{e(', '.join(r['protocols']))}</td>"
                f"<td>{r['series']}</td>" + "".join(f"<td>{_num(r['median'].get(m))}</td>" for m in metrics)
                + "</tr>" for r in sc["roles"])
            parts.append(f"<table><tr><th class='l'>series</th><th class='l'>protocols</th><th>n</th>{head}"
                         f"</tr>{rows}</table>")
        for model in site["segmentation"]:
            dice = ", ".join(f"{e(k)} {_num(v)}" for k, v in model["median_dice_to_fusion"].items())
            parts.append(f"<p>Segmentation {e(model['model'] or '(unknown model)')}: {model['studies']} studies, "
                         f"median risk score {_num(model['median_risk_score'])}; median Dice to the fusion: "
                         f"{dice or '–'}</p>")
    parts.append("<h2>Recent outliers</h2>")
    if data["recent_outliers"]:
        rows = "".join(f"<tr><td class='l'>{e(o['at'])}</td><td>{o['job_id']}</td><td class='l'>{e(o['site'])}</td>"
                       f"<td class='l'>{e(o['scanner'])}</td><td class='l'>{e(o['words'])}</td>"
                       f"<td>{_num(o['value'])}</td></tr>" for o in data["recent_outliers"])
        parts.append("<table><tr><th class='l'>when (UTC)</th><th>job</th><th class='l'>site</th>"
                     f"<th class='l'>scanner</th><th class='l'>finding</th><th>value</th></tr>{rows}</table>")
    else:
        parts.append("<p>None.</p>")
    return _page("Quality control", "".join(parts))
