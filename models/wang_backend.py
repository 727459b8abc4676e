"""The shipped trained model, and the default segmenter that chooses it.

:class:`WangCascadeBackend` runs the BraTS 2017 cascaded anisotropic CNN of
Wang et al. (``models/wang_cascade.py``, weights in
``models/weights/brats17-wang/``) on a study brought into the BraTS frame by
the pipeline (``input_space = "brats"``: 1 mm, SRI24 frame, skull-stripped,
not bias-corrected; see ``pipelines/model_space.py``).

:class:`AutoSegmenter` is the default backend: the trained model when its
weights are installed and the study has all four sequences it was trained
on (T1, T1c, T2, FLAIR), the classical baseline otherwise (the minimal
protocol, or an install without weights); the reason is recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (
    ROLES,
    SegmentationBackend,
    SegmentationError,
    SegmentationInput,
    SegmentationOutput,
    segmentation_backend,
)

MODEL_NAME = "brats17-wang-cascade"
VERSION = "1.0"
CITATION = ("Wang G, Li W, Ourselin S, Vercauteren T. Automatic Brain Tumor Segmentation using "
            "Cascaded Anisotropic Convolutional Neural Networks. BrainLes 2017, LNCS 10670, "
            "pp. 179-190 (arXiv 1709.00382)")
LICENCE = "BSD-3-Clause, University College London (taigw/brats17); PyTorch port by BrainLine"
INTENDED_USE = ("trained on BraTS 2017 adult gliomas (pre- and post-contrast T1, T2, FLAIR); "
                "research use, not certified for clinical use")


def weights_dir() -> Path:
    from .wang_msnet import WEIGHTS_DIR
    return Path(WEIGHTS_DIR)


def missing_weights(folder: Path | None = None) -> list[str]:
    """The weight files missing from ``folder`` (empty when all nine are there)."""
    from .wang_msnet import NETWORKS
    folder = Path(folder or weights_dir())
    return [f"{stem}.safetensors" for stem, _ in NETWORKS.values()
            if not (folder / f"{stem}.safetensors").is_file()]


@segmentation_backend("brats17-wang", path_option="weights")
class WangCascadeBackend(SegmentationBackend):
    """Wang et al. cascade (whole tumour -> core -> enhancing, three views each)."""

    name = "brats17-wang"
    version = VERSION
    required_roles = ROLES
    optional_roles = ()
    input_space = "brats"
    algorithm_family = "cnn"

    def __init__(self, device: str = "cpu", seed: int = 0, weights: str | Path | None = None):
        if device not in ("cpu", "cuda"):
            raise SegmentationError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise SegmentationError("BRAINLINE_DEVICE=cuda but no CUDA device is available to PyTorch")
        self.device, self.seed = device, int(seed)
        self.weights = Path(weights) if weights else weights_dir()
        missing = missing_weights(self.weights)
        if missing:
            raise SegmentationError(f"the BraTS 2017 (Wang et al.) weights are not installed in "
                                    f"{self.weights} ({len(missing)} of 9 files missing)")

    def describe(self) -> dict:
        return {"backend": self.name, "model_name": MODEL_NAME, "model_version": self.version,
                "device": self.device, "citation": CITATION, "licence": LICENCE,
                "intended_use": INTENDED_USE}

    def segment(self, inputs: SegmentationInput) -> SegmentationOutput:
        from .wang_cascade import segment_brats

        missing = [r for r in ROLES if r not in inputs.paths]
        if missing:
            raise SegmentationError(f"the BraTS 2017 model needs T1, T1c, T2 and FLAIR; missing: {', '.join(missing)}")
        mask = inputs.mask_array()
        arrays = {}
        for role in ROLES:
            a = inputs.array(role)
            a[~mask] = 0
            arrays[role] = a
        try:
            result = segment_brats(arrays["flair"], arrays["t1"], arrays["t1c"], arrays["t2"],
                                   device=self.device, seed=self.seed, weights_dir=self.weights)
        except (ValueError, RuntimeError) as exc:
            raise SegmentationError(f"the BraTS 2017 model could not run: {exc}") from None
        details = dict(result.details)
        details.update({"citation": CITATION, "licence": LICENCE, "intended_use": INTENDED_USE,
                        "device": self.device})
        # the three views alone (same inference, same crops, same post-processing;
        # wang_cascade.view_label_maps): candidates of the segmentation QC's discord alarms
        candidates = {f"wang_{view}": np.asarray(lab, np.uint8) for view, lab in result.view_labels.items()}
        return SegmentationOutput(labels=np.asarray(result.labels, np.uint8), backend=self.name,
                                  model_name=MODEL_NAME, model_version=self.version, details=details,
                                  candidates=candidates)


@segmentation_backend("auto", path_option=None)
class AutoSegmenter(SegmentationBackend):
    """Default: the trained model with all four sequences, else the baseline.

    Declares what the baseline needs (FLAIR) as required and the rest as
    optional, so series selection asks for all four and refuses only a study
    without FLAIR; :meth:`for_roles` picks the backend for the roles found."""

    name = "auto"
    required_roles = ("flair",)
    optional_roles = ("t1", "t1c", "t2")

    def __init__(self, device: str = "cpu"):
        self.device = device

    def for_roles(self, roles) -> tuple[SegmentationBackend, str]:
        """(backend, reason in words) for a study with ``roles``."""
        from .baseline import BaselineSegmenter

        missing = [r for r in ROLES if r not in set(roles)]
        if missing:
            names = ", ".join({"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}[r] for r in missing)
            return BaselineSegmenter(), (f"the classical baseline was used because {names} "
                                         f"{'is' if len(missing) == 1 else 'are'} missing and the trained "
                                         "model needs all four sequences")
        try:
            return WangCascadeBackend(device=self.device), "the trained model (BraTS 2017, Wang et al.) was used"
        except SegmentationError as exc:
            return BaselineSegmenter(), f"the classical baseline was used: {exc}"

    def segment(self, inputs: SegmentationInput) -> SegmentationOutput:
        backend, reason = self.for_roles(inputs.paths)
        out = backend.segment(inputs)
        out.details = {**out.details, "model_choice": reason}
        return out

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device,
                "rule": "trained model with T1, T1c, T2 and FLAIR; classical baseline otherwise"}
