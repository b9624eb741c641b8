"""Request bodies of the OpenAI endpoints (pydantic: a bad body is a 400 naming the parameter), and their sampling.

Unknown parameters are refused (400 "unrecognized request argument"), as OpenAI does; parameters OpenAI has and
this server does not implement are typed loosely and refused by `check_unsupported` when they ask for
something (null / empty / the default passes). RWKV's own sampling fields come as extra body fields (`top_k`,
`penalty_decay`; the openai SDKs send them with `extra_body`).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import bad_request, unsupported
from gateway.settings import GatewaySettings


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Loose):
    include_usage: bool = False


class Sampled(_Body):
    """Sampling parameters every generating endpoint takes."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: Union[str, list[str], None] = None
    # RWKV extras (extra_body)
    top_k: int | None = Field(None, ge=0)
    penalty_decay: float | None = Field(None, ge=0, le=1)
    user: str | None = None  # accepted and unused (OpenAI's abuse-monitoring id)

    def sampling(self, settings: GatewaySettings, max_tokens: int | None) -> dict[str, Any]:
        """The SDK's sampling keyword arguments (unset fields stay unset: the session's or server's default)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > settings.max_stop:
            raise bad_request(f"at most {settings.max_stop} stop sequences are allowed", "stop")
        if any(not s for s in stops):
            raise bad_request("a stop sequence must not be empty", "stop")
        if max_tokens is not None and not 1 <= max_tokens <= settings.max_tokens_cap:
            raise bad_request(f"max tokens must be between 1 and {settings.max_tokens_cap}, not {max_tokens}",
                              "max_tokens")
        fields = dict(temperature=self.temperature, top_p=self.top_p, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty, seed=self.seed, top_k=self.top_k,
                      penalty_decay=self.penalty_decay, max_tokens=max_tokens, stop_strings=stops or None)
        return {k: v for k, v in fields.items() if v is not None}


def banned_tokens(logit_bias: dict[str, Any] | None) -> list[int] | None:
    """OpenAI's logit_bias where it means a ban (-100, "should result in a ban or exclusive selection"): those
    token ids are never sampled. Other biases are refused (the sampler has no per-token bias)."""
    if not logit_bias:
        return None
    banned = []
    for key, value in logit_bias.items():
        if not str(key).isdigit():
            raise bad_request(f"logit_bias keys are token ids, not {key!r}", "logit_bias")
        if not isinstance(value, (int, float)) or value > -100:
            raise unsupported("logit_bias", f"a bias of {value!r} (only -100, which bans the token)")
        banned.append(int(key))
    return banned


def output_format(fmt: dict[str, Any] | None, param: str) -> dict[str, Any] | None:
    """OpenAI's response_format (chat) / text.format (Responses) -> the SDK's response_format sampling field
    (Sampling.response_format: the output is constrained to it): json_object is any JSON object, json_schema its
    schema (chat nests it under "json_schema", Responses has it flat). text / unset: no constraint."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema", fmt) if param == "response_format" else fmt  # type: ignore[union-attr]
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request(f"{param} of type json_schema needs a schema object", param)
        return {"json_schema": schema}
    raise unsupported(param, f"type {kind!r} (text, json_object or json_schema)")


def check_unsupported(body: BaseModel, names: tuple[str, ...], why: dict[str, str] | None = None) -> None:
    """400 for any of `names` set to something other than null, false, empty or "none"."""
    for name in names:
        value = getattr(body, name, None)
        if value in (None, False, [], {}, "none", "auto", "disabled") or (name == "n" and value == 1):
            continue
        raise unsupported(name, (why or {}).get(name, ""))


class ContentPart(_Loose):
    type: str
    text: str | None = None


class ChatMessageIn(_Loose):
    """One message of a chat completion; assistant messages echoed back by clients carry null extras, accepted."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(Sampled):
    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    template: Literal["chat", "one-state"] | None = None  # RWKV extra: the chat format (default chat)
    # OpenAI parameters accepted only when they ask for nothing (check_unsupported)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Sampled):
    model: str = Field(min_length=1)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions
    n: int = Field(1, ge=1)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    logit_bias: dict[str, Any] | None = None


class InputItem(_Loose):
    """One item of a response's input: a message (role + text or content parts)."""

    type: str | None = None  # "message" or absent
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: Union[str, list[ContentPart], None] = None


class TextConfig(_Loose):
    format: dict[str, Any] | None = None


class ResponseRequest(Sampled):
    model: str = Field(min_length=1)
    input: Union[str, list[InputItem]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # accepted only when they ask for nothing
    tools: list[Any] | None = None
    tool_choice: Any = None
    max_tool_calls: int | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


def message_text(content: Union[str, list[ContentPart], None], param: str) -> str:
    """The text of a message's content: a string, or text parts (other kinds of part are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type not in ("text", "input_text", "output_text") or part.text is None:
            raise unsupported(f"{param}[{i}]", f"content parts of type {part.type!r} (only text is)")
        texts.append(part.text)
    return "".join(texts)
