"""What a stage is handed: the ``StageContext`` of one job.

Every stage, gateway or compute, is a function ``fn(ctx: StageContext) ->
dict``. The context names the job, its workspace folder and the service
settings; on the gateway it also holds the spool, the vault and the outbox,
which are ``None`` on a compute worker (``brainline worker``: no vault key,
no PHI). The gateway types are imported for type checking only, so this
module (and every compute stage that imports it) never loads the gateway
code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import Superseded

if TYPE_CHECKING:
    from ..gateway.outbox import Outbox
    from ..gateway.spool import Spool
    from ..gateway.vault import Vault


@dataclass
class StageContext:
    job_id: int
    study_key: str
    workspace: Path
    spool: Spool | None
    vault: Vault | None
    settings: object
    outbox: Outbox | None = None  # None when no destination is configured, and on compute workers
    #: () -> None, or the words "superseded by job N ..." once a newer job replaced this one
    superseded: Callable[[], str | None] | None = None
    #: the job store's sessionmaker (find_priors reads earlier jobs of the patient);
    #: None = the vault's, which lives in the same database
    sessions: object = None

    def check_superseded(self) -> None:
        """Raise Superseded when a newer job of this study replaced this one."""
        why = self.superseded() if self.superseded else None
        if why:
            raise Superseded(why)

    def path(self, *parts: str) -> Path:
        return self.workspace.joinpath(*parts)

    def job_sessions(self):
        """The job store's sessionmaker: ``sessions``, else the vault's (the
        service keeps jobs and the vault in one database); None when the
        context has neither."""
        return self.sessions if self.sessions is not None else getattr(self.vault, "_sessions", None)


#: A stage: ``fn(ctx) -> dict`` (the result stored in the job store).
StageFn = Callable[[StageContext], dict]
