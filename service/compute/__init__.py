"""Compute: the image stages, on pseudonymized job workspaces only. No PHI.

``stages`` (series selection, conversion, the image steps, QC with the
site's history in ``qc_history``, longitudinal comparison, the DICOM result
objects), ``worker`` (``brainline worker``: a Celery worker that runs them
without the vault key) and ``validate`` (``brainline validate``: accuracy on
a labelled data set).

May import: ``brainline.pipelines``, ``brainline.models``, the service's
shared modules (db, settings, metrics, scaleout_metrics, logs) and
``service.jobs``. Never ``service.gateway`` (listener, spool, vault,
de-identification, re-identification, outbox), ``service.api`` or
``cryptography``: a compute worker never loads the code that handles the
vault key or identities. import-linter checks this (pyproject.toml,
``[tool.importlinter]``).
"""
