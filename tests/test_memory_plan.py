"""The memory plan: its counts on meta tensors equal what a real training step holds on CPU tensors at a small
shape, its depth extrapolation equals the full-depth count, and the 12B numbers it reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tuning.frozen import config_for, meta_params
from tuning.memory_plan import app as plan_app
from tuning.memory_plan import plan
from tuning.memtrack import MemoryTracker, nbytes, storage_key
from tuning.train import TrainConfig, Trainer
from worker.checkpoint import make_random_checkpoint, random_params
from worker.model import config_from_params

pytestmark = pytest.mark.usefixtures("one_thread")

B, T = 2, 48


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from tuning.dataset import TokenDataset

    d = tmp_path_factory.mktemp("plan")
    base = make_random_checkpoint(d / "base.pth", n_layer=2, n_embd=128, vocab_size=4096, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 4096, (4000,), generator=g)
    ds = TokenDataset(tokens.to(torch.int32), torch.ones(4000, dtype=torch.uint8), torch.tensor([0, 2000, 4000]))
    ds.save(d / "train.pt")
    return {"base": base, "train": d / "train.pt", "dir": d}


def test_meta_params_are_a_checkpoints_names_and_shapes():
    real = random_params(3, 128, vocab_size=1000)
    meta = meta_params(config_from_params(real))
    assert list(meta) == list(real)  # the same key order (the reference package reads v5.2 from it)
    assert all(meta[k].shape == real[k].shape and meta[k].is_meta for k in real)
    assert config_for(32, 5120).ffn_size == 17920  # the 12B shape of the notes


def measure(trainer: Trainer) -> dict[str, int]:
    """What one real step holds: tensor bytes of the model and trainees, the step's tracked peak (CPU tensors),
    gradient and AdamW state bytes after it, and the bytes autograd saved for backward (an independent count)."""
    existing = [*trainer.model.params.values(), *trainer.trainable]
    if trainer.adapters is not None:
        existing += [*trainer.adapters.A0.values(), *trainer.adapters.B0.values()]
    keys = {storage_key(t) for t in existing}
    saved: dict[int, int] = {}

    def pack(t):
        if storage_key(t) not in keys:
            saved[storage_key(t)] = t.untyped_storage().nbytes()
        return t

    x, y, m = next(trainer._batches)
    assert x.shape == (B, T)
    with MemoryTracker(existing, grads_of=trainer.trainable) as tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = trainer.loss(x, y, m)
        loss.backward()
    grads = sum(p.grad.nbytes for p in trainer.trainable)
    trainer.optimizer.step()
    state = [t for s in trainer.optimizer.state.values() for t in s.values()]
    extra = [t for t in existing if storage_key(t) not in {storage_key(p) for p in trainer.model.params.values()}]
    return {"weights": nbytes(trainer.model.params.values()), "adapters": nbytes(extra) if extra else 0,
            "gradients": grads, "optimizer": sum(t.nbytes for t in state), "step_peak": tracker.peak,
            "activations": tracker.peak_other, "saved": sum(saved.values())}


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("method", ["lora", "pissa", "state", "full"])
def test_plan_matches_a_measured_step_at_a_small_shape(files, method, ckpt):
    cfg = TrainConfig(model=files["base"], data=files["train"], out=files["dir"] / method, mode=method,
                      ctx_len=T, batch_size=B, windows="random", grad_checkpoint=ckpt, base_dtype="fp32",
                      lora_rank=8, lora_alpha=8, lr=1e-3)
    real = measure(Trainer(cfg))
    c = config_for(2, 128, vocab_size=4096)
    planned = plan(c, method, T, B, base_dtype="fp32", lora_rank=8, grad_checkpoint=ckpt)
    for field in ("weights", "adapters", "gradients", "optimizer", "activations", "step_peak"):
        want = real[field]
        assert abs(getattr(planned, field) - want) <= 0.10 * want, (field, getattr(planned, field), want)
    # Autograd's saved tensors are part of what the step holds; without checkpointing they are most of it.
    assert real["saved"] <= real["step_peak"]
    if not ckpt:
        assert real["saved"] >= 0.5 * planned.activations
    assert planned.peak == planned.weights + planned.adapters + planned.optimizer + planned.step_peak


@pytest.mark.parametrize("method", ["lora", "full"])
def test_depth_extrapolation_equals_the_full_count(method):
    c = config_for(7, 128, vocab_size=2048)
    for ckpt in (False, True):
        fast = plan(c, method, 32, 1, lora_rank=4, grad_checkpoint=ckpt)
        full = plan(c, method, 32, 1, lora_rank=4, grad_checkpoint=ckpt, exact=True)
        assert fast.step_peak == pytest.approx(full.step_peak, rel=0.03)
        assert fast.weights == full.weights and fast.optimizer == full.optimizer


def test_checkpointing_and_methods_order_the_memory():
    c = config_for(4, 256, vocab_size=4096)
    off, on = (plan(c, "lora", 128, 1, lora_rank=8, grad_checkpoint=ck) for ck in (False, True))
    assert on.activations < 0.6 * off.activations and on.weights == off.weights
    full, state = plan(c, "full", 128, 1), plan(c, "state", 128, 1)
    assert full.weights == pytest.approx(2 * on.weights, rel=0.01)  # fp32 masters against bf16 frozen weights
    assert full.optimizer > 10 * on.optimizer > 0 and state.trained == 4 * 4 * 64 * 64


def test_12b_lora_fits_an_a100_and_full_finetuning_does_not():
    lora_plan = plan("12b", "lora", 1024, 1, lora_rank=64, grad_checkpoint=True)
    # The seed's RWKV-5-12B file is 23,157,296,483 bytes: its 16-bit tensors plus ~0.1 MB of pickle framing.
    assert 23_157_296_483 - 200_000 < 2 * lora_plan.parameters < 23_157_296_483
    # bf16 matrices; the per-channel tensors (0.04% of the parameters) in fp32
    assert 2 * lora_plan.parameters < lora_plan.weights < 2.001 * lora_plan.parameters
    assert lora_plan.fits("a100-80g") and not lora_plan.fits("24g")
    full = plan("12b", "full", 1024, 1, grad_checkpoint=True)
    assert full.weights == full.gradients == 4 * full.parameters  # fp32 masters and their gradients: 46 GiB each
    assert 8 * full.parameters < full.optimizer < 8 * full.parameters + 4096  # two fp32 moments + step counts
    assert not full.fits("a100-80g") and not full.fits("h200")


def test_command_writes_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "p.json", tmp_path / "p.md"
    result = CliRunner().invoke(plan_app, ["--shape", "2x128", "--method", "lora,state", "--ctx-len", "32",
                                           "--lora-rank", "4", "--card", "24g", "--json", str(out_json),
                                           "--markdown", str(out_md)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out_json.read_text())["plans"]
    assert [(r["method"], r["grad_checkpoint"]) for r in rows] == [("lora", False), ("lora", True),
                                                                    ("state", False), ("state", True)]
    assert all(r["fits"]["24g"] for r in rows)  # a 2-layer model fits anything
    table = out_md.read_text().splitlines()
    assert len(table) == 2 + 4 and "fits 24g" in table[0]
    result = CliRunner().invoke(plan_app, ["--shape", "12b", "--method", "qlora"])
    assert result.exit_code != 0 and "qlora" in result.output
