"""Accuracy of the built-in baseline segmenter on the shared real cases.

tcga-du-7294 (TCGA-LGG): Dice of whole tumour (WT, label > 0) and tumour core
(TC: NCR + ET; BraTS 2020 labels 1 + 4) against each reference in
``segmentations/`` (the two fusions and the five BraTS 2020 algorithms), with
the volumes in mL. For context, the same Dice of each algorithm against
``fusion_simple`` (how far apart trained networks are on this case).

brats-gli-00001-000 (glioblastoma, no reference): volumes per region, as
distributed (not bias-corrected) and, with ``--n4``, after the image
pipeline's own N4 (``PipelineConfig().n4``, pipelines/bias_correction.py).

Tumour-free variants: WT volume when the healthy hemisphere is mirrored over
the tumour, and when only the tumour region is replaced by mirrored tissue.

Inputs are NIfTI files plus a brain mask NIfTI (t1c > 0), exactly what the
pipeline hands a backend. Usage::

    python bench/baseline_accuracy.py [--n4] [--json results.json]

Exit status 0; 1 if WT Dice vs fusion_simple is below 0.85.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.baseline_generalisation import pipeline_n4  # noqa: E402
from brainline.models.base import ED, ET, NCR  # noqa: E402
from brainline.models.baseline import BaselineSegmenter  # noqa: E402
from brainline.models.metrics import dice, volume_ml  # noqa: E402
from tests.segmentation_cases import (  # noqa: E402
    BRATS,
    BRATS_FILES,
    REFERENCES,
    TCGA,
    TCGA_FILES,
    load_arrays,
    make_input,
    mirror_x,
)

WT_DICE_REQUIRED = 0.85


def n4(arrays: dict) -> dict:
    """N4 exactly as the image pipeline runs it (bench/baseline_generalisation.py
    ``pipeline_n4``). Arrays are (z, y, x) of a 1 mm isotropic BraTS case (the
    images get 1 mm spacing, which N4's knot distance uses)."""
    corrected, _ = pipeline_n4({role: sitk.GetImageFromArray(a.astype(np.float32)) for role, a in arrays.items()})
    return {role: sitk.GetArrayFromImage(image) for role, image in corrected.items()}


def regions(labels: np.ndarray, brats2020: bool = False) -> dict:
    et_v = 4 if brats2020 else ET
    ncr_v = 1 if brats2020 else NCR
    return {"WT": labels > 0, "TC": np.isin(labels, (ncr_v, et_v)), "ET": labels == et_v}


def vols(labels, spacing, brats2020=False) -> dict:
    r = regions(labels, brats2020)
    ed_v = 2 if brats2020 else ED
    ncr_v = 1 if brats2020 else NCR
    return {"WT": volume_ml(r["WT"], spacing), "TC": volume_ml(r["TC"], spacing),
            "ET": volume_ml(r["ET"], spacing), "NCR": volume_ml(labels == ncr_v, spacing),
            "ED": volume_ml(labels == ed_v, spacing)}


def timed_segment(inputs):
    t0 = time.perf_counter()
    out = BaselineSegmenter().segment(inputs)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n4", action="store_true", help="also run brats-gli-00001-000 after N4")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    args = ap.parse_args(argv)
    result: dict = {"version": BaselineSegmenter.version}
    with tempfile.TemporaryDirectory(prefix="baseline_bench_") as tmp:
        tmp = Path(tmp)
        # --- TCGA with references
        inputs = make_input(tmp / "tcga", TCGA, TCGA_FILES)
        out, seconds = timed_segment(inputs)
        sp = inputs.spacing_mm
        ours = regions(out.labels)
        v = vols(out.labels, sp)
        print(f"# Baseline segmenter {BaselineSegmenter.version} on tcga-du-7294 "
              f"(segment() {seconds:.2f} s incl. reading NIfTI; compute {out.details['runtime_s']:.2f} s)\n")
        print("| reference | WT Dice | TC Dice | ref WT mL | ref TC mL | ref ET mL | algo vs fusion_simple WT / TC |")
        print("|---|---|---|---|---|---|---|")
        fusion = sitk.GetArrayFromImage(sitk.ReadImage(str(TCGA / "segmentations" / "fusion_simple.nii.gz")))
        fr = regions(fusion, True)
        rows = {}
        for name in REFERENCES:
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(TCGA / "segmentations" / f"{name}.nii.gz")))
            rr = regions(ref, True)
            rv = vols(ref, sp, True)
            row = {"wt_dice": dice(ours["WT"], rr["WT"]), "tc_dice": dice(ours["TC"], rr["TC"]),
                   "ref_volumes_ml": rv,
                   "ref_vs_fusion_simple": {"wt_dice": dice(rr["WT"], fr["WT"]),
                                            "tc_dice": dice(rr["TC"], fr["TC"])}}
            rows[name] = row
            ctx = ("-" if name == "fusion_simple" else
                   f"{row['ref_vs_fusion_simple']['wt_dice']:.3f} / {row['ref_vs_fusion_simple']['tc_dice']:.3f}")
            print(f"| {name} | {row['wt_dice']:.3f} | {row['tc_dice']:.3f} | {rv['WT']:.2f} | "
                  f"{rv['TC']:.2f} | {rv['ET']:.2f} | {ctx} |")
        print(f"\nbaseline volumes (mL): WT {v['WT']:.2f}, TC {v['TC']:.2f}, ET {v['ET']:.2f}, "
              f"NCR {v['NCR']:.2f}, ED {v['ED']:.2f}")
        result["tcga-du-7294"] = {"references": rows, "volumes_ml": v, "segment_s": seconds,
                                  "compute_s": out.details["runtime_s"],
                                  "components": out.details["components"]}

        # --- tumour-free variants
        arrays = load_arrays(TCGA, TCGA_FILES)
        mask = arrays["t1c"] > 0
        xs = np.arange(mask.shape[2])
        bx = np.flatnonzero(mask.any(axis=(0, 1)))
        mid = (bx[0] + bx[-1]) / 2.0
        tumour_low = np.flatnonzero(fr["WT"].any(axis=(0, 1))).mean() < mid
        side = (xs < mid) if tumour_low else (xs > mid)
        variants = {
            "hemisphere mirrored": mirror_x(arrays, mask, side[None, None, :]),
            "tumour region replaced": mirror_x(arrays, mask, ndi.binary_dilation(fr["WT"], iterations=5)),
        }
        print("\n## Tumour-free variants of tcga-du-7294\n")
        print("| variant | WT mL | largest seed candidate mL |")
        print("|---|---|---|")
        result["tumour_free"] = {}
        for i, (name, arr) in enumerate(variants.items()):
            o, _ = timed_segment(make_input(tmp / f"healthy{i}", TCGA, TCGA_FILES, arr))
            wt = volume_ml(o.labels > 0, sp)
            cand = o.details["components"]["largest_seed_candidate_ml"]
            print(f"| {name} | {wt:.2f} | {cand:.3f} |")
            result["tumour_free"][name] = {"wt_ml": wt, "largest_seed_candidate_ml": cand}

        # --- BraTS glioblastoma, no reference
        print("\n## brats-gli-00001-000 (glioblastoma, no reference)\n")
        print("| input | WT mL | TC mL | ET mL | NCR mL | ED mL | compute s |")
        print("|---|---|---|---|---|---|---|")
        runs = {"as distributed": make_input(tmp / "brats", BRATS, BRATS_FILES)}
        if args.n4:
            runs["after N4"] = make_input(tmp / "brats_n4", BRATS, BRATS_FILES, n4(load_arrays(BRATS, BRATS_FILES)))
        result["brats-gli-00001-000"] = {}
        for name, inp in runs.items():
            o, _ = timed_segment(inp)
            bv = vols(o.labels, inp.spacing_mm)
            print(f"| {name} | {bv['WT']:.2f} | {bv['TC']:.2f} | {bv['ET']:.2f} | {bv['NCR']:.2f} | "
                  f"{bv['ED']:.2f} | {o.details['runtime_s']:.2f} |")
            result["brats-gli-00001-000"][name] = {"volumes_ml": bv, "compute_s": o.details["runtime_s"],
                                                   "components": o.details["components"]}

    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    ok = rows["fusion_simple"]["wt_dice"] >= WT_DICE_REQUIRED
    print(f"\nWT Dice vs fusion_simple {rows['fusion_simple']['wt_dice']:.3f} "
          f"({'>=' if ok else '<'} {WT_DICE_REQUIRED})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
