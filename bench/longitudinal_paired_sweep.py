"""Choose the paired volume-change measure of the longitudinal step by measurement.

Reads the pairs that ``bench/longitudinal.py --out DIR`` processed (grown and
no-change variants; their ``longitudinal/`` outputs must exist), rebuilds on the
current grid what the step compared (the current image = subtraction + matched
prior where the subtraction is defined; the prior segmentation carried by the
registration recorded in ``longitudinal.json``), and evaluates the boundary shift
integral (``pipelines.longitudinal.bsi_change``) over a grid of clip windows and
band widths, per component (WT on FLAIR; TC on T1c, also over the core's tissue level,
brain or oedema, and whether its integral is limited to the tumour). Each component's
setting is chosen on the tune cases only (``tests.corpus.TUNE_CASES``: smallest mean
relative growth error on grown pairs, with every no-change pair within ``--nochange-ml``
mL); the held-out cases are then reported with that setting, apart.

    .venv/bin/python bench/longitudinal_paired_sweep.py --out /tmp/followup [--json /tmp/sweep.json]

``--labels truth`` puts the generator's truth label maps (``truth/labels_current``,
``truth/labels_prior`` carried by the same registration) in place of the two
segmentations: the band and the levels are then exact, so what error remains is the
intensity measure's own on these images (is the segmenter the limit, or the measure?).

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
BANDS_IN = [0.0, 1.0, 2.0, 3.0]
COMPONENTS = ("whole_tumor", "tumor_core")


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load_compared(root: Path, labels: str = "segmentations") -> dict | None:
    """What the step compared, on the current grid cropped to the brain box: labels
    of both timepoints (the segmentations, or ``labels="truth"`` the generator's truth
    label maps), per role (current, matched prior, where defined), truth."""
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
    cur_lab = sitk.GetArrayFromImage(grid)
    if labels == "truth":
        truth_cur, truth_prior = pair.truth_image("labels_current"), pair.truth_image("labels_prior")
        if truth_cur.GetSize() != grid.GetSize() or truth_prior.GetSize() != prior_seg.GetSize():
            return None
        truth_cur.CopyInformation(grid)
        truth_prior.CopyInformation(prior_seg)
        cur_lab, prior_seg = sitk.GetArrayFromImage(sitk.Cast(truth_cur, sitk.sitkUInt8)), \
            sitk.Cast(truth_prior, sitk.sitkUInt8)
    prior_lab = sitk.GetArrayFromImage(sitk.Resample(prior_seg, grid, tx, sitk.sitkNearestNeighbor, 0,
                                                     sitk.sitkUInt8))
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


CORE_OPTIONS = [("oedema", True), ("brain", False), ("oedema", False), ("brain", True)]


def prepare(p: dict, lc: LongitudinalConfig) -> None:
    """Levels and boundary distances of each component, once per pair: the whole
    tumour as the step sets it, the core (TC) for every level / band option of
    CORE_OPTIONS (``bsi_core_tissue``, ``bsi_core_within_tumour``)."""
    p["bsi"] = {}
    for core_tissue, within_tumour in CORE_OPTIONS:
        inputs = bsi_inputs(p["cur_lab"], p["prior_lab"], p["images"], p["spacing_zyx"], lc.bsi_tissue_distance_mm,
                            core_tissue, within_tumour)
        for key, (cur, pri, within, before, now, t, l, _role) in inputs.items():
            option = None if key == "whole_tumor" else (core_tissue, within_tumour)
            if key not in COMPONENTS or (key, option) in p["bsi"]:
                continue
            outside, inside = boundary_distances(before, now, p["spacing_zyx"])
            keep = within & (outside <= max(BANDS_OUT))             # no band reaches further
            p["bsi"][(key, option)] = (cur[keep], pri[keep], outside[keep].astype(np.float32),
                                       None if inside is None else inside[keep].astype(np.float32), t, l)


def evaluate(pairs: list[dict], key: str, option, window, out_mm: float, in_mm: float) -> list[dict]:
    """One component, one setting: signed relative growth error (grown pairs) or the
    change in mL (no-change pairs), per pair."""
    rows = []
    for p in pairs:
        row = {"name": p["name"], "split": p["split"], "variant": p["variant"], "value": None}
        vox = float(np.prod(p["spacing_zyx"]))
        if (key, option) in p["bsi"]:
            cur, pri, outside, inside, t, l = p["bsi"][(key, option)]
            band = outside <= out_mm
            if inside is not None:
                band &= ~(inside > in_mm)
            delta = boundary_shift(cur, pri, band, t, l, window, vox)["delta_mm3"]
            if delta is not None:
                true = float(p["true_mm3"][key])
                if p["variant"] == "grown":
                    row["value"] = (delta - true) / true if true > 0 else None
                else:
                    row["value"] = delta / 1000.0
        rows.append(row)
    return rows


def summary(rows: list[dict], split: str) -> dict:
    grown = [r for r in rows if r["split"] == split and r["variant"] == "grown" and r["value"] is not None]
    still = [r for r in rows if r["split"] == split and r["variant"] == "nochange" and r["value"] is not None]
    errs = [abs(r["value"]) for r in grown]
    return {"grown_pairs": len(grown), "mean_error": float(np.mean(errs)) if errs else None,
            "max_error": float(np.max(errs)) if errs else None,
            "signed_errors": {r["name"]: round(r["value"], 3) for r in grown},
            "nochange_max_abs_ml": max([abs(r["value"]) for r in still], default=None),
            "nochange_ml": {r["name"]: round(r["value"], 2) for r in still}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the --out folder of bench/longitudinal.py")
    ap.add_argument("--nochange-ml", type=float, default=1.0, help="largest |change| allowed on no-change pairs")
    ap.add_argument("--config", type=Path, default=None, help="config/longitudinal.yaml (tissue distance)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--labels", choices=("segmentations", "truth"), default="segmentations",
                    help="the label maps that set the band and the levels: the two segmentations (as the step) or "
                         "the generator's truth (what the intensity measure can do with exact labels)")
    args = ap.parse_args(argv)
    lc = LongitudinalConfig.load(args.config)
    pairs = []
    for root in sorted(args.out.iterdir()):
        if not (root / "truth.json").exists() or not root.name.endswith(("_grown", "_nochange")):
            continue
        if not (root / "current" / "longitudinal.json").exists():
            continue
        p = load_compared(root, args.labels)
        if p is not None:
            prepare(p, lc)
            del p["images"], p["cur_lab"], p["prior_lab"]
            pairs.append(p)
    print(f"{len(pairs)} processed pairs: " + ", ".join(f"{p['name']} ({p['split']})" for p in pairs), flush=True)
    chosen = {}
    results = []
    for key in COMPONENTS:
        options = [None] if key == "whole_tumor" else CORE_OPTIONS
        rows_of = []
        for option, window, out_mm, in_mm in itertools.product(options, WINDOWS, BANDS_OUT, BANDS_IN):
            rows = evaluate(pairs, key, option, window, out_mm, in_mm)
            res = {"component": key, "core_option": option, "window": window, "band_out_mm": out_mm,
                   "band_in_mm": in_mm, "tune": summary(rows, "tune"), "holdout": summary(rows, "holdout")}
            rows_of.append(res)
            t = res["tune"]
            print(f"{key} {option or ''} window {window} out {out_mm:g} in {in_mm:g}: tune mean |error| "
                  f"{t['mean_error']}, signed {t['signed_errors']}, no-change {t['nochange_ml']} mL", flush=True)
        results += rows_of
        ok = [r for r in rows_of if r["tune"]["mean_error"] is not None
              and (r["tune"]["nochange_max_abs_ml"] or 0.0) <= args.nochange_ml]
        best = min(ok or rows_of,
                   key=lambda r: r["tune"]["mean_error"] if r["tune"]["mean_error"] is not None else 9e9)
        chosen[key] = best
        print(f"\n{key}: chosen on the tune half:",
              json.dumps({k: best[k] for k in ("core_option", "window", "band_out_mm", "band_in_mm")}))
        print("tune:", json.dumps(best["tune"]))
        print("held-out (not used for the choice):", json.dumps(best["holdout"]), "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"chosen": chosen, "all": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
