"""Benchmark of issue 11: longitudinal follow-up on synthetic pairs with known truth.

For every (case, variant) it writes a (prior, current) pair with
tests/synthetic_followup.py (real BraTS 2018 case; random rigid motion, a different
bias field and an intensity drift at the prior; variants ``nochange``, ``grown``,
``new``, ``thick``, ``infiltrated``), runs the image pipeline STEPS on the current work folder
(register, skull_strip, bias_correct, segment, summarize; ``--model``, baseline by
default), then ``pipelines.longitudinal.step_longitudinal`` (which prepares the
prior: the same STEPS on ``priors/0``), and scores:

* new-lesion sensitivity (variant ``new``; ``thick`` reported apart): a truth lesion
  is detected when a reported ``"new"`` lesion overlaps its mask or has its centroid
  within 5 mm of the truth centroid; the target counts lesions >= 30 mm^3;
* false positives per no-change pair: reported ``"new"`` lesions (``"growing"`` ones
  are counted apart); in ``new`` pairs, reported new lesions matching no truth lesion;
* the RANO new-lesion rule (variants ``new``/``thick``): each truth lesion is measured
  on the truth mask like a radiologist (``pipelines.rano.bidimensional`` on the axial
  slice of largest area; measurable when both diameters >= 10 mm); the flag the truth
  calls for is "progression suspected" when a truth lesion is enhancing and measurable
  (or the tumour's growth already calls for it), else "stable"; scored: flag agreement,
  and, where the step reports them (``enhancing``, ``long_axis_mm``, ``short_axis_mm``,
  ``measurable`` of a new lesion), the reported vs truth diameters and the confusion
  counts of the enhancing and measurable calls; in every pair, reported new lesions
  that are enhancing and measurable (those would raise the flag);
* volume-change error of grown tumours (``grown``, ``infiltrated``): ``|reported - true| / true`` of the growth
  (mm^3) of WT and TC as the step's assessment measured it (``change.measure``: per
  component the registered pair, ``change.vs_prior_paired``, or the two
  independent segmentations, ``change.vs_prior``; by the segmenter, see
  config/longitudinal.yaml ``change_measure``); the signed errors of every measure
  (boundary shift, confirmed voxels, segmentations) are recorded in
  ``growth.methods``; and of the lesion list (sum of ``growth_mm3`` of the lesions that
  touch the grown voxels, against the true WT growth);
* the assessment of grown pairs against the one their true growth calls for
  (:func:`expected_by_growth`: "progression suspected", "borderline" when an
  assessed component truly grew by borderline_percent or more, else "stable"),
  with the true progressions read "borderline" or "stable" counted apart;
* time added per study: wall time of ``step_longitudinal`` (preparing the prior
  included), and its part without the prior's preparation;
* registration error of the prior (mean / max over the current brain of the
  distance between the recovered and the true transform, mm).

Targets (issue 11): sensitivity >= 0.90 (lesions >= 30 mm^3), <= 1 false positive
per no-change pair, <= 10 % volume-change error, <= 90 s added per study (2 cores,
baseline segmenter). Figures are reported for the tune half (tests.corpus.TUNE_CASES)
and the held-out half separately.

``--matching histogram,linear`` also re-runs the comparison of every no-change pair
with each intensity-matching method (the prior stays prepared) and reports the
residual robust SD of the subtraction inside the brain (1.4826 MAD, in % of the
current brain median; FLAIR and T1c) and the false positives of each, so the default
of ``config/longitudinal.yaml`` can be chosen by measurement.

    .venv/bin/python bench/longitudinal.py --cases 2013_11,CBICA_ABM --json /tmp/longitudinal.json
    .venv/bin/python bench/longitudinal.py --cases CBICA_ABM --variants nochange --matching histogram,linear

Exit code 0 when every pair ran (targets are reported, not enforced), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainline.pipelines.change_choice import chosen_change  # noqa: E402
from brainline.pipelines.image_pipeline import STEPS, PipelineConfig  # noqa: E402
from brainline.pipelines.longitudinal import LongitudinalConfig, step_longitudinal  # noqa: E402
from brainline.pipelines.longitudinal_images import axial_axis  # noqa: E402
from brainline.pipelines.rano import bidimensional  # noqa: E402
from tests.corpus import DEFAULT_DATA, HOLDOUT_CASES, TUNE_CASES  # noqa: E402
from tests.synthetic_followup import (  # noqa: E402
    CASES,
    GENERATOR_VERSION,
    GROWN_VARIANTS,
    VARIANTS,
    FollowupPair,
    load_pair,
    make_pair,
    pair_name,
)

TARGETS = {"sensitivity": 0.90, "fp_per_nochange_pair": 1.0, "volume_error": 0.10, "added_s": 90.0}
MIN_SCORED_MM3 = 30.0
MATCH_DISTANCE_MM = 5.0


# --------------------------------------------------------------------------- running


def run_current(pair: FollowupPair, cfg: PipelineConfig) -> float:
    """The image STEPS on the current work folder; returns the wall time (s)."""
    t0 = time.monotonic()
    for _, step in STEPS:
        step(pair.current, cfg)
    return time.monotonic() - t0


def clear_longitudinal(work: Path) -> None:
    (work / "longitudinal.json").unlink(missing_ok=True)
    shutil.rmtree(work / "longitudinal", ignore_errors=True)


def run_longitudinal(pair: FollowupPair, cfg: PipelineConfig, lcfg: LongitudinalConfig) -> tuple[dict, float]:
    clear_longitudinal(pair.current)
    t0 = time.monotonic()
    result = step_longitudinal(pair.current, cfg, lcfg)
    return result, time.monotonic() - t0


# --------------------------------------------------------------------------- scoring


def _array(path: Path) -> np.ndarray | None:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) if path.exists() else None


def truth_bidimensional(truth_img: sitk.Image, lesion_ids) -> dict[int, dict]:
    """RANO size of each truth lesion, measured on the truth mask: long axis and
    longest perpendicular (``pipelines.rano.bidimensional``, edge to edge) on the
    axial slice where the lesion has the largest area (ties: nearest its centre);
    measurable when both are >= 10 mm (``Bidimensional.measurable``)."""
    arr = sitk.GetArrayFromImage(truth_img)
    axial = axial_axis(truth_img.GetDirection())   # axis 0 on the BraTS grid
    spacing_zyx = truth_img.GetSpacing()[::-1]
    in_plane = [float(s) for k, s in enumerate(spacing_zyx) if k != axial]
    out: dict[int, dict] = {}
    for lid in lesion_ids:
        planes = np.moveaxis(arr == lid, axial, 0)
        areas = planes.reshape(planes.shape[0], -1).sum(axis=1)
        if not areas.any():
            out[lid] = {"long_mm": None, "short_mm": None, "measurable": False, "slice_index": None}
            continue
        best = np.flatnonzero(areas == areas.max())
        centre = float(np.average(np.arange(len(areas)), weights=areas))
        k = int(best[np.argmin(np.abs(best - centre))])
        m = bidimensional(planes[k], in_plane)
        out[lid] = {"long_mm": None if m is None else round(m.long_mm, 1),
                    "short_mm": None if m is None else round(m.short_mm, 1),
                    "measurable": bool(m is not None and m.measurable),
                    "slice_index": k}
    return out


def truth_contrast(pair: FollowupPair, truth_map: np.ndarray, lesion_ids) -> dict[int, dict]:
    """How visible each truth lesion is in the current images the step gets
    (``current/nifti``): per role (FLAIR, T1c), the lesion's median minus the
    median of a 2-4 mm shell around it (inside the head, other lesions
    excluded), in % of the image's median over the head; and the fraction of
    the shell that is exactly 0 (a source image that does not cover that
    part of the brain, e.g. the FLAIR of BraTS 2013_20)."""
    out: dict[int, dict] = {lid: {} for lid in lesion_ids}
    for role in ("flair", "t1c"):
        path = pair.current / "nifti" / f"{role}.nii.gz"
        if not path.exists():
            continue
        img = sitk.ReadImage(str(path))
        values = sitk.GetArrayFromImage(img).astype(np.float32)
        if values.shape != truth_map.shape:
            continue
        head = values > 0
        ref = float(np.median(values[head])) if head.any() else 0.0
        sp = img.GetSpacing()[::-1]
        for lid in lesion_ids:
            m = truth_map == lid
            if not m.any() or ref <= 0:
                continue
            idx = np.argwhere(m)
            lo = np.maximum(idx.min(axis=0) - 6, 0)
            hi = np.minimum(idx.max(axis=0) + 7, m.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            dist = ndimage.distance_transform_edt(~m[box], sampling=sp)
            shell = (dist > 2.0) & (dist <= 4.0) & (truth_map[box] == 0)
            v = values[box]
            in_head = shell & (v > 0)
            contrast = (100.0 * (float(np.median(v[m[box]])) - float(np.median(v[in_head]))) / ref
                        if in_head.any() else None)
            out[lid][role] = {"contrast_percent": None if contrast is None else round(contrast, 1),
                              "shell_zero_fraction": round(1.0 - float(in_head.sum()) / max(1, int(shell.sum())), 2)}
    return out


def _rano_fields(lesion: dict | None) -> dict:
    """The RANO fields of a reported new lesion (None where the step does not report them)."""
    lesion = lesion or {}
    return {"enhancing": lesion.get("enhancing"), "long_axis_mm": lesion.get("long_axis_mm"),
            "short_axis_mm": lesion.get("short_axis_mm"), "measurable": lesion.get("measurable"),
            "enhancing_mm3": lesion.get("enhancing_mm3")}


def counted_by_rule(lesion: dict) -> bool:
    """A reported new lesion the RANO rule counts (enhancing and measurable); False
    when the step does not report these fields."""
    return lesion.get("kind") == "new" and bool(lesion.get("enhancing")) and bool(lesion.get("measurable"))


def match_new_lesions(pair: FollowupPair, result: dict) -> dict:
    """Truth lesions vs reported "new" lesions (overlap or centroid within 5 mm),
    with each truth lesion's RANO size on the truth mask and the reported RANO fields."""
    truth = pair.truth["new_lesions"]
    reported = [l for l in result.get("lesions", []) if l.get("kind") == "new"]
    lesion_map = _array(pair.current / "longitudinal" / "lesions.nii.gz")
    truth_img = pair.truth_image("new_lesions")
    truth_map = sitk.GetArrayFromImage(truth_img)
    sizes = truth_bidimensional(truth_img, [t["id"] for t in truth])
    contrast = truth_contrast(pair, truth_map, [t["id"] for t in truth])
    matched_reported: set[int] = set()
    rows = []
    for t in truth:
        tmask = truth_map == t["id"]
        hit = None
        if lesion_map is not None:
            overlap_ids = {int(v) for v in np.unique(lesion_map[tmask]) if v}
            for l in reported:
                if l["id"] in overlap_ids:
                    hit = l
                    break
        if hit is None:
            for l in reported:
                if np.linalg.norm(np.subtract(l["centroid_lps_mm"], t["centroid_lps_mm"])) <= MATCH_DISTANCE_MM:
                    hit = l
                    break
        any_kind = None
        if hit is None and lesion_map is not None:  # reported, but as "growing"?
            ids = {int(v) for v in np.unique(lesion_map[tmask]) if v}
            any_kind = next((l["kind"] for l in result.get("lesions", []) if l["id"] in ids), None)
        if hit is not None:
            matched_reported.add(hit["id"])
        size = sizes[t["id"]]
        rows.append({"id": t["id"], "volume_mm3": t["volume_mm3"], "enhancing": t["enhancing"],
                     "long_mm": size["long_mm"], "short_mm": size["short_mm"], "measurable": size["measurable"],
                     "counts_for_rano": bool(t["enhancing"] and size["measurable"]),
                     "visible": contrast[t["id"]],
                     "centroid_lps_mm": t["centroid_lps_mm"], "detected": hit is not None,
                     "reported_id": hit["id"] if hit else None,
                     "reported_volume_mm3": hit["volume_mm3"] if hit else None,
                     "reported_integrated_mm3": hit.get("volume_integrated_mm3") if hit else None,
                     "reported_sequence": hit.get("sequence") if hit else None,
                     "reported_confidence": hit.get("confidence") if hit else None,
                     "reported_as_other_kind": any_kind,
                     "reported": _rano_fields(hit) if hit else None})
    fps = [{"id": l["id"], "volume_mm3": l["volume_mm3"], "centroid_lps_mm": l["centroid_lps_mm"],
            "sequence": l.get("sequence"), "confidence": l.get("confidence"), "peak_z": l.get("peak_z"),
            "hemisphere": l.get("hemisphere"), "lobe": l.get("lobe"), **_rano_fields(l)}
           for l in reported if l["id"] not in matched_reported]
    return {"truth": rows, "false_positives": fps}


def grown_by(pair: FollowupPair, lc: LongitudinalConfig, percent: float) -> list[str]:
    """Assessed components (config) that truly grew by >= ``percent`` % (or newly
    appeared) and by >= min_change_ml."""
    before, after = pair.truth["volumes_ml"]["prior"], pair.truth["volumes_ml"]["current"]
    return [k for k in lc.assessed_components
            if after[k] - before[k] >= lc.min_change_ml
            and (before[k] == 0 or 100.0 * (after[k] - before[k]) / before[k] >= percent)]


def progressed_by_growth(pair: FollowupPair, lc: LongitudinalConfig | None = None) -> list[str]:
    """Components whose true growth calls for "progression suspected" (config thresholds:
    +progression_percent and min_change_ml on the assessed components, or newly appeared)."""
    lc = lc or LongitudinalConfig.load()
    return grown_by(pair, lc, lc.progression_percent)


def expected_by_growth(pair: FollowupPair, lc: LongitudinalConfig | None = None) -> str:
    """The assessment the true growth calls for under the config: "progression suspected"
    (:func:`progressed_by_growth`), else "borderline" when an assessed component truly grew by
    >= borderline_percent and >= min_change_ml, else "stable"."""
    lc = lc or LongitudinalConfig.load()
    if progressed_by_growth(pair, lc):
        return "progression suspected"
    if lc.borderline_percent is not None and grown_by(pair, lc, lc.borderline_percent):
        return "borderline"
    return "stable"


def new_lesion_flag(pair: FollowupPair, result: dict, matched: dict, lc: LongitudinalConfig | None = None) -> dict:
    """The flag the truth calls for in a new-lesion pair (RANO: a new enhancing
    measurable lesion is progression; or the growth rule) against the step's."""
    by_growth = progressed_by_growth(pair, lc)
    counting = [t["id"] for t in matched["truth"] if t["counts_for_rano"]]
    expected = "progression suspected" if counting or by_growth else "stable"
    reported = (result.get("assessment") or {}).get("code")
    reported_new = [l for l in result.get("lesions", []) if l.get("kind") == "new"]
    return {"expected_assessment": expected, "reported_assessment": reported,
            "assessment_agrees": reported == expected,
            "truth_lesions_counting": counting, "progressed_by_growth": by_growth,
            "reported_counted_by_rule": [l["id"] for l in reported_new if counted_by_rule(l)],
            "step_new_lesions": (result.get("assessment") or {}).get("new_lesions"),
            "rano_fields_reported": any("measurable" in l for l in reported_new)}


def growth_scores(pair: FollowupPair, result: dict, lc: LongitudinalConfig | None = None) -> dict:
    true = pair.truth["change_mm3"]
    change = result.get("change") or {}
    independent = change.get("vs_prior") or {}
    # the step's measure of the change against the prior, per component as the assessment used it
    # (change.measure: the registered pair, or the two segmentations with a trained segmenter)
    # (a record without change.measure, written before the choice existed, reads as the pair)
    vs_prior, _ = chosen_change(change)
    out: dict = {"true_mm3": {k: true[k] for k in ("whole_tumor", "tumor_core", "3", "2")},
                 "measured_on": {k: ("registered pair" if vs_prior.get(k) is not independent.get(k)
                                     else "two segmentations") for k in ("whole_tumor", "tumor_core", "3")},
                 "measure": change.get("measure"),
                 "independent_delta_mm3": {k: (None if (independent.get(k) or {}).get("delta_ml") is None
                                               else round(1000.0 * independent[k]["delta_ml"], 1))
                                           for k in ("whole_tumor", "tumor_core", "3")}}
    for key, name in (("whole_tumor", "WT"), ("tumor_core", "TC"), ("3", "ET")):
        rep = vs_prior.get(key, {}).get("delta_ml")
        rep_mm3 = None if rep is None else 1000.0 * rep
        out[f"reported_{name}_mm3"] = None if rep_mm3 is None else round(rep_mm3, 1)
        t = true[key]
        out[f"error_{name}"] = (round(abs(rep_mm3 - t) / t, 4) if rep_mm3 is not None and t > 0 else None)
    # both paired measures the step computes (change.paired_methods) and the two segmentations (vs_prior),
    # whichever the step chose
    out["methods"] = {}
    for method, values in [*(change.get("paired_methods") or {}).items(), ("segmentations", independent)]:
        m = {}
        for key, name in (("whole_tumor", "WT"), ("tumor_core", "TC")):
            rep = (values.get(key) or {}).get("delta_ml")
            t = true[key]
            m[f"reported_{name}_mm3"] = None if rep is None else round(1000.0 * rep, 1)
            m[f"error_{name}"] = None if rep is None or t <= 0 else round((1000.0 * rep - t) / t, 4)  # signed
        out["methods"][method] = m
    # the RANO-like flag the truth calls for (config thresholds: +progression_percent and min_change_ml on ET/TC)
    before, after = pair.truth["volumes_ml"]["prior"], pair.truth["volumes_ml"]["current"]
    out["true_percent"] = {k: (round(100.0 * (after[k] - before[k]) / before[k], 1) if before[k] else None)
                           for k in ("whole_tumor", "tumor_core", "3")}
    out["expected_assessment"] = expected_by_growth(pair, lc)
    out["assessment_agrees"] = (result.get("assessment") or {}).get("code") == out["expected_assessment"]
    # lesion list: lesions that touch the grown voxels
    lesion_map = _array(pair.current / "longitudinal" / "lesions.nii.gz")
    growth = sitk.GetArrayFromImage(pair.truth_image("growth")) > 0
    touching = set()
    if lesion_map is not None:
        touching = {int(v) for v in np.unique(lesion_map[growth]) if v}
    lesions = [l for l in result.get("lesions", []) if l["id"] in touching]
    lesion_growth = sum(float(l.get("growth_mm3") or 0.0) for l in lesions)
    out["lesions_touching_growth"] = [{k: l.get(k) for k in ("id", "kind", "volume_mm3", "prior_volume_mm3",
                                                             "growth_mm3", "sequence")} for l in lesions]
    out["reported_lesion_growth_mm3"] = round(lesion_growth, 1)
    out["error_lesions_vs_WT"] = (round(abs(lesion_growth - true["whole_tumor"]) / true["whole_tumor"], 4)
                                  if true["whole_tumor"] > 0 else None)
    return out


def registration_error(pair: FollowupPair, result: dict) -> dict | None:
    """Distance (mm) between the recovered current->prior mapping and the truth,
    over the current brain (every 4th voxel)."""
    reg = ((result.get("comparison") or {}).get("registration") or {})
    params = reg.get("parameters") or {}
    if "matrix" not in params:
        return None
    A = np.array(params["matrix"], float)
    c = np.array(params["center_mm"], float)
    t = np.array(params["translation_mm"], float)
    truth = pair.prior_to_current().GetInverse()
    image = sitk.ReadImage(str(pair.current / "brain_mask.nii.gz"))
    mask = sitk.GetArrayFromImage(image) > 0
    idx = np.argwhere(mask[::4, ::4, ::4])[:, ::-1] * 4
    pts = np.array(image.GetOrigin()) + (idx * np.array(image.GetSpacing())) @ np.array(
        image.GetDirection()).reshape(3, 3).T
    rec = (pts - c) @ A.T + c + t
    tru = np.array([truth.TransformPoint([float(v) for v in p]) for p in pts[:: max(1, len(pts) // 5000)]])
    d = np.linalg.norm(rec[:: max(1, len(pts) // 5000)] - tru, axis=1)
    return {"mean_mm": round(float(d.mean()), 3), "max_mm": round(float(d.max()), 3)}


def subtraction_spread(work: Path) -> dict:
    """Robust SD (1.4826 MAD) of each subtraction inside the current brain mask
    (eroded by 4 mm, where the subtraction is defined), in % of the current
    preprocessed image's brain median."""
    mask_img = sitk.ReadImage(str(work / "brain_mask.nii.gz"), sitk.sitkUInt8)
    radius = [max(1, int(round(4.0 / s))) for s in mask_img.GetSpacing()]
    mask = sitk.GetArrayFromImage(sitk.BinaryErode(mask_img > 0, radius)) > 0
    out = {}
    for role in ("flair", "t1c"):
        path = work / "longitudinal" / f"subtraction_{role}.nii.gz"
        if not path.exists():
            continue
        d = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        cur = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "preprocessed" / f"{role}.nii.gz")))
        inside = mask & (d != 0)
        if inside.sum() < 100:
            continue
        v = d[inside]
        sd = 1.4826 * float(np.median(np.abs(v - np.median(v))))
        out[role] = {"robust_sd_percent": round(100.0 * sd / float(np.median(cur[inside])), 3),
                     "median_percent": round(100.0 * float(np.median(v)) / float(np.median(cur[inside])), 3)}
    return out


def score_pair(pair: FollowupPair, result: dict, lc: LongitudinalConfig | None = None) -> dict:
    row: dict = {"assessment": (result.get("assessment") or {}).get("code"),
                 "note": result.get("note"), "notes": result.get("notes", []), "flags": result.get("flags", []),
                 "n_new": sum(l.get("kind") == "new" for l in result.get("lesions", [])),
                 "n_growing": sum(l.get("kind") == "growing" for l in result.get("lesions", [])),
                 "intensity_match": (result.get("comparison") or {}).get("intensity_match"),
                 "registration_error": registration_error(pair, result),
                 "subtraction": subtraction_spread(pair.current),
                 "step_timings_s": result.get("timings_s", {})}
    row["paired_methods"] = (result.get("change") or {}).get("paired_methods")
    row["paired_change_ml"] = {
        k: (((result.get("change") or {}).get("vs_prior_paired") or {}).get(k) or {}).get("delta_ml")
        for k in ("whole_tumor", "tumor_core", "3")}
    vs_prior = (result.get("change") or {}).get("vs_prior") or {}
    row["volume_change_ml"] = {k: (vs_prior.get(k) or {}).get("delta_ml") for k in ("whole_tumor", "tumor_core", "3")}
    row["n_new_counted_by_rule"] = sum(counted_by_rule(l) for l in result.get("lesions", []))
    if pair.variant in ("new", "thick"):
        row["new_lesions"] = match_new_lesions(pair, result)
        row["rano"] = new_lesion_flag(pair, result, row["new_lesions"], lc)
        # the smallest contrast the step can call new: z_threshold x the sd floor (% of the brain median)
        lc = lc or LongitudinalConfig.load()
        least = lc.z_threshold * lc.min_sd_percent
        row["new_lesions"]["detection_contrast_percent"] = round(least, 2)
        for t in row["new_lesions"]["truth"]:
            best = max([v["contrast_percent"] for v in (t.get("visible") or {}).values()
                        if v.get("contrast_percent") is not None], default=None)
            t["contrast_percent_best"] = best
            t["above_detection_contrast"] = best is not None and best >= least
    if pair.variant in GROWN_VARIANTS:
        row["growth"] = growth_scores(pair, result, lc)
    return row


# --------------------------------------------------------------------------- one pair


def reset_work(folder: Path) -> None:
    """Remove everything the pipeline wrote in a work folder (keeps nifti/, priors*, prior.json)."""
    for child in folder.iterdir():
        if child.name in ("nifti", "priors", "priors.json", "prior.json"):
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def reusable_pair(root: Path, args) -> FollowupPair | None:
    """An already generated pair with the same seed, spacing and generator version,
    reset to its unprocessed state; None when there is none."""
    if not (root / "truth.json").exists():
        return None
    pair = load_pair(root)
    spacing = pair.truth["spacing_mm"][0]
    if (pair.truth.get("generator_version") != GENERATOR_VERSION or pair.truth["seed"] != args.seed
            or abs(spacing - (args.spacing or 1.0)) > 1e-6):
        return None
    if not getattr(args, "reuse_work", False):
        reset_work(pair.current)
        reset_work(pair.prior)
    return pair


def fixed_volumes_name(case: str, variant: str, volumes: list[float] | None) -> str:
    """Folder of a pair: ``<case>_<variant>``, with ``_v<mm3>-<mm3>...`` when the new
    lesions' volumes are fixed (``--new-volumes``), so those pairs never replace the
    default ones."""
    base = pair_name(case, variant)
    if not volumes or variant not in ("new", "thick"):
        return base
    return base + "_v" + "-".join(f"{v:g}" for v in volumes)


def run_pair(case: str, variant: str, args, cfg: PipelineConfig, lcfg: LongitudinalConfig) -> dict:
    row: dict = {"case": case, "variant": variant, "split": "tune" if case in TUNE_CASES else "holdout",
                 "error": None}
    t0 = time.monotonic()
    reuse = args.reuse_pairs or args.reuse_work
    volumes = getattr(args, "new_volumes", None) if variant in ("new", "thick") else None
    name = fixed_volumes_name(case, variant, volumes)
    if volumes:
        row["new_volumes_mm3"] = volumes
    pair = reusable_pair(args.out / name, args) if reuse else None
    if pair is not None and volumes and [l.get("requested_mm3") for l in pair.truth["new_lesions"]] != volumes:
        pair = None  # a lesion could not be placed, or other volumes: generate again
    if pair is None:
        pair = make_pair(case, variant, args.out, args.seed, data_root=args.data, spacing_mm=args.spacing,
                         new_volumes_mm3=volumes, name=name)
        row["generate_s"] = round(time.monotonic() - t0, 1)
    else:
        row["generate_s"] = None
    row["truth"] = {"motion_deg": pair.truth["prior"]["motion"]["rotation_deg"],
                    "motion_mm": pair.truth["prior"]["motion"]["translation_norm_mm"],
                    "new_lesions_mm3": [l["volume_mm3"] for l in pair.truth["new_lesions"]],
                    "change_mm3": pair.truth["change_mm3"]}
    row["current_s"] = round(run_current(pair, cfg), 1)
    row["prior_prepared_in_step"] = not (pair.prior / "summary.json").exists()
    result, added = run_longitudinal(pair, cfg, lcfg)
    row["added_s"] = round(added, 1)
    row["load_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine meanwhile
    prep = (result.get("timings_s") or {}).get("prepare_priors")
    row["added_without_prior_prep_s"] = round(added - prep, 1) if prep is not None else None
    row.update(score_pair(pair, result, lcfg))
    if args.matching and variant == "nochange":
        row["matching"] = {}
        for method in args.matching:
            res, secs = run_longitudinal(pair, cfg, replace(lcfg, intensity_match=method))
            row["matching"][method] = {"subtraction": subtraction_spread(pair.current),
                                       "n_new": sum(l.get("kind") == "new" for l in res.get("lesions", [])),
                                       "n_growing": sum(l.get("kind") == "growing" for l in res.get("lesions", [])),
                                       "compare_s": round(secs, 1)}
    return row


# --------------------------------------------------------------------------- totals and report


def _mean(values):
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def _ratio(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def split_totals(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r.get("error")]
    truth_new = [t for r in ok if r["variant"] == "new" for t in r["new_lesions"]["truth"]]
    scored = [t for t in truth_new if t["volume_mm3"] >= MIN_SCORED_MM3]
    thick = [t for r in ok if r["variant"] == "thick" for t in r["new_lesions"]["truth"]
             if t["volume_mm3"] >= MIN_SCORED_MM3]
    nochange = [r for r in ok if r["variant"] == "nochange"]
    grown = [r for r in ok if r["variant"] in GROWN_VARIANTS]
    # (assessment the true growth calls for, assessment reported) -> number of grown pairs
    read_as = Counter((r["growth"]["expected_assessment"], r["assessment"]) for r in grown)
    added = [r["added_s"] for r in ok if r.get("added_s") is not None]
    added_prep = [r["added_s"] for r in ok if r.get("added_s") is not None and r.get("prior_prepared_in_step")]
    return {
        "pairs": len(rows), "failed_pairs": len(rows) - len(ok),
        "new_lesions_scored": len(scored),
        "sensitivity": round(sum(t["detected"] for t in scored) / len(scored), 4) if scored else None,
        "sensitivity_all_sizes": (round(sum(t["detected"] for t in truth_new) / len(truth_new), 4)
                                  if truth_new else None),
        "detection_contrast_percent": next((r["new_lesions"].get("detection_contrast_percent") for r in ok
                                            if r["variant"] == "new"), None),
        "new_lesions_scored_visible": len([t for t in scored if t.get("above_detection_contrast")]),
        "sensitivity_visible": _ratio([t["detected"] for t in scored if t.get("above_detection_contrast")]),
        "sensitivity_thick": round(sum(t["detected"] for t in thick) / len(thick), 4) if thick else None,
        "missed": [{"case": r["case"], **t} for r in ok if r["variant"] == "new"
                   for t in r["new_lesions"]["truth"] if not t["detected"]],
        "new_volume_ratio_extent": _mean([t["reported_volume_mm3"] / t["volume_mm3"] for t in truth_new
                                           if t["detected"] and t["reported_volume_mm3"]]),
        "new_volume_ratio_integrated": _mean([t["reported_integrated_mm3"] / t["volume_mm3"] for t in truth_new
                                              if t["detected"] and t.get("reported_integrated_mm3")]),
        "new_volume_abs_error_integrated": _mean([abs(t["reported_integrated_mm3"] / t["volume_mm3"] - 1)
                                                  for t in truth_new
                                                  if t["detected"] and t.get("reported_integrated_mm3")]),
        "fp_in_new_pairs_per_pair": _mean([len(r["new_lesions"]["false_positives"]) for r in ok
                                           if r["variant"] == "new"]),
        "nochange_pairs": len(nochange),
        "fp_per_nochange_pair": _mean([r["n_new"] for r in nochange]),
        "growing_per_nochange_pair": _mean([r["n_growing"] for r in nochange]),
        "nochange_not_stable": [r["case"] for r in nochange if r["assessment"] != "stable"],
        "nochange_abs_change_ml": {k: _mean([abs(r["volume_change_ml"][k]) for r in nochange
                                             if r["volume_change_ml"][k] is not None])
                                   for k in ("whole_tumor", "tumor_core", "3")},
        "grown_pairs": len(grown),
        "volume_error_WT": _mean([r["growth"]["error_WT"] for r in grown]),
        "volume_error_TC": _mean([r["growth"]["error_TC"] for r in grown]),
        "volume_error_lesions": _mean([r["growth"]["error_lesions_vs_WT"] for r in grown]),
        "volume_error_by_method": {
            m: {n: _mean([abs(r["growth"]["methods"][m][f"error_{n}"]) for r in grown
                          if m in r["growth"].get("methods", {})
                          and r["growth"]["methods"][m][f"error_{n}"] is not None])
                for n in ("WT", "TC")}
            for m in sorted({m for r in grown for m in r["growth"].get("methods", {})})},
        "nochange_paired_abs_ml_by_method": {
            m: {k: _mean([abs((r.get("paired_methods") or {}).get(m, {}).get(k, {}).get("delta_ml") or 0.0)
                          for r in nochange if m in (r.get("paired_methods") or {})])
                for k in ("whole_tumor", "tumor_core")}
            for m in sorted({m for r in nochange for m in (r.get("paired_methods") or {})})},
        "grown_assessments": {r["case"]: {"reported": r["assessment"], "expected": r["growth"]["expected_assessment"]}
                              for r in grown},
        "grown_assessment_agreement": _mean([float(r["growth"]["assessment_agrees"]) for r in grown]),
        # "borderline" (config borderline_percent) is not a RANO category: counted apart from agreement
        "grown_progressions": sum(n for (expected, _), n in read_as.items() if expected == "progression suspected"),
        "grown_progressions_borderline": read_as["progression suspected", "borderline"],
        "grown_progressions_stable": read_as["progression suspected", "stable"],
        "grown_stable_borderline": read_as["stable", "borderline"],
        "grown_borderline_truth": sum(n for (expected, _), n in read_as.items() if expected == "borderline"),
        "nochange_borderline": sum(r["assessment"] == "borderline" for r in nochange),
        "median_added_s": round(statistics.median(added), 1) if added else None,
        "max_added_s": round(max(added), 1) if added else None,
        "median_added_without_prior_prep_s": (round(statistics.median(
            [r["added_without_prior_prep_s"] for r in ok if r.get("added_without_prior_prep_s") is not None]), 1)
            if any(r.get("added_without_prior_prep_s") is not None for r in ok) else None),
        "added_with_prior_prep_pairs": len(added_prep),
        "median_added_with_prior_prep_s": round(statistics.median(added_prep), 1) if added_prep else None,
        "max_added_with_prior_prep_s": round(max(added_prep), 1) if added_prep else None,
        "min_added_with_prior_prep_s": round(min(added_prep), 1) if added_prep else None,
        "load_1min": [min((r["load_1min"] for r in ok if r.get("load_1min") is not None), default=None),
                      max((r["load_1min"] for r in ok if r.get("load_1min") is not None), default=None)],
        **rano_totals(ok),
        "registration_error_mean_mm": _mean([(r.get("registration_error") or {}).get("mean_mm") for r in ok]),
        "registration_error_max_mm": max([(r.get("registration_error") or {}).get("max_mm") or 0.0 for r in ok],
                                         default=None),
    }


def _confusion(pairs: list[tuple[bool, bool]]) -> dict:
    """Truth x reported counts of a yes/no call."""
    return {"true_yes_reported_yes": sum(t and r for t, r in pairs),
            "true_yes_reported_no": sum(t and not r for t, r in pairs),
            "true_no_reported_yes": sum(r and not t for t, r in pairs),
            "true_no_reported_no": sum(not t and not r for t, r in pairs)}


def rano_totals(ok: list[dict]) -> dict:
    """RANO new-lesion figures over the ``new`` pairs (thick apart in the rows)."""
    new_pairs = [r for r in ok if r["variant"] == "new" and r.get("rano")]
    truth = [t for r in new_pairs for t in r["new_lesions"]["truth"]]
    # detected lesions whose reported record carries the RANO fields
    with_fields = [t for t in truth if t["detected"] and (t.get("reported") or {}).get("measurable") is not None]
    enh_pairs = [(bool(t["enhancing"]), bool(t["reported"]["enhancing"])) for t in with_fields]
    # the generator paints an "enhancing" lesion at the case's enhancing-tumour T1c level, which on some cases
    # is not above the tissue around the lesion: truth "enhancing" AND a T1c contrast >= the detection contrast
    least = next((r["new_lesions"].get("detection_contrast_percent") for r in new_pairs), None)

    def visibly_enhancing(t: dict) -> bool:
        c = ((t.get("visible") or {}).get("t1c") or {}).get("contrast_percent")
        return bool(t["enhancing"]) and c is not None and least is not None and c >= least

    enh_visible = [(visibly_enhancing(t), bool(t["reported"]["enhancing"])) for t in with_fields]
    meas_pairs = [(bool(t["counts_for_rano"]), bool(t["reported"]["enhancing"] and t["reported"]["measurable"]))
                  for t in with_fields]
    both = [t for t in with_fields if t["enhancing"] and t["reported"].get("long_axis_mm") is not None
            and t.get("long_mm") is not None]
    fps = [f for r in new_pairs for f in r["new_lesions"]["false_positives"]]
    return {
        "rano_new_pairs": len(new_pairs),
        "truth_lesions_measurable": sum(bool(t.get("measurable")) for t in truth),
        "truth_lesions_enhancing": sum(bool(t["enhancing"]) for t in truth),
        "truth_lesions_counting": sum(bool(t.get("counts_for_rano")) for t in truth),
        "new_pairs_expected_progression": sum(r["rano"]["expected_assessment"] == "progression suspected"
                                              for r in new_pairs),
        "new_pair_flag_agreement": _mean([float(r["rano"]["assessment_agrees"]) for r in new_pairs]),
        "new_pair_flags": {r["case"]: {"reported": r["rano"]["reported_assessment"],
                                       "expected": r["rano"]["expected_assessment"]} for r in new_pairs},
        "new_pairs_with_rano_fields": sum(bool(r["rano"]["rano_fields_reported"]) for r in new_pairs),
        "enhancing_confusion": _confusion(enh_pairs) if enh_pairs else None,
        "enhancing_confusion_visible": _confusion(enh_visible) if enh_visible else None,
        "truth_lesions_visibly_enhancing": sum(visibly_enhancing(t) for t in truth),
        "counting_confusion": _confusion(meas_pairs) if meas_pairs else None,
        "long_axis_error_mm": _mean([t["reported"]["long_axis_mm"] - t["long_mm"] for t in both]),
        "short_axis_error_mm": _mean([t["reported"]["short_axis_mm"] - t["short_mm"] for t in both]),
        "unmatched_counted_by_rule": sum(counted_by_rule({"kind": "new", **f}) for f in fps),
        "nochange_counted_by_rule": sum(r.get("n_new_counted_by_rule") or 0 for r in ok if r["variant"] == "nochange"),
    }


def matching_totals(rows: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        sub = [r["matching"][m] for r in rows if r.get("matching") and m in r["matching"]]
        out[m] = {"pairs": len(sub),
                  **{f"{role}_robust_sd_percent": _mean([s["subtraction"].get(role, {}).get("robust_sd_percent")
                                                         for s in sub]) for role in ("flair", "t1c")},
                  **{f"{role}_abs_median_percent": _mean([abs(s["subtraction"].get(role, {}).get("median_percent", 0))
                                                          for s in sub]) for role in ("flair", "t1c")},
                  "fp_per_pair": _mean([s["n_new"] for s in sub]),
                  "growing_per_pair": _mean([s["n_growing"] for s in sub])}
    return out


def _f(v, d=2):
    return "-" if v is None else f"{v:.{d}f}"


def print_report(rows: list[dict], totals: dict, args) -> None:
    header = (f"{'case':<12}{'variant':<10}{'split':<8}{'assess':<12}{'new':>4}{'grow':>5}"
              f"{'detected':>10}{'FP':>4}{'errWT':>7}{'errTC':>7}{'errLes':>7}{'reg mm':>8}"
              f"{'sdFL%':>7}{'cur s':>7}{'added s':>8}")
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        if r.get("error"):
            print(f"{r['case']:<12}{r['variant']:<10}{r['split']:<8}ERROR {r['error'][:120]}")
            continue
        det = fp = "-"
        if "new_lesions" in r:
            t = r["new_lesions"]["truth"]
            det = f"{sum(x['detected'] for x in t)}/{len(t)}"
            fp = str(len(r["new_lesions"]["false_positives"]))
        elif r["variant"] == "nochange":
            fp = str(r["n_new"])
        g = r.get("growth") or {}
        print(f"{r['case']:<12}{r['variant']:<10}{r['split']:<8}{str(r['assessment'])[:11]:<12}{r['n_new']:>4}"
              f"{r['n_growing']:>5}{det:>10}{fp:>4}{_f(g.get('error_WT'), 3):>7}{_f(g.get('error_TC'), 3):>7}"
              f"{_f(g.get('error_lesions_vs_WT'), 3):>7}{_f((r.get('registration_error') or {}).get('mean_mm')):>8}"
              f"{_f((r.get('subtraction') or {}).get('flair', {}).get('robust_sd_percent')):>7}"
              f"{_f(r.get('current_s'), 1):>7}{_f(r.get('added_s'), 1):>8}")
    print(f"\n{os.cpu_count()} CPUs, model {args.model}, seed {args.seed}, spacing "
          f"{args.spacing or 'source (1 mm)'}; detection: overlap or centroid within {MATCH_DISTANCE_MM:g} mm")
    for split in ("tune", "holdout", "all"):
        t = totals[split]
        if not t["pairs"]:
            continue
        print(f"\n[{split}] {t['pairs']} pairs ({t['failed_pairs']} failed)")
        print(f"  new-lesion sensitivity (>= {MIN_SCORED_MM3:g} mm3): {_f(t['sensitivity'], 3)} over "
              f"{t['new_lesions_scored']} lesions (target >= {TARGETS['sensitivity']}); all sizes "
              f"{_f(t['sensitivity_all_sizes'], 3)}; thick prior FLAIR {_f(t['sensitivity_thick'], 3)}; "
              f"of the >= {MIN_SCORED_MM3:g} mm3 lesions with a FLAIR or T1c contrast >= "
              f"{_f(t['detection_contrast_percent'], 1)} % of the image median (z_threshold x the sd floor): "
              f"{_f(t['sensitivity_visible'], 3)} over {t['new_lesions_scored_visible']}")
        print(f"  false positives per no-change pair: {_f(t['fp_per_nochange_pair'])} over {t['nochange_pairs']} "
              f"pairs (target <= {TARGETS['fp_per_nochange_pair']:g}); growing per no-change pair "
              f"{_f(t['growing_per_nochange_pair'])}; unmatched new lesions per 'new' pair "
              f"{_f(t['fp_in_new_pairs_per_pair'])}; no-change pairs not 'stable': "
              f"{t['nochange_not_stable'] or 'none'}")
        print(f"  volume-change error of grown tumours ({t['grown_pairs']} pairs): WT {_f(t['volume_error_WT'], 3)}, "
              f"TC {_f(t['volume_error_TC'], 3)}, lesion list vs WT {_f(t['volume_error_lesions'], 3)} "
              f"(target <= {TARGETS['volume_error']}); no-change |delta| mL: {t['nochange_abs_change_ml']}")
        if t.get("volume_error_by_method"):
            print("  growth error |reported - true| / true by paired measure: " + "; ".join(
                f"{m} WT {_f(v['WT'], 3)} TC {_f(v['TC'], 3)}" for m, v in t["volume_error_by_method"].items())
                  + "; no-change |change| mL: " + "; ".join(
                f"{m} WT {_f(v['whole_tumor'])} TC {_f(v['tumor_core'])}"
                for m, v in t["nochange_paired_abs_ml_by_method"].items()))
        if t["grown_pairs"]:
            print(f"  RANO-like flag on grown pairs agrees with the truth in {_f(t['grown_assessment_agreement'])}: "
                  + ", ".join(f"{c} {v['reported']} (truth: {v['expected']})"
                              for c, v in t["grown_assessments"].items()))
            print(f"  true progressions among grown pairs {t['grown_progressions']}: read borderline "
                  f"{t['grown_progressions_borderline']}, stable {t['grown_progressions_stable']}; true growth in "
                  f"the borderline band {t['grown_borderline_truth']} pairs; grown pairs the truth calls stable "
                  f"read borderline {t['grown_stable_borderline']}; no-change pairs read borderline "
                  f"{t['nochange_borderline']}")
        if t["rano_new_pairs"]:
            enh, cnt = t["enhancing_confusion"], t["counting_confusion"]
            print(f"  RANO flag on 'new' pairs agrees with the truth in {_f(t['new_pair_flag_agreement'])} "
                  f"({t['new_pairs_expected_progression']} of {t['rano_new_pairs']} pairs call for progression; "
                  f"truth lesions enhancing {t['truth_lesions_enhancing']}, "
                  f"measurable {t['truth_lesions_measurable']}, "
                  f"both {t['truth_lesions_counting']}): "
                  + ", ".join(f"{c} {v['reported']} (truth: {v['expected']})" for c, v in t["new_pair_flags"].items()))
            if enh is None:
                print("  reported new lesions carry no RANO fields (enhancing / measurable): not scored")
            else:
                print(f"  enhancing call on detected lesions (truth/reported yes-yes, yes-no, no-yes, no-no): "
                      f"{enh['true_yes_reported_yes']}, {enh['true_yes_reported_no']}, {enh['true_no_reported_yes']}, "
                      f"{enh['true_no_reported_no']} (truth enhancing with a T1c contrast >= the detection "
                      f"contrast: {', '.join(str(v) for v in t['enhancing_confusion_visible'].values())}); "
                      f"enhancing+measurable: {cnt['true_yes_reported_yes']}, "
                      f"{cnt['true_yes_reported_no']}, {cnt['true_no_reported_yes']}, {cnt['true_no_reported_no']}; "
                      f"diameters reported - truth (enhancing): long {_f(t['long_axis_error_mm'], 1)} mm, short "
                      f"{_f(t['short_axis_error_mm'], 1)} mm; unmatched lesions counted by the rule "
                      f"{t['unmatched_counted_by_rule']}, in no-change pairs {t['nochange_counted_by_rule']}")
        print(f"  time added per study: median {_f(t['median_added_s'], 1)} s, max {_f(t['max_added_s'], 1)} s "
              f"(target <= {TARGETS['added_s']:g} s; with the prior prepared in the step, "
              f"{t['added_with_prior_prep_pairs']} pairs: median {_f(t['median_added_with_prior_prep_s'], 1)} s, "
              f"range {_f(t['min_added_with_prior_prep_s'], 1)} to {_f(t['max_added_with_prior_prep_s'], 1)} s; "
              f"without preparing the prior: median {_f(t['median_added_without_prior_prep_s'], 1)} s; 1-min load "
              f"{_f(t['load_1min'][0])} to {_f(t['load_1min'][1])}); registration error mean "
              f"{_f(t['registration_error_mean_mm'])} mm, worst {_f(t['registration_error_max_mm'])} mm")
        if t["missed"]:
            print("  missed lesions: " + "; ".join(
                f"{m['case']} #{m['id']} {m['volume_mm3']:.0f} mm3{' enh' if m['enhancing'] else ''}"
                + (" measurable" if m.get("measurable") else "")
                + f" (contrast {_f(m.get('contrast_percent_best'), 0)} %"
                + (", no FLAIR around it" if ((m.get("visible") or {}).get("flair") or {}).get(
                    "shell_zero_fraction", 0) >= 0.5 else "") + ")"
                + (f" (reported as {m['reported_as_other_kind']})" if m.get("reported_as_other_kind") else "")
                for m in t["missed"]))
    if args.matching:
        print("\nintensity matching on no-change pairs (robust SD of the subtraction in the brain, % of the "
              "current brain median; lower is better):")
        for m, v in totals["matching"].items():
            print(f"  {m:<10} pairs {v['pairs']}: FLAIR {_f(v['flair_robust_sd_percent'])} %, "
                  f"T1c {_f(v['t1c_robust_sd_percent'])} %; |median| FLAIR {_f(v['flair_abs_median_percent'])} %, "
                  f"T1c {_f(v['t1c_abs_median_percent'])} %; new per pair {_f(v['fp_per_pair'])}, "
                  f"growing {_f(v['growing_per_pair'])}")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated BraTS 2018 case ids (default all 12)")
    parser.add_argument("--variants", default="nochange,grown,new", help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=None, help="block-average the sources to this spacing (mm)")
    parser.add_argument("--model", default="baseline",
                        help="segmentation model (PipelineConfig.model; default baseline, the segmenter the "
                             "issue's time target names; 'auto' = the product's default, the trained model)")
    parser.add_argument("--config", type=Path, default=None,
                        help="longitudinal YAML (default config/longitudinal.yaml)")
    parser.add_argument("--mode", default=None, choices=("tumour", "lesion"),
                        help="force the follow-up mode (default: the YAML's, auto = tumour with the T1c reference); "
                             "lesion = MS-like new/enlarging FLAIR lesions, scored on the 'new' and 'nochange' "
                             "variants")
    parser.add_argument("--matching", default="",
                        help="e.g. histogram,linear: compare intensity matching on no-change pairs")
    parser.add_argument("--new-volumes", default="",
                        help="fix the new lesions of the new/thick variants to these volumes (mm^3, comma-separated, "
                             "e.g. 700,1500 for lesions of RANO-measurable size, both diameters >= 10 mm; the default "
                             "15-500 mm^3 rarely are); such pairs go to <case>_<variant>_v<volumes>")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="pairs and work folders (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--reuse-pairs", action="store_true",
                        help="reuse pairs already in --out (same seed, spacing, generator version), reprocessed")
    parser.add_argument("--reuse-work", action="store_true",
                        help="as --reuse-pairs, and keep their processed work folders (the image steps of both "
                             "timepoints are cached; only the longitudinal comparison re-runs, so 'added' "
                             "times then exclude the prior's preparation)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    args.matching = [m for m in args.matching.split(",") if m]
    args.new_volumes = [float(v) for v in args.new_volumes.split(",") if v] or None
    bad = [c for c in cases if c not in CASES] + [v for v in variants if v not in VARIANTS] + \
          [m for m in args.matching if m not in ("histogram", "linear")]
    if bad:
        parser.error(f"unknown case/variant/matching: {bad}")
    tmp = None
    if args.out is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-longitudinal-"))
        args.out = tmp
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = PipelineConfig(model=args.model)
    lcfg = LongitudinalConfig.load(args.config)
    if args.mode:
        lcfg = replace(lcfg, mode=args.mode)
    rows = []
    started = time.monotonic()
    for case in cases:
        for variant in variants:
            try:
                row = run_pair(case, variant, args, cfg, lcfg)
            except Exception as exc:  # reported per pair, the run goes on
                row = {"case": case, "variant": variant, "split": "tune" if case in TUNE_CASES else "holdout",
                       "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            rows.append(row)
            if row.get("error"):
                print(f"  {case} {variant}: ERROR {row['error']}", flush=True)
            else:
                extra = ""
                if "new_lesions" in row:
                    t = row["new_lesions"]["truth"]
                    extra = (f"detected {sum(x['detected'] for x in t)}/{len(t)}, "
                             f"unmatched {len(row['new_lesions']['false_positives'])}")
                elif "growth" in row:
                    g = row["growth"]
                    extra = (f"WT growth true {g['true_mm3']['whole_tumor']:.0f} reported {g['reported_WT_mm3']} mm3, "
                             f"TC true {g['true_mm3']['tumor_core']:.0f} reported {g['reported_TC_mm3']} mm3")
                print(f"  {case} {variant}: {row['assessment']}, new {row['n_new']}, growing {row['n_growing']}; "
                      f"{extra}; current {row['current_s']} s, added {row['added_s']} s", flush=True)
    totals = {"tune": split_totals([r for r in rows if r["case"] in TUNE_CASES]),
              "holdout": split_totals([r for r in rows if r["case"] in HOLDOUT_CASES]),
              "all": split_totals(rows)}
    if args.matching:
        totals["matching"] = matching_totals(rows, args.matching)
    print_report(rows, totals, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "bench/longitudinal.py (issue 11)",
            "config": {"cases": cases, "variants": variants, "seed": args.seed, "spacing_mm": args.spacing,
                       "new_volumes_mm3": args.new_volumes,
                       "model": args.model, "longitudinal": lcfg.to_dict(), "matching": args.matching,
                       "cpus": os.cpu_count(), "platform": platform.platform()},
            "targets": TARGETS, "elapsed_s": round(time.monotonic() - started, 1),
            "totals": totals, "pairs": rows}, indent=1, default=str))
        print(f"JSON: {args.json}")
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        print(f"kept: {tmp}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
