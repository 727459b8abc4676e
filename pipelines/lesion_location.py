"""Coarse lesion location: hemisphere and lobe, from a rigid fit of the study
to the BraTS (SRI24) template and coordinate rules in the template frame.

APPROXIMATE. There is no lobe atlas on disk, so the lobes are boxes and
slanted planes in the template frame, derived from the template brain's
bounding box (``models/templates/brats18_t1c.nii.gz``: 1 mm, LPS physical
space, +x = patient left, +y = posterior, +z = superior). With the brain
bounding box normalised to

    l = (x - x_mid) / half width      (-1 right ... +1 left; midline plane x = x_mid)
    u = (y - y_front) / AP length     (0 frontal pole ... 1 occipital pole)
    h = (z - z_bottom) / height       (0 lowest brainstem/cerebellum ... 1 vertex)

the rules, in this order, are

* cerebellum/brainstem: h < 0.30 and u > 0.55 (below the tentorium, posterior
  fossa), or |l| < 0.2 and h < 0.35 and 0.40 < u < 0.75 (brainstem);
* insula/deep: |l| < 0.5 and 0.30 < u < 0.65 and 0.30 < h < 0.60 (basal
  ganglia, thalamus, insula);
* occipital: u > 0.80 (behind the parieto-occipital sulcus);
* temporal: h < 0.45 and 0.15 < u <= 0.80 and |l| >= 0.35 (below the Sylvian
  fissure, lateral);
* frontal: u < 0.40 + 0.15 h (in front of a central sulcus slanting back
  towards the vertex);
* parietal: the rest.

Hemisphere: "midline" within ``midline_mm`` (5 mm) of the template's
midline plane, else "left" (+x) or "right". A lesion near a boundary may be
given the neighbouring lobe; the report says the location is approximate.

The fit is :func:`pipelines.model_space.fit_model_space` (rigid, Mattes MI)
with a two-level pyramid (shrink 8, 4 of the 1 mm template: 4 mm is enough for a lobe); when it fails or is
flagged, every location is "unknown".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .model_space import MODEL_SPACE_REGISTRATION, ModelSpaceError, fit_model_space, template_image
from .registration import RegistrationError

__all__ = ["LobeMap", "locate_points", "LOBES"]

LOBES = ("frontal", "parietal", "temporal", "occipital", "insula/deep", "cerebellum/brainstem", "unknown")
APPROXIMATE_NOTE = ("lesion locations (hemisphere, lobe) are approximate: coordinate rules on the BraTS/SRI24 "
                    "template after a rigid fit, not a lobe atlas")

# cheap fit: the finest (1 mm) level is not needed for a lobe
LOCATION_REGISTRATION = replace(MODEL_SPACE_REGISTRATION, shrink_factors=(8, 4), smoothing_sigmas_mm=(4.0, 2.0))


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


def locate_points(points_lps: Sequence[Sequence[float]], preprocessed: dict[str, Path],
                  brain_mask: sitk.Image) -> tuple[list[dict], dict]:
    """Hemisphere and lobe of each point (current study, LPS mm).

    Returns ([{"hemisphere", "lobe"}...], record); record holds the fit's
    parameters/flags and a "note" (words) when the fit failed or was flagged,
    in which case every point is {"hemisphere": "unknown", "lobe": "unknown"}.
    """
    unknown = [{"hemisphere": "unknown", "lobe": "unknown"} for _ in points_lps]
    if not points_lps:
        return [], {"note": None}
    try:
        ms = fit_model_space(preprocessed, brain_mask, "brats", LOCATION_REGISTRATION)
    except (ModelSpaceError, RegistrationError, RuntimeError) as exc:
        return unknown, {"note": f"lesion location unknown: the fit to the BraTS template failed ({exc})"}
    flags = list(ms.registration.get("flags", []))
    record = {"registered_sequence": ms.template_role, "parameters": ms.registration.get("parameters"),
              "flags": flags, "note": APPROXIMATE_NOTE}
    if flags:
        record["note"] = "lesion location unknown: the fit to the BraTS template was flagged (" + "; ".join(flags) + ")"
        return unknown, record
    lobes = LobeMap(ms.template)
    to_template = ms.to_reference.GetInverse()  # reference (study) point -> template point
    out = []
    for p in points_lps:
        q = to_template.TransformPoint(tuple(float(v) for v in p))
        out.append({"hemisphere": lobes.hemisphere(q), "lobe": lobes.lobe(q)})
    return out, record
