"""Where a session's state comes from on a worker, and how it goes to and from its stored record.

In order: the local cache when its version equals the stored one (affinity saves the Redis read), the stored
state bytes, or, before the first turn, the preset plus the template's opening and system prompt
(content-addressed in Redis, so every session with the same system prompt shares one prefill). Records are
written in the configured storage dtype (fp32, or bf16/fp16 for half the bytes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from array import array
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import torch

from common.errors import ForeignState, InvalidArgument, StateCorrupt, VersionConflict
from common.store import SessionMeta, StateStore
from common.worker_api import PreparedState
from worker.engine import Finished
from worker.model import RWKV5
from worker.state import (
    STORAGE_DTYPES,
    ForeignStateError,
    State,
    StateFormatError,
    check_finite,
    state_from_bytes,
    state_to_buffer,
    state_to_bytes,
    time_state_from_bytes,
)
from worker.state_cache import StateCache
from worker.templates import get_template

if TYPE_CHECKING:
    from worker.runner import RunnerConfig

log = logging.getLogger(__name__)


class StateSource:
    """A worker's session states: load (cache, Redis, preset + prefix cache), encode and decode records."""

    def __init__(self, store: StateStore, model: RWKV5, cache: StateCache, config: RunnerConfig,
                 tokenize: Callable[[str], Awaitable[list[int]]],
                 prefill: Callable[[list[int], State | None], Awaitable[Finished]]) -> None:
        """`prefill(tokens, base)` feeds tokens onto a state through the engine (for the prefix cache)."""
        self.store, self.model, self.cache, self.config = store, model, cache, config
        self._tokenize, self._prefill = tokenize, prefill

    def cached(self, sid: str) -> bool:
        """Whether the local cache holds some version of sid (then the turn skips the state read, betting on a
        hit; a miss costs one more round trip)."""
        return self.cache is not None and sid in self.cache

    async def load(self, meta: SessionMeta, prefetched: bytes | None = None) -> tuple[State | None, int]:
        """The session's state at meta.version on the model's device, and the tokens it has consumed.

        `prefetched`: the state bytes at meta.version, when the caller read them along with meta."""
        cached = self.cache.get(meta.session_id, meta.version)
        if cached is not None:
            state, consumed = cached
            return await asyncio.to_thread(state.to, self.model.device), consumed
        if meta.version == 0:
            return await self.initial(meta)
        if prefetched is not None:
            return await self.decode(prefetched, f"session {meta.session_id}")
        stored, data = await self.store.load_state(meta.session_id)
        if stored.version != meta.version:
            raise VersionConflict(f"session {meta.session_id} moved to version {stored.version}")
        if data is None:
            raise StateCorrupt(f"session {meta.session_id} is at version {meta.version} but its state is missing")
        return await self.decode(data, f"session {meta.session_id}")

    async def initial(self, meta: SessionMeta) -> tuple[State | None, int]:
        """A new session's state: its preset (or zeros) plus the template's opening and the system prompt."""
        base: State | None = None
        preset_digest = b""
        if meta.preset:
            data = await self.store.get_preset(meta.model, meta.preset)
            base, _ = await self.decode(data, f"preset {meta.preset}")
            # The prefix cache is keyed by the preset's bytes, not its name: a preset replaced under the same name
            # (RegisterPreset with replace) can never be served from entries built on the old one, even those
            # written by a prefill that was running while it was replaced.
            preset_digest = (await asyncio.to_thread(hashlib.sha256, data)).hexdigest().encode()
        tokens = await self._tokenize(get_template(meta.template).prefix(meta.system_prompt))
        if not tokens:
            return base, 0
        key = hashlib.sha256(preset_digest + b"\0" + array("i", tokens).tobytes()).hexdigest()
        data = await self.store.get_prefix(meta.model, key, self.config.prefix_ttl_ms)
        if data is not None:
            try:
                return await self.decode(data, "prefix")
            except StateCorrupt:  # another model's or a damaged entry: rebuild it
                log.warning("ignoring unreadable prefix-cache entry %s", key)
        finished = await self._prefill(tokens, base)
        state = finished.state
        data = await asyncio.to_thread(self.encode, state, finished.tokens_consumed)
        await self.store.put_prefix(meta.model, key, data, self.config.prefix_ttl_ms)
        return state, finished.tokens_consumed

    def encode(self, state: State, tokens_consumed: int) -> memoryview:
        """The state record to store (a buffer Redis takes as it is), in the configured storage dtype.

        With 16-bit storage `state` is rounded in place to what the record holds, so the local cache (and the
        caller) continue from exactly the state any other worker would load: a session's continuation does not
        depend on which worker serves it."""
        dtype = STORAGE_DTYPES[self.config.state_storage_dtype]
        if dtype != torch.float32:
            with torch.inference_mode():  # the engine's states are inference tensors
                for tensor in state.tensors():
                    stored = tensor.to(dtype)
                    if bool(torch.isfinite(stored).all()):  # else the record keeps it in fp32 (fp16 overflow)
                        tensor.copy_(stored)
        return state_to_buffer(state, self.model.fingerprint, tokens_consumed, dtype=dtype, wkv_dtype=dtype)

    async def decode(self, data: bytes, what: str) -> tuple[State, int]:
        try:
            return await asyncio.to_thread(state_from_bytes, data, self.model.fingerprint, self.model.device)
        except StateFormatError as exc:
            raise StateCorrupt(f"{what}: {exc}") from exc

    async def prepare(self, source: str, data: bytes) -> PreparedState:
        """An uploaded preset state checked against this model, as a state record (nothing is stored here).

        source "time_state_pth": a torch .pth of blocks.N.att.time_state tensors, converted (zero shift vectors,
        stamped with this model's fingerprint). source "state_record": a record, verified (format, checksum,
        fingerprint) and returned unchanged. InvalidArgument for bytes that are neither; ForeignState for a
        state of another model."""
        c, fingerprint = self.model.config, self.model.fingerprint

        def convert() -> PreparedState:
            if source == "time_state_pth":
                state = time_state_from_bytes(data, c.n_layer, c.n_head, c.head_size, c.n_embd)
                record, tokens = state_to_bytes(check_finite(state), fingerprint, tokens_consumed=0), 0
            elif source == "state_record":
                state, tokens = state_from_bytes(data, fingerprint)
                record = bytes(data)
                check_finite(state)
            else:
                raise InvalidArgument("the upload needs time_state_pth or state_record")
            return PreparedState(record, fingerprint.hex(), tokens)

        try:
            return await asyncio.to_thread(convert)
        except ForeignStateError as exc:
            raise ForeignState(f"not a state of model {self.config.model_id!r}: {exc}") from None
        except StateFormatError as exc:
            raise InvalidArgument(f"not a state: {exc}") from None
