"""Settings: every server URL from the environment, validated with messages
that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import ConfigError, Settings, load_settings, redact_url


@pytest.mark.parametrize(("env", "value", "named"), [
    ("RINGIFLOW_DATABASE_URL", "mysql://x/y", "RINGIFLOW_DATABASE_URL"),
    ("RINGIFLOW_REDIS_URL", "http://x", "RINGIFLOW_REDIS_URL"),
    ("RINGIFLOW_OPENSEARCH_URL", "ftp://x", "RINGIFLOW_OPENSEARCH_URL"),
    ("RINGIFLOW_KAFKA_BOOTSTRAP", "localhost", "RINGIFLOW_KAFKA_BOOTSTRAP"),
])
def test_malformed_urls_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=named):
        load_settings()


def test_urls_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGIFLOW_DATABASE_URL", "postgresql://owner:pw@db:5432/rf")
    monkeypatch.setenv("RINGIFLOW_KAFKA_BOOTSTRAP", "k1:9092,k2:9092")
    settings = load_settings()
    assert settings.database_url == "postgresql://owner:pw@db:5432/rf"
    assert settings.kafka_bootstrap == "k1:9092,k2:9092"
    assert settings.redis_url is None  # unset = embedded


def test_role_urls_swap_the_user_and_keep_host_and_database(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql://owner:pw@db:5432/rf",
                        db_role_password="s3cret")  # type: ignore[arg-type]
    assert settings.role_database_url("query") == "postgresql://ringiflow_query:s3cret@db:5432/rf"
    with pytest.raises(ValueError, match="unknown database role"):
        settings.role_database_url("admin")


def test_a_missing_url_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ringiflow up"):
        Settings(data_dir=tmp_path).require("database_url")


def test_dev_secret_is_stable_per_data_dir(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path).dev_jwt_secret
    assert first == Settings(data_dir=tmp_path).dev_jwt_secret
    assert (tmp_path / "jwt-secret").stat().st_mode & 0o077 == 0
    assert Settings(data_dir=tmp_path / "other").dev_jwt_secret != first


def test_runtime_file_fills_only_unset_urls(tmp_path: Path) -> None:
    (tmp_path / "runtime.json").write_text(
        '{"pid": 1, "urls": {"redis_url": "redis://a:1/0", "database_url": "postgresql://b/c"}}'
    )
    settings = Settings(data_dir=tmp_path, database_url="postgresql://mine/db").with_runtime()
    assert settings.redis_url == "redis://a:1/0"
    assert settings.database_url == "postgresql://mine/db"


def test_passwords_are_redacted_for_display() -> None:
    assert redact_url("postgresql://u:hunter2@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
