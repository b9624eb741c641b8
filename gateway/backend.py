"""The gateway's way to the front: one gRPC channel, an SDK client per call with the caller's key, a stream bound.

Every call goes through the SDK (`rwkv_serve_client.AsyncRWKVClient`): routing, retries with turn ids and the
error table live there and in the front, not here. The caller's `Authorization: Bearer <key>` is handed to the
front unchanged, so HTTP and gRPC callers are the same tenants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from common.errors import Unauthenticated
from gateway.errors import GatewayError
from gateway.settings import GatewaySettings
from rwkv_serve.contract import API_KEY_HEADER
from rwkv_serve_client import AsyncRWKVClient, tls_credentials
from service.auth import Auth, load_key_entries


def api_key_of(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (None when absent or empty)."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    key = (rest if scheme.lower() == "bearer" else authorization).strip()
    return key or None


class Backend:
    """The channel to the front, the tenant resolver of stored responses, and the bound on open streams."""

    def __init__(self, settings: GatewaySettings, store: Any = None) -> None:
        self.settings = settings
        credentials = None
        if settings.front_ca or settings.front_client_cert:
            credentials = tls_credentials(settings.front_ca, settings.front_client_cert, settings.front_client_key)
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
                                          ("grpc.lb_policy_name", settings.front_lb_policy)]
        if settings.front_tls_server_name:
            options.append(("grpc.ssl_target_name_override", settings.front_tls_server_name))
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(settings.front_target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(settings.front_target, credentials, options=options)
        pepper = settings.api_key_pepper.get_secret_value() if settings.api_key_pepper else None
        lookup = store.get_api_key if store is not None and settings.api_keys_in_redis else None
        self.auth = Auth(settings.auth_mode, load_key_entries(settings.api_key_hashes, settings.api_keys_file),
                         pepper=pepper, lookup=lookup, cache_s=settings.api_key_cache_s,
                         default_tenant=settings.default_tenant)
        self.open_streams = 0

    def client(self, api_key: str | None) -> AsyncRWKVClient:
        """An SDK client on the shared channel carrying the caller's key (cheap: a stub and a metadata tuple)."""
        return AsyncRWKVClient(self.settings.front_target, api_key, channel=self.channel,
                               timeout=self.settings.request_timeout_s,
                               max_turn_retries=self.settings.turn_retries)

    async def tenant(self, api_key: str | None) -> str:
        """The caller's tenant as the front resolves it (401 for a missing or unknown key)."""
        try:
            return await self.auth.tenant(((API_KEY_HEADER, f"Bearer {api_key}"),) if api_key else ())
        except Unauthenticated as exc:
            raise GatewayError(401, exc.message, type="authentication_error", code="invalid_api_key") from None

    def acquire(self) -> Callable[[], None]:
        """Takes one of max_concurrent_streams places (429 at once past the bound); returns its release (which
        may be called more than once)."""
        limit = self.settings.max_concurrent_streams
        if limit and self.open_streams >= limit:
            raise GatewayError(429, f"the gateway is serving its limit of {limit} requests at once; retry shortly",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               retry_after_s=self.settings.overload_retry_after_s)
        self.open_streams += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open_streams -= 1

        return release

    async def close(self) -> None:
        await self.channel.close()
