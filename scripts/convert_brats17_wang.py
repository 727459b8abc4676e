#!/usr/bin/env python3
"""One-off conversion of the nine BraTS 2017 MSNet checkpoints of Wang et al.
(taigw/brats17, BSD-3-Clause) from TensorFlow 1 to safetensors.

Run in a throwaway virtualenv that has TensorFlow (the product never needs it):

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 numpy safetensors
    /tmp/tfenv/bin/python scripts/convert_brats17_wang.py \
        [--src /work/shared/models/brats17-wang] [--out models/weights/brats17-wang]

For each ``model17/<stem>.ckpt`` it writes ``<out>/<stem>.safetensors`` with
the trainable variables only (conv kernels ``w``, batch-norm ``gamma`` and
``beta``, PReLU ``alpha``), float32, named as in the NiftyNet graph below the
network scope with ``/`` -> ``.``; kernels transposed from TensorFlow layout
(kD, kH, kW, in, out) / transposed-conv (kD, kH, kW, out, in) to PyTorch
(out, in, kD, kH, kW) / (in, out, kD, kH, kW). Adam slots are dropped.

Batch-norm moving averages: NiftyNet 0.2 keeps zero-debiased EMAs
(``moving_mean``, ``moving_mean/biased``, ``moving_mean/local_step``, same
for the variance); the true average would be ``biased / (1 - 0.9**local_step)``.
In all nine checkpoints every ``local_step`` is 0 and ``moving_mean`` /
``moving_variance`` are still at their initial 0 / 1: the authors' train.py
never ran the update ops (it trains and tests with ``is_training=True``, i.e.
batch statistics). The script asserts exactly that and records it in the
safetensors metadata; it stores no moving statistics because there are none.
It also copies LICENSE.txt and writes CITATION.md beside the weights.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
from safetensors.numpy import save_file

STEMS = ["msnet_wt32_20000", "msnet_wt32sg_20000", "msnet_wt32cr_20000",
         "msnet_tc32_20000", "msnet_tc32sg_20000", "msnet_tc32cr_20000",
         "msnet_en32_20000", "msnet_en32sg_20000", "msnet_en32cr_20000"]
ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_one(ckpt: Path) -> tuple[dict[str, np.ndarray], dict]:
    reader = tf.train.load_checkpoint(str(ckpt))
    shapes = reader.get_variable_to_shape_map()
    out: dict[str, np.ndarray] = {}
    steps, max_mean_abs, max_var_dev = set(), 0.0, 0.0
    scope = None
    for name in sorted(shapes):
        if "Adam" in name or name.endswith("_power"):
            continue
        value = np.asarray(reader.get_tensor(name))
        if "moving_" in name:
            if name.endswith("local_step"):
                steps.add(float(value))
            elif name.endswith("moving_variance"):
                max_var_dev = max(max_var_dev, float(np.abs(value - 1).max()))
            else:  # moving_mean, */biased
                max_mean_abs = max(max_mean_abs, float(np.abs(value).max()))
            continue
        net_scope, rest = name.split("/", 1)
        scope = scope or net_scope
        assert net_scope == scope, name
        key = rest.replace("/", ".")
        value = value.astype(np.float32)
        if key.endswith(".w"):
            assert value.ndim == 5, name
            value = np.ascontiguousarray(value.transpose(4, 3, 0, 1, 2))
        out[key] = value
    # The moving averages were never updated: nothing to de-bias.
    assert steps == {0.0} and max_mean_abs == 0.0 and max_var_dev == 0.0, (steps, max_mean_abs, max_var_dev)
    meta = {"network_scope": scope, "tensors": len(out),
            "values": int(sum(v.size for v in out.values())),
            "bn_moving_average_local_step": "0 (never updated; use batch statistics)"}
    return out, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=Path("/work/shared/models/brats17-wang"))
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "weights" / "brats17-wang")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for stem in STEMS:
        ckpt = args.src / "model17" / f"{stem}.ckpt"
        tensors, meta = convert_one(ckpt)
        src_hash = sha256(ckpt.with_name(ckpt.name + ".data-00000-of-00001"))
        meta.update({"source": f"taigw/brats17 model17/{stem}.ckpt", "source_data_sha256": src_hash,
                     "layout": "PyTorch (out,in,kD,kH,kW); transposed conv (in,out,kD,kH,kW)",
                     "licence": "BSD-3-Clause, University College London (LICENSE.txt)"})
        dst = args.out / f"{stem}.safetensors"
        save_file(tensors, str(dst), metadata={k: str(v) for k, v in meta.items()})
        manifest[stem] = {**meta, "sha256": sha256(dst), "bytes": dst.stat().st_size}
        print(f"{stem}: {meta['tensors']} tensors, {meta['values']} values, {dst.stat().st_size} bytes")
    shutil.copyfile(args.src / "LICENSE.txt", args.out / "LICENSE.txt")
    total = sum(m["bytes"] for m in manifest.values())
    print(f"total {total} bytes ({total / 2**20:.2f} MiB)")
    (args.out / "CITATION.md").write_text(CITATION.format(
        table="\n".join(f"| `{s}.safetensors` | `{m['network_scope']}` | {m['values']:,} | `{m['sha256'][:16]}…` |"
                        for s, m in manifest.items())))


CITATION = """# BraTS 2017 cascaded anisotropic CNN (Wang et al.), converted weights

If you use these weights, cite:

> Wang G, Li W, Ourselin S, Vercauteren T. *Automatic Brain Tumor
> Segmentation using Cascaded Anisotropic Convolutional Neural Networks.*
> Brainlesion: Glioma, Multiple Sclerosis, Stroke and Traumatic Brain Injuries
> (BrainLes 2017), LNCS 10670, pp. 179-190, Springer 2018. arXiv:1709.00382.
> Second place, BraTS 2017 segmentation challenge.

Source: https://github.com/taigw/brats17 (`model17/`, `util/MSNet.py`,
`test.py`), Copyright (c) 2017-2018 University College London, BSD-3-Clause
(see `LICENSE.txt` in this folder, which must travel with these files).
The original software and these weights are **not certified for clinical use**.

## What was converted

The nine TensorFlow 1 checkpoints `model17/msnet_{{wt,tc,en}}32{{,sg,cr}}_20000.ckpt`
(whole tumour / tumour core / enhancing core, each for the axial, sagittal
and coronal view) were read with `tf.train.load_checkpoint` (TensorFlow
2.21, `scripts/convert_brats17_wang.py`) and written one file per network:

| file | network scope | values | sha256 |
|---|---|---|---|
{table}

Only trainable variables are kept (conv kernels `w`, batch-norm `gamma` and
`beta`, PReLU `alpha`), float32, unchanged in value; the names are the
NiftyNet variable names below the network scope with `/` replaced by `.`;
kernels are transposed from TensorFlow (kD, kH, kW, in, out) to PyTorch
(out, in, kD, kH, kW) (transposed convolutions: (kD, kH, kW, out, in) ->
(in, out, kD, kH, kW)). Adam optimiser slots are dropped.

## Batch-norm statistics

NiftyNet 0.2 keeps zero-debiased moving averages (`moving_mean/biased`,
`moving_mean/local_step`, likewise for the variance; true mean =
`biased / (1 - 0.9**local_step)`). In all nine checkpoints every
`local_step` is 0, `biased` is 0 and `moving_mean` / `moving_variance` are
still at their initial values 0 / 1: the authors' `train.py` never ran the
update ops, and their `test.py` runs the networks with `is_training=True`,
i.e. batch norm on the statistics of each test batch (5 slabs, the last
batch padded with N(0, 1) noise slabs). There is therefore nothing to
de-bias; the conversion script asserts this, and the PyTorch port
(`models/wang_msnet.py`, `models/wang_cascade.py`) uses batch statistics
exactly as upstream. The port is proven against the original graphs by
`scripts/make_wang_fixtures.py` and `tests/test_wang_port.py`.
"""

if __name__ == "__main__":
    main()
