"""Tests for tests.dicom_factory: geometry round trip, headers, validity, speed."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests import shared_data
from tests.dicom_factory import ROLES, find_role_file, write_study
from tests.shared_data import BRATS, TCGA, require

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"

needs_data = shared_data.needs_data(TCGA)


def read_series(directory: Path) -> sitk.Image:
    """Read a DICOM series with SimpleITK's (GDCM) series reader, slices sorted by position."""
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(directory))
    reader.SetFileNames(names)
    return reader.Execute()


def assert_same_geometry(actual: sitk.Image, expected: sitk.Image) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), atol=1e-5)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return write_study(out, TCGA, slice_step=5)


@needs_data
@pytest.mark.parametrize("role", ROLES)
def test_round_trip_matches_nifti_in_simpleitk(small_study, role):
    expected = sitk.ReadImage(str(find_role_file(TCGA, role)))[:, :, ::5]
    actual = read_series(small_study.series[role].dir)
    assert_same_geometry(actual, expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(actual), sitk.GetArrayFromImage(expected))


@needs_data
def test_brats_naming_is_mapped(tmp_path):
    info = write_study(tmp_path, BRATS, roles=("flair",), slice_step=31)
    expected = sitk.ReadImage(str(BRATS / "t2f.nii.gz"))[:, :, ::31]
    actual = read_series(info.series["flair"].dir)
    assert_same_geometry(actual, expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(actual), sitk.GetArrayFromImage(expected))


def test_oblique_float_volume_round_trip(tmp_path):
    """Anisotropic, oblique, float data: exercises PixelSpacing order, IOP and rescaling."""
    case = tmp_path / "case"
    case.mkdir()
    rng = np.random.default_rng(0)
    data = (rng.random((20, 30, 6)) * 1000.0 - 100.0).astype(np.float32)
    angle = np.deg2rad(20)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([0.9, 0.7, 3.0])
    affine[:3, 3] = [12.0, -30.0, 45.0]
    nib.save(nib.Nifti1Image(data, affine), str(case / "t2.nii.gz"))

    info = write_study(tmp_path / "out", case, roles=("t2",))
    ds = pydicom.dcmread(info.series["t2"].paths[0])
    assert ds.Rows == 30 and ds.Columns == 20
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.7, 0.9])
    assert ds.PixelRepresentation == 0 and "RescaleSlope" in ds

    expected = sitk.ReadImage(str(case / "t2.nii.gz"))
    actual = read_series(info.series["t2"].dir)
    assert_same_geometry(actual, expected)
    slope = float(ds.RescaleSlope)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(actual), sitk.GetArrayFromImage(expected), atol=slope * 0.51 + 1e-3
    )


@needs_data
def test_headers(small_study):
    t1, t1c, t2, flair = (pydicom.dcmread(small_study.series[r].paths[0]) for r in ROLES)
    assert small_study.n_instances == 4 * 31 == len(small_study.paths)
    assert {ds.StudyInstanceUID for ds in (t1, t1c, t2, flair)} == {small_study.study_uid}
    assert len({ds.FrameOfReferenceUID for ds in (t1, t1c, t2, flair)}) == 1
    assert len({ds.SeriesInstanceUID for ds in (t1, t1c, t2, flair)}) == 4
    assert t1.SeriesDescription == "AX T1 3D PRE" and "ContrastBolusAgent" not in t1
    assert t1c.SeriesDescription == "AX T1 3D POST GAD" and t1c.ContrastBolusAgent == "GADOBUTROL"
    assert t2.SeriesDescription == "AX T2 FSE" and t2.MRAcquisitionType == "2D"
    assert flair.SeriesDescription == "AX T2 FLAIR 3D" and float(flair.InversionTime) == 2500
    for ds in (t1, t1c, t2, flair):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientName == "DOE^JANE" and ds.PatientID == "PID-4711-XYZ"
        assert ds.InstitutionName == "St Elsewhere Hospital"
        assert ds.ReferringPhysicianName == "HOUSE^GREGORY"
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
        assert float(ds.SpacingBetweenSlices) == 5.0 and float(ds.SliceThickness) == 1.0
        block = ds.private_block(0x0029, "ACME 1.0")
        assert "DOE^JANE" in block[0x10].value


@needs_data
def test_instances_have_unique_uids_and_numbers(small_study):
    series = small_study.series["t2"]
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.paths]
    assert len({ds.SOPInstanceUID for ds in datasets}) == series.n_instances
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, series.n_instances + 1))
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), 5.0)


@needs_data
@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy not installed")
@pytest.mark.parametrize("role", ["t1c", "flair"])
def test_dciodvfy_reports_no_errors(small_study, role):
    result = subprocess.run(
        [DCIODVFY, str(small_study.series[role].paths[3])], capture_output=True, text=True
    )
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report


@needs_data
@pytest.mark.serial  # a wall-clock bound: runs alone, after the parallel phase
def test_full_study_is_fast(tmp_path):
    start = time.perf_counter()
    info = write_study(tmp_path, TCGA)
    elapsed = time.perf_counter() - start
    assert info.n_instances == 620
    assert elapsed < 20, f"writing 620 instances took {elapsed:.1f} s"


def test_cli(tmp_path):
    require(TCGA)
    from tests.dicom_factory import main

    assert main([str(TCGA), str(tmp_path), "--slice-step", "50", "--roles", "t1"]) == 0
    assert sorted(p.name for p in (tmp_path / "t1").iterdir()) == ["IM_1.dcm", "IM_2.dcm", "IM_3.dcm", "IM_4.dcm"]
