"""Settings of the front process (env prefix RWKV_FRONT_); built once in main() and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from common.store import RedisSettings
from common.telemetry import ObservabilitySettings


class TenantLimits(BaseModel):
    """One tenant's limits; None: the front-wide default (tenant_max_*), 0: unlimited."""

    max_sessions: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)


class FrontSettings(ObservabilitySettings, RedisSettings):
    """Everything the front can be told; tests construct it directly."""

    model_config = SettingsConfigDict(env_prefix="RWKV_FRONT_", extra="ignore", env_ignore_empty=True)

    host: str = "0.0.0.0"  # bind address of the public gRPC port
    port: int = 50051  # 0 picks a free port (create_server returns it)
    # The store every worker and front shares (connection fields: RedisSettings); plain REDIS_URL works too.
    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           validation_alias=AliasChoices("RWKV_FRONT_REDIS_URL", "REDIS_URL", "redis_url"))

    # Authentication. "keys": every call needs an API key whose hash is configured here (api_key_hashes,
    # api_keys_file) or stored in Redis (`python -m service.admin keys create --tenant T`). "dev": none at all,
    # every caller is default_tenant (the one-machine stack; the front logs a warning at start).
    auth_mode: Literal["keys", "dev"] = "keys"
    api_key_hashes: list[str] = Field(default_factory=list)  # "tenant:sha256hex" entries (a JSON list in the env)
    api_keys_file: Path | None = None  # one "tenant:sha256hex" entry per line, '#' comments
    api_key_pepper: SecretStr | None = None  # HMAC key of the hashes (give the admin CLI the same); None: SHA-256
    api_keys_in_redis: bool = True  # also accept keys stored in Redis (rwkv:apikey:<hash>)
    api_key_cache_s: float = Field(5.0, ge=0)  # Redis answers reused this long: a revoked key dies within it
    default_tenant: str = "default"
    # Tenants that may register and delete presets (RegisterPreset, DeletePreset): a preset is shared by every
    # tenant of its model. Everyone may in auth_mode dev; nobody else is allowed by default.
    preset_admin_tenants: list[str] = Field(default_factory=list)

    # Per-tenant limits, enforced by the front (0 = unlimited); tenant_limits overrides them per tenant.
    tenant_max_sessions: int = Field(0, ge=0)  # live sessions; CreateSession/ForkSession past it: RESOURCE_EXHAUSTED
    tenant_max_tokens: int = Field(0, ge=0)  # prompt + generated tokens per window; turns past it are refused
    tenant_token_window_s: float = Field(3600.0, gt=0)
    tenant_limits: dict[str, TenantLimits] = Field(default_factory=dict)  # JSON {"t": {"max_sessions": 5}}

    # TLS on the public port (PEM files). tls_client_ca also requires client certificates signed by that CA.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # To the workers: TLS when worker_ca (the CA of the workers' certificates) is set; a client certificate adds
    # mTLS, for workers started with tls_client_ca. worker_tls_server_name: the name their certificates carry
    # when it differs from the registered address (e.g. one certificate for every worker).
    worker_ca: Path | None = None
    worker_client_cert: Path | None = None
    worker_client_key: Path | None = None
    worker_tls_server_name: str = ""
    default_ttl_s: float = 24 * 3600  # a session's idle TTL when CreateSession sets none
    max_ttl_s: float = 30 * 24 * 3600  # longer TTLs are refused: Redis RAM bounds the live sessions
    discovery_interval_s: float = 1.0  # a registry read is reused this long (routing reads it per turn)
    suspect_s: float = 5.0  # a worker that refused a connection is skipped this long, registry or not
    max_attempts: int = 3  # workers tried for one turn before UNAVAILABLE / RESOURCE_EXHAUSTED is returned
    # A turn on a session whose lease is held is ABORTED at once; only the turn a Chat stream sends right after
    # cancelling one on the same session waits this long for that lease (it goes within one engine step).
    busy_retry_s: float = 1.0
    grace_s: float = 10.0  # on SIGTERM, running turns get this long to finish
    max_message_mb: int = 16  # gRPC message size limit
    # The largest RegisterPreset upload (the 12B model's state is 41 MiB). The port's message limit is the larger
    # of this (+1 MiB for the request's other fields) and max_message_mb; other calls' fields have limits of
    # their own (max_text_bytes, metadata_*). Workers need RWKV_WORKER_MAX_PRESET_MB at least as large.
    max_preset_mb: int = Field(64, ge=1)

    # Overload: bounded everywhere, refused at once with RESOURCE_EXHAUSTED + retry-after-ms, never queued.
    max_inflight_turns: int = Field(1024, ge=0)  # turns this front relays at once (0 = unbounded)
    max_inflight_per_worker: int = Field(0, ge=0)  # 0 = the worker's own batch + queue size (its registry record)
    max_stream_queue: int = Field(16, ge=1)  # turns waiting on one Chat stream behind its running turn
    overload_retry_after_s: float = Field(0.5, ge=0)  # the hint sent with the front's own refusals
    max_concurrent_rpcs: int = Field(10_000, ge=0)  # open calls (idle Chat streams too); past it gRPC refuses (0 = off)

    # Bad input: limits checked before anything is stored or routed (INVALID_ARGUMENT past them). Text is
    # measured in UTF-8 bytes here; the worker checks the exact token count (RWKV_WORKER_MAX_PROMPT_TOKENS).
    max_text_bytes: int = Field(256 * 1024, ge=1)  # a turn's text, a prompt, a system prompt, a Tokenize text
    metadata_max_entries: int = Field(64, ge=0)
    metadata_max_key_bytes: int = Field(128, ge=1)
    metadata_max_value_bytes: int = Field(1024, ge=0)
    max_messages: int = Field(256, ge=1)  # messages in one turn (ChatTurn / GenerateRequest messages)
    max_choices: int = Field(16, ge=1)  # GenerateRequest.n (workers have their own RWKV_WORKER_MAX_CHOICES)
    # Earlier state versions a session may keep for ForkSession.state_version (CreateSessionRequest.keep_versions):
    # each costs one state's bytes in Redis (41 MiB at 12B).
    max_keep_versions: int = Field(16, ge=0)
