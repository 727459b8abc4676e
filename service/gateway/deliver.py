"""The ``deliver`` stage (gateway side): the results re-identified into the
PHI outbox and queued for every configured destination.

Results are built on the pseudonymized workspace (``build_outputs``,
service/compute/stages.py); this stage gives them back the original patient,
study and UIDs from the vault (service/gateway/reidentify.py), re-renders
the PDF with the real identity, and hands them to the outbox
(service/gateway/outbox.py). Review gating per site is in
service/gateway/review.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pydicom

from brainline.pipelines.records import RESULTS_FILE, ResultObject
from brainline.pipelines.results import CORE_OBJECTS, OBJECT_NAMES, read_results, rerender_pdf

from ..compute.stages import reference_files
from ..jobs.context import StageContext
from ..jobs.errors import Rejected
from .reidentify import reidentify_dataset

if TYPE_CHECKING:
    from .vault import Vault

log = logging.getLogger("brainline.stages")


def _reidentified(ctx: StageContext, obj: ResultObject, study: dict, patient: dict,
                  prior_maps: Sequence[dict] = ()) -> pydicom.Dataset:
    ds = reidentify_dataset(pydicom.dcmread(ctx.workspace / obj.file), study, patient,
                            extra_uid_maps=prior_maps)
    if obj.kind == "pdf":
        identity = {"patient_id": patient["PatientID"], "patient_name": patient["PatientName"],
                    "study_date": str(ds.get("StudyDate", "")),
                    "accession_number": study.get("AccessionNumber", ""),
                    "study_instance_uid": study["StudyInstanceUID"]}
        rerender_pdf(ds, ctx.workspace, reference_files(ctx), identity)
    return ds


#: Longitudinal objects (pipelines/longitudinal.py, built by build_outputs)
#: come after the SR: they reference the prior studies as well.
DELIVERY_ORDER = {"seg": 0, "sr": 1, "change_sr": 2, "lesion_seg": 3, "subtraction": 4, "pdf": 5, "overlay": 6}


def prior_uid_maps(ctx: StageContext) -> list[dict]:
    """UID maps (pseudo -> original) of the prior studies listed in
    ``priors.json`` (vault "study" records): the longitudinal objects
    reference the priors' pseudonymous UIDs. A prior without a vault record
    adds nothing (its UIDs stay pseudonymous)."""
    try:
        priors = json.loads(ctx.path("priors.json").read_text()).get("priors") or []
    except (OSError, ValueError):
        return []
    maps = []
    for prior in priors:
        record = (_vault(ctx).get("study", prior.get("pseudo_study_uid") or "")
                  if prior.get("pseudo_study_uid") else None)
        if record and record.get("uid_map"):
            maps.append(record["uid_map"])
    return maps


def _vault(ctx: StageContext) -> Vault:
    """The gateway's vault (a compute worker's context has none)."""
    if ctx.vault is None:
        raise RuntimeError(f"job {ctx.job_id}: re-identification needs the vault, which only the gateway holds")
    return ctx.vault


def deliver(ctx: StageContext) -> dict:
    """Re-identify the results (original patient, study and UIDs, PDF
    re-rendered with the real identity) into the PHI outbox folder and queue
    them for every configured destination. UIDs of the prior studies that
    the longitudinal objects reference are re-identified with the priors'
    vault records (``prior_uid_maps``). Sends whatever build_outputs
    built; an overlay or PDF that cannot be re-identified is left out and
    recorded (``not_delivered``), a SEG or SR that cannot fails the stage.

    A job superseded by a newer job of the same study delivers nothing
    (Superseded); objects of earlier jobs of the study still waiting in the
    outbox are cancelled before this job queues its own, and the result
    lists the earlier objects already stored (``replaces``): the new SEG/SR
    are new objects (new UIDs) that replace them; the earlier objects are
    retracted with an IHE IOCM rejection note (``retracted``, see
    service/gateway/review.py).

    Review gating (service/gateway/review.py, per site = the sender's calling AE
    title): "preliminary" queues the objects to be sent and the job awaits
    review; "hold" queues them ``held`` (sent only after ACCEPT); "off"
    asks for no review."""
    from . import review  # review.py reads prior_uid_maps from this module

    ctx.check_superseded()
    results = read_results(ctx.workspace)
    if results is None:
        raise FileNotFoundError(f"{RESULTS_FILE} does not exist: build_outputs has not run")
    mode, site = review.gating(ctx)
    if ctx.outbox is None or not ctx.outbox.destinations:
        outcome = {"queued": 0, "note": "no destination configured (BRAINLINE_DEST_DICOM / "
                                        "BRAINLINE_DEST_STOWRS); results stay in the workspace"}
        if mode != "off":
            outcome["review"] = {"mode": mode, "site": site, "state": review.mark_pending(ctx)}
        return outcome
    hold: dict[str, Any] = {"state": review.HELD} if mode == "hold" else {}
    pseudo = json.loads(ctx.path("pseudonymize.json").read_text())
    vault = _vault(ctx)
    study = vault.get("study", pseudo["pseudo_study_uid"])
    patient = vault.get("patient", pseudo["pseudo_patient_id"])
    if study is None or patient is None:
        raise Rejected("the vault has no identity for this study, so results cannot be re-identified")
    prior_maps = prior_uid_maps(ctx)
    settings: Any = ctx.settings  # the service Settings (StageContext types it as object)
    out_dir = settings.outbox_dir / f"job-{ctx.job_id:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    queued: list[tuple[str, Path]] = []
    skipped: dict[str, str] = {}
    # SEG and SR first, queued as soon as they are re-identified: the sender
    # stores them while the overlay series (one instance per slice) and the
    # PDF are still being re-identified.
    objects = sorted(results.objects, key=lambda o: DELIVERY_ORDER.get(o.kind, len(DELIVERY_ORDER)))
    cancelled = ctx.outbox.cancel_earlier(ctx.study_key, ctx.job_id)
    replaces = ctx.outbox.sent_earlier(ctx.study_key, ctx.job_id)
    added, core_queued = 0, False
    for obj in objects:
        if not core_queued and obj.kind not in CORE_OBJECTS:
            added += ctx.outbox.enqueue(ctx.job_id, queued, **hold)
            core_queued = True
        if obj.kind in skipped:
            continue  # one instance of an overlay series failed: leave the whole series out
        try:
            ds = _reidentified(ctx, obj, study, patient, prior_maps)
        except Exception as exc:
            if obj.kind in CORE_OBJECTS:
                raise
            log.warning("result object not delivered", exc_info=True,
                        extra={"job_id": ctx.job_id, "kind": obj.kind})
            skipped[obj.kind] = (f"{OBJECT_NAMES.get(obj.kind, obj.kind)} not delivered: re-identification "
                                    f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
            for kind, path in queued:
                if kind == obj.kind:
                    path.unlink(missing_ok=True)  # no partial series in the PHI outbox
            continue
        target = out_dir / Path(obj.file).name
        tmp = target.with_name(".tmp-" + target.name)
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, target)
        queued.append((obj.kind, target))
    queued = [(kind, path) for kind, path in queued if kind not in skipped]
    added += ctx.outbox.enqueue(ctx.job_id, [(k, p) for k, p in queued
                                             if not (core_queued and k in CORE_OBJECTS)], **hold)
    # the earlier jobs' delivered objects are retracted now, whatever the review of these
    retracted = review.retract_superseded(ctx, out_dir) if replaces else None
    result = {"objects": len(queued), "queued": added, "destinations": sorted(ctx.outbox.destinations)}
    if mode != "off":
        result["review"] = {"mode": mode, "site": site, "state": review.mark_pending(ctx)}
    if hold:
        result["held"] = added
        result["held_note"] = (f"review mode 'hold' for site {site or '(none)'}: the results are sent only after "
                               "a radiologist accepts them")
    if skipped:
        result["not_delivered"] = [{"kind": k, "error": e} for k, e in skipped.items()]
    if results.failures():
        result["not_built"] = [f.error for f in results.failures()]
    if cancelled:
        result["cancelled_earlier"] = cancelled
    if replaces:
        jobs = sorted({r["job_id"] for r in replaces})
        kinds = sorted({OBJECT_NAMES.get(r["kind"], r["kind"]) for r in replaces})
        result["replaces"] = replaces
        if retracted and retracted.get("instances"):
            fate = (f"the earlier ones are retracted with an IHE IOCM rejection note ({retracted['reason']}, "
                    f"{retracted['instances']} objects)")
            result["retracted"] = retracted
        elif retracted is None:
            fate = "the earlier ones were already retracted (IHE IOCM rejection note)"
        else:
            fate = "the earlier ones stay there" + (f" ({retracted['note']})" if retracted.get("note") else "")
        result["note"] = (f"these results replace those of job{'s' if len(jobs) > 1 else ''} "
                          f"{', '.join(map(str, jobs))} ({', '.join(kinds)} already stored at the "
                          f"destination); the new objects have new UIDs, {fate}")
    return result
