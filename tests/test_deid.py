"""Tests for the DICOM de-identification engine (brainline.service.gateway.deid).

Synthetic MR datasets are built in code with identifying values planted in
every place the profile must handle (patient module, physicians, device,
free text, nested sequences, private tags, overlays, curves), then the
de-identified dataset is written to bytes and searched for the originals in
every spelling of tests.phi.spellings (UTF-8 / Latin-1, UTF-16, hex, any
case).  Hostile payloads (PDF, SR, private blobs, ...) and the allowlist
itself are tested in tests/test_deid_allowlist.py.
One test builds a real slice from shared/data and checks it with dciodvfy.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

from brainline.service.gateway.deid import (
    DeidContext,
    DeidError,
    DeidProfile,
    identifying_strings_of,
    pseudonymize_dataset,
)
from tests.phi import find_phi
from tests.shared_data import TCGA, needs_data

SHIFT = -1234
STUDY_UID = "1.2.826.0.1.3680043.8.498.11111111111111111111"
SERIES_UID = "1.2.826.0.1.3680043.8.498.22222222222222222222"
FRAME_UID = "1.2.826.0.1.3680043.8.498.33333333333333333333"
SOP_UIDS = ("1.2.826.0.1.3680043.8.498.44444444444444444441", "1.2.826.0.1.3680043.8.498.44444444444444444442")

# Values that must not survive anywhere in the written bytes.
PHI = {
    "family": "Quixotica",
    "given": "Bartholomew",
    "middle": "Zebulon",
    "patient_id": "MRN-77X31Q",
    "other_id": "ALT-55K20W",
    "accession": "ACC9918273",
    "study_id": "STU4471",
    "birth_date": "19650412",
    "referring": "Farnsworth",
    "operator": "Olgavinsky",
    "performing": "Drakenhof",
    "reader": "Pellegrinoux",
    "institution": "Saint Wimbledon Hospital",
    "department": "Neuroradiology Wing Q",
    "address": "12 Elmwood Street",
    "phone": "555-0199-321",
    "station": "MRSTATION7Z",
    "serial": "SN-883311",
    "ethnic": "Martianese",
    "occupation": "Astronautics",
    "record_locator": "MRL-4242-Q",
    "requested_proc_id": "RP-123456",
    "private_value": "SecretVendorValue",
    "overlay_comment": "OverlayNoteXYZ",
    "curve_label": "CurveLabelXYZ",
    "unlisted_pn": "Evaluatorsson",
    "birth_name": "Quizzleton",
    "device_uid": "1.2.826.0.1.3680043.8.498.55555555555555555555",
}
ORIGINAL_UIDS = (STUDY_UID, SERIES_UID, FRAME_UID, *SOP_UIDS)


def uid_map(uid: str) -> str:
    """Deterministic pseudonymous UID, as the vault would produce."""
    return "2.25." + str(int(hashlib.sha256(b"test-salt:" + uid.encode()).hexdigest()[:30], 16))


@pytest.fixture(scope="module")
def profile() -> DeidProfile:
    return DeidProfile.load()


def make_context(ds: Dataset | None = None, shift: int = SHIFT) -> DeidContext:
    return DeidContext(
        pseudo_patient_id="BL-3F9A0C",
        pseudo_patient_name="BL-3F9A0C",
        date_shift_days=shift,
        uid_map=uid_map,
        identifying_strings=identifying_strings_of(ds) if ds is not None else (),
    )


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_mr(index: int = 0, rows: int = 16, cols: int = 16) -> Dataset:
    """A synthetic MR image full of identifying values in awkward places."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = SOP_UIDS[index]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = PHI["station"]

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = SOP_UIDS[index]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, SERIES_UID, FRAME_UID
    ds.DeviceUID = PHI["device_uid"]

    ds.PatientName = f"{PHI['family']}^{PHI['given']}^{PHI['middle']}"
    ds.PatientID = PHI["patient_id"]
    ds.IssuerOfPatientID = "SWH"
    ds.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDs = PHI["other_id"]
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = PHI["other_id"]
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    ds.OtherPatientNames = f"{PHI['family']}^Barty"
    ds.PatientBirthName = PHI["birth_name"]
    ds.PatientBirthDate = PHI["birth_date"]
    ds.PatientSex, ds.PatientAge, ds.PatientSize, ds.PatientWeight = "F", "053Y", "1.68", "61"
    ds.PatientAddress = PHI["address"]
    ds.PatientTelephoneNumbers = PHI["phone"]
    ds.EthnicGroup = PHI["ethnic"]
    ds.Occupation = PHI["occupation"]
    ds.MedicalRecordLocator = PHI["record_locator"]
    ds.AdditionalPatientHistory = f"{PHI['given']} {PHI['family']} born 1965-04-12, seizures"
    ds.PatientComments = f"call {PHI['phone']}"

    ds.StudyDate, ds.StudyTime = "20190315", "101500"
    ds.SeriesDate, ds.SeriesTime = "20190315", "102001.5"
    ds.AcquisitionDate, ds.AcquisitionTime = "20190315", "102233"
    ds.ContentDate, ds.ContentTime = "20190316", "000501"
    ds.AcquisitionDateTime = "20190315102233.123456+0100"
    ds.AccessionNumber = PHI["accession"]
    ds.StudyID = PHI["study_id"]
    ds.ReferringPhysicianName = f"{PHI['referring']}^Hubert"
    ds.NameOfPhysiciansReadingStudy = f"{PHI['reader']}^Ana"
    ds.PerformingPhysicianName = f"{PHI['performing']}^Ivo"
    ds.OperatorsName = f"{PHI['operator']}^Olga"
    ds.StudyDescription = f"MR BRAIN W/WO for {PHI['family'].upper()}"
    ds.SeriesDescription = f"T1 AX post {PHI['family']} {PHI['patient_id']}"
    ds.ProtocolName = f"t1_mprage_{PHI['given'].lower()}"
    ds.ContrastBolusAgent = f"Gadovist {PHI['family']}"
    ds.ImageComments = f"patient {PHI['family']} moved"
    ds.InstitutionName = PHI["institution"]
    ds.InstitutionAddress = PHI["address"]
    ds.InstitutionalDepartmentName = PHI["department"]
    ds.StationName = PHI["station"]
    ds.DeviceSerialNumber = PHI["serial"]
    ds.Manufacturer, ds.ManufacturerModelName = "GE MEDICAL SYSTEMS", "Signa HDxt"
    ds.EvaluatorName = f"{PHI['unlisted_pn']}^Eve"  # PN not in the profile: removed

    ds.Modality = "MR"
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 5, index + 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence, ds.SequenceVariant = ["GR", "IR"], ["SK", "SP", "MP"]
    ds.ScanOptions, ds.MRAcquisitionType = "", "3D"
    ds.SequenceName = "*tfl3d1"
    ds.SliceThickness, ds.RepetitionTime, ds.EchoTime, ds.InversionTime = "1", "2300", "2.98", "900"
    ds.EchoTrainLength, ds.MagneticFieldStrength, ds.FlipAngle = 1, "3", "9"
    ds.ImagePositionPatient = [-120, -120, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceLocation = str(float(index))
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"

    ds.ReferencedImageSequence = Sequence([Dataset()])
    ref = ds.ReferencedImageSequence[0]
    ref.ReferencedSOPClassUID = MRImageStorage
    ref.ReferencedSOPInstanceUID = SOP_UIDS[1 - index]
    ds.RequestAttributesSequence = Sequence([Dataset()])
    req = ds.RequestAttributesSequence[0]
    req.RequestedProcedureID = PHI["requested_proc_id"]
    req.ScheduledProcedureStepID = PHI["requested_proc_id"] + "-1"
    req.ReasonForTheRequestedProcedure = f"tumour follow-up {PHI['family']}"
    ds.ProcedureCodeSequence = Sequence([code_item("MRBRAIN", "99LOCAL", f"MR brain {PHI['family']}")])
    # An allowed sequence: kept, its items processed with the same allowlist.
    ds.AnatomicRegionSequence = Sequence([code_item("12738006", "SCT", "Brain")])
    nested = ds.AnatomicRegionSequence[0]
    nested.EvaluatorName = f"{PHI['unlisted_pn']}^Nested"
    nested.InstanceCreationDate = "20190315"
    nested.ReferencedImageSequence = Sequence([Dataset()])
    nested.ReferencedImageSequence[0].ReferencedSOPClassUID = MRImageStorage
    nested.ReferencedImageSequence[0].ReferencedSOPInstanceUID = SOP_UIDS[index]
    nested.add_new(0x00091010, "LO", PHI["private_value"])  # private inside a sequence

    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", PHI["private_value"])
    block.add_new(0x11, "LO", PHI["family"])
    ds.add_new(0x60000010, "US", rows)  # a complete Overlay Plane module
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\x00" * (rows * cols // 8))
    ds.add_new(0x60004000, "LT", PHI["overlay_comment"])
    ds.add_new(0x50002500, "LO", PHI["curve_label"])

    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = (np.arange(rows * cols, dtype=np.int16) % 700).tobytes()
    return ds


def written_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def all_elements(ds: Dataset):
    """Every element of ``ds``, sequences included."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from all_elements(item)


def shifted(date: str, days: int = SHIFT) -> str:
    return (dt.datetime.strptime(date, "%Y%m%d").date() + dt.timedelta(days=days)).strftime("%Y%m%d")


# --------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------


def test_profile_loads_with_annex_e_coverage(profile: DeidProfile):
    assert len(profile.actions) >= 120
    assert set(profile.actions.values()) <= set("DZXKCU")
    keyword_actions = {pydicom.datadict.keyword_for_tag(t): a for t, a in profile.actions.items()}
    for keyword in ("InstitutionName", "DeviceSerialNumber", "OperatorsName", "EthnicGroup", "Occupation",
                    "OtherPatientIDs", "OtherPatientNames", "MedicalRecordLocator", "RequestAttributesSequence"):
        assert keyword_actions[keyword] == "X", keyword
    for keyword in ("PatientSex", "PatientAge", "PatientSize", "PatientWeight", "ImageType", "PixelData"):
        assert keyword_actions[keyword] == "K", keyword
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription", "ContrastBolusAgent", "StudyDate"):
        assert keyword_actions[keyword] == "C", keyword
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                    "ReferencedSOPInstanceUID"):
        assert keyword_actions[keyword] == "U", keyword
    assert "Retain Longitudinal Temporal Information with Modified Dates" in profile.options_applied
    assert "Retain Device Identity" not in profile.options_applied
    assert [c.value for c in profile.method_codes] == ["113100", "113107", "113105", "113108"]


def test_profile_rejects_keyword_tag_mismatch(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text('attributes:\n  - {keyword: PatientName, tag: "(0010,0020)", action: Z}\n')
    with pytest.raises(DeidError, match="does not match"):
        DeidProfile.load(path)


def test_profile_rejects_unknown_action(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("attributes:\n  - {keyword: PatientName, action: Q}\n")
    with pytest.raises(DeidError, match="action must be one of"):
        DeidProfile.load(path)


# --------------------------------------------------------------------------
# No identifying value survives
# --------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")  # pydicom warnings would log values
def test_no_identifying_value_survives_in_written_bytes(profile: DeidProfile):
    original = make_mr(0)
    out = pseudonymize_dataset(original, profile, make_context(original))
    assert set(find_phi(written_bytes(original), PHI)) == set(PHI), "sanity: the scan finds the input's PHI"
    data = written_bytes(out)
    assert find_phi(data, PHI) == []  # any case; UTF-8/Latin-1, UTF-16 LE/BE and hex spellings
    data = data.lower()
    for uid in ORIGINAL_UIDS:
        assert uid.encode() not in data
    for spelling in ("1965-04-12", "12.04.1965"):
        assert spelling.encode() not in data


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_dataset_read_from_file(profile: DeidProfile, syntax: str, tmp_path: Path):
    """Raw (not yet decoded) elements, implicit VR private tags, FileDataset."""
    original = make_mr(0)
    original.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "in.dcm"
    pydicom.dcmwrite(path, original, enforce_file_format=True)
    read = pydicom.dcmread(path)
    out = pseudonymize_dataset(read, profile, make_context(read))
    assert out.filename is None and read.filename == str(path)
    assert find_phi(written_bytes(out), PHI) == []
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == uid_map(SOP_UIDS[0])
    assert out.StudyDate == shifted("20190315")
    assert out.PixelData == original.PixelData


def test_structure_is_cleaned(profile: DeidProfile):
    out = pseudonymize_dataset(make_mr(0), profile, make_context())
    tags = [elem.tag for elem in all_elements(out)]
    assert not any(tag.is_private for tag in tags)
    assert not any((tag.group & 0xFF00) in (0x5000, 0x6000) for tag in tags)
    for keyword in ("InstitutionName", "DeviceSerialNumber", "OperatorsName", "EthnicGroup", "Occupation",
                    "OtherPatientIDs", "OtherPatientIDsSequence", "RequestAttributesSequence",
                    "ProcedureCodeSequence", "ImageComments", "AdditionalPatientHistory", "IssuerOfPatientID"):
        assert keyword not in out, keyword
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.PatientName == "BL-3F9A0C" and out.PatientID == "BL-3F9A0C"
    assert out.PatientBirthDate == "" and out.AccessionNumber == "" and out.StudyID == ""
    assert out.ReferringPhysicianName == ""
    # allowlist: an attribute the profile does not name is removed, nested ones too
    assert "EvaluatorName" not in out
    assert "EvaluatorName" not in out.AnatomicRegionSequence[0]
    assert out.AnatomicRegionSequence[0].CodeValue == "12738006"


def test_descriptors_are_cleaned_not_removed(profile: DeidProfile):
    original = make_mr(0)
    out = pseudonymize_dataset(original, profile, make_context(original))
    assert out.SeriesDescription == "T1 AX post"
    assert out.StudyDescription == "MR BRAIN W/WO for"
    assert out.ProtocolName == "t1_mprage_"
    assert out.ContrastBolusAgent == "Gadovist"


def test_short_name_parts_only_removed_as_whole_words(profile: DeidProfile):
    ds = make_mr(0)
    ds.PatientName = "Li^Ai"
    ds.SeriesDescription = "AX FLAIR Li fat-sat"
    out = pseudonymize_dataset(ds, profile, make_context(ds))
    assert out.SeriesDescription == "AX FLAIR fat-sat"


def test_original_dataset_is_not_modified(profile: DeidProfile):
    original = make_mr(0)
    before = written_bytes(original)
    pseudonymize_dataset(original, profile, make_context(original))
    assert written_bytes(original) == before


# --------------------------------------------------------------------------
# UIDs
# --------------------------------------------------------------------------


def test_uids_remapped_consistently_across_instances(profile: DeidProfile):
    ctx = make_context(make_mr(0))
    first = pseudonymize_dataset(make_mr(0), profile, ctx)
    second = pseudonymize_dataset(make_mr(1), profile, ctx)
    assert first.StudyInstanceUID == second.StudyInstanceUID == uid_map(STUDY_UID)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == uid_map(SERIES_UID)
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID == uid_map(FRAME_UID)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    for ds in (first, second):
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.DeviceUID == uid_map(PHI["device_uid"])
    # cross references follow the remapped instances, nested ones too
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == second.SOPInstanceUID
    assert first.AnatomicRegionSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert first.ReferencedImageSequence[0].ReferencedSOPClassUID == MRImageStorage


def test_invalid_uid_from_map_raises_without_patient_data(profile: DeidProfile):
    ctx = DeidContext("BL-1", "BL-1", 0, uid_map=lambda uid: "9.x." + uid)
    with pytest.raises(DeidError) as info:
        pseudonymize_dataset(make_mr(0), profile, ctx)
    message = str(info.value)
    assert "UID" in message
    assert not any(v.lower() in message.lower() for v in PHI.values())
    assert not any(uid in message for uid in ORIGINAL_UIDS)


def test_failing_uid_map_raises_deid_error_naming_the_tag(profile: DeidProfile):
    def broken(uid: str) -> str:
        raise RuntimeError(f"vault down for {uid}")

    with pytest.raises(DeidError) as info:
        pseudonymize_dataset(make_mr(0), profile, DeidContext("BL-1", "BL-1", 0, uid_map=broken))
    assert "RuntimeError" in str(info.value)
    assert not any(uid in str(info.value) for uid in ORIGINAL_UIDS)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --------------------------------------------------------------------------
# Dates and times
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [SHIFT, 0, 400])
def test_dates_shifted_by_exactly_n_days_and_times_kept(profile: DeidProfile, shift: int):
    original = make_mr(0)
    out = pseudonymize_dataset(original, profile, make_context(original, shift=shift))
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        assert out[keyword].value == shifted(original[keyword].value, shift), keyword
    for keyword in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        assert out[keyword].value == original[keyword].value, keyword
    assert out.AcquisitionDateTime == shifted("20190315", shift) + "102233.123456"
    assert out.AnatomicRegionSequence[0].InstanceCreationDate == shifted("20190315", shift)
    assert out.LongitudinalTemporalInformationModified == ("MODIFIED" if shift else "UNMODIFIED")


def test_date_shift_crosses_leap_day(profile: DeidProfile):
    ds = make_mr(0)
    ds.StudyDate = "20200228"
    out = pseudonymize_dataset(ds, profile, make_context(ds, shift=2))
    assert out.StudyDate == "20200301"


@pytest.mark.filterwarnings("ignore:Invalid value")
def test_invalid_and_partial_dates_are_removed(profile: DeidProfile):
    ds = make_mr(0)
    ds.StudyDate = "2019-13-45"
    ds.SeriesDate = "20190231"
    ds.ContentDate = "2019.03.16"  # legacy ACR-NEMA spelling: valid, shifted
    ds.AcquisitionDateTime = "2019"
    ds.InstanceCoercionDateTime = "201903"
    ds.FrameReferenceDateTime = "garbage"
    out = pseudonymize_dataset(ds, profile, make_context(ds))
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDateTime", "InstanceCoercionDateTime",
                    "FrameReferenceDateTime"):
        assert out[keyword].value in ("", None), keyword
    assert out.ContentDate == shifted("20190316")
    written_bytes(out)  # still writable


def test_multivalued_dates(profile: DeidProfile):
    ds = make_mr(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add_new(0x00080012, "DA", ["20190101", "bad", "20190102"])  # allowed (C), more values than its VM
        ds.add_new(0x00181202, "DT", ["20190101", "20190102"])  # DateTimeOfLastCalibration: not allowed
    out = pseudonymize_dataset(ds, profile, make_context(ds))
    assert list(out[0x00080012].value) == [shifted("20190101"), shifted("20190102")]
    assert 0x00181202 not in out


# --------------------------------------------------------------------------
# Kept attributes and method description
# --------------------------------------------------------------------------


def test_selection_attributes_and_pixels_kept(profile: DeidProfile):
    original = make_mr(0)
    out = pseudonymize_dataset(original, profile, make_context(original))
    for keyword in ("ImageType", "MRAcquisitionType", "SliceThickness", "RepetitionTime", "EchoTime",
                    "InversionTime", "ScanningSequence", "SequenceVariant", "SequenceName", "ImagePositionPatient",
                    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "PatientSex", "PatientAge",
                    "PatientSize", "PatientWeight", "Modality", "SeriesNumber", "InstanceNumber", "Manufacturer"):
        assert out[keyword].value == original[keyword].value, keyword
    assert out.PixelData is original.PixelData or out.PixelData == original.PixelData
    assert np.array_equal(out.pixel_array, original.pixel_array)


def test_deidentification_method_recorded(profile: DeidProfile):
    out = pseudonymize_dataset(make_mr(0), profile, make_context())
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod
    codes = {(item.CodingSchemeDesignator, item.CodeValue) for item in out.DeidentificationMethodCodeSequence}
    assert codes == {("DCM", "113100"), ("DCM", "113107"), ("DCM", "113105"), ("DCM", "113108")}
    meanings = [item.CodeMeaning for item in out.DeidentificationMethodCodeSequence]
    assert "Basic Application Confidentiality Profile" in meanings
    reread = pydicom.dcmread(io.BytesIO(written_bytes(out)))
    assert len(reread.DeidentificationMethodCodeSequence) == 4


def test_identifying_strings_of():
    strings = identifying_strings_of(make_mr(0))
    for value in (PHI["family"], PHI["given"], PHI["middle"], PHI["patient_id"], PHI["other_id"],
                  PHI["accession"], PHI["study_id"], PHI["birth_date"], "1965-04-12", PHI["birth_name"]):
        assert value in strings
    assert all(len(s) >= 2 for s in strings)


def test_context_validation():
    with pytest.raises(DeidError):
        DeidContext("", "BL-1", 0, uid_map)
    with pytest.raises(DeidError):
        DeidContext("BL-1", "BL-1", 1.5, uid_map)  # type: ignore[arg-type]
    with pytest.raises(DeidError):
        DeidContext("BL-1", "BL-1", 0, "not callable")  # type: ignore[arg-type]


@pytest.mark.serial  # a wall-clock bound: runs alone, after the parallel phase
def test_fast_enough_for_a_study(profile: DeidProfile):
    """~600 instances of 240x240 in a few seconds."""
    template = make_mr(0, rows=240, cols=240)
    studies = []
    for _ in range(600):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        studies.append(ds)
    ctx = make_context(template)
    start = time.perf_counter()
    for ds in studies:
        pseudonymize_dataset(ds, profile, ctx)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"{elapsed:.1f} s for 600 instances"


# --------------------------------------------------------------------------
# Real image, validated with dciodvfy
# --------------------------------------------------------------------------

DATA = TCGA / "t1.nii.gz"
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def mr_slice_from_nifti(path: Path) -> Dataset:
    """One axial slice of a NIfTI volume as a classic MR Image Storage instance."""
    import nibabel as nib

    image = nib.load(str(path))
    k = image.shape[2] // 2
    pixels = np.asarray(image.dataobj[:, :, k], dtype=np.int16).T  # rows follow j, columns follow i
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    axes = ras_to_lps @ image.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    row_dir, col_dir = axes[:, 0] / spacing[0], axes[:, 1] / spacing[1]
    origin = ras_to_lps @ (image.affine @ np.array([0, 0, k, 1.0]))[:3]

    ds = make_mr(0, rows=pixels.shape[0], cols=pixels.shape[1])
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
    ds.ImagePositionPatient = [round(float(v), 4) for v in origin]
    ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]
    ds.SliceThickness = round(float(spacing[2]), 6)
    ds.SliceLocation = round(float(origin[2]), 4)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = SOP_UIDS[1]
    return ds


def dciodvfy_errors(ds: Dataset, path: Path) -> set[str]:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert "MRImage" in output, "dciodvfy did not recognise the object"
    return {line for line in output.splitlines() if line.startswith("Error")}


@needs_data(DATA)
@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy (dicom3tools) not installed")
def test_real_slice_passes_dciodvfy_after_deid(profile: DeidProfile, tmp_path: Path):
    original = mr_slice_from_nifti(DATA)
    out = pseudonymize_dataset(original, profile, make_context(original))
    before = dciodvfy_errors(original, tmp_path / "original.dcm")
    after = dciodvfy_errors(out, tmp_path / "deid.dcm")
    assert after - before == set(), "\n".join(sorted(after - before))
    data = (tmp_path / "deid.dcm").read_bytes().lower()
    for label in ("family", "given", "patient_id", "accession", "institution", "serial"):
        assert PHI[label].lower().encode() not in data, label
    assert np.array_equal(pydicom.dcmread(tmp_path / "deid.dcm").pixel_array, original.pixel_array)
