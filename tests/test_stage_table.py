"""The stage table (pipelines/stage_table.py) drives `brainline process`,
`brainline serve`, the job labels and the error handling: a dummy stage added
with one module (tests/dummy_stage.py) and one table entry runs in both."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from brainline.pipelines import stage_table
from brainline.pipelines.image_pipeline import PipelineConfig, PipelineError
from brainline.pipelines.process import process_study
from brainline.pipelines.records import stage_file
from brainline.service.jobs import errors
from brainline.service.jobs.stage_table import GATEWAY_STAGES, PIPELINES, table
from tests import dummy_stage
from tests.peers import storescu

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_is_declared_once():
    names = [s.name for s in table()]
    assert len(names) == len(set(names))
    assert names == [n for n, _ in PIPELINES["neuro_onco"]]
    assert {s.name for s in table() if s.zone == "gateway"} == GATEWAY_STAGES
    labels = errors.STAGE_LABELS
    assert labels["register"] == "co-registration" and set(labels) == set(names)
    assert all(s.label and s.writes for s in table())
    # the hook is declared on the entry, the QC stages only
    assert {s.name for s in table() if s.hook} == {"image_qc", "segmentation_qc"}
    assert PipelineError in errors.PIPELINE_ERRORS
    # every image stage writes its record under its own name
    for s in stage_table.stages():
        assert stage_file(s.name) in s.writes, s.name


def test_register_stage_reaches_every_consumer():
    from brainline.pipelines.image_pipeline import TIMED_STEPS
    from brainline.pipelines.process import STEP_NAMES

    with stage_table.added_stage(dummy_stage.STAGE):
        names = [n for n, _ in PIPELINES["neuro_onco"]]
        assert names[names.index("segment") + 1] == "tumour_voxels"
        from brainline.pipelines.process import STEP_NAMES as with_dummy
        assert with_dummy[with_dummy.index("segment") + 1] == "tumour_voxels"
        assert errors.stage_label("tumour_voxels") == "tumour voxel count"
        from brainline.pipelines.image_pipeline import TIMED_STEPS as timed
        assert "tumour_voxels" in timed
        with pytest.raises(ValueError, match="in the table already"):
            stage_table.register_stage(dummy_stage.STAGE)
    assert "tumour_voxels" not in [n for n, _ in PIPELINES["neuro_onco"]]
    assert "tumour_voxels" not in STEP_NAMES and "tumour_voxels" not in TIMED_STEPS
    with pytest.raises(ValueError, match="not in the table"):
        stage_table.register_stage(dummy_stage.STAGE, after="no_such_stage")


@pytest.mark.integration
def test_dummy_stage_runs_in_process(small_study, tmp_path):
    out = tmp_path / "out"
    steps: list[str] = []
    with stage_table.added_stage(dummy_stage.STAGE):
        summary = process_study(small_study.series["t1"].dir.parent, out,
                                PipelineConfig(model="baseline"), on_step=steps.append)
    assert steps[steps.index("segment") + 1] == "tumour_voxels"
    record = json.loads((out / "tumour_voxels.json").read_text())
    assert record["voxels"] > 0
    assert record["voxels"] * record["voxel_ml"] == pytest.approx(summary["volumes_ml"]["whole_tumor"], rel=0.01)
    assert "tumour_voxels" in summary["timings_s"]
    # every stage's record is <stage>.json (what the table declares is written)
    for s in stage_table.stages():
        assert (out / stage_file(s.name)).is_file(), s.name
    assert {"register", "skull_strip", "bias_correct", "segment"} <= set(summary["timings_s"])


def _entry_point_site(tmp_path: Path) -> Path:
    """A site folder holding one installed distribution whose
    ``brainline.stages`` entry point is tests/dummy_stage.py's STAGE."""
    site = tmp_path / "site"
    info = site / "brainline_dummy_stage-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brainline-dummy-stage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[brainline.stages]\ntumour_voxels = tests.dummy_stage:STAGE\n")
    return site


@pytest.mark.integration
def test_dummy_stage_runs_in_serve(service_factory, small_study, tmp_path):
    path = os.pathsep.join([str(_entry_point_site(tmp_path)), str(REPO), os.environ.get("PYTHONPATH", "")])
    svc = service_factory(PYTHONPATH=path, BRAINLINE_MODEL="baseline")
    result = storescu(small_study.series["t1"].dir.parent, svc.dicom_port)
    assert result.returncode == 0, result.stderr
    [job] = svc.wait_jobs(1, timeout=600)
    assert job["state"] == "done", job
    names = [s["name"] for s in job["stages"]]
    assert names[names.index("segment") + 1] == "tumour_voxels"
    stage = next(s for s in job["stages"] if s["name"] == "tumour_voxels")
    assert stage["state"] == "done" and stage["result"]["voxels"] > 0
    assert stage["label"] == "tumour voxel count"
    assert next(s for s in job["stages"] if s["name"] == "register")["label"] == "co-registration"
    ws = svc.home / "workspaces" / f"job-{job['id']:06d}"
    assert json.loads((ws / "tumour_voxels.json").read_text())["voxels"] == stage["result"]["voxels"]
