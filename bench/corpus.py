"""Benchmark of issue 7: the clinical-like corpus through `brainline serve` into a real Orthanc.

Generates the corpus (tests/corpus.py: 13 cases x patterns a-d, or a subset),
starts a real Orthanc and a real `brainline serve` (BRAINLINE_WORKERS=1,
BRAINLINE_STABLE_SECONDS small, BRAINLINE_DEST_DICOM = the Orthanc), and pushes
the studies one after the other with dcmtk storescu. Per study it waits for the
job, checks that Orthanc holds a SEG and an SR for the StudyInstanceUID, scores
the SEG read back from Orthanc (else the workspace segmentation.nii.gz) against
reference_seg.nii.gz, and computes the naive floor (FLAIR z > 1 inside the same
brain mask, tests.corpus.naive_flair_floor on the job workspace).

Wall time per study: from the first instance pushed to both SEG and SR stored in
Orthanc; it includes the push and the quiet period (stated in the output). The
study budget of issue 7 is 60 s on 2 cores.

Prints a table and the totals; ``--json PATH`` writes every figure. Exit code 0
when every job ended with SEG + SR in Orthanc, 1 otherwise (a failing job is
reported, never a crash of the benchmark).

    .venv/bin/python bench/corpus.py --cases 2013_11,tcga-du-7294 --json /tmp/corpus-bench.json
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
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainline.pipelines.records import REGISTRATION_FILE, SUMMARY_FILE, existing_file  # noqa: E402
from tests.corpus import (  # noqa: E402
    CASE_IDS,
    CORPUS_VERSION,
    DEFAULT_DATA,
    HOLDOUT_CASES,
    PATTERNS,
    TUNE_CASES,
    corpus_cases,
    load_case_json,
    naive_flair_floor,
    score,
    study_name,
    write_corpus_study,
)
from tests.peers import OrthancServer, ServiceProcess, storescu  # noqa: E402

BUDGET_S = 60.0
FINAL_STATES = {"done", "failed", "needs_input", "rejected"}


# --------------------------------------------------------------------------- service


class Service(ServiceProcess):
    """A `brainline serve` subprocess on loopback ports with its own home
    (tests.peers.ServiceProcess with the benchmark's vault key and log)."""

    def __init__(self, home: Path, env: dict[str, str]):
        super().__init__(home, BRAINLINE_VAULT_KEY="bench-corpus-vault-key-0123456789", **env)
        self.log_path = self.stdout_path

    def start(self, timeout: float = 120.0) -> "Service":
        super().start(wait_ready=True, timeout=timeout)
        return self

    def log_tail(self, n: int = 3000) -> str:
        return self.output()[-n:]


# --------------------------------------------------------------------------- Orthanc


def orthanc_instances(orthanc: OrthancServer, study_uid: str, modality: str) -> list[str]:
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}
    return httpx.post(orthanc.http_url + "/tools/find", json=query, timeout=30).json()


def seg_image_from_orthanc(orthanc: OrthancServer, instance_id: str, scratch: Path):
    """The SEG stored in Orthanc as a SimpleITK label map (BraTS 2023 labels) in physical space."""
    import highdicom as hd

    from brainline.pipelines.dicom_outputs.seg import segment_label_values

    path = scratch / f"{instance_id}.dcm"
    path.write_bytes(orthanc.get(f"/instances/{instance_id}/file").content)
    seg = hd.seg.segread(path)
    mapping = segment_label_values(seg)
    volume = seg.get_volume(combine_segments=True, relabel=False, dtype=np.uint8)
    numbers = volume.array
    labels = np.zeros(numbers.shape, np.uint8)
    for number, value in mapping.items():
        labels[numbers == number] = value
    return volume.with_array(labels).to_simpleitk()


# --------------------------------------------------------------------------- one study


def run_study(study: Path, service: Service, orthanc: OrthancServer, args, scratch: Path) -> dict:
    info = load_case_json(study)
    row: dict = {"study": study.name, "case": info["case_id"], "pattern": info["pattern"], "split": info["split"],
                 "roles": info["roles"], "study_uid": info["study_uid"], "state": None, "error": None,
                 "seg_in_orthanc": False, "sr_in_orthanc": False, "scored_from": None,
                 "WT": None, "TC": None, "ET": None, "floor_WT": None, "wall_s": None,
                 "registration_flags": [], "qc_flags": [],
                 "ref_has_ET": info["reference"]["volumes_ml"]["ET"] > 0}
    known = {j["id"] for j in service.jobs()}
    t0 = time.monotonic()
    pushed = storescu(study / "dicom", service.dicom_port, called_aet="BRAINLINE", timeout=args.timeout)
    row["push_s"] = round(time.monotonic() - t0, 2)
    if pushed.returncode != 0:
        row.update(state="push_failed", error=f"storescu exit {pushed.returncode}: {pushed.stderr[-500:]}")
        return row

    deadline = t0 + args.timeout
    job = None
    while time.monotonic() < deadline and service.alive():
        new = [j for j in service.jobs() if j["id"] not in known]
        if new and all(j["state"] in FINAL_STATES for j in new):
            job = service.job(max(j["id"] for j in new))
            break
        time.sleep(0.5)
    if job is None:
        row.update(state="timeout" if service.alive() else "service_died",
                   error=f"no finished job within {args.timeout:.0f} s" if service.alive()
                   else "brainline serve exited: " + service.log_tail(800))
        return row
    row.update(job_id=job["id"], state=job["state"], error=job.get("error"), job_duration_s=job.get("duration_s"),
               stages={s["name"]: {"state": s["state"], "s": s["duration_s"], "error": s["error"]}
                       for s in job.get("stages", [])})

    # SEG and SR in Orthanc (the outbox delivers after the job is done)
    wait_until = time.monotonic() + (args.delivery_timeout if job["state"] == "done" else 3.0)
    seg_ids: list[str] = []
    while True:
        seg_ids = orthanc_instances(orthanc, info["study_uid"], "SEG")
        sr_ids = orthanc_instances(orthanc, info["study_uid"], "SR")
        if seg_ids and sr_ids or time.monotonic() > wait_until:
            break
        time.sleep(0.25)
    row["seg_in_orthanc"], row["sr_in_orthanc"] = bool(seg_ids), bool(sr_ids)
    row["wall_s"] = round(time.monotonic() - t0, 1)
    row["load_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine while this study ran

    work = service.workspace(job["id"])
    reference = study / "reference_seg.nii.gz"
    segmentation = None
    if seg_ids:
        try:
            segmentation, row["scored_from"] = seg_image_from_orthanc(orthanc, seg_ids[0], scratch), "orthanc SEG"
        except Exception as exc:  # reported, then the workspace file is scored instead
            row["seg_read_error"] = f"{type(exc).__name__}: {exc}"
    if segmentation is None and (work / "segmentation.nii.gz").exists():
        segmentation, row["scored_from"] = work / "segmentation.nii.gz", "workspace segmentation.nii.gz"
    if segmentation is not None:
        figures = score(segmentation, reference)
        row.update({k: figures[k] for k in ("WT", "TC", "ET")}, volumes_ml=figures)
        if row["scored_from"] == "orthanc SEG" and (work / "segmentation.nii.gz").exists():
            row["seg_vs_workspace_WT"] = score(segmentation, work / "segmentation.nii.gz")["WT"]
    try:
        row["floor_WT"] = score(naive_flair_floor(work), reference)["WT"]
    except Exception as exc:
        row["floor_error"] = f"{type(exc).__name__}: {exc}"
    for name, key in ((REGISTRATION_FILE, "registration_flags"), (SUMMARY_FILE, "qc_flags")):
        try:
            record = json.loads(existing_file(work / name).read_text())
            row[key] = list(record.get("flags" if key == "registration_flags" else "qc_flags", []))
        except (OSError, ValueError):
            pass
    return row


# --------------------------------------------------------------------------- report


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def totals(rows: list[dict]) -> dict:
    crashes = [r["study"] for r in rows if r["state"] not in ("done", "needs_input")]
    without = [r["study"] for r in rows if not (r["seg_in_orthanc"] and r["sr_in_orthanc"])]

    def mean(split_cases, key):
        values = [r[key] or 0.0 for r in rows if r["case"] in split_cases and (key != "ET" or r.get("ref_has_ET"))]
        return round(float(np.mean(values)), 4) if values else None

    below = [r["study"] for r in rows if r["floor_WT"] is not None and (r["WT"] or 0.0) < r["floor_WT"]]
    walls = [r["wall_s"] for r in rows if r["wall_s"] is not None and r["seg_in_orthanc"] and r["sr_in_orthanc"]]
    flagged = {r["study"]: r["registration_flags"] for r in rows if r["registration_flags"]}
    per_pattern = {}
    for p in sorted({r["pattern"] for r in rows}):
        sub = [r for r in rows if r["pattern"] == p]
        per_pattern[p] = {"n": len(sub), "mean_WT": round(float(np.mean([r["WT"] or 0.0 for r in sub])), 4),
                          "mean_floor_WT": round(float(np.mean([r["floor_WT"] or 0.0 for r in sub])), 4)}
    return {
        "studies": len(rows),
        "crashes": len(crashes), "crashed_studies": crashes,
        "needs_input": sum(r["state"] == "needs_input" for r in rows),
        "without_seg_sr": len(without), "without_seg_sr_studies": without,
        "mean_WT_holdout": mean(HOLDOUT_CASES, "WT"), "mean_TC_holdout": mean(HOLDOUT_CASES, "TC"),
        "mean_ET_holdout": mean(HOLDOUT_CASES, "ET"),
        "mean_WT_tune": mean(TUNE_CASES, "WT"), "mean_TC_tune": mean(TUNE_CASES, "TC"),
        "mean_ET_tune": mean(TUNE_CASES, "ET"),
        "n_holdout": sum(r["case"] in HOLDOUT_CASES for r in rows),
        "n_tune": sum(r["case"] in TUNE_CASES for r in rows),
        "below_floor": len(below), "below_floor_studies": below,
        "median_wall_s": round(statistics.median(walls), 1) if walls else None,
        "max_wall_s": round(max(walls), 1) if walls else None,
        "over_budget": sum(w > BUDGET_S for w in walls), "budget_s": BUDGET_S,
        "other_qc_flags": {r["study"]: [f for f in r["qc_flags"] if f not in r["registration_flags"]]
                           for r in rows if any(f not in r["registration_flags"] for f in r["qc_flags"])},
        "registration_flags": sum(len(v) for v in flagged.values()),
        "studies_with_registration_flags": flagged,
        "per_pattern": per_pattern,
    }


def print_report(rows: list[dict], t: dict, args) -> None:
    header = (f"{'case':<14}{'pat':<4}{'state':<13}{'SEG+SR':<7}{'WT':>7}{'TC':>7}{'ET':>7}"
              f"{'floorWT':>8}{'wall s':>8}  reg flags")
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        both = "yes" if r["seg_in_orthanc"] and r["sr_in_orthanc"] else (
            "SEG" if r["seg_in_orthanc"] else "SR" if r["sr_in_orthanc"] else "no")
        flags = "; ".join(r["registration_flags"]) if r["registration_flags"] else ""
        print(f"{r['case']:<14}{r['pattern']:<4}{str(r['state']):<13}{both:<7}{_f(r['WT']):>7}{_f(r['TC']):>7}"
              f"{_f(r['ET']):>7}{_f(r['floor_WT']):>8}{_f(r['wall_s'], 1):>8}  {flags}")
    errors = [r for r in rows if r["error"]]
    if errors:
        print("\nerrors:")
        for r in errors:
            print(f"  {r['study']}: {' '.join(str(r['error']).split())[:400]}")
    print(f"\nquiet period BRAINLINE_STABLE_SECONDS = {args.stable_seconds:g} s (inside the wall time); "
          f"{os.cpu_count()} CPUs; BRAINLINE_WORKERS=1")
    print(f"studies: {t['studies']}   crashes (failed/timeout): {t['crashes']}   needs_input: {t['needs_input']}   "
          f"jobs without SEG+SR in Orthanc: {t['without_seg_sr']}")
    print(f"mean WT Dice held-out ({t['n_holdout']} studies): {_f(t['mean_WT_holdout'])}  "
          f"TC {_f(t['mean_TC_holdout'])}  ET {_f(t['mean_ET_holdout'])}   "
          f"[tune ({t['n_tune']}): WT {_f(t['mean_WT_tune'])} TC {_f(t['mean_TC_tune'])} ET {_f(t['mean_ET_tune'])}]"
          "  (a study without segmentation counts 0; ET over studies whose reference has ET)")
    for p, v in t["per_pattern"].items():
        print(f"  pattern {p}: {v['n']} studies, mean WT {v['mean_WT']:.3f}, naive floor {v['mean_floor_WT']:.3f}")
    print(f"below the naive FLAIR floor: {t['below_floor']} {t['below_floor_studies'] or ''}")
    print(f"wall time per study (push -> SEG+SR in Orthanc): median {_f(t['median_wall_s'], 1)} s, "
          f"max {_f(t['max_wall_s'], 1)} s, budget {BUDGET_S:.0f} s, over budget: {t['over_budget']}")
    print(f"registration QC flags raised: {t['registration_flags']} in "
          f"{len(t['studies_with_registration_flags'])} studies (all registrations in this corpus are correct: "
          "every flag is a false alarm)")
    if t["other_qc_flags"]:
        print(f"other QC flags (summary.json qc_flags) in {len(t['other_qc_flags'])} studies:")
        for study, flags in t["other_qc_flags"].items():
            print(f"  {study}: {'; '.join(flags)}")


# --------------------------------------------------------------------------- main


def generate(args, cases, patterns) -> list[Path]:
    from tqdm import tqdm

    studies = []
    started = time.perf_counter()
    made = 0
    for case, pattern in tqdm([(c, p) for c in cases for p in patterns], desc="corpus", unit="study"):
        study = args.out / study_name(case.case_id, pattern)
        ok = (study / "case.json").exists() and (
            (load_case_json(study).get("seed"), load_case_json(study).get("corpus_version"))
            == (args.seed, CORPUS_VERSION))
        if not ok or args.regenerate:
            shutil.rmtree(study, ignore_errors=True)
            write_corpus_study(case, pattern, args.out, args.seed)
            made += 1
        studies.append(study)
    if made:
        print(f"generated {made} studies in {time.perf_counter() - started:.0f} s "
              f"({(time.perf_counter() - started) / made:.1f} s per study)")
    return studies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="corpus folder (reused if present; default: a temp dir)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", default=",".join(CASE_IDS), help="comma-separated case ids (default all 13)")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated patterns (default a,b,c,d)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regenerate", action="store_true", help="rewrite studies already in --out")
    parser.add_argument("--stable-seconds", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per study: push to finished job (s)")
    parser.add_argument("--delivery-timeout", type=float, default=60.0,
                        help="after a done job: wait this long for SEG+SR in Orthanc (s)")
    parser.add_argument("--model", default="baseline",
                        help="BRAINLINE_MODEL for the service (default: baseline, the weight-free method "
                             "issue 7 measures; 'auto' or 'brats17-wang' for the shipped trained model)")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--keep", action="store_true", help="keep the service home (workspaces) after the run")
    args = parser.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    if any(p not in PATTERNS for p in patterns):
        parser.error(f"--patterns: choose from {','.join(PATTERNS)}")
    try:
        cases = corpus_cases(args.data, [c for c in args.cases.split(",") if c])
    except FileNotFoundError as exc:
        parser.error(str(exc))
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    corpus_is_temporary = args.out is None
    args.out = args.out or tmp / "corpus"
    args.out.mkdir(parents=True, exist_ok=True)
    studies = generate(args, cases, patterns)

    env = {"BRAINLINE_STABLE_SECONDS": str(args.stable_seconds), "BRAINLINE_WORKERS": "1"}
    env["BRAINLINE_MODEL"] = args.model
    rows: list[dict] = []
    started = time.monotonic()
    with OrthancServer() as orthanc:
        env["BRAINLINE_DEST_DICOM"] = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
        service = Service(tmp / "home", env)
        scratch = tmp / "scratch"
        scratch.mkdir()
        try:
            service.start()
            print(f"Orthanc {orthanc.version} on {orthanc.dicom_port}; brainline serve on {service.dicom_port} "
                  f"(home {service.home})")
            for study in studies:
                if not service.alive():
                    print(f"brainline serve died; restarting:\n{service.log_tail(1500)}")
                    service.start()
                try:
                    row = run_study(study, service, orthanc, args, scratch)
                except Exception as exc:  # a bench bug or a dead peer: reported per study, the run goes on
                    row = {"study": study.name, "case": load_case_json(study)["case_id"],
                           "pattern": load_case_json(study)["pattern"], "split": load_case_json(study)["split"],
                           "state": "bench_error", "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc(), "seg_in_orthanc": False, "sr_in_orthanc": False,
                           "WT": None, "TC": None, "ET": None, "floor_WT": None, "wall_s": None,
                           "registration_flags": [], "qc_flags": []}
                rows.append(row)
                print(f"  {row['study']}: {row['state']}, SEG {'yes' if row['seg_in_orthanc'] else 'no'}, "
                      f"SR {'yes' if row['sr_in_orthanc'] else 'no'}, WT {_f(row['WT'])}, "
                      f"floor {_f(row['floor_WT'])}, {_f(row['wall_s'], 1)} s, load {row.get('load_1min')}", flush=True)
        finally:
            service.stop()
    t = totals(rows)
    print_report(rows, t, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "bench/corpus.py (issue 7)",
            "config": {"cases": [c.case_id for c in cases], "patterns": patterns, "seed": args.seed,
                       "stable_seconds": args.stable_seconds, "workers": 1, "model": args.model,
                       "cpus": os.cpu_count(), "platform": platform.platform(), "corpus": str(args.out)},
            "elapsed_s": round(time.monotonic() - started, 1),
            "totals": t, "studies": rows}, indent=1, default=str))
        print(f"JSON: {args.json}")
    if args.keep:
        print(f"service home kept: {tmp / 'home'}" + (f"; corpus: {args.out}" if corpus_is_temporary else ""))
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if t["without_seg_sr"] == 0 and t["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
