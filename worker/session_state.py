"""Where a session's state comes from on a worker, and how it goes to and from its stored record.

In order: the local cache when its version equals the stored one (affinity saves the Redis read), the stored
state bytes, or, before the first turn, the preset plus the template's opening and system prompt (from the
shared prefix-state cache, worker/prefix_cache.py: every session and stateless conversation with the same opening
shares one prefill). Records are written in the configured storage dtype (fp32, or bf16/fp16 for half the bytes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.errors import ForeignState, InvalidArgument, StateCorrupt, VersionConflict
from common.store import SessionMeta, StateStore
from common.templates import get_template
from common.worker_api import PreparedState
from worker.model import RWKV5
from worker.prefix_cache import Prefill, PrefixCache
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

if TYPE_CHECKING:
    from worker.turn_config import RunnerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A session's state as a turn starts from it."""

    state: State | None
    consumed: int  # tokens the state has consumed
    prefilled: int = 0  # before the first turn: the opening's tokens (system prompt), part of this turn's prompt
    cached: int = 0  # of those, covered by the prefix cache


class StateSource:
    """A worker's session states: load (cache, Redis, preset + prefix cache), encode and decode records."""

    def __init__(self, store: StateStore, model: RWKV5, cache: StateCache, config: RunnerConfig,
                 tokenize: Callable[[str], Awaitable[list[int]]], prefill: Prefill) -> None:
        """`prefill(tokens, base, consumed)` feeds tokens onto a state through the engine (for the prefix cache)."""
        self.store, self.model, self.cache, self.config = store, model, cache, config
        self._tokenize = tokenize
        self.prefixes = PrefixCache(store, self, prefill, model_id=config.model_id, ttl_ms=config.prefix_ttl_ms,
                                    max_bytes=config.prefix_cache_max_bytes, enabled=config.prefix_cache)

    def cached(self, sid: str) -> bool:
        """Whether the local cache holds some version of sid (then the turn skips the state read, betting on a
        hit; a miss costs one more round trip)."""
        return self.cache is not None and sid in self.cache

    async def load(self, meta: SessionMeta, prefetched: bytes | None = None, system_prompt: str | None = None
                   ) -> Loaded:
        """The session's state at meta.version on the model's device, and the tokens it has consumed.

        `prefetched`: the state bytes at meta.version, when the caller read them along with meta. `system_prompt`:
        at version 0, the system prompt to open the state with instead of the session's own (a system message)."""
        cached = self.cache.get(meta.session_id, meta.version)
        if cached is not None:
            state, consumed = cached
            return Loaded(await asyncio.to_thread(state.to, self.model.device), consumed)
        if meta.version == 0:
            return await self.initial(meta, system_prompt)
        if prefetched is not None:
            return Loaded(*await self.decode(prefetched, f"session {meta.session_id}"))
        stored, data = await self.store.load_state(meta.session_id)
        if stored.version != meta.version:
            raise VersionConflict(f"session {meta.session_id} moved to version {stored.version}")
        if data is None:
            raise StateCorrupt(f"session {meta.session_id} is at version {meta.version} but its state is missing")
        return Loaded(*await self.decode(data, f"session {meta.session_id}"))

    async def initial(self, meta: SessionMeta, system_prompt: str | None = None) -> Loaded:
        """A new session's state: its preset (or zeros) plus the template's opening and the system prompt, from the
        prefix cache (the same entry a stateless conversation with that system message uses)."""
        base: State | None = None
        preset_digest = b""
        if meta.preset:
            data = await self.store.get_preset(meta.model, meta.preset)
            base, _ = await self.decode(data, f"preset {meta.preset}")
            # The prefix cache is keyed by the preset's bytes, not its name: a preset replaced under the same name
            # (RegisterPreset with replace) can never be served from entries built on the old one, even those
            # written by a prefill that was running while it was replaced.
            preset_digest = (await asyncio.to_thread(hashlib.sha256, data)).hexdigest().encode()
        opening = get_template(meta.template).prefix(meta.system_prompt if system_prompt is None else system_prompt)
        tokens = await self._tokenize(opening) if opening else []
        built = await self.prefixes.build([tokens], base, 0, preset_digest)
        return Loaded(built.state, built.consumed, built.prefilled, built.cached)

    def round_to_storage(self, state: State) -> None:
        """Rounds `state` in place to what a record in the storage dtype holds (a no-op for fp32)."""
        dtype = STORAGE_DTYPES[self.config.state_storage_dtype]
        if dtype != torch.float32:
            with torch.inference_mode():  # the engine's states are inference tensors
                for tensor in state.tensors():
                    stored = tensor.to(dtype)
                    if bool(torch.isfinite(stored).all()):  # else the record keeps it in fp32 (fp16 overflow)
                        tensor.copy_(stored)

    def encode(self, state: State, tokens_consumed: int) -> memoryview:
        """The state record to store (a buffer Redis takes as it is), in the configured storage dtype.

        With 16-bit storage `state` is rounded in place to what the record holds, so the local cache (and the
        caller) continue from exactly the state any other worker would load: a session's continuation does not
        depend on which worker serves it."""
        dtype = STORAGE_DTYPES[self.config.state_storage_dtype]
        self.round_to_storage(state)
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
