"""Cascade and multi-view fusion inference of Wang et al. (BraTS 2017), in PyTorch.

A port of the authors' ``test.py`` and ``util/{data_loader,data_process,
train_test_func}.py`` (taigw/brats17, BSD-3-Clause, University College
London; see ``models/weights/brats17-wang/LICENSE.txt``), followed step by
step with the networks of :mod:`brainline.models.wang_msnet`:

1. crop all four sequences to the bounding box of FLAIR > 0 plus 5 voxels;
   ``weight`` = cropped FLAIR > 0;
2. normalise each sequence (``itensity_normalize_one_volume``): mean and
   standard deviation over its nonzero voxels, zero voxels replaced with
   N(0, 1) noise;
3. whole tumour (WNet) in the axial, sagittal and coronal views, each run on
   19-slice slabs (11 central output slices) covering the cropped volume,
   with the in-plane size adapted to the image (rounded up to a multiple of 4,
   at least 180x160 / 160x180 / 160x160), batches of 5 slabs; the three
   views' softmax probabilities are averaged, argmax, times ``weight``;
4. closing (3D, 18-connectivity), components larger than 2000 voxels, their
   bounding box plus 5 voxels -> tumour-core networks (TNet, 96x96 in-plane,
   adaptive if the box is larger), same three-view fusion, times ``weight``;
5. closing, largest two components of the core, bounding box plus 5 ->
   enhancing-core networks (ENet), same fusion;
6. post-processing as upstream: closing and size-filtered components of the
   whole tumour, core kept inside the whole tumour (``remove_external_core``),
   largest two core components, enhancing core inside the core and dropped
   when smaller than 30 voxels.

Batch norm uses the statistics of each batch of 5 slabs, exactly as the
authors run their networks (``is_training=True``; the checkpoints hold no
usable moving averages, see :mod:`brainline.models.wang_msnet`). The last
batch of each view is padded with N(0, 1) noise slabs like upstream.

Randomness: upstream draws N(0, 1) noise from NumPy's global generator for the
background of the normalised volumes, for slab regions outside the volume and
for the padding slabs. This port draws the same numbers in the same order from
``np.random.RandomState(seed)`` (default seed 0), so a run is deterministic
and equals what upstream would compute after ``np.random.seed(seed)``.

Upstream quirk kept on purpose (``upstream_tail_overwrite=True``): the
padding slabs of the last batch are written back, like real slabs, at the
last slab position, so the last 10 slices of each view's probability map
come from a noise input. Set it to False to drop the padding outputs instead.

Views: besides the fused result, each view's own labels are returned
(``WangResult.view_labels``, at no extra inference): that view's argmax at
each level, through the same post-processing (step 6), on the same crops,
which come from the fused result (:func:`view_label_maps`). They are
candidates for the segmentation QC's discord alarms; they are not independent
of the fused result (it is their average).

Labels: upstream writes BraTS labels 2 (whole tumour), 1 (core), 4
(enhancing); here they map to BrainLine's 2 = edema, 1 = necrotic /
non-enhancing core, 3 = enhancing tumour (``models/base.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage

if TYPE_CHECKING:  # torch is imported where it runs, not with this module
    import torch

    from .wang_msnet import MSNet

NCR, ED, ET = 1, 2, 3  # BrainLine labels (models/base.py)

# config17/test_all_class.txt: data_shape / label_shape per network, [D, H, W]
SHAPES = {
    "wt_ax": ([19, 180, 160], [11, 180, 160]), "wt_sg": ([19, 160, 180], [11, 160, 180]),
    "wt_cr": ([19, 160, 160], [11, 160, 160]),
    "tc_ax": ([19, 96, 96], [11, 96, 96]), "tc_sg": ([19, 96, 96], [11, 96, 96]),
    "tc_cr": ([19, 96, 96], [11, 96, 96]),
    "en_ax": ([19, 96, 96], [11, 96, 96]), "en_sg": ([19, 96, 96], [11, 96, 96]),
    "en_cr": ([19, 96, 96], [11, 96, 96]),
}
BATCH_SIZE = 5      # test.py default
MARGIN = 5          # roi_patch_margin default and data_loader margin
WT_THRESHOLD = 2000  # voxels, test.py
CLASS_NUM = 2
DATA_CHANNEL = 4

#: ([min_z, min_y, min_x], [max_z, max_y, max_x]), inclusive (get_ND_bounding_box)
BBox = Sequence[Sequence[int]]
#: one network's inference: NDHWC float32 batch -> NDHWC softmax
Runner = Callable[[np.ndarray], np.ndarray]
_ScalarT = TypeVar("_ScalarT", bound=np.generic)


# ---------------------------------------------------------------------------
# util/data_process.py (verbatim semantics)
# ---------------------------------------------------------------------------

def itensity_normalize_one_volume(volume: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """(volume - mean) / std over voxels > 0; voxels == 0 get N(0, 1) noise."""
    pixels = volume[volume > 0]
    mean = pixels.mean()
    std = pixels.std()
    out = (volume - mean) / std
    out_random = rng.normal(0, 1, size=volume.shape)
    out[volume == 0] = out_random[volume == 0]
    return out


def get_ND_bounding_box(label: np.ndarray, margin: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """Inclusive [min, max] index of the nonzero region, widened by margin, clipped."""
    input_shape = label.shape
    if isinstance(margin, int):
        margin = [margin] * len(input_shape)
    indxes = np.nonzero(label)
    idx_min = [max(int(indxes[i].min()) - margin[i], 0) for i in range(len(input_shape))]
    idx_max = [min(int(indxes[i].max()) + margin[i], input_shape[i] - 1) for i in range(len(input_shape))]
    return idx_min, idx_max


def crop_ND_volume_with_bounding_box(volume: npt.NDArray[_ScalarT], min_idx: Sequence[int],
                                     max_idx: Sequence[int]) -> npt.NDArray[_ScalarT]:
    return volume[tuple(slice(a, b + 1) for a, b in zip(min_idx, max_idx))]


def set_ND_volume_roi_with_bounding_box_range(volume: npt.NDArray[_ScalarT], bb_min: Sequence[int],
                                              bb_max: Sequence[int], sub_volume: np.ndarray) -> npt.NDArray[_ScalarT]:
    volume[tuple(slice(a, b + 1) for a, b in zip(bb_min, bb_max))] = sub_volume
    return volume


def transpose_volumes(volumes: Sequence[np.ndarray], slice_direction: str) -> Sequence[np.ndarray]:
    if slice_direction == "axial":
        return volumes
    if slice_direction == "sagittal":
        return [np.transpose(x, (2, 0, 1)) for x in volumes]
    if slice_direction == "coronal":
        return [np.transpose(x, (1, 0, 2)) for x in volumes]
    raise ValueError(slice_direction)


def extract_roi_from_volume(volume: np.ndarray, in_center: Sequence[int], output_shape: Sequence[int],
                            rng: np.random.RandomState, fill: str = "random") -> npt.NDArray[np.float64]:
    """ROI of output_shape centred at in_center; outside the volume: N(0,1) noise."""
    input_shape = volume.shape
    if fill == "random":
        output = rng.normal(0, 1, size=output_shape)
    else:
        output = np.zeros(output_shape)
    r0max = [int(x / 2) for x in output_shape]
    r1max = [output_shape[i] - r0max[i] for i in range(len(r0max))]
    r0 = [min(r0max[i], in_center[i]) for i in range(len(r0max))]
    r1 = [min(r1max[i], input_shape[i] - in_center[i]) for i in range(len(r0max))]
    out_center = r0max
    output[tuple(slice(out_center[i] - r0[i], out_center[i] + r1[i]) for i in range(3))] = \
        volume[tuple(slice(in_center[i] - r0[i], in_center[i] + r1[i]) for i in range(3))]
    return output


def set_roi_to_volume(volume: npt.NDArray[_ScalarT], center: Sequence[int],
                      sub_volume: np.ndarray) -> npt.NDArray[_ScalarT]:
    volume_shape = volume.shape
    patch_shape = sub_volume.shape
    for i in range(len(center)):
        if center[i] >= volume_shape[i]:
            return volume
    r0max = [int(x / 2) for x in patch_shape]
    r1max = [patch_shape[i] - r0max[i] for i in range(len(r0max))]
    r0 = [min(r0max[i], center[i]) for i in range(len(r0max))]
    r1 = [min(r1max[i], volume_shape[i] - center[i]) for i in range(len(r0max))]
    patch_center = r0max
    n = len(center)
    volume[tuple(slice(center[i] - r0[i], center[i] + r1[i]) for i in range(n))] = \
        sub_volume[tuple(slice(patch_center[i] - r0[i], patch_center[i] + r1[i]) for i in range(n))]
    return volume


def _component_mask(labeled_array: np.ndarray, labels: np.ndarray) -> npt.NDArray[np.bool_]:
    # upstream compares with np.where(sizes == s)[0] + 1, which breaks when two
    # components have the same size; np.isin keeps all of them instead.
    return np.isin(labeled_array, labels)


def get_largest_two_component(img: np.ndarray, print_info: bool = False,
                              threshold: int | None = None) -> np.ndarray:
    """Largest component (plus the second if it is > 1/10 of the first), or, with
    threshold, every component larger than threshold voxels."""
    s = ndimage.generate_binary_structure(3, 2)
    labeled_array, numpatches = ndimage.label(img, s)
    sizes = ndimage.sum(img, labeled_array, range(1, numpatches + 1))
    sizes_list = sorted(sizes[i] for i in range(len(sizes)))
    if len(sizes) == 1:
        return img
    if threshold:
        out_img = np.zeros_like(img)
        for temp_size in sizes_list:
            if temp_size > threshold:
                temp_cmp = _component_mask(labeled_array, np.where(sizes == temp_size)[0] + 1)
                out_img = (out_img + temp_cmp) > 0
        return out_img
    if len(sizes) == 0:  # upstream would fail on an empty mask
        return img
    max_size1, max_size2 = sizes_list[-1], sizes_list[-2]
    component1 = _component_mask(labeled_array, np.where(sizes == max_size1)[0] + 1)
    component2 = _component_mask(labeled_array, np.where(sizes == max_size2)[0] + 1)
    if max_size2 * 10 > max_size1:
        component1 = (component1 + component2) > 0
    return component1


def remove_external_core(lab_main: np.ndarray, lab_ext: np.ndarray) -> np.ndarray:
    """Keep the components of lab_ext that lie at least half inside lab_main."""
    s = ndimage.generate_binary_structure(3, 2)
    labeled_array, numpatches = ndimage.label(lab_ext, s)
    sizes = ndimage.sum(lab_ext, labeled_array, range(1, numpatches + 1))
    new_lab_ext = np.zeros_like(lab_ext)
    for i in range(len(sizes)):
        componenti = labeled_array == (i + 1)
        overlap = componenti * lab_main
        if (overlap.sum() + 0.0) / sizes[i] >= 0.5:
            new_lab_ext = np.maximum(new_lab_ext, componenti)
    return new_lab_ext


# ---------------------------------------------------------------------------
# util/train_test_func.py
# ---------------------------------------------------------------------------

class _Runner:
    """Runs one MSNet on NDHWC numpy batches, returning NDHWC softmax."""

    def __init__(self, net: MSNet, device: torch.device) -> None:
        self.net, self.device = net, device

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        # NDHWC memory is the network's internal layout: pass a channel-first view of it
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            logits = self.net(x.permute(0, 4, 1, 2, 3), bn_mode="batch")
            p = torch.softmax(logits.permute(0, 2, 3, 4, 1), dim=-1)
        return p.cpu().numpy()


def volume_probability_prediction(temp_imgs: Sequence[np.ndarray], data_shape: Sequence[int],
                                  label_shape: Sequence[int], data_channel: int, class_num: int,
                                  batch_size: int, run: Runner, rng: np.random.RandomState,
                                  upstream_tail_overwrite: bool = True) -> npt.NDArray[np.float64]:
    """Slab-wise prediction along axis 0 of (D, H, W) volumes -> (D, H, W, class_num)."""
    [D, H, W] = temp_imgs[0].shape
    input_center = [int(D / 2), int(H / 2), int(W / 2)]
    temp_prob = np.zeros([D, H, W, class_num])
    sub_image_baches: list[np.ndarray] = []
    half = int(label_shape[0] / 2)
    for center_slice in range(half, D + half, label_shape[0]):
        center_slice = min(center_slice, D - half)
        sub_image_bach = []
        for chn in range(data_channel):
            temp_input_center = [center_slice, input_center[1], input_center[2]]
            sub_image_bach.append(extract_roi_from_volume(temp_imgs[chn], temp_input_center, data_shape, rng))
        sub_image_baches.append(np.asarray(sub_image_bach, np.float32))
    total_batch = len(sub_image_baches)
    max_mini_batch = int((total_batch + batch_size - 1) / batch_size)
    sub_label_idx = 0
    for mini_batch_idx in range(max_mini_batch):
        data_mini_batch = sub_image_baches[mini_batch_idx * batch_size:
                                           min((mini_batch_idx + 1) * batch_size, total_batch)]
        n_real = len(data_mini_batch)
        if mini_batch_idx == max_mini_batch - 1:
            for _ in range(batch_size - (total_batch - mini_batch_idx * batch_size)):
                data_mini_batch.append(rng.normal(0, 1, size=[data_channel] + list(data_shape)))
        batch = np.transpose(np.asarray(data_mini_batch, np.float32), [0, 2, 3, 4, 1])
        prob_mini_batch = run(batch)
        n_write = prob_mini_batch.shape[0] if upstream_tail_overwrite else n_real
        for batch_idx in range(n_write):
            center_slice = sub_label_idx * label_shape[0] + half
            center_slice = min(center_slice, D - half)
            temp_input_center = [center_slice, input_center[1], input_center[2], int(class_num / 2)]
            sub_prob = np.reshape(prob_mini_batch[batch_idx], list(label_shape) + [class_num])
            temp_prob = set_roi_to_volume(temp_prob, temp_input_center, sub_prob)
            sub_label_idx = sub_label_idx + 1
    return temp_prob


def _dynamic_shapes(shape_dhw: Sequence[int], data_shape: Sequence[int],
                    label_shape: Sequence[int]) -> tuple[list[int], list[int]]:
    [D, H, W] = shape_dhw
    Hx = max(int((H + 3) / 4) * 4, data_shape[1])
    Wx = max(int((W + 3) / 4) * 4, data_shape[2])
    return [data_shape[0], Hx, Wx], [label_shape[0], Hx, Wx]


VIEWS = ("axial", "sagittal", "coronal")


def test_one_image_three_nets_adaptive_shape(temp_imgs: Sequence[np.ndarray], keys: Sequence[str],
                                             runners: Mapping[str, Runner], shape_mode: int, batch_size: int,
                                             rng: np.random.RandomState, upstream_tail_overwrite: bool = True,
                                             view_masks: list[np.ndarray] | None = None) -> np.ndarray:
    """Average of the axial, sagittal and coronal networks' probabilities, (D, H, W, 2).

    shape_mode 1: fixed tensor shape when the image fits, else adaptive; 2: adaptive.

    view_masks: a list, or None. When given, each view's own decision
    ``argmax`` of its probabilities (uint8 0/1, (D, H, W), in the axis order
    of ``temp_imgs``) is appended to it in :data:`VIEWS` order: the same
    probabilities that are averaged, so no extra inference and no change to
    the returned average."""
    out: list[np.ndarray] = []
    for key, direction, back in zip(keys, VIEWS, (None, [1, 2, 0, 3], [1, 0, 2, 3])):
        data_shape, label_shape = SHAPES[key]
        vols = transpose_volumes(temp_imgs, direction)
        _, h, w = vols[0].shape
        if not (shape_mode == 0 or (shape_mode == 1 and h <= data_shape[1] and w <= data_shape[2])):
            data_shape, label_shape = _dynamic_shapes(vols[0].shape, data_shape, label_shape)
        prob = volume_probability_prediction(vols, data_shape, label_shape, DATA_CHANNEL, CLASS_NUM,
                                             batch_size, runners[key], rng, upstream_tail_overwrite)
        prob = prob if back is None else np.transpose(prob, back)
        if view_masks is not None:
            view_masks.append(np.asarray(np.argmax(prob, axis=3), np.uint8))
        out.append(prob)
    return (out[0] + out[1] + out[2]) / 3.0


# ---------------------------------------------------------------------------
# test.py
# ---------------------------------------------------------------------------

def fuse_cascade_levels(pred1: np.ndarray, pred2: np.ndarray, pred3: np.ndarray,
                        bbox1: BBox, bbox2: BBox) -> npt.NDArray[np.uint8]:
    """test.py 5.4 (fuse the three levels, post-process) and 5.5 (labels).

    pred1: whole-tumour decision on the brain crop; pred2: core decision on
    the crop ``bbox1`` of it; pred3: enhancing decision on the crop ``bbox2``
    of that (each already multiplied by the crop of ``weight``). Returns
    BrainLine labels (uint8, 1 NCR / 2 ED / 3 ET) on the brain crop."""
    struct = ndimage.generate_binary_structure(3, 2)
    label3_roi = np.zeros_like(pred2)
    label3_roi = set_ND_volume_roi_with_bounding_box_range(label3_roi, bbox2[0], bbox2[1], pred3)
    label3 = np.zeros_like(pred1)
    label3 = set_ND_volume_roi_with_bounding_box_range(label3, bbox1[0], bbox1[1], label3_roi)
    label2 = np.zeros_like(pred1)
    label2 = set_ND_volume_roi_with_bounding_box_range(label2, bbox1[0], bbox1[1], pred2)

    label1_mask = (pred1 + label2 + label3) > 0
    label1_mask = ndimage.binary_closing(label1_mask, structure=struct)
    label1_mask = get_largest_two_component(label1_mask, False, WT_THRESHOLD)
    label1 = pred1 * label1_mask

    label2_3_mask = (label2 + label3) > 0
    label2_3_mask = label2_3_mask * label1_mask
    label2_3_mask = ndimage.binary_closing(label2_3_mask, structure=struct)
    label2_3_mask = remove_external_core(label1, label2_3_mask)
    if label2_3_mask.sum() > 0:
        label2_3_mask = get_largest_two_component(label2_3_mask)
    label1 = (label1 + label2_3_mask) > 0
    label2 = label2_3_mask
    label3 = label2 * label3
    vox_3 = np.asarray(label3 > 0, np.float32).sum()
    if 0 < vox_3 < 30:
        label3 = np.zeros_like(label2)

    # 5.5 labels: upstream nii 2 / 1 / 4 -> BrainLine ED / NCR / ET
    out_label = np.asarray(label1, np.uint8) * ED
    out_label[label2 > 0] = NCR
    out_label[label3 > 0] = ET
    return out_label


def view_label_maps(view_masks: Sequence[Sequence[np.ndarray]], weights: Sequence[np.ndarray],
                    bbox1: BBox, bbox2: BBox) -> dict[str, np.ndarray]:
    """Each view's own labels, built exactly like the fused labels.

    view_masks: for each level (whole tumour, core, enhancing) the list of the
    three views' ``argmax`` decisions (see
    :func:`test_one_image_three_nets_adaptive_shape`) on that level's crop;
    weights: the crop of ``weight`` of each level. For one view: its own
    decision at each level times the level's weight, then
    :func:`fuse_cascade_levels` (closing, components > 2000 voxels of the whole
    tumour, core kept inside it and its largest two components, enhancing
    inside the core, dropped under 30 voxels). Not per view: the crops. The
    core and enhancing networks ran once, on the boxes derived from the
    *fused* whole tumour and core (``bbox1``, ``bbox2``, fallbacks included),
    so a view's core and enhancing decisions exist only inside those boxes;
    normalisation, noise and padding are shared as well. Returns
    {view: uint8 labels on the brain crop}."""
    w1, w2, w3 = weights
    out: dict[str, np.ndarray] = {}
    for i, view in enumerate(VIEWS):
        out[view] = fuse_cascade_levels(view_masks[0][i] * w1, view_masks[1][i] * w2,
                                        view_masks[2][i] * w3, bbox1, bbox2)
    return out


@dataclass
class WangResult:
    """Output of :func:`segment_brats`; arrays are (z, y, x) like the inputs."""

    labels: np.ndarray                      # uint8, 0 / NCR=1 / ED=2 / ET=3
    probabilities: dict[str, np.ndarray]    # float32 foreground probability: "wt", "tc", "et"
    details: dict[str, Any] = field(default_factory=dict)
    #: "axial" / "sagittal" / "coronal": uint8 labels (like ``labels``) of each
    #: view alone; see :func:`view_label_maps` for what is applied per view.
    view_labels: dict[str, np.ndarray] = field(default_factory=dict)


_NET_CACHE: dict[tuple[str, str], dict[str, MSNet]] = {}


def load_networks(device: str = "cpu", weights_dir: str | Path | None = None) -> dict[str, MSNet]:
    """The nine networks (cached per device and folder)."""
    from .wang_msnet import NETWORKS, load_msnet

    key = (str(device), str(weights_dir))
    if key not in _NET_CACHE:
        _NET_CACHE[key] = {k: load_msnet(k, weights_dir, device) for k in NETWORKS}
    return _NET_CACHE[key]


def segment_brats(flair: np.ndarray, t1: np.ndarray, t1c: np.ndarray, t2: np.ndarray, *,
                  device: str = "cpu", seed: int = 0, weights_dir: str | Path | None = None,
                  batch_size: int = BATCH_SIZE, upstream_tail_overwrite: bool = True,
                  num_threads: int | None = None) -> WangResult:
    """Segment a glioma with the cascade of Wang et al. (BraTS 2017).

    Inputs: four skull-stripped volumes on the same 1 mm isotropic grid in a
    BraTS-like (SRI24) frame, axis order (z, y, x) as returned by
    ``sitk.GetArrayFromImage`` of a BraTS NIfTI (upstream's
    ``load_nifty_volume_as_array`` order, [Depth, Height, Width]), raw
    intensities (background exactly 0). The order is upstream's
    ``[flair, t1, t1ce, t2]``.

    Returns labels (BrainLine: 1 NCR/NET, 2 edema, 3 enhancing) and the fused
    three-view foreground probabilities of the whole-tumour, tumour-core and
    enhancing networks, each on the full input grid (0 outside the region a
    network was run on), and ``view_labels``: the labels of the axial,
    sagittal and coronal networks alone (:func:`view_label_maps`).
    ``device``: "cpu" or "cuda". ``seed``: for the N(0,1) noise that upstream
    draws (background, out-of-volume padding, batch padding).
    """
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = torch.device(device)
    runners = {k: _Runner(n, dev) for k, n in load_networks(str(dev), weights_dir).items()}
    rng = np.random.RandomState(seed)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    # data_loader.load_data: crop to FLAIR > 0 with margin 5, weight, normalise
    vols_in = [np.asarray(v, np.float32) for v in (flair, t1, t1c, t2)]
    shape0 = vols_in[0].shape
    if any(v.shape != shape0 for v in vols_in):
        raise ValueError(f"inputs differ in shape: {[v.shape for v in vols_in]}")
    if not (vols_in[0] > 0).any():
        raise ValueError("the FLAIR volume is empty")
    temp_bbox = get_ND_bounding_box(vols_in[0], MARGIN)
    # FLAIR > 0 on the crop (float32 -> float64 is exact: same as testing the float64 crop)
    temp_weight = np.asarray(crop_ND_volume_with_bounding_box(vols_in[0], *temp_bbox) > 0, np.float32)
    temp_imgs = [itensity_normalize_one_volume(crop_ND_volume_with_bounding_box(v, *temp_bbox).astype(np.float64), rng)
                 for v in vols_in]  # in channel order: the noise is drawn in upstream's order

    struct = ndimage.generate_binary_structure(3, 2)
    margin = MARGIN
    # each view's own decision per level, from the probabilities that are averaged
    view_masks: list[list[np.ndarray]] = [[], [], []]
    # 5.1 whole tumour
    t = time.perf_counter()
    prob1 = test_one_image_three_nets_adaptive_shape(temp_imgs, ("wt_ax", "wt_sg", "wt_cr"), runners, 2,
                                                     batch_size, rng, upstream_tail_overwrite,
                                                     view_masks[0])
    timings["wt_s"] = time.perf_counter() - t
    pred1 = np.asarray(np.argmax(prob1, axis=3), np.uint16) * temp_weight

    # 5.2 tumour core
    fallback = False
    if pred1.sum() == 0:
        bbox1 = get_ND_bounding_box(temp_imgs[0] > 0, margin)
        fallback = True
    else:
        pred1_lc = ndimage.binary_closing(pred1, structure=struct)
        pred1_lc = get_largest_two_component(pred1_lc, False, WT_THRESHOLD)
        if not np.any(pred1_lc):  # upstream would fail here (no component > 2000 voxels)
            pred1_lc = pred1 > 0
            fallback = True
        bbox1 = get_ND_bounding_box(pred1_lc, margin)
    sub_imgs = [crop_ND_volume_with_bounding_box(one_img, bbox1[0], bbox1[1]) for one_img in temp_imgs]
    sub_weight = crop_ND_volume_with_bounding_box(temp_weight, bbox1[0], bbox1[1])
    t = time.perf_counter()
    prob2 = test_one_image_three_nets_adaptive_shape(sub_imgs, ("tc_ax", "tc_sg", "tc_cr"), runners, 1,
                                                     batch_size, rng, upstream_tail_overwrite,
                                                     view_masks[1])
    timings["tc_s"] = time.perf_counter() - t
    pred2 = np.asarray(np.argmax(prob2, axis=3), np.uint16) * sub_weight

    # 5.3 enhancing core
    if pred2.sum() == 0:
        [roid, roih, roiw] = sub_imgs[0].shape
        bbox2 = [0, 0, 0], [roid - 1, roih - 1, roiw - 1]
        subsub_imgs = sub_imgs
        subsub_weight = sub_weight
    else:
        pred2_lc = ndimage.binary_closing(pred2, structure=struct)
        pred2_lc = get_largest_two_component(pred2_lc)
        bbox2 = get_ND_bounding_box(pred2_lc, margin)
        subsub_imgs = [crop_ND_volume_with_bounding_box(one_img, bbox2[0], bbox2[1]) for one_img in sub_imgs]
        subsub_weight = crop_ND_volume_with_bounding_box(sub_weight, bbox2[0], bbox2[1])
    t = time.perf_counter()
    prob3 = test_one_image_three_nets_adaptive_shape(subsub_imgs, ("en_ax", "en_sg", "en_cr"), runners, 1,
                                                     batch_size, rng, upstream_tail_overwrite,
                                                     view_masks[2])
    timings["en_s"] = time.perf_counter() - t
    pred3 = np.asarray(np.argmax(prob3, axis=3), np.uint16) * subsub_weight

    # 5.4 fuse results at 3 levels, 5.5 labels
    out_label = fuse_cascade_levels(pred1, pred2, pred3, bbox1, bbox2)
    final_label = np.zeros(shape0, np.uint8)
    final_label = set_ND_volume_roi_with_bounding_box_range(final_label, temp_bbox[0], temp_bbox[1], out_label)

    # fused probabilities on the full grid
    def _full(p_roi: np.ndarray, boxes: Sequence[BBox]) -> npt.NDArray[np.float32]:
        """Foreground probability of a nested ROI (boxes outermost first) on the full grid."""
        full = np.zeros(shape0, np.float32)
        offs = [sum(bb[0][i] for bb in boxes) for i in range(3)]
        inner = p_roi[..., 1]
        full[tuple(slice(o, o + n) for o, n in zip(offs, inner.shape))] = inner
        return full

    probs = {"wt": _full(prob1, [temp_bbox]), "tc": _full(prob2, [temp_bbox, bbox1]),
             "et": _full(prob3, [temp_bbox, bbox1, bbox2])}
    del prob1, prob2, prob3, temp_imgs, sub_imgs, subsub_imgs  # before the per-view post-processing

    # the three views alone, on the same crops (derived from the fused result)
    t = time.perf_counter()
    view_labels: dict[str, np.ndarray] = {}
    for view, lab in view_label_maps(view_masks, (temp_weight, sub_weight, subsub_weight),
                                     bbox1, bbox2).items():
        full = np.zeros(shape0, np.uint8)
        view_labels[view] = set_ND_volume_roi_with_bounding_box_range(full, temp_bbox[0], temp_bbox[1], lab)
    del view_masks
    timings["views_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    details = {"seed": seed, "bn_mode": "batch", "batch_size": batch_size, "device": str(dev),
               "upstream_tail_overwrite": upstream_tail_overwrite, "fallback_bbox": fallback,
               "brain_bbox_zyx": [list(map(int, temp_bbox[0])), list(map(int, temp_bbox[1]))],
               "wt_bbox_zyx_in_brain_crop": [list(map(int, bbox1[0])), list(map(int, bbox1[1]))],
               "core_bbox_zyx_in_wt_crop": [list(map(int, bbox2[0])), list(map(int, bbox2[1]))],
               "timings": {k: round(v, 2) for k, v in timings.items()}}
    return WangResult(final_label, probs, details, view_labels)
