"""PyTorch reimplementation of MSNet (WNet / TNet / ENet) of Wang et al. 2017.

Wang G, Li W, Ourselin S, Vercauteren T. "Automatic Brain Tumor Segmentation
using Cascaded Anisotropic Convolutional Neural Networks", BrainLes 2017,
LNCS 10670, arXiv 1709.00382. Original TensorFlow 1 / NiftyNet 0.2 code:
taigw/brats17 ``util/MSNet.py`` (BSD-3-Clause, University College London);
the licence travels with the converted weights in
``models/weights/brats17-wang/LICENSE.txt``.

This is a layer-by-layer port of the NiftyNet graph, checked against the
original TensorFlow networks by ``tests/test_wang_port.py``:

* the network takes and returns channel-first ``(N, C, D, H, W)`` tensors
  (NiftyNet is channel-last ``(N, D, H, W, C)``); D is the slice axis of the
  view the network was trained for (the anisotropic ``1x3x3`` kernels act
  within a slice, the ``3x1x1`` "fuse" kernels across slices). Internally it
  runs on a slice-batch, channels-last layout: logical shape
  ``(N*D, C, H, W)`` with ``torch.channels_last`` strides, i.e. memory
  ``(N, D, H, W, C)`` like NiftyNet. In-slice kernels are 2-D convolutions
  (oneDNN runs channels-last convolutions, dilated ones included, without
  re-ordering the activations: 1.7-2x faster here than channel-first), the
  fuse kernels a sum of three matrix products ``(N*D'*H*W, C) @ (C, C)``
  per slab, and each batch norm + PReLU pair one chunked pass
  (:func:`bn_prelu`). Same arithmetic as ``conv3d`` up to float rounding
  (checked in float64: 1e-13); the returned tensor is a channel-first
  *view* of NDHWC memory;
* convolutions have no bias (NiftyNet ``ConvLayer`` / ``ConvolutionalLayer``
  / ``DeconvolutionalLayer`` defaults), every ``*_bn_prelu`` layer is
  conv -> batch norm -> PReLU, residual blocks are pre-activation
  (BN -> PReLU -> conv, twice) plus an identity path whose channels are
  zero-padded symmetrically (NiftyNet ``ElementwiseLayer('SUM')``) when the
  block widens them (4 -> 32 in ``block1_1``);
* padding follows TensorFlow ``SAME`` (asymmetric for strided convolutions:
  the extra row/column goes after) and ``VALID`` for the ``3x1x1`` fuse
  layers, so D shrinks by 2 per fuse layer; transposed convolutions are the
  adjoint of a ``SAME`` strided convolution with output size ``2 x`` input;
* the two central-slice crops (``TensorSliceLayer`` margins 2 and 1) make the
  output ``D - 8`` slices for an input of ``D`` slices (19 -> 11).

Batch normalisation: the published checkpoints were trained and are run by
the authors' ``test.py`` with ``is_training=True``, i.e. **normalised with
the statistics of the current batch**. Their moving averages were never
updated (every ``moving_mean`` is 0, ``moving_variance`` 1, ``local_step``
0 in all nine checkpoints), so there are no population statistics to use;
``bn_mode="batch"`` (the default and the upstream behaviour) is therefore
the only valid mode. ``bn_mode="moving"`` normalises with stored running
statistics and exists only for weights that have them.

Weights are loaded from safetensors written by
``scripts/convert_brats17_wang.py``; parameter names are the NiftyNet
variable names below the network scope with ``/`` replaced by ``.``
(e.g. ``block1_1.conv_0.w``), conv kernels already transposed to PyTorch
layout ``(out, in, kD, kH, kW)`` and transposed-conv kernels to
``(in, out, kD, kH, kW)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5  # NiftyNet BNLayer default (checked in the stored graphs)


def _same_pad(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one axis."""
    k_eff = (k - 1) * d + 1
    out = -(-n // s)
    total = max((out - 1) * s + k_eff - n, 0)
    return total // 2, total - total // 2


CL = torch.channels_last


def _cl(x: torch.Tensor) -> torch.Tensor:
    """The slice-batch tensor in channels-last memory (no copy when it already is)."""
    return x.contiguous(memory_format=CL)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels-last -> (B, H, W, C) view of the same memory."""
    return _cl(x).permute(0, 2, 3, 1)


#: rows (pixels) per chunk of the CPU batch-norm / PReLU passes: 32768 x 32
#: channels x 4 bytes = 4 MiB, split over the threads, so a chunk and its
#: temporaries stay in cache while the number of parallel regions (each a
#: thread barrier, slow when other processes share the cores) stays small
CHUNK_ROWS = 32768


def bn_prelu(x: torch.Tensor, bn: "BN", prelu: "PReLU", bn_mode: str, inplace: bool) -> torch.Tensor:
    """PReLU(BN(x)) on the slice-batch layout; on CPU written into ``x`` when
    ``inplace`` (x is then returned), else into a new channels-last tensor.
    Callers use the returned tensor.

    Same mathematics as ``F.prelu(F.batch_norm(x, training=True))`` (biased
    batch variance over (N*D, H, W), eps 1e-5). On CPU it runs as chunked
    passes over the ``(N*D*H*W, C)`` matrix: per-channel sums of ``x - k``
    and ``(x - k)^2`` as matrix products with a ones vector (``k``: the
    channel means of a row sample, a shift that keeps the one-pass variance
    free of cancellation), then scale/shift and PReLU chunk by chunk, so the
    activations are read twice and written once and no full-size temporary
    is allocated (the unfused ops allocate two, whose first-touch page faults
    cost as much as the arithmetic). Float32 throughout; closer to a float64
    reference than torch's own CPU batch norm. Other devices use the
    unfused torch ops."""
    if x.device.type != "cpu":  # fused kernels of the GPU libraries; nothing to gain in place
        return prelu(bn(x, bn_mode))
    x = _cl(x)
    b, c, h, w = x.shape
    X = x.permute(0, 2, 3, 1).view(-1, c)
    m = X.shape[0]
    rows = CHUNK_ROWS
    if bn_mode == "batch":
        k = X[:: max(1, m // 4096)].mean(0)
        ones = X.new_ones(1, rows)
        buf = X.new_empty(rows, c)
        s1, s2 = X.new_zeros(1, c), X.new_zeros(1, c)
        for i in range(0, m, rows):
            xc = X[i:i + rows]
            r = xc.shape[0]
            d = torch.sub(xc, k, out=buf[:r])
            s1.addmm_(ones[:, :r], d)
            d.square_()
            s2.addmm_(ones[:, :r], d)
        dm = s1[0] / m
        mean = k + dm
        var = (s2[0] / m - dm * dm).clamp_min_(0.0)
    elif bn_mode == "moving":
        mean, var = bn.moving_mean, bn.moving_variance
    else:
        raise ValueError(f"bn_mode must be 'batch' or 'moving', not {bn_mode!r}")
    scale = bn.gamma * torch.rsqrt(var + BN_EPS)
    shift = bn.beta - mean * scale
    out = x if inplace else torch.empty_like(x, memory_format=CL)
    Y = out.permute(0, 2, 3, 1).view(-1, c)
    for i in range(0, m, rows):
        yc = Y[i:i + rows]
        torch.addcmul(shift, X[i:i + rows], scale, out=yc)
        yc.copy_(F.prelu(yc, prelu.alpha))
    return out


class BN(nn.Module):
    """NiftyNet BNLayer: per-channel batch norm with gamma/beta, eps 1e-5.

    Works on the slice-batch layout ``(N*D, C, H, W)``: statistics over
    (N*D, H, W) are those of tf.nn.moments over (N, D, H, W)."""

    # registered buffers (nn.Module.__getattr__ is typed Tensor | Module)
    moving_mean: torch.Tensor
    moving_variance: torch.Tensor

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(ch))
        self.beta = nn.Parameter(torch.zeros(ch))
        self.register_buffer("moving_mean", torch.zeros(ch), persistent=False)
        self.register_buffer("moving_variance", torch.ones(ch), persistent=False)

    def forward(self, x: torch.Tensor, bn_mode: str) -> torch.Tensor:
        if bn_mode == "batch":
            # tf.nn.moments over (N, D, H, W): biased variance, as torch's training mode
            return F.batch_norm(x, None, None, self.gamma, self.beta, training=True, momentum=0.0, eps=BN_EPS)
        if bn_mode == "moving":
            return F.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                                training=False, eps=BN_EPS)
        raise ValueError(f"bn_mode must be 'batch' or 'moving', not {bn_mode!r}")


class PReLU(nn.Module):
    """NiftyNet prelu: relu(x) + alpha * (x - |x|) / 2, alpha per channel."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.alpha)


class Conv(nn.Module):
    """NiftyNet ConvLayer (no bias), TF 'SAME' or 'VALID' padding, on the
    slice-batch channels-last layout: in-slice kernels (1, kh, kw) run as 2-D
    convolutions, across-slice kernels (kd, 1, 1) as a sum of kd matrix
    products over the (H*W, C) planes of each slab."""

    def __init__(self, cin: int, cout: int, k: Sequence[int], stride: Sequence[int] = (1, 1, 1),
                 dilation: Sequence[int] = (1, 1, 1), padding: str = "SAME") -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(cout, cin, *k))
        self.k, self.stride, self.dilation, self.padding = tuple(k), tuple(stride), tuple(dilation), padding
        in_slice = self.k[0] == 1 and self.stride[0] == 1
        across = self.k[1:] == (1, 1) and self.stride == (1, 1, 1) and self.dilation == (1, 1, 1)
        if not (in_slice or (across and padding == "VALID")):
            raise NotImplementedError(f"kernel {k} stride {stride} {padding} is not used by MSNet")
        self.across = not in_slice

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.across:  # (kd, 1, 1) 'VALID': D shrinks by kd - 1
            d = b // n
            kd = self.k[0]
            dd = d - kd + 1
            xv = _nhwc(x).reshape(n, d, h * w, c)  # a view: (slab, slice, pixel, channel)
            wt = self.w[:, :, :, 0, 0].permute(2, 1, 0)  # (kd, cin, cout)
            y = x.new_empty((n, dd, h * w, wt.shape[2]))
            for i in range(n):
                yi = y[i].view(dd * h * w, -1)
                torch.mm(xv[i, 0:dd].reshape(dd * h * w, c), wt[0], out=yi)
                for t in range(1, kd):
                    yi.addmm_(xv[i, t:t + dd].reshape(dd * h * w, c), wt[t])
            return y.view(n * dd, h, w, -1).permute(0, 3, 1, 2)
        pads: list[int] = []
        if self.padding == "SAME":
            for ax in (2, 1):  # F.pad order: W then H
                pads.extend(_same_pad(x.shape[1 + ax], self.k[ax], self.stride[ax], self.dilation[ax]))
        else:
            pads = [0, 0, 0, 0]
        w2 = _cl(self.w[:, :, 0])
        x = _cl(x)
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return F.conv2d(x, w2, None, self.stride[1:], (pads[2], pads[0]), self.dilation[1:])
        return F.conv2d(_pad_cl(x, pads), w2, None, self.stride[1:], 0, self.dilation[1:])


def _pad_cl(x: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """Zero padding (w_before, w_after, h_before, h_after) of a channels-last
    slice-batch tensor into a new channels-last tensor; only the border is zeroed."""
    wb, wa, hb, ha = pads
    b, c, h, w = x.shape
    out = torch.empty((b, c, h + hb + ha, w + wb + wa), dtype=x.dtype, device=x.device, memory_format=CL)
    out[:, :, hb:hb + h, wb:wb + w] = x
    for sl in ((slice(None), slice(None), slice(0, hb)), (slice(None), slice(None), slice(hb + h, None)),
               (slice(None), slice(None), slice(None), slice(0, wb)),
               (slice(None), slice(None), slice(None), slice(wb + w, None))):
        out[sl] = 0
    return out


class Deconv(nn.Module):
    """NiftyNet DeconvolutionalLayer's conv3d_transpose, 'SAME', output = input * stride
    (in-slice kernels only, slice-batch layout)."""

    def __init__(self, cin: int, cout: int, k: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(cin, cout, *k))
        self.k, self.stride = tuple(k), tuple(stride)
        if self.k[0] != 1 or self.stride[0] != 1:
            raise NotImplementedError("only in-slice transposed convolutions are used by MSNet")

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        y = F.conv_transpose2d(_cl(x), _cl(self.w[:, :, 0]), None, self.stride[1:])
        sl = [slice(None), slice(None)]
        for ax in (1, 2):
            out = x.shape[1 + ax] * self.stride[ax]
            before, _ = _same_pad(out, self.k[ax], self.stride[ax])
            sl.append(slice(before, before + out))
        return y[tuple(sl)]


class ConvBNPReLU(nn.Module):
    """NiftyNet ConvolutionalLayer / DeconvolutionalLayer with BN and PReLU
    (variable scope ``<name>_bn_prelu`` with ``conv_``/``deconv_``, ``bn_``,
    ``prelu_acti_``)."""

    def __init__(self, cin: int, cout: int, k: Sequence[int], stride: Sequence[int] = (1, 1, 1),
                 padding: str = "SAME", deconv: bool = False) -> None:
        super().__init__()
        if deconv:
            self.deconv_ = Deconv(cin, cout, k, stride)
        else:
            self.conv_ = Conv(cin, cout, k, stride, padding=padding)
        self.bn_ = BN(cout)
        self.prelu_acti_ = PReLU(cout)
        self.is_deconv = deconv

    def forward(self, x: torch.Tensor, n: int, bn_mode: str) -> torch.Tensor:
        x = self.deconv_(x, n) if self.is_deconv else self.conv_(x, n)
        return bn_prelu(_cl(x), self.bn_, self.prelu_acti_, bn_mode, inplace=True)


class ResBlock(nn.Module):
    """Two pre-activation (BN, PReLU, conv 1x3x3) units plus identity."""

    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__()
        d = (1, dilation, dilation)
        self.bn_0, self.prelu_acti_0 = BN(cin), PReLU(cin)
        self.conv_0 = Conv(cin, cout, (1, 3, 3), dilation=d)
        self.bn_1, self.prelu_acti_1 = BN(cout), PReLU(cout)
        self.conv_1 = Conv(cout, cout, (1, 3, 3), dilation=d)
        self.cin, self.cout = cin, cout

    def forward(self, x: torch.Tensor, n: int, bn_mode: str) -> torch.Tensor:
        y = self.conv_0(bn_prelu(x, self.bn_0, self.prelu_acti_0, bn_mode, inplace=False), n)
        y = self.conv_1(bn_prelu(y, self.bn_1, self.prelu_acti_1, bn_mode, inplace=True), n)
        if self.cout > self.cin:  # ElementwiseLayer('SUM'): pad channels symmetrically
            p1 = (self.cout - self.cin) // 2
            y[:, p1:p1 + self.cin] += x
            return y
        if self.cout < self.cin:
            raise NotImplementedError("projection shortcut is not used by MSNet")
        return y.add_(x) if not torch.is_grad_enabled() else y + x


def _central_slices(x: torch.Tensor, n: int, margin: int) -> torch.Tensor:
    """TensorSliceLayer on the slice-batch layout: drop margin slices at both ends."""
    b, c, h, w = x.shape
    d = b // n
    xv = _nhwc(x).reshape(n, d, h, w, c)[:, margin:d - margin]
    return xv.reshape(n * (d - 2 * margin), h, w, c).permute(0, 3, 1, 2)


class MSNet(nn.Module):
    """WNet/TNet (``downsample_twice=True``) or ENet (``False``), 2 classes.

    Input ``(N, 4, D, H, W)`` float32, channels ``[flair, t1, t1ce, t2]``
    each normalised to zero mean / unit std over the brain (see
    :func:`brainline.models.wang_cascade.itensity_normalize_one_volume`),
    D slices along the network's view (19 at test time), H and W multiples
    of 4 (2 for ENet). Output: logits ``(N, 2, D - 8, H, W)``; softmax over
    dim 1 gives background / foreground probability.
    """

    def __init__(self, num_classes: int = 2, downsample_twice: bool = True, in_chns: int = 4,
                 base_chns: Sequence[int] = (32, 32, 32, 32)) -> None:
        super().__init__()
        c = base_chns
        if len(set(c)) != 1:
            raise NotImplementedError("feature_expand layers are not used by the published nets")
        nc = num_classes
        self.downsample_twice = downsample_twice
        self.block1_1 = ResBlock(in_chns, c[0])
        self.block1_2 = ResBlock(c[0], c[0])
        self.block2_1 = ResBlock(c[0], c[1])
        self.block2_2 = ResBlock(c[1], c[1])
        self.block3_1 = ResBlock(c[1], c[2], 1)
        self.block3_2 = ResBlock(c[2], c[2], 2)
        self.block3_3 = ResBlock(c[2], c[2], 3)
        self.block4_1 = ResBlock(c[2], c[3], 3)
        self.block4_2 = ResBlock(c[3], c[3], 2)
        self.block4_3 = ResBlock(c[3], c[3], 1)
        self.fuse1_bn_prelu = ConvBNPReLU(c[0], c[0], (3, 1, 1), padding="VALID")
        self.fuse2_bn_prelu = ConvBNPReLU(c[1], c[1], (3, 1, 1), padding="VALID")
        self.fuse3_bn_prelu = ConvBNPReLU(c[2], c[2], (3, 1, 1), padding="VALID")
        self.fuse4_bn_prelu = ConvBNPReLU(c[3], c[3], (3, 1, 1), padding="VALID")
        s2 = (1, 2, 2)
        k = (1, 3, 3)
        if downsample_twice:
            self.downsample1_bn_prelu = ConvBNPReLU(c[0], c[0], k, s2)
            self.pred_up1_bn_prelu = ConvBNPReLU(c[0], nc, k, s2, deconv=True)
            self.pred_up2_2_bn_prelu = ConvBNPReLU(nc * 2, nc * 2, k, s2, deconv=True)
            self.pred_up3_2_bn_prelu = ConvBNPReLU(nc * 4, nc * 4, k, s2, deconv=True)
        else:
            self.pred1 = Conv(c[0], nc, k)
        self.downsample2_bn_prelu = ConvBNPReLU(c[1], c[1], k, s2)
        self.pred_up2_1_bn_prelu = ConvBNPReLU(c[2], nc * 2, k, s2, deconv=True)
        self.pred_up3_1_bn_prelu = ConvBNPReLU(c[3], nc * 4, k, s2, deconv=True)
        self.final_pred = Conv(nc * 7, nc, k)

    def forward(self, x: torch.Tensor, bn_mode: str = "batch") -> torch.Tensor:
        m = bn_mode
        n, c, d, h, w = x.shape
        # slice-batch channels-last layout: logical (N*D, C, H, W), memory (N, D, H, W, C);
        # every layer but the fuse ones acts within slices. No copy when x is a
        # channel-first view of NDHWC memory (as the cascade passes it).
        x = x.permute(0, 2, 3, 4, 1).reshape(n * d, h, w, c).permute(0, 3, 1, 2)
        f1 = self.block1_2(self.block1_1(x, n, m), n, m)
        f1 = self.fuse1_bn_prelu(f1, n, m)
        if self.downsample_twice:
            f1 = self.downsample1_bn_prelu(f1, n, m)
        f1 = self.block2_2(self.block2_1(f1, n, m), n, m)
        f1 = self.fuse2_bn_prelu(f1, n, m)

        f2 = self.downsample2_bn_prelu(f1, n, m)
        f2 = self.block3_3(self.block3_2(self.block3_1(f2, n, m), n, m), n, m)
        f2 = self.fuse3_bn_prelu(f2, n, m)

        f3 = self.block4_3(self.block4_2(self.block4_1(f2, n, m), n, m), n, m)
        f3 = self.fuse4_bn_prelu(f3, n, m)

        p1 = _central_slices(f1, n, 2)  # TensorSliceLayer(margin=2)
        del f1
        if self.downsample_twice:
            p1 = self.pred_up1_bn_prelu(p1, n, m)
        else:
            p1 = self.pred1(p1, n)
        p2 = _central_slices(f2, n, 1)  # TensorSliceLayer(margin=1)
        del f2
        p2 = self.pred_up2_1_bn_prelu(p2, n, m)
        if self.downsample_twice:
            p2 = self.pred_up2_2_bn_prelu(p2, n, m)
        p3 = self.pred_up3_1_bn_prelu(f3, n, m)
        del f3
        if self.downsample_twice:
            p3 = self.pred_up3_2_bn_prelu(p3, n, m)
        y = self.final_pred(_cl(torch.cat([p1, p2, p3], dim=1)), n)
        dd = y.shape[0] // n
        # (N, nc, D', H, W) view of NDHWC memory
        return _nhwc(y).reshape(n, dd, y.shape[2], y.shape[3], y.shape[1]).permute(0, 4, 1, 2, 3)


#: network key -> (checkpoint stem, downsample_twice)
NETWORKS = {
    "wt_ax": ("msnet_wt32_20000", True), "wt_sg": ("msnet_wt32sg_20000", True),
    "wt_cr": ("msnet_wt32cr_20000", True),
    "tc_ax": ("msnet_tc32_20000", True), "tc_sg": ("msnet_tc32sg_20000", True),
    "tc_cr": ("msnet_tc32cr_20000", True),
    "en_ax": ("msnet_en32_20000", False), "en_sg": ("msnet_en32sg_20000", False),
    "en_cr": ("msnet_en32cr_20000", False),
}

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "brats17-wang"


def load_msnet(key: str, weights_dir: str | Path | None = None,
               device: str | torch.device = "cpu") -> MSNet:
    """One of the nine published networks (key in :data:`NETWORKS`), eval()."""
    from safetensors.torch import load_file

    stem, twice = NETWORKS[key]
    path = Path(weights_dir or WEIGHTS_DIR) / f"{stem}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"MSNet weights {path} not found (run scripts/convert_brats17_wang.py)")
    net = MSNet(2, downsample_twice=twice)
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path.name}: missing {missing}, unexpected {unexpected}")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device)
