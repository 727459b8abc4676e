"""Stage "summarize" renamed "summary" (each stage's record file is
``<stage>.json``; the summary stage writes ``summary.json``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

RENAMED = {"summarize": "summary"}


def upgrade() -> None:
    stages = sa.table("stages", sa.column("name", sa.String))
    for old, new in RENAMED.items():
        op.execute(stages.update().where(stages.c.name == old).values(name=new))


def downgrade() -> None:
    stages = sa.table("stages", sa.column("name", sa.String))
    for old, new in RENAMED.items():
        op.execute(stages.update().where(stages.c.name == new).values(name=old))
