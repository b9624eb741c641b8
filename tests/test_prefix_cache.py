"""The shared prefix-state cache: a resent conversation resumes from its longest cached message boundary on any
worker, cached_tokens says how much was found, and the replies are those of a cold run (fp32 and bf16 storage, the
cache off); bad entries are ignored and rebuilt; the total size per model stays within its bound (LRU)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from common.store import StateStore
from common.templates import Message, get_template
from common.worker_api import InputKind, TextDelta, TurnEnded, TurnInput
from tests.e2e_fixtures import turn_runner
from worker.runner import TurnRunner
from worker.state import state_from_bytes, state_to_bytes

MODEL_ID = "tiny"
GREEDY = {"temperature": 0.0, "stop_token_ids": [], "max_tokens": 6}
USERS = ["Hello there", "What is two plus two?", "Tell me a joke", "Another one", "Thanks"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
async def make_runner(store: StateStore, tiny_model, tokenizer) -> AsyncIterator[Callable[..., Awaitable[TurnRunner]]]:
    """Runners as separate workers would be (each its own engine and local cache) on the same Redis."""
    async with contextlib.AsyncExitStack() as stack:
        made: list[TurnRunner] = []

        async def make(**config) -> TurnRunner:
            made.append(await stack.enter_async_context(
                turn_runner(store, tiny_model, tokenizer, model_id=MODEL_ID, worker_id=f"w{len(made) + 1}", **config)))
            return made[-1]

        yield make


async def reply(runner: TurnRunner, messages: list[Message]) -> tuple[str, TurnEnded]:
    events = [e async for e in runner.run(TurnInput(messages=tuple(messages), sampling=GREEDY))]
    await runner.prefixes.flush()  # the boundaries are written in the background
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


async def conversation(runner: TurnRunner, rounds: int = len(USERS)) -> list[tuple[str, TurnEnded]]:
    """A stateless chat resent in full each round (the assistant messages are the replies)."""
    messages, out = [Message("system", "Be brief.")], []
    for user in USERS[:rounds]:
        messages.append(Message("user", user))
        text, ended = await reply(runner, messages)
        out.append((text, ended))
        messages.append(Message("assistant", text))
    return out


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
async def test_warm_rounds_reuse_the_previous_rounds_and_reply_as_cold_ones(make_runner, store: StateStore,
                                                                         storage: str, tokenizer) -> None:
    warm = await conversation(await make_runner(state_storage_dtype=storage))
    cached = [ended.cached_tokens for _, ended in warm]
    prompts = [ended.prompt_tokens for _, ended in warm]
    assert cached[0] == 0 and all(b > a for a, b in zip(cached[1:], cached[2:]))  # grows with the conversation
    assert all(p - c < prompts[0] + 2 * GREEDY["max_tokens"] + 20 for p, c in zip(prompts, cached))  # new part only
    entries, size = await store.prefix_usage(MODEL_ID)
    assert entries >= 2 * len(USERS) - 1 and size > 0
    cold = await conversation(await make_runner(state_storage_dtype=storage, prefix_cache=False))
    assert [t for t, _ in cold] == [t for t, _ in warm]  # the cache changes no output
    assert all(ended.cached_tokens == 0 for _, ended in cold)
    # Another worker, same Redis, the same last request: everything but its last message comes from the cache (the
    # last round stored every boundary it passed).
    other = await make_runner(state_storage_dtype=storage)
    messages = [Message("system", "Be brief.")]
    for user, (text, _) in zip(USERS, warm):
        messages += [Message("user", user), Message("assistant", text)]
    messages[-1:] = []
    again_text, again = await reply(other, messages)
    chat = get_template("chat")
    last = len(tokenizer.encode(chat.user_turn(USERS[-1]))) + len(tokenizer.encode(chat.epilogue()))
    assert again_text == warm[-1][0] and again.cached_tokens == again.prompt_tokens - last


async def test_a_session_first_turn_and_a_stateless_chat_share_the_system_prompt_entry(
        make_runner, store: StateStore) -> None:
    runner = await make_runner()
    _, first = await reply(runner, [Message("system", "Be brief."), Message("user", "Hi")])
    sid = (await store.create_session(tenant="t", model=MODEL_ID, template="chat", ttl_ms=60_000,
                                      system_prompt="Be brief.")).session_id
    events = [e async for e in runner.run(TurnInput(session_id=sid, text="Hi", sampling=GREEDY,
                                                    kind=InputKind.CHAT))]
    assert first.cached_tokens == 0 and events[-1].cached_tokens > 0


async def test_unreadable_and_foreign_entries_are_ignored_and_rebuilt(make_runner, store: StateStore,
                                                                     tiny_model) -> None:
    runner = await make_runner()
    messages = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", " Yo"),
                Message("user", "Again")]
    text, _ = await reply(runner, messages)
    keys = [k async for k in store.redis.scan_iter(match=store.keys.prefix_state(MODEL_ID, "*"))]
    assert len(keys) == 3
    good = {k: await store.redis.get(k) for k in keys}
    for i, key in enumerate(keys):  # damaged bytes, and records of another model
        state, consumed = state_from_bytes(good[key], tiny_model.fingerprint)
        foreign = state_to_bytes(state, bytes(len(tiny_model.fingerprint)), consumed)
        await store.redis.set(key, b"garbage" if i % 2 else foreign)
    again, ended = await reply(await make_runner(), messages)
    assert again == text and ended.cached_tokens == 0  # nothing usable was found: a cold run
    assert {k: await store.redis.get(k) for k in keys} == good  # rebuilt, bit for bit


async def test_the_total_size_per_model_is_bounded_least_recently_used_first(store: StateStore) -> None:
    model = "bounded"  # a model of its own: the other tests leave entries of theirs in the shared Redis
    record = b"x" * 1000
    digests = [f"{i:064x}" for i in range(6)]
    for digest in digests[:3]:
        assert await store.put_prefix(model, digest, record, ttl_ms=60_000, max_bytes=3000) == 0
        await asyncio.sleep(0.003)  # last use is kept in ms: uses within one ms are equally recent
    assert await store.find_prefix(model, digests[:1], 60_000) == 1  # used: now the most recent
    assert await store.put_prefix(model, digests[3], record, ttl_ms=60_000, max_bytes=3000) == 1
    assert await store.prefix_usage(model) == (3, 3000)
    assert [await store.find_prefix(model, [d], 60_000) for d in digests[:4]] == [1, 0, 1, 1]  # 1 went
    assert await store.put_prefix(model, digests[4], b"y" * 4000, ttl_ms=60_000, max_bytes=3000) == -1
    assert await store.put_prefix(model, digests[0], record, ttl_ms=60_000, max_bytes=3000) == 0  # rewritten
    assert await store.prefix_usage(model) == (3, 3000)
