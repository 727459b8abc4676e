"""Choose the paired volume-change measure of the longitudinal step by measurement.

Reads the pairs that ``bench/longitudinal.py --out DIR`` processed (grown and
no-change variants; their ``longitudinal/`` outputs must exist), rebuilds on the
current grid what the step compared (the current image = subtraction + matched
prior where the subtraction is defined; the prior segmentation carried by the
registration recorded in ``longitudinal.json``), and evaluates the boundary shift
integral (``pipelines.longitudinal.bsi_change``) over a grid of clip windows and
band widths. The setting is chosen on the tune cases only (``tests.corpus.TUNE_CASES``:
smallest mean relative growth error of WT and TC on grown pairs, with every no-change
pair within ``--nochange-ml`` mL); the held-out cases are then reported with that
setting, apart.

    .venv/bin/python bench/longitudinal_paired_sweep.py --out /tmp/followup [--json /tmp/sweep.json]

Units: volumes in mm^3 (errors relative to the true growth), changes of no-change
pairs in mL.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainline.pipelines.boundary_shift import boundary_distances, boundary_shift  # noqa: E402
from brainline.pipelines.longitudinal import LongitudinalConfig, bsi_inputs  # noqa: E402
from tests.corpus import TUNE_CASES  # noqa: E402
from tests.synthetic_followup import load_pair  # noqa: E402

WINDOWS = [(0.0, 1.0), (0.1, 0.9), (0.25, 0.75), (0.35, 0.65), (0.4, 0.8), (0.2, 0.6), (0.1, 0.5), (0.3, 0.9)]
BANDS_OUT = [3.0, 6.0, 9.0, 12.0, 16.0]
BANDS_IN = [1.0, 3.0]
COMPONENTS = ("whole_tumor", "tumor_core")


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load_compared(root: Path) -> dict | None:
    """What the step compared, on the current grid cropped to the brain box: labels
    of both timepoints, per role (current, matched prior, where defined), truth."""
    pair = load_pair(root)
    work = pair.current
    rec = json.loads((work / "longitudinal.json").read_text())
    params = ((rec.get("comparison") or {}).get("registration") or {}).get("parameters") or {}
    if "matrix" not in params or not (work / "longitudinal" / "subtraction_flair.nii.gz").exists():
        return None
    grid = sitk.ReadImage(str(work / "segmentation.nii.gz"), sitk.sitkUInt8)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([float(v) for row in params["matrix"] for v in row])
    tx.SetCenter([float(v) for v in params["center_mm"]])
    tx.SetTranslation([float(v) for v in params["translation_mm"]])
    prior_seg = sitk.ReadImage(str(pair.prior / "segmentation.nii.gz"), sitk.sitkUInt8)
    prior_lab = sitk.GetArrayFromImage(sitk.Resample(prior_seg, grid, tx, sitk.sitkNearestNeighbor, 0,
                                                     sitk.sitkUInt8))
    cur_lab = sitk.GetArrayFromImage(grid)
    mask = _array(work / "brain_mask.nii.gz") > 0
    nz = np.argwhere(mask)
    crop = tuple(slice(max(0, int(a) - 9), int(b) + 10) for a, b in zip(nz.min(axis=0), nz.max(axis=0)))
    images = {}
    for role in ("flair", "t1c"):
        d = _array(work / "longitudinal" / f"subtraction_{role}.nii.gz")[crop]
        p = _array(work / "longitudinal" / f"prior0_{role}.nii.gz")[crop]
        within = (d != 0) & (p != 0)
        images[role] = (np.where(within, d + p, 0.0).astype(np.float32), p, within)
    return {"name": root.name, "case": pair.case_id, "variant": pair.variant,
            "split": "tune" if pair.case_id in TUNE_CASES else "holdout",
            "true_mm3": pair.truth["change_mm3"], "cur_lab": cur_lab[crop], "prior_lab": prior_lab[crop],
            "images": images, "spacing_zyx": grid.GetSpacing()[::-1],
            "step_paired": (rec.get("change") or {}).get("vs_prior_paired"),
            "step_methods": (rec.get("change") or {}).get("paired_methods")}


def prepare(p: dict, tissue_distance_mm: float) -> None:
    """Levels and boundary distances of each component, once per pair."""
    p["bsi"] = {}
    for key, (cur, pri, within, before, now, t, l, _role) in bsi_inputs(
            p["cur_lab"], p["prior_lab"], p["images"], p["spacing_zyx"], tissue_distance_mm).items():
        outside, inside = boundary_distances(before, now, p["spacing_zyx"])
        p["bsi"][key] = (cur[within], pri[within], outside[within],
                         None if inside is None else inside[within], t, l)


def evaluate(pairs: list[dict], window, out_mm: float, in_mm: float) -> list[dict]:
    rows = []
    for p in pairs:
        row = {"name": p["name"], "split": p["split"], "variant": p["variant"]}
        vox = float(np.prod(p["spacing_zyx"]))
        for k in COMPONENTS:
            delta = None
            if k in p["bsi"]:
                cur, pri, outside, inside, t, l = p["bsi"][k]
                band = outside <= out_mm
                if inside is not None:
                    band &= ~(inside > in_mm)
                delta = boundary_shift(cur, pri, band, t, l, window, vox)["delta_mm3"]
            if p["variant"] == "grown":
                true = float(p["true_mm3"][k])
                row[k] = None if delta is None or true <= 0 else (delta - true) / true   # signed
            else:
                row[k] = None if delta is None else delta / 1000.0
        rows.append(row)
    return rows


def summary(rows: list[dict], split: str) -> dict:
    grown = [r for r in rows if r["split"] == split and r["variant"] == "grown"]
    still = [r for r in rows if r["split"] == split and r["variant"] == "nochange"]
    errs = [abs(r[k]) for r in grown for k in COMPONENTS if r[k] is not None]
    return {"grown_pairs": len(grown), "mean_error": float(np.mean(errs)) if errs else None,
            "max_error": float(np.max(errs)) if errs else None,
            "signed_errors": {r["name"]: {k: None if r[k] is None else round(r[k], 3) for k in COMPONENTS}
                              for r in grown},
            "nochange_max_abs_ml": max([abs(r[k]) for r in still for k in COMPONENTS if r[k] is not None],
                                       default=None),
            "nochange_ml": {r["name"]: {k: None if r[k] is None else round(r[k], 2) for k in COMPONENTS}
                            for r in still}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the --out folder of bench/longitudinal.py")
    ap.add_argument("--nochange-ml", type=float, default=1.0, help="largest |change| allowed on no-change pairs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    pairs = []
    for root in sorted(args.out.iterdir()):
        if not (root / "truth.json").exists() or not root.name.endswith(("_grown", "_nochange")):
            continue
        if not (root / "current" / "longitudinal.json").exists():
            continue
        p = load_compared(root)
        if p is not None:
            prepare(p, LongitudinalConfig.load().bsi_tissue_distance_mm)
            del p["images"], p["cur_lab"], p["prior_lab"]
            pairs.append(p)
    print(f"{len(pairs)} processed pairs: " + ", ".join(f"{p['name']} ({p['split']})" for p in pairs), flush=True)
    results = []
    for window, out_mm, in_mm in itertools.product(WINDOWS, BANDS_OUT, BANDS_IN):
        rows = evaluate(pairs, window, out_mm, in_mm)
        res = {"window": window, "band_out_mm": out_mm, "band_in_mm": in_mm,
               "tune": summary(rows, "tune"), "holdout": summary(rows, "holdout")}
        results.append(res)
        t = res["tune"]
        print(f"window {window} out {out_mm:g} in {in_mm:g}: tune mean error {t['mean_error']}, "
              f"no-change max {t['nochange_max_abs_ml']} mL", flush=True)
    ok = [r for r in results if r["tune"]["mean_error"] is not None
          and (r["tune"]["nochange_max_abs_ml"] or 0.0) <= args.nochange_ml]
    best = min(ok or results, key=lambda r: r["tune"]["mean_error"] if r["tune"]["mean_error"] is not None else 9e9)
    print("\nchosen on the tune half:", json.dumps({k: best[k] for k in ("window", "band_out_mm", "band_in_mm")}))
    print("tune:", json.dumps(best["tune"], indent=1))
    print("held-out (not used for the choice):", json.dumps(best["holdout"], indent=1))
    if args.json:
        args.json.write_text(json.dumps({"chosen": best, "all": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
