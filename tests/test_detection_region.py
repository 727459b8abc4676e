"""Where lesion candidates may lie (pipelines/longitudinal_images.detection_region):
the common brain less ``edge_margin_mm``, at the brain's own edge and where the
brain reaches the edge of the volume (a field of view cut through the cerebellum;
thick-FLAIR follow-ups reported FLAIR "new lesions" on the two lowest slices)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from brainline.pipelines.longitudinal_images import detection_region


def _mask(arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    return img


def test_brain_cut_by_the_volume_edge_is_eroded_there():
    brain = np.zeros((30, 30, 30), bool)
    brain[:20, 5:25, 5:25] = True              # reaches the lowest slice (z index 0)
    region = detection_region(_mask(brain), 4.0)
    assert not region[:4].any()                # within 4 mm of the volume's edge
    assert region[4:16, 10:20, 10:20].all()    # deeper than 4 mm from every edge
    assert not region[16:].any() and not region[:, :9].any() and not region[:, 21:].any()


def test_margin_follows_the_voxel_size_and_zero_is_no_erosion():
    brain = np.zeros((20, 40, 40), bool)
    brain[2:18, 4:36, 4:36] = True
    region = detection_region(_mask(brain, (2.0, 2.0, 5.0)), 4.0)   # x, y 2 mm (2 voxels), z 5 mm (1 voxel)
    zs = np.nonzero(region.any(axis=(1, 2)))[0]
    ys = np.nonzero(region.any(axis=(0, 2)))[0]
    assert (zs.min(), zs.max()) == (3, 16) and (ys.min(), ys.max()) == (6, 33)
    assert (detection_region(_mask(brain), 0.0) == brain).all()
