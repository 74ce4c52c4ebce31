"""The shadow guard: a prompt's `guard` setting (shadow_rate, min_agreement, window, metric); null: off.
Version statuses gain `rejected` (its reason in the version's `error`), which needs no schema change."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("guard", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("guard")
