"""State-tuned files as session presets: registered in a real Redis, a session created with the preset starts
from that state in the worker's runner (its first logits equal the model run from the file directly)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.errors import StateCorrupt
from common.store import StateStore
from common.worker_api import InputKind, TextDelta, TurnInput
from tests.e2e_fixtures import turn_runner
from tuning.presets import PresetExists, app, list_presets, register_preset
from worker.checkpoint import make_random_checkpoint
from worker.runner import TurnRunner
from worker.state import State, StateFormatError, load_time_state, state_from_bytes

MODEL_ID = "tiny-rwkv5"  # the conftest checkpoint's file stem: the id a worker serves it under by default


pytestmark = pytest.mark.usefixtures("one_thread")




def write_state(path: Path, model, seed: int) -> Path:
    """A state file as RWKV-PEFT writes one: blocks.N.att.time_state [H, N_v, N_k]."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    torch.save({f"blocks.{i}.att.time_state": torch.randn(c.n_head, c.head_size, c.head_size, generator=g)
                for i in range(c.n_layer)}, path)
    return path


def initial(path: Path, model) -> State:
    c = model.config
    return load_time_state(path, c.n_layer, c.n_head, c.head_size, c.n_embd)


@pytest.fixture
async def runner(store: StateStore, tiny_model, tokenizer) -> AsyncIterator[TurnRunner]:
    """The worker's turn runner (engine + store), without gRPC."""
    async with turn_runner(store, tiny_model, tokenizer, model_id=MODEL_ID) as r:
        yield r


async def chat(runner: TurnRunner, store: StateStore, text: str, **session) -> tuple[list[int], list[float]]:
    """One greedy chat turn in a new session; returns its tokens and their log-probabilities."""
    sid = (await store.create_session(tenant="t", model=MODEL_ID, template="chat", ttl_ms=60_000, **session)).session_id
    turn = TurnInput(session_id=sid, kind=InputKind.CHAT, text=text,
                     sampling={"temperature": 0.0, "stop_token_ids": [], "max_tokens": 4, "logprobs": 1})
    deltas = [e async for e in runner.run(turn) if isinstance(e, TextDelta)]
    return [t for d in deltas for t in d.token_ids], [lp.logprob for d in deltas for lp in d.logprobs]


def direct(model, state: State | None, tokens: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens straight from the model, and the first step's log-probabilities."""
    logits, state = model.forward(torch.tensor([tokens]), state or model.init_state(1))
    first = torch.log_softmax(logits[0], -1)
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits, state = model.forward(torch.tensor([[out[-1]]]), state)
    return out, first


async def test_register_stores_the_state_record(redis_url, store, tiny_checkpoint, tiny_model, tmp_path):
    state_file = write_state(tmp_path / "state.pth", tiny_model, seed=1)
    used = await asyncio.to_thread(register_preset, redis_url, tiny_checkpoint, state_file, "pydoc")
    assert used == MODEL_ID
    state, consumed = state_from_bytes(await store.get_preset(MODEL_ID, "pydoc"), tiny_model.fingerprint)
    assert consumed == 0 and state.equal(initial(state_file, tiny_model))
    assert await asyncio.to_thread(list_presets, redis_url, MODEL_ID) == ["pydoc"]
    with pytest.raises(PresetExists):
        await asyncio.to_thread(register_preset, redis_url, tiny_checkpoint, state_file, "pydoc")


async def test_session_from_preset_starts_from_the_tuned_state(redis_url, store, runner, tiny_checkpoint,
                                                              tiny_model, tokenizer, tmp_path):
    state_file = write_state(tmp_path / "state.pth", tiny_model, seed=2)
    await asyncio.to_thread(register_preset, redis_url, tiny_checkpoint, state_file, "pydoc")
    prompt = tokenizer.encode("User: What is a list?\n\nAssistant:")
    expected, first = direct(tiny_model, initial(state_file, tiny_model), prompt, 4)
    tokens, logprobs = await chat(runner, store, "What is a list?", preset="pydoc")
    assert tokens == expected
    assert logprobs[0] == pytest.approx(float(first[expected[0]]), abs=1e-4)  # the first logits are the direct ones
    plain_expected, plain_first = direct(tiny_model, None, prompt, 4)
    plain, plain_logprobs = await chat(runner, store, "What is a list?")
    assert plain == plain_expected
    assert plain != tokens or abs(plain_logprobs[0] - logprobs[0]) > 1e-3  # the preset matters


async def test_preset_under_a_system_prompt_and_overwrite(redis_url, store, runner, tiny_checkpoint, tiny_model,
                                                          tokenizer, tmp_path):
    old = write_state(tmp_path / "old.pth", tiny_model, seed=3)
    new = write_state(tmp_path / "new.pth", tiny_model, seed=4)
    system = tokenizer.encode("System: Be brief.\n\n")
    prompt = tokenizer.encode("User: Hi\n\nAssistant:")

    def expected(state_file: Path) -> list[int]:
        state = tiny_model.forward(torch.tensor([system]), initial(state_file, tiny_model))[1]
        return direct(tiny_model, state, prompt, 4)[0]

    await asyncio.to_thread(register_preset, redis_url, tiny_checkpoint, old, "brief")
    assert (await chat(runner, store, "Hi", preset="brief", system_prompt="Be brief."))[0] == expected(old)
    # The runner caches "preset + system prompt" by the preset's name: replacing the preset must invalidate it.
    await asyncio.to_thread(lambda: register_preset(redis_url, tiny_checkpoint, new, "brief", overwrite=True))
    assert expected(new) != expected(old)
    assert (await chat(runner, store, "Hi", preset="brief", system_prompt="Be brief."))[0] == expected(new)


async def test_preset_of_another_model_is_refused(redis_url, store, runner, tiny_model, tmp_path):
    # Same shapes, other weights: the record carries the other model's fingerprint, and the worker refuses it.
    other = make_random_checkpoint(tmp_path / "other.pth", n_layer=2, n_embd=128, seed=9)
    state_file = write_state(tmp_path / "state.pth", tiny_model, seed=5)
    await asyncio.to_thread(register_preset, redis_url, other, state_file, "foreign", MODEL_ID)
    with pytest.raises(StateCorrupt, match="another model"):
        await chat(runner, store, "Hi", preset="foreign")


def test_register_refuses_a_state_of_other_shapes(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.att.time_state": torch.zeros(3, 64, 64), "blocks.1.att.time_state": torch.zeros(3, 64, 64)},
               bad)
    with pytest.raises(StateFormatError, match="shape"):
        register_preset("redis://127.0.0.1:1/0", tiny_checkpoint, bad, "x")  # refused before any connection


async def test_command_line_register_list_delete(redis_url, store, tiny_checkpoint, tiny_model, tmp_path):
    state_file = write_state(tmp_path / "state.pth", tiny_model, seed=6)
    cli = CliRunner()

    def invoke(*args: str):
        return cli.invoke(app, [*args, "--redis-url", redis_url])

    result = await asyncio.to_thread(invoke, "register", "--model", str(tiny_checkpoint), "--state", str(state_file),
                                     "--name", "cli-preset")
    assert result.exit_code == 0, result.output
    result = await asyncio.to_thread(invoke, "register", "--model", str(tiny_checkpoint), "--state", str(state_file),
                                     "--name", "cli-preset")
    assert result.exit_code == 1 and "exists" in result.output
    result = await asyncio.to_thread(invoke, "list", "--model", str(tiny_checkpoint))
    assert result.output.split() == ["cli-preset"]
    result = await asyncio.to_thread(invoke, "delete", "--model-id", MODEL_ID, "--name", "cli-preset")
    assert result.exit_code == 0 and not await store.has_preset(MODEL_ID, "cli-preset")
    result = await asyncio.to_thread(invoke, "delete", "--model-id", MODEL_ID, "--name", "cli-preset")
    assert result.exit_code == 1
