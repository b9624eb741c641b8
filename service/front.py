"""The front's domain object: auth, sessions, turns and models wired on one store, directory and router."""

from __future__ import annotations

from common.errors import ModelNotFound
from common.store import StateStore
from common.telemetry import Telemetry
from common.tls import channel_credentials
from rwkv_serve.v1 import common_pb2, worker_pb2
from service.admission import Admission
from service.auth import Auth, load_key_entries
from service.convert import InputLimits
from service.presets import Presets
from service.quotas import Quotas
from service.router import ChannelPool, Router, WorkerDirectory
from service.sessions import Sessions
from service.settings import FrontSettings
from service.turns import Turns


def max_message_bytes(settings: FrontSettings) -> int:
    """The gRPC message limit of the public port and of the channels to the workers: room for a preset upload."""
    return max(settings.max_message_mb, settings.max_preset_mb + 1) * 1024 * 1024


class Front:
    """Everything a public API call needs; the servicer only decodes, calls one of these, and encodes."""

    def __init__(self, store: StateStore, settings: FrontSettings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.store = store
        self.telemetry = telemetry or Telemetry()  # no-op unless main() configured exporters
        pepper = settings.api_key_pepper.get_secret_value() if settings.api_key_pepper else None
        self.auth = Auth(settings.auth_mode, load_key_entries(settings.api_key_hashes, settings.api_keys_file),
                         pepper=pepper, lookup=store.get_api_key if settings.api_keys_in_redis else None,
                         cache_s=settings.api_key_cache_s, default_tenant=settings.default_tenant)
        self.quotas = Quotas(store, max_sessions=settings.tenant_max_sessions, max_tokens=settings.tenant_max_tokens,
                             window_s=settings.tenant_token_window_s, per_tenant=settings.tenant_limits)
        self.directory = WorkerDirectory(store.list_workers, refresh_s=settings.discovery_interval_s,
                                         suspect_s=settings.suspect_s)
        message_bytes = max_message_bytes(settings)  # a preset upload goes on to a worker, and comes back
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", message_bytes),
                                                ("grpc.max_send_message_length", message_bytes)]
        if settings.worker_tls_server_name:
            options.append(("grpc.ssl_target_name_override", settings.worker_tls_server_name))
        self.channels = ChannelPool(options, channel_credentials(settings.worker_ca, settings.worker_client_cert,
                                                                 settings.worker_client_key),
                                    interceptors=self.telemetry.client_interceptors())
        self.admission = Admission(settings.max_inflight_turns, settings.max_inflight_per_worker,
                                   settings.overload_retry_after_s)
        self.router = Router(self.directory, self.channels, max_attempts=settings.max_attempts,
                             admission=self.admission)
        limits = InputLimits(settings.max_text_bytes, settings.metadata_max_entries, settings.metadata_max_key_bytes,
                             settings.metadata_max_value_bytes, max_messages=settings.max_messages,
                             max_choices=settings.max_choices, max_keep_versions=settings.max_keep_versions)
        self.sessions = Sessions(store, self.directory, default_ttl_ms=round(settings.default_ttl_s * 1000),
                                 max_ttl_ms=round(settings.max_ttl_s * 1000), quotas=self.quotas, limits=limits)
        self.presets = Presets(store, self.directory, self.router, max_bytes=settings.max_preset_mb * 1024 * 1024,
                               admins=settings.preset_admin_tenants if self.auth.enabled else None)
        self.turns = Turns(store, self.sessions, self.directory, self.router, busy_retry_s=settings.busy_retry_s,
                           quotas=self.quotas, max_stream_queue=settings.max_stream_queue, telemetry=self.telemetry)

    @classmethod
    def from_settings(cls, settings: FrontSettings, telemetry: Telemetry | None = None) -> Front:
        return cls(settings.open_store(), settings, telemetry)

    async def list_models(self) -> list[common_pb2.ModelInfo]:
        """Served models (with their live worker counts and the presets stored for them)."""
        models = await self.directory.models()
        for info in models:
            stored = await self.store.list_presets(info.id)
            missing = [name for name in stored if name not in info.presets]
            info.presets.extend(missing)
        return models

    async def tokenize(self, model: str, text: str, deadline: float | None = None) -> list[int]:
        self.sessions.limits.check_text("text", text)
        candidates = await self.directory.least_loaded(model)
        if not candidates:
            raise ModelNotFound(f"model {model!r} is not served by any live worker")
        response = await self.router.unary("Tokenize", worker_pb2.WorkerTokenizeRequest(text=text), candidates,
                                           deadline)
        return list(response.token_ids)

    async def close(self) -> None:
        await self.channels.close()
        await self.store.close()
