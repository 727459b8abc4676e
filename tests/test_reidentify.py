"""De-identification -> re-identification round trip (service/gateway/reidentify.py).

A realistic MR series (tests/dicom_factory.py: identifying patient, study,
institution and private attributes) is pseudonymized by the real engine
(service/gateway/deid.py through the pseudonymize stage's
StudyPseudonymizer) with a real vault on SQLite. The pseudonymized instances
must hold nothing identifying. A DICOM SEG is then built on them by the real
builder (pipelines/dicom_outputs) and re-identified by the real
reidentify_dataset with the vault's records: identity, every referenced UID
and the source dates must come back exactly, while the SEG's own UIDs stay
new. The study date is a leap day, so that a date shift and an inverse that
follow different rules cannot pass."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainline.pipelines.dicom_outputs import AlgorithmInfo, build_seg
from brainline.service.db import make_engine, make_sessionmaker, migrate
from brainline.service.gateway.deid import DeidProfile
from brainline.service.gateway.pseudonymize import StudyPseudonymizer
from brainline.service.gateway.reidentify import DEID_MARKERS, reidentify_dataset
from brainline.service.gateway.vault import Vault
from tests.dicom_factory import study_level_dataset, write_series
from tests.phi import find_phi

IDENTITY = {"patient_name": "DOE^JANE", "patient_id": "PID-4711-XYZ", "birth_date": "19640229",
            "accession": "ACC-98765"}
STUDY_DATE = "20240229"   # a leap day: the shift and its inverse must agree to the day
#: Identifying values written by tests/dicom_factory.py (patient, study, staff, site, private block).
PHI_VALUES = {"patient name": "DOE^JANE", "family name": "DOE", "given name": "JANE",
              "patient id": "PID-4711-XYZ", "birth date": "19640229", "accession": "ACC-98765",
              "study id": "STUDY-98765", "referring physician": "HOUSE^GREGORY", "operator": "TECH^TERRY",
              "institution": "St Elsewhere", "address": "Elsewhere Road", "station": "MRSTATION01",
              "device serial": "0000MR4711", "study description": "TUMOR DOE",
              "study date": STUDY_DATE}


def _synthetic_head(shape=(48, 40, 6)) -> np.ndarray:
    """A head-like volume (i, j, k): background 0, 'brain' ~300, 'tumour' ~900."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt(((i - centre[0]) / 20) ** 2 + ((j - centre[1]) / 16) ** 2)
    volume = np.where(r < 1.0, 300.0, 0.0) + np.where((abs(i - 30) < 5) & (abs(j - 20) < 4), 600.0, 0.0)
    return (volume + 5 * np.cos(i + 2 * j + 3 * k)).astype(np.float32)


@pytest.fixture()
def vault(tmp_path):
    url = f"sqlite:///{tmp_path / 'vault.db'}"
    migrate(url)
    return Vault("round-trip-vault-key-0123456789abcdef", make_sessionmaker(make_engine(url)))


@pytest.fixture()
def original(tmp_path):
    """One realistic t1c series (6 axial slices, 1 x 1.2 x 5 mm, oblique-free LPS frame)."""
    affine_lps = np.array([[-1.0, 0, 0, 90.0], [0, -1.2, 0, 100.0], [0, 0, 5.0, -20.0], [0, 0, 0, 1]])
    base = study_level_dataset(patient_name=IDENTITY["patient_name"], patient_id=IDENTITY["patient_id"],
                               birth_date=IDENTITY["birth_date"], accession=IDENTITY["accession"],
                               study_uid=pydicom.uid.generate_uid(), study_date=STUDY_DATE,
                               frame_of_reference_uid=pydicom.uid.generate_uid())
    info = write_series(base, "t1c", _synthetic_head(), affine_lps, tmp_path / "original",
                        series_uid=pydicom.uid.generate_uid(), study_date=STUDY_DATE,
                        patient_name=IDENTITY["patient_name"], slice_step=1)
    return [pydicom.dcmread(p) for p in info.paths]


def _uids(ds: pydicom.Dataset) -> set[str]:
    """Every UID value in ``ds`` (nested sequences included), but not the
    well-known DICOM ones (SOP classes, transfer syntaxes, coding schemes)."""
    out = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            out |= {str(v) for v in values if not str(v).startswith("1.2.840.10008.")}
    return out


def _pseudonymize(vault: Vault, original: list[pydicom.Dataset], out: Path):
    engine = StudyPseudonymizer(vault, DeidProfile.load())
    files = [engine.write(engine(copy.deepcopy(ds)), out) for ds in original]  # pseudonymized in place
    return engine, files, engine.save()


def test_pseudonymized_instances_hold_nothing_identifying(vault, original, tmp_path):
    engine, files, pseudo_study = _pseudonymize(vault, original, tmp_path / "dicom")
    original_uids = set().union(*(_uids(ds) for ds in original))
    for path in files:
        data = path.read_bytes()
        assert find_phi(data, PHI_VALUES) == [], path.name
        clean = pydicom.dcmread(path)
        assert not (_uids(clean) & original_uids)                      # every UID replaced
        assert not any(elem.tag.is_private for elem in clean.iterall())  # the private block is gone
        assert clean.PatientID == clean.PatientName == engine.pseudo_patient_id
        assert clean.StudyInstanceUID == pseudo_study and clean.StudyDate != STUDY_DATE
        assert clean.PatientIdentityRemoved == "YES"
    # the identity is kept only in the vault, encrypted
    assert b"DOE^JANE" not in (tmp_path / "vault.db").read_bytes()


def test_a_result_built_on_pseudonymized_data_is_reidentified_exactly(vault, original, tmp_path):
    engine, files, pseudo_study = _pseudonymize(vault, original, tmp_path / "dicom")
    image = sitk.ReadImage([str(p) for p in sorted(files, key=lambda p: pydicom.dcmread(p).InstanceNumber)])
    labels = sitk.Cast(image > 700, sitk.sitkUInt8) * 3  # label 3: enhancing tumour
    seg = build_seg(files, labels, AlgorithmInfo(backend="baseline", model_name="round-trip"))
    seg_uids = {str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID)}
    assert seg.PatientID == engine.pseudo_patient_id and seg.StudyInstanceUID == pseudo_study

    study = vault.get("study", pseudo_study)
    patient = vault.get("patient", engine.pseudo_patient_id)
    out = reidentify_dataset(seg, study, patient)

    first = original[0]
    # identity
    assert (str(out.PatientName), out.PatientID, out.PatientBirthDate, out.PatientSex) == \
        (IDENTITY["patient_name"], IDENTITY["patient_id"], IDENTITY["birth_date"], "F")
    assert (out.AccessionNumber, out.StudyID) == (IDENTITY["accession"], first.StudyID)
    # dates copied from the source come back to the day
    assert out.StudyDate == STUDY_DATE
    # UIDs: the study, frame of reference, series and every source instance are the originals ...
    assert out.StudyInstanceUID == first.StudyInstanceUID
    assert out.FrameOfReferenceUID == first.FrameOfReferenceUID
    (ref_series,) = out.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence} <= \
        {ds.SOPInstanceUID for ds in original}
    sources = {src.ReferencedSOPInstanceUID for frame in out.PerFrameFunctionalGroupsSequence
               for item in frame.DerivationImageSequence for src in item.SourceImageSequence}
    assert sources and sources <= {ds.SOPInstanceUID for ds in original}
    # ... no pseudonymous UID is left, and the SEG's own new UIDs are kept
    pseudo_uids = set(study["uid_map"])
    assert not (_uids(out) & pseudo_uids)
    assert {str(out.SOPInstanceUID), str(out.SeriesInstanceUID)} == seg_uids
    # the de-identification markers are gone
    assert not [k for k in DEID_MARKERS if k in out]


#: (Specific Character Set as scanners write it, patient name, what the results declare)
CHARACTER_SETS = [
    ("ISO_IR 100", "MÜLLER^JÜRGEN", "ISO_IR 100"),
    ("ISO_IR 192", "山田^太郎", "ISO_IR 192"),
    # Japanese: an empty first value stands for ISO 2022 IR 6 (PS3.3 C.12.1.1.2); highdicom refused it
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    # Korean: a term highdicom does not know; the results declare Unicode
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192"),
]


@pytest.mark.parametrize("charset, name, declared", CHARACTER_SETS, ids=["latin1", "utf8", "japanese", "korean"])
def test_patient_names_in_other_character_sets_come_back_exactly(vault, tmp_path, charset, name, declared):
    """A study whose names are not ASCII gets a SEG built on its pseudonymized
    instances, and the re-identified SEG, written and read back, names the
    patient exactly as the scanner did, in a character set it declares."""
    affine_lps = np.array([[-1.0, 0, 0, 90.0], [0, -1.2, 0, 100.0], [0, 0, 5.0, -20.0], [0, 0, 0, 1]])
    base = study_level_dataset(patient_name="PLACEHOLDER", patient_id=IDENTITY["patient_id"],
                               birth_date=IDENTITY["birth_date"], accession=IDENTITY["accession"],
                               study_uid=pydicom.uid.generate_uid(), study_date=STUDY_DATE,
                               frame_of_reference_uid=pydicom.uid.generate_uid())
    info = write_series(base, "t1c", _synthetic_head(), affine_lps, tmp_path / "original",
                        series_uid=pydicom.uid.generate_uid(), study_date=STUDY_DATE,
                        patient_name="PLACEHOLDER", slice_step=1)
    original = []
    for path in info.paths:  # re-written in the scanner's character set
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.save_as(path)
        original.append(pydicom.dcmread(path))
    assert str(original[0].PatientName) == name

    engine, files, pseudo_study = _pseudonymize(vault, original, tmp_path / "dicom")
    image = sitk.ReadImage([str(p) for p in sorted(files, key=lambda p: pydicom.dcmread(p).InstanceNumber)])
    seg = build_seg(files, sitk.Cast(image > 700, sitk.sitkUInt8) * 3,
                    AlgorithmInfo(backend="baseline", model_name="character sets"))
    out = reidentify_dataset(seg, vault.get("study", pseudo_study), vault.get("patient", engine.pseudo_patient_id))
    out.save_as(tmp_path / "seg.dcm")
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    assert str(back.PatientName) == name
    assert back.SpecificCharacterSet == declared


def _series_of(tmp_path: Path, name: str, patient_name: str, patient_id: str) -> list[pydicom.Dataset]:
    """One small t1c series of a new study of ``patient_name`` / ``patient_id``."""
    affine_lps = np.array([[-1.0, 0, 0, 90.0], [0, -1.2, 0, 100.0], [0, 0, 5.0, -20.0], [0, 0, 0, 1]])
    base = study_level_dataset(patient_name=patient_name, patient_id=patient_id, birth_date=IDENTITY["birth_date"],
                               accession=IDENTITY["accession"], study_uid=pydicom.uid.generate_uid(),
                               study_date=STUDY_DATE, frame_of_reference_uid=pydicom.uid.generate_uid())
    info = write_series(base, "t1c", _synthetic_head(), affine_lps, tmp_path / name,
                        series_uid=pydicom.uid.generate_uid(), study_date=STUDY_DATE,
                        patient_name=patient_name, slice_step=1)
    return [pydicom.dcmread(p) for p in info.paths]


def test_studies_without_a_patient_id_are_never_linked_nor_renamed(vault, tmp_path):
    """Two unidentified patients (empty PatientID, as emergency studies arrive)
    get two pseudonyms, so the prior search (by pseudonym) cannot take one's
    study as the other's prior, and the first patient's results, re-identified
    after the second study was pseudonymized, carry the first patient's name.
    Before, both shared one pseudonym and the second identity replaced the
    first in the vault. Studies of one PatientID still share their pseudonym."""
    first = _series_of(tmp_path, "first", "EMERGENCY^ONE", "")
    engine_a, files_a, study_a = _pseudonymize(vault, first, tmp_path / "dicom_a")
    second = _series_of(tmp_path, "second", "EMERGENCY^TWO", "   ")
    engine_b, _, _ = _pseudonymize(vault, second, tmp_path / "dicom_b")
    assert engine_a.pseudo_patient_id != engine_b.pseudo_patient_id

    image = sitk.ReadImage([str(p) for p in sorted(files_a, key=lambda p: pydicom.dcmread(p).InstanceNumber)])
    seg = build_seg(files_a, sitk.Cast(image > 700, sitk.sitkUInt8) * 3,
                    AlgorithmInfo(backend="baseline", model_name="no patient id"))
    out = reidentify_dataset(seg, vault.get("study", study_a), vault.get("patient", engine_a.pseudo_patient_id))
    assert str(out.PatientName) == "EMERGENCY^ONE" and out.PatientID == ""

    known_1 = _series_of(tmp_path, "known_1", "DOE^JANE", "PID-4711-XYZ")
    known_2 = _series_of(tmp_path, "known_2", "DOE^JANE", "PID-4711-XYZ")
    engine_1, _, study_1 = _pseudonymize(vault, known_1, tmp_path / "dicom_1")
    engine_2, _, study_2 = _pseudonymize(vault, known_2, tmp_path / "dicom_2")
    assert engine_1.pseudo_patient_id == engine_2.pseudo_patient_id and study_1 != study_2


def test_results_carry_the_patient_attributes_of_their_own_study(vault, tmp_path):
    """The registry corrected the patient's name between two studies: the first
    study's results, re-identified after the second was pseudonymized (an
    outbox retry, a review re-issue), still carry the name the first study came
    with, as the PACS holds it under that study. Before, the patient record,
    replaced by the second study's attributes, named them."""
    first = _series_of(tmp_path, "first", "SMITH^JANE", "PID-4711-XYZ")
    engine_a, files_a, study_a = _pseudonymize(vault, first, tmp_path / "dicom_a")
    second = _series_of(tmp_path, "second", "JONES^JANE", "PID-4711-XYZ")
    engine_b, files_b, study_b = _pseudonymize(vault, second, tmp_path / "dicom_b")
    assert engine_a.pseudo_patient_id == engine_b.pseudo_patient_id
    patient = vault.get("patient", engine_a.pseudo_patient_id)
    for files, study_uid, name in ((files_a, study_a, "SMITH^JANE"), (files_b, study_b, "JONES^JANE")):
        image = sitk.ReadImage([str(p) for p in sorted(files, key=lambda p: pydicom.dcmread(p).InstanceNumber)])
        seg = build_seg(files, sitk.Cast(image > 700, sitk.sitkUInt8) * 3,
                        AlgorithmInfo(backend="baseline", model_name="renamed"))
        out = reidentify_dataset(seg, vault.get("study", study_uid), patient)
        assert (str(out.PatientName), out.PatientID) == (name, "PID-4711-XYZ")
