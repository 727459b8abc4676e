"""``brainline validate REFERENCE_DIR``: rerun a reference set through the
whole DICOM path and compare with the last accepted run (EASE protocol).

Layout of REFERENCE_DIR (what ``tests/corpus.py`` writes)::

    <case>/dicom/                 one DICOM study (any folder structure)
    <case>/reference_seg.nii.gz   optional reference labels (BraTS 2023; 4 -> 3)
    <case>/case.json              optional: scalar facts about the case (pattern,
                                  source, ...) copied into the report, and
                                  "annotated_regions" (see pipelines/validation.py)
    .brainline-accepted.json      the accepted record (written by --accept)

Folders whose name starts with "." or "_" are not cases. Every case runs
``process_study`` (the pipeline of ``brainline process``: selection,
conversion, registration, skull stripping, N4, segmentation, SEG/SR/overlay/
PDF) into ``OUT/cases/<case>/``; it is scored from the SEG read back
(:mod:`brainline.pipelines.validation`). A case that fails is recorded with its
error and counts as a regression; the run goes on.

Outputs in OUT (default ``$BRAINLINE_HOME/validation/<UTC timestamp>/``):
``validation.json``, ``report.html`` and ``cases/`` (the pipeline outputs,
which carry the identifiers of the input studies, as ``brainline process``
does). The JSON and HTML name cases by their folder only: identifiers read
from each study (patient name, ID, birth date, accession number, ...) are
blanked out of error messages and case facts.

Exit codes: 0 no regression (also: no accepted record and no failed case),
1 a regression (a failed or missing case, a volume or Dice change beyond the
limits) or a refused ``--accept``, 2 a usage error.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pydicom

from brainline import __version__
from brainline.pipelines.validation import (
    FORMAT,
    REGIONS,
    Thresholds,
    compare,
    render_html,
    score_case,
    sha256_of_files,
)

ACCEPTED_NAME = ".brainline-accepted.json"
REFERENCE_SEG = "reference_seg.nii.gz"
CASE_JSON = "case.json"
IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate",
               "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
               "PerformingPhysicianName", "OperatorsName", "PatientAddress", "PatientTelephoneNumbers",
               "StudyID")
IDENTIFYING_KEY = re.compile(r"patient|name|birth|accession|mrn|address|phone|uid", re.I)


class ValidationUsageError(Exception):
    """Bad arguments or reference set (exit code 2); the message says what."""


class CaseError(ValueError):
    """A case folder is unusable (no dicom/ folder, unreadable case.json)."""


@dataclass
class Case:
    name: str
    folder: Path
    dicom_dir: Path
    reference: Path | None
    info: dict = field(default_factory=dict)
    info_error: str | None = None


@dataclass
class ValidationRun:
    record: dict
    exit_code: int
    out: Path
    json_path: Path
    html_path: Path
    accepted_path: Path
    messages: list[str]


# ------------------------------------------------------------------- inputs


def discover_cases(reference_dir: Path) -> list[Case]:
    """The case folders of a reference set, sorted by name. Raises
    ValidationUsageError when the folder does not exist or holds no case."""
    if not reference_dir.is_dir():
        raise ValidationUsageError(f"{reference_dir} is not a folder: give the reference set "
                                   "(one folder per case, each with a dicom/ folder)")
    cases = []
    for folder in sorted(p for p in reference_dir.iterdir() if p.is_dir()):
        if folder.name.startswith((".", "_")):
            continue
        info, info_error = {}, None
        if (folder / CASE_JSON).exists():
            try:
                info = json.loads((folder / CASE_JSON).read_text())
                if not isinstance(info, dict):
                    info, info_error = {}, f"{CASE_JSON} is not a JSON object"
            except (OSError, ValueError) as exc:
                info_error = f"{CASE_JSON} cannot be read: {exc}"
        reference = folder / REFERENCE_SEG
        cases.append(Case(folder.name, folder, folder / "dicom", reference if reference.exists() else None,
                          info, info_error))
    if not any(c.dicom_dir.is_dir() for c in cases):
        raise ValidationUsageError(f"{reference_dir} holds no reference case: expected "
                                   "REFERENCE_DIR/<case>/dicom/ (a DICOM study) and optionally "
                                   f"<case>/{REFERENCE_SEG}")
    return cases


def identifying_strings(dicom_dir: Path) -> list[str]:
    """Identifying values of the study (from its first readable instance), and
    the components of person names, longest first."""
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - try the next file
            continue
        if "SOPInstanceUID" not in ds:
            continue
        values: set[str] = set()
        for keyword in IDENTIFYING:
            value = ds.get(keyword)
            if value is None:
                continue
            items = value if isinstance(value, pydicom.multival.MultiValue) else [value]
            for item in items:
                text = str(item).strip()
                values.add(text)
                values.update(part.strip() for part in re.split(r"[\^=]", text))
        return sorted((v for v in values if len(v) >= 3), key=len, reverse=True)
    return []


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = re.sub(re.escape(secret), "[redacted]", text, flags=re.I)
    return text


def case_facts(info: dict, secrets: list[str]) -> dict:
    """The scalar facts of case.json, without identifying keys or values."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if IDENTIFYING_KEY.search(str(key)):
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = redact(value, secrets) if isinstance(value, str) else value
        elif isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value):
            out[key] = [redact(v, secrets) if isinstance(v, str) else v for v in value]
    return out


def software_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"brainline": __version__, "python": platform.python_version()}
    for pkg in ("SimpleITK", "highdicom", "pydicom", "dcm2niix", "torch", "monai", "onnxruntime", "deepbet"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def load_accepted(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValidationUsageError(f"the accepted record {path} cannot be read ({exc}); "
                                   "fix or remove it, or replace it with --accept") from None
    if not isinstance(record, dict) or not isinstance(record.get("cases"), dict):
        raise ValidationUsageError(f"the accepted record {path} is not a BrainLine validation record")
    return record


def default_out(home: Path) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = home / "validation" / stamp
    n = 2
    while out.exists():
        out = home / "validation" / f"{stamp}-{n}"
        n += 1
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------- one case


def run_case(case: Case, work: Path, cfg, step_names: list[str], process: Callable,
             on_step: Callable[[str], None] | None = None) -> dict:
    """Process and score one case; never raises for a failing case."""
    secrets = identifying_strings(case.dicom_dir) if case.dicom_dir.is_dir() else []
    record: dict = {"status": "ok", "error": None, "failed_step": None, "scored_from": None,
                    "study": None, "sequences": None, "reference": None, "dice": None, "volumes_ml": None,
                    "reference_volumes_ml": None, "timings_s": {}, "qc_flags": [],
                    "segmentation": None, "brainline_version": __version__,
                    "objects_failed": [], "case_info": case_facts(case.info, secrets),
                    "work_dir": f"cases/{case.name}"}
    done: list[str] = []
    last = time.monotonic()
    start = last

    def step(name: str) -> None:
        nonlocal last
        now = time.monotonic()
        record["timings_s"][name] = round(now - last, 2)
        last = now
        done.append(name)
        if on_step:
            on_step(name)

    try:
        if case.info_error:
            raise CaseError(case.info_error)
        if not case.dicom_dir.is_dir():
            raise CaseError(f"no dicom/ folder in {case.name}")
        files = [p for p in case.dicom_dir.rglob("*") if p.is_file()]
        if not files:
            raise CaseError(f"{case.name}/dicom/ holds no file")
        record["study"] = {"files": len(files), "sha256": sha256_of_files(files, case.dicom_dir)}
        if case.reference:
            record["reference"] = {"file": REFERENCE_SEG,
                                   "sha256": sha256_of_files([case.reference], case.folder)}
        work.mkdir(parents=True, exist_ok=True)
        summary = process(case.dicom_dir, work, cfg, step)
        record["timings_s"] = {"total": None, **{k: v for k, v in record["timings_s"].items()
                                                 if k == "select_and_convert"},
                               **(summary.get("timings_s") or {}),
                               **{k: v for k, v in record["timings_s"].items() if k == "dicom_results"}}
        record["qc_flags"] = list(summary.get("qc_flags") or [])
        record["segmentation"] = (summary.get("backends") or {}).get("segmentation")
        record["objects_failed"] = [{"kind": f.get("kind"), "error": redact(str(f.get("error")), secrets)}
                                    for f in (summary.get("outputs") or {}).get("failed") or []]
        inputs = summary.get("inputs") or {}
        if inputs:
            record["sequences"] = {k: inputs.get(k) for k in ("used", "missing", "note")}
        declared = case.info.get("annotated_regions")
        annotated = [r for r in declared if r in REGIONS] if isinstance(declared, list) else []
        done.append("score")
        record.update(score_case(work, case.dicom_dir, case.reference, annotated))
    except Exception as exc:  # noqa: BLE001 - a failing case is a result, not a crash
        record["status"] = "failed"
        failed = next((s for s in step_names + ["score"] if s not in done), "score")
        if not case.dicom_dir.is_dir() or case.info_error or record["study"] is None:
            failed = "read_case"
        record["failed_step"] = failed
        message = str(exc).strip() or type(exc).__name__
        if not type(exc).__module__.startswith("brainline"):  # not one of ours, worded: name the type
            message = f"{type(exc).__name__}: {message}"
        record["error"] = redact(f"{failed}: {message}", secrets)[:2000]
    record["timings_s"]["total"] = round(time.monotonic() - start, 2)
    return record


# --------------------------------------------------------------------- run


def validate(reference_dir: Path, *, cfg, out: Path, accepted_path: Path, accept: bool = False,
             force: bool = False, thresholds: Thresholds | None = None, rules_path: Path | None = None,
             uid_root: str | None = None, progress: bool = True) -> ValidationRun:
    """Run the reference set, compare, write validation.json and report.html."""
    from tqdm import tqdm

    from brainline.pipelines.process import STEP_NAMES, process_study

    th = thresholds or Thresholds()
    cases = discover_cases(reference_dir)
    unreadable = None
    try:
        accepted = load_accepted(accepted_path)
    except ValidationUsageError as exc:
        if not accept:
            raise
        accepted, unreadable = None, f"{exc}: replaced by this run"
    if out.exists() and any(out.iterdir()):
        raise ValidationUsageError(f"the output folder {out} is not empty: give a new one")
    if accept and not os.access(accepted_path.parent, os.W_OK):
        raise ValidationUsageError(f"--accept: cannot write the accepted record into {accepted_path.parent}; "
                                   "use --accepted-record PATH")
    out.mkdir(parents=True, exist_ok=True)

    def process(dicom_dir, work, cfg_, on_step):
        return process_study(dicom_dir, work, cfg_, rules_path=rules_path, uid_root=uid_root, on_step=on_step)

    steps = list(STEP_NAMES)
    upcoming = dict(zip(steps, steps[1:] + ["scoring"]))
    results: dict[str, dict] = {}
    bar = tqdm(cases, desc="validate", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(f"{case.name}: {steps[0]}")

        def on_step(name: str, c: str = case.name) -> None:
            bar.set_postfix_str(f"{c}: {upcoming.get(name, name)}")

        results[case.name] = run_case(case, out / "cases" / case.name, cfg, steps, process, on_step=on_step)
    bar.close()

    comparison = compare(results, accepted, th)
    if unreadable:
        comparison["notes"].append(unreadable)
    comparison["accepted_record"] = str(accepted_path) if accepted else None
    if accepted:
        comparison["accepted_at"] = (accepted.get("accepted") or {}).get("at")
        comparison["accepted_software"] = accepted.get("software")
        comparison["accepted_model"] = accepted.get("model")
    model = next((c["segmentation"] for c in results.values() if c.get("segmentation")), None)
    config = {"reference_role": cfg.reference, "model": _model_config(cfg.model), "device": cfg.device,
              "registration_transform": cfg.registration.transform,
              "skull_strip_backend": cfg.skull_strip_backend}
    software = software_versions()
    if accepted:
        changes = []
        if model and accepted.get("model") and accepted["model"] != model:
            changes.append(f"segmentation model changed: {_model_text(accepted['model'])} -> {_model_text(model)}")
        old_version = (accepted.get("software") or {}).get("brainline")
        if old_version and old_version != __version__:
            changes.append(f"BrainLine {old_version} -> {__version__}")
        for key, value in config.items():
            old = (accepted.get("config") or {}).get(key, value)
            if old != value:
                changes.append(f"setting {key} changed: {old} -> {value}")
        comparison["notes"][:0] = changes
    failed = [n for n, c in results.items() if c["status"] != "ok"]
    json_path, html_path = out / "validation.json", out / "report.html"
    record: dict[str, Any] = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference_dir": str(reference_dir.resolve()),
        "software": software,
        "config": config,
        "model": model,
        "thresholds": th.to_dict(),
        "cases": results,
        "comparison": comparison,
        "summary": {"cases": len(results), "ok": len(results) - len(failed), "failed": len(failed),
                    "regressions": len(comparison["regressions"]),
                    "result": "regression" if comparison["regressions"] else "pass"},
        "outputs": {"folder": str(out), "json": str(json_path), "html": str(html_path),
                    "cases": str(out / "cases")},
        "accept": None,
    }
    messages: list[str] = []
    if accept:
        if failed and not force:
            record["accept"] = {"accepted": False,
                                "reason": f"{len(failed)} case(s) failed: {', '.join(failed)}"}
            messages.append(f"not accepted: {len(failed)} case(s) failed ({', '.join(failed)}); fix them, "
                            "or accept anyway with --accept --force")
        else:
            accepted_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            record["accept"] = {"accepted": True, "at": accepted_at, "record": str(accepted_path),
                                "forced": bool(failed)}
            new = {k: v for k, v in record.items() if k not in ("comparison", "accept")}
            new["accepted"] = {
                "at": accepted_at, "from_run": str(out), "forced": bool(failed),
                "previous": ({"at": (accepted.get("accepted") or {}).get("at"),
                              "brainline": (accepted.get("software") or {}).get("brainline"),
                              "model": accepted.get("model")} if accepted else None),
            }
            _write_atomic(accepted_path, json.dumps(new, indent=2))
            messages.append(f"accepted as the new reference: {accepted_path}")
    _write_atomic(json_path, json.dumps(record, indent=2))
    _write_atomic(html_path, render_html(record, accepted))
    refused = bool(record["accept"]) and not record["accept"]["accepted"]
    exit_code = 1 if comparison["regressions"] or refused else 0
    return ValidationRun(record, exit_code, out, json_path, html_path, accepted_path, messages)


def _model_text(model: dict) -> str:
    return " ".join(str(model.get(k)) for k in ("backend", "model_name", "model_version") if model.get(k))


def _model_config(model) -> str | dict | None:
    if model is None or isinstance(model, (str, dict)):
        return model
    return str(model)
