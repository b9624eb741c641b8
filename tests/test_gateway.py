"""The gateway driven by the official openai SDK over HTTP, against a real front and worker (tiny model): models,
chat completions and completions, streamed and not, equal to the gRPC path for the same greedy conversation."""

from __future__ import annotations

import openai
import pytest

from rwkv_serve_client import RWKVClient
from tests.test_gateway_support import MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


CONVERSATION = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Hello there!"}]


def test_models_lists_the_served_model(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        oai.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"


def test_chat_completion_equals_the_grpc_session_turn(oai: openai.OpenAI, service) -> None:
    done = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=12)
    with RWKVClient(service.target) as rwkv:
        session = rwkv.create_session(MODEL, system_prompt="You are a test.", temperature=0, max_tokens=12)
        turn = rwkv.say(session.session_id, "Hello there!")
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == turn.text
    assert choice.finish_reason == ("length" if turn.stop_reason.name == "MAX_TOKENS" else "stop")
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.usage.prompt_tokens > 0  # (the session counts its system prompt in its opening state, not here)
    assert done.usage.completion_tokens == turn.usage.generated_tokens
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_equals_the_whole_reply(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=10)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=0, max_tokens=10,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_equals_grpc_generate_streamed_and_not(oai: openai.OpenAI, service) -> None:
    prompt = "The capital of France is"
    with RWKVClient(service.target) as rwkv:
        expected = rwkv.complete(prompt, model=MODEL, temperature=0, max_tokens=9)
    done = oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=9)
    assert done.choices[0].text == expected.text and done.object == "text_completion"
    assert done.usage.completion_tokens == expected.usage.generated_tokens
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=9, stream=True) if c.choices)
    assert streamed == expected.text
    echoed = oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=9, echo=True)
    assert echoed.choices[0].text == prompt + expected.text


def test_n_choices_sampled_with_a_seed_are_reproducible(oai: openai.OpenAI) -> None:
    def run() -> list[str]:
        done = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=1.0, max_tokens=8, n=3,
                                           seed=1234)
        assert [c.index for c in done.choices] == [0, 1, 2]
        return [c.message.content for c in done.choices]

    first = run()
    assert run() == first  # equal seeds, equal samples
    assert len(set(first)) > 1  # the choices are independent samples, not one reply three times


def test_stop_and_rwkv_extra_fields(oai: openai.OpenAI) -> None:
    free = oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12)
    text = free.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    extra = oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12,
                                   extra_body={"top_k": 1, "penalty_decay": 0.996})
    assert extra.choices[0].text == text  # greedy either way: the extras were accepted and valid


def test_a_resent_conversation_equals_the_grpc_paths_and_hits_the_prefix_cache(oai: openai.OpenAI, service) -> None:
    """A stateless conversation resent in full each round: every reply equals the SDK's generate(messages=...)
    for the same messages, and each round's prompt is found in the prefix cache up to the previous round's end."""
    messages = [{"role": "system", "content": "You are the prefix cache's test."}]
    cached = []
    with RWKVClient(service.target) as rwkv:
        for i in range(4):
            messages.append({"role": "user", "content": f"Question number {i}?"})
            done = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
            grpc = rwkv.complete(model=MODEL, messages=messages, temperature=0, max_tokens=6)
            assert done.choices[0].message.content == grpc.text
            again = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
            assert again.choices[0].message.content == grpc.text  # warm (cached) equals cold
            cached.append(done.usage.prompt_tokens_details.cached_tokens)
            messages.append({"role": "assistant", "content": done.choices[0].message.content})
    # Round 0 finds nothing; each later round finds the boundaries the rounds before it passed (the workers store
    # a boundary per message prefilled), so the cached part grows with the conversation.
    assert cached[0] == 0 and cached[1] > 0 and cached[3] > cached[2] > cached[1], cached


def test_streamed_n_choices_equal_the_whole_ones(oai: openai.OpenAI) -> None:
    args = dict(model=MODEL, messages=CONVERSATION, temperature=1.0, max_tokens=6, n=2, seed=7)
    whole = oai.chat.completions.create(**args)
    texts = ["", ""]
    finishes = [None, None]
    for chunk in oai.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]


def test_a_conversation_through_chat_completions_equals_the_grpc_session(oai: openai.OpenAI, service) -> None:
    """Item 6: the same messages give the same tokens as a session's turns (the workers render both with the
    same template, each piece tokenized as the session tokenizes it)."""
    turns = ["Hello there!", "What is two plus two?", "Thanks."]
    with RWKVClient(service.target) as rwkv:
        session = rwkv.create_session(MODEL, system_prompt="You are a test.", temperature=0, max_tokens=8)
        replies = [rwkv.say(session.session_id, text).text for text in turns]
    messages = [{"role": "system", "content": "You are a test."}]
    for text, reply in zip(turns, replies):
        messages.append({"role": "user", "content": text})
        done = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
        assert done.choices[0].message.content == reply
        messages.append({"role": "assistant", "content": reply})


def test_response_format_constrains_the_output_to_the_schema(oai: openai.OpenAI) -> None:
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    done = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=1.0, max_tokens=40, seed=3,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "count", "schema": schema}})
    value = json.loads(done.choices[0].message.content)  # a random model, yet the reply is the schema's JSON
    assert set(value) == {"n"} and isinstance(value["n"], int) and done.choices[0].finish_reason == "stop"
    anything = oai.chat.completions.create(model=MODEL, messages=CONVERSATION, temperature=1.0, max_tokens=40,
                                           seed=4, response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=CONVERSATION,
                                    response_format={"type": "json_schema", "json_schema": {"name": "x"}})
