"""pipelines/records.py: the typed records of the stage files.

* Files written by the current code load and write back byte for byte
  (the stage writers and the service read the same keys as before).
* Partial files (older workspaces, hand-written test summaries) load with
  defaults; unknown keys survive a round trip.
* Every Summary section that can carry QC flags is claimed by
  ``Summary.flags_by_check`` (so its flags reach the SR and the PDF as a
  finding of their own, not as "other checks").
"""

from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.models.base import InputRoles
from brainline.pipelines import records as R
from brainline.pipelines.inputs import inputs_record
from brainline.pipelines.registration import RegistrationResult
from brainline.pipelines.results import qc_findings_of
from brainline.pipelines.skull_strip import SkullStripResult


def _dump(data) -> str:
    return json.dumps(data, indent=2, default=str)


def test_every_field_has_a_default_so_partial_files_load():
    for cls in vars(R).values():
        if isinstance(cls, type) and issubclass(cls, R.Record):
            for f in dataclasses.fields(cls):
                assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, \
                    f"{cls.__name__}.{f.name}"
            assert cls.from_json({}) == cls.from_json(None)


def _registration_result() -> dict:
    return RegistrationResult(
        transform=sitk.Euler3DTransform(), transform_type="rigid", final_metric=-0.64, iterations=40,
        stop_reason="converged", converged=True, parameters={"translation_mm": [1.0, 2.0, 3.0]},
        quality={"nmi": 1.2, "coverage": 0.99}, flags=["misregistration: shift"], initial_metric=-0.6,
        identity_metric=float("nan"), moving_name="FLAIR", fixed_name="T1c").to_dict()


def test_registration_file_round_trips_byte_for_byte():
    data = {"reference": "t1c", "sequences": {"t1c": {"reference": True}, "flair": _registration_result()},
            "flags": ["FLAIR: misregistration: shift"], "elapsed_s": 7.5}
    record = R.RegistrationRecord.from_json(data)
    assert record.sequences["t1c"].reference and record.sequences["flair"].quality["nmi"] == 1.2
    assert record.sequences["flair"].identity_metric is None
    assert _dump(record.to_json()) == _dump(data)
    assert R.RegistrationRecord.labelled_flags(record.sequences) == data["flags"]
    assert record.sequences["flair"].summary_entry().to_json() == {
        "final_metric": -0.64, "converged": True, "parameters": {"translation_mm": [1.0, 2.0, 3.0]},
        "quality": {"nmi": 1.2, "coverage": 0.99}, "flags": ["misregistration: shift"]}
    assert record.sequences["t1c"].summary_entry().to_json() == {}


def test_skull_strip_segment_and_n4_files_round_trip():
    strip = SkullStripResult(mask=sitk.Image(4, 4, 4, sitk.sitkUInt8), backend="deepbet", backend_version="1.0.2",
                             already_stripped=False, brain_volume_ml=1432.25, elapsed_s=3.2,
                             evidence={"rim_to_core": np.float64(np.inf)}, flags=["implausible brain volume"])
    data = {**strip.to_dict(), "sequence": "t1"}
    assert _dump(R.SkullStripRecord.from_json(data).to_json()) == _dump(data)
    assert R.SkullStripRecord.from_json(strip.to_dict()).replace(sequence="t1").to_json() == data
    segment = {"model_choice": "all four sequences: the trained model",
               "model_space": {"space": "brats", "template": "brats18_t1", "grid": {"size": [1, 2, 3],
                               "spacing_mm": [1.0, 1.0, 1.0]}, "registered_sequence": "t1", "transform": "affine",
                               "parameters": {}, "quality": {"nmi": 1.1}, "flags": ["low foreground Dice"]},
               "candidates": ["view_ax"], "backend": "brats17-wang", "model_name": "wang", "model_version": "2017",
               "details": {"licence": "Apache-2.0"}, "elapsed_s": 12.0}
    record = R.SegmentRecord.from_json(segment)
    assert record.model_space.flags == ["low foreground Dice"]
    assert _dump(record.to_json()) == _dump(segment)
    plain = {"backend": "baseline", "model_name": "brainline-baseline", "model_version": "1", "details": {}}
    assert _dump(R.SegmentRecord.from_json(plain).to_json()) == _dump(plain)      # optional keys stay out
    n4 = {"sequences": {"t1": {"elapsed_s": 1.5}, "flair": {"elapsed_s": 2.0}}, "elapsed_s": 3.6}
    assert _dump(R.BiasCorrectionRecord.from_json(n4).to_json()) == _dump(n4)


def test_selection_and_inputs_round_trip():
    inputs = inputs_record(["t1c", "flair"], ["t1", "t1c", "t2", "flair"], "baseline",
                           InputRoles(required=("flair",), optional=("t1", "t1c", "t2")), "t1c")
    assert list(inputs) == ["backend", "reference", "required", "optional", "used", "missing", "dropped", "note"]
    assert inputs["note"] == "T1 and T2 not found; segmentation used T1c and FLAIR only"
    data = {"roles": {"t1c": {"series_uid": "1.2.3", "series_number": 5, "description": "AX T1 POST"}},
            "missing_optional": ["t1"], "considered": [{"series_number": 5}], "left_out": [],
            "inputs": inputs, "files": {"t1c": ["dicom/a.dcm", "dicom/b.dcm"]}}
    selection = R.SeriesSelection.from_json(data)
    assert selection.reference == "t1c" and selection.description("t1c") == "AX T1 POST"
    assert selection.inputs.missing == ["t1", "t2"]
    assert _dump(selection.to_json()) == _dump(data)
    assert "files" not in selection.without_files()


def test_results_record_round_trips_and_keeps_optional_keys_out():
    data = {"objects": [{"kind": "seg", "file": "results/seg.dcm", "sop_instance_uid": "2.25.1",
                         "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4"},
                        {"kind": "change_sr", "file": "results/change_sr.dcm", "sop_instance_uid": "2.25.2",
                         "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34", "prior_study_uids": ["2.25.9"]}],
            "segmented": True, "failed": [{"kind": "overlay", "error": "overlay series not built: ValueError: x"}],
            "notes": ["overlay series not built: ValueError: x"], "complete": True, "prior_studies": ["2.25.9"]}
    record = R.ResultsRecord.from_json(data)
    assert record.object_of("change_sr").prior_study_uids == ["2.25.9"] and record.object_of("pdf") is None
    assert [f.kind for f in record.failures(excluding=("pdf",))] == ["overlay"]
    assert _dump(record.to_json()) == _dump(data)
    without = {k: v for k, v in data.items() if k != "prior_studies"}
    assert "prior_studies" not in R.ResultsRecord.from_json(without).to_json()


def test_unknown_keys_survive_and_missing_keys_default():
    summary = R.Summary.from_json({"volumes_ml": {"1": 1.0}, "registration": {"t1c": {}}, "a_future_key": [1],
                                   "inputs": {}})
    assert summary.tiv_ml is None and summary.inputs is None and summary.registration["t1c"].reference
    out = summary.to_json()
    assert out["a_future_key"] == [1] and out["inputs"] == {} and out["registration"] == {"t1c": {}}
    assert R.Summary.from_json(out) == summary
    with pytest.raises(TypeError, match="JSON object"):
        R.Summary.from_json(["not", "an", "object"])


def _flag_bearing(tp) -> type | None:
    """The record type behind a field type (X, X | None, dict[str, X]) when it has a ``flags`` field."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    for arg in args:
        inner = typing.get_args(arg)[-1] if typing.get_origin(arg) is dict else arg
        if isinstance(inner, type) and issubclass(inner, R.Record) and "flags" in {
                f.name for f in dataclasses.fields(inner)}:
            return inner
    return None


def test_every_flag_bearing_summary_section_is_a_qc_finding():
    """Fill every Summary section that has a ``flags`` field with a flag of
    its own: each must come out of flags_by_check (worded as in qc_flags)
    and as a QC finding of its own, never as "other checks"."""
    hints = typing.get_type_hints(R.Summary)
    values, own = {}, {}
    for f in dataclasses.fields(R.Summary):
        record = _flag_bearing(hints[f.name])
        if record is None:
            continue
        flag = f"{f.name}: a flag of this section"
        own[f.name] = flag
        section = record(flags=[flag])
        values[f.name] = {"flair": section} if typing.get_origin(hints[f.name]) is dict else section
    assert set(own) >= {"registration", "image_qc", "segmentation_qc", "model_space", "skull_strip"}
    summary = R.Summary(**values)
    checks = summary.flags_by_check()
    words = {flag for _, flags in checks for flag in flags}
    for name, flag in own.items():
        assert any(flag in w for w in words), f"flags of Summary.{name} are not claimed"
    summary = summary.replace(qc_flags=sorted(words))
    assert summary.unclaimed_flags() == []
    findings = qc_findings_of(summary)
    assert "other checks" not in {f.name for f in findings}
    for name, flag in own.items():
        assert any(flag in f.detail for f in findings if f.status == "flagged"), f"{name}: not a flagged finding"


def test_record_files_are_named_after_their_stages(tmp_path):
    """Each stage's record is ``<stage>.json``; a workspace of an earlier
    version (``selection.json``, ``registration.json``, ...) is read through
    the old names and renamed in place by ``migrate_workspace``, which leaves
    a current workspace alone."""
    from brainline.pipelines.stage_table import stages

    assert R.SELECTION_FILE == "select_series.json" and R.RESULTS_FILE == "build_outputs.json"
    names = {s.name for s in stages()}
    for const in (R.SELECTION_FILE, R.CONVERT_FILE, R.REGISTRATION_FILE, R.SKULL_STRIP_FILE,
                  R.BIAS_CORRECTION_FILE, R.SEGMENT_FILE, R.SUMMARY_FILE, R.RESULTS_FILE):
        assert const[:-len(".json")] in names, const
    old = {"selection.json": {"reference": "t1c"}, "registration.json": {"reference": "t1c", "flags": ["x"]},
           "bias_correction.json": {"elapsed_s": 1.0}, "results.json": {"objects": []}}
    for name, data in old.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert R.read_record(R.RegistrationRecord, tmp_path / R.REGISTRATION_FILE).flags == ["x"]
    assert R.read_json(tmp_path / R.SELECTION_FILE) == {"reference": "t1c"}
    assert R.existing_file(tmp_path / R.SEGMENT_FILE) == tmp_path / R.SEGMENT_FILE   # no old name
    assert sorted(R.migrate_workspace(tmp_path)) == sorted(R.LEGACY_FILES)
    assert not any((tmp_path / name).exists() for name in old)
    assert json.loads((tmp_path / R.RESULTS_FILE).read_text()) == {"objects": []}
    assert R.migrate_workspace(tmp_path) == []
    # both present (the new one written after an upgrade): the new one wins, the old stays
    (tmp_path / "selection.json").write_text("{}")
    assert R.migrate_workspace(tmp_path) == [] and R.read_json(tmp_path / R.SELECTION_FILE) == {"reference": "t1c"}


def test_stage_rename_migration(tmp_path):
    """Alembic 0004 renames the stage rows of jobs begun before "summarize"
    became "summary" (a job in flight at the upgrade resumes by name)."""
    from sqlalchemy import text

    from brainline.service.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url, "0003")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, study_key, source, pipeline, instance_count, state, attempts, "
                          "created_at, updated_at) "
                          "VALUES (1, 'k', 'dimse', 'neuro_onco', 1, 'running', 1, '2026-11-30', '2026-11-30')"))
        conn.execute(text("INSERT INTO stages (job_id, name, position, state, attempts) VALUES "
                          "(1, 'segment', 0, 'succeeded', 1), (1, 'summarize', 1, 'queued', 0)"))
    migrate(url)
    with engine.begin() as conn:
        names = [r[0] for r in conn.execute(text("SELECT name FROM stages ORDER BY position"))]
    assert names == ["segment", "summary"]
