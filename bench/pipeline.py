"""Benchmark: the whole offline pipeline (DICOM -> summary.json + DICOM results)
on a 4-series 240x240x155 study made from ../shared/data/tcga-du-7294.

Prints wall time and peak resident memory per step, and the totals against
the budget named in the issue (120 s and 3 GB on a 2-core machine, baseline
segmenter). Usage: python bench/pipeline.py [--case DIR] [--keep OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainline.pipelines.image_pipeline import PipelineConfig  # noqa: E402
from brainline.pipelines.process import STEP_NAMES, process_study  # noqa: E402
from tests.dicom_factory import write_study  # noqa: E402

BUDGET_S = 120.0
BUDGET_RSS_MB = 3072.0


class RssSampler:
    """Samples this process's resident set size (MB) every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)
            time.sleep(0.02)

    def reset(self) -> float:
        peak, self.peak = self.peak, 0.0
        return peak

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=REPO.parent / "shared" / "data" / "tcga-du-7294")
    parser.add_argument("--keep", type=Path, help="keep the output folder here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        study = write_study(tmp / "dicom", args.case)
        print(f"study: {study.n_instances} instances, 4 series of 240x240x155 ({args.case.name})")
        out = args.keep or tmp / "out"
        shutil.rmtree(out, ignore_errors=True)
        rows = []
        with RssSampler() as rss:
            t_start = last = time.monotonic()

            def on_step(name: str) -> None:
                nonlocal last
                now = time.monotonic()
                rows.append((name, now - last, rss.reset()))
                last = now

            process_study(study.series["t1"].dir.parent, out, PipelineConfig(), on_step=on_step)
            total = time.monotonic() - t_start
        children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        peak_mb = max(r[2] for r in rows)
        print(f"\n{'step':<20} {'time s':>8} {'peak RSS MB':>12}")
        for name, seconds, mb in rows:
            print(f"{name:<20} {seconds:8.1f} {mb:12.0f}")
        print(f"{'total':<20} {total:8.1f} {peak_mb:12.0f}   (dcm2niix child peak {children_mb:.0f} MB)")
        summary = json.loads((out / "summary.json").read_text())
        print(f"\nwhole tumour {summary['volumes_ml']['whole_tumor']} mL; cores: {os.cpu_count()}")
        print(f"budget (issue #3): {BUDGET_S:.0f} s and {BUDGET_RSS_MB:.0f} MB peak RSS")
        print(f"time ratio total/budget = {total / BUDGET_S:.2f}; memory ratio peak/budget = "
              f"{peak_mb / BUDGET_RSS_MB:.2f}")
        slow = sorted(rows, key=lambda r: -r[1])[:2]
        print("slowest steps: " + ", ".join(f"{n} ({s:.1f} s)" for n, s, _ in slow))
        assert [r[0] for r in rows] == STEP_NAMES
        return 0 if total <= BUDGET_S and peak_mb <= BUDGET_RSS_MB else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
