"""Result destinations: C-STORE SCU (pynetdicom) and STOW-RS (dicomweb-client).

Configured as ``BRAINLINE_DEST_DICOM=AET@host:port[,...]`` and
``BRAINLINE_DEST_STOWRS=URL[,...]``. ``send`` returns a per-file outcome:
``None`` when stored, or the reason the destination *refused* the object
(permanent: a C-STORE failure status, an HTTP 4xx, a FailedSOPSequence).
Transient problems (unreachable, timeouts, 5xx, association refused) raise
``DestinationUnavailable`` so that the outbox retries later.

Destination kinds are plugins in ``DESTINATIONS`` (``models/plugins.py``),
keyed by kind: a :class:`Destination` subclass registered with
``@destination("kind", setting="dest_kind")`` whose ``from_setting(entry,
settings)`` builds one destination from one comma-separated entry of that
setting. Third-party kinds: entry points in the group "brainline.destinations";
their setting is read from ``settings`` when it has that field, else from the
environment variable ``BRAINLINE_<SETTING>`` (e.g. ``BRAINLINE_DEST_S3``).
"""

from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from brainline.models.plugins import Registry

log = logging.getLogger("brainline.destinations")

# C-STORE statuses that mean "stored" (success and the PS3.4 B.2.3 warnings).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class DestinationUnavailable(RuntimeError):
    """The destination cannot be reached now; retry later."""


class DestinationConfigError(ValueError):
    """A destination setting cannot be parsed; the message names it."""


class Destination(abc.ABC):
    """Somewhere results are sent. ``name`` identifies it in the outbox (keep
    it stable: queued rows refer to it); ``send`` returns one outcome per
    file: None when stored, else why it was refused (permanent), and raises
    :class:`DestinationUnavailable` for transient problems."""

    kind: str = "abstract"

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    @abc.abstractmethod
    def send(self, files: list[Path]) -> list[str | None]: ...

    @classmethod
    @abc.abstractmethod
    def from_setting(cls, entry: str, settings) -> Destination:
        """One destination from one entry of its setting; DestinationConfigError
        (naming the setting and the entry) when it cannot be parsed."""


#: Destination kinds: kind -> Destination subclass; info ``setting`` is the
#: settings field (comma-separated entries) that configures that kind.
DESTINATIONS: Registry[type[Destination]] = Registry(
    "destination kind", error=DestinationConfigError, entry_point_group="brainline.destinations")
destination = DESTINATIONS.register


@destination("dicom", setting="dest_dicom")
@dataclass(frozen=True)
class DicomDestination(Destination):
    """C-STORE SCU to ``AET@host:port`` (BRAINLINE_DEST_DICOM)."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "BRAINLINE"
    timeout_s: float = 60.0
    kind = "dicom"

    @property
    def name(self) -> str:
        return f"dicom:{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def from_setting(cls, entry: str, settings) -> DicomDestination:
        try:
            aet, hostport = entry.split("@", 1)
            host, port = hostport.rsplit(":", 1)
            dest = cls(ae_title=aet, host=host, port=int(port),
                       calling_ae=settings.ae_title, timeout_s=settings.network_timeout)
        except ValueError:
            raise DestinationConfigError(
                f"BRAINLINE_DEST_DICOM entry {entry!r} is not AET@host:port") from None
        if not aet or len(aet) > 16:
            raise DestinationConfigError(f"BRAINLINE_DEST_DICOM entry {entry!r}: AE title must be 1-16 chars")
        return dest

    def send(self, files: list[Path]) -> list[str | None]:
        return self._send_cstore(files)

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
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        try:
            for ds in datasets:
                sop_class = str(ds.SOPClassUID)
                if sop_class not in accepted:   # a PACS without SEG (or 3D SR) support: refuse this one only
                    outcomes.append(f"{self.name} does not accept {UID(sop_class).name} ({sop_class}): "
                                    f"it rejected the presentation context at association")
                    continue
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



@destination("stowrs", setting="dest_stowrs")
@dataclass(frozen=True)
class StowRsDestination(Destination):
    """DICOMweb STOW-RS to an http(s) URL (BRAINLINE_DEST_STOWRS), with the
    optional basic-auth user of BRAINLINE_DEST_STOWRS_USERNAME/_PASSWORD."""

    url: str
    username: str = ""
    password: str = field(default="", repr=False)
    timeout_s: float = 60.0
    kind = "stowrs"

    @property
    def name(self) -> str:
        return f"stowrs:{self.url}"

    @classmethod
    def from_setting(cls, entry: str, settings) -> StowRsDestination:
        if not entry.startswith(("http://", "https://")):
            raise DestinationConfigError(f"BRAINLINE_DEST_STOWRS entry {entry!r} is not an http(s) URL")
        return cls(url=entry.rstrip("/"), username=settings.dest_stowrs_username,
                   password=settings.dest_stowrs_password, timeout_s=settings.network_timeout)

    def send(self, files: list[Path]) -> list[str | None]:
        return self._send_stowrs(files)

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


def _setting_value(settings, name: str) -> str:
    value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(f"BRAINLINE_{name.upper()}", "")
    return str(value or "")


def parse_destinations(settings) -> list[Destination]:
    """All destinations configured in the settings of every destination kind
    (BRAINLINE_DEST_DICOM, BRAINLINE_DEST_STOWRS, and those of plugins)."""
    out: list[Destination] = []
    for kind in DESTINATIONS.names():
        try:
            name = DESTINATIONS.info(kind).get("setting") or f"dest_{kind}"
        except ImportError as exc:  # a third-party kind whose package is broken
            if _setting_value(settings, f"dest_{kind}").strip():
                raise DestinationConfigError(f"destination kind {kind!r} cannot be imported: {exc}") from exc
            log.warning("destination kind %r cannot be imported: %s", kind, exc)
            continue
        entries = [x.strip() for x in _setting_value(settings, name).split(",")]
        if not any(entries):
            continue
        cls = DESTINATIONS.get(kind)
        out.extend(cls.from_setting(entry, settings) for entry in entries if entry)
    return out
