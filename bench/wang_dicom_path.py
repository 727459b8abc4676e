#!/usr/bin/env python3
"""Benchmark / diagnosis: the Wang et al. cascade through the DICOM path, stage by stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/wang_dicom_path.py --work /tmp/wdp \
        --cases TCIA01_425,CBICA_ALU [--pattern b] [--variants pipeline,native_all,...]

For each case: writes the clinical-like study (tests/corpus.py, seeded, so the
same study as ``bench/corpus.py``) under ``WORK/corpus``, runs the image stages
up to N4 (selection, conversion, co-registration, skull stripping, N4; cached
in ``WORK/ws/<study>``, so a second run starts at the model space), then maps
the study into the BraTS frame (pipelines/model_space.py) and runs the cascade
there, once per *variant*:

* ``pipeline``: what the segment step did before 2026-11-30: no brain-mask
  erosion, linear interpolation (``map_to_model_space(..., mask_erode_mm=0,
  interpolator="linear")``);
* ``product``: what the segment step does now (``map_to_model_space`` with
  ``mask_source`` = the sequence the brain mask was thresholded from when the
  study came skull-stripped: that mask eroded by half a slice of the series;
  cubic B-spline interpolation, the default);
* ``native_<roles>`` (e.g. ``native_flair``, ``native_all``): the pipeline's
  model-space inputs with the named sequences replaced by the original BraTS
  volumes carried into the same frame (the corpus keeps physical space, so the
  template -> reference transform applies to them unchanged); the brain mask
  stays the pipeline's;
* ``bratsmask``: the pipeline's inputs, masked with BraTS's own skull strip
  (any source sequence > 0) carried into the frame instead of the pipeline's
  brain mask;
* ``native_bratsmask``: the original BraTS volumes and BraTS's skull strip;
* ``opt:key=value;...``: ``map_to_model_space`` options (e.g.
  ``opt:mask_erode_mm=3``).

``product`` needs the segment step to pass ``mask_source`` (see
``_segment_in_model_space`` in pipelines/image_pipeline.py); the variant
applies the same rule from the workspace's ``skull_strip.json``.
Labels of every variant are kept in ``WORK/ws/<study>/bench_model_space/``;
``--json`` appends one line per (case, variant).

Scores: Dice of WT / TC / ET in the model frame (the reference labels carried
into it, nearest neighbour) and, like the product, on the reference series'
grid scored in physical space (``tests.corpus.score``); brain-mask volume in
the model frame against BraTS's skull strip, and the WT volume.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from brainline.pipelines.image_pipeline import thresholded_mask_source  # noqa: E402
from tests.corpus import (  # noqa: E402
    REGIONS,
    corpus_cases,
    score,
    study_name,
    write_corpus_study,
)

ROLES = ("t1", "t1c", "t2", "flair")
PRE_STAGES = ("select_series", "convert", "register", "skull_strip", "bias_correct")


def prepare(case_id: str, pattern: str, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The study (DICOM) and its workspace with the stages up to N4 done."""
    from brainline.pipelines.image_pipeline import PipelineConfig
    from brainline.pipelines.stage_table import stages

    study = work / "corpus" / study_name(case_id, pattern)
    if not (study / "case.json").exists():
        write_corpus_study(corpus_cases(cases=[case_id])[0], pattern, work / "corpus", seed)
    ws = work / "ws" / study.name
    ws.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(PipelineConfig(), dicom_dir=str(study / "dicom"), results_dir="dicom")
    for stage in stages():
        if stage.name in PRE_STAGES:
            stage.function()(ws, cfg)
    return study, ws


# --------------------------------------------------------------------------- model frame


def model_space_of(ws: Path, reference: str = "t1c"):
    """The segment step's model space of a prepared workspace (the template
    registration is cached in ``ws/bench_model_space/``)."""
    from brainline.pipelines.model_space import ModelSpace, fit_model_space, template_image

    paths = {r: ws / "preprocessed" / f"{r}.nii.gz" for r in ROLES}
    mask = sitk.ReadImage(str(ws / "brain_mask.nii.gz"), sitk.sitkUInt8)
    cache = ws / "bench_model_space"
    if (cache / "to_reference.tfm").exists():
        rec = json.loads((cache / "registration.json").read_text())
        ms = ModelSpace(space="brats", template=template_image(rec["role"]),
                        to_reference=sitk.ReadTransform(str(cache / "to_reference.tfm")),
                        registration=rec["registration"], template_role=rec["role"])
    else:
        ms = fit_model_space(paths, mask, "brats")
        cache.mkdir(exist_ok=True)
        sitk.WriteTransform(ms.to_reference, str(cache / "to_reference.tfm"))
        (cache / "registration.json").write_text(json.dumps(
            {"role": ms.template_role, "registration": ms.registration}, default=str))
    native, to_native = {}, {}
    for role in ROLES:
        native[role] = sitk.ReadImage(str(ws / "nifti" / f"{role}.nii.gz"), sitk.sitkFloat32)
        tfm = ws / "registered" / f"{role}_to_{reference}.tfm"
        to_native[role] = sitk.ReadTransform(str(tfm)) if role != reference and tfm.exists() else None
    return ms, native, to_native, mask


def _arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def source_in_frame(case_id: str, ms) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The original BraTS volumes, BraTS's skull strip (any sequence > 0) and the
    reference labels, carried into the model frame (the corpus keeps physical
    space: the template -> reference transform applies to the source as is)."""
    case = corpus_cases(cases=[case_id])[0]
    vols = {}
    strip = None
    for role in ROLES:
        src = sitk.ReadImage(str(case.images[role]), sitk.sitkFloat32)
        vols[role] = _arr(sitk.Resample(src, ms.template, ms.to_reference, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        s = sitk.Cast(src > 0, sitk.sitkUInt8)
        strip = s if strip is None else sitk.Or(strip, s)
    strip_f = _arr(sitk.Resample(strip, ms.template, ms.to_reference, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    ref = sitk.ReadImage(str(case.reference))
    labels = _arr(sitk.Resample(ref, ms.template, ms.to_reference, sitk.sitkNearestNeighbor, 0, ref.GetPixelID()))
    labels = labels.astype(np.uint8)
    labels[labels == 4] = 3
    return vols, strip_f, labels


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(a.sum()) + int(b.sum())
    return None if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def frame_scores(labels: np.ndarray, ref: np.ndarray) -> dict:
    out = {}
    for name, labs in REGIONS.items():
        r = np.isin(ref, labs)
        out[name] = _dice(np.isin(labels, labs), r) if r.any() else None
        out[f"{name}_ml"] = round(float(np.isin(labels, labs).sum()) / 1000.0, 2)
    return out


def run_cascade(inputs: dict[str, np.ndarray], mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """As models/wang_backend.py: mask, then segment_brats."""
    from brainline.models.wang_cascade import segment_brats

    arrays = {}
    for role in ROLES:
        a = np.array(inputs[role], np.float32, copy=True)
        a[~mask] = 0
        arrays[role] = a
    return segment_brats(arrays["flair"], arrays["t1"], arrays["t1c"], arrays["t2"], seed=seed).labels


def pipeline_inputs(ms, native, to_native, mask, out_dir: Path, **options) -> tuple[dict, np.ndarray]:
    """What ``map_to_model_space`` writes, read back as arrays."""
    from brainline.pipelines.model_space import map_to_model_space

    paths = map_to_model_space(ms, native, to_native, mask, out_dir, **options)
    arrays = {r: _arr(sitk.ReadImage(str(paths[r]), sitk.sitkFloat32)) for r in ROLES}
    return arrays, _arr(sitk.ReadImage(str(paths["mask"]))) > 0


def norm_stats(a: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    v = a[m & (a > 0)]
    return float(v.mean()), float(v.std())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--pattern", default="b")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--variants", default="pipeline")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per (case, variant)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from brainline.pipelines.model_space import labels_to_reference

    for case_id in args.cases.split(","):
        t = time.perf_counter()
        study, ws = prepare(case_id, args.pattern, args.work)
        print(f"{case_id}: prepared {ws} in {time.perf_counter() - t:.0f} s", flush=True)
        if args.prepare_only:
            continue
        ms, native, to_native, mask = model_space_of(ws)
        src, strip, ref_frame = source_in_frame(case_id, ms)
        # before the brain-mask erosion (mask_erode_mm=0): the segment step until 2026-11-30
        base, base_mask = pipeline_inputs(ms, native, to_native, mask, ws / "bench_model_space" / "pipeline",
                                          mask_erode_mm=0.0, interpolator="linear")
        print(f"  brain mask in frame {base_mask.sum() / 1000:.0f} mL, BraTS strip {strip.sum() / 1000:.0f} mL, "
              f"Dice {_dice(base_mask, strip):.3f}", flush=True)
        for variant in args.variants.split(","):
            inputs, m = dict(base), base_mask
            if variant == "pipeline":
                pass
            elif variant == "product":  # the segment step now: a "> 0" mask eroded by half a slice
                source = thresholded_mask_source(ws, native)
                inputs, m = pipeline_inputs(ms, native, to_native, mask, ws / "bench_model_space" / "product",
                                            mask_source=source)
            elif variant.startswith("native_"):
                names = ROLES if variant == "native_all" else variant[len("native_"):].split("+")
                for r in names:
                    inputs[r] = src[r]
            elif variant == "bratsmask":
                m = strip
            elif variant == "native_bratsmask":
                inputs, m = dict(src), strip
            elif variant.startswith("opt:"):  # opt:key=value;key=value -> map_to_model_space options
                opts = dict(kv.split("=", 1) for kv in variant[4:].split(";"))
                opts = {k: (float(v) if v.replace(".", "", 1).isdigit() else v) for k, v in opts.items()}
                inputs, m = pipeline_inputs(ms, native, to_native, mask,
                                            ws / "bench_model_space" / variant.replace(":", "_").replace(";", "_"),
                                            **opts)
            else:
                raise SystemExit(f"unknown variant {variant}")
            stats = {r: [round(x, 1) for x in norm_stats(inputs[r], m)] for r in ROLES}
            t = time.perf_counter()
            labels = run_cascade(inputs, m)
            sec = time.perf_counter() - t
            fs = frame_scores(labels, ref_frame)
            np.savez_compressed(ws / "bench_model_space" / f"labels_{variant.replace(':', '_').replace(';', '_')}.npz",
                                labels=labels)
            lab_img = sitk.GetImageFromArray(labels)
            lab_img.CopyInformation(ms.template)
            ref_grid = sitk.ReadImage(str(ws / "brain_mask.nii.gz"), sitk.sitkUInt8)
            prod = score(labels_to_reference(lab_img, ms, ref_grid), study / "reference_seg.nii.gz")
            row = {"case": case_id, "variant": variant, "mask_ml": round(float(m.sum()) / 1000, 1),
                   "strip_ml": round(float(strip.sum()) / 1000, 1), "frame": fs,
                   "product": {k: prod[k] for k in ("WT", "TC", "ET", "WT_ml", "WT_ref_ml", "TC_ml", "TC_ref_ml")},
                   "norm_mean_std": stats, "s": round(sec, 1)}
            f = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
            print(f"  {variant:28s} frame WT {f(fs['WT'])} TC {f(fs['TC'])} ET {f(fs['ET'])} | product WT "
                  f"{f(prod['WT'])} TC {f(prod['TC'])} ET {f(prod['ET'])} | WT {prod['WT_ml']:.1f} mL "
                  f"(ref {prod['WT_ref_ml']:.1f}) TC {prod['TC_ml']:.1f} (ref {prod['TC_ref_ml']:.1f}) "
                  f"| mask {row['mask_ml']} mL | {sec:.0f} s", flush=True)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
