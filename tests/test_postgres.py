"""The job store and vault on a real PostgreSQL (BRAINLINE_DATABASE_URL)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from tests.peers import PostgresServer, storescu
from tests.phi import BINARY_SAFE

pytestmark = pytest.mark.integration


def test_service_on_postgresql(service_factory, small_study):
    with PostgresServer() as pg:
        svc = service_factory(BRAINLINE_DATABASE_URL=pg.url)
        assert storescu(small_study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
        [job] = svc.wait_jobs(1, timeout=300)
        assert job["state"] == "done", job
        assert job["instance_count"] == 124
        assert svc.metric("brainline_jobs", 'state="done"') == 1
        svc.stop()
        engine = create_engine(pg.url)
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            stages = conn.execute(text("SELECT count(*) FROM stages WHERE state = 'done'")).scalar()
            blobs = [row[0] for row in conn.execute(text("SELECT ciphertext FROM vault_entries WHERE kind != '_keyring'"))]
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
