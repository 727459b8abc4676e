"""Build a synthetic-but-realistic DICOM MR study from the NIfTI volumes of a case.

Used by tests and benchmarks. Each role (t1, t1c, t2, flair) becomes one series of
single-frame MR Image Storage instances (one per axial slice), Explicit VR Little
Endian, with scanner-like acquisition headers (for rule-based series selection)
and deliberately identifying patient/study data (for de-identification tests).

Coordinate frames
-----------------
NIfTI affines map voxel indices (i, j, k) to millimetres in RAS+ (x grows towards
the patient's Right, y towards Anterior, z towards Superior).
DICOM patient coordinates are LPS+ (x to the Left, y to Posterior, z to
Superior). The conversion is ``A_lps = diag(-1, -1, 1, 1) @ A_ras``.

Each NIfTI slice k becomes one DICOM image whose columns follow voxel axis i and
whose rows follow voxel axis j, i.e. ``pixels[row, col] = volume[col, row, k]``.
Hence (all in LPS, mm):

* ImageOrientationPatient = unit(A_lps[:3, 0]) (row direction, along columns)
  followed by unit(A_lps[:3, 1]) (column direction, along rows);
* ImagePositionPatient of slice k = A_lps @ (0, 0, k, 1);
* PixelSpacing = (|A[:3, 1]|, |A[:3, 0]|) -- *row* spacing first, then column.

This is exactly how ITK/SimpleITK loads both the NIfTI and the DICOM series, so the
round trip gives identical voxels, spacing, origin and direction as long as the
voxel axes (i, j, k) form a right-handed frame in LPS (true for the shipped data).

CLI: ``python -m tests.dicom_factory CASE_DIR OUT_DIR [--slice-step N]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid

ROLES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")

#: File stems tried per role, in order (TCGA/BrainLes names, then BraTS 2023 names).
ROLE_FILE_STEMS: dict[str, tuple[str, ...]] = {
    "t1": ("t1", "t1n"),
    "t1c": ("t1c", "t1ce", "t1gd"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f"),
}

#: Scanner-like acquisition headers per role. Times in ms, flip angle in degrees.
ROLE_PROTOCOLS: dict[str, dict] = {
    "t1": dict(
        SeriesNumber=3, SeriesDescription="AX T1 3D PRE", ProtocolName="AX T1 MPRAGE",
        SequenceName="*tfl3d1", MRAcquisitionType="3D",
        ScanningSequence=["GR", "IR"], SequenceVariant=["SP", "MP"], ScanOptions="",
        RepetitionTime=2000, EchoTime=3.0, InversionTime=900, FlipAngle=9,
        EchoTrainLength=1, minutes_after_start=2,
    ),
    "t2": dict(
        SeriesNumber=4, SeriesDescription="AX T2 FSE", ProtocolName="AX T2 FSE",
        SequenceName="*tse2d1", MRAcquisitionType="2D",
        ScanningSequence="SE", SequenceVariant="SK", ScanOptions="",
        RepetitionTime=5000, EchoTime=100, InversionTime=None, FlipAngle=90,
        EchoTrainLength=16, minutes_after_start=8,
    ),
    "flair": dict(
        SeriesNumber=5, SeriesDescription="AX T2 FLAIR 3D", ProtocolName="AX T2 FLAIR CUBE",
        SequenceName="*spcir3d1", MRAcquisitionType="3D",
        ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP", "MP"], ScanOptions="",
        RepetitionTime=8000, EchoTime=120, InversionTime=2500, FlipAngle=90,
        EchoTrainLength=180, minutes_after_start=12,
    ),
    "t1c": dict(
        SeriesNumber=8, SeriesDescription="AX T1 3D POST GAD", ProtocolName="AX T1 MPRAGE",
        SequenceName="*tfl3d1", MRAcquisitionType="3D",
        ScanningSequence=["GR", "IR"], SequenceVariant=["SP", "MP"], ScanOptions="",
        RepetitionTime=2000, EchoTime=3.0, InversionTime=900, FlipAngle=9,
        EchoTrainLength=1, minutes_after_start=20,
        ContrastBolusAgent="GADOBUTROL", ContrastBolusVolume=7.5,
    ),
}

PRIVATE_GROUP = 0x0029
PRIVATE_CREATOR = "ACME 1.0"
STUDY_TIME = "101500"


@dataclass
class SeriesInfo:
    """One written series: its UID, SeriesDescription, instance count and folder."""

    series_uid: str
    description: str
    n_instances: int
    dir: Path
    paths: list[Path] = field(default_factory=list)


@dataclass
class StudyInfo:
    """A written study. ``series`` maps role -> SeriesInfo; ``paths`` lists every file."""

    study_uid: str
    series: dict[str, SeriesInfo]
    n_instances: int
    paths: list[Path]
    frame_of_reference_uid: str = ""
    patient_id: str = ""
    accession: str = ""


# --------------------------------------------------------------------------- inputs


def find_role_file(case_dir: Path, role: str) -> Path:
    """Return the NIfTI file of ``role`` in ``case_dir`` (accepts both naming schemes)."""
    case_dir = Path(case_dir)
    for stem in ROLE_FILE_STEMS[role]:
        for ext in (".nii.gz", ".nii"):
            exact = case_dir / f"{stem}{ext}"
            if exact.is_file():
                return exact
            prefixed = sorted(case_dir.glob(f"*[-_]{stem}{ext}"))
            if prefixed:
                return prefixed[0]
    raise FileNotFoundError(f"no NIfTI for role {role!r} in {case_dir} (tried {ROLE_FILE_STEMS[role]})")


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3-D NIfTI; return (voxels indexed [i, j, k], 4x4 affine voxel -> LPS mm)."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data, ras_to_lps(img.affine)


def ras_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """Convert a voxel -> RAS+ affine into a voxel -> LPS+ affine (flip x and y)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=float)


# ------------------------------------------------------------------------ encoding


@dataclass
class PixelEncoding:
    """How float/int voxels are stored: stored = (value - intercept) / slope."""

    dtype: np.dtype
    slope: float = 1.0
    intercept: float = 0.0

    @property
    def rescaled(self) -> bool:
        return self.slope != 1.0 or self.intercept != 0.0

    def encode(self, values: np.ndarray) -> np.ndarray:
        if not self.rescaled:
            return values.astype(self.dtype, copy=False)
        stored = np.rint((values.astype(np.float64) - self.intercept) / self.slope)
        info = np.iinfo(self.dtype)
        return np.clip(stored, info.min, info.max).astype(self.dtype)


def choose_encoding(volume: np.ndarray) -> PixelEncoding:
    """Pick int16 (signed data) or uint16; rescale only non-integral or out-of-range data."""
    vmin, vmax = float(volume.min()), float(volume.max())
    integral = np.issubdtype(volume.dtype, np.integer) or bool(np.all(np.mod(volume, 1) == 0))
    if integral and -32768 <= vmin and vmax <= 32767:
        return PixelEncoding(np.dtype("<i2"))
    if integral and 0 <= vmin and vmax <= 65535:
        return PixelEncoding(np.dtype("<u2"))
    span = vmax - vmin
    slope = span / 65535.0 if span > 0 else 1.0
    # use exactly the values that will be written as DS strings
    return PixelEncoding(np.dtype("<u2"), slope=float(_ds(slope)), intercept=float(_ds(vmin)))


def window_for(volume: np.ndarray) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) in rescaled units from the 0.5-99.5 percentile of non-zero voxels."""
    sample = volume[::2, ::2, ::2]
    nonzero = sample[sample != 0]
    if nonzero.size == 0:
        nonzero = sample.ravel()
    lo, hi = np.percentile(nonzero, [0.5, 99.5])
    width = max(float(hi - lo), 1.0)
    return round(float(lo + hi) / 2.0, 2), round(width, 2)


def _ds(value: float) -> str:
    """Format a float as a DICOM DS string (10 significant digits, at most 16 characters)."""
    text = f"{value:.10g}"
    return "0" if text == "-0" else text


# ------------------------------------------------------------------------ datasets


def _age(birth_date: str, study_date: str) -> str:
    """DICOM Age String (nnnY) at the study date."""
    b = _dt.datetime.strptime(birth_date, "%Y%m%d").date()
    s = _dt.datetime.strptime(study_date, "%Y%m%d").date()
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return f"{max(years, 0):03d}Y"


def _clock(minutes_after_start: int) -> str:
    """HHMMSS of the study start time plus some minutes."""
    t = _dt.datetime.strptime(STUDY_TIME, "%H%M%S") + _dt.timedelta(minutes=minutes_after_start)
    return t.strftime("%H%M%S")


def study_level_dataset(
    *, patient_name: str, patient_id: str, birth_date: str, accession: str,
    study_uid: str, study_date: str, frame_of_reference_uid: str,
) -> Dataset:
    """Patient, study, equipment and frame-of-reference attributes shared by all series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "F"
    ds.PatientAge = _age(birth_date, study_date)
    ds.PatientWeight = "68"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = STUDY_TIME
    ds.StudyID = "STUDY-" + accession[-5:]
    ds.AccessionNumber = accession
    ds.StudyDescription = "MRI BRAIN TUMOR DOE"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.InstitutionAddress = "1 Elsewhere Road, Boston MA"
    ds.StationName = "MRSTATION01"
    ds.OperatorsName = "TECH^TERRY"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ManufacturerModelName = "SIGNA Premier"
    ds.DeviceSerialNumber = "0000MR4711"
    ds.SoftwareVersions = "MR29.1"
    ds.MagneticFieldStrength = "3"
    ds.ImagingFrequency = "127.7"
    ds.ImagedNucleus = "1H"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.Modality = "MR"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def add_series_attributes(ds: Dataset, role: str, series_uid: str, study_date: str, patient_name: str,
                          protocol: dict | None = None) -> None:
    """Series-level acquisition headers of ``role`` plus the identifying private block.

    ``protocol`` (same keys as :data:`ROLE_PROTOCOLS` values) replaces the role's default
    protocol, e.g. for a 2D or sagittal acquisition (tests/corpus.py).
    """
    proto = protocol if protocol is not None else ROLE_PROTOCOLS[role]
    clock = _clock(proto["minutes_after_start"])
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = proto["SeriesNumber"]
    ds.SeriesDescription = proto["SeriesDescription"]
    ds.ProtocolName = proto["ProtocolName"]
    ds.SequenceName = proto["SequenceName"]
    ds.MRAcquisitionType = proto["MRAcquisitionType"]
    ds.ScanningSequence = proto["ScanningSequence"]
    ds.SequenceVariant = proto["SequenceVariant"]
    ds.ScanOptions = proto["ScanOptions"]
    ds.RepetitionTime = _ds(proto["RepetitionTime"])
    ds.EchoTime = _ds(proto["EchoTime"])
    if proto["InversionTime"] is not None:
        ds.InversionTime = _ds(proto["InversionTime"])
    elif "InversionTime" in ds:
        del ds.InversionTime  # the dataset is reused across series
    ds.FlipAngle = _ds(proto["FlipAngle"])
    ds.EchoTrainLength = proto["EchoTrainLength"]
    ds.EchoNumbers = "1"
    ds.NumberOfAverages = "1"
    if "ContrastBolusAgent" in proto:
        ds.ContrastBolusAgent = proto["ContrastBolusAgent"]
        ds.ContrastBolusVolume = _ds(proto["ContrastBolusVolume"])
        ds.ContrastBolusRoute = "IV"
    else:
        for keyword in ("ContrastBolusAgent", "ContrastBolusVolume", "ContrastBolusRoute"):
            if keyword in ds:
                delattr(ds, keyword)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = clock
    ds.AcquisitionNumber = 1
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", patient_name)
    block.add_new(0x11, "LO", f"{role} exam of {patient_name}")


def add_geometry_attributes(ds: Dataset, affine_lps: np.ndarray, shape: Sequence[int], slice_step: int) -> None:
    """Per-series Image Plane attributes (LPS, mm) that do not vary with the slice."""
    col_vec, row_vec, slice_vec = (affine_lps[:3, n] for n in range(3))
    col_spacing, row_spacing = np.linalg.norm(col_vec), np.linalg.norm(row_vec)
    thickness = float(np.linalg.norm(slice_vec))
    ds.ImageOrientationPatient = [_ds(v) for v in (*(col_vec / col_spacing), *(row_vec / row_spacing))]
    ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(thickness * slice_step)
    ds.Rows = int(shape[1])
    ds.Columns = int(shape[0])


def slice_position(affine_lps: np.ndarray, k: int) -> np.ndarray:
    """LPS position (mm) of the centre of the first transmitted pixel of slice ``k``."""
    return (affine_lps @ np.array([0.0, 0.0, float(k), 1.0]))[:3]


def slice_location(affine_lps: np.ndarray, position: np.ndarray) -> float:
    """SliceLocation (mm): signed distance of ``position`` along the slice normal."""
    normal = np.cross(affine_lps[:3, 0], affine_lps[:3, 1])
    normal /= np.linalg.norm(normal)
    return float(position @ normal)


def new_file_meta() -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BRAINLINE_TEST"
    return meta


# -------------------------------------------------------------------------- writer


def write_series(
    base: Dataset, role: str, volume: np.ndarray, affine_lps: np.ndarray,
    out_dir: Path, *, series_uid: str, study_date: str, patient_name: str, slice_step: int,
) -> SeriesInfo:
    """Write one series (one file per kept axial slice) into ``out_dir``; return its SeriesInfo."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = base.copy()
    ds.file_meta = new_file_meta()
    add_series_attributes(ds, role, series_uid, study_date, patient_name)
    add_geometry_attributes(ds, affine_lps, volume.shape, slice_step)
    encoding = choose_encoding(volume)
    ds.PixelRepresentation = 1 if encoding.dtype.kind == "i" else 0
    if encoding.rescaled:
        ds.RescaleIntercept = _ds(encoding.intercept)
        ds.RescaleSlope = _ds(encoding.slope)
        ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = (_ds(v) for v in window_for(volume))
    ds.WindowCenterWidthExplanation = "AUTO"

    paths: list[Path] = []
    for number, k in enumerate(range(0, volume.shape[2], slice_step), start=1):
        paths.append(_write_slice(ds, volume[:, :, k], encoding, affine_lps, k, number, out_dir))
    return SeriesInfo(series_uid, ds.SeriesDescription, len(paths), out_dir, paths)


def _write_slice(
    ds: Dataset, voxels_ij: np.ndarray, encoding: PixelEncoding,
    affine_lps: np.ndarray, k: int, number: int, out_dir: Path,
) -> Path:
    """Fill the per-slice attributes into the (reused) series dataset and write it."""
    sop_uid = generate_uid()
    position = slice_position(affine_lps, k)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(slice_location(affine_lps, position))
    # rows follow voxel axis j, columns voxel axis i
    ds.PixelData = np.ascontiguousarray(encoding.encode(voxels_ij).T).tobytes()
    path = out_dir / f"IM_{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(
    out_dir: Path,
    case_dir: Path,
    *,
    roles: Iterable[str] = ROLES,
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID-4711-XYZ",
    birth_date: str = "19640229",
    accession: str = "ACC-98765",
    study_uid: str | None = None,
    study_date: str = "20240115",
    slice_step: int = 1,
) -> StudyInfo:
    """Write the NIfTI volumes of ``case_dir`` as a DICOM MR study under ``out_dir/<role>/IM_<n>.dcm``.

    ``slice_step`` keeps every n-th axial slice (k = 0, n, 2n, ...); SpacingBetweenSlices
    becomes n times the voxel thickness. Fresh UIDs are generated on every call (the
    study UID only when ``study_uid`` is None); all series share the StudyInstanceUID
    and FrameOfReferenceUID.
    """
    if slice_step < 1:
        raise ValueError("slice_step must be >= 1")
    out_dir, case_dir = Path(out_dir), Path(case_dir)
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    base = study_level_dataset(
        patient_name=patient_name, patient_id=patient_id, birth_date=birth_date,
        accession=accession, study_uid=study_uid, study_date=study_date,
        frame_of_reference_uid=frame_uid,
    )
    series: dict[str, SeriesInfo] = {}
    for role in roles:
        if role not in ROLE_PROTOCOLS:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        volume, affine_lps = load_volume(find_role_file(case_dir, role))
        series[role] = write_series(
            base, role, volume, affine_lps, out_dir / role,
            series_uid=generate_uid(), study_date=study_date,
            patient_name=patient_name, slice_step=slice_step,
        )
    paths = [p for info in series.values() for p in info.paths]
    return StudyInfo(study_uid, series, len(paths), paths, frame_uid, patient_id, accession)


@dataclass(frozen=True)
class CompressedSyntax:
    """A lossless compressed transfer syntax: its UID, the dcmtk converter that
    writes it (empty: pydicom with pylibjpeg-openjpeg, as Debian's dcmtk has no
    JPEG 2000 encoder) and the dcmtk ``storescu`` option that proposes it
    (storescu proposes uncompressed syntaxes only unless told)."""

    uid: str
    converter: tuple[str, ...]
    storescu_option: str


#: One compressed syntax per role, as PACS archives and some scanners send them.
COMPRESSED_SYNTAXES: dict[str, CompressedSyntax] = {
    "t1c": CompressedSyntax("1.2.840.10008.1.2.4.70", ("dcmcjpeg",), "-xs"),   # JPEG Lossless, first-order prediction
    "flair": CompressedSyntax("1.2.840.10008.1.2.4.80", ("dcmcjpls",), "-xt"),  # JPEG-LS Lossless
    "t2": CompressedSyntax("1.2.840.10008.1.2.5", ("dcmcrle",), "-xr"),          # RLE Lossless
    "t1": CompressedSyntax("1.2.840.10008.1.2.4.90", (), "-xv"),                 # JPEG 2000 Lossless
}


def compress_study(study: StudyInfo, out_dir: Path) -> StudyInfo:
    """A copy of ``study`` under ``out_dir/<role>/`` with each series re-encoded
    losslessly in the transfer syntax :data:`COMPRESSED_SYNTAXES` gives its role
    (same UIDs, same pixel values). Raises RuntimeError when a converter fails."""
    series: dict[str, SeriesInfo] = {}
    for role, info in study.series.items():
        syntax, command = COMPRESSED_SYNTAXES[role].uid, COMPRESSED_SYNTAXES[role].converter
        folder = Path(out_dir) / role
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for src in info.paths:
            dst = folder / src.name
            if command:
                done = subprocess.run([*command, str(src), str(dst)], capture_output=True, text=True, timeout=60)
                if done.returncode != 0:
                    raise RuntimeError(f"{command[0]} failed on {src.name}: {done.stderr.strip()}")
            else:
                ds = pydicom.dcmread(src)
                ds.compress(JPEG2000Lossless)
                ds.save_as(dst)
            if str(pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) != syntax:
                raise RuntimeError(f"{dst.name} was not written as {syntax}")
            paths.append(dst)
        series[role] = SeriesInfo(info.series_uid, info.description, len(paths), folder, paths)
    all_paths = [p for info in series.values() for p in info.paths]
    return StudyInfo(study.study_uid, series, len(all_paths), all_paths, study.frame_of_reference_uid,
                     study.patient_id, study.accession)


def make_dual_echo(info: SeriesInfo, first_echo_ms: float, first_echo_pixels_of: SeriesInfo) -> SeriesInfo:
    """Make ``info`` the second echo of a dual-echo series, as a PD/T2 dual
    echo sends it: its images become echo 2 (instance numbers after the first
    echo's), and a first echo (EchoTime ``first_echo_ms``, the pixels of
    ``first_echo_pixels_of``'s image at each position, new SOP Instance UIDs,
    instance numbers 1..n) is written beside them in the series folder."""
    n = len(info.paths)
    pixels = {tuple(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient): p
              for p in first_echo_pixels_of.paths}
    first = []
    for path in info.paths:
        ds = pydicom.dcmread(path)
        ds.InstanceNumber, ds.EchoNumbers = int(ds.InstanceNumber) + n, 2
        ds.save_as(path, enforce_file_format=True)
        ds.PixelData = pydicom.dcmread(pixels[tuple(ds.ImagePositionPatient)]).PixelData
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.EchoNumbers, ds.EchoTime = int(ds.InstanceNumber) - n, 1, first_echo_ms
        first.append(path.with_name(f"E1_{path.name}"))
        ds.save_as(first[-1], enforce_file_format=True)
    return SeriesInfo(info.series_uid, info.description, 2 * n, info.dir, first + info.paths)


def write_multi_frame_series(info: SeriesInfo, out_dir: Path, *, enhanced_class: bool = False,
                             parts: int = 1, per_frame_orientation: bool = False) -> SeriesInfo:
    """``info``'s series as multi-frame MR under ``out_dir``, its frames in
    descending slice order (frame 1 is the last slice, as a scanner that
    acquires head to foot stores them): highdicom's Legacy Converted Enhanced
    MR conversion of the classic instances (plane position and orientation,
    pixel measures, rescale and window in functional groups), in ``parts``
    instances of consecutive frames. ``enhanced_class``: labelled Enhanced MR
    Image Storage instead, the class Siemens XA and Philips scanners send.
    ``per_frame_orientation``: the plane orientation in every frame's
    functional groups instead of the shared ones, as Philips writes it. A
    new SeriesInstanceUID; the classic files are left as they are."""
    import highdicom as hd

    slices = [pydicom.dcmread(p) for p in info.paths]
    slices.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    series_uid = generate_uid()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, chunk in enumerate(np.array_split(np.arange(len(slices)), parts), start=1):
        ds = hd.legacy.LegacyConvertedEnhancedMRImage([slices[i] for i in chunk], series_uid,
                                                      int(slices[0].SeriesNumber), generate_uid(), part)
        if enhanced_class:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
        if per_frame_orientation:
            orientation = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
            del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
            for item in ds.PerFrameFunctionalGroupsSequence:
                item.PlaneOrientationSequence = copy.deepcopy(orientation)
        paths.append(out_dir / f"MF_{part}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return SeriesInfo(series_uid, info.description, len(paths), out_dir, paths)


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a NIfTI case as a DICOM MR study.")
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--slice-step", type=int, default=1, help="keep every n-th axial slice")
    parser.add_argument("--roles", default=",".join(ROLES), help="comma-separated roles")
    parser.add_argument("--study-uid", default=None)
    args = parser.parse_args(argv)
    info = write_study(
        args.out_dir, args.case_dir, roles=tuple(args.roles.split(",")),
        slice_step=args.slice_step, study_uid=args.study_uid,
    )
    print(f"StudyInstanceUID {info.study_uid}: {info.n_instances} instances in {args.out_dir}")
    for role, s in info.series.items():
        print(f"  {role:6s} {s.description:20s} {s.n_instances:4d}  {s.series_uid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
