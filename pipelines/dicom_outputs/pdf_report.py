"""Human-readable PDF report and its DICOM Encapsulated PDF wrapper.

:func:`build_pdf_report` renders a :class:`ReportContent` with reportlab (tables)
and matplotlib (key image with outlines, volume bar chart). It is a pure
function of its input: the worker builds it with the pseudonymous identifiers
it knows; because the identifiers are printed *inside* the PDF, the gateway
cannot re-identify the PDF by swapping DICOM attributes alone -- it must
re-render it from the same ReportContent with the real identifiers (the
content holds no pixel data other than the key image) or accept that the
document shows the pseudonym.

After a radiologist's review (service/gateway/review.py) the report is re-issued
with a :class:`ReviewInfo`: ACCEPT gives a green "Reviewed by ... on ...,
score n/5" banner and a Review section; REJECT gives a report *without
volumes* (no volume table, chart, key image with outlines or follow-up
section) whose red banner says the segmentation was rejected and cannot be
used, with the reviewer's reason.

:func:`build_encapsulated_pdf` wraps PDF bytes as an Encapsulated PDF Storage
instance in the study of the source series. highdicom has no class for this
IOD, so :class:`EncapsulatedPDF` extends highdicom's ``SOPClass`` base (which
writes SOP Common, General Series/Equipment and copies the Patient and Study
modules from the source) and adds the Encapsulated Document Series, SC
Equipment and Encapsulated Document modules.
"""

from __future__ import annotations

import datetime as _dt
import io
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Mapping, Sequence
from xml.sax.saxutils import escape

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from .codes import COMPOSITES, LABELS, PDF_CONCEPT_NAME, AlgorithmInfo, QCFinding
from .seg import labels_on_source_grid, new_uid
from .source_series import SourceSeries, as_source_series

# matplotlib and reportlab are imported where a picture or the PDF is drawn:
# every service process imports this module (about 0.4 s of start-up each),
# few of them draw.
if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from reportlab.platypus import Table

__all__ = [
    "KeyImage", "ReportContent", "FollowUp", "ReviewInfo", "EncapsulatedPDF", "NOT_REVIEWED_STATEMENT",
    "select_key_slice", "key_image_from_series", "build_pdf_report", "build_encapsulated_pdf",
]

NOT_REVIEWED_STATEMENT = "Results not reviewed by a radiologist"
NOT_FOR_DIAGNOSIS = "Automated analysis - not for primary diagnosis"
#: Lesions listed in the follow-up table of the PDF (largest growth first).
MAX_LESION_ROWS = 25


# ---------------------------------------------------------------------- content


@dataclass
class KeyImage:
    """One 2-D slice (modality units) with its labels, as stored in the source instance."""

    image: np.ndarray
    labels: np.ndarray
    pixel_spacing: tuple[float, float] = (1.0, 1.0)   # (row, column) mm
    window: tuple[float, float] | None = None         # (low, high); None = percentiles
    caption: str = ""
    #: outline colour (sRGB) and legend word per label value; None = the tumour labels
    colours: Mapping[int, tuple[int, int, int]] | None = None
    legend: Mapping[int, str] | None = None


@dataclass
class FollowUp:
    """The follow-up section of the report (from ``W/longitudinal.json``).

    ``timepoints``: ``{"label", "study_date" (YYYYMMDD), "volumes_ml": {"3",
    "tumor_core", "whole_tumor", ...}}`` sorted by date, current last;
    ``vs_prior`` / ``vs_nadir``: ``{key: {"prior_ml", "current_ml", "delta_ml",
    "percent"}}`` (``vs_prior``: the measure the assessment uses, see
    ``longitudinal_sr.change_vs_prior``); ``measure``: which measure gives
    each change, in words (printed under the change table); ``lesions``: the
    lesion dicts (volume_mm3, growth_mm3 as reported: a new lesion's
    partial-volume integral where there is one,
    hemisphere, lobe, confidence 0..1, sequence); ``detection``: False when no
    subtraction / lesion detection was possible (``note`` says why);
    ``key_image``: a subtraction slice with lesion outlines."""

    timepoints: Sequence[Mapping] = ()
    vs_prior: Mapping[str, Mapping] = field(default_factory=dict)
    vs_nadir: Mapping[str, Mapping] | None = None
    measure: str = ""
    assessment: str = "not assessable"
    reason: str = ""
    prior_date: str = ""
    nadir_date: str = ""
    interval_days: int | None = None
    lesions: Sequence[Mapping] = ()
    detection: bool = True
    note: str = ""
    notes: Sequence[str] = ()
    key_image: KeyImage | None = None


@dataclass
class ReviewInfo:
    """A radiologist's decision on the segmentation, printed in the re-issued
    report. ``at`` is naive UTC; ``score`` 1 (terrible) to 5 (perfect);
    ``comment`` the reviewer's words (the reason, for a rejection);
    ``retracted``: result objects delivered earlier that a rejection withdrew."""

    decision: str                 # "accepted" | "rejected"
    reviewer: str
    at: _dt.datetime
    score: int | None = None
    comment: str = ""
    organization: str = ""
    retracted: int = 0

    @property
    def rejected(self) -> bool:
        return self.decision == "rejected"

    @property
    def when(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} UTC"

    def statement(self) -> str:
        """The banner: "Reviewed by X on D, score 4/5" or "Segmentation REJECTED by X on D ..."."""
        if self.rejected:
            return (f"Segmentation REJECTED by {self.reviewer} on {self.when}: it cannot be used and "
                    "no volumes are reported")
        score = f", score {self.score}/5" if self.score is not None else ""
        return f"Reviewed by {self.reviewer} on {self.when}{score}"


@dataclass
class ReportContent:
    """Everything the PDF shows. Identifiers are whatever the caller passes
    (pseudonyms in the worker). ``volumes_ml`` uses the SR summary keys
    ("1", "2", "3", "tumor_core", "whole_tumor"); ``sequences`` maps a role
    (t1, t1c, t2, flair) to the series description used."""

    patient_id: str
    patient_name: str = ""
    study_date: str = ""
    accession_number: str = ""
    study_description: str = ""
    study_instance_uid: str = ""
    sequences: Mapping[str, str] = field(default_factory=dict)
    algorithm: AlgorithmInfo = field(default_factory=AlgorithmInfo)
    volumes_ml: Mapping[str, float] = field(default_factory=dict)
    tiv_ml: float | None = None
    qc_findings: Sequence[QCFinding] = ()
    reviewed: bool = False
    reviewed_by: str = ""
    key_image: KeyImage | None = None
    notes: Sequence[str] = ()
    generated_at: _dt.datetime | None = None
    title: str = "BrainLine brain tumour volumetry"
    #: follow-up section (change against earlier studies); None = no section
    followup: FollowUp | None = None
    #: a radiologist's review (re-issued report); None = not reviewed
    review: ReviewInfo | None = None


def select_key_slice(labels: np.ndarray) -> int | None:
    """Index along axis 0 with the largest tumour area (any label > 0); None if empty."""
    areas = np.count_nonzero(np.asarray(labels).reshape(labels.shape[0], -1), axis=1)
    if areas.max(initial=0) == 0:
        return None
    return int(np.argmax(areas))


def key_image_from_series(
    source_files: Sequence[str | PathLike] | SourceSeries, labels: sitk.Image,
) -> KeyImage:
    """Key image from the reference series: the instance with the largest tumour
    area (the middle instance if nothing is segmented), labels on its grid."""
    series = as_source_series(source_files)
    frames = labels_on_source_grid(labels, series)
    index = select_key_slice(frames)
    caption_tail = ""
    if index is None:
        index, caption_tail = len(series) // 2, " (no tumour segmented)"
    ds = series.datasets[index]
    image = series.modality_image(index)
    window = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
        w = float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
        if w > 0:
            window = (c - w / 2, c + w / 2)
    desc = str(ds.get("SeriesDescription", "reference series"))
    caption = f"{desc}, image {ds.get('InstanceNumber', index + 1)} of {len(series)}{caption_tail}"
    return KeyImage(image, frames[index], tuple(float(v) for v in ds.PixelSpacing), window, caption)


# ------------------------------------------------------------------- rendering


def _png(fig: Figure, dpi: int = 150) -> io.BytesIO:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return buf


def enhancement_words(lesion: Mapping) -> str:
    """A new lesion's enhancement and axial diameters for the lesion table:
    "14 x 11, measurable", "7 x 6", "no" (not enhancing), "" (not assessed:
    growing lesions, lesion mode without T1c)."""
    if "enhancing" not in lesion:
        return ""
    if not lesion.get("enhancing"):
        return "no"
    if lesion.get("long_axis_mm") is None:
        return "yes"
    size = f"{float(lesion['long_axis_mm']):.0f} x {float(lesion['short_axis_mm']):.0f}"
    return size + (", measurable" if lesion.get("measurable") else "")


def _key_image_png(key: KeyImage) -> io.BytesIO:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    img = np.asarray(key.image, dtype=np.float64)
    if key.window is not None:
        low, high = key.window
    else:
        nz = img[img != 0]
        low, high = np.percentile(nz if nz.size else img, [0.5, 99.5])
        high = max(high, low + 1.0)
    row_mm, col_mm = key.pixel_spacing
    fig = Figure(figsize=(3.6, 3.6 * img.shape[0] * row_mm / max(img.shape[1] * col_mm, 1e-6)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img, cmap="gray", vmin=low, vmax=high, aspect=row_mm / col_mm, interpolation="nearest")
    handles = []
    colours = key.colours if key.colours is not None else {v: c.rgb for v, c in LABELS.items()}
    legend = key.legend if key.legend is not None else {v: c.key for v, c in LABELS.items()}
    for value, rgb in colours.items():
        mask = np.asarray(key.labels) == value
        if mask.any():
            ax.contour(mask.astype(np.uint8), levels=[0.5], colors=[tuple(c / 255 for c in rgb)],
                       linewidths=1.0)
            handles.append(Patch(edgecolor=tuple(c / 255 for c in rgb), facecolor="none",
                                 label=legend.get(value, str(value))))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
    ax.set_axis_off()
    return _png(fig)


def _volume_rows(content: ReportContent) -> list[tuple[str, str, float | None]]:
    rows: list[tuple[str, str, float | None]] = []
    for value, concept in LABELS.items():
        rows.append((concept.description, str(value), _get(content.volumes_ml, str(value))))
    for key, comp in COMPOSITES.items():
        rows.append((f"{comp.name.lower().replace('tumor', 'tumour')} ({comp.method.value[-2:]})",
                     "+".join(str(v) for v in comp.labels), _get(content.volumes_ml, key)))
    return rows


def _get(volumes: Mapping, key: str) -> float | None:
    for k in (key, int(key) if key.isdigit() else None):
        if k is not None and k in volumes and volumes[k] is not None:
            return float(volumes[k])
    return None


def _bar_chart_png(content: ReportContent) -> io.BytesIO:
    from matplotlib.figure import Figure
    names, values, colours = [], [], []
    for value, concept in LABELS.items():
        names.append(concept.key)
        values.append(_get(content.volumes_ml, str(value)) or 0.0)
        colours.append(tuple(c / 255 for c in concept.rgb))
    for key, grey in (("tumor_core", 0.45), ("whole_tumor", 0.25)):
        names.append({"tumor_core": "TC", "whole_tumor": "WT"}[key])
        values.append(_get(content.volumes_ml, key) or 0.0)
        colours.append((grey, grey, grey))
    fig = Figure(figsize=(3.4, 2.4))
    ax = fig.add_axes((0.17, 0.14, 0.8, 0.78))
    bars = ax.bar(names, values, color=colours, edgecolor="black", linewidth=0.5)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("Volume (mL)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_ylim(0, max(values + [1.0]) * 1.18)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _fmt_date(value: str) -> str:
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _table(rows: list[list], widths: list[float], header: bool = True) -> Table:
    from reportlab.lib import colors
    from reportlab.platypus import Table, TableStyle
    t = Table(rows, colWidths=widths, hAlign="LEFT")
    style = [
        ("FONT", (0, 0), (-1, -1), "Helvetica", 9),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
    ]
    if header:
        style += [("FONT", (0, 0), (-1, 0), "Helvetica-Bold", 9),
                  ("BACKGROUND", (0, 0), (-1, 0), colors.Color(0.9, 0.9, 0.9))]
    t.setStyle(TableStyle(style))
    return t


#: Components of the follow-up tables: summary key -> short name.
_FOLLOWUP_KEYS = (("3", "ET"), ("1", "NCR"), ("2", "ED"), ("tumor_core", "TC"), ("whole_tumor", "WT"))
_PLOT_KEYS = (("3", "ET", (0.85, 0.65, 0.0), "o"), ("tumor_core", "TC", (0.8, 0.1, 0.1), "s"),
              ("whole_tumor", "WT", (0.25, 0.25, 0.25), "^"))


def _as_date(value: str) -> _dt.date | None:
    try:
        return _dt.datetime.strptime(str(value)[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _volume_time_png(followup: FollowUp) -> io.BytesIO:
    """ET, TC and WT volume (mL) against study date, one point per timepoint."""
    from matplotlib.figure import Figure
    points = [(d, tp) for tp in followup.timepoints if (d := _as_date(tp.get("study_date", ""))) is not None]
    fig = Figure(figsize=(5.2, 2.6))
    ax = fig.add_axes((0.11, 0.2, 0.86, 0.72))
    dates = [d for d, _ in points]
    for key, name, colour, marker in _PLOT_KEYS:
        values = [_get(tp.get("volumes_ml") or {}, key) for _, tp in points]
        xs = [d for d, v in zip(dates, values) if v is not None]
        ys = [v for v in values if v is not None]
        if ys:
            ax.plot(xs, ys, marker=marker, color=colour, label=name, linewidth=1.2, markersize=4)
    for d, tp in points:
        ax.annotate(str(tp.get("label", "")), (d, 0), xytext=(0, 2), textcoords="offset points",
                    fontsize=6, ha="center", va="bottom", color="grey")
    ax.set_ylabel("Volume (mL)", fontsize=8)
    ax.tick_params(labelsize=7)
    if dates:
        span = max((max(dates) - min(dates)).days, 1)
        pad = _dt.timedelta(days=max(span // 12, 7))
        ax.set_xlim(min(dates) - pad, max(dates) + pad)
        ax.set_xticks(dates)
        ax.set_xticklabels([d.isoformat() for d in dates], rotation=20, ha="right")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _fmt(value, pattern: str = "{:.2f}", signed: bool = False) -> str:
    if value is None:
        return "-"
    return (("+" if signed and float(value) > 0 else "") + pattern.format(float(value)))


def _followup_story(f: FollowUp, p, body, small, h2) -> list:
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, PageBreak, Spacer, TableStyle
    story: list = [PageBreak(), p("Follow-up", h2)]
    prior = _fmt_date(f.prior_date) if f.prior_date else "the prior study"
    interval = f" ({f.interval_days} days earlier)" if f.interval_days is not None else ""
    reason = f.reason[:1].upper() + f.reason[1:] if f.reason else ""
    story.append(p(f"Compared with the prior study of {prior}{interval}. Assessment: {f.assessment}."
                   + (f" {reason}" if reason else "")))
    if f.timepoints:
        story.append(Image(_volume_time_png(f), width=140 * mm, height=140 * mm * 2.6 / 5.2))
        story.append(p("Volume over time (enhancing tumour ET, tumour core TC, whole tumour WT)", small))
        rows = [["Study date", "Timepoint", "ET (mL)", "TC (mL)", "WT (mL)"]]
        for tp in f.timepoints:
            v = tp.get("volumes_ml") or {}
            rows.append([_fmt_date(str(tp.get("study_date", ""))), ", ".join([str(tp.get("label", ""))] + [
                k for k in tp.get("kept_as") or [] if k != tp.get("label")]),
                _fmt(_get(v, "3")), _fmt(_get(v, "tumor_core")), _fmt(_get(v, "whole_tumor"))])
        t = _table(rows, [28 * mm, 50 * mm, 24 * mm, 24 * mm, 24 * mm])
        t.setStyle(TableStyle([("ALIGN", (2, 1), (-1, -1), "RIGHT")]))
        story += [t, Spacer(1, 2 * mm)]
    nadir = f"Nadir {_fmt_date(f.nadir_date)}" if f.nadir_date else "Nadir"
    rows = [["Region", "Prior (mL)", "Current (mL)", "Change (mL)", "Change (%)", p(f"{nadir} (mL)", small),
             "vs nadir (%)"]]
    for key, name in _FOLLOWUP_KEYS:
        c = f.vs_prior.get(key)
        if not c:
            continue
        n = (f.vs_nadir or {}).get(key) or {}
        rows.append([name, _fmt(c.get("prior_ml")), _fmt(c.get("current_ml")), _fmt(c.get("delta_ml"), signed=True),
                     _fmt(c.get("percent"), "{:.1f}", signed=True), _fmt(n.get("prior_ml")),
                     _fmt(n.get("percent"), "{:.1f}", signed=True)])
    if len(rows) > 1:
        t = _table(rows, [22 * mm, 22 * mm, 24 * mm, 24 * mm, 22 * mm, 24 * mm, 24 * mm])
        t.setStyle(TableStyle([("ALIGN", (1, 1), (-1, -1), "RIGHT")]))
        story.append(t)
        if f.measure:
            story.append(p(f.measure, small))
    story.append(p("New and growing lesions", h2))
    if not f.detection:
        story.append(p("No subtraction or new-lesion detection was possible" + (f": {f.note}" if f.note else ".")))
    elif not f.lesions:
        story.append(p("No new or growing lesion detected."))
    else:
        rows = [["#", "Kind", "Volume\n(mm3)", "Growth\n(mm3)", "Location", "Enhancing,\naxial size (mm)",
                 "Confidence", "Sequence"]]
        shown = sorted(f.lesions, key=lambda x: -float(x.get("growth_mm3") or 0.0))[:MAX_LESION_ROWS]
        for x in shown:
            where = " ".join(w for w in (str(x.get("hemisphere", "")), str(x.get("lobe", ""))) if w)
            rows.append([str(x.get("id", "")), str(x.get("kind", "")), _fmt(x.get("volume_mm3"), "{:.0f}"),
                         _fmt(x.get("growth_mm3"), "{:.0f}", signed=True), p(where), p(enhancement_words(x)),
                         _fmt(x.get("confidence"), "{:.2f}"), str(x.get("sequence", "")).upper()])
        t = _table(rows, [8 * mm, 16 * mm, 17 * mm, 17 * mm, 38 * mm, 34 * mm, 20 * mm, 19 * mm])
        t.setStyle(TableStyle([("ALIGN", (2, 1), (3, -1), "RIGHT")]))
        story.append(t)
        kinds = [str(x.get("kind", "")) for x in f.lesions]
        more = len(f.lesions) - len(shown)
        story.append(p(f"{kinds.count('new')} new and {kinds.count('growing')} growing lesion(s)"
                       + (f"; the {len(shown)} with the largest growth are listed, {more} smaller ones are in "
                          "the lesion SEG and the follow-up SR" if more > 0 else "") + ".", small))
    if f.key_image is not None:
        ki = f.key_image
        aspect = ki.image.shape[0] * ki.pixel_spacing[0] / max(ki.image.shape[1] * ki.pixel_spacing[1], 1e-6)
        story += [Spacer(1, 2 * mm), Image(_key_image_png(ki), width=62 * mm, height=62 * mm * aspect),
                  p(ki.caption or "Subtraction", small)]
    notes = ([f.note] if f.note and f.detection else []) + list(f.notes)
    if notes:
        story.append(p("Follow-up notes", h2))
        story += [p(n) for n in notes]
    return story


def build_pdf_report(report: ReportContent) -> bytes:
    """Render the report as PDF bytes (A4, one or two pages)."""
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, Paragraph, Spacer, Table, TableStyle
    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontSize=9, leading=11)
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor=colors.Color(0.3, 0.3, 0.3))
    h2 = ParagraphStyle("h2", parent=styles["Heading2"], fontSize=11, spaceBefore=6, spaceAfter=3)
    warn = ParagraphStyle("warn", parent=body, fontName="Helvetica-Bold", fontSize=11, leading=14,
                          textColor=colors.white, backColor=colors.Color(0.75, 0.1, 0.1),
                          borderPadding=(4, 4, 4, 4), spaceAfter=8)
    ok = ParagraphStyle("ok", parent=warn, backColor=colors.Color(0.1, 0.45, 0.2))
    p = lambda text, style=body: Paragraph(escape(str(text)), style)  # noqa: E731

    algo = report.algorithm
    generated = report.generated_at or _dt.datetime.now()
    review = report.review
    rejected = review is not None and review.rejected
    title = "BrainLine brain tumour segmentation - rejected" if rejected else report.title
    story: list = [Paragraph(escape(title), styles["Title"])]
    if review is not None:
        story.append(p(review.statement(), warn if rejected else ok))
    elif report.reviewed:
        who = f" ({report.reviewed_by})" if report.reviewed_by else ""
        story.append(p(f"Results reviewed by a radiologist{who}", ok))
    else:
        story.append(p(NOT_REVIEWED_STATEMENT, warn))
    story.append(p(NOT_FOR_DIAGNOSIS + (". " if rejected else ". Volumes are computed automatically from MRI "
                                        "and must be interpreted together with the images."), small))

    story.append(p("Study", h2))
    study_rows = [["Patient ID", report.patient_id], ["Patient name", report.patient_name],
                  ["Study date", _fmt_date(report.study_date)], ["Accession number", report.accession_number],
                  ["Study description", report.study_description], ["Study UID", report.study_instance_uid]]
    story.append(_table([[a, p(b)] for a, b in study_rows if b], [38 * mm, 132 * mm], header=False))

    story.append(p("Sequences used", h2))
    seq_rows = [["Role", "Series"]] + [[role, p(desc)] for role, desc in report.sequences.items()]
    story.append(_table(seq_rows if report.sequences else [["Role", "Series"], ["-", "not recorded"]],
                        [38 * mm, 132 * mm]))

    story.append(p("Software", h2))
    sw_rows = [["Application", f"{algo.name} {algo.version}"], ["Segmentation backend", algo.backend],
               ["Model", algo.model_name + (f" {algo.model_version}" if algo.model_version else "")]]
    labels = {"model_choice": "Model choice", "licence": "Licence", "citation": "Citation",
              "intended_use": "Intended use"}
    sw_rows += [[label, str(algo.parameters[key])] for key, label in labels.items() if algo.parameters.get(key)]
    story.append(_table([[a, p(b)] for a, b in sw_rows], [38 * mm, 132 * mm], header=False))

    if review is not None:
        story.append(p("Radiologist review", h2))
        who = review.reviewer + (f", {review.organization}" if review.organization else "")
        rows = [["Decision", "REJECTED: the segmentation cannot be used" if rejected
                 else "ACCEPTED: the segmentation is acceptable"],
                ["Reviewer", who], ["Date", review.when]]
        if review.score is not None:
            rows.append(["Score", f"{review.score}/5 (5 = perfect, 1 = terrible)"])
        if review.comment:
            rows.append(["Reason" if rejected else "Comment", review.comment])
        story.append(_table([[a, p(b)] for a, b in rows], [38 * mm, 132 * mm], header=False))
    if rejected:
        withdrawn = (f" The {review.retracted} BrainLine result object{'s' if review.retracted != 1 else ''} "
                     "delivered earlier for this study (segmentation, volumes, overlay, report) "
                     "were withdrawn with an IHE IOCM rejection note (Rejected for Quality Reasons)."
                     if review.retracted else "")
        story.append(p("The automated tumour segmentation of this study was rejected by the reviewer. It "
                       "cannot be used, and no volumes or measurements derived from it are reported." + withdrawn))
    else:
        story.append(p("Volumes", h2))
        tiv = report.tiv_ml
        vol_rows = [["Region", "BraTS label", "Volume (mL)", "% of TIV"]]
        for name, lab, vol in _volume_rows(report):
            pct = f"{100.0 * vol / tiv:.2f}" if (vol is not None and tiv) else "-"
            vol_rows.append([p(name), lab, "-" if vol is None else f"{vol:.2f}", pct])
        vol_rows.append(["total intracranial volume (TIV)", "-", "-" if tiv is None else f"{tiv:.1f}", "-"])
        vt = _table(vol_rows, [78 * mm, 26 * mm, 30 * mm, 24 * mm])
        vt.setStyle(TableStyle([("ALIGN", (1, 1), (-1, -1), "RIGHT")]))
        story.append(vt)

    story.append(p("Quality control", h2))
    if report.qc_findings:
        qc_rows = [["Check", "Result", "Detail"]]
        for f in report.qc_findings:
            qc_rows.append([p(f.concept.meaning), p(f.status), p(f.detail or "")])
        qt = _table(qc_rows, [50 * mm, 25 * mm, 95 * mm])
        flagged = [i for i, f in enumerate(report.qc_findings, start=1) if f.flagged]
        for i in flagged:
            qt.setStyle(TableStyle([("BACKGROUND", (0, i), (-1, i), colors.Color(1.0, 0.88, 0.7))]))
        story.append(qt)
    else:
        story.append(p("No quality-control findings recorded."))
    for note in report.notes:
        story.append(p(note))
    if rejected:  # no key image with outlines, no volume chart, no follow-up volumes
        return _finish(story, report, algo, generated)

    images = []
    if report.key_image is not None:
        key_png = _key_image_png(report.key_image)
        ki = report.key_image
        aspect = ki.image.shape[0] * ki.pixel_spacing[0] / max(ki.image.shape[1] * ki.pixel_spacing[1], 1e-6)
        images.append([Image(key_png, width=62 * mm, height=62 * mm * aspect)])
    chart = Image(_bar_chart_png(report), width=72 * mm, height=72 * mm * 2.4 / 3.4)
    if images:
        grid = Table([[images[0][0], chart],
                      [p(report.key_image.caption or "Key image", small), p("Volumes (mL)", small)]],
                     colWidths=[88 * mm, 85 * mm], hAlign="LEFT")
    else:
        grid = Table([[chart], [p("Volumes (mL)", small)]], hAlign="LEFT")
    grid.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP")]))
    story += [Spacer(1, 2 * mm), grid]
    if report.followup is not None:
        story += _followup_story(report.followup, p, body, small, h2)
    return _finish(story, report, algo, generated)


def _finish(story: list, report: ReportContent, algo: AlgorithmInfo, generated: _dt.datetime) -> bytes:
    """Footer on every page, then the PDF bytes."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import SimpleDocTemplate
    footer = f"{algo.name} {algo.version} | generated {generated:%Y-%m-%d %H:%M} | {NOT_FOR_DIAGNOSIS}"

    def on_page(canvas, doc):
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.setFillColor(colors.grey)
        canvas.drawString(18 * mm, 10 * mm, footer)
        canvas.drawRightString(A4[0] - 18 * mm, 10 * mm, f"page {doc.page}")
        canvas.restoreState()

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm,
                            topMargin=15 * mm, bottomMargin=18 * mm, title=report.title,
                            author=algo.name, creator=f"{algo.name} {algo.version}",
                            subject="Brain tumour volumetry")
    doc.build(story, onFirstPage=on_page, onLaterPages=on_page)
    return buf.getvalue()


# ------------------------------------------------------------- Encapsulated PDF


class EncapsulatedPDF(hd.SOPClass):
    """Encapsulated PDF Storage instance (PS3.3 A.45.1) built on highdicom's SOPClass."""

    def __init__(
        self,
        pdf_bytes: bytes,
        ref_dataset: Dataset,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        manufacturer: str,
        document_title: str,
        *,
        manufacturer_model_name: str | None = None,
        software_versions: Sequence[str] | None = None,
        device_serial_number: str | None = None,
        series_description: str | None = None,
        source_instances: Sequence[Dataset] = (),
        burned_in_annotation: str = "YES",
        verified: bool = False,
    ) -> None:
        if not bytes(pdf_bytes[:5]) == b"%PDF-":
            raise ValueError("pdf_bytes is not a PDF document")
        super().__init__(
            study_instance_uid=str(ref_dataset.StudyInstanceUID),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=EncapsulatedPDFStorage,
            instance_number=instance_number,
            modality="DOC",
            manufacturer=manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=list(software_versions) if software_versions else None,
            device_serial_number=device_serial_number,
        )
        # Patient, General Study, Patient Study, Clinical Trial modules from the source
        self.copy_patient_and_study_information(ref_dataset)
        if "SpecificCharacterSet" in ref_dataset:
            self.SpecificCharacterSet = ref_dataset.SpecificCharacterSet
        # SC Equipment
        self.ConversionType = "WSD"
        # Encapsulated Document
        self.AcquisitionDateTime = None
        self.BurnedInAnnotation = burned_in_annotation
        self.DocumentTitle = document_title[:1024]
        self.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(PDF_CONCEPT_NAME)]
        self.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
        self.MIMETypeOfEncapsulatedDocument = "application/pdf"
        if source_instances:
            refs = []
            for ds in source_instances:
                item = Dataset()
                item.ReferencedSOPClassUID = ds.SOPClassUID
                item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
                refs.append(item)
            self.SourceInstanceSequence = refs
        data = bytes(pdf_bytes)
        self.EncapsulatedDocumentLength = len(data)
        self.EncapsulatedDocument = data + (b"\x00" if len(data) % 2 else b"")


def build_encapsulated_pdf(
    pdf_bytes: bytes,
    source_files: Sequence[str | PathLike] | SourceSeries,
    *,
    algorithm: AlgorithmInfo | None = None,
    uid_root: str | None = None,
    series_number: int = 303,
    instance_number: int = 1,
    manufacturer: str = "BrainLine",
    document_title: str = "BrainLine brain tumour volumetry report",
    series_description: str = "BrainLine report - NOT FOR PRIMARY DIAGNOSIS",
    referenced_instances: Sequence[Dataset] = (),
    verified: bool = False,
) -> EncapsulatedPDF:
    """Encapsulated PDF Storage instance in the study of the source series.

    SourceInstanceSequence lists the source instances plus ``referenced_instances``
    (e.g. the SEG and SR whose results the PDF shows). BurnedInAnnotation is
    YES: the PDF prints patient identifiers.
    """
    algorithm = algorithm or AlgorithmInfo()
    series = as_source_series(source_files)
    return EncapsulatedPDF(
        pdf_bytes,
        series.first,
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=instance_number,
        manufacturer=manufacturer,
        document_title=document_title,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.software_versions,
        device_serial_number=algorithm.device_serial_number,
        series_description=series_description,
        source_instances=list(series.instances) + list(referenced_instances),
        verified=verified,
    )
