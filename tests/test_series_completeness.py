"""Issue 8, part 1: no result from a partial study.

Series completeness (instance-number and slice-position gaps,
ImagesInAcquisition, dcm2niix's "Eq_" interpolation) is checked before
conversion; a needed series that is incomplete ends the job in needs_input
with the reason in words and nothing reaches the PACS; an optional one is
dropped with a note. Enhanced (multi-frame) reference series are refused at
selection, not after all stages ran. Checked on real DICOM studies written
from the shared data, through ``select_inputs``/``convert_inputs``,
``brainline process`` and a real ``brainline serve`` fed by storescu with a
real Orthanc as destination."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pydicom
import pytest

from brainline.pipelines.conversion import UnequalSpacingError, convert_series
from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.inputs import convert_inputs, select_inputs
from brainline.pipelines.series_completeness import (
    IncompleteSeriesError,
    InstanceInfo,
    check_instances,
    check_series_files,
    number_ranges,
)
from brainline.pipelines.series_selection import MissingSeriesError
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_multi_frame_series, write_study
from tests.peers import storescu

CLI = [sys.executable, "-m", "brainline.service.cli", "process", "--quiet"]
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def axial(n: int, z: float, iia: int | None = None, acq: int | None = None) -> InstanceInfo:
    return InstanceInfo(instance_number=n, positions=((0.0, 0.0, z),), orientation=AXIAL,
                        images_in_acquisition=iia, acquisition_number=acq)


# ----------------------------------------------------------------- pure checks


def test_prefix_of_a_series_with_images_in_acquisition():
    report = check_instances([axial(n, n - 1.0, iia=155) for n in range(1, 36)])
    assert not report.complete
    assert report.describe() == "35 of 155 slices received; instance numbers 36–155 missing"
    assert report.expected == 155 and report.received == 35
    assert report.to_dict()["missing_instance_numbers"] == "36–155"


def test_one_missing_slice_in_the_middle():
    report = check_instances([axial(n, 5.0 * (n - 1)) for n in range(1, 32) if n != 16])
    assert report.missing_instance_numbers == [16] and report.missing_positions == 1
    assert report.describe() == ("instance number 16 missing; 1 slice position missing along the slice "
                                 "normal (1 gap; spacing 5 mm, 30 positions received)")


def test_a_gap_found_by_position_alone():
    # renumbered instances (no number gap), but a run of 4 positions missing
    zs = [float(z) for z in range(0, 20)] + [float(z) for z in range(24, 40)]
    report = check_instances([axial(i + 1, z) for i, z in enumerate(zs)])
    assert report.missing_positions == 4 and report.missing_instance_numbers == []
    assert "4 slice positions missing" in report.describe()


def test_complete_series_pass():
    assert check_instances([axial(n, 1.5 * n) for n in range(1, 101)]).complete
    # evenly numbered 1, 3, 5 ... is a numbering scheme, not a gap
    assert check_instances([axial(2 * n + 1, 1.0 * n) for n in range(40)]).complete
    # ImagesInAcquisition met
    assert check_instances([axial(n, 1.0 * n, iia=20) for n in range(1, 21)]).complete
    # two echoes at every position, numbering restarts: fine
    echoes = [axial(n, 2.0 * n, acq=1) for n in range(1, 11)] + [axial(n, 2.0 * n, acq=2) for n in range(1, 11)]
    assert check_instances(echoes).complete
    # ImagesInAcquisition counted over the whole series (20) or per acquisition (10): both complete
    for announced in (20, 10):
        both = [axial(n, 2.0 * n, announced, acq) for acq in (1, 2) for n in range(1, 11)]
        assert check_instances(both).complete
    short = [axial(n, 2.0 * n, 10, acq) for acq in (1, 2) for n in range(1, 11 if acq == 1 else 9)]
    assert check_instances(short).describe().startswith("18 of 20 slices received")


def test_irregular_spacing_and_uneven_echoes_and_orientations():
    zs = [0.0, 1.0, 2.0, 3.3, 4.3, 5.3]
    assert "slice spacing is irregular" in check_instances([axial(i + 1, z) for i, z in enumerate(zs)]).describe()
    echoes = [axial(n, 2.0 * n, acq=1) for n in range(1, 11)] + [axial(n, 2.0 * n, acq=2) for n in range(1, 10)]
    assert "1 slice position of 10 hold fewer images" in check_instances(echoes).describe()
    mixed = [axial(n, 1.0 * n) for n in range(1, 10)] + [
        InstanceInfo(10, ((0.0, 0.0, 0.0),), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0))]
    assert "2 different orientations" in check_instances(mixed).describe()
    assert "carry no slice position" in check_instances([axial(1, 0.0), InstanceInfo(2, (None,), AXIAL)]).describe()


def test_number_ranges():
    assert number_ranges([1, 2, 3, 7, 9, 10]) == "1–3, 7, 9–10"
    assert number_ranges([]) == ""


# ------------------------------------------------------- real studies, pipelines


@pytest.fixture
def study(tmp_path):
    return write_study(tmp_path / "dicom", TCGA, slice_step=5, **PHI)


def test_real_series_headers(study):
    flair = study.series["flair"].paths
    assert check_series_files(flair).complete
    report = check_series_files(flair[:15] + flair[16:])
    assert report.missing_instance_numbers == [16] and report.missing_positions == 1


def test_needed_series_with_a_run_missing_is_refused_in_words(study, tmp_path):
    for path in study.series["flair"].paths[10:25]:
        path.unlink()
    with pytest.raises(IncompleteSeriesError) as info:
        select_inputs(study.series["t1"].dir.parent, tmp_path / "work", PipelineConfig())
    message = str(info.value)
    assert isinstance(info.value, MissingSeriesError)  # every missing-series handler handles it
    assert message.startswith("FLAIR series 5 'AX T2 FLAIR 3D' is incomplete: instance numbers 11–25 missing; "
                              "15 slice positions missing along the slice normal")
    assert "FLAIR is needed because the segmentation model (auto) needs it" in message
    assert "not segmented" in message
    assert not (tmp_path / "work" / "select_series.json").exists()


def test_optional_series_incomplete_is_dropped_with_a_note(study, tmp_path):
    study.series["t2"].paths[12].unlink()
    work = tmp_path / "work"
    record = select_inputs(study.series["t1"].dir.parent, work, PipelineConfig())
    assert set(record["roles"]) == {"t1", "t1c", "flair"}
    note = record["inputs"]["note"]
    assert note == ("T2 series 4 'AX T2 FSE' is incomplete: instance number 13 missing; 1 slice position "
                    "missing along the slice normal (1 gap; spacing 5 mm, 30 positions received); it was "
                    "left out; segmentation used T1, T1c and FLAIR only")
    assert record["inputs"]["dropped"]["t2"].startswith("T2 series 4")
    assert [entry["role"] for entry in record["left_out"]] == ["t2"]
    assert set(convert_inputs(work)) == {"t1", "t1c", "flair"}
    json.dumps(record)


def test_a_complete_duplicate_replaces_an_incomplete_series(study, tmp_path):
    # a complete FLAIR with fewer images (every 6th slice): selection prefers the incomplete one first
    again = write_study(tmp_path / "again", TCGA, roles=("flair",), slice_step=6, study_uid=study.study_uid, **PHI)
    shutil.copytree(again.series["flair"].dir, study.series["t1"].dir.parent / "flair2")
    study.series["flair"].paths[3].unlink()
    record = select_inputs(study.series["t1"].dir.parent, tmp_path / "work", PipelineConfig())
    assert record["roles"]["flair"]["series_uid"] == again.series["flair"].series_uid
    assert [e["role"] for e in record["left_out"]] == ["flair"]
    assert record["inputs"]["note"] is None  # FLAIR is there, complete


def shift_slice(path, mm: float) -> None:
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [str(float(v) + (mm if i == 2 else 0.0)) for i, v in enumerate(ds.ImagePositionPatient)]
    ds.save_as(path)


def test_dcm2niix_interpolation_is_refused(study, tmp_path):
    work = tmp_path / "work"
    select_inputs(study.series["t1"].dir.parent, work, PipelineConfig())
    # after selection, make T2 and FLAIR irregular: dcm2niix writes an "_Eq" volume for them
    shift_slice(study.series["t2"].paths[10], 2.0)
    with pytest.raises(UnequalSpacingError, match=r"unequally spaced .*t2_Eq"):
        convert_series(study.series["t2"].paths, tmp_path / "nifti", "t2")
    assert not list((tmp_path / "nifti").glob("t2*.nii.gz"))
    converted = convert_inputs(work)  # T2 is optional: dropped with a note
    assert set(converted) == {"t1", "t1c", "flair"}
    selection = json.loads((work / "select_series.json").read_text())
    assert "t2" not in selection["files"] and not (work / "nifti" / "t2.nii.gz").exists()
    assert selection["inputs"]["note"].startswith("T2 series 4 'AX T2 FSE' has unequally spaced slices")
    shift_slice(study.series["flair"].paths[10], 2.0)
    with pytest.raises(IncompleteSeriesError, match=r"FLAIR series 5 .AX T2 FLAIR 3D. has unequally spaced.*"
                                                    r"FLAIR is needed because the segmentation model"):
        convert_inputs(work)


def test_multi_frame_reference_in_two_instances_is_refused_at_selection(study, tmp_path):
    """One multi-frame instance is a usable reference (tests/test_enhanced_reference.py);
    the frames of a reference series spread over two instances are not."""
    t1c_dir = study.series["t1c"].dir
    write_multi_frame_series(study.series["t1c"], t1c_dir.parent / "t1c_enhanced", enhanced_class=True, parts=2)
    shutil.rmtree(t1c_dir)
    with pytest.raises(IncompleteSeriesError) as info:
        select_inputs(study.series["t1"].dir.parent, tmp_path / "work", PipelineConfig())
    assert re.match(r"T1c series 8 'AX T1 3D POST GAD[^']*' is an enhanced \(multi-frame\) MR series in 2 "
                    r"instances", str(info.value)), str(info.value)
    assert "it is the reference sequence" in str(info.value)
    # the same series as a non-reference role is accepted (converted by dcm2niix)
    record = select_inputs(study.series["t1"].dir.parent, tmp_path / "w2", PipelineConfig(reference="flair"))
    assert record["roles"]["t1c"]["is_enhanced"] is True
    # `brainline process` stops at selection, before any image step
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(CLI + [str(study.series["t1"].dir.parent), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "enhanced (multi-frame)" in result.stderr
    assert not (out / "nifti").exists() and not (out / "dicom").exists()
    assert time.monotonic() - started < 120


def test_process_refuses_one_missing_slice(study, tmp_path):
    study.series["t1c"].paths[20].unlink()
    out = tmp_path / "out"
    result = subprocess.run(CLI + [str(study.series["t1"].dir.parent), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "T1c series 8 'AX T1 3D POST GAD' is incomplete: instance number 21 missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "segmentation.nii.gz").exists() and not (out / "dicom").exists()


# ------------------------------------------------------------- real service


@pytest.mark.integration
def test_partial_push_ends_needs_input_and_nothing_reaches_the_pacs(service_factory, orthanc, study, tmp_path):
    """A scanner push cut short: FLAIR instances 11-31 of 31 never arrived
    (the scanner announces ImagesInAcquisition, as GE and Siemens do)."""
    svc = service_factory(BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    before = orthanc.count_instances()
    for path in study.series["flair"].paths:
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = 31
        ds.save_as(path)
    for path in study.series["flair"].paths[10:]:
        path.unlink()
    assert storescu(study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
    [job] = svc.wait_jobs(1, timeout=300)
    assert job["state"] == "needs_input", job
    assert job["error"].startswith(
        "stage select_series: FLAIR series 5 'AX T2 FLAIR 3D' is incomplete: 10 of 31 slices received; "
        "instance numbers 11–31 missing (FLAIR is needed because the segmentation model (baseline) needs it). "
        "The study was not segmented"), job["error"]
    assert "Traceback" not in job["error"]
    states = {stage["name"]: stage["state"] for stage in job["stages"]}
    assert states["select_series"] == "needs_input" and states["segment"] == "queued"
    assert states["deliver"] == "queued"
    ws = svc.workspace(job["id"])
    assert not (ws / "nifti").exists() and not (ws / "results").exists()
    time.sleep(2)
    assert svc.api("GET", "/api/v1/outbox").json()["items"] == []
    assert orthanc.count_instances() == before
