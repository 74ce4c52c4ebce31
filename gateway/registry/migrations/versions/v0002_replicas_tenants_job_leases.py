"""Several replicas: the change log they follow (registry_state, registry_changes), a prompt's tenant, each
training job's fenced lease, and job ids that are never reused (SQLite AUTOINCREMENT).
"""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(sa.text("INSERT INTO registry_state (id, revision) VALUES (1, 0)"))
    op.create_table(
        "registry_changes",
        sa.Column("revision", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("prompt", sa.String(length=64), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("revision"),
    )
    op.create_index("ix_registry_changes_changed_at", "registry_changes", ["changed_at"])
    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
        batch.create_index("ix_prompts_tenant", ["tenant"])
    # SQLite can only turn AUTOINCREMENT on by recreating the table (batch mode copies the rows across).
    # PostgreSQL's id sequence never gives a number twice already, and it must not be recreated there: the
    # copy would get a new sequence starting at 1 beside the copied ids. Plain ADD COLUMNs instead.
    with op.batch_alter_table("train_jobs", recreate=_recreate_on_sqlite(),
                              table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_token", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("train_jobs", recreate=_recreate_on_sqlite()) as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_token")
        batch.drop_column("lease_owner")
    with op.batch_alter_table("prompts") as batch:
        batch.drop_index("ix_prompts_tenant")
        batch.drop_column("tenant")
    op.drop_index("ix_registry_changes_changed_at", table_name="registry_changes")
    op.drop_table("registry_changes")
    op.drop_table("registry_state")


def _recreate_on_sqlite() -> Literal["always", "auto"]:
    return "always" if op.get_bind().dialect.name == "sqlite" else "auto"
