"""The HTTP side of the gateway (PHI zone): the FastAPI app (``app``: REST
API, health, metrics), log-in and audit (``auth``), the QC overview
(``qc_api``), the review API (``review_api``) and the review web UI
(``review_ui``, templates and static files in ``web/``).

May import everything in the service (it runs in ``brainline serve``, next
to the gateway). Nothing else in the service imports it except the wiring
(``service.cli``). import-linter checks this (pyproject.toml,
``[tool.importlinter]``).
"""
