"""BRAINLINE_HOME is private (issue 8, part 8): the folder and its folders
0700, the database, logs and received instances 0600, also for an install
whose files were created before (0644/0755)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time

import pytest

from brainline.service.logs import configure_logging
from tests.peers import storescu


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_log_file_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        configure_logging("INFO", tmp_path / "logs" / "brainline.log")
        logging.getLogger("brainline.test").info("hello")
    finally:
        os.umask(old)
        for handler in logging.getLogger().handlers:
            handler.close()
        logging.getLogger().handlers.clear()
    assert mode(tmp_path / "logs") == 0o700
    assert mode(tmp_path / "logs" / "brainline.log") == 0o600


def test_migrate_creates_a_private_home(tmp_path):
    home = tmp_path / "fresh" / "home"
    env = {**os.environ, "BRAINLINE_HOME": str(home)}
    run = subprocess.run([sys.executable, "-m", "brainline.service.cli", "migrate"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert mode(home) == 0o700
    for name in ("brainline.db", "brainline.db-wal", "brainline.db-shm"):
        if (home / name).exists():
            assert mode(home / name) == 0o600, name


@pytest.mark.integration
def test_serve_makes_home_private(service_factory, tmp_path, small_study):
    home = tmp_path / "old-install"
    # an install from before: world-readable home, log and database
    (home / "logs").mkdir(parents=True, mode=0o755)
    os.chmod(home, 0o755)
    os.chmod(home / "logs", 0o755)
    (home / "logs" / "brainline.log").write_text("")
    os.chmod(home / "logs" / "brainline.log", 0o644)
    (home / "logs" / "brainline.log.1").write_text("")
    os.chmod(home / "logs" / "brainline.log.1", 0o644)
    (home / "brainline.db").write_bytes(b"")
    os.chmod(home / "brainline.db", 0o644)
    (home / "spool").mkdir(mode=0o755)
    os.chmod(home / "spool", 0o755)

    svc = service_factory(home=home)
    assert mode(home) == 0o700
    assert mode(home / "brainline.db") == 0o600
    for name in ("brainline.db-wal", "brainline.db-shm"):
        if (home / name).exists():
            assert mode(home / name) == 0o600, name
    assert mode(home / "logs") == 0o700
    assert mode(home / "logs" / "brainline.log") == 0o600
    assert mode(home / "logs" / "brainline.log.1") == 0o600
    assert (home / "logs" / "brainline.log").stat().st_size > 0  # the service logs there
    for name in ("spool", "workspaces"):
        assert mode(home / name) == 0o700, name
    if (home / "outbox").exists():
        assert mode(home / "outbox") == 0o700

    # received instances and the job workspace made from them
    sent = storescu(small_study.series["t1"].dir, svc.dicom_port)
    assert sent.returncode == 0, sent.stderr
    for folder in (p for p in (home / "spool").rglob("*") if p.is_dir()):
        assert mode(folder) == 0o700, folder
    [study_dir] = [p for p in (home / "spool").iterdir()
                   if p.is_dir() and len(p.name) == 32 and all(c in "0123456789abcdef" for c in p.name)]
    files = [p for p in study_dir.rglob("*") if p.is_file()]
    assert files and all(mode(p) == 0o600 for p in files)
    deadline = time.monotonic() + 60
    workspaces = []
    while not workspaces and time.monotonic() < deadline:
        workspaces = [p for p in (home / "workspaces").iterdir() if p.is_dir()]
        time.sleep(0.2)
    assert workspaces, svc.output()[-2000:]
    time.sleep(1.0)
    checked = 0
    for path in workspaces[0].rglob("*"):
        try:
            assert mode(path) & 0o077 == 0, f"{path} is {oct(mode(path))}"
            checked += 1
        except FileNotFoundError:  # a temporary file of the running job
            pass
    assert checked > 0
    assert mode(workspaces[0]) == 0o700
    svc.stop()
    assert mode(home / "brainline.db") == 0o600
