"""DICOM listener: C-ECHO and C-STORE SCP (pynetdicom).

Every instance is fsync'ed into the spool before the success status is
returned. Calling AE titles outside BRAINLINE_ALLOWED_AES are rejected at
association. Status codes (PS3.4 Annex B / PS3.7):
0x0000 success, 0xA700 out of resources (spool below free-space threshold),
0xC000 cannot understand (dataset malformed or without the UIDs needed to
file it), 0xC001 cannot file (unexpected I/O error).
"""

from __future__ import annotations

import logging

from pydicom.uid import UID
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from .metrics import Metrics
from .spool import InvalidInstance, OutOfSpace, Spool, is_valid_uid

log = logging.getLogger("brainline.listener")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_CANNOT_FILE = 0xC001

# Enhanced MR and the other storage classes of a brain study are part of
# pynetdicom's StoragePresentationContexts, each accepted with every
# transfer syntax in ALL_TRANSFER_SYNTAXES (stored as received).


class DicomListener:
    def __init__(self, settings, spool: Spool, study_key_fn, metrics: Metrics):
        self.settings = settings
        self.spool = spool
        self.study_key_fn = study_key_fn
        self.metrics = metrics
        self.server = None

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = 0  # unlimited: senders may use large PDUs
        ae.maximum_associations = s.max_associations
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.acse_timeout = s.network_timeout
        ae.require_called_aet = True
        if s.allowed_aes:
            ae.require_calling_aet = list(s.allowed_aes)
        for ctx in StoragePresentationContexts:
            ae.add_supported_context(ctx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        s = self.settings
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self.server = self._make_ae().start_server(
            (s.dicom_bind, s.dicom_port), block=False, evt_handlers=handlers
        )
        log.info("dicom listener started", extra={"ae_title": s.ae_title, "port": s.dicom_port})

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def bound(self) -> bool:
        return self.server is not None and self.server.socket is not None

    # -- handlers ----------------------------------------------------------
    def _on_accepted(self, event) -> None:
        self.metrics.associations.inc()

    def _on_rejected(self, event) -> None:
        self.metrics.rejections.labels(reason="calling_ae_not_allowed").inc()
        log.warning("association rejected: calling AE title not allowed",
                    extra={"calling_ae": event.assoc.requestor.ae_title})

    def _on_store(self, event) -> int:
        if not self.spool.has_space():
            return self._refuse("out_of_resources", STATUS_OUT_OF_RESOURCES)
        try:
            sop_uid, study_uid = _checked_uids(event)
        except InvalidInstance as exc:
            return self._refuse("malformed", STATUS_CANNOT_UNDERSTAND, str(exc))
        try:
            outcome = self.spool.store(self.study_key_fn(study_uid), sop_uid,
                                       event.encoded_dataset(include_meta=True))
        except OutOfSpace:
            return self._refuse("out_of_resources", STATUS_OUT_OF_RESOURCES)
        except OSError as exc:
            return self._refuse("io_error", STATUS_CANNOT_FILE, exc.strerror or "I/O error")
        if outcome.duplicate:
            self.metrics.duplicates.inc()
        else:
            self.metrics.instances.labels(source="dimse").inc()
        return STATUS_SUCCESS

    def _refuse(self, reason: str, status: int, detail: str = "") -> int:
        self.metrics.rejections.labels(reason=reason).inc()
        log.warning("instance refused", extra={"reason": reason, "detail": detail,
                                               "status": f"0x{status:04X}"})
        return status


def _checked_uids(event) -> tuple[str, str]:
    """Decode the dataset fully enough to file it; raise InvalidInstance."""
    sop_uid = str(event.request.AffectedSOPInstanceUID or "")
    try:
        ds = event.dataset
        for _elem in ds:  # forces every top-level element to decode
            pass
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        ds_sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        has_series = bool(ds.get("SeriesInstanceUID"))
    except Exception as exc:  # pydicom raises many types on corrupt data
        raise InvalidInstance(f"dataset cannot be decoded ({type(exc).__name__})") from None
    if not is_valid_uid(study_uid):
        raise InvalidInstance("StudyInstanceUID missing or invalid")
    if not has_series:
        raise InvalidInstance("SeriesInstanceUID missing")
    if ds_sop_uid != sop_uid or not is_valid_uid(sop_uid):
        raise InvalidInstance("SOPInstanceUID missing or different from the C-STORE request")
    return sop_uid, study_uid


ALL_TRANSFER_SYNTAXES = [
    UID("1.2.840.10008.1.2.1"),      # Explicit VR Little Endian
    UID("1.2.840.10008.1.2"),        # Implicit VR Little Endian
    UID("1.2.840.10008.1.2.2"),      # Explicit VR Big Endian (retired, still sent)
    UID("1.2.840.10008.1.2.1.99"),   # Deflated Explicit VR Little Endian
    UID("1.2.840.10008.1.2.4.50"),   # JPEG Baseline
    UID("1.2.840.10008.1.2.4.51"),   # JPEG Extended
    UID("1.2.840.10008.1.2.4.57"),   # JPEG Lossless
    UID("1.2.840.10008.1.2.4.70"),   # JPEG Lossless SV1
    UID("1.2.840.10008.1.2.4.80"),   # JPEG-LS Lossless
    UID("1.2.840.10008.1.2.4.81"),   # JPEG-LS Near-lossless
    UID("1.2.840.10008.1.2.4.90"),   # JPEG 2000 Lossless
    UID("1.2.840.10008.1.2.4.91"),   # JPEG 2000
    UID("1.2.840.10008.1.2.5"),      # RLE Lossless
]
