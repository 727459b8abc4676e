"""Prior studies found automatically (service/gateway/priors.py, gateway stage
find_priors): against a real Orthanc over QIDO-RS/WADO-RS and over
C-FIND/C-GET, and within BrainLine (an earlier done job of the same
pseudonymous patient). Small synthetic studies (16 x 16 x 6 voxels, T1c and
FLAIR, 12 instances each)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from brainline.service.db import Job, State, make_engine, make_sessionmaker, migrate
from brainline.service.gateway import priors
from brainline.service.gateway.deliver import prior_uid_maps
from brainline.service.gateway.pseudonymize import pseudonymize
from brainline.service.gateway.reidentify import reidentify_dataset
from brainline.service.gateway.spool import Spool
from brainline.service.gateway.vault import Vault
from brainline.service.jobs.context import StageContext
from tests.conftest import PHI
from tests.dicom_factory import write_study
from tests.peers import OrthancServer, free_port
from tests.phi import find_phi, scan

OTHER = {"patient_name": "ROE^RICHARD", "patient_id": "PID-0815-ABC", "birth_date": "19500505",
         "accession": "ACC-55555"}
X_VALUES = {"name": "DOE^JANE", "id": "PID-4711-XYZ", "birth": "19640229", "accession": "ACC-98765"}
Y_VALUES = {"name": "ROE^RICHARD", "id": "PID-0815-ABC", "accession": "ACC-55555"}
CURRENT_DATE = "20240115"
MOVE_AE = "BRAINLINE_PRIOR"


def _tiny_case(folder: Path, seed: int) -> Path:
    """A 16 x 16 x 6 NIfTI case (t1ce, flair), 1 mm voxels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem in ("t1ce", "flair"):
        data = rng.integers(0, 800, size=(16, 16, 6)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"case_{stem}.nii.gz")
    return folder


def _add_non_mr_series(study_dir: Path) -> None:
    """A secondary-capture series (Modality OT) in the study: never retrieved."""
    src = sorted((study_dir / "flair").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.Modality = "OT"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (study_dir / "ot").mkdir()
    ds.save_as(study_dir / "ot" / "IM_1.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding patient X's studies of 2022-01-01 (baseline),
    2022-06-01, 2023-01-01 (most recent prior, with an OT series), the
    current 2024-01-15 and a later 2025-01-01, plus patient Y's 2023-06-01."""
    root = tmp_path_factory.mktemp("priors")
    case = _tiny_case(root / "case", 1)
    studies = {}
    for name, date, who in (("baseline", "20220101", PHI), ("middle", "20220601", PHI),
                            ("recent", "20230101", PHI), ("current", CURRENT_DATE, PHI),
                            ("later", "20250101", PHI), ("other", "20230601", OTHER)):
        studies[name] = write_study(root / name, case, roles=("t1c", "flair"), study_date=date, **who)
    _add_non_mr_series(root / "recent")
    move_port = free_port()   # BrainLine's C-MOVE destination, known to the PACS (DicomModalities)
    with OrthancServer(modalities={"brainline-prior": [MOVE_AE, "127.0.0.1", move_port]}) as orthanc:
        for name in studies:
            orthanc.upload_dir(root / name)
        yield SimpleNamespace(orthanc=orthanc, studies=studies, root=root, move_port=move_port)


def _settings(**values) -> SimpleNamespace:
    base = dict(deid_profile="", prior_search="pacs", prior_pacs_dicomweb="", prior_pacs_dicom="",
                prior_keep="recent,baseline", prior_max_age_days=0, prior_timeout_seconds=20.0,
                reference_role="t1c", ae_title="BRAINLINE", dicomweb_url="", dicomweb_username="",
                dicomweb_password="")
    base.update(values)
    return SimpleNamespace(**base)


def _context(tmp_path: Path, study, job_id: int, settings, sessions=None) -> StageContext:
    """A job workspace whose study went through ``pseudonymize``."""
    if sessions is None:
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        migrate(url)
        sessions = make_sessionmaker(make_engine(url))
    vault = Vault("test-vault-key-0123456789abcdef", sessions)
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    key = vault.study_key(study.study_uid)
    for path in study.paths:
        spool.store(key, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), path.read_bytes())
    ctx = StageContext(job_id=job_id, study_key=key, workspace=tmp_path / "ws" / f"job-{job_id:06d}",
                              spool=spool, vault=vault, settings=settings)
    ctx.workspace.mkdir(parents=True)
    pseudonymize(ctx)
    return ctx


def _assert_no_phi(workspace: Path) -> None:
    assert scan([workspace]) == []
    for path in workspace.rglob("*"):
        if path.is_file():
            hits = find_phi(path.read_bytes(), {**X_VALUES, **{"y-" + k: v for k, v in Y_VALUES.items()}})
            assert not hits, f"{path}: {hits}"


def _check_pacs_priors(ctx, pacs, result, source: str) -> None:
    record = json.loads(ctx.path("priors.json").read_text())
    shift = ctx.vault.patient(PHI["patient_id"]).date_shift_days
    assert record["current"]["study_date"] == priors._shift(CURRENT_DATE, shift)
    assert result["priors"] == 2
    recent, baseline = record["priors"]
    assert recent["kept_as"] == ["most recent"] and baseline["kept_as"] == ["baseline"]
    assert recent["study_date"] == priors._shift("20230101", shift)
    assert baseline["study_date"] == priors._shift("20220101", shift)
    assert recent["source"] == baseline["source"] == source and recent["job_id"] is None
    assert recent["pseudo_study_uid"] == ctx.vault.uid(pacs.studies["recent"].study_uid)
    assert "3 earlier MR studies" in record["searched"][0]   # not the current, the later or Y's
    assert "1 not earlier" in record["searched"][0]
    # only the MR series (T1c, FLAIR) of the prior, pseudonymized with the current study's pseudonym
    files = sorted(ctx.path("priors", "0", "dicom").rglob("*.dcm"))
    assert len(files) == 12
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    pseudo_id = json.loads(ctx.path("pseudonymize.json").read_text())["pseudo_patient_id"]
    assert {h.PatientID for h in headers} == {pseudo_id}
    assert {h.Modality for h in headers} == {"MR"}
    assert {h.StudyInstanceUID for h in headers} == {recent["pseudo_study_uid"]}
    assert {h.StudyDate for h in headers} == {recent["study_date"]}
    assert len({h.SeriesInstanceUID for h in headers}) == 2
    prior_json = json.loads(ctx.path("priors", "0", "prior.json").read_text())
    assert prior_json["dir"] == "priors/0" and prior_json["kept_as"] == ["most recent"]
    # the vault can re-identify the prior's UIDs
    vault_record = ctx.vault.get("study", recent["pseudo_study_uid"])
    assert vault_record["StudyInstanceUID"] == pacs.studies["recent"].study_uid
    originals = {s.series_uid for s in pacs.studies["recent"].series.values()}
    assert originals <= set(vault_record["uid_map"].values())
    assert not (ctx.spool.root / ".priors").exists()   # the PHI area is gone
    _assert_no_phi(ctx.workspace)


def test_priors_found_over_qido_and_wado(tmp_path, pacs):
    settings = _settings(prior_pacs_dicomweb=pacs.orthanc.dicomweb_url)
    ctx = _context(tmp_path, pacs.studies["current"], 7, settings)
    result = priors.find_priors(ctx)
    _check_pacs_priors(ctx, pacs, result, "PACS (QIDO-RS/WADO-RS)")
    assert priors.find_priors(ctx) == result  # idempotent: the stage is done


def test_priors_found_over_cfind_and_cget(tmp_path, pacs):
    o = pacs.orthanc
    settings = _settings(prior_pacs_dicom=f"{o.aet}@127.0.0.1:{o.dicom_port}")
    ctx = _context(tmp_path, pacs.studies["current"], 8, settings)
    _check_pacs_priors(ctx, pacs, priors.find_priors(ctx), "PACS (C-FIND/C-GET)")


def _move_settings(pacs, **values) -> SimpleNamespace:
    o = pacs.orthanc
    base = dict(prior_pacs_dicom=f"{o.aet}@127.0.0.1:{o.dicom_port}", prior_retrieve="move",
                prior_move_ae=MOVE_AE, prior_move_port=pacs.move_port, dicom_bind="127.0.0.1")
    return _settings(**{**base, **values})


def test_priors_found_over_cfind_and_cmove(tmp_path, pacs):
    """C-MOVE: Orthanc sends the prior's MR series to BrainLine's own
    short-lived storage SCP (not the OT series; the port is closed after)."""
    ctx = _context(tmp_path, pacs.studies["current"], 10, _move_settings(pacs))
    _check_pacs_priors(ctx, pacs, priors.find_priors(ctx), "PACS (C-FIND/C-MOVE)")
    import socket

    with socket.socket() as probe:   # the destination is gone once the prior is in
        assert probe.connect_ex(("127.0.0.1", pacs.move_port)) != 0


def test_cmove_to_a_destination_the_pacs_does_not_know_gives_a_note(tmp_path, pacs):
    settings = _move_settings(pacs, prior_move_ae="NOT_REGISTERED", prior_timeout_seconds=10.0)
    ctx = _context(tmp_path, pacs.studies["current"], 11, settings)
    result = priors.find_priors(ctx)
    record = json.loads(ctx.path("priors.json").read_text())
    assert result["priors"] == 0 and record["priors"] == []
    assert record["notes"] and all("the C-MOVE at the DICOM PACS failed" in n and "is the AE title "
                                   "NOT_REGISTERED registered at the PACS" in n for n in record["notes"])
    _assert_no_phi(ctx.workspace)


def test_cmove_destination_keeps_only_the_requested_study(tmp_path, pacs):
    """The destination SCP answers 0xA900 to an instance of another study
    (or not MR) and writes nothing for it; the requested study's MR instances
    are written."""
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    from brainline.service.gateway.prior_move import STATUS_NOT_WANTED, DimseMovePacs

    o = pacs.orthanc
    mover = DimseMovePacs(f"{o.aet}@127.0.0.1:{o.dicom_port}", _move_settings(pacs), 10.0)
    wanted = pacs.studies["recent"]
    written, refused = [0], []
    server = mover._destination(priors.PacsStudy(wanted.study_uid, ""), tmp_path, written, refused)
    try:
        scu = AE(ae_title="ORTHANC")
        scu.add_requested_context(MRImageStorage)
        assoc = scu.associate("127.0.0.1", pacs.move_port, ae_title=MOVE_AE)
        assert assoc.is_established
        try:
            mine = pydicom.dcmread(next(iter(wanted.paths)))
            other = pydicom.dcmread(next(iter(pacs.studies["other"].paths)))
            assert assoc.send_c_store(other).Status == STATUS_NOT_WANTED
            assert assoc.send_c_store(mine).Status == 0x0000
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert written == [1] and refused == ["an instance of another study or modality"]
    [kept] = list(tmp_path.glob("*.dcm"))
    assert pydicom.dcmread(kept).SOPInstanceUID == mine.SOPInstanceUID


def test_unreachable_pacs_gives_a_note_and_the_job_goes_on(tmp_path, pacs):
    settings = _settings(prior_pacs_dicomweb=f"http://127.0.0.1:{free_port()}/dicom-web",
                         prior_pacs_dicom=f"NOBODY@127.0.0.1:{free_port()}", prior_timeout_seconds=5.0)
    ctx = _context(tmp_path, pacs.studies["current"], 9, settings)
    result = priors.find_priors(ctx)
    record = json.loads(ctx.path("priors.json").read_text())
    assert result["priors"] == 0 and record["priors"] == []
    assert len(record["notes"]) == 2
    assert "could not be reached over DICOMweb (ConnectionError)" in record["notes"][0]
    assert "the DICOM PACS could not be reached" in record["notes"][1]
    _assert_no_phi(ctx.workspace)


def test_brainline_job_outputs_reused_and_pacs_copy_deduplicated(tmp_path, pacs):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    sessions = make_sessionmaker(make_engine(url))
    settings = _settings(prior_search="both", prior_pacs_dicomweb=pacs.orthanc.dicomweb_url)
    # job 1: the 2023 study, processed by BrainLine earlier (outputs faked, small)
    earlier = _context(tmp_path, pacs.studies["recent"], 1, settings, sessions)
    pseudo = json.loads(earlier.path("pseudonymize.json").read_text())
    work = earlier.workspace
    (work / "nifti").mkdir()
    (work / "nifti" / "t1c.nii.gz").write_bytes(b"nifti")
    (work / "segmentation.nii.gz").write_bytes(b"labels")
    (work / "summary.json").write_text(json.dumps({"volumes_ml": {"tumor_core": 4.5}}))
    ref_uid = pydicom.dcmread(next((work / "dicom").rglob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    (work / "select_series.json").write_text(
        json.dumps({"reference": "t1c", "roles": {"t1c": {"series_uid": ref_uid}}}))
    seg = pydicom.Dataset()
    seg.SeriesInstanceUID, seg.SOPInstanceUID = "2.25.11", "2.25.12"
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.file_meta = pydicom.dataset.FileMetaDataset()
    seg.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    (work / "results").mkdir()
    seg.save_as(work / "results" / "seg.dcm", enforce_file_format=True)
    (work / "build_outputs.json").write_text(json.dumps({"objects": [
        {"kind": "seg", "file": "results/seg.dcm", "sop_instance_uid": "2.25.12"}]}))
    with sessions.begin() as s:
        s.add(Job(id=1, study_key=earlier.study_key, state=State.DONE.value,
                  pseudo_study_uid=pseudo["pseudo_study_uid"], pseudo_patient_id=pseudo["pseudo_patient_id"]))
    ctx = _context(tmp_path, pacs.studies["current"], 2, settings, sessions)
    result = priors.find_priors(ctx)
    record = json.loads(ctx.path("priors.json").read_text())
    assert result["priors"] == 2
    recent, baseline = record["priors"]
    assert recent["source"] == "BrainLine job 1" and recent["job_id"] == 1   # not retrieved again
    assert recent["pseudo_study_uid"] == pseudo["pseudo_study_uid"]
    assert baseline["source"] == "PACS (QIDO-RS/WADO-RS)" and baseline["kept_as"] == ["baseline"]
    assert record["searched"][0] == "BrainLine jobs of this patient: 1 earlier study"
    prior0 = ctx.path("priors", "0")
    assert (prior0 / "nifti" / "t1c.nii.gz").read_bytes() == b"nifti"
    assert (prior0 / "summary.json").exists() and (prior0 / "segmentation.nii.gz").exists()
    assert (prior0 / "nifti" / "t1c.nii.gz").stat().st_ino == (work / "nifti" / "t1c.nii.gz").stat().st_ino
    assert len(list((prior0 / "dicom").rglob("*.dcm"))) == 12
    info = json.loads((prior0 / "prior.json").read_text())
    assert info["seg_sop_instance_uid"] == "2.25.12" and info["seg_series_uid"] == "2.25.11"
    assert info["reference_series_uid"] == ref_uid
    _assert_no_phi(ctx.workspace)

    # deliver re-identifies a longitudinal object referencing the prior's series
    study = ctx.vault.get("study", json.loads(ctx.path("pseudonymize.json").read_text())["pseudo_study_uid"])
    patient = ctx.vault.get("patient", pseudo["pseudo_patient_id"])
    obj = pydicom.Dataset()
    obj.StudyInstanceUID = ctx.vault.uid(pacs.studies["current"].study_uid)
    obj.SOPClassUID, obj.SOPInstanceUID, obj.SeriesInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", "2.25.5", "2.25.6"
    ref = pydicom.Dataset()
    ref.SeriesInstanceUID = ref_uid
    obj.ReferencedSeriesSequence = [ref]
    obj.file_meta = pydicom.dataset.FileMetaDataset()
    obj.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    out = reidentify_dataset(obj, study, patient, extra_uid_maps=prior_uid_maps(ctx))
    assert out.StudyInstanceUID == pacs.studies["current"].study_uid
    recent_series = {s.series_uid for s in pacs.studies["recent"].series.values()}
    assert ref_uid not in recent_series
    assert out.ReferencedSeriesSequence[0].SeriesInstanceUID in recent_series
    assert out.ReferencedSeriesSequence[0].SeriesInstanceUID == ctx.vault.get("study", pseudo["pseudo_study_uid"])[
        "uid_map"][ref_uid]
    assert out.PatientID == PHI["patient_id"]


def _candidate(date: str, core: float | None = None, job: int | None = None) -> priors.Candidate:
    return priors.Candidate(study_date=date, pseudo_study_uid="2.25." + date, source="x", job_id=job,
                            tumor_core_ml=core)


def test_keep_recent_with_baseline_or_nadir():
    many = [_candidate("20200101", 9.0, 1), _candidate("20200601", 2.5, 2), _candidate("20210101", 6.0, 3)]
    kept, notes = priors.choose(many, ["recent", "nadir"])
    assert [(c.study_date, c.kept_as) for c in kept] == [("20210101", ["most recent"]), ("20200601", ["nadir"])]
    assert notes == []
    kept, notes = priors.choose([_candidate("20200101"), _candidate("20210101")], ["recent", "nadir"])
    assert [c.kept_as for c in kept] == [["most recent"], ["baseline"]] and "nadir could not" in notes[0]
    kept, _ = priors.choose([_candidate("20200101", 3.0, 1)], ["recent", "baseline"])
    assert len(kept) == 1 and kept[0].kept_as == ["most recent", "baseline"]
    assert priors.choose([], ["recent"]) == ([], [])


def test_studies_without_a_patient_id_are_not_linked(tmp_path):
    """Two unidentified patients (empty PatientID): the later study's job does
    not take the earlier, finished one as its prior, says why, and the PACS is
    not asked. Before, both studies shared one pseudonym and the earlier study
    of another patient was used as the prior."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    sessions = make_sessionmaker(make_engine(url))
    settings = _settings(prior_search="both", prior_pacs_dicomweb="http://127.0.0.1:9/dicom-web")
    case = _tiny_case(tmp_path / "case", 2)
    unknown = {**PHI, "patient_id": ""}
    first = write_study(tmp_path / "first", case, roles=("t1c", "flair"), study_date="20230101",
                        **{**unknown, "patient_name": "EMERGENCY^ONE"})
    second = write_study(tmp_path / "second", case, roles=("t1c", "flair"), study_date=CURRENT_DATE,
                         **{**unknown, "patient_name": "EMERGENCY^TWO"})
    earlier = _context(tmp_path, first, 1, settings, sessions)
    pseudo = json.loads(earlier.path("pseudonymize.json").read_text())
    with sessions.begin() as s:
        s.add(Job(id=1, study_key=earlier.study_key, state=State.DONE.value,
                  pseudo_study_uid=pseudo["pseudo_study_uid"], pseudo_patient_id=pseudo["pseudo_patient_id"]))
    ctx = _context(tmp_path, second, 2, settings, sessions)
    assert json.loads(ctx.path("pseudonymize.json").read_text())["pseudo_patient_id"] != pseudo["pseudo_patient_id"]
    result = priors.find_priors(ctx)
    record = json.loads(ctx.path("priors.json").read_text())
    assert result["priors"] == 0 and record["priors"] == []
    assert "the study has no patient ID, so no earlier BrainLine study is linked to it" in record["notes"]
    assert "the study has no patient ID, so the PACS was not asked for priors" in record["notes"]


def _set_issuer(study, issuer: str, birth_date: str | None = None) -> None:
    for path in study.paths:
        ds = pydicom.dcmread(path)
        ds.IssuerOfPatientID = issuer
        if birth_date is not None:
            ds.PatientBirthDate = birth_date
        ds.save_as(path)


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_same_patient_id_of_another_issuer_or_birth_date_is_not_a_prior(tmp_path, kind):
    """A regional PACS holds two hospitals' patients under the same PatientID:
    the search (by ID) finds both, and only the studies whose issuer and birth
    date agree with the current study's are priors; the others are counted as
    another patient's and left out. Before, the most recent of them, another
    patient's study, was compared with this patient's scan."""
    case = _tiny_case(tmp_path / "case", 3)
    same = {**PHI}
    current = write_study(tmp_path / "current", case, roles=("t1c", "flair"), study_date=CURRENT_DATE, **same)
    own = write_study(tmp_path / "own", case, roles=("t1c", "flair"), study_date="20220101", **same)
    issuer = write_study(tmp_path / "issuer", case, roles=("t1c", "flair"), study_date="20230101", **same)
    born = write_study(tmp_path / "born", case, roles=("t1c", "flair"), study_date="20230601", **same)
    _set_issuer(current, "HOSPITAL-A")
    _set_issuer(own, "HOSPITAL-A")
    _set_issuer(issuer, "HOSPITAL-B")
    _set_issuer(born, "HOSPITAL-A", birth_date="19990101")
    with OrthancServer() as orthanc:
        for folder in ("own", "issuer", "born"):
            orthanc.upload_dir(tmp_path / folder)
        settings = (_settings(prior_pacs_dicomweb=orthanc.dicomweb_url) if kind == "dicomweb" else
                    _settings(prior_pacs_dicom=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"))
        ctx = _context(tmp_path, current, 1, settings)
        result = priors.find_priors(ctx)
    record = json.loads(ctx.path("priors.json").read_text())
    assert result["priors"] == 1
    [prior] = record["priors"]
    assert prior["pseudo_study_uid"] == ctx.vault.uid(own.study_uid)
    assert "1 earlier MR study" in record["searched"][0]
    assert "2 studies with this patient ID but another issuer or birth date" in record["searched"][0]


def test_brainline_study_of_the_same_id_with_another_birth_date_is_not_a_prior(tmp_path):
    """The same PatientID and issuer came with another birth date at an
    earlier study BrainLine processed (an ID reused, or a registry error):
    the pseudonym is the same, but that study is not taken as the prior."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    sessions = make_sessionmaker(make_engine(url))
    settings = _settings(prior_search="brainline")
    case = _tiny_case(tmp_path / "case", 4)
    first = write_study(tmp_path / "first", case, roles=("t1c", "flair"), study_date="20230101",
                        **{**PHI, "birth_date": "19991231"})
    second = write_study(tmp_path / "second", case, roles=("t1c", "flair"), study_date=CURRENT_DATE, **PHI)
    earlier = _context(tmp_path, first, 1, settings, sessions)
    pseudo = json.loads(earlier.path("pseudonymize.json").read_text())
    (earlier.workspace / "summary.json").write_text(json.dumps({"volumes_ml": {"tumor_core": 1.0}}))
    with sessions.begin() as s:
        s.add(Job(id=1, study_key=earlier.study_key, state=State.DONE.value,
                  pseudo_study_uid=pseudo["pseudo_study_uid"], pseudo_patient_id=pseudo["pseudo_patient_id"]))
    ctx = _context(tmp_path, second, 2, settings, sessions)
    assert json.loads(ctx.path("pseudonymize.json").read_text())["pseudo_patient_id"] == pseudo["pseudo_patient_id"]
    result = priors.find_priors(ctx)
    record = json.loads(ctx.path("priors.json").read_text())
    assert result["priors"] == 0, record
    assert ("1 earlier BrainLine study of this patient ID came with another birth date (another patient's) and "
            "was left out") in record["notes"]
