"""DICOM result objects (SEG, TID 1500 SR, overlay series, PDF report) on a real study.

The study is tcga-du-7294 written as DICOM by tests.dicom_factory (every 5th
slice); the label maps are real BraTS 2020 segmentations of that case, mapped
to BraTS 2023 labels (4 -> 3) and resampled nearest-neighbour onto the T1c
series grid read with SimpleITK. Every written object goes through dciodvfy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from brainline.pipelines.dicom_outputs import (
    LABELS,
    AlgorithmInfo,
    EmptySegmentationError,
    QCFinding,
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
    new_uid,
    read_seg_labels,
    read_source_series,
    volume_summary,
)
from brainline.pipelines.dicom_outputs.codes import (
    AI_FAMILY,
    MULTISPECTRAL_FAMILY,
    OHIF_BIDIRECTIONAL,
    PRIVATE_SCHEME,
    algorithm_family,
    default_device_serial,
    qc_concept,
    qc_value,
)
from brainline.pipelines.dicom_outputs.pdf_report import NOT_REVIEWED_STATEMENT
from brainline.pipelines.dicom_outputs.seg import content_description, truncate_words
from tests.dicom_factory import write_study
from tests.shared_data import TCGA, require

SEGMENTATIONS = TCGA / "segmentations"

ALGORITHM = AlgorithmInfo(name="BrainLine", version="0.1.0", backend="onnx", model_name="brats-ensemble",
                          model_version="2024.1")
QC = [
    QCFinding("registration_quality", "acceptable", "mutual information 0.62"),
    QCFinding("ensemble_agreement", "flagged", "mean pairwise Dice 0.61 < 0.70"),
]

# concept codes used when walking the SR content tree
MEASUREMENT_GROUP = "125007"
TRACKING_ID = "112039"
VOLUME = "118565006"
REFERENCED_SEGMENT = "121191"
SOURCE_SERIES = "121232"
MEASUREMENT_METHOD = "370129005"


# ---------------------------------------------------------------------- helpers


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dciodvfy on one file."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if re.match(r"^\s*(\(0x[0-9a-f,x]+\)\s*\S*\s*-\s*)?Error", ln)]
    warnings = [ln for ln in lines if "Warning" in ln]
    return errors, warnings


def load_brats2020(name: str) -> sitk.Image:
    img = sitk.ReadImage(str(require(SEGMENTATIONS / f"{name}.nii.gz")))
    arr = sitk.GetArrayFromImage(img).astype(np.uint8)
    arr[arr == 4] = 3  # BraTS 2020 -> 2023
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def dicom_grid(series_dir: Path) -> tuple[sitk.Image, list[str]]:
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute(), names


def walk(items):
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def concept(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""


def measurement_groups(sr: pydicom.Dataset) -> list[dict]:
    groups = []
    for item in walk(sr.ContentSequence):
        if item.ValueType != "CONTAINER" or concept(item) != MEASUREMENT_GROUP:
            continue
        g: dict = {"volumes": [], "qualitative": {}}
        for child in item.ContentSequence:
            code = concept(child)
            if code == TRACKING_ID:
                g["tracking_id"] = child.TextValue
            elif code == VOLUME and child.ValueType == "NUM":
                mv = child.MeasuredValueSequence[0]
                g["volumes"].append((float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue))
            elif code == REFERENCED_SEGMENT:
                ref = child.ReferencedSOPSequence[0]
                g["seg_uid"] = ref.ReferencedSOPInstanceUID
                g["segment_number"] = int(ref.ReferencedSegmentNumber)
            elif code == SOURCE_SERIES:
                g["source_series"] = child.UID
            elif code == MEASUREMENT_METHOD:
                g["method"] = child.ConceptCodeSequence[0].CodeValue
                g["method_relationship"] = child.RelationshipType
            elif child.ValueType == "CODE":
                g["qualitative"][code] = child.ConceptCodeSequence[0].CodeValue
        groups.append(g)
    return groups


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("dicom_outputs_study"), require(TCGA), slice_step=5, roles=("t1c",))


@pytest.fixture(scope="module")
def t1c(study):
    return study.series["t1c"]


@pytest.fixture(scope="module", params=["fusion_simple", "hnfnetv1-20"])
def case(request, t1c, tmp_path_factory):
    """Label map on the T1c grid and every output built from it, written to disk."""
    grid, names = dicom_grid(t1c.dir)
    labels = sitk.Resample(load_brats2020(request.param), grid, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out = tmp_path_factory.mktemp(f"outputs_{request.param}")
    files = t1c.paths

    summary = volume_summary(labels)
    summary["tiv_ml"] = 1432.5
    seg = build_seg(files, labels, ALGORITHM, series_number=300)
    seg_path = out / "seg.dcm"
    seg.save_as(seg_path)
    sr = build_sr(seg, files, summary, QC, ALGORITHM, series_number=301)
    sr_path = out / "sr.dcm"
    sr.save_as(sr_path)
    rano = build_rano_sr(seg, files, ALGORITHM)
    rano_path = out / "rano_sr.dcm"
    rano.save_as(rano_path)
    combined = build_sr(seg, files, summary, QC, ALGORITHM, bidimensional=True)
    combined_path = out / "combined_sr.dcm"
    combined.save_as(combined_path)
    overlay = build_overlay_series(files, labels, algorithm=ALGORITHM)
    overlay_paths = []
    for ds in overlay:
        path = out / "overlay" / f"IM_{ds.InstanceNumber}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        overlay_paths.append(path)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    content = ReportContent(
        patient_id=str(first.PatientID), patient_name=str(first.PatientName), study_date=first.StudyDate,
        accession_number=str(first.AccessionNumber), study_instance_uid=first.StudyInstanceUID,
        sequences={"t1c": str(first.SeriesDescription)}, algorithm=ALGORITHM,
        volumes_ml=summary["volumes_ml"], tiv_ml=summary["tiv_ml"], qc_findings=QC,
        key_image=key_image_from_series(files, labels),
    )
    pdf = build_pdf_report(content)
    pdf_path = out / "report.pdf"
    pdf_path.write_bytes(pdf)
    epdf = build_encapsulated_pdf(pdf, files, algorithm=ALGORITHM, referenced_instances=[seg, sr])
    epdf_path = out / "report.dcm"
    epdf.save_as(epdf_path, enforce_file_format=True)
    return dict(name=request.param, labels=labels, expected=sitk.GetArrayFromImage(labels), gdcm_names=names,
                files=files, out=out, summary=summary, seg=seg, seg_path=seg_path, sr_path=sr_path,
                rano_path=rano_path, combined_path=combined_path,
                overlay_paths=overlay_paths, pdf=pdf, pdf_path=pdf_path, epdf_path=epdf_path)


# ------------------------------------------------------------------------- tests


def test_every_object_passes_dciodvfy(case):
    paths = [case["seg_path"], case["sr_path"], case["rano_path"], case["combined_path"], case["epdf_path"],
             *case["overlay_paths"]]
    report = {}
    for path in paths:
        errors, warnings = dciodvfy(path)
        assert not errors, f"{path.name}: {errors}"
        report[path.name] = warnings
    # the only tolerated SR warning is the private coding scheme designator
    for name in ("sr.dcm", "rano_sr.dcm", "combined_sr.dcm"):
        assert all(PRIVATE_SCHEME in w for w in report[name]), report[name]
    assert report["seg.dcm"] == [] and report["report.dcm"] == []


def test_source_order_matches_simpleitk(case):
    series = read_source_series(case["files"])
    assert [p.name for p in series.paths] == [Path(n).name for n in case["gdcm_names"]]


def test_seg_round_trip_is_exact(case):
    expected = case["expected"]
    back = read_seg_labels(case["seg_path"], case["files"])
    assert back.dtype == np.uint8 and back.shape == expected.shape
    assert np.array_equal(back, expected)
    # reading directly from the label image gives the same frames
    assert np.array_equal(labels_on_source_grid(case["labels"], case["files"]), expected)


def test_seg_structure_and_references(case, t1c):
    seg = pydicom.dcmread(case["seg_path"])
    src = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in case["files"])}
    present = [v for v in sorted(LABELS) if np.any(case["expected"] == v)]
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentNumber for s in seg.SegmentSequence] == list(range(1, len(present) + 1))
    for item, value in zip(seg.SegmentSequence, present):
        assert item.SegmentLabel == LABELS[value].segment_label
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == LABELS[value].property_type.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "BrainLine" and algo.AlgorithmVersion == "0.1.0"
        assert "RecommendedDisplayCIELabValue" in item
    # same patient/study, references the source series and each frame's instance
    first = next(iter(src.values()))
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert seg[kw].value == first[kw].value
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1c.series_uid
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(case["files"])
    n_nonempty = sum(int(np.any(case["expected"][i] == v)) for v in present for i in range(len(src)))
    assert int(seg.NumberOfFrames) == n_nonempty  # empty frames omitted
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, [float(v) for v in src[ref_uid].ImagePositionPatient], atol=1e-4)
    assert "BrainLine 0.1.0" in list(seg.SoftwareVersions)


def test_sr_volumes_reference_seg_segments(case, t1c):
    sr = pydicom.dcmread(case["sr_path"])
    seg = pydicom.dcmread(case["seg_path"], stop_before_pixels=True)
    labels = case["labels"]
    expected = case["expected"]
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    groups = measurement_groups(sr)
    by_id = {g["tracking_id"]: g for g in groups}

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    assert sr.PatientID == seg.PatientID
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # one group per SEG segment, referencing it and the source series
    for item in seg.SegmentSequence:
        group = by_id[item.TrackingID]
        value = next(v for v, c in LABELS.items() if c.segment_label == item.SegmentLabel)
        assert group["seg_uid"] == seg.SOPInstanceUID
        assert group["segment_number"] == item.SegmentNumber
        assert group["source_series"] == t1c.series_uid
        (vol, unit), = group["volumes"]
        assert unit == "ml"
        assert vol == pytest.approx(np.sum(expected == value) * voxel_ml, rel=1e-6, abs=1e-9)
    # composites and TIV
    tc = np.sum(np.isin(expected, (1, 3))) * voxel_ml
    wt = np.sum(expected > 0) * voxel_ml
    assert by_id["Tumor core"]["volumes"][0][0] == pytest.approx(tc, rel=1e-6)
    assert by_id["Tumor core"]["method"] == "BRATS-TC"
    assert by_id["Whole tumor"]["volumes"][0][0] == pytest.approx(wt, rel=1e-6)
    assert by_id["Total intracranial volume"]["volumes"][0][0] == pytest.approx(1432.5)
    # absent labels are reported with volume 0 and no segment reference
    for value, c in LABELS.items():
        if not np.any(expected == value):
            assert by_id[f"BrainLine {c.key}"]["volumes"][0][0] == 0.0
            assert "seg_uid" not in by_id[f"BrainLine {c.key}"]
    # QC findings as coded qualitative evaluations
    qc = by_id["BrainLine quality control"]["qualitative"]
    assert qc["QC-REG"] == "111237" and qc["QC-ENS"] == "111236"
    assert all(g.get("method_relationship", "HAS CONCEPT MOD") == "HAS CONCEPT MOD" for g in groups)
    # observer context names BrainLine as the device
    texts = {concept(i): i.get("TextValue") for i in walk(sr.ContentSequence) if i.ValueType == "TEXT"}
    assert texts["121013"] == "BrainLine"
    assert texts["121015"] == "onnx/brats-ensemble 2024.1"
    assert texts["111001"] == "BrainLine" and texts["111003"] == "0.1.0"
    # SEG is in the evidence
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    ref_uids = {r.ReferencedSOPInstanceUID for s in evidence for r in s.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in ref_uids
    # highdicom can parse it back as a TID 1500 report
    parsed = hd.sr.srread(case["sr_path"])
    assert len(parsed.content.get_volumetric_roi_measurement_groups()) == len(seg.SegmentSequence)


def test_sr_conformance_fixes(case):
    """PixelMed-reported defects: Measurement Method is HAS CONCEPT MOD (TID 1501),
    QC concepts have unique codes, the device observer has a real serial number."""
    for path in (case["sr_path"], case["rano_path"], case["combined_path"]):
        sr = pydicom.dcmread(path)
        methods = [i for i in walk(sr.ContentSequence) if concept(i) == MEASUREMENT_METHOD]
        assert methods and all(i.RelationshipType == "HAS CONCEPT MOD" for i in methods), path.name
        texts = {concept(i): i.get("TextValue") for i in walk(sr.ContentSequence) if i.ValueType == "TEXT"}
        serial = texts["121016"]  # Device Observer Serial Number
        assert serial == default_device_serial() and serial != "1"
        assert sr.DeviceSerialNumber == serial
    groups = measurement_groups(pydicom.dcmread(case["sr_path"]))
    assert {g["method_relationship"] for g in groups if "method" in g} == {"HAS CONCEPT MOD"}
    # every QC check the pipeline reports has its own code (results.qc_findings_of names)
    names = ["registration t1", "registration t1c", "registration t2", "registration flair", "skull stripping",
             "series_selection", "result_objects", "registration_quality", "image quality",
             "a long check name that is cut one", "a long check name that is cut two"]
    codes = [qc_concept(n) for n in names]
    assert len({c.value for c in codes}) == len(names), [c.value for c in codes]
    assert all(len(c.value) <= 16 for c in codes)
    assert qc_concept("registration t2").meaning == "Registration quality (T2)"
    assert qc_concept("Registration T2") == qc_concept("registration_t2")


def test_device_serial_number():
    assert default_device_serial({"BRAINLINE_DEVICE_SERIAL": "SN-0042"}) == "SN-0042"
    a = default_device_serial({"BRAINLINE_UID_ROOT": "1.2.826.0.1.3680043.10.999"})
    assert a == default_device_serial({"BRAINLINE_UID_ROOT": "1.2.826.0.1.3680043.10.999"})
    assert a != default_device_serial({"BRAINLINE_UID_ROOT": "1.2.826.0.1.3680043.10.998"})
    assert a.startswith("BL-") and len(a) == 13
    host = default_device_serial({})
    assert host.startswith("BL-") and host != a
    # the device UID follows the serial: stable per installation, distinct between sites
    assert AlgorithmInfo(device_serial_number="X").device_uid == AlgorithmInfo(device_serial_number="X").device_uid
    assert AlgorithmInfo(device_serial_number="X").device_uid != AlgorithmInfo(device_serial_number="Y").device_uid


def test_seg_content_identification(case):
    seg = pydicom.dcmread(case["seg_path"], stop_before_pixels=True)
    # Content Creator's Name is type 2: present, empty (made by software, not a person)
    assert "ContentCreatorName" in seg and str(seg.ContentCreatorName) == ""
    assert seg.ContentDescription == "BrainLine 0.1.0 tumor segmentation (onnx/brats-ensemble 2024.1)"
    assert seg.ContentLabel == "BRAINLINE_TUMOR"
    family = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == (AI_FAMILY.value, "DCM")  # a trained model


def test_content_description_never_cut_mid_word():
    long_model = AlgorithmInfo(version="0.1.0", backend="monai_bundle",
                               model_name="brats mri segmentation with a very long descriptive name",
                               model_version="0.5.3")
    for algo in (ALGORITHM, long_model, AlgorithmInfo(version="0.1.0", backend="baseline",
                                                      model_name="brainline-baseline", model_version="2")):
        text = content_description(algo)
        assert len(text) <= 64 and text.startswith("BrainLine 0.1.0")
        words = text.replace(":", " ").replace(",", " ").replace("(", " ").replace(")", " ").split()
        full = f"{algo.name} {algo.version} tumor segmentation {algo.model_label}".replace(",", " ").split()
        assert all(w in full for w in words), text
    assert truncate_words("alpha beta gamma", 12) == "alpha beta"
    assert truncate_words("alpha (beta gamma)", 14) == "alpha"


def test_algorithm_family_by_backend():
    assert algorithm_family("baseline") == MULTISPECTRAL_FAMILY
    assert algorithm_family("onnx") == AI_FAMILY and algorithm_family("monai_bundle") == AI_FAMILY
    assert algorithm_family("something-new") == AI_FAMILY
    assert AlgorithmInfo(backend="baseline").algorithm_family == MULTISPECTRAL_FAMILY
    assert AlgorithmInfo(backend="baseline", family=AI_FAMILY).algorithm_family == AI_FAMILY


def test_rano_sr_planar_measurements(case, t1c):
    """The RANO SR: per tumour-core lesion a Long Axis and a Short Axis NUM [mm],
    each inferred from a 2-point SCOORD POLYLINE on the source image of the
    lesion's largest slice, with the tracking identifier OHIF rehydrates."""
    sr = pydicom.dcmread(case["rano_path"])
    series = read_source_series(case["files"])
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    expected = bidimensional_measurements(case["seg"], series)
    assert expected, "the reference segmentation has a tumour core"
    assert sr.SeriesDescription == "BrainLine RANO measurements"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = [i for i in walk(sr.ContentSequence) if i.ValueType == "CONTAINER" and concept(i) == MEASUREMENT_GROUP]
    assert len(groups) == len(expected)
    for group, (m, enhancing) in zip(groups, expected):
        items = {concept(c): c for c in group.ContentSequence}
        assert items[TRACKING_ID].TextValue.startswith(OHIF_BIDIRECTIONAL + ":BrainLine ")
        assert items["121071"].ConceptCodeSequence[0].CodeValue == ("C113842" if enhancing else "C81175")
        assert items[MEASUREMENT_METHOD].ConceptCodeSequence[0].CodeValue == "C114879"  # RANO
        assert items[MEASUREMENT_METHOD].RelationshipType == "HAS CONCEPT MOD"
        source = series.datasets[m.slice_index]
        for code, meaning, value in (("103339001", "Long Axis", m.measurement.long_mm),
                                     ("103340004", "Short Axis", m.measurement.short_mm)):
            num = items[code]
            assert num.ConceptNameCodeSequence[0].CodeMeaning == meaning  # OHIF matches the meaning
            mv = num.MeasuredValueSequence[0]
            assert mv.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
            assert float(mv.NumericValue) == pytest.approx(value, abs=0.005)
            scoord, = num.ContentSequence
            assert (scoord.ValueType, scoord.RelationshipType, scoord.GraphicType) == (
                "SCOORD", "INFERRED FROM", "POLYLINE")
            image, = scoord.ContentSequence
            ref = image.ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert ref.ReferencedSOPClassUID == source.SOPClassUID and ref.ReferencedSOPInstanceUID in by_uid
            # the polyline, in image pixel coordinates (column, row), is as long as the value says
            pts = np.array(scoord.GraphicData, dtype=float).reshape(2, 2)
            row_sp, col_sp = (float(v) for v in source.PixelSpacing)
            length = np.hypot((pts[1, 0] - pts[0, 0]) * col_sp, (pts[1, 1] - pts[0, 1]) * row_sp)
            assert length == pytest.approx(value, abs=0.01)
            assert np.all((pts >= 0) & (pts <= [source.Columns, source.Rows]))
        # the slice measured is the lesion's largest on the source grid
        labels = read_seg_labels(case["seg_path"], case["files"])
        assert np.count_nonzero(np.isin(labels[m.slice_index], (1, 3))) > 0
    # the tracking UIDs are new (OHIF merges groups that share one)
    uids = [next(c.UID for c in g.ContentSequence if concept(c) == "112040") for g in groups]
    seg = pydicom.dcmread(case["seg_path"], stop_before_pixels=True)
    assert len(set(uids)) == len(uids) and not set(uids) & {s.TrackingUID for s in seg.SegmentSequence}
    # the volumes SR holds no planar measurement unless asked (OHIF 3.13 cannot mix them)
    plain = pydicom.dcmread(case["sr_path"])
    assert not any(i.ValueType == "SCOORD" for i in walk(plain.ContentSequence))
    combined = pydicom.dcmread(case["combined_path"])
    assert sum(i.ValueType == "SCOORD" for i in walk(combined.ContentSequence)) == 2 * len(expected)


def test_overlay_series(case, t1c):
    paths = case["overlay_paths"]
    series = read_source_series(case["files"])
    assert len(paths) == len(series)
    expected = case["expected"]
    found_colours = set()
    uids = set()
    for path, src, lab in zip(paths, series.datasets, expected):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "NOT FOR PRIMARY DIAGNOSIS" in ds.SeriesDescription
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.SeriesInstanceUID != t1c.series_uid
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.DerivationDescription
        assert ds.BurnedInAnnotation in ("YES", "NO")
        assert [float(v) for v in ds.ImagePositionPatient] == [float(v) for v in src.ImagePositionPatient]
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        uids.add(ds.SeriesInstanceUID)
        px = ds.pixel_array
        assert px.shape == (src.Rows, src.Columns, 3)
        for value, c in LABELS.items():
            hit = np.all(px == np.array(c.rgb, dtype=np.uint8), axis=-1)
            if hit.any():
                found_colours.add(value)
                # outline pixels lie on the label
                assert np.all(lab[hit] == value)
        if not lab.any():  # no label -> greyscale only
            assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
    assert len(uids) == 1
    assert found_colours == {v for v in LABELS if np.any(expected == v)}


def test_pdf_report_renders(case, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    assert case["pdf"].startswith(b"%PDF-")
    subprocess.run(["pdftoppm", "-png", "-r", "50", "-f", "1", "-l", "1", str(case["pdf_path"]),
                    str(tmp_path / "page")], check=True, timeout=120)
    pngs = sorted(tmp_path.glob("page*.png"))
    assert pngs and pngs[0].stat().st_size > 5000
    img = imread(pngs[0])
    assert img.shape[0] > 400 and img.shape[1] > 300
    assert float(img[..., :3].std()) > 0.05  # not a blank page
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(case["pdf_path"]), "-"], capture_output=True, text=True,
                              check=True, timeout=120).stdout
        assert NOT_REVIEWED_STATEMENT in text
        assert "PID-4711-XYZ" in text  # the identifiers passed in (pseudonyms in production)
        assert "Registration quality" in text and "flagged" in text
        wt = case["summary"]["volumes_ml"]["whole_tumor"]
        assert f"{wt:.2f}" in text


def test_encapsulated_pdf(case):
    ds = pydicom.dcmread(case["epdf_path"])
    src = pydicom.dcmread(case["files"][0], stop_before_pixels=True)
    assert ds.SOPClassUID == pydicom.uid.EncapsulatedPDFStorage
    assert ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.DocumentTitle
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "StudyDate", "AccessionNumber", "StudyID"):
        assert ds[kw].value == src[kw].value, kw
    doc = bytes(ds.EncapsulatedDocument)
    assert doc[: int(ds.EncapsulatedDocumentLength)] == case["pdf"]
    refs = {r.ReferencedSOPInstanceUID for r in ds.SourceInstanceSequence}
    assert case["seg"].SOPInstanceUID in refs and src.SOPInstanceUID in refs


def test_labels_on_any_grid_and_irregular_series(t1c):
    """Labels on the 1 mm NIfTI grid give the same frames as pre-resampled ones;
    instances off a regular grid (a missing slice) are resampled one by one."""
    nifti = load_brats2020("fusion_simple")
    grid, _ = dicom_grid(t1c.dir)
    on_grid = sitk.Resample(nifti, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    full = labels_on_source_grid(nifti, t1c.paths)
    assert np.array_equal(full, sitk.GetArrayFromImage(on_grid))
    series = read_source_series(t1c.paths)
    keep = [p for i, p in enumerate(series.paths) if i != 20]
    gappy = labels_on_source_grid(nifti, keep)
    assert np.array_equal(gappy, np.delete(full, 20, axis=0))


def test_empty_labels_and_sr_without_seg(t1c, tmp_path):
    grid, _ = dicom_grid(t1c.dir)
    empty = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(grid)
    with pytest.raises(EmptySegmentationError):
        build_seg(t1c.paths, empty, ALGORITHM)
    summary = volume_summary(empty)
    sr = build_sr(None, t1c.paths, summary, [QCFinding("image_quality", "acceptable")], ALGORITHM,
                  uid_root="1.2.826.0.1.3680043.10.999")
    assert sr.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.999.")
    sr.save_as(tmp_path / "sr.dcm")
    errors, _ = dciodvfy(tmp_path / "sr.dcm")
    assert not errors
    groups = measurement_groups(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert all(v == 0.0 for g in groups for v, _ in g["volumes"])


def test_uids_and_codes():
    assert new_uid().startswith("2.25.")
    assert new_uid("1.2.3").startswith("1.2.3.")
    assert len({new_uid() for _ in range(50)}) == 50
    with pytest.raises(ValueError):
        qc_value("great")
    with pytest.raises(ValueError):
        build_seg([], sitk.Image(2, 2, 2, sitk.sitkUInt8), ALGORITHM)


def test_labels_on_dcm2niix_grid(t1c, tmp_path):
    """Production path: labels on the NIfTI grid dcm2niix makes of the series
    (rows/columns flipped relative to DICOM) give the same SEG frames."""
    from brainline.pipelines.conversion import ConversionError, convert_series
    try:
        result = convert_series(list(t1c.paths), tmp_path, "t1c")
    except (ConversionError, FileNotFoundError) as exc:
        pytest.skip(f"dcm2niix unavailable: {exc}")
    nii = sitk.ReadImage(str(result.nifti))
    source = load_brats2020("hnfnetv1-20")
    on_nii = sitk.Resample(source, nii, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    grid, _ = dicom_grid(t1c.dir)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(source, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    seg = build_seg(t1c.paths, on_nii, ALGORITHM)
    assert np.array_equal(read_seg_labels(seg, t1c.paths), expected)
