"""The state record: byte round-trip per storage dtype, refusal of truncated/corrupt/foreign bytes, records of the
previous format version, the worker's storage dtype setting end to end, state-tuned files."""
from __future__ import annotations

import struct
import zlib

import pytest
import torch

from common.worker_api import InputKind, TextDelta, TurnEnded, TurnInput
from tests.reference import reference_model, reference_run
from worker.checkpoint import make_random_checkpoint, random_params
from worker.model import RWKV5, logits_scale
from worker.server import WorkerCore
from worker.settings import WorkerSettings
from worker.state import (
    FORMAT_VERSION,
    STORAGE_DTYPES,
    State,
    StateFormatError,
    load_time_state,
    read_header,
    state_from_bytes,
    state_to_buffer,
    state_to_bytes,
    time_state_to_dict,
)

HEADER_BYTES, CRC_BYTES = 76, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return RWKV5.from_checkpoint(make_random_checkpoint(tmp_path_factory.mktemp("s") / "m.pth", 2, 128, seed=7))


@pytest.fixture(scope="module")
def used_state(model):
    tokens = torch.randint(0, 65536, (1, 50), generator=torch.Generator().manual_seed(1))
    _, state = model.forward(tokens, model.init_state(1))
    return state


def test_round_trip_is_exact_and_continues_identically(model, used_state):
    data = state_to_bytes(used_state, model.fingerprint, tokens_consumed=50)
    assert len(data) > model.config.state_bytes  # the payload plus header and checksum
    back, tokens = state_from_bytes(data, model.fingerprint)
    assert tokens == 50 and back.equal(used_state)
    a, _ = model.forward(torch.tensor([[42]]), used_state)
    b, _ = model.forward(torch.tensor([[42]]), back)
    assert torch.equal(a, b)


def test_state_size_is_constant_in_conversation_length(model):
    short = model.forward(torch.tensor([[1]]), model.init_state(1))[1]
    long = model.forward(torch.randint(0, 65536, (1, 700)), model.init_state(1))[1]
    assert len(state_to_bytes(short, model.fingerprint, 1)) == len(state_to_bytes(long, model.fingerprint, 700))


@pytest.mark.parametrize("cut", [0, 10, 60, -1, -5])
def test_truncated_bytes_refused(model, used_state, cut):
    data = state_to_bytes(used_state, model.fingerprint, 50)
    with pytest.raises(StateFormatError, match="truncated|bytes"):
        state_from_bytes(data[:cut], model.fingerprint)


def test_bit_flip_anywhere_refused(model, used_state):
    data = bytearray(state_to_bytes(used_state, model.fingerprint, 50))
    for pos in (9, 80, len(data) // 2, len(data) - 100, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        with pytest.raises(StateFormatError):
            state_from_bytes(bytes(flipped), model.fingerprint)


def test_foreign_model_refused(model, used_state, tmp_path):
    other = RWKV5.from_checkpoint(make_random_checkpoint(tmp_path / "o.pth", 2, 128, seed=8))
    assert other.fingerprint != model.fingerprint
    data = state_to_bytes(used_state, model.fingerprint, 50)
    with pytest.raises(StateFormatError, match="another model"):
        state_from_bytes(data, other.fingerprint)


def test_garbage_and_other_versions_refused(model, used_state):
    with pytest.raises(StateFormatError, match="not an RWKV-5 state"):
        state_from_bytes(b"x" * 200, model.fingerprint)
    data = bytearray(state_to_bytes(used_state, model.fingerprint, 50))
    data[8] = 99  # format version
    with pytest.raises(StateFormatError, match="format version 99"):
        state_from_bytes(bytes(data), model.fingerprint)


def test_bf16_shift_storage_round_trips_within_bf16(model, used_state):
    data = state_to_bytes(used_state, model.fingerprint, 50, dtype=torch.bfloat16)
    back, _ = state_from_bytes(data, model.fingerprint)
    assert torch.equal(back.wkv, used_state.wkv)  # the WKV matrix stays fp32
    assert torch.allclose(back.att_shift, used_state.att_shift, rtol=1e-2, atol=1e-2)


def test_split_and_cat_invert(model):
    s = model.forward(torch.randint(0, 65536, (3, 5)), model.init_state(3))[1]
    assert State.cat(s.split()).equal(s)


def test_time_state_file_matches_reference_state_path(tmp_path):
    # A state-tuned file as RWKV-PEFT saves it: blocks.N.att.time_state [H, N_v, N_k].
    n_layer, n_embd = 2, 128
    sd = random_params(n_layer, n_embd, seed=4)
    g = torch.Generator().manual_seed(5)
    tuned = {f"blocks.{i}.att.time_state": torch.randn(2, 64, 64, generator=g) for i in range(n_layer)}
    base = tmp_path / "base.pth"
    torch.save(sd, base)
    torch.save(tuned, tmp_path / "state.pth")
    # The reference reads time_state keys merged into the model file.
    merged = tmp_path / "merged.pth"
    torch.save({**sd, **tuned}, merged)
    ref = reference_model(merged)
    model = RWKV5.from_checkpoint(base)
    init = load_time_state(tmp_path / "state.pth", n_layer, 2, 64, n_embd)
    tokens = [3, 14, 15, 92, 65, 35]
    ours, _ = model.forward(torch.tensor([tokens]), init)
    theirs, _ = reference_run(ref, tokens)
    assert (ours[0] - theirs).abs().max().item() / logits_scale(theirs) < 1e-4
    plain, _ = model.forward(torch.tensor([tokens]), model.init_state(1))
    assert (plain[0] - theirs).abs().max().item() / logits_scale(theirs) > 1e-3  # the tuned state matters
    # And back: our state as a time_state dict equals the file.
    for k, v in time_state_to_dict(init).items():
        assert torch.equal(v, tuned[k])


def test_time_state_wrong_shape_refused(tmp_path):
    torch.save({"blocks.0.att.time_state": torch.zeros(3, 64, 64)}, tmp_path / "s.pth")
    with pytest.raises(StateFormatError, match="shape"):
        load_time_state(tmp_path / "s.pth", 1, 2, 64, 128)


# ---- storage dtypes (format version 2) -------------------------------------------------------------------------

DTYPES = list(STORAGE_DTYPES.values())


def small_state(seed: int = 0, scale: float = 1.0) -> State:
    """A state of a made-up tiny shape (L2 D16 H2 N4): the record format takes any shapes, and records this small
    can be damaged at every byte in a test."""
    g = torch.Generator().manual_seed(seed)
    return State(torch.randn(2, 1, 16, generator=g) * scale, torch.randn(2, 1, 2, 4, 4, generator=g) * scale,
                 torch.randn(2, 1, 16, generator=g) * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(STORAGE_DTYPES))
def test_round_trip_per_storage_dtype(model, used_state, dtype):
    data = state_to_bytes(used_state, model.fingerprint, 50, dtype=dtype, wkv_dtype=dtype)
    header = read_header(data)
    assert header["version"] == FORMAT_VERSION == 2
    assert header["dtype"] == dtype and header["wkv_dtype"] == dtype
    back, tokens = state_from_bytes(data, model.fingerprint)
    assert tokens == 50
    for ours, original in zip(back.tensors(), used_state.tensors()):
        assert ours.dtype == torch.float32  # widened back: the engine computes in fp32
        # Exactly the original rounded to the storage dtype (round to nearest even), nothing worse.
        assert torch.equal(ours, original.to(dtype).float())
    if dtype == torch.float32:
        assert back.equal(used_state)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(STORAGE_DTYPES))
def test_round_trip_of_tensors_copied_in_many_pieces(dtype):
    # Conversions run in pieces of ~32k elements (worker.state._serial_copy): tensors of several pieces, with a
    # short last one, come back whole and in order.
    g = torch.Generator().manual_seed(11)
    state = State(torch.randn(3, 1, 20_032, generator=g), torch.randn(3, 1, 4, 64, 64, generator=g) * 30,
                  torch.randn(3, 1, 20_032, generator=g))
    data = state_to_buffer(state, bytes(32), 7, dtype=dtype, wkv_dtype=dtype)
    back, _ = state_from_bytes(data, bytes(32))
    for ours, original in zip(back.tensors(), state.tensors()):
        assert torch.equal(ours, original.to(dtype).float())


def test_16_bit_storage_halves_the_record(model, used_state):
    full = state_to_bytes(used_state, model.fingerprint, 50)
    assert len(full) == HEADER_BYTES + model.config.state_bytes + CRC_BYTES
    for dtype in (torch.bfloat16, torch.float16):
        half = state_to_bytes(used_state, model.fingerprint, 50, dtype=dtype, wkv_dtype=dtype)
        assert len(half) - HEADER_BYTES - CRC_BYTES == model.config.state_bytes // 2


def test_wkv_and_shift_storage_dtypes_are_independent(model, used_state):
    data = state_to_bytes(used_state, model.fingerprint, 50, dtype=torch.float32, wkv_dtype=torch.bfloat16)
    header = read_header(data)
    assert (header["dtype"], header["wkv_dtype"]) == (torch.float32, torch.bfloat16)
    back, _ = state_from_bytes(data, model.fingerprint)
    assert torch.equal(back.att_shift, used_state.att_shift) and torch.equal(back.ffn_shift, used_state.ffn_shift)
    assert torch.equal(back.wkv, used_state.wkv.bfloat16().float())


def test_buffer_is_the_record_and_every_buffer_type_decodes(model, used_state):
    for dtype in DTYPES:
        buf = state_to_buffer(used_state, model.fingerprint, 50, dtype=dtype, wkv_dtype=dtype)
        assert isinstance(buf, memoryview) and buf.nbytes == len(buf)
        data = state_to_bytes(used_state, model.fingerprint, 50, dtype=dtype, wkv_dtype=dtype)
        assert bytes(buf) == data
        decoded = [state_from_bytes(d, model.fingerprint)[0] for d in (buf, data, bytearray(data), memoryview(data))]
        assert all(d.equal(decoded[0]) for d in decoded)


def test_decoded_state_owns_its_memory(model, used_state):
    for dtype in DTYPES:
        data = bytearray(state_to_bytes(used_state, model.fingerprint, 50, dtype=dtype, wkv_dtype=dtype))
        back, _ = state_from_bytes(data, model.fingerprint)
        before = back.clone()
        data[HEADER_BYTES : len(data) - CRC_BYTES] = bytes(len(data) - HEADER_BYTES - CRC_BYTES)
        assert back.equal(before)  # the one copy went into fresh tensors, not views of the record
        back.wkv.add_(1)  # and they are writable (the engine updates states in place)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(STORAGE_DTYPES))
def test_any_damaged_byte_refused(dtype):
    # CRC-32C catches every error burst of up to 32 bits, so one damaged byte anywhere (header, payload or the
    # checksum itself) is always caught: every byte of the record, two patterns each.
    data = state_to_bytes(small_state(), bytes(range(32)), 9, dtype=dtype, wkv_dtype=dtype)
    assert state_from_bytes(data, bytes(range(32)))[1] == 9
    for pos in range(len(data)):
        for pattern in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[pos] ^= pattern
            with pytest.raises(StateFormatError):
                state_from_bytes(bytes(damaged), bytes(range(32)))


@pytest.mark.parametrize("dtype", DTYPES, ids=list(STORAGE_DTYPES))
def test_truncated_or_padded_records_refused(dtype):
    data = state_to_bytes(small_state(), bytes(range(32)), 9, dtype=dtype, wkv_dtype=dtype)
    for cut in range(len(data)):
        with pytest.raises(StateFormatError, match="truncated|bytes"):
            state_from_bytes(data[:cut], bytes(range(32)))
    with pytest.raises(StateFormatError, match="truncated or padded"):
        state_from_bytes(data + b"\0", bytes(range(32)))


@pytest.mark.parametrize("where", ["wkv", "att_shift", "ffn_shift"])
@pytest.mark.parametrize("value", [1e6, -7e4])
def test_fp16_overflow_keeps_that_tensor_in_fp32(where, value, caplog):
    state = small_state(seed=3)
    getattr(state, where).view(-1)[5] = value  # beyond fp16's 65504: that tensor stays fp32, the rest goes to fp16
    data = state_to_bytes(state, bytes(32), 1, dtype=torch.float16, wkv_dtype=torch.float16)
    header = read_header(data)
    expected = (torch.float16, torch.float32) if where == "wkv" else (torch.float32, torch.float16)
    assert (header["dtype"], header["wkv_dtype"]) == expected
    assert "fp16 cannot" in caplog.text
    back, _ = state_from_bytes(data, bytes(32))
    for ours, original, dt in zip(back.tensors(), state.tensors(), (expected[0], expected[1], expected[0])):
        assert torch.equal(ours, original.to(dt).float()) and torch.isfinite(ours).all()
    # bf16 has fp32's range: nothing to keep back.
    data = state_to_bytes(state, bytes(32), 1, dtype=torch.bfloat16, wkv_dtype=torch.bfloat16)
    assert read_header(data)["wkv_dtype"] == torch.bfloat16
    assert torch.isfinite(state_from_bytes(data, bytes(32))[0].wkv).all()


def test_largest_fp16_values_stay_fp16():
    state = small_state(seed=4)
    state.wkv.view(-1)[:2] = torch.tensor([65504.0, -65504.0])
    data = state_to_bytes(state, bytes(32), 1, dtype=torch.float16, wkv_dtype=torch.float16)
    assert read_header(data)["wkv_dtype"] == torch.float16
    assert state_from_bytes(data, bytes(32))[0].wkv.view(-1)[:2].tolist() == [65504.0, -65504.0]


def test_unknown_wkv_dtype_code_refused():
    data = bytearray(state_to_bytes(small_state(), bytes(32), 1))
    data[11] = 7  # the WKV dtype code
    with pytest.raises(StateFormatError, match="unknown dtype code 7"):
        state_from_bytes(bytes(data), bytes(32))


# ---- records of format version 1 (written before storage dtypes) ---------------------------------------------

# state_to_bytes of commit 3f8ab07 (format version 1) for fixture_state(), fingerprint bytes(range(32)), 123
# tokens: reserved byte 11 zero, WKV fp32, zlib CRC-32 trailer.
V1_FIXTURE = bytes.fromhex(
    "52574b563553540001000100000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f02000000"
    "1000000002000000040000007b000000000000000002000000000000000000c00000f0bf0000e0bf0000d0bf0000c0bf"
    "0000b0bf0000a0bf000090bf000080bf000060bf000040bf000020bf000000bf0000c0be000080be000000be00000000"
    "0000003e0000803e0000c03e0000003f0000203f0000403f0000603f0000803f0000903f0000a03f0000b03f0000c03f"
    "0000d03f0000e03f0000f03f000030c0000080bf0000403f000020400000c0bf0000803e00000040000000c0000080be"
    "0000c03f000020c0000040bf0000803f000030400000a0bf0000003f000010400000e0bf000000000000e03f000010c0"
    "000000bf0000a03f000030c0000080bf0000403f000020400000c0bf0000803e00000040000000c0000080be0000c03f"
    "000020c0000040bf0000803f000030400000a0bf0000003f000010400000e0bf000000000000e03f000010c0000000bf"
    "0000a03f000030c0000080bf0000403f000020400000c0bf0000803e00000040000000c0000080be0000c03f000020c0"
    "000040bf0000803f000030400000a0bf0000003f000010400000e0bf00000080000080bd000000be000040be000080be"
    "0000a0be0000c0be0000e0be000000bf000010bf000020bf000030bf000040bf000050bf000060bf000070bf000080bf"
    "000088bf000090bf000098bf0000a0bf0000a8bf0000b0bf0000b8bf0000c0bf0000c8bf0000d0bf0000d8bf0000e0bf"
    "0000e8bf0000f0bf0000f8bf10de330a"
)


def fixture_state() -> State:
    att = ((torch.arange(32, dtype=torch.float32) - 16) / 8).reshape(2, 1, 16)
    wkv = ((torch.arange(64) * 7 % 23 - 11).float() / 4).reshape(2, 1, 2, 4, 4)
    ffn = (-torch.arange(32, dtype=torch.float32) / 16).reshape(2, 1, 16)
    return State(att, wkv, ffn)


def v1_record(state: State, fingerprint: bytes, tokens: int, dtype: torch.dtype = torch.float32) -> bytes:
    """A record laid out as the version-1 encoder wrote it (shift dtype code, a zero byte, WKV in fp32, zlib)."""
    L, _, H, N, _ = state.wkv.shape

    def raw(t: torch.Tensor, dt: torch.dtype) -> bytes:
        t = t.to(dt).contiguous()
        return (t.view(torch.int16) if dt == torch.bfloat16 else t).numpy().tobytes()

    payload = raw(state.att_shift, dtype) + raw(state.wkv, torch.float32) + raw(state.ffn_shift, dtype)
    code = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[dtype]
    header = struct.pack("<8sHBx32sIIIIQQ", b"RWKV5ST\x00", 1, code, fingerprint, L, state.att_shift.shape[-1], H, N,
                         tokens, len(payload))
    return header + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(header)))


def test_v1_fixture_from_the_old_encoder_loads():
    assert v1_record(fixture_state(), bytes(range(32)), 123) == V1_FIXTURE  # the helper below writes what it did
    header = read_header(V1_FIXTURE)
    assert header["version"] == 1 and header["wkv_dtype"] == torch.float32
    back, tokens = state_from_bytes(V1_FIXTURE, bytes(range(32)))
    assert tokens == 123 and back.equal(fixture_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-shifts"])
def test_v1_session_state_loads_and_continues_identically(model, used_state, dtype):
    old = v1_record(used_state, model.fingerprint, 50, dtype)
    back, tokens = state_from_bytes(old, model.fingerprint)
    assert tokens == 50
    assert torch.equal(back.wkv, used_state.wkv)
    assert torch.equal(back.att_shift, used_state.att_shift.to(dtype).float())
    if dtype == torch.float32:
        a, _ = model.forward(torch.tensor([[42]]), used_state)
        b, _ = model.forward(torch.tensor([[42]]), back)
        assert torch.equal(a, b)
    # Re-encoded, it is a version-2 record of the same state.
    again = state_to_bytes(back, model.fingerprint, tokens)
    assert read_header(again)["version"] == 2 and state_from_bytes(again, model.fingerprint)[0].equal(back)


def test_damaged_v1_record_refused():
    for pos in range(len(V1_FIXTURE)):
        damaged = bytearray(V1_FIXTURE)
        damaged[pos] ^= 0x40
        with pytest.raises(StateFormatError):
            state_from_bytes(bytes(damaged), bytes(range(32)))
    with pytest.raises(StateFormatError, match="truncated"):
        state_from_bytes(V1_FIXTURE[:-1], bytes(range(32)))


# ---- the worker setting, end to end (runner, real Redis) -------------------------------------------------------

MODEL_ID = "tiny"


def test_storage_dtype_setting_from_the_environment(monkeypatch):
    assert WorkerSettings().state_storage_dtype == "fp32"
    monkeypatch.setenv("RWKV_WORKER_STATE_STORAGE_DTYPE", "bf16")
    assert WorkerSettings().state_storage_dtype == "bf16"
    monkeypatch.setenv("RWKV_WORKER_STATE_STORAGE_DTYPE", "fp64")
    with pytest.raises(ValueError):
        WorkerSettings()


async def raw_turn(core: WorkerCore, sid: str, tokens: list[int], n: int) -> tuple[list[int], TurnEnded]:
    turn = TurnInput(session_id=sid, kind=InputKind.RAW, token_ids=tuple(tokens),
                     sampling={"temperature": 0.0, "stop_token_ids": [], "max_tokens": n})
    events = [e async for e in core.runner.run(turn)]
    assert isinstance(events[-1], TurnEnded)
    return [t for e in events if isinstance(e, TextDelta) for t in e.token_ids], events[-1]


def greedy(model, state: State, tokens: list[int], n: int) -> list[int]:
    logits, state = model.forward(torch.tensor([tokens]), state)
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits, state = model.forward(torch.tensor([[out[-1]]]), state)
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("storage", ["bf16", "fp16"])
async def test_worker_setting_stores_halved_records_any_worker_reads(redis_url, store, tiny_model, tokenizer,
                                                                     storage):
    def core(dtype: str) -> WorkerCore:
        settings = WorkerSettings(redis_url=redis_url, model_id=MODEL_ID, state_storage_dtype=dtype)
        c = WorkerCore(settings, tiny_model, tokenizer, MODEL_ID, store=store)
        c.engine.start()
        return c

    writer, reader = core(storage), core("fp32")  # the reader: another worker, its cache empty
    try:
        sid = (await store.create_session(tenant="t", model=MODEL_ID, template="chat", system_prompt="Be brief.",
                                          ttl_ms=60_000)).session_id
        tokens, ended = await raw_turn(writer, sid, [3, 14, 15, 92], 4)
        assert ended.state_version == 1
        _, record = await store.load_state(sid)
        dtype = STORAGE_DTYPES[storage]
        header = read_header(record)
        assert (header["dtype"], header["wkv_dtype"]) == (dtype, dtype)
        assert len(record) == HEADER_BYTES + tiny_model.config.state_bytes // 2 + CRC_BYTES
        # The prefix-cache entry (the template's opening + system prompt) is written in the storage dtype too.
        prefixes = [k async for k in store.redis.scan_iter(match=store.keys.prefix_state(MODEL_ID, "*"))]
        assert len(prefixes) == 1
        entry = await store.redis.get(prefixes[0])
        assert read_header(entry)["wkv_dtype"] == dtype and len(entry) == len(record)
        # Another worker (fp32 storage itself) loads the 16-bit record and continues from exactly that state.
        stored, _ = state_from_bytes(record, tiny_model.fingerprint)
        expected = greedy(tiny_model, stored, [65, 35], 4)
        fork = (await store.fork_session(sid)).session_id
        tokens, ended = await raw_turn(reader, fork, [65, 35], 4)
        assert tokens == expected and ended.state_version == 2
        # The writer's own next turn starts from its local cache, which holds the state as stored (rounded), not
        # the exact one it computed: whichever worker serves a session, it continues the same way.
        cached, _ = writer.runner.cache.get(sid, 1)
        assert all(torch.equal(a, b) for a, b in zip(cached.tensors(), stored.tensors()))
        tokens, _ = await raw_turn(writer, sid, [65, 35], 4)
        assert tokens == expected
        _, record = await store.load_state(fork)
        assert read_header(record)["wkv_dtype"] == torch.float32  # what the reader writes: its own setting
        assert len(record) == HEADER_BYTES + tiny_model.config.state_bytes + CRC_BYTES
    finally:
        await writer.engine.close()
        await reader.engine.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=list(STORAGE_DTYPES))
def test_cuda_state_encodes_and_decodes_to_the_device(dtype):
    state = small_state(seed=5, scale=3.0)
    on_gpu = state.to("cuda")
    data = state_to_bytes(on_gpu, bytes(32), 3, dtype=dtype, wkv_dtype=dtype)
    assert data == state_to_bytes(state, bytes(32), 3, dtype=dtype, wkv_dtype=dtype)  # converted alike
    back, _ = state_from_bytes(data, bytes(32), device="cuda")
    for ours, original in zip(back.tensors(), state.tensors()):
        assert ours.is_cuda and ours.dtype == torch.float32
        assert torch.equal(ours.cpu(), original.to(dtype).float())
