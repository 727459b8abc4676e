"""REST API edge cases (issue 8, parts 7 and 8): numbers out of range, UIDs
with a trailing newline, errors in words, and HTTPS with a configured
certificate. Everything runs against a real `brainline serve`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import sqlite3
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from brainline.service.api.app import in_words
from brainline.service.gateway.spool import is_valid_uid
from tests.peers import free_port

pytestmark = pytest.mark.integration

HUGE = "99999999999999999999"
CLI = [sys.executable, "-m", "brainline.service.cli"]


def _words(resp: httpx.Response) -> str:
    """The answer's detail: one sentence, no traceback, no install path."""
    body = resp.json()
    assert isinstance(body["detail"], str), body
    text = json.dumps(body)
    for leak in ("Traceback", "site-packages", "File \\\"", sys.prefix, "OverflowError"):
        assert leak not in text, text
    return body["detail"]


def test_is_valid_uid_is_a_full_match():
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.4")
    assert is_valid_uid("1" * 64) and not is_valid_uid("1" * 65)
    for bad in ("1.2.3\n", "1.2.3\r\n", "\n1.2.3", " 1.2.3", "1.2.3 ", "1..2", "1.2.", ".1.2",
                "1.2.a", "", None, "1.2.3\x00", "１.２"):
        assert not is_valid_uid(bad), repr(bad)


def test_in_words_strips_tracebacks_and_install_paths():
    trace = ("registration failed: Traceback (most recent call last):\n"
             f'  File "{sys.prefix}/lib/python3.11/site-packages/SimpleITK/x.py", line 9, in run\n'
             "    raise RuntimeError(msg)\n"
             "RuntimeError: the images do not overlap")
    assert in_words(trace) == "registration failed: RuntimeError: the images do not overlap"
    assert in_words("conversion failed: dcm2niix found no images") == \
        "conversion failed: dcm2niix found no images"
    assert in_words(None) is None


def test_numbers_out_of_range_are_refused_in_words(service_factory):
    svc = service_factory(BRAINLINE_API_TOKEN="edge-token")
    for params, name in (({"offset": 10**26}, "offset"), ({"offset": -1}, "offset"),
                         ({"limit": 10**26}, "limit"), ({"limit": -5}, "limit"),
                         ({"limit": 0}, "limit"), ({"limit": "many"}, "limit"),
                         ({"state": "exploded"}, "state")):
        resp = svc.api("GET", "/api/v1/jobs", params=params)
        assert resp.status_code == 422, (params, resp.text)
        assert name in _words(resp) and "invalid request" in _words(resp)
    assert svc.api("GET", "/api/v1/jobs", params={"offset": 2**63 - 1, "limit": 1000}).json() == {"jobs": []}
    for path in (f"/api/v1/jobs/{HUGE}", "/api/v1/jobs/-1", "/api/v1/jobs/0",
                 f"/api/v1/jobs/{2**63}"):
        resp = svc.api("GET", path)
        assert resp.status_code == 404, (path, resp.text)
        assert "does not exist" in _words(resp)
    resp = svc.api("POST", f"/api/v1/jobs/{HUGE}/retry")
    assert resp.status_code == 404 and "does not exist" in _words(resp)
    resp = svc.api("GET", "/api/v1/jobs/abc")
    assert resp.status_code == 422 and "job_id" in _words(resp)
    resp = svc.api("POST", "/api/v1/outbox/retry", params={"item_id": HUGE})
    assert resp.status_code == 404 and "does not exist" in _words(resp)
    resp = svc.api("GET", "/api/v1/outbox", params={"state": "lost"})
    assert resp.status_code == 422 and "state" in _words(resp)
    # a UID with a trailing newline (%0A) is not a UID
    resp = svc.api("POST", "/api/v1/studies/1.2.3.4%0A/pull")
    assert resp.status_code == 400 and "not a valid Study Instance UID" in _words(resp)
    assert svc.alive() and httpx.get(svc.url + "/readyz").status_code == 200
    assert "Traceback" not in svc.output()
    # the command line shows the sentence, not a list of dicts
    env = {**svc.env}
    shown = subprocess.run(CLI + ["job", HUGE], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1 and f"404: job {HUGE} does not exist" in shown.stderr


def test_unexpected_errors_are_answered_with_an_error_id(service_factory):
    svc = service_factory()
    db = svc.home / "brainline.db"
    # a job whose stored error carries a Python traceback with install paths
    trace = ("stage register failed: Traceback (most recent call last):\n"
             f'  File "{sys.prefix}/lib/python3.11/site-packages/itk/support.py", line 3, in f\n'
             "    raise ValueError('x')\nValueError: spacing is zero")
    now = dt.datetime.utcnow().isoformat(sep=" ")
    with sqlite3.connect(db) as con:
        job_id = con.execute(
            "INSERT INTO jobs (study_key, source, pipeline, instance_count, state, error, attempts, "
            "created_at, updated_at) VALUES ('k', 'dicom', 'neuro_onco', 0, 'failed', ?, 1, ?, ?)",
            (trace, now, now)).lastrowid
    job = svc.api("GET", f"/api/v1/jobs/{job_id}").json()
    assert job["error"] == "stage register failed: ValueError: spacing is zero"
    listed = svc.api("GET", "/api/v1/jobs").json()["jobs"]
    assert [j["error"] for j in listed] == [job["error"]]

    # a real failure inside a route: the jobs table disappears under the service
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE jobs RENAME TO jobs_gone")
    resp = svc.api("GET", "/api/v1/jobs")
    assert resp.status_code == 500
    detail = _words(resp)
    error_id = resp.json()["error_id"]
    assert error_id in detail and "internal error" in detail
    assert "jobs" not in detail and "sqlite" not in detail.lower()
    # the log has the details under the same error id, with the stack frames
    deadline = time.monotonic() + 10
    record = None
    while record is None and time.monotonic() < deadline:
        for line in (svc.home / "logs" / "brainline.log").read_text().splitlines():
            entry = json.loads(line)
            if entry.get("error_id") == error_id:
                record = entry
        time.sleep(0.2)
    assert record is not None and record["level"] == "error"
    assert record["exc_type"] == "OperationalError" and "list_jobs" in record["traceback"]
    assert svc.alive() and httpx.get(svc.url + "/healthz").status_code == 200
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE jobs_gone RENAME TO jobs")


# -- HTTPS ---------------------------------------------------------------------

def _self_signed(tmp_path):
    """A throw-away self-signed certificate for 127.0.0.1/localhost (key 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "brainline-test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "api-cert.pem", tmp_path / "api-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_api_is_served_over_https_with_a_certificate(service_factory, tmp_path):
    cert, key = _self_signed(tmp_path)
    svc = service_factory(start=False, BRAINLINE_TLS_CERT=cert, BRAINLINE_TLS_KEY=key,
                          BRAINLINE_DICOM_TLS_PORT=free_port(), BRAINLINE_API_TOKEN="tls-token")
    svc.home.mkdir(parents=True, exist_ok=True)
    svc.proc = subprocess.Popen(svc.cli + ["serve"], env=svc.env, stdout=open(svc.stdout_path, "ab"),
                                stderr=subprocess.STDOUT)
    https = f"https://127.0.0.1:{svc.http_port}"
    trust = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 60
    while True:
        assert svc.proc.poll() is None, svc.output()[-3000:]
        try:
            if httpx.get(https + "/readyz", verify=trust, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, svc.output()[-3000:]
        time.sleep(0.2)
    headers = {"Authorization": "Bearer tls-token"}
    assert httpx.get(https + "/api/v1/jobs", verify=trust, headers=headers).json() == {"jobs": []}
    assert httpx.get(https + "/api/v1/jobs", verify=trust).status_code == 401
    # the certificate is really checked by clients, and plain HTTP is not served
    with pytest.raises(httpx.HTTPError):
        httpx.get(https + "/healthz", timeout=5)  # system CAs do not know it
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{svc.http_port}/healthz", timeout=5)
    # the command line talks HTTPS to the local service, trusting BRAINLINE_TLS_CERT
    listing = subprocess.run(CLI + ["jobs"], env=svc.env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr


def test_unusable_certificate_is_refused_in_words(service_factory, tmp_path):
    cert, key = _self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _other_key = _self_signed(tmp_path / "other")
    svc = service_factory(start=False)
    for env, words in (({"BRAINLINE_TLS_CERT": tmp_path / "missing.pem", "BRAINLINE_TLS_KEY": key},
                        "does not exist"),
                       ({"BRAINLINE_TLS_CERT": other_cert, "BRAINLINE_TLS_KEY": key},
                        "not a PEM certificate with its private key"),
                       ({"BRAINLINE_TLS_CERT": cert}, "must be set together")):
        run = subprocess.run(CLI + ["serve"], env={**svc.env, **{k: str(v) for k, v in env.items()}},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and words in run.stderr, run.stderr
        assert "BRAINLINE_TLS" in run.stderr and "Traceback" not in run.stderr + run.stdout
