"""Volume change by segmenting both timepoints of a registered pair together.

The follow-up step (:mod:`.longitudinal`) holds, for every sequence, the current
image and the prior's image registered and intensity-matched onto the current
grid, both smoothed alike (the subtraction's inputs). Segmenting those two image
sets with the same segmenter, inside the same brain mask, removes what makes two
independent segmentations disagree on an unchanged tumour: different grids,
resampling, bias fields and brain masks. What is left is the image change.

Only a segmenter that works on arrays on the reference grid can do this
(``segment_arrays``: the classical baseline). A trained model that runs in its own
model frame needs a work folder per timepoint; it keeps the other measures.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

__all__ = ["joint_segmentation_change", "JOINT_SEGMENTERS"]

#: Segmentation backends (summary.json backends.segmentation.backend) this measure can re-run on arrays.
JOINT_SEGMENTERS = ("baseline",)


def joint_segmentation_change(backend, images: dict[str, tuple[np.ndarray, np.ndarray]], mask: np.ndarray,
                              spacing_zyx, components: dict[str, Callable[[np.ndarray], np.ndarray]],
                              prior_labels: np.ndarray, change: Callable[[dict, dict], dict]) -> dict:
    """Change of each component (mL) between the prior and the current images.

    backend: a segmenter with ``segment_arrays(arrays, mask, spacing_zyx)``;
    images: role -> (current, prior) (z, y, x) arrays on one grid (the prior
    registered and intensity-matched to the current); mask: the brain of both
    timepoints on that grid (the same for both); spacing_zyx: voxel size, mm;
    components: name -> selector of its voxels in a BraTS label map;
    prior_labels: the prior's own segmentation on that grid; change: the step's
    ``_change(prior_ml, current_ml)`` (mL and % entries).
    As the other paired measures: the prior's own component volume plus the
    change of the two joint segmentations is the current volume (each entry
    also gives ``joint_prior_ml`` / ``joint_current_ml``, the two joint
    volumes, and ``seconds``). {} when the backend cannot segment arrays or
    there is no FLAIR."""
    if not hasattr(backend, "segment_arrays") or "flair" not in images:
        return {}
    t0 = time.monotonic()
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    lab_now, _ = backend.segment_arrays({r: pair[0] for r, pair in images.items()}, mask, spacing_zyx)
    lab_before, _ = backend.segment_arrays({r: pair[1] for r, pair in images.items()}, mask, spacing_zyx)
    seconds = round(time.monotonic() - t0, 2)
    out = {}
    for key, select in components.items():
        joint_before = float(np.count_nonzero(select(lab_before))) * voxel_ml
        joint_now = float(np.count_nonzero(select(lab_now))) * voxel_ml
        prior_ml = float(np.count_nonzero(select(prior_labels))) * voxel_ml
        entry = change({key: prior_ml}, {key: max(0.0, prior_ml + joint_now - joint_before)})[key]
        entry.update(joint_prior_ml=round(joint_before, 3), joint_current_ml=round(joint_now, 3),
                     method="joint segmentation of the registered pair", seconds=seconds)
        out[key] = entry
    return out
