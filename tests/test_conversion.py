"""Tests for brainline.pipelines.conversion (runs the real dcm2niix)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from brainline.pipelines import conversion
from brainline.pipelines.conversion import ConversionError, convert_series
from tests.shared_data import TCGA, require

FLAIR = TCGA / "flair.nii.gz"
SLICE_STEP = 5

# ----------------------------------------------------------------------------
# Small DICOM builder: NIfTI (RAS) -> axial MR Image Storage slices (LPS).
# ----------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def write_dicom_series(nifti_path: Path, out_dir: Path, slice_step: int) -> list[Path]:
    """Write every ``slice_step``-th axial slice of a NIfTI as single-frame MR DICOM.

    Pixel (row r, column c) of slice k is voxel (i=c, j=r, k); geometry in LPS:
    IOP = directions of voxel axes i and j, IPP = position of voxel (0, 0, k),
    PixelSpacing = (spacing along j, spacing along i) in mm.
    """
    image = nib.load(nifti_path)
    volume = np.asanyarray(image.dataobj).astype(np.int16)
    a_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    iop = [float(v) for v in (*_unit(a_lps[:3, 0]), *_unit(a_lps[:3, 1]))]
    spacing = [float(np.linalg.norm(a_lps[:3, 1])), float(np.linalg.norm(a_lps[:3, 0]))]
    thickness = float(np.linalg.norm(a_lps[:3, 2])) * slice_step
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, k in enumerate(range(0, volume.shape[2], slice_step), start=1):
        ds = _slice_dataset(volume[:, :, k].T, study_uid, series_uid, frame_uid)
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [float(v) for v in (a_lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelSpacing = spacing
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        path = out_dir / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(pixels: np.ndarray, study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    """One MR image with FLAIR-like acquisition headers (times in ms)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName, ds.PatientID = "Test^Conversion", "CONV001"
    ds.StudyDate, ds.SeriesDate = "20240101", "20240101"
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime = "120000", "121000", "121000"
    ds.Modality, ds.Manufacturer = "MR", "GE MEDICAL SYSTEMS"
    ds.SeriesNumber, ds.SeriesDescription = 5, "AX T2 FLAIR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.MRAcquisitionType = "2D"
    ds.ScanningSequence, ds.SequenceVariant = ["SE", "IR"], ["SK", "SP"]
    ds.RepetitionTime, ds.EchoTime, ds.InversionTime = 9000.0, 120.0, 2500.0
    ds.MagneticFieldStrength = 3.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


@pytest.fixture(scope="module")
def flair_series(tmp_path_factory) -> list[Path]:
    """31 axial slices (every 5th) of the TCGA FLAIR as DICOM files."""
    return write_dicom_series(require(FLAIR), tmp_path_factory.mktemp("dicom") / "flair", SLICE_STEP)


# ----------------------------------------------------------------------------
# Conversion of a real series
# ----------------------------------------------------------------------------


def test_convert_real_series(flair_series, tmp_path):
    out = tmp_path / "nifti"
    result = convert_series(flair_series, out, "flair")

    assert result.nifti == out / "flair.nii.gz" and result.nifti.is_file()
    assert result.sidecar == out / "flair.json" and result.sidecar.is_file()
    assert result.shape == (240, 240, 31)
    assert result.voxel_size_mm == pytest.approx((1.0, 1.0, 5.0))
    assert result.n_inputs == 31 and not result.reused and result.extra_files == []
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["SeriesDescription"] == "AX T2 FLAIR"
    assert sidecar["InversionTime"] == pytest.approx(2.5)  # BIDS uses seconds
    assert "PatientName" not in sidecar
    json.dumps(result.to_dict())


def test_converted_geometry_and_intensities_match_source(flair_series, tmp_path):
    """Every converted voxel lies where the source voxel lies (RAS mm) with its value."""
    result = convert_series(flair_series, tmp_path, "flair")
    converted = nib.load(result.nifti)
    source = nib.load(FLAIR)
    grid = np.indices(converted.shape).reshape(3, -1)
    world = converted.affine @ np.vstack([grid, np.ones(grid.shape[1])])
    src_index = np.linalg.inv(source.affine) @ world
    np.testing.assert_allclose(src_index, np.round(src_index), atol=1e-3)
    i, j, k = np.round(src_index[:3]).astype(int)
    assert set(np.unique(k)) == set(range(0, 155, SLICE_STEP))
    src = np.asanyarray(source.dataobj)
    dst = np.asanyarray(converted.dataobj).reshape(-1)
    np.testing.assert_array_equal(dst, src[i, j, k])


def test_rerun_is_a_noop(flair_series, tmp_path, monkeypatch):
    first = convert_series(flair_series, tmp_path, "flair")
    stamp_before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def must_not_run(*args, **kwargs):
        raise AssertionError("dcm2niix was run again for unchanged inputs")

    monkeypatch.setattr(conversion, "_run_dcm2niix", must_not_run)
    again = convert_series(list(reversed(flair_series)), tmp_path, "flair")
    assert again.reused
    assert (again.nifti, again.sidecar, again.shape) == (first.nifti, first.sidecar, first.shape)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp_before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flair.conversion.json", "flair.json", "flair.nii.gz"]


def test_changed_inputs_are_reconverted(flair_series, tmp_path):
    convert_series(flair_series, tmp_path, "flair")
    fewer = convert_series(flair_series[:-1], tmp_path, "flair")
    assert not fewer.reused
    assert fewer.shape == (240, 240, 30)


def test_missing_output_is_reconverted(flair_series, tmp_path):
    first = convert_series(flair_series, tmp_path, "flair")
    first.nifti.unlink()
    again = convert_series(flair_series, tmp_path, "flair")
    assert not again.reused and again.nifti.is_file()


# ----------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------


def test_non_dicom_input_raises_naming_the_series(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM\n" * 20)
    with pytest.raises(ConversionError, match="'t1c'") as info:
        convert_series([junk], tmp_path / "out", "t1c")
    assert "dcm2niix" in str(info.value)
    assert not (tmp_path / "out" / "t1c.nii.gz").exists()
    # no leftovers of the temporary folder
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_missing_inputs_and_bad_names(tmp_path):
    with pytest.raises(ConversionError, match="no DICOM files"):
        convert_series([], tmp_path, "flair")
    with pytest.raises(ConversionError, match="missing"):
        convert_series([tmp_path / "nope.dcm"], tmp_path, "flair")
    for bad in ("a/b", "%s_%p", "", "../x"):
        with pytest.raises(ConversionError, match="invalid output name"):
            convert_series([tmp_path], tmp_path, bad)


def test_dcm2niix_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(conversion.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConversionError, match="dcm2niix is not installed"):
        conversion.find_dcm2niix()


def test_timeout_kills_dcm2niix(tmp_path, monkeypatch):
    slow = tmp_path / "bin" / "dcm2niix"
    slow.parent.mkdir()
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setattr(conversion, "find_dcm2niix", lambda: slow)
    dicom = tmp_path / "x.dcm"
    dicom.write_bytes(b"x")
    with pytest.raises(ConversionError, match="timed out after 0.5 s converting series 'flair'"):
        convert_series([dicom], tmp_path / "out", "flair", timeout_s=0.5)


def test_error_is_picklable():
    err = pickle.loads(pickle.dumps(ConversionError("dcm2niix failed converting series 'x'")))
    assert "series 'x'" in str(err)


# ----------------------------------------------------------------------------
# Choice of the main output when dcm2niix writes several volumes
# ----------------------------------------------------------------------------


def _fake_nifti(path: Path, shape: tuple[int, ...]) -> Path:
    nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.eye(4)).to_filename(path)
    return path


def test_choose_main_prefers_plain_name(tmp_path):
    files = [
        _fake_nifti(tmp_path / "t2_ROI1.nii.gz", (20, 20, 20)),
        _fake_nifti(tmp_path / "t2_e2.nii.gz", (10, 10, 10)),
        _fake_nifti(tmp_path / "t2_i00001.nii.gz", (10, 10, 1)),
        _fake_nifti(tmp_path / "t2.nii.gz", (10, 10, 10)),
    ]
    main, extras = conversion._choose_main(sorted(files), "t2")
    assert main.name == "t2.nii.gz"
    assert [p.name for p in extras] == ["t2_e2.nii.gz", "t2_ROI1.nii.gz", "t2_i00001.nii.gz"]


def test_choose_main_prefers_corrected_then_first_echo_then_size(tmp_path):
    eq = [_fake_nifti(tmp_path / "a.nii.gz", (4, 4, 4)),
          _fake_nifti(tmp_path / "a_Eq_1.nii.gz", (4, 4, 6))]
    assert conversion._choose_main(eq, "a")[0].name == "a_Eq_1.nii.gz"
    echoes = [_fake_nifti(tmp_path / "b_e2.nii.gz", (4, 4, 4)),
              _fake_nifti(tmp_path / "b_e1.nii.gz", (4, 4, 4))]
    assert conversion._choose_main(echoes, "b")[0].name == "b_e1.nii.gz"
    splits = [_fake_nifti(tmp_path / "c_i00002.nii.gz", (4, 4, 1)),
              _fake_nifti(tmp_path / "c_i00001.nii.gz", (4, 4, 1))]
    assert conversion._choose_main(splits, "c")[0].name == "c_i00001.nii.gz"


def test_extra_outputs_are_kept_and_reported(tmp_path, monkeypatch):
    """A run producing two echoes keeps the first as main and reports the second."""
    def fake_run(src: Path, dst: Path, name: str, timeout_s: float) -> None:
        for suffix, shape in (("_e1", (8, 8, 12)), ("_e2", (8, 8, 12))):
            _fake_nifti(dst / f"{name}{suffix}.nii.gz", shape)
            (dst / f"{name}{suffix}.json").write_text(json.dumps({"EchoNumber": suffix[-1]}))

    monkeypatch.setattr(conversion, "_run_dcm2niix", fake_run)
    dicom = tmp_path / "x.dcm"
    dicom.write_bytes(b"x")
    result = convert_series([dicom], tmp_path / "out", "t2")
    assert result.shape == (8, 8, 12)
    assert json.loads(result.sidecar.read_text()) == {"EchoNumber": "1"}
    assert [p.name for p in result.extra_files] == ["t2_e2.json", "t2_e2.nii.gz"]
    again = convert_series([dicom], tmp_path / "out", "t2")
    assert again.reused and again.extra_files == result.extra_files
