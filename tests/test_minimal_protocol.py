"""Minimal protocol (3D T1c + FLAIR only): the roles a study needs come from
the segmentation backend (the baseline needs FLAIR; T1 and T2 are optional)
plus the reference role. Checked through the service's select_series stage
and the whole `brainline process` on tcga-du-7294 written as DICOM."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pydicom
import pytest

from brainline.models.base import InputRoles, SegmentationBackend
from brainline.models.onnx_backend import OnnxBackend
from brainline.models.registry import input_roles, load_backend
from brainline.pipelines.image_pipeline import PipelineConfig
from brainline.pipelines.inputs import inputs_record, select_inputs
from brainline.pipelines.series_selection import MissingSeriesError
from brainline.service.compute import stages
from brainline.service.jobs.context import StageContext
from brainline.service.jobs.errors import NeedsInput
from tests.conftest import PHI, REPO, TCGA
from tests.dicom_factory import write_study
from tests.test_process import whole_tumour_dice
from tests.test_result_objects import sr_texts

NOTE = "T1 and T2 not found; segmentation used T1c and FLAIR only"
CLI = [sys.executable, "-m", "brainline.service.cli", "process", "--quiet"]


def select_context(tmp_path, roles, **settings) -> StageContext:
    write_study(tmp_path / "ws" / "dicom", TCGA, roles=roles, slice_step=5, **PHI)
    values = dict(uid_root="", reference_role="t1c", model="", device="cpu", registration_transform="rigid",
                  skull_strip_backend="deepbet", series_rules="")
    values.update(settings)
    return StageContext(job_id=1, study_key="k", workspace=tmp_path / "ws", spool=None, vault=None,
                               settings=SimpleNamespace(**values))


def test_backends_declare_their_input_roles():
    assert input_roles(load_backend(None)) == InputRoles(required=("flair",), optional=("t1", "t1c", "t2"))
    onnx = OnnxBackend.__new__(OnnxBackend)  # the declaration only needs input_order
    onnx.input_order = ["flair", "t1c"]
    assert input_roles(onnx) == InputRoles(required=("t1c", "flair"), optional=())

    class AllFour(SegmentationBackend):
        name = "custom"

        def segment(self, inputs):
            raise NotImplementedError

    assert input_roles(AllFour()).required == ("t1", "t1c", "t2", "flair")  # the safe default


def test_inputs_record_words():
    roles = InputRoles(required=("flair",), optional=("t1", "t1c", "t2"))
    record = inputs_record(["t1c", "flair"], ["t1", "t1c", "t2", "flair"], "baseline", roles, "t1c")
    assert record["note"] == NOTE and record["missing"] == ["t1", "t2"] and record["used"] == ["t1c", "flair"]
    assert inputs_record(["t1", "t1c", "t2", "flair"], ["t1", "t1c", "t2", "flair"], "baseline", roles,
                         "t1c")["note"] is None
    onnx = InputRoles(required=("t1c", "flair"))
    assert inputs_record(["t1c", "flair"], ["t1", "t1c", "t2", "flair"], "onnx", onnx, "t1c")["note"] is None


def test_select_stage_accepts_t1c_and_flair(tmp_path):
    ctx = select_context(tmp_path, ("t1c", "flair"))
    result = stages.select_series(ctx)
    assert set(result["roles"]) == {"t1c", "flair"}
    assert result["inputs"]["note"] == NOTE
    assert result["missing_optional"] == ["t1", "t2"]
    selection = json.loads(ctx.path("select_series.json").read_text())
    assert all(not f.startswith("/") and f.startswith("dicom/") for f in selection["files"]["flair"])
    json.dumps(result)  # the job store keeps it


def test_select_stage_without_flair_needs_input(tmp_path):
    ctx = select_context(tmp_path, ("t1", "t1c", "t2"))
    with pytest.raises(NeedsInput) as info:
        stages.select_series(ctx)
    message = str(info.value)
    assert message.startswith("no FLAIR series found (FLAIR: the segmentation model (auto) needs it); "
                              "series considered: ")
    assert "AX T2 FSE" in message and "rules tried: FLAIR" in message


def test_reference_and_site_policy_are_required(tmp_path):
    write_study(tmp_path / "dicom", TCGA, roles=("t1", "flair"), slice_step=5, **PHI)
    with pytest.raises(MissingSeriesError, match=r"no T1c series found \(T1c: it is the reference sequence"):
        select_inputs(tmp_path / "dicom", tmp_path / "a", PipelineConfig())
    flair_ref = select_inputs(tmp_path / "dicom", tmp_path / "b", PipelineConfig(reference="flair"))
    assert flair_ref["inputs"]["note"] == "T1c and T2 not found; segmentation used T1 and FLAIR only"
    rules = tmp_path / "rules.yaml"
    text = (REPO / "config" / "series_rules.yaml").read_text()
    rules.write_text(text.replace("  t2:\n    label: T2\n", "  t2:\n    label: T2\n    required: true\n"))
    with pytest.raises(MissingSeriesError, match=r"no T1c or T2 series found"):
        select_inputs(tmp_path / "dicom", tmp_path / "c", PipelineConfig(), rules)


def test_process_minimal_protocol(tmp_path):
    study = write_study(tmp_path / "dicom", TCGA, roles=("t1c", "flair"), **PHI)
    out = tmp_path / "out"
    result = subprocess.run(CLI + [str(study.series["t1c"].dir.parent), "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert NOTE in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["missing"] == ["t1", "t2"] and summary["inputs"]["note"] == NOTE
    assert set(summary["registration"]) == {"t1c", "flair"}
    record = json.loads((out / "build_outputs.json").read_text())
    assert record["complete"] and record["failed"] == [] and NOTE in record["notes"]
    kinds = {o["kind"] for o in record["objects"]}
    assert {"seg", "sr", "overlay", "pdf"} <= kinds
    seg = pydicom.dcmread(out / "dicom" / "seg.dcm", stop_before_pixels=True)
    assert seg.StudyInstanceUID == study.study_uid
    assert sr_texts(out / "dicom" / "sr.dcm")["Series selection quality"] == [NOTE]
    assert whole_tumour_dice(out / "segmentation.nii.gz") >= 0.8
