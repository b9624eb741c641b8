"""LoRA / PiSSA on tiny models: the frozen model is the model, training moves only the adapters, the merged file
loads in the reference package with the logits of base + adapter, PiSSA starts from the model, resume is exact."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.reference import reference_model, reference_run
from tests.tuning_fixtures import tuning_files
from tuning import lora
from tuning.frozen import frozen_model
from tuning.merge import app as merge_app
from tuning.train import TrainConfig, Trainer
from tuning.train import app as train_app
from worker.checkpoint import make_random_checkpoint
from worker.model import RWKV5, logits_scale, read_checkpoint

TOKENS = [3, 14, 15, 92, 65, 35, 261, 89, 79]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    return tuning_files(tmp_path_factory.mktemp("lora"), tokenizer, seed=4)


def config(files, out: Path, **kw) -> TrainConfig:
    defaults = dict(model=files["base"], data=files["train"], val=files["val"], out=out, ctx_len=32, batch_size=2,
                    warmup=2, steps=12, lr=1e-2, mode="lora", lora_rank=8, lora_alpha=16)
    return TrainConfig(**{**defaults, **kw})


def logits(model: RWKV5) -> torch.Tensor:
    with torch.no_grad():
        out, _ = model.forward(torch.tensor([TOKENS]), model.init_state(1), all_logits=True)
    return out[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / logits_scale(b)


# ---- the frozen model ------------------------------------------------------------------------------------------


def test_frozen_model_is_the_trainable_model(files):
    base = read_checkpoint(files["base"])
    reference = RWKV5.from_checkpoint(files["base"], trainable=True)
    fp32 = frozen_model(base, base_dtype=torch.float32)
    assert torch.equal(logits(fp32), logits(reference))  # the same code on the same fp32 tensors
    bf16 = frozen_model(base, base_dtype=torch.bfloat16)
    assert bf16.params["blocks.1.ffn.key.weight"].dtype == torch.bfloat16
    assert bf16.params["head.weight"].dtype == torch.bfloat16 and bf16.emb.dtype == torch.bfloat16
    assert bf16.params["blocks.1.att.time_decay"].dtype == torch.float32  # per-channel tensors stay fp32
    assert bf16.head.weight is bf16.params["head.weight"]  # nothing still points at the meta tensors
    err = rel_err(logits(bf16), logits(reference))
    assert 1e-5 < err < 5e-2  # bf16 matmuls: close, and really in bf16


def test_parse_targets():
    assert lora.parse_targets("all") == lora.TARGETS
    assert lora.parse_targets("ffn") == ("ffn.key", "ffn.value", "ffn.receptance")
    assert lora.parse_targets("att.value, att.key") == ("att.key", "att.value")  # canonical order
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.parse_targets("att.time_decay")


# ---- LoRA training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["lora", "pissa"])
def run(request, files):
    """12 steps of LoRA or PiSSA, validated before and after, exported (adapter + merged model)."""
    trainer = Trainer(config(files, files["dir"] / request.param, mode=request.param))
    initial = {k: v.clone() for k, v in trainer.model.params.items()}
    before = trainer.validate()
    trainer.fit(progress=False)
    return trainer, initial, before, trainer.validate(), trainer.export()


def test_adapter_training_lowers_the_loss_and_leaves_the_base_alone(run, files):
    trainer, initial, before, after, _ = run
    losses = trainer.losses
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert after.ppl < before.ppl
    base = read_checkpoint(files["base"])
    for k, v in trainer.model.params.items():
        assert not v.requires_grad
        assert torch.equal(v, initial[k]), k  # training never touched a frozen tensor
        if trainer.cfg.mode == "lora" or not k.endswith(".weight") or k.startswith(("emb", "head")) or ".ln" in k:
            assert torch.equal(v, base[k]), k  # bit-identical to the file (PiSSA replaced projections by residuals)
    assert all(float(b.detach().abs().max()) > 0 for b in trainer.adapters.B.values())  # every adapter moved
    assert {p.data_ptr() for p in trainer.optimizer.param_groups[0]["params"]} == \
        {p.data_ptr() for p in trainer.adapters.parameters()}


def test_merged_checkpoint_matches_base_plus_adapter_in_the_reference_package(run, files):
    trainer, _, _, _, merged = run
    saved = torch.load(merged, weights_only=True)
    base = read_checkpoint(files["base"])
    assert list(saved) == list(base) and all(saved[k].dtype == base[k].dtype for k in base)
    ours = logits(trainer.model)  # the training model: frozen base (or PiSSA residual) + adapters
    theirs, _ = reference_run(reference_model(merged), TOKENS)
    assert rel_err(ours[-1], theirs) < 1e-5
    assert rel_err(logits(RWKV5.from_checkpoint(merged)), ours) < 1e-5  # and it serves like any checkpoint
    assert rel_err(logits(RWKV5.from_checkpoint(files["base"])), ours) > 1e-3  # the adapter matters
    adapter = merged.with_name("adapter.pt")
    assert adapter.stat().st_size < 0.1 * merged.stat().st_size  # the adapter alone is small


def test_merge_command_equals_the_trainers_merge_and_checks_the_base(run, files, tmp_path):
    trainer, _, _, _, merged = run
    out = tmp_path / "m.pth"
    runner = CliRunner()
    args = ["--base", str(files["base"]), "--adapter", str(merged.with_name("adapter.pt"))]
    result = runner.invoke(merge_app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    a, b = torch.load(out, weights_only=True), torch.load(merged, weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    other = make_random_checkpoint(tmp_path / "other.pth", n_layer=2, n_embd=128, seed=9)
    args[1] = str(other)
    result = runner.invoke(merge_app, [*args, "--out", str(tmp_path / "x.pth")])
    assert result.exit_code != 0 and "other weights" in result.output
    result = runner.invoke(merge_app, [*args, "--out", str(tmp_path / "x.pth"), "--dtype", "bf16", "--force"])
    assert result.exit_code == 0 and torch.load(tmp_path / "x.pth")["head.weight"].dtype == torch.bfloat16


# ---- PiSSA -----------------------------------------------------------------------------------------------------


def test_pissa_init_leaves_the_model_unchanged(files):
    base = read_checkpoint(files["base"])
    model = frozen_model(base)
    before = logits(model)
    cfg = lora.LoRAConfig(rank=8, alpha=16, init="pissa")
    ad = lora.attach(model, cfg, base)
    for name in ad.A:
        W, res = base[name + ".weight"], model.params[name + ".weight"]
        assert torch.allclose(res + cfg.scale * ad.B[name] @ ad.A[name], W, atol=1e-5)  # residual + adapter == W
        S = torch.linalg.svdvals(W)
        # The adapter took the principal part: the residual's top singular value is W's (r+1)-th.
        assert torch.linalg.svdvals(res)[0] == pytest.approx(float(S[cfg.rank]), rel=1e-4)
    assert rel_err(logits(model), before) < 1e-5


def test_lora_targets_choose_what_is_wrapped(files):
    base = read_checkpoint(files["base"])
    model = frozen_model(base)
    ad = lora.attach(model, lora.LoRAConfig(rank=4, alpha=4, targets=lora.parse_targets("att.key,ffn")), base)
    assert sorted(ad.A) == sorted(f"blocks.{i}.{t}" for i in (0, 1) for t in ("att.key", "ffn.key", "ffn.value",
                                                                                  "ffn.receptance"))
    assert isinstance(model.att[1].rkvg[1], lora.LoRALinear) and not isinstance(model.att[1].rkvg[0], lora.LoRALinear)
    assert tuple(ad.A["blocks.0.ffn.value"].shape) == (4, model.config.ffn_size)
    assert tuple(ad.B["blocks.0.ffn.key"].shape) == (model.config.ffn_size, 4)
    assert torch.equal(logits(model), logits(frozen_model(base)))  # B = 0: LoRA starts at the base model


# ---- resume and precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "pissa"])
def test_resume_continues_the_same_loss_curve(files, tmp_path, mode):
    cfg = config(files, tmp_path / "a", mode=mode, val=None, steps=6, grad_checkpoint=True)
    straight = Trainer(cfg)
    straight.fit(progress=False)
    first = Trainer(replace(cfg, out=tmp_path / "b"))
    first.fit(3, progress=False)
    torch.manual_seed(12345)  # whatever happens in between must not matter
    last = first.save_checkpoint()
    resumed = Trainer(replace(cfg, out=tmp_path / "b", seed=cfg.seed))
    resumed.load_checkpoint(last)
    resumed.fit(progress=False)
    assert resumed.step == 6 and len(resumed.losses) == 6
    assert max(abs(a - b) for a, b in zip(straight.losses, resumed.losses)) < 1e-6
    for name in straight.adapters.A:
        assert torch.allclose(resumed.adapters.B[name], straight.adapters.B[name], atol=1e-6)
    assert all(torch.equal(resumed.model.params[k], straight.model.params[k]) for k in straight.model.params)


def test_bf16_base_weights_train(files, tmp_path):
    trainer = Trainer(config(files, tmp_path, val=None, steps=3, base_dtype="bf16"))
    assert trainer.model.params["blocks.0.att.key.weight"].dtype == torch.bfloat16
    trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    assert all(p.dtype == torch.float32 for p in trainer.adapters.parameters())  # fp32 adapters


def test_train_command_lora(files, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train_app, [
        "--model", str(files["base"]), "--data", str(files["train"]), "--out", str(out), "--mode", "pissa",
        "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "att", "--steps", "2", "--warmup", "1",
        "--ctx-len", "16", "--batch-size", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    ad = lora.load_adapter(out / "adapter.pt")
    assert ad["method"] == "pissa" and ad["rank"] == 4 and ad["targets"] == list(lora.parse_targets("att"))
    assert (out / "model.pth").exists() and (out / "last.pt").exists()
    result = CliRunner().invoke(train_app, [
        "--model", str(files["base"]), "--data", str(files["train"]), "--out", str(out), "--mode", "lora",
        "--lora-targets", "att.time_decay", "--no-progress"])
    assert result.exit_code != 0 and "unknown LoRA target" in result.output
