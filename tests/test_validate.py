"""`brainline validate`: a small reference set (tcga-du-7294 as a DICOM study
cropped to the head, 2 mm in-plane, 4 mm slices, with the fusion_simple
reference on its own 1 mm grid) runs through the whole DICOM path, is accepted,
rerun, compared with a tampered accepted record; broken cases are failures in
words, not crashes. Plus the comparison rules on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainline.pipelines.validation import Thresholds, compare, dice, volume_changed
from brainline.service.cli import main
from tests.conftest import PHI, PHI_STRINGS, TCGA
from tests.dicom_factory import ROLES, find_role_file, write_study

REFERENCE = TCGA / "segmentations" / "fusion_simple.nii.gz"
BRAINLINE = Path(sys.executable).parent / "brainline"  # .venv/bin/brainline
ACCEPTED = ".brainline-accepted.json"


@pytest.fixture(scope="module")
def tcga_case(tmp_path_factory) -> Path:
    """A reference case folder: <case>/dicom (4 series of 72x89 pixels of 2 mm,
    39 slices 4 mm apart), reference_seg.nii.gz on the original 1 mm grid, case.json."""
    root = tmp_path_factory.mktemp("tcga_case")
    cropped = root / "nifti"
    cropped.mkdir()
    for role in ROLES:  # the head's bounding box, every 2nd voxel in-plane: same physical space
        img = nib.load(str(find_role_file(TCGA, role)))
        nib.save(img.slicer[46:190:2, 43:220:2, :], str(cropped / f"{role}.nii.gz"))
    case = root / "tcga"
    write_study(case / "dicom", cropped, slice_step=4, **PHI)
    shutil.copy(REFERENCE, case / "reference_seg.nii.gz")
    (case / "case.json").write_text(json.dumps({"source": "tcga-du-7294", "pattern": "a, 2x2x4 mm",
                                                "patient_name": PHI["patient_name"]}))
    return case


def broken_case(folder: Path, tcga_case: Path) -> Path:
    """A case whose dicom/ holds a non-DICOM file and a truncated instance."""
    dicom = folder / "dicom"
    dicom.mkdir(parents=True)
    (dicom / "IM_1.dcm").write_bytes(b"this is not DICOM\n")
    source = next((tcga_case / "dicom" / "t1c").glob("*.dcm"))
    (dicom / "IM_2.dcm").write_bytes(source.read_bytes()[:600])
    return folder


def without_images(text: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)


def assert_no_phi(*paths: Path) -> None:
    for path in paths:
        text = without_images(path.read_text())
        for needle in PHI_STRINGS:
            assert needle not in text, f"{needle!r} found in {path.name}"


def run_cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAINLINE_")}
    env["BRAINLINE_HOME"] = str(home)
    env["BRAINLINE_MODEL"] = "baseline"  # the figures below are the baseline's (see conftest)
    return subprocess.run([str(BRAINLINE), "validate", "--quiet", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def run_main(args: list[str], home: Path, monkeypatch, capsys) -> tuple[int, str]:
    for name in [k for k in os.environ if k.startswith("BRAINLINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BRAINLINE_HOME", str(home))
    monkeypatch.setenv("BRAINLINE_MODEL", "baseline")
    code = main(["validate", "--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ------------------------------------------------------------- the protocol


def test_accept_rerun_and_tampered_record(tcga_case, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "reference"
    ref.mkdir()
    shutil.copytree(tcga_case, ref / "tcga")

    # 1. First run, as a site would type it, accepted at once: nothing to compare yet.
    result = run_cli([ref, "--out", tmp_path / "run1", "--accept"], tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "no accepted record: nothing to compare" in result.stdout
    assert f"accepted as the new reference: {ref / ACCEPTED}" in result.stdout
    assert str(tmp_path / "run1" / "report.html") in result.stdout
    record = json.loads((tmp_path / "run1" / "validation.json").read_text())
    case = record["cases"]["tcga"]
    assert case["status"] == "ok" and case["error"] is None
    assert case["scored_from"] == "dicom-seg"  # scored from the SEG read back
    assert case["dice"]["WT"] >= 0.85, case["dice"]  # measured 0.94
    assert 0.0 <= case["dice"]["TC"] <= 1.0
    assert case["dice"]["ET"] is None  # the reference holds no ET: not scored
    assert 15 < case["volumes_ml"]["WT"] < 35
    assert case["volumes_ml"]["TC"] <= case["volumes_ml"]["WT"]
    assert case["reference_volumes_ml"]["WT"] == pytest.approx(24.5, abs=2.0)
    # per-stage timings, keyed by stage name (select and convert, the DICOM results: the progress names)
    assert {"total", "select_and_convert", "register", "bias_correct", "segment",
            "dicom_results"} <= set(case["timings_s"])
    assert case["timings_s"]["total"] >= case["timings_s"]["bias_correct"] > 0
    assert isinstance(case["qc_flags"], list)
    assert case["segmentation"]["backend"] == "baseline" and case["segmentation"]["model_version"]
    assert case["brainline_version"] == record["software"]["brainline"]
    assert case["case_info"] == {"source": "tcga-du-7294", "pattern": "a, 2x2x4 mm"}
    assert record["summary"] == {"cases": 1, "ok": 1, "failed": 0, "regressions": 0, "result": "pass"}
    assert (tmp_path / "run1" / "cases" / "tcga" / "dicom" / "seg.dcm").exists()
    html = (tmp_path / "run1" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1  # Dice plot; no volume plot without an accepted run
    assert "<td class='l'>tcga<br>" in html and "pattern: a, 2x2x4 mm" in html
    accepted = json.loads((ref / ACCEPTED).read_text())
    assert accepted["cases"]["tcga"]["volumes_ml"] == case["volumes_ml"]
    assert accepted["accepted"]["at"] and accepted["accepted"]["from_run"] == str(tmp_path / "run1")
    assert accepted["software"]["brainline"] and accepted["model"]["backend"] == "baseline"
    assert_no_phi(tmp_path / "run1" / "validation.json", tmp_path / "run1" / "report.html", ref / ACCEPTED)

    # 2. The same version again: no regression.
    code, out = run_main([ref, "--out", tmp_path / "run2"], tmp_path / "home", monkeypatch, capsys)
    assert code == 0, out
    assert "compared with the accepted record" in out and "REGRESSION" not in out
    record2 = json.loads((tmp_path / "run2" / "validation.json").read_text())
    assert record2["comparison"]["status"] == "compared" and record2["comparison"]["regressions"] == []
    assert record2["cases"]["tcga"]["volumes_ml"]["WT"] == pytest.approx(case["volumes_ml"]["WT"], rel=0.02)
    html2 = (tmp_path / "run2" / "report.html").read_text()
    assert html2.count("data:image/png;base64,") == 2  # Dice bars and volume scatter

    # 3. A tampered accepted record (half the WT volume, TC Dice +0.2, a case
    #    that is gone) and a broken case next to the good one.
    accepted["cases"]["tcga"]["volumes_ml"]["WT"] /= 2
    accepted["cases"]["tcga"]["dice"]["TC"] += 0.2
    accepted["cases"]["ghost"] = accepted["cases"]["tcga"]
    (ref / ACCEPTED).write_text(json.dumps(accepted))
    broken_case(ref / "broken", tcga_case)
    code, out = run_main([ref, "--out", tmp_path / "run3"], tmp_path / "home", monkeypatch, capsys)
    assert code == 1, out
    assert "REGRESSION tcga: WT volume" in out
    assert "REGRESSION tcga: TC Dice" in out
    assert "REGRESSION ghost: in the accepted record but missing" in out
    assert "REGRESSION broken: failed: " in out
    record3 = json.loads((tmp_path / "run3" / "validation.json").read_text())
    metrics = {(r["case"], r["metric"]) for r in record3["comparison"]["regressions"]}
    assert metrics == {("tcga", "WT volume"), ("tcga", "TC Dice"), ("ghost", "missing"), ("broken", "failed")}
    assert record3["cases"]["tcga"]["status"] == "ok"  # the broken case did not stop the run
    assert record3["summary"]["result"] == "regression"
    html3 = (tmp_path / "run3" / "report.html").read_text()
    assert html3.count("class='bad'") == 2 and "missing from this run" in html3
    assert_no_phi(tmp_path / "run3" / "validation.json", tmp_path / "run3" / "report.html")


def test_broken_cases_are_failures_and_accept_needs_force(tcga_case, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "reference"
    broken_case(ref / "broken", tcga_case)
    (ref / "no_dicom").mkdir()
    (ref / "no_dicom" / "case.json").write_text("{}")
    home = tmp_path / "home"

    code, out = run_main([ref, "--accept"], home, monkeypatch, capsys)
    assert code == 1
    assert "not accepted: 2 case(s) failed (broken, no_dicom)" in out
    assert not (ref / ACCEPTED).exists()
    runs = list((home / "validation").iterdir())  # default output folder
    assert len(runs) == 1
    record = json.loads((runs[0] / "validation.json").read_text())
    broken = record["cases"]["broken"]
    assert broken["status"] == "failed" and broken["failed_step"] == "select_and_convert"
    assert "series found" in broken["error"]
    assert record["cases"]["no_dicom"]["error"] == "read_case: no dicom/ folder in no_dicom"
    assert record["accept"] == {"accepted": False, "reason": "2 case(s) failed: broken, no_dicom"}
    assert (runs[0] / "report.html").exists()

    code, out = run_main([ref, "--accept", "--force", "--out", tmp_path / "forced"], home, monkeypatch, capsys)
    assert code == 1  # still a failing run
    accepted = json.loads((ref / ACCEPTED).read_text())
    assert accepted["accepted"]["forced"] is True and accepted["cases"]["broken"]["status"] == "failed"


def test_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    result = run_cli([tmp_path / "nowhere"], tmp_path / "home")
    assert result.returncode == 2 and "is not a folder" in result.stderr
    (tmp_path / "empty" / "case1").mkdir(parents=True)
    code, out = run_main([tmp_path / "empty"], tmp_path / "home", monkeypatch, capsys)
    assert code == 2 and "holds no reference case" in out
    code, out = run_main([tmp_path / "empty", "--force"], tmp_path / "home", monkeypatch, capsys)
    assert code == 2 and "--force only goes with --accept" in out
    (tmp_path / "out" / "old").mkdir(parents=True)
    (tmp_path / "empty" / "case1" / "dicom").mkdir()
    code, out = run_main([tmp_path / "empty", "--out", tmp_path / "out"], tmp_path / "home", monkeypatch, capsys)
    assert code == 2 and "is not empty" in out
    (tmp_path / "empty" / ACCEPTED).write_text("{not json")
    code, out = run_main([tmp_path / "empty", "--out", tmp_path / "out2"], tmp_path / "home", monkeypatch, capsys)
    assert code == 2 and "cannot be read" in out
    assert not (tmp_path / "home" / "validation").exists()


# ------------------------------------------------------------ the rules alone


def _case(wt=20.0, tc=5.0, et=2.0, dice_wt=0.9, dice_tc=0.7, dice_et=None, status="ok"):
    return {"status": status, "error": None if status == "ok" else "segment: out of memory",
            "volumes_ml": {"WT": wt, "TC": tc, "ET": et}, "dice": {"WT": dice_wt, "TC": dice_tc, "ET": dice_et},
            "qc_flags": [], "timings_s": {"total": 20.0}}


def test_comparison_rules():
    th = Thresholds()
    pdf_failed = [{"kind": "pdf", "error": "PDF report: font missing"}]
    accepted = {"cases": {"a": _case(), "b": _case(et=0.0), "c": {**_case(et=0.2), "objects_failed": pdf_failed},
                          "gone": _case()}}
    current = {
        "a": _case(wt=24.9, dice_wt=0.851, dice_tc=0.64),  # +24.5 %, -0.049, -0.06
        "b": {**_case(et=0.6), "objects_failed": pdf_failed},  # 0 -> 0.6 mL: above the 0.5 mL floor
        "c": {**_case(et=0.6), "objects_failed": pdf_failed},  # +200 % but only 0.4 mL; PDF failed before too
        "new": _case(status="failed"),
    }
    result = compare(current, accepted, th)
    found = {(r["case"], r["metric"]) for r in result["regressions"]}
    assert found == {("a", "TC Dice"), ("b", "ET volume"), ("b", "pdf object"), ("gone", "missing"),
                     ("new", "failed")}
    assert "new: new case, not in the accepted record" in result["notes"]
    assert "c: pdf not built (nor in the accepted run): PDF report: font missing" in result["notes"]
    assert volume_changed(20.0, 25.1, th) and not volume_changed(20.0, 24.9, th)
    assert not volume_changed(1.0, 1.4, th) and volume_changed(1.0, 1.6, th)
    # without an accepted record only failures count
    none = compare(current, None, th)
    assert none["status"] == "no accepted record"
    assert [(r["case"], r["metric"]) for r in none["regressions"]] == [("new", "failed")]


def test_dice_conventions():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    assert dice(a, b) is None and dice(a, b, empty=1.0) == 1.0
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True
    assert dice(a, b) == 0.5
    assert dice(a, np.zeros_like(a), empty=1.0) == 0.0
