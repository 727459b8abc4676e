"""Pull a study from a PACS over DICOMweb (QIDO-RS to list the series,
WADO-RS to retrieve the MR series) into the spool; the completion monitor
then creates the job as for a pushed study."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from requests import HTTPError, RequestException

from .spool import Spool, is_valid_uid

log = logging.getLogger("brainline.pull")

# Only the series the pipeline can use are retrieved; derived objects already
# in the study (SEG, SR, PDF, overlays of earlier runs) are left at the PACS.
PULLED_MODALITIES = {"MR"}


class PullError(RuntimeError):
    """The pull could not be done; ``status`` is the matching HTTP status."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass
class PullResult:
    study_uid: str
    series: int
    instances: int
    new_instances: int
    skipped_series: int = 0   # series of other modalities (e.g. earlier SEG/SR results)

    def to_dict(self) -> dict:
        return dict(vars(self))


def make_client(settings) -> DICOMwebClient:
    if not settings.dicomweb_url:
        raise PullError("BRAINLINE_DICOMWEB_URL is not set: no PACS to pull from", status=503)
    session = requests.Session()
    if settings.dicomweb_username:
        session.auth = (settings.dicomweb_username, settings.dicomweb_password)
    return DICOMwebClient(url=settings.dicomweb_url, session=session)


def with_part10_meta(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Give a retrieved dataset the file meta of a Part 10 file (keeping its
    transfer syntax; Explicit VR Little Endian when it has none)."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _to_part10(ds: pydicom.Dataset) -> bytes:
    """Encode a retrieved dataset as a Part 10 file (keeping its transfer syntax)."""
    ds = with_part10_meta(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pull_study(settings, spool: Spool, study_key_fn, study_uid: str, metrics=None,
               progress=None) -> PullResult:
    """Retrieve every instance of ``study_uid`` into the spool.

    ``progress(n_done, n_total)`` is called after each instance when given.
    Raises PullError (404 when the PACS does not know the study).
    """
    if not is_valid_uid(study_uid):
        raise PullError(f"{study_uid!r} is not a valid Study Instance UID", status=400)
    client = make_client(settings)
    try:
        series_found = client.search_for_series(study_instance_uid=study_uid,
                                                fields=["Modality", "NumberOfSeriesRelatedInstances"])
    except HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            series_found = []
        else:
            raise PullError(f"QIDO-RS search at the PACS failed: {exc}") from None
    except RequestException as exc:
        raise PullError(f"the PACS at {settings.dicomweb_url} cannot be reached: {type(exc).__name__}") from None
    if not series_found:
        raise PullError(f"study {study_uid} was not found at the PACS ({settings.dicomweb_url})", status=404)
    wanted = {}
    skipped = 0
    for item in series_found:
        modality = item.get("00080060", {}).get("Value", [""])[0]
        if modality in PULLED_MODALITIES:
            count = item.get("00201209", {}).get("Value", [0])[0]
            wanted[item["0020000E"]["Value"][0]] = int(count or 0)
        else:
            skipped += 1
    if not wanted:
        raise PullError(f"study {study_uid} has no MR series at the PACS", status=404)
    series_uids = sorted(wanted)
    study_key = study_key_fn(study_uid)
    total, new, done = sum(wanted.values()), 0, 0
    try:
        for series_uid in series_uids:
            for ds in client.iter_series(study_uid, series_uid):
                outcome = spool.store(study_key, str(ds.SOPInstanceUID), _to_part10(ds))
                done += 1
                if not outcome.duplicate:
                    new += 1
                    if metrics is not None:
                        metrics.instances.labels(source="dicomweb").inc()
                if getattr(outcome, "conflict", False) and metrics is not None:
                    metrics.conflicts.inc()
                if progress:
                    progress(done, total)
    except RequestException as exc:
        raise PullError(f"WADO-RS retrieval failed after {done} of {total} instances: "
                        f"{type(exc).__name__}") from None
    log.info("study pulled", extra={"study_key": study_key, "instances": done, "new": new})
    return PullResult(study_uid=study_uid, series=len(series_uids), instances=done, new_instances=new,
                      skipped_series=skipped)
