"""One settings object for every process. Each server URL comes from the
environment (RINGIFLOW_*); a URL left unset means "start the embedded one"."""

from __future__ import annotations

import json
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RUNTIME_FILE = "runtime.json"
ROLES = ("command", "relay", "projector", "query")
# Generated once per data dir, 0600: the embedded PostgreSQL's superuser password
# (scram-sha-256) and the password of its least-privilege login roles.
PG_PASSWORD_FILE = "postgres-password"
PG_ROLE_PASSWORD_FILE = "postgres-role-password"
JWT_SECRET_FILE = "jwt-secret"


class ConfigError(ValueError):
    """A setting is wrong; the message names the setting and what to do."""


def _default_data_dir() -> Path:
    return Path.home() / ".ringiflow"


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringiflow"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RINGIFLOW_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)

    # External servers. Unset = embedded server started by `ringiflow up`.
    database_url: str | None = None  # owner role: migrations and operator commands
    redis_url: str | None = None
    kafka_bootstrap: str | None = None
    opensearch_url: str | None = None
    # Password of the least-privilege login roles on an external server.
    db_role_password: SecretStr | None = None

    # Embedded server ports; 0 picks a free port.
    postgres_port: int = Field(default=0, ge=0, le=65535)
    redis_port: int = Field(default=0, ge=0, le=65535)
    kafka_port: int = Field(default=0, ge=0, le=65535)
    opensearch_port: int = Field(default=0, ge=0, le=65535)
    smtp_port: int = Field(default=0, ge=0, le=65535)  # the embedded mail catcher
    # Durability costs latency; tests turn it off, `up` keeps it on.
    postgres_fsync: bool = True
    # Which embedded broker and search server `up` runs: the real ones need a JVM
    # (auto picks them when one is installed), the stand-ins are in-memory wheels.
    embedded_kafka: Literal["auto", "apache", "tansu"] = "auto"
    embedded_opensearch: Literal["auto", "opensearch", "osmem"] = "auto"
    embedded_opensearch_version: Literal["auto", "3.8.0", "2.19.6"] = "auto"
    java_home: Path | None = None  # the JVM for the embedded servers; unset = search
    # The embedded servers' jars, fetched from Maven Central once and shared by data dirs.
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    maven_settings: Path | None = None  # a settings.xml, e.g. with a mirror
    kafka_cluster_id: str | None = None  # the embedded Kafka's storage must carry this id

    command_api_host: str = "127.0.0.1"
    command_api_port: int = Field(default=8000, ge=0, le=65535)
    query_api_host: str = "127.0.0.1"
    query_api_port: int = Field(default=8001, ge=0, le=65535)
    relay_host: str = "127.0.0.1"
    relay_port: int = Field(default=8002, ge=0, le=65535)
    workers_host: str = "127.0.0.1"
    workers_port: int = Field(default=8003, ge=0, le=65535)
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8004, ge=0, le=65535)

    command_db_pool_size: int = Field(default=20, ge=1, le=200)
    # Commands each command API process lets wait for a connection; one more is
    # answered 503 overloaded at once, nothing written (0: no bound, all wait up to 10 s).
    command_db_max_waiting: int = Field(default=64, ge=0, le=100_000)
    # Aggregates each command API process keeps after writing them (ADR 0013); 0: none.
    command_state_cache: int = Field(default=10_000, ge=0, le=1_000_000)
    # Most concurrent commands' appends one transaction holds (ADR 0018); 1: each its own.
    command_group_commit: int = Field(default=32, ge=1, le=60)
    # Each API runs as this many processes on its one port (a Python process uses one core).
    command_api_processes: int = Field(default=2, ge=1, le=64)
    query_api_processes: int = Field(default=2, ge=1, le=64)

    relay_batch_size: int = Field(default=2000, ge=1, le=100_000)
    relay_poll_interval_s: float = Field(default=1.0, gt=0)  # fallback when NOTIFY is missed
    relay_rebalance_interval_s: float = Field(default=1.0, gt=0)
    relay_message_timeout_ms: int = Field(default=10_000, ge=1000)
    relay_max_attempts: int = Field(default=5, ge=1)  # permanent errors before "failed"
    relay_backoff_s: float = Field(default=0.5, gt=0)
    relay_max_backoff_s: float = Field(default=30.0, gt=0)
    relay_stats_interval_s: float = Field(default=5.0, gt=0)
    # How often a relay compares the broker's partition ends with what it has
    # published (besides after every error): a broker that lost history is
    # re-filled in order before anything new goes out (ADR 0003).
    relay_history_check_interval_s: float = Field(default=5.0, gt=0)
    outbox_retention_days: float = Field(default=7.0, gt=0)

    # Stream processors.
    worker_batch_size: int = Field(default=500, ge=1, le=50_000)
    # How long a fetch may wait at the broker for data; None: 100 ms on Tansu (it holds
    # each fetch this long), 500 ms on Kafka (it answers when data arrives).
    worker_fetch_max_wait_ms: int | None = Field(default=None, ge=1, le=10_000)
    worker_retry_attempts: int = Field(default=5, ge=1)
    parked_aggregates_cap: int = Field(default=1000, ge=1)
    # How long a worker trusts its kept parked set with no change heard (ADR 0019):
    # the bound on staleness should a NOTIFY be lost without the LISTEN failing.
    worker_parked_keep_s: float = Field(default=5.0, gt=0, le=3600)
    stall_after_s: float = Field(default=60.0, gt=0)  # lag > 0 and no progress this long
    # How long a worker that died without leaving its group keeps its partitions.
    worker_session_timeout_s: float = Field(default=10.0, ge=6, le=300)
    replay_notifications: bool = False  # send notifications for replayed events too

    # Notification delivery. Unset smtp_url: `ringiflow up` starts an embedded mail
    # catcher (kept in the data dir); smtp://user:password@host:587?starttls=true else.
    smtp_url: str | None = None
    smtp_sender: str = "RingiFlow <ringiflow@localhost>"
    notification_attempts: int = Field(default=5, ge=1)  # per channel, transient failures
    notification_timeout_s: float = Field(default=10.0, gt=0)
    notification_rate_per_minute: float = Field(default=30.0, gt=0)  # per recipient
    notification_burst: float = Field(default=10.0, ge=1)
    # The completion saga's external sync, per tenant: JSON {"<tenant id>": {"url": ...,
    # "secret": ...}}; a tenant without one has the sync step recorded as skipped.
    completion_webhooks: dict[str, dict[str, str]] = Field(default_factory=dict)
    saga_step_attempts: int = Field(default=5, ge=1)  # transient failures per step
    saga_step_timeout_s: float = Field(default=10.0, gt=0)

    ws_heartbeat_s: float = Field(default=15.0, gt=0)
    # Fair shares of one query-API process: a flood from one user or tenant is
    # refused (WebSocket close 1013, HTTP 429) before it can starve the others.
    ws_max_per_user: int = Field(default=16, ge=1)
    ws_max_per_tenant: int = Field(default=1000, ge=1)
    ws_max_total: int = Field(default=10_000, ge=1)
    consistency_waits_per_user: int = Field(default=16, ge=1)
    consistency_waits_per_tenant: int = Field(default=200, ge=1)
    # Request bodies: bigger ones get 413 before they are read; deeper JSON 422.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_json_depth: int = Field(default=32, ge=4, le=512)
    search_alias: str = "ringiflow-workflows"  # queries and the indexer use the alias only
    # The least time between the starts of two of the search indexer's refreshes, besides
    # its own spacing (a refresh waits as long as the last one took; ADR 0008).
    search_refresh_interval_ms: int = Field(default=0, ge=0, le=5_000)

    jwt_secret: SecretStr | None = None  # HS256 dev secret; generated per data dir if unset
    jwt_jwks_url: str | None = None  # RS256 tokens are verified against this key set
    jwt_audience: str | None = "ringiflow"
    jwt_issuer: str | None = "ringiflow"
    # Service credentials: JSON list of {"sha256", "tenant_id", "service", "roles"}.
    api_keys: list[dict[str, object]] = Field(default_factory=list)
    startup_timeout_s: float = Field(default=60.0, gt=0)
    log_level: str = "INFO"

    @field_validator("embedded_kafka", "embedded_opensearch", "embedded_opensearch_version",
                     mode="before")
    @classmethod
    def _choice(cls, value: object, info: ValidationInfo) -> object:
        allowed = {"embedded_kafka": ("auto", "apache", "tansu"),
                   "embedded_opensearch": ("auto", "opensearch", "osmem"),
                   "embedded_opensearch_version": ("auto", "3.8.0", "2.19.6")}[info.field_name]
        if isinstance(value, str) and value.strip().lower() in allowed:
            return value.strip().lower()
        raise ValueError(f"RINGIFLOW_{info.field_name.upper()}={value!r} is not one of "
                         f"{', '.join(allowed)}")

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
            raise ValueError(
                "RINGIFLOW_DATABASE_URL must look like postgresql://user:pass@host:5432/db"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("RINGIFLOW_REDIS_URL must look like redis://host:6379/0")
        return value

    @field_validator("opensearch_url")
    @classmethod
    def _http_scheme(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("RINGIFLOW_OPENSEARCH_URL must look like http://host:9200")
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_scheme(cls, value: str | None) -> str | None:
        if value and (urlsplit(value).scheme not in ("smtp", "smtps") or
                      not urlsplit(value).hostname):
            raise ValueError("RINGIFLOW_SMTP_URL must look like smtp://user:pass@host:587"
                             "?starttls=true")
        return value

    @field_validator("completion_webhooks")
    @classmethod
    def _webhooks(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for tenant, hook in value.items():
            if not {"url", "secret"} <= set(hook) or not hook["url"].startswith(("http://",
                                                                              "https://")):
                raise ValueError(f"RINGIFLOW_COMPLETION_WEBHOOKS[{tenant!r}] needs an http(s) "
                                 "`url` and a `secret` (the HMAC-SHA256 key)")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str | None) -> str | None:
        if value and any(":" not in part for part in value.split(",")):
            raise ValueError("RINGIFLOW_KAFKA_BOOTSTRAP must look like host:9092[,host2:9092]")
        return value

    # --- derived ------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @cached_property
    def dev_jwt_secret(self) -> str:
        """The HS256 secret: from the environment, or one generated once per data
        dir so `ringiflow token` mints tokens the running system accepts."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        return secret_file(self.data_path / JWT_SECRET_FILE)

    @property
    def role_password(self) -> str | None:
        """RINGIFLOW_DB_ROLE_PASSWORD; else, when the database is this data dir's
        embedded PostgreSQL (the owner URL carries its superuser password), the
        login roles' password generated in the data dir."""
        if self.db_role_password:
            return self.db_role_password.get_secret_value()
        return embedded_role_password(self.data_path, self.database_url)

    def require(self, name: str) -> str:
        value = getattr(self, name)
        if not value:
            raise ConfigError(
                f"RINGIFLOW_{name.upper()} is not set and no running `ringiflow up` was found "
                f"in {self.data_path}; start the system with `ringiflow up` or set it"
            )
        return value

    def role_database_url(self, role: str) -> str:
        """Connection URL for one of the least-privilege roles (each component writes
        only its own tables)."""
        if role not in ROLES:
            raise ValueError(f"unknown database role {role!r}; expected one of {ROLES}")
        parts = urlsplit(self.require("database_url"))
        password = self.role_password
        userinfo = f"ringiflow_{role}" + (f":{quote(password, safe='')}" if password else "")
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, ""))

    def with_runtime(self) -> Settings:
        """Fill unset server URLs from the runtime file a running `up` wrote."""
        runtime = read_runtime(self.data_path)
        if not runtime:
            return self
        urls = runtime.get("urls", {})
        update = {k: urls[k] for k in urls if getattr(self, k, None) is None}
        return self.model_copy(update=update) if update else self


def write_private(path: Path, text: str) -> None:
    """Write `path` readable by its owner only, whatever the umask or its old mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)
        out.write(text)


def secret_file(path: Path, create: bool = True) -> str | None:
    """A secret kept in a file only its owner can read: read it, or (when `create`)
    generate it once. None when it does not exist and is not to be made."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_private(tmp, secrets.token_urlsafe(48) + "\n")
    try:
        os.link(tmp, path)  # never replaces a secret another process just made
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def embedded_role_password(data_path: Path, database_url: str | None) -> str | None:
    """The login roles' password when `database_url` is the embedded PostgreSQL
    of `data_path` (it carries the password generated there), else None."""
    if not database_url:
        return None
    superuser = secret_file(data_path / PG_PASSWORD_FILE, create=False)
    given = urlsplit(database_url).password
    if superuser is None or given is None or unquote(given) != superuser:
        return None
    return secret_file(data_path / PG_ROLE_PASSWORD_FILE)


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return f"postgresql+{driver}://{rest}"
    raise ConfigError(f"not a PostgreSQL URL: {url}")


def libpq_url(url: str) -> str:
    """psycopg wants plain postgresql:// URLs."""
    return "postgresql://" + url.split("://", 1)[1]


def redact_url(url: str) -> str:
    """A URL safe to print: the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def read_runtime(data_path: Path) -> dict | None:
    try:
        return json.loads((data_path / RUNTIME_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
