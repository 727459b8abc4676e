"""The shipped trained model is the default, end to end: a held-out BraTS
2018 case written as a clinical-like DICOM study (pattern a, 1 mm 3D, in its
own physical frame) is pushed by storescu to a real `brainline serve` with
the default model setting; the job maps the study into the BraTS frame, runs
the nine networks, brings the labels back to the T1c grid and delivers SEG
and SR to a real Orthanc. The SEG names the model, the summary records the
model-space transform and its quality, and the result matches the reference.
"""

from __future__ import annotations

import json
import time

import httpx
import pydicom
import pytest

from tests.corpus import HOLDOUT_CASES, corpus_cases, score, write_corpus_study
from tests.peers import storescu

pytestmark = pytest.mark.integration

CASE = "CBICA_AME"
assert CASE in HOLDOUT_CASES


def test_default_model_end_to_end(service_factory, orthanc, tmp_path):
    study = write_corpus_study(corpus_cases(cases=[CASE])[0], "a", tmp_path / "corpus")
    svc = service_factory(BRAINLINE_MODEL="", BRAINLINE_WORKERS="1",
                          BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    pushed = storescu(study / "dicom", svc.dicom_port)
    assert pushed.returncode == 0, pushed.stderr
    [job] = svc.wait_jobs(1, timeout=1500)
    assert job["state"] == "done", job
    ws = svc.workspace(job["id"])
    segment = json.loads((ws / "segment.json").read_text())
    assert segment["backend"] == "brats17-wang"
    assert "trained model" in segment["model_choice"]
    summary = json.loads((ws / "summary.json").read_text())
    space = summary["model_space"]
    assert space["space"] == "brats" and space["grid"]["size"] == [240, 240, 155]
    assert space["flags"] == [] and space["quality"]["foreground_dice"] > 0.85
    assert summary["backends"]["segmentation"]["model_name"] == "brats17-wang-cascade"

    figures = score(ws / "segmentation.nii.gz", study / "reference_seg.nii.gz")
    assert figures["WT"] >= 0.80, figures
    assert figures["TC"] >= 0.70, figures

    # SEG in the PACS, naming the model and coded as a learned algorithm
    seg = pydicom.dcmread(ws / "results" / "seg.dcm", stop_before_pixels=True)
    assert any("brats17-wang-cascade 1.0" in v for v in seg.SoftwareVersions), seg.SoftwareVersions
    assert "brats17-wang" in seg.ContentDescription
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if httpx.post(orthanc.http_url + "/tools/lookup", content=seg.SOPInstanceUID, timeout=30).json():
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the SEG did not reach Orthanc")
