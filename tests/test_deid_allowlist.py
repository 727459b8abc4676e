"""De-identification is an allowlist (brainline.service.gateway.deid, issue 8 part 4).

Hostile instances carry the patient's identity where a denylist would miss
it: a referral PDF (Encapsulated PDF Storage), a Comprehensive SR with the
name in a TEXT content item, private OB / LO / SQ payloads, overlays, curves
and audio, waveforms, icon images, annotations, original-attribute
sequences, nested sequences and unknown public tags.  After
de-identification no identifying value may appear anywhere in the written
bytes, in any of the spellings of ``tests.phi.spellings`` (UTF-8 / Latin-1,
UTF-16 LE / BE, hexadecimal, any case), read back from explicit and implicit
VR files; every attribute left must be on the profile's allowlist.  Each
scan first checks that the same search finds the values in the input, so
the tests fail if the engine lets any through.

BurnedInAnnotation = YES is rejected (``BurnedInAnnotation`` error) or kept
with a flag in words, by policy.  Finally a real study (tests/dicom_factory)
goes through de-identification, series selection and dcm2niix, and gives
the same selection and the same volumes as the original.
"""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from brainline.service.gateway.deid import (
    NON_IMAGE_PAYLOADS,
    BurnedInAnnotation,
    DeidError,
    DeidProfile,
    DeidResult,
    deidentify,
    identifying_strings_of,
    pseudonymize_dataset,
)
from pipelines.conversion import convert_series
from pipelines.series_selection import load_rules, scan_series, select_series
from tests.phi import find_phi, spellings
from tests.test_deid import PHI, SOP_UIDS, STUDY_UID, all_elements, make_context, make_mr

PROFILE_PATH = Path(__file__).resolve().parents[1] / "config" / "deid_profile.yaml"
DOB_ISO = "1965-04-12"
# Identity planted only in the hostile payloads of this module.
EXTRA = {
    "pdf_referrer": "Ferdinandsen",
    "sr_text": "Wolverhampton Clinic",
    "private_ob": "HiddenOBPayload",
    "private_sq": "PrivateSeqSecret",
    "overlay_label": "OverlayLabelZQ",
    "waveform": "WaveformPHIZQ",
    "audio": "AudioPHIZQ",
    "icon": "IconPHIZQ",
    "annotation": "AnnotationPHIZQ",
    "original_attr": "OriginalAttrZQ",
    "unknown_public": "UnknownPublicZQ",
    "unknown_un": "UnknownUNZQ",
    "nested_deep": "NestedDeepZQ",
    "trailing": "TrailingPadZQ",
}
ALL_PHI = {**PHI, **EXTRA, "birth_date_iso": DOB_ISO}


@pytest.fixture(scope="module")
def profile() -> DeidProfile:
    return DeidProfile.load()


def written(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def patient_and_study(ds: Dataset, sop_class: str, modality: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.PatientName = f"{PHI['family']}^{PHI['given']}"
    ds.PatientID = PHI["patient_id"]
    ds.PatientBirthDate = PHI["birth_date"]
    ds.PatientSex = "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, generate_uid()
    ds.StudyDate, ds.StudyTime = "20190315", "101500"
    ds.AccessionNumber, ds.StudyID = PHI["accession"], PHI["study_id"]
    ds.ReferringPhysicianName = f"{PHI['referring']}^Hubert"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 99, 1
    ds.Manufacturer = "ACME"


def referral_pdf() -> bytes:
    """A real, uncompressed PDF naming the patient (name, MRN, birth date)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4, pageCompression=0)
    pdf.setTitle(f"Referral {PHI['family']} {PHI['given']}")
    pdf.setAuthor(f"Dr {EXTRA['pdf_referrer']}")
    pdf.drawString(72, 760, f"Referral for MR brain: {PHI['family'].upper()}, {PHI['given']}")
    pdf.drawString(72, 740, f"MRN {PHI['patient_id']}   born {DOB_ISO}   ({PHI['birth_date']})")
    pdf.drawString(72, 720, f"{PHI['address']}, phone {PHI['phone']}")
    pdf.showPage()
    pdf.save()
    # A PDF text string in UTF-16BE with BOM, as PDF writers use for non-ASCII metadata.
    return buffer.getvalue() + b"\n%" + b"\xfe\xff" + PHI["family"].encode("utf-16-be") + b"\n"


def make_pdf_instance() -> Dataset:
    ds = Dataset()
    patient_and_study(ds, EncapsulatedPDFStorage, "DOC")
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"  # type 1 in the Encapsulated Document module: a document is all text
    ds.DocumentTitle = f"Referral {PHI['family']}"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", f"Referral {PHI['family']}")])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf = referral_pdf()
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds


def make_sr_instance() -> Dataset:
    ds = Dataset()
    patient_and_study(ds, ComprehensiveSRStorage, "SR")
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    ds.VerifyingObserverSequence = Sequence([Dataset()])
    ds.VerifyingObserverSequence[0].VerifyingObserverName = f"{PHI['reader']}^Ana"
    ds.VerifyingObserverSequence[0].VerifyingOrganization = PHI["institution"]
    ds.VerifyingObserverSequence[0].VerificationDateTime = "20190316120000"

    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = Sequence([code("121071", "DCM", "Finding")])
    text.TextValue = (f"Patient {PHI['given']} {PHI['family']} (MRN {PHI['patient_id']}, born {DOB_ISO}) "
                      f"seen at {EXTRA['sr_text']}")
    person = Dataset()
    person.RelationshipType, person.ValueType = "HAS OBS CONTEXT", "PNAME"
    person.ConceptNameCodeSequence = Sequence([code("121008", "DCM", "Person Observer Name")])
    person.PersonName = f"{PHI['reader']}^Ana"
    nested = Dataset()
    nested.RelationshipType, nested.ValueType = "CONTAINS", "CONTAINER"
    nested.ConceptNameCodeSequence = Sequence([code("111028", "DCM", "Image Library")])
    nested.ContentSequence = Sequence([text])
    ds.ContentSequence = Sequence([person, nested])
    return ds


def make_hostile_mr() -> Dataset:
    """The MR of tests/test_deid.py plus every payload a denylist would miss."""
    ds = make_mr(0)
    # private payloads: OB (UTF-16 and Latin-1 text inside), LO, a private sequence
    block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    block.add_new(0x10, "OB", b"\x01\x02" + PHI["family"].encode("utf-16-le") + b"\x00"
                  + EXTRA["private_ob"].encode("latin-1") + b"\x00")
    block.add_new(0x11, "LO", f"{PHI['given']} {PHI['patient_id']}")
    item = Dataset()
    item.add_new(0x00100010, "PN", f"{PHI['family']}^{PHI['given']}")
    item.add_new(0x00431099, "LO", EXTRA["private_sq"])
    block.add_new(0x12, "SQ", Sequence([item]))
    # overlay in a second group, with label and description; curve with audio
    ds.add_new(0x60020010, "US", 16)
    ds.add_new(0x60020011, "US", 16)
    ds.add_new(0x60020040, "CS", "G")
    ds.add_new(0x60020050, "SS", [1, 1])
    ds.add_new(0x60020100, "US", 1)
    ds.add_new(0x60020102, "US", 0)
    ds.add_new(0x60020022, "LO", f"drawn for {PHI['family']}")
    ds.add_new(0x60021500, "LO", EXTRA["overlay_label"])
    ds.add_new(0x60023000, "OW", EXTRA["overlay_label"].encode("utf-16-le") + b"\x00" * 2)
    ds.add_new(0x5000200C, "OB", EXTRA["audio"].encode("latin-1") + b"\x00")
    # waveform
    wave = Dataset()
    wave.WaveformOriginality, wave.NumberOfWaveformChannels, wave.NumberOfWaveformSamples = "ORIGINAL", 1, 8
    wave.SamplingFrequency, wave.WaveformBitsAllocated, wave.WaveformSampleInterpretation = "100", 16, "SS"
    wave.WaveformData = EXTRA["waveform"].encode("utf-16-le") + b"\x00" * 2
    ds.WaveformSequence = Sequence([wave])
    # icon image with "pixels" that spell the name
    icon = Dataset()
    icon.SamplesPerPixel, icon.PhotometricInterpretation, icon.Rows, icon.Columns = 1, "MONOCHROME2", 2, 8
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = (EXTRA["icon"] + " " * 16)[:16].encode("latin-1")
    ds.IconImageSequence = Sequence([icon])
    # graphic annotation with a text object
    annotation = Dataset()
    annotation.GraphicLayer = "LAYER"
    annotation.TextObjectSequence = Sequence([Dataset()])
    annotation.TextObjectSequence[0].UnformattedTextValue = f"{EXTRA['annotation']} {PHI['family']}"
    ds.GraphicAnnotationSequence = Sequence([annotation])
    # original attributes (what a previous "de-identification" replaced)
    original = Dataset()
    original.ModifiedAttributesSequence = Sequence([Dataset()])
    original.ModifiedAttributesSequence[0].PatientName = f"{PHI['family']}^{PHI['given']}"
    original.ModifiedAttributesSequence[0].PatientID = PHI["patient_id"]
    original.SourceOfPreviousValues = EXTRA["original_attr"]
    ds.OriginalAttributesSequence = Sequence([original])
    # unknown public tags: one with a VR, one as UN
    ds.add_new(0x00189999, "LO", f"{EXTRA['unknown_public']} {PHI['family']}")
    ds.add_new(0x0020FF01, "UN", f"{EXTRA['unknown_un']} {PHI['patient_id']}".encode("latin-1"))
    # nested sequences: allowed > allowed > not allowed, with PHI at each level
    region = ds.AnatomicRegionSequence[0]
    region.AnatomicRegionModifierSequence = Sequence([code("7771000", "SCT", f"Left {EXTRA['nested_deep']}")])
    region.ReferencedImageSequence[0].PatientBirthName = PHI["birth_name"]
    region.ReferencedImageSequence[0].add_new(0x00189999, "LO", EXTRA["unknown_public"])
    region.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence = Sequence(
        [code("121311", "DCM", f"Localizer {PHI['family']}")])
    region.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence[0].ContentSequence = Sequence(
        [Dataset()])
    region.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence[0].ContentSequence[0].TextValue = (
        EXTRA["nested_deep"])
    ds.ReferencedPatientSequence = Sequence([Dataset()])
    ds.ReferencedPatientSequence[0].PatientName = f"{PHI['family']}^{PHI['given']}"
    ds.add_new(0xFFFCFFFC, "OB", EXTRA["trailing"].encode("latin-1") + b"\x00")
    return ds


HOSTILE = {"pdf": make_pdf_instance, "sr": make_sr_instance, "mr": make_hostile_mr}
POLICY = {"pdf": "flag", "sr": "reject", "mr": "reject"}


def assert_no_phi_in_any_spelling(original: Dataset, out: Dataset) -> None:
    """No identifying value, in any spelling, in ``out`` written explicit and implicit VR."""
    planted = {k: v for k, v in ALL_PHI.items() if find_phi(written(original), {k: v})}
    assert {"family", "given", "patient_id"} <= set(planted), "sanity: the scan must find the input's PHI"
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        data = written(out, syntax)
        reread = pydicom.dcmread(io.BytesIO(data))  # still a readable DICOM file
        assert reread.PatientIdentityRemoved == "YES"
        assert find_phi(data, planted) == [], syntax
        for uid in (STUDY_UID, *SOP_UIDS):
            assert uid.encode() not in data


def assert_only_allowed(profile: DeidProfile, out: Dataset) -> None:
    """Every attribute at every level is on the allowlist, with its dictionary VR."""
    for elem in all_elements(out):
        tag = int(elem.tag)
        assert tag in profile.allowed, f"{elem.tag} {elem.keyword or 'unknown'} is not on the allowlist"
        assert profile.vr_allowed(tag, elem.VR), f"{elem.keyword} has VR {elem.VR}"
        assert not elem.tag.is_private and (elem.tag.group & 0xFF00) not in (0x5000, 0x6000)
    for elem in out.file_meta:
        assert int(elem.tag) in profile.allowed_file_meta or elem.tag == 0x00020000, elem.keyword


# --------------------------------------------------------------------------
# Hostile instances: nothing identifying survives, only allowed attributes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("via_file", [False, True], ids=["dataset", "implicit-file"])
def test_hostile_instance_leaks_nothing(profile: DeidProfile, kind: str, via_file: bool, tmp_path: Path):
    original = HOSTILE[kind]()
    source = original
    if via_file:  # raw elements, private and unknown tags as UN
        path = tmp_path / "in.dcm"
        original.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        pydicom.dcmwrite(path, original, enforce_file_format=True)
        source = pydicom.dcmread(path)
    result = deidentify(source, profile, make_context(source), burned_in_annotation=POLICY[kind])
    assert isinstance(result, DeidResult)
    assert_no_phi_in_any_spelling(original, result.dataset)
    assert_only_allowed(profile, result.dataset)


def test_referral_pdf_is_removed(profile: DeidProfile):
    original = make_pdf_instance()
    assert find_phi(original.EncapsulatedDocument, [PHI["family"], PHI["patient_id"], DOB_ISO]) == [
        PHI["family"], PHI["patient_id"], DOB_ISO], "sanity: the PDF names the patient"
    result = deidentify(original, profile, make_context(original), burned_in_annotation="flag")
    out = result.dataset
    for keyword in ("EncapsulatedDocument", "EncapsulatedDocumentLength", "DocumentTitle",
                    "MIMETypeOfEncapsulatedDocument", "ConceptNameCodeSequence"):
        assert keyword not in out, keyword
    assert b"%PDF" not in written(out)
    assert not result.is_image
    assert "encapsulated document (e.g. a PDF)" in result.removed_payloads
    assert out.SOPClassUID == EncapsulatedPDFStorage and out.Modality == "DOC"


def test_sr_content_is_removed(profile: DeidProfile):
    original = make_sr_instance()
    result = deidentify(original, profile, make_context(original))
    out = result.dataset
    for keyword in ("ContentSequence", "VerifyingObserverSequence", "ConceptNameCodeSequence", "TextValue"):
        assert keyword not in out, keyword
    assert "structured report content" in result.removed_payloads and not result.is_image
    assert out.PatientName == "BL-3F9A0C"


def test_mr_payloads_removed_image_kept(profile: DeidProfile):
    original = make_hostile_mr()
    result = deidentify(original, profile, make_context(original))
    out = result.dataset
    assert result.is_image and result.flags == ()
    assert out.PixelData == original.PixelData
    for payload in ("private data elements", "overlay", "curve or audio", "waveform", "icon image",
                    "graphic annotation", "original (identifying) attribute values", "trailing padding"):
        assert payload in result.removed_payloads, payload
    for keyword in ("WaveformSequence", "IconImageSequence", "GraphicAnnotationSequence",
                    "OriginalAttributesSequence", "ReferencedPatientSequence", "DataSetTrailingPadding"):
        assert keyword not in out, keyword
    assert 0x00189999 not in out and 0x0020FF01 not in out
    # allowed nested sequences stay, their items are filtered with the same allowlist
    region = out.AnatomicRegionSequence[0]
    assert region.CodeValue == "12738006" and "AnatomicRegionModifierSequence" not in region
    ref = region.ReferencedImageSequence[0]
    assert set(ref.dir()) == {"PurposeOfReferenceCodeSequence", "ReferencedSOPClassUID", "ReferencedSOPInstanceUID"}
    purpose = ref.PurposeOfReferenceCodeSequence[0]
    assert purpose.CodeValue == "121311" and purpose.CodeMeaning == "Localizer"  # cleaned descriptor
    assert "ContentSequence" not in purpose


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_every_output_attribute_is_on_the_allowlist(profile: DeidProfile):
    """Also for an instance with every dictionary attribute the profile does not name."""
    ds = make_mr(0)
    added = 0
    for tag, entry in pydicom.datadict.DicomDictionary.items():
        vr, keyword = entry[0], entry[4]
        if (tag in ds or tag in profile.allowed or not keyword or tag >> 16 in (0x0002, 0xFFFE)
                or tag & 0xFFFF == 0 or " or " in vr or vr in ("SQ", "AT")):
            continue
        binary = vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN")
        value = {"US": 1, "SS": 1, "UL": 1, "SL": 1, "FL": 1.0, "FD": 1.0, "UV": 1, "SV": 1,
                 "IS": "1", "DS": "1", "DA": "20190101", "TM": "101010", "DT": "20190101101010",
                 "AS": "053Y", "UI": "1.2.3.4"}.get(vr, b"Quixotica\x00" if binary else "Quixotica")
        ds.add_new(tag, vr, value)
        added += 1
    assert added > 3000
    out = deidentify(ds, profile, make_context(ds)).dataset
    assert_only_allowed(profile, out)
    assert b"quixotica" not in written(out).lower()


def test_allowed_attribute_with_wrong_vr_is_removed(profile: DeidProfile):
    ds = make_mr(0)
    del ds.SeriesDescription
    ds.add_new(0x0008103E, "OB", PHI["family"].encode() + b"\x00")  # SeriesDescription as OB
    out = deidentify(ds, profile, make_context(ds)).dataset
    assert "SeriesDescription" not in out


# --------------------------------------------------------------------------
# The profile cannot allow payloads
# --------------------------------------------------------------------------


def profile_with(extra_attributes: list[dict]) -> dict:
    data = yaml.safe_load(PROFILE_PATH.read_text())
    data["attributes"] = [a for a in data["attributes"]
                          if a["keyword"] not in {e.get("keyword") for e in extra_attributes}] + extra_attributes
    return data


@pytest.mark.parametrize("entry, message", [
    ({"keyword": "EncapsulatedDocument", "action": "K"}, "non-image payload"),
    ({"keyword": "ContentSequence", "action": "K"}, "non-image payload"),
    ({"keyword": "TextValue", "action": "C"}, "non-image payload"),
    ({"keyword": "IconImageSequence", "action": "U"}, "non-image payload"),
    ({"keyword": "WaveformData", "action": "K"}, "non-image payload"),
    ({"tag": "(6000,3000)", "action": "K"}, "repeating group"),
    ({"tag": "(5000,200C)", "action": "K"}, "repeating group"),
    ({"tag": "(0029,1010)", "action": "K"}, "private"),
    ({"tag": "(0018,9999)", "action": "K"}, "not in the DICOM dictionary"),
])
def test_profile_refuses_to_allow_payloads(entry: dict, message: str):
    with pytest.raises(DeidError, match=message):
        DeidProfile.from_mapping(profile_with([entry]))
    entry = {**entry, "action": "X"}
    DeidProfile.from_mapping(profile_with([entry]))  # listing it as removed is fine


def test_profile_refuses_denylist_rules():
    data = yaml.safe_load(PROFILE_PATH.read_text())
    data["unlisted"] = {"default": "K"}
    with pytest.raises(DeidError, match="allowlist"):
        DeidProfile.from_mapping(data)


def test_non_image_payload_keywords_are_known():
    for keyword in NON_IMAGE_PAYLOADS:
        assert pydicom.datadict.tag_for_keyword(keyword) is not None, keyword


def test_profile_allowlist_covers_what_the_pipeline_reads(profile: DeidProfile):
    from pipelines import series_selection

    allowed = {pydicom.datadict.keyword_for_tag(t) for t in profile.allowed}
    header_keywords = set(getattr(series_selection, "_HEADER_TAGS", ()))  # what series selection reads
    needed = header_keywords | {
        "SeriesDescription", "ProtocolName", "ScanningSequence", "SequenceVariant", "ScanOptions",
        "MRAcquisitionType", "EchoTime", "RepetitionTime", "InversionTime", "ContrastBolusAgent",
        "ContrastBolusAgentSequence", "ImageType", "Manufacturer", "SliceThickness", "SpacingBetweenSlices",
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated",
        "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
        "RescaleSlope", "RescaleIntercept", "PixelData", "NumberOfFrames", "InstanceNumber", "EchoNumbers",
        "ImagesInAcquisition", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
        "PixelMeasuresSequence", "PlanePositionSequence", "PlaneOrientationSequence", "MREchoSequence",
        "EffectiveEchoTime", "MRTimingAndRelatedParametersSequence", "MRModifierSequence", "InversionTimes",
        "MRImageFrameTypeSequence", "FrameType", "EchoPulseSequence", "FrameOfReferenceUID", "WindowCenter",
        "WindowWidth", "BodyPartExamined", "SeriesNumber", "Modality", "SOPClassUID", "SpecificCharacterSet"}
    needed.discard(None)
    assert needed - allowed == set()


# --------------------------------------------------------------------------
# BurnedInAnnotation
# --------------------------------------------------------------------------


def burned_in_mr() -> Dataset:
    ds = make_mr(0)
    ds.BurnedInAnnotation = "YES"
    return ds


def test_burned_in_annotation_rejected_by_default(profile: DeidProfile):
    ds = burned_in_mr()
    for call in (lambda: deidentify(ds, profile, make_context(ds)),
                 lambda: pseudonymize_dataset(ds, profile, make_context(ds)),
                 lambda: deidentify(ds, profile, make_context(ds), burned_in_annotation="reject")):
        with pytest.raises(BurnedInAnnotation) as info:
            call()
        assert isinstance(info.value, DeidError)
        message = str(info.value)
        assert "burned-in annotation" in message and "quarantine" in message
        assert find_phi(message.encode(), ALL_PHI) == []


def test_burned_in_annotation_flagged(profile: DeidProfile):
    ds = burned_in_mr()
    result = deidentify(ds, profile, make_context(ds), burned_in_annotation="flag")
    [flag] = result.flags
    assert "BurnedInAnnotation = YES" in flag and "flag" in flag
    assert find_phi(flag.encode(), ALL_PHI) == []
    assert result.dataset.BurnedInAnnotation == "YES"
    assert result.dataset.PixelData == ds.PixelData
    assert find_phi(written(result.dataset), PHI) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("value", ["NO", None, "yes "])
def test_burned_in_annotation_values(profile: DeidProfile, value):
    ds = make_mr(0)
    if value is not None:
        ds.BurnedInAnnotation = value
    if value == "yes ":
        with pytest.raises(BurnedInAnnotation):
            deidentify(ds, profile, make_context(ds))
    else:
        assert deidentify(ds, profile, make_context(ds)).flags == ()


def test_burned_in_annotation_policy_checked(profile: DeidProfile):
    ds = make_mr(0)
    with pytest.raises(DeidError, match="burned_in_annotation"):
        deidentify(ds, profile, make_context(ds), burned_in_annotation="ignore")


# --------------------------------------------------------------------------
# A real study still selects and converts the same after de-identification
# --------------------------------------------------------------------------


def test_real_study_selects_and_converts_the_same(profile: DeidProfile, small_study, tmp_path: Path):
    first = pydicom.dcmread(next(Path(small_study.series["t1"].dir).glob("*.dcm")))
    files = sorted(Path(small_study.series["t1"].dir).parent.rglob("*.dcm"))
    ctx = make_context(first)
    deid_dir = tmp_path / "deid"
    for path in files:
        ds = pydicom.dcmread(path)
        out = deidentify(ds, profile, ctx).dataset
        assert_only_allowed(profile, out)
        target = deid_dir / str(out.SeriesInstanceUID) / f"{out.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        out.save_as(target, enforce_file_format=True)
    assert find_phi(b"".join(p.read_bytes() for p in deid_dir.rglob("*.dcm")),
                    ["DOE^JANE", "PID-4711-XYZ", "ACC-98765", "19640229", "St Elsewhere", "HOUSE^GREGORY"]) == []

    rules = load_rules()
    before = select_series(scan_series(Path(small_study.series["t1"].dir).parent), rules)
    after = select_series(scan_series(deid_dir), rules)
    assert set(after.roles) == set(before.roles) == {"t1", "t1c", "t2", "flair"}
    fields = ("series_number", "description", "protocol_name", "modality", "sop_class_uid", "n_instances",
              "mr_acquisition_type", "slice_thickness", "contrast_agent", "image_type", "repetition_time",
              "echo_time", "inversion_time", "scanning_sequence", "sequence_variant", "rows", "columns")
    for role in before.roles:
        for name in fields:
            assert getattr(after.roles[role], name) == getattr(before.roles[role], name), (role, name)

    for role in ("t1c", "flair"):
        a = convert_series(before.roles[role].files, tmp_path / "nifti-original", role)
        b = convert_series(after.roles[role].files, tmp_path / "nifti-deid", role)
        assert a.shape == b.shape and np.allclose(a.voxel_size_mm, b.voxel_size_mm)
        image_a, image_b = nib.load(str(a.nifti)), nib.load(str(b.nifti))
        assert np.allclose(image_a.affine, image_b.affine, atol=1e-4)
        assert np.array_equal(np.asarray(image_a.dataobj), np.asarray(image_b.dataobj))
        sidecar = b.sidecar.read_bytes()
        assert find_phi(sidecar, ["DOE^JANE", "PID-4711-XYZ", "St Elsewhere", "HOUSE^GREGORY", "MRSTATION01"]) == []


def enhanced_mr(folder: Path, n_frames: int = 6) -> Path:
    """A small Enhanced MR FLAIR, parameters only in functional groups, PHI in frame items."""
    ds = Dataset()
    patient_and_study(ds, EnhancedMRImageStorage, "MR")
    ds.SeriesDescription, ds.MRAcquisitionType = "3D FLAIR SAG", "3D"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.EchoPulseSequence, ds.FrameOfReferenceUID = "SPIN", generate_uid()
    ds.AcquisitionDateTime, ds.ContentDate, ds.ContentTime = "20190315102233", "20190315", "102233"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = n_frames
    ds.PixelData = np.arange(64 * n_frames, dtype=np.uint16).tobytes()

    def item(**kw) -> Sequence:
        it = Dataset()
        for key, value in kw.items():
            setattr(it, key, value)
        return Sequence([it])

    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = item(RepetitionTime=5000.0, FlipAngle=90)
    shared.MRModifierSequence = item(InversionRecovery="YES", InversionTimes=[1650.0])
    shared.PixelMeasuresSequence = item(SliceThickness=1.0, PixelSpacing=[1.0, 1.0])
    shared.PlaneOrientationSequence = item(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    shared.MRImageFrameTypeSequence = item(FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in range(n_frames):
        frame = Dataset()
        frame.MREchoSequence = item(EffectiveEchoTime=390.0)
        frame.PlanePositionSequence = item(ImagePositionPatient=[float(i), -100.0, 100.0])
        frame.FrameContentSequence = item(FrameAcquisitionDateTime="20190315102233", InStackPositionNumber=i + 1,
                                          StackID="1", DimensionIndexValues=[1, i + 1],
                                          FrameComments=f"{PHI['family']} frame")
        frame.add_new(0x00211010, "LO", PHI["patient_id"])  # private, inside a frame item
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    folder.mkdir(parents=True)
    ds.save_as(folder / "enhanced.dcm", enforce_file_format=True)
    return folder / "enhanced.dcm"


def test_enhanced_mr_keeps_functional_groups(profile: DeidProfile, tmp_path: Path):
    path = enhanced_mr(tmp_path / "in" / "E1")
    ds = pydicom.dcmread(path)
    result = deidentify(ds, profile, make_context(ds))
    out = result.dataset
    assert_only_allowed(profile, out)
    assert find_phi(written(out), PHI) == []
    assert len(out.PerFrameFunctionalGroupsSequence) == 6
    frame = out.PerFrameFunctionalGroupsSequence[3]
    assert frame.PlanePositionSequence[0].ImagePositionPatient == [3.0, -100.0, 100.0]
    assert frame.FrameContentSequence[0].FrameAcquisitionDateTime == shifted_dt("20190315102233")
    assert "FrameComments" not in frame.FrameContentSequence[0] and 0x00211010 not in frame
    (tmp_path / "out" / "E1").mkdir(parents=True)
    out.save_as(tmp_path / "out" / "E1" / "enhanced.dcm", enforce_file_format=True)
    [before], [after] = scan_series(tmp_path / "in"), scan_series(tmp_path / "out")
    for name in ("description", "n_frames", "mr_acquisition_type", "slice_thickness", "image_type",
                 "repetition_time", "echo_time", "inversion_time", "scanning_sequence", "rows", "columns"):
        assert getattr(after, name) == getattr(before, name), name
    assert after.echo_time == 390.0 and after.inversion_time == 1650.0 and after.n_frames == 6


def shifted_dt(value: str) -> str:
    import datetime as dt

    from tests.test_deid import SHIFT

    day = dt.datetime.strptime(value[:8], "%Y%m%d").date() + dt.timedelta(days=SHIFT)
    return day.strftime("%Y%m%d") + value[8:]


def test_identifying_strings_cover_the_pdf_patient():
    strings = identifying_strings_of(make_pdf_instance())
    assert PHI["family"] in strings and PHI["patient_id"] in strings


def test_spellings_helper():
    assert b"q\x00u\x00i\x00" in spellings("Quixotica")[2]  # UTF-16LE, lower case
    assert find_phi("xx QUIXOTICA yy".encode("utf-16-be"), ["Quixotica"]) == ["Quixotica"]
    assert find_phi(b"<FEFF005100750069>", ["Qui"]) == []  # too short to search
    assert find_phi(("Quixotica".encode("utf-16-be").hex().upper()).encode(), ["Quixotica"]) == ["Quixotica"]
