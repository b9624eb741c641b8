"""POST /v1/chat/completions and POST /v1/completions: stateless turns through the front's Generate.

A chat completion is a stateless Generate with its messages (rendered by the workers with the chat template, each
message boundary a shared prefix-state cache entry: a conversation resent with one more message prefills only
the new part); n choices sample n replies from the one prefilled prompt (choice i with seed + i when a seed is
given). Responses and chunks follow
OpenAI's shapes: chat.completion / chat.completion.chunk, text_completion, usage with prompt_tokens_details.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from gateway import tools
from gateway.backend import Backend
from gateway.errors import bad_request, unsupported
from gateway.logprobs import Aligner, LegacyLogprobs, aligned, chat_logprobs, text_and_entries, wire_logprobs
from gateway.render import normalise
from gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    banned_tokens,
    check_unsupported,
    output_format,
)
from gateway.streams import (
    ChunkWriter,
    Item,
    cached_tokens,
    chat_error_event,
    collect,
    event_stream,
    finish_reason,
    json_text,
    merge,
    primed,
    sse,
)
from rwkv_serve_client import TextDelta, TurnResult

_CHAT_UNSUPPORTED = ("functions", "function_call", "audio", "prediction",
                     "web_search_options", "store", "reasoning_effort")
_WHY = {"functions": "use tools (functions is OpenAI's deprecated form)",
        "store": "stored chat completions are not kept; use the Responses API for stored conversations",
        "reasoning_effort": "RWKV-5 models have no reasoning mode"}


def _usage(results: list[TurnResult]) -> dict[str, Any]:
    prompt = results[0].usage.prompt_tokens  # the one prompt, counted once as OpenAI does
    completion = sum(r.usage.generated_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached_tokens(results[0])}}


def _check_common(body: ChatCompletionRequest | CompletionRequest, backend: Backend) -> None:
    if body.n > backend.settings.max_n:
        raise bad_request(f"n must be at most {backend.settings.max_n}", "n")


def choices_of(stream: AsyncIterator[Any], n: int, base: int = 0) -> AsyncIterator[Item]:
    """One SDK generate() stream as (choice index, text | TextDelta | TurnResult): with n > 1 (or logprobs asked
    for) the SDK yields TextDelta and TurnResult events carrying their choice, with one choice plain text and the
    TurnResult. A TextDelta with logprobs stays one (its text may be empty), others become their text."""

    async def items() -> AsyncIterator[Item]:
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, str):
                    yield base, event
                elif isinstance(event, TurnResult):
                    yield base + (event.choice if n > 1 else 0), event
                elif isinstance(event, TextDelta) and event.logprobs:
                    yield base + event.choice, event
                elif getattr(event, "text", ""):
                    yield base + event.choice, event.text

    return items()


async def chat_completions(body: ChatCompletionRequest, backend: Backend, api_key: str | None) -> Response:
    """One chat completion (or its stream)."""
    check_unsupported(body, _CHAT_UNSUPPORTED, _WHY)
    if body.modalities not in (None, ["text"]):
        raise unsupported("modalities", "only text")
    _check_common(body, backend)
    messages = tools.offered(body, normalise(body.messages, backend.settings.max_messages))
    sampling = body.sampling(backend.settings, body.max_new_tokens())
    top = None  # alternatives per token in the reply's logprobs; None: no logprobs
    if (wire := wire_logprobs(bool(body.logprobs), body.top_logprobs)) is not None:
        sampling["logprobs"], top = wire, body.top_logprobs or 0
    if (banned := banned_tokens(body.logit_bias)) is not None:
        sampling["banned_tokens"] = banned
    if (constraint := output_format(body.response_format, "response_format")) is not None:
        sampling["response_format"] = constraint
    if (grammar := tools.constraint(body)) is not None:
        if constraint is not None:
            raise bad_request("tools and a response_format cannot both constrain one reply", "response_format")
        sampling["response_format"] = grammar
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    release = backend.acquire()
    stream = backend.client(api_key).generate(
        model=body.model, messages=list(messages), template=body.template, n=body.n,
        timeout=backend.settings.request_timeout_s, **sampling)
    items = choices_of(stream, body.n)
    if not body.stream:
        try:
            results = await collect(items, body.n)
        finally:
            release()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "system_fingerprint": None,
            "choices": [_choice(i, r, bool(body.tools), top) for i, r in enumerate(results)],
            "usage": _usage(results)})
    try:
        stream = await primed(items)
    except BaseException:
        release()
        raise
    return event_stream(_chat_chunks(stream, rid, created, body.model, body.n, include_usage, bool(body.tools), top),
                        release, chat_error_event)


def _choice(index: int, result: TurnResult, with_tools: bool, top: int | None = None) -> dict[str, Any]:
    message, called = tools.reply(result.text) if with_tools else \
        ({"role": "assistant", "content": result.text, "refusal": None}, False)
    logprobs = None if top is None else chat_logprobs(aligned(result.text, result.logprobs), top)
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": "tool_calls" if called else finish_reason(result)}


def _writer(kind: str, rid: str, created: int, model: str, include_usage: bool) -> ChunkWriter:
    return ChunkWriter({"id": rid, "object": kind, "created": created, "model": model, "system_fingerprint": None},
                       include_usage)


async def _chat_chunks(items: AsyncIterator[Item], rid: str, created: int, model: str, n: int,
                       include_usage: bool, with_tools: bool = False, top: int | None = None) -> AsyncIterator[str]:
    """The chunks of a streamed chat completion. With tools a choice's reply is sent whole when it ends (as
    text, or as its tool_calls): a call is only known to be one once its text is complete. With logprobs (`top`
    alternatives) each chunk carries the entries of the tokens its text completes (gateway/logprobs.py)."""
    writer = _writer("chat.completion.chunk", rid, created, model, include_usage)
    chunk = writer.chunk
    # The chunk of one text delta, the hot path, written as the JSON chunk() would write (one dumps per token).
    head, tail = writer.head, writer.tail
    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    results: list[TurnResult | None] = [None] * n
    aligners = [Aligner() for _ in range(n)] if top is not None and not with_tools else []
    async for index, item in items:
        if isinstance(item, TurnResult):
            results[index] = item
            reason = finish_reason(item)
            if with_tools:
                choice = _choice(index, item, True, top)
                delta = {k: v for k, v in choice["message"].items() if k in ("content", "tool_calls")}
                if delta.get("tool_calls"):
                    delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(delta["tool_calls"])]
                yield chunk([{"index": index, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None}])
                reason = choice["finish_reason"]
            elif aligners and (rest := aligners[index].finish()):
                yield chunk([{"index": index, "delta": {"content": ""}, "logprobs": chat_logprobs(rest, top),
                              "finish_reason": None}])  # type: ignore[arg-type]
            yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        elif aligners:
            text, entries = text_and_entries(item)
            if (released := aligners[index].push(text, entries)) or text:
                yield chunk([{"index": index, "delta": {"content": text},
                              "logprobs": chat_logprobs(released, top),  # type: ignore[arg-type]
                              "finish_reason": None}])
        elif item and not with_tools:
            yield (f'{head}{index},"delta":{{"content":{json_text(item)}}},"logprobs":null,'
                   f'"finish_reason":null}}]{tail}')
    if include_usage and all(results):
        yield chunk([], usage=_usage(results))  # type: ignore[arg-type]
    yield sse("[DONE]")


async def completions(body: CompletionRequest, backend: Backend, api_key: str | None) -> Response:
    """A legacy completion of one prompt or a list of prompts (n choices each), or its stream."""
    if body.logprobs is not None and body.echo:
        raise unsupported("echo", "together with logprobs (the prompt's tokens get no logprobs)")
    if body.suffix:
        raise unsupported("suffix", "RWKV completes left to right only")
    if body.best_of not in (None, body.n):
        raise unsupported("best_of", "only best_of equal to n")
    _check_common(body, backend)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise unsupported("prompt", "token-id prompts (give text)")
    if len(prompts) * body.n > backend.settings.max_n:
        raise bad_request(f"prompts x n must be at most {backend.settings.max_n}", "n")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    sampling = body.sampling(backend.settings, body.max_tokens)
    if (banned := banned_tokens(body.logit_bias)) is not None:
        sampling["banned_tokens"] = banned
    top = body.logprobs  # alternatives per token in the legacy logprobs; None: no logprobs
    if (wire := wire_logprobs(top is not None, top, "logprobs")) is not None:
        sampling["logprobs"] = wire
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    n = body.n
    release = backend.acquire()
    client = backend.client(api_key)
    timeout = backend.settings.request_timeout_s
    items = merge([choices_of(client.generate(p, model=body.model, n=n, timeout=timeout, **sampling), n, k * n)
                   for k, p in enumerate(prompts)])
    if not body.stream:
        try:
            results = await collect(items, len(prompts) * n)
        finally:
            release()
        prompt_tokens = sum(results[p * n].usage.prompt_tokens for p in range(len(prompts)))
        completion = sum(r.usage.generated_tokens for r in results)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": None,
            "choices": [{"index": k, "text": (prompts[k // n] if body.echo else "") + r.text,
                         "logprobs": None if top is None else LegacyLogprobs(top).shape(aligned(r.text, r.logprobs)),
                         "finish_reason": finish_reason(r)} for k, r in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion,
                      "prompt_tokens_details": {"cached_tokens": sum(cached_tokens(r) for r in results)}}})
    try:
        stream = await primed(items)
    except BaseException:
        release()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return event_stream(_completion_chunks(stream, rid, created, body.model, prompts, n, body.echo, include_usage,
                                           top), release, chat_error_event)


async def _completion_chunks(items: AsyncIterator[Item], rid: str, created: int, model: str, prompts: list[str],
                             n: int, echo: bool, include_usage: bool, top: int | None = None) -> AsyncIterator[str]:
    writer = _writer("text_completion", rid, created, model, include_usage)
    chunk, head, tail = writer.chunk, writer.head, writer.tail
    if echo:
        for k in range(len(prompts) * n):
            yield chunk([{"index": k, "text": prompts[k // n], "logprobs": None, "finish_reason": None}])
    results: list[TurnResult | None] = [None] * (len(prompts) * n)
    aligners = [Aligner() for _ in results] if top is not None else []
    legacy = [LegacyLogprobs(top) for _ in aligners]  # type: ignore[arg-type]
    async for k, item in items:
        if isinstance(item, TurnResult):
            results[k] = item
            if aligners and (rest := aligners[k].finish()):
                yield chunk([{"index": k, "text": "", "logprobs": legacy[k].shape(rest), "finish_reason": None}])
            yield chunk([{"index": k, "text": "", "logprobs": None, "finish_reason": finish_reason(item)}])
        elif aligners:
            text, entries = text_and_entries(item)
            if (released := aligners[k].push(text, entries)) or text:
                yield chunk([{"index": k, "text": text, "logprobs": legacy[k].shape(released),
                              "finish_reason": None}])
        elif item:
            yield f'{head}{k},"text":{json_text(item)},"logprobs":null,"finish_reason":null}}]{tail}'
    if include_usage and all(results):
        done: list[TurnResult] = results  # type: ignore[assignment]
        prompt_tokens = sum(done[p * n].usage.prompt_tokens for p in range(len(prompts)))
        completion = sum(r.usage.generated_tokens for r in done)
        yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                               "total_tokens": prompt_tokens + completion})
    yield sse("[DONE]")
