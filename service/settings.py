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
    executor: str
    broker_url: str
    workspaces: str
    worker_http_port: int
    worker_queues: str
    worker_concurrency: int
    stage_lease_seconds: float
    broker_visibility_timeout: float
    extra: dict = field(default_factory=dict)

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
    known = {f.name for f in dataclasses.fields(Settings)}
    extra = {k: v for k, v in values.items() if k not in known}
    return Settings(**{k: v for k, v in values.items() if k in known}, extra=extra)
