"""The package structure holds (issue 9, parts 4 and 6): service -> pipelines
-> models one way, and the PHI boundary between the gateway and compute.

import-linter checks the contracts of pyproject.toml ``[tool.importlinter]``
through scripts/lint_imports.py (which lays the ``package-dir`` sources out
as installed); each contract is shown to fail when a forbidden import is
added to a copy of the sources. A compute worker's modules are also imported
in a fresh interpreter to show that no gateway code, and no cryptography, is
loaded at run time either.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lint_imports.py"


def lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_every_contract_is_kept():
    run = lint()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout
    assert run.stdout.count(" KEPT") == 4, run.stdout


@pytest.mark.parametrize("contract, module, imported", [
    ("layers", "brainline.pipelines.inputs", "brainline.service.db"),
    ("layers", "brainline.models.base", "brainline.pipelines.image_pipeline"),
    ("compute-without-phi", "brainline.service.compute.stages", "brainline.service.gateway.vault"),
    ("compute-without-phi", "brainline.service.compute.qc_history", "cryptography.fernet"),
    ("compute-without-phi", "brainline.service.compute.worker", "brainline.service.api.auth"),
    ("jobs-without-phi", "brainline.service.jobs.runner", "brainline.service.gateway.spool"),
    ("api-on-top", "brainline.service.gateway.outbox", "brainline.service.api.app"),
    ("api-on-top", "brainline.service.db", "brainline.service.context"),
])
def test_each_contract_fails_on_a_forbidden_import(contract, module, imported):
    run = lint("--contract", contract, "--add-import", f"{module}={imported}")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "BROKEN" in run.stdout and "1 broken" in run.stdout, run.stdout
    shown = imported if imported.startswith("brainline.") else imported.split(".")[0]  # external: the package
    assert f"{module} -> {shown}" in run.stdout, run.stdout


def test_a_compute_worker_loads_no_gateway_code():
    """What ``brainline worker`` imports (the worker, the job runner and store,
    the stage table with every compute stage, the Celery app, validate)
    leaves the gateway, the web API, cryptography and pynetdicom unloaded:
    the gateway stages are loaded by name on the gateway only."""
    code = textwrap.dedent("""
        import sys
        import brainline.service.compute.worker, brainline.service.compute.validate
        import brainline.service.jobs.executor, brainline.service.jobs.runner
        from brainline.service.jobs.stage_table import GATEWAY_STAGES, PIPELINES
        assert {name for name, _ in PIPELINES["neuro_onco"]} > GATEWAY_STAGES
        loaded = sorted(m for m in sys.modules
                        if m.startswith(("brainline.service.gateway", "brainline.service.api",
                                         "cryptography", "pynetdicom")))
        print("LOADED", loaded)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "LOADED []" in run.stdout, run.stdout


def test_the_gateway_stages_load_when_they_run(tmp_path):
    """The stage table's gateway entries are the gateway's functions: called,
    they import and run them (here pseudonymize on an empty spool refuses the
    study, in words)."""
    from brainline.service.gateway.spool import Spool
    from brainline.service.jobs.context import StageContext
    from brainline.service.jobs.errors import Rejected
    from brainline.service.jobs.stage_table import GATEWAY_STAGES, PIPELINES

    stages = dict(PIPELINES["neuro_onco"])
    assert GATEWAY_STAGES == {"pseudonymize", "find_priors", "deliver"}
    assert all(stages[name].__name__ == name for name in GATEWAY_STAGES)
    ctx = StageContext(job_id=1, study_key="k", workspace=tmp_path / "ws", spool=Spool(tmp_path / "spool", 0),
                       vault=None, settings=None)
    with pytest.raises(Rejected, match="the spool holds no instances"):
        stages["pseudonymize"](ctx)
