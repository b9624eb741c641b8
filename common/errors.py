"""Domain exceptions shared by the worker and the front, and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from rwkv_serve.contract import ERROR_KEY, RETRY_AFTER_KEY


class ServeError(Exception):
    """Base of all expected failures; anything else is a bug (INTERNAL)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(ServeError, ValueError):
    """The request is malformed or out of range (also a ValueError, for code that validates plain values)."""


class SessionNotFound(ServeError):
    """The session does not exist (never created, deleted, or expired)."""


class ModelNotFound(ServeError):
    """No model with this id is served."""


class PresetNotFound(ServeError):
    """No preset state with this name exists for the model."""


class PresetExists(ServeError):
    """The model already has a preset of this name (register with replace to overwrite it)."""


class ForeignState(ServeError):
    """An uploaded state belongs to another model: other shapes, or a record stamped with other weights."""


class SessionBusy(ServeError):
    """Another turn holds the session's lease; one turn runs at a time per session."""


class VersionConflict(ServeError):
    """The session's state is not at the version the caller expected (it moved on): re-read and retry."""


class LeaseLost(VersionConflict):
    """The turn's lease expired or was taken over, so its state may be stale and was not committed."""


class StateCorrupt(ServeError):
    """A stored state failed to decode (truncated, bad checksum, or another model's fingerprint)."""


class Overloaded(ServeError):
    """The worker's queue is full; retry later or elsewhere."""

    def __init__(self, message: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServeError):
    """No worker can serve the request now (none registered, or the worker is draining)."""


class WorkerLost(Unavailable):
    """The worker running the turn went away mid-turn (crashed or unreachable): retry with the same turn_id (a turn
    it had committed is then answered from that commit, never applied twice)."""

    def __init__(self, message: str = "", worker_id: str = "", retry_after_s: float | None = 0.0) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.retry_after_s = retry_after_s  # the session's lease is released, so a retry may come at once


class StoreUnavailable(Unavailable):
    """The state store (Redis) cannot be reached or did not answer in time; retry shortly."""

    def __init__(self, message: str = "", retry_after_s: float | None = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServeError):
    """The request's deadline passed before it finished."""


class Cancelled(ServeError):
    """The caller cancelled the request."""


class Unauthenticated(ServeError):
    """Missing or unknown credentials."""


class PermissionDenied(ServeError):
    """The caller may not access this resource (another tenant's session answers SessionNotFound instead)."""


class QuotaExceeded(ServeError):
    """The tenant reached one of its limits (live sessions, or tokens in the current window)."""

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # when the limit lifts by itself (a token window ends); None: never


# The one table. Order matters only for subclasses listed before their bases (looked up by MRO anyway).
STATUS_CODES: dict[type[ServeError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    PresetNotFound: grpc.StatusCode.NOT_FOUND,
    PresetExists: grpc.StatusCode.ALREADY_EXISTS,
    ForeignState: grpc.StatusCode.FAILED_PRECONDITION,
    SessionBusy: grpc.StatusCode.ABORTED,
    VersionConflict: grpc.StatusCode.ABORTED,
    LeaseLost: grpc.StatusCode.ABORTED,
    StateCorrupt: grpc.StatusCode.DATA_LOSS,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    WorkerLost: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,  # after Overloaded: a bare code still means overload
}

# For codes that several classes share, the class a bare status code (no rwkv-error metadata) becomes.
_DEFAULT_FOR_CODE: dict[grpc.StatusCode, type[ServeError]] = {
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.ABORTED: VersionConflict,
}
_BY_NAME: dict[str, type[ServeError]] = {cls.__name__: cls for cls in STATUS_CODES}


def status_code(exc: ServeError) -> grpc.StatusCode:
    """The gRPC status code of a domain exception."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def trailing_metadata(exc: ServeError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that lets the caller rebuild the exception (class name, retry-after)."""
    metadata: list[tuple[str, str]] = [(ERROR_KEY, type(exc).__name__)]
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        metadata.append((RETRY_AFTER_KEY, str(max(0, round(retry_after_s * 1000)))))
    return tuple(metadata)


def from_status(
    code: grpc.StatusCode, details: str | None, metadata: Sequence[tuple[str, str | bytes]] | None = None
) -> ServeError | None:
    """Rebuilds the domain exception from a status (e.g. the front relaying a worker's error); None for OK."""
    if code == grpc.StatusCode.OK:
        return None
    meta = {key: value for key, value in (metadata or ())}
    cls = _BY_NAME.get(str(meta.get(ERROR_KEY, "")))
    if cls is None:
        cls = _DEFAULT_FOR_CODE.get(code) or next((c for c, k in STATUS_CODES.items() if k == code), None)
    if cls is None:  # INTERNAL, UNKNOWN, ...: the remote side had a bug; nothing the caller can fix
        cls = Unavailable if code == grpc.StatusCode.UNKNOWN else ServeError
    message = details or ""
    if cls is Overloaded:
        retry_ms = meta.get(RETRY_AFTER_KEY)
        return Overloaded(message, retry_after_s=float(retry_ms) / 1000 if retry_ms else 1.0)
    if cls is QuotaExceeded:
        retry_ms = meta.get(RETRY_AFTER_KEY)
        return QuotaExceeded(message, retry_after_s=float(retry_ms) / 1000 if retry_ms else None)
    return cls(message)


async def abort(context: grpc.aio.ServicerContext, exc: ServeError) -> None:
    """Ends the RPC with the exception's status code, message and trailing metadata."""
    context.set_trailing_metadata(trailing_metadata(exc))
    await context.abort(status_code(exc), exc.message)


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Decorates a grpc.aio servicer method (coroutine or async generator) to turn ServeError into its status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except ServeError as exc:
                await abort(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Awaitable[Any]:
        try:
            return await method(self, request, context)
        except ServeError as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    return unary  # type: ignore[return-value]
