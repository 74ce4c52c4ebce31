"""Learning from traffic: a prompt's recording setting (`record`: rate and ring size) and the recorded rows
(`traffic`: slot values and the answer served, per prompt, oldest dropped beyond the prompt's `max_rows`)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("record", sa.JSON(), nullable=True))
    op.create_table(
        "traffic",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=True),
        sa.Column("slots", sa.JSON(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_traffic_prompt_id_id", "traffic", ["prompt_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_traffic_prompt_id_id", table_name="traffic")
    op.drop_table("traffic")
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("record")
