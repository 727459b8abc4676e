"""Jobs: the durable job store and the runner that moves a job through its
stages. Pseudonymous only: a job knows its study key and pseudonymous UIDs.

``store`` (jobs, supersede, crash recovery), ``runner`` (runs stages, records
outcomes), ``stage_table`` (which stages each pipeline runs), ``context``
(the ``StageContext`` a stage is handed), ``errors`` (how a stage ends, in
words), ``executor`` (local threads or Celery) and ``celery_app`` (one task
per stage, routed by PHI zone: gateway, compute, gpu).

May import: ``brainline.pipelines``, ``brainline.models``, the service's
shared modules (db, settings, metrics) and ``service.compute`` (the stage
table lists the compute stages). Never ``service.gateway`` or
``service.api``: compute workers import the jobs package; the gateway stages
are loaded by name when they run, on the gateway only. import-linter checks
this (pyproject.toml, ``[tool.importlinter]``).
"""
