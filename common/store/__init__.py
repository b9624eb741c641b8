"""The Redis store, cut by aggregate; `StateStore` is the facade that call sites use.

- base.py      connection, settings (RedisSettings), key layout (Keys), error translation
- sessions.py  session metadata, the per-tenant index, forks
- turns.py     the turn protocol: lease, begin, compare-and-set commit, release
- presets.py   presets
- prefixes.py  the shared prefix-state cache (states at message boundaries, size-bounded per model)
- registry.py  the worker registry
- tenants.py   API keys and token budgets
"""

from __future__ import annotations

from common.store.base import RedisSettings, StoreConfigError, check_session_id, now_ms
from common.store.connect import redact_url
from common.store.prefixes import PrefixStates
from common.store.presets import PresetInfo, Presets, check_preset_name
from common.store.registry import Registry
from common.store.sessions import SessionMeta, Sessions, new_session_id
from common.store.tenants import Tenants
from common.store.turns import STAGING_TTL_MS, Lease, TurnProtocol


class StateStore(Sessions, TurnProtocol, Presets, PrefixStates, Registry, Tenants):
    """Async access to everything rwkv-serve keeps in Redis (one connection pool; see each aggregate's file)."""


__all__ = [
    "STAGING_TTL_MS", "Lease", "PresetInfo", "RedisSettings", "SessionMeta", "StateStore", "StoreConfigError",
    "check_preset_name", "check_session_id", "new_session_id", "now_ms", "redact_url",
]
