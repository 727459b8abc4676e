"""``brainline`` command line.

serve         run the service (DICOM listener, completion monitor, workers, REST API)
pull          retrieve a study over DICOMweb into the spool (progress bar)
process       run the whole pipeline offline on a folder of DICOM files
jobs / job    list jobs / show one job (via the running service's REST API)
retry         retry a failed or needs_input job (via the REST API)
outbox        list pending/failed result deliveries, --retry them (via the REST API)
migrate       create or upgrade the database schema
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import httpx

from brainline import __version__

from .settings import SettingsError, load_settings

log = logging.getLogger("brainline.cli")


def _fail(message: str, code: int = 2) -> int:
    print(f"brainline: {message}", file=sys.stderr)
    return code


def cmd_serve(args, settings) -> int:
    import uvicorn

    from .api import create_app
    from .context import ServiceContext
    from .logs import configure_logging

    configure_logging(settings.log_level, settings.log_dir / "brainline.log")
    ctx = ServiceContext.build(settings)
    try:
        ctx.start()
    except OSError as exc:
        ctx.stop()
        return _fail(f"cannot start the DICOM listener on port {settings.dicom_port}: {exc.strerror}")
    config = uvicorn.Config(create_app(ctx), host=settings.http_bind, port=settings.http_port,
                            log_config=None, access_log=False)
    server = uvicorn.Server(config)
    log.info("brainline serving", extra={"version": __version__, "http_port": settings.http_port,
                                         "dicom_port": settings.dicom_port})
    try:
        server.run()
    finally:
        ctx.stop()
    return 0


def cmd_pull(args, settings) -> int:
    from tqdm import tqdm

    from .context import ServiceContext
    from .dicomweb_pull import PullError, pull_study
    from .logs import configure_logging

    configure_logging("WARNING")
    ctx = ServiceContext.build(settings)
    bar = tqdm(desc="retrieving", unit="inst", disable=args.quiet)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = pull_study(settings, ctx.spool, ctx.vault.study_key, args.study_uid,
                            progress=progress)
    except PullError as exc:
        bar.close()
        return _fail(str(exc), 1)
    finally:
        ctx.engine.dispose()
    bar.close()
    print(json.dumps(result.to_dict(), indent=2))
    print(f"spooled; the service starts a job after {settings.stable_seconds:g} s without new instances")
    return 0


def _api(settings, args, method: str, path: str):
    url = args.url or f"http://127.0.0.1:{settings.http_port}"
    headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    try:
        resp = httpx.request(method, url + path, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise SystemExit(_fail(f"the service at {url} cannot be reached ({type(exc).__name__}); "
                               "is `brainline serve` running?", 1))
    if resp.status_code >= 400:
        raise SystemExit(_fail(f"{resp.status_code}: {resp.json().get('detail', resp.text)}", 1))
    return resp.json()


def cmd_jobs(args, settings) -> int:
    query = f"?state={args.state}" if args.state else ""
    jobs = _api(settings, args, "GET", f"/api/v1/jobs{query}")["jobs"]
    print(f"{'id':>6}  {'state':<12} {'instances':>9}  {'created':<24} error")
    for j in jobs:
        print(f"{j['id']:>6}  {j['state']:<12} {j['instance_count']:>9}  {j['created_at']:<24} "
              f"{j['error'] or ''}")
    return 0


def cmd_job(args, settings) -> int:
    print(json.dumps(_api(settings, args, "GET", f"/api/v1/jobs/{args.job_id}"), indent=2))
    return 0


def cmd_retry(args, settings) -> int:
    job = _api(settings, args, "POST", f"/api/v1/jobs/{args.job_id}/retry")
    print(f"job {job['id']} is {job['state']}")
    return 0


def cmd_process(args, settings) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from brainline.pipelines.process import STEP_NAMES, process_study

    from .stages import PIPELINE_ERRORS, pipeline_config

    overrides = {k: v for k, v in (("reference_role", args.reference), ("model", args.model),
                                   ("device", args.device)) if v}
    cfg = pipeline_config(settings, **overrides)
    source, out = Path(args.input), Path(args.out)
    if not source.is_dir():
        return _fail(f"{source} is not a folder of DICOM files")
    bar = tqdm(total=len(STEP_NAMES), desc="brainline process", unit="step", disable=args.quiet)

    def on_step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    try:
        summary = process_study(source, out, cfg, rules_path=_opt_path(settings.series_rules),
                                uid_root=settings.uid_root or None, on_step=on_step)
    except PIPELINE_ERRORS as exc:
        bar.close()
        return _fail(str(exc), 1)
    bar.close()
    vol = summary["volumes_ml"]
    print(f"whole tumour {vol['whole_tumor']:.1f} mL, tumour core {vol['tumor_core']:.1f} mL, "
          f"enhancing {vol['3']:.1f} mL, edema {vol['2']:.1f} mL, necrosis {vol['1']:.1f} mL; "
          f"intracranial volume {summary['tiv_ml']:.0f} mL")
    for flag in summary.get("qc_flags", []):
        print(f"QC: {flag}")
    print(f"results in {out} (DICOM SEG, SR, overlay and PDF report in {out / 'dicom'})")
    return 0


def _opt_path(value: str):
    from pathlib import Path

    return Path(value) if value else None


def cmd_outbox(args, settings) -> int:
    if args.retry:
        query = "&".join(f"item_id={i}" for i in args.id) if args.id else ""
        done = _api(settings, args, "POST", f"/api/v1/outbox/retry?{query}")
        print(f"{done['requeued']} deliveries queued again")
        return 0
    query = f"?state={args.state}" if args.state else ""
    box = _api(settings, args, "GET", f"/api/v1/outbox{query}")
    print(f"pending: {box['depth']}, oldest pending: {box['oldest_pending_age_s']} s; "
          f"destinations: {', '.join(box['destinations']) or 'none'}")
    print(f"{'id':>6} {'job':>5}  {'kind':<8} {'state':<9} {'tries':>5}  {'destination':<40} error")
    for i in box["items"]:
        if args.all or i["state"] != "sent":
            print(f"{i['id']:>6} {i['job_id']:>5}  {i['kind']:<8} {i['state']:<9} {i['attempts']:>5}  "
                  f"{i['destination']:<40} {i['last_error'] or ''}")
    return 0


def cmd_migrate(args, settings) -> int:
    from .db import migrate

    settings.home.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    print("database schema is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brainline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"brainline {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service").set_defaults(fn=cmd_serve)
    pull = sub.add_parser("pull", help="retrieve a study over DICOMweb into the spool")
    pull.add_argument("--study-uid", required=True)
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    pull.set_defaults(fn=cmd_pull)
    for name, fn, helptext in (("jobs", cmd_jobs, "list jobs"), ("job", cmd_job, "show one job"),
                               ("retry", cmd_retry, "retry a failed job")):
        sp = sub.add_parser(name, help=helptext)
        if name == "jobs":
            sp.add_argument("--state")
        else:
            sp.add_argument("job_id", type=int)
        sp.add_argument("--url", help="service base URL (default http://127.0.0.1:BRAINLINE_HTTP_PORT)")
        sp.set_defaults(fn=fn)
    box = sub.add_parser("outbox", help="list pending and failed deliveries; --retry to resend")
    box.add_argument("--state", choices=["pending", "sent", "failed", "rejected"])
    box.add_argument("--all", action="store_true", help="also list sent items")
    box.add_argument("--retry", action="store_true", help="queue failed/rejected items again")
    box.add_argument("--id", type=int, action="append", help="with --retry: only this item (repeatable)")
    box.add_argument("--url", help="service base URL (default http://127.0.0.1:BRAINLINE_HTTP_PORT)")
    box.set_defaults(fn=cmd_outbox)
    proc = sub.add_parser("process", help="run the whole pipeline offline on a DICOM folder")
    proc.add_argument("input", help="folder with the DICOM files of one study")
    proc.add_argument("--out", required=True, help="output folder")
    proc.add_argument("--reference", help="reference sequence: t1c (default), t1, t2 or flair")
    proc.add_argument("--model", help="segmentation model folder (MONAI bundle or ONNX); default baseline")
    proc.add_argument("--device", choices=["cpu", "cuda"])
    proc.add_argument("--quiet", action="store_true", help="no progress bar")
    proc.set_defaults(fn=cmd_process)
    sub.add_parser("migrate", help="create or upgrade the database").set_defaults(fn=cmd_migrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(str(exc))
    try:
        return args.fn(args, settings)
    except Exception as exc:
        from .vault import VaultError

        if isinstance(exc, VaultError):
            return _fail(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
