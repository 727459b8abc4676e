"""Studies sent in compressed transfer syntaxes, as PACS archives and some
scanners send them: JPEG Lossless, JPEG-LS, RLE and JPEG 2000 (one per series,
written by dcmtk and by pydicom; tests/dicom_factory.py COMPRESSED_SYNTAXES).

BrainLine accepts these syntaxes at association and stores them as received.
Its image steps convert with dcm2niix, and the overlay series and the PDF
read the reference series' pixels with pydicom, which needs its decoder
plugins (pylibjpeg with libjpeg and openjpeg). Before they were installed a
JPEG-compressed study was segmented, but its overlay series and PDF report
were not built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainline.pipelines.conversion import find_dcm2niix
from brainline.pipelines.dicom_outputs.overlay import build_overlay_series
from brainline.pipelines.dicom_outputs.source_series import read_source_series
from brainline.pipelines.dicom_outputs.subtraction import build_subtraction_series
from tests.conftest import PHI, TCGA
from tests.dicom_factory import COMPRESSED_SYNTAXES, compress_study, write_study
from tests.peers import storescu
from tests.test_results_delivery import check_delivered


@pytest.fixture(scope="module")
def compressed_study(small_study, tmp_path_factory):
    """small_study with every series losslessly compressed in its own syntax."""
    return compress_study(small_study, tmp_path_factory.mktemp("compressed_study"))


def test_source_pixels_decode_in_every_compressed_syntax(small_study, compressed_study):
    """The overlay and PDF read the reference series through SourceSeries:
    every compressed series decodes to the same stored values as the original."""
    for role, info in compressed_study.series.items():
        packed = read_source_series(info.paths, pixels=True)
        plain = read_source_series(small_study.series[role].paths, pixels=True)
        syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in packed.datasets}
        assert syntaxes == {COMPRESSED_SYNTAXES[role].uid}, role
        assert len(packed.datasets) == len(plain.datasets) == small_study.series[role].n_instances
        for i in range(len(plain.datasets)):
            assert np.array_equal(packed.pixel_array(i), plain.pixel_array(i)), (role, i)


def _nifti_of(files, out_dir) -> np.ndarray:
    """dcm2niix's volume of one series (voxels as stored in the NIfTI)."""
    out_dir.mkdir(parents=True)
    subprocess.run([str(find_dcm2niix()), "-z", "y", "-f", "v", "-o", str(out_dir), str(files[0].parent)],
                   check=True, capture_output=True, timeout=120)
    return np.asanyarray(nib.load(out_dir / "v.nii.gz").dataobj)


@pytest.mark.integration
def test_compressed_study_is_processed_and_every_result_arrives(service_factory, orthanc, small_study,
                                                                compressed_study, tmp_path):
    svc = service_factory(BRAINLINE_DEST_DICOM=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    for role, info in compressed_study.series.items():   # one association per series, proposing its syntax
        sent = storescu(info.dir, svc.dicom_port, extra=[COMPRESSED_SYNTAXES[role].storescu_option])
        assert sent.returncode == 0, (role, sent.stderr)

    # stored as received: the spool holds the four compressed syntaxes
    spooled = [p for p in (svc.home / "spool").rglob("*.dcm") if ".quarantine" not in p.parts]
    assert len(spooled) == compressed_study.n_instances
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in spooled}
    assert received == {syntax.uid for syntax in COMPRESSED_SYNTAXES.values()}

    # SEG, SR, RANO SR, overlay series and PDF reach Orthanc under the original study, dciodvfy-clean
    box = check_delivered(svc, orthanc, compressed_study, tmp_path)
    assert box["depth"] == 0
    [listed] = svc.jobs()
    job = svc.job(listed["id"])
    stages = {s["name"]: s for s in job["stages"]}
    assert not stages["pseudonymize"]["result"].get("quarantined"), stages["pseudonymize"]["result"]
    built = stages["build_outputs"]["result"]
    assert "not built" not in str(built), built

    # lossless all the way: each converted volume equals dcm2niix's volume of the uncompressed series
    ws = svc.workspace(job["id"])
    for role, info in small_study.series.items():
        expected = _nifti_of(info.paths, tmp_path / f"plain_{role}")
        got = np.asanyarray(nib.load(ws / "nifti" / f"{role}.nii.gz").dataobj)
        assert got.shape == expected.shape and np.array_equal(got, expected), role


def near_lossless(paths, folder: Path) -> list[Path]:
    """``paths`` re-encoded JPEG-LS near-lossless by dcmcjpls into ``folder``
    (same names; dcmcjpls marks them LossyImageCompression 01). dcmcjpls
    encodes near-lossless unsigned data only: the values are clipped at 0."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in paths:
        ds = pydicom.dcmread(src)
        ds.PixelRepresentation = 0
        ds.PixelData = np.clip(ds.pixel_array, 0, None).astype(np.uint16).tobytes()
        ds.save_as(folder / "unsigned.tmp")
        subprocess.run(["dcmcjpls", "+en", str(folder / "unsigned.tmp"), str(folder / src.name)], check=True,
                       capture_output=True, timeout=60)
        out.append(folder / src.name)
    (folder / "unsigned.tmp").unlink(missing_ok=True)
    return out


def test_images_derived_from_a_lossy_compressed_series_say_so(small_study, tmp_path):
    """PS3.3 C.7.6.1.1.5: an image derived from a lossy-compressed one keeps
    LossyImageCompression 01. A JPEG-LS near-lossless series (dcmcjpls marks it
    01) gives overlay and subtraction images marked 01 with the method; the
    same series with the attribute removed is still recognised by its lossy
    transfer syntax; a lossless one is not marked."""
    t1c = small_study.series["t1c"]
    near = tmp_path / "near"
    near_lossless(t1c.paths, near)
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    for path in sorted(near.iterdir()):
        ds = pydicom.dcmread(path)
        assert ds.LossyImageCompression == "01" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.81"
        del ds.LossyImageCompression
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(unmarked / path.name)

    reference = sitk.ReadImage([str(p) for p in read_source_series(t1c.paths).paths])
    labels = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(reference)
    labels[20:40, 20:40, 2:6] = 1
    for folder, method in ((near, "ISO_14495_1"), (unmarked, "ISO_14495_1")):
        overlay = build_overlay_series(sorted(folder.iterdir()), labels)
        assert len(overlay) == t1c.n_instances
        assert {ds.LossyImageCompression for ds in overlay} == {"01"}, folder.name
        assert {ds.LossyImageCompressionMethod for ds in overlay} == {method}, folder.name
    lossless = build_overlay_series(t1c.paths, labels)
    assert {ds.get("LossyImageCompression", "00") for ds in lossless} == {"00"}

    # the follow-up's subtraction series (derived MR on the reference series) likewise
    difference = sitk.Cast(labels, sitk.sitkFloat32) * 50.0
    lossy_sub = build_subtraction_series(sorted(near.iterdir()), difference, "t1c", prior_words="prior")
    assert {ds.LossyImageCompression for ds in lossy_sub} == {"01"}
    assert {ds.LossyImageCompressionMethod for ds in lossy_sub} == {"ISO_14495_1"}
    plain_sub = build_subtraction_series(t1c.paths, difference, "t1c", prior_words="prior")
    assert {ds.LossyImageCompression for ds in plain_sub} == {"00"}
    # a lossy prior: the subtraction is computed from its images too
    prior = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(unmarked.iterdir())]
    prior_sub = build_subtraction_series(t1c.paths, difference, "t1c", prior_words="prior", prior_headers=prior)
    assert {(ds.LossyImageCompression, ds.LossyImageCompressionMethod) for ds in prior_sub} == {("01", "ISO_14495_1")}


def test_a_lossy_prior_marks_its_subtraction_lossy(small_study, tmp_path):
    """`brainline process --prior` with a prior whose FLAIR was stored JPEG-LS
    near-lossless: the FLAIR subtraction series says it is derived from
    lossy-compressed images; the T1c subtraction (both studies lossless) does not."""
    prior = write_study(tmp_path / "prior", TCGA, slice_step=5, study_date="20231016", **PHI)
    near_lossless(prior.series["flair"].paths, prior.series["flair"].dir)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "brainline.service.cli", "process", "--quiet",
                             str(small_study.series["t1"].dir.parent), "--out", str(out),
                             "--prior", str(prior.series["t1"].dir.parent)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    marks = {}
    for path in (out / "dicom").glob("subtraction_*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        marks.setdefault(path.name.split("_")[1], set()).add(
            (ds.get("LossyImageCompression"), ds.get("LossyImageCompressionMethod")))
    assert marks == {"flair": {("01", "ISO_14495_1")}, "t1c": {("00", None)}}, marks
