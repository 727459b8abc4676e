#!/usr/bin/env python3
"""Generate docs/CONFORMANCE.md, BrainLine's DICOM Conformance Statement, from the code.

Everything that can drift is read from the modules that implement it:

* listener (SCP): ``service.listener`` — the accepted storage SOP classes
  (``BRAIN_MR_SOP_CLASSES``), transfer syntaxes (``ALL_TRANSFER_SYNTAXES``)
  and the C-STORE status constants (``STATUS_*``); defaults of the network
  settings from ``config/service.yaml``;
* result delivery (SCU): ``service.destinations`` (stored statuses) and the
  transfer syntaxes it proposes (checked against its source);
* created objects: ``pipelines.dicom_outputs`` (SOP classes, SR classes,
  default series numbers and descriptions, coded concepts);
* de-identification: ``service.deid`` and ``config/deid_profile.yaml``.

Usage::

    python scripts/gen_conformance.py            # write docs/CONFORMANCE.md
    python scripts/gen_conformance.py --check    # exit 1 when the file is out of date

tests/test_conformance_doc.py runs ``--check`` logic, so the committed
statement cannot drift from the code.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "CONFORMANCE.md"

if str(ROOT.parent) not in sys.path:  # the package is importable as brainline (the repository folder)
    sys.path.insert(0, str(ROOT.parent))


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID
    name = UID(str(uid)).name
    return name if name != str(uid) else "(unknown)"


# What each listener status constant means, and when BrainLine answers with it.
# A STATUS_* constant the listener defines and this table lacks fails the
# generation, so a new status cannot go undocumented.
_STATUS_TEXT = {
    "STATUS_SUCCESS": ("Success", "the instance was written and fsync'ed into the spool (also for a duplicate, and "
                                  "for a different instance re-sent with a known SOP Instance UID: both are kept)"),
    "STATUS_SOP_CLASS_NOT_SUPPORTED": ("Refused: SOP Class not supported",
                                       "an accepted presentation context was used for another SOP class"),
    "STATUS_OUT_OF_RESOURCES": ("Refused: Out of Resources",
                                "the spool is below its free-space threshold, or the instance is larger than "
                                "BRAINLINE_MAX_INSTANCE_MB (also after inflating a deflated transfer syntax)"),
    "STATUS_CANNOT_UNDERSTAND": ("Error: Cannot understand",
                                 "the data set is malformed, or lacks (or contradicts) the SOP Class/Instance, "
                                 "Study or Series UIDs needed to file it"),
    "STATUS_CANNOT_FILE": ("Error: Cannot understand (cannot file)", "an unexpected I/O error while filing"),
}


def _listener() -> dict:
    from brainline.service.gateway import listener
    statuses = []
    for name, value in vars(listener).items():
        if name.startswith("STATUS_") and isinstance(value, int):
            if name not in _STATUS_TEXT:
                raise SystemExit(f"service/gateway/listener.py defines {name} = 0x{value:04X}; describe it in "
                                 f"scripts/gen_conformance.py (_STATUS_TEXT)")
            statuses.append((value, name, *_STATUS_TEXT[name]))
    sop = getattr(listener, "BRAIN_MR_SOP_CLASSES", None)
    if sop is None:
        raise SystemExit("service/gateway/listener.py has no BRAIN_MR_SOP_CLASSES; update scripts/gen_conformance.py")
    return {
        "sop_classes": sorted((str(uid), str(name)) for uid, name in dict(sop).items()),
        "transfer_syntaxes": [str(ts) for ts in listener.ALL_TRANSFER_SYNTAXES],
        "statuses": sorted(statuses),
    }


def _settings() -> dict:
    import yaml
    return yaml.safe_load((ROOT / "config" / "service.yaml").read_text())


def _scu() -> dict:
    from brainline.service.gateway import destinations
    source = inspect.getsource(destinations)
    proposed = "[ExplicitVRLittleEndian, ImplicitVRLittleEndian]"
    if f"add_requested_context(sop_class, {proposed})" not in source:
        raise SystemExit("service/gateway/destinations.py no longer proposes Explicit + Implicit VR Little Endian; "
                         "update scripts/gen_conformance.py")
    return {"transfer_syntaxes": ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
            "stored": sorted(destinations.STORED_STATUSES)}


def _priors() -> dict:
    from brainline.service.gateway import prior_move, priors
    from brainline.service.gateway.pseudonymize import ENCAPSULATED_SYNTAXES, NATIVE_SYNTAXES
    from brainline.service.settings import BY_NAME

    return {"find": priors.STUDY_ROOT_FIND, "get": priors.STUDY_ROOT_GET, "move": prior_move.STUDY_ROOT_MOVE,
            "stored": list(priors.MR_STORAGE), "not_wanted": prior_move.STATUS_NOT_WANTED,
            "move_ae": BY_NAME["prior_move_ae"].default, "move_port": BY_NAME["prior_move_port"].default,
            "syntaxes": sorted(NATIVE_SYNTAXES) + sorted(ENCAPSULATED_SYNTAXES)}


def _default(func, name: str):
    return inspect.signature(func).parameters[name].default


def _objects() -> list[dict]:
    import highdicom as hd
    from pydicom.uid import EncapsulatedPDFStorage, MRImageStorage, SecondaryCaptureImageStorage, SegmentationStorage

    from brainline.pipelines.dicom_outputs import (
        kos,
        lesion_seg,
        longitudinal_sr,
        overlay,
        pdf_report,
        seg,
        sr,
        subtraction,
    )
    sr_classes = {key: cls for key, cls in sr.SR_CLASSES.items()}
    default_sr = _default(sr.build_sr, "sr_class")

    def sr_uid(cls) -> str:
        return {hd.sr.Comprehensive3DSR: "1.2.840.10008.5.1.4.1.1.88.34",
                hd.sr.ComprehensiveSR: "1.2.840.10008.5.1.4.1.1.88.33",
                hd.sr.EnhancedSR: "1.2.840.10008.5.1.4.1.1.88.22"}[cls]

    others = ", ".join(f"{_uid_name(sr_uid(c))} (`sr_class=\"{k}\"`)" for k, c in sr_classes.items() if k != default_sr)
    return [
        {"what": "Tumour segmentation", "uid": str(SegmentationStorage), "modality": "SEG",
         "series": _default(seg.build_seg, "series_number"),
         "description": _default(seg.build_seg, "series_description"),
         "notes": "BINARY, one segment per BraTS label present, frames on the reference series grid, "
                  "per-frame source image references; empty frames omitted"},
        {"what": "Volumes and QC (TID 1500)", "uid": sr_uid(sr_classes[default_sr]), "modality": "SR",
         "series": _default(sr.build_sr, "series_number"),
         "description": _default(sr.build_sr, "series_description"),
         "notes": f"also available as {others}"},
        {"what": "RANO bidimensional measurements (TID 1500)", "uid": sr_uid(sr_classes[default_sr]),
         "modality": "SR", "series": _default(sr.build_rano_sr, "series_number"),
         "description": _default(sr.build_rano_sr, "series_description"),
         "notes": "SCOORD POLYLINE long and short axis per tumour-core lesion; rehydrated by OHIF"},
        {"what": "Overlay images", "uid": str(SecondaryCaptureImageStorage), "modality": "OT",
         "series": _default(overlay.build_overlay_series, "series_number"),
         "description": _default(overlay.build_overlay_series, "series_description"),
         "notes": "RGB, one per reference instance, outlines burned in, ImageType DERIVED\\SECONDARY"},
        {"what": "Follow-up subtraction images (with a prior)", "uid": str(MRImageStorage), "modality": "MR",
         "series": _default(subtraction.build_subtraction_series, "series_number"),
         "description": "BrainLine <sequence> minus prior <date> NOT FOR DIAGNOSIS",
         "notes": "one series per subtraction (FLAIR, T1c; numbered from this one), one image per reference "
                  "instance, ImageType DERIVED\\SECONDARY\\SUBTRACTION, signed 16-bit with rescale, "
                  "references to the reference instances and the prior study"},
        {"what": "New and growing lesions (with a prior)", "uid": str(SegmentationStorage), "modality": "SEG",
         "series": _default(lesion_seg.build_lesion_seg, "series_number"),
         "description": _default(lesion_seg.build_lesion_seg, "series_description"),
         "notes": "BINARY, one segment per lesion (Lesion 52988006 SCT, modifier New finding / Increase in size); "
                  "none when no lesion"},
        {"what": "Follow-up change (TID 1500, with a prior)", "uid": sr_uid(sr_classes[default_sr]),
         "modality": "SR", "series": _default(longitudinal_sr.build_change_sr, "series_number"),
         "description": _default(longitudinal_sr.build_change_sr, "series_description"),
         "notes": "volume change per component against the prior and the nadir, assessment, one group per "
                  "lesion; the prior's objects in PertinentOtherEvidenceSequence"},
        {"what": "PDF report", "uid": str(EncapsulatedPDFStorage), "modality": "DOC",
         "series": _default(pdf_report.build_encapsulated_pdf, "series_number"),
         "description": _default(pdf_report.build_encapsulated_pdf, "series_description"),
         "notes": "Encapsulated PDF; concept name (18748-4, LN, \"Diagnostic Imaging Report\")"},
        {"what": "Verified volumes SR (after a radiologist's ACCEPT)", "uid": sr_uid(sr_classes[default_sr]),
         "modality": "SR", "series": _default(sr.build_sr, "series_number"),
         "description": _default(sr.build_sr, "series_description"),
         "notes": "next instance of the volumes SR series: COMPLETE, FINAL, VERIFIED, Verifying Observer, the "
                  "earlier SR in PredecessorDocumentsSequence, decision, score 1-5 and comment"},
        {"what": "PDF report re-issued after review", "uid": str(EncapsulatedPDFStorage), "modality": "DOC",
         "series": _default(pdf_report.build_encapsulated_pdf, "series_number"),
         "description": _default(pdf_report.build_encapsulated_pdf, "series_description"),
         "notes": "next instance of the PDF series: \"Reviewed by ...\" (VERIFIED), or after REJECT a report "
                  "without volumes that says why"},
        {"what": "Rejection note (IHE IOCM)", "uid": "1.2.840.10008.5.1.4.1.1.88.59", "modality": "KO",
         "series": _default(kos.build_rejection_note, "series_number"),
         "description": _default(kos.build_rejection_note, "series_description"),
         "notes": "Key Object Selection titled (113001, DCM, \"Rejected for Quality Reasons\") referencing every "
                  "delivered object of a rejected or superseded job"},
    ]


def _deid() -> dict:
    import yaml

    from brainline.service.gateway import deid
    profile = deid.DeidProfile.load()
    data = yaml.safe_load((ROOT / "config" / "deid_profile.yaml").read_text())
    return {
        "name": profile.name, "method_text": profile.method_text,
        "codes": [(c.value, c.scheme, c.meaning) for c in profile.method_codes],
        "options": [(o["name"], o["code"], bool(o.get("applied")), " ".join(str(o.get("note", "")).split()))
                    for o in data.get("options", [])],
        "allowed": len(profile.allowed),
        "payloads": sorted(set(deid.NON_IMAGE_PAYLOADS.values())),
        "burned_in": list(deid.BURNED_IN_POLICIES),
    }


def _codes() -> list[tuple[str, str, str, str]]:
    from brainline.pipelines.dicom_outputs import codes as c
    rows = []
    for label in c.LABELS.values():
        rows.append((f"Label {label.value} ({label.key})", label.property_type.value,
                     label.property_type.scheme_designator, label.property_type.meaning))
    for comp in c.COMPOSITES.values():
        rows.append((comp.name, comp.method.value, comp.method.scheme_designator, comp.method.meaning))
    rows.append(("Volume unit", c.UNIT_ML.value, c.UNIT_ML.scheme_designator, c.UNIT_ML.meaning))
    rows.append(("Long axis", c.LONG_AXIS.value, c.LONG_AXIS.scheme_designator, c.LONG_AXIS.meaning))
    rows.append(("Short axis", c.SHORT_AXIS.value, c.SHORT_AXIS.scheme_designator, c.SHORT_AXIS.meaning))
    rows.append(("Bidimensional method", c.RANO_METHOD.value, c.RANO_METHOD.scheme_designator, c.RANO_METHOD.meaning))
    for backend, fam in sorted(c.BACKEND_FAMILIES.items()):
        rows.append((f"Algorithm family, backend `{backend}`", fam.value, fam.scheme_designator, fam.meaning))
    for qc in c.QC_CHECKS.values():
        rows.append((f"QC check `{qc.key}`", qc.concept.value, qc.concept.scheme_designator, qc.concept.meaning))
    rows.append(("QC check `registration <role>`", "QC-REG-<ROLE>", c.PRIVATE_SCHEME, "Registration quality (<role>)"))
    for word, code in sorted(c.QC_VALUES.items()):
        rows.append((f"QC status `{word}`", code.value, code.scheme_designator, code.meaning))
    return rows


def render() -> str:
    from brainline import __version__
    lst, settings, scu, objects, deid = _listener(), _settings(), _scu(), _objects(), _deid()
    priors = _priors()
    out: list[str] = []
    w = out.append
    w("# BrainLine DICOM Conformance Statement")
    w("")
    w(f"BrainLine {__version__}. Generated by `scripts/gen_conformance.py` from the code; do not edit by hand "
      "(tests/test_conformance_doc.py fails when this file and the code disagree).")
    w("")
    w("BrainLine is a DICOM node that receives brain MR studies, segments brain tumours and returns the "
      "results as new DICOM objects in the same study. It is research software: its results are "
      "unverified and preliminary (SR VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY), not for "
      "primary diagnosis.")
    w("")
    w("## 1. Network services")
    w("")
    w("| SOP class | UID | Role |")
    w("|---|---|---|")
    w("| Verification | 1.2.840.10008.1.1 | SCP |")
    for uid, name in lst["sop_classes"]:
        w(f"| {name} | {uid} | SCP (C-STORE) |")
    w("| Storage SOP classes of the result objects (section 3) | | SCU (C-STORE), or STOW-RS |")
    w(f"| Study Root Query/Retrieve Information Model - FIND | {priors['find']} | SCU (prior studies, "
      "section 1.4) |")
    w(f"| Study Root Query/Retrieve Information Model - GET | {priors['get']} | SCU, with the storage SCP role "
      "for " + ", ".join(_uid_name(u) for u in priors["stored"]) + " (prior studies, section 1.4) |")
    w(f"| Study Root Query/Retrieve Information Model - MOVE | {priors['move']} | SCU (prior studies with "
      "BRAINLINE_PRIOR_RETRIEVE=move, section 1.4) |")
    w("| " + ", ".join(_uid_name(u) for u in priors["stored"]) + " | | SCP (C-STORE) of the C-MOVE destination, "
      "open only while a prior is retrieved (section 1.4) |")
    w("")
    w("### 1.1 Association acceptance (Storage SCP)")
    w("")
    w(f"* AE title `{settings.get('ae_title')}` (BRAINLINE_AE_TITLE), port {settings.get('dicom_port')} "
      f"(BRAINLINE_DICOM_PORT); DICOM TLS on port {settings.get('dicom_tls_port')} when a certificate is "
      "configured (BRAINLINE_TLS_CERT / BRAINLINE_TLS_KEY; BRAINLINE_TLS_CLIENT_CA requires client "
      "certificates).")
    w("* The called AE title must match. Calling AE titles, optionally as AE@host pairs, are restricted by "
      "BRAINLINE_ALLOWED_AES.")
    w(f"* Maximum P-DATA PDU received: {settings.get('max_pdu_size')} bytes (BRAINLINE_MAX_PDU_SIZE); "
      "larger PDUs are aborted.")
    w("* Presentation contexts are accepted only for the storage SOP classes above (or the set configured in "
      "BRAINLINE_ACCEPTED_SOP_CLASSES) and Verification; all others are rejected at negotiation.")
    w("* Limits on associations per peer and in total, and ACSE / network / DIMSE timeouts, apply "
      "(documented in service/gateway/listener.py).")
    w("")
    w("Transfer syntaxes accepted for every storage SOP class (instances are stored as received; a deflated "
      "data set is inflated, within the size limit, and filed as Explicit VR Little Endian):")
    w("")
    w("| Transfer syntax | UID |")
    w("|---|---|")
    for ts in lst["transfer_syntaxes"]:
        w(f"| {_uid_name(ts)} | {ts} |")
    w("")
    w("### 1.2 C-STORE response status (SCP)")
    w("")
    w("| Status | Meaning | When |")
    w("|---|---|---|")
    for value, _name, meaning, when in lst["statuses"]:
        w(f"| 0x{value:04X} | {meaning} | {when} |")
    w("")
    w("C-ECHO is always answered with 0x0000 on an accepted association.")
    w("")
    w("### 1.3 Result delivery (Storage SCU, STOW-RS)")
    w("")
    w("Destinations are configured with BRAINLINE_DEST_DICOM (AET@host:port) and BRAINLINE_DEST_STOWRS (URL). "
      "For C-STORE, BrainLine proposes one presentation context per SOP class of the objects to send with:")
    w("")
    for ts in scu["transfer_syntaxes"]:
        w(f"* {_uid_name(ts)} ({ts})")
    w("")
    w("Response statuses treated as stored: " + ", ".join(f"0x{s:04X}" for s in scu["stored"])
      + ". Any other status is a permanent refusal of that object (recorded in words); an unreachable "
        "destination, a rejected association or a timeout is retried later.")
    w("")
    w("### 1.4 Prior studies (C-FIND / C-GET / C-MOVE SCU, QIDO-RS / WADO-RS)")
    w("")
    w("For the longitudinal comparison the gateway looks for earlier MR studies of the patient at "
      "BRAINLINE_PRIOR_PACS_DICOMWEB (QIDO-RS with PatientID and ModalitiesInStudy=MR, then WADO-RS of the MR "
      "series) or BRAINLINE_PRIOR_PACS_DICOM (AET@host:port: a Study Root C-FIND at STUDY level keyed on "
      "PatientID, then a C-GET per study, BrainLine taking the SCP role of the storage classes listed in "
      "section 1 on the same association). Only MR series are retrieved; the instances are pseudonymised "
      "like a received study.")
    w("")
    w("With BRAINLINE_PRIOR_RETRIEVE=move the gateway sends a Study Root C-MOVE per MR series instead, naming "
      f"as destination its own storage SCP (AE title BRAINLINE_PRIOR_MOVE_AE, default {priors['move_ae']}, on "
      f"BRAINLINE_PRIOR_MOVE_PORT, default {priors['move_port']}), which the PACS must have configured. That SCP "
      "is opened only while a prior is retrieved, accepts the storage classes above in the transfer syntaxes "
      f"{', '.join(priors['syntaxes'])}, requires its called AE title, refuses associations from other hosts "
      "than the PACS, "
      f"and answers 0x{priors['not_wanted']:04X} to an instance that is not MR of the requested study (not "
      "kept). One C-MOVE retrieval runs at a time.")
    w("")
    w("## 2. De-identification before processing")
    w("")
    w(f"Every received instance is pseudonymized before any processing: profile \"{deid['name']}\" "
      f"(DeidentificationMethod \"{deid['method_text']}\"). The profile is an allowlist of "
      f"{deid['allowed']} attributes; every other attribute is removed at every nesting level, including "
      "private tags, overlays and curves. Non-image payloads are always removed: "
      + ", ".join(deid["payloads"]) + ".")
    w("")
    w("DeidentificationMethodCodeSequence (CID 7050):")
    w("")
    for value, scheme, meaning in deid["codes"]:
        w(f"* ({value}, {scheme}, \"{meaning}\")")
    w("")
    w("| PS3.15 Table E.1-1 option | Code | Applied | Notes |")
    w("|---|---|---|---|")
    for name, code, applied, note in deid["options"]:
        w(f"| {name} | {code} | {'yes' if applied else 'no'} | {note} |")
    w("")
    w("BurnedInAnnotation = YES is handled by BRAINLINE_BURNED_IN_ANNOTATION: "
      + " or ".join(f"`{p}`" for p in deid["burned_in"]) + ". Result objects are re-identified (patient "
      "and study attributes and UIDs of the original study) only at the gateway, before delivery.")
    w("")
    w("## 3. Objects created")
    w("")
    w("All objects belong to the received study (same Study Instance UID and patient), reference the "
      "reference series they were computed on, and carry Manufacturer \"BrainLine\", SoftwareVersions "
      "(BrainLine and the segmentation model) and a Device Serial Number (BRAINLINE_DEVICE_SERIAL, else "
      "derived from BRAINLINE_UID_ROOT, else from the host name). New UIDs are `2.25.<uuid>` or under "
      "BRAINLINE_UID_ROOT.")
    w("")
    w("| Object | SOP class | UID | Modality | Series number | Series description | Notes |")
    w("|---|---|---|---|---|---|---|")
    for o in objects:
        w(f"| {o['what']} | {_uid_name(o['uid'])} | {o['uid']} | {o['modality']} | {o['series']} | "
          f"{o['description']} | {o['notes']} |")
    w("")
    w("SEG: ContentLabel `BRAINLINE_TUMOR`; ContentCreatorName present and empty (made by software); "
      "ContentDescription names the application, its version and the model; the Segmentation Algorithm "
      "Identification gives the algorithm family from CID 7162 by backend type (below).")
    w("")
    w("SR: TID 1500 Imaging Measurement Report, observer context = the BrainLine device (TID 1004). "
      "Measurement Method is a HAS CONCEPT MOD of its group. Private concepts use the coding scheme "
      "`99BRAINLINE`, declared in the Coding Scheme Identification Sequence.")
    w("")
    w("Multi-frame reference series: a reference series received as one Enhanced MR or Legacy Converted "
      "Enhanced MR instance gets the same objects, built on its frames. Every image reference names the "
      "instance and its Referenced Frame Number: the SEG's per-frame source images, the RANO SR's SCOORD "
      "source images, and the SourceImageSequence of each overlay and subtraction image (one image per "
      "frame, in slice order). The SRs' evidence and the PDF's SourceInstanceSequence list the instance. A "
      "multi-frame reference series split over several instances is refused at series selection "
      "(`needs_input`).")
    w("")
    w("### 3.1 Coded concepts")
    w("")
    w("| Concept | Code value | Scheme | Meaning |")
    w("|---|---|---|---|")
    for what, value, scheme, meaning in _codes():
        w(f"| {what} | {value} | {scheme} | {meaning} |")
    w("")
    w("## 4. Character sets")
    w("")
    w("Received instances are stored as received. Created objects copy the Specific Character Set of the "
      "reference series where they copy its text (overlay, PDF); SEG and SR are written by highdicom with "
      "its default, ISO_IR 100, or the character set of the reference series.")
    w("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/CONFORMANCE.md is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python scripts/gen_conformance.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
