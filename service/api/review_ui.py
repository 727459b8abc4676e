"""The review web UI: a radiologist checks a job's segmentation and accepts or
rejects it (issue 12). Served by the FastAPI app under ``/review``, behind
log-in (accounts, sessions, CSRF and the audit trail: service/api/auth.py).

Pages
-----
``/review/login``           log-in form (throttled; every attempt audited)
``/review/worklist``        jobs awaiting review (oldest first; results held, or sent
                            marked "preliminary, not reviewed"), the latest reviewed
                            ones, and finished jobs for which no review was asked;
                            pseudonymised: job, shortened pseudonymous Study UID, date
                            received, site, volumes, number of QC findings
``/review/jobs/{id}``       the four co-registered sequences with the segmentation
                            overlay (axial/coronal/sagittal, mouse wheel, slider, arrow
                            keys, opacity, per-label toggles), volumes, tumour
                            components (click: go there), QC findings, the ACCEPT /
                            REJECT form (score 1-5, comment), the reviews and audit
                            events of the job, and "show identity"
``/review/audit``           the latest audit events (admin)

Roles: technicians see the worklist and the job pages; radiologists and
admins also accept/reject (``review.accept`` / ``review.reject``) and may
ask for the patient's real identity, which the gateway reads from the vault
(``ctx.vault.get("patient", pseudo_patient_id)``) for that one answer only
(never stored, logged or cached; the answer is ``no-store``) and audits.

Images: each sequence is sent once as a gzip'ed array of bytes (z, y, x) on
the reference grid, turned to the patient's LPS axes, cropped to the brain
mask and windowed to its 1st-99th percentile inside the brain; the
segmentation likewise (labels 1 NCR, 2 ED, 3 ET). The browser draws the
slices on <canvas> with plain JavaScript (service/api/web/static/viewer.js;
nothing from another host). The arrays are built on first use (or ahead, for
the jobs on the worklist) into ``<workspace>/review/`` and rebuilt when an
input changes; they hold pseudonymised pixels only.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import func, select

from ..db import Job, OutboxItem, OutboxState, Review, User
from ..gateway.reidentify import study_patient
from . import auth
from .auth import IDENTITY_ROLES, REVIEW_ROLES, LoginThrottle, SessionInvalid, SessionManager

log = logging.getLogger("brainline.review_ui")

PREFIX = "/review"
WEB = Path(__file__).resolve().parent / "web"
SESSION_COOKIE = "brainline_review"
LOGIN_COOKIE = "brainline_login"
ROLES = ("t1", "t1c", "t2", "flair")
ROLE_NAMES = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}
LABELS = {1: ("NCR", "necrotic / non-enhancing tumour core"), 2: ("ED", "peritumoral edema"),
          3: ("ET", "enhancing tumour")}
SCORES = {5: "5 - perfect", 4: "4 - good, minor flaws", 3: "3 - acceptable", 2: "2 - poor", 1: "1 - terrible"}
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml"}
MAX_FORM_BYTES = 64 * 1024
MAX_COMMENT = 4000
CACHE_VERSION = 1
#: above this many voxels per volume, axes finer than DISPLAY_MM are thinned
MAX_VOXELS = 8_000_000
DISPLAY_MM = 0.8
CROP_MARGIN = 4

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make browsers send "Origin: null" on form posts
    "Cache-Control": "no-store",
}


# -- small helpers -------------------------------------------------------------
def short_uid(uid: str | None) -> str:
    if not uid:
        return ""
    return uid if len(uid) <= 20 else f"{uid[:10]}…{uid[-6:]}"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") + " UTC" if value else ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _finding_text(item) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("message", "text", "finding", "flag", "reason", "description"):
            if isinstance(item.get(key), str):
                return item[key]
    return None


def qc_findings(work: Path, summary: dict | None = None) -> list[str]:
    """Every QC finding of a job in words: summary.json's ``qc_flags`` and the
    ``flags``/``findings``/``alarms`` of the QC stages' files, once each."""
    summary = summary if summary is not None else _read_json(work / "summary.json")
    found = [f for f in (_finding_text(x) for x in summary.get("qc_flags") or []) if f]
    for name in ("segmentation_qc.json", "image_qc.json", "qc.json"):
        data = _read_json(work / name)
        for key in ("flags", "findings", "alarms", "outliers"):
            value = data.get(key)
            if isinstance(value, list):
                found += [f for f in (_finding_text(x) for x in value) if f]
    return list(dict.fromkeys(found))


def job_volumes(summary: dict) -> dict[str, float | None]:
    vol = summary.get("volumes_ml") or {}
    return {"WT": vol.get("whole_tumor"), "TC": vol.get("tumor_core"), "ET": vol.get("3"),
            "ED": vol.get("2"), "NCR": vol.get("1")}


def _safe_next(value: str | None) -> str:
    """Only a local /review/ path (no open redirect)."""
    if value and value.startswith(PREFIX + "/") and not value.startswith("//") and "\\" not in value:
        parts = urlsplit(value)
        if not parts.scheme and not parts.netloc:
            return value
    return PREFIX + "/worklist"


# -- images for the browser ----------------------------------------------------
class NoImages(Exception):
    """The job's workspace has no images to review (yet, or any more)."""


_prep_locks: dict[str, threading.Lock] = {}
_prep_locks_guard = threading.Lock()


def _sources(work: Path) -> tuple[dict[str, tuple[Path, str]], Path | None]:
    roles = {}
    for role in ROLES:
        for folder in ("preprocessed", "registered"):
            path = work / folder / f"{role}.nii.gz"
            if path.exists():
                roles[role] = (path, folder)
                break
    seg = work / "segmentation.nii.gz"
    return roles, (seg if seg.exists() else None)


def _stamp(work: Path, paths: list[Path]) -> dict:
    out = {}
    for path in paths:
        st = path.stat()
        out[str(path.relative_to(work))] = [st.st_size, st.st_mtime_ns]
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def review_cache_ready(work: Path) -> bool:
    meta = _read_json(work / "review" / "meta.json")
    return meta.get("version") == CACHE_VERSION


def prepare_volumes(work: Path) -> dict:
    """Build (or reuse) ``<work>/review/``: one gzip'ed uint8 array per
    sequence and the segmentation, and ``meta.json`` (shape, spacing,
    windows, component positions). Thread-safe; raises NoImages."""
    with _prep_locks_guard:
        lock = _prep_locks.setdefault(str(work), threading.Lock())
    with lock:
        return _prepare(work)


def _prepare(work: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    roles, seg_path = _sources(work)
    if not roles:
        raise NoImages("the workspace has no registered or preprocessed sequences")
    mask_path = work / "brain_mask.nii.gz"
    inputs = [p for p, _ in roles.values()] + [p for p in (seg_path, mask_path, work / "summary.json") if p
                                                 and p.exists()]
    stamp = _stamp(work, inputs)
    cache = work / "review"
    meta_path = cache / "meta.json"
    old = _read_json(meta_path)
    if (old.get("version") == CACHE_VERSION and old.get("stamp") == stamp
            and all((cache / f).exists() for f in old.get("files", {}).values())):
        return old
    cache.mkdir(exist_ok=True)

    def oriented(image):
        return sitk.DICOMOrient(image, "LPS")

    first = roles[ROLES[0]] if ROLES[0] in roles else next(iter(roles.values()))
    grid = sitk.ReadImage(str(seg_path)) if seg_path else sitk.ReadImage(str(first[0]))

    def on_grid(image, interpolator):
        same = (image.GetSize() == grid.GetSize()
                and np.allclose(image.GetOrigin(), grid.GetOrigin(), atol=1e-3)
                and np.allclose(image.GetSpacing(), grid.GetSpacing(), atol=1e-4)
                and np.allclose(image.GetDirection(), grid.GetDirection(), atol=1e-4))
        return image if same else sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0)

    grid_o = oriented(grid)
    shape = grid_o.GetSize()[::-1]  # (z, y, x)
    brain = None
    if mask_path.exists():
        brain = sitk.GetArrayFromImage(oriented(on_grid(sitk.ReadImage(str(mask_path), sitk.sitkUInt8),
                                                        sitk.sitkNearestNeighbor))) > 0
    images = {}
    for role, (path, _folder) in roles.items():
        img = oriented(on_grid(sitk.ReadImage(str(path), sitk.sitkFloat32), sitk.sitkLinear))
        images[role] = sitk.GetArrayFromImage(img)
    labels = (sitk.GetArrayFromImage(oriented(sitk.Cast(grid, sitk.sitkUInt8))) if seg_path
              else np.zeros(shape, np.uint8))
    # crop to the brain (or to whatever is not background), with a margin
    region = brain if brain is not None and brain.any() else np.any([a > 0 for a in images.values()], axis=0)
    region = region | (labels > 0)
    if region.any():
        lo = [int(np.flatnonzero(region.any(axis=tuple(j for j in range(3) if j != i))).min()) for i in range(3)]
        hi = [int(np.flatnonzero(region.any(axis=tuple(j for j in range(3) if j != i))).max()) + 1
              for i in range(3)]
    else:
        lo, hi = [0, 0, 0], list(shape)
    lo = [max(0, v - CROP_MARGIN) for v in lo]
    hi = [min(n, v + CROP_MARGIN) for v, n in zip(hi, shape)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    spacing = list(grid_o.GetSpacing()[::-1])  # (z, y, x) mm
    size = [b - a for a, b in zip(lo, hi)]
    step = [1, 1, 1]
    if int(np.prod(size)) > MAX_VOXELS:
        step = [max(1, round(DISPLAY_MM / s)) for s in spacing]
    thin = tuple(slice(None, None, k) for k in step)
    labels_c = np.ascontiguousarray(labels[crop][thin]).astype(np.uint8)
    labels_c[labels_c == 4] = 3  # BraTS 2020's ET, should one come through
    labels_c[labels_c > 3] = 0
    brain_c = brain[crop][thin] if brain is not None else None
    files, windows = {}, {}
    for role, arr in images.items():
        arr = arr[crop][thin]
        inside = arr[brain_c] if brain_c is not None and brain_c.any() else arr[arr > 0]
        if inside.size > 2_000_000:
            inside = inside[:: inside.size // 1_000_000]
        if inside.size:
            w_lo, w_hi = (float(v) for v in np.percentile(inside, [1, 99]))
        else:
            w_lo, w_hi = float(arr.min()), float(arr.max())
        if w_hi <= w_lo:
            w_hi = w_lo + 1.0
        u8 = np.clip((arr - w_lo) * (255.0 / (w_hi - w_lo)), 0, 255).astype(np.uint8)
        _write_atomic(cache / f"{role}.u8.gz", gzip.compress(np.ascontiguousarray(u8).tobytes(), 3))
        files[role] = f"{role}.u8.gz"
        windows[role] = [round(w_lo, 3), round(w_hi, 3)]
    _write_atomic(cache / "seg.u8.gz", gzip.compress(labels_c.tobytes(), 3))
    files["seg"] = "seg.u8.gz"
    out_shape = list(labels_c.shape)
    out_spacing = [round(s * k, 4) for s, k in zip(spacing, step)]

    def to_voxel(point_lps) -> list[int] | None:
        try:
            x, y, z = grid_o.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps])
        except Exception:
            return None
        idx = [(c - a) / k for c, a, k in zip((z, y, x), lo, step)]
        return [int(min(max(round(v), 0), n - 1)) for v, n in zip(idx, out_shape)]

    summary = _read_json(work / "summary.json")
    components = []
    for i, comp in enumerate(summary.get("whole_tumor_components") or [], start=1):
        pos = to_voxel(comp.get("centroid_lps_mm") or [])
        components.append({"index": i, "volume_ml": comp.get("volume_ml"), "position": pos})
    tumour = labels_c > 0
    if tumour.any():
        z = int(np.argmax(tumour.sum(axis=(1, 2))))
        ys, xs = np.nonzero(tumour[z])
        start = [z, int(np.median(ys)), int(np.median(xs))]
    else:
        start = [n // 2 for n in out_shape]
    meta = {
        "version": CACHE_VERSION, "stamp": stamp, "files": files,
        "shape": out_shape, "spacing": out_spacing, "orientation": "LPS",
        "roles": [r for r in ROLES if r in roles], "role_names": {r: ROLE_NAMES[r] for r in roles},
        "source": {r: folder for r, (_p, folder) in roles.items()}, "segmentation": seg_path is not None,
        "windows": windows, "crop": [[a, b] for a, b in zip(lo, hi)], "step": step,
        "labels": {str(v): {"name": LABELS[v][0], "description": LABELS[v][1],
                            "voxels": int((labels_c == v).sum())} for v in LABELS},
        "components": components, "start": start,
    }
    _write_atomic(meta_path, json.dumps(meta).encode())
    return meta


# -- the router ----------------------------------------------------------------
def _templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(WEB / "templates")),
                             autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True,
                             lstrip_blocks=True)
    env.globals.update(prefix=PREFIX, short_uid=short_uid, when=_when, role_names=ROLE_NAMES, labels=LABELS,
                       scores=SCORES)
    return env


def review_router(ctx) -> APIRouter:
    """The review UI's routes for ``create_app(ctx)``: app.include_router(review_router(ctx))."""
    settings = ctx.settings
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    templates = _templates()
    manager = SessionManager(auth.session_secret(settings),
                             getattr(settings, "review_session_minutes", 30.0),
                             getattr(settings, "review_session_max_hours", 12.0))
    throttle = LoginThrottle(getattr(settings, "review_login_max_failures", 5))
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="review-prefetch")
    prefetching: set[int] = set()
    prefetch_lock = threading.Lock()

    def workspace(job_id: int) -> Path:
        return settings.workspace_dir / f"job-{job_id:06d}"

    def secure(request: Request) -> bool:
        return bool(settings.tls_cert) or request.url.scheme == "https"

    def headers(response: Response) -> Response:
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def set_session(response: Response, request: Request, value: str) -> None:
        # a browser-session cookie; the signed time inside it is what expires
        response.set_cookie(SESSION_COOKIE, value, path=PREFIX, httponly=True, samesite="strict",
                            secure=secure(request))

    def render(request: Request, name: str, status: int = 200, who: tuple | None = None, **values) -> Response:
        session, user = who if who else (None, None)
        html = templates.get_template(name).render(
            user=user, csrf=manager.csrf_token(session) if session else "", request_path=request.url.path,
            can_review=bool(user and user.role in REVIEW_ROLES), **values)
        response = headers(HTMLResponse(html, status_code=status))
        if session is not None and user is not None:
            set_session(response, request, manager.refresh(session, user))  # sliding idle expiry
        return response

    def client_of(request: Request) -> str:
        return request.client.host if request.client else ""

    def session_user(request: Request) -> tuple[auth.SessionData, User]:
        session = manager.read(request.cookies.get(SESSION_COOKIE))
        with ctx.sessions() as s:
            user = s.get(User, session.user_id)
        if user is None:
            raise SessionInvalid("please log in")
        if not user.active:
            raise SessionInvalid("your account is disabled")
        if auth.password_fingerprint(user.password_hash) != session.fingerprint:
            raise SessionInvalid("your password was changed; please log in again")
        return session, user

    def page_user(request: Request) -> tuple[auth.SessionData, User]:
        """The logged-in user, or a redirect to the log-in page."""
        try:
            return session_user(request)
        except SessionInvalid as exc:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if request.method != "GET":  # back to the page the form was on, not the POST address
                target = target.rsplit("/", 1)[0] if target.endswith("/review") else PREFIX + "/worklist"
            raise HTTPException(303, exc.reason, headers={
                "Location": f"{PREFIX}/login?next={quote(target)}&why={quote(exc.reason)}",
                **SECURITY_HEADERS}) from None

    def data_user(request: Request) -> tuple[auth.SessionData, User]:
        try:
            return session_user(request)
        except SessionInvalid as exc:
            raise HTTPException(401, exc.reason, headers=SECURITY_HEADERS) from None

    async def form_of(request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "the form is too large")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype == "application/x-www-form-urlencoded":
                return {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
            if ctype == "application/json" and body:
                data = json.loads(body)
                return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (UnicodeDecodeError, ValueError):
            raise HTTPException(400, "the form cannot be read") from None
        return {}

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if not origin or origin == "null":
            return origin is None
        return urlsplit(origin).netloc == request.headers.get("host", "")

    def check_post(request: Request, session, user, form: dict) -> None:
        token = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if not same_origin(request) or not manager.check_csrf(session, token):
            auth.audit(ctx.sessions, user.username, "csrf_refused", detail=f"POST {request.url.path}")
            raise HTTPException(403, "this request was refused: its CSRF token is missing or wrong (reload the "
                                     "page and try again)", headers=SECURITY_HEADERS)

    def job_or_404(job_id: int) -> Job:
        if not 1 <= job_id <= 2**63 - 1:
            raise HTTPException(404, f"job {job_id} does not exist")
        job = ctx.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist", headers=SECURITY_HEADERS)
        return job

    def error_page(request: Request, who, status: int, message: str) -> Response:
        return render(request, "error.html", status=status, who=who, message=message)

    # -- log-in / log-out ------------------------------------------------------
    @router.get("")
    @router.get("/")
    def index() -> Response:
        return headers(RedirectResponse(PREFIX + "/worklist", status_code=303))

    def login_page(request: Request, message: str = "", status: int = 200, username: str = "",
                   next_path: str | None = None) -> Response:
        token = manager.login_token()
        response = render(request, "login.html", status=status, message=message, login_token=token,
                          username=username, next_path=_safe_next(next_path or request.query_params.get("next")))
        response.set_cookie(LOGIN_COOKIE, token, path=PREFIX, httponly=True, samesite="strict",
                            secure=secure(request), max_age=3600)
        return response

    @router.get("/login")
    def login_form(request: Request) -> Response:
        try:
            session_user(request)
        except SessionInvalid:
            why = request.query_params.get("why", "")
            return login_page(request, message=why[:200] if why else "")
        return headers(RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303))

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await form_of(request)
        username = form.get("username", "").strip()
        password = form.get("password", "")
        next_path = _safe_next(form.get("next"))
        if not same_origin(request) or not manager.check_login_token(request.cookies.get(LOGIN_COOKIE),
                                                                     form.get("csrf_token")):
            return login_page(request, "the log-in form was stale; please try again", 403, username, next_path)
        client = client_of(request)
        wait = throttle.locked_for(username, client)
        if wait > 0:
            auth.audit(ctx.sessions, auth.audit_name(username), "login_locked",
                       detail=f"log-in refused for {wait:.0f} s after repeated failures")
            return login_page(request, f"too many failed log-ins: try again in {max(1, round(wait))} s", 429,
                              username, next_path)
        user, why = await run_in_threadpool(auth.authenticate, ctx.sessions, username, password)
        if user is None:
            throttle.failed(username, client)
            auth.audit(ctx.sessions, auth.audit_name(username), "login_failed", detail=why)
            log.info("review UI log-in failed", extra={"reason": why})
            return login_page(request, "wrong username or password" if why != "account disabled"
                              else "this account is disabled", 401, username, next_path)
        throttle.succeeded(username)
        auth.audit(ctx.sessions, user.username, "login", detail=f"role {user.role}")
        response = headers(RedirectResponse(next_path, status_code=303))
        set_session(response, request, manager.issue(user))
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await form_of(request)
        try:
            session, user = session_user(request)
        except SessionInvalid:
            return headers(RedirectResponse(PREFIX + "/login", status_code=303))
        check_post(request, session, user, form)
        manager.revoke(session)
        auth.audit(ctx.sessions, user.username, "logout")
        response = headers(RedirectResponse(PREFIX + "/login?why=" + quote("you logged out"), status_code=303))
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    # -- worklist --------------------------------------------------------------
    def row_of(job: Job, review: Review | None = None, held: int = 0) -> dict:
        work = workspace(job.id)
        summary = _read_json(work / "summary.json")
        return {"id": job.id, "study": short_uid(job.pseudo_study_uid), "study_uid": job.pseudo_study_uid or "",
                "received": _when(job.created_at), "site": job.site or "", "state": job.state,
                "review_state": job.review_state, "volumes": job_volumes(summary),
                "qc": len(qc_findings(work, summary)), "review": review, "held": held}

    def held_counts(session, job_ids: list[int]) -> dict[int, int]:
        if not job_ids:
            return {}
        rows = session.execute(select(OutboxItem.job_id, func.count()).where(
            OutboxItem.job_id.in_(job_ids), OutboxItem.state == OutboxState.HELD.value).group_by(OutboxItem.job_id))
        return {job_id: count for job_id, count in rows}

    def start_prefetch(job_ids: list[int]) -> None:
        for job_id in job_ids:
            work = workspace(job_id)
            with prefetch_lock:
                if job_id in prefetching or not work.is_dir() or review_cache_ready(work):
                    continue
                prefetching.add(job_id)

            def run(job_id=job_id, work=work):
                try:
                    prepare_volumes(work)
                except Exception:
                    log.info("review images not prepared ahead", exc_info=True, extra={"job_id": job_id})
                finally:
                    with prefetch_lock:
                        prefetching.discard(job_id)

            prefetch.submit(run)

    @router.get("/worklist")
    def worklist(request: Request) -> Response:
        who = page_user(request)
        with ctx.sessions() as s:
            pending = list(s.scalars(select(Job).where(Job.review_state == "pending")
                                     .order_by(Job.created_at, Job.id).limit(500)))
            unrequested = list(s.scalars(select(Job).where(Job.state == "done", Job.review_state.is_(None))
                                         .order_by(Job.created_at.desc(), Job.id.desc()).limit(50)))
            reviewed = list(s.scalars(select(Job).where(Job.review_state.in_(("accepted", "rejected")))
                                      .order_by(Job.updated_at.desc(), Job.id.desc()).limit(25)))
            latest: dict[int, Review] = {}
            if reviewed:
                for r in s.scalars(select(Review).where(Review.job_id.in_([j.id for j in reviewed]))
                                   .order_by(Review.created_at)):
                    latest[r.job_id] = r
            held = held_counts(s, [j.id for j in pending])
        start_prefetch([j.id for j in pending[:10]])
        return render(request, "worklist.html", who=who,
                      pending=[row_of(j, held=held.get(j.id, 0)) for j in pending],
                      unrequested=[row_of(j) for j in unrequested],
                      reviewed=[row_of(j, latest.get(j.id)) for j in reviewed])

    # -- job page --------------------------------------------------------------
    def job_context(job: Job) -> dict:
        work = workspace(job.id)
        summary = _read_json(work / "summary.json")
        with ctx.sessions() as s:
            reviews = list(s.scalars(select(Review).where(Review.job_id == job.id).order_by(Review.created_at)))
        events = auth.audit_events(ctx.sessions, job_id=job.id)
        components = []
        for i, comp in enumerate(summary.get("whole_tumor_components") or [], start=1):
            components.append({"index": i, "volume_ml": comp.get("volume_ml"),
                               "labels": comp.get("label_volumes_ml") or {},
                               "centroid": comp.get("centroid_lps_mm") or []})
        reviewable = job.state == "done" and job.review_state == "pending"
        with ctx.sessions() as s:
            held = held_counts(s, [job.id]).get(job.id, 0)
        return {"job": job, "row": row_of(job, held=held), "summary": summary, "findings": qc_findings(work, summary),
                "components": components, "reviews": reviews, "events": events, "reviewable": reviewable,
                "tiv": summary.get("tiv_ml"), "has_images": any(_sources(work)[0]),
                "backend": ((summary.get("backends") or {}).get("segmentation") or {}),
                "inputs_note": (summary.get("inputs") or {}).get("note") or ""}

    @router.get("/jobs/{job_id}")
    def job_page(request: Request, job_id: int) -> Response:
        who = page_user(request)
        job = job_or_404(job_id)
        work = workspace(job_id)
        if work.is_dir() and not review_cache_ready(work):
            start_prefetch([job_id])
        reviewed = request.query_params.get("reviewed", "")
        return render(request, "job.html", who=who, error="", form={}, reviewed=reviewed if reviewed in
                      ("accepted", "rejected") else "", can_identity=who[1].role in IDENTITY_ROLES,
                      **job_context(job))

    def prepared_volumes(request: Request, job_id: int) -> dict:
        """The prepared review volumes of a job for a logged-in user (404 in words)."""
        data_user(request)
        job_or_404(job_id)
        try:
            return prepare_volumes(workspace(job_id))
        except NoImages as exc:
            raise HTTPException(404, f"job {job_id}: {exc}", headers=SECURITY_HEADERS) from None

    @router.get("/jobs/{job_id}/volumes.json")
    def volumes_meta(request: Request, job_id: int) -> Response:
        meta = prepared_volumes(request, job_id)
        body = {k: v for k, v in meta.items() if k not in ("stamp", "files")}
        body["volumes"] = [*meta["roles"], "seg"]
        return headers(JSONResponse(body))

    @router.get("/jobs/{job_id}/volume/{name}")
    def volume(request: Request, job_id: int, name: str) -> Response:
        meta = prepared_volumes(request, job_id)
        filename = meta["files"].get(name)
        if filename is None:
            raise HTTPException(404, f"job {job_id} has no volume {name!r}", headers=SECURITY_HEADERS)
        return headers(FileResponse(workspace(job_id) / "review" / filename, media_type="application/octet-stream",
                                    headers={"Content-Encoding": "gzip"}))

    # -- review decision -------------------------------------------------------
    @router.post("/jobs/{job_id}/review")
    async def review_job(request: Request, job_id: int) -> Response:
        form = await form_of(request)
        who = page_user(request)
        session, user = who
        check_post(request, session, user, form)
        job = job_or_404(job_id)
        if user.role not in REVIEW_ROLES:
            auth.audit(ctx.sessions, user.username, "review_refused", job_id,
                       detail=f"role {user.role} may not accept or reject")
            return error_page(request, who, 403, f"Your role ({user.role}) may view results but not accept or "
                                                 "reject them; a radiologist must review this job.")
        decision = form.get("decision", "")
        comment = form.get("comment", "").strip()[:MAX_COMMENT] or None
        score_text = form.get("score", "").strip()
        problems = []
        score = None
        if score_text:
            if score_text.isdigit() and 1 <= int(score_text) <= 5:
                score = int(score_text)
            else:
                problems.append("the score must be a whole number from 1 to 5")
        if decision not in ("accept", "reject"):
            problems.append("choose ACCEPT or REJECT")
        elif decision == "accept" and score is None and not problems:
            problems.append("accepting needs a score from 1 to 5")
        elif decision == "reject" and not comment:
            problems.append("rejecting needs a comment that says why (it goes into the report)")

        def again(status: int, message: str) -> Response:
            return render(request, "job.html", status=status, who=who, error=message, reviewed="",
                          can_identity=user.role in IDENTITY_ROLES, form=form, **job_context(ctx.store.get(job_id)))

        if problems:
            words = "; ".join(problems)
            return again(422, words[:1].upper() + words[1:] + ".")
        try:
            from ..gateway import review
        except ImportError:
            return again(503, "Review decisions are not available in this installation (service.review is "
                              "missing).")
        reviewer = user.display_name or user.username
        fn = review.accept if decision == "accept" else review.reject
        try:
            outcome = await run_in_threadpool(fn, ctx, job.id, reviewer=reviewer, score=score, comment=comment,
                                              user_id=user.id)
        except review.ReviewError as exc:
            auth.audit(ctx.sessions, user.username, f"{decision}_refused", job.id, detail=str(exc)[:500])
            status = getattr(exc, "status", 409)
            return again(status if status in (404, 409, 422) else 409, f"This job cannot be {decision}ed: {exc}")
        action = "review_accept" if decision == "accept" else "review_reject"
        auth.audit(ctx.sessions, user.username, action, job.id,
                   detail=(f"{decision}ed" + (f", score {score}" if score is not None else "")
                           + (f"; {_outcome_words(outcome)}" if outcome else "")))
        return headers(RedirectResponse(f"{PREFIX}/jobs/{job.id}?reviewed={decision}ed", status_code=303))

    # -- identity (gateway) ----------------------------------------------------
    @router.post("/jobs/{job_id}/identity")
    async def identity(request: Request, job_id: int) -> Response:
        form = await form_of(request)
        session, user = data_user(request)
        check_post(request, session, user, form)
        job = job_or_404(job_id)
        if user.role not in IDENTITY_ROLES:
            auth.audit(ctx.sessions, user.username, "identity_refused", job.id,
                       detail=f"role {user.role} may not see patient identity")
            raise HTTPException(403, f"your role ({user.role}) may not see the patient's identity",
                                headers=SECURITY_HEADERS)
        patient = ctx.vault.get("patient", job.pseudo_patient_id) if job.pseudo_patient_id else None
        study = ctx.vault.get("study", job.pseudo_study_uid) if job.pseudo_study_uid else None
        patient = study_patient(study, patient)   # the attributes this job's study came with
        if patient is None:
            auth.audit(ctx.sessions, user.username, "identity_missing", job.id,
                       detail="the vault holds no identity for this job")
            raise HTTPException(404, "the vault holds no identity for this job (never received, or removed "
                                     "after the retention period)", headers=SECURITY_HEADERS)
        auth.audit(ctx.sessions, user.username, "identity_view", job.id, detail="patient identity shown")
        body = {
            "patient_name": _person_name(patient.get("PatientName", "")),
            "patient_id": patient.get("PatientID", ""),
            "issuer": patient.get("IssuerOfPatientID", ""),
            "birth_date": _dicom_date(patient.get("PatientBirthDate", "")),
            "sex": patient.get("PatientSex", ""),
            "accession_number": (study or {}).get("AccessionNumber", ""),
            "study_id": (study or {}).get("StudyID", ""),
        }
        return headers(JSONResponse(body))

    # -- audit (admin) ---------------------------------------------------------
    @router.get("/audit")
    def audit_page(request: Request) -> Response:
        who = page_user(request)
        if who[1].role != "admin":
            return error_page(request, who, 403, "Only an admin may read the audit trail of every job.")
        return render(request, "audit.html", who=who, events=auth.audit_events(ctx.sessions, limit=500))

    # -- image-QC overview for logged-in users (the /qc page, under the session cookie's path) --
    @router.get("/qc")
    async def qc_page(request: Request) -> Response:
        """The /qc figures (service/api/qc_api.py) for any logged-in user: the
        session cookie is scoped to /review, so the page is served here too."""
        from ..compute.qc_history import qc_overview
        from .qc_api import render_overview
        await run_in_threadpool(page_user, request)
        data = await run_in_threadpool(qc_overview, ctx.sessions, days=90, outliers=20,
                                       outlier_z=float(getattr(settings, "qc_outlier_z", 3.5)))
        response = headers(HTMLResponse(render_overview(data)))
        # the overview carries its own inline <style>; nothing else is allowed
        response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
        return response

    # -- static files ----------------------------------------------------------
    static_root = (WEB / "static").resolve()

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        path = (static_root / name).resolve()
        if path.parent != static_root or path.suffix not in STATIC_TYPES or not path.is_file():
            raise HTTPException(404, "not found")
        response = FileResponse(path, media_type=STATIC_TYPES[path.suffix])
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return router


def _outcome_words(outcome) -> str:
    """A short, identity-free summary of what review.accept/reject did."""
    if not isinstance(outcome, dict):
        return ""
    parts = [f"{key} {outcome[key]}" for key in ("queued", "released", "replaced", "cancelled", "retracted")
             if isinstance(outcome.get(key), int) and outcome[key]]
    for key in ("not_delivered", "not_retracted"):
        if outcome.get(key):
            parts.append(f"{key.replace('_', ' ')}: {len(outcome[key])}")
    if isinstance(outcome.get("note"), str):
        parts.append(outcome["note"][:160])
    return ", ".join(parts)


def _person_name(value: str) -> str:
    family, _, rest = str(value or "").partition("^")
    given = " ".join(p for p in rest.split("^") if p)
    return f"{family}, {given}" if family and given else (family or given)


def _dicom_date(value: str) -> str:
    value = str(value or "")
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value
