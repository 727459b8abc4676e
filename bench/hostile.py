"""Hostile-input benchmark of the DICOM listener (issue 8).

Starts a real ``brainline serve`` (tests.peers.ServiceProcess, loopback only,
its own BRAINLINE_HOME and TMPDIR) and throws at least 500 hostile inputs at
its DICOM port: PDU headers announcing 4 GiB, garbage and truncated PDUs,
idle and half-open connections, connect-and-close loops, wrong and spoofed
AE titles, unaccepted SOP classes, oversize instances, deflate bombs,
malformed data sets, oversize P-DATA PDUs and re-sent SOP Instance UIDs with
different content. Hostile peers use loopback addresses other than
127.0.0.1 (each counts as its own host); the legitimate sender is 127.0.0.1.

Then it reports, against the issue's targets:

* crashes: the service process still runs and answers C-ECHO;
* files outside the spool: files the service created under BRAINLINE_HOME
  outside ``spool/``, ``spool.incoming/``, ``logs/`` and its database and
  key files, plus any file left in its TMPDIR or in ``spool.incoming/``;
* peak RSS of the service (VmHWM from /proc);
* latency of a legitimate association (dcmtk echoscu and a pynetdicom C-STORE)
  while 50 hostile connections are open.

Usage::

    python bench/hostile.py [--max-instance-mb 20] [--bombs 20] [--workers 8]

Exit status 0 when every target is met.
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, _config  # noqa: E402
from pynetdicom.dsutils import split_dataset  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    BasicTextSRStorage,
    EncapsulatedPDFStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from tests.peers import ServiceProcess  # noqa: E402
from tests.test_listener_hardening import (  # noqa: E402
    closed_by_server,
    echo,
    echoscu,
    hostile_socket,
    mr_instance,
    peak_rss_mb,
    send,
)

ALLOWED_AES = "SCANNER@127.0.0.1,BENCH"
_config.LOG_HANDLER_LEVEL = "none"


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.unexpected: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, kind: str, ok: bool = True) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if not ok:
                self.unexpected[kind] = self.unexpected.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_SOURCES = itertools.count()


def _source(_i: int = 0) -> str:
    """A fresh loopback source address for every hostile client, so that the
    per-peer limit does not mask the answer being tested."""
    n = next(_SOURCES)
    return f"127.0.{10 + (n // 200) % 200}.{2 + n % 200}"


def _raw(port: int, i: int, payload: bytes, half_close: bool = False) -> bytes | None:
    """Send ``payload`` from a hostile address; return what the server answered
    before closing (None when it kept the connection open for 15 s)."""
    with socket.socket() as sock:
        sock.bind((_source(i), 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        return closed_by_server(sock, within=12)


def _assoc_rq(calling: str = "SCANNER", called: str = "BRAINLINE") -> bytes:
    """A valid A-ASSOCIATE-RQ PDU, encoded by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    cx = build_context(MRImageStorage)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    item = MaximumLengthNotification()
    item.maximum_length_received = 16384
    primitive.user_information = [item]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def run_hostile(port: int, args, tally: Tally, workdir: Path) -> None:
    rng = random.Random(8)
    rq = _assoc_rq()
    jobs = []

    def job(kind, fn, *a):
        jobs.append((kind, fn, a))

    # 1. PDU headers announcing 0xFFFFFFFF bytes, every PDU type: A-ABORT + close.
    for i in range(70):
        pdu_type = 1 + i % 7
        job("huge_pdu_header", lambda i=i, t=pdu_type: _raw(port, i, struct.pack(">BBL", t, 0, 0xFFFFFFFF)) is not None)
    # 2. Garbage, unknown PDU types, truncated and corrupted association requests.
    for i in range(40):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        job("garbage_bytes", lambda i=i, b=blob: _raw(port, i, b) is not None)
    for i in range(30):
        cut = rng.randint(7, len(rq) - 1)
        job("truncated_assoc_rq", lambda i=i, c=cut: _raw(port, i, rq[:c], half_close=True) is not None)
    for i in range(30):
        bad = bytearray(rq)
        for _ in range(8):
            bad[rng.randint(6, len(bad) - 1)] = rng.getrandbits(8)
        job("corrupted_assoc_rq", lambda i=i, b=bytes(bad): _raw(port, i, b) is not None)
    # 3. Half-open connections (request started, write side closed).
    for i in range(30):
        job("half_open", lambda i=i: _raw(port, i, rq[:40], half_close=True) is not None)
    # 4. Connect-and-close.
    for i in range(100):
        def connect_close(i=i):
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(_source(i), 0)):
                pass
            return True
        job("connect_close", connect_close)
    # 5. Wrong calling AE, wrong called AE, allowed AE spoofed from another host.
    for i in range(20):
        job("wrong_calling_ae", lambda i=i: not echo(port, "INTRUDER", bind=_source(i)))
        job("wrong_called_ae", lambda i=i: not echo(port, "SCANNER", called="NOTME", bind=_source(i)))
        job("spoofed_ae_wrong_host", lambda i=i: not echo(port, "SCANNER", bind=_source(i)))
    # 6. Unaccepted SOP classes: no presentation context accepted.
    for i, uid in enumerate([EncapsulatedPDFStorage, BasicTextSRStorage, SecondaryCaptureImageStorage] * 7):
        def unaccepted(i=i, uid=uid):
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(uid)
            assoc = ae.associate("127.0.0.1", port, ae_title="BRAINLINE", bind_address=(_source(i), 0))
            ok = not assoc.accepted_contexts
            if assoc.is_established:
                assoc.release()
            return ok
        job("unaccepted_sop_class", unaccepted)
    # 7. Oversize instances and 8. deflate bombs: 0xA700.
    big = mr_instance(extra_bytes=(args.max_instance_mb + 1) * 2**20)
    for i in range(args.oversize):
        job("oversize_instance",
            lambda i=i: send(port, [big], calling="BENCH", bind=_source(i), timeout=120) == [0xA700])
    bomb = workdir / "bomb.dcm"
    write_deflate_bomb(bomb, args.bomb_mb)
    print(f"deflate bomb: {bomb.stat().st_size / 2**10:.0f} KiB inflating to {args.bomb_mb} MiB")
    for i in range(args.bombs):
        job("deflate_bomb", lambda i=i: _send_raw_file(port, bomb, _source(i), DeflatedExplicitVRLittleEndian)
            == 0xA700)
    # 9. Malformed data sets (valid file meta, corrupted data set), sent as raw bytes.
    malformed = []
    for i in range(45):
        ds = mr_instance(seed=i)
        path = workdir / f"bad{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        raw = bytearray(path.read_bytes())
        start = raw.index(b"\x08\x00\x16\x00")  # first data set element
        mode = i % 3
        if mode == 0:      # random bytes over the header elements
            for _ in range(20):
                raw[rng.randint(start, start + 200)] = rng.getrandbits(8)
        elif mode == 1:    # truncated in the middle of an element
            raw = raw[:start + rng.randint(3, 60)]
        else:              # an element announcing a length past the end
            raw[start + 6:start + 8] = b"\xff\xff"
        path.write_bytes(bytes(raw))
        malformed.append(path)
    for i, path in enumerate(malformed):
        job("malformed_dataset", lambda i=i, p=path: _send_raw_file(port, p, _source(i)) in (0xC000, 0xA700, 0xC001))
    # 10. Re-sent SOP Instance UIDs with different content (both kept, success).
    base = [mr_instance(seed=100 + i) for i in range(20)]
    for i, ds in enumerate(base):
        twin = mr_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, seed=500 + i)
        job("duplicate_uid_other_content",
            lambda ds=ds, twin=twin: send(port, [ds, twin], calling="SCANNER") == [0, 0])
    # 11. P-DATA PDU larger than the announced maximum, after association.
    for i in range(15):
        job("oversize_pdata_pdu", lambda i=i: _oversize_pdata(port, _source(i)))
    # 12. Slow association requests (one byte at a time, slower than the ACSE timeout allows).
    for i in range(args.trickle):
        job("trickled_assoc_rq", lambda i=i: _trickle(port, _source(i), rq))

    rng.shuffle(jobs)

    def run(kind, fn, a):
        try:
            ok = bool(fn(*a))
        except Exception:
            ok = False
        tally.add(kind, ok)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda j: run(*j), jobs))


def write_deflate_bomb(path: Path, inflated_mb: int) -> None:
    """A valid MR instance in Deflated Explicit VR Little Endian whose data set
    ends with a private OB element of ``inflated_mb`` MiB of zeros (written
    as a stream: the bomb is never held in memory here either)."""
    ds = mr_instance(seed=77)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    _, offset = split_dataset(path)
    raw = path.read_bytes()
    body = zlib.decompress(raw[offset:], -zlib.MAX_WBITS)
    size = inflated_mb * 2**20
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(16 * 2**20)
    with open(path, "wb") as fh:
        fh.write(raw[:offset])
        fh.write(comp.compress(body))
        fh.write(comp.compress(b"\xe1\x7f\x10\x10OB\x00\x00" + struct.pack("<L", size)))  # (7FE1,1010) OB
        for _ in range(size // len(zeros)):
            fh.write(comp.compress(zeros))
        fh.write(comp.flush())


def _send_raw_file(port: int, path: Path, source: str, transfer_syntax=ExplicitVRLittleEndian) -> int | None:
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(MRImageStorage, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="BRAINLINE", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)  # STORE_SEND_CHUNKED_DATASET: bytes as they are
        return int(status.Status) if status and "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def _oversize_pdata(port: int, source: str) -> bool:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="BRAINLINE", bind_address=(source, 0))
    if not assoc.is_established:
        return False
    limit = assoc.acceptor.maximum_length or 0
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, limit + 10**6))
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    return assoc.is_aborted


def _trickle(port: int, source: str, rq: bytes) -> bool:
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        start = time.monotonic()
        try:
            for byte in rq:
                sock.send(bytes([byte]))
                time.sleep(0.5)
                if time.monotonic() - start > 30:
                    return False
        except OSError:
            return True  # closed by the server
        return False


def legit_latency(port: int, tally: Tally) -> tuple[float, float, bool]:
    """(echoscu seconds, pynetdicom C-STORE seconds, ok) with 50 hostile connections open."""
    socks = []
    try:
        for i in range(50):
            kind = ("huge", "idle", "trickle")[i % 3]
            socks.append(hostile_socket(port, _source(1000 + i), kind))
            tally.add(f"held_{kind}_connection")
        time.sleep(1.0)
        start = time.monotonic()
        result = echoscu(port, "SCANNER")
        echo_s = time.monotonic() - start
        start = time.monotonic()
        stored = send(port, [mr_instance(seed=9999)], calling="SCANNER")
        store_s = time.monotonic() - start
        return echo_s, store_s, result.returncode == 0 and stored == [0]
    finally:
        for sock in socks:
            sock.close()


def files_outside_spool(home: Path, tmpdir: Path) -> list[str]:
    allowed_top = {"spool", "logs", "workspaces", "outbox", "serve.out", "tmp"}
    out = []
    for path in home.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(home)
        top = rel.parts[0]
        if top in allowed_top or top.startswith("brainline.db") or top.endswith(".key"):
            continue
        out.append(str(rel))
    out += [f"TMPDIR/{p.relative_to(tmpdir)}" for p in tmpdir.rglob("*") if p.is_file()]
    incoming = home / "spool.incoming"
    if incoming.is_dir():
        out += [f"spool.incoming/{p.name} (partial reception left behind)" for p in incoming.iterdir()]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-instance-mb", type=int, default=20,
                        help="BRAINLINE_MAX_INSTANCE_MB of the service under test (default 20)")
    parser.add_argument("--oversize", type=int, default=5, help="oversize instances to send")
    parser.add_argument("--bombs", type=int, default=20, help="deflate bombs to send")
    parser.add_argument("--bomb-mb", type=int, default=1024, help="inflated size of each bomb (MiB)")
    parser.add_argument("--trickle", type=int, default=10, help="trickled association requests")
    parser.add_argument("--workers", type=int, default=8, help="concurrent hostile clients")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="brainline-hostile-"))
    tmpdir = home / "tmp"
    tmpdir.mkdir()
    svc = ServiceProcess(home, BRAINLINE_STABLE_SECONDS="3600", BRAINLINE_ALLOWED_AES=ALLOWED_AES,
                         BRAINLINE_MAX_INSTANCE_MB=str(args.max_instance_mb), TMPDIR=str(tmpdir))
    workdir = Path(tempfile.mkdtemp(prefix="hostile-inputs-"))
    tally = Tally()
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        svc.start()
        print(f"brainline serve pid {svc.proc.pid}, DICOM port {svc.dicom_port}; sending hostile inputs ...")
        t0 = time.monotonic()
        run_hostile(svc.dicom_port, args, tally, workdir)
        hostile_s = time.monotonic() - t0
        echo_s, store_s, legit_ok = legit_latency(svc.dicom_port, tally)
        alive = svc.alive()
        answering = alive and echoscu(svc.dicom_port, "SCANNER").returncode == 0
        rss_mb = peak_rss_mb(svc.proc.pid) if alive else float("nan")
        time.sleep(1)
        outside = files_outside_spool(home, tmpdir)
        rejections = {}
        if alive:
            import httpx
            for line in httpx.get(svc.url + "/metrics", timeout=10).text.splitlines():
                if line.startswith("brainline_rejections_total{"):
                    reason = line.split('reason="')[1].split('"')[0]
                    rejections[reason] = float(line.rsplit(" ", 1)[1])
            conflicts = svc.metric("brainline_instances_conflict_total")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        svc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'hostile input':<32}{'sent':>6}{'unexpected answer':>20}")
    for kind in sorted(tally.counts):
        print(f"{kind:<32}{tally.counts[kind]:>6}{tally.unexpected.get(kind, 0):>20}")
    print(f"{'total':<32}{tally.total:>6}{sum(tally.unexpected.values()):>20}   ({hostile_s:.0f} s)")
    print("\nrejections counted by the service: "
          + ", ".join(f"{k}={v:.0f}" for k, v in sorted(rejections.items())))
    if alive:
        print(f"conflicting re-sends recorded: {conflicts:.0f}")
    if outside:
        print("files outside the spool:\n  " + "\n  ".join(outside[:20]))
    rows = [
        ("hostile inputs sent", f"{tally.total}", ">= 500", tally.total >= 500),
        ("crashes (process up, echo answered)", "0" if answering else "1", "0", answering),
        ("files outside the spool", f"{len(outside)}", "0", not outside),
        ("peak RSS of the service", f"{rss_mb:.0f} MB", "<= 2048 MB", rss_mb <= 2048),
        ("legit echo, 50 hostile conns open", f"{echo_s:.2f} s", "<= 5 s", legit_ok and echo_s <= 5),
        ("legit C-STORE, 50 hostile conns open", f"{store_s:.2f} s", "<= 5 s", legit_ok and store_s <= 5),
    ]
    print(f"\n{'measure':<40}{'result':>12}{'target':>14}  met")
    for name, value, target, met in rows:
        print(f"{name:<40}{value:>12}{target:>14}  {'yes' if met else 'NO'}")
    shutil.rmtree(home, ignore_errors=True)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
