"""API key -> tenant. Every session belongs to the tenant that created it; other tenants cannot touch it.

Keys are stored only as hashes: HMAC-SHA256 under a server pepper when one is configured, else plain SHA-256.
A fast hash is enough here because the keys are random with 256 bits of entropy (`new_api_key`): nobody can
search that space, so the slow KDFs made for human passwords (scrypt, argon2) would only add milliseconds to
every call. The pepper (kept out of Redis) makes a leaked Redis dump useless for offline checks of candidate
keys. Lookups go by the hash of the presented key: timing could at most tell how that hash (of a key the caller
chose) compares with stored hashes, which is useless without a SHA-256 preimage, so a dictionary lookup is as
safe here as a constant-time comparison over every stored hash.

Hashes come from the settings (`tenant:hex` entries or a keys file) and from Redis (`rwkv:apikey:<hash>`,
written by `python -m service.admin keys create`); Redis answers are cached for `cache_s` seconds, so a
revoked key stops working within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from common.errors import Unauthenticated
from rwkv_serve.contract import API_KEY_HEADERS  # "authorization: Bearer <key>" or "x-api-key: <key>"

log = logging.getLogger(__name__)

KEY_PREFIX = "rwkv_"  # makes a leaked key recognisable to secret scanners
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_ENTRY_RE = re.compile(r"^([A-Za-z0-9_.@-]{1,64}):([0-9a-f]{64})$")
_MAX_KEY_CHARS = 256  # longer "keys" are refused unhashed
_CACHE_ENTRIES = 10_000  # bounds the Redis lookup cache (a flood of random keys must not grow it forever)


def new_api_key() -> str:
    """A fresh key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str, pepper: str | None = None) -> str:
    """The stored form of a key: hex HMAC-SHA256 under the pepper, or hex SHA-256 without one."""
    if pepper:
        return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"a tenant name is 1-64 of [A-Za-z0-9_.@-], not {tenant!r}")
    return tenant


def parse_key_entries(entries: Iterable[str], source: str = "settings") -> dict[str, str]:
    """{hash: tenant} from "tenant:sha256hex" entries (blank lines and '#' comments skipped)."""
    hashes: dict[str, str] = {}
    for n, raw in enumerate(entries, 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        match = _ENTRY_RE.match(entry)
        if match is None:  # never echo the entry: it might be a plaintext key pasted by mistake
            raise ValueError(f"{source}, entry {n}: expected 'tenant:<64 lowercase hex digits>'")
        hashes[match.group(2)] = match.group(1)
    return hashes


def load_key_entries(entries: Sequence[str], path: Path | None) -> dict[str, str]:
    """The configured {hash: tenant}: the settings' entries plus those of the keys file."""
    hashes = parse_key_entries(entries)
    if path is not None:
        hashes.update(parse_key_entries(Path(path).read_text().splitlines(), f"keys file {path}"))
    return hashes


class Auth:
    """Resolves a call's tenant from its metadata.

    mode "keys": a call needs a known API key (UNAUTHENTICATED otherwise). mode "dev": no authentication at all,
    every caller is `default_tenant` (the one-machine stack); the front says so loudly at start."""

    def __init__(self, mode: str = "keys", hashes: dict[str, str] | None = None, *, pepper: str | None = None,
                 lookup: Callable[[str], Awaitable[str | None]] | None = None, cache_s: float = 5.0,
                 default_tenant: str = "default", clock: Callable[[], float] = time.monotonic) -> None:
        """`hashes` maps key hashes to tenants; `lookup` asks the store for a hash it does not know."""
        if mode not in ("keys", "dev"):
            raise ValueError(f"auth mode must be 'keys' or 'dev', not {mode!r}")
        self.mode = mode
        self._hashes = dict(hashes or {})
        self._pepper = pepper
        self._lookup = lookup
        self._cache_s = cache_s
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._clock = clock
        self.default_tenant = default_tenant

    @property
    def enabled(self) -> bool:
        return self.mode == "keys"

    def describe(self) -> str:
        """One line for the start-up log (counts only, never a key or hash)."""
        if not self.enabled:
            return (f"authentication OFF (auth_mode=dev): every caller is tenant {self.default_tenant!r}; "
                    "do not expose this port")
        where = f"{len(self._hashes)} configured key(s)" + (" + keys stored in Redis" if self._lookup else "")
        return f"authentication by API key ({where}; {'HMAC-SHA256 with pepper' if self._pepper else 'SHA-256'})"

    async def tenant(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant; Unauthenticated for a missing or unknown key."""
        if not self.enabled:
            return self.default_tenant
        key = _key_from(metadata)
        if not key:
            raise Unauthenticated("missing API key (metadata 'authorization: Bearer <key>')")
        if len(key) > _MAX_KEY_CHARS:
            raise Unauthenticated("unknown API key")
        digest = hash_api_key(key, self._pepper)
        tenant = self._hashes.get(digest)
        if tenant is None and self._lookup is not None:
            tenant = await self._stored(digest)
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant

    async def _stored(self, digest: str) -> str | None:
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        assert self._lookup is not None
        tenant = await self._lookup(digest)
        if len(self._cache) >= _CACHE_ENTRIES:
            self._cache.clear()
        self._cache[digest] = (tenant, now + self._cache_s)
        return tenant


def _key_from(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for name, value in metadata or ():
        if name.lower() in API_KEY_HEADERS and isinstance(value, str):
            scheme, _, rest = value.strip().partition(" ")
            return (rest if scheme.lower() == "bearer" else value).strip()
    return None
