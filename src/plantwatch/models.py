"""Every domain's tables, imported once so Alembic and tests see the whole schema."""

from plantwatch.assets import models as assets_models
from plantwatch.rules import models as rules_models
from plantwatch.telemetry import models as telemetry_models
from plantwatch.tenancy import models as tenancy_models

__all__ = ["assets_models", "rules_models", "telemetry_models", "tenancy_models"]
