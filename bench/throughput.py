"""Throughput of the scaled-out mode: studies per hour with 1 and 2
single-threaded Celery workers against the local pool, the scaling ratio,
the latency the Celery path adds per study, and an extrapolation to a site.

    python bench/throughput.py [--studies 4] [--slice-step 5] [--skip-local]

Real peers: PostgreSQL (job store), redis-server (broker), `brainline serve`
and `brainline worker` processes. Every process is single-threaded
(OMP/ITK/MKL threads = 1; local pool BRAINLINE_WORKERS=1; workers
--concurrency 1), so "workers" counts CPU cores used by image stages.

Figures:
* studies/hour = N / (last job finished - first job created), N studies
  pushed at once (distinct studies, fresh UIDs, same source volumes);
* scaling = studies/hour with 2 workers / with 1 worker (issue 13: >= 1.8);
* added latency: one study alone (no queueing behind other studies), job
  wall time minus the sum of its stage durations, Celery (1 worker) minus
  local pool: what dispatching each stage through the broker costs (issue
  13: <= 2 s per study). In the throughput runs the same difference also
  holds the time a job's next stage waits behind other jobs' stages, so it
  is not used for latency;
* CPU seconds per study on the workers and on the gateway (process CPU time
  from /proc, minus what the idle processes used before the push);
* GPU seconds per study: the stages that would use a GPU (skull_strip with
  deepbet, segment with a network model) measured here on CPU, reported as
  the upper bound of what the gpu queue would take;
* extrapolation to 10 scanners x 40 studies/day.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.celery_peers import Cluster, RedisServer, new_database  # noqa: E402
from tests.dicom_factory import write_study  # noqa: E402
from tests.peers import PostgresServer, ServiceProcess, storescu  # noqa: E402

TCGA = REPO.parent / "shared" / "data" / "tcga-du-7294"
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.rstrip("Z")).timestamp()


def push_all(studies, port: int) -> None:
    threads = [threading.Thread(target=storescu, args=(s.series["t1"].dir.parent, port)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(gateway: ServiceProcess, workers: list, studies, timeout: float) -> dict:
    procs = {"gateway": [gateway.proc.pid], "workers": [w.proc.pid for w in workers]}
    before = {k: sum(cpu_seconds(p) for p in pids) for k, pids in procs.items()}
    push_all(studies, gateway.dicom_port)
    jobs = gateway.wait_jobs(len(studies), timeout=timeout)
    after = {k: sum(cpu_seconds(p) for p in pids) for k, pids in procs.items()}
    bad = [(j["id"], j["state"], j["error"]) for j in jobs if j["state"] != "done"]
    if bad:
        raise SystemExit(f"jobs did not complete: {bad}")
    span = max(_ts(j["finished_at"]) for j in jobs) - min(_ts(j["created_at"]) for j in jobs)
    overhead = [(_ts(j["finished_at"]) - _ts(j["started_at"])) - sum(s["duration_s"] or 0 for s in j["stages"])
                for j in jobs]
    stages: dict[str, list[float]] = {}
    for j in jobs:
        for s in j["stages"]:
            stages.setdefault(s["name"], []).append(s["duration_s"] or 0.0)
    n = len(jobs)
    return {"studies": n, "span_s": span, "per_hour": n / span * 3600,
            "overhead_s": sum(overhead) / n, "stage_s": {k: sum(v) / len(v) for k, v in stages.items()},
            "cpu_gateway_s": (after["gateway"] - before["gateway"]) / n,
            "cpu_workers_s": (after["workers"] - before["workers"]) / n if workers else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=4, help="studies pushed at once per run (default 4)")
    p.add_argument("--slice-step", type=int, default=5, help="keep every n-th slice (1 = 240x240x155 study)")
    p.add_argument("--skip-local", action="store_true", help="do not run the local-pool baseline")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--latency-only", action="store_true",
                   help="only the single-study latency runs (local pool vs celery, 1 worker)")
    args = p.parse_args()
    env_backup = dict(os.environ)
    os.environ.update(SINGLE_THREAD)  # inherited by every brainline process started below
    root = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    results = {}
    try:
        print(f"writing {args.studies} studies (slice step {args.slice_step}) ...", flush=True)
        studies = [write_study(root / f"study{i}", TCGA, slice_step=args.slice_step) for i in range(args.studies)]
        with PostgresServer() as pg, RedisServer() as redis:
            if not args.skip_local and not args.latency_only:
                svc = ServiceProcess(root / "local", BRAINLINE_WORKERS=1,
                                     BRAINLINE_DATABASE_URL=new_database(pg)).start()
                try:
                    results["local pool, 1 thread"] = measure(svc, [], studies, args.timeout)
                finally:
                    svc.stop()
                print_result("local pool, 1 thread", results["local pool, 1 thread"])
            for n_workers in (() if args.latency_only else (1, 2)):
                name = f"celery, {n_workers} worker{'s' if n_workers > 1 else ''}"
                with Cluster(root / f"c{n_workers}", pg, redis, workers=n_workers,
                             gateway_env={"BRAINLINE_WORKERS": 1},
                             worker_env={"BRAINLINE_WORKER_CONCURRENCY": 1}) as cluster:
                    results[name] = measure(cluster.gateway, cluster.workers, studies, args.timeout)
                print_result(name, results[name])
            # Latency: one study alone, local pool vs Celery with one worker.
            svc = ServiceProcess(root / "lat-local", BRAINLINE_WORKERS=1,
                                 BRAINLINE_DATABASE_URL=new_database(pg)).start()
            try:
                results["latency: local"] = measure(svc, [], studies[:1], args.timeout)
            finally:
                svc.stop()
            print_result("latency: local", results["latency: local"])
            with Cluster(root / "lat-c1", pg, redis, workers=1, gateway_env={"BRAINLINE_WORKERS": 1},
                         worker_env={"BRAINLINE_WORKER_CONCURRENCY": 1}) as cluster:
                results["latency: celery"] = measure(cluster.gateway, cluster.workers, studies[:1],
                                                     args.timeout)
            print_result("latency: celery", results["latency: celery"])
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    summarize(results)
    return 0


def print_result(name: str, r: dict) -> None:
    cpu_w = f"{r['cpu_workers_s']:.1f}" if r["cpu_workers_s"] is not None else "-"
    print(f"{name:24s} {r['studies']} studies in {r['span_s']:.0f} s = {r['per_hour']:.1f} studies/h; "
          f"overhead {r['overhead_s']:.2f} s/study; CPU s/study gateway {r['cpu_gateway_s']:.1f}, "
          f"workers {cpu_w}", flush=True)


def summarize(results: dict) -> None:
    lat_local, lat_celery = results["latency: local"], results["latency: celery"]
    added = lat_celery["overhead_s"] - lat_local["overhead_s"]
    print(f"\n  added latency of the Celery path (one study alone): {added:+.2f} s/study "
          f"(outside stages: celery {lat_celery['overhead_s']:.2f} s, local {lat_local['overhead_s']:.2f} s; "
          "target <= 2 s)")
    if "celery, 1 worker" not in results:
        return
    one, two = results["celery, 1 worker"], results["celery, 2 workers"]
    scaling = two["per_hour"] / one["per_hour"]
    print("\n== throughput (single-threaded processes, this machine: "
          f"{os.cpu_count()} cores, shared) ==")
    for name, r in results.items():
        print(f"  {name:24s} {r['per_hour']:7.1f} studies/h")
    print(f"  scaling 1 -> 2 workers: {scaling:.2f}x (target >= 1.8)")
    stage = one["stage_s"]
    print("  mean stage durations (celery, 1 worker): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in stage.items()))
    compute = one["cpu_workers_s"]
    gateway = one["cpu_gateway_s"]
    gpu_able = stage.get("skull_strip", 0) + stage.get("segment", 0)
    print(f"  per study: worker CPU {compute:.1f} s, gateway CPU {gateway:.1f} s, "
          f"GPU-able stages (skull_strip + segment) {gpu_able:.1f} s on CPU")
    # Extrapolation: 10 scanners x 40 studies/day.
    per_day = 10 * 40
    for label, hours in (("spread over 24 h", 24), ("within a 10 h working day", 10)):
        rate = per_day / hours
        busy = rate * compute / 3600  # worker-cores busy on average
        workers = math.ceil(busy / 0.7)  # keep workers <= 70 % busy so queues drain
        print(f"  10 scanners x 40 studies/day {label}: {rate:.0f} studies/h -> "
              f"{busy:.2f} worker-cores busy -> {max(1, workers)} single-threaded workers at <= 70 % load; "
              f"gateway CPU {rate * gateway / 3600:.2f} cores")


if __name__ == "__main__":
    sys.exit(main())
