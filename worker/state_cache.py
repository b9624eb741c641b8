"""The worker's local cache of recent session states (used by worker/runner.py): affinity saves the Redis read."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.state import State


class StateCache:
    """A small LRU of recent session states keyed by (session id, version): affinity saves the Redis read."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[int, State, int]] = OrderedDict()  # sid -> (version, state, tokens)
        self._bytes = 0
        self.hits = 0  # lookups answered (read by the metrics)
        self.misses = 0

    def get(self, sid: str, version: int) -> tuple[State, int] | None:
        """The cached state of sid if it is exactly at `version` (any other version is stale and dropped)."""
        entry = self._entries.get(sid)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] != version:
            self.misses += 1
            self.pop(sid)
            return None
        self.hits += 1
        self._entries.move_to_end(sid)
        return entry[1], entry[2]

    def put(self, sid: str, version: int, state: State, tokens_consumed: int) -> None:
        self.pop(sid)
        size = state.nbytes
        if size > self.max_bytes:
            return
        self._entries[sid] = (version, state, tokens_consumed)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, old, _) = self._entries.popitem(last=False)
            self._bytes -= old.nbytes

    def pop(self, sid: str) -> None:
        entry = self._entries.pop(sid, None)
        if entry is not None:
            self._bytes -= entry[1].nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sid: str) -> bool:
        """Whether some version of sid is cached (which one is checked by get())."""
        return sid in self._entries
