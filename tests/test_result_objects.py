"""Result objects built and delivered each on its own, on an oblique study.

The source series is the T1c of tcga-du-7294 resliced as a clinical 2D
acquisition: 5.5 mm slices, tilted 16 degrees (pitch) and 5 degrees (yaw), so
every image plane is doubly oblique and PatientOrientation needs several
letters per value ('LP', 'PHR'), which highdicom's one-letter enum rejected
('RHP' is not a valid PatientOrientationValuesBiped). The labels are the real
BraTS 2020 reference (4 -> 3) resampled onto that series. Every object goes
through dciodvfy; the SEG is read back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainline.pipelines import results as results_module
from brainline.pipelines.dicom_outputs import build_rano_sr, labels_on_source_grid, read_seg_labels, volume_summary
from brainline.pipelines.dicom_outputs.codes import MULTISPECTRAL_FAMILY, QC_CHECKS, QUALITATIVE_EVALUATIONS
from brainline.pipelines.dicom_outputs.overlay import patient_orientation
from brainline.pipelines.records import Summary
from brainline.pipelines.results import OutputsError, build_results
from brainline.service.compute.stages import build_outputs
from brainline.service.gateway.deliver import deliver
from brainline.service.jobs.context import StageContext
from tests.conftest import PHI, TCGA
from tests.dicom_factory import write_study
from tests.reslice import reslice
from tests.test_dicom_outputs import dciodvfy, load_brats2020, walk

INPUTS_NOTE = "T1 and T2 not found; segmentation used T1c and FLAIR only"
#: The RANO SR (build_rano_sr), once pipelines/results.py builds it as kind "rano".
RANO = {"rano": 1} if "rano" in results_module.OBJECT_NAMES else {}
RANO_FILES = ["rano_sr.dcm"] if RANO else []
OVERLAY_ERROR = "'RHP' is not a valid PatientOrientationValuesBiped"


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    """An oblique 2D T1c series and a working folder (labels, summary, selection)."""
    root = tmp_path_factory.mktemp("oblique")
    t1c = reslice(sitk.ReadImage(str(TCGA / "t1c.nii.gz")), spacing=(0.9, 0.9, 5.5),
                  fov_mm=(230.0, 230.0, 160.0), tilt_x_deg=16.0, tilt_z_deg=5.0)
    (root / "case").mkdir()
    sitk.WriteImage(t1c, str(root / "case" / "t1c.nii.gz"))
    study = write_study(root / "dicom", root / "case", roles=("t1c",), **PHI)
    files = study.series["t1c"].paths
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    grid = reader.Execute()
    labels = sitk.Resample(load_brats2020("fusion_simple"), grid, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    work = root / "work"
    work.mkdir()
    sitk.WriteImage(labels, str(work / "segmentation.nii.gz"))
    summary = {**volume_summary(labels), "tiv_ml": 1450.0, "registration": {}, "qc_flags": [],
               "backends": {"segmentation": {"backend": "baseline", "model_name": "brainline-baseline",
                                             "model_version": "1"}},
               "inputs": {"missing": ["t1", "t2"], "used": ["t1c", "flair"], "note": INPUTS_NOTE}}
    (work / "summary.json").write_text(json.dumps(summary))
    (work / "select_series.json").write_text(json.dumps({
        "roles": {"t1c": {"description": study.series["t1c"].description}},
        "inputs": summary["inputs"], "files": {"t1c": [str(p) for p in files]}}))
    return SimpleNamespace(study=study, files=files, labels=labels, work=work)


def fresh_work(oblique, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(oblique.work, work)
    return work


def kinds(record: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for obj in record["objects"]:
        out[obj["kind"]] = out.get(obj["kind"], 0) + 1
    return out


def sr_texts(path: Path) -> dict[str, list[str]]:
    """TEXT items of the SR's Qualitative Evaluations container, by concept meaning."""
    sr = pydicom.dcmread(path)
    out: dict[str, list[str]] = {}
    for item in walk(sr.ContentSequence):
        name = item.get("ConceptNameCodeSequence")
        if item.ValueType == "CONTAINER" and name and name[0].CodeValue == QUALITATIVE_EVALUATIONS.value:
            for child in item.ContentSequence:
                out.setdefault(child.ConceptNameCodeSequence[0].CodeMeaning, []).append(child.TextValue)
    return out


def sr_evaluations(path: Path) -> dict[str, str]:
    """Coded QC evaluations of the SR: concept value -> coded value."""
    sr = pydicom.dcmread(path)
    return {item.ConceptNameCodeSequence[0].CodeValue: item.ConceptCodeSequence[0].CodeValue
            for item in walk(sr.ContentSequence) if item.ValueType == "CODE"}


def pdf_text(path: Path) -> str:
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    pdf = path.with_suffix(".pdf")
    pdf.write_bytes(pydicom.dcmread(path).EncapsulatedDocument)
    return subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def test_patient_orientation_of_oblique_planes():
    assert patient_orientation([1, 0, 0, 0, 1, 0]) == ("L", "P")
    c, s = np.cos(np.radians(16)), np.sin(np.radians(16))
    assert patient_orientation([1, 0, 0, 0, c, s]) == ("L", "PH")
    assert patient_orientation([-0.9, 0.1, 0.42, 0.0, 0.2, -0.98]) == ("RHP", "FP")
    assert patient_orientation([0, 1, 0, 0, 0, -1]) == ("P", "F")  # sagittal


def test_all_objects_on_an_oblique_series_are_valid_dicom(oblique, tmp_path):
    work = fresh_work(oblique, tmp_path)
    record = build_results(work, oblique.files)
    assert record["failed"] == [] and record["complete"] and record["segmented"]
    assert kinds(record) == {"seg": 1, "overlay": len(oblique.files), "sr": 1, "pdf": 1, **RANO}
    assert json.loads((work / "build_outputs.json").read_text()) == record
    files = {o["kind"]: work / o["file"] for o in record["objects"]}
    for kind, path in files.items():
        errors, _ = dciodvfy(path)
        assert errors == [], f"{kind}: {errors}"
    # overlay: the multi-letter orientation of the oblique source plane
    for obj in record["objects"][1:4]:
        sc = pydicom.dcmread(work / obj["file"], stop_before_pixels=True)
        src = pydicom.dcmread(oblique.files[0], stop_before_pixels=True)
        assert list(sc.PatientOrientation) == list(patient_orientation(src.ImageOrientationPatient))
        assert len(sc.PatientOrientation[1]) >= 2
    # SEG read back: exactly the labels on the source grid
    back = read_seg_labels(files["seg"], oblique.files)
    expected = labels_on_source_grid(oblique.labels, oblique.files)
    assert expected.any() and np.array_equal(back, expected)
    # the missing inputs in words: SR and PDF
    assert sr_texts(files["sr"])["Series selection quality"] == [INPUTS_NOTE]
    text = pdf_text(files["pdf"])
    assert "T1 and T2 not found" in " ".join(text.split())
    assert "not found in the study" in text


def test_baseline_seg_identification_and_rano_sr_on_oblique_planes(oblique, tmp_path):
    """The classical baseline is coded as such (not as AI), the SEG's content
    identification is complete, and the RANO SR's polylines on a doubly
    oblique series are valid DICOM."""
    work = fresh_work(oblique, tmp_path)
    record = build_results(work, oblique.files)
    files = {o["kind"]: work / o["file"] for o in record["objects"]}
    seg = pydicom.dcmread(files["seg"])
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    family = algo.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == (
        MULTISPECTRAL_FAMILY.value, "DCM", "Multispectral Processing")
    assert "ContentCreatorName" in seg and str(seg.ContentCreatorName) == ""
    # too long with the words "tumor segmentation": shortened, not cut mid-word
    assert seg.ContentDescription == f"BrainLine {results_module.__version__}: baseline/brainline-baseline 1"
    summary = json.loads((work / "summary.json").read_text())
    rano = build_rano_sr(seg, oblique.files, results_module.algorithm_of(summary))
    assert rano is not None
    rano.save_as(tmp_path / "rano.dcm")
    errors, _ = dciodvfy(tmp_path / "rano.dcm")
    assert errors == []
    src = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in oblique.files}
    scoords = [i for i in walk(rano.ContentSequence) if i.ValueType == "SCOORD"]
    assert scoords and len(scoords) % 2 == 0
    for item in scoords:
        ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        ds = pydicom.dcmread(src[ref], stop_before_pixels=True)
        pts = np.array(item.GraphicData, dtype=float).reshape(-1, 2)
        assert len(pts) == 2 and np.all((pts >= 0) & (pts <= [ds.Columns, ds.Rows]))


def test_qc_findings_have_unique_codes(oblique, tmp_path):
    """One QC concept per registered sequence (they shared QC-REGISTRATION_)."""
    summary = {"registration": {r: {"flags": []} for r in ("t1", "t2", "flair")} | {"t1c": {"reference": True}},
               "qc_flags": ["implausible brain volume 820 mL"],
               "skull_strip": {"flags": ["implausible brain volume 820 mL"]},
               "inputs": {"note": INPUTS_NOTE}}
    findings = results_module.qc_findings_of(summary, [{"kind": "overlay", "error": "overlay series not built"}])
    codes = [f.concept.value for f in findings]
    assert len(codes) == 6 and len(set(codes)) == len(codes), codes
    assert {f.concept.meaning for f in findings} >= {"Registration quality (T1)", "Registration quality (T2)",
                                                    "Registration quality (FLAIR)", "Skull stripping quality"}


def test_failing_overlay_costs_only_the_overlay(oblique, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError(OVERLAY_ERROR)

    monkeypatch.setattr(results_module, "build_overlay_series", broken)
    work = fresh_work(oblique, tmp_path)
    record = build_results(work, oblique.files)
    assert kinds(record) == {"seg": 1, "sr": 1, "pdf": 1, **RANO}
    assert record["complete"]
    words = f"overlay series not built: ValueError: {OVERLAY_ERROR}"
    assert record["failed"] == [{"kind": "overlay", "error": words}]
    assert words in record["notes"] and INPUTS_NOTE in record["notes"]
    assert json.loads((work / "build_outputs.json").read_text())["failed"] == record["failed"]
    files = {o["kind"]: work / o["file"] for o in record["objects"]}
    assert sorted(p.name for p in (work / "results").iterdir()) == sorted(
        ["report.dcm", "seg.dcm", "sr.dcm", *RANO_FILES])
    # a QC finding of the SR: coded (flagged) and in words
    result_objects = QC_CHECKS["result_objects"].concept.value
    assert sr_evaluations(files["sr"])[result_objects] == "111236"
    assert sr_texts(files["sr"])["Result objects completeness"] == [words]
    assert dciodvfy(files["sr"])[0] == []
    assert "overlay series not built" in " ".join(pdf_text(files["pdf"]).split())
    # the record is final: a re-run returns it unchanged
    assert build_results(work, oblique.files) == record


def test_failing_seg_fails_loudly_but_keeps_the_sr(oblique, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(results_module, "build_seg", broken)
    work = fresh_work(oblique, tmp_path)
    with pytest.raises(OutputsError, match=r"DICOM SEG not built: RuntimeError: disk on fire \(built: "):
        build_results(work, oblique.files)
    record = json.loads((work / "build_outputs.json").read_text())
    assert not record["complete"] and {"sr", "pdf", "overlay"} <= set(kinds(record))
    assert "DICOM SEG not built" in sr_texts(work / "results" / "sr.dcm")["Result objects completeness"][0]
    monkeypatch.undo()
    rebuilt = build_results(work, oblique.files)  # an incomplete record is rebuilt
    assert rebuilt["complete"] and "seg" in kinds(rebuilt)


# ----------------------------------------------------------------- service side


class FakeOutbox:
    destinations = {"pacs": object()}

    def __init__(self):
        self.queued: list[tuple[str, Path]] = []

    def enqueue(self, job_id, objects):
        self.queued.extend(objects)
        return len(objects)

    def cancel_earlier(self, study_key, job_id):  # no earlier job of this study
        return 0

    def sent_earlier(self, study_key, job_id):
        return []


class FakeVault:
    def __init__(self, study_uid: str):
        self.records = {("study", "pseudo-study"): {"StudyInstanceUID": study_uid, "uid_map": {},
                                                    "AccessionNumber": PHI["accession"], "StudyID": "1",
                                                    "date_shift_days": 0},
                        ("patient", "pseudo-patient"): {"PatientID": PHI["patient_id"],
                                                        "PatientName": PHI["patient_name"]}}

    def get(self, kind, key):
        return self.records.get((kind, key))


def stage_context(oblique, tmp_path) -> StageContext:
    work = fresh_work(oblique, tmp_path)
    (work / "pseudonymize.json").write_text(json.dumps({"pseudo_study_uid": "pseudo-study",
                                                        "pseudo_patient_id": "pseudo-patient"}))
    settings = SimpleNamespace(uid_root="", reference_role="t1c", model="", device="cpu",
                               registration_transform="rigid", skull_strip_backend="deepbet",
                               outbox_dir=tmp_path / "outbox", series_rules="")
    return StageContext(job_id=7, study_key="k", workspace=work, spool=None,
                               vault=FakeVault(oblique.study.study_uid), settings=settings,
                               outbox=FakeOutbox())


def test_service_delivers_seg_and_sr_when_the_overlay_fails(oblique, tmp_path, monkeypatch):
    monkeypatch.setattr(results_module, "build_overlay_series",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError(OVERLAY_ERROR)))
    ctx = stage_context(oblique, tmp_path)
    built = build_outputs(ctx)  # the stage result stored in the job store
    assert built["failed"][0]["error"].startswith("overlay series not built: ValueError")
    delivered = deliver(ctx)
    assert sorted(kind for kind, _ in ctx.outbox.queued) == sorted(["pdf", "seg", "sr", *RANO])
    assert delivered["queued"] == 3 + len(RANO) and delivered["not_built"] == [built["failed"][0]["error"]]
    seg = pydicom.dcmread(dict(ctx.outbox.queued)["seg"], stop_before_pixels=True)
    assert seg.PatientID == PHI["patient_id"] and seg.StudyInstanceUID == oblique.study.study_uid


def test_failing_pdf_rerender_does_not_sink_delivery(oblique, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("font missing")

    monkeypatch.setattr("brainline.service.gateway.deliver.rerender_pdf", broken)
    ctx = stage_context(oblique, tmp_path)
    build_outputs(ctx)
    delivered = deliver(ctx)
    queued = [kind for kind, _ in ctx.outbox.queued]
    assert "pdf" not in queued and {"seg", "sr", "overlay"} <= set(queued)
    assert delivered["not_delivered"] == [{"kind": "pdf", "error": "PDF report not delivered: "
                                           "re-identification failed: RuntimeError: font missing"}]
    assert not (ctx.settings.outbox_dir / "job-000007" / "report.dcm").exists()


# Flags worded as the stages word them (pipelines/skull_strip.py, registration.py,
# model_space.py, service/compute/qc_history.py, segmentation_qc.py): the SR and
# the PDF once dropped every skull-stripping flag because results.py kept only
# flags starting with "skull".
IQM_WORDS = "FLAIR cjv far above this scanner's usual (robust z 5.10, 23 earlier studies)"
STAGE_FLAGS = {
    "registration": {"flair": ["misregistration: a 3 mm shift along S-I (z) matches better"]},
    "skull_strip": ["implausible brain volume 2410 mL (expected 800-2000 mL)",
                    "the brain mask of T1 touches the edge of the field of view (1892 voxels)"],
    "model_space": ["low foreground Dice 0.62 on the common region"],
    "image_qc": [f"iqm_outlier: {IQM_WORDS}"],
    "segmentation_qc": ["implausible_volume: whole tumour 512 mL exceeds 400 mL"],
    "other": ["a flag from a future stage"],
}


def test_every_stage_flag_reaches_the_sr_and_the_pdf(oblique, tmp_path):
    work = fresh_work(oblique, tmp_path)
    summary = json.loads((work / "summary.json").read_text())
    reg_flags = STAGE_FLAGS["registration"]["flair"]
    summary["registration"] = {"t1c": {"reference": True}, "flair": {"flags": reg_flags}}
    summary["skull_strip"] = {"flags": STAGE_FLAGS["skull_strip"]}
    summary["model_space"] = {"space": "brats", "flags": STAGE_FLAGS["model_space"]}
    summary["image_qc"] = {"series": {"flair": {"label": "FLAIR", "metrics": {"cjv": 0.9}, "z": {"cjv": 5.1},
                                                "n_history": 23, "outliers": [IQM_WORDS]}},
                           "history": {"compared": True}, "flags": STAGE_FLAGS["image_qc"], "outliers": [IQM_WORDS]}
    summary["segmentation_qc"] = {"components": [], "component_words": ["512 mL, left frontal"],
                                  "flags": STAGE_FLAGS["segmentation_qc"], "discord": None}
    summary["qc_flags"] = ([f"FLAIR: {f}" for f in reg_flags] + STAGE_FLAGS["skull_strip"]
                           + [f"model space: {f}" for f in STAGE_FLAGS["model_space"]] + STAGE_FLAGS["image_qc"]
                           + STAGE_FLAGS["segmentation_qc"] + STAGE_FLAGS["other"])
    (work / "summary.json").write_text(json.dumps(summary))
    # every section of the summary that carries flags is one of its QC findings (pipelines/records.py)
    checks = Summary.from_json(summary).flags_by_check()
    assert {name for name, _ in checks} == {"registration flair", "skull stripping", "model space registration",
                                            "image quality", "segmentation quality"}
    record = build_results(work, oblique.files)
    out = work / "results"
    sr_words = " ".join(t for texts in sr_texts(out / "sr.dcm").values() for t in texts)
    pdf_words = " ".join(pdf_text(out / "report.dcm").split())
    every_flag = [f for _, flags in checks for f in flags] + STAGE_FLAGS["other"]
    assert sorted(every_flag) == sorted(summary["qc_flags"])
    for flag in every_flag:
        # image-quality flags ("iqm_outlier: words") are reported by their words
        words = flag.split(": ", 1)[1] if flag.startswith("iqm_outlier: ") else flag
        words = words.split(": ", 1)[1] if words.startswith("FLAIR: ") else words        # the finding names the role
        words = words.split(": ", 1)[1] if words.startswith("model space: ") else words  # ... and model space
        assert words in sr_words, f"{flag!r} missing from the SR"
        assert " ".join(words.split()) in pdf_words, f"{flag!r} missing from the PDF"
    assert record["complete"]
