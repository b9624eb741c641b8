"""Requests that do not parse get INVALID_ARGUMENT, like any other bad input.

gRPC answers a request whose bytes its deserializer rejects with UNKNOWN, which says "server bug" to a caller. The
usual culprit is a string field that is not valid UTF-8: protobuf refuses to build it on the client side, but a
client in another language, or a proxy, can still send the bytes. `add_servicer` registers a generated servicer
with deserializers that catch the DecodeError, and each method answers such a request with INVALID_ARGUMENT
before the servicer sees it (in a request stream: when the bad message is read).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from common.errors import InvalidArgument, abort


class _Malformed:
    """Stands for a request message that did not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request does not parse: {self.reason}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            raise request.error()  # raised where the servicer reads the stream; its error handling answers it
        yield request


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with a tolerant deserializer and a check of the request before the behaviour runs."""
    deserializer = _tolerant(handler.request_deserializer)
    if handler.request_streaming:  # grpc.aio tells the kinds of behaviour apart: keep each one's kind
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any],
                                    context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in inner_ss(_checked(requests), context):
                    yield response

            return handler._replace(request_deserializer=deserializer, stream_stream=stream_stream)
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await inner_su(_checked(requests), context)

        return handler._replace(request_deserializer=deserializer, stream_unary=stream_unary)
    if handler.response_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await abort(context, request.error())
            async for response in inner_us(request, context):
                yield response

        return handler._replace(request_deserializer=deserializer, unary_stream=unary_stream)
    inner_uu = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await abort(context, request.error())
        return await inner_uu(request, context)

    return handler._replace(request_deserializer=deserializer, unary_unary=unary_unary)


class _Registrar:
    """Takes the place of the server while generated code registers a servicer, guarding every method."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:  # the generic handler is rebuilt below
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        guarded = {name: _guard(handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self._server.add_registered_method_handlers(service, guarded)


def add_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """`add_XServicer_to_server(servicer, server)`, with unparseable requests answered INVALID_ARGUMENT."""
    add_to_server(servicer, _Registrar(server))
