"""The shared prefix-state cache on a worker: a prompt's segments (its messages, or a new session's opening) are
prefilled one engine turn each, and the state at each boundary is stored in Redis under a digest of everything
that built it, so any worker resumes a resent conversation from its longest cached boundary.

The cache changes no output. Cold or warm, the same segments are prefilled from the same states: each boundary's
state is rounded to the storage dtype (StateSource.encode, in place) before the next segment is fed onto it, also
when nothing is stored, so a state loaded from the cache equals the one a cold run holds at that point. Only
states made by prefilling the prompt's own tokens are stored; never a state that decoded generated tokens (its
tokens need not be those of the reply's text re-tokenized).

Digests are chained: d0 = H(version, model fingerprint, storage dtype, preset digest), d_i = H(d_{i-1}, tokens of
segment i). Entries that do not decode (damaged, another model's) or whose token count disagrees are ignored and
rebuilt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import ServeError, StateCorrupt
from common.store import StateStore
from worker.engine import Finished
from worker.state import State

if TYPE_CHECKING:
    from worker.session_state import StateSource

log = logging.getLogger(__name__)

_CHAIN_VERSION = b"rwkv-prefix/2"

Prefill = Callable[[list[int], State | None, int], Awaitable[Finished]]


@dataclass(frozen=True)
class Built:
    """The state after a prompt's segments, and how much of it the cache supplied."""

    state: State | None
    consumed: int  # tokens the state has consumed in total
    prefilled: int  # tokens of the segments (cached or not)
    cached: int  # of those, covered by the cached state that was loaded


class PrefixCache:
    """Content-addressed states at segment boundaries, in the store, shared by every worker of a model."""

    def __init__(self, store: StateStore, source: StateSource, prefill: Prefill, *, model_id: str,
                 ttl_ms: int, max_bytes: int, enabled: bool = True) -> None:
        self.store, self.source, self._prefill = store, source, prefill
        self.model_id, self.ttl_ms, self.max_bytes = model_id, ttl_ms, max_bytes
        self.enabled = enabled and max_bytes > 0
        self._writes: set[asyncio.Task[None]] = set()
        self.hits = self.misses = 0

    def chain(self, segments: Sequence[Sequence[int]], preset_digest: bytes = b"") -> list[str]:
        """The digest of each boundary (after segment i), hex."""
        source = self.source
        head = hashlib.sha256(b"\0".join((_CHAIN_VERSION, source.model.fingerprint,
                                          source.config.state_storage_dtype.encode(), preset_digest))).digest()
        digests = []
        for segment in segments:
            head = hashlib.sha256(head + array("i", segment).tobytes()).digest()
            digests.append(head.hex())
        return digests

    async def build(self, segments: Sequence[Sequence[int]], base: State | None = None, base_consumed: int = 0,
                    preset_digest: bytes = b"") -> Built:
        """The state after feeding `segments` onto `base` (a preset, or None for the model's zero state), resumed
        from the longest cached boundary and storing each boundary it passes."""
        segments = [list(s) for s in segments if s]
        prefilled = sum(len(s) for s in segments)
        if not segments:
            return Built(base, base_consumed, 0, 0)
        digests = self.chain(segments, preset_digest)
        state, consumed, start = base, base_consumed, 0
        if self.enabled:
            found = await self._load(segments, digests, base_consumed)
            if found is not None:
                start, state, consumed = found
        cached = sum(len(s) for s in segments[:start])
        for i in range(start, len(segments)):
            finished = await self._prefill(segments[i], state, consumed)
            state, consumed = finished.state, finished.tokens_consumed
            assert state is not None
            if self.enabled:
                data = await asyncio.to_thread(self.source.encode, state, consumed)  # rounds `state` in place
                self._store(digests[i], data)
            else:
                await asyncio.to_thread(self.source.round_to_storage, state)
        return Built(state, consumed, prefilled, cached)

    async def _load(self, segments: list[list[int]], digests: list[str], base_consumed: int
                    ) -> tuple[int, State, int] | None:
        """(boundaries covered, state, consumed) of the longest usable cached boundary, or None."""
        try:
            covered = await self.store.find_prefix(self.model_id, digests, self.ttl_ms)
            data = await self.store.get_prefix(self.model_id, digests[covered - 1]) if covered else None
        except ServeError:  # Redis trouble: the cache is an optimisation, the turn goes on without it
            log.warning("prefix cache lookup failed; prefilling without it", exc_info=True)
            return None
        if data is None:
            self.misses += 1
            return None
        expected = base_consumed + sum(len(s) for s in segments[:covered])
        try:
            state, consumed = await self.source.decode(data, "prefix-cache entry")
        except StateCorrupt as exc:
            log.warning("ignoring an unreadable prefix-cache entry %s (%s): rebuilding it", digests[covered - 1], exc)
            self.misses += 1
            return None
        if consumed != expected:
            log.warning("ignoring prefix-cache entry %s: it has consumed %d tokens, not %d", digests[covered - 1],
                        consumed, expected)
            self.misses += 1
            return None
        self.hits += 1
        return covered, state, consumed

    def _store(self, digest: str, data: memoryview) -> None:
        """Writes one boundary in the background: the turn does not wait for Redis (a lost write costs a prefill)."""
        async def write() -> None:
            try:
                await self.store.put_prefix(self.model_id, digest, data, ttl_ms=self.ttl_ms,
                                            max_bytes=self.max_bytes)
            except ServeError:
                log.warning("could not store prefix-cache entry %s", digest, exc_info=True)

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Waits for the background writes (tests, benchmarks, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
