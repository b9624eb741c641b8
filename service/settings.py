"""Settings of the front process (env prefix RWKV_FRONT_); built once in main() and passed down."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class FrontSettings(BaseSettings):
    """Everything the front can be told; tests construct it directly."""

    model_config = SettingsConfigDict(env_prefix="RWKV_FRONT_", extra="ignore", env_ignore_empty=True)

    host: str = "0.0.0.0"  # bind address of the public gRPC port
    port: int = 50051  # 0 picks a free port (create_server returns it)
    # The store every worker and front shares; plain REDIS_URL works too (compose, run.sh).
    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           validation_alias=AliasChoices("RWKV_FRONT_REDIS_URL", "REDIS_URL", "redis_url"))
    redis_prefix: str = "rwkv"  # key prefix; must equal the workers' prefix
    # API key -> tenant (JSON in the environment). Empty: no authentication, every caller is default_tenant.
    api_keys: dict[str, str] = Field(default_factory=dict)
    default_tenant: str = "default"
    default_ttl_s: float = 24 * 3600  # a session's idle TTL when CreateSession sets none
    max_ttl_s: float = 30 * 24 * 3600  # longer TTLs are refused: Redis RAM bounds the live sessions
    discovery_interval_s: float = 1.0  # a registry read is reused this long (routing reads it per turn)
    suspect_s: float = 5.0  # a worker that refused a connection is skipped this long, registry or not
    max_attempts: int = 3  # workers tried for one turn before UNAVAILABLE / RESOURCE_EXHAUSTED is returned
    busy_retry_s: float = 1.0  # a turn on a leased session waits this long for the lease before ABORTED
    grace_s: float = 10.0  # on SIGTERM, running turns get this long to finish
    max_message_mb: int = 16  # gRPC message size limit
