"""Settings: `PLANTWATCH_*` environment variables, then an optional TOML file.

Secrets are never defaulted in code: when `secret_key` is not given it is
generated on first start and kept in `<data_dir>/secrets.json` (mode 0600), so
tokens survive restarts and every installation has its own key.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SECRETS_FILE = "secrets.json"
CONFIG_FILE = "plantwatch.toml"


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "plantwatch"


def _config_file() -> Path | None:
    """The TOML file to read: `PLANTWATCH_CONFIG`, else `<data_dir>/plantwatch.toml`."""
    explicit = os.environ.get("PLANTWATCH_CONFIG")
    if explicit:
        return Path(explicit)
    data_dir = os.environ.get("PLANTWATCH_DATA_DIR")
    candidate = (Path(data_dir) if data_dir else default_data_dir()) / CONFIG_FILE
    return candidate if candidate.exists() else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLANTWATCH_", extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    secret_key: SecretStr | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = None

    mqtt_port: int = Field(default=1883, ge=0, le=65535)
    # MQTT ingest (docs/mqtt.md). With mqtt_url (mqtt[s]://user:pass@host:port) the
    # `ingest` role subscribes to that broker; without, it runs the embedded broker on
    # mqtt_host (default: host) and mqtt_port (0 = any free port).
    mqtt_url: SecretStr | None = None
    mqtt_host: str | None = None
    mqtt_max_in_flight: int = Field(default=8000, ge=1, le=65535)
    mqtt_share_group: str = Field(default="plantwatch", max_length=64, pattern=r"^[\w.-]*$")
    mqtt_client_id: str | None = Field(default=None, min_length=1, max_length=64)
    mqtt_session_expiry_s: int = Field(default=300, ge=0, le=7 * 86400)

    access_token_ttl_s: int = Field(default=15 * 60, ge=60, le=30 * 60)
    refresh_token_ttl_s: int = Field(default=14 * 24 * 3600, ge=3600)
    invite_ttl_s: int = Field(default=7 * 24 * 3600, ge=600)

    login_max_failures_per_account: int = Field(default=5, ge=1)
    login_max_failures_per_ip: int = Field(default=20, ge=1)
    login_failure_window_s: int = Field(default=15 * 60, ge=1)

    # Telemetry ingest: batching and the limits every payload is checked against.
    ingest_batch_points: int = Field(default=50_000, ge=100, le=1_000_000)
    ingest_linger_ms: float = Field(default=0.0, ge=0, le=1000)
    ingest_max_payload_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    ingest_max_entries: int = Field(default=10_000, ge=1, le=1_000_000)
    ingest_max_metrics: int = Field(default=1_000, ge=1, le=100_000)
    ingest_max_future_s: int = Field(default=300, ge=0)
    ingest_max_past_s: int = Field(default=7 * 86400, ge=0)

    # Time-series retention per tier, in days; the scheduler applies it hourly.
    retention_raw_days: int = Field(default=90, ge=1)
    retention_1m_days: int = Field(default=365, ge=1)
    retention_1h_days: int = Field(default=5 * 365, ge=1)
    offline_sweep_interval_s: float = Field(default=10.0, gt=0, le=3600)

    # Notifications (docs/notifications.md). E-mail goes through this SMTP server;
    # SMS and WhatsApp through Twilio's REST API at twilio_api_base.
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "plantwatch@localhost"
    smtp_starttls: bool = True
    twilio_api_base: str = "https://api.twilio.com"
    notify_max_attempts: int = Field(default=8, ge=1, le=50)
    notify_backoff_base_s: float = Field(default=10.0, gt=0, le=3600)
    notify_backoff_max_s: float = Field(default=3600.0, gt=0, le=86400)
    notify_concurrency: int = Field(default=16, ge=1, le=1000)
    notify_send_timeout_s: float = Field(default=20.0, gt=0, le=300)
    notify_poll_interval_s: float = Field(default=2.0, gt=0, le=60)
    notify_digest_hour: int = Field(default=7, ge=0, le=23)
    notify_templates_dir: Path | None = None

    cors_origins: list[str] = Field(default_factory=list)
    # The web UI's session cookies carry `Secure` (HTTPS only): set it when
    # plantwatch is served over HTTPS, directly or behind a TLS proxy.
    cookie_secure: bool = False
    trusted_proxies: list[str] = Field(default_factory=list)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    demo_password: SecretStr | None = None

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = _config_file()
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'plantwatch.db'}"

    def ensure_data_dir(self) -> Path:
        # 0700: the data dir holds the database (password hashes) and the signing secret.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.data_dir

    def secret(self) -> str:
        """The signing secret: configured, or generated once and stored in the data dir."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        return str(self._stored_secrets()["secret_key"])

    def _stored_secrets(self) -> dict[str, Any]:
        path = self.ensure_data_dir() / SECRETS_FILE
        if path.exists():
            data: dict[str, Any] = json.loads(path.read_text())
            if isinstance(data.get("secret_key"), str) and len(data["secret_key"]) >= 32:
                return data
        data = {"secret_key": secrets.token_urlsafe(48)}
        # Create with 0600 from the start so the key is never world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        return data


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
