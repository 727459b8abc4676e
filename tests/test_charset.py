"""pipelines/dicom_outputs/charset.py: the Specific Character Set the result
objects declare, for the spellings scanners write (PS3.3 C.12.1.1.2)."""

from __future__ import annotations

import pydicom
import pytest

from brainline.pipelines.dicom_outputs.charset import UNICODE, declare_usable_character_set, usable_character_set


@pytest.mark.parametrize("declared, usable", [
    ("ISO_IR 100", "ISO_IR 100"),
    ("ISO_IR 192", "ISO_IR 192"),
    ("GB18030", "GB18030"),
    (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),          # Japanese, empty first value
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
    ("ISO 2022 IR 100", "ISO_IR 100"),                                       # a lone code-extension term
    ("ISO 2022 IR 6", None), ("ISO_IR 6", None), ("", None), (None, None),  # the default repertoire
    (["", "ISO 2022 IR 149"], UNICODE),                                     # Korean: highdicom lacks the term
    (["", "ISO 2022 IR 58"], UNICODE),                                      # Chinese code extension
    ("ISO 2022 IR 87", UNICODE),                                            # multi-byte set alone
    ("UTF-8", UNICODE), ("ISO-IR 100", UNICODE),                            # not defined terms
])
def test_usable_character_set(declared, usable):
    assert usable_character_set(declared) == usable


def test_text_is_decoded_with_the_declared_set_before_the_declaration_changes():
    """A Korean name written in its ISO 2022 encoding reads the same after the
    dataset declares Unicode; a usable declaration is left untouched."""
    name = "Hong^Gildong=洪^吉洞=홍^길동"
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    ds.PatientName = name
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    assert name.split("=")[2].encode("utf-8") not in raw           # written as ISO 2022, not UTF-8
    read = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    declare_usable_character_set(read)
    assert read.SpecificCharacterSet == UNICODE
    assert str(read.PatientName) == name
    latin = pydicom.Dataset()
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "MÜLLER^JÜRGEN"
    declare_usable_character_set(latin)
    assert latin.SpecificCharacterSet == "ISO_IR 100" and str(latin.PatientName) == "MÜLLER^JÜRGEN"
