"""``brainline`` command line.

serve         run the service (DICOM listener, completion monitor, workers, REST API)
pull          retrieve a study over DICOMweb into the spool (progress bar)
jobs / job    list jobs / show one job (via the running service's REST API)
retry         retry a failed or needs_input job (via the REST API)
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
