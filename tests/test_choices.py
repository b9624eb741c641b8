"""n > 1 choices: one prefilled prompt forked n times, each choice its own deltas and turn_end (ChatEvent.choice),
seeds seed, seed+1, ...; only for requests that commit nothing; relayed by the front and collected by the SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from common.errors import InvalidArgument
from common.store import StateStore
from common.templates import Message
from common.worker_api import InputKind, TextDelta, TurnEnded, TurnInput, TurnStarted
from rwkv_serve_client import Choices, InvalidArgumentError, RWKVClient
from rwkv_serve_client import TextDelta as SdkDelta
from rwkv_serve_client import TurnResult as SdkResult
from tests.e2e_fixtures import InprocService, inproc_service, turn_runner
from worker.runner import TurnRunner

MODEL_ID = "tiny"
SAMPLED = {"temperature": 1.0, "stop_token_ids": [], "max_tokens": 6}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
async def runner(store: StateStore, tiny_model, tokenizer) -> AsyncIterator[TurnRunner]:
    async with turn_runner(store, tiny_model, tokenizer, max_batch=8, model_id=MODEL_ID, max_choices=4) as r:
        yield r


async def choices(runner: TurnRunner, turn: TurnInput) -> tuple[list[str], list[TurnEnded], list[TurnStarted]]:
    events = [e async for e in runner.run(turn)]
    texts = ["".join(e.text for e in events if isinstance(e, TextDelta) and e.choice == i) for i in range(turn.n)]
    ends = sorted((e for e in events if isinstance(e, TurnEnded)), key=lambda e: e.choice)
    return texts, ends, [e for e in events if isinstance(e, TurnStarted)]


async def test_n_choices_share_one_prefill_and_end_each(runner: TurnRunner) -> None:
    turn = TurnInput(messages=(Message("user", "Tell me something"),), n=3, sampling={**SAMPLED, "seed": 11})
    texts, ends, starts = await choices(runner, turn)
    assert [e.choice for e in ends] == [0, 1, 2] and sorted(s.choice for s in starts) == [0, 1, 2]
    assert len(set(texts)) == 3  # three samples at temperature 1
    assert {e.prompt_tokens for e in ends} == {starts[0].prompt_tokens + 1}  # the whole prompt (+ the closing)
    assert all(e.generated_tokens == 6 for e in ends)
    # Seeded: the same request gives the same choices, and choice i is what seed + i gives.
    assert (await choices(runner, turn))[0] == texts
    shifted = await choices(runner, TurnInput(messages=turn.messages, n=2, sampling={**SAMPLED, "seed": 12}))
    assert shifted[0] == texts[1:]
    greedy, _, _ = await choices(runner, TurnInput(text="Once upon", n=2, sampling={**SAMPLED, "temperature": 0.0}))
    assert greedy[0] == greedy[1]  # a raw prompt: both choices start from the same prefilled state


async def test_n_is_bounded_and_only_for_turns_that_commit_nothing(runner: TurnRunner, store: StateStore) -> None:
    meta = await store.create_session(tenant="t", model=MODEL_ID, template="chat", ttl_ms=60_000)
    with pytest.raises(InvalidArgument, match="commits nothing"):
        await choices(runner, TurnInput(session_id=meta.session_id, kind=InputKind.CHAT, text="hi", n=2))
    with pytest.raises(InvalidArgument, match="limit is 4"):
        await choices(runner, TurnInput(text="hi", n=5))
    texts, ends, _ = await choices(runner, TurnInput(session_id=meta.session_id, text="hi", n=2, commit=False,
                                                     sampling=SAMPLED))
    assert len(texts) == 2 and all(e.state_version == 0 for e in ends)
    assert (await store.get_session(meta.session_id)).version == 0  # ephemeral: nothing committed


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model, tokenizer) -> Iterator[InprocService]:
    with inproc_service(redis_url, 9, tiny_model, tokenizer, front={"max_choices": 3}) as service:
        yield service


def test_choices_through_the_front_and_the_sdk(service: InprocService) -> None:
    with RWKVClient(service.target) as client:
        done = client.complete(model=MODEL_ID, messages=[("user", "Hi")], n=3, seed=5, **SAMPLED)
        assert isinstance(done, Choices) and [c.choice for c in done.choices] == [0, 1, 2]
        assert done.usage.generated_tokens == 18 and done.usage.prompt_tokens == done.choices[0].usage.prompt_tokens
        items = list(client.generate(model=MODEL_ID, messages=[("user", "Hi")], n=3, seed=5, **SAMPLED))
        streamed = ["".join(i.text for i in items if isinstance(i, SdkDelta) and i.choice == c) for c in range(3)]
        assert streamed == done.texts
        assert sorted(i.choice for i in items if isinstance(i, SdkResult)) == [0, 1, 2]
        session = client.create_session(MODEL_ID)
        for bad, match in [({"n": 4}, "n must be 1-3"), ({"n": 2, "session_id": session.session_id},
                                                        "commits nothing")]:
            with pytest.raises(InvalidArgumentError, match=match):
                client.complete("p", **({"model": MODEL_ID} | bad))
        ephemeral = client.complete("p", session_id=session.session_id, ephemeral=True, n=2, **SAMPLED)
        assert len(ephemeral.choices) == 2 and client.get_session(session.session_id).state_version == 0
