"""The ASGI application: routes of the OpenAI-compatible API over a Backend (front) and a ResponseStore (Redis)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import chat, errors, responses
from gateway.backend import Backend, api_key_of
from gateway.errors import GatewayError, error_response
from gateway.response_store import ResponseStore
from gateway.schemas import ChatCompletionRequest, CompletionRequest, ResponseRequest
from gateway.settings import GatewaySettings
from gateway.streams import unless_disconnected

_STARTED = int(time.time())


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413 (by Content-Length, or while reading a chunked body)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = GatewayError(413, f"the request body is larger than the limit of {self.limit} bytes",
                                 code="request_too_large")
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_large)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        await self.app(scope, limited, send)


def create_app(settings: GatewaySettings, store: Any = None) -> FastAPI:
    """The application; `store` (a common.store.StateStore) when the caller opened one, else from the settings.
    The SDK's gRPC channel is opened in the application's lifespan (it belongs to the serving event loop)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_store = store is None
        state_store = settings.open_store() if own_store else store
        app.state.backend = Backend(settings, state_store)
        app.state.responses = ResponseStore(state_store.redis, settings.redis_prefix,
                                            ttl_s=settings.responses_ttl_s)
        try:
            yield
        finally:
            await app.state.backend.close()
            if own_store:
                await state_store.close()

    app = FastAPI(title="rwkv-serve OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def backend(request: Request) -> Backend:
        return request.app.state.backend

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
        models = await backend(request).client(api_key_of(authorization)).list_models()
        return JSONResponse({"object": "list", "data": [_model(m) for m in models]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request, authorization: str | None = Header(None)) -> JSONResponse:
        models = await backend(request).client(api_key_of(authorization)).list_models()
        for m in models:
            if m.id == model_id:
                return JSONResponse(_model(m))
        raise GatewayError(404, f"the model {model_id!r} does not exist (no live worker serves it)",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               authorization: str | None = Header(None)) -> Response:
        return await unless_disconnected(request, chat.chat_completions(body, backend(request),
                                                                        api_key_of(authorization)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          authorization: str | None = Header(None)) -> Response:
        return await unless_disconnected(request, chat.completions(body, backend(request), api_key_of(authorization)))

    @app.post("/v1/responses")
    async def create_response(body: ResponseRequest, request: Request,
                              authorization: str | None = Header(None)) -> Response:
        return await unless_disconnected(request, responses.create(body, backend(request), request.app.state.responses,
                                                                   api_key_of(authorization)))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request,
                           authorization: str | None = Header(None)) -> JSONResponse:
        return await responses.retrieve(response_id, backend(request), request.app.state.responses,
                                        api_key_of(authorization))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request,
                              authorization: str | None = Header(None)) -> JSONResponse:
        return await responses.delete(response_id, backend(request), request.app.state.responses,
                                      api_key_of(authorization))

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, request: Request, authorization: str | None = Header(None),
                          limit: int = 20, order: str = "desc", after: str | None = None) -> JSONResponse:
        return await responses.input_items(response_id, backend(request), request.app.state.responses,
                                           api_key_of(authorization), limit=limit, order=order, after=after)

    return app


def _model(m: Any) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": _STARTED, "owned_by": "rwkv-serve",
            # RWKV extras: what the front knows of the model
            "n_layer": m.n_layer, "n_embd": m.n_embd, "vocab_size": m.vocab_size, "state_bytes": m.state_bytes,
            "workers": m.workers, "random_init": m.random_init, "presets": list(m.presets)}
