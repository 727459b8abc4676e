"""Tests for brainline.pipelines.series_selection (synthetic DICOM headers)."""

from __future__ import annotations

import json
import pickle
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from brainline.pipelines.series_selection import (
    MissingSeriesError,
    RulesError,
    SelectionRules,
    SeriesHeader,
    contrast_evidence,
    evaluate_role,
    has_inversion,
    load_rules,
    rules_from_dict,
    scan_directory,
    scan_series,
    select_series,
)

ORIGINAL = ("ORIGINAL", "PRIMARY", "M", "ND")
STUDY_UID = generate_uid()

# ----------------------------------------------------------------------------
# Small header-only DICOM builder (no pixel data: selection never reads it)
# ----------------------------------------------------------------------------


def _file_dataset(sop_class: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.Modality = "MR"
    return ds


def write_series(root: Path, number: int, description: str, *, n: int = 20,
                 thickness: float = 5.0, acq: str = "2D", tr: float = 500.0,
                 te: float = 10.0, ti: float | None = None, seq: str | list[str] = "SE",
                 agent: str | None = None, image_type=ORIGINAL, modality: str = "MR",
                 derivation: tuple[tuple[str, str], ...] = ()) -> str:
    """Write ``n`` single-frame MR headers of one series under root/S<number>/ (times in ms);
    ``derivation``: (code value, scheme) items of DerivationCodeSequence."""
    uid = generate_uid()
    folder = root / f"S{number:03d}"
    folder.mkdir(parents=True)
    for i in range(n):
        ds = _file_dataset(MRImageStorage)
        ds.Modality = modality
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = uid, number, i + 1
        ds.SeriesDescription = description
        ds.ProtocolName = description
        ds.ImageType = list(image_type)
        ds.MRAcquisitionType = acq
        ds.SliceThickness = thickness
        ds.RepetitionTime, ds.EchoTime = tr, te
        if ti is not None:
            ds.InversionTime = ti
        ds.ScanningSequence = seq
        ds.SequenceVariant = ["SK", "SP"]
        ds.Rows = ds.Columns = 256
        if agent:
            ds.ContrastBolusAgent = agent
        if derivation:
            ds.DerivationCodeSequence = Sequence([Dataset() for _ in derivation])
            for item, (value, scheme) in zip(ds.DerivationCodeSequence, derivation):
                item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, value
        ds.save_as(folder / f"IM{i:04d}.dcm", enforce_file_format=True)
    return uid


def write_enhanced_flair(root: Path, number: int, n_frames: int = 40) -> str:
    """One enhanced MR file, 3D FLAIR, parameters only in functional groups."""
    ds = _file_dataset(EnhancedMRImageStorage)
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), number
    ds.SeriesDescription = "3D FLAIR SAG"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "SPIN"
    ds.NumberOfFrames = n_frames
    ds.Rows = ds.Columns = 256

    def item(**kw) -> Sequence:
        it = Dataset()
        for key, value in kw.items():
            setattr(it, key, value)
        return Sequence([it])

    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = item(RepetitionTime=5000.0, FlipAngle=90)
    shared.MRModifierSequence = item(InversionRecovery="YES", InversionTimes=[1650.0])
    shared.PixelMeasuresSequence = item(SliceThickness=1.0, PixelSpacing=[1.0, 1.0])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for _ in range(n_frames):
        frame = Dataset()
        frame.MREchoSequence = item(EffectiveEchoTime=390.0)
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    folder = root / f"E{number:03d}"
    folder.mkdir(parents=True)
    ds.save_as(folder / "enhanced.dcm", enforce_file_format=True)
    return ds.SeriesInstanceUID


def write_study(root: Path, *, with_flair: bool = True) -> dict[str, str]:
    """A realistic study: several candidates per role plus series that must be skipped."""
    uids = {
        "localizer": write_series(root, 1, "3-PLANE LOCALIZER", n=15, thickness=8.0,
                                  image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), seq="GR"),
        "t1_2d": write_series(root, 2, "AX T1 SE", thickness=5.0, tr=550, te=12),
        "t1_3d": write_series(root, 3, "AX T1 3D PRE", n=60, thickness=1.0, acq="3D",
                              tr=2000, te=3, ti=900, seq=["GR", "IR"]),
        "t2": write_series(root, 4, "AX T2 FSE", tr=5000, te=100),
        "adc": write_series(root, 6, "AX DWI ADC", tr=6000, te=80, seq="EP",
                            image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC")),
        "t1c_3d": write_series(root, 8, "AX T1 3D", n=60, thickness=1.0, acq="3D", tr=2000,
                               te=3, ti=900, seq=["GR", "IR"], agent="GADOVIST"),
        "t1c_mpr": write_series(root, 9, "COR T1 POST MPR", n=60, thickness=1.0,
                                image_type=("DERIVED", "SECONDARY", "MPR"), agent="GADOVIST"),
        "t1c_2d": write_series(root, 10, "COR T1 POST GAD", thickness=4.0, tr=550, te=12),
    }
    if with_flair:
        # The 3D FLAIR has the *earlier* series number, so it must win on 3D / thickness.
        uids["flair_3d"] = write_series(root, 5, "SAG T2 FLAIR 3D", n=120, thickness=1.0,
                                        acq="3D", tr=6000, te=390, ti=1800, seq=["SE", "IR"])
        uids["flair_2d"] = write_series(root, 7, "AX T2 FLAIR", n=30, thickness=5.0, tr=9000,
                                        te=120, ti=2500, seq=["SE", "IR"])
    (root / "README.txt").write_text("not a DICOM file\n")
    (root / "S002" / "DICOMDIR-like.bin").write_bytes(b"\x00" * 300)
    return uids


@pytest.fixture(scope="module")
def rules() -> SelectionRules:
    return load_rules()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("study")
    return root, write_study(root)


# ----------------------------------------------------------------------------
# Scanning
# ----------------------------------------------------------------------------


def test_scan_groups_series_and_skips_non_dicom(study):
    root, uids = study
    report = scan_directory(root)
    assert report.n_skipped == 2
    assert {p.name for p, _ in report.skipped} == {"README.txt", "DICOMDIR-like.bin"}
    assert report.n_files == sum(1 for p in root.rglob("*") if p.is_file())
    by_uid = {s.series_uid: s for s in report.series}
    assert set(by_uid) == set(uids.values())
    assert [s.series_number for s in report.series] == sorted(s.series_number for s in report.series)

    flair = by_uid[uids["flair_3d"]]
    assert flair.n_instances == flair.n_frames == 120
    assert flair.files == sorted(flair.files) and len(flair.files) == 120
    assert flair.description == "SAG T2 FLAIR 3D" and flair.modality == "MR"
    assert flair.mr_acquisition_type == "3D" and flair.is_3d
    assert (flair.repetition_time, flair.echo_time, flair.inversion_time) == (6000, 390, 1800)
    assert flair.slice_thickness == 1.0
    assert flair.scanning_sequence == ("SE", "IR")
    assert flair.rows == flair.columns == 256
    assert not flair.is_derived and flair.contrast_agent is None
    assert flair.sop_class_uid == MRImageStorage

    assert by_uid[uids["adc"]].is_derived
    assert by_uid[uids["adc"]].image_type == ("DERIVED", "PRIMARY", "DIFFUSION", "ADC")
    assert by_uid[uids["t1c_3d"]].contrast_agent == "GADOVIST"
    assert by_uid[uids["t2"]].inversion_time is None
    assert scan_series(root) == report.series


def test_scan_enhanced_mr(tmp_path):
    uid = write_enhanced_flair(tmp_path, 11, n_frames=40)
    (series,) = scan_series(tmp_path)
    assert series.series_uid == uid and series.is_enhanced
    assert series.n_instances == 1 and series.n_frames == 40 and series.n_images == 40
    assert series.sop_class_uid == EnhancedMRImageStorage
    assert series.repetition_time == 5000 and series.echo_time == 390
    assert series.inversion_time == 1650 and series.slice_thickness == 1.0
    assert series.scanning_sequence == ("SE", "IR") and series.is_3d


def test_scan_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_series(tmp_path / "nope")


@pytest.mark.serial  # a wall-clock bound: runs alone, after the parallel phase
def test_scan_is_fast(tmp_path):
    for number in range(6):
        write_series(tmp_path, number + 1, f"AX T2 FSE {number}", n=100, tr=5000, te=100)
    start = time.perf_counter()
    series = scan_series(tmp_path)
    elapsed = time.perf_counter() - start
    assert sum(s.n_instances for s in series) == 600
    assert elapsed < 10, f"scanning 600 headers took {elapsed:.1f} s"


# ----------------------------------------------------------------------------
# Selection on the synthetic study
# ----------------------------------------------------------------------------


def test_select_full_study(study, rules):
    root, uids = study
    result = select_series(scan_series(root), rules)
    chosen = {role: s.series_uid for role, s in result.roles.items()}
    assert chosen == {"t1": uids["t1_3d"], "t1c": uids["t1c_3d"], "t2": uids["t2"],
                      "flair": uids["flair_3d"]}
    assert result.missing_optional == []


def _entry(result_or_error, number: int) -> dict:
    return next(e for e in result_or_error.considered if e["series_number"] == number)


def test_considered_explains_every_series(study, rules):
    root, _ = study
    result = select_series(scan_series(root), rules)
    assert [e["series_number"] for e in result.considered] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]

    localizer = _entry(result, 1)
    assert localizer["selected_as"] is None
    assert all(not v["matched"] for v in localizer["roles"].values())
    assert "ImageType contains LOCALIZER" in localizer["roles"]["t1"]["why"]

    # Post-contrast T1 without post words: kept out of T1 by ContrastBolusAgent.
    t1c = _entry(result, 8)
    assert t1c["selected_as"] == "T1c"
    assert t1c["roles"]["t1"]["why"] == "rejected: post-contrast (ContrastBolusAgent 'GADOVIST')"
    assert t1c["roles"]["t1c"]["why"] == "selected"

    flair_2d = _entry(result, 7)
    assert flair_2d["roles"]["flair"]["matched"]
    assert "preferred (3D acquisition)" in flair_2d["roles"]["flair"]["why"]
    assert "#5 'SAG T2 FLAIR 3D'" in flair_2d["roles"]["flair"]["why"]

    assert "ImageType is DERIVED" in _entry(result, 6)["roles"]["t2"]["why"]
    assert "ImageType is DERIVED" in _entry(result, 9)["roles"]["t1c"]["why"]
    assert "preferred (3D acquisition)" in _entry(result, 10)["roles"]["t1c"]["why"]
    assert "preferred (3D acquisition)" in _entry(result, 2)["roles"]["t1"]["why"]
    # T2 and FLAIR kept apart by the description and the inversion pulse.
    assert "flair" in _entry(result, 5)["roles"]["t2"]["why"]
    assert "inversion-recovery" in _entry(result, 5)["roles"]["t2"]["why"]
    assert "does not match" in _entry(result, 4)["roles"]["flair"]["why"]


def test_to_dict_is_json_without_files(study, rules):
    root, _ = study
    data = select_series(scan_series(root), rules).to_dict()
    text = json.dumps(data)
    assert '"files"' not in text and str(root) not in text
    assert data["roles"]["flair"]["series_number"] == 5
    assert data["roles"]["flair"]["inversion_time_ms"] == 1800


def test_missing_flair_raises_with_readable_message(tmp_path, rules):
    write_study(tmp_path, with_flair=False)
    with pytest.raises(MissingSeriesError) as info:
        select_series(scan_series(tmp_path), rules)
    err = info.value
    message = str(err)
    assert err.missing_roles == ["flair"]
    assert message.startswith("no FLAIR series found; series considered: ")
    assert "#3 'AX T1 3D PRE' (selected as T1; not FLAIR: description does not match" in message
    assert "#4 'AX T2 FSE' (selected as T2; not FLAIR:" in message
    assert "#1 '3-PLANE LOCALIZER'" in message and "#10 'COR T1 POST GAD'" in message
    assert "rules tried: FLAIR: description matches 'flair|tirm|dark.?fluid'" in message
    assert "TI >= 1500 ms" in message
    assert len(err.considered) == 8
    # survives the trip to a worker / job store
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == message
    json.dumps(err.to_dict())


def test_missing_several_roles_and_empty_study(rules):
    with pytest.raises(MissingSeriesError) as info:
        select_series([], rules)
    assert str(info.value).startswith(
        "no T1, T1c, T2 or FLAIR series found; series considered: none")


# ----------------------------------------------------------------------------
# Rule details on in-memory headers
# ----------------------------------------------------------------------------


def header(number: int, description: str, **kw) -> SeriesHeader:
    defaults = dict(series_uid=f"1.2.3.{number}", series_number=number, description=description,
                    modality="MR", n_instances=30, n_frames=30, mr_acquisition_type="2D",
                    slice_thickness=5.0, image_type=ORIGINAL, repetition_time=500.0,
                    echo_time=10.0)
    defaults.update(kw)
    return SeriesHeader(**defaults)


def flair(number: int, description: str = "AX FLAIR", **kw) -> SeriesHeader:
    kw = dict(dict(repetition_time=9000.0, echo_time=120.0, inversion_time=2500.0,
                   scanning_sequence=("SE", "IR")), **kw)
    return header(number, description, **kw)


def default_rules_data() -> dict:
    """The packaged rules as a plain mapping, to be modified by a test."""
    text = resources.files("brainline.config").joinpath("series_rules.yaml").read_text()
    return yaml.safe_load(text)


def only_flair_rules(rules: SelectionRules | None = None) -> SelectionRules:
    """Default rules with T1, T1c and T2 made optional."""
    data = default_rules_data()
    for key in ("t1", "t1c", "t2"):
        data["roles"][key]["required"] = False
    return rules_from_dict(data)


def test_3d_1mm_flair_beats_2d_5mm(rules):
    relaxed = only_flair_rules(rules)
    series = [flair(9, "AX FLAIR 5mm", slice_thickness=5.0),
              flair(4, "SAG 3D FLAIR", mr_acquisition_type="3D", slice_thickness=1.0,
                    inversion_time=1800.0, n_instances=176, n_frames=176)]
    result = select_series(series, relaxed)
    assert result.roles["flair"].series_number == 4
    assert set(result.missing_optional) == {"t1", "t1c", "t2"}


@pytest.mark.parametrize("a, b, winner", [
    (dict(slice_thickness=3.0), dict(slice_thickness=5.0), 1),       # thinner slices
    (dict(n_instances=30, n_frames=30), dict(n_instances=40, n_frames=40), 2),  # more images
    ({}, {}, 2),                                                      # later series number
    (dict(mr_acquisition_type="3D", slice_thickness=1.5), dict(slice_thickness=1.0), 1),
])
def test_preference_order(rules, a, b, winner):
    result = select_series([flair(1, **a), flair(2, **b)], only_flair_rules(rules))
    assert result.roles["flair"].series_number == winner


def test_a_lossy_compressed_copy_is_still_the_acquisition(tmp_path, rules):
    """dcmtk, and archives that lossy-compress older studies, mark the images
    DERIVED with the derivation code Lossy Compression (113040, DCM): such a
    FLAIR is selected as the acquisition it is. DERIVED with any other
    derivation as well (a reformat of the compressed images) is not."""
    lossy = (("113040", "DCM"),)
    kept = write_series(tmp_path / "a", 7, "AX T2 FLAIR", n=30, tr=9000, te=120, ti=2500, seq=["SE", "IR"],
                        image_type=("DERIVED", "PRIMARY", "M", "ND"), derivation=lossy)
    result = select_series(scan_series(tmp_path / "a"), only_flair_rules(rules))
    assert result.roles["flair"].series_uid == kept and result.roles["flair"].is_derived is False
    write_series(tmp_path / "b", 7, "AX T2 FLAIR", n=30, tr=9000, te=120, ti=2500, seq=["SE", "IR"],
                 image_type=("DERIVED", "SECONDARY"), derivation=lossy + (("113072", "DCM"),))
    with pytest.raises(MissingSeriesError, match="ImageType is DERIVED"):
        select_series(scan_series(tmp_path / "b"), only_flair_rules(rules))


@pytest.mark.parametrize("series, reason", [
    (flair(1, "AX FLAIR", inversion_time=900.0), "TI 900 ms < 1500 ms"),
    (flair(1, "AX FLAIR", slice_thickness=8.0), "slice thickness 8 mm > 7 mm"),
    (flair(1, "AX FLAIR", n_instances=5, n_frames=5), "only 5 images (< 10)"),
    (flair(1, "AX FLAIR", is_derived=True, image_type=("DERIVED", "SECONDARY")),
     "ImageType is DERIVED"),
    (flair(1, "AX FLAIR MIP", image_type=("ORIGINAL", "PRIMARY", "MIP")), "ImageType contains MIP"),
    (flair(1, "SAG T1 FLAIR", inversion_time=800.0), "description contains 't1'"),
    (flair(1, "AX FLAIR", modality="CT"), "modality CT is not MR"),
    (flair(1, "FLAIR scout"), "description contains 'scout'"),
])
def test_flair_rejections(rules, series, reason):
    with pytest.raises(MissingSeriesError) as info:
        select_series([series], only_flair_rules(rules))
    assert reason in str(info.value)


def test_t1_t1c_split_by_contrast(rules):
    series = [
        header(2, "AX T1 PRE", contrast_agent="DOTAREM"),  # explicit pre wins over the tag
        header(3, "t1_mprage_sag_post_gd", mr_acquisition_type="3D", slice_thickness=1.0),
        header(4, "T2 TSE AX", repetition_time=4000.0, echo_time=90.0),
        flair(5),
    ]
    result = select_series(series, rules)
    assert result.roles["t1"].series_number == 2
    assert result.roles["t1c"].series_number == 3
    assert result.roles["t2"].series_number == 4


@pytest.mark.parametrize("description, agent, post", [
    ("AX T1 +C", None, True),
    ("T1 MPRAGE GD", None, True),
    ("T1_POST", None, True),
    ("AX T1 CE", None, True),
    ("T1C", None, True),
    ("AX T1", "Gadovist", True),
    ("AX T1", None, False),
    ("AX T1 PRE", "Gadovist", False),
    ("T1 NON-CONTRAST", None, False),
    ("SAG MPRAGE", None, False),
])
def test_contrast_evidence(rules, description, agent, post):
    assert contrast_evidence(header(1, description, contrast_agent=agent), rules)[0] is post


def test_t2_rejects_inversion_and_short_te(rules):
    t2_rules = only_flair_rules(rules)
    data_t2 = t2_rules.roles["t2"]
    stir = header(1, "AX T2 TSE", repetition_time=5000.0, echo_time=80.0, inversion_time=160.0)
    gre = header(2, "AX T2 FFE", repetition_time=600.0, echo_time=20.0)
    assert any("inversion-recovery" in r for r in evaluate_role(stir, data_t2, t2_rules))
    reasons = evaluate_role(gre, data_t2, t2_rules)
    assert "TR 600 ms < 2000 ms" in reasons and "TE 20 ms < 60 ms" in reasons


def test_scanning_sequence_decides_inversion():
    """ScanningSequence is authoritative; InversionTime only counts without it."""
    assert has_inversion(header(1, "x", scanning_sequence=("SE", "IR")))
    assert not has_inversion(header(1, "x", scanning_sequence=("SE",), inversion_time=900.0))
    assert has_inversion(header(1, "x", inversion_time=900.0))
    assert not has_inversion(header(1, "x", inversion_time=0.0))


def test_one_series_fills_one_role(rules):
    """A series that fits two roles goes to the role that has no other candidate."""
    data = default_rules_data()
    data["roles"]["t2"]["description_exclude"] = []
    data["roles"]["t2"]["inversion"] = "any"
    custom = rules_from_dict(data)
    both = flair(5, "AX T2 FLAIR", mr_acquisition_type="3D", slice_thickness=1.0,
                 repetition_time=9000.0, echo_time=120.0)
    t2_only = header(4, "AX T2 FSE", repetition_time=5000.0, echo_time=100.0)
    result = select_series([header(2, "AX T1"), header(3, "AX T1 POST"), t2_only, both], custom)
    assert result.roles["flair"].series_number == 5
    assert result.roles["t2"].series_number == 4


def test_enhanced_flair_is_selected(tmp_path, rules):
    write_enhanced_flair(tmp_path, 12, n_frames=40)
    write_series(tmp_path, 7, "AX T2 FLAIR", n=30, tr=9000, te=120, ti=2500, seq=["SE", "IR"])
    result = select_series(scan_series(tmp_path), only_flair_rules(rules))
    assert result.roles["flair"].series_number == 12


# ----------------------------------------------------------------------------
# Rules loading and validation
# ----------------------------------------------------------------------------


def test_default_rules(rules):
    assert list(rules.roles) == ["t1", "t1c", "t2", "flair"]
    assert [r.label for r in rules.roles.values()] == ["T1", "T1c", "T2", "FLAIR"]
    assert all(r.required is None for r in rules.roles.values())  # the model decides
    assert rules.roles["flair"].parameters["inversion_time"].min == 1500
    assert rules.roles["t1c"].contrast == "required" and rules.roles["t1"].contrast == "forbidden"
    assert rules.roles["t2"].inversion == "forbidden"


def test_load_rules_from_path(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"roles": {"flair": {
        "description_include": ["flair"], "parameters": {"inversion_time": {"min": 1200}}}}}))
    rules = load_rules(path)
    assert list(rules.roles) == ["flair"] and rules.roles["flair"].label == "FLAIR"
    assert rules.source == str(path)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["roles"]["flair"].update(description_include=["flair("]),
     r"roles\.flair\.description_include\[0\]: invalid regular expression"),
    (lambda d: d["roles"]["t1c"].update(contrast="maybe"),
     r"roles\.t1c\.contrast: must be one of required, forbidden, any"),
    (lambda d: d["roles"]["t2"].update(colour="blue"), r"roles\.t2: unknown key\(s\) colour"),
    (lambda d: d["roles"]["t2"]["parameters"].update(flip_angle={"min": 90}),
     r"roles\.t2\.parameters: unknown key\(s\) flip_angle"),
    (lambda d: d["roles"]["t2"]["parameters"].update(echo_time={"min": 100, "max": 50}),
     r"roles\.t2\.parameters\.echo_time: min 100 is larger than max 50"),
    (lambda d: d["defaults"].update(min_instances="ten"), r"defaults\.min_instances"),
    (lambda d: d["roles"]["flair"].update(required="yes"), r"roles\.flair\.required"),
    (lambda d: d.update(roles={}), r"roles: must be a non-empty mapping"),
    (lambda d: d.update(version=2), r"version: unsupported version 2"),
])
def test_rules_validation_errors(mutate, expected):
    data = default_rules_data()
    mutate(data)
    with pytest.raises(RulesError, match=expected):
        rules_from_dict(data, source="test.yaml")


def test_load_rules_bad_file(tmp_path):
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("roles: [unclosed\n")
    with pytest.raises(RulesError, match="not valid YAML"):
        load_rules(bad)
