"""Turns given as whole messages: rendered with the session templates (each piece tokenized alone), the rules
(INVALID_ARGUMENT), the same tokens and greedy replies as a session's turns, and cached_tokens of a session's first
turn; through the runner (real engine, real Redis) and through a real front and worker with the SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from common.errors import InvalidArgument
from common.store import StateStore
from common.templates import Message, get_template, messages_text, render_messages
from common.worker_api import InputKind, TextDelta, TurnEnded, TurnInput, TurnStarted
from rwkv_serve_client import InvalidArgumentError, RWKVClient
from tests.e2e_fixtures import InprocService, inproc_service, turn_runner
from worker.runner import TurnRunner

MODEL_ID = "tiny"
GREEDY = {"temperature": 0.0, "stop_token_ids": [], "max_tokens": 5}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
async def runner(store: StateStore, tiny_model, tokenizer) -> AsyncIterator[TurnRunner]:
    async with turn_runner(store, tiny_model, tokenizer, model_id=MODEL_ID, max_messages=8) as r:
        yield r


async def run(runner: TurnRunner, turn: TurnInput) -> tuple[str, list[int], TurnEnded, TurnStarted]:
    events = [e async for e in runner.run(turn)]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert isinstance(events[0], TurnStarted) and isinstance(events[-1], TurnEnded)
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], events[-1], events[0]


def test_each_role_renders_as_a_session_feeds_it() -> None:
    chat = get_template("chat")
    conversation = [Message("system", "Be brief."), Message("user", " Hi\n\n\nthere "), Message("assistant", " Hello"),
                    Message("tool", "42", name="calc"), Message("user", "ok")]
    assert render_messages(chat, conversation) == [
        ("System: Be brief.\n\n",),
        ("User: Hi\nthere\n\nAssistant:",),  # exactly the session's user turn (the reply follows it)
        (" Hello", "\n\n"),  # the reply as streamed, then the epilogue: tokenized one by one
        ('Tool: {"name":"calc","content":42}\n\n',),  # the tool-call format's result body; a user turn follows
        ("User: ok\n\nAssistant:",),
    ]
    assert render_messages(chat, [Message("user", "a")]) == [("",), (chat.user_turn("a"),)]
    # An assistant message that does not follow an opening gets one; a later system message is a turn of its own.
    assert render_messages(chat, [Message("assistant", " x"), Message("system", "s"), Message("tool", "t")])[1:] == [
        ("Assistant: x", "\n\n"), ("System: s\n\n",), ("Tool: t\n\nAssistant:",)]
    one = get_template("one-state")
    assert messages_text(one, [Message("system", "S"), Message("user", "u")]) == one.prefix("S") + one.user_turn("u")
    with pytest.raises(InvalidArgument, match="raw has no roles"):
        render_messages(get_template("raw"), [Message("user", "u")])


@pytest.mark.parametrize("turn, match", [
    (TurnInput(messages=(Message("robot", "x"),)), "role is 'robot'"),
    (TurnInput(messages=(Message("user", "x"), Message("assistant", "y"))), "must be user or tool"),
    (TurnInput(messages=(Message("user", "x", name="n"),)), "only for role tool"),
    (TurnInput(messages=(Message("user", "x"),), text="y"), "not both"),
    (TurnInput(messages=tuple(Message("user", str(i)) for i in range(9))), "limit is 8"),
    (TurnInput(messages=(Message("user", "x"),), template="raw"), "raw has no roles"),
    (TurnInput(text="x", template="chat"), "template is for messages"),
    (TurnInput(kind=InputKind.CHAT), "needs a session"),
])
async def test_rule_breaking_messages_are_invalid_argument(runner: TurnRunner, turn: TurnInput, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        await run(runner, turn)


async def test_a_session_system_message_only_opens_a_session_without_one(runner: TurnRunner,
                                                                         store: StateStore) -> None:
    with_prompt = await store.create_session(tenant="t", model=MODEL_ID, template="chat", ttl_ms=60_000,
                                             system_prompt="Be brief.")
    bare = await store.create_session(tenant="t", model=MODEL_ID, template="chat", ttl_ms=60_000)
    system_first = (Message("system", "Be brief."), Message("user", "Hello there"))
    with pytest.raises(InvalidArgument, match="has its system prompt already"):
        await run(runner, TurnInput(session_id=with_prompt.session_id, kind=InputKind.CHAT, messages=system_first))
    with pytest.raises(InvalidArgument, match="may only come first"):
        await run(runner, TurnInput(session_id=bare.session_id, kind=InputKind.CHAT,
                                    messages=(Message("user", "a"), Message("system", "b"), Message("user", "c"))))
    # On the bare session the system message plays the system prompt's part: the same reply as the session that
    # was created with it, and its state opened from the same prefix-cache entry.
    by_prompt = await run(runner, TurnInput(session_id=with_prompt.session_id, kind=InputKind.CHAT,
                                            text="Hello there", sampling=GREEDY))
    by_message = await run(runner, TurnInput(session_id=bare.session_id, kind=InputKind.CHAT, messages=system_first,
                                             sampling=GREEDY))
    assert by_message[:2] == by_prompt[:2]
    assert by_message[2].prompt_tokens == by_prompt[2].prompt_tokens
    assert (by_prompt[2].cached_tokens, by_message[2].cached_tokens) == (0, len(runner.tokenizer.encode(
        get_template("chat").prefix("Be brief."))))


async def test_a_session_and_the_same_messages_give_the_same_tokens_and_greedy_replies(
        runner: TurnRunner, store: StateStore, tokenizer) -> None:
    chat = get_template("chat")
    sid = (await store.create_session(tenant="t", model=MODEL_ID, template="chat", ttl_ms=60_000,
                                      system_prompt="Be brief.")).session_id
    fed = tokenizer.encode(chat.prefix("Be brief."))  # what the session's state has consumed, token by token
    conversation = [Message("system", "Be brief.")]
    for user in ["Hello there", "What is two plus two?", "Tell me a joke"]:
        text, ids, ended, started = await run(runner, TurnInput(session_id=sid, kind=InputKind.CHAT, text=user,
                                                                sampling=GREEDY))
        fed += tokenizer.encode(chat.user_turn(user))
        conversation.append(Message("user", user))
        prompt = await runner.prompts.build(TurnInput(messages=tuple(conversation)), chat)
        assert [t for s in prompt.head for t in s] + prompt.tokens == fed  # the same token ids, piece by piece
        stateless = await run(runner, TurnInput(messages=tuple(conversation), sampling=GREEDY))
        assert stateless[:2] == (text, ids)  # the same greedy reply
        assert stateless[3].prompt_tokens == len(fed)
        assert ended.reason.name == "MAX_TOKENS" and tokenizer.encode(text) == ids  # the reply re-tokenizes as is
        fed += ids + tokenizer.encode(chat.epilogue())
        conversation.append(Message("assistant", text))
        assert ended.state_tokens == len(fed)


async def test_session_turn_messages_continue_the_session(runner: TurnRunner, store: StateStore) -> None:
    a, b = [await store.create_session(tenant="t", model=MODEL_ID, template="chat", ttl_ms=60_000) for _ in "ab"]
    first = await run(runner, TurnInput(session_id=a.session_id, kind=InputKind.CHAT, text="Hi", sampling=GREEDY))
    second = await run(runner, TurnInput(session_id=a.session_id, kind=InputKind.CHAT, text="More", sampling=GREEDY))
    # Session b gets the whole exchange in one turn: the same state, so the same reply to the last message.
    both = await run(runner, TurnInput(session_id=b.session_id, kind=InputKind.CHAT, sampling=GREEDY, messages=(
        Message("user", "Hi"), Message("assistant", first[0]), Message("user", "More"))))
    assert both[:2] == second[:2] and both[2].state_tokens == second[2].state_tokens
    assert both[2].state_version == 1


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model, tokenizer) -> Iterator[InprocService]:
    with inproc_service(redis_url, 7, tiny_model, tokenizer, front={"max_messages": 6}) as service:
        yield service


def test_messages_through_the_front_and_the_sdk(service: InprocService) -> None:
    with RWKVClient(service.target) as client:
        session = client.create_session(MODEL_ID, system_prompt="Be brief.")
        said = client.say(session.session_id, "Hello there", **GREEDY)
        conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
        done = client.complete(model=MODEL_ID, messages=conversation, **GREEDY)
        assert done.text == said.text and done.usage.prompt_tokens == said.usage.prompt_tokens
        assert done.usage.cached_tokens > 0  # the system prompt's state, built by the session's first turn
        streamed = list(client.generate(model=MODEL_ID, messages=conversation, **GREEDY))
        assert "".join(s for s in streamed if isinstance(s, str)) == said.text
        chat_text = "".join(x for x in client.chat(client.create_session(MODEL_ID).session_id,
                                                   messages=[("user", "Hi")], **GREEDY) if isinstance(x, str))
        assert chat_text == client.complete(model=MODEL_ID, messages=[("user", "Hi")], **GREEDY).text
        for bad, match in [
            ({"messages": [("user", "a")] * 7}, "limit is 6"),
            ({"messages": [("assistant", "a")]}, "must be user or tool"),
            ({"prompt": "p", "messages": [("user", "a")]}, "not both"),
            ({"template": "one_state", "prompt": "p"}, "template is for messages"),
            ({}, "no input"),
        ]:
            request = dict(bad)
            prompt = request.pop("prompt", "")
            with pytest.raises((InvalidArgumentError, ValueError), match=match):
                client.complete(prompt, model=MODEL_ID, **request)
