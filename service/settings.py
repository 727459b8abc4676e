"""Service settings: packaged defaults in config/service.yaml, overridden by
environment variables ``BRAINLINE_<KEY>`` (e.g. ``BRAINLINE_DICOM_PORT``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

ENV_PREFIX = "BRAINLINE_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    home: Path
    dicom_port: int
    dicom_bind: str
    ae_title: str
    allowed_aes: tuple[str, ...]
    http_port: int
    http_bind: str
    stable_seconds: float
    database_url: str
    api_token: str
    vault_key: str
    dev_mode: bool
    dicomweb_url: str
    dicomweb_username: str
    dicomweb_password: str
    min_free_mb: float
    workers: int
    max_associations: int
    dimse_timeout: float
    network_timeout: float
    acse_timeout: float
    max_pdu_size: int
    max_associations_per_peer: int
    max_instance_mb: float
    accepted_sop_classes: str
    burned_in_annotation: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    dicom_tls_port: int
    log_level: str
    series_rules: str
    deid_profile: str
    dest_dicom: str
    dest_stowrs: str
    dest_stowrs_username: str
    dest_stowrs_password: str
    outbox_retry_base_seconds: float
    outbox_retry_max_seconds: float
    outbox_max_attempts: int
    dest_unreachable_seconds: float
    uid_root: str
    reference_role: str
    registration_transform: str
    skull_strip_backend: str
    model: str
    device: str
    prior_search: str
    prior_pacs_dicomweb: str
    prior_pacs_dicom: str
    prior_keep: str
    prior_max_age_days: int
    prior_timeout_seconds: float
    retention_days: int
    vault_retention_days: int
    retention_interval_hours: float
    executor: str
    broker_url: str
    workspaces: str
    worker_http_port: int
    worker_queues: str
    worker_concurrency: int
    stage_lease_seconds: float
    broker_visibility_timeout: float
    extra: dict = field(default_factory=dict)
    # -- review gating and result lifecycle (issue 12 item 4, service/review.py) --
    review_mode: str = "preliminary"          # preliminary | hold | off
    review_mode_by_site: dict = field(default_factory=dict)  # calling AE title -> mode
    review_organization: str = ""             # Verifying Organization of reviewed SRs
    dest_orthanc_rest: str = ""               # Orthanc REST URLs whose retracted instances get metadata
    dest_orthanc_metadata: str = "BrainLineRetracted"  # that metadata's name (Orthanc UserMetadata)
    # -- quality control (issue 12 items 1-2: service/qc_history.py, pipelines/qc_steps.py) --
    qc_min_history: int = 20          # earlier studies of a site + scanner + series role before a robust z-score
    qc_outlier_z: float = 3.5         # |robust z| (dimensionless) from which a metric is an outlier, in words
    qc_history_studies: int = 200     # most recent studies of a site + scanner (or site + model) used as history
    qc_workers: int = 2               # series the image-QC stage measures at a time (threads)
    qc_discord: str = "auto"          # discord candidates: auto | off | list of pipelines.qc_steps.DISCORD_SOURCES
    qc_discord_grid_mm: float = 2.0   # isotropic grid (mm) of the baseline candidates; 0 = the reference grid
    qc_discord_alpha: float = 0.1     # alarm below median - alpha x MAD of a candidate's Dice history
    qc_discord_min_history: int = 10  # earlier studies of a site + model before discord thresholds exist
    # -- review web UI (issue 12 item 3: service/review_ui.py, service/auth.py) --
    review_session_minutes: float = 30.0   # a UI session ends after this many minutes without a request
    review_session_max_hours: float = 12.0  # ... and this many hours after log-in, whatever happens
    review_login_max_failures: int = 5     # failed log-ins of one username in 15 min before log-ins are refused a while
    review_secret: str = ""                # key that signs UI sessions; empty = derived from vault_key

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


def _defaults() -> dict:
    text = resources.files("brainline.config").joinpath("service.yaml").read_text()
    return yaml.safe_load(text) or {}


def _coerce(name: str, default, raw):
    """Convert a raw value (str from the environment, or YAML value) to the
    type of the default; raise SettingsError naming the variable."""
    if raw is None:
        return default
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            value = str(raw).strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except (TypeError, ValueError):
        raise SettingsError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type(default).__name__}"
        ) from None
    return "" if raw is None else str(raw)


PRIOR_SEARCH_MODES = ("off", "brainline", "pacs", "both")
PRIOR_KEEP_WORDS = ("recent", "baseline", "nadir")


def _check_prior_settings(values: dict) -> None:
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
        raise SettingsError(f"BRAINLINE_PRIOR_SEARCH must be one of {', '.join(PRIOR_SEARCH_MODES)}")
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


REVIEW_MODES = ("preliminary", "hold", "off")


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


def _check_review_settings(values: dict) -> None:
    """Validate the review gating settings in place: ``review_mode`` one of
    REVIEW_MODES, ``review_mode_by_site`` parsed into a dict, the Orthanc REST
    URLs http(s) and the metadata name a plain word."""
    mode = str(values.get("review_mode") or "preliminary").strip().lower()
    if mode not in REVIEW_MODES:
        raise SettingsError(f"BRAINLINE_REVIEW_MODE must be one of {', '.join(REVIEW_MODES)}")
    values["review_mode"] = mode
    by_site = values.get("review_mode_by_site")
    values["review_mode_by_site"] = (dict(by_site) if isinstance(by_site, dict)
                                     else parse_site_modes(str(by_site or "")))
    urls = [u.strip() for u in str(values.get("dest_orthanc_rest") or "").split(",") if u.strip()]
    if any(not u.startswith(("http://", "https://")) for u in urls):
        raise SettingsError("BRAINLINE_DEST_ORTHANC_REST must list Orthanc REST base URLs (http://host:8042)")
    values["dest_orthanc_rest"] = ",".join(u.rstrip("/") for u in urls)
    name = str(values.get("dest_orthanc_metadata") or "BrainLineRetracted").strip()
    if not name.replace("_", "").isalnum():
        raise SettingsError("BRAINLINE_DEST_ORTHANC_METADATA must be a metadata name of letters, digits and _")
    values["dest_orthanc_metadata"] = name
    values["review_organization"] = str(values.get("review_organization") or "").strip()[:64]


def _check_qc_settings(values: dict) -> None:
    """Validate the quality-control settings (issue 12), naming the variable."""
    from brainline.pipelines.qc_steps import parse_discord

    try:
        parse_discord(values.get("qc_discord", "auto"))
    except ValueError as exc:
        raise SettingsError(f"BRAINLINE_QC_DISCORD: {exc}") from None
    for key, low in (("qc_min_history", 3), ("qc_history_studies", 3), ("qc_workers", 1),
                     ("qc_discord_min_history", 3)):
        if key in values and values[key] < low:
            raise SettingsError(f"BRAINLINE_{key.upper()} must be at least {low}")
    for key in ("qc_outlier_z", "qc_discord_alpha"):
        if key in values and not values[key] > 0:
            raise SettingsError(f"BRAINLINE_{key.upper()} must be more than 0")
    if values.get("qc_discord_grid_mm", 0) < 0:
        raise SettingsError("BRAINLINE_QC_DISCORD_GRID_MM must be 0 (the reference grid) or a spacing in mm")


def load_settings(env: dict | None = None) -> Settings:
    """Build Settings from the packaged defaults and the environment."""
    env = os.environ if env is None else env
    values = _defaults()
    for key, default in list(values.items()):
        raw = env.get(ENV_PREFIX + key.upper())
        values[key] = _coerce(key, default if default is not None else "", raw if raw is not None else default)
    home = Path(values["home"]).expanduser().resolve()
    values["home"] = home
    values["allowed_aes"] = tuple(
        a.strip() for a in str(values["allowed_aes"]).split(",") if a.strip()
    )
    if not values["database_url"]:
        values["database_url"] = f"sqlite:///{home / 'brainline.db'}"
    if not (1 <= values["dicom_port"] <= 65535):
        raise SettingsError(f"BRAINLINE_DICOM_PORT={values['dicom_port']} is not a TCP port")
    if not values["ae_title"] or len(values["ae_title"]) > 16:
        raise SettingsError("BRAINLINE_AE_TITLE must be 1 to 16 characters")
    if values["burned_in_annotation"] not in ("reject", "flag"):
        raise SettingsError("BRAINLINE_BURNED_IN_ANNOTATION must be 'reject' or 'flag'")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise SettingsError("BRAINLINE_TLS_CERT and BRAINLINE_TLS_KEY must be set together")
    if values["executor"] not in ("local", "celery"):
        raise SettingsError("BRAINLINE_EXECUTOR must be 'local' or 'celery'")
    if values["executor"] == "celery" and not values["broker_url"]:
        raise SettingsError("BRAINLINE_EXECUTOR=celery needs BRAINLINE_BROKER_URL "
                            "(e.g. redis://redis:6379/0)")
    if values["broker_url"] and not str(values["broker_url"]).startswith(("redis://", "rediss://")):
        raise SettingsError("BRAINLINE_BROKER_URL must be a Redis URL (redis://host:6379/0); got scheme "
                            f"{str(values['broker_url']).split(':', 1)[0]!r}")
    if values["workspaces"]:
        values["workspaces"] = str(Path(values["workspaces"]).expanduser().resolve())
    if values["worker_concurrency"] < 1:
        raise SettingsError("BRAINLINE_WORKER_CONCURRENCY must be at least 1")
    if values["retention_days"] < 0 or values["vault_retention_days"] < 0:
        raise SettingsError("BRAINLINE_RETENTION_DAYS and BRAINLINE_VAULT_RETENTION_DAYS must be 0 (keep forever) "
                            "or more")
    if values["retention_interval_hours"] <= 0:
        raise SettingsError("BRAINLINE_RETENTION_INTERVAL_HOURS must be more than 0")
    if values["vault_retention_days"] and not 0 < values["retention_days"] <= values["vault_retention_days"]:
        raise SettingsError("BRAINLINE_VAULT_RETENTION_DAYS needs BRAINLINE_RETENTION_DAYS set and not longer: "
                            "the vault records must not go before the data they re-identify")
    _check_prior_settings(values)
    _check_review_settings(values)
    _check_qc_settings(values)
    known = {f.name for f in dataclasses.fields(Settings)}
    extra = {k: v for k, v in values.items() if k not in known}
    return Settings(**{k: v for k, v in values.items() if k in known}, extra=extra)
