"""The Responses API's JSON shapes: the response object, its items, usage, and the typed stream events."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import GatewayError, to_gateway_error
from gateway.logprobs import Aligner, aligned, chat_entry, text_and_entries
from gateway.streams import cached_tokens, sse
from rwkv_serve_client import StopReason, TextDelta, TurnResult


def new_item_id(kind: str = "msg") -> str:
    return f"{kind}_{secrets.token_hex(16)}"


def usage(result: TurnResult) -> dict[str, Any]:
    prompt, generated = result.usage.prompt_tokens, result.usage.generated_tokens
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached_tokens(result)},
            "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + generated}


def output_text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, text: str, status: str,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [output_text_part(text, logprobs)] if status != "in_progress" else []}


def text_logprobs(result: TurnResult, top: int | None) -> list[dict[str, Any]] | None:
    """The output text's logprobs (message.output_text.logprobs with `top` alternatives); None: not asked."""
    return None if top is None else [chat_entry(e, top) for e in aligned(result.text, result.logprobs)]


def input_item(role: str, text: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"id": new_item_id(), "type": "message", "role": role, "status": "completed",
            "content": [{"type": kind, "text": text}]}


def response_object(record: dict[str, Any], *, status: str, output: list[dict[str, Any]],
                    result: TurnResult | None = None) -> dict[str, Any]:
    """The response object as OpenAI returns it, from the request's echo fields in `record`."""
    incomplete = None
    if result is not None and result.stop_reason == StopReason.MAX_TOKENS:
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    return {
        "id": record["id"], "object": "response", "created_at": record["created_at"], "status": status,
        "error": None, "incomplete_details": incomplete, "instructions": record.get("instructions"),
        "max_output_tokens": record.get("max_output_tokens"), "model": record["model"], "output": output,
        "parallel_tool_calls": False, "previous_response_id": record.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "store": record.get("store", True),
        "temperature": record.get("temperature"), "text": {"format": record.get("text_format") or {"type": "text"}},
        "tool_choice": "none",
        "tools": [], "top_p": record.get("top_p"), "truncation": "disabled",
        "usage": usage(result) if result is not None else None, "user": None,
        "metadata": record.get("metadata") or {},
    }


async def events(record: dict[str, Any], items: AsyncIterator[str | TextDelta | TurnResult],
                 on_result: Any, top: int | None = None) -> AsyncIterator[str]:
    """The typed events of a streamed response, numbered by sequence_number. `on_result(result, output)`
    runs when the turn has ended, before response.completed (it stores the record) and returns the record. With
    logprobs (`top` alternatives) each delta carries the entries of the tokens its text completes."""
    seq = 0
    aligner = Aligner() if top is not None else None
    entries: list[dict[str, Any]] = []

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        out = sse({"type": kind, "sequence_number": seq, **fields}, event=kind)
        seq += 1
        return out

    item_id = new_item_id()
    yield event("response.created", response=response_object(record, status="in_progress", output=[]))
    yield event("response.in_progress", response=response_object(record, status="in_progress", output=[]))
    yield event("response.output_item.added", output_index=0, item=message_item(item_id, "", "in_progress"))
    yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                part=output_text_part(""))
    texts: list[str] = []
    try:
        async for item in items:
            if isinstance(item, TurnResult):
                if aligner is not None and (rest := [chat_entry(e, top) for e in aligner.finish()]):  # type: ignore
                    entries += rest
                    yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                                delta="", logprobs=rest)
                text = "".join(texts)
                output = [message_item(item_id, text, "completed", entries)]
                record = await on_result(item, output)
                final = response_object(record, status="completed", output=output, result=item)
                yield event("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                            text=text, logprobs=entries)
                yield event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                            part=output_text_part(text, entries))
                yield event("response.output_item.done", output_index=0, item=output[0])
                kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
                yield event(kind, response=final)
                return
            text, released = text_and_entries(item)
            if aligner is not None:
                released = [chat_entry(e, top) for e in aligner.push(text, released)]  # type: ignore[arg-type]
                entries += released
            if text or released:
                texts.append(text)
                yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                            delta=text, logprobs=released)
    except Exception as exc:  # after the stream started: one error event, numbered like the rest, then the end
        error = to_gateway_error(exc)
        yield event("error", code=error.code, message=error.message, param=error.param)


def error_event(error: GatewayError) -> str:
    """A failure outside events() (none is expected there), as an unnumbered error event."""
    return sse({"type": "error", "code": error.code, "message": error.message, "param": error.param},
               event="error")
