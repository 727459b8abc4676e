"""Subtraction series of a follow-up: derived MR images on the current reference series.

A subtraction map (``W/longitudinal/subtraction_<role>.nii.gz``: current minus
the registered, intensity-matched prior, in the units of the preprocessed
images, physical space LPS, mm) becomes one classic MR Image Storage instance
per instance of the current reference series, which every PACS viewer shows:

* same Rows/Columns, ImagePositionPatient, ImageOrientationPatient,
  PixelSpacing, FrameOfReferenceUID as the source instance (so it scrolls and
  cross-references with it); the map is resampled (linear) onto each source
  plane with :func:`.seg.image_on_source_grid`;
* ImageType ``DERIVED\\SECONDARY\\SUBTRACTION``, DerivationCodeSequence
  (113062, DCM, "Pixel by pixel subtraction"), DerivationDescription in words,
  SourceImageSequence -> the current source instance, ReferencedStudySequence
  -> the prior study (its pseudonymous StudyInstanceUID on the processing side);
* signed 16-bit stored values with RescaleSlope/RescaleIntercept (modality
  value = stored * slope + intercept; slope chosen so that the largest
  magnitude uses +-32000, precision slope/2), WindowCenter 0 and a symmetric
  WindowWidth (2 x the 99.5th percentile of |value| inside the brain);
* the MR acquisition attributes of the subtracted sequence when its header is
  given (else the reference series'); BurnedInAnnotation NO.

SeriesDescription names the sequence and the prior (a date, or the interval in
days when the dates are shifted by de-identification) and says "NOT FOR
DIAGNOSIS" within the 64 characters of LO.
"""

from __future__ import annotations

import copy
import datetime as dt
from os import PathLike
from typing import Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from ..roles import ROLE_LABELS
from .codes import DERIVATION_SUBTRACTION, PURPOSE_SOURCE_IMAGE, AlgorithmInfo
from .seg import image_on_source_grid, new_uid, truncate_words
from .source_series import SourceSeries, as_source_series, inherit_lossy_compression

__all__ = ["build_subtraction_series", "subtraction_description", "encode_signed", "ROLE_WORDS",
           "STUDY_SOP_CLASS"]

#: Role spellings (the one table, :data:`..roles.ROLE_LABELS`; this name is kept for importers).
ROLE_WORDS = ROLE_LABELS
#: SOP Class UID written in ReferencedStudySequence items (PS3.3 C.7.2.1: the
#: Study Instance UID is the Referenced SOP Instance UID).
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
#: Largest stored magnitude (leaves headroom below 32767).
_STORED_MAX = 32000
#: MR Image module attributes copied from the subtracted sequence's header.
_MR_ATTRIBUTES = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName",
                  "RepetitionTime", "EchoTime", "InversionTime", "EchoTrainLength", "FlipAngle",
                  "MagneticFieldStrength", "ImagedNucleus", "NumberOfAverages")


def encode_signed(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Float values -> (int16 stored values, RescaleSlope) with intercept 0;
    ``stored * slope`` reproduces ``values`` within ``slope / 2``."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not np.isfinite(peak):
        raise ValueError("subtraction map holds non-finite values")
    slope = peak / _STORED_MAX if peak > 0 else 1.0
    # DS holds 16 characters: keep the slope exactly as written
    slope = float(f"{slope:.10g}")
    stored = np.clip(np.rint(values / slope), -32768, 32767).astype(np.int16)
    return stored, slope


def _ds(value: float) -> str:
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def subtraction_description(role: str, prior_words: str) -> str:
    """SeriesDescription (LO, <= 64 characters): the first of a few wordings
    that fits for every sequence name (so FLAIR and T1c series read alike)."""
    r = ROLE_WORDS.get(role, role)
    longest = max([len(w) for w in ROLE_WORDS.values()] + [len(r)])
    for pattern in ("BrainLine subtraction {r} (current - {p}) - not for primary diagnosis",
                    "BrainLine {r} subtraction vs {p} - NOT FOR DIAGNOSIS",
                    "BrainLine {r} subtraction vs {p} NOT FOR DIAGNOSIS",
                    "BrainLine {r} minus {p} NOT FOR DIAGNOSIS"):
        if len(pattern.format(r="x" * longest, p=prior_words)) <= 64:
            return pattern.format(r=r, p=prior_words)
    return truncate_words(f"BrainLine {r} minus {prior_words} NOT FOR DIAGNOSIS")


def build_subtraction_series(
    source_files: Sequence[str | PathLike] | SourceSeries,
    subtraction: sitk.Image,
    role: str,
    *,
    prior_words: str,
    prior_study_uid: str | None = None,
    brain_mask: sitk.Image | None = None,
    role_header: Dataset | None = None,
    prior_headers: Sequence[Dataset] = (),
    algorithm: AlgorithmInfo | None = None,
    uid_root: str | None = None,
    series_number: int = 310,
    manufacturer: str = "BrainLine",
    method_words: str = "",
) -> list[Dataset]:
    """One derived MR image per source instance (sorted along the slice normal,
    InstanceNumber 1..N) holding ``subtraction`` on that instance's plane.

    ``prior_words``: how the prior is named ("prior 2024-01-15" or "prior 91 days
    earlier"); ``prior_study_uid``: the prior's StudyInstanceUID for
    ReferencedStudySequence; ``brain_mask`` (optional, any grid) only sets the
    window; ``role_header``: a header of the subtracted sequence in the current
    study (MR acquisition attributes); ``prior_headers``: headers of the
    prior's images of that sequence (transfer syntax, LossyImageCompression),
    so a lossy-compressed prior marks the subtraction lossy too; ``method_words``: how the map was made
    (registration, intensity matching), for DerivationDescription.
    """
    algorithm = algorithm or AlgorithmInfo()
    series = as_source_series(source_files)
    values = image_on_source_grid(subtraction, series)
    stored, slope = encode_signed(values)
    inside = values
    if brain_mask is not None:
        mask = image_on_source_grid(brain_mask, series, interpolator=sitk.sitkNearestNeighbor) > 0.5
        if mask.any():
            inside = values[mask]
    nonzero = np.abs(inside[inside != 0])
    half = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
    half = max(half, slope)
    r = ROLE_WORDS.get(role, role)
    description = subtraction_description(role, prior_words)
    derivation = (f"{r} of this study minus {r} of the {prior_words}, registered and intensity-matched "
                  f"to this study by {algorithm.name} {algorithm.version}"
                  + (f" ({method_words})" if method_words else "") + "; not for primary diagnosis")[:1024]
    header = role_header if role_header is not None else series.first
    series_uid = new_uid(uid_root)
    now = dt.datetime.now()
    out: list[Dataset] = []
    template = _series_template(
        series.first, series_uid=series_uid, series_number=series_number, description=description,
        manufacturer=manufacturer, algorithm=algorithm, prior_study_uid=prior_study_uid, header=header,
        derivation=derivation,
        comments=f"BrainLine subtraction {r} (current - {prior_words}) - not for primary diagnosis",
        slope=slope, window_width=2.0 * half, uid_root=uid_root, now=now)
    for index, ds in enumerate(series.datasets, start=1):
        # per instance: identity, position and source reference (the rest is the series template)
        im = copy.deepcopy(template)
        im.SOPInstanceUID = new_uid(uid_root)
        im.file_meta.MediaStorageSOPInstanceUID = im.SOPInstanceUID
        im.InstanceNumber = index
        im.ImagePositionPatient = ds.ImagePositionPatient
        im.SliceThickness = ds.get("SliceThickness", "")
        if "SliceLocation" in ds:
            im.SliceLocation = ds.SliceLocation
        elif "SliceLocation" in im:
            del im.SliceLocation
        if ds.get("ImageLaterality"):   # General Image; an enhanced source has it per frame
            im.ImageLaterality = ds.ImageLaterality
        src = series.reference_item(index - 1)
        src.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PURPOSE_SOURCE_IMAGE)]
        im.SourceImageSequence = [src]
        # every image it was computed from: the current study's and the prior's
        inherit_lossy_compression(im, [ds, header, *prior_headers])
        im.PixelData = np.ascontiguousarray(stored[index - 1]).tobytes()
        out.append(im)
    return out


def _series_template(ds: Dataset, *, series_uid: str, series_number: int, description: str, manufacturer: str,
                     algorithm: AlgorithmInfo, prior_study_uid: str | None, header: Dataset, derivation: str,
                     comments: str, slope: float, window_width: float, uid_root: str | None,
                     now: dt.datetime) -> Dataset:
    """The attributes every image of one subtraction series shares, from the
    first source instance ``ds`` (patient, study, equipment, orientation,
    MR acquisition, pixel description, rescale and window)."""
    im = hd.SOPClass(
        study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=new_uid(uid_root), sop_class_uid=MRImageStorage,
        instance_number=1, modality="MR", manufacturer=manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian, series_description=description,
        manufacturer_model_name=algorithm.name, software_versions=list(algorithm.software_versions),
        device_serial_number=algorithm.device_serial_number,
    )
    im.copy_patient_and_study_information(ds)
    if "SpecificCharacterSet" in ds:
        im.SpecificCharacterSet = ds.SpecificCharacterSet
    # General Study: the compared prior study
    if prior_study_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = STUDY_SOP_CLASS
        ref.ReferencedSOPInstanceUID = prior_study_uid
        im.ReferencedStudySequence = [ref]
    # General Series (PatientPosition: type 2C for MR)
    if "BodyPartExamined" in ds:
        im.BodyPartExamined = ds.BodyPartExamined
    im.PatientPosition = ds.get("PatientPosition", "")
    # Frame of Reference + Image Plane (orientation and spacing; position per instance)
    im.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or new_uid(uid_root)
    im.PositionReferenceIndicator = ds.get("PositionReferenceIndicator", "")
    im.ImageOrientationPatient = ds.ImageOrientationPatient
    im.PixelSpacing = ds.PixelSpacing
    if "SpacingBetweenSlices" in ds:
        im.SpacingBetweenSlices = ds.SpacingBetweenSlices
    # General Image
    im.ImageType = ["DERIVED", "SECONDARY", "SUBTRACTION"]
    im.ContentDate, im.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    im.BurnedInAnnotation = "NO"
    im.LossyImageCompression = "00"
    im.ImageComments = comments
    im.DerivationDescription = derivation
    im.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(DERIVATION_SUBTRACTION)]
    # MR Image: acquisition attributes of the subtracted sequence (type 1/2 present)
    for keyword in _MR_ATTRIBUTES:
        if keyword in header:
            setattr(im, keyword, header.data_element(keyword).value)
    im.ScanningSequence = im.get("ScanningSequence") or "RM"
    im.SequenceVariant = im.get("SequenceVariant") or "NONE"
    for keyword in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime"):
        if keyword not in im:
            setattr(im, keyword, None)
    scanning = im.ScanningSequence if isinstance(im.ScanningSequence, (list, tuple)) else [im.ScanningSequence]
    if "IR" in [str(v) for v in scanning] and "InversionTime" not in im:
        im.InversionTime = None
    # Image Pixel + rescale (modality value = stored * slope) + VOI LUT
    im.SamplesPerPixel = 1
    im.PhotometricInterpretation = "MONOCHROME2"
    im.Rows, im.Columns = int(ds.Rows), int(ds.Columns)
    im.BitsAllocated, im.BitsStored, im.HighBit = 16, 16, 15
    im.PixelRepresentation = 1
    im.RescaleIntercept = "0"
    im.RescaleSlope = _ds(slope)
    im.RescaleType = "US"
    im.WindowCenter = "0"
    im.WindowWidth = _ds(window_width)
    im.WindowCenterWidthExplanation = "SUBTRACTION"
    return im
