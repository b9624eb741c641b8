"""Session CRUD for the front: validation and tenancy on top of the shared StateStore (common/store/)."""

from __future__ import annotations

from collections.abc import Mapping

from common.errors import InvalidArgument, ModelNotFound, PresetNotFound, SessionNotFound
from common.sampling import check_sampling
from common.store import SessionMeta, StateStore
from common.worker_api import WorkerLoad
from rwkv_serve.contract import sampling_from_pb
from rwkv_serve.v1 import common_pb2
from service.convert import InputLimits, check_metadata, template_name
from service.quotas import Quotas
from service.router import WorkerDirectory


def _vocab_size(workers: list[WorkerLoad]) -> int | None:
    """The model's vocabulary size as its workers report it (None when unknown)."""
    return (workers[0].model.vocab_size or None) if workers else None


class Sessions:
    """Create, read, list, delete and fork sessions; every call is on behalf of a tenant."""

    def __init__(self, store: StateStore, directory: WorkerDirectory, *, default_ttl_ms: int,
                 max_ttl_ms: int, quotas: Quotas | None = None, limits: InputLimits | None = None) -> None:
        self.store = store
        self.directory = directory
        self.limits = limits or InputLimits()
        self.quotas = quotas or Quotas(store)  # no limits by default
        self.default_ttl_ms = default_ttl_ms
        self.max_ttl_ms = max_ttl_ms

    def _ttl(self, ttl_ms: int | None) -> int | None:
        if ttl_ms is None:
            return None
        if ttl_ms <= 0:
            raise InvalidArgument("ttl must be positive")
        if ttl_ms > self.max_ttl_ms:
            raise InvalidArgument(f"ttl must be at most {self.max_ttl_ms // 1000} s")
        return ttl_ms

    async def create(self, tenant: str, *, model: str, template: int = 0, system_prompt: str = "",
                     preset: str = "", sampling: common_pb2.Sampling | None = None, ttl_ms: int | None = None,
                     metadata: Mapping[str, str] | None = None, keep_versions: int = 0) -> SessionMeta:
        """A new session at state version 0; its state is built by the first turn. It keeps `keep_versions`
        earlier states (at most max_keep_versions) for forks from them."""
        if not model:
            raise InvalidArgument("model is required")
        if not 0 <= keep_versions <= self.limits.max_keep_versions:
            raise InvalidArgument(f"keep_versions must be 0-{self.limits.max_keep_versions}, not {keep_versions}")
        workers = await self.directory.workers(model) or await self.directory.workers(model, fresh=True)
        if not workers:
            raise ModelNotFound(f"model {model!r} is not served by any live worker")
        self.limits.check_text("system_prompt", system_prompt)
        metadata = check_metadata(dict(metadata or {}), self.limits)
        if preset and not await self.store.has_preset(model, preset):
            raise PresetNotFound(f"no preset {preset!r} for model {model!r}")
        sampling = sampling or common_pb2.Sampling()
        check_sampling(sampling_from_pb(sampling), vocab_size=_vocab_size(workers))
        await self.quotas.check_session(tenant)
        meta = await self.store.create_session(
            tenant=tenant, model=model, template=template_name(template),
            ttl_ms=self._ttl(ttl_ms) or self.default_ttl_ms,
            system_prompt=system_prompt, preset=preset, metadata=metadata, sampling=sampling_from_pb(sampling),
            keep_versions=keep_versions)
        await self.quotas.confirm_session(tenant, meta.session_id)
        return meta

    async def get(self, tenant: str, session_id: str) -> SessionMeta:
        """The session's metadata; SessionNotFound when it belongs to another tenant.

        Another tenant's session answers exactly like a missing one (same error, same message), so a caller
        learns nothing about ids outside its tenant."""
        if not session_id:
            raise InvalidArgument("session_id is required")
        meta = await self.store.get_session(session_id)
        if meta.tenant != tenant:
            raise SessionNotFound(f"session {session_id} not found")
        return meta

    async def list(self, tenant: str, *, page_size: int = 0, page_token: str = "",
                   model: str = "") -> tuple[list[SessionMeta], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        return await self.store.list_sessions(tenant, page_size=page_size, page_token=page_token, model=model)

    async def delete(self, tenant: str, session_id: str) -> None:
        await self.get(tenant, session_id)
        await self.store.delete_session(session_id)

    async def fork(self, tenant: str, session_id: str, *, ttl_ms: int | None = None,
                   metadata: Mapping[str, str] | None = None, sampling: common_pb2.Sampling | None = None,
                   expected_version: int | None = None, state_version: int | None = None) -> SessionMeta:
        """A copy of the session (state copied inside Redis), at its current state or at an earlier `state_version`
        it keeps (a branch); unset arguments keep the source's values."""
        source = await self.get(tenant, session_id)
        if sampling is not None:
            workers = await self.directory.workers(source.model)
            check_sampling(sampling_from_pb(sampling), vocab_size=_vocab_size(workers))
        await self.quotas.check_session(tenant)
        meta = await self.store.fork_session(
            session_id, ttl_ms=self._ttl(ttl_ms),
            metadata=check_metadata(dict(metadata), self.limits) if metadata else None,
            sampling=sampling_from_pb(sampling) if sampling is not None else None, expected_version=expected_version,
            state_version=state_version)
        await self.quotas.confirm_session(tenant, meta.session_id)
        return meta
