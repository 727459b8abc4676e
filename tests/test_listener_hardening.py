"""Issue 8 parts 2, 3 and 8: nobody can block the listener, memory and disk
stay bounded, only brain-MR storage classes, AE@host peers and DICOM TLS.

Every test talks to a real `brainline serve` over loopback: hostile peers are
raw sockets bound to other loopback addresses (127.0.0.2 ...), so that the
per-peer limits apply to them and not to the legitimate sender on 127.0.0.1.
Jobs are kept out of the way (long quiet period) unless a test needs them.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    EncapsulatedPDFStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

# Liveness bounds in seconds (a legitimate peer served within 5 s while hostile ones
# hold connections): run alone, after the parallel phase (README "Tests and benchmarks").
pytestmark = [pytest.mark.integration, pytest.mark.serial]

QUIET = {"BRAINLINE_STABLE_SECONDS": "3600"}  # no job during these tests


# -- helpers shared with test_spool_conflicts.py and bench/hostile.py ----------

def mr_instance(study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
                size: int = 16, seed: int = 0, extra_bytes: int = 0, sop_class=MRImageStorage) -> Dataset:
    """A small, valid MR Image Storage instance (random pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "HOSTILE^TEST"
    ds.PatientID = "HOSTILE-1"
    ds.Modality = "MR"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4000, (size, size), dtype=np.uint16).tobytes()
    if extra_bytes:
        ds.add_new(0x00291010, "OB", b"\x00" * extra_bytes)  # private payload (compresses ~1000:1)
    return ds


def send(port: int, datasets, calling: str = "SCANNER", called: str = "BRAINLINE",
         transfer_syntax=ExplicitVRLittleEndian, bind: str = "127.0.0.1", tls_args=None,
         contexts=None, timeout: float = 30) -> list[int | None]:
    """C-STORE datasets with pynetdicom; return each status (None = no answer)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for uid in contexts or sorted({str(d.SOPClassUID) for d in datasets}):
        ae.add_requested_context(uid, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(bind, 0), tls_args=tls_args)
    if not assoc.is_established:
        return [None] * len(datasets)
    out = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            out.append(int(status.Status) if status and "Status" in status else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def echo(port: int, calling: str = "SCANNER", called: str = "BRAINLINE", bind: str = "127.0.0.1",
         tls_args=None, timeout: float = 10) -> bool:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(bind, 0), tls_args=tls_args)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def echoscu(port: int, calling: str = "SCANNER", extra=()) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-to", "10", "-aet", calling, "-aec", "BRAINLINE", *extra,
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)


def hostile_socket(port: int, source: str, kind: str) -> socket.socket:
    """Open a connection from ``source`` (a loopback address) and leave it:
    ``huge`` sends a PDU header announcing 0xFFFFFFFF bytes, ``idle`` sends
    nothing, ``trickle`` announces a 1000-byte association request and sends
    one byte of it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    if kind == "huge":
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
    elif kind == "trickle":
        sock.sendall(struct.pack(">BBL", 0x01, 0, 1000) + b"\x00")
    return sock


def connect_close_loop(port: int, source: str, stop: threading.Event) -> int:
    n = 0
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0)):
                n += 1
        except OSError:
            time.sleep(0.01)
    return n


def closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing (b"" for a plain close), or None
    when the connection is still open after ``within`` seconds."""
    sock.settimeout(within)
    data = b""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except socket.timeout:
        return None
    except OSError:
        return data
    return None


def spool_files(svc) -> list[Path]:
    return sorted((svc.home / "spool").rglob("*.dcm"))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- part 2: nobody can block the listener -------------------------------------

def test_fifty_hostile_connections_do_not_block_a_legitimate_peer(service_factory):
    svc = service_factory(**QUIET)
    socks = []
    stop = threading.Event()
    loops = []
    try:
        for i in range(50):
            kind = ("huge", "idle", "trickle", "loop")[i % 4]
            source = f"127.0.0.{2 + i // 2}"  # two connections per hostile peer
            if kind == "loop":
                t = threading.Thread(target=connect_close_loop, args=(svc.dicom_port, source, stop), daemon=True)
                t.start()
                loops.append(t)
            else:
                socks.append((kind, hostile_socket(svc.dicom_port, source, kind)))
        time.sleep(1.0)
        start = time.monotonic()
        result = echoscu(svc.dicom_port)
        echo_s = time.monotonic() - start
        assert result.returncode == 0, result.stdout + result.stderr
        assert echo_s < 5, echo_s
        start = time.monotonic()
        assert send(svc.dicom_port, [mr_instance()]) == [0]
        assert time.monotonic() - start < 5
        # Every announced 4 GiB PDU was answered with an A-ABORT and a close.
        for kind, sock in socks:
            if kind == "huge":
                answer = closed_by_server(sock, within=2)
                assert answer is not None and answer[:1] in (b"\x07", b""), answer
        assert svc.metric("brainline_rejections_total", 'reason="pdu_too_large"') >= 12
        assert svc.metric("brainline_rejections_total", 'reason="calling_ae_not_allowed"') == 0
    finally:
        stop.set()
        for t in loops:
            t.join(5)
        for _, sock in socks:
            sock.close()
    assert svc.alive()
    assert len(spool_files(svc)) == 1


def test_idle_and_trickling_connections_time_out(service_factory):
    svc = service_factory(BRAINLINE_ACSE_TIMEOUT="1.5", **QUIET)
    idle = hostile_socket(svc.dicom_port, "127.0.0.2", "idle")
    trickle = hostile_socket(svc.dicom_port, "127.0.0.3", "trickle")
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            try:
                trickle.send(b"\x00")
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=drip, daemon=True).start()
    start = time.monotonic()
    assert closed_by_server(idle, within=6) is not None
    assert closed_by_server(trickle, within=6) is not None
    stop.set()
    assert time.monotonic() - start < 6
    assert svc.metric("brainline_rejections_total", 'reason="timeout"') >= 2
    assert echo(svc.dicom_port)


def test_per_peer_connection_limit(service_factory):
    svc = service_factory(BRAINLINE_MAX_ASSOCIATIONS_PER_PEER="3", **QUIET)
    held = [hostile_socket(svc.dicom_port, "127.0.0.9", "idle") for _ in range(3)]
    extra = hostile_socket(svc.dicom_port, "127.0.0.9", "idle")
    assert closed_by_server(extra, within=3) == b""  # closed at once, nothing read
    assert not echo(svc.dicom_port, bind="127.0.0.9")
    assert echo(svc.dicom_port, bind="127.0.0.10")  # another peer is not affected
    assert svc.metric("brainline_rejections_total", 'reason="too_many_associations_from_peer"') >= 2
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 15
    while not echo(svc.dicom_port, bind="127.0.0.9"):
        assert time.monotonic() < deadline, "peer slot never released"
        time.sleep(0.5)


def test_established_association_limit_ignores_pending_connections(service_factory):
    svc = service_factory(BRAINLINE_MAX_ASSOCIATIONS="2", **QUIET)
    pending = [hostile_socket(svc.dicom_port, f"127.0.1.{i}", "idle") for i in range(1, 21)]
    holders = []
    for i in (1, 2):
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", svc.dicom_port, ae_title="BRAINLINE", bind_address=(f"127.0.2.{i}", 0))
        assert assoc.is_established
        holders.append(assoc)
    assert not echo(svc.dicom_port, bind="127.0.2.3")
    assert svc.metric("brainline_rejections_total", 'reason="too_many_associations"') == 1
    holders.pop().release()
    time.sleep(0.5)
    assert echo(svc.dicom_port, bind="127.0.2.3")
    for assoc in holders:
        assoc.release()
    for sock in pending:
        sock.close()


def test_pdata_pdu_larger_than_max_is_aborted(service_factory):
    svc = service_factory(BRAINLINE_MAX_PDU_SIZE="16384", **QUIET)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", svc.dicom_port, ae_title="BRAINLINE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384  # announced to the sender
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 16384 + 4096) + b"\x00" * 1000)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert svc.metric("brainline_rejections_total", 'reason="pdu_too_large"') == 1
    # A sender that respects the announced size is served, with large instances.
    assert send(svc.dicom_port, [mr_instance(size=256)]) == [0]


# -- AE@host peers and rejection reasons ---------------------------------------

def test_rejection_reasons_and_ae_at_host(service_factory):
    svc = service_factory(BRAINLINE_ALLOWED_AES="SCANNER@127.0.0.1, PACS@localhost, LEGACY", **QUIET)
    assert echo(svc.dicom_port, "SCANNER")
    assert echo(svc.dicom_port, "PACS")
    assert echo(svc.dicom_port, "LEGACY", bind="127.0.0.7")
    assert not echo(svc.dicom_port, "SCANNER", bind="127.0.0.7")      # spoofed AE from another host
    assert not echo(svc.dicom_port, "INTRUDER")
    assert not echo(svc.dicom_port, "SCANNER", called="SOMEONE")
    metric = lambda r: svc.metric("brainline_rejections_total", f'reason="{r}"')  # noqa: E731
    assert (metric("peer_not_allowed"), metric("calling_ae_not_allowed"),
            metric("called_ae_not_recognised")) == (1, 1, 1)
    assert "not an identity" in svc.output()
    assert spool_files(svc) == []


def test_only_listed_hosts_may_connect(service_factory):
    svc = service_factory(BRAINLINE_ALLOWED_AES="SCANNER@127.0.0.1", **QUIET)
    stranger = hostile_socket(svc.dicom_port, "127.0.0.4", "idle")
    assert closed_by_server(stranger, within=3) == b""
    assert svc.metric("brainline_rejections_total", 'reason="peer_not_allowed"') == 1
    assert echoscu(svc.dicom_port).returncode == 0
    assert "not an identity" not in svc.output()


# -- accepted storage classes ----------------------------------------------------

def test_only_brain_mr_storage_classes_are_accepted(service_factory, tmp_path):
    svc = service_factory(**QUIET)
    ae = AE(ae_title="SCANNER")
    for uid in (MRImageStorage, EnhancedMRImageStorage, EncapsulatedPDFStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", svc.dicom_port, ae_title="BRAINLINE")
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {MRImageStorage, EnhancedMRImageStorage}
    # storescu refuses to send a PDF for lack of a presentation context.
    pdf = Dataset()
    pdf.file_meta = FileMetaDataset()
    pdf.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    pdf.SOPInstanceUID = pdf.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pdf.StudyInstanceUID, pdf.SeriesInstanceUID = generate_uid(), generate_uid()
    pdf.Modality = "DOC"
    pdf.EncapsulatedDocument = b"%PDF-1.4 DOE^JANE"
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.save_as(tmp_path / "doc.dcm", enforce_file_format=True)
    result = subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "BRAINLINE", "127.0.0.1",
                             str(svc.dicom_port), str(tmp_path / "doc.dcm")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "presentation context" in (result.stdout + result.stderr).lower()
    assert spool_files(svc) == []


def test_accepted_sop_classes_setting(service_factory):
    svc = service_factory(BRAINLINE_ACCEPTED_SOP_CLASSES="MRImageStorage", **QUIET)
    assert send(svc.dicom_port, [mr_instance()]) == [0]
    assert send(svc.dicom_port, [mr_instance(sop_class=EnhancedMRImageStorage)]) == [None]


# -- part 3: bounded memory --------------------------------------------------------

def test_oversize_instance_and_deflate_bomb_refused(service_factory):
    svc = service_factory(BRAINLINE_MAX_INSTANCE_MB="2", **QUIET)
    rss_before = peak_rss_mb(svc.proc.pid)
    # 3 MiB instance: refused 0xA700, nothing kept.
    assert send(svc.dicom_port, [mr_instance(extra_bytes=3 * 2**20)]) == [0xA700]
    # Deflate bombs: 300 MiB of zeros deflate to ~300 KiB each.
    bomb = mr_instance(extra_bytes=300 * 2**20)
    assert send(svc.dicom_port, [bomb, bomb], transfer_syntax=DeflatedExplicitVRLittleEndian,
                timeout=120) == [0xA700, 0xA700]
    assert svc.metric("brainline_rejections_total", 'reason="too_large"') == 3
    # A legitimate deflated instance is filed, inflated (Explicit VR Little Endian).
    small = mr_instance(size=64, seed=3)
    assert send(svc.dicom_port, [small], transfer_syntax=DeflatedExplicitVRLittleEndian) == [0]
    [stored] = spool_files(svc)
    ds = pydicom.dcmread(stored)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelData == small.PixelData and ds.SOPInstanceUID == small.SOPInstanceUID
    assert peak_rss_mb(svc.proc.pid) - rss_before < 150
    assert list((svc.home / "spool.incoming").iterdir()) == []


def test_malformed_dataset_refused_cannot_understand(service_factory, tmp_path):
    svc = service_factory(**QUIET)
    good = mr_instance()
    path = tmp_path / "bad.dcm"
    good.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    # keep the file meta, replace the data set by a truncated element
    meta_end = raw.index(b"\x08\x00")  # first group-0008 tag after the meta
    path.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\x7fgarbage")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", svc.dicom_port, ae_title="BRAINLINE")
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status.Status == 0xC000
    assert svc.metric("brainline_rejections_total", 'reason="malformed"') == 1
    assert spool_files(svc) == []


# -- part 8: DICOM TLS ------------------------------------------------------------

def _certificates(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and two client
    certificates: one signed by the CA, one self-signed."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_key=None, issuer_name=None, ca=False, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer_name or subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        elif not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    def write(stem, key, cert):
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key, ca_cert = make("BrainLine Test CA", ca=True)
    write("ca", ca_key, ca_cert)
    write("server", *make("127.0.0.1", ca_key, ca_cert.subject, server=True))
    write("client", *make("SCANNER", ca_key, ca_cert.subject))
    write("rogue", *make("SCANNER"))
    return {p.stem + p.suffix: p for p in folder.iterdir()}


def _client_context(folder: Path, client: str | None):
    import ssl

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(folder / "ca.pem"))
    if client:
        context.load_cert_chain(str(folder / f"{client}.pem"), str(folder / f"{client}.key"))
    return context


class _TlsService:
    """`brainline serve` with a certificate: the REST API may then be served
    over HTTPS (issue 8), so readiness is polled over either scheme."""

    def __init__(self, home: Path, ca: Path, **env):
        from tests.peers import ServiceProcess

        self.svc = ServiceProcess(home, **env)
        self.ca = ca

    def __enter__(self):
        import ssl

        import httpx

        svc = self.svc
        verify = ssl.create_default_context(cafile=str(self.ca))
        svc.home.mkdir(parents=True, exist_ok=True)
        svc.proc = subprocess.Popen(svc.cli + ["serve"], env=svc.env, stdout=open(svc.stdout_path, "ab"),
                                    stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert svc.proc.poll() is None, svc.output()[-3000:]
            for scheme in ("https", "http"):
                try:
                    r = httpx.get(f"{scheme}://127.0.0.1:{svc.http_port}/healthz", timeout=2, verify=verify)
                    if r.status_code == 200:
                        time.sleep(0.5)
                        return svc
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise AssertionError(svc.output()[-3000:])

    def __exit__(self, *exc):
        self.svc.stop()


def test_dicom_tls_with_client_certificates(tmp_path):
    from tests.peers import free_port

    certs = tmp_path / "certs"
    certs.mkdir()
    _certificates(certs)
    tls_port = free_port()
    with _TlsService(tmp_path / "home", certs / "ca.pem",
                     BRAINLINE_TLS_CERT=str(certs / "server.pem"), BRAINLINE_TLS_KEY=str(certs / "server.key"),
                     BRAINLINE_TLS_CLIENT_CA=str(certs / "ca.pem"), BRAINLINE_DICOM_TLS_PORT=str(tls_port),
                     BRAINLINE_ACSE_TIMEOUT="3", **QUIET) as svc:
        _tls_checks(svc, certs, tls_port)


def _tls_checks(svc, certs: Path, tls_port: int) -> None:
    # Silent TCP clients on the TLS port do not hold up the handshake of others.
    silent = [hostile_socket(tls_port, f"127.0.3.{i}", "idle") for i in range(1, 11)]
    start = time.monotonic()
    assert echo(tls_port, tls_args=(_client_context(certs, "client"), "127.0.0.1"))
    assert time.monotonic() - start < 5
    assert send(tls_port, [mr_instance()], tls_args=(_client_context(certs, "client"), "127.0.0.1")) == [0]
    assert not echo(tls_port, tls_args=(_client_context(certs, "rogue"), "127.0.0.1"))
    assert not echo(tls_port, tls_args=(_client_context(certs, None), "127.0.0.1"))
    assert (svc.home / "logs").exists()
    # dcmtk as the scanner, over TLS with its client certificate.
    result = echoscu(tls_port, extra=("+tls", str(certs / "client.key"), str(certs / "client.pem"),
                                      "+cf", str(certs / "ca.pem")))
    assert result.returncode == 0, result.stdout + result.stderr
    # The plain port still works.
    assert echo(svc.dicom_port)
    for sock in silent:
        sock.close()
    assert len(spool_files(svc)) == 1
    assert '"tls_handshake_failed"' in svc.output()


def test_connect_and_close_releases_the_peer_slot_at_once(service_factory):
    svc = service_factory(BRAINLINE_MAX_ASSOCIATIONS_PER_PEER="2", **QUIET)
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", svc.dicom_port), timeout=2, source_address=("127.0.0.11", 0)):
            pass
        time.sleep(0.05)
    start = time.monotonic()
    assert echo(svc.dicom_port, bind="127.0.0.11")
    assert time.monotonic() - start < 2
    assert svc.metric("brainline_rejections_total", 'reason="too_many_associations_from_peer"') == 0
    assert svc.metric("brainline_rejections_total", 'reason="timeout"') == 0


def _wait_process_state(pid: int, stopped: bool, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if (state in ("T", "t")) == stopped:
            return
        time.sleep(0.005)
    raise AssertionError(f"service process not {'stopped' if stopped else 'running'} in {within} s")


def test_closed_connections_free_their_peer_slots_even_when_the_service_stalls(service_factory):
    """The whole service process can stall for a while (a full garbage
    collection of its ~250,000 objects takes 0.1-0.15 s on this machine)
    while a peer connects and closes: the connections queue in the kernel and
    are accepted one after the other when it resumes, before the threads of
    the earlier ones have noticed that their peer is gone. Those must not
    count against the peer. SIGSTOP/SIGCONT stands in for the stall (the
    kernel still completes and closes the connections meanwhile): with the
    slot released only by the connection's thread, the second closed
    connection after the resume was refused every time."""
    svc = service_factory(BRAINLINE_MAX_ASSOCIATIONS_PER_PEER="2", **QUIET)
    peer = "127.0.0.12"
    pid = svc.proc.pid
    held = []
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_process_state(pid, stopped=True)
        held.append(hostile_socket(svc.dicom_port, peer, "idle"))  # stays open: it counts
        for _ in range(3):  # within the listen backlog (5)
            with socket.create_connection(("127.0.0.1", svc.dicom_port), timeout=2, source_address=(peer, 0)):
                pass
    finally:
        os.kill(pid, signal.SIGCONT)
    _wait_process_state(pid, stopped=False)
    try:
        assert echo(svc.dicom_port, bind=peer)  # the open one + this one = the limit
        assert svc.metric("brainline_rejections_total", 'reason="too_many_associations_from_peer"') == 0
        # The limit itself is unchanged: two open connections, the third is refused.
        held.append(hostile_socket(svc.dicom_port, peer, "idle"))
        assert closed_by_server(held[-1], within=0.5) is None  # admitted, still open
        extra = hostile_socket(svc.dicom_port, peer, "idle")
        assert closed_by_server(extra, within=3) == b""  # closed at once, nothing read
        assert svc.metric("brainline_rejections_total", 'reason="too_many_associations_from_peer"') == 1
        extra.close()
    finally:
        for sock in held:
            sock.close()
    assert svc.alive()


def test_connection_gone_asks_the_kernel():
    """``_connection_gone`` (what admission asks about a peer's counted
    connections) on real loopback TCP connections: open ones count, one the
    peer closed counts until what it sent is read, closed and reset ones do not."""
    from brainline.service.gateway.listener import _connection_gone

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def pair():
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        accepted, _ = server.accept()
        return client, accepted

    def settle(check, expected, within=2.0):
        deadline = time.monotonic() + within
        while check() != expected and time.monotonic() < deadline:
            time.sleep(0.001)
        return check()

    try:
        client, accepted = pair()
        assert not _connection_gone(accepted)  # open and quiet
        client.sendall(b"\x01\x00")
        time.sleep(0.05)
        assert not _connection_gone(accepted)  # open, data unread
        client.close()  # FIN behind unread bytes: still counts until they are read
        time.sleep(0.05)
        assert not _connection_gone(accepted)
        assert accepted.recv(16) == b"\x01\x00"
        assert settle(lambda: _connection_gone(accepted), True)  # read to the end: gone
        accepted.close()
        assert _connection_gone(accepted)  # closed on our side

        client, accepted = pair()
        client.shutdown(socket.SHUT_WR)  # half-closed: the peer cannot send any more
        assert settle(lambda: _connection_gone(accepted), True)
        client.close()
        accepted.close()

        client, accepted = pair()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        assert settle(lambda: _connection_gone(accepted), True)
        accepted.close()
    finally:
        server.close()
