"""Lesion location: hemisphere and lobe, from a rigid fit of the study to
the BraTS (SRI24) template, then a lobe map in the template frame.

Two methods, in this order:

* **lobe atlas** (when the site has built one, ``scripts/build_lobe_atlas.py``):
  ``lobes.nii.gz`` + ``lobes.json`` in the folder given to
  :func:`locate_points` (``lobe_atlas=``), else ``$BRAINLINE_HOME/atlas/lobes``
  (BRAINLINE_HOME defaulting to ``./var``, as for the service). It is a lobe
  label per voxel of the template frame, derived from a third-party atlas
  (Desikan-Killiany, grouped into lobes, affinely registered to the BraTS
  template); it is not distributed with BrainLine because the atlas's
  licence travels with it. A point's lobe is the map's label at its voxel;
  a point outside the labelled brain takes the nearest label within
  ``ATLAS_SEARCH_MM`` (5 mm), else "unknown". The record's "method" is
  "atlas" and its note names the atlas.
* **coordinate rules** otherwise (record "method": "coordinate rules"; the note
  says the location is approximate, not a lobe atlas). The lobes are boxes and
  slanted planes in the template frame, derived from the template brain's
  bounding box (``models/templates/brats18_t1c.nii.gz``: 1 mm, LPS physical
  space, +x = patient left, +y = posterior, +z = superior). With the brain
  bounding box normalised to

      l = (x - x_mid) / half width      (-1 right ... +1 left; midline plane x = x_mid)
      u = (y - y_front) / AP length     (0 frontal pole ... 1 occipital pole)
      h = (z - z_bottom) / height       (0 lowest brainstem/cerebellum ... 1 vertex)

  the rules, in this order, are

  - cerebellum/brainstem: h < 0.30 and u > 0.55 (below the tentorium, posterior
    fossa), or |l| < 0.2 and h < 0.35 and 0.40 < u < 0.75 (brainstem);
  - insula/deep: |l| < 0.5 and 0.30 < u < 0.65 and 0.30 < h < 0.60 (basal
    ganglia, thalamus, insula);
  - occipital: u > 0.80 (behind the parieto-occipital sulcus);
  - temporal: h < 0.45 and 0.15 < u <= 0.80 and |l| >= 0.35 (below the Sylvian
    fissure, lateral);
  - frontal: u < 0.40 + 0.15 h (in front of a central sulcus slanting back
    towards the vertex);
  - parietal: the rest.

  On the BraTS template brain they agree with the atlas lobes on 74 % of the
  voxels (README "Longitudinal follow-up").

Hemisphere (both methods): "midline" within ``midline_mm`` (5 mm) of the
template's midline plane, else "left" (+x) or "right". With the rules, a
lesion near a boundary may be given the neighbouring lobe; the report says
the location is approximate.

The fit is :func:`pipelines.model_space.fit_model_space` (rigid, Mattes MI)
with a two-level pyramid (shrink 8, 4 of the 1 mm template: 4 mm is enough for a lobe); when it fails or is
flagged, every location is "unknown".
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .model_space import MODEL_SPACE_REGISTRATION, ModelSpaceError, fit_model_space, template_image
from .registration import RegistrationError

__all__ = ["LobeMap", "AtlasLobeMap", "LobeAtlasError", "locate_points", "load_lobe_atlas",
           "default_lobe_atlas_dir", "LOBES", "LOBE_MAP_FILES"]

LOBES = ("frontal", "parietal", "temporal", "occipital", "insula/deep", "cerebellum/brainstem", "unknown")
APPROXIMATE_NOTE = ("lesion locations (hemisphere, lobe) are approximate: coordinate rules on the BraTS/SRI24 "
                    "template after a rigid fit, not a lobe atlas")
METHOD_ATLAS, METHOD_RULES = "atlas", "coordinate rules"
#: the files of a lobe map folder (scripts/build_lobe_atlas.py writes them)
LOBE_MAP_FILES = (("image", "lobes.nii.gz"), ("record", "lobes.json"))
LOBE_MAP_FORMAT = "brainline-lobe-map"
#: a point outside the map's labelled brain takes the nearest label within this distance
ATLAS_SEARCH_MM = 5.0

# cheap fit: the finest (1 mm) level is not needed for a lobe. min_step: a
# level stops when the step falls below min_step x its shrink factor; with the
# default 0.01 the 8 mm level stopped after ~5 iterations and a study rotated
# 7-11 deg from the template was fitted 1-2 deg short (once flagged as
# misregistration, every location "unknown"); 0.002 converges (< 0.2 deg) at
# about the same cost (tests/test_lesion_location.py)
LOCATION_REGISTRATION = replace(MODEL_SPACE_REGISTRATION, shrink_factors=(8, 4), smoothing_sigmas_mm=(4.0, 2.0),
                                min_step=0.002)


class LobeMap:
    """The coordinate rules on the template brain's bounding box (template
    LPS physical space, mm)."""

    def __init__(self, template: sitk.Image | None = None, midline_mm: float = 5.0):
        template = template if template is not None else template_image("t1c")
        idx = np.argwhere(sitk.GetArrayViewFromImage(template) > 0)[:, ::-1]  # (x, y, z) indices
        lo = np.array(template.TransformIndexToPhysicalPoint([int(v) for v in idx.min(axis=0)]))
        hi = np.array(template.TransformIndexToPhysicalPoint([int(v) for v in idx.max(axis=0)]))
        self.lo, self.hi = np.minimum(lo, hi), np.maximum(lo, hi)
        self.midline_mm = float(midline_mm)

    def normalised(self, p: Sequence[float]) -> tuple[float, float, float]:
        """(l, u, h) of a template LPS point (see the module docstring)."""
        x, y, z = (float(v) for v in p)
        x_mid = 0.5 * (self.lo[0] + self.hi[0])
        l = (x - x_mid) / (0.5 * (self.hi[0] - self.lo[0]))
        u = (y - self.lo[1]) / (self.hi[1] - self.lo[1])
        h = (z - self.lo[2]) / (self.hi[2] - self.lo[2])
        return l, u, h

    def hemisphere(self, p: Sequence[float]) -> str:
        x_mid = 0.5 * (self.lo[0] + self.hi[0])
        dx = float(p[0]) - x_mid
        if abs(dx) <= self.midline_mm:
            return "midline"
        return "left" if dx > 0 else "right"  # LPS: +x is the patient's left

    def lobe(self, p: Sequence[float]) -> str:
        l, u, h = self.normalised(p)
        if not (-1.2 <= l <= 1.2 and -0.2 <= u <= 1.2 and -0.2 <= h <= 1.2):
            return "unknown"  # outside the template brain
        if (h < 0.30 and u > 0.55) or (abs(l) < 0.2 and h < 0.35 and 0.40 < u < 0.75):
            return "cerebellum/brainstem"
        if abs(l) < 0.5 and 0.30 < u < 0.65 and 0.30 < h < 0.60:
            return "insula/deep"
        if u > 0.80:
            return "occipital"
        if h < 0.45 and 0.15 < u <= 0.80 and abs(l) >= 0.35:
            return "temporal"
        if u < 0.40 + 0.15 * h:
            return "frontal"
        return "parietal"


class LobeAtlasError(RuntimeError):
    """A lobe map folder exists but cannot be used; the message says why."""


class AtlasLobeMap:
    """A lobe map built by ``scripts/build_lobe_atlas.py``: one lobe label per
    voxel of the template frame (template LPS physical space, mm)."""

    def __init__(self, folder: Path, search_mm: float = ATLAS_SEARCH_MM):
        files = dict(LOBE_MAP_FILES)
        self.folder = Path(folder)
        try:
            record = json.loads((self.folder / files["record"]).read_text(encoding="utf-8"))
            image = sitk.ReadImage(str(self.folder / files["image"]))
        except (OSError, ValueError, RuntimeError) as exc:
            raise LobeAtlasError(f"the lobe map in {self.folder} cannot be read ({type(exc).__name__})") from None
        if not isinstance(record, dict) or record.get("format") != LOBE_MAP_FORMAT:
            raise LobeAtlasError(f"{self.folder / files['record']} is not a BrainLine lobe map")
        labels = record.get("labels") or {}
        names = ["unknown"] * 256
        for key, name in labels.items():
            if str(key) != "0":
                if name not in LOBES or not 0 < int(key) < 256:
                    raise LobeAtlasError(f"the lobe map in {self.folder} has an unknown label {key}: {name!r}")
                names[int(key)] = name
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise LobeAtlasError(f"the lobe map in {self.folder} is not a 3D label image")
        hemispheres = record.get("hemispheres") or {}
        self.hemispheres = ["unknown"] * 256
        for key, side in hemispheres.items():
            if 0 < int(key) < 256:
                self.hemispheres[int(key)] = str(side)
        self.image = sitk.Cast(image, sitk.sitkUInt8)
        self.array = sitk.GetArrayFromImage(self.image)  # (z, y, x)
        self.names = names
        self.record = record
        self.search_mm = float(search_mm)
        self.spacing = np.array(self.image.GetSpacing(), float)

    def describe(self) -> dict:
        """What the map is, for the location record."""
        src = self.record.get("source_atlas") or {}
        reg = self.record.get("registration") or {}
        return {"folder": str(self.folder), "atlas": src.get("name"), "package": src.get("package"),
                "package_version": src.get("package_version"), "built_utc": self.record.get("built_utc"),
                "script_version": self.record.get("script_version"),
                "template": (self.record.get("template") or {}).get("key"),
                "brain_mask_dice": reg.get("brain_mask_dice")}

    def note(self) -> str:
        d = self.describe()
        what = d["atlas"] or "a lobe atlas"
        pkg = f", {d['package']} {d['package_version']}" if d.get("package") else ""
        return (f"lesion lobes from a lobe atlas: {what}{pkg}, regions grouped into lobes and registered "
                "(affine) to the BraTS/SRI24 template, after a rigid fit of the study to that template; "
                "hemisphere from the template midline")

    def lobe(self, p: Sequence[float]) -> str:
        """Lobe at a template LPS point: the label of its voxel, else the
        nearest label within ``search_mm``, else "unknown"."""
        v = self.value(p)
        return self.names[v] if v else "unknown"

    def atlas_hemisphere(self, p: Sequence[float]) -> str:
        """The atlas's own hemisphere at a template LPS point ("left",
        "right", "midline" for unlateralised structures, "unknown"); a check
        of the map's orientation (reports use :meth:`LobeMap.hemisphere`)."""
        v = self.value(p)
        return self.hemispheres[v] if v else "unknown"

    def value(self, p: Sequence[float]) -> int:
        """The map's value at a template LPS point (0: none within ``search_mm``)."""
        ci = np.array(self.image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in p)))
        shape = np.array(self.array.shape[::-1])  # (x, y, z)
        idx = np.rint(ci).astype(int)
        if np.all(idx >= 0) and np.all(idx < shape):
            v = int(self.array[idx[2], idx[1], idx[0]])
            if v:
                return v
        r = np.ceil(self.search_mm / self.spacing).astype(int)
        lo, hi = np.maximum(idx - r, 0), np.minimum(idx + r + 1, shape)
        if np.any(hi <= lo):
            return 0
        block = self.array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
        nz = np.argwhere(block > 0)  # (z, y, x) within the block
        if not len(nz):
            return 0
        xyz = nz[:, ::-1] + lo
        d = np.sqrt((((xyz - ci) * self.spacing) ** 2).sum(axis=1))
        k = int(np.argmin(d))
        if d[k] > self.search_mm:
            return 0
        z, y, x = nz[k] + lo[::-1]
        return int(self.array[z, y, x])


def default_lobe_atlas_dir() -> Path:
    """``$BRAINLINE_HOME/atlas/lobes`` (BRAINLINE_HOME default ``./var``, as for the service)."""
    return Path(os.environ.get("BRAINLINE_HOME") or "./var").expanduser() / "atlas" / "lobes"


@lru_cache(maxsize=4)
def _load(folder: str, stamp: tuple[int, int]) -> AtlasLobeMap:
    return AtlasLobeMap(Path(folder))


def load_lobe_atlas(folder: Path | str | None = None) -> AtlasLobeMap | None:
    """The lobe map in ``folder`` (default :func:`default_lobe_atlas_dir`);
    None when it has not been built there. Raises :class:`LobeAtlasError`
    when the files exist but cannot be used. Cached while the files are
    unchanged."""
    base = Path(folder).expanduser() if folder is not None else default_lobe_atlas_dir()
    files = dict(LOBE_MAP_FILES)
    image, record = base / files["image"], base / files["record"]
    if not (image.is_file() and record.is_file()):
        return None
    stamp = (image.stat().st_mtime_ns, record.stat().st_mtime_ns)
    return _load(str(base.resolve()), stamp)


def locate_points(points_lps: Sequence[Sequence[float]], preprocessed: dict[str, Path],
                  brain_mask: sitk.Image, lobe_atlas: Path | str | None = None) -> tuple[list[dict], dict]:
    """Hemisphere and lobe of each point (current study, LPS mm).

    lobe_atlas: folder of a lobe map (``scripts/build_lobe_atlas.py``);
    default ``$BRAINLINE_HOME/atlas/lobes``. Without one there, the
    coordinate rules are used.

    Returns ([{"hemisphere", "lobe"}...], record); record holds the fit's
    parameters/flags, "method" ("atlas" or "coordinate rules"; "unknown" when
    the fit failed), "lobe_atlas" (what the map is, with the atlas method)
    and a "note" (words: which method; or why the location is unknown, in
    which case every point is {"hemisphere": "unknown", "lobe": "unknown"}).
    """
    unknown = [{"hemisphere": "unknown", "lobe": "unknown"} for _ in points_lps]
    if not points_lps:
        return [], {"note": None}
    atlas, atlas_problem = None, None
    try:
        atlas = load_lobe_atlas(lobe_atlas)
    except LobeAtlasError as exc:
        atlas_problem = str(exc)
    try:
        ms = fit_model_space(preprocessed, brain_mask, "brats", LOCATION_REGISTRATION)
    except (ModelSpaceError, RegistrationError, RuntimeError) as exc:
        return unknown, {"method": "unknown",
                         "note": f"lesion location unknown: the fit to the BraTS template failed ({exc})"}
    flags = list(ms.registration.get("flags", []))
    record: dict = {"registered_sequence": ms.template_role, "parameters": ms.registration.get("parameters"),
                    "flags": flags, "method": METHOD_ATLAS if atlas is not None else METHOD_RULES}
    if atlas is not None:
        record["lobe_atlas"] = atlas.describe()
        record["note"] = atlas.note()
    else:
        record["note"] = APPROXIMATE_NOTE + (f" ({atlas_problem})" if atlas_problem else "")
    if flags:
        record["method"] = "unknown"
        record["note"] = "lesion location unknown: the fit to the BraTS template was flagged (" + "; ".join(flags) + ")"
        return unknown, record
    rules = LobeMap(ms.template)
    to_template = ms.to_reference.GetInverse()  # reference (study) point -> template point
    out = []
    for p in points_lps:
        q = to_template.TransformPoint(tuple(float(v) for v in p))
        lobe = atlas.lobe(q) if atlas is not None else rules.lobe(q)
        out.append({"hemisphere": rules.hemisphere(q), "lobe": lobe})
    return out, record
