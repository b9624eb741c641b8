"""The state record: byte round-trip, refusal of truncated/corrupt/foreign bytes, state-tuned files."""
from __future__ import annotations

import pytest
import torch

from tests.reference import reference_model, reference_run
from worker.checkpoint import make_random_checkpoint, random_params
from worker.model import RWKV5, logits_scale
from worker.state import (
    State,
    StateFormatError,
    load_time_state,
    state_from_bytes,
    state_to_bytes,
    time_state_to_dict,
)


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
