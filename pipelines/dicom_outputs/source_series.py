"""The source series every result object is built on, read once.

Every DICOM result of a job (SEG, SR, overlay, PDF, RANO SR, and for a
follow-up the subtraction series, lesion SEG and change SR) lies on the
current study's reference series and references its instances one by one.
:func:`read_source_series` reads that series once and gives a
:class:`SourceSeries`: the instances sorted along the slice normal, their
headers, the regular grid they span (:class:`SeriesGrid`, LPS millimetres)
and, when asked, their pixel values. ``build_results`` makes one and hands it
to every builder; no builder reads the series again.

Geometry
--------
All coordinates are DICOM patient coordinates (LPS: +x left, +y posterior,
+z head), millimetres, as SimpleITK uses them. :attr:`SourceSeries.grid` is
the grid SimpleITK's ``ImageSeriesReader`` would build from the sorted files,
computed from the headers alone (the reader would decode every pixel again):

* origin: ImagePositionPatient of the first instance;
* direction: ImageOrientationPatient made orthonormal as GDCM does: slice
  axis n = unit(row x column), column = unit(column), row = unit(column x n)
  (ITK 5.4 keeps this orthogonal direction for a series);
* spacing: PixelSpacing's column then row spacing, and the distance from the
  first to the last position divided by (instances - 1).

An instance off that grid (uneven spacing, a gap) is resampled on its own
plane by :func:`.seg.labels_on_source_grid` and friends.

Enhanced (multi-frame) MR
-------------------------
A series sent as one Enhanced MR (or Legacy Converted Enhanced MR) instance
is read as its frames: each frame becomes one entry of
:attr:`SourceSeries.datasets`, a *frame view* (:func:`frame_view`): the
instance's attributes with that frame's functional groups (plane position and
orientation, pixel measures, rescale, window) written out as a single-frame
image has them. A frame view keeps the multi-frame instance's SOP Class and
Instance UID, so a reference to it must also name the frame:
:meth:`SourceSeries.reference_item` and :meth:`SourceSeries.frame_number` give
it, and :attr:`SourceSeries.instances` holds the instance itself (what a SEG
is built on and what an SR lists as evidence).

Pixels
------
``read_source_series(files, pixels=True)`` keeps each instance's pixel data
(one read per file; the overlay needs every slice). Without it the headers
alone are read, and :meth:`SourceSeries.pixel_array` reads one instance's
pixel data when a builder first asks for it (the PDF's key image needs one
slice) and keeps it.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from ..series_completeness import ORIENTATION_TOLERANCE  # the series selection accepted is read here
from .charset import declare_usable_character_set

__all__ = ["SeriesGrid", "SourceSeries", "read_source_series", "as_source_series", "inherit_lossy_compression",
           "frame_view"]




def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class SeriesGrid:
    """A regular 3-D grid in LPS millimetres, in SimpleITK's terms.

    size: (columns, rows, instances) = SimpleITK (x, y, z) voxels.
    origin: centre of the first voxel of the first instance (mm, LPS).
    spacing: (column spacing, row spacing, slice step) in mm.
    direction: 3 x 3 row-major, columns = row direction, column direction,
        slice direction (unit vectors in LPS); SimpleITK's ``GetDirection``.
    """

    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]

    def continuous_index(self, point_mm: Sequence[float]) -> np.ndarray:
        """(x, y, z) voxel coordinates of a physical point (mm, LPS)."""
        matrix = np.array(self.direction, dtype=float).reshape(3, 3) * np.array(self.spacing, dtype=float)
        return np.linalg.solve(matrix, np.asarray(point_mm, dtype=float) - np.array(self.origin, dtype=float))

    def resample(self, image: sitk.Image, interpolator: int, pixel_id: int) -> np.ndarray:
        """``image`` (any grid, LPS mm) resampled onto this grid with the
        identity transform, 0 outside it: array ``[z, y, x]``."""
        out = sitk.Resample(image, list(self.size), sitk.Transform(), interpolator, list(self.origin),
                            list(self.spacing), list(self.direction), 0.0, pixel_id)
        return sitk.GetArrayFromImage(out)

    def reference_image(self, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image with this geometry (allocates size voxels)."""
        image = sitk.Image([int(v) for v in self.size], pixel_id)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


#: Functional groups (PS3.3 C.7.6.16.2) a frame view writes out, and the
#: attributes of each that a single-frame image carries at its top level.
_FRAME_GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}
#: Attributes of a multi-frame instance a frame view leaves out.
_MULTI_FRAME_ONLY = {"NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
                     "DimensionOrganizationSequence", "DimensionIndexSequence", "PixelData", "FloatPixelData",
                     "DoubleFloatPixelData"}


def is_multi_frame(ds: Dataset) -> bool:
    """True for a functional-group multi-frame image (Enhanced / Legacy Converted Enhanced MR)."""
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) != 1


def frame_view(ds: Dataset, frame_number: int) -> Dataset:
    """Frame ``frame_number`` (1-based) of the multi-frame image ``ds`` as a
    single-frame image's header: every attribute of ``ds`` but the multi-frame
    ones (functional groups, dimensions, NumberOfFrames, pixel data), with the
    frame's functional groups (its per-frame item over the shared one) written
    out at the top level: ImagePositionPatient / ImageOrientationPatient (LPS,
    mm), PixelSpacing / SliceThickness (mm), rescale, window, and the frame
    laterality as ImageLaterality. The SOP Class
    and Instance UID stay those of ``ds``. Elements are shared with ``ds``, not
    copied: set new values on the view, do not change its elements in place.
    """
    view = Dataset()
    for element in ds:
        if element.keyword not in _MULTI_FRAME_ONLY:
            view.add(element)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    groups = [seq[0] for seq in (ds.get("SharedFunctionalGroupsSequence"),) if seq]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) >= frame_number:
        groups.append(per_frame[frame_number - 1])
    for group in groups:    # the per-frame item last: it overrides the shared one
        for sequence, keywords in _FRAME_GROUPS.items():
            items = group.get(sequence)
            if not items:
                continue
            for keyword in keywords:
                if keyword in items[0]:
                    view.add(items[0].data_element(keyword))
        anatomy = group.get("FrameAnatomySequence")
        if anatomy and anatomy[0].get("FrameLaterality"):   # the single-frame image's ImageLaterality
            view.ImageLaterality = anatomy[0].FrameLaterality
    return view


@dataclass(frozen=True, eq=False)
class SourceSeries:
    """The images of one series, one per slice, sorted along the slice normal
    (ascending position along ``normal``: the order of axis 0 of
    ``sitk.GetArrayFromImage`` of the grid).

    datasets: one per slice, in that order: the single-frame instances, or
        for a multi-frame series the frame views of its instance (see the
        module doc). Headers; with pixel data when read with ``pixels=True``
        (single-frame only: a multi-frame instance keeps its pixel data in
        :attr:`instances`).
    paths: the file of each dataset, same order (one file for every frame of
        a multi-frame instance).
    normal: unit slice normal (row cosines x column cosines), LPS.
    frames: for a multi-frame series, the frame number (1-based) of each
        dataset, same order; None for single-frame instances.
    multi_frame_instance: the multi-frame instance itself (None for single-frame).
    """

    datasets: list[Dataset]
    paths: list[Path]
    normal: np.ndarray
    frames: list[int] | None = None
    multi_frame_instance: Dataset | None = None
    _pixels: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def instances(self) -> list[Dataset]:
        """The DICOM instances of the series: the single-frame ones in slice
        order, or the one multi-frame instance (what a SEG is derived from and
        an SR lists as evidence)."""
        return self.datasets if self.multi_frame_instance is None else [self.multi_frame_instance]

    def frame_number(self, index: int) -> int | None:
        """Frame number (1-based) of slice ``index`` in its multi-frame instance; None for single-frame."""
        return None if self.frames is None else self.frames[index]

    def reference_item(self, index: int) -> Dataset:
        """An image SOP instance reference to slice ``index`` (ReferencedSOPClassUID,
        ReferencedSOPInstanceUID, and ReferencedFrameNumber for a frame of a
        multi-frame instance), e.g. for a derived image's SourceImageSequence."""
        ds, item = self.datasets[index], Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        frame = self.frame_number(index)
        if frame is not None:
            item.ReferencedFrameNumber = frame
        return item

    def seg_sources(self) -> list[Dataset]:
        """:attr:`instances` as highdicom's SEG needs them: with one shared
        image orientation. highdicom refuses single-frame images whose
        ImageOrientationPatient differs in any digit, and a multi-frame image
        whose PlaneOrientationSequence is per frame (as Philips writes it).
        Images that differ within :data:`ORIENTATION_TOLERANCE` (all that
        :func:`read_source_series` accepts) are given as copies carrying the
        first image's orientation; SOP Instance UIDs and positions are theirs."""
        if self.multi_frame_instance is not None:
            instance = self.multi_frame_instance
            shared = (instance.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
            if "PlaneOrientationSequence" in shared:
                return [instance]
            header = copy.deepcopy(Dataset({e.tag: e for e in instance if e.keyword != "PixelData"}))
            header.file_meta = instance.file_meta
            if "SharedFunctionalGroupsSequence" not in header:
                header.SharedFunctionalGroupsSequence = [Dataset()]
            orientation = None
            for item in header.PerFrameFunctionalGroupsSequence:
                orientation = orientation or item.get("PlaneOrientationSequence")
                if "PlaneOrientationSequence" in item:
                    del item.PlaneOrientationSequence
            header.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = orientation
            return [header]
        first = [float(v) for v in self.first.ImageOrientationPatient]
        if all([float(v) for v in ds.ImageOrientationPatient] == first for ds in self.datasets):
            return self.datasets
        out = []
        for ds in self.datasets:
            header = Dataset({e.tag: e for e in ds})    # elements shared, the orientation replaced
            if hasattr(ds, "file_meta"):
                header.file_meta = ds.file_meta
            header.ImageOrientationPatient = self.first.ImageOrientationPatient
            out.append(header)
        return out

    def in_frame_order(self, array: np.ndarray) -> np.ndarray:
        """``array`` (axis 0 in slice order) in the order of the instances'
        frames: slice order for single-frame instances, frame number order for
        a multi-frame one (what a SEG built on it stores frame by frame)."""
        if self.frames is None:
            return array
        out = np.empty_like(array)
        out[np.asarray(self.frames) - 1] = array
        return out

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(instances, rows, columns): the shape of every ``[instance, row, column]`` array."""
        return (len(self.datasets), int(self.first.Rows), int(self.first.Columns))

    def __len__(self) -> int:
        return len(self.datasets)

    @cached_property
    def grid(self) -> SeriesGrid | None:
        """The regular grid the instances span (see the module doc); None for
        a single instance or when every instance lies at the same position."""
        if len(self.datasets) < 2:
            return None
        first, last = self.datasets[0], self.datasets[-1]
        iop = np.array(first.ImageOrientationPatient, dtype=float)
        column = _unit(iop[3:])
        row = _unit(np.cross(column, self.normal))
        p0 = np.array(first.ImagePositionPatient, dtype=float)
        length = float(np.linalg.norm(np.array(last.ImagePositionPatient, dtype=float) - p0))
        if length < 1e-9:
            return None
        row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
        direction = np.column_stack([row, column, self.normal])
        return SeriesGrid(size=(int(first.Columns), int(first.Rows), len(self.datasets)),
                          origin=tuple(float(v) for v in p0),
                          spacing=(col_spacing, row_spacing, length / (len(self.datasets) - 1)),
                          direction=tuple(float(v) for v in direction.ravel()))

    @property
    def has_pixels(self) -> bool:
        """Whether the instances hold their pixel data (read with ``pixels=True``)."""
        return all("PixelData" in ds for ds in self.instances)

    def pixel_array(self, index: int) -> np.ndarray:
        """Stored pixel values of slice ``index`` (sorted order), ``[row,
        column]``; read from its file on first use when the dataset is a header
        (a multi-frame instance is decoded once, all frames)."""
        frame = self.frame_number(index)
        if frame is not None:
            return self._multi_frame_pixels()[frame - 1]
        ds = self.datasets[index]
        if "PixelData" in ds:
            return ds.pixel_array
        with self._lock:
            if index not in self._pixels:
                self._pixels[index] = pydicom.dcmread(self.paths[index]).pixel_array
            return self._pixels[index]

    def _multi_frame_pixels(self) -> np.ndarray:
        """Every frame of the multi-frame instance, ``[frame - 1, row, column]``."""
        with self._lock:
            if -1 not in self._pixels:
                instance = self.multi_frame_instance
                source = instance if instance is not None and "PixelData" in instance else \
                    pydicom.dcmread(self.paths[0])
                pixels = source.pixel_array
                self._pixels[-1] = pixels.reshape((-1,) + pixels.shape[-2:])
            return self._pixels[-1]

    def modality_image(self, index: int) -> np.ndarray:
        """Instance ``index`` in modality units (Modality LUT / rescale applied), float64 ``[row, column]``."""
        return apply_modality_lut(self.pixel_array(index), self.datasets[index]).astype(np.float64)

    def modality_volume(self) -> np.ndarray:
        """Every instance in modality units, float64 ``[instance, row, column]``."""
        return np.stack([self.modality_image(i) for i in range(len(self.datasets))])


def read_source_series(source_files: Sequence[str | PathLike], *, pixels: bool = False) -> SourceSeries:
    """Read the images of one series (each file once) and sort them along the
    slice normal: single-frame instances, or the frames of one multi-frame
    (Enhanced MR) instance. ``pixels``: keep the pixel data too.

    Raises ValueError (in words) for an empty list, mixed series, more than
    one multi-frame instance or one mixed with single-frame ones, missing
    geometry, mixed orientations or matrix sizes.
    """
    paths = [Path(p) for p in source_files]
    if not paths:
        raise ValueError("no source DICOM files given")
    instances = [pydicom.dcmread(p, stop_before_pixels=not pixels) for p in paths]
    for ds in instances:   # the results copy it with the patient's text: a spelling highdicom accepts
        declare_usable_character_set(ds)
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in instances}
    if len(series_uids) != 1:
        raise ValueError(f"source files belong to {len(series_uids)} series; expected exactly one")
    multi = [ds for ds in instances if is_multi_frame(ds)]
    frames: list[int] | None = None
    datasets = instances
    if multi:
        if len(instances) != 1:
            raise ValueError(f"the series has {len(multi)} multi-frame instance(s) among {len(instances)} "
                             "files; a multi-frame source series must be one instance")
        n_frames = int(multi[0].get("NumberOfFrames", 1) or 1)
        if len(multi[0].get("PerFrameFunctionalGroupsSequence") or []) != n_frames:
            raise ValueError(f"{paths[0].name}: multi-frame image without one functional group item per frame")
        frames = list(range(1, n_frames + 1))
        datasets = [frame_view(multi[0], f) for f in frames]
        paths = paths * n_frames
    for ds, path in zip(datasets, paths):
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            raise ValueError(f"{path.name}: source image has no image plane geometry (position/orientation/spacing)")
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    for ds, path in zip(datasets, paths):
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=float), iop, atol=ORIENTATION_TOLERANCE):
            raise ValueError(f"{path.name}: orientation differs from the rest of the series")
        if (ds.Rows, ds.Columns) != (datasets[0].Rows, datasets[0].Columns):
            raise ValueError(f"{path.name}: matrix size differs from the rest of the series")
    normal = _unit(np.cross(iop[:3], iop[3:]))
    order = sorted(range(len(datasets)),
                   key=lambda i: float(np.dot(np.array(datasets[i].ImagePositionPatient, dtype=float), normal)))
    return SourceSeries([datasets[i] for i in order], [paths[i] for i in order], normal,
                        frames=None if frames is None else [frames[i] for i in order],
                        multi_frame_instance=multi[0] if multi else None)


def as_source_series(source: SourceSeries | Sequence[str | PathLike]) -> SourceSeries:
    """``source`` when it is a :class:`SourceSeries`, else the series read from
    its files (headers only). For builders called with a list of files by
    callers that have no SourceSeries; ``build_results`` passes one."""
    return source if isinstance(source, SourceSeries) else read_source_series(source)


#: Transfer syntaxes whose encoding always loses information, with the PS3.3
#: C.7.6.1.1.5 method term (JPEG 2000, 1.2.840.10008.1.2.4.91, may be either: its
#: LossyImageCompression attribute decides).
LOSSY_SYNTAX_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",   # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",   # JPEG-LS Near-lossless
}
#: The attributes that say whether and how an image was lossy compressed
#: (with the transfer syntax of its file meta, all a derived image needs to
#: know of a source; read by followup_results for the prior's images).
LOSSY_ATTRIBUTES = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")
_LOSSY_DETAILS = LOSSY_ATTRIBUTES[1:]


def inherit_lossy_compression(target: Dataset, sources: Sequence[Dataset]) -> None:
    """Mark the derived image ``target`` as lossy compressed when one of the
    images it was made from was (PS3.3 C.7.6.1.1.5: once an image has been
    lossy compressed, images derived from it say so): its LossyImageCompression
    is "01", or it was stored in a lossy transfer syntax. Copies that source's
    ratio and method where it gives them (the method of the transfer syntax
    otherwise). ``target`` is left as it is when no source was lossy."""
    for src in sources:
        syntax = str(getattr(getattr(src, "file_meta", None), "TransferSyntaxUID", "") or "")
        if str(src.get("LossyImageCompression", "")) != "01" and syntax not in LOSSY_SYNTAX_METHODS:
            continue
        target.LossyImageCompression = "01"
        for keyword in _LOSSY_DETAILS:
            if keyword in src:
                setattr(target, keyword, src.data_element(keyword).value)
            elif keyword in target:
                delattr(target, keyword)
        if "LossyImageCompressionMethod" not in target and syntax in LOSSY_SYNTAX_METHODS:
            target.LossyImageCompressionMethod = LOSSY_SYNTAX_METHODS[syntax]
        return
