"""Running a request's choices through the SDK and streaming them out as server-sent events.

A request's choices arrive as one stream of (choice index, text delta | TurnResult). The first item is awaited
before the HTTP response starts, so a refusal (401, 404, 429, ...) is an HTTP status the client's SDK maps,
not an event in a 200 stream. Leaving the stream early (the HTTP client went away) closes the SDK's
iterators, which cancel their gRPC calls: the worker drops the turn within one engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Union

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from gateway.errors import GatewayError, error_body, to_gateway_error
from rwkv_serve_client import StopReason, TextDelta, TurnResult

Item = tuple[int, Union[str, TextDelta, TurnResult]]
_DONE = object()


def finish_reason(result: TurnResult) -> str:
    """OpenAI's finish_reason of a turn: "length" when max_tokens ended it, else "stop"."""
    return "length" if result.stop_reason == StopReason.MAX_TOKENS else "stop"


def cached_tokens(result: TurnResult) -> int:
    """Prompt tokens a cached state covered (0 until the SDK reports them)."""
    return int(getattr(result.usage, "cached_tokens", 0) or 0)


async def merge(streams: list[AsyncIterator[Item]]) -> AsyncIterator[Item]:
    """The items of several streams (a completion's prompts), as they come; closing this closes all of them."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Item]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    await queue.put(item)
            await queue.put((-1, _DONE))
        except BaseException as exc:  # passed to the consumer, which cancels the rest
            await queue.put((-1, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(items: AsyncIterator[Item], n: int) -> list[TurnResult]:
    """Every choice's TurnResult (the whole text of each), in choice order."""
    results: list[TurnResult | None] = [None] * n
    async with contextlib.aclosing(items) as stream:
        async for index, item in stream:
            if isinstance(item, TurnResult):
                results[index] = item
    if any(r is None for r in results):
        raise GatewayError(502, "the backend ended a stream without its result", type="server_error")
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class ChunkWriter:
    """The chunks of one streamed completion (`object` chat.completion.chunk or text_completion): `chunk(choices)`
    writes any chunk; `head` + index + ... + `tail` is the hot path's one-choice delta, written without a dumps of
    the constant fields."""

    fields: dict[str, Any]  # id, object, created, model, system_fingerprint
    include_usage: bool

    @property
    def head(self) -> str:
        return chunk_head(self.fields)

    @property
    def tail(self) -> str:
        return ',"usage":null}\n\n' if self.include_usage else '}\n\n'

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {**self.fields, "choices": choices, **extra}
        if self.include_usage and "usage" not in extra:
            body["usage"] = None
        return sse(body)


def chunk_head(fields: dict[str, Any]) -> str:
    """'data: {<fields>,"choices":[{"index":' : the constant start of a stream's one-choice chunks."""
    return "data: " + json.dumps({**fields, "choices": []}, ensure_ascii=False, separators=(",", ":"))[:-3] \
        + '[{"index":'


def json_text(text: str) -> str:
    """A JSON string literal, as sse() writes strings (non-ASCII as is)."""
    return json.dumps(text, ensure_ascii=False)


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event (a JSON payload, or a bare string such as [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n"


async def primed(items: AsyncIterator[Item]) -> AsyncIterator[Item]:
    """`items` with its first item already awaited: a failure before any output raises here, as an HTTP error."""
    first = await items.__anext__()  # (StopAsyncIteration cannot happen: every turn ends with its result)

    async def rest() -> AsyncIterator[Item]:
        async with contextlib.aclosing(items):
            yield first
            async for item in items:
                yield item

    return rest()


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """`work` (a handler's answer), cancelled when the HTTP client goes away first: a non-streamed request, or a
    stream still waiting for its first output, stops its turns then too, not only once a stream is under way.
    (The body has been read by then, so the next ASGI message is the disconnect.)"""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watcher.cancel()
    if watcher.done() and not watcher.cancelled() and task.cancelled():
        return Response(status_code=499)  # nobody is left to read it
    return task.result()


def event_stream(events: AsyncIterator[str], release: Callable[[], None],
                 error_event: Callable[[GatewayError], str]) -> StreamingResponse:
    """A text/event-stream response of `events`; a failure mid-stream becomes one error event, then the end.
    `release` runs once the stream is over, however it ends (its slot of max_concurrent_streams)."""

    async def body() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(events) as stream:
                async for chunk in stream:
                    yield chunk
        except Exception as exc:  # (CancelledError, a client gone, is not caught: nobody is left to tell)
            yield error_event(to_gateway_error(exc))
        finally:
            release()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def chat_error_event(error: GatewayError) -> str:
    """What the openai SDKs raise from for Chat Completions / Completions streams: data: {"error": {...}}."""
    return sse(error_body(error))
