"""Follow-up result objects: subtraction series, lesion SEG, change SR, PDF follow-up section.

The current study is tcga-du-7294 written as DICOM (T1c and FLAIR, every 5th
slice: 240 x 240 x 31, 1 x 1 x 5 mm); the tumour labels are the real BraTS 2020
reference on the T1c grid. The follow-up inputs are what pipelines/longitudinal.py
writes (see /tmp/l11/contract.md): ``longitudinal.json`` with three timepoints,
FLAIR and T1c subtraction maps on the reference grid (noise inside a brain
disc, one new and one growing lesion added with known values), the lesion id
map, and ``priors/0`` with ``prior.json`` (pseudo study UID, an earlier
BrainLine SEG) and the prior's T1c DICOM series. Every object goes through
dciodvfy; values are read back from the files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from brainline.pipelines import results as results_module
from brainline.pipelines.dicom_outputs import volume_summary
from brainline.pipelines.dicom_outputs.codes import (
    FOLLOWUP_ASSESSMENT,
    INCREASE_IN_SIZE,
    LESION,
    NEW_FINDING,
    PERCENT_CHANGE_PRIOR,
    PRIOR_STUDY_COMPARED,
    QC_CHECKS,
    VOLUME_CHANGE_PRIOR,
    VOLUME_NADIR,
    VOLUME_PRIOR,
)
from brainline.pipelines.dicom_outputs.longitudinal_sr import CHANGE_METHODS
from brainline.pipelines.dicom_outputs.seg import image_on_source_grid, read_source_series
from brainline.pipelines.records import SELECTION_FILE
from brainline.pipelines.results import build_results, rerender_pdf
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_study
from tests.test_dicom_outputs import dciodvfy, load_brats2020, walk
from tests.test_result_objects import kinds, pdf_text, sr_texts

CURRENT_DATE, PRIOR_DATE, BASELINE_DATE = "20240115", "20231016", "20230601"   # prior: 91 days earlier
PRIOR_STUDY = "2.25.314159265358979323846264338327950288"
PRIOR_SEG = ("2.25.271828182845904523536028747135266249", "2.25.161803398874989484820458683436563811")
THICK_NOTE = "FLAIR of the prior has 5.5 mm slices: small-lesion detection is limited"
NOTE = "compared with the prior study of 2023-10-16: 1 new and 1 growing lesion(s) on the subtraction"
REASON = "tumour core +62.5 % vs prior (threshold +40 %)"
#: lesion id -> (kind, slices, rows, columns) on the 240 x 240 x 31 grid, and its subtraction value
LESIONS = {1: ("new", slice(14, 16), slice(60, 66), slice(100, 106), 400.0),
           2: ("growing", slice(20, 21), slice(150, 158), slice(150, 158), 250.0)}


def _image(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    return img


def _change(a: dict, b: dict) -> dict:
    return {k: {"prior_ml": a[k], "current_ml": b[k], "delta_ml": b[k] - a[k],
                "percent": 100.0 * (b[k] - a[k]) / a[k] if a[k] else None} for k in b}


@pytest.fixture(scope="module")
def followup(tmp_path_factory):
    """A work folder of a current study with a follow-up against one prior."""
    root = tmp_path_factory.mktemp("followup")
    study = write_study(root / "dicom", TCGA, roles=("t1c", "flair"), slice_step=5, study_date=CURRENT_DATE, **PHI)
    prior = write_study(root / "prior_dicom", TCGA, roles=("t1c",), slice_step=10, study_uid=PRIOR_STUDY,
                        study_date=PRIOR_DATE, **PHI)
    files = study.series["t1c"].paths
    source = read_source_series(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in source.paths])
    grid = reader.Execute()
    labels = sitk.Resample(load_brats2020("fusion_simple"), grid, sitk.Transform(), sitk.sitkNearestNeighbor,
                           0, sitk.sitkUInt8)
    work = root / "work"
    (work / "longitudinal").mkdir(parents=True)
    sitk.WriteImage(labels, str(work / "segmentation.nii.gz"))
    summary = {**volume_summary(labels), "tiv_ml": 1450.0, "registration": {}, "qc_flags": [],
               "backends": {"segmentation": {"backend": "baseline", "model_name": "brainline-baseline",
                                             "model_version": "1"}}}
    (work / "summary.json").write_text(json.dumps(summary))
    (work / SELECTION_FILE).write_text(json.dumps({
        "roles": {r: {"description": study.series[r].description} for r in ("t1c", "flair")},
        "inputs": {"reference": "t1c"},
        "files": {r: [str(p) for p in study.series[r].paths] for r in ("t1c", "flair")}}))

    # brain mask (a disc), subtraction maps (noise + lesions), lesion ids: on the reference grid
    shape = sitk.GetArrayViewFromImage(grid).shape                     # (31, 240, 240): [k, row, column]
    rr, cc = np.mgrid[:shape[1], :shape[2]]
    brain = np.broadcast_to(((rr - 120) ** 2 + (cc - 120) ** 2) < 95 ** 2, shape)
    rng = np.random.default_rng(11)
    flair = np.where(brain, rng.normal(0.0, 20.0, shape), 0.0).astype(np.float32)
    t1c = np.where(brain, rng.normal(0.0, 15.0, shape), 0.0).astype(np.float32)
    ids = np.zeros(shape, np.uint16)
    lesions = []
    for lid, (kind, ks, rs, cs, value) in LESIONS.items():
        flair[ks, rs, cs] = value
        ids[ks, rs, cs] = lid
        volume = float(np.count_nonzero(ids == lid) * np.prod(grid.GetSpacing()))
        prior_volume = 0.0 if kind == "new" else 120.0
        lesions.append({"id": lid, "kind": kind, "volume_mm3": volume, "prior_volume_mm3": prior_volume,
                        "growth_mm3": volume - prior_volume, "centroid_lps_mm": [0.0, 0.0, 0.0],
                        "hemisphere": "left" if lid == 1 else "right", "lobe": "frontal" if lid == 1 else "parietal",
                        "confidence": 0.9 if lid == 1 else 0.6, "sequence": "flair",
                        # the new lesion enhances: its axial diameters (RANO measurability)
                        **({"enhancing": True, "enhancing_mm3": volume, "long_axis_mm": 12.3, "short_axis_mm": 10.8,
                            "measurable": True} if kind == "new" else {})})
    sitk.WriteImage(_image(brain.astype(np.uint8), grid), str(work / "brain_mask.nii.gz"))
    sitk.WriteImage(_image(flair, grid), str(work / "longitudinal" / "subtraction_flair.nii.gz"))
    sitk.WriteImage(_image(t1c, grid), str(work / "longitudinal" / "subtraction_t1c.nii.gz"))
    sitk.WriteImage(_image(ids, grid), str(work / "longitudinal" / "lesions.nii.gz"))

    current = summary["volumes_ml"]
    prior_v = {k: v / 1.625 for k, v in current.items()}                    # ET +62.5 % vs prior
    baseline_v = {k: v / 2.0 for k, v in current.items()}                   # the nadir
    entry = {"dir": "priors/0", "study_date": PRIOR_DATE, "kept_as": ["most recent"], "source": "BrainLine job 12",
             "pseudo_study_uid": PRIOR_STUDY, "job_id": 12}
    pwork = work / "priors" / "0"
    pwork.mkdir(parents=True)
    (pwork / "prior.json").write_text(json.dumps({**entry, "seg_series_uid": PRIOR_SEG[0],
                                                  "seg_sop_instance_uid": PRIOR_SEG[1]}))
    (pwork / SELECTION_FILE).write_text(json.dumps({
        "inputs": {"reference": "t1c"}, "files": {"t1c": [str(p) for p in prior.series["t1c"].paths]}}))
    longitudinal = {
        "mode": "tumour", "priors": 1, "note": NOTE, "notes": [THICK_NOTE], "flags": [],
        "comparison": {"prior_index": 0, "prior_study_date": PRIOR_DATE, "prior_pseudo_study_uid": PRIOR_STUDY,
                       "registration": {"transform": "rigid", "quality": {"ncc": 0.91}, "flags": []},
                       "intensity_match": "histogram",
                       "subtractions": {"flair": "longitudinal/subtraction_flair.nii.gz",
                                        "t1c": "longitudinal/subtraction_t1c.nii.gz"},
                       "resolution": {}},
        "timepoints": [
            {"label": "baseline", "study_date": BASELINE_DATE, "pseudo_study_uid": "2.25.1",
             "volumes_ml": baseline_v, "kept_as": ["baseline", "nadir"]},
            {"label": "prior", "study_date": PRIOR_DATE, "pseudo_study_uid": PRIOR_STUDY, "volumes_ml": prior_v,
             "kept_as": ["most recent"]},
            {"label": "current", "study_date": CURRENT_DATE, "pseudo_study_uid": None, "volumes_ml": current}],
        "change": {"vs_prior": _change(prior_v, current),
                   "vs_nadir": {**_change(baseline_v, current), "study_date": BASELINE_DATE}},
        "assessment": {"code": "progression suspected", "reason": REASON},
        "lesions": lesions, "thresholds": {"progression_percent": 40}}
    (work / "longitudinal.json").write_text(json.dumps(longitudinal))
    built = root / "built"
    shutil.copytree(work, built)
    record = build_results(built, files)
    return SimpleNamespace(study=study, prior=prior, files=files, source=source, grid=grid, work=work, built=built,
                           record=record, flair=flair, ids=ids, longitudinal=longitudinal, summary=summary)


def fresh(followup, tmp_path: Path, **changes) -> Path:
    work = tmp_path / "work"
    shutil.copytree(followup.work, work)
    if changes:
        data = {**followup.longitudinal, **changes}
        (work / "longitudinal.json").write_text(json.dumps(data))
    return work


def files_of(record: dict, work: Path, kind: str) -> list[Path]:
    return [work / o["file"] for o in record["objects"] if o["kind"] == kind]


def by_series(paths: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        out.setdefault(str(ds.SeriesDescription), []).append(ds)
    return out


def nums(item) -> dict[str, tuple[float, str]]:
    """NUM children of a content item: concept meaning -> (value, unit code)."""
    out = {}
    for child in item.ContentSequence:
        if child.ValueType == "NUM":
            mv = child.MeasuredValueSequence[0]
            out[child.ConceptNameCodeSequence[0].CodeMeaning] = (float(mv.NumericValue),
                                                                 mv.MeasurementUnitsCodeSequence[0].CodeValue)
    return out


def groups(sr: pydicom.Dataset) -> dict[str, Dataset]:
    """Measurement groups by tracking identifier."""
    out = {}
    for item in walk(sr.ContentSequence):
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "125007":
            tid = next(c.TextValue for c in item.ContentSequence
                       if c.ConceptNameCodeSequence[0].CodeValue == "112039")
            out[tid] = item
    return out


# ------------------------------------------------------------------------ tests


def test_followup_objects_are_valid_dicom_in_the_current_study(followup):
    record, work = followup.record, followup.built
    n = len(followup.files)
    assert record["complete"] and record["failed"] == [], record["failed"]
    counts = kinds(record)
    assert counts["subtraction"] == 2 * n and counts["lesion_seg"] == 1 and counts["change_sr"] == 1
    assert {"seg", "sr", "pdf", "overlay"} <= set(counts)
    assert record["prior_studies"] == [PRIOR_STUDY]
    for obj in record["objects"]:
        assert obj.get("prior_study_uids", []) == ([PRIOR_STUDY] if obj["kind"] in ("subtraction", "change_sr")
                                                   else [])
    series = by_series(files_of(record, work, "subtraction"))
    assert sorted(series) == ["BrainLine FLAIR minus prior 2023-10-16 NOT FOR DIAGNOSIS",
                              "BrainLine T1c minus prior 2023-10-16 NOT FOR DIAGNOSIS"]
    checked = [files_of(record, work, "subtraction")[0], files_of(record, work, "subtraction")[-1],
               *files_of(record, work, "lesion_seg"), *files_of(record, work, "change_sr"),
               *files_of(record, work, "sr"), *files_of(record, work, "pdf")]
    for path in checked:
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == followup.study.study_uid and ds.PatientID == PHI["patient_id"]
    # subtraction images: geometry, derivation and references of their source instance
    for datasets in series.values():
        datasets.sort(key=lambda d: int(d.InstanceNumber))
        assert len(datasets) == n and len({d.SeriesInstanceUID for d in datasets}) == 1
        for ds, src in zip(datasets, followup.source.datasets):
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "SUBTRACTION"]
            assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.PixelRepresentation == 1
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
            assert np.allclose(ds.ImagePositionPatient, src.ImagePositionPatient)
            assert list(ds.ImageOrientationPatient) == list(src.ImageOrientationPatient)
            assert list(ds.PixelSpacing) == list(src.PixelSpacing) and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
            assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID == PRIOR_STUDY
            assert ds.DerivationCodeSequence[0].CodeValue == "113062"
            assert "prior 2023-10-16" in ds.DerivationDescription
    flair = series["BrainLine FLAIR minus prior 2023-10-16 NOT FOR DIAGNOSIS"][0]
    assert flair.EchoTime == pydicom.dcmread(followup.study.series["flair"].paths[0]).EchoTime  # FLAIR header
    assert float(flair.WindowCenter) == 0.0 and 80.0 < float(flair.WindowWidth) < 1000.0


def test_subtraction_values_round_trip(followup):
    datasets = by_series(files_of(followup.record, followup.built, "subtraction"))[
        "BrainLine FLAIR minus prior 2023-10-16 NOT FOR DIAGNOSIS"]
    datasets.sort(key=lambda d: int(d.InstanceNumber))
    values = np.stack([apply_modality_lut(d.pixel_array, d) for d in datasets])
    slope = float(datasets[0].RescaleSlope)
    assert slope == pytest.approx(400.0 / 32000, rel=0.01)             # the largest value uses +-32000
    expected = image_on_source_grid(sitk.ReadImage(str(followup.work / "longitudinal" / "subtraction_flair.nii.gz")),
                                    followup.source)
    assert np.abs(values - expected).max() <= slope / 2 + 1e-4
    for _lid, (_, ks, rs, cs, value) in LESIONS.items():                 # known voxels
        assert values[ks.start, rs.start, cs.start] == pytest.approx(value, abs=slope / 2)
    assert values[0, 0, 0] == 0.0 and np.isclose(values[15, 120, 120], followup.flair[15, 120, 120], atol=slope)


def test_lesion_seg_segments_and_frames(followup):
    path = files_of(followup.record, followup.built, "lesion_seg")[0]
    seg = hd.seg.segread(path)
    items = {int(i.SegmentNumber): i for i in seg.SegmentSequence}
    assert [items[k].SegmentLabel for k in sorted(items)] == ["New lesion 1", "Growing lesion 2"]
    for number, modifier in ((1, NEW_FINDING), (2, INCREASE_IN_SIZE)):
        ptype = items[number].SegmentedPropertyTypeCodeSequence[0]
        assert ptype.CodeValue == LESION.value
        assert ptype.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == modifier.value
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == followup.study.series["t1c"].series_uid
    assert int(seg.NumberOfFrames) == 3                                 # 2 slices + 1 slice, empty frames omitted
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=followup.source.sop_instance_uids, segment_numbers=[1, 2],
        combine_segments=False, assert_missing_frames_are_empty=True)
    for number in (1, 2):
        assert np.array_equal(masks[..., number - 1] > 0, followup.ids == number)


def test_change_sr_holds_the_change_and_the_prior_reference(followup):
    sr = pydicom.dcmread(files_of(followup.record, followup.built, "change_sr")[0])
    g = groups(sr)
    change = followup.longitudinal["change"]
    tc = nums(g["BrainLine TC change"])
    assert tc["Volume"][0] > 1.0
    assert tc["Volume"][0] == pytest.approx(change["vs_prior"]["tumor_core"]["current_ml"], abs=1e-5)
    assert tc[VOLUME_PRIOR.meaning][0] == pytest.approx(change["vs_prior"]["tumor_core"]["prior_ml"], abs=1e-5)
    assert tc[VOLUME_CHANGE_PRIOR.meaning] == (
        pytest.approx(change["vs_prior"]["tumor_core"]["delta_ml"], abs=1e-5), "ml")
    assert tc[PERCENT_CHANGE_PRIOR.meaning] == (pytest.approx(62.5, abs=1e-4), "%")
    assert tc[VOLUME_NADIR.meaning][0] == pytest.approx(change["vs_nadir"]["tumor_core"]["prior_ml"], abs=1e-5)
    assert tc["Percent volume change since nadir study"] == (pytest.approx(100.0, abs=1e-4), "%")
    # no enhancing tumour at either time (this case on this grid): 0 mL, no percentage
    et = nums(g["BrainLine ET change"])
    assert et["Volume"][0] == 0.0 and PERCENT_CHANGE_PRIOR.meaning not in et
    assert {"BrainLine NCR change", "BrainLine ED change", "BrainLine WT change"} <= set(g)
    assessment = g["BrainLine follow-up assessment"]
    coded = {c.ConceptNameCodeSequence[0].CodeValue: c for c in assessment.ContentSequence}
    assert coded[FOLLOWUP_ASSESSMENT.value].ConceptCodeSequence[0].CodeMeaning == "Progression suspected"
    assert coded[PRIOR_STUDY_COMPARED.value].UID == PRIOR_STUDY
    assert nums(assessment)["Interval since prior study"] == (91.0, "d")
    assert nums(assessment)["Number of new lesions"][0] == 1 and nums(assessment)["Number of growing lesions"][0] == 1
    # lesion groups reference the lesion SEG segments
    seg = pydicom.dcmread(files_of(followup.record, followup.built, "lesion_seg")[0], stop_before_pixels=True)
    new = g["BrainLine new lesion 1"]
    ref = next(c for c in new.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "121191")
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert int(ref.ReferencedSOPSequence[0].ReferencedSegmentNumber) == 1
    lesion = followup.longitudinal["lesions"][0]
    assert nums(new)["Volume"] == (pytest.approx(lesion["volume_mm3"]), "mm3")
    assert nums(new)["Certainty of Finding"] == (pytest.approx(90.0), "%")
    assert nums(new)["Long Axis"] == (pytest.approx(12.3), "mm")
    assert nums(new)["Short Axis"] == (pytest.approx(10.8), "mm")
    assert "Long Axis" not in nums(g["BrainLine growing lesion 2"])
    # the prior's objects: its SEG and its reference series, under its study
    other = {str(s.StudyInstanceUID): s for s in sr.PertinentOtherEvidenceSequence}
    refs = {str(r.ReferencedSOPInstanceUID) for s in other[PRIOR_STUDY].ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence}
    prior_t1c = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                 for p in followup.prior.series["t1c"].paths}
    assert refs == prior_t1c | {PRIOR_SEG[1]}
    texts = sr_texts(files_of(followup.record, followup.built, "change_sr")[0])
    assert texts["Follow-up volumetric assessment"] == [f"progression suspected: {REASON}"]
    assert texts["Follow-up comparison"] == [NOTE, THICK_NOTE]
    # the main SR carries the follow-up registration check too
    main = sr_texts(files_of(followup.record, followup.built, "sr")[0])
    assert main["Prior study registration quality"] == ["rigid registration of the prior (ncc 0.91)"]


def test_pdf_has_the_followup_section(followup, tmp_path):
    path = files_of(followup.record, followup.built, "pdf")[0]
    text = " ".join(pdf_text(path).split())
    for words in ("Follow-up", "Compared with the prior study of 2023-10-16 (91 days earlier)",
                  "Assessment: progression suspected. Tumour core +62.5 % vs prior", "Volume over time", "2023-06-01",
                  "New and growing lesions", "left frontal", "right parietal", THICK_NOTE, NOTE,
                  "1 new and 1 growing lesion(s).", "12 x 11, measurable",
                  "FLAIR subtraction (current - prior 2023-10-16)"):
        assert words in text, words
    # re-rendered at the gateway for a real study date 10 days later: every date moves with it
    ds = pydicom.dcmread(path)
    identity = {"patient_id": "X", "patient_name": "Y", "study_date": "20240125", "accession_number": "",
                "study_instance_uid": "1.2.3"}
    rerender_pdf(ds, followup.built, followup.files, identity)
    out = tmp_path / "re.dcm"
    ds.save_as(out, enforce_file_format=True)
    text = " ".join(pdf_text(out).split())
    assert "prior study of 2023-10-26 (91 days earlier)" in text and "Nadir 2023-06-11" in text
    assert NOTE.replace("2023-10-16", "2023-10-26") in text and "2023-10-16" not in text


def test_borderline_assessment_is_coded_and_explained(followup, tmp_path):
    """Growth between borderline_percent and the progression threshold reads
    "borderline": the change SR codes it (valid DICOM), and the SR text and the
    PDF carry the reason that asks for the images to be compared."""
    reason = ("tumour core increased against the nadir by less than the progression threshold but by at least "
              "+25 %: tumour core 6.0 -> 7.9 mL (+32 %); compare the images")
    work = fresh(followup, tmp_path, assessment={"code": "borderline", "borderline": ["tumor_core"],
                                                 "reason": reason})
    record = build_results(work, followup.files)
    assert record["complete"] and record["failed"] == [], record["failed"]
    sr_path = files_of(record, work, "change_sr")[0]
    errors, _ = dciodvfy(sr_path)
    assert errors == [], errors
    assessment = groups(pydicom.dcmread(sr_path))["BrainLine follow-up assessment"]
    coded = {c.ConceptNameCodeSequence[0].CodeValue: c for c in assessment.ContentSequence}
    value = coded[FOLLOWUP_ASSESSMENT.value].ConceptCodeSequence[0]
    assert (value.CodeValue, value.CodeMeaning) == ("FU-BORDERLINE", "Borderline growth, below the progression "
                                                                     "threshold")
    assert sr_texts(sr_path)["Follow-up volumetric assessment"] == [f"borderline: {reason}"]
    text = " ".join(pdf_text(files_of(record, work, "pdf")[0]).split())
    assert "Assessment: borderline." in text and "compare the images" in text, text


def _methods(item) -> dict[str, str]:
    """NUM children of a content item: concept meaning -> its Measurement Method code value ("" if none)."""
    out = {}
    for child in item.ContentSequence:
        if child.ValueType == "NUM":
            method = [c for c in getattr(child, "ContentSequence", [])
                      if c.ConceptNameCodeSequence[0].CodeValue == "370129005"]
            out[child.ConceptNameCodeSequence[0].CodeMeaning] = (method[0].ConceptCodeSequence[0].CodeValue
                                                                  if method else "")
    return out


def test_change_objects_report_the_measure_the_assessment_uses(followup, tmp_path):
    """With a change measured on the registered pair (change.vs_prior_paired, which the
    assessment uses), the SR and the PDF give that change, name its measure, and give a
    new lesion's partial-volume integral (volume_integrated_mm3) as its volume."""
    change = followup.longitudinal["change"]
    independent = change["vs_prior"]
    assert all(len(c.value) <= 16 and len(c.meaning) <= 64 for c in CHANGE_METHODS.values())
    paired = {}
    for key, (prior_ml, delta_ml, method) in {
            "tumor_core": (11.25, 1.75, "boundary shift integral"),
            "whole_tumor": (40.5, 3.25, "subtraction-confirmed voxels")}.items():
        assert abs(independent[key]["delta_ml"] - delta_ml) > 0.5       # distinguishable from vs_prior
        paired[key] = {"prior_ml": prior_ml, "current_ml": prior_ml + delta_ml, "delta_ml": delta_ml,
                       "percent": round(100.0 * delta_ml / prior_ml, 1), "gained_ml": delta_ml + 0.5,
                       "lost_ml": 0.5, "sequence": "t1c", "method": method}
    lesions = [dict(x) for x in followup.longitudinal["lesions"]]
    new, growing = lesions[0], lesions[1]
    assert new["kind"] == "new" and growing["kind"] == "growing"
    new["volume_integrated_mm3"] = round(new["volume_mm3"] * 1.4 + 7.0, 1)
    growing["volume_integrated_mm3"] = None
    work = fresh(followup, tmp_path, change={**change, "vs_prior_paired": paired}, lesions=lesions)
    record = build_results(work, followup.files)
    assert record["complete"] and record["failed"] == [], record["failed"]
    sr_path = files_of(record, work, "change_sr")[0]
    errors, _ = dciodvfy(sr_path)
    assert errors == [], errors
    g = groups(pydicom.dcmread(sr_path))
    segs = CHANGE_METHODS["segmentations"].value
    for key, name in (("tumor_core", "TC"), ("whole_tumor", "WT")):
        bsi = CHANGE_METHODS[paired[key]["method"]].value
        values, methods = nums(g[f"BrainLine {name} change"]), _methods(g[f"BrainLine {name} change"])
        assert values["Volume"][0] == pytest.approx(paired[key]["current_ml"], abs=1e-5)
        assert values[VOLUME_PRIOR.meaning][0] == pytest.approx(paired[key]["prior_ml"], abs=1e-5)
        assert values[VOLUME_CHANGE_PRIOR.meaning] == (pytest.approx(paired[key]["delta_ml"], abs=1e-5), "ml")
        assert values[PERCENT_CHANGE_PRIOR.meaning] == (pytest.approx(paired[key]["percent"], abs=1e-4), "%")
        assert methods[VOLUME_CHANGE_PRIOR.meaning] == methods[PERCENT_CHANGE_PRIOR.meaning] == bsi
        assert methods["Volume change since nadir study"] == segs
    # a component the pair did not measure keeps the two segmentations, and says so
    ncr = g["BrainLine NCR change"]
    assert nums(ncr)[VOLUME_CHANGE_PRIOR.meaning][0] == pytest.approx(independent["1"]["delta_ml"], abs=1e-5)
    assert _methods(ncr)[VOLUME_CHANGE_PRIOR.meaning] == segs
    words = sr_texts(sr_path)["Measurement Method"]
    assert len(words) == 1
    assert "TC by the boundary shift integral on the registered image pair (the measure of the " \
           "assessment)" in words[0], words
    assert "WT by segmentation changes confirmed by the subtraction of the registered image pair (the " \
           "measure of the assessment)" in words[0], words
    assert "NCR and ED by the difference of the two segmentations" in words[0]
    assert "Against the nadir: the difference of the two segmentations" in words[0]
    # lesions: the new one by its integral (prior 0: growth = volume), the growing one as before
    assert nums(g["BrainLine new lesion 1"])["Volume"] == (pytest.approx(new["volume_integrated_mm3"]), "mm3")
    assert nums(g["BrainLine new lesion 1"])[VOLUME_CHANGE_PRIOR.meaning][0] == \
        pytest.approx(new["volume_integrated_mm3"])
    assert nums(g["BrainLine growing lesion 2"])["Volume"] == (pytest.approx(growing["volume_mm3"]), "mm3")
    # the PDF: the same change, the same words, the same lesion volume
    text = " ".join(pdf_text(files_of(record, work, "pdf")[0]).split())
    tc_row = (f"TC {paired['tumor_core']['prior_ml']:.2f} {paired['tumor_core']['current_ml']:.2f} "
              f"+{paired['tumor_core']['delta_ml']:.2f} +{paired['tumor_core']['percent']:.1f}")
    assert tc_row in text, text
    assert f"TC {independent['tumor_core']['prior_ml']:.2f} {independent['tumor_core']['current_ml']:.2f}" not in text
    assert "TC by the boundary shift integral on the registered image pair" in text
    assert f"{new['volume_integrated_mm3']:.0f} +{new['volume_integrated_mm3']:.0f}" in text
    # without a paired measure (the module's fixture) the SR names the two segmentations
    main = groups(pydicom.dcmread(files_of(followup.record, followup.built, "change_sr")[0]))
    assert _methods(main["BrainLine TC change"])[VOLUME_CHANGE_PRIOR.meaning] == segs
    assert "by the difference of the two segmentations" in " ".join(
        sr_texts(files_of(followup.record, followup.built, "change_sr")[0])["Measurement Method"])


def test_a_failing_followup_builder_costs_only_its_object(followup, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no memory for the subtraction")

    monkeypatch.setattr(results_module, "build_subtraction_series", broken)
    monkeypatch.setattr(results_module, "build_overlay_series", lambda *a, **k: [])  # not under test: time
    work = fresh(followup, tmp_path)
    record = build_results(work, followup.files)
    assert record["complete"] and "subtraction" not in kinds(record)
    assert {"seg", "sr", "pdf", "lesion_seg", "change_sr"} <= set(kinds(record))
    words = ["FLAIR subtraction series not built: ValueError: no memory for the subtraction",
             "T1c subtraction series not built: ValueError: no memory for the subtraction"]
    assert [f["error"] for f in record["failed"]] == words and words[0] in record["notes"]
    for kind in ("sr", "change_sr"):
        sr_path = files_of(record, work, kind)[0]
        assert sr_texts(sr_path)["Result objects completeness"] == ["; ".join(words)]
        assert dciodvfy(sr_path)[0] == []
    evaluations = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
                   for i in walk(pydicom.dcmread(files_of(record, work, "sr")[0]).ContentSequence)
                   if i.ValueType == "CODE"}
    assert evaluations[QC_CHECKS["result_objects"].concept.value] == "111236"
    assert "FLAIR subtraction series not built" in " ".join(pdf_text(files_of(record, work, "pdf")[0]).split())


def test_unregistered_prior_gives_the_volume_change_and_says_why(followup, tmp_path, monkeypatch):
    monkeypatch.setattr(results_module, "build_overlay_series", lambda *a, **k: [])
    note = "the prior could not be registered: normalised correlation 0.12 < 0.5 after rigid registration"
    comparison = {**followup.longitudinal["comparison"], "subtractions": {},
                  "registration": {"transform": "rigid", "quality": {"ncc": 0.12}, "flags": ["ncc 0.12 < 0.5"]}}
    work = fresh(followup, tmp_path, note=note, comparison=comparison, lesions=[],
                 flags=["registration of the prior failed"])
    record = build_results(work, followup.files)
    assert record["failed"] == [] and kinds(record)["change_sr"] == 1
    assert "subtraction" not in kinds(record) and "lesion_seg" not in kinds(record)
    path = files_of(record, work, "change_sr")[0]
    assert dciodvfy(path)[0] == []
    texts = sr_texts(path)
    assert f"No subtraction or new-lesion detection was possible: {note}" in texts["Follow-up comparison"]
    assert texts["Prior study registration quality"] == [f"{note}; ncc 0.12 < 0.5"]
    g = groups(pydicom.dcmread(path))
    assert nums(g["BrainLine TC change"])[PERCENT_CHANGE_PRIOR.meaning][0] == pytest.approx(62.5, abs=1e-4)
    assert "Number of new lesions" not in nums(g["BrainLine follow-up assessment"])
    text = " ".join(pdf_text(files_of(record, work, "pdf")[0]).split())
    assert f"No subtraction or new-lesion detection was possible: {note}" in text


def test_no_prior_no_followup_object(followup, tmp_path, monkeypatch):
    monkeypatch.setattr(results_module, "build_overlay_series", lambda *a, **k: [])
    work = fresh(followup, tmp_path)
    (work / "longitudinal.json").write_text(json.dumps({"priors": 0, "note": "no prior study found"}))
    record = build_results(work, followup.files)
    assert set(kinds(record)) & set(results_module.LONGITUDINAL_OBJECTS) == set()
    assert "prior_studies" not in record and record["failed"] == []
    assert "Follow-up" not in pdf_text(files_of(record, work, "pdf")[0])
    assert "Prior study registration quality" not in sr_texts(files_of(record, work, "sr")[0])


def test_prior_words_name_an_interval_when_dates_are_shifted(followup):
    longitudinal, prior = followup.longitudinal, {}
    real = SimpleNamespace(first=Dataset())
    real.first.StudyDate = CURRENT_DATE
    shifted = SimpleNamespace(first=Dataset())
    shifted.first.StudyDate = CURRENT_DATE
    shifted.first.LongitudinalTemporalInformationModified = "MODIFIED"
    assert results_module.prior_words(longitudinal, prior, real) == "prior 2023-10-16"
    assert results_module.prior_words(longitudinal, prior, shifted) == "prior 91 days earlier"
    # dates inside words (notes of longitudinal.json): kept, intervals when shifted, moved for the PDF
    assert results_module.date_words(longitudinal, real)(NOTE) == NOTE
    assert results_module.date_words(longitudinal, shifted)(NOTE) == NOTE.replace(
        "2023-10-16", "[91 days before this study]")
    assert results_module.date_words(longitudinal, shifted, 3)("baseline 2023-06-01, 2023-10-16") == (
        "baseline 2023-06-04, 2023-10-19")


def test_a_change_measured_by_the_segmentations_is_what_the_objects_report():
    """longitudinal.json may say that the assessment used the two segmentations
    (``change.measure.uses``: a trained segmenter at both timepoints,
    pipelines.longitudinal.change_measure) although the registered pair was
    measured too: the SR and the PDF (both take change_vs_prior and
    change_measure_words) then give the segmentations' change, name it as the
    measure of the assessment and say why; without ``measure`` (older records)
    the registered pair is reported as before."""
    from brainline.pipelines.dicom_outputs.longitudinal_sr import change_measure_words, change_vs_prior

    def entry(prior, delta, method=None):
        e = {"prior_ml": prior, "current_ml": prior + delta, "delta_ml": delta,
             "percent": round(100.0 * delta / prior, 1)}
        return {**e, "method": method} if method else e

    independent = {"1": entry(2.0, 0.5), "2": entry(30.0, 4.0), "3": entry(5.0, 1.0),
                   "tumor_core": entry(7.0, 1.5), "whole_tumor": entry(37.0, 5.5)}
    paired = {k: entry(independent[k]["prior_ml"], 0.25, "boundary shift integral")
              for k in ("3", "tumor_core", "whole_tumor")}
    reason = "both studies were segmented by the trained model brats17-wang"
    by_segs = {"3": "segmentations", "tumor_core": "segmentations", "whole_tumor": "segmentations"}
    change = {"vs_prior": independent, "vs_nadir": None, "vs_prior_paired": paired,
              "measure": {"uses": by_segs, "setting": "auto", "reason": reason}}
    values, methods = change_vs_prior(change)
    assert {k: v["delta_ml"] for k, v in values.items()} == {k: v["delta_ml"] for k, v in independent.items()}
    assert set(methods.values()) == {"segmentations"}
    words = change_measure_words(change)
    assert "ET, TC and WT by the difference of the two segmentations (the measure of the assessment); NCR and " \
           "ED by the difference of the two segmentations." in words, words
    assert f"Why: {reason}." in words and "boundary shift" not in words
    # per component: WT on the registered pair, ET and TC by the segmentations
    mixed = {**change, "measure": {**change["measure"], "uses": {**by_segs, "whole_tumor": "paired"}}}
    values, methods = change_vs_prior(mixed)
    assert values["whole_tumor"]["delta_ml"] == 0.25 and methods["whole_tumor"] == "boundary shift integral"
    assert values["tumor_core"]["delta_ml"] == 1.5 and methods["tumor_core"] == "segmentations"
    words = change_measure_words(mixed)
    assert "ET and TC by the difference of the two segmentations (the measure of the assessment)" in words, words
    assert "WT by the boundary shift integral on the registered image pair (the measure of the assessment)" in words
    # the registered pair (measure "paired", or no measure recorded)
    for measure in ({"uses": "paired", "setting": "auto", "reason": "the baseline segmenter"}, None):
        old = {k: v for k, v in {**change, "measure": measure}.items() if v is not None}
        values, methods = change_vs_prior(old)
        assert values["whole_tumor"]["delta_ml"] == 0.25 and methods["whole_tumor"] == "boundary shift integral"
        assert values["1"]["delta_ml"] == 0.5 and methods["1"] == "segmentations"
        words = change_measure_words(old)
        assert "ET, TC and WT by the boundary shift integral on the registered image pair (the measure of the " \
               "assessment)" in words, words
        assert "NCR and ED by the difference of the two segmentations" in words
        assert "segmentations (the measure of the assessment)" not in words
