"""Model backends (MONAI bundle, ONNX) and the backend registry, on a real
case (TCGA-DU-7294, cropped and shrunk to 3 mm so a run takes seconds).

The models are built here with known behaviour so the tests can fail:
every network computes a fixed voxel-wise rule on z-scored intensities

    TC = z(T1) > 1.5,  WT = z(FLAIR) > 1,  ET = z(T1c) > 2

(z: mean/std over the channel's nonzero voxels), which distinguishes the
input channels (a swapped input order changes the result), the output
channels (a swapped channel map changes it) and geometry (a flipped or
transposed result no longer matches).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from brainline.models.base import ED, ET, NCR, SegmentationError, SegmentationInput  # noqa: E402
from brainline.models.monai_bundle import MonaiBundleBackend  # noqa: E402
from brainline.models.onnx_backend import OnnxBackend  # noqa: E402
from brainline.models.registry import load_backend  # noqa: E402
from tests.shared_data import TCGA, require  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ORDER = ["t1c", "t1", "t2", "flair"]          # the zoo bundle's channel order
RULE = {"TC": ("t1", 1.5), "WT": ("flair", 1.0), "ET": ("t1c", 2.0)}
REGIONS = ["TC", "WT", "ET"]                  # the zoo bundle's output channels


# --------------------------------------------------------------------------
# the case and the rule
# --------------------------------------------------------------------------

def zscore_nonzero(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    out = np.zeros_like(a)
    nz = a != 0
    out[nz] = (a[nz] - a[nz].mean()) / a[nz].std()
    return out


def compose(tc, wt, et) -> np.ndarray:
    labels = np.zeros(tc.shape, np.uint8)
    labels[wt] = ED
    labels[tc] = NCR
    labels[et] = ET
    return labels


def rule_labels(arrays: dict) -> np.ndarray:
    z = {r: zscore_nonzero(arrays[r]) for r in ORDER}
    return compose(*(z[RULE[k][0]] > RULE[k][1] for k in REGIONS))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def region_dice(pred: np.ndarray, ref: np.ndarray) -> dict:
    return {"WT": dice(pred > 0, ref > 0),
            "TC": dice(np.isin(pred, (NCR, ET)), np.isin(ref, (NCR, ET))),
            "ET": dice(pred == ET, ref == ET)}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """4 sequences + brain mask on a 3 mm grid whose axes are permuted
    (direction is not identity), written as NIfTI."""
    require(TCGA / "flair.nii.gz")
    out = tmp_path_factory.mktemp("case")
    arrays, paths = {}, {}
    for role in ORDER:
        img = sitk.Cast(sitk.ReadImage(str(TCGA / f"{role}.nii.gz")), sitk.sitkFloat32)
        img = sitk.BinShrink(img[52:184, 50:214, 8:140], [3, 3, 3])
        img = sitk.PermuteAxes(img, [1, 0, 2])
        paths[role] = out / f"{role}.nii.gz"
        sitk.WriteImage(img, str(paths[role]))
        arrays[role] = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[role]), sitk.sitkFloat32))
    mask = sitk.GetImageFromArray((arrays["flair"] != 0).astype(np.uint8))
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(out / "mask.nii.gz"))
    inputs = SegmentationInput(paths=paths, brain_mask_path=out / "mask.nii.gz")
    expected = rule_labels(arrays)
    assert {int(v) for v in np.unique(expected)} == {0, NCR, ED, ET}
    return {"inputs": inputs, "arrays": arrays, "expected": expected, "dir": out}


def check_output(out, inputs, backend: str):
    ref = inputs.reference
    assert out.backend == backend
    assert out.labels.dtype == np.uint8
    assert out.labels.shape == sitk.GetArrayFromImage(ref).shape
    assert set(np.unique(out.labels).tolist()) <= {0, NCR, ED, ET}
    img = out.to_image(ref)
    assert img.GetSize() == ref.GetSize()
    assert np.allclose(img.GetDirection(), ref.GetDirection())
    assert np.allclose(img.GetOrigin(), ref.GetOrigin())


def assert_matches_rule(labels, expected, min_agreement=0.999):
    agreement = float((labels == expected).mean())
    d = region_dice(labels, expected)
    assert agreement >= min_agreement, (agreement, d)
    assert min(d.values()) > 0.99, d


# --------------------------------------------------------------------------
# a small bundle shaped like the model zoo's brats_mri_segmentation
# --------------------------------------------------------------------------

NET_DEF = {"_target_": "SegResNet", "blocks_down": [1, 1, 1, 1], "blocks_up": [1, 1, 1],
           "init_filters": 4, "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2,
           "norm": "BATCH"}


def known_segresnet():
    """A SegResNet whose output channel c is 100 * relu(z(input) - t) - 0.01
    for the rule's (input, t) of channel c: the encoder/decoder convolutions
    are zero (residual blocks become identities and the skip connection
    carries the first convolution's features to the head), the first
    convolution copies one input channel per feature (centre tap), the
    head's batch norm subtracts the threshold and its 1x1 convolution scales.
    Batch norm (in eval mode, running statistics) keeps it voxel-wise."""
    from monai.networks.nets import SegResNet

    net = SegResNet(**{k: v for k, v in NET_DEF.items() if k != "_target_"})
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
        head_norm, head_conv = net.conv_final[0], net.conv_final[2].conv
        for c, region in enumerate(REGIONS):
            role, thr = RULE[region]
            net.convInit.conv.weight[c, ORDER.index(role), 1, 1, 1] = 1.0
            head_norm.bias[c] = -thr
            head_conv.weight[c, c, 0, 0, 0] = 100.0
            head_conv.bias[c] = -0.01
    return net.eval()


ZOO_LABELS = "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"


def bundle_config(spatial=(), invert=True, zoo_labels=False, roi=(32, 32, 32)):
    pre = [{"_target_": "LoadImaged", "keys": "image", "image_only": False},
           {"_target_": "EnsureChannelFirstd", "keys": "image"},
           {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
           *spatial,
           {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]
    post = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]
    if invert:
        post.append({"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                     "orig_keys": "image", "meta_keys": "pred_meta_dict", "nearest_interp": False,
                     "to_tensor": True})
    post.append({"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5})
    if zoo_labels:
        post.append({"_target_": "Lambdad", "keys": "pred", "func": ZOO_LABELS})
    post.append({"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict",
                 "output_dir": "@output_dir", "output_postfix": "seg", "output_dtype": "uint8",
                 "resample": False, "squeeze_end_dims": True})
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "test_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, "
                         "data_list_key='testing', base_dir=@dataset_dir)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": True,
        "network_def": NET_DEF,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": True, "num_workers": 4},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 1,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network", "inferer": "@inferer",
                      "postprocessing": "@postprocessing", "val_handlers": "@handlers", "amp": True},
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
        "run": ["$@evaluator.run()"],
    }


METADATA = {
    "version": "0.4.2-test", "name": "tiny BraTS bundle",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 4,
                             "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}}},
        "outputs": {"pred": {"type": "image", "num_channels": 3,
                             "channel_def": {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}}},
    },
}


def make_bundle(root: Path, config: dict | None = None, weights: str = "pt", metadata=METADATA) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(config or bundle_config(), indent=2))
    if metadata is not None:
        (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    net = known_segresnet()
    if weights == "pt":
        torch.save(net.state_dict(), root / "models" / "model.pt")
    elif weights == "ts":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(net), str(root / "models" / "model.ts"))
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "brats_mri_segmentation")


def test_known_network_implements_the_rule(case):
    """The hand-set SegResNet really computes the rule (guards the fixture itself)."""
    z = np.stack([zscore_nonzero(case["arrays"][r]) for r in ORDER]).astype(np.float32)
    x = torch.from_numpy(z[:, :32, :40, :48].copy())[None]
    with torch.no_grad():
        y = known_segresnet()(x)[0].numpy()
    labels = compose(*(y[i] > 0 for i in range(3)))
    assert_matches_rule(labels, case["expected"][:32, :40, :48])


def test_bundle_runs_its_own_pipeline_and_inverts_orientation(case, bundle):
    backend = MonaiBundleBackend(bundle, device="cpu")
    assert backend.input_order == ORDER          # from metadata channel_def
    assert backend.describe() == {"backend": "monai_bundle", "model_name": "tiny BraTS bundle",
                                  "model_version": "0.4.2-test", "device": "cpu"}
    out = backend.segment(case["inputs"])
    check_output(out, case["inputs"], "monai_bundle")
    assert out.details["resampled_to_reference"] is False   # Invertd put it back
    assert out.details["output_mode"] == "regions"
    assert out.details["roi_size"] == [32, 32, 32]
    assert_matches_rule(out.labels, case["expected"])
    assert not (bundle / "eval").exists()       # the bundle's SaveImaged was dropped


@pytest.mark.parametrize("pixdim,roi", [(3.0, [48, 64, 48]), (2.0, [72, 88, 72])])
def test_bundle_zoo_label_output_resampled_back_to_reference(case, tmp_path, pixdim, roi):
    """Preprocessing reorients to RAS and resamples (Spacingd) and nothing inverts
    it; the postprocessing ends in the zoo's BraTS 2018 label map (4 = ET): the
    backend maps the labels and resamples the result onto the reference grid
    using the prediction's affine. At the input spacing (3 mm) this must be
    exact (a flip, transposition or one-voxel shift would not be); at 2 mm the
    intensities are interpolated, so the rule only roughly holds."""
    spacing = [{"_target_": "Spacingd", "keys": "image", "pixdim": [pixdim] * 3, "mode": "bilinear"}]
    root = make_bundle(tmp_path / "b", bundle_config(spatial=spacing, invert=False, zoo_labels=True))
    backend = MonaiBundleBackend(root, roi_size=roi, overlap=0.25)
    out = backend.segment(case["inputs"])
    check_output(out, case["inputs"], "monai_bundle")
    assert out.details["resampled_to_reference"] is True
    assert out.details["output_mode"] == "labels"
    assert set(np.unique(out.labels).tolist()) == {0, NCR, ED, ET}
    if pixdim == 3.0:
        assert_matches_rule(out.labels, case["expected"])
    else:
        d = region_dice(out.labels, case["expected"])
        assert d["WT"] > 0.75 and d["TC"] > 0.75 and d["ET"] > 0.65, d


def test_bundle_with_the_zoo_pipeline_verbatim(case, tmp_path):
    """brats_mri_segmentation's own pre/postprocessing: LoadImaged of the four
    files (no EnsureChannelFirstd), NormalizeIntensityd, then sigmoid, Invertd,
    threshold, the BraTS 2018 Lambdad (4 = ET) and SaveImaged."""
    cfg = bundle_config(invert=True, zoo_labels=True)
    cfg["preprocessing"]["transforms"] = [
        t for t in cfg["preprocessing"]["transforms"] if t["_target_"] in ("LoadImaged", "NormalizeIntensityd")]
    root = make_bundle(tmp_path / "zoo", cfg)
    out = MonaiBundleBackend(root, roi_size=[48, 64, 48]).segment(case["inputs"])
    check_output(out, case["inputs"], "monai_bundle")
    assert out.details["output_mode"] == "labels" and out.details["resampled_to_reference"] is False
    assert_matches_rule(out.labels, case["expected"])
    assert not (root / "eval").exists()


def test_bundle_torchscript_and_channel_map(case, tmp_path):
    root = make_bundle(tmp_path / "ts_bundle", weights="ts", metadata=None)
    assert (root / "models" / "model.ts").is_file() and not (root / "models" / "model.pt").exists()
    backend = MonaiBundleBackend(root, input_order=ORDER, channel_map=["TC", "WT", "ET"])
    assert backend.describe()["model_name"] == "ts_bundle"
    out = backend.segment(case["inputs"])
    check_output(out, case["inputs"], "monai_bundle")
    assert_matches_rule(out.labels, case["expected"])


def test_bundle_stacked_input(case, bundle):
    """input_format=stacked: one 4-D NIfTI (channels last, MSD style) that the
    bundle's LoadImaged + EnsureChannelFirstd turn into (4, x, y, z)."""
    out = MonaiBundleBackend(bundle, input_format="stacked", roi_size=[48, 64, 48]).segment(case["inputs"])
    check_output(out, case["inputs"], "monai_bundle")
    assert_matches_rule(out.labels, case["expected"])


def test_bundle_input_order_matters(case, bundle):
    """Swapping T2 and FLAIR must change the result (so the order is really applied)."""
    out = MonaiBundleBackend(bundle, input_order=["t1c", "t1", "flair", "t2"],
                             roi_size=[48, 48, 48]).segment(case["inputs"])
    assert region_dice(out.labels, case["expected"])["WT"] < 0.8


def test_bundle_errors(case, bundle, tmp_path):
    with pytest.raises(SegmentationError, match="wrong number of input channels"):
        MonaiBundleBackend(bundle, input_order=["t1c", "t2", "flair"])
    with pytest.raises(SegmentationError, match="unknown input role"):
        MonaiBundleBackend(bundle, input_order=["t1c", "t1", "t2", "dwi"])
    empty = tmp_path / "no_weights"
    (empty / "configs").mkdir(parents=True)
    (empty / "configs" / "inference.json").write_text(json.dumps(bundle_config()))
    with pytest.raises(SegmentationError, match="no weights"):
        MonaiBundleBackend(empty)
    with pytest.raises(SegmentationError, match="no configs/inference"):
        MonaiBundleBackend(tmp_path)
    with pytest.raises(SegmentationError, match="does not exist"):
        MonaiBundleBackend(tmp_path / "missing")
    # weights of another architecture
    wrong = make_bundle(tmp_path / "wrong", weights="none")
    from monai.networks.nets import SegResNet
    torch.save(SegResNet(init_filters=8, in_channels=4, out_channels=3).state_dict(),
               wrong / "models" / "model.pt")
    with pytest.raises(SegmentationError, match="do not fit network_def"):
        MonaiBundleBackend(wrong)
    if not torch.cuda.is_available():
        with pytest.raises(SegmentationError, match="CUDA is not available"):
            MonaiBundleBackend(bundle, device="cuda")
    assert MonaiBundleBackend(bundle, device="auto").device in ("cpu", "cuda")

    backend = MonaiBundleBackend(bundle)
    inputs = case["inputs"]
    no_flair = SegmentationInput(paths={r: p for r, p in inputs.paths.items() if r != "flair"},
                                 brain_mask_path=inputs.brain_mask_path)
    with pytest.raises(SegmentationError, match="missing flair"):
        backend.segment(no_flair)
    small = sitk.ReadImage(str(inputs.paths["t2"]))[:-2, :, :]
    sitk.WriteImage(small, str(tmp_path / "t2_small.nii.gz"))
    bad = SegmentationInput(paths={**inputs.paths, "t2": tmp_path / "t2_small.nii.gz"},
                            brain_mask_path=inputs.brain_mask_path)
    with pytest.raises(SegmentationError, match="shape mismatch"):
        backend.segment(bad)
    with pytest.raises(SegmentationError, match="output channels"):
        MonaiBundleBackend(bundle, channel_map=["TC", "WT"], roi_size=[48, 64, 48]).segment(inputs)


# --------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------

def conv_model(path: Path, weight: np.ndarray, bias: np.ndarray, pads=None, in_ch=4, fixed=None):
    """model.onnx: one Conv (N, in_ch, d1, d2, d3) -> (N, K, d1, d2, d3)."""
    from onnx import TensorProto, helper, numpy_helper

    k = weight.shape[0]
    spatial = list(fixed) if fixed else ["d1", "d2", "d3"]
    attrs = {"kernel_shape": list(weight.shape[2:])}
    if pads is not None:
        attrs["pads"] = pads
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["logits"], **attrs)], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", in_ch, *spatial])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, *spatial])],
        [numpy_helper.from_array(weight.astype(np.float32), "W"),
         numpy_helper.from_array(bias.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    return path


def rule_conv(scale=20.0, thresholds=None):
    """1x1x1 Conv: logit of channel c = scale * (x[input of c] - threshold of c)."""
    w = np.zeros((3, 4, 1, 1, 1), np.float32)
    b = np.zeros(3, np.float32)
    for c, region in enumerate(REGIONS):
        role, thr = RULE[region]
        thr = thresholds[region] if thresholds else thr
        w[c, ORDER.index(role)] = scale
        b[c] = -scale * thr
    return w, b


def write_yaml(path: Path, text: str):
    (path / "model.yaml").write_text(text)


def test_onnx_sigmoid_channels_sliding_window(case, tmp_path):
    d = conv_model(tmp_path / "sig", *rule_conv())
    write_yaml(d, "name: tiny-onnx\nversion: '2.1'\ninput_order: [t1c, t1, t2, flair]\n"
                  "normalization: zscore_nonzero\nroi_size: [24, 24, 24]\noverlap: 0.25\n"
                  "output: sigmoid_channels\nchannels: [TC, WT, ET]\nthreshold: 0.5\n")
    backend = OnnxBackend(d, threads=1)
    assert backend.describe() == {"backend": "onnx", "model_name": "tiny-onnx",
                                  "model_version": "2.1", "device": "cpu"}
    out = backend.segment(case["inputs"])
    check_output(out, case["inputs"], "onnx")
    assert out.details["roi_size"] == [24, 24, 24]
    assert_matches_rule(out.labels, case["expected"])


def test_onnx_percentile_normalization(case, tmp_path):
    thr = {"TC": 0.8, "WT": 0.6, "ET": 0.9}
    d = conv_model(tmp_path / "pct", *rule_conv(thresholds=thr))
    write_yaml(d, "normalization: {percentile: [1, 99]}\nroi_size: whole\n")
    out = OnnxBackend(d).segment(case["inputs"])
    check_output(out, case["inputs"], "onnx")
    arrays, mask = case["arrays"], case["arrays"]["flair"] != 0

    def pct(a):
        lo, hi = np.percentile(a[mask], [1, 99])
        return np.where(mask, np.clip((a - lo) / (hi - lo), 0, 1), 0)

    expected = compose(*(pct(arrays[RULE[k][0]]) > thr[k] for k in REGIONS))
    assert len(np.unique(expected)) == 4
    assert_matches_rule(out.labels, expected)


def shifted_label_model(tmp_path: Path, name: str):
    """5-class (BraTS 2020: 0, 1, 2, [3 unused], 4) model whose logits at voxel i
    come from the z-scores at voxel i-1 along the model's FIRST spatial axis."""
    w = np.zeros((5, 4, 3, 1, 1), np.float32)
    b = np.zeros(5, np.float32)
    w[1, ORDER.index("t2"), 0], b[1] = 10.0, -15.0     # NCR
    w[2, ORDER.index("flair"), 0], b[2] = 10.0, -10.0  # ED
    b[3] = -1e3                                         # never
    w[4, ORDER.index("t1c"), 0], b[4] = 20.0, -35.0    # ET (BraTS 2020 label 4)
    d = conv_model(tmp_path / name, w, b, pads=[1, 0, 0, 1, 0, 0])
    return d, w[:, :, 0, 0, 0], b


def expected_shifted(case, w, b, axis):
    z = np.stack([zscore_nonzero(case["arrays"][r]) for r in ORDER])   # (C, z, y, x)
    shifted = np.zeros_like(z)
    src = [slice(None)] * 4
    dst = [slice(None)] * 4
    src[axis + 1], dst[axis + 1] = slice(0, -1), slice(1, None)
    shifted[tuple(dst)] = z[tuple(src)]
    logits = np.einsum("kc,c...->k...", w, shifted) + b[:, None, None, None]
    cls = np.argmax(logits, axis=0)
    return np.array([0, NCR, ED, ET, ET], np.uint8)[cls]


@pytest.mark.parametrize("axes,axis", [("xyz", 2), ("zyx", 0)])
def test_onnx_softmax_labels_and_axis_order(case, tmp_path, axes, axis):
    d, w, b = shifted_label_model(tmp_path, f"lab_{axes}")
    write_yaml(d, f"spatial_axes: {axes}\nroi_size: whole\noutput: softmax_labels\n"
                  "labels: {0: 0, 1: 1, 2: 2, 4: 3}\n")
    out = OnnxBackend(d).segment(case["inputs"])
    check_output(out, case["inputs"], "onnx")
    expected = expected_shifted(case, w, b, axis)
    other = expected_shifted(case, w, b, 2 if axis == 0 else 0)
    assert len(np.unique(expected)) == 4
    assert float((out.labels == expected).mean()) >= 0.999
    assert float((out.labels == other).mean()) < float((out.labels == expected).mean())


def test_onnx_errors(case, tmp_path):
    d = conv_model(tmp_path / "e", *rule_conv())
    with pytest.raises(SegmentationError, match="no model.yaml"):
        OnnxBackend(d)
    write_yaml(d, "input_order: [t1c, t2, flair]\n")
    with pytest.raises(SegmentationError, match="wrong number of input channels"):
        OnnxBackend(d)
    write_yaml(d, "normalisation: none\n")
    with pytest.raises(SegmentationError, match="unknown model.yaml key"):
        OnnxBackend(d)
    write_yaml(d, "channels: [TC, WT]\n")
    with pytest.raises(SegmentationError, match="3 output channels"):
        OnnxBackend(d)
    write_yaml(d, "output: probabilities\n")
    with pytest.raises(SegmentationError, match="sigmoid_channels or softmax_labels"):
        OnnxBackend(d)
    write_yaml(d, "normalization: {percentile: [99, 1]}\n")
    with pytest.raises(SegmentationError, match="normalization"):
        OnnxBackend(d)
    write_yaml(d, "roi_size: whole\n")
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SegmentationError, match="CUDAExecutionProvider"):
            OnnxBackend(d, device="cuda")
    with pytest.raises(SegmentationError, match="no model.onnx"):
        OnnxBackend(tmp_path)
    no_t1 = SegmentationInput(paths={r: p for r, p in case["inputs"].paths.items() if r != "t1"},
                              brain_mask_path=case["inputs"].brain_mask_path)
    with pytest.raises(SegmentationError, match="missing t1"):
        OnnxBackend(d).segment(no_t1)
    fixed = conv_model(tmp_path / "fixed", *rule_conv(), fixed=[16, 16, 16])
    write_yaml(fixed, "roi_size: [32, 32, 32]\n")
    with pytest.raises(SegmentationError, match="fixed input size"):
        OnnxBackend(fixed)
    write_yaml(fixed, "roi_size: whole\n")
    with pytest.raises(SegmentationError, match="shape mismatch"):
        OnnxBackend(fixed).segment(case["inputs"])
    write_yaml(fixed, "{}\n")                    # default roi: the fixed size, sliding window
    out = OnnxBackend(fixed).segment(case["inputs"])
    assert out.details["roi_size"] == [16, 16, 16]
    assert_matches_rule(out.labels, case["expected"])


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

def test_registry(case, bundle, tmp_path):
    d = conv_model(tmp_path / "reg_onnx", *rule_conv())
    write_yaml(d, "name: reg\n")
    b = load_backend(str(bundle))
    assert isinstance(b, MonaiBundleBackend)
    assert set(b.describe()) == {"backend", "model_name", "model_version", "device"}
    assert isinstance(load_backend(d), OnnxBackend)
    o = load_backend({"type": "onnx", "path": str(d), "threads": 1})
    assert isinstance(o, OnnxBackend) and o.describe()["model_name"] == "reg"
    m = load_backend({"type": "monai_bundle", "path": str(bundle), "device": "cpu",
                      "roi_size": [48, 48, 48], "overlap": 0.5})
    assert m.inferer_config["roi_size"] == [48, 48, 48] and m.inferer_config["overlap"] == 0.5
    assert isinstance(load_backend({"path": str(bundle)}), MonaiBundleBackend)

    with pytest.raises(SegmentationError, match="baseline, monai_bundle, onnx"):
        load_backend({"type": "nnunet", "path": str(d)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegmentationError, match="cannot tell"):
        load_backend(str(tmp_path / "empty"))
    with pytest.raises(SegmentationError, match="does not exist"):
        load_backend(str(tmp_path / "nowhere"))
    with pytest.raises(SegmentationError, match="needs a 'path'"):
        load_backend({"type": "monai_bundle"})
    with pytest.raises(SegmentationError, match="unknown option.*colour"):
        load_backend({"type": "onnx", "path": str(d), "colour": "red"})
    with pytest.raises(SegmentationError, match="must be a mapping"):
        load_backend(42)

    try:
        from brainline.models.baseline import BaselineSegmenter
    except ImportError:
        with pytest.raises(SegmentationError, match="baseline"):
            load_backend(None)
    else:
        for spec in (None, "baseline", {"type": "baseline"}):
            backend = load_backend(spec)
            assert isinstance(backend, BaselineSegmenter) and backend.name == "baseline"


def test_pipeline_segment_step_uses_a_configured_bundle(case, bundle, tmp_path):
    """The image pipeline's segment step loads BRAINLINE_MODEL (a folder) with
    the pipeline's device and writes the label map on the reference grid."""
    import shutil

    from brainline.pipelines.image_pipeline import PipelineConfig, step_segment

    work = tmp_path / "work"
    (work / "preprocessed").mkdir(parents=True)
    for role, path in case["inputs"].paths.items():
        shutil.copy(path, work / "preprocessed" / f"{role}.nii.gz")
    shutil.copy(case["inputs"].brain_mask_path, work / "brain_mask.nii.gz")
    result = step_segment(work, PipelineConfig(model=str(bundle), device="cpu"))
    assert result["backend"] == "monai_bundle" and result["model_name"] == "tiny BraTS bundle"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "segmentation.nii.gz")))
    assert_matches_rule(labels, case["expected"])
    with pytest.raises(SegmentationError, match="cuda"):
        step_segment(tmp_path / "other", PipelineConfig(model=str(bundle), device="cuda"))
