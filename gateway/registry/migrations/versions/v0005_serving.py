"""Merged serving: a prompt's `serving` setting (`mode` lora or merged, `url` of an engine run elsewhere) and the
state of its merged engine (the replica holding its lease, where it answers, the version merged, the last error).
None: served by LoRA, the default."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("serving", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("serving")
