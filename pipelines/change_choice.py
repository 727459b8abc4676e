"""Which change against the most recent prior a follow-up reports, per component.

``longitudinal.json`` holds the change against the most recent prior twice:
``change.vs_prior`` (the two timepoints' own segmentations) and
``change.vs_prior_paired`` (the registered image pair, for ET "3", TC and WT),
and ``change.measure.uses`` says per component which one the assessment uses
(``pipelines.longitudinal.change_measure`` decides it by the segmenter). The
assessment (``pipelines.longitudinal``), the SR and the PDF
(``pipelines.dicom_outputs.longitudinal_sr``) and the benchmark all read the
choice through :func:`chosen_change`, so they cannot disagree. Volumes in mL.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["measure_uses", "chosen_change"]


def measure_uses(change: Mapping[str, Any], key: str) -> str:
    """"paired" or "segmentations": which change against the prior the
    assessment uses for component ``key`` (``change["measure"]["uses"]``, per
    component or one word). "paired" when the record does not say (written
    before the choice existed, when the registered pair was always used); the
    pair is only used where ``change["vs_prior_paired"]`` has the component."""
    measure = change.get("measure") or {}
    uses = measure.get("uses") if isinstance(measure, Mapping) else None
    if isinstance(uses, Mapping):
        uses = uses.get(key)
    return "segmentations" if uses == "segmentations" else "paired"


def chosen_change(change: Mapping[str, Any]) -> tuple[dict[str, Mapping[str, Any]], dict[str, str]]:
    """The change against the most recent prior as the assessment measures it.

    Per component: ``change["vs_prior_paired"][key]`` where it exists and
    :func:`measure_uses` says "paired", else ``change["vs_prior"][key]``.
    Returns (component key -> ``{"prior_ml", "current_ml", "delta_ml",
    "percent", ...}``, component key -> the measure: the paired entry's
    ``method`` words, e.g. "boundary shift integral", or "segmentations")."""
    independent = change.get("vs_prior") or {}
    paired = {k: v for k, v in (change.get("vs_prior_paired") or {}).items()
              if v and measure_uses(change, k) == "paired"}
    values: dict[str, Mapping[str, Any]] = {}
    methods: dict[str, str] = {}
    for key in dict.fromkeys([*independent, *paired]):
        entry = paired.get(key) or independent.get(key)
        if not isinstance(entry, Mapping):
            continue
        values[key] = entry
        methods[key] = str(entry.get("method") or "segmentations") if key in paired else "segmentations"
    return values, methods
