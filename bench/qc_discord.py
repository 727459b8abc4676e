"""Does ensemble discord predict segmentation failure? Kofler-style alarms on
the 12 shared BraTS 2018 cases with the built-in baseline segmenter.

For each case (``../shared/data/brats18``, expert reference labels; 1 mm,
skull-stripped, SRI24 space) the baseline (``models/baseline.py``) is run to
make several candidate segmentations:

* ``baseline``: all four sequences, default parameters (the delivered result);
* ``flip_x``: test-time flip along the left-right array axis (inputs flipped,
  result flipped back);
* ``t1c_flair``: the minimal-protocol view (T1c + FLAIR only);
* ``split_0.3`` / ``split_0.5``: parameter-perturbed baselines (the tuned
  lesion/surroundings split of 0.4 moved to its tried neighbours).

The candidates are fused by majority vote, each candidate's Dice to the fusion
is computed per region (WT, TC, ET), and alarms follow
``pipelines.segmentation_qc.discord_alarms`` (alpha = 0.1; below median -
alpha * MAD of that candidate's history, or undefined) with a leave-one-out
history: the other 11 cases. Reported: Pearson and Spearman correlation of the
risk score (all regions; WT only) and of the mean WT Dice-to-fusion with the
true WT Dice of the delivered ``baseline`` (and of the fusion), as Kofler et
al. did (r = -0.72 for the risk score on 68 glioma cases with five BraTS
algorithms), and the alarm rate on failures (true WT Dice < 0.7) and on the
rest.

Inputs are NOT N4-corrected by default (N4 takes minutes per case on the 2
shared cores; ``--n4`` applies it as ``bench/baseline_generalisation.py``
does), so the baseline figures differ slightly from that bench's. The
baseline's constants were tuned on six of these cases
(``tests.corpus.TUNE_CASES``): its Dice there is not blind; the split column
says which.

Segmentations are cached under ``--cache`` (default
``/tmp/brainline_qc_discord``), keyed by case, candidate, baseline version
and N4 setting, so a rerun only recomputes the statistics.

Usage::

    python bench/qc_discord.py [--cases 2013_11,...] [--n4] [--alpha 0.1] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainline.models.baseline import VERSION, BaselineSegmenter  # noqa: E402
from brainline.pipelines.segmentation_qc import (  # noqa: E402
    SegmentationQCConfig,
    dice,
    discord_alarms,
    flip_segmentations,
    region_masks,
)
from tests.corpus import BRATS18_CASES, corpus_cases  # noqa: E402

FAILURE_DICE = 0.7


def load(case, n4: bool):
    """(z, y, x) float32 arrays, brain mask (union of non-zero voxels, holes
    filled), reference labels (4 -> 3), spacing (z, y, x) in mm."""
    images = {r: sitk.ReadImage(str(p), sitk.sitkFloat32) for r, p in case.images.items()}
    mask = None
    for image in images.values():
        nonzero = sitk.Cast(image > 0, sitk.sitkUInt8)
        mask = nonzero if mask is None else (mask | nonzero)
    mask = sitk.BinaryFillhole(mask)
    if n4:
        from brainline.pipelines.bias_correction import n4_correct
        from brainline.pipelines.image_pipeline import PipelineConfig
        cfg = PipelineConfig().n4
        arrays = {r: sitk.GetArrayFromImage(n4_correct(im, mask, cfg, name=r).corrected) for r, im in images.items()}
    else:
        arrays = {r: sitk.GetArrayFromImage(im) for r, im in images.items()}
    m = sitk.GetArrayFromImage(mask) > 0
    for a in arrays.values():
        a[~m] = 0
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(case.reference))).astype(np.uint8)
    ref[ref == 4] = 3
    return arrays, m, ref, tuple(float(s) for s in mask.GetSpacing()[::-1])


def candidate_makers():
    """name -> function(arrays, mask, spacing) -> labels."""
    base = BaselineSegmenter()

    def run(seg, roles=("t1", "t1c", "t2", "flair")):
        return lambda arrays, mask, spacing: seg.segment_arrays({r: arrays[r] for r in roles}, mask, spacing)[0]

    def flipped(arrays, mask, spacing):
        return flip_segmentations(lambda a, m: base.segment_arrays(a, m, spacing)[0], arrays, mask,
                                  axes=((2,),))["flip_x"]

    return {
        "baseline": run(base),
        "flip_x": flipped,
        "t1c_flair": run(base, ("t1c", "flair")),
        "split_0.3": run(BaselineSegmenter(split=0.3)),
        "split_0.5": run(BaselineSegmenter(split=0.5)),
    }


def segmentations(case, cache: Path, n4: bool, names) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    folder = cache / f"{VERSION}{'-n4' if n4 else ''}" / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    out, timings = {}, {}
    loaded = None
    makers = candidate_makers()
    for name in names:
        path = folder / f"{name}.npz"
        if path.exists():
            out[name] = np.load(path)["labels"]
            continue
        if loaded is None:
            loaded = load(case, n4)
        arrays, mask, _, spacing = loaded
        t0 = time.perf_counter()
        out[name] = makers[name](arrays, mask, spacing).astype(np.uint8)
        timings[name] = round(time.perf_counter() - t0, 1)
        np.savez_compressed(path, labels=out[name])
    ref_path = folder / "reference.npz"
    if ref_path.exists():
        ref = np.load(ref_path)["labels"]
    else:
        ref = (loaded or load(case, n4))[2]
        np.savez_compressed(ref_path, labels=ref)
    return out, ref, timings


def corr(x, y) -> tuple[float, float, float, float]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    p = stats.pearsonr(x, y)
    s = stats.spearmanr(x, y)
    return float(p.statistic), float(p.pvalue), float(s.statistic), float(s.pvalue)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=None, help="comma-separated BraTS 2018 case ids (default: all 12)")
    ap.add_argument("--candidates", default="baseline,flip_x,t1c_flair,split_0.3,split_0.5")
    ap.add_argument("--n4", action="store_true", help="N4-correct the inputs first (slow)")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--cache", default="/tmp/brainline_qc_discord")
    ap.add_argument("--json", default=None, help="write all figures here")
    args = ap.parse_args(argv)
    ids = args.cases.split(",") if args.cases else list(BRATS18_CASES)
    names = [n for n in args.candidates.split(",") if n]
    if "baseline" not in names:
        ap.error("the candidates must include 'baseline' (the delivered result)")
    cases = corpus_cases(cases=ids)
    cache = Path(args.cache)

    per_case = {}
    t_all = time.perf_counter()
    for case in cases:
        t0 = time.perf_counter()
        segs, ref, timings = segmentations(case, cache, args.n4, names)
        refm = region_masks(ref)
        res = discord_alarms(segs, None, config=SegmentationQCConfig(alpha=args.alpha, min_history=10**9))
        fused = region_masks(res.fusion)
        per_case[case.case_id] = {
            "split": case.split, "segs": segs, "ref": ref,
            "dice_to_fusion": {(r.candidate, r.region): r.dice for r in res.rows},
            "true": {reg: dice(region_masks(segs["baseline"])[reg], refm[reg]) for reg in ("WT", "TC", "ET")},
            "true_fusion": {reg: dice(fused[reg], refm[reg]) for reg in ("WT", "TC", "ET")},
            "true_candidates": {n: dice(region_masks(s)["WT"], refm["WT"]) for n, s in segs.items()},
            "timings": timings,
        }
        print(f"{case.case_id:12s} segmented/loaded in {time.perf_counter() - t0:6.1f} s {timings or '(cached)'}",
              file=sys.stderr, flush=True)

    # leave-one-out alarms
    rows = []
    for cid, c in per_case.items():
        history = {n: {reg: [o["dice_to_fusion"][(n, reg)] for oid, o in per_case.items() if oid != cid]
                       for reg in ("WT", "TC", "ET")} for n in names}
        cfg = SegmentationQCConfig(alpha=args.alpha, min_history=min(10, len(per_case) - 1))
        res = discord_alarms(c["segs"], history, config=cfg)
        wt_rows = [r for r in res.rows if r.region == "WT"]
        rows.append({
            "case": cid, "split": c["split"], "true_WT": c["true"]["WT"], "true_TC": c["true"]["TC"],
            "true_ET": c["true"]["ET"], "fusion_WT": c["true_fusion"]["WT"],
            "risk": res.risk_score, "risk_WT": sum(r.alarm for r in wt_rows),
            "mean_dtf_WT": res.mean_dice["WT"],
            "min_dtf_WT": min(r.dice for r in wt_rows if r.dice is not None),
            "alarms": [f"{r.candidate}/{r.region}" for r in res.rows if r.alarm],
            "dtf_WT": {r.candidate: r.dice for r in wt_rows},
            "true_WT_candidates": c["true_candidates"],
        })

    def f(v, w=5):
        return " " * (w - 1) + "-" if v is None else f"{v:{w}.3f}"

    inputs = "N4-corrected" if args.n4 else "without N4"
    print(f"\nbaseline {VERSION}; candidates: {', '.join(names)}; inputs {inputs}; "
          f"alpha {args.alpha}; leave-one-out history ({len(per_case) - 1} cases)")
    print(f"{'case':12s} {'split':7s} trueWT  TC    ET    fusWT | " + " ".join(f"{n[:9]:>9s}" for n in names)
          + " | meanDtF risk riskWT alarms")
    for r in rows:
        print(f"{r['case']:12s} {r['split']:7s} {f(r['true_WT'])} {f(r['true_TC'])} {f(r['true_ET'])} "
              f"{f(r['fusion_WT'])} | " + " ".join(f"{f(r['dtf_WT'][n], 9)}" for n in names)
              + f" | {r['mean_dtf_WT']:7.3f} {r['risk']:4d} {r['risk_WT']:6d} {','.join(r['alarms']) or '-'}")
    print("(columns per candidate: WT Dice to the fusion)")

    true = [r["true_WT"] for r in rows]
    summary = {}
    for label, key in (("risk score (WT+TC+ET)", "risk"), ("risk score (WT)", "risk_WT"),
                       ("mean WT Dice-to-fusion", "mean_dtf_WT"), ("min WT Dice-to-fusion", "min_dtf_WT")):
        x = [r[key] for r in rows]
        pr, pp, sr, sp = corr(x, true)
        prf, _, srf, _ = corr(x, [r["fusion_WT"] for r in rows])
        summary[key] = {"pearson": pr, "pearson_p": pp, "spearman": sr, "spearman_p": sp,
                        "pearson_vs_fusion": prf, "spearman_vs_fusion": srf}
        print(f"{label:24s} vs true WT Dice of baseline: Pearson r = {pr:+.2f} (p = {pp:.3f}), "
              f"Spearman rho = {sr:+.2f} (p = {sp:.3f}); vs fusion's: r = {prf:+.2f}, rho = {srf:+.2f}")
    fail = [r for r in rows if r["true_WT"] is not None and r["true_WT"] < FAILURE_DICE]
    ok = [r for r in rows if r not in fail]
    for key in ("risk", "risk_WT"):
        fa = sum(r[key] > 0 for r in fail)
        oa = sum(r[key] > 0 for r in ok)
        summary[f"alarm_rate_{key}"] = {"failures": [fa, len(fail)], "others": [oa, len(ok)]}
        print(f"cases with >= 1 alarm ({key}): failures (WT Dice < {FAILURE_DICE}) {fa}/{len(fail)}, "
              f"others {oa}/{len(ok)}")
        by_k = []
        for k in range(1, max(r[key] for r in rows) + 1):
            by_k.append((k, sum(r[key] >= k for r in fail), sum(r[key] >= k for r in ok)))
        summary[f"flagged_by_threshold_{key}"] = by_k
        print(f"  {key} >= k flags (failures/{len(fail)}, others/{len(ok)}): "
              + ", ".join(f"k={k}: {a}/{b}" for k, a, b in by_k))
    print(f"mean true WT Dice: baseline {np.mean(true):.3f}, fusion {np.mean([r['fusion_WT'] for r in rows]):.3f}; "
          f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"version": VERSION, "candidates": names, "n4": args.n4,
                                               "alpha": args.alpha, "rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
