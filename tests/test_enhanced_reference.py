"""An Enhanced (multi-frame) MR reference series, as Siemens XA and Philips
scanners send by default: every result is built on its frames.

The tcga-du-7294 study (every 5th slice) is written as classic MR; its T1c is
also written as one multi-frame instance (highdicom's Legacy Converted
Enhanced MR conversion, and the same labelled Enhanced MR Image Storage) with
its frames stored foot-last (frame 1 is the top slice), so frame order is not
slice order. The results built on the frames must equal those built on the
classic slices (labels, measurements, overlay pixels), must reference the one
instance with the right frame number, and must pass dciodvfy. (A multi-frame
reference split over several instances is refused before any image step:
tests/test_series_completeness.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainline.pipelines.dicom_outputs import (
    ReportContent,
    bidimensional_measurements,
    build_encapsulated_pdf,
    build_overlay_series,
    build_pdf_report,
    build_rano_sr,
    build_seg,
    build_sr,
    key_image_from_series,
    labels_on_source_grid,
    read_seg_labels,
    read_source_series,
    volume_summary,
)
from tests.conftest import PHI, TCGA
from tests.dicom_factory import SeriesInfo, StudyInfo, write_multi_frame_series, write_study
from tests.peers import storescu
from tests.test_dicom_outputs import ALGORITHM, QC, dciodvfy, dicom_grid, load_brats2020, walk
from tests.test_results_delivery import check_delivered, orthanc_instance

CLI = [sys.executable, "-m", "brainline.service.cli", "process", "--quiet"]
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("enhanced") / "dicom", TCGA, slice_step=5, **PHI)


@pytest.fixture(scope="module", params=[(False, False), (True, False), (True, True)],
                ids=["legacy-converted", "enhanced-class", "per-frame-orientation"])
def multi_frame(request, study, tmp_path_factory):
    """The T1c as one multi-frame instance; the last variant keeps its plane
    orientation per frame, as Philips writes it (highdicom wants it shared)."""
    folder = tmp_path_factory.mktemp("multi_frame") / "t1c"
    enhanced_class, per_frame = request.param
    return write_multi_frame_series(study.series["t1c"], folder, enhanced_class=enhanced_class,
                                    per_frame_orientation=per_frame)


def _frame_positions(ds: pydicom.Dataset) -> dict[int, tuple[float, ...]]:
    return {n: tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
            for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1)}


def test_frames_read_as_the_classic_slices(study, multi_frame):
    classic = read_source_series(study.series["t1c"].paths)
    frames = read_source_series(multi_frame.paths)
    assert len(multi_frame.paths) == 1 and len(frames) == len(classic) == 31
    assert frames.grid == classic.grid
    assert frames.frames == list(range(31, 0, -1))   # stored top slice first
    assert [ds.ImagePositionPatient for ds in frames.datasets] == [ds.ImagePositionPatient for ds in classic.datasets]
    for i in range(len(classic)):
        assert np.array_equal(frames.modality_image(i), classic.modality_image(i))
    assert frames.instances == [frames.multi_frame_instance] and classic.instances == classic.datasets
    item = frames.reference_item(0)
    assert int(item.ReferencedFrameNumber) == 31 and item.ReferencedSOPInstanceUID == frames.first.SOPInstanceUID
    assert "ReferencedFrameNumber" not in classic.reference_item(0)


def test_results_on_frames_equal_the_classic_results(study, multi_frame, tmp_path):
    classic = read_source_series(study.series["t1c"].paths, pixels=True)
    frames = read_source_series(multi_frame.paths, pixels=True)
    instance = pydicom.dcmread(multi_frame.paths[0], stop_before_pixels=True)
    grid, _ = dicom_grid(study.series["t1c"].dir)
    labels = sitk.Resample(load_brats2020("hnfnetv1-20"), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    # SEG: one multi-frame source; each SEG frame lies on the source frame it names
    seg = build_seg(frames, labels, ALGORITHM)
    seg.save_as(tmp_path / "seg.dcm")
    assert np.array_equal(read_seg_labels(tmp_path / "seg.dcm", frames), labels_on_source_grid(labels, classic))
    positions = _frame_positions(instance)
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == instance.SOPInstanceUID
        assert tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient) == \
            positions[int(source.ReferencedFrameNumber)]
    # SRs: the evidence is the instance; the RANO axes name the frame of their slice
    sr = build_sr(seg, frames, volume_summary(labels), QC, ALGORITHM)
    rano = build_rano_sr(seg, frames, ALGORITHM)
    measured = bidimensional_measurements(seg, frames)
    assert [(m.slice_index, m.measurement.long_mm, m.measurement.short_mm, e) for m, e in measured] == [
        (m.slice_index, m.measurement.long_mm, m.measurement.short_mm, e)
        for m, e in bidimensional_measurements(build_seg(classic, labels, ALGORITHM), classic)]
    scoords = [item for item in walk(rano.ContentSequence) if item.ValueType == "SCOORD"]
    assert scoords
    for item in scoords:
        ref = item.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == instance.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == frames.frames[measured[0][0].slice_index]
    for report in (sr, rano):
        evidence = [i.ReferencedSOPInstanceUID for s in report.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence]
        assert instance.SOPInstanceUID in evidence and len(evidence) == 2   # the instance and the SEG
    sr.save_as(tmp_path / "sr.dcm")
    rano.save_as(tmp_path / "rano.dcm")
    # overlay: the classic overlay's pixels, each image naming its source frame
    overlay = build_overlay_series(frames, labels, algorithm=ALGORITHM)
    for i, (a, b) in enumerate(zip(overlay, build_overlay_series(classic, labels, algorithm=ALGORITHM))):
        assert np.array_equal(a.pixel_array, b.pixel_array) and a.ImagePositionPatient == b.ImagePositionPatient
        assert int(a.SourceImageSequence[0].ReferencedFrameNumber) == frames.frames[i]
    overlay[len(overlay) // 2].save_as(tmp_path / "overlay.dcm", enforce_file_format=True)
    # PDF: the key image from a frame, the instance as its source
    first = frames.first
    report = ReportContent(
        patient_id=str(first.PatientID), patient_name=str(first.PatientName), study_date=first.StudyDate,
        accession_number=str(first.AccessionNumber), study_instance_uid=first.StudyInstanceUID,
        sequences={"t1c": str(first.SeriesDescription)}, algorithm=ALGORITHM,
        volumes_ml=volume_summary(labels)["volumes_ml"], tiv_ml=1400.0, qc_findings=QC,
        key_image=key_image_from_series(frames, labels))
    epdf = build_encapsulated_pdf(build_pdf_report(report), frames, algorithm=ALGORITHM, referenced_instances=[seg])
    assert [i.ReferencedSOPInstanceUID for i in epdf.SourceInstanceSequence] == [
        instance.SOPInstanceUID, seg.SOPInstanceUID]
    epdf.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    for name in ("seg.dcm", "sr.dcm", "rano.dcm", "overlay.dcm", "report.dcm"):
        errors, _ = dciodvfy(tmp_path / name)
        assert errors == [], (name, errors)


def with_multi_frame_t1c(study: StudyInfo, root: Path) -> StudyInfo:
    """A copy of ``study`` under ``root`` whose T1c is one Enhanced MR instance."""
    series = {}
    for role, info in study.series.items():
        if role == "t1c":
            series[role] = write_multi_frame_series(info, root / role, enhanced_class=True)
            continue
        (root / role).mkdir(parents=True)
        paths = [shutil.copy(path, root / role / path.name) for path in info.paths]
        series[role] = SeriesInfo(info.series_uid, info.description, len(paths), root / role, paths)
    paths = [p for info in series.values() for p in info.paths]
    return replace(study, series=series, n_instances=len(paths), paths=paths)


def test_process_with_an_enhanced_reference(study, tmp_path):
    """`brainline process --prior` on the study whose T1c (the reference) is
    one Enhanced MR instance, the prior the same images as a classic study 91
    days earlier: every result, the follow-up's included, is built on its
    frames."""
    root = tmp_path / "study"
    mf = with_multi_frame_t1c(study, root).series["t1c"]
    prior = write_study(tmp_path / "prior", TCGA, slice_step=5, study_date="20231016", **PHI)
    out = tmp_path / "out"
    result = subprocess.run(CLI + [str(root), "--out", str(out), "--prior", str(prior.series["t1"].dir.parent)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    selection = json.loads((out / "select_series.json").read_text())
    assert selection["roles"]["t1c"]["is_enhanced"] is True
    instance = pydicom.dcmread(mf.paths[0], stop_before_pixels=True)
    names = sorted(p.name for p in (out / "dicom").glob("*.dcm"))
    seg = pydicom.dcmread(out / "dicom" / "seg.dcm")
    assert {i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for i in seg.PerFrameFunctionalGroupsSequence} == {instance.SOPInstanceUID}
    frames = read_source_series(mf.paths)
    segmentation = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert np.array_equal(read_seg_labels(out / "dicom" / "seg.dcm", frames),
                          labels_on_source_grid(segmentation, frames))
    overlays = [p for p in (out / "dicom").rglob("*.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).Modality == "OT"]
    assert len(overlays) == 31, names
    subtraction = [p for p in (out / "dicom").rglob("*.dcm")
                   if pydicom.dcmread(p, stop_before_pixels=True).Modality == "MR"]
    by_series: dict[str, list[int]] = {}   # T1c and FLAIR subtraction series
    for path in subtraction:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == instance.SOPInstanceUID
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(int(ds.SourceImageSequence[0].ReferencedFrameNumber))
    assert len(by_series) == 2 and all(sorted(f) == list(range(1, 32)) for f in by_series.values())
    checked = [out / "dicom" / n for n in names] + overlays[:1] + subtraction[:1]
    kinds = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in checked}
    assert {"SEG", "SR", "DOC", "OT", "MR"} <= kinds
    for path in checked:
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)


@pytest.mark.integration
def test_enhanced_study_pushed_by_a_scanner_gets_every_result(service_factory, orthanc, study, tmp_path):
    """storescu pushes the study with its Enhanced MR T1c to `brainline serve`:
    SEG, SR, RANO SR, overlay series and PDF reach Orthanc under the original
    study, referencing the instance's frames, dciodvfy-clean."""
    pushed = with_multi_frame_t1c(study, tmp_path / "study")
    svc = service_factory(BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    assert storescu(tmp_path / "study", svc.dicom_port).returncode == 0
    box = check_delivered(svc, orthanc, pushed, tmp_path)
    assert box["depth"] == 0
    [item] = [i for i in box["items"] if i["kind"] == "seg"]
    seg = orthanc_instance(orthanc, item["sop_instance_uid"])
    frames = {int(src.ReferencedFrameNumber) for f in seg.PerFrameFunctionalGroupsSequence
              for d in f.DerivationImageSequence for src in d.SourceImageSequence}
    assert frames and frames <= set(range(1, 32))
