"""Shared fixtures: real DICOM studies from ../shared/data, a real
`brainline serve` process, a real Orthanc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.dicom_factory import write_study
from tests.peers import OrthancServer, PostgresServer, ServiceProcess
from tests.shared_data import BRATS, BRATS18, DATA, TCGA, require  # noqa: F401 - the one place for the data path

# The suite pins the classical baseline (seconds per job) for every service
# and `brainline process` run unless a test asks for a model itself: the
# default, "auto", runs the nine CNNs of the shipped BraTS 2017 model on every
# 4-sequence study (minutes on 2 CPU cores). tests/test_wang_*.py run the
# default and the trained model end to end.
os.environ.setdefault("BRAINLINE_MODEL", "baseline")

REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config) -> str:
    state = "found" if TCGA.is_dir() else "MISSING: tests that read it are skipped"
    return f"shared data: {DATA} ({state})"


#: Modules that take more than a minute (seconds in a one-process run on the 2-core
#: development machine, 2026-12-01), longest first. `make test` hands whole modules to
#: its pytest-xdist workers in collection order (scripts/run-tests.sh,
#: --no-loadscope-reorder); putting these first keeps a long module from starting last
#: while the other worker idles. Only the order changes; a stale entry costs time, not tests.
LONG_MODULES = (
    "test_celery_scaleout.py",      # 229 s
    "test_service_ingest.py",       # 217
    "test_longitudinal.py",         # 214
    "test_wang_pipeline.py",        # 168 (one test: the trained model end to end)
    "test_process.py",              # 149
    "test_results_delivery.py",     # 123
    "test_wang_port.py",            # 111
    "test_review_ui.py",            # 89
    "test_longitudinal_service.py", # 76
    "test_service_api.py",          # 76
    "test_deformation_change.py",   # 74
    "test_longitudinal_lesion_mode.py",  # 66
    "test_combined_t2.py",          # 65
    "test_viewer.py",               # 62
    "test_supersede.py",            # 62
)


def pytest_collection_modifyitems(config, items) -> None:
    """Long modules first (LONG_MODULES), the rest in their usual order."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the order within a module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (tests/shared_data.py); skips the test when it is missing."""
    return require(DATA)

# Identity written into every test study: must never leave the gateway.
PHI = {
    "patient_name": "DOE^JANE",
    "patient_id": "PID-4711-XYZ",
    "birth_date": "19640229",
    "accession": "ACC-98765",
}
PHI_STRINGS = ["DOE^JANE", "DOE", "JANE", "PID-4711-XYZ", "19640229", "ACC-98765",
               "St Elsewhere", "HOUSE^GREGORY"]


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """4-series study, every 5th slice (4 x 31 = 124 instances)."""
    out = tmp_path_factory.mktemp("small_study")
    return write_study(out, require(TCGA), slice_step=5, **PHI)


@pytest.fixture(scope="session")
def full_study(tmp_path_factory):
    """4-series 240x240x155 study (620 instances)."""
    out = tmp_path_factory.mktemp("full_study")
    return write_study(out, require(TCGA), **PHI)


@pytest.fixture
def service_factory(tmp_path):
    started: list[ServiceProcess] = []

    def make(home: Path | None = None, start: bool = True, wait_ready: bool = True, **env):
        svc = ServiceProcess(home or tmp_path / f"home{len(started)}", **env)
        started.append(svc)
        if start:
            svc.start(wait_ready=wait_ready)
        return svc

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
def service(service_factory):
    return service_factory()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    with OrthancServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres():
    """One throw-away PostgreSQL server for the session (initdb and start cost
    seconds): a test takes its own database with ``postgres.new_database()``."""
    with PostgresServer() as server:
        yield server
