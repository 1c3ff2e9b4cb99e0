"""Every domain's tables, imported once so Alembic and tests see the whole schema."""

from plantwatch.alerts import models as alerts_models
from plantwatch.assets import models as assets_models
from plantwatch.notify import models as notify_models
from plantwatch.rules import models as rules_models
from plantwatch.stream import models as stream_models
from plantwatch.telemetry import models as telemetry_models
from plantwatch.tenancy import models as tenancy_models

__all__ = [
    "alerts_models",
    "assets_models",
    "notify_models",
    "rules_models",
    "stream_models",
    "telemetry_models",
    "tenancy_models",
]
