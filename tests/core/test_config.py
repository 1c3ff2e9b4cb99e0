"""Settings: PLANTWATCH_* environment variables, the TOML file, the generated secret
and the default database location."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from plantwatch.core.config import SECRETS_FILE, Settings

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (a value under test, nothing binds to it)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No configuration leaks in from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("PLANTWATCH_") and not name.startswith("PLANTWATCH_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def test_defaults_put_everything_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings()
    assert settings.data_dir == tmp_path / "xdg" / "plantwatch"
    assert settings.resolved_database_url == (
        f"sqlite+aiosqlite:///{tmp_path / 'xdg' / 'plantwatch' / 'plantwatch.db'}"
    )
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.secret_key is None
    assert settings.demo_password is None


def test_environment_variables_are_honoured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PLANTWATCH_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("PLANTWATCH_HOST", ALL_INTERFACES)
    monkeypatch.setenv("PLANTWATCH_PORT", "9123")
    monkeypatch.setenv("PLANTWATCH_MQTT_PORT", "18830")
    monkeypatch.setenv("PLANTWATCH_LOG_LEVEL", "debug")
    monkeypatch.setenv("PLANTWATCH_CORS_ORIGINS", '["https://ui.example"]')
    monkeypatch.setenv("PLANTWATCH_ACCESS_TOKEN_TTL_S", "1200")
    monkeypatch.setenv("PLANTWATCH_DEMO_PASSWORD", "demo-secret-1")
    settings = Settings()
    assert settings.data_dir == tmp_path / "d"
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path / 'd'}/plantwatch.db"
    assert (settings.host, settings.port, settings.mqtt_port) == (ALL_INTERFACES, 9123, 18830)
    assert settings.log_level == "debug"
    assert settings.cors_origins == ["https://ui.example"]
    assert settings.access_token_ttl_s == 1200
    assert settings.demo_password is not None
    assert settings.demo_password.get_secret_value() == "demo-secret-1"
    # A secret is never shown in the settings' repr.
    assert "demo-secret-1" not in repr(settings)


def test_explicit_database_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql+asyncpg://plantwatch@db.internal:5432/plantwatch"
    monkeypatch.setenv("PLANTWATCH_DATABASE_URL", url)
    assert Settings().resolved_database_url == url


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PLANTWATCH_PORT", "not-a-port"),
        ("PLANTWATCH_PORT", "70000"),
        ("PLANTWATCH_LOG_LEVEL", "loud"),
        ("PLANTWATCH_ACCESS_TOKEN_TTL_S", "5"),
    ],
)
def test_invalid_environment_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_toml_file_named_by_plantwatch_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "plantwatch.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "from-toml"}"\n'
        "port = 8111\n"
        f'host = "{ALL_INTERFACES}"\n'
        'cors_origins = ["https://a.example", "https://b.example"]\n'
        'log_format = "console"\n'
    )
    monkeypatch.setenv("PLANTWATCH_CONFIG", str(config))
    settings = Settings()
    assert settings.data_dir == tmp_path / "from-toml"
    assert settings.port == 8111
    assert settings.host == ALL_INTERFACES
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.log_format == "console"


def test_environment_overrides_the_toml_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("port = 8111\nmqtt_port = 1884\n")
    monkeypatch.setenv("PLANTWATCH_CONFIG", str(config))
    monkeypatch.setenv("PLANTWATCH_PORT", "8222")
    settings = Settings()
    assert settings.port == 8222
    assert settings.mqtt_port == 1884


def test_toml_file_in_the_data_dir_is_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "plantwatch.toml").write_text("port = 8333\n")
    monkeypatch.setenv("PLANTWATCH_DATA_DIR", str(data_dir))
    assert Settings().port == 8333


def test_unknown_toml_keys_are_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("prot = 8111\n")  # a typo must not be silently ignored
    monkeypatch.setenv("PLANTWATCH_CONFIG", str(config))
    with pytest.raises(ValidationError, match="prot"):
        Settings()


def test_secret_is_generated_once_stored_0600_and_stable(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path / "d")
    secret = first.secret()
    path = tmp_path / "d" / SECRETS_FILE
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 32
    assert json.loads(path.read_text())["secret_key"] == secret
    # Stable across calls and across new Settings objects (i.e. restarts).
    assert first.secret() == secret
    assert Settings(data_dir=tmp_path / "d").secret() == secret
    # Every installation gets its own.
    assert Settings(data_dir=tmp_path / "other").secret() != secret


def test_a_corrupt_secrets_file_is_replaced_not_trusted(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / SECRETS_FILE).write_text(json.dumps({"secret_key": "short"}))
    secret = Settings(data_dir=data_dir).secret()
    assert secret != "short"
    assert len(secret) >= 32
    assert Settings(data_dir=data_dir).secret() == secret


def test_configured_secret_is_used_and_not_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PLANTWATCH_SECRET_KEY", "k" * 40)
    settings = Settings(data_dir=tmp_path / "d")
    assert settings.secret() == "k" * 40
    assert not (tmp_path / "d" / SECRETS_FILE).exists()
    assert "k" * 40 not in repr(settings)


def test_data_dir_expands_the_home_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PLANTWATCH_DATA_DIR", "~/pw")
    assert Settings().data_dir == tmp_path / "home" / "pw"
