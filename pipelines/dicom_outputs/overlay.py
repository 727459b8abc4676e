"""Overlay series: the reference sequence with coloured segmentation outlines burned in.

For viewers and PACS that cannot display DICOM SEG. One RGB Secondary Capture
image (highdicom ``SCImage``) per source instance, same matrix, in the same
study, with:

* ImageType DERIVED\\SECONDARY, SeriesDescription "BrainLine overlay - NOT FOR
  PRIMARY DIAGNOSIS", DerivationDescription/DerivationCodeSequence;
* SourceImageSequence referencing the MR instance it was rendered from;
* the source geometry (Frame of Reference and Image Plane modules, both allowed
  in the SC Image IOD), so viewers can scroll, link and cross-reference it with
  the MR series;
* PatientOrientation written by :func:`patient_orientation` with as many
  letters per value as the plane needs (PS3.3 C.7.6.1.1.1): one for a plane
  along the patient axes, up to three for a doubly oblique one ("RHP");
* BurnedInAnnotation "NO" by default: only coloured outlines are burned in, no
  text that identifies the patient (PS3.3 C.7.6.1.1.9); pass
  ``burned_in_annotation="YES"`` to override.

Colours come from :data:`.codes.LABELS`; the grey scale uses the source
window (WindowCenter/WindowWidth) when present, else the 0.5-99.5 percentile
of non-zero voxels of the series.
"""

from __future__ import annotations

from os import PathLike
from typing import Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from .codes import DERIVATION_SEGMENTATION, LABELS, PURPOSE_SOURCE_IMAGE, AlgorithmInfo
from .seg import labels_on_source_grid, new_uid
from .source_series import SourceSeries, as_source_series, inherit_lossy_compression

__all__ = ["build_overlay_series", "render_overlay", "outline", "patient_orientation", "window_of",
           "DRAW_ORDER", "DEFAULT_SERIES_DESCRIPTION"]

DEFAULT_SERIES_DESCRIPTION = "BrainLine overlay - NOT FOR PRIMARY DIAGNOSIS"
#: Outer regions first so inner outlines stay visible.
DRAW_ORDER = (2, 1, 3)
_CROSS = ndimage.generate_binary_structure(2, 1)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Inner boundary pixels of a 2-D mask (4-connected), ``width`` pixels thick."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, structure=_CROSS, iterations=max(1, int(width)), border_value=0)
    return mask & ~inner


def window_of(series: SourceSeries, volume: np.ndarray) -> tuple[float, float]:
    """(low, high) display range in modality units."""
    ds = series.first
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        center, width = float(center), float(width)
        if width > 0:
            return center - width / 2.0, center + width / 2.0
    sample = volume[volume != 0]
    if sample.size == 0:
        sample = volume.ravel()
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1.0))


def render_overlay(gray: np.ndarray, labels2d: np.ndarray, low: float, high: float, width: int = 1) -> np.ndarray:
    """RGB uint8 image: ``gray`` windowed to [low, high] with label outlines in their colours."""
    scaled = np.clip((gray.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    g = np.rint(scaled * 255.0).astype(np.uint8)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    for value in DRAW_ORDER:
        edge = outline(labels2d == value, width)
        if edge.any():
            rgb[edge] = LABELS[value].rgb
    return rgb


def patient_orientation(iop: Sequence[float], tolerance: float = 1e-3) -> tuple[str, str]:
    """PatientOrientation (0020,0020) of an image plane, PS3.3 C.7.6.1.1.1.

    ``iop`` is ImageOrientationPatient: the row then the column direction
    cosines in LPS. Each returned value names the patient direction of
    increasing column index (first value) and of increasing row index
    (second): one letter per patient axis whose cosine exceeds ``tolerance``
    in magnitude, principal (largest) direction first, so an axial plane tilted
    16 degrees about the left-right axis gives ``("L", "PH")``, and a doubly
    oblique one three letters (``"RHP"``): legal DICOM, one to three letters
    from L/R, A/P, H/F.
    """
    def letters(vec: np.ndarray) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        out = ""
        for axis in np.argsort(-np.abs(vec), kind="stable"):
            if abs(vec[axis]) > tolerance:
                out += names[axis][0] if vec[axis] > 0 else names[axis][1]
        if not out:
            raise ValueError(f"ImageOrientationPatient {list(iop)} has a zero direction vector")
        return out
    v = np.asarray(iop, dtype=float)
    if v.shape != (6,):
        raise ValueError(f"ImageOrientationPatient must hold 6 values, not {v.size}")
    return letters(v[:3]), letters(v[3:])


def build_overlay_series(
    source_files: Sequence[str | PathLike] | SourceSeries,
    labels: sitk.Image,
    *,
    algorithm: AlgorithmInfo | None = None,
    uid_root: str | None = None,
    series_number: int = 302,
    manufacturer: str = "BrainLine",
    series_description: str = DEFAULT_SERIES_DESCRIPTION,
    line_width: int = 1,
    burned_in_annotation: str = "NO",
) -> list[Dataset]:
    """One RGB Secondary Capture per source instance (sorted along the slice
    normal, InstanceNumber 1..N) with the label outlines burned in."""
    algorithm = algorithm or AlgorithmInfo()
    series = as_source_series(source_files)
    frames = labels_on_source_grid(labels, series)
    volume = series.modality_volume()
    low, high = window_of(series, volume)
    series_uid = new_uid(uid_root)
    description = (f"Outlines of the {algorithm.name} {algorithm.version} tumour segmentation "
                   f"({algorithm.model_label}) burned into the source image; not for primary diagnosis")[:1024]
    out: list[Dataset] = []
    for index, (ds, gray, lab) in enumerate(zip(series.datasets, volume, frames), start=1):
        rgb = render_overlay(gray, lab, low, high, line_width)
        orientation = patient_orientation(ds.ImageOrientationPatient)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=new_uid(uid_root),
            instance_number=index,
            manufacturer=manufacturer,
            pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
            # highdicom validates each value against a one-letter enum
            # (PatientOrientationValuesBiped), which rejects the multi-letter
            # values oblique planes need: give it the principal letters and
            # write the full values below.
            patient_orientation=(orientation[0][0], orientation[1][0]),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description,
            manufacturer_model_name=algorithm.name,
            software_versions=list(algorithm.software_versions),
            device_serial_number=algorithm.device_serial_number,
        )
        sc.PatientOrientation = list(orientation)  # PS3.3 C.7.6.1.1.1, oblique-safe
        if "SpecificCharacterSet" in ds and "SpecificCharacterSet" not in sc:
            sc.SpecificCharacterSet = ds.SpecificCharacterSet
        # General Image
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = burned_in_annotation
        inherit_lossy_compression(sc, [ds])
        sc.DerivationDescription = description
        sc.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(DERIVATION_SEGMENTATION)]
        src = series.reference_item(index - 1)
        src.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PURPOSE_SOURCE_IMAGE)]
        sc.SourceImageSequence = [src]
        # SC Equipment: rendered on a workstation by BrainLine
        sc.ConversionType = "WSD"
        sc.SecondaryCaptureDeviceManufacturer = manufacturer
        sc.SecondaryCaptureDeviceManufacturerModelName = algorithm.name
        sc.SecondaryCaptureDeviceSoftwareVersions = list(algorithm.software_versions)
        # Frame of Reference + Image Plane (source geometry)
        if "FrameOfReferenceUID" in ds:
            sc.FrameOfReferenceUID = ds.FrameOfReferenceUID
            sc.PositionReferenceIndicator = ds.get("PositionReferenceIndicator", "")
        sc.ImagePositionPatient = ds.ImagePositionPatient
        sc.ImageOrientationPatient = ds.ImageOrientationPatient
        sc.SliceThickness = ds.get("SliceThickness", "")
        if "SliceLocation" in ds:
            sc.SliceLocation = ds.SliceLocation
        if "BodyPartExamined" in ds:
            sc.BodyPartExamined = ds.BodyPartExamined
        if ds.get("ImageLaterality"):   # General Image; an enhanced source has it per frame
            sc.ImageLaterality = ds.ImageLaterality
        out.append(sc)
    return out
