"""telemetry: raw points, 1m/1h rollups, latest values, dead letters

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 05:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import plantwatch.core.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rollup(name: str) -> None:
    op.create_table(
        name,
        sa.Column("series_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("cnt", sa.Integer(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("vmin", sa.Float(), nullable=False),
        sa.Column("vmax", sa.Float(), nullable=False),
        sa.Column("first_ts", sa.BigInteger(), nullable=False),
        sa.Column("vfirst", sa.Float(), nullable=False),
        sa.Column("last_ts", sa.BigInteger(), nullable=False),
        sa.Column("vlast", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", "bucket", name=op.f(f"pk_{name}")),
        sqlite_with_rowid=False,
    )


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite supports it): a batch copy would rebuild the tables and
    # lose device_parameters' AUTOINCREMENT.
    op.add_column(
        "factories",
        sa.Column("auto_register_devices", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column(
        "factories",
        sa.Column("offline_after_s", sa.Integer(), server_default="300", nullable=False),
    )
    op.add_column("devices", sa.Column("offline_after_s", sa.Integer(), nullable=True))
    op.add_column(
        "device_parameters",
        sa.Column("is_power", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    # On PostgreSQL the raw table is partitioned by time; partitions are created
    # ahead (and on demand for backfills) by plantwatch.telemetry.partitions.
    op.create_table(
        "telemetry_raw",
        sa.Column("series_id", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", "ts", name=op.f("pk_telemetry_raw")),
        sqlite_with_rowid=False,
        postgresql_partition_by="RANGE (ts)",
    )
    _rollup("telemetry_1m")
    _rollup("telemetry_1h")
    op.create_table(
        "series_latest",
        sa.Column("series_id", sa.BigInteger(), nullable=False),
        sa.Column("factory_id", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("text", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("series_id", name=op.f("pk_series_latest")),
    )
    op.create_index("ix_series_latest_factory_device", "series_latest", ["factory_id", "device_id"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "factory_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("device_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("device_key", sa.String(length=100), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("topic", sa.String(length=300), nullable=True),
        sa.Column("reason", sa.String(length=48), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column(
            "context",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("received_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("replay_result", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_dead_letters_device_id_devices"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["factory_id"],
            ["factories.id"],
            name=op.f("fk_dead_letters_factory_id_factories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(
        "ix_dead_letters_factory_received", "dead_letters", ["factory_id", "received_at"]
    )
    op.create_index("ix_dead_letters_factory_reason", "dead_letters", ["factory_id", "reason"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_factory_reason", table_name="dead_letters")
    op.drop_index("ix_dead_letters_factory_received", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_series_latest_factory_device", table_name="series_latest")
    op.drop_table("series_latest")
    op.drop_table("telemetry_1h")
    op.drop_table("telemetry_1m")
    # Dropping the partitioned parent drops its partitions with it.
    op.drop_table("telemetry_raw")
    with op.batch_alter_table(
        "device_parameters", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:
        batch.drop_column("is_power")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("offline_after_s")
    with op.batch_alter_table("factories") as batch:
        batch.drop_column("offline_after_s")
        batch.drop_column("auto_register_devices")
