"""Overlap and volume metrics for label maps (numpy arrays, any shape)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Sørensen-Dice coefficient of two binary masks (anything non-zero is
    foreground). Two empty masks agree perfectly: 1.0."""
    a = np.asarray(a).astype(bool, copy=False)
    b = np.asarray(b).astype(bool, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def volume_ml(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Volume of the non-zero voxels of ``mask`` in millilitres (1 mL = 1000 mm^3).
    ``spacing_mm`` is the voxel size in mm, in any axis order (only the product
    matters)."""
    voxel_mm3 = float(np.prod([float(s) for s in spacing_mm]))
    return int(np.count_nonzero(mask)) * voxel_mm3 / 1000.0
