"""The job store and vault on a real PostgreSQL (BRAINLINE_DATABASE_URL)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from tests.peers import storescu
from tests.phi import BINARY_SAFE

pytestmark = pytest.mark.integration


def test_service_on_postgresql(service_factory, small_study, postgres):
    url = postgres.new_database()
    svc = service_factory(BRAINLINE_DATABASE_URL=url)
    assert storescu(small_study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
    [job] = svc.wait_jobs(1, timeout=300)
    assert job["state"] == "done", job
    assert job["instance_count"] == 124
    assert svc.metric("brainline_jobs", 'state="done"') == 1
    svc.stop()
    engine = create_engine(url)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        stages = conn.execute(text("SELECT count(*) FROM stages WHERE state = 'done'")).scalar()
        rows = conn.execute(text("SELECT ciphertext FROM vault_entries WHERE kind != '_keyring'"))
        blobs = [row[0] for row in rows]
    engine.dispose()
    assert version == _head_revision()
    assert stages == len(job["stages"])
    assert len(blobs) == 2  # one patient, one study
    # Ciphertext only (short needles like "DOE" occur by chance in base64).
    assert not [n for b in blobs for n in BINARY_SAFE if n in bytes(b)]


def _head_revision() -> str:
    """The newest Alembic revision shipped in service/migrations/versions."""
    from importlib import resources

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("brainline.service").joinpath("migrations")))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_vault_put_of_one_pseudonym_from_many_threads_at_once(postgres):
    """Four studies of one patient pseudonymized at the same moment all store
    the patient's record (a check-then-insert race gave an IntegrityError and
    a failed job on PostgreSQL): every writer succeeds, one row remains."""
    import threading

    from brainline.service.db import VaultEntry, make_engine, make_sessionmaker, migrate
    from brainline.service.gateway.vault import Vault

    url = postgres.new_database()
    migrate(url)
    engine = make_engine(url)
    vault = Vault("a-very-secret-vault-key", make_sessionmaker(engine))
    record = {"PatientID": "PID-4711-XYZ", "PatientName": "DOE^JANE"}
    errors: list[BaseException] = []
    for round_ in range(5):
        barrier = threading.Barrier(8)

        def put(pseudonym: str = f"BL-RACE-{round_}", barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                vault.put("patient", pseudonym, record)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=put) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    for round_ in range(5):
        assert vault.get("patient", f"BL-RACE-{round_}") == record
    with make_sessionmaker(engine)() as s:
        assert s.query(VaultEntry).filter(VaultEntry.kind == "patient").count() == 5
    engine.dispose()
