"""The QC stages wired into the job pipeline (issue 12 items 1 and 2): image
QC per series with the site and scanner's history in a real SQLite job
store, segmentation QC with discord alarms against each candidate's
history, the words in the SR and the PDF, and /api/v1/qc and /qc.

The case is tcga-du-7294 as a DICOM study (every 5th slice, 240x240x31),
pushed into a real spool and run stage by stage through the JobRunner. Its
four series are co-registered and skull-stripped, so one stand-in stage
replaces register, skull_strip and bias_correct (identity registration,
brain mask = the non-zero T1c, no N4; those stages have their own tests on
this case) to keep the test within seconds; every other stage is the
service's own. The discord alarms of five real BraTS algorithms on
tcga-du-7294 run through the segmentation-QC stage and its history."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient

from brainline.models.base import SegmentationBackend, SegmentationInput, SegmentationOutput, segmentation_backend
from brainline.pipelines.image_pipeline import STEPS, step_image_qc, step_segmentation_qc
from brainline.pipelines.process import STEP_NAMES
from brainline.pipelines.qc_steps import (
    IMAGE_QC_HISTORY_FILE,
    QCConfig,
    image_qc_section,
    image_quality_finding,
    parse_discord,
    write_candidates,
)
from brainline.pipelines.segmentation_qc import fusion_dice
from brainline.service.api import auth
from brainline.service.api.app import create_app
from brainline.service.compute.qc_history import compare_segmentation_qc
from brainline.service.compute.stages import pipeline_config
from brainline.service.context import ServiceContext
from brainline.service.db import Job, QCMetric
from brainline.service.jobs.context import StageContext
from brainline.service.jobs.stage_table import PIPELINES
from brainline.service.settings import SettingsError, load_settings
from tests.conftest import TCGA
from tests.phi import scan

TOKEN = "qc-token-0123"
SITE = "SCANNER_A"
SCANNER = "GE MEDICAL SYSTEMS SIGNA Premier"   # tests/dicom_factory.py; kept by de-identification
ALGORITHMS = ("hnfnetv1-20", "isen-20", "sanet0-20", "scan-20", "yixinmpl-20")


# --------------------------------------------------------------------------- tables

def test_qc_stages_in_the_pipelines_and_offline_steps():
    names = [n for n, _ in PIPELINES["neuro_onco"]]
    assert names[names.index("skull_strip") + 1] == "image_qc"        # native series + brain mask, before N4
    assert names.index("segment") < names.index("segmentation_qc") < names.index("summary")
    assert [n for n, _ in STEPS] == ["register", "skull_strip", "image_qc", "bias_correct", "segment",
                                     "segmentation_qc", "summary"]
    assert {"image_qc", "segmentation_qc"} <= set(STEP_NAMES)           # brainline process runs them too
    stage = dict(PIPELINES["neuro_onco"])["image_qc"]
    assert "history" in stage.__doc__                                   # the service wrapper, not the bare step


def test_qc_settings_are_validated(tmp_path):
    s = load_settings({"BRAINLINE_HOME": str(tmp_path), "BRAINLINE_QC_DISCORD": "baseline, flip",
                       "BRAINLINE_QC_MIN_HISTORY": "25"})
    assert s.qc_min_history == 25 and parse_discord(s.qc_discord) == ("baseline", "flip")
    assert pipeline_config(s).qc.discord == "baseline, flip"
    for key, value in (("BRAINLINE_QC_DISCORD", "baseline,ensemble"), ("BRAINLINE_QC_MIN_HISTORY", "1"),
                       ("BRAINLINE_QC_OUTLIER_Z", "0"), ("BRAINLINE_QC_DISCORD_GRID_MM", "-1")):
        with pytest.raises(SettingsError, match=key):
            load_settings({"BRAINLINE_HOME": str(tmp_path), key: value})


# --------------------------------------------------------------------------- service, end to end

def stand_in(ctx: StageContext) -> dict:
    """register + skull_strip + bias_correct for a co-registered, skull-stripped case."""
    ws = ctx.workspace
    ref = sitk.ReadImage(str(ws / "nifti" / "t1c.nii.gz"), sitk.sitkFloat32)
    mask = sitk.BinaryFillhole(sitk.Cast(ref > 0, sitk.sitkUInt8))
    sitk.WriteImage(mask, str(ws / "brain_mask.nii.gz"))
    for p in sorted((ws / "nifti").glob("*.nii.gz")):
        role = p.name.split(".")[0]
        img = sitk.Resample(sitk.ReadImage(str(p), sitk.sitkFloat32), ref)
        for sub in ("registered", "preprocessed"):
            (ws / sub).mkdir(exist_ok=True)
        sitk.WriteImage(img, str(ws / "registered" / p.name))
        sitk.WriteImage(sitk.Mask(img, mask), str(ws / "preprocessed" / p.name))
        if role != "t1c":
            sitk.WriteTransform(sitk.Euler3DTransform(), str(ws / "registered" / f"{role}_to_t1c.tfm"))
    (ws / "register.json").write_text(json.dumps({"reference": "t1c", "sequences": {}, "flags": []}))
    (ws / "skull_strip.json").write_text(json.dumps({"flags": [], "sequence": "t1c", "already_stripped": True}))
    return {"stand_in": True}


@pytest.fixture
def service_ctx(tmp_path, monkeypatch):
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path / "home"), "BRAINLINE_API_TOKEN": TOKEN,
                              "BRAINLINE_VAULT_KEY": "test-vault-key-0123456789abcdef",
                              "BRAINLINE_MIN_FREE_MB": "10", "BRAINLINE_MODEL": "baseline",
                              "BRAINLINE_QC_DISCORD": "auto,flip"})
    ctx = ServiceContext.build(settings)
    stage = dict(PIPELINES["neuro_onco"])
    monkeypatch.setitem(PIPELINES, "qc_test", [
        ("pseudonymize", stage["pseudonymize"]), ("select_series", stage["select_series"]),
        ("convert", stage["convert"]), ("stand_in", stand_in), ("image_qc", stage["image_qc"]),
        ("segment", stage["segment"]), ("segmentation_qc", stage["segmentation_qc"]),
        ("summary", stage["summary"]), ("build_outputs", stage["build_outputs"])])
    yield ctx
    ctx.engine.dispose()


def spool(ctx, study) -> str:
    key = ctx.vault.study_key(study.study_uid)
    for path in study.paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        ctx.spool.store(key, str(uid), path.read_bytes())
    return key


def earlier_jobs(ctx, n: int) -> list[int]:
    with ctx.sessions.begin() as s:
        jobs = [Job(study_key=f"earlier-{i:03d}", source="test", pipeline="neuro_onco", state="done", site=SITE)
                for i in range(n)]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


SPREAD = np.linspace(-1.0, 1.0, 24)[np.random.default_rng(0).permutation(24)]


def add_rows(ctx, jobs, rows) -> None:
    """rows: (role, scanner, protocol, metric, usual value, relative spread)."""
    with ctx.sessions.begin() as s:
        for i, job_id in enumerate(jobs):
            for role, scanner, protocol, metric, usual, spread in rows:
                s.add(QCMetric(job_id=job_id, site=SITE, scanner=scanner, protocol=protocol, role=role,
                               metric=metric, value=float(usual * (1 + spread * SPREAD[i % len(SPREAD)]))))


def sr_items(ds) -> list:
    out = []

    def walk(items):
        for item in items:
            out.append(item)
            if "ContentSequence" in item:
                walk(item.ContentSequence)
    walk(ds.ContentSequence)
    return out


def pdf_text(report_dcm, tmp_path) -> str:
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(bytes(pydicom.dcmread(report_dcm).EncapsulatedDocument))
    out = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True, timeout=60)
    return " ".join(out.stdout.split())


def test_image_and_segmentation_qc_stages_with_history_reach_sr_pdf_and_api(service_ctx, small_study, tmp_path):
    ctx = service_ctx
    key = spool(ctx, small_study)
    job_id = ctx.store.create(key, ctx.spool.count(key), source="spool", pipeline="qc_test")
    with ctx.sessions.begin() as s:
        s.get(Job, job_id).site = SITE
    for name in ("pseudonymize", "select_series", "convert", "stand_in"):
        assert ctx.runner.run_stage(job_id, name) == "done", ctx.store.get(job_id).error
    ws = ctx.runner.workspace(job_id)
    cfg = pipeline_config(ctx.settings)

    # the pipeline step alone (as `brainline process` runs it): metrics, no history, said so
    base = step_image_qc(ws, cfg)
    assert set(base["series"]) == {"t1", "t1c", "t2", "flair"}
    flair = base["series"]["flair"]
    assert flair["scanner"] == SCANNER and flair["protocol"] == "AX T2 FLAIR CUBE"
    assert flair["masks"]["brain"].startswith("the skull-stripping mask carried")
    assert flair["metrics"]["SNR3"] > 1 and flair["metrics"]["SNR1"] is None   # zero-filled background
    status, words = image_quality_finding(image_qc_section(ws))
    assert status == "not_assessed" and "brainline process keeps none" in words

    # 24 earlier studies of this site and scanner: usual values, but FLAIR SNR3 twice as high
    jobs = earlier_jobs(ctx, 24)
    add_rows(ctx, jobs, [(role, s["scanner"], s["protocol"], m, v * (2.0 if (role, m) == ("flair", "SNR3") else 1.0),
                          0.02) for role, s in base["series"].items() for m, v in s["metrics"].items()
                         if v is not None])
    assert ctx.runner.run_stage(job_id, "image_qc") == "done"
    hist = json.loads((ws / IMAGE_QC_HISTORY_FILE).read_text())
    assert hist["history"]["compared"] and hist["series"]["flair"]["n_history"] == 24
    [outlier] = hist["flags"]
    assert outlier.startswith("iqm_outlier: FLAIR SNR3 far below this scanner's usual (z = -")
    assert outlier.endswith(": suspect noise")
    assert all(abs(z) < 3.5 for r, v in hist["series"].items() for m, z in v["z"].items()
               if (r, m) != ("flair", "SNR3"))
    with ctx.sessions() as s:
        mine = list(s.query(QCMetric).filter(QCMetric.job_id == job_id, QCMetric.role != "seg"))
    assert {(r.site, r.scanner) for r in mine} == {(SITE, SCANNER)}
    assert {r.protocol for r in mine if r.role == "flair"} == {"AX T2 FLAIR CUBE"}
    snr3 = next(r for r in mine if (r.role, r.metric) == ("flair", "SNR3"))
    assert snr3.zscore < -3.5 and snr3.value == pytest.approx(flair["metrics"]["SNR3"])
    assert ctx.runner.run_stage(job_id, "image_qc") == "duplicate"   # done once

    # segmentation QC: the delivered baseline, its variants and its flip; the
    # delivered result's WT Dice to the fusion is usually much higher here
    assert ctx.runner.run_stage(job_id, "segment") == "done"
    seg = step_segmentation_qc(ws, cfg)
    names = set(seg["candidates"]["names"])
    assert names == {"model", "baseline_t1c_flair", "baseline_split_0.3", "baseline_split_0.5", "flip"}, seg
    assert seg["components"] and seg["components"][0]["hemisphere"] in ("left", "right")
    dtf = seg["dice_to_fusion"]
    rows = [("seg", SCANNER, seg["model"], f"discord_{c}_{r}", min(1.0, d + (0.05 if (c, r) == ("model", "WT")
                                                                           else 0.0)), 0.002)
            for c, per in dtf.items() for r, d in per.items() if d is not None]
    add_rows(ctx, jobs[:12], rows)
    assert ctx.runner.run_stage(job_id, "segmentation_qc") == "done"
    for name in ("summary", "build_outputs"):
        assert ctx.runner.run_stage(job_id, name) == "done", ctx.store.get(job_id).error
    job = ctx.store.get(job_id)
    seg_result = json.loads(next(s for s in job.stages if s.name == "segmentation_qc").result_json)
    assert "model/WT" in seg_result["alarms"] and seg_result["risk_score"] >= 1 and seg_result["compared"]

    summary = json.loads((ws / "summary.json").read_text())
    assert outlier in summary["qc_flags"]
    assert summary["timings_s"]["image_qc"] > 0 and summary["timings_s"]["segmentation_qc"] > 0

    # the SR: qualitative evaluations and their words
    sr = pydicom.dcmread(ws / "results" / "sr.dcm")
    items = sr_items(sr)
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in items if i.ValueType == "TEXT"}
    assert "FLAIR SNR3 far below this scanner's usual" in texts["Image Quality"]
    assert "alarms: model WT: Dice " in texts["Segmentation ensemble agreement"]
    assert "component 1:" in texts["Segmentation quality"] and "hemisphere" in texts["Segmentation quality"]
    coded = {i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0].CodeValue
             for i in items if i.ValueType == "CODE"}
    assert coded["Image Quality"] == "111236"             # usable, does not meet the QC standard
    # the PDF
    text = pdf_text(ws / "results" / "report.dcm", tmp_path)
    assert "FLAIR SNR3 far below this scanner's usual" in text and "alarms: model WT: Dice" in text
    assert scan([ws]) == []                                 # no identity in the workspace

    # /api/v1/qc and /qc
    client = TestClient(create_app(ctx))
    assert client.get("/api/v1/qc").status_code == 401
    body = client.get("/api/v1/qc", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    [site] = [x for x in body["sites"] if x["site"] == SITE]
    [scanner] = site["scanners"]
    assert scanner["scanner"] == SCANNER and scanner["studies"] == 25
    flair_row = next(r for r in scanner["roles"] if r["role"] == "flair")
    assert flair_row["series"] == 25 and flair_row["protocols"] == ["AX T2 FLAIR CUBE"]
    assert flair_row["median"]["SNR3"] == pytest.approx(2 * flair["metrics"]["SNR3"], rel=0.03)
    assert any(o["job_id"] == job_id and o["words"].startswith("FLAIR SNR3 far below") for o in body["recent_outliers"])
    assert site["segmentation"][0]["studies"] == 13
    page = client.get("/qc")
    assert page.status_code == 401 and "bearer" in page.headers["www-authenticate"].lower()
    page = client.get("/qc", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200 and SCANNER in page.text and "FLAIR SNR3 far below" in page.text
    # a user logged in to the review UI (no token) sees the same figures at /review/qc
    auth.add_user(ctx.sessions, "qcrad", "qc-password-0123", "technician", "QC Reader")
    assert client.get("/review/qc", follow_redirects=False).headers["location"].startswith("/review/login")
    login_page = client.get("/review/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', login_page.text).group(1)
    assert client.post("/review/login", data={"username": "qcrad", "password": "qc-password-0123",
                                              "csrf_token": csrf, "next": "/review/qc"},
                       follow_redirects=False).headers["location"] == "/review/qc"
    page = client.get("/review/qc")
    assert page.status_code == 200 and SCANNER in page.text and "FLAIR SNR3 far below" in page.text
    assert client.get("/qc").status_code == 401             # the session is for /review only; /qc wants the token


# --------------------------------------------------------------------------- real discord, through the stage

@pytest.fixture(scope="module")
def tcga_segs():
    if not (TCGA / "segmentations" / "scan-20.nii.gz").exists():
        pytest.skip("shared data missing")
    return {n: sitk.ReadImage(str(TCGA / "segmentations" / f"{n}.nii.gz"), sitk.sitkUInt8) for n in ALGORITHMS}


def discord_workspace(work, segs, delivered: str):
    """A workspace whose delivered segmentation is one algorithm's and whose
    other algorithms are candidates the backend exposed."""
    work.mkdir(parents=True)
    sitk.WriteImage(segs[delivered], str(work / "segmentation.nii.gz"))
    flair = sitk.ReadImage(str(TCGA / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(flair > 0, sitk.sitkUInt8), str(work / "brain_mask.nii.gz"))
    write_candidates(work, {n: img for n, img in segs.items() if n != delivered})
    (work / "segment.json").write_text(json.dumps({"backend": "brats20", "model_version": delivered}))


def test_discord_alarms_of_five_brats_algorithms_through_the_stage(tmp_path, tcga_segs):
    """hnfnetv1-20 is the delivered result, the four others are candidates;
    the history (site + model) is each candidate's Dice to the fusion of
    every 4-algorithm subset holding it: real variation. One algorithm's
    mask displaced by 6 mm (a misregistered input) must alarm."""
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path / "home"), "BRAINLINE_QC_DISCORD": "exposed",
                              "BRAINLINE_QC_DISCORD_MIN_HISTORY": "4",
                              "BRAINLINE_VAULT_KEY": "test-vault-key-0123456789abcdef"})
    ctx = ServiceContext.build(settings)
    try:
        cfg = pipeline_config(settings)
        assert cfg.qc.discord == "exposed" and cfg.qc.segmentation.min_history == 4
        delivered = "hnfnetv1-20"
        arrays = {("model" if n == delivered else n.replace("-", "_")): sitk.GetArrayFromImage(img)
                  for n, img in tcga_segs.items()}
        jobs = earlier_jobs(ctx, len(arrays))
        with ctx.sessions.begin() as s:
            for job_id, left_out in zip(jobs, arrays):
                table, _ = fusion_dice({k: v for k, v in arrays.items() if k != left_out}, ("WT", "TC"))
                s.add_all(QCMetric(job_id=job_id, site=SITE, scanner="", protocol=f"brats20 {delivered}",
                                   role="seg", metric=f"discord_{cand}_{region}", value=d)
                          for cand, per in table.items() for region, d in per.items() if d is not None)
        moved = sitk.Resample(tcga_segs["scan-20"], tcga_segs["scan-20"], sitk.TranslationTransform(3, (0, 6, 0)),
                              sitk.sitkNearestNeighbor)
        results = {}
        for case, segs in (("normal", tcga_segs), ("moved", {**tcga_segs, "scan-20": moved})):
            work = tmp_path / case
            discord_workspace(work, segs, delivered)
            with ctx.sessions.begin() as s:
                job = Job(study_key=f"study-{case}", source="test", pipeline="neuro_onco", site=SITE)
                s.add(job)
                s.flush()
                job_id = job.id
            step = step_segmentation_qc(work, cfg)
            assert step["regions"] == ["WT", "TC"] and sorted(step["candidates"]["names"]) == sorted(arrays)
            results[case] = compare_segmentation_qc(ctx.sessions, job_id, work, settings, step)
        normal, moved = results["normal"], results["moved"]
        assert normal["compared"] and moved["compared"]
        assert "scan_20/WT" in moved["alarms"] and moved["risk_score"] > normal["risk_score"]
        record = json.loads((tmp_path / "moved" / "segmentation_qc_history.json").read_text())
        row = next(r for r in record["discord"]["rows"] if (r["candidate"], r["region"]) == ("scan_20", "WT"))
        assert row["alarm"] and row["dice"] < row["threshold"] - 0.05 and row["n_history"] >= 4
        with ctx.sessions() as s:
            stored = {q.metric for q in s.query(QCMetric).filter(QCMetric.job_id == job_id)}
        assert {"discord_scan_20_WT", "discord_model_TC", "risk_score"} <= stored
    finally:
        ctx.engine.dispose()


# --------------------------------------------------------------------------- the segment step's candidates hook

@segmentation_backend("qc-views-test")
class TwoViewBackend(SegmentationBackend):
    """A threshold "model" that, like a multi-view network, exposes two more
    label maps besides its result (``SegmentationOutput.candidates``)."""

    name = "qc-views-test"
    required_roles = ("flair",)

    def __init__(self, device: str = "cpu"):
        self.device = device

    def segment(self, inputs: SegmentationInput) -> SegmentationOutput:
        flair, mask = inputs.array("flair"), inputs.mask_array()
        labels = ((flair > 150) & mask).astype(np.uint8) * 2
        out = SegmentationOutput(labels=labels, backend=self.name, model_name="threshold", model_version="1")
        out.candidates = {"view-a": labels, "view-b": np.roll(labels, 2, axis=2)}
        return out


def test_segment_step_keeps_exposed_candidates_and_the_flip_runs(tmp_path):
    work = tmp_path / "work"
    (work / "preprocessed").mkdir(parents=True)
    zz, yy, xx = np.mgrid[:24, :40, :40]
    brain = ((zz - 12) ** 2 / 100 + (yy - 20) ** 2 / 300 + (xx - 20) ** 2 / 300) < 1
    lesion = ((zz - 12) ** 2 + (yy - 18) ** 2 + (xx - 26) ** 2) < 25           # off the midline: a flip moves it
    flair = np.where(brain, 100.0, 0.0) + np.where(lesion, 100.0, 0.0)
    img = sitk.GetImageFromArray(flair.astype(np.float32))
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(work / "preprocessed" / "flair.nii.gz"))
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(work / "brain_mask.nii.gz"))
    from brainline.pipelines.image_pipeline import PipelineConfig, step_segment
    cfg = PipelineConfig(model={"type": "qc-views-test"}, qc=QCConfig(discord="exposed,flip"))
    result = step_segment(work, cfg)
    assert result["candidates"] == ["view_a", "view_b"]
    assert sitk.ReadImage(str(work / "candidates" / "view_b.nii.gz")).GetSize() == img.GetSize()
    seg = step_segmentation_qc(work, cfg)
    assert seg["candidates"]["names"] == ["model", "view_a", "view_b", "flip"], seg["candidates"]
    dtf = seg["dice_to_fusion"]
    assert dtf["model"]["WT"] == dtf["view_a"]["WT"] == pytest.approx(1.0)   # 3 of 4 agree: they are the vote
    assert dtf["view_b"]["WT"] < 0.9                                           # shifted by 2 voxels
    assert dtf["flip"]["WT"] == pytest.approx(1.0)   # flipped back onto the lesion (a threshold is symmetric)
    assert seg["regions"] == ["WT", "TC"] and not (work / "candidates" / ".flip").exists()
