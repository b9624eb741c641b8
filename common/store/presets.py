"""Presets: named initial states of a model (e.g. state-tuned files), with their info.

The prefix-state cache built on them is keyed by a digest of the preset's bytes (store/prefixes.py), so replacing
or deleting a preset needs no cache invalidation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from common.errors import InvalidArgument, PresetExists, PresetNotFound
from common.store.base import StoreBase, now_ms, store_errors

# New preset names: short, and safe in a URL, a shell and a Redis SCAN pattern. (Reads take the looser name
# check of the key layout, so presets registered before this check stay usable.)
_PRESET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_preset_name(name: str) -> str:
    """A new preset's name: 1-64 of [A-Za-z0-9_.-], starting with a letter or digit; InvalidArgument otherwise."""
    if not _PRESET_NAME_RE.match(name):
        raise InvalidArgument(f"a preset name is 1-64 of [A-Za-z0-9_.-] starting with a letter or digit, "
                              f"not {name[:80]!r}")
    return name


@dataclass(frozen=True)
class PresetInfo:
    """What the store keeps about a preset beside its state bytes."""

    model: str
    name: str
    description: str = ""
    tokens: int = 0  # tokens the state has consumed (0 for a state-tuned file)
    created_ms: int = 0  # 0: stored before registration times were kept
    state_bytes: int = 0

    def to_json(self) -> str:
        return json.dumps({"description": self.description, "tokens": self.tokens, "created": self.created_ms,
                           "bytes": self.state_bytes}, sort_keys=True)

    @classmethod
    def from_json(cls, model: str, name: str, raw: bytes | None) -> PresetInfo:
        """Parses an info entry; a missing or unreadable one gives the defaults (the state bytes are what count)."""
        try:
            h = json.loads(raw) if raw else {}
            return cls(model, name, str(h.get("description", "")), int(h.get("tokens", 0)),
                       int(h.get("created", 0)), int(h.get("bytes", 0)))
        except (ValueError, TypeError, AttributeError):
            return cls(model, name)


@store_errors
class Presets(StoreBase):
    """Preset state records with their info."""

    async def put_preset(self, model: str, name: str, data: bytes, *, description: str = "", tokens: int = 0,
                         replace: bool = True) -> PresetInfo:
        """Stores a preset's state record (the caller has validated it) and its info.

        replace=False refuses a taken name (PresetExists, atomically: SET NX)."""
        key = self.keys.preset(model, check_preset_name(name))
        info = PresetInfo(model, name, description, tokens, now_ms(), len(data))
        if not await self.redis.set(key, data, nx=not replace):
            raise PresetExists(f"preset {name!r} already exists for model {model!r}")
        # Not one transaction: the two keys may live in different Cluster slots. A reader between the two writes
        # sees the new state with the old (or no) info, which is harmless.
        await self.redis.hset(self.keys.preset_info(model), name, info.to_json())
        return info

    async def get_preset(self, model: str, name: str) -> bytes:
        data = await self.redis.get(self.keys.preset(model, name))
        if data is None:
            raise PresetNotFound(f"no preset {name!r} for model {model!r}")
        return data

    async def has_preset(self, model: str, name: str) -> bool:
        return bool(await self.redis.exists(self.keys.preset(model, name)))

    async def list_presets(self, model: str) -> list[str]:
        """Names of the model's presets, sorted. (A SCAN of the keyspace: the state keys are the truth, also for
        presets stored before the info hash existed.)"""
        prefix = self.keys.preset_scan(model)
        names = [key.decode()[len(prefix):] async for key in self.redis.scan_iter(match=prefix + "*", count=500)]
        return sorted(names)

    async def describe_presets(self, model: str) -> list[PresetInfo]:
        """The model's presets with their info, sorted by name."""
        names = await self.list_presets(model)
        if not names:
            return []
        raws = await self.redis.hmget(self.keys.preset_info(model), names)
        return [PresetInfo.from_json(model, name, raw) for name, raw in zip(names, raws)]

    async def delete_preset(self, model: str, name: str) -> bool:
        """Removes a preset and its info; False when there was none. Sessions that already ran a turn keep their
        own states."""
        removed = bool(await self.redis.delete(self.keys.preset(model, name)))
        await self.redis.hdel(self.keys.preset_info(model), name)
        return removed
