"""Service settings: one definition of every setting, checked at start-up.

Every setting is one field of :class:`Settings`, declared with
:func:`setting`: its name (environment variable ``BRAINLINE_<NAME>``, e.g.
``BRAINLINE_DICOM_PORT``), its type (the field's annotation), its default,
what values are allowed, a one-line description, the processes that read it
(``gateway`` = ``brainline serve``, ``worker`` = ``brainline worker``,
``both``) and whether it is a secret.

:func:`load_settings` takes the defaults, overrides them from the environment
and checks the result: an unknown ``BRAINLINE_*`` variable (with a "did you
mean" suggestion) or a value that the code reading it would refuse raises
:class:`SettingsError`, whose message names the variable, the value (never the
value of a secret) and what is allowed. ``brainline serve`` and ``brainline
worker`` print it and exit with status 2 before anything starts, instead of
failing every job later.

Generated from this one definition by ``scripts/gen_settings_docs.py``, and
checked by ``tests/test_gen_settings_docs.py``: ``config/service.yaml`` (the
defaults, commented), the table in README "Configuration" and the Helm chart's
``settings`` values with ``templates/_settings.tpl``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "BRAINLINE_"

#: Values of :attr:`SettingInfo.used_by`: the processes that read a setting.
GATEWAY, WORKER, BOTH = "gateway", "worker", "both"

#: ``BRAINLINE_*`` environment variables that are not settings but are read
#: elsewhere; accepted next to the settings. Variable -> what it is.
OTHER_VARIABLES: dict[str, str] = {
    "BRAINLINE_VAULT_OLD_KEY": "`brainline vault rotate`: the previous vault key, when neither "
                               "--old-key-file, --old-key-env nor --old-key gives it",
    "BRAINLINE_DEVICE_SERIAL": "Device Serial Number of the result objects (e.g. your asset tag); "
                               "default derived from BRAINLINE_UID_ROOT, else from the host name",
    "BRAINLINE_TEST_ARTIFACTS": "tests only: folder that receives the review UI screenshots of "
                                "tests/test_review_ui.py",
    "BRAINLINE_VIEWER_DOCS": "tests only: 1 = tests/test_viewer.py refreshes the screenshots in docs/",
    "BRAINLINE_OHIF_DIST": "tests only: an unpacked OHIF viewer (`dist` folder) for tests/test_viewer.py",
}

#: Destination plugins (entry points in this group) read ``BRAINLINE_DEST_<KIND>``.
DESTINATION_PLUGIN_GROUP = "brainline.destinations"

PRIOR_SEARCH_MODES = ("off", "brainline", "pacs", "both")
PRIOR_RETRIEVE_MODES = ("get", "move")
PRIOR_KEEP_WORDS = ("recent", "baseline", "nadir")
REVIEW_MODES = ("preliminary", "hold", "off")
EXECUTORS = ("local", "celery")
BURNED_IN_ANNOTATION_ACTIONS = ("reject", "flag")
#: BRAINLINE_MODEL values that run the BraTS 2017 model (models/wang_backend.py),
#: which accepts the devices "cpu" and "cuda" only.
WANG_MODELS = ("", "auto", "brats17-wang")
_DEVICE = re.compile(r"(cpu|cuda|cuda:\d+)")
#: Log levels that ``logging`` accepts by name (service/logs.py upper-cases them).
LOG_LEVELS = tuple(name for name in logging.getLevelNamesMapping() if name != "NOTSET")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class SettingInfo:
    """The definition of one setting, kept in its :class:`Settings` field's
    metadata; ``name``, ``default`` and ``type_name`` are filled in from the
    field (see :data:`SETTINGS`).

    ``choices``: the allowed values, or ``"module:NAME"`` of the tuple in the
    code that reads the setting (imported when needed); ``minimum``/``above``/
    ``maximum``: numeric range (``above`` is exclusive); ``allowed``: the
    allowed values in words where they are checked by code (shown in the
    docs); ``shown_default``: the default in words where the literal default
    means something else (e.g. "" = derived)."""

    description: str
    group: str
    used_by: str = BOTH
    secret: bool = False
    choices: tuple[str, ...] | str = ()
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    allowed: str = ""
    shown_default: str = ""
    name: str = ""
    default: Any = None
    type_name: str = ""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def allowed_values(self) -> tuple[str, ...]:
        """The allowed values (from the code that reads the setting), or ()."""
        if isinstance(self.choices, str):
            module, _, attr = self.choices.partition(":")
            return tuple(str(v) for v in getattr(importlib.import_module(module), attr))
        return self.choices

    def allowed_text(self) -> str:
        """What is allowed, in words (the docs and the error messages)."""
        if self.allowed:
            return self.allowed
        if self.choices:
            return "one of " + ", ".join(self.allowed_values())
        low = (f"{self.minimum:g}" if self.minimum is not None else None)
        if low is not None and self.maximum is not None:
            return f"{low} to {self.maximum:g}"
        if low is not None:
            return f"{low} or more"
        if self.above is not None:
            return f"more than {self.above:g}"
        if self.type_name == "bool":
            return "true or false (1/0, yes/no, on/off)"
        return ""

    def default_text(self) -> str:
        if self.shown_default:
            return self.shown_default
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, (tuple, dict)) or self.default == "":
            return "empty"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        if isinstance(self.default, Path) and not self.default.is_absolute():
            return f"./{self.default}"
        return str(self.default)


T = TypeVar("T")

# Groups, in the order of the docs.
SERVICE = "Service"
LISTENER = "DICOM listener"
TLS = "TLS"
API = "REST API"
PSEUDONYMIZATION = "Pseudonymization"
PULL = "Pulling from a PACS"
DELIVERY = "Result delivery"
PIPELINE = "Image pipeline"
QC = "Quality control"
PRIORS = "Longitudinal follow-up (prior studies)"
SCALEOUT = "Scaled-out mode (Celery)"
RETENTION = "Retention"
REVIEW = "Review gating and result lifecycle"
REVIEW_UI = "Review web UI"
GROUPS = (SERVICE, LISTENER, TLS, API, PSEUDONYMIZATION, PULL, DELIVERY, PIPELINE, QC, PRIORS,
          SCALEOUT, RETENTION, REVIEW, REVIEW_UI)


def setting(default: T, description: str, group: str, **info: Any) -> T:
    """A :class:`Settings` field: ``default`` and the :class:`SettingInfo`
    (``description``, ``group`` and the keywords) in its metadata."""
    meta = {"setting": SettingInfo(description=description, group=group, **info)}
    if isinstance(default, dict):
        frozen = dict(default)
        return field(default_factory=lambda: dict(frozen), metadata=meta)  # type: ignore[return-value]
    return field(default=default, metadata=meta)


PORT = {"minimum": 1, "maximum": 65535}


@dataclass(frozen=True)
class Settings:
    """The settings of one BrainLine process (see the module docstring).
    Times are in seconds unless the name says otherwise; sizes in MiB (``_mb``)
    or bytes (``max_pdu_size``)."""

    # -- service -------------------------------------------------------------
    home: Path = setting(Path("./var"), "data directory: spool, workspaces, database, vault key (dev mode), "
                         "logs", SERVICE, allowed="a folder (created 0700)")
    log_level: str = setting("INFO", "log level of the JSON-lines log (stderr and <home>/logs)", SERVICE,
                             choices=LOG_LEVELS)
    database_url: str = setting("", "SQLAlchemy URL of the job store and vault; "
                                "`postgresql+psycopg2://user:pw@host/db` works too", SERVICE, secret=True,
                                shown_default="sqlite:///<home>/brainline.db")
    min_free_mb: float = setting(1024.0, "below this free space (MiB) in <home>, C-STORE answers Out of "
                                 "Resources (0xA700) and /readyz fails", SERVICE, used_by=GATEWAY, minimum=0)
    workers: int = setting(2, "threads of the local executor (celery: of the gateway queue)", SERVICE,
                           used_by=GATEWAY, minimum=1)
    uid_root: str = setting("", "UID root of new objects", SERVICE, shown_default="empty (2.25.<uuid>)",
                            allowed="a DICOM UID root of at most 54 characters, e.g. 1.2.826.0.1.3680043.10.999")

    # -- DICOM listener --------------------------------------------------------
    dicom_port: int = setting(11112, "DICOM listener port (C-ECHO, C-STORE SCP)", LISTENER, used_by=GATEWAY,
                              allowed="1 to 65535 (not the HTTP port)", **PORT)
    dicom_bind: str = setting("0.0.0.0", "listener address", LISTENER, used_by=GATEWAY)
    ae_title: str = setting("BRAINLINE", "our AE title (the called AE title is checked)", LISTENER,
                            used_by=GATEWAY, allowed="1 to 16 characters")
    allowed_aes: tuple[str, ...] = setting((), "comma-separated `AE` or `AE@host` peers; empty accepts any "
                                           "(warned at start)", LISTENER, used_by=GATEWAY)
    stable_seconds: float = setting(60.0, "quiet period (s) before a study counts as complete", LISTENER,
                                    used_by=GATEWAY, above=0)
    max_associations: int = setting(16, "concurrent DICOM associations", LISTENER, used_by=GATEWAY, minimum=1)
    max_associations_per_peer: int = setting(4, "concurrent associations from one peer IP address", LISTENER,
                                             used_by=GATEWAY, minimum=1)
    dimse_timeout: float = setting(60.0, "seconds a DIMSE message may take (listener and SCUs)", LISTENER,
                                   used_by=GATEWAY, above=0)
    network_timeout: float = setting(60.0, "seconds without network traffic before a connection is dropped",
                                     LISTENER, used_by=GATEWAY, above=0)
    acse_timeout: float = setting(10.0, "seconds a connection has to complete its association request",
                                  LISTENER, used_by=GATEWAY, above=0)
    max_pdu_size: int = setting(131072, "largest P-DATA PDU accepted (bytes); larger announcements abort the "
                                "association; 0 = no limit", LISTENER, used_by=GATEWAY, minimum=0)
    max_instance_mb: float = setting(200.0, "largest instance accepted (MiB, after inflating deflated transfer "
                                     "syntaxes); larger ones are refused 0xA700", LISTENER, used_by=GATEWAY,
                                     above=0)
    accepted_sop_classes: str = setting("", "storage SOP classes accepted: comma-separated UIDs or keywords "
                                        "(MRImageStorage)", LISTENER, used_by=GATEWAY,
                                        shown_default="the packaged brain-MR set")
    burned_in_annotation: str = setting("reject", "instances with BurnedInAnnotation YES: reject (quarantine) "
                                        "or flag (keep, flagged in words)", LISTENER, used_by=GATEWAY,
                                        choices=BURNED_IN_ANNOTATION_ACTIONS)

    # -- TLS -------------------------------------------------------------------
    tls_cert: str = setting("", "PEM certificate: the REST API is served over HTTPS only and DICOM TLS "
                            "listens on dicom_tls_port", TLS, used_by=GATEWAY,
                            allowed="a PEM file, set together with tls_key")
    tls_key: str = setting("", "PEM private key of tls_cert", TLS, used_by=GATEWAY,
                           allowed="a PEM file, set together with tls_cert")
    tls_client_ca: str = setting("", "PEM CA bundle: DICOM TLS peers must present a certificate it verifies",
                                 TLS, used_by=GATEWAY)
    dicom_tls_port: int = setting(2762, "DICOM TLS listener port (only with tls_cert)", TLS, used_by=GATEWAY,
                                  minimum=0, maximum=65535,
                                  allowed="0 (off) or 1 to 65535 (not the DICOM or HTTP port)")

    # -- REST API --------------------------------------------------------------
    http_port: int = setting(8080, "REST API port", API, used_by=GATEWAY,
                             allowed="1 to 65535 (not the DICOM port)", **PORT)
    http_bind: str = setting("0.0.0.0", "REST API address (and the worker's health/metrics address)", API)
    api_token: str = setting("", "bearer token required on /api/; empty = no authentication (warned at start)",
                             API, used_by=GATEWAY, secret=True)

    # -- pseudonymization ------------------------------------------------------
    vault_key: str = setting("", "secret (16 characters or more) for pseudonyms and vault encryption; "
                             "required unless dev_mode; never given to workers", PSEUDONYMIZATION,
                             used_by=GATEWAY, secret=True)
    dev_mode: bool = setting(False, "allow a generated vault key in <home>/vault.key (`make run` sets 1)",
                             PSEUDONYMIZATION, used_by=GATEWAY)
    deid_profile: str = setting("", "path of a de-identification profile YAML", PSEUDONYMIZATION,
                                used_by=GATEWAY, shown_default="packaged")

    # -- pulling from a PACS ---------------------------------------------------
    dicomweb_url: str = setting("", "DICOMweb (QIDO-RS/WADO-RS) base URL of the PACS to pull from", PULL,
                                used_by=GATEWAY)
    dicomweb_username: str = setting("", "optional HTTP basic user name for dicomweb_url", PULL, used_by=GATEWAY)
    dicomweb_password: str = setting("", "password of dicomweb_username", PULL, used_by=GATEWAY, secret=True)

    # -- result delivery -------------------------------------------------------
    dest_dicom: str = setting("", "C-STORE destinations `AET@host:port[,...]`", DELIVERY, used_by=GATEWAY)
    dest_stowrs: str = setting("", "STOW-RS destinations: DICOMweb base URLs `URL[,...]`", DELIVERY,
                               used_by=GATEWAY)
    dest_stowrs_username: str = setting("", "optional HTTP basic user name for the STOW-RS destinations",
                                        DELIVERY, used_by=GATEWAY)
    dest_stowrs_password: str = setting("", "password of dest_stowrs_username", DELIVERY, used_by=GATEWAY,
                                        secret=True)
    outbox_retry_base_seconds: float = setting(5.0, "first retry delay (s) of a delivery; doubles per attempt",
                                               DELIVERY, used_by=GATEWAY, above=0)
    outbox_retry_max_seconds: float = setting(600.0, "longest delay (s) between retries", DELIVERY,
                                              used_by=GATEWAY, allowed="at least outbox_retry_base_seconds")
    outbox_max_attempts: int = setting(50, "attempts before a delivery is failed (`brainline outbox retry`)",
                                       DELIVERY, used_by=GATEWAY, minimum=1)
    dest_unreachable_seconds: float = setting(600.0, "/readyz reports a destination unreachable for longer "
                                              "(s)", DELIVERY, used_by=GATEWAY, above=0)

    # -- image pipeline --------------------------------------------------------
    series_rules: str = setting("", "path of a series-selection rules YAML", PIPELINE, shown_default="packaged")
    reference_role: str = setting("t1c", "sequence whose grid everything is registered to (e.g. flair for "
                                  "follow-up)", PIPELINE, choices="brainline.models.base:ROLES")
    registration_transform: str = setting("rigid", "transform of the registration", PIPELINE,
                                          choices="brainline.pipelines.registration:TRANSFORMS")
    skull_strip_backend: str = setting("deepbet", "skull-stripping backend", PIPELINE,
                                       allowed="deepbet, hd-bet (when installed) or a plugin's name")
    model: str = setting("", "segmentation model: auto = the shipped BraTS 2017 model with T1, T1c, T2 and "
                         "FLAIR, the baseline otherwise; baseline; brats17-wang; a MONAI bundle or ONNX folder; "
                         "a plugin name", PIPELINE, shown_default="empty (auto)")
    device: str = setting("cpu", "where the neural networks run", PIPELINE,
                          allowed="cpu, cuda or cuda:N (N = GPU number; not with the BraTS 2017 model)")

    # -- quality control (issue 12 items 1-2) ----------------------------------
    qc_min_history: int = setting(20, "earlier studies of a site + scanner + series role before a robust "
                                  "z-score is computed", QC, minimum=3)
    qc_outlier_z: float = setting(3.5, "|robust z| (dimensionless) from which a metric is reported as an "
                                  "outlier, in words", QC, above=0)
    qc_history_studies: int = setting(200, "most recent studies of a site + scanner (site + model for "
                                      "discord) used as history", QC, minimum=3)
    qc_workers: int = setting(2, "series the image-QC stage measures at a time (threads)", QC, minimum=1)
    qc_discord: str = setting("auto", "segmentation discord candidates", QC,
                              allowed="auto, off or a comma list of exposed, baseline, baseline_t1c_flair, "
                                      "baseline_split_0.3, baseline_split_0.5, flip")
    qc_discord_grid_mm: float = setting(2.0, "isotropic grid (mm) of the baseline candidates; 0 = the "
                                        "reference grid", QC, minimum=0)
    qc_discord_alpha: float = setting(0.1, "alarm below median - alpha x MAD of a candidate's Dice history "
                                      "(Kofler et al. 2021)", QC, above=0)
    qc_discord_min_history: int = setting(10, "earlier studies of a site with the same model before discord "
                                          "thresholds exist", QC, minimum=3)

    # -- longitudinal follow-up ------------------------------------------------
    prior_search: str = setting("", "where earlier studies of the patient are searched", PRIORS,
                                used_by=GATEWAY, choices=PRIOR_SEARCH_MODES,
                                shown_default="empty (both with a prior PACS, else brainline)")
    prior_pacs_dicomweb: str = setting("", "QIDO-RS/WADO-RS base URL of the PACS asked for priors; off = none",
                                       PRIORS, used_by=GATEWAY, shown_default="dicomweb_url")
    prior_pacs_dicom: str = setting("", "DICOM PACS asked with C-FIND + C-GET when no DICOMweb PACS answers",
                                    PRIORS, used_by=GATEWAY, allowed="AET@host:port")
    prior_retrieve: str = setting("get", "how instances come from the DICOM PACS: get = C-GET on the query "
                                  "association; move = C-MOVE to BrainLine's own short-lived storage SCP "
                                  "(prior_move_ae on prior_move_port, which the PACS must know)", PRIORS,
                                  used_by=GATEWAY, choices=PRIOR_RETRIEVE_MODES)
    prior_move_ae: str = setting("BRAINLINE_PRIOR", "AE title of the C-MOVE destination (register it at the "
                                 "PACS with this host and prior_move_port)", PRIORS, used_by=GATEWAY,
                                 allowed="1 to 16 characters")
    prior_move_port: int = setting(11113, "port of the C-MOVE destination, open only while a prior is "
                                   "retrieved (bound to dicom_bind)", PRIORS, used_by=GATEWAY,
                                   allowed="1 to 65535 (not the DICOM or HTTP port)", **PORT)
    prior_keep: str = setting("recent,baseline", "which priors are kept", PRIORS, used_by=GATEWAY,
                              allowed="a comma list of recent, baseline, nadir")
    prior_max_age_days: int = setting(0, "ignore priors older than this many days before the current study; "
                                      "0 = no limit", PRIORS, used_by=GATEWAY, minimum=0)
    prior_timeout_seconds: float = setting(120.0, "budget (s) for the PACS search and retrieval (and for "
                                           "waiting on a running earlier job)", PRIORS, used_by=GATEWAY, above=0)

    # -- scaled-out mode -------------------------------------------------------
    executor: str = setting("local", "local: one process runs every stage; celery: the gateway pseudonymizes "
                            "and delivers, workers run the image stages", SCALEOUT, choices=EXECUTORS)
    broker_url: str = setting("", "Celery broker, e.g. redis://redis:6379/0 (Redis with appendonly "
                              "persistence); needed by executor celery", SCALEOUT, secret=True,
                              allowed="a redis:// or rediss:// URL")
    workspaces: str = setting("", "job workspaces; shared storage (RWX volume) in celery mode", SCALEOUT,
                              shown_default="<home>/workspaces")
    worker_http_port: int = setting(9808, "`brainline worker`: port of /healthz, /readyz, /metrics", SCALEOUT,
                                    used_by=WORKER, **PORT)
    worker_queues: str = setting("compute,gpu", "`brainline worker` default queues (gpu only with device "
                                 "cuda)", SCALEOUT, used_by=WORKER, allowed="a comma list of compute, gpu")
    worker_concurrency: int = setting(1, "stages a worker runs at once (1 = solo pool, single-threaded)",
                                      SCALEOUT, used_by=WORKER, minimum=1)
    stage_lease_seconds: float = setting(30.0, "a stage whose worker stopped renewing its lease this long "
                                         "(s) is re-queued", SCALEOUT, above=0)
    broker_visibility_timeout: float = setting(7200.0, "Redis: unacknowledged messages come back after this "
                                               "(s; longer than any stage)", SCALEOUT, above=0)

    # -- retention -------------------------------------------------------------
    retention_days: int = setting(0, "days after a job finished and was delivered before its spool study, "
                                  "workspace and outbox folder are deleted; 0 = keep forever", RETENTION,
                                  used_by=GATEWAY, minimum=0)
    vault_retention_days: int = setting(0, "days after a patient's last delivered job before the vault "
                                        "records that re-identify its results are deleted; 0 = keep forever",
                                        RETENTION, used_by=GATEWAY,
                                        allowed="0, or at least retention_days (which must be set)")
    retention_interval_hours: float = setting(24.0, "hours between the service's purges", RETENTION,
                                              used_by=GATEWAY, above=0)

    # -- review gating and result lifecycle (issue 12 item 4) ------------------
    review_mode: str = setting("preliminary", "preliminary: deliver at once marked \"not reviewed\"; hold: "
                               "keep results until accepted; off: no review", REVIEW, used_by=GATEWAY,
                               choices=REVIEW_MODES)
    review_mode_by_site: dict[str, str] = setting({}, "review mode per calling AE title of the sender "
                                                  "(others: review_mode)", REVIEW, used_by=GATEWAY,
                                                  allowed="a comma list of AE_TITLE=mode, e.g. "
                                                          "SCANNER1=hold,SCANNER2=preliminary")
    review_organization: str = setting("", "Verifying Organization written into reviewed (VERIFIED) SRs",
                                       REVIEW, used_by=GATEWAY, allowed="text (at most 64 characters kept)")
    dest_orthanc_rest: str = setting("", "Orthanc REST base URLs of destinations: retracted instances get "
                                     "the metadata dest_orthanc_metadata", REVIEW, used_by=GATEWAY,
                                     allowed="a comma list of http(s) URLs")
    dest_orthanc_metadata: str = setting("BrainLineRetracted", "name of that metadata (declare it in "
                                         "Orthanc's UserMetadata)", REVIEW, used_by=GATEWAY,
                                         allowed="letters, digits and _")

    # -- review web UI (issue 12 item 3) ---------------------------------------
    review_session_minutes: float = setting(30.0, "a UI session ends after this many minutes without a "
                                            "request", REVIEW_UI, used_by=GATEWAY, above=0)
    review_session_max_hours: float = setting(12.0, "... and this many hours after log-in, whatever happens",
                                              REVIEW_UI, used_by=GATEWAY, above=0)
    review_login_max_failures: int = setting(5, "failed log-ins of one user name in 15 min (x4 from one "
                                             "address) before log-ins are refused for a while", REVIEW_UI,
                                             used_by=GATEWAY, minimum=1)
    review_secret: str = setting("", "key that signs UI session cookies; empty = derived from vault_key "
                                 "(changing it logs everybody out)", REVIEW_UI, used_by=GATEWAY, secret=True)

    #: Not a setting: kept for callers that attach values of their own.
    extra: dict[str, Any] = field(default_factory=dict)

    # Folders inside home -------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        """PHI zone: received instances, one folder per study key."""
        return self.home / "spool"

    @property
    def workspace_dir(self) -> Path:
        """Processing zone: pseudonymized data only, one folder per job;
        BRAINLINE_WORKSPACES puts it on storage shared with the workers."""
        return Path(self.workspaces) if self.workspaces else self.home / "workspaces"

    @property
    def outbox_dir(self) -> Path:
        """PHI zone: re-identified result objects waiting for delivery."""
        return self.home / "outbox"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"


def _definitions() -> tuple[SettingInfo, ...]:
    out = []
    for f in dataclasses.fields(Settings):
        info = f.metadata.get("setting")
        if info is None:
            continue
        factory = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()  # type: ignore[operator]
        out.append(dataclasses.replace(info, name=f.name, default=default, type_name=type(default).__name__))
    return tuple(out)


#: Every setting, in the order of :class:`Settings` (and of the docs).
SETTINGS: tuple[SettingInfo, ...] = _definitions()
BY_NAME: dict[str, SettingInfo] = {s.name: s for s in SETTINGS}
BY_ENV: dict[str, SettingInfo] = {s.env: s for s in SETTINGS}


# ----------------------------------------------------------------- reading values

def _shown(info: SettingInfo, raw: object) -> str:
    """The value for a message: numbers as they are, text quoted; a secret's
    value is never shown."""
    if info.secret:
        return "(a secret: value not shown)"
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return f"{raw:g}"
    return repr(str(raw))


def _invalid(info: SettingInfo, raw: object, allowed: str = "") -> SettingsError:
    """``BRAINLINE_X must be <allowed>; got <value>``."""
    return SettingsError(f"{info.env} must be {allowed or info.allowed_text()}; got {_shown(info, raw)}")


def _parse(info: SettingInfo, raw: object) -> Any:
    """The typed value of one setting from its raw value (a string from the
    environment, or the default); SettingsError naming the variable."""
    default = info.default
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", ""):
            return False
        raise _invalid(info, raw)
    if isinstance(default, (int, float)):
        try:
            return type(default)(str(raw).strip())
        except (TypeError, ValueError):
            kind = "a whole number" if isinstance(default, int) else "a number"
            allowed = f", {info.allowed_text()}" if info.allowed_text() else ""
            raise SettingsError(f"{info.env} must be {kind}{allowed}; got {_shown(info, raw)}") from None
    if isinstance(default, Path):
        return Path(str(raw)).expanduser().resolve()
    if isinstance(default, tuple):
        if isinstance(raw, tuple):
            return raw
        return tuple(a.strip() for a in str(raw).split(",") if a.strip())
    if isinstance(default, dict):
        return dict(raw) if isinstance(raw, Mapping) else parse_site_modes(str(raw or ""), info.env)
    return "" if raw is None else str(raw)


def _check_generic(info: SettingInfo, value: Any) -> Any:
    """Choices (case-insensitive; the value comes back as spelt in the
    choices) and numeric ranges declared in the definition."""
    if info.choices and isinstance(value, str) and value.strip() != "":
        allowed = {v.lower(): v for v in info.allowed_values()}
        if value.strip().lower() not in allowed:
            raise _invalid(info, value)
        return allowed[value.strip().lower()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if ((info.minimum is not None and value < info.minimum)
                or (info.maximum is not None and value > info.maximum)
                or (info.above is not None and not value > info.above)):
            raise _invalid(info, value)
    return value


def _plugin_destination_prefixes() -> tuple[str, ...]:
    """``BRAINLINE_DEST_<KIND>`` of the installed destination plugins."""
    try:
        eps = importlib.metadata.entry_points(group=DESTINATION_PLUGIN_GROUP)
    except Exception:  # broken metadata of an unrelated package: no plugin variables
        return ()
    return tuple(f"{ENV_PREFIX}DEST_{ep.name.upper().replace('-', '_')}" for ep in eps)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The ``BRAINLINE_*`` names in ``env`` that are neither a setting, nor
    one of :data:`OTHER_VARIABLES`, nor ``BRAINLINE_DEST_<KIND>[_...]`` of an
    installed destination plugin."""
    names = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in BY_ENV and k not in OTHER_VARIABLES)
    if not names:
        return []
    plugins = _plugin_destination_prefixes()
    return [k for k in names if not any(k == p or k.startswith(p + "_") for p in plugins)]


def _check_unknown(env: Mapping[str, str]) -> None:
    unknown = unknown_variables(env)
    if not unknown:
        return
    known = [k[len(ENV_PREFIX):] for k in (*BY_ENV, *OTHER_VARIABLES)]
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], known, n=1, cutoff=0.6)
        parts.append(f"{name} (did you mean {ENV_PREFIX}{close[0]}?)" if close else name)
    what = "is not a BrainLine setting" if len(parts) == 1 else "are not BrainLine settings"
    raise SettingsError(f"{', '.join(parts)} {what}; the settings are listed in README \"Configuration\" "
                        "and config/service.yaml")


# ----------------------------------------------------------------- checks across settings

def _check_prior_settings(values: dict[str, Any]) -> None:
    """Validate and complete the prior-search settings in place:
    ``prior_pacs_dicomweb`` defaults to ``dicomweb_url`` ("off" = none) and an
    empty ``prior_search`` becomes "both" when a prior PACS is configured,
    "brainline" otherwise."""
    web = str(values.get("prior_pacs_dicomweb") or "").strip()
    if web.lower() in ("off", "none", "no"):
        web = ""
    elif not web:
        web = str(values.get("dicomweb_url") or "").strip()
    values["prior_pacs_dicomweb"] = web
    dicom = str(values.get("prior_pacs_dicom") or "").strip()
    if dicom:
        aet, _, hostport = dicom.partition("@")
        host, _, port = hostport.rpartition(":")
        if not (aet and len(aet) <= 16 and host and port.isdigit() and 1 <= int(port) <= 65535):
            raise SettingsError(f"BRAINLINE_PRIOR_PACS_DICOM={dicom!r} is not AET@host:port")
    values["prior_pacs_dicom"] = dicom
    mode = str(values.get("prior_search") or "").strip().lower()
    if not mode:
        mode = "both" if (web or dicom) else "brainline"
    if mode not in PRIOR_SEARCH_MODES:
        raise SettingsError(f"BRAINLINE_PRIOR_SEARCH must be one of {', '.join(PRIOR_SEARCH_MODES)}, "
                            f"not {mode!r}")
    values["prior_search"] = mode
    keep = [w.strip().lower() for w in str(values.get("prior_keep") or "").split(",") if w.strip()]
    if not keep or any(w not in PRIOR_KEEP_WORDS for w in keep):
        raise SettingsError("BRAINLINE_PRIOR_KEEP must list some of recent, baseline, nadir "
                            "(e.g. recent,baseline)")
    values["prior_keep"] = ",".join(dict.fromkeys(keep))
    if values.get("prior_max_age_days", 0) < 0:
        raise SettingsError("BRAINLINE_PRIOR_MAX_AGE_DAYS must be 0 (no limit) or more")
    if values.get("prior_timeout_seconds", 1.0) <= 0:
        raise SettingsError("BRAINLINE_PRIOR_TIMEOUT_SECONDS must be more than 0")


def parse_site_modes(raw: str, name: str = "BRAINLINE_REVIEW_MODE_BY_SITE") -> dict[str, str]:
    """``"SCANNER1=hold,SCANNER2=preliminary"`` -> {calling AE title: review mode};
    raise SettingsError naming ``name`` for a malformed entry."""
    modes: dict[str, str] = {}
    for entry in str(raw or "").split(","):
        if not entry.strip():
            continue
        ae, sep, mode = entry.partition("=")
        ae, mode = ae.strip(), mode.strip().lower()
        if not sep or not ae or len(ae) > 16 or "\\" in ae:
            raise SettingsError(f"{name}: {entry.strip()!r} is not AE_TITLE=mode (AE title 1 to 16 characters)")
        if mode not in REVIEW_MODES:
            raise SettingsError(f"{name}: the mode of {ae} must be one of {', '.join(REVIEW_MODES)}, not {mode!r}")
        modes[ae] = mode
    return modes


def _check_review_settings(values: dict[str, Any]) -> None:
    """Validate the review gating settings in place: ``review_mode`` one of
    REVIEW_MODES, the Orthanc REST URLs http(s) and the metadata name a plain
    word."""
    mode = str(values.get("review_mode") or "preliminary").strip().lower()
    if mode not in REVIEW_MODES:
        raise SettingsError(f"BRAINLINE_REVIEW_MODE must be one of {', '.join(REVIEW_MODES)}, not {mode!r}")
    values["review_mode"] = mode
    urls = [u.strip() for u in str(values.get("dest_orthanc_rest") or "").split(",") if u.strip()]
    if any(not u.startswith(("http://", "https://")) for u in urls):
        raise SettingsError("BRAINLINE_DEST_ORTHANC_REST must list Orthanc REST base URLs (http://host:8042)")
    values["dest_orthanc_rest"] = ",".join(u.rstrip("/") for u in urls)
    name = str(values.get("dest_orthanc_metadata") or "BrainLineRetracted").strip()
    if not name.replace("_", "").isalnum():
        raise SettingsError("BRAINLINE_DEST_ORTHANC_METADATA must be a metadata name of letters, digits and _")
    values["dest_orthanc_metadata"] = name
    values["review_organization"] = str(values.get("review_organization") or "").strip()[:64]


def _check_qc_settings(values: dict[str, Any]) -> None:
    """Validate the quality-control discord candidates (pipelines/qc_steps.py)."""
    from brainline.pipelines.qc_steps import parse_discord

    try:
        parse_discord(values.get("qc_discord", "auto"))
    except ValueError as exc:
        raise SettingsError(f"BRAINLINE_QC_DISCORD: {exc}") from None


def _check_ports(values: dict[str, Any]) -> None:
    """The gateway's ports are distinct where their addresses overlap."""
    def overlap(a: str, b: str) -> bool:
        wild = ("", "0.0.0.0", "::")
        return values[a] in wild or values[b] in wild or values[a] == values[b]

    if values["dicom_port"] == values["http_port"] and overlap("dicom_bind", "http_bind"):
        raise SettingsError(f"BRAINLINE_DICOM_PORT and BRAINLINE_HTTP_PORT are both {values['http_port']}: "
                            "the DICOM listener and the REST API need different ports")
    if values["prior_retrieve"] == "move":
        for other in ("dicom_port", "http_port"):
            if values["prior_move_port"] == values[other]:
                raise SettingsError(f"BRAINLINE_PRIOR_MOVE_PORT and BRAINLINE_{other.upper()} are both "
                                    f"{values[other]}: the C-MOVE destination needs a port of its own")
    tls_port = values["dicom_tls_port"]
    if values["tls_cert"] and tls_port:
        for other in ("dicom_port", "http_port"):
            if tls_port == values[other]:
                raise SettingsError(f"BRAINLINE_DICOM_TLS_PORT and BRAINLINE_{other.upper()} are both "
                                    f"{tls_port}: DICOM TLS needs a port of its own (0 = off)")


def _check_pipeline(values: dict[str, Any]) -> None:
    """Device, skull-strip backend and model as the image pipeline reads them."""
    info = BY_NAME["device"]
    device = str(values["device"]).strip().lower()
    if not _DEVICE.fullmatch(device):
        raise _invalid(info, values["device"], "cpu, cuda or cuda:N (N = the GPU number, e.g. cuda:0)")
    model = str(values["model"]).strip().lower()
    if device.startswith("cuda:") and model in WANG_MODELS:
        raise SettingsError(f"BRAINLINE_DEVICE={device!r} cannot be used with BRAINLINE_MODEL={values['model']!r}: "
                            "the BraTS 2017 model runs on cpu or cuda only; use cuda and choose the GPU with "
                            "CUDA_VISIBLE_DEVICES")
    values["device"] = device
    from brainline.pipelines.skull_strip import SKULL_STRIP_BACKENDS

    if SKULL_STRIP_BACKENDS.canonical(values["skull_strip_backend"]) is None:
        raise _invalid(BY_NAME["skull_strip_backend"], values["skull_strip_backend"],
                       "one of " + ", ".join(SKULL_STRIP_BACKENDS.names()))


def _check_uid_root(values: dict[str, Any]) -> None:
    """A UID root that pydicom's generate_uid accepts (new_uid adds the dot)."""
    root = str(values["uid_root"]).strip()
    values["uid_root"] = root
    if not root:
        return
    from pydicom.uid import generate_uid

    try:
        generate_uid(prefix=root if root.endswith(".") else root + ".")
    except ValueError as exc:
        raise SettingsError(f"BRAINLINE_UID_ROOT={root!r} cannot be used as a UID root: {exc}") from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the defaults and the environment (``os.environ`` when
    ``env`` is None); SettingsError, in words, for an unknown ``BRAINLINE_*``
    variable or a value that cannot be used."""
    env = os.environ if env is None else env
    _check_unknown(env)
    values: dict[str, Any] = {}
    for info in SETTINGS:
        raw = env.get(info.env)
        values[info.name] = _check_generic(info, _parse(info, info.default if raw is None else raw))
    home = values["home"]
    if not values["database_url"]:
        values["database_url"] = f"sqlite:///{home / 'brainline.db'}"
    for name in ("ae_title", "prior_move_ae"):
        if not values[name] or len(values[name]) > 16:
            raise _invalid(BY_NAME[name], values[name])
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise SettingsError("BRAINLINE_TLS_CERT and BRAINLINE_TLS_KEY must be set together")
    if values["executor"] == "celery" and not values["broker_url"]:
        raise SettingsError("BRAINLINE_EXECUTOR=celery needs BRAINLINE_BROKER_URL "
                            "(e.g. redis://redis:6379/0)")
    if values["broker_url"] and not str(values["broker_url"]).startswith(("redis://", "rediss://")):
        raise SettingsError("BRAINLINE_BROKER_URL must be a Redis URL (redis://host:6379/0); got scheme "
                            f"{str(values['broker_url']).split(':', 1)[0]!r}")
    if values["workspaces"]:
        values["workspaces"] = str(Path(values["workspaces"]).expanduser().resolve())
    if values["retention_days"] < 0 or values["vault_retention_days"] < 0:
        raise SettingsError("BRAINLINE_RETENTION_DAYS and BRAINLINE_VAULT_RETENTION_DAYS must be 0 (keep forever) "
                            "or more")
    if values["vault_retention_days"] and not 0 < values["retention_days"] <= values["vault_retention_days"]:
        raise SettingsError("BRAINLINE_VAULT_RETENTION_DAYS needs BRAINLINE_RETENTION_DAYS set and not longer: "
                            "the vault records must not go before the data they re-identify")
    if values["outbox_retry_max_seconds"] < values["outbox_retry_base_seconds"]:
        raise _invalid(BY_NAME["outbox_retry_max_seconds"], values["outbox_retry_max_seconds"],
                       f"at least BRAINLINE_OUTBOX_RETRY_BASE_SECONDS ({values['outbox_retry_base_seconds']:g})")
    queues = [q.strip() for q in str(values["worker_queues"]).split(",") if q.strip()]
    if not queues or any(q not in ("compute", "gpu") for q in queues):
        raise _invalid(BY_NAME["worker_queues"], values["worker_queues"])
    _check_ports(values)
    _check_pipeline(values)
    _check_uid_root(values)
    _check_prior_settings(values)
    _check_review_settings(values)
    _check_qc_settings(values)
    return Settings(**values)
