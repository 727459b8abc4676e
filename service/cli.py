"""``brainline`` command line.

serve         run the service (DICOM listener, completion monitor, workers, REST API)
pull          retrieve a study over DICOMweb into the spool (progress bar)
process       run the whole pipeline offline on a folder of DICOM files
validate      rerun a reference set, compare with the accepted run (exit 1 on a regression)
jobs / job    list jobs / show one job (via the running service's REST API)
retry         retry a failed or needs_input job (via the REST API)
outbox        list pending/failed result deliveries, --retry them (via the REST API)
worker        a compute worker of the scaled-out mode (Celery): `worker --queues compute,gpu`
migrate       create or upgrade the database schema
vault         check BRAINLINE_VAULT_KEY against the database, or rotate it (vault rotate)
purge         delete spool, workspace and outbox data (and vault records) past the retention period
user          review UI accounts: user add NAME --role radiologist|technician|admin, list, disable,
              enable, passwd (the password is read from stdin or asked for)

Files and folders the service creates under BRAINLINE_HOME are readable by
the owner only (umask 077; the home folder 0700, the database, logs and vault
key 0600).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from pathlib import Path

import httpx

from brainline import __version__

from .settings import SettingsError, load_settings

log = logging.getLogger("brainline.cli")


def _fail(message: str, code: int = 2) -> int:
    print(f"brainline: {message}", file=sys.stderr)
    return code


# Umask of every brainline process: files 0600, folders 0700.
UMASK = 0o077
# Entries of BRAINLINE_HOME made private at start (older installs made them 0644/0755).
HOME_ENTRIES = ("brainline.db", "brainline.db-wal", "brainline.db-shm", "brainline.db-journal",
                "vault.key", "logs", "spool", "workspaces", "outbox", "validation")


def secure_home(settings) -> None:
    """Create BRAINLINE_HOME 0700 and take group/other permissions away from it,
    its known entries and the log files. Deeper, older files stay as they
    are but cannot be reached through the 0700 home folder."""
    home = settings.home
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    targets = [home, *(home / name for name in HOME_ENTRIES)]
    if settings.log_dir.is_dir():
        targets += [p for p in settings.log_dir.iterdir() if p.is_file()]
    for path in targets:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not (mode & 0o077):
            continue
        try:
            os.chmod(path, stat.S_IMODE(mode) & 0o700)
        except OSError as exc:  # e.g. a home folder owned by someone else
            log.warning("cannot make %s private: %s", path, exc.strerror)


def _check_vault_key(ctx) -> None:
    """Refuse a BRAINLINE_VAULT_KEY other than the one the database was set
    up with (raises VaultKeyMismatch, answered in words by main)."""
    from .gateway.vault import VaultKeyMismatch

    try:
        ctx.vault.verify_key()
    except VaultKeyMismatch:
        log.error("refusing to start: BRAINLINE_VAULT_KEY does not match the database's key check value")
        ctx.engine.dispose()
        raise
    except Exception:
        ctx.engine.dispose()
        raise


def _tls_problem(settings) -> str | None:
    """Why the configured certificate cannot serve HTTPS, in words; None if it can."""
    import ssl

    if not settings.tls_cert:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert,
                                                                             settings.tls_key)
    except FileNotFoundError as exc:
        return f"BRAINLINE_TLS_CERT/BRAINLINE_TLS_KEY: {exc.filename} does not exist"
    except PermissionError as exc:
        return f"BRAINLINE_TLS_CERT/BRAINLINE_TLS_KEY: {exc.filename} cannot be read"
    except (ssl.SSLError, OSError, ValueError) as exc:
        return (f"BRAINLINE_TLS_CERT={settings.tls_cert} and BRAINLINE_TLS_KEY={settings.tls_key} "
                f"are not a PEM certificate with its private key ({getattr(exc, 'reason', None) or exc})")
    return None


def cmd_serve(args, settings) -> int:
    import ssl

    import uvicorn

    from .api.app import create_app
    from .context import ServiceContext
    from .logs import configure_logging

    problem = _tls_problem(settings)
    if problem:
        return _fail(problem)
    configure_logging(settings.log_level, settings.log_dir / "brainline.log")
    ctx = ServiceContext.build(settings)
    _check_vault_key(ctx)
    try:
        ctx.start()
    except OSError as exc:
        ctx.stop()
        return _fail(f"cannot start the DICOM listener on port {settings.dicom_port}: {exc.strerror}")
    tls = {}
    if settings.tls_cert:
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key,
               "ssl_version": ssl.PROTOCOL_TLS_SERVER, "ssl_ciphers": "HIGH:!aNULL:!MD5:!RC4"}
    config = uvicorn.Config(create_app(ctx), host=settings.http_bind, port=settings.http_port,
                            log_config=None, access_log=False, **tls)
    server = uvicorn.Server(config)
    log.info("brainline serving", extra={"version": __version__, "http_port": settings.http_port,
                                         "https": bool(tls), "dicom_port": settings.dicom_port})
    try:
        server.run()
    finally:
        ctx.stop()
    return 0


def cmd_worker(args, settings) -> int:
    from .compute.worker import Worker, WorkerError, worker_queues
    from .logs import configure_logging

    configure_logging(settings.log_level, settings.log_dir / "worker.log")
    try:
        queues = worker_queues(args.queues or settings.worker_queues, settings.device)
        worker = Worker(settings, queues, args.concurrency or settings.worker_concurrency)
        return worker.run()
    except WorkerError as exc:
        return _fail(str(exc))


def cmd_pull(args, settings) -> int:
    from tqdm import tqdm

    from .context import ServiceContext
    from .gateway.dicomweb_pull import PullError, pull_study
    from .logs import configure_logging

    configure_logging("WARNING")
    ctx = ServiceContext.build(settings)
    _check_vault_key(ctx)
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


def _client_tls(settings, url: str, default: bool):
    """httpx ``verify`` for the REST API client. The default URL (loopback)
    trusts exactly the configured certificate (BRAINLINE_TLS_CERT, as a trust
    anchor) without a host name check; an explicit https --url is verified as
    usual (system CAs plus BRAINLINE_TLS_CERT), host name included."""
    import ssl

    if not url.startswith("https://"):
        return True
    if default:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context = ssl.create_default_context()
    if settings.tls_cert:
        try:
            context.load_verify_locations(cafile=settings.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(_fail(f"BRAINLINE_TLS_CERT={settings.tls_cert} cannot be loaded: "
                                   f"{getattr(exc, 'strerror', None) or exc}")) from None
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _api(settings, args, method: str, path: str):
    default = not args.url
    scheme = "https" if settings.tls_cert else "http"
    url = (args.url or f"{scheme}://127.0.0.1:{settings.http_port}").rstrip("/")
    headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    try:
        resp = httpx.request(method, url + path, headers=headers, timeout=30,
                             verify=_client_tls(settings, url, default))
    except httpx.HTTPError as exc:
        raise SystemExit(_fail(f"the service at {url} cannot be reached ({type(exc).__name__}); "
                               "is `brainline serve` running?", 1)) from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text[:300]
        raise SystemExit(_fail(f"{resp.status_code}: {detail}", 1))
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

    from brainline.pipelines.process import STEP_NAMES, InputError, process_study

    from .compute.stages import pipeline_config
    from .jobs.errors import pipeline_errors

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

    caught: tuple[type[BaseException], ...] = (*pipeline_errors(), InputError)
    try:
        summary = process_study(source, out, cfg, rules_path=_opt_path(settings.series_rules),
                                uid_root=settings.uid_root or None, on_step=on_step,
                                priors=[Path(p) for p in args.prior or ()])
    except caught as exc:
        bar.close()
        return _fail(str(exc), 1)
    bar.close()
    vol = summary["volumes_ml"]
    print(f"whole tumour {vol['whole_tumor']:.1f} mL, tumour core {vol['tumor_core']:.1f} mL, "
          f"enhancing {vol['3']:.1f} mL, edema {vol['2']:.1f} mL, necrosis {vol['1']:.1f} mL; "
          f"intracranial volume {summary['tiv_ml']:.0f} mL")
    for flag in summary.get("qc_flags", []):
        print(f"QC: {flag}")
    _print_followup(summary.get("longitudinal") or {})
    outputs = summary.get("outputs", {}) if isinstance(summary, dict) else {}
    for note in outputs.get("notes", []):
        print(f"note: {note}")
    built = ", ".join(sorted({o["kind"] for o in outputs.get("objects", [])})) or "nothing"
    print(f"results in {out} (DICOM {built} in {out / 'dicom'})")
    return 0


def _print_followup(record: dict) -> None:
    """The follow-up comparison of ``brainline process --prior`` in a few lines."""
    if not record.get("priors"):
        return
    assessment = record.get("assessment") or {}
    if assessment:
        print(f"follow-up: {assessment.get('code')}: {assessment.get('reason')}")
    lesions = record.get("lesions") or []
    kinds = {k: sum(1 for x in lesions if x.get("kind") == k) for k in ("new", "growing")}
    print(f"follow-up: {kinds['new']} new and {kinds['growing']} growing lesion(s) against the prior")
    for text in ([record["note"]] if record.get("note") else []) + list(record.get("notes") or []):
        print(f"follow-up note: {text}")
    for flag in record.get("flags") or []:
        print(f"follow-up QC: {flag}")


def cmd_purge(args, settings) -> int:
    from .gateway.retention import run_purge_cli

    return run_purge_cli(settings, dry_run=args.dry_run, days=args.days, vault_days=args.vault_days,
                         as_json=args.json)


def cmd_validate(args, settings) -> int:
    from pathlib import Path

    from brainline.pipelines.validation import Thresholds

    from .compute.stages import pipeline_config
    from .compute.validate import ACCEPTED_NAME, ValidationUsageError, default_out, validate

    overrides = {k: v for k, v in (("reference_role", args.reference), ("model", args.model),
                                   ("device", args.device)) if v}
    reference_dir = Path(args.reference_dir).expanduser()
    if args.force and not args.accept:
        return _fail("--force only goes with --accept")
    for name in ("volume_tolerance", "volume_min_ml", "dice_tolerance"):
        if getattr(args, name) < 0:
            return _fail(f"--{name.replace('_', '-')} must not be negative")
    thresholds = Thresholds(volume_relative=args.volume_tolerance, volume_absolute_ml=args.volume_min_ml,
                            dice_drop=args.dice_tolerance)
    accepted = Path(args.accepted_record).expanduser() if args.accepted_record else reference_dir / ACCEPTED_NAME
    out = Path(args.out).expanduser() if args.out else default_out(settings.home)
    try:
        run = validate(reference_dir, cfg=pipeline_config(settings, **overrides), out=out.resolve(),
                       accepted_path=accepted.resolve(), accept=args.accept, force=args.force,
                       thresholds=thresholds, rules_path=_opt_path(settings.series_rules),
                       uid_root=settings.uid_root or None, progress=not args.quiet)
    except ValidationUsageError as exc:
        return _fail(str(exc))
    record = run.record
    for name, case in record["cases"].items():
        if case["status"] != "ok":
            error = case["error"] if len(case["error"]) <= 300 else case["error"][:300] + " ... (see validation.json)"
            print(f"{name}: FAILED ({error})")
            continue
        dice = case.get("dice") or {}
        vol = case["volumes_ml"]
        dice_text = ", ".join(f"{r} {dice[r]:.3f}" for r in ("WT", "TC", "ET") if dice.get(r) is not None)
        print(f"{name}: WT {vol['WT']:.1f} mL, TC {vol['TC']:.1f} mL, ET {vol['ET']:.1f} mL; "
              f"Dice {dice_text or 'not scored'}; {case['timings_s']['total']:.0f} s"
              + (f"; QC: {'; '.join(case['qc_flags'])}" if case["qc_flags"] else ""))
    comparison = record["comparison"]
    if comparison["status"] != "compared":
        print("no accepted record: nothing to compare")
    else:
        print(f"compared with the accepted record {comparison['accepted_record']} "
              f"(accepted {comparison.get('accepted_at')})")
    for note in comparison["notes"]:
        if note != "no accepted record: nothing to compare":
            print(f"note: {note}")
    for reg in comparison["regressions"]:
        text = reg["message"] if len(reg["message"]) <= 300 else reg["message"][:300] + " ..."
        print(f"REGRESSION {text}")
    summary = record["summary"]
    print(f"{summary['cases']} cases, {summary['failed']} failed, {summary['regressions']} regression(s): "
          f"{'PASS' if summary['result'] == 'pass' else 'REGRESSION'}")
    for message in run.messages:
        print(message)
    print(f"validation record: {run.json_path}")
    print(f"report: {run.html_path}")
    print(f"pipeline outputs: {run.out / 'cases'}")
    return run.exit_code


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


OLD_KEY_ENV = "BRAINLINE_VAULT_OLD_KEY"


def _read_old_key(args) -> str:
    """The old vault key from --old-key-file (or - for stdin), --old-key-env,
    --old-key, BRAINLINE_VAULT_OLD_KEY or a prompt, in that order."""
    if args.old_key_file:
        try:
            text = sys.stdin.read() if args.old_key_file == "-" else Path(args.old_key_file).expanduser().read_text()
        except OSError as exc:
            raise SystemExit(_fail(f"--old-key-file {args.old_key_file}: {exc.strerror}")) from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise SystemExit(_fail(f"--old-key-file {args.old_key_file} is empty"))
        return lines[0]
    if args.old_key_env:
        value = os.environ.get(args.old_key_env, "").strip()
        if not value:
            raise SystemExit(_fail(f"--old-key-env: the environment variable {args.old_key_env} is not set"))
        return value
    if args.old_key:
        return args.old_key.strip()
    if os.environ.get(OLD_KEY_ENV, "").strip():
        return os.environ[OLD_KEY_ENV].strip()
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("old vault key: ").strip()
    raise SystemExit(_fail("give the old key with --old-key-file FILE (or -), --old-key-env NAME, "
                           f"{OLD_KEY_ENV} or --old-key"))


def _service_answers(settings) -> bool:
    for scheme in ("https", "http") if settings.tls_cert else ("http",):
        try:
            resp = httpx.get(f"{scheme}://127.0.0.1:{settings.http_port}/healthz", timeout=1, verify=False)
        except httpx.HTTPError:
            continue
        try:
            return resp.status_code == 200 and resp.json().get("status") == "ok" and "version" in resp.json()
        except ValueError:
            return False
    return False


def cmd_vault(args, settings) -> int:
    from .db import make_engine, make_sessionmaker, migrate
    from .gateway.vault import Vault, VaultError, resolve_vault_key, rotate_key

    settings.home.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        if args.vault_command == "check":
            key, _generated = resolve_vault_key(settings.vault_key, settings.dev_mode, settings.home)
            outcome = Vault(key, sessions).verify_key()
            print("BRAINLINE_VAULT_KEY matches this database"
                  + (" (key check value recorded now)" if outcome == "recorded" else ""))
            return 0
        # rotate
        if not args.force and _service_answers(settings):
            return _fail(f"a BrainLine service answers on port {settings.http_port}: stop `brainline serve` "
                         "(and `brainline pull`) before rotating the vault key, or pass --force", 1)
        old_key = _read_old_key(args)
        new_key, _generated = resolve_vault_key(settings.vault_key, settings.dev_mode, settings.home)
        try:
            result = rotate_key(old_key, new_key, sessions)
        except VaultError as exc:
            return _fail(str(exc), 1)
        print(f"re-encrypted {result.rows} vault entries with the new BRAINLINE_VAULT_KEY; pseudonyms "
              "are unchanged. Start the service with the new key; the old key is no longer accepted.")
        return 0
    finally:
        engine.dispose()


def _read_new_password(args) -> str:
    """A new password: the first line of stdin when it is not a terminal
    (``--password-stdin`` or a pipe), else asked twice without echo."""
    if args.password_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if not password:
            raise SystemExit(_fail("no password on standard input"))
        return password
    import getpass

    first = getpass.getpass("password: ")
    if getpass.getpass("password again: ") != first:
        raise SystemExit(_fail("the passwords differ"))
    return first


def cmd_user(args, settings) -> int:
    import getpass

    from .api import auth
    from .db import make_engine, make_sessionmaker, migrate

    settings.home.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        actor = f"cli:{getpass.getuser()}"[:64]
    except Exception:  # no user name for this uid (containers)
        actor = f"cli:uid{os.getuid()}"
    try:
        if args.user_command == "list":
            users = auth.list_users(sessions)
            if args.json:
                print(json.dumps([{"username": u.username, "display_name": u.display_name, "role": u.role,
                                   "active": bool(u.active),
                                   "created_at": u.created_at.isoformat() + "Z" if u.created_at else None,
                                   "last_login_at": u.last_login_at.isoformat() + "Z" if u.last_login_at else None}
                                  for u in users], indent=2))
                return 0
            if not users:
                print("no users; add one with `brainline user add NAME --role radiologist`")
                return 0
            print(f"{'username':<20} {'role':<12} {'active':<6} {'last log-in':<17} display name")
            for u in users:
                last = u.last_login_at.strftime("%Y-%m-%d %H:%M") if u.last_login_at else "-"
                print(f"{u.username:<20} {u.role:<12} {'yes' if u.active else 'no':<6} {last:<17} {u.display_name}")
            return 0
        if args.user_command == "add":
            auth.check_username(args.username)
            if auth.get_user(sessions, args.username) is not None:
                return _fail(f"user {args.username} exists already", 1)
            user = auth.add_user(sessions, args.username, _read_new_password(args), args.role,
                                 args.display_name or "")
            auth.audit(sessions, actor, "user_add", detail=f"added {user.username} ({user.role})")
            print(f"user {user.username} added ({user.role}, \"{user.display_name}\")")
            return 0
        if args.user_command in ("disable", "enable"):
            user = auth.set_active(sessions, args.username, args.user_command == "enable")
            auth.audit(sessions, actor, f"user_{args.user_command}", detail=f"{args.user_command}d {user.username}")
            print(f"user {user.username} {args.user_command}d"
                  + (" (running sessions end at their next request)" if args.user_command == "disable" else ""))
            return 0
        if args.user_command == "passwd":
            if auth.get_user(sessions, args.username) is None:
                return _fail(f"user {args.username} does not exist", 1)
            user = auth.set_password(sessions, args.username, _read_new_password(args))
            auth.audit(sessions, actor, "user_passwd", detail=f"password of {user.username} changed")
            print(f"password of {user.username} changed; the user's sessions have ended")
            return 0
        return _fail(f"unknown user command {args.user_command}")
    except auth.UserError as exc:
        return _fail(str(exc), 1)
    finally:
        engine.dispose()


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
    prg = sub.add_parser("purge", help="delete data past BRAINLINE_RETENTION_DAYS (--dry-run: only list it)",
                         description="Delete the spool study, workspace and outbox folder of finished jobs whose "
                                     "results were all delivered, BRAINLINE_RETENTION_DAYS after they finished, and "
                                     "vault records after BRAINLINE_VAULT_RETENTION_DAYS. Never anything not yet "
                                     "delivered, not finished or under review. Safe while the service runs.")
    prg.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")
    prg.add_argument("--days", type=int, help="data retention for this run (default BRAINLINE_RETENTION_DAYS)")
    prg.add_argument("--vault-days", type=int,
                     help="vault retention for this run (default BRAINLINE_VAULT_RETENTION_DAYS)")
    prg.add_argument("--json", action="store_true", help="the plan and the result as JSON")
    prg.set_defaults(fn=cmd_purge)
    proc = sub.add_parser("process", help="run the whole pipeline offline on a DICOM folder")
    proc.add_argument("input", help="folder with the DICOM files of one study")
    proc.add_argument("--out", required=True, help="output folder")
    proc.add_argument("--reference", help="reference sequence: t1c (default), t1, t2 or flair")
    proc.add_argument("--model", help="auto (default: BRAINLINE_MODEL, else the trained model with all four "
                                      "sequences, the baseline otherwise), baseline, brats17-wang, or a MONAI "
                                      "bundle / ONNX folder")
    proc.add_argument("--device", choices=["cpu", "cuda"])
    proc.add_argument("--prior", action="append", metavar="PRIOR",
                      help="folder with the DICOM files of an earlier study of the same patient "
                           "(repeatable): adds the follow-up comparison (subtraction, new and growing "
                           "lesions, volume change)")
    proc.add_argument("--quiet", action="store_true", help="no progress bar")
    proc.set_defaults(fn=cmd_process)
    val = sub.add_parser(
        "validate", help="rerun a reference set and compare with the accepted run (exit 1 on a regression)",
        description="Run the whole DICOM pipeline on every case of a reference set (REFERENCE_DIR/<case>/dicom/, "
                    "optional <case>/reference_seg.nii.gz and <case>/case.json), score it, compare with the "
                    "accepted record and write validation.json and report.html. Exit 0: no regression; "
                    "1: regression (failed or missing case, volume or Dice change beyond the limits) or "
                    "refused --accept; 2: usage error.")
    val.add_argument("reference_dir", help="the reference set: one folder per case")
    val.add_argument("--out", help="output folder (new or empty; default $BRAINLINE_HOME/validation/<UTC time>)")
    val.add_argument("--accept", action="store_true", help="record this run as the new accepted reference")
    val.add_argument("--force", action="store_true", help="with --accept: accept even when cases failed")
    val.add_argument("--accepted-record", metavar="PATH",
                     help="accepted record file (default REFERENCE_DIR/.brainline-accepted.json)")
    val.add_argument("--reference", help="reference sequence: t1c (default), t1, t2 or flair")
    val.add_argument("--model", help="segmentation model folder (MONAI bundle or ONNX); default BRAINLINE_MODEL")
    val.add_argument("--device", choices=["cpu", "cuda"])
    val.add_argument("--volume-tolerance", type=float, default=0.25, metavar="FRACTION",
                     help="relative WT/TC/ET volume change that is a regression (default 0.25) ...")
    val.add_argument("--volume-min-ml", type=float, default=0.5, metavar="ML",
                     help="... when the change also exceeds this many mL (default 0.5)")
    val.add_argument("--dice-tolerance", type=float, default=0.05, metavar="D",
                     help="Dice drop that is a regression (default 0.05)")
    val.add_argument("--quiet", action="store_true", help="no progress bar")
    val.set_defaults(fn=cmd_validate)
    wrk = sub.add_parser(
        "worker", help="run a compute worker (BRAINLINE_EXECUTOR=celery mode)",
        description="Consume image stages from the Celery broker (BRAINLINE_BROKER_URL) and run them on "
                    "the shared job workspaces (BRAINLINE_WORKSPACES). Never give a worker "
                    "BRAINLINE_VAULT_KEY: it refuses to start with one. HTTP on BRAINLINE_WORKER_HTTP_PORT: "
                    "/healthz, /readyz, /metrics.")
    wrk.add_argument("--queues", help="comma-separated: compute and/or gpu (default BRAINLINE_WORKER_QUEUES; "
                                      "gpu only with BRAINLINE_DEVICE=cuda)")
    wrk.add_argument("--concurrency", type=int, help="stages at once (default BRAINLINE_WORKER_CONCURRENCY=1)")
    wrk.set_defaults(fn=cmd_worker)
    sub.add_parser("migrate", help="create or upgrade the database").set_defaults(fn=cmd_migrate)
    vault = sub.add_parser(
        "vault", help="check or rotate the vault key (BRAINLINE_VAULT_KEY)",
        description="The database keeps a key check value of BRAINLINE_VAULT_KEY; the service refuses "
                    "to start with another key. `vault check` compares the configured key; `vault rotate` "
                    "re-encrypts every vault entry from the old key to the configured BRAINLINE_VAULT_KEY "
                    "(stop the service first). Pseudonyms, study keys and date shifts stay the same.")
    vsub = vault.add_subparsers(dest="vault_command", required=True)
    vsub.add_parser("check", help="does BRAINLINE_VAULT_KEY match this database? (exit 2 if not)")
    rot = vsub.add_parser(
        "rotate", help="re-encrypt the vault from an old key to BRAINLINE_VAULT_KEY",
        description="Re-encrypt every vault entry from the old key to BRAINLINE_VAULT_KEY in one "
                    "transaction (nothing changes on any error) and record the new key check value. "
                    "Give the old key with --old-key-file (or - for stdin), --old-key-env NAME or "
                    f"{OLD_KEY_ENV}, so that it stays out of the shell history and process list.")
    src = rot.add_mutually_exclusive_group()
    src.add_argument("--old-key-file", metavar="FILE", help="file whose first line is the old key; - reads stdin")
    src.add_argument("--old-key-env", metavar="NAME", help="environment variable that holds the old key")
    src.add_argument("--old-key", metavar="KEY", help="the old key itself (visible in shell history and ps)")
    rot.add_argument("--force", action="store_true", help="rotate even though a service answers on the HTTP port")
    vault.set_defaults(fn=cmd_vault)
    usr = sub.add_parser(
        "user", help="review UI accounts: add, list, disable, enable, passwd",
        description="Accounts of the review web UI (/review). Roles: radiologist (views, accepts/rejects "
                    "results, may show a patient's identity), technician (views the worklist and jobs), admin "
                    "(everything, and the audit trail). Passwords (at least "
                    "10 characters) are read from standard input when it is not a terminal, else asked "
                    "for twice; they are stored as salted scrypt hashes.")
    usub = usr.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", help="add a user")
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=["radiologist", "technician", "admin"])
    add.add_argument("--display-name", help='name shown in the UI and written into reviewed reports, e.g. "Dr A Smith"')
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    lst = usub.add_parser("list", help="list users")
    lst.add_argument("--json", action="store_true")
    for name, helptext in (("disable", "disable a user (log-ins refused, sessions end)"),
                           ("enable", "enable a disabled user again")):
        usub.add_parser(name, help=helptext).add_argument("username")
    pwd = usub.add_parser("passwd", help="set a user's password (ends the user's sessions)")
    pwd.add_argument("username")
    pwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    usr.set_defaults(fn=cmd_user)
    return p


# Commands that create or use BRAINLINE_HOME.
HOME_COMMANDS = {"serve", "pull", "migrate", "vault", "worker", "purge", "user"}


def main(argv: list[str] | None = None) -> int:
    os.umask(UMASK)  # everything this process creates: owner only
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(str(exc))
    if args.command in HOME_COMMANDS:
        try:
            secure_home(settings)
        except OSError as exc:
            return _fail(f"BRAINLINE_HOME={settings.home} cannot be created: {exc.strerror}")
    try:
        return args.fn(args, settings)
    except Exception as exc:
        from .gateway.vault import VaultError

        if isinstance(exc, VaultError):
            return _fail(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
