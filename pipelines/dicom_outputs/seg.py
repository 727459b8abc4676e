"""DICOM Segmentation (SEG) of the tumour label map, built with highdicom.

The label map comes from the NIfTI world (dcm2niix + SimpleITK), the SEG lives
in the DICOM world: its frames must lie on the grid of the referenced source
series and reference its instances one by one (OHIF and most PACS viewers need
both ReferencedSeriesSequence and per-frame source images to overlay it).

:func:`labels_on_source_grid` bridges the two: it reads the source series with
SimpleITK's ImageSeriesReader, resamples the label map nearest-neighbour onto
that geometry and matches every slice to its source instance by position
(instances not on a regular grid are resampled one by one onto their own
plane). :func:`build_seg` then writes one BINARY segment per label present.
:func:`read_seg_labels` reads a SEG back into a label map on the source grid.

The source series is a :class:`.source_series.SourceSeries`, read once by
the caller (``build_results``) and handed to every builder; its grid comes
from the headers (:attr:`.source_series.SourceSeries.grid`). Builders still
accept a list of files (they then read the series themselves).

Also home to the helpers the other output builders share: minting UIDs
(:func:`new_uid`) and resampling onto the source grid.
"""

from __future__ import annotations

from os import PathLike
from typing import Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .codes import BRAIN, LABELS, AlgorithmInfo, label_concept
from .source_series import SourceSeries, as_source_series, read_source_series

__all__ = [
    "EmptySegmentationError", "SourceSeries", "new_uid", "read_source_series", "as_source_series",
    "labels_on_source_grid", "image_on_source_grid", "build_seg", "read_seg_labels", "segment_label_values",
    "algorithm_identification", "truncate_words", "content_description", "CONTENT_CREATOR_NAME",
]

#: Tolerance (in voxels) when matching an instance position to a grid slice.
_GRID_TOLERANCE = 1e-3


class EmptySegmentationError(ValueError):
    """The label map has no tumour voxels on the source grid: a SEG needs at least one segment."""


# ------------------------------------------------------------------------- UIDs


def new_uid(uid_root: str | None = None) -> str:
    """A new UID: UUID-derived ``2.25.…`` by default, else random under ``uid_root``."""
    if not uid_root:
        return str(generate_uid(prefix=None))
    prefix = uid_root if uid_root.endswith(".") else uid_root + "."
    return str(generate_uid(prefix=prefix))


# ---------------------------------------------------------------- label resampling


def _check_labels(labels: sitk.Image) -> sitk.Image:
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("labels must be a 3-D scalar label image")
    arr = sitk.GetArrayViewFromImage(labels)
    values = np.unique(arr)
    bad = [v for v in values.tolist() if v != 0 and v not in LABELS]
    if bad:
        raise ValueError(f"label map holds values {bad} that are not BraTS 2023 labels {sorted(LABELS)}")
    if labels.GetPixelID() != sitk.sitkUInt8:
        labels = sitk.Cast(labels, sitk.sitkUInt8)
    return labels


def _instance_plane(ds: Dataset) -> sitk.Image:
    """A one-slice reference image with the geometry of one source instance."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ref = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkUInt8)
    ref.SetOrigin([float(v) for v in ds.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    ref.SetSpacing((col_spacing, row_spacing, 1.0))
    ref.SetDirection(np.column_stack([row_dir, col_dir, normal]).ravel().tolist())
    return ref


def _resample(image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkNearestNeighbor,
              pixel_id: int = sitk.sitkUInt8) -> np.ndarray:
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, 0, pixel_id)
    return sitk.GetArrayFromImage(out)


def _on_source_grid(image: sitk.Image, series: SourceSeries, interpolator: int, pixel_id: int,
                    dtype: type) -> np.ndarray:
    """``image`` resampled onto every instance of ``series``: array ``[instance, row, column]``.

    The image is resampled once onto the series grid (:attr:`SourceSeries.grid`,
    from the headers; no file is read); each instance is matched to a slice of
    that grid by its ImagePositionPatient. Instances off the regular grid
    (uneven spacing, gaps) are resampled on their own plane, so every frame is
    exactly on its source instance.
    """
    n, rows, cols = series.shape
    out = np.zeros((n, rows, cols), dtype=dtype)
    grid = series.grid
    volume = grid.resample(image, interpolator, pixel_id) if grid is not None else None

    for i, ds in enumerate(series.datasets):
        k = None
        if volume is not None:
            ci = grid.continuous_index([float(v) for v in ds.ImagePositionPatient])
            kr = int(round(ci[2]))
            if (abs(ci[0]) < _GRID_TOLERANCE and abs(ci[1]) < _GRID_TOLERANCE
                    and abs(ci[2] - kr) < _GRID_TOLERANCE and 0 <= kr < volume.shape[0]):
                k = kr
        out[i] = volume[k] if k is not None else _resample(image, _instance_plane(ds), interpolator, pixel_id)[0]
    return out


def labels_on_source_grid(labels: sitk.Image, source: SourceSeries | Sequence[str | PathLike]) -> np.ndarray:
    """Label map resampled (nearest neighbour) onto the source series: uint8 array
    ``[instance, row, column]`` in the sorted order of :func:`read_source_series`
    (see :func:`_on_source_grid` for how instances are matched)."""
    return _on_source_grid(_check_labels(labels), as_source_series(source), sitk.sitkNearestNeighbor,
                           sitk.sitkUInt8, np.uint8)


def image_on_source_grid(image: sitk.Image, source: SourceSeries | Sequence[str | PathLike], *,
                         interpolator: int = sitk.sitkLinear) -> np.ndarray:
    """A scalar image (any units; physical space LPS, mm) resampled onto the
    source series: float32 array ``[instance, row, column]``, 0 outside the
    image, same instance order and matching as :func:`labels_on_source_grid`."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("image must be a 3-D scalar image")
    image = sitk.Cast(image, sitk.sitkFloat32)
    return _on_source_grid(image, as_source_series(source), interpolator, sitk.sitkFloat32, np.float32)


# -------------------------------------------------------------------------- SEG

#: Content Creator's Name (0070,0084), type 2: written present and empty. The
#: content is made by software, not by a person; a name here would read as a
#: human author in viewers ("created by") and in PACS audit views. The software
#: is identified by Manufacturer, Manufacturer's Model Name, Software Versions,
#: Device Serial Number and the Segmentation Algorithm Identification.
CONTENT_CREATOR_NAME = ""


def truncate_words(text: str, limit: int = 64) -> str:
    """``text`` (whitespace normalised) cut to at most ``limit`` characters at a
    word boundary; an unmatched opening bracket left at the end is dropped."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit + 1]
    cut = cut[:cut.rfind(" ")] if " " in cut else text[:limit]
    cut = cut.rstrip(" ,;:-")
    if cut.count("(") > cut.count(")"):
        cut = cut[:cut.rfind("(")].rstrip(" ,;:-")
    return cut or text[:limit]


def content_description(algorithm: AlgorithmInfo) -> str:
    """Content Description (LO, 64): application, version and model, shortened
    at word boundaries (never mid-word) when the model label is long."""
    for text in (f"{algorithm.name} {algorithm.version} tumor segmentation ({algorithm.model_label})",
                 f"{algorithm.name} {algorithm.version} tumor segmentation, {algorithm.model_label}",
                 f"{algorithm.name} {algorithm.version}: {algorithm.model_label}"):
        if len(text) <= 64:
            return text
    return truncate_words(f"{algorithm.name} {algorithm.version}: {algorithm.model_label}")


def algorithm_identification(algorithm: AlgorithmInfo, manufacturer: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=algorithm.algorithm_family,
        version=algorithm.version,
        source=manufacturer,
        parameters=algorithm.algorithm_parameters(),
    )


def build_seg(
    source_files: Sequence[str | PathLike] | SourceSeries,
    labels: sitk.Image,
    algorithm: AlgorithmInfo,
    *,
    uid_root: str | None = None,
    series_number: int = 300,
    instance_number: int = 1,
    manufacturer: str = "BrainLine",
    series_description: str = "BrainLine tumor segmentation",
    content_label: str = "BRAINLINE_TUMOR",
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """BINARY DICOM SEG with one segment per label present, on the source grid.

    Segments are numbered 1..N in label order (so label 3 is segment 2 when
    label 1 is absent); :func:`segment_label_values` maps them back. Patient
    and study attributes are copied from the source by highdicom. Raises
    :class:`EmptySegmentationError` when no label is present.
    """
    series = as_source_series(source_files)
    frames = labels_on_source_grid(labels, series)
    present = [v for v in sorted(LABELS) if np.any(frames == v)]
    if not present:
        raise EmptySegmentationError(
            f"no tumour labels on the grid of series {series.series_instance_uid}; no SEG written")
    algo_id = algorithm_identification(algorithm, manufacturer)
    descriptions = []
    for number, value in enumerate(present, start=1):
        concept = label_concept(value)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=concept.segment_label,
            segmented_property_category=concept.category,
            segmented_property_type=concept.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo_id,
            tracking_uid=new_uid(uid_root),
            tracking_id=f"BrainLine {concept.key}",
            anatomic_regions=[BRAIN],
            display_color=concept.cielab,
        ))
    return binary_segmentation(
        series, [frames == v for v in present], descriptions, algorithm, uid_root=uid_root,
        series_number=series_number, instance_number=instance_number, manufacturer=manufacturer,
        content_description=content_description(algorithm), content_label=content_label,
        series_description=series_description, omit_empty_frames=omit_empty_frames)


def binary_segmentation(series: SourceSeries, masks: Sequence[np.ndarray],
                        descriptions: Sequence[hd.seg.SegmentDescription], algorithm: AlgorithmInfo, *,
                        uid_root: str | None, series_number: int, instance_number: int, manufacturer: str,
                        content_description: str, content_label: str, series_description: str,
                        omit_empty_frames: bool = True) -> hd.seg.Segmentation:
    """A BINARY highdicom SEG on ``series``: one mask ``[instance, row,
    column]`` per segment description, new UIDs, the algorithm as device."""
    seg = hd.seg.Segmentation(
        source_images=series.seg_sources(),   # one multi-frame instance: frames in its frame order
        pixel_array=series.in_frame_order(np.stack(list(masks), axis=-1).astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=list(descriptions),
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=list(algorithm.software_versions),
        device_serial_number=algorithm.device_serial_number,
        content_description=content_description,
        content_label=content_label,
        series_description=series_description,
        omit_empty_frames=omit_empty_frames,
    )
    if "ContentCreatorName" not in seg:  # highdicom omits this type 2 attribute when not given
        seg.ContentCreatorName = CONTENT_CREATOR_NAME
    return seg


def segment_label_values(seg: Dataset) -> dict[int, int]:
    """SEG segment number -> BraTS label value, by segmented property type (then label)."""
    mapping: dict[int, int] = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        ptype = item.SegmentedPropertyTypeCodeSequence[0]
        for concept in LABELS.values():
            if (ptype.CodeValue, ptype.CodingSchemeDesignator) == (
                    concept.property_type.value, concept.property_type.scheme_designator):
                mapping[number] = concept.value
                break
        else:
            for concept in LABELS.values():
                if str(item.get("SegmentLabel", "")).lower() == concept.segment_label.lower():
                    mapping[number] = concept.value
                    break
            else:
                raise ValueError(f"SEG segment {number} ({item.get('SegmentLabel', '?')}) is not a BrainLine label")
    return mapping


def read_seg_labels(
    seg_path: str | PathLike | hd.seg.Segmentation,
    source_files: Sequence[str | PathLike] | SourceSeries,
) -> np.ndarray:
    """Read a BrainLine SEG back into a uint8 label map ``[instance, row, column]``
    on the source grid (same order as :func:`labels_on_source_grid`)."""
    seg = seg_path if isinstance(seg_path, hd.seg.Segmentation) else hd.seg.segread(seg_path)
    series = as_source_series(source_files)
    mapping = segment_label_values(seg)
    numbers = sorted(mapping)
    common = dict(segment_numbers=numbers, combine_segments=False, assert_missing_frames_are_empty=True)
    if series.frames is None:
        masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_instance_uids, **common)
    else:   # the frames of one multi-frame instance, in slice order
        masks = seg.get_pixels_by_source_frame(source_sop_instance_uid=str(series.first.SOPInstanceUID),
                                               source_frame_numbers=series.frames, **common)
    out = np.zeros(series.shape, dtype=np.uint8)
    for index, number in enumerate(numbers):
        out[masks[..., index] > 0] = mapping[number]
    return out
