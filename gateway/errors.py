"""Errors in OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}) with the HTTP codes its SDKs map.

One table maps the SDK's typed exceptions (one per gRPC status, see rwkv_serve_client.errors) to an HTTP status,
an OpenAI error type and a code; the gateway's own refusals are `GatewayError`s. Nothing else reaches a client:
an unexpected exception is logged and answered as a bare 500, never with its text or a stack trace.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import ServeError, Unauthenticated
from rwkv_serve_client import errors as sdk

log = logging.getLogger("rwkv.gateway")


class GatewayError(Exception):
    """A refusal of the gateway itself: HTTP status, OpenAI error type, message, the offending parameter, a code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unsupported(param: str, why: str = "") -> GatewayError:
    """400 for an OpenAI parameter this server does not implement (never silently ignored)."""
    return GatewayError(400, f"'{param}' is not supported by this server{': ' + why if why else ''}", param=param,
                        code="unsupported_parameter")


# The one table: SDK exception class (most specific first) -> (HTTP status, OpenAI error type, code).
_BY_CLASS: list[tuple[type[sdk.RWKVError], int, str, str]] = [
    (sdk.AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (sdk.PermissionDeniedError, 403, "permission_error", "permission_denied"),
    (sdk.ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (sdk.SessionNotFoundError, 404, "invalid_request_error", "not_found"),
    (sdk.NotFoundError, 404, "invalid_request_error", "not_found"),
    (sdk.SessionBusyError, 409, "invalid_request_error", "conversation_busy"),
    (sdk.VersionConflictError, 409, "invalid_request_error", "version_conflict"),
    (sdk.ConflictError, 409, "invalid_request_error", "conflict"),
    (sdk.QuotaExceededError, 429, "insufficient_quota", "insufficient_quota"),
    (sdk.ResourceExhaustedError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (sdk.InvalidArgumentError, 400, "invalid_request_error", "invalid_value"),
    (sdk.UnavailableError, 503, "server_error", "service_unavailable"),
    (sdk.DeadlineExceededError, 504, "server_error", "timeout"),
    (sdk.RequestCancelledError, 499, "server_error", "cancelled"),
    (sdk.DataLossError, 500, "server_error", "state_corrupt"),
]


def from_sdk(error: sdk.RWKVError) -> GatewayError:
    """The HTTP answer to a failed front call (InternalError and unknown statuses: a bare 500)."""
    for cls, status, kind, code in _BY_CLASS:
        if isinstance(error, cls):
            return GatewayError(status, error.message or cls.__doc__ or cls.__name__, type=kind, code=code,
                                retry_after_s=error.retry_after_s if status in (429, 503) else None)
    log.error("the front failed a call: %s", error)
    return GatewayError(500, "internal error of the serving backend", type="server_error", code="internal_error")


def to_gateway_error(exc: BaseException) -> GatewayError:
    """Any exception -> what the client gets; unexpected ones are logged with their traceback."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, sdk.RWKVError):
        return from_sdk(exc)
    if isinstance(exc, Unauthenticated):
        return GatewayError(401, exc.message, type="authentication_error", code="invalid_api_key")
    if isinstance(exc, ServeError):  # the local store (StoreUnavailable) or the auth lookup
        code = "service_unavailable" if "Unavailable" in type(exc).__name__ else "server_error"
        return GatewayError(503 if code == "service_unavailable" else 500, exc.message, type="server_error",
                            code=code, retry_after_s=getattr(exc, "retry_after_s", None))
    log.error("unexpected error in a request", exc_info=exc)
    return GatewayError(500, "internal error", type="server_error", code="internal_error")


def error_body(error: GatewayError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_headers(error: GatewayError) -> dict[str, str]:
    """Retry-After (whole seconds, as HTTP says) and retry-after-ms (the openai SDKs read it first)."""
    if error.retry_after_s is None:
        return {}
    return {"Retry-After": str(max(0, math.ceil(error.retry_after_s))),
            "retry-after-ms": str(max(0, round(error.retry_after_s * 1000)))}


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error_headers(error))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body, as one sentence naming the parameter."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"missing required parameter: '{param}'", param
    message = first.get("msg", "invalid value")
    return (f"invalid value for '{param}': {message}" if param else message), param


def install(app: FastAPI) -> None:
    """Registers the handlers that give every failure OpenAI's error shape (FastAPI's 422 becomes 400)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(GatewayError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"unknown URL: {request.method} {request.url.path}"
        return error_response(GatewayError(exc.status_code, message, type=kind, code=None))

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(sdk.RWKVError)
    async def _sdk(request: Request, exc: sdk.RWKVError) -> JSONResponse:
        return error_response(from_sdk(exc))

    @app.exception_handler(ServeError)
    async def _serve(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(to_gateway_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_gateway_error(exc))
