"""`brainline process` end to end on DICOM studies made from the shared data:
the 1 mm study, a clinical-looking variant (oblique 5 mm 2D slices, head-sized
field of view) and a study with a missing series."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainline.pipelines.records import BIAS_CORRECTION_FILE, REGISTRATION_FILE, SEGMENT_FILE, SKULL_STRIP_FILE
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_study
from tests.reslice import clinical_variant

REFERENCE = TCGA / "segmentations" / "fusion_simple.nii.gz"
CLI = [sys.executable, "-m", "brainline.service.cli", "process", "--quiet"]


def whole_tumour_dice(seg_path) -> float:
    seg = sitk.ReadImage(str(seg_path))
    ref = sitk.Resample(sitk.ReadImage(str(REFERENCE)), seg, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a, b = sitk.GetArrayFromImage(seg) > 0, sitk.GetArrayFromImage(ref) > 0
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def run_process(src, out) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(src), "--out", str(out)], capture_output=True, text=True, timeout=900)


def test_process_full_study(full_study, tmp_path):
    out = tmp_path / "out"
    result = run_process(full_study.series["t1"].dir.parent, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "whole tumour" in result.stdout
    for role in ("t1", "t1c", "t2", "flair"):
        assert (out / "preprocessed" / f"{role}.nii.gz").exists()
    mask = sitk.ReadImage(str(out / "brain_mask.nii.gz"))
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    native = sitk.ReadImage(str(out / "nifti" / "t1c.nii.gz"))
    assert seg.GetSize() == native.GetSize() and np.allclose(seg.GetDirection(), native.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3}
    assert mask.GetSize() == seg.GetSize()
    summary = json.loads((out / "summary.json").read_text())
    vol = summary["volumes_ml"]
    assert vol["whole_tumor"] == pytest.approx(vol["1"] + vol["2"] + vol["3"], abs=0.01)
    assert vol["tumor_core"] == pytest.approx(vol["1"] + vol["3"], abs=0.01)
    assert 15 < vol["whole_tumor"] < 35
    assert 1000 < summary["tiv_ml"] < 1800
    assert summary["whole_tumor_components"][0]["volume_ml"] > 10
    assert set(summary["registration"]) == {"t1", "t1c", "t2", "flair"}
    assert summary["qc_flags"] == []
    assert summary["backends"]["segmentation"]["backend"] == "baseline"
    # timings_s is keyed by stage name, the stem of each stage's record file
    timed = {Path(f).stem for f in (REGISTRATION_FILE, SKULL_STRIP_FILE, BIAS_CORRECTION_FILE, SEGMENT_FILE)}
    assert timed == {"register", "skull_strip", "bias_correct", "segment"}
    assert set(summary["timings_s"]) >= timed
    assert whole_tumour_dice(out / "segmentation.nii.gz") >= 0.85
    # DICOM results reference the input study.
    kinds = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in (out / "dicom").glob("*.dcm")}
    assert {"SEG", "SR", "DOC", "OT"} <= kinds
    seg_ds = pydicom.dcmread(out / "dicom" / "seg.dcm", stop_before_pixels=True)
    assert seg_ds.StudyInstanceUID == full_study.study_uid
    assert seg_ds.PatientID == PHI["patient_id"]


@pytest.fixture(scope="module")
def followup_run(tmp_path_factory):
    """One `brainline process CURRENT --out OUT --prior PRIOR` run, shared by
    the oblique-study test and the follow-up test: the same patient's tumour
    (tcga-du-7294) acquired twice, the prior as the 1 mm 3D study (every 2nd
    slice) and the current as oblique 5 mm 2D series in a head-sized field of
    view. Every stage up to and including ``summary`` reads only the current
    study (the prior is read by the ``longitudinal`` stage alone, which writes
    only longitudinal.json; pipelines/stage_table.py), so the oblique test's
    files (summary.json, nifti/, preprocessed/, segmentation.nii.gz) are
    those of a run without --prior; the run without --prior itself is
    test_process_full_study. Returns (current study, prior study, OUT, the
    CompletedProcess)."""
    root = tmp_path_factory.mktemp("followup_run")
    prior = write_study(root / "prior", TCGA, study_date="20231016", slice_step=2, **PHI)
    current = write_study(root / "current", clinical_variant(TCGA, root / "case"), **PHI)
    out = root / "out"
    result = subprocess.run(CLI + [str(current.series["t1"].dir.parent), "--out", str(out),
                                   "--prior", str(prior.series["t1"].dir.parent)],
                            capture_output=True, text=True, timeout=900)
    return current, prior, out, result


def test_process_oblique_thick_slices_in_head_fov(followup_run):
    study, _, out, result = followup_run
    assert study.series["flair"].n_instances == 36
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["qc_flags"] == []
    for role in ("t1", "t2", "flair"):
        reg = summary["registration"][role]
        assert reg["converged"] and reg["quality"]["foreground_dice"] > 0.85
    flair = sitk.ReadImage(str(out / "preprocessed" / "flair.nii.gz"))
    assert flair.GetSize() == sitk.ReadImage(str(out / "nifti" / "t1c.nii.gz")).GetSize()
    dice = whole_tumour_dice(out / "segmentation.nii.gz")
    assert dice >= 0.85, dice  # measured 0.90


def test_process_missing_series_is_named(tmp_path):
    study = write_study(tmp_path / "dicom", TCGA, roles=("t1", "t1c", "t2"), slice_step=5, **PHI)
    result = run_process(study.series["t1"].dir.parent, tmp_path / "out")
    assert result.returncode == 1
    assert "no FLAIR series found" in result.stderr
    assert "AX T2 FSE" in result.stderr


def test_process_with_prior_no_change_pair(followup_run):
    """`brainline process CURRENT --prior PRIOR` (the ``followup_run``
    fixture): nothing changed between the two acquisitions, so the comparison
    must say stable with at most one new lesion, and the follow-up objects
    land in the current study."""
    current, _, out, result = followup_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "follow-up:" in result.stdout
    record = json.loads((out / "longitudinal.json").read_text())
    assert record["priors"] == 1 and record["mode"] == "tumour"
    assert record["comparison"]["registration"]["flags"] == []
    assert record["assessment"]["code"] == "stable", record["assessment"]
    assert sum(1 for x in record["lesions"] if x["kind"] == "new") <= 1, record["lesions"]
    assert any("small-lesion detection is limited" in n for n in record["notes"]), record["notes"]
    wt = record["change"]["vs_prior"]["whole_tumor"]
    assert abs(wt["percent"]) < 25, wt
    kinds = {}
    for path in (out / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == current.study_uid
        kinds.setdefault(ds.Modality, []).append(ds)
    subtraction = [ds for ds in kinds.get("MR", []) if "SUBTRACTION" in list(ds.ImageType)]
    assert subtraction, "no subtraction series"
    titles = [ds.ConceptNameCodeSequence[0].CodeMeaning for ds in kinds["SR"]]
    assert len(titles) >= 2, titles  # the volumes SR and the change SR


ANOTHER = {"patient_name": "ROE^RICHARD", "patient_id": "PID-0815-ABC", "birth_date": "19500505",
           "accession": "ACC-0815"}


def test_process_refuses_a_folder_of_two_studies(tmp_path):
    """Two patients' studies in one folder: before, series selection took the
    T2 of one patient with the other's T1, T1c and FLAIR into one result.
    Now nothing runs and the message says why, with counts, not identities."""
    write_study(tmp_path / "in" / "a", TCGA, roles=("t1c", "flair"), slice_step=15, **PHI)
    write_study(tmp_path / "in" / "b", TCGA, roles=("t1", "t1c", "t2", "flair"), slice_step=15, **ANOTHER)
    result = run_process(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 1
    assert "holds 2 studies" in result.stderr and "give the folder of one study" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [v for v in (*PHI.values(), *ANOTHER.values()) if v in result.stderr]


def test_process_refuses_a_prior_of_another_patient(tmp_path):
    """``--prior`` of another patient's study is refused before any work; a
    prior whose PatientID is missing is used with a note that it could not be
    checked."""
    from brainline.pipelines.process import PriorError, write_offline_priors

    current = write_study(tmp_path / "current", TCGA, roles=("t1c", "flair"), slice_step=15, **PHI)
    other = write_study(tmp_path / "other", TCGA, roles=("t1c", "flair"), slice_step=15, study_date="20230101",
                        **ANOTHER)
    result = subprocess.run(CLI + [str(tmp_path / "current"), "--prior", str(tmp_path / "other"),
                                   "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "is another patient's study" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(PriorError, match="another patient's"):
        write_offline_priors(tmp_path / "current", [tmp_path / "other"], tmp_path / "o1")
    unnamed = write_study(tmp_path / "unnamed", TCGA, roles=("t1c", "flair"), slice_step=15, study_date="20230101",
                          **{**PHI, "patient_id": ""})
    record = write_offline_priors(tmp_path / "current", [tmp_path / "unnamed"], tmp_path / "o2")
    assert len(record["priors"]) == 1
    assert record["notes"] == ["prior unnamed: no PatientID on one side, so it could not be checked to be the "
                               "same patient"]
    assert current.study_uid and other.study_uid and unnamed.study_uid
