"""Which stages each pipeline runs, in order: ``PIPELINES``.

A stage is ``fn(ctx: StageContext) -> dict`` (service/jobs/context.py). The
service's table is the gateway stages (``GATEWAY_TABLE``) plus the image
stages of the pipelines' stage table (pipelines/stage_table.py), each wrapped
by service/compute/stages.py (``service_stage``); it is derived, never
repeated, and follows that table when a stage is added (``register_stage``
or a ``brainline.stages`` entry point).

The gateway stages (``GATEWAY_STAGES``: pseudonymize, find_priors, deliver),
which read the spool or the vault or write the PHI outbox, are named by
module and loaded the first time one runs: importing this table (a compute
worker does, through the job runner) never loads the spool, the vault or the
de-identification code. Only the gateway runs them; the Celery executor
routes them to the ``gateway`` queue (service/jobs/celery_app.py).
"""

from __future__ import annotations

from brainline.pipelines import stage_table as image_table
from brainline.pipelines.records import RESULTS_FILE
from brainline.pipelines.stage_table import GATEWAY, Stage

from ..compute.stages import service_stage
from .context import StageContext, StageFn

#: The gateway's stages, ``fn(ctx)`` named by module (imported when they run).
GATEWAY_TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("pseudonymize", "pseudonymization", "brainline.service.gateway.pseudonymize:pseudonymize",
          reads=("spool",), writes=("dicom/", "pseudonymize.json"), zone=GATEWAY),
    Stage("find_priors", "prior-study search", "brainline.service.gateway.priors:find_priors",
          reads=("pseudonymize.json", "vault", "PACS"), writes=("priors.json", "priors/"), zone=GATEWAY),
    Stage("deliver", "delivery", "brainline.service.gateway.deliver:deliver",
          reads=("results/", RESULTS_FILE, "vault"), writes=("outbox",), zone=GATEWAY),
)}
#: Stages that read the spool, the vault (find_priors: the real patient ID
#: for the PACS query) or write the PHI outbox: gateway only.
GATEWAY_STAGES = frozenset(GATEWAY_TABLE)


def gateway_stage(name: str) -> StageFn:
    """The gateway stage ``name``, its module imported when it first runs."""
    entry = GATEWAY_TABLE[name]

    def stage(ctx: StageContext) -> dict:
        return entry.function()(ctx)

    stage.__name__ = stage.__qualname__ = name
    stage.__doc__ = f"The gateway stage {name}: {entry.step}()."
    return stage


def table() -> list[Stage]:
    """Every stage the service knows (gateway and image), in neuro_onco order."""
    images = image_table.stages()
    return [GATEWAY_TABLE["pseudonymize"], GATEWAY_TABLE["find_priors"], *images, GATEWAY_TABLE["deliver"]]


def labels() -> dict[str, str]:
    """Stage name -> its name in words (job errors, API, UI)."""
    return {s.name: s.label for s in table()}


def _build() -> dict[str, list[tuple[str, StageFn]]]:
    images = [(s.name, service_stage(s)) for s in image_table.stages()]
    inputs = [item for item in images if item[0] in image_table.INPUT_STAGES]
    return {
        "foundation": [("pseudonymize", gateway_stage("pseudonymize")), *inputs],
        "neuro_onco": [("pseudonymize", gateway_stage("pseudonymize")),
                       ("find_priors", gateway_stage("find_priors")),
                       *images,
                       ("deliver", gateway_stage("deliver"))],
    }


PIPELINES: dict[str, list[tuple[str, StageFn]]] = {}


def _rebuild() -> None:
    PIPELINES.update(_build())


_rebuild()
image_table.on_change(_rebuild)
DEFAULT_PIPELINE = "neuro_onco"
