"""pipelines/dicom_outputs/source_series.py: the reference series is read once
and handed to every result builder.

Real data: the T1c of tcga-du-7294 written as DICOM (every 5th slice, axial)
and resliced as a doubly oblique 5.5 mm acquisition. The grid computed from
the headers is compared with what SimpleITK's ImageSeriesReader builds from
the files (what the builders used before, reading the series again each
time); ``build_results`` is then run with pydicom's reader and ITK's series
reader counted: each source file is read once, by pydicom, and never by ITK.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainline.pipelines.dicom_outputs import build_seg, read_seg_labels, volume_summary
from brainline.pipelines.dicom_outputs.seg import image_on_source_grid, labels_on_source_grid
from brainline.pipelines.dicom_outputs.source_series import SourceSeries, as_source_series, read_source_series
from brainline.pipelines.results import build_results, rerender_pdf
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_study
from tests.reslice import reslice
from tests.test_dicom_outputs import ALGORITHM, dciodvfy


def _itk_grid(paths) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    return reader.Execute()


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("source_series")
    t1c = reslice(sitk.ReadImage(str(TCGA / "t1c.nii.gz")), spacing=(0.9, 0.9, 5.5), fov_mm=(230.0, 230.0, 160.0),
                  tilt_x_deg=16.0, tilt_z_deg=5.0)
    (root / "case").mkdir()
    sitk.WriteImage(t1c, str(root / "case" / "t1c.nii.gz"))
    oblique = write_study(root / "oblique", root / "case", roles=("t1c",), **PHI)
    axial = write_study(root / "axial", TCGA, roles=("t1c",), slice_step=5, **PHI)
    return SimpleNamespace(oblique=oblique.series["t1c"].paths, axial=axial.series["t1c"].paths, root=root)


@pytest.mark.parametrize("which", ["oblique", "axial"])
def test_grid_from_headers_is_the_grid_itk_reads(studies, which):
    files = getattr(studies, which)
    series = read_source_series(list(reversed(files)))          # any file order
    itk = _itk_grid(series.paths)
    grid = series.grid
    assert grid.size == itk.GetSize()
    assert grid.origin == itk.GetOrigin()
    assert np.allclose(grid.spacing, itk.GetSpacing(), rtol=0, atol=1e-12)
    assert np.allclose(grid.direction, itk.GetDirection(), rtol=0, atol=1e-12)
    ref = grid.reference_image()
    assert ref.GetSize() == itk.GetSize() and np.allclose(ref.GetDirection(), itk.GetDirection(), atol=1e-12)
    # sorted along the normal: positions increase along it
    along = [float(np.dot(np.array(ds.ImagePositionPatient, float), series.normal)) for ds in series.datasets]
    assert along == sorted(along) and abs(np.linalg.norm(series.normal) - 1) < 1e-12


def test_labels_and_images_on_the_grid_match_the_itk_grid(studies):
    series = read_source_series(studies.oblique)
    itk = _itk_grid(series.paths)
    labels = sitk.ReadImage(str(TCGA / "segmentations" / "fusion_simple.nii.gz"), sitk.sitkUInt8)
    labels = sitk.ChangeLabel(labels, {4: 3})
    expected = sitk.GetArrayFromImage(sitk.Resample(labels, itk, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                    sitk.sitkUInt8))
    got = labels_on_source_grid(labels, series)
    assert got.shape == series.shape and expected.any()
    assert np.array_equal(got, expected)
    image = sitk.ReadImage(str(TCGA / "flair.nii.gz"), sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(sitk.Resample(image, itk, sitk.Transform(), sitk.sitkLinear, 0,
                                                    sitk.sitkFloat32))
    assert np.allclose(image_on_source_grid(image, series), expected, rtol=0, atol=1e-3)


def test_an_instance_off_the_grid_is_resampled_on_its_own_plane(studies):
    files = sorted(studies.axial, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                      .ImagePositionPatient[2]))
    uneven = files[:10] + files[11:]                               # a gap: one slice missing
    series = read_source_series(uneven)
    labels = sitk.ChangeLabel(sitk.ReadImage(str(TCGA / "segmentations" / "fusion_simple.nii.gz"), sitk.sitkUInt8),
                              {4: 3})
    got = labels_on_source_grid(labels, series)
    for i, ds in enumerate(series.datasets):                       # each frame on its own plane
        plane = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkUInt8)
        plane.SetOrigin([float(v) for v in ds.ImagePositionPatient])
        plane.SetSpacing([float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 1.0])
        want = sitk.GetArrayFromImage(sitk.Resample(labels, plane, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                    sitk.sitkUInt8))[0]
        assert np.array_equal(got[i], want), f"instance {i}"


def test_pixels_are_read_lazily_one_instance_at_a_time(studies, monkeypatch):
    full = read_source_series(studies.axial, pixels=True)
    headers = read_source_series(studies.axial)
    assert full.has_pixels and not headers.has_pixels
    reads: list[Path] = []
    original = pydicom.dcmread

    def counting(fp, *args, **kwargs):
        reads.append(Path(fp))
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    k = len(headers) // 2
    assert np.array_equal(headers.modality_image(k), full.modality_image(k))
    assert np.array_equal(headers.pixel_array(k), full.pixel_array(k))
    assert reads == [headers.paths[k]]                             # one file, once
    assert np.array_equal(full.modality_volume(), np.stack([full.modality_image(i) for i in range(len(full))]))
    assert len(reads) == 1                                         # the full read needs no file


def test_builders_accept_a_series_or_its_files(studies):
    series = read_source_series(studies.axial)
    assert as_source_series(series) is series
    again = as_source_series([str(p) for p in studies.axial])
    assert isinstance(again, SourceSeries) and again.sop_instance_uids == series.sop_instance_uids


def test_build_results_reads_the_source_series_once(studies, monkeypatch):
    """Before: the SEG, overlay and PDF key image each read the series again
    through ImageSeriesReader (4 passes per build_results, 11 with a follow-up)."""
    files = studies.axial
    series = read_source_series(files)
    labels = sitk.Resample(sitk.ChangeLabel(sitk.ReadImage(str(TCGA / "segmentations" / "fusion_simple.nii.gz"),
                                                           sitk.sitkUInt8), {4: 3}),
                           series.grid.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    work = studies.root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    sitk.WriteImage(labels, str(work / "segmentation.nii.gz"))
    (work / "summary.json").write_text(json.dumps({
        **volume_summary(labels), "tiv_ml": 1450.0, "registration": {}, "qc_flags": [],
        "backends": {"segmentation": {"backend": "baseline", "model_name": "brainline-baseline",
                                      "model_version": "1"}}}))
    sources = {p.resolve() for p in files}
    reads: list[Path] = []
    itk_reads: list[str] = []
    original_read, original_execute = pydicom.dcmread, sitk.ImageSeriesReader.Execute

    def counting(fp, *args, **kwargs):
        if isinstance(fp, (str, Path)) and Path(fp).resolve() in sources:
            reads.append(Path(fp).resolve())
        return original_read(fp, *args, **kwargs)

    def counting_execute(self, *args, **kwargs):
        itk_reads.extend(self.GetFileNames())
        return original_execute(self, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", counting_execute)
    record = build_results(work, files)
    assert record["complete"] and {o["kind"] for o in record["objects"]} >= {"seg", "sr", "overlay", "pdf"}
    assert sorted(reads) == sorted(sources) and itk_reads == []
    reads.clear()
    pdf = original_read(work / "results" / "report.dcm")
    rerender_pdf(pdf, work, files, {"patient_id": "P", "study_date": "20240115"})
    # headers once, and the pixel data of the key image's one instance
    assert len(reads) == len(sources) + 1 and set(reads) == sources and itk_reads == []


def test_orientation_rounding_between_images_still_gets_every_result(studies, tmp_path):
    """Images of one series whose ImageOrientationPatient differ in the 4th
    decimal (a converter's rounding): series completeness accepts them
    (tolerance 1e-3), so the results must be built too. Before, the source
    series was refused (tolerance 1e-4) and highdicom refused any difference."""
    files = []
    for i, path in enumerate(studies.axial):
        ds = pydicom.dcmread(path)
        if i % 2:
            iop = [float(v) for v in ds.ImageOrientationPatient]
            iop[1], iop[3] = iop[1] + 5e-4, iop[3] - 5e-4
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.save_as(tmp_path / path.name)
        files.append(tmp_path / path.name)
    series = read_source_series(files)
    labels = sitk.ChangeLabel(sitk.ReadImage(str(TCGA / "segmentations" / "fusion_simple.nii.gz"), sitk.sitkUInt8),
                              {4: 3})
    seg = build_seg(series, labels, ALGORITHM)
    assert {tuple(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient)} == {
        tuple(series.first.ImageOrientationPatient)}
    seg.save_as(tmp_path / "seg.dcm")
    assert np.array_equal(read_seg_labels(tmp_path / "seg.dcm", series), labels_on_source_grid(labels, series))
    assert dciodvfy(tmp_path / "seg.dcm")[0] == []
    sources = {src.ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence
               for d in f.DerivationImageSequence for src in d.SourceImageSequence}
    assert sources <= set(series.sop_instance_uids)
