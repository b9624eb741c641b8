"""Typed exceptions of the SDK and the one table that maps gRPC status codes to them (no grpc.RpcError leaks)."""

from __future__ import annotations

import grpc

from rwkv_serve.contract import ERROR_KEY, RETRY_AFTER_KEY  # the trailers the server sets (shared with it)


class RWKVError(Exception):
    """Base of every error the SDK raises; `code` is the gRPC status, `message` the server's explanation.

    `retry_after_s` is the server's hint (trailer retry-after-ms) when it sent one: on RESOURCE_EXHAUSTED, and on
    UNAVAILABLE when a worker died under the turn (0: retry now) or Redis cannot be reached."""

    retry_after_s: float | None = None

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name


class InvalidArgumentError(RWKVError):
    """The request is malformed or out of range (INVALID_ARGUMENT)."""


class NotFoundError(RWKVError):
    """Something named in the request does not exist (NOT_FOUND)."""


class SessionNotFoundError(NotFoundError):
    """The session does not exist: never created, deleted, or expired."""


class ModelNotFoundError(NotFoundError):
    """No live worker serves this model."""


class PresetNotFoundError(NotFoundError):
    """The model has no preset state with this name."""


class ForeignStateError(InvalidArgumentError):
    """An uploaded preset state belongs to another model: other shapes or weights (FAILED_PRECONDITION)."""


class ConflictError(RWKVError):
    """A test-and-set failed (ABORTED), or a name is taken (ALREADY_EXISTS)."""


class PresetExistsError(ConflictError):
    """The model already has a preset of this name (register with replace=True to overwrite it)."""


class SessionBusyError(ConflictError):
    """Another call is running a turn on this session."""


class VersionConflictError(ConflictError):
    """The session is not at the state version the request expected."""


class ResourceExhaustedError(RWKVError):
    """The service is overloaded (RESOURCE_EXHAUSTED); `retry_after_s` says when to try again."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s


class QuotaExceededError(ResourceExhaustedError):
    """The API key's tenant reached a limit (live sessions, or tokens in the current window)."""


class UnavailableError(RWKVError):
    """No server or worker can take the request now (UNAVAILABLE); retrying later may succeed."""


class DeadlineExceededError(RWKVError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""


class RequestCancelledError(RWKVError):
    """The call was cancelled (CANCELLED)."""


class DataLossError(RWKVError):
    """A stored state failed its checksum or belongs to other weights (DATA_LOSS)."""


class AuthenticationError(RWKVError):
    """Missing or unknown API key (UNAUTHENTICATED)."""


class PermissionDeniedError(RWKVError):
    """The API key may not access this resource (PERMISSION_DENIED)."""


class InternalError(RWKVError):
    """The server failed (INTERNAL, UNKNOWN or another unexpected status): a bug to report, not to retry."""


# The one table: status code -> exception class.
ERRORS_BY_CODE: dict[grpc.StatusCode, type[RWKVError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}

# A finer class when the server names its domain error in the trailing metadata (same code, more precise type).
_REFINED: dict[str, type[RWKVError]] = {
    "SessionNotFound": SessionNotFoundError,
    "ModelNotFound": ModelNotFoundError,
    "PresetNotFound": PresetNotFoundError,
    "PresetExists": PresetExistsError,
    "ForeignState": ForeignStateError,
    "SessionBusy": SessionBusyError,
    "VersionConflict": VersionConflictError,
    "LeaseLost": VersionConflictError,
    "QuotaExceeded": QuotaExceededError,
}


def error_from_status(code: grpc.StatusCode, details: str | None,
                      metadata: tuple[tuple[str, str | bytes], ...] | None = None) -> RWKVError:
    """The typed exception of a failed call's status, details and trailing metadata."""
    meta = {key: value for key, value in (metadata or ())}
    cls = ERRORS_BY_CODE.get(code, InternalError)
    refined = _REFINED.get(str(meta.get(ERROR_KEY, "")))
    if refined is not None and issubclass(refined, cls):
        cls = refined
    message = details or ""
    retry_ms = meta.get(RETRY_AFTER_KEY)
    try:
        retry_after = float(retry_ms) / 1000 if retry_ms is not None else None
    except ValueError:
        retry_after = None
    if issubclass(cls, ResourceExhaustedError):
        return cls(message, code, retry_after_s=retry_after)
    error = cls(message, code)
    error.retry_after_s = retry_after
    return error


def from_rpc_error(error: grpc.RpcError) -> RWKVError:
    """Converts a grpc.RpcError (sync or aio) into the SDK's typed exception."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return error_from_status(code or grpc.StatusCode.UNKNOWN, details, tuple(metadata or ()))
