"""Vault key check value and key rotation (issue 8, part 6).

Unit tests on a real SQLite database, and a real `brainline serve` / `brainline
vault` for the refusal to start and the rotation from the command line."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from brainline.service.db import VaultEntry, make_engine, make_sessionmaker, migrate
from brainline.service.gateway.vault import (
    KEYRING_KIND,
    Vault,
    VaultError,
    VaultKeyMismatch,
    key_check_value,
    rotate_key,
)

KEY_A = "first-vault-key-0123456789abcdef"
KEY_B = "second-vault-key-0123456789abcdef"
KEY_C = "third-vault-key-0123456789abcdef"
CLI = [sys.executable, "-m", "brainline.service.cli"]


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    yield tmp_path / "db.sqlite", make_sessionmaker(engine)
    engine.dispose()


def _fill(vault: Vault) -> dict:
    """Store a patient and a study record; return the pseudonyms made."""
    patient = vault.patient("PID-4711-XYZ", "HOSP")
    study_uid = vault.uid("1.2.826.0.1.3680043.2.1125.1")
    vault.put("patient", patient.pseudo_id, {"PatientName": "DOE^JANE", "PatientID": "PID-4711-XYZ"})
    vault.put("study", study_uid, {"StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.1",
                                   "AccessionNumber": "ACC-98765"})
    return {"patient": patient, "study_uid": study_uid,
            "study_key": vault.study_key("1.2.826.0.1.3680043.2.1125.1")}


def test_key_check_value_is_recorded_and_a_new_key_refused(db):
    path, sessions = db
    vault = Vault(KEY_A, sessions)
    assert vault.verify_key() == "recorded"
    assert Vault(KEY_A, sessions).verify_key() == "ok"
    with pytest.raises(VaultKeyMismatch, match="BRAINLINE_VAULT_KEY") as err:
        Vault(KEY_B, sessions).verify_key()
    assert "vault rotate" in str(err.value)
    raw = path.read_bytes()
    assert KEY_A.encode() not in raw and key_check_value(KEY_A) != key_check_value(KEY_B)
    with sqlite3.connect(path) as con:
        [(kind, check)] = con.execute("SELECT kind, ciphertext FROM vault_entries WHERE lookup='key-check-v1'")
    assert kind == KEYRING_KIND and check.decode() == key_check_value(KEY_A)


def test_vault_from_before_key_checks_is_proved_by_its_rows(db):
    """A database with vault rows but no check value (older version): the
    right key is recorded, a wrong key is refused."""
    path, sessions = db
    _fill(Vault(KEY_A, sessions))  # no verify_key: like an older version
    with pytest.raises(VaultKeyMismatch):
        Vault(KEY_B, sessions).verify_key()
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT count(*) FROM vault_entries WHERE kind=?", (KEYRING_KIND,)).fetchone() == (0,)
    assert Vault(KEY_A, sessions).verify_key() == "recorded"


def test_rotation_reencrypts_and_keeps_pseudonyms(db):
    path, sessions = db
    old = Vault(KEY_A, sessions)
    old.verify_key()
    made = _fill(old)
    with sqlite3.connect(path) as con:
        before = dict(con.execute("SELECT id, ciphertext FROM vault_entries WHERE kind != ?", (KEYRING_KIND,)))

    result = rotate_key(KEY_A, KEY_B, sessions)
    assert result.rows == 2 and result.new_check == key_check_value(KEY_B)

    new = Vault(KEY_B, sessions)
    assert new.verify_key() == "ok"
    # every row was re-encrypted ...
    with sqlite3.connect(path) as con:
        after = dict(con.execute("SELECT id, ciphertext FROM vault_entries WHERE kind != ?", (KEYRING_KIND,)))
    assert after.keys() == before.keys() and all(after[i] != before[i] for i in before)
    assert b"DOE^JANE" not in path.read_bytes()
    # ... readable with the new key, and the pseudonyms did not change
    assert new.get("patient", made["patient"].pseudo_id)["PatientName"] == "DOE^JANE"
    assert new.get("study", made["study_uid"])["AccessionNumber"] == "ACC-98765"
    assert new.patient("PID-4711-XYZ", "HOSP") == made["patient"]
    assert new.uid("1.2.826.0.1.3680043.2.1125.1") == made["study_uid"]
    assert new.study_key("1.2.826.0.1.3680043.2.1125.1") == made["study_key"]
    # the old key is now refused
    with pytest.raises(VaultKeyMismatch):
        Vault(KEY_A, sessions).verify_key()

    # a second rotation keeps them too
    rotate_key(KEY_B, KEY_C, sessions)
    third = Vault(KEY_C, sessions)
    assert third.verify_key() == "ok"
    assert third.patient("PID-4711-XYZ", "HOSP") == made["patient"]
    assert third.get("patient", made["patient"].pseudo_id)["PatientID"] == "PID-4711-XYZ"
    # new records written after the rotation are found with the same lookups
    third.put("patient", "BL-NEW", {"PatientName": "ROE^RICHARD"})
    assert Vault(KEY_C, sessions).get("patient", "BL-NEW") == {"PatientName": "ROE^RICHARD"}


def test_rotation_with_a_wrong_old_key_changes_nothing(db):
    path, sessions = db
    vault = Vault(KEY_A, sessions)
    vault.verify_key()
    _fill(vault)
    snapshot = path.read_bytes()
    with sqlite3.connect(path) as con:
        rows_before = sorted(con.execute("SELECT id, kind, lookup, ciphertext FROM vault_entries"))
    with pytest.raises(VaultKeyMismatch, match="old key"):
        rotate_key(KEY_B, KEY_C, sessions)
    with pytest.raises(VaultError, match="same"):
        rotate_key(KEY_A, KEY_A, sessions)
    with sqlite3.connect(path) as con:
        assert sorted(con.execute("SELECT id, kind, lookup, ciphertext FROM vault_entries")) == rows_before
    assert Vault(KEY_A, sessions).verify_key() == "ok"
    assert snapshot  # the database was not replaced


def test_a_damaged_row_aborts_the_rotation(db):
    path, sessions = db
    vault = Vault(KEY_A, sessions)
    vault.verify_key()
    _fill(vault)
    with sessions.begin() as session:  # a row that is not under the old key
        session.add(VaultEntry(kind="study", lookup="f" * 64, ciphertext=b"not a fernet token"))
    with pytest.raises(VaultError, match="cannot be decrypted with the old key: nothing was changed"):
        rotate_key(KEY_A, KEY_B, sessions)
    assert Vault(KEY_A, sessions).verify_key() == "ok"
    with pytest.raises(VaultKeyMismatch):
        Vault(KEY_B, sessions).verify_key()


def test_reserved_kind_cannot_be_written(db):
    _path, sessions = db
    with pytest.raises(VaultError, match="reserved"):
        Vault(KEY_A, sessions).put(KEYRING_KIND, "key-check-v1", {"x": 1})


# -- command line, real processes ------------------------------------------------

def _serve_exits(svc, key: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `brainline serve` with ``key``; it must exit by itself."""
    env = {**svc.env, "BRAINLINE_VAULT_KEY": key}
    return subprocess.run(CLI + ["serve"], env=env, capture_output=True, text=True, timeout=timeout)


def _cli(svc, *args, key: str, input: str | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), env={**svc.env, "BRAINLINE_VAULT_KEY": key, **env},
                          capture_output=True, text=True, timeout=120, input=input)


@pytest.mark.integration
def test_serve_refuses_another_key_and_rotate_fixes_it(service_factory, tmp_path):
    svc = service_factory(BRAINLINE_VAULT_KEY=KEY_A)
    assert svc.api("GET", "/readyz").status_code == 200
    svc.stop()
    db_path = svc.home / "brainline.db"
    # the service recorded the key check value of KEY_A
    with sqlite3.connect(db_path) as con:
        [(check,)] = con.execute("SELECT ciphertext FROM vault_entries WHERE lookup='key-check-v1'")
    assert check.decode() == key_check_value(KEY_A)
    # vault rows as the pseudonymize stage writes them
    engine = make_engine(f"sqlite:///{db_path}")
    made = _fill(Vault(KEY_A, make_sessionmaker(engine)))
    engine.dispose()

    refused = _serve_exits(svc, KEY_B)
    assert refused.returncode != 0
    assert "BRAINLINE_VAULT_KEY does not match" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    check_b = _cli(svc, "vault", "check", key=KEY_B)
    assert check_b.returncode == 2 and "BRAINLINE_VAULT_KEY" in check_b.stderr

    # a wrong old key: refused, nothing changed
    wrong = tmp_path / "wrong.key"
    wrong.write_text(KEY_C + "\n")
    bad = _cli(svc, "vault", "rotate", "--old-key-file", str(wrong), key=KEY_B)
    assert bad.returncode == 1 and "old key does not match" in bad.stderr, bad.stderr
    assert _cli(svc, "vault", "check", key=KEY_A).returncode == 0

    # the old key from a file (first line; never on the command line)
    old = tmp_path / "old.key"
    old.write_text(KEY_A + "\n")
    done = _cli(svc, "vault", "rotate", "--old-key-file", str(old), key=KEY_B)
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 2 vault entries" in done.stdout
    assert KEY_A not in done.stdout + done.stderr and KEY_B not in done.stdout + done.stderr
    assert _cli(svc, "vault", "check", key=KEY_B).returncode == 0
    assert _serve_exits(svc, KEY_A).returncode != 0

    # the service starts with the new key, and the rows read with the same pseudonyms
    svc.env["BRAINLINE_VAULT_KEY"] = KEY_B
    svc.start()
    assert svc.api("GET", "/readyz").status_code == 200
    svc.stop()
    engine = make_engine(f"sqlite:///{db_path}")
    vault = Vault(KEY_B, make_sessionmaker(engine))
    assert vault.patient("PID-4711-XYZ", "HOSP") == made["patient"]
    assert vault.get("patient", made["patient"].pseudo_id)["PatientName"] == "DOE^JANE"
    engine.dispose()

    # the old key from stdin and from an environment variable
    again = _cli(svc, "vault", "rotate", "--old-key-file", "-", key=KEY_C, input=KEY_B + "\n")
    assert again.returncode == 0, again.stderr
    back = _cli(svc, "vault", "rotate", "--old-key-env", "MY_OLD_KEY", key=KEY_A, MY_OLD_KEY=KEY_C)
    assert back.returncode == 0, back.stderr
    missing = _cli(svc, "vault", "rotate", "--old-key-env", "NOT_SET_ANYWHERE", key=KEY_B)
    assert missing.returncode == 2 and "NOT_SET_ANYWHERE" in missing.stderr


@pytest.mark.integration
def test_rotate_refuses_while_the_service_runs(service_factory, tmp_path):
    svc = service_factory(BRAINLINE_VAULT_KEY=KEY_A)
    old = tmp_path / "old.key"
    old.write_text(KEY_A)
    busy = _cli(svc, "vault", "rotate", "--old-key-file", str(old), key=KEY_B)
    assert busy.returncode == 1 and "stop `brainline serve`" in busy.stderr
    assert _cli(svc, "vault", "check", key=KEY_A).returncode == 0
