"""alerts: alerts, timeline, SLA policies, escalation chain

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 08:02:35.335619
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import plantwatch.core.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alert_sla_policies",
        sa.Column(
            "factory_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("ack_s", sa.Integer(), nullable=True),
        sa.Column("resolve_s", sa.Integer(), nullable=True),
        sa.Column("remind_every_s", sa.Integer(), nullable=True),
        sa.Column("updated_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["factory_id"],
            ["factories.id"],
            name=op.f("fk_alert_sla_policies_factory_id_factories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("factory_id", "severity", name=op.f("pk_alert_sla_policies")),
    )
    op.create_table(
        "escalation_levels",
        sa.Column(
            "factory_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column(
            "user_ids",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "roles",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("updated_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["factory_id"],
            ["factories.id"],
            name=op.f("fk_escalation_levels_factory_id_factories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("factory_id", "level", name=op.f("pk_escalation_levels")),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "factory_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("rule_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("device_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("open_key", sa.String(length=64), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column(
            "facts",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "snapshot",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("occurrences", sa.Integer(), nullable=False),
        sa.Column("triggered_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "acknowledged_by", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("resolved_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "resolved_by", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("resolution_note", sa.Text(), nullable=True),
        sa.Column(
            "assigned_to", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("escalation_level", sa.Integer(), nullable=False),
        sa.Column(
            "last_escalated_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("last_reminder_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("ack_due_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("resolve_due_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("ack_breach_handled", sa.Boolean(), nullable=False),
        sa.Column("resolve_breach_handled", sa.Boolean(), nullable=False),
        sa.Column(
            "next_sla_check_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("created_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["acknowledged_by"],
            ["users.id"],
            name=op.f("fk_alerts_acknowledged_by_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["assigned_to"],
            ["users.id"],
            name=op.f("fk_alerts_assigned_to_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_alerts_device_id_devices"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["factory_id"],
            ["factories.id"],
            name=op.f("fk_alerts_factory_id_factories"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["resolved_by"],
            ["users.id"],
            name=op.f("fk_alerts_resolved_by_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["rule_id"], ["rules.id"], name=op.f("fk_alerts_rule_id_rules"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("open_key", name="uq_alerts_open_key"),
    )
    op.create_index("ix_alerts_device_id", "alerts", ["device_id"], unique=False)
    op.create_index("ix_alerts_factory_status", "alerts", ["factory_id", "status"], unique=False)
    op.create_index(
        "ix_alerts_factory_triggered", "alerts", ["factory_id", "triggered_at"], unique=False
    )
    op.create_index("ix_alerts_next_sla_check_at", "alerts", ["next_sla_check_at"], unique=False)
    op.create_index("ix_alerts_rule_id", "alerts", ["rule_id"], unique=False)

    op.create_table(
        "alert_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "factory_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("actor_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("at", plantwatch.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "data",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["actor_id"],
            ["users.id"],
            name=op.f("fk_alert_events_actor_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name=op.f("fk_alert_events_alert_id_alerts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["factory_id"],
            ["factories.id"],
            name=op.f("fk_alert_events_factory_id_factories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_events")),
    )
    op.create_index("ix_alert_events_alert", "alert_events", ["alert_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_alert_events_alert", table_name="alert_events")

    op.drop_table("alert_events")
    op.drop_index("ix_alerts_rule_id", table_name="alerts")
    op.drop_index("ix_alerts_next_sla_check_at", table_name="alerts")
    op.drop_index("ix_alerts_factory_triggered", table_name="alerts")
    op.drop_index("ix_alerts_factory_status", table_name="alerts")
    op.drop_index("ix_alerts_device_id", table_name="alerts")

    op.drop_table("alerts")
    op.drop_table("escalation_levels")
    op.drop_table("alert_sla_policies")
