"""The Responses API on sessions: a stored response is (session id, state version) plus its own metadata.

- No previous_response_id: a new session (the conversation), its system prompt the `instructions` (and any
  system messages at the start of the input), then one turn.
- previous_response_id naming the latest response of its conversation: the next turn on that session, sent
  with expected_state_version = the response's version (nothing else can slip in between).
- previous_response_id naming an earlier one (the session moved on: a branch): the session is forked at that
  version (ForkSession.state_version; kept while it is among the session's keep_versions latest), and the turn
  runs on the fork. A version no longer kept: 404 saying that its state was evicted.
- store: false keeps nothing: a stateless completion, or an ephemeral turn on the previous response's session.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from gateway.backend import Backend
from gateway.errors import GatewayError, bad_request, unsupported
from gateway.logprobs import wire_logprobs
from gateway.render import Message
from gateway.response_shapes import (
    error_event,
    events,
    input_item,
    message_item,
    new_item_id,
    response_object,
    text_logprobs,
)
from gateway.response_store import ResponseStore, new_response_id
from gateway.schemas import ResponseRequest, check_unsupported, message_text, output_format
from gateway.streams import event_stream, primed
from rwkv_serve_client import AsyncRWKVClient, TurnResult
from rwkv_serve_client import errors as sdk

_UNSUPPORTED = ("tools", "max_tool_calls", "reasoning", "background", "conversation", "prompt")
_LOGPROBS = "message.output_text.logprobs"  # the `include` entry that asks for the output text's logprobs
_WHY = {"tools": "this server has no tool calling", "reasoning": "RWKV-5 models have no reasoning mode",
        "background": "responses run in the foreground only",
        "conversation": "use previous_response_id (each response keeps its conversation's state)",
        "prompt": "stored prompt templates are not kept here"}


def _messages(body: ResponseRequest, max_messages: int) -> list[Message]:
    items = [Message("user", body.input)] if isinstance(body.input, str) else []
    if not isinstance(body.input, str):
        if len(body.input) > max_messages:
            raise bad_request(f"at most {max_messages} input items are allowed, got {len(body.input)}", "input")
        for i, item in enumerate(body.input):
            if item.type not in (None, "message") or item.role is None:
                raise unsupported(f"input[{i}].type", f"input items of type {item.type!r} (only messages)")
            role = "system" if item.role == "developer" else item.role
            items.append(Message(role, message_text(item.content, f"input[{i}].content")))
    if not items:
        raise bad_request("input must not be empty", "input")
    return items


def _turn_input(messages: list[Message]) -> dict[str, Any]:
    """A session turn's input: the text of one user message (exactly a gRPC chat turn), else the messages."""
    if len(messages) == 1 and messages[0].role == "user":
        return {"text": messages[0].content}
    if any(m.role == "system" for m in messages):
        raise unsupported("input", "system messages in a continued conversation (its system prompt is set when it "
                                   "starts: use instructions on the first response)")
    if messages[-1].role != "user":
        raise bad_request("the last input item must be the user's message (the reply follows it)", "input")
    return {"messages": list(messages)}


def _check(body: ResponseRequest, backend: Backend) -> None:
    check_unsupported(body, _UNSUPPORTED, _WHY)
    if body.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", "this server has no tool calling")
    metadata = body.metadata or {}
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise bad_request("metadata has at most 16 entries, keys of at most 64 characters and values of at most 512",
                          "metadata")


async def create(body: ResponseRequest, backend: Backend, store: ResponseStore, api_key: str | None) -> Response:
    """POST /v1/responses."""
    _check(body, backend)
    settings = backend.settings
    messages = _messages(body, settings.max_messages)
    sampling = body.sampling(settings, body.max_output_tokens)
    top = None  # alternatives per token in the output text's logprobs; None: no logprobs
    if (wire := wire_logprobs(_LOGPROBS in (body.include or []) or bool(body.top_logprobs),
                              body.top_logprobs)) is not None:
        sampling["logprobs"], top = wire, body.top_logprobs or 0
    if (constraint := output_format(body.text.format if body.text else None, "text.format")) is not None:
        sampling["response_format"] = constraint
    tenant = await backend.tenant(api_key) if (body.store or body.previous_response_id) else ""
    prev = await store.get(body.previous_response_id, tenant) if body.previous_response_id else None
    if prev is not None and prev["model"] != body.model:
        raise bad_request(f"previous response {prev['id']} ran on model {prev['model']!r}: a conversation's state "
                          "only works with its own model", "model")
    record: dict[str, Any] = {
        "id": new_response_id(), "tenant": tenant, "model": body.model, "created_at": int(time.time()),
        "instructions": body.instructions, "previous_response_id": body.previous_response_id,
        "metadata": body.metadata or {}, "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "text_format": (body.text.format if body.text and body.text.format else None) or {"type": "text"},
        "input_items": [input_item(m.role, m.content) for m in messages],
    }
    client = backend.client(api_key)
    release = backend.acquire()
    try:
        stream = await primed(_indexed(await _start(body, client, prev, messages, sampling, settings, record)))
    except BaseException:
        release()
        raise

    async def on_result(result: TurnResult, output: list[dict[str, Any]]) -> dict[str, Any]:
        record["output"] = output
        record["result"] = {"stop_reason": int(result.stop_reason), "prompt_tokens": result.usage.prompt_tokens,
                            "generated_tokens": result.usage.generated_tokens,
                            "cached_tokens": getattr(result.usage, "cached_tokens", 0) or 0}
        record["state_version"] = result.state_version
        record["conversation_instructions"] = (prev or {}).get("conversation_instructions", body.instructions)
        if body.store:
            await store.put(record)
        return record

    if not body.stream:
        try:
            results = [item async for _, item in stream if isinstance(item, TurnResult)]
            output = [message_item(new_item_id(), results[-1].text, "completed", text_logprobs(results[-1], top))]
            await on_result(results[-1], output)
        finally:
            release()
        return JSONResponse(response_object(record, status="completed", output=output, result=results[-1]))
    return event_stream(events(record, _texts(stream), on_result, top), release, error_event)


async def _indexed(items: AsyncIterator[str | TurnResult]) -> AsyncIterator[tuple[int, str | TurnResult]]:
    async with contextlib.aclosing(items) as stream:
        async for item in stream:
            yield 0, item


async def _texts(items: AsyncIterator[tuple[int, str | TurnResult]]) -> AsyncIterator[str | TurnResult]:
    async with contextlib.aclosing(items) as stream:
        async for _, item in stream:
            yield item


async def _start(body: ResponseRequest, client: AsyncRWKVClient, prev: dict[str, Any] | None,
                 messages: list[Message], sampling: dict[str, Any], settings: Any,
                 record: dict[str, Any]) -> AsyncIterator[str | TurnResult]:
    """The turn's SDK stream; record["session_id"] is set to the session it runs on ("" when nothing is kept)."""
    sampling = {**sampling, "timeout": settings.request_timeout_s}  # (the SDK's turns have no default deadline)
    record["session_id"] = ""
    if prev is None:
        lead = 0
        while lead < len(messages) and messages[lead].role == "system":
            lead += 1
        system_prompt = "\n".join(s for s in [body.instructions or "", *(m.content for m in messages[:lead])] if s)
        rest = messages[lead:]
        if not rest:
            raise bad_request("input has no user message", "input")
        if not body.store:  # a stateless completion of the conversation
            opening = [Message("system", system_prompt)] if system_prompt else []
            return client.generate(model=body.model, messages=[*opening, *rest], **sampling)
        turn = _turn_input(rest)
        session = await client.create_session(body.model, system_prompt=system_prompt, ttl=settings.responses_ttl_s,
                                              keep_versions=settings.responses_keep_versions,
                                              metadata={"created_by": "rwkv-gateway"})
        record["session_id"] = session.session_id
        return _owned(client, session.session_id, client.chat(session.session_id, **turn, **sampling))
    if body.instructions and body.instructions != prev.get("conversation_instructions"):
        raise unsupported("instructions", "new instructions on a continued conversation (its state holds the "
                                          "first ones: a session's system prompt is set before its first turn)")
    turn = _turn_input(messages)
    return _continuation(client, prev, turn, sampling, settings, record)


async def _continuation(client: AsyncRWKVClient, prev: dict[str, Any], turn: dict[str, Any],
                        sampling: dict[str, Any], settings: Any,
                        record: dict[str, Any]) -> AsyncIterator[str | TurnResult]:
    """The next turn after `prev`: on its session at its version; when the session has moved on (a branch), on a
    fork of the session at that version. store: false runs it ephemeral (the state is read, never written)."""
    sid, version = prev["session_id"], prev["state_version"]

    def run(session_id: str, at: int) -> AsyncIterator[str | TurnResult]:
        if not _keeps(record):
            kwargs = {"messages": turn.get("messages") or [{"role": "user", "content": turn["text"]}]}
            return client.generate(session_id=session_id, ephemeral=True, expected_state_version=at, **kwargs,
                                   **sampling)
        return client.chat(session_id, expected_state_version=at, **turn, **sampling)

    fork = None
    try:
        stream = run(sid, version)
        try:
            first = await stream.__anext__()
            record["session_id"] = sid
        except sdk.VersionConflictError:  # the conversation went on after prev: branch from prev's version
            await stream.aclose()
            try:
                fork = await client.fork_session(sid, state_version=version, ttl=settings.responses_ttl_s)
            except sdk.NotFoundError:
                raise _evicted(prev, settings) from None
            if fork.state_version != version:  # a front that cannot fork at a version copies the current state
                raise GatewayError(409, f"response {prev['id']} is no longer the latest of its conversation, and "
                                        "this deployment's front cannot fork a session at an earlier version "
                                        "(ForkSession.state_version): branching is unavailable",
                                   param="previous_response_id", code="branching_unavailable")
            stream = run(fork.session_id, fork.state_version)
            first = await stream.__anext__()
            record["session_id"] = fork.session_id
        async with contextlib.aclosing(stream):
            yield first
            async for item in stream:
                yield item
                if isinstance(item, TurnResult):
                    fork = None if _keeps(record) else fork  # a kept branch stays; an ephemeral one goes
    except sdk.SessionNotFoundError:
        raise _evicted(prev, settings) from None
    except sdk.SessionBusyError:
        raise GatewayError(409, f"the conversation of response {prev['id']} is generating another response; retry "
                                "when it is complete", param="previous_response_id",
                           code="conversation_busy") from None
    finally:
        if fork is not None:  # a branch whose turn failed, or an ephemeral one: nothing refers to it
            with contextlib.suppress(Exception):
                await client.delete_session(fork.session_id)


def _keeps(record: dict[str, Any]) -> bool:
    """Whether this request keeps its response (store: true)."""
    return bool(record.get("store", True))


def _evicted(prev: dict[str, Any], settings: Any) -> GatewayError:
    return GatewayError(404, f"the state of response {prev['id']} was evicted: its conversation expired, was "
                             f"deleted, or went more than {settings.responses_keep_versions} responses past it "
                             "(RWKV_GATEWAY_RESPONSES_KEEP_VERSIONS)", param="previous_response_id",
                        code="state_evicted")


async def _owned(client: AsyncRWKVClient, session_id: str,
                 items: AsyncIterator[str | TurnResult]) -> AsyncIterator[str | TurnResult]:
    """A new conversation's first turn; when it fails or is abandoned, its session goes too."""
    done = False
    try:
        async with contextlib.aclosing(items) as stream:
            async for item in stream:
                done = done or isinstance(item, TurnResult)
                yield item
    finally:
        if not done:
            with contextlib.suppress(Exception):
                await client.delete_session(session_id)


async def retrieve(response_id: str, backend: Backend, store: ResponseStore, api_key: str | None) -> JSONResponse:
    record = await store.get(response_id, await backend.tenant(api_key))
    return JSONResponse(_stored(record))


def _stored(record: dict[str, Any]) -> dict[str, Any]:
    from gateway.response_shapes import usage
    from rwkv_serve_client import StopReason, Usage

    r = record["result"]
    result = TurnResult("", "", StopReason(r["stop_reason"]), Usage(r["prompt_tokens"], r["generated_tokens"], 0),
                        record["state_version"])
    body = response_object(record, status="completed", output=record["output"], result=result)
    body["usage"] = usage(result)
    body["usage"]["input_tokens_details"]["cached_tokens"] = r.get("cached_tokens", 0)
    return body


async def delete(response_id: str, backend: Backend, store: ResponseStore, api_key: str | None) -> JSONResponse:
    record = await store.get(response_id, await backend.tenant(api_key))
    left = await store.delete(record)
    if left == 0:  # the conversation's last stored response: its session (and states) go too
        with contextlib.suppress(sdk.NotFoundError):
            await backend.client(api_key).delete_session(record["session_id"])
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def input_items(response_id: str, backend: Backend, store: ResponseStore, api_key: str | None, *,
                      limit: int, order: str, after: str | None) -> JSONResponse:
    if not 1 <= limit <= 100:
        raise bad_request("limit must be between 1 and 100", "limit")
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", "order")
    record = await store.get(response_id, await backend.tenant(api_key))
    items = list(record["input_items"])
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise bad_request(f"no input item {after!r} in response {response_id}", "after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})
