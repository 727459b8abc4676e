"""Pseudonymization vault (gateway side).

Derives, from the operator's secret (BRAINLINE_VAULT_KEY), two sub-keys with
HKDF-SHA256: one for keyed hashes (HMAC-SHA256) that make pseudonyms, UIDs and
lookup keys deterministic, and one Fernet key that encrypts the stored
mapping (pseudonym <-> identity, UID map, date shift). The database holds only
the keyed-hash lookup and the ciphertext.
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
from sqlalchemy.orm import sessionmaker

from .db import VaultEntry

log = logging.getLogger("brainline.vault")

# Date shifts lie in [-DATE_SHIFT_MAX, -DATE_SHIFT_MIN] days.
DATE_SHIFT_MIN = 365
DATE_SHIFT_MAX = 3650


class VaultError(RuntimeError):
    """The vault cannot be opened or an entry cannot be decrypted."""


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


class Vault:
    def __init__(self, secret: str, sessions: sessionmaker):
        if len(secret) < 16:
            raise VaultError("BRAINLINE_VAULT_KEY must be at least 16 characters")
        self._mac_key = _derive(secret, b"hmac")
        self._fernet = Fernet(base64.urlsafe_b64encode(_derive(secret, b"fernet")))
        self._sessions = sessions

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
        lookup = self._mac(f"lookup-{kind}", pseudonym).hex()
        token = self._fernet.encrypt(json.dumps(record, sort_keys=True).encode())
        with self._sessions.begin() as session:
            entry = session.scalar(
                select(VaultEntry).where(VaultEntry.kind == kind, VaultEntry.lookup == lookup)
            )
            if entry is None:
                session.add(VaultEntry(kind=kind, lookup=lookup, ciphertext=token))
            else:
                entry.ciphertext = token

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
