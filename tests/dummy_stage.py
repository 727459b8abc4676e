"""A dummy image stage for tests/test_stage_table.py: one module plus one
stage table entry (``STAGE``), added through the table's public API in
process and through the ``brainline.stages`` entry-point group in serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brainline.pipelines.image_pipeline import PipelineConfig, _cached
from brainline.pipelines.stage_table import Stage


def step_tumour_voxels(work: Path, cfg: PipelineConfig) -> dict:
    """The number of tumour voxels (label > 0) of ``segmentation.nii.gz`` and
    the voxel volume (mL); writes ``tumour_voxels.json``."""

    def run() -> dict:
        seg = sitk.ReadImage(str(work / "segmentation.nii.gz"))
        return {"voxels": int((sitk.GetArrayViewFromImage(seg) > 0).sum()),
                "voxel_ml": float(np.prod(seg.GetSpacing())) / 1000.0}

    return _cached(work, "tumour_voxels", run)


STAGE = Stage("tumour_voxels", "tumour voxel count", step_tumour_voxels,
              reads=("segmentation.nii.gz",), writes=("tumour_voxels.json",), after="segment")
