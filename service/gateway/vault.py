"""Pseudonymization vault (gateway side).

Derives, from the operator's secret (BRAINLINE_VAULT_KEY), two sub-keys with
HKDF-SHA256: one for keyed hashes (HMAC-SHA256) that make pseudonyms, UIDs and
lookup keys deterministic, and one Fernet key that encrypts the stored
mapping (pseudonym <-> identity, UID map, date shift). The database holds only
the keyed-hash lookup and the ciphertext.

Key checks and rotation
-----------------------
The vault table also holds two bookkeeping rows of kind ``_keyring``:

* ``key-check-v1``: a key check value, HMAC-SHA256 of a fixed label under a
  sub-key of BRAINLINE_VAULT_KEY (never the key itself). ``verify_key``
  records it on first start and refuses a different key afterwards, so that
  a changed key cannot silently change every pseudonym.
* ``pseudonym-key-v1`` (only after ``brainline vault rotate``): the pseudonym
  (HMAC) sub-key of the *first* key, encrypted under the current key.
  Rotation re-encrypts every vault row with the new key but keeps this
  sub-key, so study keys, pseudonymous UIDs, patient pseudonyms and date
  shifts stay the same for studies received before and after the rotation,
  and the keyed-hash lookups of the stored rows stay valid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from ..db import VaultEntry

log = logging.getLogger("brainline.vault")

# Date shifts lie in [-DATE_SHIFT_MAX, -DATE_SHIFT_MIN] days.
DATE_SHIFT_MIN = 365
DATE_SHIFT_MAX = 3650


# Bookkeeping rows in the vault table (see the module docstring).
KEYRING_KIND = "_keyring"
CHECK_LOOKUP = "key-check-v1"
WRAPPED_LOOKUP = "pseudonym-key-v1"
_CHECK_LABEL = b"brainline vault key check v1"


class VaultError(RuntimeError):
    """The vault cannot be opened or an entry cannot be decrypted."""


class VaultKeyMismatch(VaultError):
    """BRAINLINE_VAULT_KEY is not the key the vault was set up with."""


MISMATCH_MESSAGE = (
    "BRAINLINE_VAULT_KEY does not match the key this BrainLine database was set up with "
    "(the stored key check value differs). Starting with another key would give every "
    "patient and study new pseudonyms and leave the stored vault entries unreadable. "
    "Set BRAINLINE_VAULT_KEY back to the previous key (in development mode: restore "
    "<BRAINLINE_HOME>/vault.key), or change keys with "
    "`brainline vault rotate --old-key-file FILE` while the service is stopped."
)


@dataclass(frozen=True)
class PatientPseudonym:
    pseudo_id: str          # e.g. "BL-1A2B3C4D5E6F7A8B"
    date_shift_days: int    # negative: dates move into the past


def resolve_vault_key(configured: str, dev_mode: bool, home: Path) -> tuple[str, bool]:
    """Return (key, generated). Without a configured key, dev mode generates
    one and keeps it in ``<home>/vault.key``; otherwise refuse to start."""
    if configured:
        return configured, False
    if not dev_mode:
        raise VaultError(
            "BRAINLINE_VAULT_KEY is not set: set it to a long random secret "
            "(or BRAINLINE_DEV_MODE=1 for a generated development key)"
        )
    key_file = home / "vault.key"
    if key_file.exists():
        return key_file.read_text().strip(), True
    home.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key, True


def _derive(secret: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"brainline-vault-v1",
                info=info).derive(secret.encode())


def key_check_value(secret: str) -> str:
    """Key check value of a vault key: HMAC-SHA256 of a fixed label under an
    HKDF sub-key (hex). Reveals nothing usable about the key."""
    return hmac.new(_derive(secret, b"key-check"), _CHECK_LABEL, hashlib.sha256).hexdigest()


def _fernet_for(secret: str, info: bytes) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(_derive(secret, info)))


@dataclass(frozen=True)
class RotationResult:
    rows: int                # vault rows re-encrypted
    old_check: str           # key check values (not the keys)
    new_check: str


class Vault:
    def __init__(self, secret: str, sessions: sessionmaker):
        if len(secret) < 16:
            raise VaultError("BRAINLINE_VAULT_KEY must be at least 16 characters")
        self._mac_key = _derive(secret, b"hmac")
        self._fernet = _fernet_for(secret, b"fernet")
        self._wrap = _fernet_for(secret, b"keywrap")
        self._check = key_check_value(secret)
        self._sessions = sessions
        # After a rotation the pseudonym sub-key of the first key is kept,
        # wrapped under the current key (see the module docstring).
        self._wrapped_unreadable = False
        wrapped = self._keyring(WRAPPED_LOOKUP)
        if wrapped is not None:
            try:
                self._mac_key = self._wrap.decrypt(wrapped)
            except InvalidToken:
                self._wrapped_unreadable = True  # wrong key: verify_key says so

    # -- key check --------------------------------------------------------
    def _keyring(self, lookup: str) -> bytes | None:
        with self._sessions() as session:
            entry = session.scalar(select(VaultEntry).where(
                VaultEntry.kind == KEYRING_KIND, VaultEntry.lookup == lookup))
            return None if entry is None else bytes(entry.ciphertext)

    @property
    def check_value(self) -> str:
        return self._check

    def _proves_key(self, session) -> bool:
        """Without a stored check value (a vault from before key checks):
        the key is right when it decrypts a stored row (or there is none)."""
        entry = session.scalar(select(VaultEntry).where(VaultEntry.kind != KEYRING_KIND)
                               .order_by(VaultEntry.id).limit(1))
        if entry is None:
            return True
        try:
            self._fernet.decrypt(entry.ciphertext)
            return True
        except InvalidToken:
            return False

    def verify_key(self, record: bool = True) -> str:
        """Compare this key with the stored key check value; raise
        VaultKeyMismatch when they differ. Without a stored value (new
        database, or one from an older version), prove the key against a
        stored row and, with ``record``, store the check value.
        Returns "ok" or "recorded"."""
        for _attempt in range(2):
            try:
                with self._sessions.begin() as session:
                    stored = session.scalar(select(VaultEntry).where(
                        VaultEntry.kind == KEYRING_KIND, VaultEntry.lookup == CHECK_LOOKUP))
                    if stored is not None:
                        if not hmac.compare_digest(bytes(stored.ciphertext), self._check.encode()):
                            raise VaultKeyMismatch(MISMATCH_MESSAGE)
                        if self._wrapped_unreadable:
                            raise VaultError("the kept pseudonym key in the vault cannot be decrypted "
                                             "with BRAINLINE_VAULT_KEY although the key check value "
                                             "matches: the vault table is damaged")
                        return "ok"
                    if not self._proves_key(session):
                        raise VaultKeyMismatch(MISMATCH_MESSAGE)
                    if not record:
                        return "ok"
                    session.add(VaultEntry(kind=KEYRING_KIND, lookup=CHECK_LOOKUP,
                                           ciphertext=self._check.encode()))
                log.info("vault key check value recorded")
                return "recorded"
            except IntegrityError:
                continue  # another process recorded it at the same moment: compare with it
        raise VaultError("the vault key check value cannot be recorded")

    # -- deterministic pseudonyms ---------------------------------------
    def _mac(self, domain: str, value: str) -> bytes:
        return hmac.new(self._mac_key, f"{domain}\0{value}".encode(), hashlib.sha256).digest()

    def study_key(self, study_uid: str) -> str:
        """Folder/database key of a study (32 hex chars, no identity)."""
        return self._mac("study", study_uid).hex()[:32]

    def uid(self, original_uid: str) -> str:
        """Pseudonymous UID under the 2.25 (UUID-derived) root, <= 44 chars."""
        return "2.25." + str(int.from_bytes(self._mac("uid", original_uid)[:16], "big"))

    def patient(self, patient_id: str, issuer: str = "") -> PatientPseudonym:
        digest = self._mac("patient", f"{issuer}\0{patient_id}")
        span = DATE_SHIFT_MAX - DATE_SHIFT_MIN + 1
        shift = -(DATE_SHIFT_MIN + int.from_bytes(digest[8:12], "big") % span)
        return PatientPseudonym("BL-" + digest[:8].hex().upper(), shift)

    # -- encrypted mapping ------------------------------------------------
    def put(self, kind: str, pseudonym: str, record: dict) -> None:
        """Store (or replace) the encrypted record for a pseudonym."""
        if kind == KEYRING_KIND:
            raise VaultError(f"vault kind {KEYRING_KIND!r} is reserved")
        lookup = self._mac(f"lookup-{kind}", pseudonym).hex()
        token = self._fernet.encrypt(json.dumps(record, sort_keys=True).encode())
        for _attempt in range(3):
            try:
                with self._sessions.begin() as session:
                    entry = session.scalar(
                        select(VaultEntry).where(VaultEntry.kind == kind, VaultEntry.lookup == lookup)
                    )
                    if entry is None:
                        session.add(VaultEntry(kind=kind, lookup=lookup, ciphertext=token))
                    else:
                        entry.ciphertext = token
                return
            except IntegrityError:
                # another job (two studies of one patient pseudonymized at the same
                # moment) inserted this pseudonym first: replace its record instead
                continue
        raise VaultError(f"the vault record ({kind}) cannot be stored: concurrent writers kept conflicting")

    def get(self, kind: str, pseudonym: str) -> dict | None:
        lookup = self._mac(f"lookup-{kind}", pseudonym).hex()
        with self._sessions() as session:
            entry = session.scalar(
                select(VaultEntry).where(VaultEntry.kind == kind, VaultEntry.lookup == lookup)
            )
        if entry is None:
            return None
        try:
            return json.loads(self._fernet.decrypt(entry.ciphertext))
        except InvalidToken:
            raise VaultError("vault entry cannot be decrypted with this BRAINLINE_VAULT_KEY") from None


def rotate_key(old_secret: str, new_secret: str, sessions: sessionmaker) -> RotationResult:
    """Re-encrypt every vault row from ``old_secret`` to ``new_secret`` in one
    transaction, keep the pseudonym sub-key (wrapped under the new key) so that
    pseudonyms do not change, and store the new key check value. Nothing is
    changed when any row cannot be decrypted with the old key."""
    old = Vault(old_secret, sessions)
    if len(new_secret) < 16:
        raise VaultError("BRAINLINE_VAULT_KEY must be at least 16 characters")
    new_check = key_check_value(new_secret)
    if hmac.compare_digest(old.check_value, new_check):
        raise VaultError("the old key and BRAINLINE_VAULT_KEY are the same: nothing to rotate")
    try:
        old.verify_key(record=False)
    except VaultKeyMismatch:
        raise VaultKeyMismatch(
            "the old key does not match this BrainLine database (the stored key check value "
            "differs, or it cannot decrypt the vault): nothing was changed") from None
    if old._wrapped_unreadable:
        raise VaultError("the kept pseudonym key cannot be decrypted with the old key: nothing was changed")
    new_fernet = _fernet_for(new_secret, b"fernet")
    new_wrap = _fernet_for(new_secret, b"keywrap")
    rows = 0
    with sessions.begin() as session:
        stored = session.scalar(select(VaultEntry).where(
            VaultEntry.kind == KEYRING_KIND, VaultEntry.lookup == CHECK_LOOKUP))
        if stored is not None and not hmac.compare_digest(bytes(stored.ciphertext), old.check_value.encode()):
            raise VaultKeyMismatch("the key check value changed during the rotation: nothing was changed")
        entries = session.scalars(select(VaultEntry).where(VaultEntry.kind != KEYRING_KIND)
                                  .order_by(VaultEntry.id)).all()
        for entry in entries:
            try:
                plain = old._fernet.decrypt(entry.ciphertext)
            except InvalidToken:
                raise VaultError(f"vault entry {entry.id} cannot be decrypted with the old key: "
                                 "nothing was changed") from None
            entry.ciphertext = new_fernet.encrypt(plain)
            rows += 1
        for lookup, value in ((WRAPPED_LOOKUP, new_wrap.encrypt(old._mac_key)),
                              (CHECK_LOOKUP, new_check.encode())):
            row = session.scalar(select(VaultEntry).where(
                VaultEntry.kind == KEYRING_KIND, VaultEntry.lookup == lookup))
            if row is None:
                session.add(VaultEntry(kind=KEYRING_KIND, lookup=lookup, ciphertext=value))
            else:
                row.ciphertext = value
    log.info("vault key rotated", extra={"rows": rows})
    return RotationResult(rows=rows, old_check=old.check_value, new_check=new_check)
