"""DICOM SEG of the new and growing lesions of a follow-up, on the current reference series.

Input: ``W/longitudinal/lesions.nii.gz`` (uint16, value = lesion id, 0 =
background, on the current reference grid; physical space LPS, mm) and the
``lesions`` list of ``W/longitudinal.json``. One BINARY segment per lesion
present on the source grid, numbered 1..N in lesion-id order:

* Segment Label ``New lesion <id>`` / ``Growing lesion <id>``;
* category (49755003, SCT, "Morphologically abnormal structure"), type
  (52988006, SCT, "Lesion") with the modifier (129721008, SCT, "New finding")
  or (15454001, SCT, "Increase in size"); anatomic region Brain;
* tracking identifier ``BrainLine new lesion <id>`` and a new tracking UID
  (the change SR's lesion groups reference the segment and reuse both);
* display colour magenta (new) or cyan (growing).

No lesion on the grid -> no SEG (``None``); the change SR says so in words.
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from .codes import BRAIN, CATEGORY_ABNORMAL, LESION, AlgorithmInfo, lesion_kind
from .seg import (
    _on_source_grid,
    algorithm_identification,
    binary_segmentation,
    new_uid,
    truncate_words,
)
from .source_series import SourceSeries, as_source_series

__all__ = ["build_lesion_seg", "lesions_on_source_grid", "lesion_segment_numbers", "lesion_label"]


def lesion_label(lesion: Mapping[str, Any]) -> str:
    """``New lesion 3`` / ``Growing lesion 4`` (SEG Segment Label, SR words)."""
    return f"{lesion_kind(lesion['kind']).segment_label} {int(lesion['id'])}"


def lesions_on_source_grid(lesion_map: sitk.Image, source: SourceSeries | Sequence[str | PathLike]) -> np.ndarray:
    """Lesion-id map resampled nearest-neighbour onto the source series: uint16
    array ``[instance, row, column]`` in :func:`.seg.read_source_series` order."""
    if lesion_map.GetDimension() != 3 or lesion_map.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("the lesion map must be a 3-D scalar label image")
    image = sitk.Cast(lesion_map, sitk.sitkUInt16)
    return _on_source_grid(image, as_source_series(source), sitk.sitkNearestNeighbor, sitk.sitkUInt16, np.uint16)


def lesion_segment_numbers(seg: Dataset) -> dict[int, int]:
    """Lesion id -> SEG segment number, from the tracking identifiers of :func:`build_lesion_seg`."""
    out: dict[int, int] = {}
    for item in seg.SegmentSequence:
        words = str(item.get("TrackingID", "")).split()
        if words and words[-1].isdigit():
            out[int(words[-1])] = int(item.SegmentNumber)
    return out


def build_lesion_seg(
    source_files: Sequence[str | PathLike] | SourceSeries,
    lesion_map: sitk.Image,
    lesions: Sequence[Mapping[str, Any]],
    algorithm: AlgorithmInfo,
    *,
    uid_root: str | None = None,
    series_number: int = 311,
    instance_number: int = 1,
    manufacturer: str = "BrainLine",
    series_description: str = "BrainLine new and growing lesions",
) -> hd.seg.Segmentation | None:
    """BINARY SEG with one segment per lesion of ``lesions`` present on the
    source grid (see the module doc); None when none is."""
    series = as_source_series(source_files)
    frames = lesions_on_source_grid(lesion_map, series)
    algo_id = algorithm_identification(algorithm, manufacturer)
    descriptions, masks = [], []
    for lesion in sorted(lesions, key=lambda x: int(x["id"])):
        mask = frames == int(lesion["id"])
        if not mask.any():
            continue
        kind = lesion_kind(lesion["kind"])
        number = len(descriptions) + 1
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=lesion_label(lesion),
            segmented_property_category=CATEGORY_ABNORMAL,
            segmented_property_type=LESION,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo_id,
            tracking_uid=new_uid(uid_root),
            tracking_id=f"BrainLine {kind.key} lesion {int(lesion['id'])}",
            anatomic_regions=[BRAIN],
            display_color=kind.cielab,
        )
        modifier = hd.sr.CodedConcept.from_code(kind.modifier)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
        masks.append(mask)
    if not descriptions:
        return None
    return binary_segmentation(
        series, masks, descriptions, algorithm, uid_root=uid_root, series_number=series_number,
        instance_number=instance_number, manufacturer=manufacturer,
        content_description=truncate_words(f"{algorithm.name} {algorithm.version} new and growing lesions"),
        content_label="BL_LESIONS", series_description=series_description)
