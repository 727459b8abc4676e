"""Tests for tests.corpus: the clinical-like corpus generator, its scoring and the naive floor."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from brainline.pipelines.conversion import convert_series
from brainline.pipelines.series_selection import load_rules, rules_from_dict, scan_series, select_series
from tests import shared_data
from tests.corpus import (
    CASE_IDS,
    HOLDOUT_CASES,
    PATTERNS,
    TUNE_CASES,
    _grid_of,
    corpus_cases,
    load_case_json,
    main,
    naive_flair_floor,
    sample,
    score,
    write_corpus_study,
)

CASE = "2013_11"
needs_data = shared_data.needs_data(shared_data.BRATS18)
pytestmark = needs_data


@pytest.fixture(scope="module")
def case():
    return corpus_cases(cases=[CASE])[0]


@pytest.fixture(scope="module")
def studies(tmp_path_factory, case) -> dict[str, Path]:
    """One case in every pattern (about 15 s)."""
    out = tmp_path_factory.mktemp("corpus")
    return {p: write_corpus_study(case, p, out, seed=0) for p in PATTERNS}


def read_series(directory: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    return reader.Execute()


def corners(image: sitk.Image) -> np.ndarray:
    """Physical positions of the 8 corner voxel centres, sorted (independent of axis flips)."""
    size = image.GetSize()
    pts = [image.TransformIndexToPhysicalPoint((i, j, k))
           for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return np.array(sorted(np.round(pts, 1).tolist()))


def optional_rules(*optional: str):
    """The shipped selection rules with ``optional`` roles not required."""
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "series_rules.yaml").read_text())
    for role in optional:
        data["roles"][role]["required"] = False
    return rules_from_dict(data)


# --------------------------------------------------------------------------- cases


def test_cases_and_split():
    cases = corpus_cases()
    assert [c.case_id for c in cases] == list(CASE_IDS) and len(cases) == 13
    assert len(TUNE_CASES) == 6 and len(HOLDOUT_CASES) == 7
    assert not set(TUNE_CASES) & set(HOLDOUT_CASES)
    assert set(TUNE_CASES) | set(HOLDOUT_CASES) == set(CASE_IDS)
    assert "tcga-du-7294" in HOLDOUT_CASES
    assert corpus_cases(cases=["tcga-du-7294"])[0].reference.name == "fusion_simple.nii.gz"
    with pytest.raises(FileNotFoundError, match="unknown corpus case"):
        corpus_cases(cases=["nope"])


def test_half_of_the_cases_have_a_3d_t1c():
    from tests.corpus import t1c_is_3d
    flags = [t1c_is_3d(c) for c in CASE_IDS]
    assert sum(flags) in (6, 7)


# --------------------------------------------------------------------------- layout


def test_layout_and_case_json(studies):
    for pattern, study in studies.items():
        info = load_case_json(study)
        assert study.name == f"{CASE}_{pattern}"
        assert (study / "reference_seg.nii.gz").is_file()
        assert info["case_id"] == CASE and info["pattern"] == pattern and info["split"] == "tune"
        assert sorted(p.name for p in (study / "dicom").iterdir()) == sorted(info["roles"])
        for role, series in info["series"].items():
            assert len(list((study / "dicom" / role).glob("*.dcm"))) == series["n_instances"]
            for key in ("pitch_deg", "yaw_deg", "roll_deg", "slice_thickness_mm", "vertex_cut_mm",
                        "bias_amplitude", "gain", "grid", "series_description", "series_uid"):
                assert key in series, (pattern, role, key)


def test_pattern_b_parameters_in_range(studies):
    info = load_case_json(studies["b"])
    assert info["roles"] == ["t1", "t1c", "t2", "flair"]
    tilts = set()
    for role, s in info["series"].items():
        assert 8.0 <= s["pitch_deg"] <= 20.0
        assert abs(s["yaw_deg"]) <= 5.0 and abs(s["roll_deg"]) <= 5.0
        assert 0.10 <= s["bias_amplitude"] <= 0.25
        tilts.add((s["pitch_deg"], s["yaw_deg"], s["roll_deg"]))
        if s["acquisition"] == "3D":
            assert role == "t1c" and s["slice_thickness_mm"] == 1.0 and s["pixel_spacing_mm"] == 1.0
        else:
            assert 4.0 <= s["slice_thickness_mm"] <= 6.0
            assert 0.8 <= s["pixel_spacing_mm"] <= 1.0
            assert s["slice_profile"].startswith("boxcar")
        if role == "t1c":
            assert s["vertex_cut_mm"] == 0.0
        assert s["vertex_cut_mm"] == 0.0 or 10.0 <= s["vertex_cut_mm"] <= 20.0
    assert len(tilts) == 4  # every series on its own grid
    assert len({tuple(s["grid"]["size"]) for s in info["series"].values()}) == 4
    assert len({s["gain"] for s in info["series"].values()}) == 4


def test_pattern_c_has_one_sagittal_or_coronal_role(studies):
    info = load_case_json(studies["c"])
    odd = {r: s["plane"] for r, s in info["series"].items() if s["plane"] != "axial"}
    assert len(odd) == 1
    (role, plane), = odd.items()
    assert role in ("t1", "t2", "flair") and plane in ("sagittal", "coronal")
    assert info["series"][role]["series_description"].startswith({"sagittal": "SAG", "coronal": "COR"}[plane])


def test_pattern_d_is_t1c_3d_and_flair_2d_only(studies):
    info = load_case_json(studies["d"])
    assert info["roles"] == ["t1c", "flair"] and info["missing_roles"] == ["t1", "t2"]
    assert info["series"]["t1c"]["acquisition"] == "3D" and info["series"]["flair"]["acquisition"] == "2D"
    assert len(scan_series(studies["d"] / "dicom")) == 2


def test_deterministic(tmp_path, case, studies):
    again = write_corpus_study(case, "b", tmp_path, seed=0, roles=("flair",))
    first, second = load_case_json(studies["b"]), load_case_json(again)
    assert first["series"]["flair"] == second["series"]["flair"]
    assert first["patient"] == second["patient"] and first["study_uid"] == second["study_uid"]
    a = sorted((studies["b"] / "dicom" / "flair").glob("*.dcm"))
    b = sorted((again / "dicom" / "flair").glob("*.dcm"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    other = write_corpus_study(case, "b", tmp_path / "seed1", seed=1, roles=("flair",))
    assert load_case_json(other)["series"]["flair"]["grid"] != first["series"]["flair"]["grid"]


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("pattern", ["b", "c", "d"])
def test_simpleitk_reads_the_intended_grid(studies, pattern):
    info = load_case_json(studies[pattern])
    for role, series in info["series"].items():
        image = read_series(studies[pattern] / "dicom" / role)
        grid = _grid_of(series)
        assert image.GetSize() == grid.size, role
        np.testing.assert_allclose(image.GetSpacing(), grid.spacing, atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), grid.origin, atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), grid.direction, atol=1e-5)


def test_dcm2niix_gives_the_intended_tilted_grid(studies, tmp_path):
    info = load_case_json(studies["c"])
    for role, series in info["series"].items():
        files = sorted((studies["c"] / "dicom" / role).glob("*.dcm"))
        result = convert_series(files, tmp_path, role)
        image = sitk.ReadImage(str(result.nifti))
        intended = _grid_of(series).reference()
        assert sorted(image.GetSize()) == sorted(intended.GetSize())
        np.testing.assert_allclose(sorted(image.GetSpacing()), sorted(intended.GetSpacing()), atol=1e-3)
        # dcm2niix may flip axes: compare the physical corner positions
        np.testing.assert_allclose(corners(image), corners(intended), atol=0.15)


def test_headers_and_stored_values(studies):
    info = load_case_json(studies["b"])
    for role, series in info["series"].items():
        first = pydicom.dcmread(sorted((studies["b"] / "dicom" / role).glob("*.dcm"))[0])
        assert first.SeriesDescription == series["series_description"]
        assert first.MRAcquisitionType == series["acquisition"]
        assert float(first.SliceThickness) == pytest.approx(series["slice_thickness_mm"])
        assert float(first.SpacingBetweenSlices) == pytest.approx(series["spacing_between_slices_mm"])
        assert first.BitsStored == 12
        assert float(first.get("RescaleSlope", 1.0)) == pytest.approx(series["rescale_slope"])
        image = read_series(studies["b"] / "dicom" / role)
        values = sitk.GetArrayViewFromImage(image)
        assert values.min() == 0 and values[:, :3, :3].max() == 0  # zero outside the data
        assert values.max() <= 4095 * series["rescale_slope"] + 1e-3


def test_slice_profile_averages_over_the_thickness(studies):
    """1 mm stripes along the superior axis vanish in a 5 mm slab average; point sampling keeps them."""
    spec = dict(load_case_json(studies["b"])["series"]["flair"])
    image = sitk.Image(240, 240, 155, sitk.sitkFloat32)
    array = np.zeros((155, 240, 240), np.float32)
    array[::2, 40:200, 40:200] = 100.0
    image = sitk.GetImageFromArray(array)
    image.SetOrigin((0.0, -239.0, 0.0))
    slab = sitk.GetArrayFromImage(sample(image, spec))  # a copy: a view of a temporary image is freed memory
    point = sitk.GetArrayFromImage(sample(image, {**spec, "acquisition": "3D"}))
    centre = tuple(s // 2 for s in slab.shape)
    assert abs(float(slab[centre]) - 50.0) < 15.0
    assert float(np.std(slab[slab.shape[0] // 2, 100:150, 100:150])) < 10.0
    assert float(np.std(point[point.shape[0] // 2, 100:150, 100:150])) > 20.0


def test_dicom_is_valid(studies):
    dciodvfy = shutil.which("dciodvfy")
    if not dciodvfy:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    for pattern in ("b", "c"):
        for role in ("t1", "flair"):
            path = sorted((studies[pattern] / "dicom" / role).glob("*.dcm"))[0]
            out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
            assert not errors, (pattern, role, errors)


def test_identities_and_uids_are_distinct(studies):
    patients, uids = set(), []
    for study in studies.values():
        info = load_case_json(study)
        patients.add((info["patient"]["patient_name"], info["patient"]["patient_id"], info["patient"]["accession"]))
        ds = pydicom.dcmread(next((study / "dicom" / info["roles"][0]).glob("*.dcm")), stop_before_pixels=True)
        assert ds.PatientID == info["patient"]["patient_id"] and ds.StudyInstanceUID == info["study_uid"]
        for path in (study / "dicom").rglob("*.dcm"):
            uids.append(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    assert len(patients) == len(studies)
    assert len(uids) == len(set(uids))


# --------------------------------------------------------------------------- series selection


@pytest.mark.parametrize("pattern", ["a", "b", "c"])
def test_series_selection_picks_the_right_roles(studies, pattern):
    info = load_case_json(studies[pattern])
    result = select_series(scan_series(studies[pattern] / "dicom"), load_rules())
    assert {r: s.series_uid for r, s in result.roles.items()} == {
        r: s["series_uid"] for r, s in info["series"].items()}


def test_series_selection_minimal_protocol(studies):
    info = load_case_json(studies["d"])
    result = select_series(scan_series(studies["d"] / "dicom"), optional_rules("t1", "t2"))
    assert {r: s.series_uid for r, s in result.roles.items()} == {
        r: s["series_uid"] for r, s in info["series"].items()}
    assert sorted(result.missing_optional) == ["t1", "t2"]


# --------------------------------------------------------------------------- scoring


def test_reference_is_brats2023_in_source_space(studies, case):
    ref = sitk.ReadImage(str(studies["b"] / "reference_seg.nii.gz"))
    source = sitk.ReadImage(str(case.reference))
    assert ref.GetSize() == source.GetSize() and ref.GetOrigin() == source.GetOrigin()
    src, out = sitk.GetArrayViewFromImage(source), sitk.GetArrayViewFromImage(ref)
    assert set(np.unique(out)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(out == 3, src == 4)
    np.testing.assert_array_equal(out == 1, src == 1)


def test_score_self_resampled_and_shifted(studies):
    reference = studies["b"] / "reference_seg.nii.gz"
    perfect = score(reference, reference)
    assert perfect["WT"] == perfect["TC"] == perfect["ET"] == 1.0
    assert perfect["WT_ml"] == perfect["WT_ref_ml"] > 10

    ref = sitk.ReadImage(str(reference))
    flair_grid = _grid_of(load_case_json(studies["b"])["series"]["flair"]).reference()
    on_grid = sitk.Resample(ref, flair_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    resampled = score(on_grid, reference)
    assert 0.8 < resampled["WT"] < 1.0
    assert 0.6 < resampled["ET"] < 1.0

    shifted = sitk.Image(ref)
    shifted.SetOrigin(tuple(np.array(ref.GetOrigin()) + (6.0, 0.0, 4.0)))
    moved = score(shifted, reference)
    assert moved["WT"] < resampled["WT"] - 0.05 and moved["WT"] < 0.9
    assert moved["WT_ml"] == perfect["WT_ml"]

    brats2020 = sitk.GetArrayFromImage(ref)
    brats2020[brats2020 == 3] = 4
    old = sitk.GetImageFromArray(brats2020)
    old.CopyInformation(ref)
    assert score(old, reference)["ET"] == 1.0

    empty = score(sitk.Image(ref.GetSize(), sitk.sitkUInt8), reference)
    assert empty["WT"] == 0.0


def test_score_without_et_in_reference():
    tcga = corpus_cases(cases=["tcga-du-7294"])[0]
    ref = sitk.ReadImage(str(tcga.reference))
    result = score(ref, ref)
    assert result["ET"] is None and result["WT"] == 1.0


def test_naive_flair_floor(tmp_path, case, studies):
    work = tmp_path / "work"
    (work / "preprocessed").mkdir(parents=True)
    flair = sitk.ReadImage(str(case.images["flair"]), sitk.sitkFloat32)
    sitk.WriteImage(flair, str(work / "preprocessed" / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(flair > 0, sitk.sitkUInt8), str(work / "brain_mask.nii.gz"))
    floor = naive_flair_floor(work)
    labels = sitk.GetArrayViewFromImage(floor)
    assert set(np.unique(labels)) <= {0, 2}
    assert not labels[sitk.GetArrayViewFromImage(flair) <= 0].any()
    result = score(floor, studies["b"] / "reference_seg.nii.gz")
    assert 0.3 < result["WT"] < 0.95


def test_cli_writes_index(tmp_path):
    assert main(["--out", str(tmp_path), "--cases", "tcga-du-7294", "--patterns", "d", "--seed", "3"]) == 0
    index = json.loads((tmp_path / "corpus.json").read_text())
    assert [s["name"] for s in index["studies"]] == ["tcga-du-7294_d"] and index["seed"] == 3
    assert load_case_json(tmp_path / "tcga-du-7294_d")["split"] == "holdout"
