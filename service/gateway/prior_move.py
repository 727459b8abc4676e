"""Prior retrieval with C-MOVE (``BRAINLINE_PRIOR_RETRIEVE=move``).

Many PACS answer C-MOVE but not C-GET. A C-MOVE names a destination AE
title; the PACS looks its host and port up in its own table (Orthanc:
``DicomModalities``) and sends the instances there on a new association.
BrainLine's destination is a storage SCP of its own, opened only while a
prior is retrieved: AE title ``BRAINLINE_PRIOR_MOVE_AE`` on port
``BRAINLINE_PRIOR_MOVE_PORT`` (bound to ``BRAINLINE_DICOM_BIND``). It is not
the scanner-facing listener, so a moved prior never becomes a job of its own,
and it keeps only what was asked for:

* associations from any other host than the PACS are refused (the SCP's
  ``EVT_REQUESTED`` check);
* only MR instances of the requested study are written; anything else is
  answered 0xA900 ("data set does not match SOP class"/not wanted) and
  dropped.

Moved instances land in the same PHI folder as C-GET ones and go through
the same pseudonymisation (service/gateway/priors.py). One C-MOVE
retrieval runs at a time per process (the port is bound once).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from .priors import (
    MR_STORAGE,
    PRIOR_MODALITY,
    DimsePacs,
    PacsStudy,
    PriorSearchError,
    _save_part10,
    _setting,
)
from .pseudonymize import ENCAPSULATED_SYNTAXES, NATIVE_SYNTAXES

if TYPE_CHECKING:
    from pynetdicom.events import EventHandlerType

STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
MOVE_SOURCE = "PACS (C-FIND/C-MOVE)"
STATUS_NOT_WANTED = 0xA900  # PS3.4 B.2.3: "Error: Data Set does not match SOP Class" (refused, not kept)

_ONE_RETRIEVAL = threading.Lock()


def _addresses(host: str) -> set[str]:
    """Every IP address ``host`` resolves to (the PACS that may connect)."""
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


class DimseMovePacs(DimsePacs):
    """C-FIND (Study Root) + C-MOVE to BrainLine's own short-lived storage SCP."""

    source = MOVE_SOURCE
    what = "C-MOVE"

    def send_retrieve(self, assoc, request: pydicom.Dataset):
        """C-MOVE of ``request`` to our own destination AE."""
        return assoc.send_c_move(request, self.move_ae, STUDY_ROOT_MOVE)

    def __init__(self, address: str, settings, timeout: float):
        super().__init__(address, settings, timeout)
        self.move_ae = _setting(settings, "prior_move_ae", "BRAINLINE_PRIOR")
        self.move_port = int(_setting(settings, "prior_move_port", 11113))
        self.move_bind = _setting(settings, "dicom_bind", "0.0.0.0")
        self.hint = (f"; is the AE title {self.move_ae} registered at the PACS with this host and port "
                     f"{self.move_port} (BRAINLINE_PRIOR_MOVE_AE, BRAINLINE_PRIOR_MOVE_PORT)?")

    def _destination(self, study: PacsStudy, folder: Path, written: list[int], refused: list[str]):
        """The storage SCP the PACS sends to, started (``block=False``)."""
        from pynetdicom import AE, evt

        pacs_ips = _addresses(self.host)
        scp = AE(ae_title=self.move_ae)
        scp.acse_timeout = scp.dimse_timeout = scp.network_timeout = self.timeout
        scp.require_called_aet = True
        syntaxes = sorted(NATIVE_SYNTAXES) + sorted(ENCAPSULATED_SYNTAXES)
        for sop_class in MR_STORAGE:
            scp.add_supported_context(sop_class, syntaxes)

        def on_requested(event):
            if event.assoc.requestor.address not in pacs_ips:
                refused.append("an association from another host than the PACS")
                event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, user, calling AE not recognised

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            if (str(ds.get("StudyInstanceUID", "")) != study.study_uid
                    or str(ds.get("Modality", "")) != PRIOR_MODALITY):
                refused.append("an instance of another study or modality")
                return STATUS_NOT_WANTED
            _save_part10(ds, folder / f"{written[0]:06d}.dcm")
            written[0] += 1
            return 0x0000

        handlers: list[EventHandlerType] = [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)]
        try:
            return scp.start_server((self.move_bind, self.move_port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise PriorSearchError(f"the C-MOVE destination (port {self.move_port}, "
                                   f"BRAINLINE_PRIOR_MOVE_PORT) could not be opened: {exc.strerror}") from None

    def retrieve(self, study: PacsStudy, folder: Path, deadline: float) -> int:
        ae = self._ae()
        ae.add_requested_context(self.find_context)
        ae.add_requested_context(STUDY_ROOT_MOVE)
        written: list[int] = [0]
        refused: list[str] = []
        with _ONE_RETRIEVAL:
            server = self._destination(study, folder, written, refused)
            try:
                self.retrieve_on(self._associate(ae), study, deadline)
            finally:
                server.shutdown()
        if refused and not written[0]:
            raise PriorSearchError(f"the C-MOVE sent nothing usable ({refused[0]} was refused)")
        return written[0]

