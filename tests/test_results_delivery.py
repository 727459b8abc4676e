"""End to end: storescu pushes a study to `brainline serve`, the whole
pipeline runs, and SEG, SR, overlay series and PDF arrive in a real Orthanc
under the original patient and study, validated by dciodvfy; the outbox
survives an unreachable PACS and a kill -9."""

from __future__ import annotations

import subprocess
import time

import httpx
import pydicom
import pytest

from tests.conftest import PHI
from tests.dicom_factory import write_study
from tests.peers import LOOPBACK, OrthancServer, start_storescp, storescu
from tests.shared_data import TCGA, require

pytestmark = pytest.mark.integration

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"


def wait_outbox(svc, timeout=180, states=("sent",)) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        box = svc.api("GET", "/api/v1/outbox").json()
        if box["items"] and all(i["state"] in states for i in box["items"]):
            return box
        time.sleep(0.5)
    raise AssertionError(f"outbox not delivered: {svc.api('GET', '/api/v1/outbox').json()}")


def orthanc_instance(orthanc: OrthancServer, sop_uid: str) -> pydicom.Dataset:
    found = httpx.post(orthanc.http_url + "/tools/lookup", content=sop_uid, timeout=30).json()
    assert found, f"{sop_uid} not stored in Orthanc"
    raw = httpx.get(f"{orthanc.http_url}/instances/{found[0]['ID']}/file", timeout=60).content
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))


def dciodvfy_errors(path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]


def check_delivered(svc, orthanc, study, tmp_path, patient_name: str = "DOE^JANE") -> dict:
    [job] = svc.wait_jobs(1, timeout=300)
    assert job["state"] == "done", job
    box = wait_outbox(svc)
    kinds = sorted({i["kind"] for i in box["items"]})
    assert kinds == ["overlay", "pdf", "rano", "seg", "sr"]
    t1c_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                for p in study.series["t1c"].paths}
    by_kind = {}
    for item in box["items"]:
        ds = orthanc_instance(orthanc, item["sop_instance_uid"])
        by_kind.setdefault(item["kind"], ds)
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.PatientID == "PID-4711-XYZ" and str(ds.PatientName) == patient_name
        assert ds.AccessionNumber == "ACC-98765"
        assert ds.PatientBirthDate == "19640229" and ds.StudyDate == "20240115"
        assert "PatientIdentityRemoved" not in ds
    seg = by_kind["seg"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series["t1c"].series_uid
    sources = {src.ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence
               for d in f.DerivationImageSequence for src in d.SourceImageSequence}
    assert sources and sources <= t1c_uids
    for kind, ds in by_kind.items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path)
        assert dciodvfy_errors(path) == [], kind
    pdf = by_kind["pdf"].EncapsulatedDocument
    assert pdf.startswith(b"%PDF")
    (tmp_path / "report.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-png", "-r", "40", "-f", "1", "-l", "1", str(tmp_path / "report.pdf"),
                    str(tmp_path / "page")], check=True, timeout=60)
    return box


def test_results_arrive_in_orthanc_over_cstore(service_factory, orthanc, small_study, tmp_path):
    svc = service_factory(BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    assert storescu(small_study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
    box = check_delivered(svc, orthanc, small_study, tmp_path)
    assert box["depth"] == 0
    assert svc.metric("brainline_outbox_depth") == 0


#: A Japanese patient name as Japanese scanners write it: alphabetic, ideographic and phonetic
#: groups, Specific Character Set "\\ISO 2022 IR 87" (an empty first value stands for ISO 2022 IR 6).
JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.fixture(scope="module")
def japanese_study(tmp_path_factory):
    study = write_study(tmp_path_factory.mktemp("japanese_study"), require(TCGA), slice_step=5, **PHI)
    for path in study.paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = JAPANESE_NAME
        ds.save_as(path)
    return study


def test_a_japanese_study_gets_every_result_under_its_patients_name(service_factory, orthanc, japanese_study,
                                                                    tmp_path):
    """highdicom refused the empty first value of the study's Specific Character
    Set, so no result was built; now SEG, SR, RANO SR, overlay series and PDF
    arrive, dciodvfy-clean, and name the patient exactly as the scanner did."""
    svc = service_factory(BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    assert storescu(japanese_study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
    box = check_delivered(svc, orthanc, japanese_study, tmp_path, patient_name=JAPANESE_NAME)
    assert box["depth"] == 0


def test_results_arrive_over_stowrs_and_a_refusing_destination_does_not_block(
        service_factory, orthanc, small_study, tmp_path):
    svc = service_factory(
        BRAINLINE_DEST_STOWRS=f"{orthanc.dicomweb_url},{orthanc.http_url}/no-such-dicomweb")
    assert storescu(small_study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
    [job] = svc.wait_jobs(1, timeout=300)
    assert job["state"] == "done", job
    box = wait_outbox(svc, states=("sent", "rejected"))
    good = [i for i in box["items"] if i["destination"] == f"stowrs:{orthanc.dicomweb_url}"]
    bad = [i for i in box["items"] if i not in good]
    assert good and all(i["state"] == "sent" for i in good)
    assert bad and all(i["state"] == "rejected" and "HTTP 404" in i["last_error"] for i in bad)
    for item in good:
        assert orthanc_instance(orthanc, item["sop_instance_uid"]).PatientID == "PID-4711-XYZ"


def test_outbox_waits_for_pacs_and_survives_kill9(service_factory, small_study):
    with OrthancServer() as pacs:
        pacs.stop()
        svc = service_factory(BRAINLINE_DEST_DICOM=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
                              BRAINLINE_OUTBOX_RETRY_BASE_SECONDS="0.5",
                              BRAINLINE_OUTBOX_RETRY_MAX_SECONDS="2",
                              BRAINLINE_DEST_UNREACHABLE_SECONDS="1")
        assert storescu(small_study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
        [job] = svc.wait_jobs(1, timeout=300)
        assert job["state"] == "done", job
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            box = svc.api("GET", "/api/v1/outbox").json()
            if box["items"] and all(i["attempts"] >= 2 for i in box["items"]):
                break
            time.sleep(0.3)
        n_objects = len(box["items"])
        assert n_objects > 3 and all(i["state"] == "pending" for i in box["items"])
        assert "cannot be reached" in box["items"][0]["last_error"]
        assert svc.metric("brainline_outbox_depth") == n_objects
        assert svc.metric("brainline_outbox_oldest_age_seconds") > 0
        # Readiness means "can accept studies": a PACS that is down must not take
        # the gateway out of its Service. Delivery health has its own endpoint.
        ready = svc.api("GET", "/readyz")
        assert ready.status_code == 200, ready.json()
        delivery = svc.api("GET", "/delivery-health")
        assert delivery.status_code == 503 and any("unreachable" in r for r in delivery.json()["reasons"])
        [dest] = delivery.json()["destinations"]
        assert dest["reachable"] is False and dest["unreachable"] is True and dest["failing_for_s"] > 1
        assert delivery.json()["outbox_depth"] == n_objects
        assert svc.metric("brainline_destination_up") == 0
        assert svc.metric("brainline_destination_failing_seconds") > 1
        assert svc.metric("brainline_spool_free_bytes") > 0
        listing = subprocess.run([*svc.cli, "outbox"], env=svc.env, capture_output=True, text=True,
                                 timeout=60)
        assert listing.returncode == 0 and "pending" in listing.stdout
        # kill -9 between building and sending, then the PACS comes back.
        svc.kill9()
        pacs.start()
        svc.start()
        box = wait_outbox(svc)
        assert len(box["items"]) == n_objects
        assert pacs.count_instances() == n_objects  # each object stored exactly once
        assert svc.api("GET", "/delivery-health").status_code == 200
        assert svc.metric("brainline_destination_up") == 1


#: dcmtk storescp association profile of a PACS without DICOM SEG support (many
#: archives): images, SRs, PDF and KOS, no Segmentation Storage.
NO_SEG_PACS_CONFIG = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[NoSegContexts]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = MRImageStorage\\Uncompressed
PresentationContext3 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext4 = EncapsulatedPDFStorage\\Uncompressed
PresentationContext5 = ComprehensiveSRStorage\\Uncompressed
PresentationContext6 = Comprehensive3DSRStorage\\Uncompressed
PresentationContext7 = KeyObjectSelectionDocumentStorage\\Uncompressed
[[Profiles]]
[NoSeg]
PresentationContexts = NoSegContexts
"""


def test_a_pacs_without_seg_support_gets_every_other_result(service_factory, small_study, tmp_path):
    """dcmtk's storescp configured as a PACS that does not accept Segmentation
    Storage: the SEG is rejected with that reason, and SR, RANO SR, overlay
    series and PDF are stored. Before, pynetdicom raised for the SEG's
    missing presentation context, the whole batch was marked rejected as
    "cannot read the object: ValueError" and nothing was delivered."""
    (tmp_path / "scp.cfg").write_text(NO_SEG_PACS_CONFIG)
    received = tmp_path / "received"
    received.mkdir()
    scp, port = start_storescp(tmp_path / "scp.cfg", "NoSeg", received, "NOSEGPACS")
    try:
        svc = service_factory(BRAINLINE_DEST_DICOM=f"NOSEGPACS@{LOOPBACK}:{port}")
        assert storescu(small_study.series["t1"].dir.parent, svc.dicom_port).returncode == 0
        [job] = svc.wait_jobs(1, timeout=300)
        assert job["state"] == "done", job
        box = wait_outbox(svc, states=("sent", "rejected"))
    finally:
        scp.terminate()
        scp.wait(30)
    by_kind: dict[str, set[str]] = {}
    for item in box["items"]:
        by_kind.setdefault(item["kind"], set()).add(item["state"])
    assert by_kind == {"seg": {"rejected"}, "sr": {"sent"}, "rano": {"sent"}, "overlay": {"sent"},
                       "pdf": {"sent"}}, by_kind
    [seg] = [i for i in box["items"] if i["kind"] == "seg"]
    assert "does not accept Segmentation Storage" in seg["last_error"], seg["last_error"]
    stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()}
    assert stored == {i["sop_instance_uid"] for i in box["items"] if i["kind"] != "seg"}
