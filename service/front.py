"""The front's domain object: auth, sessions, turns and models wired on one store, directory and router."""

from __future__ import annotations

from rwkv_serve.v1 import common_pb2, worker_pb2
from service.auth import Auth
from service.router import ChannelPool, Router, WorkerDirectory
from service.sessions import Sessions
from service.settings import FrontSettings
from service.turns import Turns
from worker.errors import ModelNotFound
from worker.store import StateStore


class Front:
    """Everything a public API call needs; the servicer only decodes, calls one of these, and encodes."""

    def __init__(self, store: StateStore, settings: FrontSettings) -> None:
        self.settings = settings
        self.store = store
        self.auth = Auth(settings.api_keys, settings.default_tenant)
        self.directory = WorkerDirectory(store.list_workers, refresh_s=settings.discovery_interval_s,
                                         suspect_s=settings.suspect_s)
        message_bytes = settings.max_message_mb * 1024 * 1024
        self.channels = ChannelPool([("grpc.max_receive_message_length", message_bytes),
                                     ("grpc.max_send_message_length", message_bytes)])
        self.router = Router(self.directory, self.channels, max_attempts=settings.max_attempts)
        self.sessions = Sessions(store, self.directory, default_ttl_ms=round(settings.default_ttl_s * 1000),
                                 max_ttl_ms=round(settings.max_ttl_s * 1000))
        self.turns = Turns(store, self.sessions, self.directory, self.router, busy_retry_s=settings.busy_retry_s)

    @classmethod
    def from_settings(cls, settings: FrontSettings) -> Front:
        return cls(StateStore.from_url(settings.redis_url, prefix=settings.redis_prefix), settings)

    async def list_models(self) -> list[common_pb2.ModelInfo]:
        """Served models (with their live worker counts and the presets stored for them)."""
        models = await self.directory.models()
        for info in models:
            stored = await self.store.list_presets(info.id)
            missing = [name for name in stored if name not in info.presets]
            info.presets.extend(missing)
        return models

    async def tokenize(self, model: str, text: str, deadline: float | None = None) -> list[int]:
        candidates = await self.directory.least_loaded(model)
        if not candidates:
            raise ModelNotFound(f"model {model!r} is not served by any live worker")
        response = await self.router.unary("Tokenize", worker_pb2.WorkerTokenizeRequest(text=text), candidates,
                                           deadline)
        return list(response.token_ids)

    async def close(self) -> None:
        await self.channels.close()
        await self.store.close()
