"""Build the BraTS-space (SRI24 frame, 1 mm) templates that the model-space
step registers studies to (``pipelines/model_space.py``).

One-off, deterministic. Input: the six *tuning* cases of
``../shared/data/brats18`` (``tests.corpus.TUNE_CASES``), which BraTS
distributes co-registered to the SRI24 atlas frame, 1 mm isotropic,
skull-stripped (240 x 240 x 155 voxels). The held-out cases are not used, so
that the held-out accuracy figures stay blind to the template.

For each of T1 and T1c: every case is normalised to a robust z-score of its
brain (median and 1.4826*MAD of the non-zero voxels), the six are averaged
voxel by voxel where at least half of them have brain, and the average is
stored as uint8 (``z * 40 + 100``, clipped to 1..255; 0 outside the brain) in
``models/templates/brats18_<role>.nii.gz`` with the BraTS grid (size,
spacing, origin, direction) unchanged. Mutual information does not need the
intensity scale, only the structure.

Usage::

    python scripts/build_brats_template.py [--data ../shared/data/brats18] [--out models/templates]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.corpus import TUNE_CASES  # noqa: E402

FILE_ROLE = {"t1": "t1", "t1c": "t1ce"}


def robust_z(values: np.ndarray) -> tuple[float, float]:
    med = float(np.median(values))
    sd = 1.4826 * float(np.median(np.abs(values - med)))
    return med, sd if sd > 0 else float(values.std() or 1.0)


def build(data: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cases = list(TUNE_CASES)
    record = {"cases": cases, "source": "BraTS 2018 training data (tuning half), SRI24 frame, 1 mm",
              "files": {}}
    for role, suffix in FILE_ROLE.items():
        total = count = reference = None
        for case in cases:
            path = data / f"Brats18_{case}_1" / f"Brats18_{case}_1_{suffix}.nii.gz"
            image = sitk.ReadImage(str(path), sitk.sitkFloat32)
            a = sitk.GetArrayFromImage(image)
            brain = a > 0
            med, sd = robust_z(a[brain])
            z = np.where(brain, (a - med) / sd, 0.0)
            total = z if total is None else total + z
            count = brain.astype(np.int32) if count is None else count + brain
            reference = reference or image
        inside = count >= (len(cases) + 1) // 2
        mean = np.where(inside, total / np.maximum(count, 1), 0.0)
        u8 = np.where(inside, np.clip(mean * 40.0 + 100.0, 1, 255), 0).astype(np.uint8)
        template = sitk.GetImageFromArray(u8)
        template.CopyInformation(reference)
        name = f"brats18_{role}.nii.gz"
        sitk.WriteImage(template, str(out / name), useCompression=True)
        record["files"][role] = name
        print(f"{name}: {int(inside.sum())} brain voxels from {len(cases)} cases")
    (out / "templates.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "brats18")
    ap.add_argument("--out", type=Path, default=REPO / "models" / "templates")
    args = ap.parse_args(argv)
    build(args.data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
