"""Ingest benchmark: C-STORE a full brain MR study into BrainLine and into Orthanc.

Builds the 4-series, 620-instance study of a case (default: tcga-du-7294) with
``tests.dicom_factory``, then pushes it with dcmtk ``storescu`` (one association, all
files) to (a) a freshly started ``brainline serve`` and (b) an Orthanc with the DICOMweb
plugin, both on 127.0.0.1. Each push is timed wall-clock (seconds, including storescu
start-up and association set-up). Every repeat writes a new study (fresh Study, Series
and SOP Instance UIDs) so neither server can deduplicate; Orthanc is also emptied before
each push. Unless --no-rest is given, the same files are also POSTed to Orthanc's REST
``/instances`` as a reference row (not part of the ratio): dcmtk-based SCPs such as this
Orthanc build pay a ~40 ms Nagle/delayed-ACK stall per C-STORE response on Linux, and the
REST figure shows how much of Orthanc's C-STORE time is that stall rather than storage.

Each row also shows the 1-minute load average when the push started (this benchmark
runs on shared machines: compare figures measured at similar load) and, for BrainLine,
the CPU seconds the server process used during the push. The summary states BrainLine's
median against the issue-8 target (620 instances in at most 2.5 s, with streaming to disk
and an fdatasync before every success status) and the earlier README figure (3.86 s).

Usage::

    python bench/ingest.py [--repeat 3] [--targets brainline,orthanc] [--slice-step 1]

Exit status: 0 when every requested target ran and every push succeeded; 1 when
BrainLine could not be started or a push failed (figures for the rest are still printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.dicom_factory import write_study  # noqa: E402
from tests.peers import OrthancServer, free_port, storescu  # noqa: E402

DEFAULT_CASE = Path("/work/shared/data/tcga-du-7294")
AE_TITLE = "BRAINLINE"
TARGET_S = 2.5       # issue 8: 620-instance study, streamed to disk, fsync before each status
PREVIOUS_S = 3.86    # README figure of 2026-11-23 (one storescu association, median of 3)
TARGET_INSTANCES = 620


# ------------------------------------------------------------------- BrainLine


class BrainLineServer:
    """``brainline serve`` as a subprocess with its own BRAINLINE_HOME on loopback ports."""

    def __init__(self, startup_timeout: float = 60.0) -> None:
        self.startup_timeout = startup_timeout
        self.home = Path(tempfile.mkdtemp(prefix="brainline-bench-"))
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = self.home / "serve.log"
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/healthz"

    def command(self) -> list[str]:
        """The console script next to this interpreter, else ``python -m brainline.cli``."""
        script = Path(sys.executable).parent / "brainline"
        if script.exists():
            return [str(script), "serve"]
        return [sys.executable, "-m", "brainline.cli", "serve"]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BRAINLINE_HOME=str(self.home),
            BRAINLINE_DICOM_PORT=str(self.dicom_port),
            BRAINLINE_HTTP_PORT=str(self.http_port),
            BRAINLINE_AE_TITLE=AE_TITLE,
            BRAINLINE_STABLE_SECONDS="3600",  # no job may start during the benchmark
            BRAINLINE_DEV_MODE="1",
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    def start(self) -> None:
        """Start and wait for GET /healthz == 200; raise RuntimeError with the log tail otherwise."""
        self._log = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            self.command(), env=self.environment(), cwd=self.home,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"`{' '.join(self.command())}` exited with status {self._process.returncode} "
                    f"before answering {self.health_url}.\n{self.log_tail()}"
                )
            if self._healthy():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"`{' '.join(self.command())}` did not answer GET {self.health_url} with 200 "
            f"within {self.startup_timeout:.0f} s.\n{self.log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            text = ""
        return f"--- last lines of {self.log_path} ---\n{text}" if text else "(no log output)"

    def exit_status(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return None if self._process is None else self._process.poll()

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds used so far by the server process (all its threads)."""
        if self._process is None:
            return None
        try:
            fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """SIGTERM the process group we started, SIGKILL after 15 s; remove BRAINLINE_HOME."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)


# --------------------------------------------------------------------- timings


@dataclass
class Run:
    """One timed storescu push: wall-clock seconds for n instances of total size n_bytes."""

    seconds: float
    n_instances: int
    n_bytes: int
    ok: bool
    note: str = ""
    load1: float | None = None       # 1-minute load average when the push started
    server_cpu: float | None = None  # CPU seconds of `brainline serve` during the push

    @property
    def instances_per_s(self) -> float:
        return self.n_instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.n_bytes / 1e6 / self.seconds


@dataclass
class Target:
    """A server under test (DICOM port and called AE title) and its timed runs."""

    name: str
    port: int
    aet: str
    runs: list[Run] = field(default_factory=list)
    error: str = ""
    orthanc: OrthancServer | None = None  # set for Orthanc, to verify instance counts
    brainline: BrainLineServer | None = None  # set for BrainLine, to report crashes
    rest: bool = False  # True for the reference row (HTTP upload instead of C-STORE)

    @property
    def median_seconds(self) -> float | None:
        good = [r.seconds for r in self.runs if r.ok]
        return statistics.median(good) if good else None

    @property
    def median_server_cpu(self) -> float | None:
        cpu = [r.server_cpu for r in self.runs if r.ok and r.server_cpu is not None]
        return statistics.median(cpu) if cpu else None


def push(study_dir: Path, target: Target, n_instances: int, n_bytes: int) -> Run:
    """Time one storescu run (one association) of every file under ``study_dir``."""
    load1 = os.getloadavg()[0]
    cpu_before = target.brainline.cpu_seconds() if target.brainline is not None else None
    start = time.perf_counter()
    result = storescu(study_dir, target.port, called_aet=target.aet, calling_aet="BENCH")
    seconds = time.perf_counter() - start
    cpu_after = target.brainline.cpu_seconds() if target.brainline is not None else None
    server_cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    problems = [line for line in result.stderr.splitlines() if line.startswith(("E:", "F:"))]
    ok = result.returncode == 0 and not problems
    note = "" if ok else f"storescu rc={result.returncode}: " + " | ".join(problems[:3])
    return Run(seconds, n_instances, n_bytes, ok, note, load1=load1, server_cpu=server_cpu)


def report_brainline_failure(server: BrainLineServer, run: Run) -> None:
    """After a failed push: note whether `brainline serve` died, and show its log tail."""
    status = server.exit_status()
    if status is not None:
        run.note = f"brainline serve exited with status {status}; " + run.note
    print(f"\nERROR: push to BrainLine failed ({run.note})\n{server.log_tail()}\n", file=sys.stderr)


def check_orthanc_count(orthanc: OrthancServer, expected: int, run: Run) -> None:
    """Mark the run failed if Orthanc does not hold the expected number of instances."""
    stored = orthanc.count_instances()
    if stored != expected:
        run.ok = False
        run.note = (run.note + f" Orthanc holds {stored} instances, expected {expected}").strip()


# ---------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(targets: list[Target]) -> None:
    print(f"{'target':<22}{'run':>4}{'seconds':>10}{'inst/s':>10}{'MB/s':>9}{'load1':>7}{'srv CPU s':>11}  status")
    for target in targets:
        if target.error:
            print(f"{target.name:<22}{'-':>4}{'-':>10}{'-':>10}{'-':>9}{'-':>7}{'-':>11}  "
                  f"NOT RUN: {target.error.splitlines()[0]}")
        for i, run in enumerate(target.runs, start=1):
            extra = f"{_fmt(run.load1, '.2f'):>7}{_fmt(run.server_cpu, '.2f'):>11}"
            if run.ok:
                print(f"{target.name:<22}{i:>4}{run.seconds:>10.2f}{run.instances_per_s:>10.1f}"
                      f"{run.mb_per_s:>9.1f}{extra}  ok")
            else:
                print(f"{target.name:<22}{i:>4}{run.seconds:>10.2f}{'-':>10}{'-':>9}{extra}  FAILED {run.note}")


def print_summary(targets: list[Target], n_instances: int, n_bytes: int) -> None:
    """Medians per target and the C-STORE ratio orthanc_time / brainline_time."""
    print(f"\nstudy: {n_instances} instances, {n_bytes / 1e6:.1f} MB per push")
    for target in targets:
        median = target.median_seconds
        if median is not None:
            loads = [r.load1 for r in target.runs if r.ok and r.load1 is not None]
            cpu = target.median_server_cpu
            print(f"median {target.name}: {median:.2f} s = {n_instances / median:.1f} inst/s, "
                  f"{n_bytes / 1e6 / median:.1f} MB/s"
                  + (f"; server CPU {cpu:.2f} s per push" if cpu is not None else "")
                  + (f"; 1-min load {min(loads):.2f}-{max(loads):.2f}" if loads else ""))
    brainline = next((t for t in targets if t.name == "BrainLine"), None)
    if brainline and brainline.median_seconds:
        print_target_line(brainline.median_seconds, n_instances)
    orthanc = next((t for t in targets if t.orthanc is not None and not t.rest), None)
    if brainline and orthanc and brainline.median_seconds and orthanc.median_seconds:
        ratio = orthanc.median_seconds / brainline.median_seconds
        word, factor = ("faster", ratio) if ratio >= 1 else ("slower", 1 / ratio)
        print(f"ratio orthanc_time / brainline_time (C-STORE, medians) = {ratio:.2f}: "
              f"BrainLine is {factor:.1f}x {word} than {orthanc.name}")
    has_rest = any(t.rest and t.runs for t in targets)
    if orthanc and orthanc.median_seconds and orthanc.median_seconds / n_instances > 0.03:
        print("note: dcmtk-based SCPs (this Orthanc, storescp) answer each C-STORE with two small "
              "writes and no TCP_NODELAY, so storescu waits ~40 ms per instance for a delayed ACK"
              + ("; the REST row shows Orthanc's storage speed without that latency." if has_rest else "."))


def print_target_line(median: float, n_instances: int) -> None:
    """BrainLine's median against the issue-8 target and the earlier figure."""
    print(f"issue 8 target: BrainLine median {median:.2f} s against the target <= {TARGET_S:.2f} s "
          f"({median / TARGET_S:.2f}x the target): "
          f"{'MET' if median <= TARGET_S else 'NOT MET'}; earlier README figure {PREVIOUS_S:.2f} s "
          f"({PREVIOUS_S / median:.2f}x faster now)")
    if n_instances != TARGET_INSTANCES:
        print(f"  (this run pushed {n_instances} instances, the target is for {TARGET_INSTANCES}: "
              f"not comparable)")


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="NIfTI case directory")
    parser.add_argument("--repeat", type=int, default=3, help="pushes per target (default 3)")
    parser.add_argument("--targets", default="brainline,orthanc",
                        help="comma-separated subset of brainline,orthanc")
    parser.add_argument("--slice-step", type=int, default=1,
                        help="keep every n-th slice (1 = full 620-instance study)")
    parser.add_argument("--startup-timeout", type=float, default=60.0,
                        help="seconds to wait for `brainline serve` to answer /healthz")
    parser.add_argument("--no-rest", dest="rest", action="store_false",
                        help="skip the reference timing of Orthanc's REST upload (not C-STORE)")
    return parser.parse_args(argv)


def start_targets(names: set[str], startup_timeout: float, stack: list) -> list[Target]:
    """Start the requested servers; a BrainLine start failure is recorded, not raised."""
    targets: list[Target] = []
    if "brainline" in names:
        brainline = BrainLineServer(startup_timeout)
        stack.append(brainline.stop)
        target = Target("BrainLine", brainline.dicom_port, AE_TITLE, brainline=brainline)
        print(f"starting BrainLine: {' '.join(brainline.command())} (DICOM port {brainline.dicom_port})")
        try:
            brainline.start()
        except RuntimeError as exc:
            target.error = f"BrainLine did not start: {exc}"
            print(f"\nERROR: {target.error}\n", file=sys.stderr)
        targets.append(target)
    if "orthanc" in names:
        orthanc = OrthancServer()
        stack.append(orthanc.close)
        orthanc.start()
        target = Target(f"Orthanc {orthanc.version}", orthanc.dicom_port, orthanc.aet, orthanc=orthanc)
        print(f"started {target.name} (DICOM port {orthanc.dicom_port})")
        targets.append(target)
    return targets


def time_rest_upload(orthanc: OrthancServer, study_dir: Path, n_instances: int, n_bytes: int) -> Run:
    """Reference figure: POST every file to Orthanc's REST /instances (HTTP, no C-STORE)."""
    load1 = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        orthanc.upload_dir(study_dir)
        run = Run(time.perf_counter() - start, n_instances, n_bytes, True, load1=load1)
    except httpx.HTTPError as exc:
        run = Run(time.perf_counter() - start, n_instances, n_bytes, False, f"REST upload failed: {exc}",
                  load1=load1)
    check_orthanc_count(orthanc, n_instances, run)
    return run


def run_round(study_dir: Path, targets: list[Target], rest: Target | None, n_instances: int, n_bytes: int) -> None:
    """Push one freshly written study to every live target (Orthanc is emptied before each push)."""
    for target in targets:
        if target.orthanc is not None:
            target.orthanc.delete_all()
        run = push(study_dir, target, n_instances, n_bytes)
        if target.orthanc is not None:
            check_orthanc_count(target.orthanc, n_instances, run)
        if target.brainline is not None and not run.ok:
            report_brainline_failure(target.brainline, run)
        target.runs.append(run)
        print(f"  {target.name:<24} {run.seconds:7.2f} s  {'ok' if run.ok else 'FAILED ' + run.note}")
    if rest is not None:
        rest.orthanc.delete_all()
        run = time_rest_upload(rest.orthanc, study_dir, n_instances, n_bytes)
        rest.runs.append(run)
        print(f"  {rest.name:<24} {run.seconds:7.2f} s  {'ok' if run.ok else 'FAILED ' + run.note}")


def run_benchmark(args: argparse.Namespace, targets: list[Target], workdir: Path) -> tuple[int, int]:
    """Run ``args.repeat`` rounds, each with a new study; return (instances, bytes) of one push."""
    n_instances = n_bytes = 0
    live = [t for t in targets if not t.error]
    orthanc = next((t.orthanc for t in live if t.orthanc is not None), None)
    rest = None
    if orthanc is not None and args.rest:
        rest = Target(f"Orthanc {orthanc.version} REST", 0, "", orthanc=orthanc, rest=True)
        targets.append(rest)
    for round_no in range(1, args.repeat + 1):
        study_dir = workdir / f"study{round_no}"
        start = time.perf_counter()
        info = write_study(study_dir, args.case, slice_step=args.slice_step)
        n_instances, n_bytes = info.n_instances, sum(p.stat().st_size for p in info.paths)
        print(f"round {round_no}: wrote {n_instances} instances ({n_bytes / 1e6:.1f} MB) "
              f"in {time.perf_counter() - start:.1f} s")
        run_round(study_dir, live, rest, n_instances, n_bytes)
        shutil.rmtree(study_dir, ignore_errors=True)
    return n_instances, n_bytes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = {n.strip().lower() for n in args.targets.split(",") if n.strip()}
    unknown = names - {"brainline", "orthanc"}
    if unknown or not names:
        print(f"unknown targets: {sorted(unknown)}", file=sys.stderr)
        return 2
    cleanup: list = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        targets = start_targets(names, args.startup_timeout, cleanup)
        n_instances, n_bytes = run_benchmark(args, targets, workdir)
    finally:
        for stop in reversed(cleanup):
            stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(targets)
    print_summary(targets, n_instances, n_bytes)
    failed = any(t.error for t in targets) or any(not r.ok for t in targets for r in t.runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
