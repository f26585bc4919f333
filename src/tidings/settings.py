"""Settings from one place: TIDINGS_* environment variables, then an optional TOML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tidings.errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./tidings.db"


class Settings(BaseSettings):
    """Everything an operator can set. Read when the service starts, never at import."""

    model_config = SettingsConfigDict(env_prefix="TIDINGS_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str | None = None
    # Queue names start with this, so several Tidings can share one RabbitMQ vhost.
    broker_prefix: str = Field(default="tidings", pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    auth_required: bool = True
    admin_key_file: str = "./tidings-admin.key"
    allow_private_networks: bool = False
    allowed_ports: list[int] | None = None

    max_payload_bytes: int = Field(default=256 * 1024, ge=1)
    response_excerpt_bytes: int = Field(default=1024, ge=0, le=64 * 1024)
    default_timeout_s: float = Field(default=10.0, gt=0, le=300)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    default_retry_schedule: str = "default"
    default_window: str = "24h"
    jitter: float = Field(default=0.1, ge=0, lt=1)

    lease_s: float = Field(default=60.0, gt=0)
    claim_batch: int = Field(default=200, ge=1, le=10_000)
    max_in_flight: int = Field(default=256, ge=1)
    endpoint_concurrency: int = Field(default=16, ge=1)
    poll_interval_s: float = Field(default=0.25, gt=0)
    # With a broker URL the broker brings the news; the store is still polled this often
    # for deliveries whose message was lost.
    store_poll_interval_s: float = Field(default=2.0, gt=0)
    max_crashes: int = Field(default=3, ge=1)
    # For the crash tests only: kill the dispatcher at a point ("after_claim",
    # "before_record", optionally ":<topic>"). Never set it in production.
    fault_injection: str | None = None
    breaker_threshold: int = Field(default=20, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    breaker_max_cooldown_s: float = Field(default=600.0, gt=0)
    disable_after_s: float = Field(default=5 * 86400.0, gt=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Final notifications are purged this long after they settled (see tidings.retention).
    retention_delivered_s: float = Field(default=30 * 86400.0, gt=0)
    retention_exhausted_s: float = Field(default=90 * 86400.0, gt=0)
    purge_interval_s: float = Field(default=600.0, gt=0)
    # Notifications per purge transaction: small, so the dispatcher's writes are not held up.
    purge_batch: int = Field(default=500, ge=1, le=10_000)

    @field_validator("allowed_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(part) for part in value.replace(" ", "").split(",") if part]
        return value

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
        config_file = os.environ.get("TIDINGS_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def check(self) -> None:
        """Refuse combinations that cannot work, with the setting to change."""
        from tidings.stores.engine import check_url

        if not self.database_url.startswith("memory:"):
            check_url(self.database_url)
        if not self.auth_required and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigurationError(
                f"TIDINGS_AUTH_REQUIRED=false is allowed only when listening on 127.0.0.1; "
                f"TIDINGS_HOST is {self.host!r}. Keep authentication on, or bind to loopback"
            )
        longest_attempt_s = self.default_timeout_s + self.connect_timeout_s
        if self.lease_s <= longest_attempt_s:
            raise ConfigurationError(
                f"TIDINGS_LEASE_S={self.lease_s:g} must be longer than one attempt can take "
                f"({longest_attempt_s:g}s = TIDINGS_DEFAULT_TIMEOUT_S + "
                "TIDINGS_CONNECT_TIMEOUT_S); raise the lease or lower the timeouts"
            )
