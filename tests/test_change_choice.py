"""One rule for which change against the prior is reported per component
(pipelines/change_choice.py), shared by the assessment, the SR/PDF and the
benchmark. Pure dictionaries; milliseconds."""

from __future__ import annotations

from brainline.pipelines.change_choice import chosen_change, measure_uses
from brainline.pipelines.dicom_outputs.longitudinal_sr import change_vs_prior


def entry(delta, method=None):
    e = {"prior_ml": 10.0, "current_ml": 10.0 + delta, "delta_ml": delta, "percent": 10.0 * delta}
    return {**e, "method": method} if method else e


INDEPENDENT = {k: entry(d) for k, d in (("1", 0.1), ("2", 0.2), ("3", 3.0), ("tumor_core", 4.0),
                                         ("whole_tumor", 5.0))}
PAIRED = {k: entry(d, "boundary shift integral") for k, d in (("3", 1.0), ("tumor_core", 2.0), ("whole_tumor", 0.5))}


def test_per_component_choice():
    change = {"vs_prior": INDEPENDENT, "vs_prior_paired": PAIRED,
              "measure": {"uses": {"3": "segmentations", "tumor_core": "paired", "whole_tumor": "paired"}}}
    values, methods = chosen_change(change)
    assert values["3"] is INDEPENDENT["3"] and methods["3"] == "segmentations"
    assert values["tumor_core"] is PAIRED["tumor_core"] and methods["tumor_core"] == "boundary shift integral"
    assert values["1"] is INDEPENDENT["1"] and methods["1"] == "segmentations"   # NCR, ED: always segmentations
    assert measure_uses(change, "3") == "segmentations" and measure_uses(change, "whole_tumor") == "paired"


def test_unrecorded_components_use_the_pair_everywhere():
    """A record written before the choice existed, or whose measure lacks a
    component, uses the pair where it has one: the assessment (chosen_change)
    and the SR (change_vs_prior) agree (they used to differ here)."""
    for measure in (None, {"uses": {"3": "segmentations"}}, {"uses": "paired"}):
        change = {"vs_prior": INDEPENDENT, "vs_prior_paired": PAIRED, **({"measure": measure} if measure else {})}
        values, _ = chosen_change(change)
        assert values["tumor_core"] is PAIRED["tumor_core"] and values["whole_tumor"] is PAIRED["whole_tumor"]
        assert change_vs_prior(change)[0] == values
    one_word = {"vs_prior": INDEPENDENT, "vs_prior_paired": PAIRED, "measure": {"uses": "segmentations"}}
    assert chosen_change(one_word)[0] == INDEPENDENT


def test_missing_or_empty_pair_falls_back_to_the_segmentations():
    change = {"vs_prior": INDEPENDENT, "vs_prior_paired": {"3": None, "whole_tumor": PAIRED["whole_tumor"]}}
    values, methods = chosen_change(change)
    assert values["3"] is INDEPENDENT["3"] and methods["3"] == "segmentations"
    assert values["tumor_core"] is INDEPENDENT["tumor_core"] and values["whole_tumor"] is PAIRED["whole_tumor"]
    assert chosen_change({}) == ({}, {})
