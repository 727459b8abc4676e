"""DICOM Structured Report (TID 1500 Measurement Report) of the tumour volumes.

Content tree (all coded concepts from :mod:`.codes`)::

    Imaging Measurement Report (TID 1500)
      Language, Observer context: device = BrainLine (TID 1004: UID, name,
        manufacturer, model name = backend/model), Procedure reported
      Imaging Measurements
        Measurement Group (TID 1411) per SEG segment:
          tracking id/UID (the segment's), Referenced Segment (SEG SOP instance
          + segment number) with Source Series for Segmentation, finding
          category/type = the segment's, finding site Brain, algorithm id,
          Volume [ml]
        Measurement Group (TID 1501) for each label absent from the SEG that the
          summary reports (volume 0), for tumour core and whole tumour
          (Neoplasm + private method code) and for total intracranial volume
        Measurement Group (TID 1501) "BrainLine quality control": one
          qualitative evaluation per QC finding (check concept = status code)
      Qualitative Evaluations (TID 1500 row: C0034375, UMLS): one TEXT item per
        QC finding with a detail, named by the check ("Result objects
        completeness" = "overlay series not built: ...", "Series selection
        quality" = "T1 and T2 not found; ...")

Measurement Method is written HAS CONCEPT MOD, as TID 1501 requires
(:func:`fix_method_relationships`; highdicom 0.28 writes CONTAINS).

:func:`build_verified_sr` writes the verified version of the volumes report
after a radiologist accepted the segmentation (service/gateway/review.py): same
content plus the review (decision, score, comment), VERIFIED with the
Verifying Observer Sequence, FINAL, the original as predecessor document.

:func:`build_rano_sr` writes a second TID 1500 document (same observer
context) with one TID 1501 group per tumour-core lesion (3-D component of
labels 1 + 3, largest first, at most 5): tracking identifier
``Cornerstone3DTools@^0.1.0:Bidirectional:BrainLine <enhancing|non-enhancing>
lesion <n>`` (the prefix makes OHIF rehydrate it as a Bidirectional tool) and
a new tracking UID, finding Enhancing / Non-Enhancing Lesion, method RANO
(C114879, NCIt), finding site Brain, algorithm id, and NUM Long Axis /
Short Axis [mm], each INFERRED FROM a 2-point SCOORD POLYLINE SELECTED FROM
the source image (reference series instance) of the lesion's largest slice.
The diameters come from :mod:`brainline.pipelines.rano`.

Software versions of BrainLine and the model are in SoftwareVersions (General
Equipment) and in every group's Algorithm Identification (TID 4019).
"""

from __future__ import annotations

import logging
from copy import deepcopy
from datetime import datetime
from os import PathLike
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from ..rano import ComponentMeasurement, label_components, measure_components
from ..records import Summary
from .codes import (
    BRAIN,
    CATEGORY_ABNORMAL,
    CATEGORY_ANATOMY,
    COMPOSITES,
    ENHANCING_LESION,
    INTRACRANIAL,
    LABELS,
    LONG_AXIS,
    NON_ENHANCING_LESION,
    OHIF_BIDIRECTIONAL,
    PRIVATE_SCHEME,
    PROCEDURE_REPORTED,
    QUALITATIVE_EVALUATIONS,
    RANO_METHOD,
    REPORT_TITLE,
    SHORT_AXIS,
    TIV,
    UNIT_ML,
    UNIT_MM,
    VOLUME,
    AlgorithmInfo,
    QCFinding,
    label_concept,
    private_coding_scheme,
)
from .seg import new_uid, read_seg_labels, segment_label_values
from .source_series import SourceSeries, as_source_series

__all__ = ["build_sr", "build_rano_sr", "volume_summary", "SR_CLASSES", "bidimensional_measurements",
           "fix_method_relationships",
           "MEASUREMENT_METHOD", "observer_document", "build_verified_sr", "REVIEW_DECISION", "REVIEW_SCORE",
           "REVIEW_COMMENT", "review_score_code"]

#: (370129005, SCT, "Measurement Method")
MEASUREMENT_METHOD = "370129005"
#: Labels whose union is measured bidimensionally: the tumour core (enhancing
#: tumour and the necrotic / non-enhancing core it encloses), one lesion per
#: 3-D connected component.
CORE_LABELS = (1, 3)
ENHANCING_LABEL = 3

log = logging.getLogger(__name__)

SR_CLASSES = {
    "comprehensive3d": hd.sr.Comprehensive3DSR,
    "comprehensive": hd.sr.ComprehensiveSR,
    "enhanced": hd.sr.EnhancedSR,
}


def volume_summary(labels: sitk.Image | np.ndarray, voxel_volume_mm3: float | None = None) -> dict[str, Any]:
    """``{"volumes_ml": {"1", "2", "3", "tumor_core", "whole_tumor"}}`` from a label map.

    ``labels`` is a SimpleITK image (voxel volume from its spacing) or an array
    with ``voxel_volume_mm3`` given. TIV is not computed here (it needs the brain
    mask); add ``"tiv_ml"`` yourself.
    """
    if isinstance(labels, sitk.Image):
        voxel_volume_mm3 = float(np.prod(labels.GetSpacing()))
        arr = sitk.GetArrayViewFromImage(labels)
    else:
        if voxel_volume_mm3 is None:
            raise ValueError("voxel_volume_mm3 is required for an array label map")
        arr = np.asarray(labels)
    ml = voxel_volume_mm3 / 1000.0
    counts = {v: int(np.count_nonzero(arr == v)) for v in LABELS}
    volumes: dict[str, float] = {str(v): counts[v] * ml for v in LABELS}
    for key, comp in COMPOSITES.items():
        volumes[key] = sum(counts[v] for v in comp.labels) * ml
    return {"volumes_ml": volumes}


def _volume(volumes: Mapping[Any, Any], key: str | int) -> float | None:
    for k in (key, str(key)) + ((int(key),) if str(key).isdigit() else ()):
        if k in volumes and volumes[k] is not None:
            return float(volumes[k])
    return None


def _algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{k}={v}"[:64] for k, v in algorithm.algorithm_parameters().items()],
    )


def _volume_measurement(value_ml: float) -> hd.sr.Measurement:
    if not np.isfinite(value_ml) or value_ml < 0:
        raise ValueError(f"invalid volume {value_ml!r} mL")
    return hd.sr.Measurement(name=VOLUME, value=float(value_ml), unit=UNIT_ML)


def _qc_texts(qc_findings: Sequence[QCFinding],
              texts: Sequence[tuple[Any, str]] = ()) -> hd.sr.ContainerContentItem | None:
    """The QC findings' details in words: a Qualitative Evaluations container
    of TEXT items (concept = the check), then ``texts`` ((concept, words)
    pairs, whitespace normalised); None when there is nothing to say."""
    pairs = [(f.concept, f.detail) for f in qc_findings if f.detail] + [
        (c, " ".join(str(t).split())) for c, t in texts if t]
    items = [hd.sr.TextContentItem(name=name, value=value,
                                   relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
             for name, value in pairs]
    if not items:
        return None
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def fix_method_relationships(group: Any) -> Any:
    """Write the Measurement Method of a TID 1501 measurement group with
    relationship HAS CONCEPT MOD, as the template requires (highdicom 0.28's
    ``MeasurementsAndQualitativeEvaluations`` writes CONTAINS). Only the group's
    own children are touched (TID 300 methods are already HAS CONCEPT MOD)."""
    for item in group[0].ContentSequence:
        name = item.get("ConceptNameCodeSequence")
        if (item.ValueType == "CODE" and name and name[0].CodeValue == MEASUREMENT_METHOD
                and name[0].CodingSchemeDesignator in ("SCT", "SRT")):
            item.RelationshipType = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD.value
    return group


def bidimensional_measurements(seg: Dataset, series: SourceSeries, *, max_lesions: int = 5
                               ) -> list[tuple[ComponentMeasurement, bool]]:
    """RANO-style measurements of the tumour-core components of ``seg`` on the
    source grid: ``(measurement, enhancing)`` per lesion, largest first."""
    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.Segmentation.from_dataset(seg, copy=True)
    labels = read_seg_labels(seg, series)
    core = np.isin(labels, CORE_LABELS)
    if not core.any():
        return []
    spacing = [float(v) for v in series.first.PixelSpacing]
    found = measure_components(core, spacing, max_components=max_lesions)
    comps, _ = label_components(core)
    return [(m, bool(np.any(labels[comps == m.label_id] == ENHANCING_LABEL))) for m in found]


def _bidimensional_group(m: ComponentMeasurement, enhancing: bool, series: SourceSeries,
                         algo_id: hd.sr.AlgorithmIdentification, uid_root: str | None
                         ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one lesion: Long Axis and Short Axis NUM items [mm], each
    INFERRED FROM a 2-point SCOORD POLYLINE on the source image of its slice.
    The tracking identifier starts with the one OHIF rehydrates as a
    Bidirectional measurement."""
    ds, frame = series.datasets[m.slice_index], series.frame_number(m.slice_index)
    source = hd.sr.SourceImageForRegion(referenced_sop_class_uid=str(ds.SOPClassUID),
                                        referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                                        referenced_frame_numbers=None if frame is None else [frame])

    def axis(name, value, points_rc):
        # SCOORD pixel coordinates are (column, row) with the centre of the first pixel at (0.5, 0.5)
        graphic = np.array([[c + 0.5, r + 0.5] for r, c in points_rc], dtype=float)
        return hd.sr.Measurement(
            name=name, value=round(float(value), 2), unit=UNIT_MM,
            referenced_coordinates=[hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=graphic, source_image=source)])

    kind = "enhancing lesion" if enhancing else "non-enhancing lesion"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=new_uid(uid_root), identifier=f"{OHIF_BIDIRECTIONAL}:BrainLine {kind} {m.component}"),
        finding_type=ENHANCING_LESION if enhancing else NON_ENHANCING_LESION,
        finding_category=CATEGORY_ABNORMAL,
        method=RANO_METHOD,
        finding_sites=[hd.sr.FindingSite(BRAIN)],
        algorithm_id=algo_id,
        measurements=[axis(LONG_AXIS, m.measurement.long_mm, m.measurement.long_points),
                      axis(SHORT_AXIS, m.measurement.short_mm, m.measurement.short_points)],
    )
    return fix_method_relationships(group)


def build_sr(
    seg: Dataset | None,
    source_files: Sequence[str | PathLike] | SourceSeries,
    summary: Summary | Mapping[str, Any],
    qc_findings: Sequence[QCFinding],
    algorithm: AlgorithmInfo,
    *,
    uid_root: str | None = None,
    series_number: int = 301,
    instance_number: int = 1,
    manufacturer: str = "BrainLine",
    series_description: str = "BrainLine tumor volumes",
    sr_class: str = "comprehensive3d",
    is_final: bool = False,
    bidimensional: bool = False,
    max_lesions: int = 5,
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR:
    """TID 1500 measurement report of the volumes in ``summary`` and the QC findings.

    ``seg`` is the SEG built by :func:`~.seg.build_seg` (or None when nothing was
    segmented: label groups then carry no segment reference). ``summary`` is
    the job's :class:`...records.Summary` (or its JSON; only ``volumes_ml``, mL
    by "1", "2", "3", "tumor_core", "whole_tumor", and ``tiv_ml`` are used);
    every SEG segment needs a volume. The document is complete,
    unverified and preliminary unless ``is_final`` (set it only after review).
    """
    if sr_class not in SR_CLASSES:
        raise ValueError(f"sr_class must be one of {sorted(SR_CLASSES)}")
    series = as_source_series(source_files)
    summary = Summary.from_json(summary)
    volumes = summary.volumes_ml or {}
    algo_id = _algorithm_id(algorithm)
    groups: list[Any] = []

    # --- one TID 1411 group per SEG segment
    segmented: set[int] = set()
    if seg is not None:
        if str(seg.StudyInstanceUID) != str(series.first.StudyInstanceUID):
            raise ValueError("SEG and source series belong to different studies")
        mapping = segment_label_values(seg)
        descriptions = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
        for number in sorted(mapping):
            value = mapping[number]
            concept = label_concept(value)
            volume = _volume(volumes, value)
            if volume is None:
                raise ValueError(f"summary has no volume for label {value} (SEG segment {number})")
            item = descriptions[number]
            tracking = hd.sr.TrackingIdentifier(
                uid=str(item.get("TrackingUID", "")) or new_uid(uid_root),
                identifier=str(item.get("TrackingID", "")) or f"BrainLine {concept.key}",
            )
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid),
                ),
                finding_type=concept.property_type,
                finding_category=concept.category,
                finding_sites=[hd.sr.FindingSite(BRAIN)],
                algorithm_id=algo_id,
                measurements=[_volume_measurement(volume)],
            ))
            segmented.add(value)

    # --- labels the summary reports but the SEG does not hold (normally volume 0)
    for value, concept in LABELS.items():
        volume = _volume(volumes, value)
        if value in segmented or volume is None:
            continue
        if volume > 0 and seg is not None:
            log.warning("label %d has %.3f mL in the summary but no SEG segment", value, volume)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier=f"BrainLine {concept.key}"),
            finding_type=concept.property_type,
            finding_category=concept.category,
            finding_sites=[hd.sr.FindingSite(BRAIN)],
            algorithm_id=algo_id,
            measurements=[_volume_measurement(volume)],
        ))

    # --- tumour core and whole tumour
    for key, comp in COMPOSITES.items():
        volume = _volume(volumes, key)
        if volume is None:
            continue
        groups.append(fix_method_relationships(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier=comp.name),
            finding_type=comp.finding_type,
            finding_category=LABELS[comp.labels[0]].category,
            method=comp.method,
            finding_sites=[hd.sr.FindingSite(BRAIN)],
            algorithm_id=algo_id,
            measurements=[_volume_measurement(volume)],
        )))

    # --- total intracranial volume
    tiv = summary.tiv_ml
    if tiv is not None:
        groups.append(fix_method_relationships(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier="Total intracranial volume"),
            finding_type=INTRACRANIAL,
            finding_category=CATEGORY_ANATOMY,
            method=TIV,
            algorithm_id=algo_id,
            measurements=[_volume_measurement(float(tiv))],
        )))

    # --- RANO-style bidimensional measurement of each tumour-core lesion (opt-in:
    # normally they go into their own document, see build_rano_sr)
    if bidimensional and seg is not None and max_lesions > 0:
        for m, enhancing in bidimensional_measurements(seg, series, max_lesions=max_lesions):
            groups.append(_bidimensional_group(m, enhancing, series, algo_id, uid_root))

    # --- QC findings
    if qc_findings:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier="BrainLine quality control"),
            algorithm_id=algo_id,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(f.concept, f.value) for f in qc_findings],
        ))

    if not groups:
        raise ValueError("nothing to report: no SEG segments, volumes or QC findings")

    return _document(groups, _qc_texts(qc_findings), seg, series, algorithm, uid_root=uid_root,
                     series_number=series_number, instance_number=instance_number, manufacturer=manufacturer,
                     series_description=series_description, sr_class=sr_class, is_final=is_final)


def _document(groups: list[Any], texts: hd.sr.ContainerContentItem | None, seg: Dataset | None,
              series: SourceSeries, algorithm: AlgorithmInfo, *, uid_root: str | None, series_number: int,
              instance_number: int, manufacturer: str, series_description: str, sr_class: str,
              is_final: bool, other_evidence: Sequence[Dataset] = ()
              ) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR:
    """TID 1500 document around measurement groups, observed by the BrainLine device.
    ``other_evidence``: instances of other studies the report draws on (e.g. a
    prior study's SEG), listed in PertinentOtherEvidenceSequence; minimal
    datasets with Study/Series/SOP Instance UIDs and SOP Class UID suffice."""
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=manufacturer,
            model_name=algorithm.model_label[:64],
            serial_number=algorithm.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=REPORT_TITLE,
    )
    if texts is not None:
        report[0].ContentSequence.append(texts)
    evidence = ([seg] if seg is not None else []) + list(series.instances) + list(other_evidence)
    cls = SR_CLASSES[sr_class]
    return cls(
        evidence=evidence,
        content=report[0],
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=is_final,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=algorithm.name,
        software_versions=list(algorithm.software_versions),
        device_serial_number=algorithm.device_serial_number,
        coding_schemes=[private_coding_scheme()],
    )


def build_rano_sr(
    seg: Dataset,
    source_files: Sequence[str | PathLike] | SourceSeries,
    algorithm: AlgorithmInfo,
    *,
    uid_root: str | None = None,
    series_number: int = 304,
    instance_number: int = 1,
    manufacturer: str = "BrainLine",
    series_description: str = "BrainLine RANO measurements",
    sr_class: str = "comprehensive3d",
    is_final: bool = False,
    max_lesions: int = 5,
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR | None:
    """TID 1500 report of the RANO-style bidimensional measurements only: one
    group per tumour-core lesion (see :func:`bidimensional_measurements`), long
    and short axis as 2-point SCOORD polylines on the source image of the
    lesion's largest slice. None when the SEG holds no tumour core.

    A separate document from :func:`build_sr` because OHIF 3.13 cannot open an
    SR whose Imaging Measurements hold any group without image coordinates (the
    volumes): it dereferences the missing coordinates and shows a black
    viewport. This one holds planar measurements only, which OHIF rehydrates as
    Bidirectional measurements.
    """
    if sr_class not in SR_CLASSES:
        raise ValueError(f"sr_class must be one of {sorted(SR_CLASSES)}")
    series = as_source_series(source_files)
    if str(seg.StudyInstanceUID) != str(series.first.StudyInstanceUID):
        raise ValueError("SEG and source series belong to different studies")
    algo_id = _algorithm_id(algorithm)
    groups = [_bidimensional_group(m, enhancing, series, algo_id, uid_root)
              for m, enhancing in bidimensional_measurements(seg, series, max_lesions=max_lesions)]
    if not groups:
        return None
    return _document(groups, None, seg, series, algorithm, uid_root=uid_root, series_number=series_number,
                     instance_number=instance_number, manufacturer=manufacturer,
                     series_description=series_description, sr_class=sr_class, is_final=is_final)


def observer_document(groups: list[Any], texts: hd.sr.ContainerContentItem | None, seg: Dataset | None,
                      series: SourceSeries, algorithm: AlgorithmInfo, **kwargs: Any
                      ) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR:
    """Public form of the TID 1500 document builder shared by the SR builders
    (keyword arguments as :func:`build_sr`, plus ``other_evidence``)."""
    return _document(groups, texts, seg, series, algorithm, **kwargs)


# ------------------------------------------------------------------ review

#: The radiologist's review in a verified report, as items of the root
#: Qualitative Evaluations container (TID 1500 rows "CONTAINS CODE" / "CONTAINS
#: TEXT"): the decision and the score are coded so that a query or an export
#: can select reports by them (no DCM/SCT code exists for a 1-5 segmentation
#: quality scale, hence the private scheme, declared in every document); the
#: comment is free text under (121106, DCM, "Comment").
REVIEW_DECISION = Code("REVIEW", PRIVATE_SCHEME, "Radiologist review of the segmentation")
REVIEW_ACCEPTED = Code("REVIEW-ACCEPT", PRIVATE_SCHEME, "Segmentation acceptable")
REVIEW_SCORE = Code("REVIEW-SCORE", PRIVATE_SCHEME, "Segmentation quality score (5 perfect, 1 terrible)")
REVIEW_COMMENT = Code("121106", "DCM", "Comment")
_SCORE_WORDS = {1: "terrible", 2: "poor", 3: "acceptable", 4: "good", 5: "perfect"}


def review_score_code(score: int) -> Code:
    """(SCORE-n, 99BRAINLINE, "n of 5 (word)") for a score 1..5."""
    if score not in _SCORE_WORDS:
        raise ValueError(f"a review score is 1 to 5, not {score!r}")
    return Code(f"SCORE-{score}", PRIVATE_SCHEME, f"{score} of 5 ({_SCORE_WORDS[score]})")


_EVIDENCE_KEEP = ("SpecificCharacterSet", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
                  "StudyID", "AccessionNumber", "StudyDescription")


def _evidence_of(report: Dataset) -> list[Dataset]:
    """Minimal datasets of the instances an SR lists as evidence (patient and
    study attributes of the report, the study of each evidence item)."""
    base = Dataset()
    for elem in report:
        if elem.tag.group == 0x0010 or elem.keyword in _EVIDENCE_KEEP:
            base.add(elem)
    out = []
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in report.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for ref in series.get("ReferencedSOPSequence", []):
                    ds = Dataset()
                    ds.update(base)
                    ds.StudyInstanceUID = study.StudyInstanceUID
                    ds.SeriesInstanceUID = series.SeriesInstanceUID
                    ds.SOPInstanceUID = ref.ReferencedSOPInstanceUID
                    ds.SOPClassUID = ref.ReferencedSOPClassUID
                    out.append(ds)
    return out


def _software_versions(ds: Dataset) -> list[str] | None:
    value = ds.get("SoftwareVersions")
    if value is None or value == "":
        return None
    return [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]


def build_verified_sr(
    report: Dataset,
    *,
    verifying_observer: str,
    organization: str,
    verified_at: datetime,
    score: int,
    comment: str | None = None,
    uid_root: str | None = None,
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR:
    """The verified version of a TID 1500 report after a radiologist accepted
    the segmentation: the same content (volumes, QC findings, observer
    device) plus the review items (decision, score, comment; see
    :data:`REVIEW_DECISION`), CompletionFlag COMPLETE, PreliminaryFlag FINAL,
    VerificationFlag VERIFIED with the Verifying Observer Sequence
    (``verifying_observer`` as a PN, ``organization``, ``verified_at`` naive
    UTC), and the original listed in PredecessorDocumentsSequence. Same
    series as the original, next instance number, new SOP Instance UID.
    """
    classes = {"1.2.840.10008.5.1.4.1.1.88.34": hd.sr.Comprehensive3DSR,
               "1.2.840.10008.5.1.4.1.1.88.33": hd.sr.ComprehensiveSR,
               "1.2.840.10008.5.1.4.1.1.88.22": hd.sr.EnhancedSR}
    cls = classes.get(str(report.SOPClassUID))
    if cls is None:
        raise ValueError(f"not a TID 1500 SR BrainLine builds (SOP class {report.SOPClassUID})")
    root = Dataset()
    for keyword in ("ConceptNameCodeSequence", "ValueType", "ContinuityOfContent", "ContentTemplateSequence",
                    "ContentSequence"):
        if keyword in report:
            setattr(root, keyword, deepcopy(report[keyword].value))
    container = next((item for item in root.ContentSequence
                      if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue
                      == QUALITATIVE_EVALUATIONS.value), None)
    if container is None:
        container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence([])
        root.ContentSequence.append(container)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items = [hd.sr.CodeContentItem(name=REVIEW_DECISION, value=REVIEW_ACCEPTED, relationship_type=contains),
             hd.sr.CodeContentItem(name=REVIEW_SCORE, value=review_score_code(score), relationship_type=contains)]
    text = " ".join(str(comment or "").split())
    if text:
        items.append(hd.sr.TextContentItem(name=REVIEW_COMMENT, value=text, relationship_type=contains))
    container.ContentSequence.extend(items)
    doc = cls(
        evidence=_evidence_of(report),
        content=root,
        series_instance_uid=str(report.SeriesInstanceUID),
        series_number=int(report.get("SeriesNumber", 301) or 301),
        sop_instance_uid=new_uid(uid_root),
        instance_number=int(report.get("InstanceNumber", 1) or 1) + 1,
        manufacturer=str(report.get("Manufacturer", "BrainLine") or "BrainLine"),
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=verifying_observer,
        verifying_organization=organization or "",
        previous_versions=[report],
        series_description=str(report.get("SeriesDescription", "") or "") or None,
        manufacturer_model_name=str(report.get("ManufacturerModelName", "") or "") or None,
        software_versions=_software_versions(report),
        device_serial_number=str(report.get("DeviceSerialNumber", "") or "") or None,
        coding_schemes=[private_coding_scheme()],
    )
    doc.VerifyingObserverSequence[0].VerificationDateTime = verified_at.strftime("%Y%m%d%H%M%S") + "+0000"
    return doc
