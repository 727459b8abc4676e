"""Run an ONNX segmentation network with onnxruntime.

Model folder::

    <folder>/model.onnx
    <folder>/model.yaml

``model.yaml`` (every key optional, defaults shown)::

    name: <folder name>            # reported model name
    version: unknown               # reported model version
    input_order: [t1c, t1, t2, flair]   # roles, one per input channel
    spatial_axes: xyz              # model tensor is (N, C, x, y, z) like MONAI/nibabel;
                                   # zyx for (N, C, z, y, x) like SimpleITK/nnU-Net
    normalization: zscore_nonzero  # per channel over its nonzero voxels; or none;
                                   # or {percentile: [0.5, 99.5]}: brain-mask percentiles
                                   # mapped to [0, 1], clipped, 0 outside the mask
    roi_size: [128, 128, 128]      # sliding window (in spatial_axes order), or whole;
                                   # default: the model's fixed input size, else whole
    overlap: 0.5
    sw_batch_size: 1
    blend_mode: constant           # or gaussian
    divisible_by: 1                # pad the volume to a multiple of this (roi_size: whole)
    output: sigmoid_channels       # or softmax_labels
    channels: [TC, WT, ET]         # sigmoid_channels: what each channel is (TC/WT/ET/NCR/ED/BG)
    threshold: 0.5                 # sigmoid_channels: probability threshold
    apply_activation: true         # sigmoid_channels: the model outputs logits
    labels: {0: 0, 1: 1, 2: 2, 3: 3}   # softmax_labels: class index (or label value of a
                                   # one-channel output) -> BraTS 2023 label; entries
                                   # update that identity map plus 4 -> 3 (BraTS 2017-2020)
    input_name: <first input>
    output_name: <first output>
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .base import (
    DEFAULT_INPUT_ORDER,
    DEFAULT_LABEL_MAP,
    DEFAULT_REGIONS,
    ChannelInputBackend,
    SegmentationError,
    SegmentationInput,
    SegmentationOutput,
    check_inputs,
    map_label_values,
    normalize_input_order,
    normalize_label_map,
    normalize_regions,
    regions_to_labels,
    segmentation_backend,
)

_YAML_KEYS = {
    "name", "version", "description", "input_order", "spatial_axes", "normalization", "roi_size",
    "overlap", "sw_batch_size", "blend_mode", "divisible_by", "output", "channels", "threshold",
    "apply_activation", "labels", "input_name", "output_name",
}


def normalize_channel(a: np.ndarray, method, mask: np.ndarray | None = None) -> np.ndarray:
    """Intensity normalisation of one channel (float32 in, float32 out)."""
    a = np.asarray(a, dtype=np.float32)
    if method in (None, "none"):
        return a
    if method == "zscore_nonzero":
        out = a.copy()
        nz = a != 0
        if nz.any():
            vals = a[nz].astype(np.float64)
            std = vals.std()
            out[nz] = ((vals - vals.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
        return out
    if isinstance(method, Mapping) and "percentile" in method:
        lo_p, hi_p = method["percentile"]
        sel = mask if mask is not None and mask.any() else a != 0
        if not sel.any():
            return np.zeros_like(a)
        lo, hi = np.percentile(a[sel], [lo_p, hi_p])
        out = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0).astype(np.float32)
        if mask is not None:
            out[~mask] = 0.0
        return out
    raise SegmentationError(f"unknown normalization {method!r}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


@segmentation_backend("onnx")
class OnnxBackend(ChannelInputBackend):
    """Segmentation with an ONNX model folder (see module doc)."""

    name = "onnx"

    def __init__(self, path, device: str = "cpu", threads: int | None = None, roi_size=None,
                 overlap: float | None = None, sw_batch_size: int | None = None):
        import onnxruntime as ort
        import yaml

        self.root = Path(path).expanduser().resolve()
        if self.root.is_file() and self.root.suffix == ".onnx":
            self.root = self.root.parent
        what = f"ONNX model {self.root.name}"
        self._what = what
        model_path = self.root / "model.onnx"
        if not self.root.is_dir():
            raise SegmentationError(f"ONNX model folder {self.root} does not exist")
        if not model_path.is_file():
            raise SegmentationError(f"{what}: no model.onnx in {self.root}")
        cfg_path = self.root / "model.yaml"
        if not cfg_path.is_file():
            raise SegmentationError(f"{what}: no model.yaml in {self.root} (input_order, normalization, output, ...)")
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SegmentationError(f"{what}: cannot read model.yaml: {exc}") from exc
        if not isinstance(cfg, Mapping):
            raise SegmentationError(f"{what}: model.yaml must be a mapping of settings")
        unknown = sorted(set(cfg) - _YAML_KEYS)
        if unknown:
            raise SegmentationError(
                f"{what}: unknown model.yaml key(s) {', '.join(map(str, unknown))}; "
                f"supported: {', '.join(sorted(_YAML_KEYS))}")
        self.config = dict(cfg)

        self.input_order = normalize_input_order(cfg.get("input_order", DEFAULT_INPUT_ORDER), what)
        axes = str(cfg.get("spatial_axes", "xyz")).lower()
        if axes not in ("xyz", "zyx"):
            raise SegmentationError(f"{what}: spatial_axes must be xyz or zyx, not {axes!r}")
        self.spatial_axes = axes
        norm = cfg.get("normalization", "zscore_nonzero")
        if isinstance(norm, Mapping):
            p = norm.get("percentile")
            if (set(norm) != {"percentile"} or not isinstance(p, (list, tuple)) or len(p) != 2
                    or not 0 <= float(p[0]) < float(p[1]) <= 100):
                raise SegmentationError(
                    f"{what}: normalization must be zscore_nonzero, none or {{percentile: [lo, hi]}} "
                    f"with 0 <= lo < hi <= 100, got {norm!r}")
            norm = {"percentile": [float(p[0]), float(p[1])]}
        elif norm is None or str(norm).lower() == "none":
            norm = "none"
        elif str(norm).lower() != "zscore_nonzero":
            raise SegmentationError(
                f"{what}: normalization must be zscore_nonzero, none or {{percentile: [lo, hi]}}, got {norm!r}")
        else:
            norm = "zscore_nonzero"
        self.normalization = norm

        self.output = str(cfg.get("output", "sigmoid_channels")).lower()
        if self.output not in ("sigmoid_channels", "softmax_labels"):
            raise SegmentationError(f"{what}: output must be sigmoid_channels or softmax_labels, not {self.output!r}")
        self.channels = normalize_regions(cfg.get("channels", DEFAULT_REGIONS), what)
        self.threshold = float(cfg.get("threshold", 0.5))
        self.apply_activation = bool(cfg.get("apply_activation", True))
        labels = cfg.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise SegmentationError(f"{what}: labels must be a mapping {{model label: BraTS 2023 label}}")
        self.label_map = normalize_label_map(labels, what, DEFAULT_LABEL_MAP)

        self.overlap = float(overlap if overlap is not None else cfg.get("overlap", 0.5))
        if not 0 <= self.overlap < 1:
            raise SegmentationError(f"{what}: overlap must be in [0, 1), got {self.overlap}")
        self.sw_batch_size = int(sw_batch_size if sw_batch_size is not None else cfg.get("sw_batch_size", 1))
        self.blend_mode = str(cfg.get("blend_mode", "constant"))
        if self.blend_mode not in ("constant", "gaussian"):
            raise SegmentationError(f"{what}: blend_mode must be constant or gaussian")
        self.divisible_by = int(cfg.get("divisible_by", 1))
        if self.divisible_by < 1:
            raise SegmentationError(f"{what}: divisible_by must be >= 1")

        # -- session ---------------------------------------------------------------
        self.device, providers = self._providers(ort, device, what)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise SegmentationError(f"{what}: onnxruntime cannot load model.onnx: {exc}") from exc
        if self.device.startswith("cuda") and "CUDAExecutionProvider" not in self.session.get_providers():
            raise SegmentationError(
                f"{what}: device {device!r} was requested but onnxruntime could not start its CUDA "
                f"provider (missing CUDA/cuDNN libraries?); set device: cpu (or auto)")

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = cfg.get("input_name") or inputs[0].name
        self.output_name = cfg.get("output_name") or outputs[0].name
        in_meta = {i.name: i for i in inputs}.get(self.input_name)
        out_meta = {o.name: o for o in outputs}.get(self.output_name)
        if in_meta is None or out_meta is None:
            raise SegmentationError(
                f"{what}: model has inputs {[i.name for i in inputs]} and outputs "
                f"{[o.name for o in outputs]}; input_name/output_name do not match")
        if len(inputs) > 1:
            raise SegmentationError(f"{what}: models with more than one input are not supported")
        in_shape = list(in_meta.shape)
        if len(in_shape) != 5:
            raise SegmentationError(
                f"{what}: the model input {self.input_name} has shape {in_shape}; expected "
                f"(batch, channels, d1, d2, d3)")
        if isinstance(in_shape[1], int) and in_shape[1] != len(self.input_order):
            raise SegmentationError(
                f"{what}: wrong number of input channels: the model takes {in_shape[1]}, "
                f"input_order has {len(self.input_order)} ({', '.join(self.input_order)})")
        out_shape = list(out_meta.shape)
        if len(out_shape) != 5:
            raise SegmentationError(f"{what}: the model output {self.output_name} has shape {out_shape}; expected 5-D")
        n_out = out_shape[1] if isinstance(out_shape[1], int) else None
        if n_out is not None and self.output == "sigmoid_channels" and n_out != len(self.channels):
            raise SegmentationError(
                f"{what}: the model has {n_out} output channels but channels names "
                f"{len(self.channels)} ({', '.join(self.channels)})")
        if n_out is not None and self.output == "softmax_labels" and n_out > 1:
            unmapped = [i for i in range(n_out) if i not in self.label_map]
            if unmapped:
                raise SegmentationError(
                    f"{what}: output classes {unmapped} have no entry in labels {self.label_map}")
        if isinstance(in_shape[0], int) and in_shape[0] == 1:
            self.sw_batch_size = 1
        fixed = in_shape[2:] if all(isinstance(d, int) and d > 0 for d in in_shape[2:]) else None
        self.fixed_spatial = fixed

        roi = roi_size if roi_size is not None else cfg.get("roi_size")
        if roi is None:
            roi = fixed if fixed is not None else "whole"
        if isinstance(roi, str):
            if roi.lower() != "whole":
                raise SegmentationError(f"{what}: roi_size must be three integers or 'whole', not {roi!r}")
            roi = "whole"
        else:
            roi = [int(r) for r in (roi if isinstance(roi, (list, tuple)) else [roi] * 3)]
            if len(roi) != 3 or min(roi) <= 0:
                raise SegmentationError(f"{what}: roi_size must be three positive integers, got {roi_size!r}")
            if fixed is not None and roi != fixed:
                raise SegmentationError(
                    f"{what}: roi_size {roi} does not match the model's fixed input size {fixed}")
        self.roi_size: str | list[int] = roi

        meta = self.session.get_modelmeta()
        custom = dict(getattr(meta, "custom_metadata_map", {}) or {})
        self.model_name = str(cfg.get("name") or custom.get("name") or self.root.name)
        self.model_version = str(cfg.get("version") or custom.get("version") or "unknown")

    # ------------------------------------------------------------------
    @staticmethod
    def _providers(ort, device, what):
        dev = str(device or "cpu").strip().lower()
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        if dev == "auto":
            dev = "cuda" if has_cuda else "cpu"
        if dev == "gpu":
            dev = "cuda"
        if dev == "cpu":
            return "cpu", ["CPUExecutionProvider"]
        if dev == "cuda" or dev.startswith("cuda:"):
            if not has_cuda:
                raise SegmentationError(
                    f"{what}: device {device!r} was requested but this onnxruntime has no "
                    f"CUDAExecutionProvider (available: {', '.join(available)}); install "
                    f"onnxruntime-gpu or set device: cpu (or auto)")
            idx = int(dev.split(":", 1)[1]) if ":" in dev else 0
            return dev, [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        raise SegmentationError(f"{what}: unknown device {device!r}; use cpu, cuda, cuda:N or auto")

    def describe(self) -> dict:
        return {"backend": self.name, "model_name": self.model_name,
                "model_version": self.model_version, "device": self.device}

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        except Exception as exc:  # noqa: BLE001
            raise SegmentationError(f"{self._what}: onnxruntime failed on input {tuple(x.shape)}: {exc}") from exc
        if out.ndim != 5 or out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != tuple(x.shape[2:]):
            raise SegmentationError(
                f"{self._what}: shape mismatch: input {tuple(x.shape)} gave output {tuple(out.shape)}; "
                f"the output must be (batch, channels) + the input's spatial size")
        return out

    def _infer(self, x: np.ndarray) -> np.ndarray:
        """(C, d1, d2, d3) normalised -> (K, d1, d2, d3) raw model output."""
        spatial = x.shape[1:]
        if isinstance(self.roi_size, str):  # "whole"
            if self.fixed_spatial is not None and list(spatial) != list(self.fixed_spatial):
                raise SegmentationError(
                    f"{self._what}: shape mismatch: the model only takes {self.fixed_spatial}, the volume "
                    f"is {list(spatial)}; set roi_size for sliding-window inference")
            k = self.divisible_by
            pad = [(0, 0)] + [(0, (-s) % k) for s in spatial]
            xp = np.pad(x, pad) if any(p[1] for p in pad) else x
            out = self._run(xp[None])[0]
            return out[:, :spatial[0], :spatial[1], :spatial[2]]
        import torch
        from monai.inferers import sliding_window_inference

        def predictor(t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self._run(t.detach().cpu().numpy()))

        with torch.no_grad():
            out = sliding_window_inference(
                torch.from_numpy(np.ascontiguousarray(x[None])), roi_size=list(self.roi_size),
                sw_batch_size=self.sw_batch_size, predictor=predictor, overlap=self.overlap,
                mode=self.blend_mode)
        return out[0].numpy()

    def segment(self, inputs: SegmentationInput) -> SegmentationOutput:
        t0 = time.monotonic()
        ref = check_inputs(inputs, self.input_order, self._what)
        mask = inputs.mask_array()
        chans = [normalize_channel(inputs.array(r), self.normalization, mask) for r in self.input_order]
        x = np.stack(chans)                       # (C, z, y, x)
        if self.spatial_axes == "xyz":
            x = np.transpose(x, (0, 3, 2, 1))     # (C, x, y, z)
        out = self._infer(x).astype(np.float32, copy=False)
        if self.spatial_axes == "xyz":
            out = np.transpose(out, (0, 3, 2, 1))
        if self.output == "sigmoid_channels":
            probs = _sigmoid(out) if self.apply_activation else out
            labels = regions_to_labels(probs, self.channels, self.threshold)
        else:
            values = out[0] if out.shape[0] == 1 else np.argmax(out, axis=0)
            labels = map_label_values(values, self.label_map)
        expected = tuple(ref.GetSize())[::-1]
        if labels.shape != expected:  # pragma: no cover - guaranteed by _run's checks
            raise SegmentationError(f"{self._what}: shape mismatch: labels {labels.shape}, reference {expected}")
        details = {"model_dir": str(self.root), "device": self.device, "input_order": list(self.input_order),
                   "normalization": self.normalization, "roi_size": self.roi_size, "output": self.output,
                   "seconds": round(time.monotonic() - t0, 2)}
        return SegmentationOutput(labels=np.ascontiguousarray(labels, np.uint8), backend=self.name,
                                  model_name=self.model_name, model_version=self.model_version,
                                  details=details)
