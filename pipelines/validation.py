"""Reference-set validation (EASE protocol): scoring of one processed case,
comparison of a validation run with the last accepted one, and the HTML
report. Pure processing on files and dicts: no network, no database; the
command (``brainline validate``) that runs the pipeline on every case is in
``brainline.service.compute.validate``.

Scoring
-------
A case is scored from the DICOM SEG that ``process_study`` wrote (read back
with highdicom onto the instances of the series it references), which proves
the whole DICOM path. Only when there is no SEG (nothing was segmented, so no
SEG is written) is ``segmentation.nii.gz`` used instead.

* Regions: WT = labels > 0, TC = labels 1 or 3, ET = label 3 (BraTS 2023:
  1 NCR, 2 ED, 3 ET; a reference in BraTS 2020 convention with 4 for ET is
  mapped 4 -> 3).
* The reference segmentation is resampled (nearest neighbour, SimpleITK, in
  physical space) onto the grid of the segmentation, so it may be on any grid.
* Volumes (mL) are voxel counts times the voxel volume of that grid (pixel
  spacing x distance between slices).
* Dice = 2|A and B| / (|A| + |B|), per region, when the reference holds that
  region. When the reference region is empty, Dice is ``None`` (not scored):
  an empty reference region usually means "not annotated" (tcga-du-7294's
  fusion has no ET). A case can declare in ``case.json``
  ``"annotated_regions": ["WT", "TC", "ET"]``: those regions are annotated
  exhaustively, and an empty one scores 1.0 when the segmentation is empty
  too, else 0.0 (BraTS convention).

Comparison (:func:`compare`)
----------------------------
A regression is

* a case that failed in this run (always, even without an accepted record);
* a case in the accepted record that is missing from this run;
* a WT, TC or ET volume that changed by more than ``volume_relative`` (25 %)
  of the accepted volume **and** by more than ``volume_absolute_ml``
  (0.5 mL): the absolute floor keeps a 0.1 -> 0.2 mL ET from counting as a
  100 % change; an accepted volume of 0 regresses when the current one
  exceeds the floor;
* a Dice that dropped by more than ``dice_drop`` (0.05) below the accepted
  Dice (only where both runs scored it);
* a result object (overlay, PDF) that was not built although the accepted
  run built it (``process_study`` goes on without it; SEG and SR are required).

Other differences (new cases, new QC flags, a changed model, input or
reference file, a case that became more than twice as slow) are notes.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .dicom_outputs import labels_on_source_grid, read_seg_labels, read_source_series

REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
FORMAT = "brainline-validation/1"


class ScoringError(ValueError):
    """The outputs of a case cannot be scored; the message says why."""


@dataclass(frozen=True)
class Thresholds:
    volume_relative: float = 0.25
    volume_absolute_ml: float = 0.5
    dice_drop: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Thresholds":
        data = data or {}
        return cls(**{k: float(v) for k, v in data.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------ scoring


def region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """WT / TC / ET masks of a BraTS 2023 label array."""
    return {"WT": labels > 0, "TC": np.isin(labels, (1, 3)), "ET": labels == 3}


def dice(a: np.ndarray, b: np.ndarray, empty: float | None = None) -> float | None:
    """Dice of two boolean masks; ``empty`` when both are empty."""
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return empty
    return round(2.0 * float(np.logical_and(a, b).sum()) / total, 4)


def load_reference(path: Path) -> sitk.Image:
    """Reference labels as a UInt8 image in BraTS 2023 convention (4 -> 3).
    Raises ScoringError for values other than 0-4 or a non-3-D image."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ScoringError(f"reference segmentation {path.name} cannot be read: {str(exc).strip()[:200]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ScoringError(f"reference segmentation {path.name} is not a 3-D label image")
    arr = sitk.GetArrayFromImage(image)
    values = set(np.unique(arr).tolist())
    bad = sorted(v for v in values if v not in (0, 1, 2, 3, 4))
    if bad:
        raise ScoringError(f"reference segmentation {path.name} holds values {bad}; expected BraTS labels "
                           "1 NCR, 2 ED, 3 ET (or 4 ET)")
    arr = np.where(arr == 4, 3, arr).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def find_seg(results_dir: Path) -> Path | None:
    """The DICOM SEG file among the results (``out/dicom``), or None."""
    if not results_dir.is_dir():
        return None
    for path in sorted(results_dir.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 - not ours to judge here
            continue
        if str(ds.get("Modality", "")) == "SEG":
            return path
    return None


def series_files(dicom_dir: Path, series_uid: str) -> list[Path]:
    """The files of one series in a study folder (searched recursively)."""
    files = []
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # noqa: BLE001 - DICOMDIR, stray files
            continue
        if str(ds.get("SeriesInstanceUID", "")) == series_uid:
            files.append(path)
    return files


def _slice_spacing(series) -> float:
    positions = sorted(float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), series.normal))
                       for ds in series.datasets)
    if len(positions) > 1:
        return float(np.median(np.diff(positions)))
    first = series.first
    return float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)


def _labels_from_seg(seg_path: Path, dicom_dir: Path):
    """(labels [instance,row,col], voxel mL, SourceSeries) from a SEG read back."""
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    try:
        series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        raise ScoringError(f"{seg_path.name} does not reference its source series") from None
    files = series_files(dicom_dir, series_uid)
    if not files:
        raise ScoringError(f"the series {series_uid} that the SEG references is not in the study folder")
    series = read_source_series(files)
    labels = read_seg_labels(seg_path, series)
    row_mm, col_mm = (float(v) for v in series.first.PixelSpacing)
    voxel_ml = row_mm * col_mm * _slice_spacing(series) / 1000.0
    return labels, voxel_ml, series


def score_case(work: Path, dicom_dir: Path, reference_path: Path | None = None,
               annotated_regions: Iterable[str] = ()) -> dict:
    """Score one processed case.

    ``work`` is the output folder of ``process_study`` (``work/dicom`` holds
    the results), ``dicom_dir`` the input study (for the instances the SEG
    references). Returns ``scored_from``, ``volumes_ml``, ``dice`` and
    ``reference_volumes_ml`` (the last two None without a reference)."""
    annotated = set(annotated_regions)
    seg_path = find_seg(work / "dicom")
    reference = load_reference(reference_path) if reference_path else None
    ref_labels = None
    if seg_path is not None:
        labels, voxel_ml, series = _labels_from_seg(seg_path, dicom_dir)
        scored_from = "dicom-seg"
        if reference is not None:
            ref_labels = labels_on_source_grid(reference, series)
    else:
        seg_file = work / "segmentation.nii.gz"
        if not seg_file.exists():
            raise ScoringError("the run wrote neither a DICOM SEG nor segmentation.nii.gz")
        image = sitk.ReadImage(str(seg_file))
        labels = sitk.GetArrayFromImage(image).astype(np.uint8)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        scored_from = "segmentation.nii.gz"
        if reference is not None:
            ref_labels = sitk.GetArrayFromImage(sitk.Resample(
                reference, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    masks = region_masks(labels)
    out = {
        "scored_from": scored_from,
        "volumes_ml": {r: round(float(masks[r].sum()) * voxel_ml, 3) for r in REGIONS},
        "dice": None,
        "reference_volumes_ml": None,
    }
    if ref_labels is not None:
        ref_masks = region_masks(ref_labels)
        out["dice"] = {r: dice(masks[r], ref_masks[r], empty=1.0 if r in annotated else None)
                       for r in REGIONS}
        for r in REGIONS:  # a region the reference lacks and does not declare annotated: not scored
            if not ref_masks[r].any() and r not in annotated:
                out["dice"][r] = None
        out["reference_volumes_ml"] = {r: round(float(ref_masks[r].sum()) * voxel_ml, 3) for r in REGIONS}
    return out


def sha256_of_files(paths: Sequence[Path], root: Path) -> str:
    """One digest over the relative names and contents of ``paths``."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------- comparison


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def volume_changed(accepted: float, current: float, th: Thresholds) -> bool:
    change = abs(current - accepted)
    return change > th.volume_absolute_ml and change > th.volume_relative * abs(accepted)


def compare(cases: dict, accepted: dict | None, th: Thresholds) -> dict:
    """Regressions and notes of this run's ``cases`` against an accepted record
    (None: only failures count). Each regression is ``{case, metric,
    accepted, current, message}``; notes are sentences."""
    regressions: list[dict] = []
    notes: list[str] = []

    def regress(case: str, metric: str, acc, cur, message: str) -> None:
        regressions.append({"case": case, "metric": metric, "accepted": acc, "current": cur,
                            "message": f"{case}: {message}"})

    for name, case in cases.items():
        if case["status"] != "ok":
            regress(name, "failed", None, None, f"failed: {case.get('error') or 'unknown error'}")
    if accepted is None:
        notes = ["no accepted record: nothing to compare"]
        notes += [f"{name}: {f['kind']} not built: {f['error']}" for name, case in cases.items()
                  for f in case.get("objects_failed") or []]
        return {"status": "no accepted record", "regressions": regressions, "notes": notes}

    acc_cases = accepted.get("cases", {})
    for name, acc in acc_cases.items():
        cur = cases.get(name)
        if cur is None:
            regress(name, "missing", acc.get("status"), None,
                    "in the accepted record but missing from this run")
            continue
        if cur["status"] != "ok":
            continue  # already a regression
        if acc.get("status") != "ok":
            notes.append(f"{name}: failed in the accepted record, succeeds now")
            continue
        for r in REGIONS:
            a = (acc.get("volumes_ml") or {}).get(r)
            c = (cur.get("volumes_ml") or {}).get(r)
            if a is not None and c is not None and volume_changed(a, c, th):
                rel = f"{(c - a) / a * 100:+.0f}%" if a else "from 0"
                regress(name, f"{r} volume", a, c, f"{r} volume {_fmt(a, 2)} -> {_fmt(c, 2)} mL ({rel}; "
                        f"limit {th.volume_relative * 100:.0f}% and {th.volume_absolute_ml:g} mL)")
        acc_dice, cur_dice = acc.get("dice") or {}, cur.get("dice") or {}
        for r in REGIONS:
            a, c = acc_dice.get(r), cur_dice.get(r)
            if a is not None and c is not None and c < a - th.dice_drop:
                regress(name, f"{r} Dice", a, c,
                        f"{r} Dice {a:.3f} -> {c:.3f} (dropped {a - c:.3f}; limit {th.dice_drop:g})")
            elif a is not None and c is None:
                notes.append(f"{name}: {r} Dice was {a:.3f} in the accepted record and is not scored now")
        for key, what in (("study", "input study"), ("reference", "reference segmentation")):
            a_sha = (acc.get(key) or {}).get("sha256")
            c_sha = (cur.get(key) or {}).get("sha256")
            if a_sha != c_sha:
                notes.append(f"{name}: the {what} differs from the accepted run's")
        acc_failed_kinds = {f.get("kind") for f in acc.get("objects_failed") or []}
        for f in cur.get("objects_failed") or []:
            if f.get("kind") in acc_failed_kinds:
                notes.append(f"{name}: {f['kind']} not built (nor in the accepted run): {f['error']}")
            else:
                regress(name, f"{f['kind']} object", "built", "not built", f"{f['kind']} not built: {f['error']}")
        new_flags = sorted(set(cur.get("qc_flags") or []) - set(acc.get("qc_flags") or []))
        for flag in new_flags:
            notes.append(f"{name}: new QC flag: {flag}")
        a_t = (acc.get("timings_s") or {}).get("total")
        c_t = (cur.get("timings_s") or {}).get("total")
        if a_t and c_t and c_t > 2 * a_t and c_t - a_t > 10:
            notes.append(f"{name}: took {c_t:.0f} s, accepted run {a_t:.0f} s")
    for name in cases:
        if name not in acc_cases:
            notes.append(f"{name}: new case, not in the accepted record")
    return {"status": "compared", "regressions": regressions, "notes": notes}


# ------------------------------------------------------------------- report


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def dice_plot(cases: dict, accepted: dict | None) -> str | None:
    """Per-case Dice bars (WT/TC/ET), current vs accepted; base64 PNG or None."""
    names = [n for n, c in cases.items() if any(v is not None for v in (c.get("dice") or {}).values())]
    acc_cases = (accepted or {}).get("cases", {})
    if not names:
        return None
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 7.5))
    for i, r in enumerate(REGIONS):
        ax = fig.add_subplot(3, 1, i + 1)
        x = np.arange(len(names))
        cur = [((cases[n].get("dice") or {}).get(r)) for n in names]
        acc = [((acc_cases.get(n, {}).get("dice") or {}).get(r)) for n in names]
        width = 0.38 if accepted else 0.6
        ax.bar(x - (width / 2 if accepted else 0), [v if v is not None else 0 for v in cur], width,
               label="this run", color="#3b75af")
        if accepted:
            ax.bar(x + width / 2, [v if v is not None else 0 for v in acc], width, label="accepted",
                   color="#b0b0b0")
        for xi, v in zip(x, cur):
            if v is None:
                ax.text(xi, 0.02, "n/a", ha="center", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_xlim(-0.75, len(names) - 0.25 + max(0, 3 - len(names)))
        ax.set_ylabel(f"{r} Dice")
        ax.set_xticks(x, names if i == 2 else [""] * len(names), rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Dice against the reference segmentation")
    fig.tight_layout()
    return _png_base64(fig)


def volume_plot(cases: dict, accepted: dict | None, th: Thresholds) -> str | None:
    """Scatter of WT/TC/ET volumes, this run against the accepted run, with
    the identity line and the relative tolerance band; base64 PNG or None."""
    if not accepted:
        return None
    acc_cases = accepted.get("cases", {})
    colors = {"WT": "#3b75af", "TC": "#d9822b", "ET": "#c23b3b"}
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    top = 1.0
    plotted = False
    for r in REGIONS:
        xs, ys = [], []
        for n, c in cases.items():
            a = (acc_cases.get(n, {}).get("volumes_ml") or {}).get(r)
            v = (c.get("volumes_ml") or {}).get(r)
            if a is not None and v is not None:
                xs.append(a)
                ys.append(v)
                if volume_changed(a, v, th):
                    ax.annotate(n, (a, v), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=colors[r])
        if xs:
            plotted = True
            ax.scatter(xs, ys, label=r, color=colors[r], s=25)
            top = max(top, max(xs), max(ys))
    if not plotted:
        return None
    line = np.linspace(0, top * 1.1, 50)
    ax.plot(line, line, color="black", lw=0.8)
    ax.fill_between(line, line * (1 - th.volume_relative), line * (1 + th.volume_relative),
                    color="grey", alpha=0.15, label=f"±{th.volume_relative * 100:.0f}%")
    ax.set_xlabel("accepted volume (mL)")
    ax.set_ylabel("this run (mL)")
    ax.set_xlim(0, top * 1.1)
    ax.set_ylim(0, top * 1.1)
    ax.legend(fontsize=8)
    ax.set_title("Volumes: this run against the accepted run")
    fig.tight_layout()
    return _png_base64(fig)


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#eee} td.l,th.l{text-align:left}
.bad{background:#f8d0d0;font-weight:bold} .fail{background:#f8d0d0}
.ok{color:#1a7f37;font-weight:bold} .reg{color:#b00;font-weight:bold}
.small{font-size:11px;color:#555}
"""


def render_html(record: dict, accepted: dict | None) -> str:
    """Self-contained HTML report of a validation record (plots inline)."""
    e = html.escape
    cases = record["cases"]
    comparison = record["comparison"]
    th = Thresholds.from_dict(record.get("thresholds"))
    acc_cases = (accepted or {}).get("cases", {})
    flagged: dict[str, set[str]] = {}
    for reg in comparison["regressions"]:
        flagged.setdefault(reg["case"], set()).add(reg["metric"])
    summary = record["summary"]
    status = ('<span class="ok">PASS: no regression</span>' if summary["result"] == "pass"
              else f'<span class="reg">REGRESSION: {summary["regressions"]} finding(s)</span>')
    software = record.get("software", {})
    model = record.get("model") or {}
    config = record.get("config", {})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>BrainLine validation {e(record['created'])}</title><style>{_CSS}</style></head><body>",
        "<h1>BrainLine reference-set validation</h1>",
        f"<p>{status}</p>",
        "<table>",
        f"<tr><th class='l'>run</th><td class='l'>{e(record['created'])}</td></tr>",
        f"<tr><th class='l'>reference set</th><td class='l'>{e(str(record['reference_dir']))}</td></tr>",
        f"<tr><th class='l'>BrainLine</th><td class='l'>{e(str(software.get('brainline')))}</td></tr>",
        f"<tr><th class='l'>segmentation</th><td class='l'>{e(str(model.get('backend')))} "
        f"{e(str(model.get('model_name')))} {e(str(model.get('model_version')))} "
        f"(model folder: {e(str(config.get('model') or 'none, built-in baseline'))}; "
        f"device {e(str(config.get('device')))}; reference {e(str(config.get('reference_role')))})</td></tr>",
        f"<tr><th class='l'>cases</th><td class='l'>{summary['cases']} ({summary['ok']} processed, "
        f"{summary['failed']} failed)</td></tr>",
    ]
    if accepted:
        am = accepted.get("model") or {}
        parts.append(
            f"<tr><th class='l'>accepted record</th><td class='l'>{e(str(comparison.get('accepted_record')))}, "
            f"accepted {e(str((accepted.get('accepted') or {}).get('at')))}, BrainLine "
            f"{e(str((accepted.get('software') or {}).get('brainline')))}, {e(str(am.get('backend')))} "
            f"{e(str(am.get('model_name')))} {e(str(am.get('model_version')))}</td></tr>")
    else:
        parts.append("<tr><th class='l'>accepted record</th><td class='l'>none: nothing to compare</td></tr>")
    parts.append(
        f"<tr><th class='l'>limits</th><td class='l'>volume change &gt; {th.volume_relative * 100:.0f}% and "
        f"&gt; {th.volume_absolute_ml:g} mL; Dice drop &gt; {th.dice_drop:g}; any failed or missing case"
        "</td></tr></table>")
    if comparison["regressions"]:
        parts.append("<h2>Regressions</h2><ul>")
        parts += [f"<li class='reg'>{e(r['message'])}</li>" for r in comparison["regressions"]]
        parts.append("</ul>")
    if comparison["notes"]:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{e(n)}</li>" for n in comparison["notes"]]
        parts.append("</ul>")

    parts.append("<h2>Cases</h2><p class='small'>Each cell: this run / accepted run. Dice n/a: the reference "
                 "does not hold that region (or there is no reference).</p><table><tr><th class='l'>case</th>"
                 "<th class='l'>status</th>")
    parts += [f"<th>{r} Dice</th>" for r in REGIONS]
    parts += [f"<th>{r} mL</th>" for r in REGIONS]
    parts.append("<th>time (s)</th><th class='l'>QC flags and findings</th><th class='l'>scored from</th></tr>")
    names = list(cases) + [n for n in acc_cases if n not in cases]
    for name in names:
        cur = cases.get(name)
        acc = acc_cases.get(name)
        marks = flagged.get(name, set())
        if cur is None:
            parts.append(f"<tr class='fail'><td class='l'>{e(name)}</td><td class='l' colspan='10'>"
                         "missing from this run</td></tr>")
            continue
        failed = cur["status"] != "ok"
        error = cur.get("error") or ""
        short = error if len(error) <= 240 else error[:240] + " ..."
        facts = cur.get("case_info") or {}
        about = "; ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                          for k, v in facts.items() if k in ("pattern_title", "pattern", "split", "missing_roles")
                          and v not in (None, "", []))
        about = f"<br><span class='small'>{e(about)}</span>" if about else ""
        row = [f"<tr{' class=fail' if failed else ''}><td class='l'>{e(name)}{about}</td>",
               f"<td class='l' title='{e(error)}'>{e(cur['status'])}{(': ' + e(short)) if failed else ''}</td>"]
        for kind, key, digits in (("Dice", "dice", 3), ("volume", "volumes_ml", 1)):
            for r in REGIONS:
                c = (cur.get(key) or {}).get(r)
                a = ((acc or {}).get(key) or {}).get(r) if acc else None
                cls = " class='bad'" if f"{r} {kind}" in marks else ""
                text = _fmt(c, digits) + (f" / {_fmt(a, digits)}" if acc else "")
                row.append(f"<td{cls}>{text}</td>")
        total = (cur.get("timings_s") or {}).get("total")
        row.append(f"<td>{_fmt(total, 0)}</td>")
        findings = list(cur.get("qc_flags") or [])
        findings += [f"{f['kind']} not built: {f['error']}" for f in cur.get("objects_failed") or []]
        if (cur.get("sequences") or {}).get("note"):
            findings.append(cur["sequences"]["note"])
        row.append(f"<td class='l'>{'<br>'.join(e(f) for f in findings) or '-'}</td>")
        row.append(f"<td class='l'>{e(str(cur.get('scored_from') or '-'))}</td></tr>")
        parts.append("".join(row))
    parts.append("</table>")

    dice_png = dice_plot(cases, accepted)
    vol_png = volume_plot(cases, accepted, th)
    parts.append("<h2>Plots</h2>")
    if dice_png:
        parts.append(f"<p><img alt='Dice per case' src='data:image/png;base64,{dice_png}'></p>")
    else:
        parts.append("<p>No case has a reference segmentation: no Dice plot.</p>")
    if vol_png:
        parts.append(f"<p><img alt='volumes against the accepted run' src='data:image/png;base64,{vol_png}'></p>")
    else:
        parts.append("<p>No accepted record: no volume comparison plot.</p>")

    parts.append("<h2>Timings (s)</h2><table><tr><th class='l'>case</th>")
    steps: list[str] = []
    for c in cases.values():
        steps += [k for k in (c.get("timings_s") or {}) if k not in steps]
    parts += [f"<th>{e(s)}</th>" for s in steps] + ["</tr>"]
    for name, c in cases.items():
        t = c.get("timings_s") or {}
        parts.append(f"<tr><td class='l'>{e(name)}</td>" + "".join(f"<td>{_fmt(t.get(s), 1)}</td>" for s in steps)
                     + "</tr>")
    parts.append("</table>")
    parts.append(f"<p class='small'>Software: {e(json.dumps(software))}</p>")
    parts.append("<p class='small'>Cases are named by their folder in the reference set; no patient "
                 "identifiers are reported. Results not reviewed by a radiologist.</p></body></html>")
    return "\n".join(parts)
