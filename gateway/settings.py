"""Settings of the gateway process (env prefix RWKV_GATEWAY_); built once in main() and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from common.store import RedisSettings


class GatewaySettings(RedisSettings):
    """Everything the gateway can be told; tests construct it directly."""

    model_config = SettingsConfigDict(env_prefix="RWKV_GATEWAY_", extra="ignore", env_ignore_empty=True)

    host: str = "0.0.0.0"  # HTTP bind address
    port: int = Field(8000, ge=0)  # 0 picks a free port (tests)
    # HTTPS on the listening port (PEM files); both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # The gRPC front every call goes to (through the SDK); TLS to it when front_ca is set (a client certificate
    # adds mTLS, for fronts started with tls_client_ca).
    front_target: str = "127.0.0.1:50051"
    front_ca: Path | None = None
    front_client_cert: Path | None = None
    front_client_key: Path | None = None
    front_tls_server_name: str = ""  # the name in the front's certificate when it differs from front_target's host
    # How the channel spreads calls over the addresses front_target resolves to: "round_robin" with a
    # dns:///<headless service>:50051 target balances calls over every front pod (a ClusterIP is one address).
    front_lb_policy: Literal["pick_first", "round_robin"] = "pick_first"
    # Retries of one turn by the SDK with the same turn id (a worker lost, UNAVAILABLE, overload with a hint);
    # 0 passes every such failure straight to the HTTP client (the openai SDKs retry 429/5xx themselves).
    turn_retries: int = Field(1, ge=0)

    # Redis: the stored responses (rwkv:resp:...) and API keys stored by `rwkv-admin keys create`.
    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           validation_alias=AliasChoices("RWKV_GATEWAY_REDIS_URL", "REDIS_URL", "redis_url"))

    # Who the caller is, resolved as the front resolves it (service.auth.Auth), so that stored responses are
    # scoped by the same tenants as sessions. Give it the front's own values: the front checks every call too,
    # this only scopes what the gateway itself stores. "dev": every caller is default_tenant.
    auth_mode: Literal["keys", "dev"] = "keys"
    api_key_hashes: list[str] = Field(default_factory=list)  # "tenant:sha256hex" entries (a JSON list in the env)
    api_keys_file: Path | None = None
    api_key_pepper: SecretStr | None = None
    api_keys_in_redis: bool = True
    api_key_cache_s: float = Field(5.0, ge=0)
    default_tenant: str = "default"

    # Limits (400 past them, before anything reaches the front).
    max_body_bytes: int = Field(1024 * 1024, ge=1)  # a request body; 413 past it
    max_messages: int = Field(256, ge=1)  # messages of a chat completion / input items of a response
    max_n: int = Field(8, ge=1)  # choices of one request
    max_stop: int = Field(4, ge=0)  # stop sequences (OpenAI's own limit)
    max_tokens_cap: int = Field(4096, ge=1)  # max_tokens / max_completion_tokens / max_output_tokens above it: 400
    request_timeout_s: float = Field(300.0, gt=0)  # a whole request (all its choices); 504 past it
    max_concurrent_streams: int = Field(1024, ge=0)  # open requests to the front at once; 429 past it (0 = off)
    overload_retry_after_s: float = Field(1.0, ge=0)  # Retry-After of the gateway's own 429s

    # The Responses API: each stored response keeps its conversation's state at that version.
    responses_ttl_s: float = Field(7 * 24 * 3600, gt=0)  # a response (and its session) lives this long idle
    # Earlier state versions kept per conversation besides the latest (CreateSession.keep_versions): a branch
    # from a response up to this many turns back works; older ones answer 404 (state evicted). Each costs one
    # state in Redis (41 MiB at 12B).
    responses_keep_versions: int = Field(4, ge=0)

    grace_s: float = Field(30.0, ge=0)  # on SIGTERM, requests in flight get this long to finish
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _check_tls(self) -> GatewaySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("HTTPS needs both tls_cert and tls_key")
        if (self.front_client_cert is None) != (self.front_client_key is None):
            raise ValueError("a client certificate to the front needs front_client_cert and front_client_key")
        return self
