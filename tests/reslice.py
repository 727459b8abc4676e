"""Make clinical-looking variants of the shared volumes: thick oblique 2D
slices and a head-sized field of view (physical space LPS, mm)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _rotation(tilt_x_deg: float, tilt_z_deg: float) -> np.ndarray:
    ax, az = math.radians(tilt_x_deg), math.radians(tilt_z_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def reslice(image: sitk.Image, spacing=(0.9, 0.9, 5.0), fov_mm=(240.0, 240.0, 180.0),
            tilt_x_deg=12.0, tilt_z_deg=5.0) -> sitk.Image:
    """Resample ``image`` (linear) onto an oblique grid of the given spacing
    that covers a head-sized field of view centred on the image centre."""
    size = [int(round(f / s)) for f, s in zip(fov_mm, spacing)]
    direction = _rotation(tilt_x_deg, tilt_z_deg) @ np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in image.GetSize()]))
    half = np.array([(n - 1) * s / 2 for n, s in zip(size, spacing)])
    origin = centre - direction @ half
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(direction.flatten().tolist())
    ref.SetOrigin(origin.tolist())
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    return sitk.Cast(sitk.Round(out), sitk.sitkInt16)


def pad_to_head_fov(image: sitk.Image, fov_mm=(260.0, 260.0, 200.0)) -> sitk.Image:
    """Zero-pad ``image`` symmetrically to a head-sized field of view."""
    extra = [max(0, int(round(f / s)) - n) for f, s, n in zip(fov_mm, image.GetSpacing(), image.GetSize())]
    lower = [e // 2 for e in extra]
    upper = [e - lo for e, lo in zip(extra, lower)]
    return sitk.ConstantPad(image, lower, upper, 0)


def clinical_variant(case_dir: Path, out_dir: Path) -> Path:
    """T1, T2 and FLAIR as oblique 5 mm 2D acquisitions with different matrices
    and tilts; T1c as a 3D 1 mm volume in a head-sized FOV. Returns out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"t1": "t1", "t1c": "t1c", "t2": "t2", "flair": "flair"}
    settings = {"t1": dict(spacing=(0.9, 0.9, 5.0), tilt_x_deg=12.0, tilt_z_deg=5.0),
                "t2": dict(spacing=(0.8, 0.8, 5.0), tilt_x_deg=-8.0, tilt_z_deg=0.0),
                "flair": dict(spacing=(1.0, 1.0, 5.0), tilt_x_deg=15.0, tilt_z_deg=-4.0)}
    for role, stem in names.items():
        image = sitk.ReadImage(str(case_dir / f"{stem}.nii.gz"))
        if role in settings:
            image = reslice(image, **settings[role])
        else:
            image = pad_to_head_fov(image)
        sitk.WriteImage(image, str(out_dir / f"{stem}.nii.gz"))
    return out_dir
