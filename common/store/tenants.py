"""Tenants: API keys (stored by hash, never in the clear) and token budgets per time window."""

from __future__ import annotations

from common.store.base import StoreBase, check_name, store_errors


@store_errors
class Tenants(StoreBase):
    """The tenant of each API key's hash, and the tokens each tenant used per budget window."""

    async def put_api_key(self, key_hash: str, tenant: str) -> None:
        """Maps an API key's hash to its tenant (the key itself is never stored)."""
        await self.redis.set(self.keys.api_key(key_hash), check_name("tenant", tenant))

    async def get_api_key(self, key_hash: str) -> str | None:
        """The tenant of an API key's hash; None when no such key is stored."""
        tenant = await self.redis.get(self.keys.api_key(key_hash))
        return None if tenant is None else tenant.decode()

    async def delete_api_key(self, key_hash: str) -> bool:
        return bool(await self.redis.delete(self.keys.api_key(key_hash)))

    async def list_api_keys(self) -> list[tuple[str, str]]:
        """(hash, tenant) of every stored key."""
        prefix = self.keys.api_key_scan
        hashes = [key.decode()[len(prefix):] async for key in self.redis.scan_iter(match=prefix + "*", count=500)]
        if not hashes:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:  # GETs, not MGET: the keys span Cluster slots
            for h in hashes:
                pipe.get(prefix + h)
            tenants = await pipe.execute()
        return sorted((h, t.decode()) for h, t in zip(hashes, tenants) if t is not None)

    async def add_tokens(self, tenant: str, window: int, tokens: int, ttl_ms: int) -> int:
        """Adds to the tenant's token count of one budget window (the key expires after it); returns the total."""
        key = self.keys.tokens(tenant, window)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.pexpire(key, ttl_ms)
            total, _ = await pipe.execute()
        return int(total)

    async def get_tokens(self, tenant: str, window: int) -> int:
        return int(await self.redis.get(self.keys.tokens(tenant, window)) or 0)
