"""Does the built-in baseline segmenter generalise? Dice on the 13 corpus cases,
split into the tuning half and the held-out half, against the naive floor.

Cases: the 12 BraTS 2018 cases of ``../shared/data/brats18`` (expert labels)
and tcga-du-7294 (reference ``fusion_simple``), as published (1 mm, skull-
stripped), N4-corrected exactly as the image pipeline does it
(``PipelineConfig().n4`` inside the brain mask). The split is
``tests.corpus.TUNE_CASES`` / ``HOLDOUT_CASES``: the baseline's tuned constants
were chosen on the tuning half only (see ``models/baseline.py``).

Named baseline: the naive floor of issue 7, FLAIR z > 1 inside the same brain
mask (z = (FLAIR - mean) / std over the mask). For each case the table prints
WT/TC/ET Dice of the baseline, WT Dice of the floor and their ratio; then
means per half and the number of cases below the floor.

``--roles t1c,flair`` runs the minimal protocol (pattern d inputs). The
clinical-like acquisitions (thick tilted slices) through the whole service
are measured by ``bench/corpus.py``.

Usage::

    python bench/baseline_generalisation.py [--roles t1,t1c,t2,flair] [--cases ...] [--json F]

Exit status 1 when any case falls below the floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainline.models.baseline import BaselineSegmenter  # noqa: E402
from brainline.pipelines.bias_correction import n4_correct  # noqa: E402
from brainline.pipelines.image_pipeline import PipelineConfig  # noqa: E402
from brainline.pipelines.skull_strip import apply_mask  # noqa: E402
from tests.corpus import REGIONS, corpus_cases, dice  # noqa: E402


def pipeline_n4(images: dict[str, sitk.Image]) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """N4 exactly as the image pipeline runs it (``PipelineConfig().n4``,
    ``n4_correct``) inside the brain mask of skull-stripped inputs: the union
    of the non-zero voxels of every sequence, holes filled; each corrected
    image masked (0 outside). Returns (role -> corrected image, mask)."""
    mask = None
    for image in images.values():
        nonzero = sitk.Cast(image > 0, sitk.sitkUInt8)
        mask = nonzero if mask is None else (mask | nonzero)
    mask = sitk.BinaryFillhole(mask)
    n4 = PipelineConfig().n4
    return {r: apply_mask(n4_correct(im, mask, n4, name=r).corrected, mask) for r, im in images.items()}, mask


def preprocess(case) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, tuple]:
    """N4-corrected (z, y, x) arrays, brain mask (union of non-zero voxels,
    holes filled), reference labels (4 -> 3) and the spacing in mm (z, y, x)."""
    images = {r: sitk.ReadImage(str(p), sitk.sitkFloat32) for r, p in case.images.items()}
    corrected, mask = pipeline_n4(images)
    arrays = {r: sitk.GetArrayFromImage(im) for r, im in corrected.items()}
    m = sitk.GetArrayFromImage(mask) > 0
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(case.reference))).astype(np.uint8)
    ref[ref == 4] = 3
    return arrays, m, ref, tuple(float(s) for s in mask.GetSpacing()[::-1])


def naive_floor(flair: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inside = flair[mask]
    return mask & ((flair - inside.mean()) / inside.std() > 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roles", default="t1,t1c,t2,flair", help="inputs given to the segmenter")
    ap.add_argument("--cases", default=None, help="comma-separated corpus case ids (default: all 13)")
    ap.add_argument("--json", default=None, help="write all figures here")
    args = ap.parse_args(argv)
    roles = [r for r in args.roles.split(",") if r]
    cases = corpus_cases(cases=args.cases.split(",") if args.cases else None)
    segmenter = BaselineSegmenter()
    rows = []
    for case in tqdm(cases, desc="cases", unit="case"):
        arrays, mask, ref, spacing = preprocess(case)
        t0 = time.perf_counter()
        labels, _ = segmenter.segment_arrays({r: arrays[r] for r in roles}, mask, spacing)
        elapsed = time.perf_counter() - t0
        row = {"case": case.case_id, "split": case.split, "seconds": round(elapsed, 2),
               "floor_WT": dice(naive_floor(arrays["flair"], mask), ref > 0)}
        for name, values in REGIONS.items():
            r = np.isin(ref, values)
            row[name] = dice(np.isin(labels, values), r) if r.any() else None
        row["WT_ml"] = round(float((labels > 0).sum()) / 1000, 1)
        row["WT_ref_ml"] = round(float((ref > 0).sum()) / 1000, 1)
        rows.append(row)

    def f(v):
        return "    -" if v is None else f"{v:5.3f}"

    print(f"\nbaseline {segmenter.version}, inputs {','.join(roles)}; named baseline: naive FLAIR z>1 floor")
    print(f"{'case':13s} {'split':7s}    WT    TC    ET  floor  WT/floor  WT mL (ref)")
    for r in rows:
        ratio = r["WT"] / r["floor_WT"] if r["floor_WT"] else float("nan")
        print(f"{r['case']:13s} {r['split']:7s} {f(r['WT'])} {f(r['TC'])} {f(r['ET'])} {f(r['floor_WT'])}  {ratio:8.2f}"
              f"  {r['WT_ml']:6.1f} ({r['WT_ref_ml']:.1f})")
    summary = {}
    for split in ("tune", "holdout"):
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        means = {k: float(np.mean([r[k] for r in part if r[k] is not None] or [np.nan]))
                 for k in ("WT", "TC", "ET", "floor_WT")}
        below = [r["case"] for r in part if r["WT"] < r["floor_WT"]]
        summary[split] = {**{k: round(v, 3) for k, v in means.items()}, "cases": len(part), "below_floor": below}
        print(f"{split:8s} ({len(part)} cases): mean WT {means['WT']:.3f}  TC {means['TC']:.3f}  ET {means['ET']:.3f}"
              f"  | floor WT {means['floor_WT']:.3f}  ratio {means['WT'] / means['floor_WT']:.2f}"
              f"  | below floor: {len(below)} {below if below else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps({"version": segmenter.version, "roles": roles,
                                               "rows": rows, "summary": summary}, indent=2))
    return 1 if any(r["WT"] < r["floor_WT"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
