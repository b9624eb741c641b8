"""Operator commands: `python -m service.admin keys create|list|revoke` (API keys of tenants).

A new key is printed once and only its hash is stored (in Redis, `rwkv:apikey:<hash>`, which every front
reads), or with --no-store printed as a "tenant:hash" entry for the fronts' api_key_hashes setting. The Redis
URL, key prefix and hash pepper come from the front's settings (RWKV_FRONT_*, REDIS_URL), so the hashes match.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.store import StateStore, StoreConfigError
from service.auth import check_tenant, hash_api_key, new_api_key
from service.settings import FrontSettings


def _store(settings: FrontSettings) -> StateStore:
    return settings.open_store()


def _pepper(settings: FrontSettings) -> str | None:
    return settings.api_key_pepper.get_secret_value() if settings.api_key_pepper else None


async def create(settings: FrontSettings, tenant: str, store_it: bool = True) -> tuple[str, str]:
    """A new key for `tenant`: returns (key, hash); stores the hash in Redis unless told not to."""
    check_tenant(tenant)
    key = new_api_key()
    digest = hash_api_key(key, _pepper(settings))
    if store_it:
        store = _store(settings)
        try:
            await store.verify()
            await store.put_api_key(digest, tenant)
        finally:
            await store.close()
    return key, digest


async def revoke(settings: FrontSettings, key_or_hash: str) -> bool:
    """Deletes a stored key given the key itself or its hash; False when no such key is stored."""
    is_hash = len(key_or_hash) == 64 and all(c in "0123456789abcdef" for c in key_or_hash)
    digest = key_or_hash if is_hash else hash_api_key(key_or_hash, _pepper(settings))
    store = _store(settings)
    try:
        await store.verify()
        return await store.delete_api_key(digest)
    finally:
        await store.close()


async def list_keys(settings: FrontSettings) -> list[tuple[str, str]]:
    """(hash, tenant) of the keys stored in Redis."""
    store = _store(settings)
    try:
        await store.verify()
        return await store.list_api_keys()
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`python -m service.admin`)."""
    parser = argparse.ArgumentParser(prog="rwkv-admin", description="rwkv-serve operator commands")
    parser.add_argument("--redis-url", help="Redis URL (default: the front's RWKV_FRONT_REDIS_URL / REDIS_URL)")
    groups = parser.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys of tenants").add_subparsers(dest="command", required=True)
    make = keys.add_parser("create", help="create a key for a tenant; prints it once")
    make.add_argument("--tenant", required=True)
    make.add_argument("--no-store", action="store_true",
                      help="do not write to Redis; print the 'tenant:hash' entry for api_key_hashes instead")
    drop = keys.add_parser("revoke", help="delete a stored key (give the key or its hash)")
    drop.add_argument("key_or_hash")
    keys.add_parser("list", help="stored keys: hash and tenant")
    args = parser.parse_args(argv)
    settings = FrontSettings(**({"redis_url": args.redis_url} if args.redis_url else {}))
    try:
        if args.command == "create":
            try:
                key, digest = asyncio.run(create(settings, args.tenant, store_it=not args.no_store))
            except ValueError as exc:
                parser.error(str(exc))
            print(key)  # stdout: the key alone, so scripts can capture it
            where = "settings entry (api_key_hashes)" if args.no_store else "stored in Redis as hash"
            entry = f"{args.tenant}:{digest}" if args.no_store else digest
            print(f"tenant {args.tenant!r}: {where} {entry}\nthe key is shown only now; keep it secret",
                  file=sys.stderr)
        elif args.command == "revoke":
            if not asyncio.run(revoke(settings, args.key_or_hash)):
                print("no such key is stored", file=sys.stderr)
                return 1
            print("revoked (fronts stop accepting it within their api_key_cache_s)", file=sys.stderr)
        elif args.command == "list":
            for digest, tenant in asyncio.run(list_keys(settings)):
                print(f"{tenant}\t{digest}")
    except StoreConfigError as exc:
        print(f"rwkv-admin: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
