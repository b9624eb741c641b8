"""Presets through the public API (RegisterPreset, ListPresets, DeletePreset): a real front and worker on the tiny
model and a real Redis. A state-tuned file registered through the SDK is what sessions created from the preset
start from (their first reply equals the model run from `load_time_state` directly); only preset admin tenants
may register or delete; uploads that are not a state of this model are refused and nothing is stored."""
from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from typer.testing import CliRunner

import rwkv_serve_client as client
from common.store import StateStore
from common.worker_api import ModelDescription, WorkerLoad
from rwkv_serve_client import AsyncRWKVClient, RWKVClient, TextDelta
from service.server import create_server
from service.settings import FrontSettings
from tests.e2e_fixtures import InprocService, key_entry
from tuning.presets import app as presets_cli
from worker.state import MAGIC, State, load_time_state, state_to_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

DB = 9  # a database of its own: other tests flush db 0 between tests
MODEL = "tiny"  # the id InprocService's worker serves
ADMIN_KEY, USER_KEY = "rwkv_admin-key-for-tests", "rwkv_user-key-for-tests"
GREEDY = {"temperature": 0.0, "stop_token_ids": [], "max_tokens": 4, "logprobs": 1}


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model, tokenizer) -> Iterator[InprocService]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    svc = InprocService(url, tiny_model, tokenizer, front={
        "auth_mode": "keys", "api_key_hashes": [key_entry("admin", ADMIN_KEY), key_entry("user", USER_KEY)],
        "preset_admin_tenants": ["admin"]})
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def db(service: InprocService) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(service.redis_url)
    yield connection
    connection.close()


@pytest.fixture
def clean(db: redis.Redis) -> None:
    """No presets (and no prefix-cache entries) left by an earlier test."""
    for pattern in ("rwkv:preset:*", "rwkv:presetinfo:*", "rwkv:prefix:*"):
        for key in db.scan_iter(match=pattern):
            db.delete(key)


@pytest.fixture(scope="module")
def admin(service: InprocService) -> Iterator[RWKVClient]:
    with RWKVClient(service.target, ADMIN_KEY) as rwkv:
        yield rwkv


@pytest.fixture(scope="module")
def user(service: InprocService) -> Iterator[RWKVClient]:
    with RWKVClient(service.target, USER_KEY) as rwkv:
        yield rwkv


def time_state(model, seed: int, *, n_head: int | None = None, n_layer: int | None = None) -> dict:
    """blocks.N.att.time_state tensors [H, N_v, N_k] as RWKV-PEFT saves them (other shapes on request)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.att.time_state": torch.randn(n_head or c.n_head, c.head_size, c.head_size, generator=g)
            for i in range(n_layer or c.n_layer)}


def pth_bytes(tensors: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def initial(path: Path, model) -> State:
    c = model.config
    return load_time_state(path, c.n_layer, c.n_head, c.head_size, c.n_embd)


def first_turn(rwkv: RWKVClient, text: str, **session) -> tuple[list[int], list[float]]:
    """A new session's first greedy turn: its tokens and their log-probabilities."""
    sid = rwkv.create_session(MODEL, **session).session_id
    with rwkv.chat_stream(sid, timeout=60) as stream:
        stream.send(text, return_token_ids=True, **GREEDY)
        deltas = [e for e in stream.until_turn_end() if isinstance(e, TextDelta)]
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


def stored_presets(db: redis.Redis) -> list[bytes]:
    return sorted(db.scan_iter(match="rwkv:preset:*"))


def test_a_registered_time_state_is_where_sessions_start(admin, user, db, clean, tiny_model, tokenizer, tmp_path):
    state_file = tmp_path / "state.pth"
    torch.save(time_state(tiny_model, seed=1), state_file)
    preset = admin.register_preset(MODEL, "pydoc", state_file, "answers about Python")
    expected_record = state_to_bytes(initial(state_file, tiny_model), tiny_model.fingerprint, 0)
    assert (preset.model, preset.name, preset.description, preset.tokens) == (MODEL, "pydoc", "answers about Python", 0)
    assert preset.state_bytes == len(expected_record) and preset.created_at is not None
    assert db.get(f"rwkv:preset:{MODEL}:pydoc") == expected_record  # converted and stamped by the worker
    # Listed for every tenant, by ListPresets and ListModels.
    assert user.list_presets(MODEL) == [preset]
    assert "pydoc" in next(m for m in user.list_models() if m.id == MODEL).presets
    # Any tenant's session from the preset starts from the tuned state: same tokens and first logprob as the model
    # run directly from load_time_state.
    prompt = tokenizer.encode("User: What is a list?\n\nAssistant:")
    expected, first = direct(tiny_model, initial(state_file, tiny_model), prompt, 4)
    tokens, logprobs = first_turn(user, "What is a list?", preset="pydoc")
    assert tokens == expected
    assert logprobs[0] == pytest.approx(float(first[expected[0]]), abs=1e-4)
    plain_expected, _ = direct(tiny_model, None, prompt, 4)
    plain, plain_logprobs = first_turn(user, "What is a list?")
    assert plain == plain_expected
    assert plain != tokens or abs(plain_logprobs[0] - logprobs[0]) > 1e-3  # the preset matters


def test_replace_a_state_record_and_delete(admin, user, db, clean, tiny_model, tokenizer, tmp_path):
    old, new = time_state(tiny_model, seed=2), time_state(tiny_model, seed=3)
    admin.register_preset(MODEL, "brief", pth_bytes(old))
    with pytest.raises(client.PresetExistsError):
        admin.register_preset(MODEL, "brief", pth_bytes(new))
    # A state record (here: the new tuned state after a prompt, as an exported session state) replaces it.
    c = tiny_model.config
    zeros = torch.zeros(c.n_layer, 1, c.n_embd)
    wkv = torch.stack([new[f"blocks.{i}.att.time_state"].transpose(1, 2) for i in range(c.n_layer)]).unsqueeze(1)
    system = tokenizer.encode("System: Be brief.\n\n")
    state = tiny_model.forward(torch.tensor([system]), State(zeros, wkv, zeros.clone()))[1]
    record = state_to_bytes(state, tiny_model.fingerprint, len(system))
    first_turn(user, "Hi", preset="brief")  # caches the prefix state built on the old preset
    preset = admin.register_preset(MODEL, "brief", record, "replaced", replace=True)
    assert preset.tokens == len(system) and preset.description == "replaced"
    assert db.get(f"rwkv:preset:{MODEL}:brief") == record  # a valid record is stored as uploaded
    prompt = tokenizer.encode("User: Hi\n\nAssistant:")
    # Prefix-cache entries are keyed by the preset's bytes: none built on the old state can answer for the new one.
    assert first_turn(user, "Hi", preset="brief")[0] == direct(tiny_model, state, prompt, 4)[0]
    # Deleted: gone from the listing; new sessions naming it are NOT_FOUND, and so is a session created before
    # the deletion that had not run a turn yet.
    waiting = user.create_session(MODEL, preset="brief")
    admin.delete_preset(MODEL, "brief")
    assert admin.list_presets(MODEL) == [] and stored_presets(db) == []
    with pytest.raises(client.PresetNotFoundError):
        user.create_session(MODEL, preset="brief")
    with pytest.raises(client.PresetNotFoundError):
        user.say(waiting.session_id, "Hi", **GREEDY)
    with pytest.raises(client.PresetNotFoundError):
        admin.delete_preset(MODEL, "brief")


def test_only_preset_admins_register_or_delete(admin, user, service, db, clean, tiny_model):
    data = pth_bytes(time_state(tiny_model, seed=4))
    with pytest.raises(client.PermissionDeniedError):
        user.register_preset(MODEL, "mine", data)
    assert stored_presets(db) == []
    admin.register_preset(MODEL, "shared", data)
    with pytest.raises(client.PermissionDeniedError):
        user.delete_preset(MODEL, "shared")
    with RWKVClient(service.target) as anonymous, pytest.raises(client.AuthenticationError):
        anonymous.list_presets(MODEL)
    assert [p.name for p in user.list_presets(MODEL)] == ["shared"]


def test_dev_mode_lets_everyone_register(service, db, clean, tiny_model):
    """auth_mode dev has no tenants to tell apart: every caller may manage presets."""
    async def start():
        server, port = create_server(FrontSettings(host="127.0.0.1", port=0, redis_url=service.redis_url,
                                                   auth_mode="dev", discovery_interval_s=0.0))
        await server.start()
        return server, port

    async def round_trip(target: str) -> list[str]:  # (the asyncio SDK, on this test's own loop)
        async with AsyncRWKVClient(target) as rwkv:
            preset = await rwkv.register_preset(MODEL, "dev", pth_bytes(time_state(tiny_model, seed=5)), "d")
            names = [p.name for p in await rwkv.list_presets(MODEL)]
            await rwkv.delete_preset(MODEL, "dev")
            return [preset.name, *names, *[p.name for p in await rwkv.list_presets(MODEL)]]

    server, port = service.run(start())
    try:
        assert asyncio.run(round_trip(f"127.0.0.1:{port}")) == ["dev", "dev"]
    finally:
        service.run(server.stop(0))


def test_uploads_that_are_not_a_state_of_this_model_are_refused(admin, service, db, clean, tiny_model):
    c = tiny_model.config
    good = time_state(tiny_model, seed=6)
    record = state_to_bytes(initial_from(good, tiny_model), tiny_model.fingerprint, 0)
    corrupted = bytearray(record)
    corrupted[len(corrupted) // 2] ^= 0xFF
    nan = {k: v.clone() for k, v in good.items()}
    nan["blocks.0.att.time_state"][0, 0, 0] = float("nan")
    refused = {
        client.InvalidArgumentError: [
            b"not a state at all", pth_bytes({"weight": torch.zeros(4)}), pth_bytes(nan), bytes(corrupted),
            MAGIC + b"\x00" * 16,  # a record's magic, then nothing
            b"\x00" * (48 << 20),  # 48 MiB of junk gets through the front to the worker (message limits) and is refused
        ],
        client.ForeignStateError: [  # well-formed states of other models
            pth_bytes(time_state(tiny_model, seed=6, n_head=c.n_head + 1)),
            pth_bytes(time_state(tiny_model, seed=6, n_layer=c.n_layer + 1)),
            state_to_bytes(initial_from(good, tiny_model), b"\x01" * 32, 0),  # another model's fingerprint
        ],
    }
    for error, uploads in refused.items():
        for data in uploads:
            with pytest.raises(error) as caught:
                admin.register_preset(MODEL, "bad", data)
            assert type(caught.value) is error, (caught.value, data[:16])
    for name in ("", "has space", "x" * 65, "-lead", "a:b", "ü"):
        with pytest.raises(client.InvalidArgumentError):
            admin.register_preset(MODEL, name, pth_bytes(good))
    with pytest.raises(client.InvalidArgumentError, match="limit"):
        admin.register_preset(MODEL, "big", b"\x00" * ((64 << 20) + 1))  # over max_preset_mb (64 MiB)
    with pytest.raises(client.ModelNotFoundError):
        admin.register_preset("no-such-model", "x", pth_bytes(good))
    assert stored_presets(db) == [] and admin.list_presets(MODEL) == []

    # Workers of one model id on different weights (a rollout half done): refused, whichever worker answers.
    other = WorkerLoad("other-weights", "127.0.0.1:1", ModelDescription(MODEL, fingerprint="ff" * 32))

    async def register_other(register: bool) -> None:
        store = StateStore.from_url(service.redis_url)
        try:
            if register:
                await store.register_worker(other, 30_000)
            else:
                await store.unregister_worker("other-weights")
        finally:
            await store.close()

    service.run(register_other(True))
    try:
        with pytest.raises(client.ForeignStateError, match="different weights"):
            admin.register_preset(MODEL, "mixed", pth_bytes(good))
    finally:
        service.run(register_other(False))
    assert stored_presets(db) == []


def initial_from(tensors: dict, model) -> State:
    c = model.config
    wkv = torch.stack([tensors[f"blocks.{i}.att.time_state"].transpose(1, 2) for i in range(c.n_layer)]).unsqueeze(1)
    zeros = torch.zeros(c.n_layer, 1, c.n_embd)
    return State(zeros, wkv, zeros.clone())


def test_sdk_tells_records_from_pth_files_by_the_magic_of_worker_state() -> None:
    assert client._core.STATE_RECORD_MAGIC == MAGIC


def test_command_line_through_the_api(service, db, clean, tiny_model, tmp_path):
    state_file = tmp_path / "state.pth"
    torch.save(time_state(tiny_model, seed=7), state_file)
    cli = CliRunner()

    def invoke(*args: str, key: str = ADMIN_KEY):
        return cli.invoke(presets_cli, [*args, "--target", service.target, "--api-key", key])

    result = invoke("register", "--model-id", MODEL, "--state", str(state_file), "--name", "cli",
                    "--description", "from the CLI")
    assert result.exit_code == 0, result.output
    assert db.exists(f"rwkv:preset:{MODEL}:cli")
    result = invoke("register", "--model-id", MODEL, "--state", str(state_file), "--name", "cli2", key=USER_KEY)
    assert result.exit_code == 1 and "PERMISSION_DENIED" in result.output
    result = invoke("list", "--model-id", MODEL, key=USER_KEY)
    assert result.exit_code == 0 and result.output.splitlines() == ["cli\tfrom the CLI"]
    result = invoke("delete", "--model-id", MODEL, "--name", "cli")
    assert result.exit_code == 0 and stored_presets(db) == []
