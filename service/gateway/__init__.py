"""The gateway: the PHI zone. Only ``brainline serve`` runs it; it holds the
vault key.

Receive (``listener``: DICOM C-STORE SCP; ``dicomweb_pull``), hold
(``spool``, ``completion``: a study is complete when it has been quiet),
pseudonymize (``vault``, ``deid``, the ``pseudonymize`` stage, the
``priors`` stage that finds and pseudonymizes the patient's earlier
studies), then, after the compute stages, re-identify (``reidentify``) and
deliver (the ``deliver`` stage, ``outbox``, ``destinations``), with the
radiologist's review (``review``) and retention (``retention``).

May import: ``brainline.pipelines``, ``brainline.models``, the service's
shared modules (db, settings, metrics, logs), ``service.jobs`` and
``service.compute``. Nothing outside the gateway may import it except the
web API (``service.api``) and the wiring (``service.context``,
``service.cli``); the job table loads the gateway stages by name when they
run (service/jobs/stage_table.py). import-linter checks this (pyproject.toml,
``[tool.importlinter]``).
"""
