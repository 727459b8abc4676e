"""docs/CONFORMANCE.md is generated from the code and must match it.

Regenerating the statement (scripts/gen_conformance.py) must give the
committed file byte for byte; when a SOP class, transfer syntax, status code,
de-identification option or created object changes, run
``python scripts/gen_conformance.py`` and commit the result.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_conformance.py"
DOC = ROOT / "docs" / "CONFORMANCE.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_conformance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_statement_matches_the_code():
    text = _generator().render()
    assert DOC.read_text() == text, "docs/CONFORMANCE.md is out of date: run python scripts/gen_conformance.py"


def test_statement_names_what_the_code_does():
    from pydicom.uid import EncapsulatedPDFStorage, SecondaryCaptureImageStorage, SegmentationStorage

    from brainline.pipelines.dicom_outputs.codes import BACKEND_FAMILIES
    from brainline.service.gateway import listener
    text = DOC.read_text()
    for uid in listener.BRAIN_MR_SOP_CLASSES:
        assert f"| {uid} | SCP (C-STORE) |" in text
    for ts in listener.ALL_TRANSFER_SYNTAXES:
        assert f"| {ts} |" in text
    for name, value in vars(listener).items():
        if name.startswith("STATUS_") and isinstance(value, int):
            assert f"| 0x{value:04X} |" in text, name
    for uid in (SegmentationStorage, SecondaryCaptureImageStorage, EncapsulatedPDFStorage,
                "1.2.840.10008.5.1.4.1.1.88.34"):
        assert f"| {uid} |" in text
    for code in BACKEND_FAMILIES.values():
        assert f"| {code.value} | DCM | {code.meaning} |" in text


def test_check_mode_detects_drift(tmp_path):
    stale = tmp_path / "CONFORMANCE.md"
    stale.write_text(DOC.read_text().replace("Success", "Sucess", 1))
    run = [sys.executable, str(SCRIPT), "--check", "--output", str(stale)]
    assert subprocess.run(run, capture_output=True, timeout=300).returncode == 1
    stale.write_text(DOC.read_text())
    assert subprocess.run(run, capture_output=True, timeout=300).returncode == 0
