"""Accounts, passwords, sessions, CSRF tokens and the audit trail of the
review web UI (service/api/review_ui.py).

* **Users** (table ``users``): username, display name, role (radiologist,
  technician, admin), active flag. Managed with ``brainline user
  add|list|disable|enable|passwd``.
* **Passwords** are hashed with scrypt (hashlib, N=2^15, r=8, p=1, 16-byte
  random salt per user, 32-byte key); the stored string carries its
  parameters (``scrypt$N$r$p$salt$hash``, base64), so the cost can be raised
  later without breaking stored hashes. Verification runs in constant time and
  an unknown user costs the same as a wrong password.
* **Sessions** are cookies signed with itsdangerous (HMAC-SHA256) under a key
  derived with HKDF from BRAINLINE_REVIEW_SECRET, or from BRAINLINE_VAULT_KEY
  when that is empty (no new secret to manage; another vault key logs
  everybody out). The cookie holds the user id, a random session id, a
  fingerprint of the password hash (a password change ends every session of
  that user) and the log-in time; nothing else. It expires after
  BRAINLINE_REVIEW_SESSION_MINUTES without a request (sliding: every page
  re-signs it) and BRAINLINE_REVIEW_SESSION_MAX_HOURS after log-in, whatever
  happens. Log-out revokes the session id in the process. The user row is
  read on every request: a disabled user or a changed role takes effect at
  once. Cookie flags: HttpOnly, SameSite=Strict, Path=/review, Secure when the
  API speaks HTTPS.
* **CSRF**: every POST carries a token bound to the session (HMAC of the
  session id), as the form field ``csrf_token`` or the header
  ``X-CSRF-Token``; the log-in form uses a double-submit cookie. A POST whose
  Origin header names another host is refused as well.
* **Throttling**: after BRAINLINE_REVIEW_LOGIN_MAX_FAILURES failed log-ins of
  one username, or 4x that many from one client address, within 15 minutes,
  log-ins are refused for a while (30 s, doubling with every further failure,
  at most 15 minutes), also with the right password.
* **Audit** (table ``audit_events``): every log-in, failed log-in, log-out,
  review decision and identity view, with user, time, job and a short detail
  that never holds patient identity.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select

from ..db import AuditEvent, User, utcnow

ROLES = ("radiologist", "technician", "admin")
#: roles that may ACCEPT/REJECT results
REVIEW_ROLES = frozenset({"radiologist", "admin"})
#: roles that may see a patient's real identity (through the vault)
IDENTITY_ROLES = frozenset({"radiologist", "admin"})

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 2**20
SALT_BYTES, KEY_BYTES = 16, 32


class UserError(ValueError):
    """A user cannot be created or changed; the message says why."""


# -- passwords ----------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=SCRYPT_MAXMEM)


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$<salt>$<key>`` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


_dummy_hash: list[str] = []


def _dummy() -> str:
    """A hash verified against when the user does not exist, so that both cost the same."""
    if not _dummy_hash:
        _dummy_hash.append(hash_password(secrets.token_urlsafe(16)))
    return _dummy_hash[0]


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(key)
        actual = _scrypt(password[:MAX_PASSWORD_LENGTH], _unb64(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    if password != password.strip():
        raise UserError("the password must not start or end with a space")


# -- users --------------------------------------------------------------------
def check_username(username: str) -> str:
    if not USERNAME_RE.match(username or ""):
        raise UserError("a username is 1 to 64 letters, digits, '.', '_', '-' or '@', starting with a "
                        "letter or digit")
    return username


def add_user(sessions, username: str, password: str, role: str, display_name: str = "") -> User:
    check_username(username)
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    check_password_rules(password)
    display_name = " ".join((display_name or "").split())[:128] or username
    with sessions.begin() as session:
        if session.scalar(select(User).where(User.username == username)) is not None:
            raise UserError(f"user {username} exists already")
        user = User(username=username, display_name=display_name, role=role,
                    password_hash=hash_password(password), active=1, created_at=utcnow())
        session.add(user)
        session.flush()
        session.expunge(user)
    return user


def get_user(sessions, username: str) -> User | None:
    with sessions() as session:
        return session.scalar(select(User).where(User.username == username))


def list_users(sessions) -> list[User]:
    with sessions() as session:
        return list(session.scalars(select(User).order_by(User.username)))


def _change(sessions, username: str, **fields) -> User:
    with sessions.begin() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise UserError(f"user {username} does not exist")
        for name, value in fields.items():
            setattr(user, name, value)
        session.flush()
        session.expunge(user)
        return user


def set_password(sessions, username: str, password: str) -> User:
    check_password_rules(password)
    return _change(sessions, username, password_hash=hash_password(password))


def set_active(sessions, username: str, active: bool) -> User:
    return _change(sessions, username, active=1 if active else 0)


def authenticate(sessions, username: str, password: str) -> tuple[User | None, str]:
    """(the user, "ok") for an active user with this password, else (None,
    why: "unknown user", "wrong password" or "account disabled"); the
    same cost in every case. Records the log-in time."""
    user = get_user(sessions, username) if USERNAME_RE.match(username or "") else None
    ok = verify_password(password, user.password_hash if user is not None else _dummy())
    if user is None:
        return None, "unknown user"
    if not ok:
        return None, "wrong password"
    if not user.active:
        return None, "account disabled"
    return _change(sessions, username, last_login_at=utcnow()), "ok"


# -- audit --------------------------------------------------------------------
def audit(sessions, username: str, action: str, job_id: int | None = None, detail: str | None = None) -> None:
    with sessions.begin() as session:
        session.add(AuditEvent(at=utcnow(), username=(username or "?")[:64], action=action[:32],
                               job_id=job_id, detail=detail))


def audit_events(sessions, job_id: int | None = None, limit: int = 200) -> list[AuditEvent]:
    with sessions() as session:
        query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
        if job_id is not None:
            query = query.where(AuditEvent.job_id == job_id)
        return list(session.scalars(query))


def audit_name(username: str) -> str:
    """What a failed log-in records as the user: the name typed when it is a
    valid username, else a placeholder (never free text)."""
    return username if USERNAME_RE.match(username or "") else "(invalid username)"


# -- sessions -----------------------------------------------------------------
def session_secret(settings) -> bytes:
    """The signing key of sessions and CSRF tokens: HKDF of
    BRAINLINE_REVIEW_SECRET, or of the vault key when that is empty."""
    from ..gateway.vault import _derive, resolve_vault_key

    secret = getattr(settings, "review_secret", "") or ""
    if not secret:
        secret, _generated = resolve_vault_key(settings.vault_key, settings.dev_mode, settings.home)
    return _derive(secret, b"review-ui-session")


def password_fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SessionData:
    user_id: int
    sid: str
    fingerprint: str
    login_at: float


class SessionInvalid(Exception):
    """No valid session: ``reason`` says why in words (for the log-in page)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SessionManager:
    """Signed, expiring session cookies and session-bound CSRF tokens."""

    def __init__(self, secret: bytes, idle_minutes: float, max_hours: float):
        self._serializer = URLSafeTimedSerializer(secret, salt="brainline-review-session")
        self._csrf_key = hmac.new(secret, b"csrf", hashlib.sha256).digest()
        self._login_serializer = URLSafeTimedSerializer(secret, salt="brainline-review-login")
        self.idle_seconds = max(1.0, float(idle_minutes) * 60.0)
        self.max_seconds = max(self.idle_seconds, float(max_hours) * 3600.0)
        self._revoked: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self, user: User, login_at: float | None = None, sid: str | None = None) -> str:
        return self._serializer.dumps({"u": user.id, "s": sid or secrets.token_urlsafe(18),
                                       "p": password_fingerprint(user.password_hash),
                                       "t": login_at if login_at is not None else time.time()})

    def read(self, cookie: str | None) -> SessionData:
        if not cookie:
            raise SessionInvalid("please log in")
        try:
            # itsdangerous annotates max_age as int but only compares it with the age in seconds
            data = self._serializer.loads(cookie, max_age=self.idle_seconds)  # type: ignore[arg-type]
        except SignatureExpired:
            raise SessionInvalid("your session expired; please log in again") from None
        except BadSignature:
            raise SessionInvalid("please log in") from None
        try:
            session = SessionData(int(data["u"]), str(data["s"]), str(data["p"]), float(data["t"]))
        except (KeyError, TypeError, ValueError):
            raise SessionInvalid("please log in") from None
        if time.time() - session.login_at > self.max_seconds:
            raise SessionInvalid("your session expired; please log in again")
        with self._lock:
            if session.sid in self._revoked:
                raise SessionInvalid("you logged out; please log in again")
        return session

    def refresh(self, session: SessionData, user: User) -> str:
        """The same session signed now (sliding idle expiry)."""
        return self.issue(user, login_at=session.login_at, sid=session.sid)

    def revoke(self, session: SessionData) -> None:
        now = time.time()
        with self._lock:
            self._revoked = {sid: t for sid, t in self._revoked.items() if t > now}
            self._revoked[session.sid] = session.login_at + self.max_seconds

    def csrf_token(self, session: SessionData) -> str:
        return hmac.new(self._csrf_key, session.sid.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, session: SessionData, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), str(token))

    # log-in form: double-submit token (cookie + hidden field), signed, 1 hour
    def login_token(self) -> str:
        return self._login_serializer.dumps(secrets.token_urlsafe(18))

    def check_login_token(self, cookie: str | None, field: str | None) -> bool:
        if not cookie or not field or not hmac.compare_digest(str(cookie), str(field)):
            return False
        try:
            self._login_serializer.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return True


class LoginThrottle:
    """Failed log-ins per username and per client address in a sliding
    window; a key over its limit is locked for 30 s, doubling with each
    further failure, at most 15 minutes."""

    WINDOW_S = 900.0
    BASE_LOCK_S = 30.0
    MAX_LOCK_S = 900.0

    def __init__(self, max_failures: int):
        self.max_failures = max(1, int(max_failures))
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, username: str, client: str) -> list[tuple[str, int]]:
        return [("u:" + (username or "").lower(), self.max_failures), ("a:" + (client or ""), 4 * self.max_failures)]

    def locked_for(self, username: str, client: str) -> float:
        """Seconds the log-in stays refused (0 = allowed)."""
        now = time.time()
        wait = 0.0
        with self._lock:
            for key, limit in self._keys(username, client):
                times = [t for t in self._failures.get(key, []) if now - t < self.WINDOW_S]
                self._failures[key] = times
                if len(times) >= limit:
                    lock = min(self.MAX_LOCK_S, self.BASE_LOCK_S * 2 ** (len(times) - limit))
                    wait = max(wait, times[-1] + lock - now)
        return max(0.0, wait)

    def failed(self, username: str, client: str) -> None:
        now = time.time()
        with self._lock:
            for key, _limit in self._keys(username, client):
                self._failures.setdefault(key, []).append(now)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop("u:" + (username or "").lower(), None)
