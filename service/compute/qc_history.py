"""Quality-control history in the job store (issue 12): the service side of
the ``image_qc`` and ``segmentation_qc`` stages, and the figures of ``/qc``.

The pipeline steps (pipelines/qc_steps.py) compute from files only; here the
stage wrappers of service/compute/stages.py compare their results with earlier
studies in the database (table ``qc_metrics``, model ``db.QCMetric``),
store this study's rows and write the words into the workspace, where
``summarize`` and the SR/PDF builders pick them up:

* ``image_qc``: per series (role) every MRQy metric is compared with the
  same **site** (the job's calling AE title, "" when unknown), **scanner**
  ("Manufacturer ManufacturerModelName" of the pseudonymized header) and
  **role** by a robust z-score, (value - median) / (1.4826 x MAD)
  (:func:`brainline.pipelines.image_qc.compare_metrics_to_history`), once
  ``qc_min_history`` earlier studies exist; |z| >= ``qc_outlier_z`` is an
  outlier in words ("FLAIR SNR2 far below this scanner's usual (z = -4.2 ...):
  suspect noise"). Rows: one per series and metric, with its z (None before
  enough history). Writes ``image_qc_history.json``.
* ``segmentation_qc``: each candidate's Dice to the fusion per region is
  compared with that candidate's history at the same site with the same
  delivered model (role "seg", protocol = the model, metric
  ``discord_<candidate>_<region>``): an alarm below median - alpha x MAD
  (Kofler et al. 2021; ``qc_discord_alpha``, after
  ``qc_discord_min_history`` studies) or when undefined; risk score = number
  of alarms (stored as metric ``risk_score``). Writes
  ``segmentation_qc_history.json``.

History = the most recent ``qc_history_studies`` earlier studies: one job per
study (its newest; the current study's own earlier jobs are left out, so a
re-sent study is not compared with itself). Re-running a stage replaces the
job's rows (idempotent). No patient identity is stored: site, scanner,
protocol (cleaned by de-identification), role, metric, values.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence, TypeGuard, cast

from sqlalchemy import delete, select

from brainline.pipelines.image_qc import compare_metrics_to_history
from brainline.pipelines.qc_steps import (
    IMAGE_QC_FILE,
    IMAGE_QC_HISTORY_FILE,
    SEGMENTATION_QC_HISTORY_FILE,
    QCConfig,
)
from brainline.pipelines.records import SELECTION_FILE, read_json
from brainline.pipelines.roles import ROLE_LABELS
from brainline.pipelines.segmentation_qc import SegmentationQCConfig, discord_from_dice

from ..db import Job, QCMetric, utcnow

log = logging.getLogger("brainline.qc")

SEG_ROLE = "seg"
RISK_METRIC = "risk_score"
DISCORD_PREFIX = "discord_"


def _setting(settings, name: str, default):
    return getattr(settings, name, default)


def qc_config(settings) -> QCConfig:
    """The QC steps' configuration from the service settings."""
    return QCConfig(workers=int(_setting(settings, "qc_workers", 2)),
                    discord=str(_setting(settings, "qc_discord", "auto")),
                    discord_grid_mm=float(_setting(settings, "qc_discord_grid_mm", 2.0)),
                    segmentation=_seg_config(settings))


def _seg_config(settings) -> SegmentationQCConfig:
    return SegmentationQCConfig(alpha=float(_setting(settings, "qc_discord_alpha", 0.1)),
                                min_history=int(_setting(settings, "qc_discord_min_history", 10)))


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


def _finite(v: object) -> TypeGuard[float]:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _job(session, job_id: int) -> tuple[str, str]:
    """(site, study_key) of a job; site "" when unknown."""
    job = session.get(Job, job_id)
    if job is None:
        return "", ""
    return (job.site or "").strip(), job.study_key or ""


def _history(session, *, job_id: int, study_key: str, site: str, role: str, studies: int,
             scanner: str | None = None, protocol: str | None = None,
             prefix: str | None = None) -> tuple[dict[str, list[float]], int]:
    """Earlier values per metric of ``site`` + ``role`` (+ ``scanner`` /
    ``protocol`` / metric ``prefix`` when given), newest study first, one job
    per study (its newest), at most ``studies`` studies; and the number of
    studies."""
    q = (select(QCMetric.metric, QCMetric.value, QCMetric.job_id, Job.study_key)
         .join(Job, Job.id == QCMetric.job_id)
         .where(QCMetric.site == site, QCMetric.role == role, QCMetric.job_id != job_id,
                QCMetric.value.is_not(None))
         .order_by(QCMetric.job_id.desc()))
    if study_key:
        q = q.where(Job.study_key != study_key)
    if scanner is not None:
        q = q.where(QCMetric.scanner == scanner)
    if protocol is not None:
        q = q.where(QCMetric.protocol == protocol)
    if prefix:
        q = q.where(QCMetric.metric.like(prefix + "%"))
    job_of_study: dict[str, int] = {}
    values: dict[str, list[float]] = {}
    for metric, value, jid, key in session.execute(q):
        newest = job_of_study.setdefault(key, jid)
        if newest != jid:
            continue  # an older job of a study already counted
        if len(job_of_study) > studies:
            break
        values.setdefault(metric, []).append(float(value))
    return values, min(len(job_of_study), studies)


def _replace_rows(session, job_id: int, roles: list[str], rows: list[QCMetric]) -> None:
    session.execute(delete(QCMetric).where(QCMetric.job_id == job_id, QCMetric.role.in_(roles)))
    session.add_all(rows)


# --------------------------------------------------------------------------- image QC

def compare_image_qc(sessions, job_id: int, work: Path, settings, result: dict) -> dict:
    """Compare each series' MRQy metrics (``image_qc.json``) with the history
    of its site, scanner and role; store them in qc_metrics; write
    ``image_qc_history.json`` (per series: scanner, protocol, n_history, z by
    metric, outliers in words; ``flags`` "iqm_outlier: ..."). Returns the
    stage result (per series the metrics' count, history size and outliers)."""
    out_file = work / IMAGE_QC_HISTORY_FILE
    if out_file.exists():
        return _image_stage_result(result, json.loads(out_file.read_text()))
    if result.get("skipped") or sessions is None:
        return result
    min_history = int(_setting(settings, "qc_min_history", 20))
    z_cut = float(_setting(settings, "qc_outlier_z", 3.5))
    studies = int(_setting(settings, "qc_history_studies", 200))
    series_out: dict[str, dict] = {}
    flags: list[str] = []
    with sessions.begin() as s:
        site, study_key = _job(s, job_id)
        rows: list[QCMetric] = []
        for role, series in (result.get("series") or {}).items():
            scanner, protocol = series.get("scanner") or "", series.get("protocol") or ""
            history, n = _history(s, job_id=job_id, study_key=study_key, site=site, role=role,
                                  scanner=scanner, studies=studies)
            label = ROLE_LABELS.get(role, role)
            comparisons, role_flags = compare_metrics_to_history(
                series.get("metrics") or {}, cast("dict[str, Sequence[float]]", history), series=label,
                min_history=min_history, threshold=z_cut)
            z = {m: round(c.z, 3) for m, c in comparisons.items() if c.z is not None}
            series_out[role] = {"scanner": scanner, "protocol": protocol, "n_history": n, "z": z,
                                "outliers": [c.words for c in comparisons.values() if c.outlier]}
            flags += role_flags
            for metric, value in (series.get("metrics") or {}).items():
                if _finite(value):
                    c = comparisons.get(metric)
                    rows.append(QCMetric(job_id=job_id, site=site[:64], scanner=scanner[:128],
                                         protocol=protocol[:128], role=role[:16], metric=metric[:32],
                                         value=float(value), zscore=None if c is None or c.z is None else c.z))
        _replace_rows(s, job_id, list(result.get("series") or {}), rows)
    compared = [r for r, v in series_out.items() if v["z"]]
    waiting = [r for r in series_out if r not in compared]
    note = ("" if not waiting else
            f"fewer than {min_history} earlier studies of this site and scanner for "
            + ", ".join(ROLE_LABELS.get(r, r) for r in waiting))
    record = {"history": {"compared": bool(compared), "site": site, "min_history": min_history,
                          "outlier_z": z_cut, "history_studies": studies, "note": note},
              "series": series_out, "flags": flags, "stored_rows": len(rows)}
    _write_json(out_file, record)
    log.info("image QC compared", extra={"job_id": job_id, "series": len(series_out),
                                         "outliers": len(flags), "rows": len(rows)})
    return _image_stage_result(result, record)


def _image_stage_result(result: dict, record: dict) -> dict:
    return {"series": {r: {"scanner": v.get("scanner"), "protocol": v.get("protocol"),
                           "n_history": v.get("n_history"), "outliers": v.get("outliers"),
                           "elapsed_s": (result.get("series") or {}).get(r, {}).get("elapsed_s")}
                       for r, v in (record.get("series") or {}).items()},
            "compared": record.get("history", {}).get("compared"), "flags": record.get("flags", []),
            "stored_rows": record.get("stored_rows"), "elapsed_s": result.get("elapsed_s")}


# --------------------------------------------------------------------------- segmentation QC

def _reference_scanner(work: Path) -> str:
    try:
        selection = read_json(work / SELECTION_FILE)
        series: dict[str, Any] = json.loads((work / IMAGE_QC_FILE).read_text()).get("series") or {}
        entry: dict[str, Any] = series.get(selection.get("reference", "")) or next(iter(series.values()), {})
        return str(entry.get("scanner") or "")
    except (OSError, ValueError, StopIteration, AttributeError):
        return ""


def compare_segmentation_qc(sessions, job_id: int, work: Path, settings, result: dict) -> dict:
    """Discord alarms of the candidates' Dice to the fusion
    (``segmentation_qc.json``) against each candidate's history at the same
    site with the same model; store the Dice values and the risk score in
    qc_metrics (role "seg"); write ``segmentation_qc_history.json``. Returns
    the stage result (components, plausibility flags, risk score, alarms)."""
    out_file = work / SEGMENTATION_QC_HISTORY_FILE
    if out_file.exists():
        return _seg_stage_result(result, json.loads(out_file.read_text()))
    table = result.get("dice_to_fusion") or {}
    if result.get("skipped") or sessions is None or not table:
        return _seg_stage_result(result, {})
    cfg = _seg_config(settings)
    studies = int(_setting(settings, "qc_history_studies", 200))
    regions = tuple(result.get("regions") or ("WT", "TC", "ET"))
    model = str(result.get("model") or "")[:128]
    with sessions.begin() as s:
        site, study_key = _job(s, job_id)
        values, n = _history(s, job_id=job_id, study_key=study_key, site=site, role=SEG_ROLE,
                             protocol=model, prefix=DISCORD_PREFIX, studies=studies)
        history = {cand: {region: values.get(f"{DISCORD_PREFIX}{cand}_{region}", []) for region in regions}
                   for cand in table}
        discord = discord_from_dice(table, history, regions=regions, config=cfg)
        scanner = _reference_scanner(work)[:128]
        rows = [QCMetric(job_id=job_id, site=site[:64], scanner=scanner, protocol=model, role=SEG_ROLE,
                         metric=f"{DISCORD_PREFIX}{r.candidate}_{r.region}"[:32], value=float(r.dice), zscore=None)
                for r in discord.rows if _finite(r.dice)]
        rows.append(QCMetric(job_id=job_id, site=site[:64], scanner=scanner, protocol=model, role=SEG_ROLE,
                             metric=RISK_METRIC, value=float(discord.risk_score), zscore=None))
        _replace_rows(s, job_id, [SEG_ROLE], rows)
    waiting = sorted({r.candidate for r in discord.rows if r.threshold is None})
    note = ("" if not waiting else
            f"no alarm threshold yet for {', '.join(waiting)}: {n} earlier "
            f"stud{'y' if n == 1 else 'ies'} of this site with this model, {cfg.min_history} needed")
    record = {"history": {"compared": any(r.threshold is not None for r in discord.rows), "site": site,
                          "model": model, "n_history": n, "min_history": cfg.min_history, "alpha": cfg.alpha,
                          "note": note},
              "discord": discord.to_dict(), "stored_rows": len(rows)}
    _write_json(out_file, record)
    log.info("segmentation QC compared", extra={"job_id": job_id, "risk_score": discord.risk_score,
                                                "rows": len(rows)})
    return _seg_stage_result(result, record)


def _seg_stage_result(result: dict, record: dict) -> dict:
    discord = record.get("discord") or result.get("discord") or {}
    return {"components": len(result.get("components") or []), "volumes_ml": result.get("volumes_ml"),
            "flags": [f for f in result.get("flags", []) if not f.startswith("discord_")],
            "candidates": (result.get("candidates") or {}).get("names"),
            "risk_score": discord.get("risk_score"), "max_score": discord.get("max_score"),
            "alarms": [f"{r['candidate']}/{r['region']}" for r in discord.get("rows", []) if r.get("alarm")],
            "compared": (record.get("history") or {}).get("compared", False),
            "elapsed_s": result.get("elapsed_s")}


# --------------------------------------------------------------------------- /qc figures

def _median(values: list[float]) -> float | None:
    return float(f"{statistics.median(values):.5g}") if values else None


def outlier_words(role: str, metric: str, z: float) -> str:
    """"FLAIR SNR2 far below this scanner's usual (z = -4.2)"."""
    return (f"{ROLE_LABELS.get(role, role)} {metric} far {'below' if z < 0 else 'above'} this scanner's usual "
            f"(z = {z:+.1f})")


def qc_overview(sessions, *, days: int = 90, outliers: int = 20, outlier_z: float = 3.5) -> dict:
    """The figures of ``/qc``: per site and scanner, per series role the
    number of series, their protocols and the median of each metric over the
    last ``days`` days; per site and model the studies with discord figures,
    median risk score and median Dice to the fusion per candidate and region;
    and the ``outliers`` most recent metrics with |z| >= ``outlier_z`` in
    words. Pseudonymous: jobs by id, no identity."""
    since = utcnow() - timedelta(days=days)
    sites: dict[str, dict] = {}
    with sessions() as s:
        q = (select(QCMetric.site, QCMetric.scanner, QCMetric.protocol, QCMetric.role, QCMetric.metric,
                    QCMetric.value, QCMetric.job_id)
             .where(QCMetric.created_at >= since, QCMetric.value.is_not(None)))
        for site, scanner, protocol, role, metric, value, jid in s.execute(q):
            entry = sites.setdefault(site or "", {"scanners": {}, "models": {}})
            if role == SEG_ROLE:
                m = entry["models"].setdefault(protocol or "", {"jobs": set(), "values": {}})
                m["jobs"].add(jid)
                m["values"].setdefault(metric, []).append(value)
                continue
            sc = entry["scanners"].setdefault(scanner or "", {})
            r = sc.setdefault(role, {"jobs": set(), "protocols": set(), "values": {}})
            r["jobs"].add(jid)
            if protocol:
                r["protocols"].add(protocol)
            r["values"].setdefault(metric, []).append(value)
        recent = s.execute(
            select(QCMetric.job_id, QCMetric.site, QCMetric.scanner, QCMetric.protocol, QCMetric.role,
                   QCMetric.metric, QCMetric.value, QCMetric.zscore, QCMetric.created_at)
            .where(QCMetric.created_at >= since, QCMetric.zscore.is_not(None),
                   (QCMetric.zscore >= outlier_z) | (QCMetric.zscore <= -outlier_z))
            .order_by(QCMetric.created_at.desc(), QCMetric.id.desc()).limit(outliers)).all()
    out_sites = []
    for site in sorted(sites):
        entry = sites[site]
        scanners = []
        for scanner in sorted(entry["scanners"]):
            roles = entry["scanners"][scanner]
            role_rows = [{"role": role, "label": ROLE_LABELS.get(role, role), "series": len(r["jobs"]),
                          "protocols": sorted(r["protocols"]),
                          "median": {m: _median(v) for m, v in r["values"].items()}}
                         for role, r in sorted(roles.items(), key=lambda kv: list(ROLE_LABELS).index(kv[0])
                                               if kv[0] in ROLE_LABELS else 99)]
            scanners.append({"scanner": scanner, "series": sum(r["series"] for r in role_rows),
                             "studies": len(set().union(*(r["jobs"] for r in roles.values()))),
                             "roles": role_rows})
        models = [{"model": model, "studies": len(m["jobs"]),
                   "median_risk_score": _median(m["values"].get(RISK_METRIC, [])),
                   "median_dice_to_fusion": {k[len(DISCORD_PREFIX):]: _median(v) for k, v in sorted(m["values"].items())
                                             if k.startswith(DISCORD_PREFIX)}}
                  for model, m in sorted(entry["models"].items())]
        out_sites.append({"site": site, "scanners": scanners, "segmentation": models})
    return {"since": since.isoformat(timespec="seconds") + "Z", "days": days, "outlier_z": outlier_z,
            "sites": out_sites,
            "recent_outliers": [{"job_id": jid, "site": site, "scanner": scanner, "protocol": protocol, "role": role,
                                 "metric": metric, "value": value, "z": round(z, 2),
                                 "at": at.isoformat(timespec="seconds") + "Z",
                                 "words": outlier_words(role, metric, z)}
                                for jid, site, scanner, protocol, role, metric, value, z, at in recent]}
