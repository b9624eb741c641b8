"""The engine on CUDA in fp16 and bf16 equals the fp32 reference within the stated bounds (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from tests.reference import reference_model, reference_run
from tests.test_model import BF16_TOL, FP32_TOL, _assert_close, _tokens
from worker.checkpoint import make_random_checkpoint
from worker.model import RWKV5

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("cuda") / "m.pth", 7, 320, seed=11)  # 7 layers: fp16 rescale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_cuda_equals_reference(checkpoint, dtype):
    ref = reference_model(checkpoint)
    model = RWKV5.from_checkpoint(checkpoint, device="cuda", dtype=dtype)
    tol = FP32_TOL * 10 if dtype == torch.float32 else BF16_TOL  # TF32 may be on for fp32 matmuls
    prompt = _tokens(300, 1)
    logits, state = model.forward(torch.tensor([prompt], device="cuda"), model.init_state(1))
    ref_logits, ref_state = reference_run(ref, prompt)
    _assert_close(logits[0].cpu(), ref_logits, tol)
    for tok in _tokens(30, 2):
        logits, state = model.forward(torch.tensor([[tok]], device="cuda"), state)
        ref_logits, ref_state = ref.forward([tok], ref_state)
    _assert_close(logits[0].cpu(), ref_logits, tol)
    assert state.wkv.dtype == torch.float32 and state.wkv.is_cuda


def test_cuda_batched_equals_alone(checkpoint):
    model = RWKV5.from_checkpoint(checkpoint, device="cuda", dtype=torch.bfloat16)
    prompts = [_tokens(n, n) for n in (3, 50)]
    states = [model.forward(torch.tensor([p], device="cuda"), model.init_state(1))[1] for p in prompts]
    both, _ = model.forward(torch.tensor([[7], [8]], device="cuda"), type(states[0]).cat(states))
    for i, tok in enumerate((7, 8)):
        one, _ = model.forward(torch.tensor([[tok]], device="cuda"), states[i])
        _assert_close(both[i].cpu(), one[0].cpu(), 2e-2)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_state_record_round_trip(checkpoint, storage):
    """A state on the GPU is written into a pinned record (one DMA, no staging copy) and read back equal."""
    from worker.state import state_from_bytes, state_to_buffer

    model = RWKV5.from_checkpoint(checkpoint, device="cuda", dtype=torch.bfloat16)
    _, state = model.forward(torch.tensor([_tokens(40, 3)], device="cuda"), model.init_state(1))
    record = state_to_buffer(state, model.fingerprint, 40, dtype=storage, wkv_dtype=storage)
    assert record.obj.base is not None  # a numpy view of a torch (pinned) tensor, not numpy's own allocation
    back, tokens = state_from_bytes(record, model.fingerprint, "cuda")
    assert tokens == 40 and back.wkv.is_cuda
    for a, b in zip(back.tensors(), state.tensors()):
        assert torch.equal(a, b.to(storage).float())
