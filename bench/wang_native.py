#!/usr/bin/env python3
"""Benchmark: Wang et al. BraTS 2017 cascade (PyTorch port) on the 12 shared
BraTS 2018 cases in their native BraTS space.

    .venv/bin/python bench/wang_native.py [--data /work/shared/data/brats18]
        [--device cpu|cuda] [--threads N] [--cases A,B] [--no-tail-overwrite]

Prints WT / TC / ET Dice per case (BraTS regions: WT = labels 1+2+4,
TC = 1+4, ET = 4 of the reference; 1+2+3, 1+3, 3 of BrainLine's output),
the mean, seconds per case (the nine networks plus post-processing, inputs
already in memory) and the peak RSS of the process, against the authors'
reported BraTS 2017 validation Dice (Wang et al. 2017: WT 0.905, TC 0.838,
ET 0.786) as the named baseline. These cases were part of the data published
BraTS models were trained on: the figures check the port, not generalisation.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

AUTHORS = {"WT": 0.905, "TC": 0.838, "ET": 0.786}
TARGET = {"WT": 0.88, "TC": 0.80, "ET": 0.75}


def read_zyx(p: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(p), sitk.sitkFloat32))


def dice(a, b) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/brats18"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tail-overwrite", action="store_true")
    args = ap.parse_args()

    import torch

    from brainline.models.wang_cascade import load_networks, segment_brats

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    if args.cases:
        cases = [c for c in cases if any(k in c for k in args.cases.split(","))]
    load_networks(args.device)
    rows = []
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, seed {args.seed}, "
          f"upstream_tail_overwrite {not args.no_tail_overwrite}")
    print(f"{'case':24s} {'WT':>6s} {'TC':>6s} {'ET':>6s} {'s':>7s} {'cpu s':>7s} {'RSS GB':>7s} "
          f"{'load':>5s}")
    for c in cases:
        d = args.data / c
        vols = [read_zyx(d / f"{c}_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2")]
        ref = read_zyx(d / f"{c}_seg.nii.gz").astype(np.uint8)
        load0 = os.getloadavg()[0]
        t, cpu = time.perf_counter(), time.process_time()
        res = segment_brats(*vols, device=args.device, seed=args.seed,
                            upstream_tail_overwrite=not args.no_tail_overwrite)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        cpu = time.process_time() - cpu
        lab = res.labels
        r = {"case": c, "WT": dice(lab > 0, ref > 0), "TC": dice(np.isin(lab, (1, 3)), np.isin(ref, (1, 4))),
             "ET": dice(lab == 3, ref == 4), "s": sec, "cpu": cpu, "rss": peak_rss_gb(),
             "load": max(load0, os.getloadavg()[0])}
        rows.append(r)
        print(f"{c:24s} {r['WT']:6.3f} {r['TC']:6.3f} {r['ET']:6.3f} {sec:7.1f} {cpu:7.1f} "
              f"{r['rss']:7.2f} {r['load']:5.1f}", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("WT", "TC", "ET", "s", "cpu")}
    print(f"{'mean':24s} {mean['WT']:6.3f} {mean['TC']:6.3f} {mean['ET']:6.3f} {mean['s']:7.1f} "
          f"{mean['cpu']:7.1f} {peak_rss_gb():7.2f}")
    print("(s: wall seconds per case; cpu s: process CPU seconds, all threads; load: the larger 1-min\n"
          " load average before/after the case; on a loaded machine wall time is dominated by waiting\n"
          " for a core)")
    print(f"{'authors (BraTS17 val)':24s} {AUTHORS['WT']:6.3f} {AUTHORS['TC']:6.3f} {AUTHORS['ET']:6.3f}")
    print(f"{'issue target':24s} {TARGET['WT']:6.3f} {TARGET['TC']:6.3f} {TARGET['ET']:6.3f} "
          f"{90.0:7.1f} {'':7s} {3.0:7.2f}")
    ok = all(mean[k] >= TARGET[k] for k in TARGET)
    print("targets met" if ok and mean["s"] <= 90 and peak_rss_gb() <= 3 else "targets NOT all met")


if __name__ == "__main__":
    main()
