"""Multi-echo series: a PD/T2 dual echo (and any series with several echoes
at each slice position) is sent as one series whose images alternate between
echoes. Each echo is a series of its own for selection, so the T2 rule finds
the T2-weighted echo, dcm2niix converts that echo alone, and the results on a
multi-echo reference series hold one image per position.

Before: the series was judged by its first file (often the short-TE PD echo:
"not T2: TE 15 ms"), and when selected, dcm2niix split the echoes and the
first (PD) became the "T2" volume; on a multi-echo reference series highdicom
refused the SEG ("Plane positions must not contain duplicates").
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from brainline.pipelines.conversion import find_dcm2niix
from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.inputs import select_inputs
from brainline.pipelines.series_completeness import IncompleteSeriesError
from tests.conftest import PHI, TCGA
from tests.dicom_factory import make_dual_echo, write_study

CLI = [sys.executable, "-m", "brainline.service.cli", "process", "--quiet"]


@pytest.fixture
def study(tmp_path):
    """tcga-du-7294 every 5th slice; T2 as the second echo of a PD/T2 dual
    echo (the first echo, TE 15 ms, carries the T1 images as its 'PD')."""
    study = write_study(tmp_path / "dicom", TCGA, slice_step=5, **PHI)
    study.series["t2"] = make_dual_echo(study.series["t2"], 15.0, study.series["t1"])
    return study


def _dcm2niix(files, out_dir) -> np.ndarray:
    """dcm2niix's volume of exactly ``files`` (symlinked into a folder of their own)."""
    src = out_dir / "src"
    src.mkdir(parents=True)
    for f in files:
        (src / f.name).symlink_to(f)
    subprocess.run([str(find_dcm2niix()), "-z", "y", "-f", "v", "-o", str(out_dir), str(src)],
                   check=True, capture_output=True, timeout=120)
    [volume] = out_dir.glob("v*.nii.gz")   # "v_e2" for an echo numbered 2
    return np.asanyarray(nib.load(volume).dataobj)


def test_each_echo_is_a_candidate_of_its_own(study, tmp_path):
    record = select_inputs(study.series["t1"].dir.parent, tmp_path / "work", PipelineConfig())
    t2 = record["roles"]["t2"]
    assert t2["echo_number"] == 2 and t2["echo_time_ms"] != 15.0
    files = json.loads((tmp_path / "work" / "select_series.json").read_text())["files"]["t2"]
    echo_two = {str(p) for p in study.series["t2"].paths if not p.name.startswith("E1_")}
    assert len(files) == 31 and set(files) == echo_two
    entries = [e for e in record["considered"] if e["series_number"] == t2["series_number"]]
    assert [e["echo_number"] for e in entries] == [1, 2]
    assert entries[0]["roles"]["t2"]["reasons"] and "TE 15 ms" in entries[0]["roles"]["t2"]["why"]
    assert entries[1]["selected_as"] == "T2" and entries[0]["selected_as"] is None


def test_process_converts_the_t2_echo_and_builds_results_on_a_dual_echo_reference(study, tmp_path):
    """T2 is a PD/T2 dual echo and the T1c (the reference) a dual echo too:
    the T2 volume is the T2 echo's, and every result is built on one echo of
    the T1c, one image per position."""
    study.series["t1c"] = make_dual_echo(study.series["t1c"], 1.2, study.series["t1c"])
    out = tmp_path / "out"
    result = subprocess.run(CLI + [str(study.series["t1"].dir.parent), "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    echo_two = [p for p in study.series["t2"].paths if not p.name.startswith("E1_")]
    expected = _dcm2niix(echo_two, tmp_path / "t2_echo2")
    got = np.asanyarray(nib.load(out / "nifti" / "t2.nii.gz").dataobj)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    # the results lie on the selected T1c echo: 31 overlay images, the SEG's frames one per position
    selection = json.loads((out / "select_series.json").read_text())
    t1c_files = {str(p) for p in study.series["t1c"].paths}
    assert len(selection["files"]["t1c"]) == 31 and set(selection["files"]["t1c"]) <= t1c_files
    used = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in selection["files"]["t1c"]}
    seg = pydicom.dcmread(out / "dicom" / "seg.dcm", stop_before_pixels=True)
    sources = {src.ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence
               for d in f.DerivationImageSequence for src in d.SourceImageSequence}
    assert sources and sources <= used
    overlays = list((out / "dicom").glob("overlay_*.dcm"))
    assert len(overlays) == 31
    assert {pydicom.dcmread(p, stop_before_pixels=True).SourceImageSequence[0].ReferencedSOPInstanceUID
            for p in overlays} == used


def test_a_reference_with_two_images_per_position_is_refused_in_words(study, tmp_path):
    """Two images at each position that are not echoes (one echo number: a
    Dixon water and fat pair, a repeated acquisition) cannot be the reference:
    refused at selection, before any image step, in words. Before, the job ran
    and its SEG was "not built" (duplicate plane positions)."""
    t1c = make_dual_echo(study.series["t1c"], 1.2, study.series["t1c"])
    for path in t1c.paths:
        ds = pydicom.dcmread(path)
        ds.EchoNumbers = 1
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(IncompleteSeriesError) as info:
        select_inputs(study.series["t1"].dir.parent, tmp_path / "work", PipelineConfig())
    assert "holds 2 images at each slice position that are not echoes of one scan" in str(info.value)
    assert "it is the reference sequence" in str(info.value)
    # not the reference: accepted (dcm2niix converts it)
    record = select_inputs(study.series["t1"].dir.parent, tmp_path / "w2", PipelineConfig(reference="flair"))
    assert record["roles"]["t1c"]["n_instances"] == 62
