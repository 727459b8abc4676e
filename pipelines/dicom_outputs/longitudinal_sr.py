"""TID 1500 SR of a follow-up: change against the prior (and nadir) study, new and growing lesions.

Input: the dict of ``W/longitudinal.json`` (see pipelines/longitudinal.py),
the current reference series, the lesion SEG (or None) and references to the
prior study's objects. Content tree (coded concepts from :mod:`.codes`)::

    Imaging Measurement Report (TID 1500), observer = BrainLine device
      Imaging Measurements
        TID 1501 group per component (ET, NCR, ED, TC, WT), tracking id
          "BrainLine <key> change": finding type/category of the component,
          finding site Brain, NUM Volume [ml] (current), Volume at prior study,
          Volume change since prior study [ml], Percent volume change since
          prior study [%] (omitted when the prior volume is 0) and the same
          three against the nadir study when there is one. Against the most
          recent prior, the measure the assessment uses: the registered pair
          (``change.vs_prior_paired``: boundary shift integral, or the
          subtraction-confirmed voxel count) where longitudinal.json has it
          (ET, TC, WT) and ``change.measure`` chose it, else two independent
          segmentations (``vs_prior``; chosen per component when one trained
          model segmented both studies, pipelines.longitudinal.change_measure);
          each change NUM names its measure as its Measurement Method
          (:data:`CHANGE_METHODS`), and the Qualitative Evaluations say it in
          words (:func:`change_measure_words`)
        TID 1501 "BrainLine follow-up assessment": qualitative evaluation
          Follow-up volumetric assessment = Progression suspected | Borderline | Stable |
          Decrease | Not assessable, NUM Interval since prior study [d],
          Number of new / growing lesions (only when detection ran), UIDREF
          Prior study compared (the prior's Study Instance UID)
        TID 1411 per new / growing lesion (TID 1501 when it has no SEG
          segment): Referenced Segment of the lesion SEG, finding Lesion,
          finding site lobe + laterality, NUM Volume, Volume at prior study,
          Volume change since prior study [mm3] (a new lesion: its
          partial-volume integral ``volume_integrated_mm3`` where present,
          :func:`lesion_volumes`), Certainty of Finding [%],
          qualitative evaluation Lesion change since prior study = New finding
          | Increase in size
        TID 1501 "BrainLine quality control" (QC findings, as in build_sr)
      Qualitative Evaluations: TEXT items: the assessment's reason, the
        follow-up notes (e.g. thick FLAIR), why no subtraction / lesion
        detection was possible, QC details, and (Measurement Method) which
        measure gives each component's change and why (``change.measure.reason``)

The prior's objects (its SEG, its reference series instances when known) are
listed in PertinentOtherEvidenceSequence under the prior's Study Instance UID.
All prior UIDs are pseudonymous on the processing side: the gateway maps them
with the prior studies' UID maps (results.json lists them per object).
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from ..change_choice import chosen_change, measure_uses
from .codes import (
    BRAIN,
    CATEGORY_ABNORMAL,
    CERTAINTY_OF_FINDING,
    COMPOSITES,
    FOLLOWUP_ASSESSMENT,
    INTERVAL_SINCE_PRIOR,
    LABELS,
    LESION,
    LESION_CHANGE,
    LONG_AXIS,
    NUMBER_GROWING_LESIONS,
    NUMBER_NEW_LESIONS,
    PERCENT_CHANGE_NADIR,
    PERCENT_CHANGE_PRIOR,
    PRIOR_STUDY_COMPARED,
    RANO_METHOD,
    SHORT_AXIS,
    UNIT_COUNT,
    UNIT_DAY,
    UNIT_ML,
    UNIT_MM,
    UNIT_MM3,
    UNIT_PERCENT,
    VOLUME,
    VOLUME_CHANGE_NADIR,
    VOLUME_CHANGE_PRIOR,
    VOLUME_NADIR,
    VOLUME_PRIOR,
    AlgorithmInfo,
    QCFinding,
    _private,
    assessment_code,
    lesion_kind,
    lesion_site,
)
from .lesion_seg import lesion_segment_numbers
from .seg import new_uid
from .source_series import SourceSeries, as_source_series
from .sr import _algorithm_id, _qc_texts, fix_method_relationships, observer_document

__all__ = ["build_change_sr", "COMPONENT_KEYS", "component_name", "prior_evidence", "change_vs_prior",
           "change_measure_words", "lesion_volumes", "CHANGE_METHODS"]

#: Components reported, in order: summary key -> short name.
COMPONENT_KEYS = {"3": "ET", "1": "NCR", "2": "ED", "tumor_core": "TC", "whole_tumor": "WT"}


def component_name(key: str) -> str:
    """Words for a component key: "enhancing tumour (ET)", "tumour core (TC)"..."""
    if key in COMPOSITES:
        return f"{COMPOSITES[key].name.lower().replace('tumor', 'tumour')} ({COMPONENT_KEYS[key]})"
    return LABELS[int(key)].description


#: Measurement Method of a change NUM: the measure's words (as longitudinal.json
#: writes them in ``method``) -> private code (value <= 16, meaning <= 64
#: characters). "segmentations" = the difference of two independent
#: segmentations (``change.vs_prior`` / ``vs_nadir``).
CHANGE_METHODS = {
    "boundary shift integral": _private(
        "BSI", "Boundary shift integral on the registered image pair"),
    "subtraction-confirmed voxels": _private(
        "SUB-VOXELS", "Subtraction-confirmed segmentation change"),
    "deformable registration": _private(
        "DEFORM-CARRIED", "Prior segmentation carried by deformable registration"),
    "deformable registration and boundary shift": _private(
        "DEFORM-BSI", "Deformable registration plus residual boundary shift"),
    "joint segmentation of the registered pair": _private(
        "JOINT-SEG", "Joint segmentation of the registered image pair"),
    "segmentations": _private("SEG-DIFFERENCE", "Difference of two independent segmentations"),
}


#: Concept of the TEXT item that says which measure gives the change (Qualitative Evaluations).
MEASUREMENT_METHOD_CONCEPT = Code("370129005", "SCT", "Measurement Method")


def change_vs_prior(change: Mapping[str, Any]) -> tuple[dict[str, Mapping[str, Any]], dict[str, str]]:
    """The change against the most recent prior as the assessment measures it
    (:func:`pipelines.change_choice.chosen_change`), its measure per component
    a key of :data:`CHANGE_METHODS` (an unknown paired method reads as
    "segmentations", which has a code)."""
    values, methods = chosen_change(change)
    return values, {k: (m if m in CHANGE_METHODS else "segmentations") for k, m in methods.items()}


_MEASURE_WORDS = {"boundary shift integral": "the boundary shift integral on the registered image pair",
                  "subtraction-confirmed voxels": "segmentation changes confirmed by the subtraction of the "
                                                  "registered image pair",
                  "deformable registration": "the deformable registration of the image pair (the prior's "
                                             "segmentation carried into the current anatomy)",
                  "deformable registration and boundary shift": "the deformable registration of the image pair "
                                                                "plus the boundary shift integral of what it left "
                                                                "unexplained",
                  "joint segmentation of the registered pair": "the joint segmentation of the registered image pair",
                  "segmentations": "the difference of the two segmentations"}


def change_measure_words(change: Mapping[str, Any]) -> str:
    """Which measure gives each component's change, in words, e.g. "Change
    against the prior study: ET, TC and WT by the boundary shift integral on the
    registered image pair (the measure of the assessment); NCR and ED by the
    difference of the two segmentations. Against the nadir: the difference of
    the two segmentations." Empty without a change against the prior."""
    _, methods = change_vs_prior(change)
    if not methods:
        return ""
    # the two segmentations are the assessment's measure where longitudinal.json chose them (change.measure)
    recorded = isinstance(change.get("measure"), Mapping)

    def assessed(key: str) -> bool:
        if methods[key] != "segmentations":
            return True
        return recorded and key in ("3", "tumor_core", "whole_tumor") and measure_uses(change, key) == "segmentations"

    groups: dict[tuple[str, bool], list[str]] = {}   # (measure, the assessment's?) -> names, in component order
    for key in COMPONENT_KEYS:
        if key in methods:
            groups.setdefault((methods[key], assessed(key)), []).append(COMPONENT_KEYS[key])
    parts = []
    for (method, is_assessed), names in groups.items():
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        parts.append(f"{joined} by {_MEASURE_WORDS[method]}" + (" (the measure of the assessment)" if is_assessed
                                                                  else ""))
    text = "Change against the prior study: " + "; ".join(parts) + "."
    reason = str((change.get("measure") or {}).get("reason") or "")
    if reason:
        text += f" Why: {reason}."
    if change.get("vs_nadir"):
        text += " Against the nadir: the difference of the two segmentations."
    return text


def lesion_volumes(lesion: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(volume, growth) of a reported lesion in mm^3: a new lesion's
    partial-volume integral ``volume_integrated_mm3`` where present (its
    half-maximum extent ``volume_mm3`` reads about 0.77 x the truth, the
    integral about 1.1 x; README), growth = volume - prior volume; else
    ``volume_mm3`` and ``growth_mm3``."""
    integrated = lesion.get("volume_integrated_mm3")
    if lesion.get("kind") == "new" and integrated is not None:
        prior = float(lesion.get("prior_volume_mm3") or 0.0)
        return float(integrated), float(integrated) - prior
    return lesion.get("volume_mm3"), lesion.get("growth_mm3")


def prior_evidence(study_uid: str, series_uid: str | None, sop_class_uid: str | None,
                   sop_instance_uids: Sequence[str]) -> list[Dataset]:
    """Minimal datasets naming instances of a prior study, for PertinentOtherEvidenceSequence."""
    out = []
    for uid in sop_instance_uids:
        if not (study_uid and series_uid and sop_class_uid and uid):
            continue
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, uid
        out.append(ds)
    return out


def _num(name, value, unit, method=None) -> hd.sr.Measurement | None:
    if value is None:
        return None
    value = float(value)
    return hd.sr.Measurement(name=name, value=round(value, 6), unit=unit, method=method)


def _component_group(key: str, change: Mapping[str, Any], algo_id, uid_root) -> Any | None:
    values, methods = change_vs_prior(change)
    vs_prior = values.get(key)
    if not vs_prior:
        return None
    method = CHANGE_METHODS[methods[key]]
    segmentations = CHANGE_METHODS["segmentations"]
    vs_nadir = (change.get("vs_nadir") or {}).get(key) or {}
    measurements = [
        _num(VOLUME, vs_prior.get("current_ml"), UNIT_ML, method),
        _num(VOLUME_PRIOR, vs_prior.get("prior_ml"), UNIT_ML),
        _num(VOLUME_CHANGE_PRIOR, vs_prior.get("delta_ml"), UNIT_ML, method),
        _num(PERCENT_CHANGE_PRIOR, vs_prior.get("percent"), UNIT_PERCENT, method),
        _num(VOLUME_NADIR, vs_nadir.get("prior_ml"), UNIT_ML),
        _num(VOLUME_CHANGE_NADIR, vs_nadir.get("delta_ml"), UNIT_ML, segmentations),
        _num(PERCENT_CHANGE_NADIR, vs_nadir.get("percent"), UNIT_PERCENT, segmentations),
    ]
    if key in COMPOSITES:
        comp = COMPOSITES[key]
        finding, category, method = comp.finding_type, LABELS[comp.labels[0]].category, comp.method
    else:
        concept = LABELS[int(key)]
        finding, category, method = concept.property_type, concept.category, None
    return fix_method_relationships(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root),
                                                     identifier=f"BrainLine {COMPONENT_KEYS[key]} change"),
        finding_type=finding, finding_category=category, method=method,
        finding_sites=[hd.sr.FindingSite(BRAIN)], algorithm_id=algo_id,
        measurements=[m for m in measurements if m is not None]))


def _uidref(name, uid: str) -> hd.sr.UIDRefContentItem:
    return hd.sr.UIDRefContentItem(name=name, value=uid, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _assessment_group(longitudinal: Mapping[str, Any], detection: bool, interval_days: int | None,
                      prior_study_uid: str | None, algo_id, uid_root) -> Any:
    lesions = longitudinal.get("lesions") or []
    code = (longitudinal.get("assessment") or {}).get("code") or "not assessable"
    measurements = [_num(INTERVAL_SINCE_PRIOR, interval_days, UNIT_DAY)]
    if detection:
        measurements += [_num(NUMBER_NEW_LESIONS, sum(1 for x in lesions if x.get("kind") == "new"), UNIT_COUNT),
                         _num(NUMBER_GROWING_LESIONS, sum(1 for x in lesions if x.get("kind") == "growing"),
                              UNIT_COUNT)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root),
                                                     identifier="BrainLine follow-up assessment"),
        algorithm_id=algo_id,
        measurements=[m for m in measurements if m is not None],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FOLLOWUP_ASSESSMENT, assessment_code(code))])
    if prior_study_uid:
        group[0].ContentSequence.append(_uidref(PRIOR_STUDY_COMPARED, prior_study_uid))
    return group


def _lesion_group(lesion: Mapping[str, Any], seg: Dataset | None, segment: int | None, series: SourceSeries,
                  algo_id, uid_root) -> Any:
    kind = lesion_kind(lesion["kind"])
    volume, growth = lesion_volumes(lesion)
    measurements = [
        _num(VOLUME, volume, UNIT_MM3),
        _num(VOLUME_PRIOR, lesion.get("prior_volume_mm3"), UNIT_MM3),
        _num(VOLUME_CHANGE_PRIOR, growth, UNIT_MM3),
        _num(CERTAINTY_OF_FINDING, None if lesion.get("confidence") is None else 100.0 * float(lesion["confidence"]),
             UNIT_PERCENT),
        # a new enhancing lesion: its axial diameters (the RANO measurability rule, config new_lesion_rule)
        _num(LONG_AXIS, lesion.get("long_axis_mm"), UNIT_MM, RANO_METHOD),
        _num(SHORT_AXIS, lesion.get("short_axis_mm"), UNIT_MM, RANO_METHOD),
    ]
    common = dict(
        finding_type=LESION, finding_category=CATEGORY_ABNORMAL,
        finding_sites=[lesion_site(lesion.get("lobe", "unknown"), lesion.get("hemisphere", ""))],
        algorithm_id=algo_id, measurements=[m for m in measurements if m is not None],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(LESION_CHANGE, kind.modifier)])
    identifier = f"BrainLine {kind.key} lesion {int(lesion['id'])}"
    if seg is not None and segment is not None:
        item = next(i for i in seg.SegmentSequence if int(i.SegmentNumber) == segment)
        tracking = hd.sr.TrackingIdentifier(uid=str(item.get("TrackingUID", "")) or new_uid(uid_root),
                                            identifier=str(item.get("TrackingID", "")) or identifier)
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=segment,
                source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid)),
            **common)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier=identifier), **common)


def build_change_sr(
    source_files: Sequence[str | PathLike] | SourceSeries,
    longitudinal: Mapping[str, Any],
    algorithm: AlgorithmInfo,
    *,
    lesion_seg: Dataset | None = None,
    qc_findings: Sequence[QCFinding] = (),
    texts: Sequence[tuple[Any, str]] = (),
    prior_study_uid: str | None = None,
    other_evidence: Sequence[Dataset] = (),
    interval_days: int | None = None,
    detection: bool = True,
    uid_root: str | None = None,
    series_number: int = 312,
    instance_number: int = 1,
    manufacturer: str = "BrainLine",
    series_description: str = "BrainLine follow-up change",
    sr_class: str = "comprehensive3d",
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR:
    """TID 1500 report of the change in ``longitudinal`` (the dict of
    longitudinal.json) against the prior / nadir (see the module doc).

    ``lesion_seg``: the SEG of :func:`.lesion_seg.build_lesion_seg` or None;
    ``texts``: (concept, words) pairs for the Qualitative Evaluations
    container (assessment reason, notes, why no detection); ``detection``:
    False when subtraction / lesion detection could not run (no lesion counts
    are then reported); ``other_evidence``: the prior's objects (see
    :func:`prior_evidence`); ``interval_days``: days between the prior and
    this study.
    """
    series = as_source_series(source_files)
    if lesion_seg is not None and str(lesion_seg.StudyInstanceUID) != str(series.first.StudyInstanceUID):
        raise ValueError("lesion SEG and source series belong to different studies")
    algo_id = _algorithm_id(algorithm)
    change = longitudinal.get("change") or {}
    groups: list[Any] = [g for g in (_component_group(k, change, algo_id, uid_root) for k in COMPONENT_KEYS)
                         if g is not None]
    groups.append(_assessment_group(longitudinal, detection, interval_days, prior_study_uid, algo_id, uid_root))
    segments = lesion_segment_numbers(lesion_seg) if lesion_seg is not None else {}
    for lesion in sorted(longitudinal.get("lesions") or [], key=lambda x: int(x["id"])):
        groups.append(_lesion_group(lesion, lesion_seg, segments.get(int(lesion["id"])), series, algo_id, uid_root))
    if qc_findings:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier="BrainLine quality control"),
            algorithm_id=algo_id,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(f.concept, f.value) for f in qc_findings]))
    measure = change_measure_words(change)
    if measure:
        texts = [*texts, (MEASUREMENT_METHOD_CONCEPT, measure)]
    return observer_document(
        groups, _qc_texts(qc_findings, texts), lesion_seg, series, algorithm, uid_root=uid_root,
        series_number=series_number, instance_number=instance_number, manufacturer=manufacturer,
        series_description=series_description, sr_class=sr_class, is_final=False,
        other_evidence=list(other_evidence))


