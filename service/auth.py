"""API key -> tenant. Every session belongs to the tenant that created it; other tenants cannot touch it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from worker.errors import Unauthenticated

API_KEY_HEADERS = ("authorization", "x-api-key")  # "authorization: Bearer <key>" or "x-api-key: <key>"


class Auth:
    """Resolves a call's tenant from its metadata; with no keys configured everyone is the default tenant."""

    def __init__(self, api_keys: Mapping[str, str], default_tenant: str = "default") -> None:
        self._tenants = dict(api_keys)
        self.default_tenant = default_tenant

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        if not self._tenants:
            return self.default_tenant
        key = None
        for name, value in metadata or ():
            if name.lower() in API_KEY_HEADERS and isinstance(value, str):
                key = value.removeprefix("Bearer ").removeprefix("bearer ").strip()
                break
        if not key:
            raise Unauthenticated("missing API key (metadata 'authorization: Bearer <key>')")
        tenant = self._tenants.get(key)
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant
