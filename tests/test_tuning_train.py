"""Training and evaluation on tiny models: loss falls, val perplexity improves, files load in the reference
package with the same logits, resume continues the same loss curve, state tuning leaves the weights alone."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.reference import reference_model, reference_run
from tests.tuning_fixtures import tuning_files
from tuning.data import TokenDataset, pydoc_dialogues, tokenize_dialogues
from tuning.evaluate import app as evaluate_app
from tuning.evaluate import batch_state, exchanges, greedy_replies, perplexity
from tuning.train import TrainConfig, Trainer, lr_factor, masked_loss
from tuning.train import app as train_app
from worker.checkpoint import make_random_checkpoint
from worker.model import RWKV5, logits_scale, read_checkpoint
from worker.state import load_time_state

TOKENS = [3, 14, 15, 92, 65, 35, 261, 89, 79]


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    return tuning_files(tmp_path_factory.mktemp("tune"), tokenizer, seed=3)


def config(files, out: Path, **kw) -> TrainConfig:
    defaults = dict(model=files["base"], data=files["train"], val=files["val"], out=out, ctx_len=32, batch_size=2,
                    warmup=2, steps=20, lr=3e-3)
    return TrainConfig(**{**defaults, **kw})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / logits_scale(b)


# ---- full fine-tuning ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(files):
    """20 steps of full fine-tuning, validated before and after, exported."""
    trainer = Trainer(config(files, files["dir"] / "full"))
    before = trainer.validate()
    trainer.fit(progress=False)
    after = trainer.validate()
    return trainer, before, after, trainer.export()


def test_full_finetune_loss_decreases(full_run):
    trainer, *_ = full_run
    losses = trainer.losses
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # nats: a random-init model learns the data fast


def test_full_finetune_improves_val_perplexity(full_run):
    _, before, after, _ = full_run
    assert after.tokens == before.tokens > 0
    assert after.ppl < 0.5 * before.ppl


def test_full_checkpoint_matches_reference_package(full_run, files):
    trainer, _, _, exported = full_run
    saved = torch.load(exported, weights_only=True)
    assert list(saved) == list(read_checkpoint(files["base"]))  # original key order (reference version detection)
    assert not torch.equal(saved["head.weight"], read_checkpoint(files["base"])["head.weight"])  # it trained
    for k, v in trainer.model.params.items():
        assert torch.equal(saved[k], v.detach())
    model = RWKV5.from_checkpoint(exported)
    ours, _ = model.forward(torch.tensor([TOKENS]), model.init_state(1))
    theirs, _ = reference_run(reference_model(exported), TOKENS)
    assert rel_err(ours[0], theirs) < 1e-4


def test_one_layer_export_is_detected_as_v5_2_by_reference(tmp_path, files):
    # The reference package detects v5.2 by key order; a 1-layer file in module order would be misread there.
    base = make_random_checkpoint(tmp_path / "l1.pth", n_layer=1, n_embd=64, seed=5)
    trainer = Trainer(config(files, tmp_path / "run", model=base, val=None, steps=2))
    trainer.fit(progress=False)
    exported = trainer.export()
    model = RWKV5.from_checkpoint(exported)
    ours, _ = model.forward(torch.tensor([TOKENS]), model.init_state(1))
    theirs, _ = reference_run(reference_model(exported), TOKENS)
    assert rel_err(ours[0], theirs) < 1e-4


def test_export_keeps_the_base_dtype(tmp_path, files):
    base = make_random_checkpoint(tmp_path / "bf16.pth", n_layer=2, n_embd=128, seed=1, dtype=torch.bfloat16)
    trainer = Trainer(config(files, tmp_path / "run", model=base, val=None, steps=1))
    trainer.fit(progress=False)
    assert {v.dtype for v in torch.load(trainer.export(), weights_only=True).values()} == {torch.bfloat16}
    trainer.cfg.save_dtype = "fp32"
    assert {v.dtype for v in torch.load(trainer.export(), weights_only=True).values()} == {torch.float32}


# ---- state tuning ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_run(files):
    trainer = Trainer(config(files, files["dir"] / "state", mode="state", windows="document", ctx_len=64, lr=0.05,
                             steps=12))
    before = trainer.validate()
    trainer.fit(progress=False)
    return trainer, before, trainer.validate(), trainer.export()


def test_state_tuning_changes_only_the_state(state_run, files):
    trainer, *_ = state_run
    base = read_checkpoint(files["base"])
    assert set(trainer.model.params) == set(base)
    for k, v in trainer.model.params.items():
        assert torch.equal(v, base[k].float()), k  # bit-identical weights
        assert not v.requires_grad
    assert trainer.time_state is not None and trainer.time_state.abs().max() > 0.1


def test_state_tuning_improves_val_perplexity(state_run):
    _, before, after, _ = state_run
    assert after.ppl < before.ppl


def test_state_file_matches_reference_state_path(state_run, files, tmp_path):
    trainer, _, _, state_file = state_run
    sd = torch.load(state_file, weights_only=True)
    c = trainer.model.config
    assert sorted(sd) == [f"blocks.{i}.att.time_state" for i in range(c.n_layer)]
    assert all(tuple(t.shape) == (c.n_head, c.head_size, c.head_size) for t in sd.values())
    # [H, N_v, N_k] on disk, the transpose of the trained [key, value] tensor.
    assert torch.equal(sd["blocks.1.att.time_state"], trainer.time_state[1].detach().transpose(1, 2))
    merged = tmp_path / "merged.pth"
    torch.save({**read_checkpoint(files["base"]), **sd}, merged)  # the reference reads time_state from the model file
    theirs, _ = reference_run(reference_model(merged), TOKENS)
    model = RWKV5.from_checkpoint(files["base"])
    init = load_time_state(state_file, c.n_layer, c.n_head, c.head_size, c.n_embd)
    ours, _ = model.forward(torch.tensor([TOKENS]), init)
    assert rel_err(ours[0], theirs) < 1e-4
    plain, _ = model.forward(torch.tensor([TOKENS]), model.init_state(1))
    assert rel_err(plain[0], theirs) > 1e-3  # the tuned state matters


# ---- resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,windows", [("full", "random"), ("state", "document")])
def test_resume_continues_the_same_loss_curve(files, tmp_path, mode, windows):
    cfg = config(files, tmp_path / "a", mode=mode, windows=windows, val=None, steps=6, warmup=2,
                 lr=3e-3 if mode == "full" else 0.05)
    straight = Trainer(cfg)
    straight.fit(progress=False)
    first = Trainer(replace(cfg, out=tmp_path / "b"))
    first.fit(3, progress=False)
    torch.manual_seed(12345)  # whatever happens in between must not matter
    last = first.save_checkpoint()
    resumed = Trainer(replace(cfg, out=tmp_path / "b"))
    resumed.load_checkpoint(last)
    assert resumed.step == 3
    resumed.fit(progress=False)
    assert len(resumed.losses) == 6
    assert max(abs(a - b) for a, b in zip(straight.losses, resumed.losses)) < 1e-6
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(straight.optimizer.param_groups[0]["lr"])
    if mode == "full":
        assert torch.allclose(resumed.model.params["head.weight"], straight.model.params["head.weight"], atol=1e-6)
    else:
        assert torch.allclose(resumed.time_state, straight.time_state, atol=1e-6)


def test_resume_refuses_another_mode(files, tmp_path):
    trainer = Trainer(config(files, tmp_path, val=None, steps=1))
    trainer.fit(progress=False)
    last = trainer.save_checkpoint()
    with pytest.raises(ValueError, match="full tuning checkpoint"):
        Trainer(config(files, tmp_path, val=None, mode="state")).load_checkpoint(last)


# ---- pieces ----------------------------------------------------------------------------------------------------


def test_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 4, 20, 0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[20] == pytest.approx(0.1)


def test_masked_loss_counts_only_masked_targets():
    logits = torch.randn(2, 3, 10)
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    loss, n = masked_loss(logits, target, mask)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:], target[0, 1:])
    assert n == 2 and torch.allclose(loss, expected)
    assert masked_loss(logits, target, torch.zeros_like(mask))[0] == 0  # no targets: 0, not NaN


def test_bf16_autocast_step_runs(files, tmp_path):
    # bf16 autocast is the CUDA default; on CPU it can be asked for, which checks the code path here.
    fp32 = Trainer(config(files, tmp_path, val=None, steps=2, precision="fp32"))
    bf16 = Trainer(config(files, tmp_path, val=None, steps=2, precision="bf16"))
    a, b = fp32.train_step(), bf16.train_step()
    assert math.isfinite(b.loss) and abs(a.loss - b.loss) < 0.05 * a.loss
    assert all(p.dtype == torch.float32 for p in bf16.model.params.values())  # fp32 master weights


def test_gradient_checkpointing_gives_the_same_step(files, tmp_path):
    plain = Trainer(config(files, tmp_path, val=None, steps=2))
    ckpt = Trainer(config(files, tmp_path, val=None, steps=2, grad_checkpoint=True))
    assert plain.train_step().grad_norm == pytest.approx(ckpt.train_step().grad_norm, rel=1e-5)


# ---- evaluation ------------------------------------------------------------------------------------------------


def test_perplexity_per_dialogue_equals_a_direct_computation(files):
    model = RWKV5.from_checkpoint(files["base"])
    val = TokenDataset.load(files["val"])
    g = torch.Generator().manual_seed(0)
    start = batch_state(model, 1)
    start.wkv = torch.randn(start.wkv.shape, generator=g)  # a non-zero initial state, as from a preset
    nll, count = 0.0, 0
    for i in range(len(val)):
        t, m = val.document(i)
        logits, _ = model.forward(t[None, :-1].long(), start, all_logits=True)
        lp = torch.log_softmax(logits[0], -1).gather(1, t[1:].long()[:, None])[:, 0]
        nll -= float((lp * m[1:]).sum())
        count += int(m[1:].sum())
    for ctx_len, batch in ((512, 3), (16, 2)):  # chunks carry the state; padding changes nothing
        p = perplexity(model, val, start, ctx_len=ctx_len, batch_size=batch)
        assert p.tokens == count and p.nll == pytest.approx(nll, rel=1e-4)
    everything = perplexity(model, val, start, masked=False)
    assert everything.tokens == val.num_tokens - len(val)  # every token but each dialogue's first
    stream = perplexity(model, val, None, ctx_len=50, stream=True)
    assert stream.tokens == val.num_trainable - int(val.mask[0])


def test_exchanges_recover_prompts_and_references(tokenizer):
    dialogues = list(itertools.islice(pydoc_dialogues(max_chars=200), 3))
    ds = tokenize_dialogues(dialogues, tokenizer, "chat")
    found = exchanges(ds, tokenizer)
    assert len(found) == 3
    for d, e in zip(dialogues, found):
        assert tokenizer.decode(e.prompt) == f"User: {d[0].text}\n\nAssistant:"
        assert e.reference == d[1].text.replace("\n\n", "\n")


def test_batched_greedy_replies_equal_one_by_one(files, tokenizer):
    model = RWKV5.from_checkpoint(files["base"])
    prompts = [tokenizer.encode(f"User: question {i}{'?' * i}\n\nAssistant:") for i in range(3)]
    together = greedy_replies(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [greedy_replies(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone and all(together)


# ---- command lines ---------------------------------------------------------------------------------------------


def test_train_and_evaluate_commands(files, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    common = ["--model", str(files["base"]), "--data", str(files["train"]), "--val", str(files["val"]),
              "--ctx-len", "32", "--batch-size", "2", "--warmup", "1", "--no-progress"]
    result = runner.invoke(train_app, [*common, "--mode", "state", "--steps", "4", "--stop-after", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "state.pth").exists() and (out / "last.pt").exists()
    result = runner.invoke(train_app, [*common, "--mode", "state", "--steps", "4", "--out", str(out),
                                       "--resume", str(out / "last.pt")])
    assert result.exit_code == 0, result.output
    log = json.loads((out / "log.json").read_text())
    assert log["step"] == 4 and len(log["losses"]) == 4 and "resumed" in result.output
    report = tmp_path / "eval.json"
    result = runner.invoke(evaluate_app, ["--model", str(files["base"]), "--data", str(files["val"]), "--state",
                                          str(out / "state.pth"), "--bleu-limit", "2", "--max-new-tokens", "4",
                                          "--json", str(report)])
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["results"]
    assert len(rows) == 2 and all(r["ppl"] > 1 and r["replies"] == 2 and "bleu" in r for r in rows.values())
    assert "zero state" in result.output
