"""Result destinations: C-STORE SCU (pynetdicom) and STOW-RS (dicomweb-client).

Configured as ``BRAINLINE_DEST_DICOM=AET@host:port[,...]`` and
``BRAINLINE_DEST_STOWRS=URL[,...]``. ``send`` returns a per-file outcome:
``None`` when stored, or the reason the destination *refused* the object
(permanent: a C-STORE failure status, an HTTP 4xx, a FailedSOPSequence).
Transient problems (unreachable, timeouts, 5xx, association refused) raise
``DestinationUnavailable`` so that the outbox retries later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

log = logging.getLogger("brainline.destinations")

# C-STORE statuses that mean "stored" (success and the PS3.4 B.2.3 warnings).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class DestinationUnavailable(RuntimeError):
    """The destination cannot be reached now; retry later."""


class DestinationConfigError(ValueError):
    """A destination setting cannot be parsed; the message names it."""


@dataclass(frozen=True)
class Destination:
    kind: str                   # "dicom" or "stowrs"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    username: str = ""
    password: str = ""
    calling_ae: str = "BRAINLINE"
    timeout_s: float = 60.0

    @property
    def name(self) -> str:
        if self.kind == "dicom":
            return f"dicom:{self.ae_title}@{self.host}:{self.port}"
        return f"stowrs:{self.url}"

    def send(self, files: list[Path]) -> list[str | None]:
        if self.kind == "dicom":
            return self._send_cstore(files)
        return self._send_stowrs(files)

    # -- C-STORE -----------------------------------------------------------
    def _send_cstore(self, files: list[Path]) -> list[str | None]:
        datasets = [pydicom.dcmread(f) for f in files]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "cannot be reached"
            raise DestinationUnavailable(f"{self.name} {why}")
        outcomes: list[str | None] = []
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or "Status" not in status:
                    raise DestinationUnavailable(f"{self.name}: no C-STORE response (timeout or abort)")
                code = int(status.Status)
                if code in STORED_STATUSES:
                    outcomes.append(None)
                else:
                    comment = str(status.get("ErrorComment", "") or "")
                    outcomes.append(f"C-STORE refused with status 0x{code:04X} {comment}".strip())
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    # -- STOW-RS -----------------------------------------------------------
    def _client(self) -> DICOMwebClient:
        session = requests.Session()
        if self.username:
            session.auth = (self.username, self.password)
        return DICOMwebClient(url=self.url, session=session)

    def _send_stowrs(self, files: list[Path]) -> list[str | None]:
        client = self._client()
        outcomes: list[str | None] = []
        for f in files:
            ds = pydicom.dcmread(f)
            try:
                response = client.store_instances(datasets=[ds])
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if 400 <= code < 500 and code not in (408, 429):
                    outcomes.append(f"STOW-RS refused with HTTP {code}")
                    continue
                raise DestinationUnavailable(f"{self.name}: HTTP {code}") from None
            except requests.RequestException as exc:
                raise DestinationUnavailable(f"{self.name} cannot be reached: {type(exc).__name__}") from None
            failed = response.get("FailedSOPSequence") if response is not None else None
            if failed:
                reason = failed[0].get("FailureReason", "")
                outcomes.append(f"STOW-RS refused the instance (FailureReason {reason})")
            else:
                outcomes.append(None)
        return outcomes


def parse_destinations(settings) -> list[Destination]:
    """All destinations configured in BRAINLINE_DEST_DICOM / BRAINLINE_DEST_STOWRS."""
    out: list[Destination] = []
    for item in filter(None, (x.strip() for x in settings.dest_dicom.split(","))):
        try:
            aet, hostport = item.split("@", 1)
            host, port = hostport.rsplit(":", 1)
            dest = Destination(kind="dicom", ae_title=aet, host=host, port=int(port),
                               calling_ae=settings.ae_title, timeout_s=settings.network_timeout)
        except ValueError:
            raise DestinationConfigError(
                f"BRAINLINE_DEST_DICOM entry {item!r} is not AET@host:port") from None
        if not aet or len(aet) > 16:
            raise DestinationConfigError(f"BRAINLINE_DEST_DICOM entry {item!r}: AE title must be 1-16 chars")
        out.append(dest)
    for url in filter(None, (x.strip() for x in settings.dest_stowrs.split(","))):
        if not url.startswith(("http://", "https://")):
            raise DestinationConfigError(f"BRAINLINE_DEST_STOWRS entry {url!r} is not an http(s) URL")
        out.append(Destination(kind="stowrs", url=url.rstrip("/"),
                               username=settings.dest_stowrs_username,
                               password=settings.dest_stowrs_password,
                               timeout_s=settings.network_timeout))
    return out
