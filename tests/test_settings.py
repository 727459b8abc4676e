"""service/settings.py: one definition of every setting, checked at start-up.

Unknown ``BRAINLINE_*`` variables (with a "did you mean"), values outside
what the code that reads them accepts (device, reference role, transform,
ports, ranges, UID root) are refused with a message in words that names the
variable, the value and what is allowed; ``brainline serve`` and
``brainline worker`` then exit 2 without a traceback."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brainline.service.settings import (
    BOTH,
    BY_ENV,
    BY_NAME,
    GATEWAY,
    GROUPS,
    OTHER_VARIABLES,
    SETTINGS,
    WORKER,
    Settings,
    SettingsError,
    load_settings,
    unknown_variables,
)

CLI = [sys.executable, "-m", "brainline.service.cli"]


def _load(tmp_path: Path, **env: str) -> Settings:
    return load_settings({"BRAINLINE_HOME": str(tmp_path), **env})


# ----------------------------------------------------------------- the definition

def test_every_field_is_one_defined_setting():
    fields = [f.name for f in dataclasses.fields(Settings) if f.name != "extra"]
    assert [s.name for s in SETTINGS] == fields and len(fields) >= 80
    for s in SETTINGS:
        assert s.description and s.group in GROUPS and s.used_by in (GATEWAY, WORKER, BOTH), s.name
        assert s.env == "BRAINLINE_" + s.name.upper() and BY_ENV[s.env] is s
    secrets = {s.name for s in SETTINGS if s.secret}
    assert {"vault_key", "api_token", "database_url", "broker_url", "dicomweb_password",
            "dest_stowrs_password", "review_secret"} <= secrets
    assert BY_NAME["vault_key"].used_by == GATEWAY  # workers never hold the vault key


def test_allowed_values_come_from_the_code_that_reads_them():
    from brainline.models.base import ROLES
    from brainline.pipelines.registration import TRANSFORMS

    assert BY_NAME["reference_role"].allowed_values() == tuple(ROLES)
    assert BY_NAME["registration_transform"].allowed_values() == tuple(TRANSFORMS)
    for s in SETTINGS:  # every "module:NAME" source imports
        assert isinstance(s.allowed_values(), tuple)


def test_defaults_load_and_keep_their_types(tmp_path):
    s = load_settings({})
    for info in SETTINGS:
        assert isinstance(getattr(s, info.name), type(info.default) if info.name != "home" else Path), info.name
    assert s.database_url.startswith("sqlite:///") and s.prior_search == "brainline" and s.device == "cpu"


# ----------------------------------------------------------------- unknown variables

def test_unknown_variables_are_refused_with_a_suggestion(tmp_path):
    with pytest.raises(SettingsError, match=r"BRAINLINE_DCIOM_PORT \(did you mean BRAINLINE_DICOM_PORT\?\) "
                                            r"is not a BrainLine setting"):
        _load(tmp_path, BRAINLINE_DCIOM_PORT="104")
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, BRAINLINE_WORKER="1", BRAINLINE_FOO="1")
    text = str(err.value)
    assert "BRAINLINE_WORKER (did you mean BRAINLINE_WORKERS?)" in text and "BRAINLINE_FOO" in text
    assert "are not BrainLine settings" in text and "did you mean BRAINLINE_HOME" not in text


def test_the_value_of_an_unknown_variable_is_never_shown(tmp_path):
    with pytest.raises(SettingsError, match="BRAINLINE_VAULTKEY") as err:
        _load(tmp_path, BRAINLINE_VAULTKEY="s3cret-vault-key-0123456789")
    assert "s3cret" not in str(err.value)


def test_other_variables_and_non_brainline_variables_are_accepted(tmp_path):
    env = {name: "1" for name in OTHER_VARIABLES}
    assert _load(tmp_path, **env, PATH="/usr/bin", BRAINLINEX="1").home == tmp_path.resolve()
    assert unknown_variables({"BRAINLINE_DEST_S3": "x", "HOME": "/"}) == ["BRAINLINE_DEST_S3"]


def test_a_destination_plugin_variable_is_accepted_when_the_plugin_is_installed(tmp_path, monkeypatch):
    root = tmp_path / "site"
    info = root / "brainline_s3_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brainline-s3-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[brainline.destinations]\ns3 = brainline_s3_plugin:S3\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    assert unknown_variables({"BRAINLINE_DEST_S3": "b", "BRAINLINE_DEST_S3_REGION": "eu"}) == []
    assert unknown_variables({"BRAINLINE_DEST_S4": "b"}) == ["BRAINLINE_DEST_S4"]


# ----------------------------------------------------------------- values

@pytest.mark.parametrize("env, words", [
    ({"BRAINLINE_DEVICE": "gpu"}, "BRAINLINE_DEVICE must be cpu, cuda or cuda:N"),
    ({"BRAINLINE_DEVICE": "auto"}, "got 'auto'"),
    ({"BRAINLINE_DEVICE": "cuda:1"}, "the BraTS 2017 model runs on cpu or cuda only"),
    ({"BRAINLINE_REFERENCE_ROLE": "t1ce"}, "BRAINLINE_REFERENCE_ROLE must be one of t1, t1c, t2, flair; got 't1ce'"),
    ({"BRAINLINE_REGISTRATION_TRANSFORM": "bspline"}, "one of rigid, affine, rigid+affine; got 'bspline'"),
    ({"BRAINLINE_SKULL_STRIP_BACKEND": "fsl-bet"}, "BRAINLINE_SKULL_STRIP_BACKEND must be one of deepbet, hd-bet"),
    ({"BRAINLINE_DICOM_PORT": "0"}, "BRAINLINE_DICOM_PORT must be 1 to 65535 (not the HTTP port); got 0"),
    ({"BRAINLINE_HTTP_PORT": "70000"}, "BRAINLINE_HTTP_PORT must be 1 to 65535"),
    ({"BRAINLINE_HTTP_PORT": "11112"}, "BRAINLINE_DICOM_PORT and BRAINLINE_HTTP_PORT are both 11112"),
    ({"BRAINLINE_DICOM_PORT": "eleven"}, "BRAINLINE_DICOM_PORT must be a whole number"),
    ({"BRAINLINE_TLS_CERT": "c.pem", "BRAINLINE_TLS_KEY": "k.pem", "BRAINLINE_DICOM_TLS_PORT": "8080"},
     "BRAINLINE_DICOM_TLS_PORT and BRAINLINE_HTTP_PORT are both 8080"),
    ({"BRAINLINE_WORKER_HTTP_PORT": "0"}, "BRAINLINE_WORKER_HTTP_PORT must be 1 to 65535"),
    ({"BRAINLINE_STABLE_SECONDS": "0"}, "BRAINLINE_STABLE_SECONDS must be more than 0; got 0"),
    ({"BRAINLINE_WORKERS": "0"}, "BRAINLINE_WORKERS must be 1 or more; got 0"),
    ({"BRAINLINE_MIN_FREE_MB": "-1"}, "BRAINLINE_MIN_FREE_MB must be 0 or more"),
    ({"BRAINLINE_OUTBOX_RETRY_MAX_SECONDS": "1"}, "at least BRAINLINE_OUTBOX_RETRY_BASE_SECONDS (5)"),
    ({"BRAINLINE_UID_ROOT": "1.2.03"}, "BRAINLINE_UID_ROOT='1.2.03' cannot be used as a UID root"),
    ({"BRAINLINE_LOG_LEVEL": "verbose"}, "BRAINLINE_LOG_LEVEL must be one of"),
    ({"BRAINLINE_EXECUTOR": "threads"}, "BRAINLINE_EXECUTOR must be one of local, celery"),
    ({"BRAINLINE_WORKER_QUEUES": "gateway"}, "BRAINLINE_WORKER_QUEUES must be a comma list of compute, gpu"),
    ({"BRAINLINE_DEV_MODE": "maybe"}, "BRAINLINE_DEV_MODE must be true or false"),
])
def test_unusable_values_are_refused_in_words(tmp_path, env, words):
    with pytest.raises(SettingsError) as err:
        _load(tmp_path, **env)
    assert words in str(err.value)


def test_usable_values_are_normalised(tmp_path):
    s = _load(tmp_path, BRAINLINE_DEVICE=" CUDA ", BRAINLINE_REFERENCE_ROLE="FLAIR", BRAINLINE_LOG_LEVEL="debug",
              BRAINLINE_REGISTRATION_TRANSFORM="Rigid+Affine", BRAINLINE_SKULL_STRIP_BACKEND="hd_bet")
    assert (s.device, s.reference_role, s.log_level, s.registration_transform) == \
        ("cuda", "flair", "DEBUG", "rigid+affine")
    assert _load(tmp_path, BRAINLINE_DEVICE="cuda:1", BRAINLINE_MODEL="baseline").device == "cuda:1"
    assert _load(tmp_path, BRAINLINE_UID_ROOT="1.2.826.0.1.3680043.10.999").uid_root == "1.2.826.0.1.3680043.10.999"
    # the same port on two different, non-wildcard addresses is fine
    assert _load(tmp_path, BRAINLINE_HTTP_PORT="11112", BRAINLINE_DICOM_BIND="127.0.0.1",
                 BRAINLINE_HTTP_BIND="127.0.0.2").http_port == 11112


@pytest.mark.parametrize("info", [s for s in SETTINGS if s.minimum is not None or s.above is not None
                                  or s.maximum is not None], ids=lambda s: s.name)
def test_every_numeric_range_is_enforced(tmp_path, info):
    low = info.minimum if info.minimum is not None else info.above
    if low is not None:
        below = low - 1 if info.minimum is not None else low
        with pytest.raises(SettingsError, match=info.env):
            _load(tmp_path, **{info.env: str(int(below) if isinstance(info.default, int) else below)})
    if info.maximum is not None:
        with pytest.raises(SettingsError, match=info.env):
            _load(tmp_path, **{info.env: str(int(info.maximum) + 1)})


@pytest.mark.parametrize("info", [s for s in SETTINGS if s.choices], ids=lambda s: s.name)
def test_every_choice_is_accepted_and_nothing_else(tmp_path, info):
    extra = {"BRAINLINE_BROKER_URL": "redis://127.0.0.1:6379/0"}  # executor celery needs a broker
    for value in info.allowed_values():
        assert getattr(_load(tmp_path, **extra, **{info.env: value}), info.name) == value
    with pytest.raises(SettingsError, match=f"{info.env} must be one of"):
        _load(tmp_path, **{info.env: "no-such-value"})


def test_secret_values_are_not_shown(tmp_path):
    from brainline.service import settings as module

    err = module._invalid(BY_NAME["database_url"], "postgresql://u:hunter2@h/db", "a URL")
    assert "hunter2" not in str(err) and "BRAINLINE_DATABASE_URL" in str(err) and "not shown" in str(err)


# ----------------------------------------------------------------- start-up

def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BRAINLINE_")}
    return subprocess.run(CLI + args, env={**base, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command, env, words", [
    (["serve"], {"BRAINLINE_FOO": "1"}, "BRAINLINE_FOO is not a BrainLine setting"),
    (["serve"], {"BRAINLINE_DICOM_PORT": "0"}, "BRAINLINE_DICOM_PORT must be 1 to 65535"),
    (["worker"], {"BRAINLINE_DEVICE": "gpu"}, "BRAINLINE_DEVICE must be cpu, cuda or cuda:N"),
    (["worker"], {"BRAINLINE_WORKER_CONCURENCY": "2"}, "did you mean BRAINLINE_WORKER_CONCURRENCY?"),
])
def test_serve_and_worker_refuse_to_start(tmp_path, command, env, words):
    run = _run(command, BRAINLINE_HOME=str(tmp_path / "home"), **env)
    assert run.returncode == 2, run.stderr
    assert words in run.stderr and "Traceback" not in run.stderr + run.stdout
    assert not (tmp_path / "home").exists()  # refused before anything was created
