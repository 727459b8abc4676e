"""Run a MONAI bundle (e.g. the model zoo's ``brats_mri_segmentation``) with
the bundle's own preprocessing, network, inferer and postprocessing.

Bundle layout::

    <bundle>/configs/inference.json   (or inference.yaml / .yml)
    <bundle>/configs/metadata.json    (optional: name, version, channel names)
    <bundle>/models/model.pt          (state dict for ``network_def``) or
    <bundle>/models/model.ts          (TorchScript)

The config is parsed with :class:`monai.bundle.ConfigParser`; ``bundle_root``
and ``device`` are overridden, ``SaveImage``/``SaveImaged`` steps are removed
from pre- and postprocessing (the result is kept in memory), and the sections
``preprocessing``, ``network_def``, ``inferer`` and ``postprocessing`` are
instantiated. Our input replaces the bundle's datalist: a dict
``{image_key: [file per role in input_order]}`` (``input_format="files"``, what
the zoo bundle's ``LoadImaged`` expects) or ``{image_key: <4D NIfTI>}``
(``input_format="stacked"``, channels last like the MSD data).

The result is brought back onto the reference grid: directly when the
postprocessed prediction already lies on it (e.g. through the bundle's
``Invertd``), otherwise by nearest-neighbour resampling of the label map
using the prediction's affine.

Note: bundle configs contain Python expressions (``"$..."``) that are
evaluated on load: only load bundles you trust.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .base import (
    BUNDLE_CONFIG_NAMES,
    DEFAULT_INPUT_ORDER,
    DEFAULT_LABEL_MAP,
    DEFAULT_REGIONS,
    ChannelInputBackend,
    SegmentationError,
    SegmentationInput,
    SegmentationOutput,
    check_inputs,
    image_from_ras_affine,
    map_label_values,
    normalize_input_order,
    normalize_label_map,
    normalize_regions,
    reference_affine_ras,
    region_name,
    regions_to_labels,
    role_name,
    segmentation_backend,
)

_SAVE_TARGETS = ("SaveImage", "SaveImaged")
_DATALIST_KEYS = ("test_datalist", "datalist", "data_list", "test_data", "testing_datalist")


def resolve_torch_device(device: str | None) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a torch device string; SegmentationError
    when CUDA is asked for and not usable."""
    import torch

    dev = str(device or "cpu").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "gpu":
        dev = "cuda"
    if dev == "cpu":
        return "cpu"
    if dev == "cuda" or dev.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise SegmentationError(
                f"device {device!r} was requested but CUDA is not available (torch "
                f"{torch.__version__}, {build}); set device: cpu (or auto)")
        if ":" in dev:
            idx = int(dev.split(":", 1)[1])
            if idx >= torch.cuda.device_count():
                raise SegmentationError(
                    f"device {device!r} was requested but only {torch.cuda.device_count()} GPU(s) exist")
        return dev
    raise SegmentationError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _target_name(item) -> str:
    if isinstance(item, Mapping):
        return str(item.get("_target_", "")).rsplit(".", 1)[-1]
    return ""


def _channel_names(meta: dict, section: str) -> tuple[str | None, list[str] | None, int | None]:
    """(key, channel names, num_channels) of the first input/output in metadata."""
    fmt = (meta or {}).get("network_data_format", {}).get(section, {})
    if not isinstance(fmt, Mapping) or not fmt:
        return None, None, None
    key, spec = next(iter(fmt.items()))
    if not isinstance(spec, Mapping):
        return key, None, None
    names = None
    cdef = spec.get("channel_def")
    if isinstance(cdef, Mapping) and cdef:
        try:
            names = [cdef[k] for k in sorted(cdef, key=lambda k: int(k))]
        except (TypeError, ValueError):
            names = list(cdef.values())
    n = spec.get("num_channels")
    return key, names, (int(n) if isinstance(n, int) else None)


@segmentation_backend("monai_bundle", "bundle", "monai")
class MonaiBundleBackend(ChannelInputBackend):
    """Segmentation with a MONAI bundle folder (see module doc)."""

    name = "monai_bundle"

    def __init__(self, path, device: str = "cpu", input_order=None, channel_map=None,
                 roi_size=None, overlap: float | None = None, sw_batch_size: int | None = None,
                 threshold: float = 0.5, input_format: str = "files", image_key: str | None = None,
                 pred_key: str | None = None, config_file: str | None = None,
                 weights: str | None = None, amp: bool | None = None):
        import torch
        from monai.bundle import ConfigParser

        self.root = Path(path).expanduser().resolve()
        if not self.root.is_dir():
            raise SegmentationError(f"MONAI bundle folder {self.root} does not exist")
        what = f"MONAI bundle {self.root.name}"

        # -- config & metadata ----------------------------------------------
        if config_file:
            cfg = Path(config_file)
            cfg = cfg if cfg.is_absolute() else self.root / cfg
            if not cfg.is_file():
                raise SegmentationError(f"{what}: config file {cfg} does not exist")
        else:
            found = [self.root / "configs" / n for n in BUNDLE_CONFIG_NAMES
                     if (self.root / "configs" / n).is_file()]
            if not found:
                raise SegmentationError(
                    f"{what}: no configs/inference.json (or .yaml) in {self.root}")
            cfg = found[0]
        self.config_path = cfg
        self.metadata: dict = {}
        meta_path = self.root / "configs" / "metadata.json"
        if meta_path.is_file():
            try:
                self.metadata = json.loads(meta_path.read_text())
            except (OSError, ValueError) as exc:
                raise SegmentationError(f"{what}: cannot read {meta_path}: {exc}") from exc
        self.model_name = str(self.metadata.get("name") or self.root.name)
        self.model_version = str(self.metadata.get("version") or "unknown")

        self.device = resolve_torch_device(device)
        self.threshold = float(threshold)
        if input_format not in ("files", "stacked"):
            raise SegmentationError(f"{what}: input_format must be 'files' or 'stacked', not {input_format!r}")
        self.input_format = input_format

        parser = ConfigParser()
        try:
            parser.read_config(str(cfg))
        except Exception as exc:  # noqa: BLE001 - any parse problem becomes readable
            raise SegmentationError(f"{what}: cannot parse {cfg.name}: {_short(exc)}") from exc
        if self.metadata:
            parser.read_meta(self.metadata)
        for section in ("preprocessing", "inferer", "postprocessing"):
            if section not in parser:
                raise SegmentationError(f"{what}: {cfg.name} has no '{section}' section")

        in_key, in_names, in_num = _channel_names(self.metadata, "inputs")
        out_key, out_names, _ = _channel_names(self.metadata, "outputs")
        self.image_key = image_key or in_key or "image"
        self.pred_key = pred_key or out_key or "pred"

        # -- input order -----------------------------------------------------
        if input_order is not None:
            self.input_order = normalize_input_order(input_order, what)
        elif in_names and len(in_names) > 1:
            roles = [role_name(n) for n in in_names]
            if any(r is None for r in roles):
                raise SegmentationError(
                    f"{what}: metadata names the input channels {in_names}, which are not all "
                    f"MRI sequences we know; give input_order explicitly")
            self.input_order = [r for r in roles if r is not None]  # all of them (checked above)
        else:
            self.input_order = list(DEFAULT_INPUT_ORDER)
        if len(set(self.input_order)) != len(self.input_order):
            raise SegmentationError(f"{what}: input_order repeats a role: {self.input_order}")
        n_in = len(self.input_order)
        if in_num is not None and in_num != n_in:
            raise SegmentationError(
                f"{what}: wrong number of input channels: metadata says the network takes "
                f"{in_num}, input_order has {n_in} ({', '.join(self.input_order)})")
        net_in = parser.get("network_def::in_channels")
        if isinstance(net_in, int) and net_in != n_in:
            raise SegmentationError(
                f"{what}: wrong number of input channels: network_def has in_channels={net_in}, "
                f"input_order has {n_in} ({', '.join(self.input_order)})")

        # -- output interpretation -------------------------------------------
        self._mode, self._regions, self._label_map = self._parse_channel_map(channel_map, what)
        self._meta_regions = None
        if out_names:
            regs = [region_name(n) for n in out_names]
            if all(r is not None for r in regs):
                self._meta_regions = regs

        # -- config overrides -------------------------------------------------
        parser["bundle_root"] = str(self.root)
        if "device" in parser:
            parser["device"] = f"$torch.device('{self.device}')"
        datalist = [{self.image_key: ["<input>"]}]
        for key in _DATALIST_KEYS:
            if key in parser:
                parser[key] = datalist
        for section in ("preprocessing", "postprocessing"):
            transforms = parser.get(f"{section}::transforms")
            if isinstance(transforms, list):
                parser[f"{section}::transforms"] = [
                    t for t in transforms if _target_name(t) not in _SAVE_TARGETS]
        inferer_cfg = parser.get("inferer")
        if roi_size is not None or overlap is not None or sw_batch_size is not None:
            is_sw = isinstance(inferer_cfg, Mapping) and "SlidingWindow" in _target_name(inferer_cfg)
            if not is_sw:
                if roi_size is None:
                    raise SegmentationError(
                        f"{what}: the bundle's inferer is not a sliding-window inferer; "
                        f"overlap/sw_batch_size need a roi_size as well")
                inferer_cfg = {"_target_": "SlidingWindowInferer", "roi_size": None,
                               "sw_batch_size": 1, "overlap": 0.25}
            inferer_cfg = copy.deepcopy(dict(inferer_cfg))
            if roi_size is not None:
                roi = [int(r) for r in (roi_size if isinstance(roi_size, (list, tuple)) else [roi_size] * 3)]
                if len(roi) != 3 or min(roi) <= 0:
                    raise SegmentationError(f"{what}: roi_size must be three positive integers, got {roi_size!r}")
                inferer_cfg["roi_size"] = roi
            if overlap is not None:
                if not 0 <= float(overlap) < 1:
                    raise SegmentationError(f"{what}: overlap must be in [0, 1), got {overlap!r}")
                inferer_cfg["overlap"] = float(overlap)
            if sw_batch_size is not None:
                inferer_cfg["sw_batch_size"] = int(sw_batch_size)
            parser["inferer"] = inferer_cfg
        self.inferer_config = parser.get("inferer")
        cfg_amp = parser.get("amp", False)
        self.amp = bool(cfg_amp if amp is None else amp) and self.device.startswith("cuda")

        # -- instantiate --------------------------------------------------------
        try:
            if "imports" in parser:
                parser.get_parsed_content("imports")
            self.preprocessing = parser.get_parsed_content("preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
            self.postprocessing = parser.get_parsed_content("postprocessing")
        except Exception as exc:  # noqa: BLE001
            raise SegmentationError(f"{what}: cannot build its transforms/inferer: {_short(exc)}") from exc

        # -- network & weights -------------------------------------------------
        self.weights_path = self._find_weights(weights, parser, what)
        dev = torch.device(self.device)
        if self.weights_path.suffix == ".ts":
            try:
                with warnings.catch_warnings():  # torch.jit is deprecated but zoo bundles ship .ts
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    self.network = torch.jit.load(str(self.weights_path), map_location=dev)
            except Exception as exc:  # noqa: BLE001
                raise SegmentationError(
                    f"{what}: cannot load TorchScript model {self.weights_path}: {_short(exc)}") from exc
        else:
            try:
                self.network = parser.get_parsed_content("network_def")
            except Exception as exc:  # noqa: BLE001
                raise SegmentationError(f"{what}: cannot build network_def: {_short(exc)}") from exc
            self._load_state_dict(self.network, self.weights_path, dev, what)
            self.network = self.network.to(dev)
        self.network.eval()
        self._what = what

    # ------------------------------------------------------------------
    @staticmethod
    def _parse_channel_map(channel_map, what):
        """-> (mode, regions, label_map); mode 'auto', 'regions' or 'labels'."""
        if channel_map is None:
            return "auto", None, dict(DEFAULT_LABEL_MAP)
        if isinstance(channel_map, str):
            key = channel_map.strip().lower()
            if key in ("regions", "brats_regions", "tc_wt_et"):
                return "regions", list(DEFAULT_REGIONS), None
            if key in ("labels", "brats_labels"):
                return "labels", None, dict(DEFAULT_LABEL_MAP)
            raise SegmentationError(
                f"{what}: channel_map {channel_map!r} is not understood; give a list of "
                f"channel names (e.g. [TC, WT, ET]) or {{labels: {{4: 3}}}}")
        if isinstance(channel_map, (list, tuple)):
            return "regions", normalize_regions(channel_map, what), None
        if isinstance(channel_map, Mapping):
            if "channels" in channel_map:
                return "regions", normalize_regions(channel_map["channels"], what), None
            if "labels" in channel_map:
                return "labels", None, normalize_label_map(channel_map["labels"], what, DEFAULT_LABEL_MAP)
            return "labels", None, normalize_label_map(channel_map, what, DEFAULT_LABEL_MAP)
        raise SegmentationError(f"{what}: channel_map must be a list or a mapping, not {type(channel_map).__name__}")

    def _find_weights(self, weights, parser, what) -> Path:
        if weights:
            p = Path(weights)
            p = p if p.is_absolute() else self.root / p
            if not p.is_file():
                raise SegmentationError(f"{what}: weights file {p} does not exist")
            if p.suffix != ".ts" and "network_def" not in parser:
                raise SegmentationError(f"{what}: {p.name} is a state dict but the config has no network_def")
            return p
        pt, ts = self.root / "models" / "model.pt", self.root / "models" / "model.ts"
        if pt.is_file() and "network_def" in parser:
            return pt
        if ts.is_file():
            return ts
        if pt.is_file():
            raise SegmentationError(f"{what}: models/model.pt is a state dict but the config has no network_def")
        raise SegmentationError(f"{what}: no weights: neither models/model.pt nor models/model.ts in {self.root}")

    @staticmethod
    def _load_state_dict(network, path: Path, dev, what):
        import torch

        try:
            obj = torch.load(str(path), map_location=dev, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SegmentationError(f"{what}: cannot read weights {path}: {_short(exc)}") from exc
        state = obj
        if isinstance(obj, Mapping):
            for key in ("model", "state_dict", "network", "net", "model_state_dict"):
                if isinstance(obj.get(key), Mapping):
                    state = obj[key]
                    break
        if not isinstance(state, Mapping) or not state or not all(
                isinstance(v, torch.Tensor) for v in state.values()):
            raise SegmentationError(f"{what}: {path.name} does not hold a state dict of tensors")
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SegmentationError(
                f"{what}: the weights in {path.name} do not fit network_def: {_short(exc, 400)}") from exc

    # ------------------------------------------------------------------
    def describe(self) -> dict:
        return {"backend": self.name, "model_name": self.model_name,
                "model_version": self.model_version, "device": self.device}

    def segment(self, inputs: SegmentationInput) -> SegmentationOutput:
        import torch

        t0 = time.monotonic()
        what = self._what
        ref = check_inputs(inputs, self.input_order, what)
        image: str | list[str]
        with tempfile.TemporaryDirectory(prefix="brainline-bundle-") as tmp:
            if self.input_format == "stacked":
                image = str(self._write_stacked(inputs, ref, Path(tmp)))
            else:
                image = [str(Path(inputs.paths[r]).resolve()) for r in self.input_order]
            try:
                data = self.preprocessing({self.image_key: image})
            except Exception as exc:  # noqa: BLE001
                raise SegmentationError(f"{what}: its preprocessing failed on our input: {_short(exc)}") from exc
        if isinstance(data, list):  # e.g. a cropping transform producing samples
            if len(data) != 1:
                raise SegmentationError(f"{what}: its preprocessing produced {len(data)} samples, expected 1")
            data = data[0]
        img = data.get(self.image_key) if isinstance(data, Mapping) else None
        if not isinstance(img, torch.Tensor) or img.ndim != 4:
            shape = tuple(getattr(img, "shape", ()))
            raise SegmentationError(
                f"{what}: its preprocessing should give a (channels, x, y, z) tensor under "
                f"'{self.image_key}', got {type(img).__name__} {shape}")
        if img.shape[0] != len(self.input_order):
            raise SegmentationError(
                f"{what}: wrong number of input channels after preprocessing: {img.shape[0]}, "
                f"expected {len(self.input_order)} ({', '.join(self.input_order)})")

        dev = torch.device(self.device)
        try:
            with torch.no_grad():
                batch = img.unsqueeze(0).to(dev)
                if self.amp:
                    with torch.autocast("cuda"):
                        pred = self.inferer(batch, self.network)
                else:
                    pred = self.inferer(batch, self.network)
                if isinstance(pred, (list, tuple)):
                    pred = pred[0]
                if isinstance(pred, Mapping):
                    pred = pred.get(self.pred_key, next(iter(pred.values())))
                data[self.pred_key] = pred[0].detach().float().cpu()
                del batch
                out = self.postprocessing(data)
        except SegmentationError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SegmentationError(f"{what}: inference failed: {_short(exc)}") from exc
        if isinstance(out, list):
            out = out[0]
        pred = out[self.pred_key]
        labels, resampled, mode = self._to_reference_labels(pred, ref)
        details = {
            "bundle": str(self.root), "config": self.config_path.name, "weights": self.weights_path.name,
            "device": self.device, "input_order": list(self.input_order), "output_mode": mode,
            "resampled_to_reference": resampled, "seconds": round(time.monotonic() - t0, 2),
        }
        roi = self.inferer_config.get("roi_size") if isinstance(self.inferer_config, Mapping) else None
        if roi is not None:
            details["roi_size"] = list(roi) if isinstance(roi, (list, tuple)) else roi
        return SegmentationOutput(labels=labels, backend=self.name, model_name=self.model_name,
                                  model_version=self.model_version, details=details)

    # ------------------------------------------------------------------
    def _write_stacked(self, inputs: SegmentationInput, ref: sitk.Image, tmp: Path) -> Path:
        import nibabel as nib

        arrays = [np.transpose(inputs.array(r), (2, 1, 0)) for r in self.input_order]
        img = nib.Nifti1Image(np.stack(arrays, axis=-1).astype(np.float32), reference_affine_ras(ref))
        path = tmp / "image.nii.gz"
        nib.save(img, str(path))
        return path

    def _labels_from_channels(self, arr: np.ndarray) -> tuple[np.ndarray, str]:
        """(C, x, y, z) postprocessed prediction -> (x, y, z) uint8 BraTS labels."""
        c = arr.shape[0]
        mode = self._mode
        if mode == "auto":
            if c == 1:
                mode = "labels"
            else:
                mode = "regions"
        if mode == "labels":
            values = arr[0] if c == 1 else np.argmax(arr, axis=0)
            return map_label_values(values, self._label_map), "labels"
        regions = self._regions
        if regions is None:
            if self._meta_regions is not None and len(self._meta_regions) == c:
                regions = self._meta_regions
            elif c == len(DEFAULT_REGIONS):
                regions = list(DEFAULT_REGIONS)
            else:
                raise SegmentationError(
                    f"{self._what}: the model produced {c} output channels; give channel_map "
                    f"(channel names such as [TC, WT, ET], or {{labels: ...}})")
        return regions_to_labels(arr, regions, self.threshold), "regions"

    def _to_reference_labels(self, pred, ref: sitk.Image) -> tuple[np.ndarray, bool, str]:
        import torch

        affine = None
        if hasattr(pred, "affine") and hasattr(pred, "meta"):
            affine = np.asarray(pred.affine.detach().cpu().numpy() if isinstance(pred.affine, torch.Tensor)
                                else pred.affine, dtype=float)
            if affine.ndim == 3:
                affine = affine[0]
            if str(pred.meta.get("space", "RAS")).upper() == "LPS":
                affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        if arr.ndim == 5 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise SegmentationError(
                f"{self._what}: its postprocessing gave a prediction of shape {arr.shape}; "
                f"expected (channels, x, y, z)")
        labels_xyz, mode = self._labels_from_channels(arr.astype(np.float32, copy=False))
        ref_size = tuple(ref.GetSize())
        ref_aff = reference_affine_ras(ref)
        same_shape = tuple(labels_xyz.shape) == ref_size
        if affine is None:
            if not same_shape:
                raise SegmentationError(
                    f"{self._what}: shape mismatch: the prediction is {labels_xyz.shape} voxels but "
                    f"the reference grid is {ref_size}, and it carries no affine to resample with")
            return np.ascontiguousarray(np.transpose(labels_xyz, (2, 1, 0))), False, mode
        tol = 1e-3 * max(1.0, float(np.abs(ref_aff).max()))
        if same_shape and np.allclose(affine, ref_aff, atol=tol):
            return np.ascontiguousarray(np.transpose(labels_xyz, (2, 1, 0))), False, mode
        try:
            moving = image_from_ras_affine(labels_xyz, affine)
        except SegmentationError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SegmentationError(f"{self._what}: cannot place the prediction in space: {_short(exc)}") from exc
        res = sitk.Resample(moving, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out = sitk.GetArrayFromImage(res).astype(np.uint8)
        expected = ref_size[::-1]
        if out.shape != expected:  # pragma: no cover - sitk guarantees this
            raise SegmentationError(f"{self._what}: shape mismatch after resampling: {out.shape} vs {expected}")
        return out, True, mode
