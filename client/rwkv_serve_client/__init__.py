"""Python SDK of rwkv-serve: `RWKVClient` (blocking) and `AsyncRWKVClient` (asyncio), typed results and errors."""

from rwkv_serve_client._core import tls_credentials
from rwkv_serve_client.aio import AsyncChatStream, AsyncRWKVClient
from rwkv_serve_client.errors import (
    AuthenticationError,
    ConflictError,
    DataLossError,
    DeadlineExceededError,
    ForeignStateError,
    InternalError,
    InvalidArgumentError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    PresetExistsError,
    PresetNotFoundError,
    QuotaExceededError,
    RequestCancelledError,
    ResourceExhaustedError,
    RWKVError,
    SessionBusyError,
    SessionNotFoundError,
    UnavailableError,
    VersionConflictError,
)
from rwkv_serve_client.sync import ChatStream, RWKVClient
from rwkv_serve_client.types import (
    ChatTemplate,
    Choices,
    Message,
    ModelInfo,
    Preset,
    Session,
    SessionPage,
    StopReason,
    TextDelta,
    TokenLogprob,
    TurnResult,
    TurnStarted,
    Usage,
)

__all__ = [
    "AsyncChatStream", "AsyncRWKVClient", "AuthenticationError", "ChatStream", "ChatTemplate", "Choices",
    "ConflictError", "Message",
    "DataLossError", "DeadlineExceededError", "ForeignStateError", "InternalError", "InvalidArgumentError",
    "ModelInfo", "ModelNotFoundError", "NotFoundError", "PermissionDeniedError", "Preset", "PresetExistsError",
    "PresetNotFoundError", "QuotaExceededError",
    "RequestCancelledError",
    "ResourceExhaustedError", "RWKVError", "RWKVClient", "Session", "SessionBusyError", "SessionNotFoundError",
    "SessionPage", "StopReason", "TextDelta", "TokenLogprob", "TurnResult", "TurnStarted", "UnavailableError",
    "Usage", "VersionConflictError", "tls_credentials",
]
