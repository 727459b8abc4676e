"""A clinical-like corpus: each shared reference case written as DICOM MR studies the
way hospitals acquire them, with reference labels kept in the original physical space.

Cases: the 12 BraTS 2018 cases of ``shared/data/brats18`` (expert labels) and
``tcga-du-7294`` (reference: the ``fusion_simple`` segmentation). Patterns:

* ``a`` 1 mm 3D, as published (the source grid, raw intensities);
* ``b`` every series on its own tilted grid (pitch 8-20 deg, yaw and roll up to
  +-5 deg), 2D slices of 4-6 mm with a slice profile (boxcar average over the slice
  thickness along the slice normal, not point sampling), in-plane 0.8-1.0 mm; T1c
  in 3D (1 mm, own tilt) for half of the cases; the vertex cut by 10-20 mm on some
  T1/T2/FLAIR series; a smooth multiplicative bias field (10-25 %); scanner-like
  integer intensities (12-bit, own gain per series, some with RescaleSlope); own
  field of view, matrix and coverage per series;
* ``c`` as ``b``, but one role (t1, t2 or flair, seeded) acquired sagittal or coronal;
* ``d`` a minimal protocol: 3D T1c and 2D FLAIR only.

Physical space (LPS, mm) is kept: ``reference_seg.nii.gz`` is the source label map on
the source 1 mm grid relabelled to BraTS 2023 (1 NCR, 2 ED, 3 ET; 4 -> 3), so any
segmentation is scored by nearest-neighbour resampling in physical space
(:func:`score`), no registration needed.

Every drawn parameter comes from an RNG seeded by (seed, case, pattern) and is
written to ``case.json``; UIDs are derived from the same key, so a corpus is
reproducible file for file. Layout::

    OUT/<case>_<pattern>/dicom/<role>/IM_<n>.dcm
    OUT/<case>_<pattern>/reference_seg.nii.gz
    OUT/<case>_<pattern>/case.json
    OUT/corpus.json                      (index written by the CLI)

CLI: ``python -m tests.corpus --out DIR [--cases 2013_11,tcga-du-7294] [--patterns a,b,c,d] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

from tests.dicom_factory import (
    ROLE_PROTOCOLS,
    _ds,
    add_geometry_attributes,
    add_series_attributes,
    new_file_meta,
    slice_location,
    slice_position,
    study_level_dataset,
    window_for,
)
from tests.shared_data import DATA

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = DATA  # tests/shared_data.py
CORPUS_VERSION = 1

ROLES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
PATTERNS: tuple[str, ...] = ("a", "b", "c", "d")
PATTERN_TITLES = {
    "a": "1 mm 3D as published",
    "b": "oblique 2D per series (own grid, slice profile, bias, scanner scaling)",
    "c": "as b, one role sagittal or coronal",
    "d": "minimal protocol: 3D T1c + 2D FLAIR",
}

BRATS18_CASES: tuple[str, ...] = (
    "2013_11", "2013_20", "CBICA_ABM", "CBICA_ALU", "CBICA_AME", "TCIA01_201",
    "TCIA01_425", "TCIA02_135", "TCIA02_606", "TCIA03_265", "TCIA10_628", "TCIA13_623",
)
TCGA_CASE = "tcga-du-7294"
CASE_IDS: tuple[str, ...] = BRATS18_CASES + (TCGA_CASE,)
#: Cases a method may be tuned on ...
TUNE_CASES: tuple[str, ...] = ("2013_11", "CBICA_ABM", "TCIA01_201", "TCIA02_135", "TCIA03_265", "TCIA10_628")
#: ... and the held-out half its figures are reported on.
HOLDOUT_CASES: tuple[str, ...] = tuple(c for c in CASE_IDS if c not in TUNE_CASES)

#: BraTS 2023 region definitions used by :func:`score`.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

# acquisition ranges (mm, degrees); see the module docstring
PITCH_DEG = (8.0, 20.0)
YAW_ROLL_DEG = 5.0
THICKNESS_MM = (4.0, 6.0)
PIXEL_MM = (0.8, 1.0)
FOV_MM = (220.0, 250.0)
VERTEX_CUT_MM = (10.0, 20.0)
VERTEX_CUT_PROBABILITY = 0.5
TUMOUR_MARGIN_MM = 5.0
BIAS_AMPLITUDE = (0.10, 0.25)
STORED_P995 = (700.0, 3500.0)  # where the 99.5th tissue percentile lands, stored units
STORED_MAX = 4095  # 12-bit
SUBSAMPLE_MM = 0.75  # slice-profile sub-sampling step along the normal

_PLANE_AXES = {  # base (row direction, column direction, normal) in LPS
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
}
_PLANE_PREFIX = {"axial": "AX", "sagittal": "SAG", "coronal": "COR"}

_SURNAMES = ("MUELLER", "GARCIA", "OKAFOR", "NAKAMURA", "JANSSEN", "ROSSI", "KOWALSKI", "DUBOIS",
             "LINDQVIST", "OCONNOR", "PETROV", "SILVA", "HASSAN", "NGUYEN", "SCHMIDT", "BROWN")
_GIVEN = ("ANNA", "JOHN", "MARIA", "PETER", "FATIMA", "LUCAS", "SOFIA", "DAVID", "ELENA", "OMAR",
          "HANNA", "JONAS", "CLARA", "MARTIN", "ZOE", "KARL")


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class CorpusCase:
    """One source case: NIfTI per role, the reference label map and its provenance."""

    case_id: str
    source_dir: Path
    images: dict[str, Path]
    reference: Path
    reference_name: str

    @property
    def split(self) -> str:
        """'tune' or 'holdout' (see TUNE_CASES / HOLDOUT_CASES)."""
        return "tune" if self.case_id in TUNE_CASES else "holdout"


def corpus_cases(data_root: Path | str = DEFAULT_DATA, cases: Iterable[str] | None = None) -> list[CorpusCase]:
    """The corpus cases found under ``data_root`` (all 13 by default), in CASE_IDS order.

    ``cases`` restricts to the given ids (e.g. ``["2013_11", "tcga-du-7294"]``); an
    unknown or missing id raises FileNotFoundError naming it.
    """
    root = Path(data_root)
    wanted = list(CASE_IDS) if cases is None else list(cases)
    unknown = [c for c in wanted if c not in CASE_IDS]
    if unknown:
        raise FileNotFoundError(f"unknown corpus case(s) {unknown}; known: {', '.join(CASE_IDS)}")
    out: list[CorpusCase] = []
    for case_id in CASE_IDS:
        if case_id not in wanted:
            continue
        if case_id == TCGA_CASE:
            folder = root / TCGA_CASE
            images = {r: folder / f"{r}.nii.gz" for r in ROLES}
            reference = folder / "segmentations" / "fusion_simple.nii.gz"
            name = "fusion_simple (BraTS 2020 algorithm fusion)"
        else:
            folder = root / "brats18" / f"Brats18_{case_id}_1"
            stem = folder / f"Brats18_{case_id}_1"
            images = {"t1": Path(f"{stem}_t1.nii.gz"), "t1c": Path(f"{stem}_t1ce.nii.gz"),
                      "t2": Path(f"{stem}_t2.nii.gz"), "flair": Path(f"{stem}_flair.nii.gz")}
            reference, name = Path(f"{stem}_seg.nii.gz"), "BraTS 2018 expert labels"
        missing = [str(p) for p in (*images.values(), reference) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"corpus case {case_id}: missing {', '.join(missing)}")
        out.append(CorpusCase(case_id, folder, images, reference, name))
    return out


def study_name(case_id: str, pattern: str) -> str:
    """Folder name of one study: ``<case>_<pattern>``."""
    return f"{case_id}_{pattern}"


# --------------------------------------------------------------------------- RNG


def _key(seed: int, *parts: str) -> list[int]:
    return [int(seed)] + [zlib.crc32(p.encode()) for p in parts]


def study_rng(seed: int, case_id: str, pattern: str) -> np.random.Generator:
    """The RNG all parameters of one (case, pattern) study are drawn from."""
    return np.random.default_rng(_key(seed, case_id, pattern))


def t1c_is_3d(case_id: str, seed: int = 0) -> bool:
    """Patterns b/c: T1c is a 1 mm 3D acquisition for half of the cases (a seeded
    permutation of CASE_IDS, first 7 of 13), a 2D one for the others."""
    order = np.random.default_rng(_key(seed, "t1c-3d")).permutation(len(CASE_IDS))
    if case_id not in CASE_IDS:
        return zlib.crc32(case_id.encode()) % 2 == 0
    return int(np.where(order == CASE_IDS.index(case_id))[0][0]) < (len(CASE_IDS) + 1) // 2


def _uid(seed: int, *parts: str) -> str:
    return generate_uid(entropy_srcs=[f"brainline-corpus-v{CORPUS_VERSION}", str(seed), *parts])


# --------------------------------------------------------------------------- sources


@lru_cache(maxsize=6)
def _read_float(path: str) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)


@lru_cache(maxsize=2)
def _labels(path: str) -> sitk.Image:
    """Reference label map relabelled to BraTS 2023 (4 -> 3), uint8, source geometry."""
    image = sitk.ReadImage(path)
    array = sitk.GetArrayFromImage(image).astype(np.uint8)
    array[array == 4] = 3
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


@lru_cache(maxsize=2)
def _brain_points(case_key: tuple[str, ...]) -> np.ndarray:
    """Physical coordinates (LPS mm, N x 3) of the brain voxels (any role > 0), every 2nd voxel."""
    images = [_read_float(p) for p in case_key]
    mask = np.zeros(sitk.GetArrayViewFromImage(images[0]).shape, bool)
    for image in images:
        mask |= sitk.GetArrayViewFromImage(image) > 0
    return _points(images[0], mask, step=2)


def _points(image: sitk.Image, mask_zyx: np.ndarray, step: int = 1) -> np.ndarray:
    sub = mask_zyx[::step, ::step, ::step]
    idx = np.argwhere(sub)[:, ::-1].astype(float) * step  # (i, j, k)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (idx * np.array(image.GetSpacing())) @ direction.T


def _tumour_points(reference: str) -> np.ndarray:
    labels = _labels(reference)
    return _points(labels, sitk.GetArrayViewFromImage(labels) > 0, step=1)


# --------------------------------------------------------------------------- geometry


def rotation(pitch_deg: float, yaw_deg: float, roll_deg: float) -> np.ndarray:
    """R = Rz(yaw) @ Ry(roll) @ Rx(pitch) in LPS: pitch about the left-right axis
    (AC-PC angulation), roll about the antero-posterior axis, yaw about the
    cranio-caudal axis."""
    a, b, c = (math.radians(v) for v in (pitch_deg, roll_deg, yaw_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Grid:
    """A sampling grid: SimpleITK size/spacing/origin/direction (direction columns =
    row direction, column direction, slice normal)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": [round(v, 6) for v in self.spacing],
                "origin": [round(v, 4) for v in self.origin],
                "direction": [round(v, 8) for v in self.direction]}

    def shifted(self, distance_mm: float) -> "Grid":
        normal = np.array(self.direction).reshape(3, 3)[:, 2]
        return Grid(self.size, self.spacing, tuple(np.array(self.origin) + distance_mm * normal), self.direction)

    def reference(self) -> sitk.Image:
        ref = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref


def _draw_series(rng: np.random.Generator, role: str, *, plane: str, acquisition: str,
                 brain: np.ndarray, tumour: np.ndarray, allow_cut: bool) -> dict:
    """Draw the acquisition of one series and derive its grid from the brain extent."""
    if plane == "axial":
        pitch = float(rng.uniform(*PITCH_DEG))
    else:
        pitch = float(rng.uniform(-YAW_ROLL_DEG, YAW_ROLL_DEG))
    yaw = float(rng.uniform(-YAW_ROLL_DEG, YAW_ROLL_DEG))
    roll = float(rng.uniform(-YAW_ROLL_DEG, YAW_ROLL_DEG))
    if acquisition == "3D":
        pixel, thickness, gap = 1.0, 1.0, 0.0
    else:
        pixel = round(float(rng.uniform(*PIXEL_MM)), 3)
        thickness = round(float(rng.uniform(*THICKNESS_MM)), 1)
        gap = float(rng.choice([0.0, 0.0, 0.5, 1.0]))
    spacing_between = thickness + gap
    fov = float(rng.uniform(*FOV_MM))
    phase_fraction = float(rng.choice([1.0, 0.9375, 0.875, 0.8125]))
    offset_u, offset_v = (float(v) for v in rng.uniform(-8.0, 8.0, size=2))
    margin_low = float(rng.uniform(0.0, 10.0))
    margin_high = float(rng.uniform(2.0, 10.0))
    wants_cut = allow_cut and bool(rng.random() < VERTEX_CUT_PROBABILITY)
    cut_draw = float(rng.uniform(*VERTEX_CUT_MM))

    base = np.array(_PLANE_AXES[plane], dtype=float).T  # columns u, v, w
    direction = rotation(pitch, yaw, roll) @ base
    coords = brain @ direction  # (N, 3): coordinates along u, v, w
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    centre = (lo + hi) / 2.0

    # in-plane field of view: phase-encoding (u) may be reduced, but the head must fit
    fov_u, fov_v = fov * phase_fraction, fov
    fov_u = max(fov_u, hi[0] - lo[0] + 20.0)
    fov_v = max(fov_v, hi[1] - lo[1] + 20.0)
    n_u, n_v = int(math.ceil(fov_u / pixel)), int(math.ceil(fov_v / pixel))
    c_u = float(np.clip(centre[0] + offset_u, hi[0] + 5.0 - (n_u - 1) * pixel / 2, lo[0] - 5.0 + (n_u - 1) * pixel / 2))
    c_v = float(np.clip(centre[1] + offset_v, hi[1] + 5.0 - (n_v - 1) * pixel / 2, lo[1] - 5.0 + (n_v - 1) * pixel / 2))

    # coverage along the normal; for axial slabs "high" is the vertex
    cut, cut_note = 0.0, None
    top = hi[2] + margin_high
    if wants_cut and plane == "axial":
        room = hi[2] - (tumour @ direction[:, 2]).max() - TUMOUR_MARGIN_MM if len(tumour) else np.inf
        if room >= cut_draw:
            cut, top = cut_draw, hi[2] - cut_draw
        elif room >= VERTEX_CUT_MM[0]:
            cut, top = float(room), hi[2] - float(room)
        else:
            cut_note = f"skipped: tumour within {max(room, 0.0) + TUMOUR_MARGIN_MM:.0f} mm of the vertex"
    bottom = lo[2] - margin_low
    n_w = int(math.ceil((top - bottom - thickness) / spacing_between)) + 1
    first_w = bottom + thickness / 2.0
    corner = np.array([c_u - (n_u - 1) * pixel / 2.0, c_v - (n_v - 1) * pixel / 2.0, first_w])
    grid = Grid((n_u, n_v, n_w), (pixel, pixel, spacing_between), tuple(float(v) for v in direction @ corner),
                tuple(float(v) for v in direction.flatten()))
    return {
        "role": role, "plane": plane, "acquisition": acquisition,
        "pitch_deg": round(pitch, 3), "yaw_deg": round(yaw, 3), "roll_deg": round(roll, 3),
        "pixel_spacing_mm": pixel, "slice_thickness_mm": thickness,
        "spacing_between_slices_mm": spacing_between, "slice_gap_mm": gap,
        "slice_profile": "point" if acquisition == "3D" else
        f"boxcar over {thickness:g} mm, {_n_sub(thickness)} sub-samples",
        "fov_mm": [round(n_u * pixel, 1), round(n_v * pixel, 1)], "matrix": [n_u, n_v],
        "n_slices": n_w,
        "coverage_mm": [round(float(first_w - thickness / 2), 2),
                        round(float(first_w + thickness / 2 + (n_w - 1) * spacing_between), 2)],
        "brain_extent_along_normal_mm": [round(float(lo[2]), 2), round(float(hi[2]), 2)],
        "vertex_cut_mm": round(cut, 2), **({"vertex_cut_note": cut_note} if cut_note else {}),
        "grid": grid.to_dict(),
    }


def _n_sub(thickness: float) -> int:
    return max(1, int(math.ceil(thickness / SUBSAMPLE_MM)))


def _grid_of(spec: dict) -> Grid:
    g = spec["grid"]
    return Grid(tuple(g["size"]), tuple(g["spacing"]), tuple(g["origin"]), tuple(g["direction"]))


# --------------------------------------------------------------------------- intensities


def _draw_intensity(rng: np.random.Generator) -> dict:
    amplitude = float(rng.uniform(*BIAS_AMPLITUDE))
    coefficients = rng.normal(size=9)
    target = float(rng.uniform(*STORED_P995))
    rescale = bool(rng.random() < 0.3)
    slope = round(float(rng.uniform(0.5, 4.0)), 4) if rescale else 1.0
    return {"bias_amplitude": round(amplitude, 4), "bias_coefficients": [round(float(c), 5) for c in coefficients],
            "stored_p995": round(target, 1), "rescale_slope": slope, "rescale_intercept": 0.0}


def _bias_field(grid: Grid, values: np.ndarray, coefficients: Sequence[float], amplitude: float,
                centre: np.ndarray) -> np.ndarray:
    """1 + amplitude * f, f a quadratic polynomial in (p - centre) / 100 mm scaled to
    max |f| = 1 over the non-zero voxels; returned in [z, y, x] order like ``values``."""
    n_u, n_v, n_w = grid.size
    direction = np.array(grid.direction).reshape(3, 3)
    k, j, i = np.meshgrid(np.arange(n_w), np.arange(n_v), np.arange(n_u), indexing="ij", sparse=True)
    origin = np.array(grid.origin)
    sx, sy, sz = grid.spacing
    x = (origin[0] - centre[0] + direction[0, 0] * i * sx + direction[0, 1] * j * sy + direction[0, 2] * k * sz) / 100.0
    y = (origin[1] - centre[1] + direction[1, 0] * i * sx + direction[1, 1] * j * sy + direction[1, 2] * k * sz) / 100.0
    z = (origin[2] - centre[2] + direction[2, 0] * i * sx + direction[2, 1] * j * sy + direction[2, 2] * k * sz) / 100.0
    a = coefficients
    f = (a[0] * x + a[1] * y + a[2] * z + a[3] * x * x + a[4] * y * y + a[5] * z * z
         + a[6] * x * y + a[7] * x * z + a[8] * y * z)
    f = np.broadcast_to(f, values.shape)
    inside = values > 0
    if inside.any():
        f = f - 0.5 * (f[inside].max() + f[inside].min())
        scale = np.abs(f[inside]).max()
        f = f / scale if scale > 0 else f * 0
    return (1.0 + amplitude * f).astype(np.float32)


# --------------------------------------------------------------------------- sampling


def sample(image: sitk.Image, spec: dict) -> sitk.Image:
    """Sample ``image`` (float) onto the grid of ``spec``: linear interpolation, 3D
    point sampling, 2D a boxcar slice profile (mean of sub-slices spread over the
    slice thickness along the normal). Zero outside the source."""
    grid = _grid_of(spec)
    n = 1 if spec["acquisition"] == "3D" else _n_sub(spec["slice_thickness_mm"])
    t = spec["slice_thickness_mm"]
    total = None
    for j in range(n):
        offset = 0.0 if n == 1 else -t / 2.0 + (j + 0.5) * t / n
        g = grid.shifted(offset)
        out = sitk.Resample(image, [int(v) for v in g.size], sitk.Transform(), sitk.sitkLinear,
                            g.origin, g.spacing, g.direction, 0.0, sitk.sitkFloat32)
        array = sitk.GetArrayViewFromImage(out)
        total = array.copy() if total is None else total + array
    result = sitk.GetImageFromArray(total / float(n) if n > 1 else total)
    result.SetSpacing(grid.spacing)
    result.SetOrigin(grid.origin)
    result.SetDirection(grid.direction)
    return result


def scanner_values(sampled: sitk.Image, spec: dict, intensity: dict, centre: np.ndarray) -> tuple[np.ndarray, dict]:
    """Bias field and scanner scaling: stored 12-bit integers [z, y, x] and what was applied."""
    values = np.clip(sitk.GetArrayFromImage(sampled), 0.0, None)
    grid = _grid_of(spec)
    bias = _bias_field(grid, values, intensity["bias_coefficients"], intensity["bias_amplitude"], centre)
    values = values * bias
    tissue = values[values > 0]
    p995 = float(np.percentile(tissue[:: max(1, tissue.size // 200000)], 99.5)) if tissue.size else 1.0
    stored_target = intensity["stored_p995"] / intensity["rescale_slope"]
    gain = stored_target / p995 if p995 > 0 else 1.0
    stored = np.clip(np.rint(values * gain), 0, STORED_MAX).astype(np.uint16)
    return stored, {"gain": round(gain, 6), "source_p995": round(p995, 3)}


# --------------------------------------------------------------------------- protocols


def protocol_for(role: str, plane: str, acquisition: str, thickness: float) -> dict:
    """Scanner-like series headers that config/series_rules.yaml assigns to ``role``."""
    prefix = _PLANE_PREFIX[plane]
    if acquisition == "3D":
        if role == "t2":
            return dict(ROLE_PROTOCOLS["t2"], SeriesDescription=f"{prefix} T2 3D CUBE", ProtocolName="T2 CUBE",
                        SequenceName="*spc3d1", MRAcquisitionType="3D", EchoTrainLength=120)
        proto = dict(ROLE_PROTOCOLS[role])
        if role == "t1c":
            proto["SeriesDescription"] = f"{prefix} T1 3D POST GD"
        elif role == "t1":
            proto["SeriesDescription"] = f"{prefix} T1 3D PRE"
        return proto
    mm = f"{thickness:g}mm"
    if role in ("t1", "t1c"):
        proto = dict(
            SeriesNumber=3, SeriesDescription=f"{prefix} T1 SE", ProtocolName=f"{prefix} T1 SE {mm}",
            SequenceName="*se2d1", MRAcquisitionType="2D", ScanningSequence="SE", SequenceVariant="SK",
            ScanOptions="", RepetitionTime=550, EchoTime=10, InversionTime=None, FlipAngle=90,
            EchoTrainLength=1, minutes_after_start=3,
        )
        if role == "t1c":
            proto.update(SeriesNumber=8, SeriesDescription=f"{prefix} T1 SE POST GD", minutes_after_start=20,
                         ContrastBolusAgent="GADOBUTROL", ContrastBolusVolume=7.5)
        return proto
    if role == "t2":
        return dict(
            SeriesNumber=4, SeriesDescription=f"{prefix} T2 TSE", ProtocolName=f"{prefix} T2 TSE {mm}",
            SequenceName="*tse2d1_15", MRAcquisitionType="2D", ScanningSequence="SE", SequenceVariant="SK",
            ScanOptions="", RepetitionTime=4800, EchoTime=98, InversionTime=None, FlipAngle=150,
            EchoTrainLength=15, minutes_after_start=8,
        )
    return dict(
        SeriesNumber=5, SeriesDescription=f"{prefix} T2 FLAIR {mm}", ProtocolName=f"{prefix} T2 FLAIR {mm}",
        SequenceName="*tir2d1_16", MRAcquisitionType="2D", ScanningSequence=["SE", "IR"],
        SequenceVariant=["SK", "SP", "MP"], ScanOptions="IR", RepetitionTime=9000, EchoTime=85,
        InversionTime=2500, FlipAngle=150, EchoTrainLength=16, minutes_after_start=12,
    )


# --------------------------------------------------------------------------- writing


def _affine_lps(grid: Grid) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.array(grid.direction).reshape(3, 3) @ np.diag(grid.spacing)
    affine[:3, 3] = grid.origin
    return affine


def write_series(base: pydicom.Dataset, role: str, protocol: dict, stored_zyx: np.ndarray, grid: Grid,
                 out_dir: Path, *, uid_key: Sequence[str], series_uid: str, study_date: str,
                 patient_name: str, slice_thickness: float, rescale_slope: float = 1.0,
                 rescale_intercept: float = 0.0, bits_stored: int = 12) -> list[Path]:
    """Write one single-frame MR series (one file per slice k of ``stored_zyx``, uint16)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = copy.deepcopy(base)  # Dataset.copy() is shallow: attributes would leak between series
    ds.file_meta = new_file_meta()
    add_series_attributes(ds, role, series_uid, study_date, patient_name, protocol=protocol)
    affine = _affine_lps(grid)
    add_geometry_attributes(ds, affine, grid.size, 1)
    ds.SliceThickness = _ds(slice_thickness)
    ds.SpacingBetweenSlices = _ds(grid.spacing[2])
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if rescale_slope != 1.0 or rescale_intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(rescale_slope), _ds(rescale_intercept), "US"
    centre, width = window_for(stored_zyx.transpose(2, 1, 0).astype(np.float32) * rescale_slope + rescale_intercept)
    ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
    ds.WindowCenterWidthExplanation = "AUTO"
    paths = []
    for k in range(stored_zyx.shape[0]):
        sop_uid = _uid(0, *uid_key, "sop", str(k))
        position = slice_position(affine, k)
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(slice_location(affine, position))
        ds.PixelData = np.ascontiguousarray(stored_zyx[k], dtype="<u2").tobytes()
        path = out_dir / f"IM_{k + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _identity(rng: np.random.Generator, case_id: str, pattern: str) -> dict:
    surname, given = str(rng.choice(_SURNAMES)), str(rng.choice(_GIVEN))
    birth = f"{int(rng.integers(1938, 1995))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    study_date = f"{int(rng.integers(2021, 2026))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    return {
        "patient_name": f"{surname}^{given}",
        "patient_id": f"PID-{int(rng.integers(100000, 999999))}-{case_id.upper().replace('_', '')[:10]}",
        "birth_date": birth,
        "accession": f"ACC-{int(rng.integers(10**7, 10**8))}{pattern.upper()}",
        "study_date": study_date,
        "sex": str(rng.choice(["F", "M"])),
    }


def _plan(case: CorpusCase, pattern: str, seed: int, rng: np.random.Generator,
          brain: np.ndarray, tumour: np.ndarray) -> dict[str, dict]:
    """Series specs per role for one study (pattern b, c, d)."""
    roles = ("t1c", "flair") if pattern == "d" else ROLES
    odd_role, odd_plane = None, None
    if pattern == "c":
        odd_role = str(rng.choice(["t1", "t2", "flair"]))
        odd_plane = str(rng.choice(["sagittal", "coronal"]))
    t1c_3d = pattern == "d" or t1c_is_3d(case.case_id, seed)
    specs: dict[str, dict] = {}
    for role in roles:
        plane = odd_plane if role == odd_role else "axial"
        acquisition = "3D" if role == "t1c" and t1c_3d else "2D"
        specs[role] = _draw_series(rng, role, plane=plane, acquisition=acquisition, brain=brain, tumour=tumour,
                                   allow_cut=role != "t1c")
        specs[role].update(_draw_intensity(rng))
    return specs


def write_corpus_study(case: CorpusCase, pattern: str, out_dir: Path | str, seed: int = 0, *,
                       roles: Iterable[str] | None = None) -> Path:
    """Write ``case`` in ``pattern`` as ``out_dir/<case>_<pattern>/`` (dicom/, reference_seg.nii.gz,
    case.json) and return that folder. ``roles`` limits the series written (tests); the
    parameters drawn do not depend on it."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    started = time.perf_counter()
    study_dir = Path(out_dir) / study_name(case.case_id, pattern)
    dicom_dir = study_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    rng = study_rng(seed, case.case_id, pattern)
    identity = _identity(rng, case.case_id, pattern)
    key = (str(seed), case.case_id, pattern)
    study_uid, frame_uid = _uid(0, *key, "study"), _uid(0, *key, "frame")
    base = study_level_dataset(
        patient_name=identity["patient_name"], patient_id=identity["patient_id"],
        birth_date=identity["birth_date"], accession=identity["accession"], study_uid=study_uid,
        study_date=identity["study_date"], frame_of_reference_uid=frame_uid,
    )
    base.PatientSex = identity["sex"]
    base.StudyDescription = "MRI BRAIN WITH AND WITHOUT CONTRAST"

    source_key = tuple(str(case.images[r]) for r in ROLES)
    brain = _brain_points(source_key)
    centre = (brain.min(axis=0) + brain.max(axis=0)) / 2.0
    if pattern == "a":
        specs = {r: {"role": r, "plane": "axial", "acquisition": "3D", "pitch_deg": 0.0, "yaw_deg": 0.0,
                     "roll_deg": 0.0, "slice_thickness_mm": 1.0, "vertex_cut_mm": 0.0,
                     "bias_amplitude": 0.0, "gain": 1.0, "slice_profile": "source grid"} for r in ROLES}
    else:
        specs = _plan(case, pattern, seed, rng, brain, _tumour_points(str(case.reference)))
    wanted = list(specs) if roles is None else [r for r in specs if r in set(roles)]

    series_out: dict[str, dict] = {}
    for role in wanted:
        spec = specs[role]
        source = _read_float(str(case.images[role]))
        series_uid = _uid(0, *key, role, "series")
        if pattern == "a":
            grid = Grid(source.GetSize(), source.GetSpacing(), source.GetOrigin(), source.GetDirection())
            raw = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(case.images[role])))).astype(np.int32)
            protocol = protocol_for(role, "axial", "3D", 1.0)
            # raw values as published; negative ones (tcga) stored shifted, undone by RescaleIntercept
            offset = int(min(0, raw.min()))
            stored = np.clip(raw - offset, 0, 65535).astype(np.uint16)
            paths = write_series(base, role, protocol, stored, grid, dicom_dir / role, uid_key=(*key, role),
                                 series_uid=series_uid, study_date=identity["study_date"],
                                 patient_name=identity["patient_name"], slice_thickness=1.0,
                                 rescale_intercept=float(offset), bits_stored=16)
            spec.update(grid=grid.to_dict(), pixel_spacing_mm=1.0, spacing_between_slices_mm=1.0,
                        rescale_intercept=float(offset), n_slices=grid.size[2])
        else:
            grid = _grid_of(spec)
            protocol = protocol_for(role, spec["plane"], spec["acquisition"], spec["slice_thickness_mm"])
            sampled = sample(source, spec)
            stored, applied = scanner_values(sampled, spec, spec, centre)
            spec.update(applied)
            paths = write_series(base, role, protocol, stored, grid, dicom_dir / role, uid_key=(*key, role),
                                 series_uid=series_uid, study_date=identity["study_date"],
                                 patient_name=identity["patient_name"],
                                 slice_thickness=spec["slice_thickness_mm"],
                                 rescale_slope=spec["rescale_slope"], bits_stored=12)
        series_out[role] = {**spec, "series_description": protocol["SeriesDescription"],
                            "series_number": protocol["SeriesNumber"],
                            "mr_acquisition_type": protocol["MRAcquisitionType"],
                            "series_uid": series_uid, "n_instances": len(paths)}

    reference = _labels(str(case.reference))
    sitk.WriteImage(reference, str(study_dir / "reference_seg.nii.gz"), True)
    ref_array = sitk.GetArrayViewFromImage(reference)
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    info = {
        "corpus_version": CORPUS_VERSION,
        "case_id": case.case_id,
        "pattern": pattern,
        "pattern_title": PATTERN_TITLES[pattern],
        "seed": seed,
        "split": case.split,
        "source": {"dir": str(case.source_dir), "images": {r: str(p) for r, p in case.images.items()},
                   "reference": str(case.reference), "reference_name": case.reference_name},
        "roles": list(series_out),
        "missing_roles": [r for r in ROLES if r not in specs],
        "t1c_3d": specs.get("t1c", {}).get("acquisition") == "3D",
        "study_uid": study_uid,
        "frame_of_reference_uid": frame_uid,
        "patient": identity,
        "series": series_out,
        "reference": {
            "path": "reference_seg.nii.gz", "labels": "BraTS 2023 (1 NCR, 2 ED, 3 ET; source 4 -> 3)",
            "volumes_ml": {name: round(float(np.isin(ref_array, labels).sum()) * voxel_ml, 3)
                           for name, labels in REGIONS.items()},
        },
        "n_instances": sum(s["n_instances"] for s in series_out.values()),
        "generation_s": round(time.perf_counter() - started, 2),
    }
    (study_dir / "case.json").write_text(json.dumps(info, indent=1))
    return study_dir


def write_corpus(out_dir: Path | str, cases: Sequence[CorpusCase], patterns: Sequence[str] = PATTERNS,
                 seed: int = 0, progress: bool = True) -> list[Path]:
    """Write every (case, pattern) study under ``out_dir`` and an index ``corpus.json``."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(c, p) for c in cases for p in patterns]
    written: list[Path] = []
    bar = tqdm(jobs, unit="study", disable=not progress)
    for case, pattern in bar:
        bar.set_postfix_str(study_name(case.case_id, pattern))
        written.append(write_corpus_study(case, pattern, out_dir, seed))
    index = {"corpus_version": CORPUS_VERSION, "seed": seed,
             "studies": [{"name": p.name, **{k: json.loads((p / "case.json").read_text())[k]
                                             for k in ("case_id", "pattern", "split", "roles", "study_uid")}}
                         for p in written]}
    (out_dir / "corpus.json").write_text(json.dumps(index, indent=1))
    return written


def load_case_json(study_dir: Path | str) -> dict:
    return json.loads((Path(study_dir) / "case.json").read_text())


# --------------------------------------------------------------------------- scoring


def _as_image(value: sitk.Image | Path | str) -> sitk.Image:
    return value if isinstance(value, sitk.Image) else sitk.ReadImage(str(value))


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def score(segmentation: sitk.Image | Path | str, reference_seg: sitk.Image | Path | str) -> dict[str, Any]:
    """Dice of WT (1+2+3), TC (1+3), ET (3) of ``segmentation`` against ``reference_seg``.

    The segmentation (any grid; BraTS 2020's 4 is read as 3) is resampled onto the
    reference grid with nearest neighbour in physical space (zero outside its own
    grid). A region absent from the reference gets Dice None (tcga-du-7294 has no ET).
    Also returns the volumes in mL: ``<R>_ml`` of the segmentation on its own grid and
    ``<R>_ref_ml`` of the reference.
    """
    seg, ref = _as_image(segmentation), _as_image(reference_seg)
    seg_labels = sitk.Cast(seg, sitk.sitkUInt8) if seg.GetPixelID() != sitk.sitkUInt8 else seg
    on_ref = sitk.Resample(seg_labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    s = sitk.GetArrayViewFromImage(on_ref).copy()
    r = sitk.GetArrayViewFromImage(ref).astype(np.uint8)
    native = sitk.GetArrayViewFromImage(seg_labels).copy()
    for array in (s, r, native):
        array[array == 4] = 3
    seg_ml = float(np.prod(seg.GetSpacing())) / 1000.0
    ref_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    out: dict[str, Any] = {}
    for name, labels in REGIONS.items():
        rmask = np.isin(r, labels)
        out[name] = dice(np.isin(s, labels), rmask) if rmask.any() else None
    for name, labels in REGIONS.items():
        out[f"{name}_ml"] = round(float(np.isin(native, labels).sum()) * seg_ml, 3)
        out[f"{name}_ref_ml"] = round(float(np.isin(r, labels).sum()) * ref_ml, 3)
    return out


def naive_flair_floor(work_dir: Path | str, threshold: float = 1.0) -> sitk.Image:
    """The naive floor of issue 7: FLAIR z > ``threshold`` inside the brain mask.

    Reads ``preprocessed/flair.nii.gz`` and ``brain_mask.nii.gz`` of a job workspace (or a
    ``brainline process`` output folder); z = (FLAIR - mean) / std over the brain mask.
    Returns a label map (2 = whole tumour) on the FLAIR grid, for :func:`score` (WT).
    """
    work = Path(work_dir)
    flair = sitk.ReadImage(str(work / "preprocessed" / "flair.nii.gz"), sitk.sitkFloat32)
    mask_image = sitk.ReadImage(str(work / "brain_mask.nii.gz"))
    if mask_image.GetSize() != flair.GetSize():
        mask_image = sitk.Resample(mask_image, flair, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    values = sitk.GetArrayViewFromImage(flair)
    mask = sitk.GetArrayViewFromImage(mask_image) > 0
    inside = values[mask]
    std = float(inside.std()) if inside.size else 0.0
    labels = np.zeros(values.shape, np.uint8)
    if std > 0:
        labels[mask & ((values - float(inside.mean())) / std > threshold)] = 2
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(flair)
    return out


# --------------------------------------------------------------------------- CLI


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the clinical-like DICOM corpus (issue 7).")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data root (default {DEFAULT_DATA})")
    parser.add_argument("--cases", nargs="*",
                        help=f"case ids, comma or space separated (default all): {' '.join(CASE_IDS)}")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated patterns (default a,b,c,d)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    bad = [p for p in patterns if p not in PATTERNS]
    if bad:
        parser.error(f"unknown pattern(s) {bad}; choose from {','.join(PATTERNS)}")
    try:
        cases = corpus_cases(args.data, _split_list(args.cases))
    except FileNotFoundError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    written = write_corpus(args.out, cases, patterns, args.seed)
    elapsed = time.perf_counter() - started
    print(f"{len(written)} studies in {args.out} ({elapsed:.0f} s, {elapsed / max(len(written), 1):.1f} s per study)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
