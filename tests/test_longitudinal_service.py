"""End to end, longitudinal follow-up: the prior study is only at the PACS (a
real Orthanc, stored there directly: BrainLine never saw it); the current
study (a synthetic follow-up of the same case: moved by 2 mm, brighter by
8 %, with a new 1.4 mL lesion) is pushed to `brainline serve` with storescu.
The job finds the prior at the PACS over QIDO-RS/WADO-RS, compares, and the
longitudinal objects (subtraction series, change SR, lesion SEG) arrive in
the same Orthanc under the CURRENT study with the original identity, the
prior's references re-identified; the workspace holds no PHI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import PHI, TCGA
from tests.dicom_factory import find_role_file, write_study
from tests.peers import OrthancServer, storescu
from tests.phi import BINARY_SAFE, TEXT_EXTRA, scan
from tests.test_results_delivery import orthanc_instance, wait_outbox

pytestmark = pytest.mark.integration

ROLES = ("t1", "t1c", "t2", "flair")
LESION_CENTRE = (150, 150, 70)   # voxel index (i, j, k), in the brain, away from the tumour
LESION_RADIUS = 7                # voxels (1 mm): about 1.4 mL


def follow_up_case(out: Path) -> Path:
    """The case moved by 2 voxels (mm) along i, 8 % brighter, with a new
    spherical lesion bright on FLAIR and T1c (NIfTI, same affine)."""
    out.mkdir(parents=True)
    ii, jj, kk = np.ogrid[:240, :240, :155]
    ball = ((ii - LESION_CENTRE[0]) ** 2 + (jj - LESION_CENTRE[1]) ** 2
            + (kk - LESION_CENTRE[2]) ** 2) <= LESION_RADIUS ** 2
    for role in ROLES:
        image = nib.load(str(find_role_file(TCGA, role)))
        data = np.asanyarray(image.dataobj).astype(np.float32)
        assert data[LESION_CENTRE] > 0, "the lesion must lie in the brain"
        bright = np.percentile(data[data > 0], 99.5)
        data = data * 1.08
        if role in ("flair", "t1c"):
            data[ball & (data > 0)] = bright * 1.3
        data = np.roll(data, 2, axis=0)
        nib.save(nib.Nifti1Image(np.rint(data).astype(np.int16), image.affine), out / f"{role}.nii.gz")
    return out


def test_prior_found_at_the_pacs_and_longitudinal_objects_delivered(service_factory, tmp_path):
    prior = write_study(tmp_path / "prior", TCGA, slice_step=5, study_date="20230110", **PHI)
    current = write_study(tmp_path / "current", follow_up_case(tmp_path / "follow"), slice_step=5,
                          study_date="20240115", **PHI)
    prior_uids = {prior.study_uid} | {s.series_uid for s in prior.series.values()}
    with OrthancServer() as orthanc:
        assert orthanc.upload_dir(tmp_path / "prior") == prior.n_instances
        svc = service_factory(BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                              BRAINLINE_PRIOR_PACS_DICOMWEB=orthanc.dicomweb_url)
        assert storescu(tmp_path / "current", svc.dicom_port).returncode == 0
        [job] = svc.wait_jobs(1, timeout=420)
        assert job["state"] == "done", job
        stages = {s["name"]: s for s in job["stages"]}
        found = stages["find_priors"]["result"]
        assert found["priors"] == 1, found
        [kept] = found["kept"]
        assert kept["source"] == "PACS (QIDO-RS/WADO-RS)" and kept["kept_as"] == ["most recent", "baseline"]
        ws = svc.workspace(job["id"])
        longitudinal = json.loads((ws / "longitudinal.json").read_text())
        assert longitudinal["priors"] == 1, longitudinal.get("note")
        assert (ws / "priors" / "0" / "summary.json").exists()   # the prior was processed too
        # the new 14 mm lesion, bright on T1c: new, enhancing, measurable -> RANO progression
        lesions = {l["id"]: l for l in longitudinal["lesions"]}
        assert longitudinal["assessment"]["code"] == "progression suspected", longitudinal["assessment"]
        counted = [lesions[i] for i in longitudinal["assessment"]["new_lesions"]["counted"]]
        assert counted and all(l["kind"] == "new" and l["enhancing"] and l["measurable"] for l in counted), counted
        assert any(11.0 <= l["short_axis_mm"] <= l["long_axis_mm"] <= 17.0 for l in counted), counted

        box = wait_outbox(svc, timeout=240)
        by_kind: dict[str, list] = {}
        for item in box["items"]:
            by_kind.setdefault(item["kind"], []).append(item)
        expected = {"subtraction", "change_sr"} | ({"lesion_seg"} if longitudinal.get("lesions") else set())
        assert expected <= set(by_kind), sorted(by_kind)
        for kind in expected:
            for item in by_kind[kind][:3]:
                ds = orthanc_instance(orthanc, item["sop_instance_uid"])
                assert ds.StudyInstanceUID == current.study_uid, kind
                assert ds.PatientID == PHI["patient_id"] and str(ds.PatientName) == PHI["patient_name"]
                assert "PatientIdentityRemoved" not in ds
        subtraction = orthanc_instance(orthanc, by_kind["subtraction"][0]["sop_instance_uid"])
        assert "SUBTRACTION" in subtraction.ImageType
        # the change SR refers to the prior with its original UIDs (re-identified
        # with the prior's vault record), never with pseudonymous ones
        sr = orthanc_instance(orthanc, by_kind["change_sr"][0]["sop_instance_uid"])
        meanings = {str(e.value) for e in sr.iterall() if e.keyword == "CodeMeaning"}
        assert "Progression suspected" in meanings and "Long Axis" in meanings
        sr_uids = {str(e.value) for e in sr.iterall() if e.VR == "UI" and e.VM == 1}
        assert sr_uids & prior_uids, "the change SR does not reference the prior study"
        study_uids = {orthanc_instance(orthanc, i["sop_instance_uid"]).StudyInstanceUID
                      for items in by_kind.values() for i in items[:1]}
        assert study_uids == {current.study_uid}   # every object under the current study
        if "lesion_seg" in expected:
            seg = orthanc_instance(orthanc, by_kind["lesion_seg"][0]["sop_instance_uid"])
            current_series = {s.series_uid for s in current.series.values()}
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID in current_series

        svc.stop()
        assert not (svc.home / "spool" / ".priors").exists()
        assert scan([ws]) == []
        assert scan([svc.home / "logs", svc.stdout_path], BINARY_SAFE + TEXT_EXTRA) == []
        assert scan([ws / "priors"], [prior.study_uid.encode()]) == []   # the prior's UIDs pseudonymized
