"""DICOM result objects of a BrainLine job: SEG, TID 1500 SR, overlay series, PDF report.

All builders take the reference series (pseudonymized in production) as a
:class:`SourceSeries` (:mod:`.source_series`: read once, sorted along the slice
normal, grid in LPS mm; a list of its files is still accepted) and copy
patient/study attributes from it; the gateway
re-identifies the objects afterwards by swapping UIDs and patient attributes.
New UIDs are UUID-derived (``2.25.…``) unless ``uid_root`` is given.

==========================  ===================================================
:func:`build_seg`           BINARY Segmentation, one segment per label present
:func:`read_seg_labels`     SEG -> label map on the source grid
:func:`build_sr`            Comprehensive 3D SR, TID 1500 volumes + QC
:func:`build_rano_sr`       Comprehensive 3D SR, TID 1500 RANO-style bidimensional
                            measurements (SCOORD polylines, rehydrated by OHIF)
:func:`build_overlay_series`  RGB Secondary Capture per slice, outlines burned in
:func:`build_pdf_report`    PDF bytes (reportlab + matplotlib)
:func:`build_encapsulated_pdf`  Encapsulated PDF Storage instance
==========================  ===================================================

Coded concepts, colours and the :class:`AlgorithmInfo` / :class:`QCFinding`
records are in :mod:`.codes`. Pure processing: no network, no database.
"""

from .codes import COMPOSITES, LABELS, QC_CHECKS, QC_VALUES, AlgorithmInfo, QCFinding
from .overlay import build_overlay_series
from .pdf_report import (
    EncapsulatedPDF,
    KeyImage,
    ReportContent,
    build_encapsulated_pdf,
    build_pdf_report,
    key_image_from_series,
    select_key_slice,
)
from .seg import (
    EmptySegmentationError,
    build_seg,
    labels_on_source_grid,
    new_uid,
    read_seg_labels,
    segment_label_values,
)
from .source_series import SeriesGrid, SourceSeries, as_source_series, read_source_series
from .sr import bidimensional_measurements, build_rano_sr, build_sr, volume_summary

__all__ = [
    "AlgorithmInfo", "QCFinding", "LABELS", "COMPOSITES", "QC_CHECKS", "QC_VALUES",
    "EmptySegmentationError", "SourceSeries", "SeriesGrid", "read_source_series", "as_source_series",
    "labels_on_source_grid",
    "new_uid", "build_seg", "read_seg_labels", "segment_label_values",
    "build_sr", "build_rano_sr", "bidimensional_measurements", "volume_summary",
    "build_overlay_series",
    "ReportContent", "KeyImage", "EncapsulatedPDF", "build_pdf_report", "build_encapsulated_pdf",
    "key_image_from_series", "select_key_slice",
]
