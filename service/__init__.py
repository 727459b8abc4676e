"""The BrainLine service, by role, in the order a study flows through it:

receive -> pseudonymize (``gateway``, PHI zone) -> jobs (``jobs``: store,
runner, stage table, executors) -> image stages (``compute``, pseudonymized
workspaces only) -> results -> re-identify and deliver (``gateway``); the
HTTP API and review UI in ``api``. Shared: ``cli`` (the ``brainline``
command), ``context`` (wires the parts together), ``settings``, ``db`` (the
job store's tables, ``migrations/``), ``metrics``, ``scaleout_metrics``,
``logs``. Each subpackage's docstring says what it may import;
import-linter checks it (pyproject.toml, ``[tool.importlinter]``).
"""
